"""Planning: the diff of the staged segment against the export's state, as a plan that a dry run reports and a
real run executes (``execute.Executor``).

A plan is lazy on purpose: its changes are a single-pass iterator that the executor batches while the diff still
runs (a million-profile export would otherwise hold every payload, or wait for the whole diff before its first
batch). Its counts and the mass-removal verdict are complete once the changes have been iterated to the end.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from segment_export.context import RunContext
from segment_export.diff import Change, diff


def _tag_delta(segments: tuple[str, ...], previous: tuple[str, ...]) -> tuple[int, int]:
    """(segments added, segments removed), fast in the common cases (same segments, a new profile): once a row."""
    if segments == previous:
        return 0, 0
    if not previous:
        return len(segments), 0
    return sum(1 for s in segments if s not in previous), sum(1 for s in previous if s not in segments)


class Plan:
    """What a run changes. Iterate it once for the profiles to send (``create``/``update`` changes, payloads
    included); meanwhile it counts the rest and, unless ``queue`` is off (a dry run, a submit-only pass), queues in
    the run's staging what the segment and leaver steps apply later: tag changes of unchanged profiles, leavers.

    Counts (complete once iterated): ``creates``, ``updates``, ``unchanged``, ``leavers`` (profiles that left and
    get the export's ``on_leave``), ``untagged`` (profiles that stay but lose a segment), ``tags_added`` and
    ``tags_removed`` (planned segment changes, of the profiles sent too). ``removal_verdict``: why the removals
    must not go out (the mass-removal guard), or None."""

    def __init__(self, ctx: RunContext, changes: Iterable[Change], *, queue: bool):
        self._ctx, self._changes, self._queue = ctx, changes, queue
        self._iterated = False
        self.complete = False
        self.creates = self.updates = 0
        # a warehouse diff counts the profiles it did not plan as unchanged (``changes``): the full read would
        self.unchanged = ctx.staging.unchanged_elsewhere
        self.leavers = self.untagged = 0
        self.tags_added = self.tags_removed = 0
        #: (key, kind, fingerprint, previous segments) of erased profiles the plan did not send (``erasure``)
        self.erased: list[tuple[str, str, str | None, tuple[str, ...]]] = []

    @property
    def to_send(self) -> int:
        return self.creates + self.updates

    def __iter__(self) -> Iterator[Change]:
        if self._iterated:
            raise RuntimeError("a plan's changes stream from the diff: they can be iterated once")
        self._iterated = True
        return self._walk()

    def _walk(self) -> Iterator[Change]:
        ctx = self._ctx
        manages = ctx.destination.manages_segments
        keep_leavers = ctx.spec.on_leave == "keep"
        staging = ctx.staging if self._queue else None
        settled, erased = ctx.settled_keys, ctx.erased
        for change in self._changes:
            kind, segments, previous = change[1], change[4], change[5]
            if kind == "leave":
                if not keep_leavers:
                    self.leavers += 1
                    if manages:
                        self.tags_removed += len(previous)
                    if staging is not None:  # its tag changes are queued once the mass-removal guard lets them go
                        staging.queue_leaver(change[0], previous)
                continue
            if erased and change[0] in erased:  # an erasure request: never sent, never tagged (erasure.record_erased)
                if kind == "unchanged":
                    self.unchanged += 1
                else:
                    self.erased.append((change[0], kind, change[2], previous))
                continue
            added = removed = 0
            if manages:
                added, removed = _tag_delta(segments, previous)
                self.tags_added += added
                self.tags_removed += removed
                if removed and previous:
                    self.untagged += 1
            if kind == "unchanged":
                self.unchanged += 1
                if (added or removed) and staging is not None:
                    ctx.queue_tags(change)
                continue
            if settled and change[0] in settled:
                continue  # answered by this run's own jobs already (a rejection is retried by the next run)
            if kind == "create":
                self.creates += 1
            else:
                self.updates += 1
            yield change
        self.complete = True

    @property
    def removal_verdict(self) -> str | None:
        """Why this run must not send its removals, or None. A typo in a segment name or filter, or a broken
        upstream table, makes a segment look empty; sending that would strip every profile the export manages."""
        if not self.complete:
            raise RuntimeError("the mass-removal verdict is known once the plan's changes have been iterated")
        ctx = self._ctx
        spec, remembered = ctx.spec, ctx.staging.previous_rows
        losing = self.leavers + self.untagged
        if losing == 0 or remembered == 0 or ctx.options.allow_mass_leave or spec.sync.allow_mass_leave:
            return None
        share, limit = losing / remembered, spec.sync.max_leave_share
        what = (f"export {spec.id}: this run would remove, untag or unsubscribe {losing} of the {remembered} profiles "
                f"the export remembers ({share:.1%}: {self.leavers} left the segment, on_leave: {spec.on_leave}; "
                f"{self.untagged} lost one of their segments)")
        if ctx.staging.rows == 0 and ctx.staging.unchanged_elsewhere == 0:
            return f"{what}, because the segment came back empty (0 valid profiles of {ctx.summary.read} rows read)"
        if limit is not None and share > limit:
            return f"{what}, over the limit of {limit:.1%} (sync.max_leave_share)"
        return None

    @property
    def held_back(self) -> int:
        """The removals the guard keeps back (0 when it lets them go)."""
        return self.leavers + self.untagged if self.removal_verdict else 0


def plan_run(ctx: RunContext) -> Plan:
    """The plan of a staged run: nothing is read from the staging file until the plan is iterated."""
    changes = diff(ctx.staging.current(), ctx.staging.previous(), full_resync=ctx.options.full_resync)
    return Plan(ctx, changes, queue=ctx.applies_changes)
