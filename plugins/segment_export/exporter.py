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

The pieces: :class:`_Reader` (1, 2), ``plan.plan_run`` (3: a lazy ``Plan`` whose changes stream into the batches
while the diff goes on), ``execute.Executor`` (0: resume what an earlier pass left in flight; 4: batches, handles,
outcomes), ``apply.apply_changes`` (segment changes, leavers, the guard). :func:`run_export` puts them together.
With ``RunOptions.submit_only`` (deferrable mode) an asynchronous destination's batches are submitted and their
handles recorded, nothing is awaited; the run's next pass resumes them (step 0) and goes on as usual.
"""

from __future__ import annotations

import hashlib
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from segment_export import changes, mapworkers
from segment_export.apply import apply_changes
from segment_export.context import ExportError, MassLeaveError, PhaseClock, RejectedShareError, RunContext
from segment_export.destinations.base import Destination
from segment_export.erasure import erased_keys, record_erased
from segment_export.execute import Executor
from segment_export.limit import decide_limit
from segment_export.mapping import Rejection, RowMapper
from segment_export.plan import Plan, plan_run
from segment_export.sources.base import Source, check_columns
from segment_export.spec import ExportSpec, MappingSpec
from segment_export.state import StateStore
from segment_export.summary import PHASES, ExportSummary

__all__ = [
    "RunOptions", "run_export", "ExportError", "MassLeaveError", "RejectedShareError", "PhaseClock",
    "check_rejected_share", "spec_columns", "fingerprint", "redacted_example", "report_plan",
]

log = logging.getLogger(__name__)
EXAMPLES = 3
#: one chunk mapped: its staged-profile tuples, and its invalid rows as (outcome key, reason)
MappedRows = tuple[list[tuple[str, str, bytes, str, "str | None"]], list[tuple[str, str]]]
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
    # Deferrable mode (an asynchronous destination with a state): plan, submit every batch, record every handle in
    # the in-flight table and return (summary.submitted, summary.handles) without awaiting results, segment
    # changes or leavers. A later pass with the same run_id awaits the handles (see resume_counts), then plans again
    # (the resumed profiles are unchanged by then) and applies segment changes and leavers.
    submit_only: bool = False
    # The handles in flight are this same run's submit-only pass's: count their outcomes in this summary as sent,
    # accepted, rejected, skipped (not as ``resumed``), so that a deferred run's summary reads like a normal one's
    resume_counts: bool = False
    # Worker processes that map a large segment's rows while the task's main thread reads and stages them
    # (``mapworkers``); 0: mapped in the task's process. The operator sets it from ``[segment_export] map_workers``.
    map_workers: int = 0

    def limit(self, spec: ExportSpec) -> int:
        if self.max_profiles is None:
            return spec.max_profiles
        if self.max_profiles < 1 or self.max_profiles > spec.max_profiles:
            raise ValueError(
                f"max_profiles {self.max_profiles} must be between 1 and the export's limit of {spec.max_profiles}"
            )
        return self.max_profiles


def check_rejected_share(spec: ExportSpec, summary: ExportSummary) -> None:
    limit = spec.limit.max_rejected_share
    bad = summary.invalid + summary.rejected
    # A warehouse diff reads only what changed (its invalid rows among them, every run): the share is of the segment.
    rows = summary.segment_rows if summary.change_detection == changes.WAREHOUSE else summary.read
    if limit is None or rows == 0 or bad / rows <= limit:
        return
    reasons = (summary.invalid_reasons + summary.rejected_reasons).most_common(3)
    top = "; ".join(f"{count} x {reason}" for reason, count in reasons)
    raise RejectedShareError(
        f"export {spec.id}: {bad} of {rows} rows ({bad / rows:.1%}) were invalid or rejected, over "
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


class _Reader:
    """Steps 1 and 2: check the spec against the source and the target, read the segment, map, validate and
    serialize each row, stage the profiles (and the state's, for the diff)."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        spec = ctx.spec
        columns = spec.mapping.columns()
        segment_column = spec.source.segment_column
        if segment_column and segment_column not in columns:
            columns = columns + [segment_column]
        self.columns = columns
        self.mapper = RowMapper(spec.mapping, columns)
        self.email_only = RowMapper(MappingSpec(email=spec.mapping.email), columns)
        self.seg_index = columns.index(segment_column) if segment_column else None

    def stage(self) -> None:
        ctx = self.ctx
        spec, options, source = ctx.spec, ctx.options, ctx.source
        # Before anything is read or sent: each named column must be one of the source's real columns.
        check_columns(f"export {spec.id}: the {source.description}", spec_columns(spec), source.columns())
        max_profiles = options.limit(spec)
        total = source.count()
        # A run-time limit is for trying an export on a few profiles: it truncates (by order_by, else email).
        on_exceed = "truncate" if options.max_profiles is not None else spec.limit.on_exceed
        order_by = spec.limit.order_by or (spec.mapping.email if options.max_profiles is not None else None)
        decision = decide_limit(total, max_profiles, on_exceed)
        ctx.log.info("read plan: %s, %d rows in the segment, limit %d profiles", source.description, total, max_profiles)
        if decision.truncated:
            ctx.log.warning(
                "the segment has %d rows, over the limit of %d: exporting the first %d by %r, skipping %d",
                total, max_profiles, decision.read_limit, order_by, decision.skipped,
            )
        ctx.summary.skipped_by_limit = decision.skipped
        ctx.destination.preflight()  # read-only requests: a dry run checks the target too

        detection = ctx.change_detection = changes.choose(ctx, self.columns, truncated=decision.truncated)
        ctx.summary.change_detection = detection.mode
        ctx.summary.segment_rows = total - decision.skipped
        ctx.log.info("change detection: %s read (%s)", detection.mode, detection.reason)
        if detection.mode == changes.WAREHOUSE:
            changes.read_changes(ctx, self.columns, self._chunk)
        else:
            self._read_all(order_by if decision.truncated else None, decision.read_limit, detection.hashes_rows)
        self._record_invalid()
        with ctx.clock.phase("stage"):
            ctx.staging.seal()

    def _record_invalid(self) -> None:
        """The invalid rows' outcome rows, written once the source's cursor is closed: with the state in the
        source's own SQLite file (the default), a write committed while the read's statement is still open waits
        for the reader, which is this same thread ("database is locked" after 5 s, as soon as a segment had invalid
        rows beyond its first chunk). Queued in the staging file meanwhile, so memory stays bounded."""
        ctx = self.ctx
        if ctx.state is None:
            return
        with ctx.clock.phase("state"):
            for chunk in ctx.staging.queued_outcomes(10_000):
                ctx.state.record_outcomes(ctx.options.run_id, chunk)

    def _read_all(self, order_by: str | None, limit: int | None, row_hash: bool) -> None:
        """The full read: every row of the segment (each with its hash when the run keeps a snapshot), mapped in
        worker processes too when the segment is large (``mapworkers``)."""
        ctx, clock, summary = self.ctx, self.ctx.clock, self.ctx.summary
        hashed = {"row_hash": True} if row_hash else {}
        chunks = ctx.source.chunks(self.columns, order_by=order_by, tie_breaker=ctx.spec.mapping.email, limit=limit, **hashed)
        hash_index = len(self.columns) if row_hash else None
        workers = ctx.options.map_workers if summary.segment_rows >= mapworkers.MIN_ROWS else 0
        with mapworkers.MapWorkers(self.map_rows, workers, ctx.log) as mapping, _closed_after(chunks):
            for rows in clock.fetched(chunks):
                first = summary.read
                summary.read += len(rows)
                for mapped in mapping.submit(rows, first, hash_index):
                    self._stage(mapped)
            with clock.phase("map"):  # the workers' last chunks
                rest = mapping.finish()
            for mapped in rest:
                self._stage(mapped)
        ctx.worker_seconds += mapping.cpu_seconds
        with clock.phase("stage"):
            if ctx.state is not None:
                ctx.staging.load_previous(ctx.state.previous())

    def _chunk(self, rows: list[tuple[Any, ...]], hash_index: int | None = None) -> None:
        """Map, validate and stage one chunk of rows (the warehouse diff's changed rows)."""
        first = self.ctx.summary.read
        self.ctx.summary.read += len(rows)
        self._stage(self.map_rows(rows, first, hash_index))

    def map_rows(self, rows: list[tuple[Any, ...]], first: int, hash_index: int | None) -> MappedRows:
        """One chunk's rows as staged-profile tuples (key, fingerprint, fragment, segment, row hash) and invalid
        rows as (outcome key, reason). Pure (it runs in a map worker too): ``first`` is the number of rows read
        before this chunk, for the outcome key of an invalid row without a valid address. ``hash_index``: the
        position of each row's hash (a run that keeps a snapshot of the segment, ``changes``)."""
        ctx = self.ctx
        encode, mapper = ctx.destination.encode, self.mapper
        seg_index, default_segment = self.seg_index, ctx.spec.id  # no segment column: the export is the one segment
        profiles: list[tuple[str, str, bytes, str, str | None]] = []
        invalid: list[tuple[str, str]] = []
        for i, row in enumerate(rows):
            profile = mapper.map(row)
            if isinstance(profile, Rejection):
                invalid.append((self._row_key(row, first + i + 1), profile.reason))
                continue
            fragment = encode(profile)
            if isinstance(fragment, Rejection):
                invalid.append((profile.key, fragment.reason))
                continue
            segment = str(row[seg_index]) if seg_index is not None else default_segment
            profiles.append((profile.key, fingerprint(fragment), fragment, segment,
                             row[hash_index] if hash_index is not None else None))
        return profiles, invalid

    def _stage(self, mapped: MappedRows) -> None:
        """Stage a mapped chunk; count its invalid rows and queue their outcome rows."""
        ctx = self.ctx
        profiles, invalid = mapped
        for _, reason in invalid:
            ctx.summary.add_invalid(reason)
        with ctx.clock.phase("stage"):
            ctx.staging.add(profiles)
            # A submit pass leaves them to the pass that finishes the run (it reads the segment again): once per run.
            if invalid and ctx.state is not None and not ctx.options.dry_run and not ctx.options.submit_only:
                # recorded once the source is read (``_record_invalid``)
                ctx.staging.queue_outcomes([(key, "invalid", reason) for key, reason in invalid])

    def _row_key(self, row: tuple[Any, ...], position: int) -> str:
        """The outcome key of a row rejected before sending: its profile key (the lower-cased email) when the
        address is valid, else ``row <n>`` (its position in the order this run read the source), so that the
        outcomes table holds nothing personal beyond the keys the segment already has."""
        profile = self.email_only.map(row)
        return profile.key if not isinstance(profile, Rejection) else f"row {position}"


@contextmanager
def _closed_after(chunks: Any) -> Iterator[Any]:
    """The source's chunks, closed (its cursor released) when the read ends, a failed one too: left to the garbage
    collector, a generator's cursor would be closed after its connection."""
    try:
        yield chunks
    finally:
        getattr(chunks, "close", lambda: None)()


def report_plan(ctx: RunContext, plan: Plan) -> None:
    """A dry run: iterate the plan without sending and report it (what a real run would send and remove)."""
    summary, clock = ctx.summary, ctx.clock
    diff_phase = clock.switch("diff")
    for change in plan:
        if len(summary.examples) < EXAMPLES:
            summary.examples.append({"action": change.kind, "payload": redacted_example(change.fragment)})  # type: ignore[arg-type]
    clock.switch(diff_phase)
    summary.planned = plan.to_send
    summary.unchanged = plan.unchanged
    summary.removed = plan.leavers  # would be removed
    summary.tags_added, summary.tags_removed = plan.tags_added, plan.tags_removed
    summary.batches = -(-plan.to_send // ctx.destination.max_batch_profiles)  # would be sent
    stop = plan.removal_verdict
    if stop:
        summary.held_back = plan.held_back
        ctx.log.warning("a real run would stop here: %s", stop)


def _check_options(options: RunOptions, destination: Destination, state: StateStore | None) -> None:
    if options.submit_only and not options.dry_run and not (destination.asynchronous and state is not None):
        raise ValueError(
            f"submit_only needs an asynchronous destination and a sync state (to keep the handles in): "
            f"{destination.type} is {'asynchronous' if destination.asynchronous else 'synchronous'}, "
            f"and the run has {'a' if state is not None else 'no'} state"
        )


def _execute(ctx: RunContext) -> None:
    """Resume, read and stage, plan, then report (dry run) or execute the plan and apply what it changes."""
    executor = Executor(ctx)
    executor.resume(count=ctx.options.resume_counts)
    _Reader(ctx).stage()
    ctx.erased = erased_keys(ctx)  # erasure requests: the addresses this run must not send
    snapshot = changes.SnapshotWriter(ctx)
    snapshot.start()  # beside the run: what the next run diffs against
    succeeded = False
    try:
        _plan_and_apply(ctx, executor)
        succeeded = True
    finally:
        snapshot.finish(succeeded=succeeded)


def _plan_and_apply(ctx: RunContext, executor: Executor) -> None:
    plan = plan_run(ctx)
    try:
        if ctx.options.dry_run:
            report_plan(ctx, plan)
            record_erased(ctx, plan)
            return
        executor.execute(plan)
        record_erased(ctx, plan)
    finally:
        ctx.summary.duplicates = ctx.staging.duplicates  # counted as the plan read the staged segment
        ctx.summary.unchanged = plan.unchanged
    if ctx.applies_changes:
        apply_changes(ctx, plan)
    elif plan.removal_verdict:
        ctx.log.warning("the next pass will stop before its removals: %s", plan.removal_verdict)


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
    _check_options(options, destination, state)
    started = clock()
    main_cpu, process_cpu = time.thread_time(), time.process_time()
    summary = ExportSummary(spec.id, destination.type, destination.target_id, dry_run=options.dry_run)
    ctx = RunContext(spec, source, destination, state, options, logger, summary)
    try:
        _execute(ctx)
    finally:
        summary.seconds = clock() - started
        ctx.staging.close()
        ctx.clock.switch(None)  # a phase an exception left open ends here
        main_cpu, process_cpu = time.thread_time() - main_cpu, time.process_time() - process_cpu
        phases = ctx.clock.seconds
        phases["other"] = max(main_cpu - sum(phases.values()), 0.0)
        phases["sending"] = max(process_cpu - main_cpu, 0.0)
        if ctx.worker_seconds:
            phases["workers"] = ctx.worker_seconds
        summary.cpu_seconds = {p: phases[p] for p in PHASES if p in phases}
    if not summary.dry_run and not summary.submitted:  # a submit pass knows no rejections yet: its second pass checks
        check_rejected_share(spec, summary)
    if summary.dry_run:
        logger.info("dry run: nothing was sent")
    elif summary.submitted:
        logger.info("submitted %d profiles in %d jobs; the next pass of run %s awaits them", summary.submitted,
                    len(summary.handles), options.run_id)
    elif summary.sent == 0 and summary.removed == 0 and summary.tags_added + summary.tags_removed == 0:
        logger.info("the segment has not changed since the last run: nothing to send")
    return summary
