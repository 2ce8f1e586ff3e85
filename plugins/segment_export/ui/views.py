"""What the Segment exports pages show, from plain data: runs with their XCom summaries, outcome counts, masked
profile keys, the chart of the last runs. Pure: no Airflow, no I/O, so every number on the page is unit-tested.

The counts a page shows are the run's XCom summary (what the task logged and returned), never a recount of the
outcomes table: a user comparing the page with the task log sees the same numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterable, Mapping

#: the counts of the exports list, in the order shown (the summary's own names)
COUNT_FIELDS = ("accepted", "rejected", "skipped", "removed", "unchanged")
#: the counts the chart stacks (unchanged is left out: on a rerun it dwarfs what changed)
CHART_FIELDS = ("accepted", "rejected", "skipped", "removed")
#: the outcome actions, in the order a run's page lists them (state.py writes them)
ACTIONS = ("created", "updated", "removed", "skipped", "rejected", "invalid")


@dataclass(frozen=True)
class RunInfo:
    """One DAG run of an export and the summary its task returned (None: no summary, e.g. the task failed)."""

    run_id: str
    state: str | None
    start: datetime | None = None
    end: datetime | None = None
    summary: dict[str, Any] | None = None
    run_type: str | None = None
    task_state: str | None = None
    try_number: int | None = None

    @property
    def duration_s(self) -> float | None:
        if self.start is None or self.end is None:
            return None
        return max(0.0, (self.end - self.start).total_seconds())

    @property
    def dry_run(self) -> bool:
        return bool(self.summary and self.summary.get("dry_run"))

    def count(self, name: str) -> int | None:
        if not self.summary:
            return None
        value = self.summary.get(name)
        return int(value) if isinstance(value, (int, float)) else None

    def segment_size(self) -> int:
        """The rows the segment had: ``segment_rows`` (a warehouse diff reads only the changed ones, ``read``
        counts those), else, for summaries from before it existed, ``read``."""
        return self.count("segment_rows") or self.count("read") or 0


@dataclass(frozen=True)
class ExportInfo:
    """An export as the list shows it, from its spec (destination, target, schedule) and its DAG."""

    export_id: str
    name: str
    destination: str
    target: str
    schedule: str
    state_conn_id: str | None = None
    paused: bool | None = None


@dataclass
class ExportRow:
    export: ExportInfo
    runs: list[RunInfo] = field(default_factory=list)  # newest first

    @property
    def last(self) -> RunInfo | None:
        return self.runs[0] if self.runs else None

    @property
    def last_counts(self) -> dict[str, int | None]:
        """Counts of the newest run that has a summary (a failed run has none: its predecessor's are shown)."""
        run = next((r for r in self.runs if r.summary), None)
        return {name: (run.count(name) if run else None) for name in COUNT_FIELDS}

    @property
    def counts_run(self) -> RunInfo | None:
        return next((r for r in self.runs if r.summary), None)


def summary_value(value: Any) -> dict[str, Any] | None:
    """An export task's XCom value as a dict: Airflow stores it as JSON, sometimes a JSON string of JSON."""
    for _ in range(2):
        if isinstance(value, (str, bytes)):
            try:
                value = json.loads(value)
            except ValueError:
                return None
    return value if isinstance(value, dict) and "export_id" in value else None


def describe_schedule(schedule: str | None, on_source_asset: bool = False, timetable_summary: str | None = None) -> str:
    if on_source_asset:
        return "on its source asset"
    if schedule:
        return schedule
    return timetable_summary if timetable_summary and timetable_summary != "None" else "on demand"


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_count(value: int | None) -> str:
    return "–" if value is None else f"{value:,}"


def format_when(when: datetime | None) -> str:
    return "–" if when is None else when.strftime("%Y-%m-%d %H:%M:%S UTC")


def mask_key(key: str) -> str:
    """A profile key as lists show it: an address keeps only its domain (``***@example.com``, as a dry run's example
    payloads do); a row number (``row 17``, an invalid row without a valid address) is no personal data and stays."""
    if key.startswith("row ") and key[4:].isdigit():
        return key
    local, at, domain = key.rpartition("@")
    if at and local:
        return f"***@{domain}"
    return "***"


@dataclass(frozen=True)
class OutcomeRow:
    """One row of ``segment_export_outcomes`` as a page lists it: ``n`` is its position in the run (ordered by
    key, action), the handle a user allowed to edit the DAG asks for the unmasked key with."""

    n: int
    key: str
    action: str
    reason: str | None

    def masked(self) -> OutcomeRow:
        return OutcomeRow(self.n, mask_key(self.key), self.action, self.reason)


@dataclass
class OutcomeCounts:
    """A run's outcome rows counted by action and by (action, reason): the destination's own messages."""

    by_action: dict[str, int] = field(default_factory=dict)
    by_reason: list[tuple[str, str, int]] = field(default_factory=list)  # (action, reason, count), most first

    @property
    def total(self) -> int:
        return sum(self.by_action.values())

    @classmethod
    def from_groups(cls, groups: Iterable[tuple[str, str | None, int]]) -> OutcomeCounts:
        by_action: dict[str, int] = {}
        by_reason: list[tuple[str, str, int]] = []
        for action, reason, count in groups:
            by_action[action] = by_action.get(action, 0) + int(count)
            if reason:
                by_reason.append((action, reason, int(count)))
        order = {a: i for i, a in enumerate(ACTIONS)}
        by_action = dict(sorted(by_action.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))
        by_reason.sort(key=lambda t: (-t[2], order.get(t[0], len(order)), t[1]))
        return cls(by_action, by_reason)


@dataclass(frozen=True)
class Bar:
    """One run in the chart: its counts stacked (CHART_FIELDS), scaled to the tallest run."""

    run_id: str
    counts: Mapping[str, int]
    dry_run: bool
    failed: bool


def chart_bars(runs: list[RunInfo], limit: int = 20) -> list[Bar]:
    """The last ``limit`` runs, oldest first, as the chart draws them (a run without summary: an empty bar)."""
    bars = []
    for run in reversed(runs[:limit]):
        counts = {name: (run.count(name) or 0) for name in CHART_FIELDS}
        bars.append(Bar(run.run_id, counts, run.dry_run, run.state == "failed" or run.summary is None))
    return bars


def rejection_alert(runs: list[RunInfo]) -> str | None:
    """A sentence when the newest finished run stands out against the (up to 5) before it: a spike of rejections
    (more than twice the most any of them had), or a segment that shrank to under half the rows the previous run
    read (an emptied upstream table, a renamed segment). Accepted counts are not compared: a rerun sends only
    what changed, so a small ``accepted`` after a first run is the sync at work, not a drop. None otherwise."""
    done = [r for r in runs if r.summary and not r.dry_run]
    if len(done) < 2:
        return None
    last, before = done[0], done[1:6]
    rejected = last.count("rejected") or 0
    usual = max((r.count("rejected") or 0) for r in before)
    if rejected > 0 and rejected > 2 * usual:
        return f"{rejected:,} rejected in the last run (at most {usual:,} in the {len(before)} before)"
    read, previous = last.segment_size(), before[0].segment_size()
    if previous > 0 and read < 0.5 * previous:
        return f"the segment fell to {read:,} rows (from {previous:,})"
    return None
