"""A verify pass: read the target's real membership, compare it with the export's state, report the drift.

Runs after the export (``verify`` in the spec or the trigger form), or alone (the trigger form's
``verify_only``: no source is read, nothing is sent). It is read-only towards the destination: it never
adds, removes, tags or subscribes anyone. What it writes is the export's own bookkeeping:

- one ``segment_export_outcomes`` row per drifted profile, action ``drift`` and the kind as its reason
  (``added_outside``, ``removed_outside``, ``unsubscribed``, ``suppressed``, see :mod:`segment_export.drift`).
  A profile the export never sent is keyed by the destination's own id (``klaviyo profile <id>``,
  ``mailchimp member <subscriber hash>``), so the table holds no address the segment does not already have;
- with ``repair``, the ``removed_outside`` profiles are forgotten by the state, so the next run's diff sees them
  as new and sends them again (into the list; Mailchimp: the documented upsert, status untouched, and their
  tags). Unsubscribed and suppressed profiles are only reported: an export never re-subscribes anyone (and on
  Klaviyo the subscribe step's suppression check would skip them anyway).

A dry run verifies too, but records nothing and repairs nothing. No Airflow here; the operator calls it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

from segment_export.destinations.base import Destination
from segment_export.drift import ACTION, REMOVED_OUTSIDE, DriftReport, collect, compare
from segment_export.spec import ExportSpec
from segment_export.state import StateStore

OUTCOME_ROWS_PER_STATEMENT = 10_000


@dataclass(frozen=True)
class VerifyOptions:
    """Whether a run verifies, whether it only verifies, and whether it repairs (spec, then trigger form)."""

    enabled: bool = False
    only: bool = False  # no export: membership and state only
    repair: bool = False

    @classmethod
    def for_run(cls, spec: ExportSpec, params: Mapping[str, Any] | None) -> VerifyOptions:
        """From the spec's ``verify`` and the run's params (``verify``, ``verify_only``, ``repair``; absent params
        mean the spec's choice)."""
        params = params or {}
        only = bool(params.get("verify_only", False))
        enabled = only or bool(params.get("verify", spec.verify is not None))
        repair = bool(params.get("repair", spec.verify.repair if spec.verify is not None else False))
        if enabled and not spec.destination.kind.verifies:
            raise ValueError(
                f"export {spec.id}: verify: {spec.destination.kind.display_name} cannot list its "
                f"{spec.destination.kind.target_kind}'s membership"
            )
        return cls(enabled=enabled, only=only, repair=repair and enabled)


def export_segments(spec: ExportSpec, state: StateStore) -> list[str]:
    """The names the export tags (Mailchimp) or maps to lists (Klaviyo ``lists``) with: the spec's segments, or
    the export's id without a segment column; with a segment column and no segment list, every segment the state
    remembers."""
    if not spec.source.segment_column:
        return [spec.id]
    if spec.source.segments:
        return list(spec.source.segments)
    return sorted({segment for previous in state.previous() for segment in previous.segments})


def run_verify(spec: ExportSpec, destination: Destination, state: StateStore, *, run_id: str, repair: bool,
               dry_run: bool = False, log: logging.Logger | None = None) -> DriftReport:
    """Compare the target's membership with the state; record the drift (and repair) unless ``dry_run``."""
    log = log or logging.getLogger(__name__)
    segments = export_segments(spec, state)
    held = collect(destination.membership(segments))
    report = DriftReport(held=len(held), repair=repair and not dry_run)
    # Read the whole comparison before writing: the state's cursor stays the only statement in flight.
    drifted = list(compare((previous.key for previous in state.previous()), held))
    del held
    for _, kind in drifted:
        report.counts[kind] += 1
    if dry_run:
        log.info("verify (dry run): drift found, nothing recorded: %s", _counts(report))
        return report
    rows = [(key, ACTION, kind) for key, kind in drifted]
    for start in range(0, len(rows), OUTCOME_ROWS_PER_STATEMENT):
        state.record_outcomes(run_id, rows[start:start + OUTCOME_ROWS_PER_STATEMENT], commit=False)
    missing = [key for key, kind in drifted if kind == REMOVED_OUTSIDE] if repair else []
    if missing:
        state.save([], forgotten=missing, commit=False)
        report.repaired = len(missing)
    state.conn.commit()
    log.info("verify: %d profile(s) held by %s %s; drift: %s%s", report.held, destination.type,
             destination.target_id, _counts(report),
             f"; repair: {report.repaired} removed outside will be sent again by the next run" if repair else "")
    return report


def _counts(report: DriftReport) -> str:
    return ", ".join(f"{kind} {count}" for kind, count in report.as_dict().items() if kind not in ("held", "repair", "repaired"))
