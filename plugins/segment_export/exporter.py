"""One export run: source → mapping → limit → batches → destination → summary.

The order matters: the mapping's columns are checked and the limit decided before the destination is even
asked whether the target exists, and both before the first profile is sent. Batches go out concurrently
(the destination says how many at once) while the source is still being read; at most two batches per
sender are queued, so memory is bounded by the batch size, not by the segment.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Callable

from segment_export.batching import Batch, Batcher
from segment_export.destinations.base import Destination
from segment_export.limit import decide_limit
from segment_export.mapping import Rejection, RowMapper
from segment_export.sources.base import Source
from segment_export.spec import ExportSpec
from segment_export.summary import BatchResult, ExportSummary

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 5.0


@dataclass(frozen=True)
class RunOptions:
    """What one run may change on demand (a manual trigger's form): never beyond what the spec allows."""

    dry_run: bool = False  # plan and report, send nothing
    full_resync: bool = False  # send every profile, not only the changed ones
    max_profiles: int | None = None  # a lower limit for this run only

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


class _Sender:
    """Sends batches on a thread pool and folds their results into the summary, in the caller's thread."""

    def __init__(self, destination: Destination, summary: ExportSummary, logger: logging.Logger, expected: int, dry_run: bool = False):
        self.destination, self.summary, self.log = destination, summary, logger
        self.dry_run = dry_run
        self.expected = expected
        self.pool = ThreadPoolExecutor(max_workers=destination.concurrency, thread_name_prefix="segment-export")
        self.pending: dict[Future[BatchResult], Batch] = {}
        self.failure: BaseException | None = None
        self.failed_profiles = 0
        self.started = self.last_log = time.monotonic()

    def submit(self, batch: Batch) -> None:
        if self.dry_run:  # the plan only: count what would go out, send nothing
            self.summary.add_planned(len(batch))
            return
        while len(self.pending) >= 2 * self.destination.concurrency and self.failure is None:
            self._collect(wait(self.pending, return_when=FIRST_COMPLETED).done)
        if self.failure is not None:
            raise self.failure
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
            now = time.monotonic()
            # Every batch of a small export; for a large one, a line every few seconds (the summary follows).
            if self.summary.batches > 10 and now - self.last_log < PROGRESS_EVERY_S:
                continue
            self.last_log = now
            rate = self.summary.sent / max(now - self.started, 1e-6)
            self.log.info(
                "batch %d: %d sent, %d accepted, %d rejected | total %d/%d accepted, %.0f profiles/s",
                batch.number, len(batch), result.accepted, sum(result.rejected.values()),
                self.summary.accepted, self.expected, rate,
            )

    def drain(self) -> None:
        while self.pending:
            self._collect(wait(self.pending).done)
        self.pool.shutdown(wait=True)


def run_export(
    spec: ExportSpec,
    source: Source,
    destination: Destination,
    *,
    options: RunOptions | None = None,
    logger: logging.Logger | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> ExportSummary:
    """Run one export and return its summary; raise before sending when the input is wrong."""
    logger = logger or log
    options = options or RunOptions()
    max_profiles = options.limit(spec)
    started = clock()
    summary = ExportSummary(spec.id, destination.type, destination.target_id)
    columns = spec.mapping.columns()

    RowMapper(spec.mapping, source.columns())  # fails here, naming the missing columns, before anything else
    mapper = RowMapper(spec.mapping, columns)  # the rows below are projected to exactly these columns
    total = source.count()
    # A run-time limit is for trying an export on a few profiles: it truncates (by order_by, else email).
    on_exceed = "truncate" if options.max_profiles is not None else spec.limit.on_exceed
    order_by = spec.limit.order_by or (spec.mapping.email if options.max_profiles is not None else None)
    decision = decide_limit(total, max_profiles, on_exceed)
    logger.info("read plan: %s, %d rows in the segment, limit %d profiles", source.description, total, max_profiles)
    if decision.truncated:
        logger.warning(
            "the segment has %d rows, over the limit of %d: exporting the first %d by %r, skipping %d",
            total, max_profiles, decision.read_limit, order_by, decision.skipped,
        )
    summary.skipped_by_limit = decision.skipped
    summary.dry_run = options.dry_run
    destination.preflight()  # read-only requests: a dry run checks the target too
    expected = decision.read_limit or total
    logger.info(
        "sending to %s %s in batches of up to %d profiles, %d at a time",
        destination.type, destination.target_id, destination.max_batch_profiles, destination.concurrency,
    )

    sender = _Sender(destination, summary, logger, expected, dry_run=options.dry_run)
    batcher = Batcher(destination.max_batch_profiles, destination.max_batch_bytes)
    seen: set[int] = set()  # hashes of normalised emails: 1 int per profile, not the address itself
    try:
        for rows in source.chunks(
            columns,
            order_by=order_by if decision.truncated else None,
            tie_breaker=spec.mapping.email,
            limit=decision.read_limit,
        ):
            summary.read += len(rows)
            for row in rows:
                profile = mapper.map(row)
                if isinstance(profile, Rejection):
                    summary.add_invalid(profile.reason)
                    continue
                fingerprint = hash(profile.key)
                if fingerprint in seen:
                    summary.duplicates += 1
                    continue
                seen.add(fingerprint)
                fragment = destination.encode(profile)
                if isinstance(fragment, Rejection):
                    summary.add_invalid(fragment.reason)
                    continue
                closed = batcher.add(profile.key, fragment)
                if closed is not None:
                    sender.submit(closed)
        last = batcher.flush()
        if last is not None:
            sender.submit(last)
    except BaseException as exc:
        if exc is not sender.failure:  # the source or the mapping failed: settle what is in flight, then fail
            sender.drain()
            summary.seconds = clock() - started
            raise
    sender.drain()
    summary.seconds = clock() - started
    if sender.failure is not None:
        raise ExportError(
            f"export {spec.id} stopped: {sender.failure}. Before it stopped, {summary.accepted} profiles were "
            f"accepted and {summary.rejected} rejected; {sender.failed_profiles} profiles in failed batches have "
            "an unknown outcome and are not counted as sent",
            summary,
        ) from sender.failure
    return summary
