"""Erasure requests (issue 13): a person asks to be forgotten; every destination an export wrote them to erases
them, each answer is kept as a receipt, and no export on that connection sends the address again.

Two halves, both here so that the rule lives in one module:

- **the erasure run** (:func:`run_erasures`, driven by ``operators/erasure.py``): each request read from the
  erasure source goes to every *erasure target* of every destination connection the exports write to (what the
  destination's :class:`~segment_export.destinations.base.Eraser` says one deletion reaches: a Klaviyo account, a
  Mailchimp audience). Each (request, connection, target) gets a receipt in ``segment_export_erasures``
  (``state.ErasureStore``) in the state database of every export behind that target: sent once, sent again while
  unanswered (a failure is recorded, the task fails, the next run retries), never again once answered. An
  answered erasure also drops the address from those exports' sync state: the destination no longer holds it.
- **the export's side** (:func:`erased_keys`, :func:`record_erased`): before planning, an export reads the
  addresses erased through its destination connection from the receipts beside its state; the plan leaves them
  out of what it sends (``Plan.erased``), and they are counted ``skipped`` with the reason ``erased on <date>``
  and remembered in the state, like a destination's lasting refusal. They count in ``sent`` as well, so that
  ``sent == accepted + rejected + skipped`` holds, although no request carries them: the engine answers for the
  destination.

Never logged: an address. Logs and receipts carry request ids, destinations, targets and answers.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

from segment_export.hooks.base import redact_emails
from segment_export.mapping import Rejection, RowMapper
from segment_export.spec import MappingSpec

if TYPE_CHECKING:
    from segment_export.context import RunContext
    from segment_export.destinations.base import Eraser
    from segment_export.plan import Plan
    from segment_export.spec import ErasureMappingSpec, ExportSpec
    from segment_export.sources.base import Source
    from segment_export.state import ErasureStore

log = logging.getLogger(__name__)


def erased_reason(day: str) -> str:
    return f"erased on {day}"


# -- the export's side ----------------------------------------------------------------------------------------

def erased_keys(ctx: RunContext) -> dict[str, str]:
    """Profile key -> erasure date of every address erased through this export's destination connection, from the
    receipts beside its state (none without a state: such a run remembers nothing, erasures included)."""
    if ctx.state is None:
        return {}
    from segment_export.state import ErasureStore

    return ErasureStore.beside(ctx.state).erased(ctx.spec.destination.connection_id)


def record_erased(ctx: RunContext, plan: Plan) -> None:
    """Count the erased profiles the plan left out as ``skipped`` ("erased on <date>"), remember them in the state
    and give each an outcome row. A dry run only reports them; a submit-only pass leaves them to the pass that
    finishes the run (which plans again), so they are counted once."""
    if not plan.erased:
        return
    summary = ctx.summary
    if ctx.options.dry_run:
        ctx.log.info("%d erased address(es) would be skipped (erasure requests)", len(plan.erased))
        return
    if not ctx.applies_changes:
        return
    reasons = [erased_reason(ctx.erased[key]) for key, _, _, _ in plan.erased]
    summary.sent += len(reasons)
    summary.skipped += len(reasons)
    summary.skipped_reasons.update(reasons)
    ctx.log.info("%d erased address(es) skipped: never exported again after an erasure request", len(reasons))
    if ctx.state is None:
        return
    with ctx.clock.phase("state"):
        ctx.state.save([(key, fp, previous) for key, _, fp, previous in plan.erased],
                       new={key for key, kind, _, _ in plan.erased if kind == "create"}, commit=False)
        ctx.state.record_outcomes(ctx.options.run_id, [(key, "skipped", reason)
                                                       for (key, _, _, _), reason in zip(plan.erased, reasons)])


# -- the erasure run ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ErasureRequest:
    request_id: str
    email: str  # as the source holds it (sent to the destinations, never logged)
    key: str  # the profile key: trimmed, lower-cased
    requested_at: str | None


@dataclass
class ErasureTarget:
    """One place one deletion request reaches (a Klaviyo account through a connection, a Mailchimp audience), and
    the state databases whose exports write there: state connection (None: the embedded file) -> export ids."""

    destination: str
    conn_id: str
    target_id: str
    exports_by_state: dict[str | None, list[str]] = field(default_factory=dict)


def erasure_targets(exports: Iterable[ExportSpec], eraser_for: Callable[[str, str], Eraser]) -> list[ErasureTarget]:
    """Every erasure target of the exports' destination connections, with the exports (by state database) behind
    each. ``eraser_for(destination type, conn_id)`` builds a connection's eraser (it maps lists or audiences to
    targets)."""
    by_connection: dict[tuple[str, str], list[ExportSpec]] = {}
    for spec in exports:
        by_connection.setdefault((spec.destination.type, spec.destination.connection_id), []).append(spec)
    targets: list[ErasureTarget] = []
    for (kind, conn_id), specs in by_connection.items():
        eraser = eraser_for(kind, conn_id)
        found: dict[str, ErasureTarget] = {}
        for spec in specs:
            for target_id in eraser.targets(spec.destination.targets):
                target = found.setdefault(target_id, ErasureTarget(kind, conn_id, target_id))
                target.exports_by_state.setdefault(spec.state_conn_id, []).append(spec.id)
        targets.extend(found.values())
    return targets


@dataclass
class ErasureSummary:
    """What an erasure run did, in counts and receipts (request ids, never addresses): the task's XCom value."""

    requests: int = 0
    invalid: int = 0
    sent: int = 0  # erasure calls made this run (one per request and target not answered before)
    answered: int = 0
    failed: int = 0
    already_answered: int = 0
    invalid_reasons: Counter[str] = field(default_factory=Counter)
    receipts: list[dict[str, Any]] = field(default_factory=list)  # this run's, one per call

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "invalid": self.invalid, "sent": self.sent, "answered": self.answered,
                "failed": self.failed, "already_answered": self.already_answered,
                "invalid_reasons": dict(self.invalid_reasons), "receipts": list(self.receipts)}

    def table(self) -> str:
        lines = [f"erasure requests: {self.requests} read, {self.invalid} invalid, {self.sent} sent, "
                 f"{self.answered} answered, {self.failed} failed (retried next run), "
                 f"{self.already_answered} answered before"]
        lines += [f"  {r['request_id']} -> {r['destination']} {r['target_id']} ({r['conn_id']}): {r['answer']}"
                  for r in self.receipts]
        lines += [f"  invalid: {count} x {reason}" for reason, count in self.invalid_reasons.most_common(5)]
        return "\n".join(lines)


