"""What the pages read from Airflow: the export specs (as the DAG file reads them), the export DAGs, their runs and
each run's XCom summary from the metadata database. Thin: turning it into a page is ``views.py``'s part.

The api-server does not parse DAG files, so the specs are read from the folder the DAG file reads
(``SEGMENT_EXPORT_SPECS``, else ``<dags_folder>/exports``): they say where each export's outcomes are (its state
connection), which the serialized DAG does not. Only exports that have a DAG in the metadata database are shown
(an export with a spec error has none).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from segment_export.spec import ExportSpec
from segment_export.ui.views import ExportInfo, RunInfo, describe_schedule, summary_value

TASK_ID = "export"  # dag_factory's one task per export DAG


def _text(value: Any) -> str | None:
    """An Airflow state or run type (str enums) as its plain value."""
    if value is None:
        return None
    return str(getattr(value, "value", value))


def load_specs() -> tuple[dict[str, ExportSpec], int]:
    """Every valid export spec by id, and the number of spec errors (shown as a hint, never their text: the DAG
    import errors are where Airflow shows them, to those allowed to see them)."""
    from airflow.configuration import conf

    from segment_export.dag_factory import specs_folder
    from segment_export.spec import load_specs as load

    folder = specs_folder(Path(conf.get("core", "dags_folder")) / "exports")
    specs, errors = load(folder)
    return {s.id: s for s in specs}, len(errors)


def export_info(spec: ExportSpec, timetable_summary: str | None = None, paused: bool | None = None) -> ExportInfo:
    dest = spec.destination
    target_kind, targets = dest.describe_targets()
    return ExportInfo(
        export_id=spec.id,
        name=spec.display_name,
        destination=dest.kind.display_name,
        target=f"{target_kind} {targets}".replace("`", ""),  # describe_targets writes Markdown for doc_md
        schedule=describe_schedule(spec.schedule, spec.schedule_on_source_asset, timetable_summary),
        state_conn_id=spec.state_conn_id,
        paused=paused,
    )


def export_dags(session: Any, dag_ids: Iterable[str]) -> dict[str, tuple[str | None, bool | None]]:
    """The export DAGs Airflow knows (not stale): dag_id → (timetable summary, paused)."""
    from sqlalchemy import select

    from airflow.models.dag import DagModel

    ids = list(dag_ids)
    if not ids:
        return {}
    rows = session.execute(
        select(DagModel.dag_id, DagModel.timetable_summary, DagModel.is_paused)
        .where(DagModel.dag_id.in_(ids), DagModel.is_stale.is_(False))
    ).all()
    return {dag_id: (summary, paused) for dag_id, summary, paused in rows}


def _summaries(session: Any, dag_id: str, run_ids: list[str]) -> dict[str, dict[str, Any]]:
    from sqlalchemy import select

    from airflow.models.xcom import XComModel

    if not run_ids:
        return {}
    rows = session.execute(
        select(XComModel.run_id, XComModel.value).where(
            XComModel.dag_id == dag_id, XComModel.run_id.in_(run_ids), XComModel.task_id == TASK_ID,
            XComModel.key == "return_value", XComModel.map_index == -1,
        )
    ).all()
    found = {}
    for run_id, value in rows:
        summary = summary_value(value)
        if summary is not None:
            found[run_id] = summary
    return found


def recent_runs(session: Any, dag_id: str, limit: int = 20) -> list[RunInfo]:
    """The export's last ``limit`` runs, newest first, each with its summary and its task's state."""
    from sqlalchemy import select

    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance

    runs = session.execute(
        select(DagRun.run_id, DagRun.state, DagRun.start_date, DagRun.end_date, DagRun.run_type)
        .where(DagRun.dag_id == dag_id).order_by(DagRun.id.desc()).limit(limit)
    ).all()
    run_ids = [r[0] for r in runs]
    summaries = _summaries(session, dag_id, run_ids)
    tis = dict(((r, (s, t)) for r, s, t in session.execute(
        select(TaskInstance.run_id, TaskInstance.state, TaskInstance.try_number)
        .where(TaskInstance.dag_id == dag_id, TaskInstance.run_id.in_(run_ids), TaskInstance.task_id == TASK_ID)
    ).all())) if run_ids else {}
    return [
        RunInfo(run_id=run_id, state=_text(state), start=start, end=end, summary=summaries.get(run_id),
                run_type=_text(run_type),
                task_state=_text(tis[run_id][0]) if run_id in tis else None,
                try_number=tis[run_id][1] if run_id in tis else None)
        for run_id, state, start, end, run_type in runs
    ]


def one_run(session: Any, dag_id: str, run_id: str) -> RunInfo | None:
    from sqlalchemy import select

    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance

    row = session.execute(
        select(DagRun.state, DagRun.start_date, DagRun.end_date, DagRun.run_type)
        .where(DagRun.dag_id == dag_id, DagRun.run_id == run_id)
    ).first()
    if row is None:
        return None
    state, start, end, run_type = row
    ti = session.execute(
        select(TaskInstance.state, TaskInstance.try_number)
        .where(TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id, TaskInstance.task_id == TASK_ID)
    ).first()
    return RunInfo(run_id=run_id, state=_text(state), start=start, end=end,
                   summary=_summaries(session, dag_id, [run_id]).get(run_id), run_type=_text(run_type),
                   task_state=_text(ti[0]) if ti else None, try_number=ti[1] if ti else None)
