"""The export operator: reads a segment, maps it, applies the limit and pushes batches; returns the summary."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

from airflow.sdk import BaseOperator

from segment_export.destinations import destination_for
from segment_export.exporter import ExportError, MassLeaveError, RejectedShareError, RunOptions, run_export
from segment_export.sources import source_for
from segment_export.spec import ExportSpec
from segment_export.state import StateStore


class SegmentExportOperator(BaseOperator):
    """Export one segment to its destination (a Klaviyo list or a Mailchimp audience).

    :param export: the export spec, as an :class:`~segment_export.spec.ExportSpec` or the dict the YAML holds.
        It is validated again at run time, so a hand-written DAG gets the same checks as a generated one.

    Returns the run's summary (counts and reasons, no personal data) as the task's XCom value.
    """

    template_fields: Sequence[str] = ()
    ui_color = "#ffe0b2"

    def __init__(self, *, export: ExportSpec | dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        spec = export if isinstance(export, ExportSpec) else ExportSpec.model_validate(export)
        self.export = spec.model_dump(mode="json")

    def execute(self, context: Any) -> dict[str, Any]:
        spec = ExportSpec.model_validate(self.export)
        source = source_for(spec.source)
        destination = destination_for(spec)
        options = self.run_options(context)
        options = replace(options, dry_run=options.dry_run or spec.sync.dry_run, run_id=str((context or {}).get("run_id") or "manual"))
        state = StateStore.open(spec.state_conn_id, spec.id, destination.target_id)
        self.log.info("sync state: %s", state.description)
        try:
            summary = run_export(spec, source, destination, state=state, options=options, logger=self.log)
        except RejectedShareError as exc:
            # Not a stop: every batch went out and is remembered; the share check fails the task so alerting fires.
            self.log.error("the run completed, then failed the rejected-share check (limit.max_rejected_share): %s\n%s",
                           exc, exc.summary.table())
            raise
        except MassLeaveError as exc:
            self.log.error("the run sent its additions and updates, then stopped before any removal: %s\n%s",
                           exc, exc.summary.table())
            raise
        except ExportError as exc:
            self.log.error("export stopped; what the destination confirmed before:\n%s", exc.summary.table())
            raise
        finally:
            source.close()
            state.close()
        self.log.info("export summary:\n%s", summary.table())
        stats = destination.request_stats
        self.log.info("%d requests, %d retried", stats["requests"], stats["retries"])
        result = summary.as_dict()
        self._summary = result
        self._record_outlet_events(context, result)
        return result

    def _record_outlet_events(self, context: Any, summary: dict[str, Any]) -> None:
        """Counts (no personal data) on the destination asset's event, for DAGs scheduled on it."""
        events = (context or {}).get("outlet_events")
        if events is None:
            return
        keys = ("accepted", "rejected", "created", "updated", "dry_run")
        for outlet in self.outlets:
            events[outlet].extra.update({k: summary.get(k) for k in keys})

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """OpenLineage: the segment as input, the list or audience as output (see ``segment_export.lineage``)."""
        from segment_export.lineage import operator_lineage

        spec = ExportSpec.model_validate(self.export)
        host = None
        try:
            from airflow.sdk import BaseHook

            host = BaseHook.get_connection(spec.destination.connection_id).host
        except Exception:  # noqa: BLE001 - lineage must never fail a task; default namespace then
            host = None
        return operator_lineage(spec, getattr(self, "_summary", None), host)

    @staticmethod
    def run_options(context: Any) -> RunOptions:
        """On-demand options from the DAG run's params (the manual trigger form): ``dry_run``,
        ``full_resync``, ``max_profiles`` and ``allow_mass_leave``; absent params mean a normal run."""
        params = (context or {}).get("params") or {}
        max_profiles = params.get("max_profiles")
        return RunOptions(
            dry_run=bool(params.get("dry_run", False)),
            full_resync=bool(params.get("full_resync", False)),
            max_profiles=int(max_profiles) if max_profiles not in (None, "", 0) else None,
            allow_mass_leave=bool(params.get("allow_mass_leave", False)),
        )
