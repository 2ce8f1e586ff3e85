"""Execution: a plan's changes go out in batches, several at once, and each batch's outcome is folded into the
summary and the state in the task's main thread.

A synchronous destination's batch is one call, ``send(batch)``. An asynchronous one's (Klaviyo's bulk import job)
is ``submit(batch) -> handle`` then ``result(handle, keys)``; with a state, the engine records each batch in the
in-flight table before it is submitted and its handle right after (``InFlight``), so that a run killed meanwhile
leaves handles the next run awaits (``Executor.resume``) instead of sending the profiles twice. The same table
makes a submit-only pass possible (``RunOptions.submit_only``, deferrable mode): every batch is submitted and its
handle recorded, nothing is awaited; the next pass of the run resumes the handles.
"""

from __future__ import annotations

import logging
import queue
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Callable, Generic, Iterable, Iterator, TypeVar

from segment_export.batching import Batch, Batcher
from segment_export.context import ExportError, RunContext
from segment_export.destinations.base import Destination, settled
from segment_export.diff import Change
from segment_export.plan import Plan
from segment_export.state import StateStore
from segment_export.summary import BatchResult

PROGRESS_EVERY_S = 5.0
T = TypeVar("T")


def _action(key: str, kind: str, result: BatchResult) -> str:
    """``created`` or ``updated`` as the destination answered (a profile new to this export may already have
    been in the audience); the diff's kind only where the destination does not say (Klaviyo's bulk import)."""
    if result.updated_keys is None:
        return "created" if kind == "create" else "updated"
    return "updated" if key in result.updated_keys else "created"


class BatchChanges:
    """What a batch's outcome needs of its changes, column by column and without payloads: the batch holds the
    payloads until it is sent, and a Klaviyo batch in flight is 10,000 profiles, twenty of them at once. A change
    tuple per profile, with its own fingerprint string, cost ~190 bytes; here a profile costs ~64 (its key, kind
    and segment tuples are shared references, its fingerprint 32 characters of one string per batch, joined by
    ``seal``). Iterating gives the changes back (``fragment`` None), in the order they were added."""

    __slots__ = ("keys", "kinds", "fingerprints", "segments", "previous")

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.kinds: list[str] = []
        self.fingerprints: list[str | None] | str = []
        self.segments: list[tuple[str, ...]] = []
        self.previous: list[tuple[str, ...]] = []

    def append(self, change: Change) -> None:
        self.keys.append(change[0])
        self.kinds.append(change[1])
        self.fingerprints.append(change[2])  # type: ignore[union-attr]
        self.segments.append(change[4])
        self.previous.append(change[5])

    def seal(self) -> None:
        """The batch is complete: its fingerprints become one string (when all are the usual 32 characters)."""
        fingerprints = self.fingerprints
        if isinstance(fingerprints, list) and all(fp is not None and len(fp) == _FP for fp in fingerprints):
            self.fingerprints = "".join(fingerprints)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.keys)

    def fingerprint_list(self) -> list[str | None]:
        """The fingerprints, one per profile (cut from the joined string of a sealed batch)."""
        fingerprints = self.fingerprints
        if isinstance(fingerprints, list):
            return fingerprints
        return [fingerprints[i:i + _FP] for i in range(0, len(fingerprints), _FP)]

    def columns(self) -> tuple[list[str], list[str | None], list[tuple[str, ...]], list[tuple[str, ...]]]:
        """(kinds, fingerprints, segments, previous segments), each in the order of ``keys``: what a batch's
        outcome needs, read without building a change tuple per profile (measured with py-spy at 1,000,000
        profiles to Klaviyo: building them twice a batch was 9 % of the task's main thread)."""
        return self.kinds, self.fingerprint_list(), self.segments, self.previous

    def __iter__(self) -> Iterator[Change]:
        make, fingerprints = tuple.__new__, self.fingerprints
        joined = isinstance(fingerprints, str)
        for i, (key, kind, segments, previous) in enumerate(zip(self.keys, self.kinds, self.segments, self.previous)):
            fingerprint = fingerprints[i * _FP:(i + 1) * _FP] if joined else fingerprints[i]
            yield make(Change, (key, kind, fingerprint, None, segments, previous))


_FP = 32  # characters of a fingerprint (``exporter.fingerprint``)


