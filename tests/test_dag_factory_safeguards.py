"""Issue 16 through real DAG runs (`airflow dags test`): a misspelt segment column fails naming it and leaves
the destination untouched (SQLite and PostgreSQL), an empty segment against a full state stops before any
removal, and a CSV export filtered by segment succeeds. Checked by what the sandbox holds afterwards."""

from __future__ import annotations

import os
import sqlite3

import pytest
import segment_data
from airflow_env import last_export_summary
from sandbox_state import mailchimp_members
from segment_export_sandbox import MAILCHIMP_AUDIENCE_ID
from test_dag_factory import airflow_home, dags_test  # noqa: F401 - the module's Airflow home fixture

pytestmark = pytest.mark.airflow


def export_yaml(export_id: str, source: str) -> str:
    return f"""
exports:
  - id: {export_id}
    privacy_acknowledged: true
    source: {source}
    destination: {{type: mailchimp, audience_id: {MAILCHIMP_AUDIENCE_ID}, new_member_status: subscribed}}
    mapping: {{email: email, first_name: first_name}}
"""


@pytest.fixture
def specs(tmp_path):
    folder = tmp_path / "exports"
    folder.mkdir()

    def write(export_id: str, source: str):
        (folder / "export.yaml").write_text(export_yaml(export_id, source))
        return folder

    return write


def held(sandbox) -> dict[str, tuple[str, tuple[str, ...], str]]:
    return {e: (m["status"], tuple(sorted(m["tags"])), m["merge_fields"].get("FNAME"))
            for e, m in mailchimp_members(sandbox.state(), MAILCHIMP_AUDIENCE_ID).items()}


def non_get_requests(sandbox) -> dict[str, int]:
    return {k: v["count"] for k, v in sandbox.state()["requests"]["by_endpoint"].items() if not k.startswith("GET ")}


def vip(n=1000):
    return {r[1] for r in segment_data.rows(n) if r[-1] == "vip"}


def check_typo_run(airflow_home, sandbox, warehouse, specs, export_id, table_source):  # noqa: F811
    good = specs(export_id, "{" + table_source + ", segment_column: segment, segments: [vip]}")
    first = dags_test(airflow_home, sandbox, warehouse, good, export_id)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    before, requests = held(sandbox), non_get_requests(sandbox)
    assert set(before) == vip(300 if "pg_" in export_id else 1000)
    typo = specs(export_id, "{" + table_source + ", segment_column: segmnt, segments: [vip]}")
    result = dags_test(airflow_home, sandbox, warehouse, typo, export_id)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "source.segment_column: no column 'segmnt' (did you mean 'segment'?)" in output, output[-3000:]
    assert "The source has: customer_id, email, first_name" in output
    assert held(sandbox) == before and non_get_requests(sandbox) == requests  # every member keeps its tag


def test_a_misspelt_segment_column_fails_the_dag_run_on_sqlite(airflow_home, sandbox, segment_db, specs):  # noqa: F811
    check_typo_run(airflow_home, sandbox, segment_db, specs, "e2e_typo_sqlite", "conn_id: warehouse, table: segment_members")


@pytest.mark.postgres
def test_a_misspelt_segment_column_fails_the_dag_run_on_postgres(airflow_home, sandbox, segment_db, specs, pg_schema):  # noqa: F811
    conn, schema = pg_schema
    conn.execute(f'CREATE TABLE "{schema}".segment_members (customer_id int, email text, first_name text, segment text)')
    with conn.cursor() as cur:
        cur.executemany(f'INSERT INTO "{schema}".segment_members VALUES (%s, %s, %s, %s)',
                        [(r[0], r[1], r[2], r[-1]) for r in segment_data.rows(300)])
    export_id = f"e2e_pg_typo_{os.getpid()}"  # the state tables are in the database's public schema
    try:
        check_typo_run(airflow_home, sandbox, segment_db, specs, export_id,
                       f"conn_id: pg_warehouse, table: {schema}.segment_members")
    finally:
        for table in ("segment_export_state", "segment_export_outcomes"):
            conn.execute(f"DELETE FROM {table} WHERE export_id = %s", (export_id,))


def test_an_empty_segment_stops_the_dag_run_before_any_removal(airflow_home, sandbox, segment_db, specs):  # noqa: F811
    folder = specs("e2e_empty_guard", "{conn_id: warehouse, table: segment_members, segment_column: segment, segments: [vip]}")
    first = dags_test(airflow_home, sandbox, segment_db, folder, "e2e_empty_guard")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    before, requests = held(sandbox), non_get_requests(sandbox)
    with sqlite3.connect(segment_db) as conn:
        conn.execute("UPDATE segment_members SET segment = 'vip_2025' WHERE segment = 'vip'")  # renamed upstream
    result = dags_test(airflow_home, sandbox, segment_db, folder, "e2e_empty_guard")
    output = result.stdout + result.stderr
    n = len(vip())
    assert result.returncode != 0
    assert f"{n} of the {n} profiles the export remembers" in output and "segment came back empty" in output, output[-3000:]
    assert "then stopped before any removal" in output and "allow_mass_leave" in output
    assert held(sandbox) == before and non_get_requests(sandbox) == requests
    assert all(tags == ("vip",) for _, tags, _ in held(sandbox).values())


def test_a_csv_export_filtered_by_segment_succeeds_as_a_dag_run(airflow_home, sandbox, segment_db, specs, tmp_path):  # noqa: F811
    path = segment_data.write_csv(tmp_path / "members.csv", 1000)
    folder = specs("e2e_csv_segment", f"{{path: {path}, segment_column: segment, segments: [vip]}}")
    result = dags_test(airflow_home, sandbox, segment_db, folder, "e2e_csv_segment")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    members = held(sandbox)
    assert set(members) == vip() and all(tags == ("vip",) for _, tags, _ in members.values())
    summary = last_export_summary(airflow_home, "e2e_csv_segment")
    assert summary["accepted"] == summary["sent"] == len(vip()) and summary["tags_added"] == len(vip())
