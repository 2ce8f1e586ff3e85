"""The erasure operator: sends each new erasure request to every destination the exports write to; returns the
run's counts and receipts (request ids, never addresses). The rules are in ``segment_export.erasure``."""

from __future__ import annotations

from typing import Any, Sequence

from airflow.sdk import BaseOperator

from segment_export.erasure import (
    ErasureFailedError, ErasureSummary, erasure_targets, read_requests, run_erasures,
)
from segment_export.sources import source_for
from segment_export.spec import ErasureSpec, ExportSpec


class SegmentExportErasureOperator(BaseOperator):
    """Erase the people an erasure source lists from every list and audience the given exports write to.

    :param erasure: the spec file's ``erasure`` block (an :class:`~segment_export.spec.ErasureSpec` or its dict).
    :param exports: the exports whose destinations must forget the people (every export of the specs folder, as
        the DAG factory passes them); their destination connections and state databases.

    Each request is sent once per erasure target (a Klaviyo account, a Mailchimp audience) and a receipt is written
    beside each export's state; an unanswered one is recorded, the task fails at the end (alerting fires) and the
    next run sends it again; an answered one is never sent again.
    """

    template_fields: Sequence[str] = ()
    ui_color = "#ffcdd2"

    def __init__(self, *, erasure: ErasureSpec | dict[str, Any], exports: Sequence[ExportSpec | dict[str, Any]],
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        spec = erasure if isinstance(erasure, ErasureSpec) else ErasureSpec.model_validate(erasure)
        self.erasure = spec.model_dump(mode="json")
        self.exports = [(e if isinstance(e, ExportSpec) else ExportSpec.model_validate(e)).model_dump(mode="json")
                        for e in exports]

    def execute(self, context: Any) -> dict[str, Any]:
        from segment_export.state import ErasureStore

        spec = ErasureSpec.model_validate(self.erasure)
        exports = [ExportSpec.model_validate(e) for e in self.exports]
        erasers: dict[tuple[str, str], Any] = {}

        def eraser_for(kind: str, conn_id: str) -> Any:
            from segment_export.destinations import destination_type

            return erasers.setdefault((kind, conn_id), destination_type(kind).build_eraser(conn_id))

        targets = erasure_targets(exports, eraser_for)
        summary = ErasureSummary()
        source = source_for(spec.source)
        try:
            requests = read_requests(source, spec.mapping, summary)
        finally:
            source.close()
        self.log.info("%d erasure request(s) read from %s (%d invalid); %d target(s): %s", len(requests),
                      source.description, summary.invalid, len(targets),
                      ", ".join(f"{t.destination} {t.target_id} ({t.conn_id})" for t in targets) or "none")
        states = {state for target in targets for state in target.exports_by_state}
        stores = {state: ErasureStore.open(state) for state in states}
        try:
            run_erasures(requests, targets, erasers, stores, summary, logger=self.log)
        except ErasureFailedError as exc:
            self.log.error("%s\n%s", exc, exc.summary.table())
            raise
        finally:
            for store in stores.values():
                store.close()
        self.log.info("erasure summary:\n%s", summary.table())
        return summary.as_dict()
