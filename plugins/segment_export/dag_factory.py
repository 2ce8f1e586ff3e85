"""One DAG per export, built from the YAML specs in a folder. Parsing reads YAML only: no data, no network.

A spec that does not validate must show in Airflow as an import error while every other export still loads.
Airflow records an import error for a DAG file when one of its DAGs fails validation while being bagged, and
keeps bagging the others; so the factory adds one placeholder DAG, ``segment_export_spec_errors``, whose
validation fails with every spec error (file, export, field). It never runs.

Airflow keeps one import error per DAG file, the last one raised: so no export DAG may fail Airflow's own
checks after the factory. Each export's DAG is built and validated here, as the DagBag would, and an export
whose DAG Airflow refuses (or whose alert callback does not import) gets no DAG, only its line in that error.
DAGs are built without ``with DAG(...)``: Airflow auto-registers every DAG used as a context manager, so a DAG
left half-built by an error would otherwise still load, with no task.
"""

from __future__ import annotations

import os
from pathlib import Path

from airflow.sdk import DAG, Asset, Param

from segment_export.assets import create_asset, destination_targets
from segment_export.lineage import mapped_fields
from segment_export.notifications import AlertConfigError, failure_callbacks
from segment_export.spec import ErasureSpec, ExportSpec, SpecError, load_spec_folder

SPECS_ENV = "SEGMENT_EXPORT_SPECS"
SPEC_ERRORS_DAG_ID = "segment_export_spec_errors"


class InvalidExportSpecs(SpecError):
    """Every spec error of a folder, in one message (Airflow keeps one import error per DAG file)."""

    def __init__(self, errors: list[SpecError]):
        self.errors = errors
        ValueError.__init__(self, f"{len(errors)} invalid export spec(s):\n" + "\n".join(f"- {e}" for e in errors))


class _SpecErrorsDag(DAG):
    """Carries spec errors into Airflow's import errors; see the module docstring."""

    def validate(self) -> None:
        raise InvalidExportSpecs(getattr(self, "_spec_errors", []))


def specs_folder(default: str | Path) -> Path:
    return Path(os.environ.get(SPECS_ENV) or default)


def _cell(value: object) -> str:
    """A Markdown table cell: pipes escaped, newlines flattened."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def doc_md(spec: ExportSpec) -> str:
    """The DAG's documentation in the UI: what goes where, as a table."""
    dest, src = spec.destination, spec.source
    if src.kind == "table":
        source = f"table `{src.table}` (connection `{src.conn_id}`)"
    elif src.kind == "query":
        source = f"SQL query (connection `{src.conn_id}`)"
    else:
        source = f"{src.file_format.upper()} file `{src.path}`"
    if src.segment_column:
        source += f", rows whose `{src.segment_column}` is " + ", ".join(f"`{s}`" for s in src.segments or [])
    target_kind, destination_text = dest.describe_targets()
    mapping = ", ".join(f"`{col}` → {field}" for field, col in mapped_fields(spec))
    limit = f"{spec.max_profiles:,} profiles, on exceed: {spec.limit.on_exceed}"
    if spec.limit.on_exceed == "truncate":
        limit += f" (first by `{spec.limit.order_by}`)"
    if spec.schedule_on_source_asset:
        schedule = f"when the asset `{src.asset_uri}` is updated"
    else:
        schedule = f"`{spec.schedule}`" if spec.schedule else "on demand only (trigger by hand)"
    rows = [
        ("Destination", f"{dest.kind.display_name} {target_kind} {destination_text} (connection `{dest.connection_id}`)"),
        ("Source", source),
        ("Mapping", mapping),
        ("Limit", limit),
        ("Schedule", schedule),
        ("Owner", spec.owner),
    ]
    rows[1:1] = dest.doc_rows()
    if spec.alerts:
        who = [f"e-mail to {len(spec.alerts.email)} address(es)"] if spec.alerts.email else []
        who += [f"`{spec.alerts.callback}`"] if spec.alerts.callback else []
        rows.append(("On failure", ", ".join(who) or "nothing"))
    if spec.verify is not None:
        rows.append(("Drift", "verified after each run" + (", repaired by the next run" if spec.verify.repair else "")))
    if spec.access_control:
        rows.append(("Access", "; ".join(f"{role}: {', '.join(lv)}" for role, lv in spec.access_control.items())))
    head = f"### {_cell(spec.display_name)}\n\n"
    if spec.description:
        head += _cell(spec.description) + "\n\n"
    table = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {_cell(v)} |" for k, v in rows)
    foot = (
        "\n\nTrigger with options (**Trigger** → form): `dry_run` plans and sends nothing, `max_profiles` lowers "
        "this run's limit, `allow_mass_leave` lets this run remove more than the mass-removal guard allows"
        + (", `verify` / `verify_only` / `repair` report (and repair) drift" if spec.destination.kind.verifies else "")
        + ". "
        "Mapped fields leave your compliance boundary for a third-party marketing platform."
    )
    return head + table + foot


