"""Segment exports: one DAG per export described in dags/exports/*.yaml (or the folder in SEGMENT_EXPORT_SPECS).

Parsing this file reads the YAML specs only; segment data and the destinations are touched at run time.
"""

from pathlib import Path

from segment_export.dag_factory import build_dags

globals().update(build_dags(Path(__file__).parent / "exports"))