class BatchPool(Generic[T]):
    """Runs ``work(batch)`` on a thread pool; hands each answer to ``on_done(batch, answer)`` in the caller's
    thread. The first failure stops new batches; the batches in flight are still settled (``drain``)."""

    def __init__(self, concurrency: int, work: Callable[[Batch], T], on_done: Callable[[Batch, T], None],
                 on_tick: Callable[[], None], logger: logging.Logger):
        self.concurrency, self.work, self.on_done, self.on_tick, self.log = concurrency, work, on_done, on_tick, logger
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="segment-export")
        self.pending: dict[Future[T], Batch] = {}
        self.failure: BaseException | None = None
        self.failed_profiles = 0

    def _wait(self) -> set[Future[T]]:
        """Wait for batches, running ``on_tick`` (in this thread) at least every quarter second meanwhile."""
        while True:
            done = wait(self.pending, timeout=0.25, return_when=FIRST_COMPLETED).done
            self.on_tick()
            if done:
                return done

    def submit(self, batch: Batch) -> None:
        self.on_tick()
        # One batch ready beyond those in flight keeps every connection busy; more would only hold memory
        # (a Klaviyo batch is 10,000 profiles).
        while len(self.pending) > self.concurrency and self.failure is None:
            self._collect(self._wait())
        if self.failure is not None:
            raise self.failure
        self.pending[self.pool.submit(self.work, batch)] = batch

    def _collect(self, done: set[Future[T]]) -> None:
        for future in done:
            batch = self.pending.pop(future)
            try:
                answer = future.result()
            except BaseException as exc:  # noqa: BLE001 - reported once all in-flight batches are settled
                self.failed_profiles += len(batch)
                if self.failure is None:
                    self.failure = exc
                self.log.error("batch %d (%d profiles) failed: %s", batch.number, len(batch), exc)
                continue
            self.on_done(batch, answer)

    def drain(self) -> None:
        while self.pending:
            self._collect(self._wait())
        self.pool.shutdown(wait=True)
        self.on_tick()


class InFlight:
    """The in-flight table of an asynchronous destination's batches (``state.INFLIGHT_TABLE``), written from the
    thread that owns the state connection: handles arrive from the sending threads through a queue."""

    def __init__(self, state: StateStore, ctx: RunContext):
        self.state, self.clock = state, ctx.clock
        self.ids: dict[int, str] = {}  # batch number → in-flight batch id
        self.handles: dict[int, str] = {}  # batch number → handle, once recorded
        self._reported: queue.SimpleQueue[tuple[int, str]] = queue.SimpleQueue()

    def begin(self, number: int, changes: BatchChanges | Iterable[Change]) -> None:
        """Record a batch's profiles before it is handed over."""
        batch_id = self.ids[number] = uuid.uuid4().hex
        if isinstance(changes, BatchChanges):
            kinds, fingerprints, segments, _ = changes.columns()
            rows = list(zip(changes.keys, fingerprints, segments, kinds))
        else:
            rows = [(c.key, c.fingerprint, c.segments, c.kind) for c in changes]
        with self.clock.phase("state"):
            self.state.begin_batch(batch_id, rows)  # type: ignore[arg-type]

    def adopt(self, number: int, batch_id: str, handle: str) -> None:
        """Take over a batch a previous pass recorded (with its handle), to await it in this one."""
        self.ids[number], self.handles[number] = batch_id, handle

    def report(self, number: int, handle: str) -> None:
        """From a sending thread: the batch was submitted under ``handle``."""
        self._reported.put((number, handle))

    def record(self) -> None:
        """Persist the handles the sending threads reported (a killed run's jobs are then awaited, not resent)."""
        while not self._reported.empty():
            self.submitted(*self._reported.get())

    def submitted(self, number: int, handle: str) -> None:
        """From the state's thread: the batch was submitted under ``handle``."""
        if number in self.ids:
            self.handles[number] = handle
            with self.clock.phase("state"):
                self.state.batch_submitted(self.ids[number], handle)

    def end(self, number: int) -> None:
        self.handles.pop(number, None)
        with self.clock.phase("state"):
            self.state.end_batch(self.ids.pop(number))


