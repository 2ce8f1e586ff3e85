"""One DAG per export, built from the YAML specs in a folder. Parsing reads YAML only: no data, no network.

A spec that does not validate must show in Airflow as an import error while every other export still loads.
Airflow records an import error for a DAG file when one of its DAGs fails validation while being bagged, and
keeps bagging the others; so the factory adds one placeholder DAG, ``segment_export_spec_errors``, whose
validation fails with every spec error (file, export, field). It never runs.
"""

from __future__ import annotations

import os
from pathlib import Path

from airflow.sdk import DAG

from segment_export.spec import ExportSpec, SpecError, load_specs

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


def export_dag(spec: ExportSpec) -> DAG:
    """The DAG of one export: a single export task, scheduled as the spec says."""
    from datetime import datetime, timezone

    from segment_export.operators.export import SegmentExportOperator

    dest = spec.destination
    target = f"{dest.type} {'list' if dest.type == 'klaviyo' else 'audience'} {dest.target_id}"
    with DAG(
        dag_id=spec.id,
        description=spec.description or f"{spec.display_name}: export to {target}",
        schedule=spec.schedule,
        start_date=datetime.combine(spec.start_date, datetime.min.time(), tzinfo=timezone.utc),
        catchup=False,
        max_active_runs=1,
        tags=list(dict.fromkeys(["segment-export", dest.type, *spec.tags])),
        default_args={"owner": spec.owner, "retries": 0},
        doc_md=f"**{spec.display_name}**: exports {spec.source.kind} to {target}.",
    ) as dag:
        SegmentExportOperator(task_id="export", export=spec)
    return dag


def build_dags(folder: str | Path) -> dict[str, DAG]:
    """Every export DAG of a folder (``SEGMENT_EXPORT_SPECS`` overrides it), keyed by dag_id, for ``globals()``."""
    specs, errors = load_specs(specs_folder(folder))
    dags = {spec.id: export_dag(spec) for spec in specs}
    if errors:
        dags[SPEC_ERRORS_DAG_ID] = _errors_dag(errors)
    return dags


def _errors_dag(errors: list[SpecError]) -> DAG:
    dag = _SpecErrorsDag(dag_id=SPEC_ERRORS_DAG_ID, schedule=None, tags=["segment-export"])
    dag._spec_errors = errors  # type: ignore[attr-defined]
    return dag