class ErasureFailedError(RuntimeError):
    """Some erasures were not answered: their receipts say so and the next erasure run sends them again."""

    def __init__(self, message: str, summary: ErasureSummary):
        super().__init__(message)
        self.summary = summary


def read_requests(source: Source, mapping: ErasureMappingSpec, summary: ErasureSummary) -> list[ErasureRequest]:
    """Every valid request of the source (its first row per request id); invalid rows are counted with a reason.
    Erasure sources are small (people asking), so they are read whole."""
    from segment_export.sources.base import check_columns

    columns = mapping.columns()
    emails = RowMapper(MappingSpec(email=mapping.email), columns)  # the exporter's own address rules

    named = [("mapping.email", mapping.email), ("mapping.request_id", mapping.request_id)]
    if mapping.requested_at:
        named.append(("mapping.requested_at", mapping.requested_at))
    check_columns(f"erasure source ({source.description})", named, source.columns())
    position = {c: i for i, c in enumerate(columns)}
    seen: set[str] = set()
    requests: list[ErasureRequest] = []
    for chunk in source.chunks(columns):
        for row in chunk:
            summary.requests += 1
            request_id = row[position[mapping.request_id]]
            request_id = "" if request_id is None else str(request_id).strip()
            profile = emails.map(row)
            reason = ("no request id" if not request_id else profile.reason if isinstance(profile, Rejection)
                      else None)
            if reason is not None:
                summary.invalid += 1
                summary.invalid_reasons[reason] += 1
                continue
            if request_id in seen:
                continue
            seen.add(request_id)
            when = row[position[mapping.requested_at]] if mapping.requested_at else None
            requests.append(ErasureRequest(request_id, profile.email, profile.key, None if when is None else str(when)))
    return requests


def run_erasures(requests: list[ErasureRequest], targets: list[ErasureTarget], erasers: dict[tuple[str, str], Eraser],
                 stores: dict[str | None, ErasureStore], summary: ErasureSummary | None = None,
                 logger: logging.Logger | None = None) -> ErasureSummary:
    """Send every request not yet answered to every target; a receipt per request and target in each state
    database behind the target. Raises :class:`ErasureFailedError` at the end when some were not answered."""
    from segment_export.hooks.base import DestinationError

    logger = logger or log
    summary = summary or ErasureSummary()
    # Every receipt of each target, read once per state database (an erasure source keeps its old requests).
    known = {(id(target), state): stores[state].receipts_for(target.conn_id, target.target_id)
             for target in targets for state in target.exports_by_state}
    for request in requests:
        for target in targets:
            receipts = [(stores[state], exports, known[(id(target), state)].get(request.request_id))
                        for state, exports in target.exports_by_state.items()]
            answered = next((r for _, _, r in receipts if r is not None and r[0] is not None), None)
            if answered is not None:
                summary.already_answered += 1
                for store, exports, receipt in receipts:
                    if receipt is None or receipt[0] is None:  # a state database added since: give it the receipt
                        store.record(request.request_id, target.destination, target.conn_id, target.target_id,
                                     request.key, request.requested_at, answered[1] or "", True, when=answered[0])
                        store.forget_in_state(exports, request.key)
                continue
            eraser = erasers[(target.destination, target.conn_id)]
            summary.sent += 1
            try:
                answer, ok = eraser.erase(request.email, target.target_id), True
                summary.answered += 1
            except DestinationError as exc:
                answer, ok = f"not answered, retried next run: {redact_emails(str(exc))}", False
                summary.failed += 1
            logger.info("erasure request %s -> %s %s (connection %s): %s", request.request_id, target.destination,
                        target.target_id, target.conn_id, answer)
            for store, exports, _ in receipts:
                store.record(request.request_id, target.destination, target.conn_id, target.target_id, request.key,
                             request.requested_at, answer, ok)
                if ok:
                    store.forget_in_state(exports, request.key)
            summary.receipts.append({"request_id": request.request_id, "destination": target.destination,
                                     "conn_id": target.conn_id, "target_id": target.target_id, "answer": answer,
                                     "answered": ok})
    if summary.failed:
        raise ErasureFailedError(
            f"{summary.failed} of {summary.sent} erasure call(s) were not answered; their receipts say so and the "
            "next erasure run sends them again", summary)
    return summary