def trigger_params(spec: ExportSpec) -> dict[str, Param]:
    """The manual trigger form: options the operator reads through ``run_options`` (and, for drift,
    ``verify.VerifyOptions.for_run``), validated by JSON schema."""
    return {**_export_params(spec), **verify_params(spec)}


def verify_params(spec: ExportSpec) -> dict[str, Param]:
    """Drift options (``segment_export.verify``), for destinations that can list their target's membership; their
    defaults are the spec's ``verify``, so a scheduled run does what the spec says."""
    if not spec.destination.kind.verifies:
        return {}
    target = spec.destination.kind.target_kind
    return {
        "verify": Param(
            spec.verify is not None, type="boolean", title="Verify (drift)",
            description=(
                f"After the export, read the {target}'s real membership and report what differs from what the export "
                "sent: added or removed outside the export, unsubscribed or suppressed since."
            ),
        ),
        "verify_only": Param(
            False, type="boolean", title="Verify only",
            description=f"Only verify: read nothing from the source, send nothing; compare the {target} with the state.",
        ),
        "repair": Param(
            spec.verify.repair if spec.verify is not None else False, type="boolean", title="Repair drift",
            description=(
                "With verify: profiles removed outside the export are sent again by the next run. Nobody is ever "
                "re-subscribed; unsubscribed and suppressed profiles are only reported."
            ),
        ),
    }


def _export_params(spec: ExportSpec) -> dict[str, Param]:
    return {
        "dry_run": Param(
            False, type="boolean", title="Dry run",
            description="Read, map and plan the batches, but send nothing to the destination.",
        ),
        "full_resync": Param(
            False, type="boolean", title="Full resync",
            description="Send every profile of the segment, not only those changed since the last run.",
        ),
        "max_profiles": Param(
            None, type=["null", "integer"], minimum=1, maximum=spec.max_profiles, title="Limit for this run",
            description=(
                f"At most this many profiles (1 to the export's limit, {spec.max_profiles:,}); "
                "rows beyond it are skipped. Empty: the export's limit."
            ),
        ),
        "allow_mass_leave": Param(
            False, type="boolean", title="Allow mass removal",
            description=(
                "Let this run remove, untag or unsubscribe more of the export's profiles than the mass-removal "
                "guard allows (sync.max_leave_share), e.g. after a segment really shrank."
            ),
        ),
    }


def source_asset(spec: ExportSpec) -> Asset | None:
    uri = spec.source.asset_uri
    return Asset(uri=uri, name=uri) if uri else None


def destination_assets(spec: ExportSpec) -> list[Asset]:
    """``<destination type>://<target id>``, one per target (e.g. ``klaviyo://<list_id>``): downstream DAGs can
    schedule on them."""
    return [create_asset(destination=spec.destination.type, target_id=t) for t in destination_targets(spec)]


