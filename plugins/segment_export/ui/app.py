"""The Segment exports FastAPI app, served by the api-server under ``/segment-exports`` (see ``plugin.py``).

Every route goes through Airflow's own security dependencies (``airflow.api_fastapi.core_api.security``):
``get_user`` takes the UI's session cookie or a bearer token exactly as the REST API does, so a request without
a valid one is refused (401/403) before anything is read; DAG-level authorization is the auth manager's
(``get_authorized_dag_ids`` for the list, ``requires_access_dag`` for a run), so a user who may not read an
export's DAG sees neither the export nor its outcomes, whatever the auth manager (simple, FAB, a company's own).
The unmasked key of one row needs the right to edit the DAG (``PUT``), is fetched by the row's number (never by
anything personal in the URL, which the api-server logs) and is sent with ``Cache-Control: no-store``.

Routes (HTML for people, JSON for scripts; the same data):

- ``GET /`` and ``GET /api/exports``: every export the user may read, with its last run and counts;
- ``GET /dags/{dag_id}/runs/{run_id}`` and ``GET /api/dags/{dag_id}/runs/{run_id}``: one run's summary, plan,
  outcome counts and rows (``q``, ``action``, ``offset``, ``limit``), its sections (``sections.py``);
- ``GET /dags/{dag_id}/runs/{run_id}?reveal=N`` and ``GET /api/dags/{dag_id}/runs/{run_id}/rows/{N}/key``: row
  N's key, for users allowed to edit the DAG.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any
from urllib.parse import quote

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_dag

from segment_export.ui import URL_PREFIX, metadata, render
from segment_export.ui.outcomes import OutcomesUnavailable, open_reader
from segment_export.ui.sections import RunContext, run_sections
from segment_export.ui.views import COUNT_FIELDS, ExportRow, OutcomeCounts, RunInfo

PAGE_SIZE = 100
RUN_ACCESS = Depends(requires_access_dag("GET", DagAccessEntity.RUN))

app = FastAPI(title="Segment exports", docs_url=None, redoc_url=None, openapi_url=None)

ICON = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24" fill="none" stroke="currentColor" stroke-width="2">'
        '<path d="M4 19V9M10 19V5M16 19v-7M22 19H2"/></svg>')


def _auth_manager():
    from airflow.api_fastapi.app import get_auth_manager

    return get_auth_manager()


def _can_edit(dag_id: str, user: Any) -> bool:
    from airflow.models.dag import DagModel

    return _auth_manager().is_authorized_dag(
        method="PUT", details=DagDetails(id=dag_id, team_name=DagModel.get_team_name(dag_id)), user=user
    )


def _readable_exports(user: Any) -> tuple[list[ExportRow], int]:
    from airflow.utils.session import create_session

    specs, errors = metadata.load_specs()
    readable = _auth_manager().get_authorized_dag_ids(user=user, method="GET") & set(specs)
    rows = []
    with create_session() as session:
        dags = metadata.export_dags(session, readable)
        for dag_id in sorted(dags, key=lambda d: specs[d].display_name.lower()):
            timetable, paused = dags[dag_id]
            rows.append(ExportRow(metadata.export_info(specs[dag_id], timetable, paused),
                                  metadata.recent_runs(session, dag_id)))
    return rows, errors


def _airflow_root(request: Request) -> str:
    root = request.scope.get("root_path", "")
    return root[: -len(URL_PREFIX)] if root.endswith(URL_PREFIX) else ""


def _run_json(run: RunInfo | None) -> dict[str, Any] | None:
    if run is None:
        return None
    return {"run_id": run.run_id, "state": run.state, "task_state": run.task_state, "run_type": run.run_type,
            "start": run.start.isoformat() if run.start else None, "end": run.end.isoformat() if run.end else None,
            "duration_s": run.duration_s, "dry_run": run.dry_run,
            "counts": {name: run.count(name) for name in COUNT_FIELDS} if run.summary else None}


def _export_json(row: ExportRow) -> dict[str, Any]:
    return {**asdict(row.export), "last_run": _run_json(row.last), "counts": row.last_counts,
            "counts_run_id": row.counts_run.run_id if row.counts_run else None,
            "runs": [_run_json(r) for r in row.runs]}


@app.get("/icon.svg", include_in_schema=False)
def icon() -> Response:
    """The navigation entry's icon (public: an icon is no data)."""
    return Response(ICON, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})


@app.get("/", response_class=HTMLResponse)
def exports_page(user: GetUserDep) -> HTMLResponse:
    rows, errors = _readable_exports(user)
    return HTMLResponse(render.render_list(rows, spec_errors=errors))


@app.get("/api/exports")
def exports_json(user: GetUserDep) -> dict[str, Any]:
    rows, errors = _readable_exports(user)
    return {"exports": [_export_json(r) for r in rows], "spec_errors": errors}


