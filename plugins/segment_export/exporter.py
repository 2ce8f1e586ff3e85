"""One export run: read → stage → diff against the last accepted state → send changes → remember what landed.

1. Check (before anything is sent): every column the spec names is one of the source's real columns, the
   segment fits the limit, the target exists.
2. Read the segment in chunks; map, validate and serialize each row (a row that cannot be sent gets an
   ``invalid`` outcome row); stage the profiles on local disk (a profile in several segments is staged once,
   with all its segments).
3. Diff the staged segment against the export's state (what the destination accepted last time): new and
   changed profiles are sent, unchanged ones are not (unless a full resync is asked for), profiles that left
   get the export's ``on_leave``.
4. Send the changes in batches, several at once; after each batch, remember the profiles the destination
   confirmed and write one outcome row per profile. Then segment (tag) changes and leavers, unless they would
   take out more than ``sync.max_leave_share`` of the remembered profiles (or the segment came back empty):
   then only tag additions go out and the run fails before any removal (the mass-removal guard).
A dry run stops after step 3 and reports the plan.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import time
from contextlib import contextmanager
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from segment_export.batching import Batch, Batcher
from segment_export.destinations.base import Destination
from segment_export.diff import Change, diff
from segment_export.limit import decide_limit
from segment_export.mapping import Rejection, RowMapper
from segment_export.sources.base import Source, check_columns
from segment_export.spec import ExportSpec, MappingSpec
from segment_export.staging import Staging
from segment_export.state import StateStore
from segment_export.summary import PHASES, BatchResult, ExportSummary

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 5.0
EXAMPLES = 3
#: top-level payload fields that describe the request, not the person (kept in a dry run's examples)
_STRUCTURAL = frozenset({"type", "status", "subscribe"})
_EMAIL_FIELDS = frozenset({"email", "email_address"})


@dataclass(frozen=True)
class RunOptions:
    """What one run may change on demand (a manual trigger's form): never beyond what the spec allows."""

    dry_run: bool = False  # plan and report, send nothing
    full_resync: bool = False  # send every profile, not only the changed ones
    max_profiles: int | None = None  # a lower limit for this run only
    allow_mass_leave: bool = False  # this run may remove more than sync.max_leave_share (the trigger form)
    run_id: str = "manual"

    def limit(self, spec: ExportSpec) -> int:
        if self.max_profiles is None:
            return spec.max_profiles
        if self.max_profiles < 1 or self.max_profiles > spec.max_profiles:
            raise ValueError(
                f"max_profiles {self.max_profiles} must be between 1 and the export's limit of {spec.max_profiles}"
            )
        return self.max_profiles


class ExportError(RuntimeError):
    """The export stopped part-way; ``summary`` holds what the destination confirmed before it stopped."""

    def __init__(self, message: str, summary: ExportSummary):
        super().__init__(message)
        self.summary = summary


class MassLeaveError(ExportError):
    """The run would remove more of the export's remembered profiles than ``sync.max_leave_share`` allows (or the
    segment came back empty): additions and updates were sent, removals were not."""


class RejectedShareError(ExportError):
    """The run finished, but too much of the segment was invalid or rejected: fail so that alerting fires."""


def check_rejected_share(spec: ExportSpec, summary: ExportSummary) -> None:
    limit = spec.limit.max_rejected_share
    bad = summary.invalid + summary.rejected
    if limit is None or summary.read == 0 or bad / summary.read <= limit:
        return
    reasons = (summary.invalid_reasons + summary.rejected_reasons).most_common(3)
    top = "; ".join(f"{count} x {reason}" for reason, count in reasons)
    raise RejectedShareError(
        f"export {spec.id}: {bad} of {summary.read} rows ({bad / summary.read:.1%}) were invalid or rejected, over "
        f"the limit of {limit:.1%} (limit.max_rejected_share). Accepted: {summary.accepted}. Top reasons: {top}",
        summary,
    )


def spec_columns(spec: ExportSpec) -> list[tuple[str, str]]:
    """Every source column the spec names, with the field that names it (for errors that point at the spec)."""
    named = [("source.segment_column", spec.source.segment_column)]
    fields = spec.mapping.fields()  # the standard fields, then the attributes; consent (never sent) between them
    standard = [(f"mapping.{name}", column) for name, column in fields if not name.startswith("attributes.")]
    named += standard + [("mapping.consent", spec.mapping.consent)]
    named += [(f"mapping.{name}", column) for name, column in fields[len(standard):]]
    named.append(("limit.order_by", spec.limit.order_by))
    return [(field, column) for field, column in named if column]


def fingerprint(fragment: bytes) -> str:
    """What was sent, in 32 hex characters: any change to a mapped value (or to the mapping) changes it."""
    return hashlib.blake2b(fragment, digest_size=16).hexdigest()


def redacted_example(fragment: bytes) -> dict[str, Any]:
    """A payload for the dry-run report (an XCom anyone who sees the DAG can read): its shape and field names,
    with every mapped value masked (names, phone, external id, properties, merge fields...); an address keeps
    only its domain. Only what describes the request itself (``type``, ``status``, ``subscribe``) is shown."""
    import json

    payload = json.loads(fragment)
    return {k: v if k in _STRUCTURAL and not isinstance(v, (dict, list)) else _masked(k, v) for k, v in payload.items()}


def _masked(key: str, value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _masked(k, v) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(key, v) for v in value]
    if value is None:
        return None
    if key in _EMAIL_FIELDS and isinstance(value, str) and "@" in value:
        return "***@" + value.rsplit("@", 1)[1]
    return "***"


def _action(key: str, change: Change, result: BatchResult) -> str:
    """``created`` or ``updated`` as the destination answered (a profile new to this export may already have
    been in the audience); the diff's kind only where the destination does not say (Klaviyo's bulk import)."""
    if result.updated_keys is None:
        return "created" if change.kind == "create" else "updated"
    return "updated" if key in result.updated_keys else "created"


class PhaseClock:
    """CPU seconds of the calling thread per phase (``summary.PHASES``); time in a phase entered inside another
    counts for the inner one only. Switched per chunk or batch, never per row."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.current: str | None = None
        self.since = time.thread_time()

    def switch(self, phase: str | None) -> str | None:
        """Start counting ``phase`` (None: stop counting); return the phase that was counted until now."""
        now = time.thread_time()
        if self.current is not None:
            self.seconds[self.current] = self.seconds.get(self.current, 0.0) + now - self.since
        previous, self.current, self.since = self.current, phase, now
        return previous

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        previous = self.switch(name)
        try:
            yield
        finally:
            self.switch(previous)


class _Sender:
    """Sends batches on a thread pool; folds each result into the summary and the state, in the caller's thread."""

    def __init__(self, destination: Destination, summary: ExportSummary, logger: logging.Logger,
                 on_result: Callable[[Batch, BatchResult], None], on_submit: Callable[[Batch], None],
                 on_tick: Callable[[], None]):
        self.destination, self.summary, self.log = destination, summary, logger
        self.on_result, self.on_submit, self.on_tick = on_result, on_submit, on_tick
        # Profiles handed over in batches; how many the run sends is known once the diff has formed every batch
        # (a segment's row count is not it: a profile in two segments is two rows, an unchanged one is not sent).
        self.queued = 0
        self.expected: int | None = None
        self.pool = ThreadPoolExecutor(max_workers=destination.concurrency, thread_name_prefix="segment-export")
        self.pending: dict[Future[BatchResult], Batch] = {}
        self.failure: BaseException | None = None
        self.failed_profiles = 0
        self.started = self.last_log = time.monotonic()

    def _wait(self, return_when: str) -> set[Future[BatchResult]]:
        """Wait for batches, running ``on_tick`` (in this thread) at least every quarter second meanwhile."""
        while True:
            done = wait(self.pending, timeout=0.25, return_when=return_when).done
            self.on_tick()
            if done:
                return done

    def submit(self, batch: Batch) -> None:
        self.on_tick()
        # One batch ready beyond those in flight keeps every connection busy; more would only hold memory
        # (a Klaviyo batch is 10,000 profiles).
        while len(self.pending) > self.destination.concurrency and self.failure is None:
            self._collect(self._wait(FIRST_COMPLETED))
        if self.failure is not None:
            raise self.failure
        self.on_submit(batch)
        self.queued += len(batch)
        self.pending[self.pool.submit(self.destination.send, batch)] = batch

    def _collect(self, done: set[Future[BatchResult]]) -> None:
        for future in done:
            batch = self.pending.pop(future)
            try:
                result = future.result()
            except BaseException as exc:  # noqa: BLE001 - reported once all in-flight batches are settled
                self.failed_profiles += len(batch)
                if self.failure is None:
                    self.failure = exc
                self.log.error("batch %d (%d profiles) failed: %s", batch.number, len(batch), exc)
                continue
            self.summary.add_batch(len(batch), result)
            self.on_result(batch, result)
            now = time.monotonic()
            # Every batch of a small export; for a large one, a line every few seconds (the summary follows).
            if self.summary.batches > 10 and now - self.last_log < PROGRESS_EVERY_S:
                continue
            self.last_log = now
            rate = self.summary.sent / max(now - self.started, 1e-6)
            of = f"/{self.expected}" if self.expected is not None else f" of {self.queued} queued so far"
            self.log.info(
                "batch %d: %d sent, %d accepted, %d rejected, %d skipped | total %d%s profiles sent, %.0f profiles/s",
                batch.number, len(batch), result.accepted, sum(result.rejected.values()),
                sum(result.skipped.values()), self.summary.sent, of, rate,
            )

    def drain(self) -> None:
        while self.pending:
            self._collect(self._wait(FIRST_COMPLETED))
        self.pool.shutdown(wait=True)
        self.on_tick()


class _Run:
    """The state of one run while it goes: kept together so each step stays small."""

    def __init__(self, spec: ExportSpec, source: Source, destination: Destination, state: StateStore | None,
                 options: RunOptions, logger: logging.Logger):
        self.spec, self.source, self.destination, self.state = spec, source, destination, state
        self.options, self.log = options, logger
        self.summary = ExportSummary(spec.id, destination.type, destination.target_id, dry_run=options.dry_run)
        self.staging = Staging()
        self.clock = PhaseClock()
        self.batch_changes: dict[int, dict[str, Change]] = {}
        # Asynchronous destinations: each batch is recorded before it is handed over (see state.INFLIGHT_TABLE).
        self.track = state is not None and destination.asynchronous and not options.dry_run
        self.batch_ids: dict[int, str] = {}
        # Job ids arrive on the sending threads; the state connection belongs to this one (SQLite insists).
        self.submitted: queue.SimpleQueue[tuple[int, str]] = queue.SimpleQueue()
        if self.track:
            destination.on_submitted = lambda batch, job_id: self.submitted.put((batch.number, job_id))

    # -- 0: finish what an interrupted run left in flight ------------------------------------------------------
    def resume(self) -> None:
        """Await the jobs a killed run had submitted and remember their outcome, so they are not sent again."""
        if not self.track:
            return
        for batch_id, (job_id, rows) in self.state.inflight().items():
            result = self.destination.resume(job_id, [r[0] for r in rows]) if job_id else None
            if result is not None:
                changes = {k: Change(k, kind, fp, None, segs, ()) for k, fp, segs, kind in rows}  # type: ignore[arg-type]
                self._save_outcome([r[0] for r in rows], changes, result)
                self.summary.resumed += len(rows)
                self.log.info("resumed job %s of an interrupted run: %d accepted, %d rejected",
                              job_id, result.accepted, sum(result.rejected.values()))
            else:
                self.log.info("an interrupted run left %d profiles never confirmed: they are sent again", len(rows))
            self.state.end_batch(batch_id)

    # -- 1 + 2: check, read and stage ---------------------------------------------------------------------
    def stage(self) -> int:
        spec, options = self.spec, self.options
        columns = spec.mapping.columns()
        segment_column = spec.source.segment_column
        if segment_column and segment_column not in columns:
            columns = columns + [segment_column]
        # Before anything is read or sent: each named column must be one of the source's real columns.
        check_columns(f"export {spec.id}: the {self.source.description}", spec_columns(spec), self.source.columns())
        mapper = RowMapper(spec.mapping, columns)
        self._email_only = RowMapper(MappingSpec(email=spec.mapping.email), columns)
        seg_index = columns.index(segment_column) if segment_column else None
        default_segment = spec.id  # without a segment column, the export itself is the one segment

        max_profiles = options.limit(spec)
        total = self.source.count()
        # A run-time limit is for trying an export on a few profiles: it truncates (by order_by, else email).
        on_exceed = "truncate" if options.max_profiles is not None else spec.limit.on_exceed
        order_by = spec.limit.order_by or (spec.mapping.email if options.max_profiles is not None else None)
        decision = decide_limit(total, max_profiles, on_exceed)
        self.log.info("read plan: %s, %d rows in the segment, limit %d profiles", self.source.description, total, max_profiles)
        if decision.truncated:
            self.log.warning(
                "the segment has %d rows, over the limit of %d: exporting the first %d by %r, skipping %d",
                total, max_profiles, decision.read_limit, order_by, decision.skipped,
            )
        self.summary.skipped_by_limit = decision.skipped
        self.destination.preflight()  # read-only requests: a dry run checks the target too

        summary, encode, clock = self.summary, self.destination.encode, self.clock
        chunks = iter(self.source.chunks(
            columns, order_by=order_by if decision.truncated else None, tie_breaker=spec.mapping.email,
            limit=decision.read_limit,
        ))
        while True:
            previous_phase = clock.switch("read")
            rows = next(chunks, None)
            clock.switch("map")
            if rows is None:
                clock.switch(previous_phase)
                break
            first = summary.read
            summary.read += len(rows)
            profiles: list[tuple[str, str, bytes, str]] = []
            invalid: list[tuple[str, str, str]] = []
            for i, row in enumerate(rows):
                profile = mapper.map(row)
                if isinstance(profile, Rejection):
                    summary.add_invalid(profile.reason)
                    invalid.append((self._row_key(row, first + i + 1), "invalid", profile.reason))
                    continue
                fragment = encode(profile)
                if isinstance(fragment, Rejection):
                    summary.add_invalid(fragment.reason)
                    invalid.append((profile.key, "invalid", fragment.reason))
                    continue
                segment = str(row[seg_index]) if seg_index is not None else default_segment
                profiles.append((profile.key, fingerprint(fragment), fragment, segment))
            clock.switch("stage")
            self.staging.add(profiles)
            if invalid and self.state is not None and not options.dry_run:
                with clock.phase("state"):  # per chunk: memory stays bounded however many rows are invalid
                    self.state.record_outcomes(options.run_id, invalid)
            clock.switch(previous_phase)
        with clock.phase("stage"):
            if self.state is not None:
                self.staging.load_previous(self.state.previous())
            self.staging.seal()
        return decision.read_limit or total

    def _row_key(self, row: tuple[Any, ...], position: int) -> str:
        """The outcome key of a row rejected before sending: its profile key (the lower-cased email) when the
        address is valid, else ``row <n>`` (its position in the order this run read the source), so that the
        outcomes table holds nothing personal beyond the keys the segment already has."""
        profile = self._email_only.map(row)
        return profile.key if not isinstance(profile, Rejection) else f"row {position}"

    # -- 3 + 4: diff and send --------------------------------------------------------------------------------
    def send(self) -> None:
        summary, destination, dry = self.summary, self.destination, self.options.dry_run
        on_leave = self.spec.on_leave
        batcher = Batcher(destination.max_batch_profiles, destination.max_batch_bytes)
        sender = _Sender(destination, summary, self.log, self._batch_done, self._batch_submitting, self._record_jobs)
        leavers = untagged = 0  # profiles that would leave (on_leave) / stay but lose a segment's tag or list
        manages_segments = destination.manages_segments
        diff_phase = self.clock.switch("diff")
        try:
            for change in diff(self.staging.current(), self.staging.previous(), full_resync=self.options.full_resync):
                if change.kind == "leave":
                    if on_leave != "keep":
                        leavers += 1
                        if dry:
                            self._count_tags(change)
                        else:  # its tag changes are queued once the mass-removal guard lets them go
                            self.staging.queue_leaver(change.key, change.previous_segments)
                    continue
                if change[5] and manages_segments and change.segments_removed:
                    untagged += 1
                if change.kind == "unchanged":
                    summary.unchanged += 1
                    if destination.manages_segments and (change.segments_added or change.segments_removed):
                        if dry:
                            self._count_tags(change)
                        else:
                            self._queue_tags(change)
                    continue
                if dry:
                    summary.planned += 1
                    self._count_tags(change)
                    if len(summary.examples) < EXAMPLES:
                        summary.examples.append({"action": change.kind, "payload": redacted_example(change.fragment)})
                    continue
                closed = batcher.add(change.key, change.fragment)
                self._remember(batcher.current_number, change)
                if closed is not None:
                    sender.submit(closed)
            last = batcher.flush()
            if last is not None:
                sender.submit(last)
            sender.expected = sender.queued
        except BaseException as exc:
            if exc is not sender.failure:
                sender.drain()
                raise
        finally:
            summary.duplicates = self.staging.duplicates  # counted as the diff read the staged segment
        sender.drain()
        self.clock.switch(diff_phase)
        if sender.failure is not None:
            raise ExportError(
                f"export {self.spec.id} stopped: {sender.failure}. Before it stopped, {summary.accepted} profiles were "
                f"accepted and {summary.rejected} rejected; {sender.failed_profiles} profiles in failed batches have "
                "an unknown outcome, are not counted as sent, and will be sent again by the next run",
                summary,
            ) from sender.failure
        stop = self._mass_leave(leavers, untagged)
        if dry:
            summary.removed = leavers  # would be removed
            summary.batches = -(-summary.planned // destination.max_batch_profiles)  # would be sent
            if stop:
                summary.held_back = leavers + untagged
                self.log.warning("a real run would stop here: %s", stop)
            return
        if stop:
            self.staging.withhold_removals()
        else:
            self._queue_leaver_tags()
        self._apply_segments()
        if stop:
            summary.held_back = leavers + untagged
            raise MassLeaveError(
                f"{stop}. The run sent its additions and updates ({summary.accepted} profiles accepted, "
                f"{summary.tags_added} tags added) and then stopped: nothing was removed, untagged or unsubscribed, "
                "and the next run will stop again. If the removal is intended, trigger the run with "
                "allow_mass_leave: true (or set sync.allow_mass_leave: true, or raise sync.max_leave_share)",
                summary,
            )
        self._apply_leavers(on_leave)

    def _mass_leave(self, leavers: int, untagged: int) -> str | None:
        """Why this run must not send its removals, or None. A typo in a segment name or filter, or a broken
        upstream table, makes a segment look empty; sending that would strip every profile the export manages."""
        spec, remembered = self.spec, self.staging.previous_rows
        losing = leavers + untagged
        if losing == 0 or remembered == 0 or self.options.allow_mass_leave or spec.sync.allow_mass_leave:
            return None
        share, limit = losing / remembered, spec.sync.max_leave_share
        what = (f"export {spec.id}: this run would remove, untag or unsubscribe {losing} of the {remembered} profiles "
                f"the export remembers ({share:.1%}: {leavers} left the segment, on_leave: {spec.on_leave}; "
                f"{untagged} lost one of their segments)")
        if self.staging.rows == 0:
            return f"{what}, because the segment came back empty (0 valid profiles of {self.summary.read} rows read)"
        if limit is not None and share > limit:
            return f"{what}, over the limit of {limit:.1%} (sync.max_leave_share)"
        return None

    def _queue_leaver_tags(self) -> None:
        """The tag (list) removals of the profiles that left: queued after the diff, once the guard agreed."""
        if not self.destination.manages_segments:
            return
        for chunk in self.staging.leavers(5000):
            self._queue_tags(*(tuple.__new__(Change, (key, "leave", None, None, (), segments)) for key, segments in chunk))

    def _remember(self, batch_number: int, change: Change) -> None:
        """Keep what the batch's outcome needs, without the payload (the batch holds it until it is sent): a
        Klaviyo batch in flight is 10,000 profiles, and eleven of them may be."""
        self.batch_changes.setdefault(batch_number, {})[change[0]] = tuple.__new__(
            Change, (change[0], change[1], change[2], None, change[4], change[5])
        )

    def _count_tags(self, change: Change) -> None:
        if self.destination.manages_segments:
            self.summary.tags_added += len(change.segments_added)
            self.summary.tags_removed += len(change.segments_removed)

    def _queue_tags(self, *changes: Change) -> None:
        if not self.destination.manages_segments:
            return
        work = [(c.key, c.fingerprint or "", c.segments, c.segments_added, c.segments_removed)
                for c in changes if c.segments_added or c.segments_removed]
        if work:
            self.staging.queue_tags(work)

    def _batch_submitting(self, batch: Batch) -> None:
        if self.track:
            import uuid

            batch_id = self.batch_ids[batch.number] = uuid.uuid4().hex
            changes = self.batch_changes[batch.number]
            with self.clock.phase("state"):
                self.state.begin_batch(batch_id, [(c.key, c.fingerprint, c.segments, c.kind) for c in changes.values()])

    def _record_jobs(self) -> None:
        """Persist the job ids the sending threads reported (a killed run's jobs are then awaited, not resent)."""
        while not self.submitted.empty():
            number, job_id = self.submitted.get()
            if number in self.batch_ids:
                with self.clock.phase("state"):
                    self.state.batch_submitted(self.batch_ids[number], job_id)

    def _batch_done(self, batch: Batch, result: BatchResult) -> None:
        self._record_jobs()
        # The batch's state, outcomes and the end of its in-flight record: one transaction, undone if any part
        # fails (the batch is then resumed or sent again by the next run, never half-remembered).
        try:
            self._save_outcome(batch.keys, self.batch_changes.pop(batch.number, {}), result, commit=not self.track)
            if self.track:
                with self.clock.phase("state"):
                    self.state.end_batch(self.batch_ids.pop(batch.number))
        except BaseException:
            if self.state is not None:
                self.state.rollback()
            raise

    def _save_outcome(self, keys: list[str], changes: dict[str, Change], result: BatchResult, commit: bool = True) -> None:
        """Remember what the destination confirmed; queue its tag changes; one outcome row per profile."""
        accepted, outcomes, tagged = [], [], []
        for key in keys:
            change = changes[key]
            if key in result.accepted_keys:
                # Segments are remembered once their tags are applied (Mailchimp); until then, the old ones.
                remembered = change.previous_segments if self.destination.manages_segments else change.segments
                accepted.append((key, change.fingerprint, remembered))
                outcomes.append((key, _action(key, change, result), None))
                tagged.append(change)
            elif key in result.skipped_keys:
                # A lasting refusal: remembered, so it is not retried until the row changes.
                accepted.append((key, change.fingerprint, change.previous_segments))
                outcomes.append((key, "skipped", result.skipped_keys[key]))
            elif key in result.rejected_keys:
                outcomes.append((key, "rejected", result.rejected_keys[key]))
        self._queue_tags(*tagged)
        if self.state is not None:
            new = {k for k in keys if changes[k].kind == "create"}  # not in the state yet: nothing to replace
            with self.clock.phase("state"):
                self.state.save(accepted, new=new, commit=False, profile_ids=result.profile_ids)
                self.state.record_outcomes(self.options.run_id, outcomes, commit=commit)

    def _apply_segments(self) -> None:
        if not self.destination.manages_segments:
            return
        self.destination.prepare_segments(self.staging.tag_segments())
        failed: set[str] = set()

        def settle(future: Future[set[str]], op: str, keys: list[str]) -> None:
            failed_here = future.result()
            failed.update(failed_here)
            if op == "+":
                self.summary.tags_added += len(keys) - len(failed_here)
            else:
                self.summary.tags_removed += len(keys) - len(failed_here)

        # Concurrently, as the batches went: a first run tags every profile (a million profiles in four
        # segments are over 2,000 calls of 500). At most two calls per connection wait, so keys stay few.
        concurrency = self.destination.concurrency
        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="segment-export-tags") as pool:
            pending: dict[Future[set[str]], tuple[str, list[str]]] = {}
            for segment, op, keys in self.staging.tag_chunks(self.destination.max_batch_profiles):
                while len(pending) >= 2 * concurrency:
                    for future in wait(pending, return_when=FIRST_COMPLETED).done:
                        settle(future, *pending.pop(future))
                pending[pool.submit(self.destination.change_segment, segment, op, keys, **self._ids(keys, op == "-"))] = (op, keys)
            for future in wait(pending).done:
                settle(future, *pending[future])
        if self.state is not None:
            batch: list[tuple[str, str, tuple[str, ...]]] = []
            for key, fp, segments in self.staging.pending():
                if key not in failed:
                    batch.append((key, fp, segments))
                if len(batch) >= 5000:
                    self.state.save(batch)
                    batch = []
            self.state.save(batch)
            # Profiles the destination no longer holds (Mailchimp: deleted or archived there since): forgotten, so
            # the next run adds them again, instead of retrying their tags forever.
            gone = getattr(self.destination, "not_in_audience", None)
            if gone:
                self.state.save([], forgotten=sorted(gone))
        if failed:
            self.log.warning("%d segment (tag) changes failed; they are retried by the next run", len(failed))

    def _apply_leavers(self, on_leave: str) -> None:
        for keys in self.staging.leaver_chunks(1000):
            failed = self.destination.remove(keys, on_leave, **self._ids(keys, exclusive=True))
            # Left in place on purpose (Klaviyo: the profile is also a row's still in the segment): not removed,
            # but forgotten all the same: the row left the segment.
            kept: dict[str, str] = getattr(self.destination, "kept", None) or {}
            done = [k for k in keys if k not in failed]
            outcomes = [(k, "skipped", kept[k]) if k in kept else (k, "removed", f"left the segment ({on_leave})") for k in done]
            self.summary.removed += sum(1 for _, outcome, _ in outcomes if outcome == "removed")
            if self.state is not None:
                self.state.save([], forgotten=done)
                self.state.record_outcomes(self.options.run_id, outcomes)

    def _ids(self, keys: list[str], exclusive: bool = False) -> dict[str, Any]:
        """``profile_ids=`` the destination's remembered ids of these profiles, for a destination that acts by id
        (looked up here: the state connection belongs to this thread). ``exclusive`` (taking profiles off): only
        ids no other remembered profile holds (see ``StateStore.profile_ids``)."""
        if not self.destination.wants_profile_ids:
            return {}
        return {"profile_ids": self.state.profile_ids(keys, exclusive=exclusive) if self.state is not None else {}}

    def close(self) -> None:
        self.staging.close()


def run_export(
    spec: ExportSpec,
    source: Source,
    destination: Destination,
    *,
    state: StateStore | None = None,
    options: RunOptions | None = None,
    logger: logging.Logger | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> ExportSummary:
    """Run one export and return its summary; raise before sending when the input is wrong.

    Without a ``state`` every run sends the whole segment (nothing is remembered); with one, only changes.
    """
    logger = logger or log
    options = options or RunOptions()
    started = clock()
    main_cpu, process_cpu = time.thread_time(), time.process_time()
    run = _Run(spec, source, destination, state, options, logger)
    try:
        run.resume()
        run.stage()
        run.send()
    finally:
        run.summary.seconds = clock() - started
        run.close()
        run.clock.switch(None)  # a phase an exception left open ends here
        main_cpu, process_cpu = time.thread_time() - main_cpu, time.process_time() - process_cpu
        phases = run.clock.seconds
        phases["other"] = max(main_cpu - sum(phases.values()), 0.0)
        phases["sending"] = max(process_cpu - main_cpu, 0.0)
        run.summary.cpu_seconds = {p: phases[p] for p in PHASES if p in phases}
    summary = run.summary
    if not summary.dry_run:
        check_rejected_share(spec, summary)
    if summary.dry_run:
        logger.info("dry run: nothing was sent")
    elif summary.sent == 0 and summary.removed == 0 and summary.tags_added + summary.tags_removed == 0:
        logger.info("the segment has not changed since the last run: nothing to send")
    return summary
