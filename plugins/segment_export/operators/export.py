"""The export operator: reads a segment, maps it, applies the limit and pushes batches; returns the summary."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Any, Sequence

from airflow.sdk import BaseOperator

from segment_export.destinations import destination_for
from segment_export.exporter import ExportError, MassLeaveError, RejectedShareError, RunOptions, run_export
from segment_export.malloc import return_large_blocks
from segment_export.settings import setting
from segment_export.sources import source_for
from segment_export.spec import ExportSpec
from segment_export.state import StateStore
from segment_export.summary import ExportSummary
from segment_export.verify import VerifyOptions, run_verify

#: a deferred run's jobs are polled this often on the triggerer (a finished job is seen within it), for at most
#: DEFER_TIMEOUT (the seed product's documents: a million profiles to Klaviyo take up to 20 minutes)
DEFER_POLL_INTERVAL_S = 1.0
DEFER_TIMEOUT = timedelta(hours=2)


class ExportWaitError(RuntimeError):
    """The triggerer could not see the export's jobs finish (its message says why; no key, no address)."""


class SegmentExportOperator(BaseOperator):
    """Export one segment to its destination's target (a list, an audience).

    :param export: the export spec, as an :class:`~segment_export.spec.ExportSpec` or the dict the YAML holds.
        It is validated again at run time, so a hand-written DAG gets the same checks as a generated one.

    Returns the run's summary (counts and reasons, no personal data) as the task's XCom value. With the spec's
    ``deferrable: true`` the task submits its jobs, defers to :class:`~segment_export.triggers.jobs.
    DestinationJobsTrigger` (the triggerer polls them with the destination's async hook) and finishes in
    :meth:`execute_complete` on a worker, as the Fivetran and HTTP providers' deferrable operators do.

    With the spec's ``verify`` (or the trigger form's ``verify``), a verify pass follows the export
    (:mod:`segment_export.verify`: drift counts in the summary, ``drift`` outcome rows); ``verify_only`` runs it
    alone, without reading the source or sending anything.
    """

    template_fields: Sequence[str] = ()
    ui_color = "#ffe0b2"

    def __init__(self, *, export: ExportSpec | dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        spec = export if isinstance(export, ExportSpec) else ExportSpec.model_validate(export)
        self.export = spec.model_dump(mode="json")

    def execute(self, context: Any) -> dict[str, Any]:
        spec = ExportSpec.model_validate(self.export)
        options = self._options(spec, context)
        verify = VerifyOptions.for_run(spec, (context or {}).get("params"))
        if verify.only:  # the trigger form's verify_only: no export, the membership against the state only
            return self._finish(self._verify(spec, options, verify, None), context)
        if spec.deferrable and not options.dry_run:
            summary = self._run(spec, replace(options, submit_only=True))
            if summary.handles:
                self._defer(spec, summary)
            # No job to wait for (nothing changed): an ordinary pass applies what a submit pass leaves out, the
            # leavers and segment changes (it reads the segment again; it sends nothing the first did not).
            summary = self._run(spec, options)
        else:
            summary = self._run(spec, options)
        if verify.enabled:
            summary = self._verify(spec, options, verify, summary)
        return self._finish(summary, context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        """Back from the triggerer: every job is finished. The run awaits the stored jobs (now at once), counts
        their outcomes as this run's, plans again (what the jobs accepted is now unchanged) and applies the
        segment changes and leavers."""
        spec = ExportSpec.model_validate(self.export)
        if event.get("status") != "success":
            raise ExportWaitError(f"export {spec.id}: waiting for the destination's jobs failed: {event.get('message')}")
        self.log.info("resumed: %d jobs finished on the triggerer; recording their outcomes", len(event.get("handles", [])))
        # The first pass did the resync (if asked); this one only records, re-plans and applies.
        options = replace(self._options(spec, context), resume_counts=True, full_resync=False)
        summary = self._run(spec, options)
        verify = VerifyOptions.for_run(spec, (context or {}).get("params"))
        if verify.enabled:
            summary = self._verify(spec, options, verify, summary)
        return self._finish(summary, context)

    def _verify(self, spec: ExportSpec, options: RunOptions, verify: VerifyOptions,
                summary: ExportSummary | None) -> ExportSummary:
        """The verify pass (``segment_export.verify``) after the export, or alone: its counts go in the summary."""
        destination = destination_for(spec)
        state = StateStore.open(spec.state_conn_id, spec.id, destination.target_id)
        if summary is None:
            summary = ExportSummary(spec.id, destination.type, destination.target_id, dry_run=options.dry_run,
                                    verify_only=True)
        try:
            report = run_verify(spec, destination, state, run_id=options.run_id, repair=verify.repair,
                                dry_run=options.dry_run, log=self.log)
        finally:
            state.close()
        summary.drift = report.as_dict()
        return summary

    def _options(self, spec: ExportSpec, context: Any) -> RunOptions:
        options = self.run_options(context)
        run_id = str((context or {}).get("run_id") or "manual")
        return replace(options, dry_run=options.dry_run or spec.sync.dry_run, run_id=run_id)

    def _defer(self, spec: ExportSpec, summary: ExportSummary) -> None:
        from segment_export.triggers.jobs import DestinationJobsTrigger

        kind = spec.destination.kind
        self.log.info("submitted %d jobs (%d profiles); deferring to the triggerer until %s has finished them",
                      len(summary.handles), summary.submitted, kind.display_name)
        self.defer(
            trigger=DestinationJobsTrigger(
                async_hook=kind.async_hook, conn_id=spec.destination.connection_id, handles=list(summary.handles),
                # a minute inside the task's own deferral timeout: the trigger's error names the pending jobs
                poll_interval=DEFER_POLL_INTERVAL_S, timeout=DEFER_TIMEOUT.total_seconds() - 60,
            ),
            method_name="execute_complete",
            timeout=DEFER_TIMEOUT,
        )

    def _run(self, spec: ExportSpec, options: RunOptions) -> ExportSummary:
        source = source_for(spec.source)
        destination = destination_for(spec)
        state = StateStore.open(spec.state_conn_id, spec.id, destination.target_id)
        self.log.info("sync state: %s", state.description)
        return_large_blocks()  # job bodies freed by the sending threads go back to the system (``malloc``)
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
        stats = destination.request_stats
        self.log.info("%d requests, %d retried", stats["requests"], stats["retries"])
        return summary

    def _finish(self, summary: ExportSummary, context: Any) -> dict[str, Any]:
        self.log.info("export summary:\n%s", summary.table())
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
            map_workers=map_workers(),
        )


#: ``[segment_export] map_workers`` (or ``AIRFLOW__SEGMENT_EXPORT__MAP_WORKERS``): processes that map a large
#: segment's rows beside the task's main thread (``mapworkers``); 0 maps them in the task's process.
DEFAULT_MAP_WORKERS = 1


def map_workers() -> int:
    """The deployment's ``[segment_export] map_workers``, or 1."""
    value = setting("map_workers")
    try:
        return max(int(value), 0) if value not in (None, "") else DEFAULT_MAP_WORKERS
    except ValueError as exc:
        raise ValueError(f"[segment_export] map_workers must be a whole number of processes, not {value!r}") from exc
