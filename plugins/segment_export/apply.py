"""The steps after the batches: segment (tag) changes, then the export's ``on_leave`` for profiles that left,
both behind the mass-removal guard (``Plan.removal_verdict``)."""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from segment_export.context import MassLeaveError, RunContext
from segment_export.diff import Change
from segment_export.plan import Plan


def apply_changes(ctx: RunContext, plan: Plan) -> None:
    """Segment changes and leavers of an executed plan. When the guard stops the removals, only tag additions go
    out and the run fails (``MassLeaveError``) before anything is removed."""
    stop, summary = plan.removal_verdict, ctx.summary
    if stop:
        ctx.staging.withhold_removals()
    else:
        queue_leaver_tags(ctx)
    apply_segments(ctx)
    if stop:
        summary.held_back = plan.held_back
        raise MassLeaveError(
            f"{stop}. The run sent its additions and updates ({summary.accepted} profiles accepted, "
            f"{summary.tags_added} tags added) and then stopped: nothing was removed, untagged or unsubscribed, "
            "and the next run will stop again. If the removal is intended, trigger the run with "
            "allow_mass_leave: true (or set sync.allow_mass_leave: true, or raise sync.max_leave_share)",
            summary,
        )
    apply_leavers(ctx)


def queue_leaver_tags(ctx: RunContext) -> None:
    """The tag (list) removals of the profiles that left: queued after the diff, once the guard agreed."""
    if not ctx.destination.manages_segments:
        return
    for chunk in ctx.staging.leavers(5000):
        ctx.queue_tags(*(tuple.__new__(Change, (key, "leave", None, None, (), segments)) for key, segments in chunk))


def apply_segments(ctx: RunContext) -> None:
    """Send the queued tag changes, concurrently; remember the segments of the profiles whose changes landed."""
    destination, summary = ctx.destination, ctx.summary
    if not destination.manages_segments:
        return
    destination.prepare_segments(ctx.staging.tag_segments())
    failed: set[str] = set()

    def settle(future: Future[set[str]], op: str, keys: list[str]) -> None:
        failed_here = future.result()
        failed.update(failed_here)
        if op == "+":
            summary.tags_added += len(keys) - len(failed_here)
        else:
            summary.tags_removed += len(keys) - len(failed_here)

    # Concurrently, as the batches went: a first run tags every profile (a million profiles in four
    # segments are over 2,000 calls of 500). At most two calls per connection wait, so keys stay few.
    concurrency = destination.concurrency
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="segment-export-tags") as pool:
        pending: dict[Future[set[str]], tuple[str, list[str]]] = {}
        for segment, op, keys in ctx.staging.tag_chunks(destination.max_batch_profiles):
            while len(pending) >= 2 * concurrency:
                for future in wait(pending, return_when=FIRST_COMPLETED).done:
                    settle(future, *pending.pop(future))
            pending[pool.submit(destination.change_segment, segment, op, keys, **ctx.ids(keys, op == "-"))] = (op, keys)
        for future in wait(pending).done:
            settle(future, *pending[future])
    if ctx.state is not None:
        _remember_segments(ctx, failed)
    if failed:
        ctx.log.warning("%d segment (tag) changes failed; they are retried by the next run", len(failed))


def _remember_segments(ctx: RunContext, failed: set[str]) -> None:
    state = ctx.state
    assert state is not None
    batch: list[tuple[str, str, tuple[str, ...]]] = []
    for key, fp, segments in ctx.staging.pending():
        if key not in failed:
            batch.append((key, fp, segments))
        if len(batch) >= 5000:
            state.save(batch)
            batch = []
    state.save(batch)
    # Profiles the destination no longer holds (Mailchimp: deleted or archived there since): forgotten, so
    # the next run adds them again, instead of retrying their tags forever.
    gone = getattr(ctx.destination, "not_in_audience", None)
    if gone:
        state.save([], forgotten=sorted(gone))


def apply_leavers(ctx: RunContext) -> None:
    """The export's ``on_leave`` for the profiles that left; each is forgotten, with an outcome row."""
    on_leave, destination, summary = ctx.spec.on_leave, ctx.destination, ctx.summary
    for keys in ctx.staging.leaver_chunks(1000):
        failed = destination.remove(keys, on_leave, **ctx.ids(keys, exclusive=True))
        # Left in place on purpose (Klaviyo: the profile is also a row's still in the segment): not removed,
        # but forgotten all the same: the row left the segment.
        kept: dict[str, str] = getattr(destination, "kept", None) or {}
        done = [k for k in keys if k not in failed]
        outcomes = [(k, "skipped", kept[k]) if k in kept else (k, "removed", f"left the segment ({on_leave})") for k in done]
        summary.removed += sum(1 for _, outcome, _ in outcomes if outcome == "removed")
        if ctx.state is not None:
            state = ctx.state
            state.save([], forgotten=done)
            state.record_outcomes(ctx.options.run_id, outcomes)
