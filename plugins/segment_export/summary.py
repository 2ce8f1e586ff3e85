"""What an export did, in counts: the task's XCom value and the last lines of its log. Pure.

Invariant the exporter keeps: ``sent == accepted + rejected + skipped`` (nothing sent is left unaccounted for). Reasons are counted
by kind and never carry an email address.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class BatchResult:
    """The destination's answer for one batch. ``created``/``updated`` are None where the API does not say.

    ``accepted_keys`` are the profiles the destination confirmed one by one; only they advance the sync state.
    ``rejected_keys``/``skipped_keys`` map a profile to its reason where the destination named the profile.
    ``subscribed``: profiles asked to subscribe (Klaviyo with ``destination.subscribe``; None elsewhere).
    ``updated_keys``: None where the destination does not say; a set where it does: accepted keys in it were
    updated (they existed already), the other accepted keys were created.
    """

    accepted: int
    rejected: Counter[str] = field(default_factory=Counter)
    created: int | None = None
    updated: int | None = None
    skipped: Counter[str] = field(default_factory=Counter)
    accepted_keys: set[str] = field(default_factory=set)
    rejected_keys: dict[str, str] = field(default_factory=dict)
    skipped_keys: dict[str, str] = field(default_factory=dict)
    subscribed: int | None = None
    #: the accepted profiles the destination says it updated (it already held them); the other accepted ones it
    #: created. None: the destination does not say (Klaviyo's bulk import), then the diff's kind is reported.
    updated_keys: set[str] | None = None
    #: Klaviyo's profile id of accepted (and skipped) profiles, where known: remembered in the state, so that
    #: removals and list moves go by id
    profile_ids: dict[str, str] = field(default_factory=dict)
    #: consenting profiles asked to subscribe on a double opt-in list: sent a confirmation, not subscribed yet
    pending: int | None = None


#: The phases an export's CPU time is counted in (``ExportSummary.cpu_seconds``). All but the last two are the
#: task's main thread; ``sending`` is every other thread (HTTP, request bodies, polling, answers, the sort helper),
#: ``workers`` the map worker processes (only when there were any).
PHASES = {
    "read": "fetching rows from the source",
    "map": "mapping, validating and serializing rows",
    "stage": "writing rows to the local staging file",
    "diff": "sorting the staged segment, diffing it against the state, forming batches",
    "state": "writing sync state, outcomes and in-flight batches",
    "other": "the rest of the main thread (segment changes, leavers, waiting loop)",
    "sending": "the other threads: sending, SQLite's helper while it sorts the staged segment, and the map workers' queue",
    "workers": "the processes that map a large segment's rows beside the main thread (mapworkers)",
}


@dataclass(slots=True)
class ExportSummary:
    export_id: str
    destination: str
    target_id: str
    read: int = 0  # rows read from the source (a warehouse diff: only those new or changed since the last run)
    segment_rows: int = 0  # rows the segment has within the limit (counted by the source)
    change_detection: str = "full"  # "full": every row read; "warehouse": only what changed (``changes``)
    invalid: int = 0
    duplicates: int = 0
    skipped_by_limit: int = 0
    sent: int = 0
    accepted: int = 0
    created: int | None = None
    updated: int | None = None
    rejected: int = 0
    skipped: int = 0  # the destination declined for a lasting reason (e.g. compliance state); not retried
    unchanged: int = 0  # in the segment, same as last accepted: not sent
    removed: int = 0  # left the segment and removed from what the export manages
    held_back: int = 0  # removals the mass-removal guard did not send (sync.max_leave_share)
    tags_added: int = 0
    tags_removed: int = 0
    subscribed: int | None = None  # Klaviyo with destination.subscribe: consenting profiles asked to subscribe
    pending: int | None = None  # Klaviyo, double opt-in list: asked to subscribe, confirmation sent, not subscribed yet
    resumed: int = 0  # profiles of jobs an interrupted run had submitted, awaited instead of sent again
    # A submit-only pass (deferrable mode, RunOptions.submit_only): profiles submitted and the handles (job ids) of
    # their jobs, not awaited; the next pass of the run awaits them and counts them as sent
    submitted: int = 0
    handles: list[str] = field(default_factory=list)
    batches: int = 0
    seconds: float = 0.0
    dry_run: bool = False
    planned: int = 0  # profiles a dry run would have sent
    invalid_reasons: Counter[str] = field(default_factory=Counter)
    rejected_reasons: Counter[str] = field(default_factory=Counter)
    skipped_reasons: Counter[str] = field(default_factory=Counter)
    examples: list[dict[str, Any]] = field(default_factory=list)  # dry run: a few payloads, emails redacted
    # CPU seconds by phase (see PHASES): where an export's time goes, for tuning chunk sizes or the state database
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    # A verify pass (drift.DriftReport.as_dict): held, added_outside, removed_outside, unsubscribed, suppressed,
    # repair, repaired; None when the run did not verify. Counts only: drift is not part of sent/accepted.
    drift: dict[str, Any] | None = None
    verify_only: bool = False  # the run only verified: nothing was read from the source nor sent

    def add_invalid(self, reason: str) -> None:
        self.invalid += 1
        self.invalid_reasons[reason] += 1

    def add_batch(self, size: int, result: BatchResult) -> None:
        self.batches += 1
        self.sent += size
        self.accepted += result.accepted
        self.rejected += sum(result.rejected.values())
        self.rejected_reasons.update(result.rejected)
        self.skipped += sum(result.skipped.values())
        self.skipped_reasons.update(result.skipped)
        if result.created is not None:
            self.created = (self.created or 0) + result.created
        if result.updated is not None:
            self.updated = (self.updated or 0) + result.updated
        if result.subscribed is not None:
            self.subscribed = (self.subscribed or 0) + result.subscribed
        if result.pending is not None:
            self.pending = (self.pending or 0) + result.pending

    @property
    def consistent(self) -> bool:
        return self.sent == self.accepted + self.rejected + self.skipped

    def as_dict(self) -> dict[str, Any]:
        """JSON-able, for XCom: counts and reasons only, no personal data, no credentials."""
        return {
            "export_id": self.export_id,
            "destination": self.destination,
            "target_id": self.target_id,
            "read": self.read,
            "segment_rows": self.segment_rows,
            "change_detection": self.change_detection,
            "invalid": self.invalid,
            "duplicates": self.duplicates,
            "skipped_by_limit": self.skipped_by_limit,
            "sent": self.sent,
            "accepted": self.accepted,
            "created": self.created,
            "updated": self.updated,
            "rejected": self.rejected,
            "skipped": self.skipped,
            "unchanged": self.unchanged,
            "removed": self.removed,
            "held_back": self.held_back,
            "subscribed": self.subscribed,
            "pending": self.pending,
            "tags_added": self.tags_added,
            "tags_removed": self.tags_removed,
            "resumed": self.resumed,
            "submitted": self.submitted,
            "handles": list(self.handles),
            "batches": self.batches,
            "seconds": round(self.seconds, 3),
            "dry_run": self.dry_run,
            "planned": self.planned,
            "invalid_reasons": dict(self.invalid_reasons.most_common()),
            "rejected_reasons": dict(self.rejected_reasons.most_common()),
            "skipped_reasons": dict(self.skipped_reasons.most_common()),
            "examples": self.examples,
            "cpu_seconds": {phase: round(seconds, 3) for phase, seconds in self.cpu_seconds.items()},
            "drift": dict(self.drift) if self.drift is not None else None,
            "verify_only": self.verify_only,
        }

    def table(self) -> str:
        """A small fixed-width table for the task log and the demo."""
        rows = [
            ("read", self.read),
            *([("rows in the segment", self.segment_rows)] if self.change_detection == "warehouse" else []),
            ("invalid (not sent)", self.invalid),
            ("duplicates (not sent)", self.duplicates),
            ("skipped by the limit", self.skipped_by_limit),
            ("sent", self.sent),
            ("accepted", self.accepted),
            ("  created", "n/a" if self.created is None else self.created),
            ("  updated", "n/a" if self.updated is None else self.updated),
            ("rejected by destination", self.rejected),
            ("skipped by destination", self.skipped),
            ("unchanged (not sent)", self.unchanged),
            ("removed (left segment)", self.removed),
            ("removals held back", self.held_back),
            ("subscribed (consent)", "n/a" if self.subscribed is None else self.subscribed),
            *([("pending (double opt-in)", self.pending)] if self.pending is not None else []),
            ("tags added / removed", f"{self.tags_added} / {self.tags_removed}"),
            *([("submitted (awaited later)", self.submitted), ("jobs submitted", len(self.handles))] if self.submitted else []),
            ("batches", self.batches),
            ("seconds", f"{self.seconds:.1f}"),
        ]
        if self.dry_run:
            rows.insert(4, ("would send (dry run)", self.planned))
        lines = [f"export {self.export_id} -> {self.destination} {self.target_id}" + (" (DRY RUN: nothing sent)" if self.dry_run else "")]
        lines += [f"  {label:<24} {value:>10}" for label, value in rows]
        if self.drift is not None:
            d = self.drift
            lines.append(f"  drift ({'verify only' if self.verify_only else 'verify'}): {d['held']} held; "
                         f"{d['added_outside']} added outside, {d['removed_outside']} removed outside, "
                         f"{d['unsubscribed']} unsubscribed, {d['suppressed']} suppressed"
                         + (f"; {d['repaired']} to be sent again next run (repair)" if d.get("repair") else ""))
        if self.cpu_seconds:
            lines.append("  CPU s: " + ", ".join(f"{phase} {seconds:.1f}" for phase, seconds in self.cpu_seconds.items()))
        for title, reasons in (("invalid", self.invalid_reasons), ("rejected", self.rejected_reasons), ("skipped", self.skipped_reasons)):
            for reason, count in reasons.most_common(5):
                lines.append(f"  {title}: {count} x {reason}")
        return "\n".join(lines)
