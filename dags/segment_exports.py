"""Segment exports: one Airflow DAG per export described in dags/exports/*.yaml.

The folder can be changed with the environment variable SEGMENT_EXPORT_SPECS. Parsing this file reads the YAML
specs only; segment data and the destinations are touched when a DAG runs. (Airflow's safe mode looks for the
words "airflow" and "dag" in a file before parsing it; this docstring has both.)
"""

from pathlib import Path

from segment_export.dag_factory import build_dags

globals().update(build_dags(Path(__file__).parent / "exports"))
