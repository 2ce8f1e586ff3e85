"""``segment-export``: check specs before they ship, and see what an export would do, from the command line.

- ``segment-export validate [PATH ...]`` (default ``dags/exports/``, or ``SEGMENT_EXPORT_SPECS``): every spec file
  under each path (a folder or a file) is validated by the code the DAG factory uses, including the checks that
  need Airflow's own classes (schedules, the DAG's validation, alert callbacks), and each error is printed with
  the message Airflow's import error would show (file, export, field). No metadata database and no network: the
  DAGs are built in memory, never bagged or stored. Exit status 1 on any error, 0 otherwise: for pre-commit and CI.
- ``segment-export plan EXPORT_ID [--path PATH]``: the dry-run plan of one export (what a real run would create,
  update, remove; masked example payloads). It reads the source and the sync state and may ask the destination
  whether the list or audience exists (read-only requests); it never writes to a destination. Connections come
  from Airflow as usual (``AIRFLOW_CONN_*`` variables, a secrets backend or the metadata database).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

DEFAULT_PATH = "dags/exports"


def _spec_files(paths: Sequence[str]) -> tuple[list[Path], list[str]]:
    files: list[Path] = []
    missing: list[str] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            missing.append(raw)
    return list(dict.fromkeys(files)), missing


def validate(paths: Sequence[str], out=sys.stdout) -> int:
    """Print every spec error of these paths, as Airflow's import error would word it; the number of errors."""
    from segment_export.dag_factory import SPEC_ERRORS_DAG_ID, checked_erasure_dag, checked_export_dag
    from segment_export.spec import SpecError, load_spec_paths

    files, missing = _spec_files(paths)
    errors: list[SpecError] = [SpecError(m, None, None, "no such file or folder") for m in missing]
    specs, erasures, load_errors = load_spec_paths(files)
    errors += load_errors
    valid = []
    for spec in specs:
        built = checked_export_dag(spec, spec.spec_file or ".")
        if isinstance(built, SpecError):
            errors.append(built)
        else:
            valid.append(spec)
    dags = len(valid)
    for erasure in erasures:
        built = checked_erasure_dag(erasure, valid, erasure.spec_file or ".")
        if isinstance(built, SpecError):
            errors.append(built)
        else:
            dags += 1
    for error in errors:
        print(f"error: {error}", file=out)
    summary = f"{len(files)} spec file(s), {len(valid)} valid export(s), {len(erasures)} erasure block(s)"
    if errors:
        print(f"{summary}: {len(errors)} error(s) (in Airflow: import errors of the DAG file, "
              f"DAG {SPEC_ERRORS_DAG_ID})", file=out)
    else:
        print(f"{summary}: ok, {dags} DAG(s)", file=out)
    return len(errors)


def plan(export_id: str, path: str, out=sys.stdout) -> int:
    """Print the dry-run plan of one export; 0 when it could be planned."""
    from segment_export.destinations import destination_for
    from segment_export.exporter import RunOptions, run_export
    from segment_export.sources import source_for
    from segment_export.spec import load_spec_paths
    from segment_export.state import StateStore

    files, _ = _spec_files([path])
    specs, _, errors = load_spec_paths(files)
    spec = next((s for s in specs if s.id == export_id), None)
    if spec is None:
        bad = [e for e in errors if e.export_id == export_id]
        for error in bad:
            print(f"error: {error}", file=out)
        if not bad:
            known = ", ".join(sorted(s.id for s in specs)) or "none"
            print(f"error: no export {export_id!r} under {path} (exports: {known})", file=out)
        return 1
    source = source_for(spec.source)
    destination = destination_for(spec)
    state = StateStore.open(spec.state_conn_id, spec.id, destination.target_id)
    try:
        summary = run_export(spec, source, destination, state=state, options=RunOptions(dry_run=True, run_id="cli-plan"))
    finally:
        source.close()
        state.close()
    print(summary.table(), file=out)
    for example in summary.examples:
        print(f"  example {example['action']}: {json.dumps(example['payload'], sort_keys=True)}", file=out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="segment-export", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("validate", help="validate export specs (no Airflow database, no network)")
    check.add_argument("paths", nargs="*", metavar="PATH", help=f"spec files or folders (default {DEFAULT_PATH}/)")
    dry = commands.add_parser("plan", help="print an export's dry-run plan (reads source and state; sends nothing)")
    dry.add_argument("export_id", metavar="EXPORT_ID")
    dry.add_argument("--path", default=None, help=f"spec file or folder (default {DEFAULT_PATH}/)")
    args = parser.parse_args(argv)
    default = os.environ.get("SEGMENT_EXPORT_SPECS") or DEFAULT_PATH
    if args.command == "validate":
        return 1 if validate(args.paths or [default]) else 0
    return plan(args.export_id, args.path or default)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