def _run_data(dag_id: str, run_id: str, user: Any, *, query: str, action: str, offset: int, limit: int,
              reveal: int | None = None) -> dict[str, Any]:
    from airflow.utils.session import create_session

    specs, _ = metadata.load_specs()
    spec = specs.get(dag_id)
    if spec is None:
        raise HTTPException(404, f"{dag_id!r} is not a segment export")
    with create_session() as session:
        dags = metadata.export_dags(session, [dag_id])
        run = metadata.one_run(session, dag_id, run_id)
    if dag_id not in dags or run is None:
        raise HTTPException(404, f"no run {run_id!r} of export {dag_id!r}")
    timetable, paused = dags[dag_id]
    export = metadata.export_info(spec, timetable, paused)
    can_edit = _can_edit(dag_id, user)
    if reveal is not None and not can_edit:
        raise HTTPException(403, "showing a profile key needs permission to edit this DAG")
    data: dict[str, Any] = {"export": export, "run": run, "summary": run.summary, "can_edit": can_edit,
                            "query": query, "selected_action": action, "offset": offset, "limit": limit,
                            "counts": OutcomeCounts(), "rows": [], "total": 0, "unavailable": None, "revealed": None}
    try:
        with open_reader(spec.state_conn_id, dag_id) as reader:
            data["counts"] = reader.counts(run_id)
            rows, data["total"] = reader.rows(run_id, query=query, action=action, search_keys=can_edit,
                                              limit=limit, offset=offset)
            data["rows"] = [r.masked() for r in rows]
            if reveal is not None:
                key = reader.key(run_id, reveal)
                if key is None:
                    raise HTTPException(404, f"no row {reveal} in run {run_id!r}")
                data["revealed"] = (reveal, key)
    except OutcomesUnavailable as exc:
        data["unavailable"] = str(exc)
    data["sections"] = run_sections(RunContext(dag_id, run_id, spec.state_conn_id, run.summary, can_edit))
    return data


@app.get("/dags/{dag_id}/runs/{run_id}", response_class=HTMLResponse, dependencies=[RUN_ACCESS])
def run_page(dag_id: str, run_id: str, request: Request, user: GetUserDep, q: str = "", action: str = "",
             offset: int = Query(0, ge=0), reveal: int | None = Query(None, ge=1)) -> HTMLResponse:
    try:
        data = _run_data(dag_id, run_id, user, query=q, action=action, offset=offset, limit=PAGE_SIZE, reveal=reveal)
    except HTTPException as exc:
        if exc.status_code != 404:
            raise
        # The run tab is on every DAG's runs: on a DAG that is no export it says so, as a page
        return HTMLResponse(render.render_message("Export outcomes", str(exc.detail), back_href="../../../"), status_code=404)
    root = _airflow_root(request)
    airflow_run = f"{root}/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"
    html = render.render_run(**data, airflow_run_href=airflow_run, task_log_href=f"{airflow_run}/tasks/{metadata.TASK_ID}",
                             back_href="../../../", show_back=True)
    headers = {"Cache-Control": "no-store"} if reveal is not None else {}
    return HTMLResponse(html, headers=headers)


@app.get("/api/dags/{dag_id}/runs/{run_id}", dependencies=[RUN_ACCESS])
def run_json(dag_id: str, run_id: str, user: GetUserDep, q: str = "", action: str = "",
             offset: int = Query(0, ge=0), limit: int = Query(PAGE_SIZE, ge=1, le=1000)) -> dict[str, Any]:
    data = _run_data(dag_id, run_id, user, query=q, action=action, offset=offset, limit=limit)
    counts: OutcomeCounts = data["counts"]
    return {
        "export": asdict(data["export"]), "run": _run_json(data["run"]), "summary": data["summary"],
        "outcomes": {"by_action": counts.by_action,
                     "by_reason": [{"action": a, "reason": r, "count": n} for a, r, n in counts.by_reason],
                     "total": data["total"], "offset": offset, "limit": limit,
                     "rows": [asdict(r) for r in data["rows"]], "keys_masked": True,
                     "unavailable": data["unavailable"]},
        "can_edit": data["can_edit"],
        "sections": [s.as_dict() for s in data["sections"]],
    }


@app.get("/api/dags/{dag_id}/runs/{run_id}/rows/{n}/key", dependencies=[Depends(requires_access_dag("PUT"))])
def row_key(dag_id: str, run_id: str, n: int, user: GetUserDep) -> JSONResponse:
    data = _run_data(dag_id, run_id, user, query="", action="", offset=0, limit=1, reveal=n)
    if data["unavailable"]:
        raise HTTPException(503, data["unavailable"])
    _, key = data["revealed"]
    return JSONResponse({"n": n, "profile_key": key}, headers={"Cache-Control": "no-store"})