class Executor:
    """Sends a plan's changes and folds the outcomes: the summary's counts, the state, one outcome row each."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.destination: Destination = ctx.destination
        # batch number → its profiles' changes (no payloads), in the batch's key order (``BatchChanges``; a resumed
        # batch's, a list): not a dict by key, since a Klaviyo job in flight holds 10,000 of them
        self.changes: dict[int, Iterable[Change]] = {}
        self.inflight = InFlight(ctx.state, ctx) if ctx.tracks_batches and ctx.state is not None else None
        self.submit_only = ctx.options.submit_only and self.inflight is not None
        # Profiles handed over in batches; how many the run sends is known once the diff has formed every batch
        # (a segment's row count is not it: a profile in two segments is two rows, an unchanged one is not sent).
        self.queued = 0
        self.expected: int | None = None
        self.started = self.last_log = time.monotonic()

    # -- resuming what a previous pass left in flight --------------------------------------------------------
    def resume(self, *, count: bool = False) -> None:
        """Await the handles a previous pass recorded and remember their outcome, so they are not sent again.

        ``count``: that pass was this run's own submit-only pass; its batches are counted in this summary as sent
        (``RunOptions.resume_counts``), else as ``resumed`` (a killed run's, which never reported them)."""
        if self.inflight is None:
            return
        left = self.ctx.state.inflight()  # type: ignore[union-attr]
        if not left:
            return
        pool: BatchPool[BatchResult | None] = BatchPool(
            self.destination.batches_in_flight, self._await_stored, lambda b, r: self._resumed(b, r, count), lambda: None,
            self.ctx.log)
        try:
            for number, (batch_id, (handle, rows)) in enumerate(left.items(), start=1):
                self.changes[number] = [Change(k, kind, fp, None, segs, ()) for k, fp, segs, kind in rows]  # type: ignore[arg-type]
                self.inflight.adopt(number, batch_id, handle or "")
                pool.submit(Batch(number=number, keys=[r[0] for r in rows]))
        finally:
            pool.drain()
        self.changes.clear()
        if pool.failure is not None:
            raise pool.failure

    def _await_stored(self, batch: Batch) -> BatchResult | None:
        handle = self.inflight.handles[batch.number] if self.inflight is not None else ""
        return self.destination.result(handle, batch.keys) if handle else None

    def _resumed(self, batch: Batch, result: BatchResult | None, count: bool) -> None:
        log = self.ctx.log
        if result is None:
            log.info("an interrupted run left %d profiles never confirmed: they are sent again", len(batch))
            self.inflight.end(batch.number)  # type: ignore[union-attr]
            self.changes.pop(batch.number, None)
            return
        if count:
            self.ctx.summary.add_batch(len(batch), result)
            self.ctx.settled_keys.update(batch.keys)
        else:
            self.ctx.summary.resumed += len(batch)
        log.info("resumed job %s of %s: %d accepted, %d rejected, %d skipped", self.inflight.handles[batch.number],  # type: ignore[union-attr]
                 "this run's submit pass" if count else "an interrupted run",
                 result.accepted, sum(result.rejected.values()), sum(result.skipped.values()))
        self._fold(batch, result)

    # -- executing a plan ------------------------------------------------------------------------------------
    def execute(self, plan: Plan) -> None:
        """Batch the plan's changes as the diff yields them and send each batch (``submit_only``: submit it and
        record its handle); return once every batch is settled. A failed batch stops the run (``ExportError``)."""
        ctx, destination = self.ctx, self.destination
        batcher = Batcher(destination.max_batch_profiles, destination.max_batch_bytes)
        pool: BatchPool[Any] = BatchPool(destination.batches_in_flight, self._work(), self._done(), self._tick, ctx.log)
        changes = self.changes
        diff_phase = ctx.clock.switch("diff")
        try:
            for change in plan:
                closed = batcher.add(change[0], change[3])  # type: ignore[arg-type]
                number = batcher.current_number
                held = changes.get(number)
                if held is None:
                    held = changes[number] = BatchChanges()
                held.append(change)  # type: ignore[union-attr]
                if closed is not None:
                    self._hand_over(pool, closed)
            last = batcher.flush()
            if last is not None:
                self._hand_over(pool, last)
            self.expected = self.queued
        except BaseException as exc:
            if exc is not pool.failure:
                pool.drain()
                raise
        pool.drain()
        ctx.clock.switch(diff_phase)
        if pool.failure is not None:
            summary = ctx.summary
            raise ExportError(
                f"export {ctx.spec.id} stopped: {pool.failure}. Before it stopped, {summary.accepted} profiles were "
                f"accepted and {summary.rejected} rejected; {pool.failed_profiles} profiles in failed batches have "
                "an unknown outcome, are not counted as sent, and will be sent again by the next run",
                summary,
            ) from pool.failure

    def _hand_over(self, pool: BatchPool[Any], batch: Batch) -> None:
        changes = self.changes[batch.number]
        if isinstance(changes, BatchChanges):
            changes.seal()
        if self.inflight is not None:
            self.inflight.begin(batch.number, changes)
        self.queued += len(batch)
        pool.submit(batch)

    def _tick(self) -> None:
        if self.inflight is not None:
            self.inflight.record()

    def _work(self) -> Callable[[Batch], Any]:
        """What a sending thread does with a batch: send it, or submit it (and await its result unless submit-only)."""
        destination, inflight = self.destination, self.inflight
        if not destination.asynchronous:
            return destination.send
        if self.submit_only:
            return destination.submit

        def submit_and_await(batch: Batch) -> BatchResult:
            handle = destination.submit(batch)
            if inflight is not None:
                inflight.report(batch.number, handle)
            return settled(destination, handle, batch.keys)

        return submit_and_await

    def _done(self) -> Callable[[Batch, Any], None]:
        return self._submitted if self.submit_only else self._sent

    def _submitted(self, batch: Batch, handle: str) -> None:
        """Submit-only: the batch's handle is recorded and reported; its outcome is the next pass's."""
        self.inflight.submitted(batch.number, handle)  # type: ignore[union-attr]
        self.changes.pop(batch.number, None)
        summary = self.ctx.summary
        summary.submitted += len(batch)
        summary.handles.append(handle)
        self.ctx.log.info("batch %d: %d profiles submitted; %d profiles in %d jobs so far", batch.number, len(batch),
                          summary.submitted, len(summary.handles))

    def _sent(self, batch: Batch, result: BatchResult) -> None:
        self.ctx.summary.add_batch(len(batch), result)
        self._fold(batch, result)
        self._progress(batch, result)

    def _progress(self, batch: Batch, result: BatchResult) -> None:
        summary, now = self.ctx.summary, time.monotonic()
        # Every batch of a small export; for a large one, a line every few seconds (the summary follows).
        if summary.batches > 10 and now - self.last_log < PROGRESS_EVERY_S:
            return
        self.last_log = now
        rate = summary.sent / max(now - self.started, 1e-6)
        of = f"/{self.expected}" if self.expected is not None else f" of {self.queued} queued so far"
        self.ctx.log.info(
            "batch %d: %d sent, %d accepted, %d rejected, %d skipped | total %d%s profiles sent, %.0f profiles/s",
            batch.number, len(batch), result.accepted, sum(result.rejected.values()),
            sum(result.skipped.values()), summary.sent, of, rate,
        )

    # -- folding one batch's outcome -------------------------------------------------------------------------
    def _fold(self, batch: Batch, result: BatchResult) -> None:
        """The batch's state, outcomes and the end of its in-flight record: one transaction, undone if any part
        fails (the batch is then resumed or sent again by the next run, never half-remembered)."""
        self._tick()
        state = self.ctx.state
        try:
            self.save_outcome(batch.keys, self.changes.pop(batch.number, []), result, commit=self.inflight is None)
            if self.inflight is not None:
                self.inflight.end(batch.number)
        except BaseException:
            if state is not None:
                state.rollback()
            raise

    def save_outcome(self, keys: list[str], changes: BatchChanges | Iterable[Change], result: BatchResult,
                     commit: bool = True) -> None:
        """Remember what the destination confirmed; queue its tag changes; one outcome row per profile.
        ``changes`` are the batch's, in the order of its ``keys``."""
        ctx = self.ctx
        manages = self.destination.manages_segments
        if not isinstance(changes, BatchChanges):
            changes = _batch_changes(changes)
        kinds, fingerprints, segments, previous = changes.columns()
        if len(kinds) != len(keys):
            raise ValueError(f"a batch of {len(keys)} keys has {len(kinds)} changes")
        accepted_keys, skipped_keys, rejected_keys = result.accepted_keys, result.skipped_keys, result.rejected_keys
        accepted, outcomes, tagged = [], [], []
        for i, key in enumerate(keys):
            if key in accepted_keys:
                # Segments are remembered once their tags are applied (Mailchimp); until then, the old ones.
                accepted.append((key, fingerprints[i], previous[i] if manages else segments[i]))
                outcomes.append((key, _action(key, kinds[i], result), None))
                if manages and segments[i] != previous[i]:  # a segment (tag) change to queue
                    tagged.append(Change(key, kinds[i], fingerprints[i], None, segments[i], previous[i]))  # type: ignore[arg-type]
            elif key in skipped_keys:
                # A lasting refusal: remembered, so it is not retried until the row changes.
                accepted.append((key, fingerprints[i], previous[i]))
                outcomes.append((key, "skipped", skipped_keys[key]))
            elif key in rejected_keys:
                outcomes.append((key, "rejected", rejected_keys[key]))
        if ctx.applies_changes:
            ctx.queue_tags(*tagged)
        if ctx.state is not None:
            new = {key for key, kind in zip(keys, kinds) if kind == "create"}  # not in the state yet: nothing to replace
            with ctx.clock.phase("state"):
                ctx.state.save(accepted, new=new, commit=False, profile_ids=result.profile_ids)
                ctx.state.record_outcomes(ctx.options.run_id, outcomes, commit=commit)


def _batch_changes(changes: Iterable[Change]) -> BatchChanges:
    """A resumed batch's changes (a list, as the in-flight table gave them back) in columns."""
    held = BatchChanges()
    for change in changes:
        held.append(change)
    return held
