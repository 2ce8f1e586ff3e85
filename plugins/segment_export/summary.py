"""What an export did, in counts: the task's XCom value and the last lines of its log. Pure.

Invariants the exporter keeps: ``sent == accepted + rejected`` (nothing sent is left unaccounted for) and
``read == profiles_sent_or_pending + invalid + duplicates`` at the end of a successful run. Reasons are counted
by kind and never carry an email address.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class BatchResult:
    """The destination's answer for one batch. ``created``/``updated`` are None where the API does not say."""

    accepted: int
    rejected: Counter[str] = field(default_factory=Counter)
    created: int | None = None
    updated: int | None = None


@dataclass(slots=True)
class ExportSummary:
    export_id: str
    destination: str
    target_id: str
    read: int = 0
    invalid: int = 0
    duplicates: int = 0
    skipped_by_limit: int = 0
    sent: int = 0
    accepted: int = 0
    created: int | None = None
    updated: int | None = None
    rejected: int = 0
    batches: int = 0
    seconds: float = 0.0
    dry_run: bool = False
    planned: int = 0  # profiles a dry run would have sent
    invalid_reasons: Counter[str] = field(default_factory=Counter)
    rejected_reasons: Counter[str] = field(default_factory=Counter)

    def add_invalid(self, reason: str) -> None:
        self.invalid += 1
        self.invalid_reasons[reason] += 1

    def add_planned(self, size: int) -> None:
        self.batches += 1
        self.planned += size

    def add_batch(self, size: int, result: BatchResult) -> None:
        self.batches += 1
        self.sent += size
        self.accepted += result.accepted
        self.rejected += sum(result.rejected.values())
        self.rejected_reasons.update(result.rejected)
        if result.created is not None:
            self.created = (self.created or 0) + result.created
        if result.updated is not None:
            self.updated = (self.updated or 0) + result.updated

    @property
    def consistent(self) -> bool:
        return self.sent == self.accepted + self.rejected

    def as_dict(self) -> dict[str, Any]:
        """JSON-able, for XCom: counts and reasons only, no personal data, no credentials."""
        return {
            "export_id": self.export_id,
            "destination": self.destination,
            "target_id": self.target_id,
            "read": self.read,
            "invalid": self.invalid,
            "duplicates": self.duplicates,
            "skipped_by_limit": self.skipped_by_limit,
            "sent": self.sent,
            "accepted": self.accepted,
            "created": self.created,
            "updated": self.updated,
            "rejected": self.rejected,
            "batches": self.batches,
            "seconds": round(self.seconds, 3),
            "dry_run": self.dry_run,
            "planned": self.planned,
            "invalid_reasons": dict(self.invalid_reasons.most_common()),
            "rejected_reasons": dict(self.rejected_reasons.most_common()),
        }

    def table(self) -> str:
        """A small fixed-width table for the task log and the demo."""
        rows = [
            ("read", self.read),
            ("invalid (not sent)", self.invalid),
            ("duplicates (not sent)", self.duplicates),
            ("skipped by the limit", self.skipped_by_limit),
            ("sent", self.sent),
            ("accepted", self.accepted),
            ("  created", "n/a" if self.created is None else self.created),
            ("  updated", "n/a" if self.updated is None else self.updated),
            ("rejected by destination", self.rejected),
            ("batches", self.batches),
            ("seconds", f"{self.seconds:.1f}"),
        ]
        if self.dry_run:
            rows.insert(4, ("would send (dry run)", self.planned))
        lines = [f"export {self.export_id} -> {self.destination} {self.target_id}" + (" (DRY RUN: nothing sent)" if self.dry_run else "")]
        lines += [f"  {label:<24} {value:>10}" for label, value in rows]
        for title, reasons in (("invalid", self.invalid_reasons), ("rejected", self.rejected_reasons)):
            for reason, count in reasons.most_common(5):
                lines.append(f"  {title}: {count} x {reason}")
        return "\n".join(lines)