def export_dag(spec: ExportSpec) -> DAG:
    """The DAG of one export: a single export task, scheduled as the spec says.

    Raises :class:`AlertConfigError` before any DAG exists when the alert callback does not import, and
    whatever Airflow raises for a value it refuses; :func:`build_dags` turns both into spec errors.
    """
    from datetime import datetime, timezone

    from segment_export.operators.export import SegmentExportOperator

    callbacks = failure_callbacks(spec)
    dest = spec.destination
    target = f"{dest.type} {dest.kind.target_kind} {dest.target_id}"
    inlet = source_asset(spec)
    outlets = destination_assets(spec)
    dag = DAG(  # not a context manager: see the module docstring
        dag_id=spec.id,
        dag_display_name=spec.display_name,
        description=spec.description or f"{spec.display_name}: export to {target}",
        schedule=inlet if spec.schedule_on_source_asset else spec.schedule,
        start_date=datetime.combine(spec.start_date, datetime.min.time(), tzinfo=timezone.utc),
        catchup=False,
        max_active_runs=1,
        tags=list(dict.fromkeys(["segment-export", dest.type, *spec.tags])),
        default_args={"owner": spec.owner, "retries": 0},
        doc_md=doc_md(spec),
        params=trigger_params(spec),
        access_control=spec.dag_access_control,
    )
    SegmentExportOperator(
        task_id="export",
        dag=dag,
        export=spec,
        inlets=[inlet] if inlet else [],
        outlets=outlets,
        on_failure_callback=callbacks or None,
        **({"pool": spec.pool} if spec.pool else {}),
    )
    return dag


def checked_export_dag(spec: ExportSpec, folder: str | Path) -> DAG | SpecError:
    """The export's DAG, validated as the DagBag will validate it; or the error naming the file, export, field.

    The spec's validation already refuses what Airflow would (schedules, tags, ids, lengths); this is where
    what only Airflow can tell is caught, so it costs one export its DAG and never the others theirs.
    """
    from airflow.sdk.exceptions import AirflowTimetableInvalid

    file = spec.spec_file or folder
    if spec.id == SPEC_ERRORS_DAG_ID:
        return SpecError(file, spec.id, "id", "this dag_id is reserved for the DAG that reports spec errors")
    try:
        dag = export_dag(spec)
        dag.validate()
    except AlertConfigError as exc:
        return SpecError(file, spec.id, exc.field, exc.reason)
    except AirflowTimetableInvalid as exc:
        return SpecError(file, spec.id, "schedule", f"Airflow refuses the schedule {spec.schedule!r}: {exc}")
    except Exception as exc:  # noqa: BLE001 - whatever Airflow refuses costs this export its DAG, no other
        return SpecError(file, spec.id, None, f"Airflow refuses the export's DAG: {type(exc).__name__}: {exc}")
    return dag


def build_dags(folder: str | Path) -> dict[str, DAG]:
    """Every export DAG of a folder (``SEGMENT_EXPORT_SPECS`` overrides it), keyed by dag_id, for ``globals()``.

    An export whose spec or DAG is invalid has no DAG; its error is one line of the import error.
    """
    folder = specs_folder(folder)
    specs, erasures, errors = load_spec_folder(folder)
    dags = {}
    for spec in specs:
        built = checked_export_dag(spec, folder)
        if isinstance(built, SpecError):
            errors.append(built)
        else:
            dags[spec.id] = built
    for erasure in erasures:
        built = checked_erasure_dag(erasure, [s for s in specs if s.id in dags], folder)
        if isinstance(built, SpecError):
            errors.append(built)
        else:
            dags[erasure.dag_id] = built
    if errors:
        dags[SPEC_ERRORS_DAG_ID] = _errors_dag(errors)
    return dags


def erasure_doc_md(erasure: ErasureSpec, exports: list[ExportSpec]) -> str:
    src = erasure.source
    source = (f"table `{src.table}`" if src.kind == "table" else "SQL query" if src.kind == "query"
              else f"{src.file_format.upper()} file `{src.path}`") + (f" (connection `{src.conn_id}`)" if src.conn_id else "")
    reached = sorted({f"{e.destination.kind.display_name} connection `{e.destination.connection_id}`" for e in exports})
    rows = [
        ("Requests", source),
        ("Columns", f"email `{erasure.mapping.email}`, request id `{erasure.mapping.request_id}`"
                    + (f", requested at `{erasure.mapping.requested_at}`" if erasure.mapping.requested_at else "")),
        ("Sent to", ", ".join(reached) or "no export yet"),
        ("Exports that skip erased addresses", ", ".join(f"`{e.id}`" for e in exports) or "none"),
        ("Schedule", f"`{erasure.schedule}`" if erasure.schedule else "on demand only (trigger by hand)"),
        ("Owner", erasure.owner),
    ]
    head = f"### {_cell(erasure.display_name)}\n\n" + (_cell(erasure.description) + "\n\n" if erasure.description else "")
    table = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {_cell(v)} |" for k, v in rows)
    foot = ("\n\nEach new request is sent once to every destination above (Klaviyo: Request Profile Deletion for the "
            "account; Mailchimp: permanent delete in each audience) and gets a receipt in `segment_export_erasures` "
            "beside the exports' state; an unanswered one is sent again by the next run. Exports never send an "
            "erased address again.")
    return head + table + foot


def erasure_dag(erasure: ErasureSpec, exports: list[ExportSpec]) -> DAG:
    """The DAG of a spec file's ``erasure`` block: one task sending each new request to every destination
    connection ``exports`` write to (every valid export of the folder)."""
    from datetime import datetime, timezone

    from segment_export.operators.erasure import SegmentExportErasureOperator

    dag = DAG(  # not a context manager: see the module docstring
        dag_id=erasure.dag_id,
        dag_display_name=erasure.display_name,
        description=erasure.description or f"{erasure.display_name}: erasure requests to every export's destination",
        schedule=erasure.schedule,
        start_date=datetime.combine(erasure.start_date, datetime.min.time(), tzinfo=timezone.utc),
        catchup=False,
        max_active_runs=1,
        tags=["segment-export", "erasure"],
        default_args={"owner": erasure.owner, "retries": 0},
        doc_md=erasure_doc_md(erasure, exports),
    )
    SegmentExportErasureOperator(task_id="erase", dag=dag, erasure=erasure, exports=exports)
    return dag


def checked_erasure_dag(erasure: ErasureSpec, exports: list[ExportSpec], folder: str | Path) -> DAG | SpecError:
    """The erasure DAG, validated as the DagBag will; or the error naming the file and the field. Every export must
    be on a destination that declares an erasure capability: an erasure that cannot reach one is refused."""
    file = erasure.spec_file or folder
    if erasure.dag_id == SPEC_ERRORS_DAG_ID:
        return SpecError(file, None, "erasure.id", "this dag_id is reserved for the DAG that reports spec errors")
    unreachable = [e for e in exports if e.destination.kind.eraser is None]
    if unreachable:
        names = ", ".join(f"{e.id!r} ({e.destination.kind.display_name})" for e in unreachable)
        return SpecError(file, None, "erasure", f"erasure requests cannot reach the destination of export(s) {names}: "
                         "it declares no erasure capability")
    try:
        dag = erasure_dag(erasure, exports)
        dag.validate()
    except Exception as exc:  # noqa: BLE001 - whatever Airflow refuses costs the erasure its DAG, no export theirs
        return SpecError(file, None, "erasure", f"Airflow refuses the erasure DAG: {type(exc).__name__}: {exc}")
    return dag


def _errors_dag(errors: list[SpecError]) -> DAG:
    dag = _SpecErrorsDag(dag_id=SPEC_ERRORS_DAG_ID, schedule=None, tags=["segment-export"])
    dag._spec_errors = errors  # type: ignore[attr-defined]
    return dag
