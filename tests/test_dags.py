"""Real Airflow: the DAG file parsed by a DagBag, and export DAGs run with `airflow dags test` against the sandbox.

Each run is checked by what the sandbox holds afterwards and by the task's XCom summary in the metadata DB.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import segment_data
from airflow_env import ROOT, airflow_env, last_export_summary
from sandbox_state import klaviyo_profiles, mailchimp_members
from segment_export_sandbox import KLAVIYO_API_KEY, KLAVIYO_LIST_ID, MAILCHIMP_API_KEY, MAILCHIMP_AUDIENCE_ID

pytestmark = pytest.mark.airflow
AIRFLOW = str(Path(sys.executable).parent / "airflow")

SPECS = """
exports:
  - id: e2e_klaviyo
    privacy_acknowledged: true
    schedule: "@daily"
    source: {conn_id: warehouse, table: segment_members, segment_column: segment, segments: [vip]}
    destination: {type: klaviyo, list_id: %(list)s}
    mapping:
      email: email
      first_name: first_name
      phone_number: phone
      attributes: {tier: tier}
  - id: e2e_mailchimp
    privacy_acknowledged: true
    source: {conn_id: warehouse, query: "SELECT * FROM segment_members", segment_column: segment, segments: [newsletter]}
    destination: {type: mailchimp, audience_id: %(audience)s, new_member_status: pending}
    mapping: {email: email, first_name: first_name, last_name: last_name}
  - id: e2e_missing_column
    privacy_acknowledged: true
    source: {conn_id: warehouse, table: segment_members}
    destination: {type: klaviyo, list_id: %(list)s}
    mapping: {email: email_address}
""" % {"list": KLAVIYO_LIST_ID, "audience": MAILCHIMP_AUDIENCE_ID}


@pytest.fixture(scope="session")
def airflow_home(tmp_path_factory):
    """An Airflow home with a migrated SQLite metadata database, shared by this module's runs."""
    home = tmp_path_factory.mktemp("airflow-home")
    env = airflow_env(home, "http://127.0.0.1:9", home / "unused.db")
    subprocess.run([AIRFLOW, "db", "migrate"], env=env, check=True, capture_output=True, timeout=300)
    return home


@pytest.fixture
def specs_dir(tmp_path):
    folder = tmp_path / "exports"
    folder.mkdir()
    (folder / "e2e.yaml").write_text(SPECS)
    return folder


def dags_test(airflow_home: Path, sandbox, warehouse: Path, specs: Path, dag_id: str, conf: dict | None = None) -> subprocess.CompletedProcess:
    env = airflow_env(airflow_home, sandbox.url, warehouse)
    env["SEGMENT_EXPORT_SPECS"] = str(specs)
    extra = ["-c", json.dumps(conf)] if conf else []
    return subprocess.run(
        [AIRFLOW, "dags", "test", dag_id, *extra], env=env, capture_output=True, text=True, timeout=600
    )


def test_dagbag_loads_good_exports_and_reports_a_broken_spec_as_import_error(specs_dir, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    (specs_dir / "broken.yaml").write_text(textwrap.dedent("""
        exports:
          - id: broken_export
            privacy_acknowledged: true
            source: {conn_id: warehouse, table: t}
            destination: {type: klaviyo, lst_id: X}
            mapping: {email: email}
    """))
    monkeypatch.setenv("SEGMENT_EXPORT_SPECS", str(specs_dir))
    bag = DagBag(str(ROOT / "dags"))
    assert sorted(bag.dag_ids) == ["e2e_klaviyo", "e2e_mailchimp", "e2e_missing_column"]
    (error,) = bag.import_errors.values()
    assert "broken.yaml" in error and "export 'broken_export'" in error
    assert "field 'destination.lst_id': unknown key" in error
    dag = bag.dags["e2e_klaviyo"]
    assert dag.schedule == "@daily" or str(dag.timetable.summary) == "@daily"
    assert set(dag.tags) >= {"segment-export", "klaviyo"} and [t.task_id for t in dag.tasks] == ["export"]


def test_klaviyo_dag_end_to_end(airflow_home, sandbox, segment_db, specs_dir):
    result = dags_test(airflow_home, sandbox, segment_db, specs_dir, "e2e_klaviyo")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    vip = {r[1]: r for r in segment_data.rows(1000) if r[-1] == "vip"}
    held = klaviyo_profiles(sandbox.state(), KLAVIYO_LIST_ID)
    assert set(held) == set(vip)
    email, profile = next(iter(held.items()))
    assert profile["first_name"] == vip[email][2] and profile["properties"] == {"tier": vip[email][5]}
    summary = last_export_summary(airflow_home, "e2e_klaviyo")
    assert summary["accepted"] == summary["sent"] == len(held) and summary["rejected"] == 0
    output = result.stdout + result.stderr
    assert "batch 1: " in output and "export summary" in output
    assert KLAVIYO_API_KEY not in output  # the key is masked in every log line
    assert "@example.com" not in output  # no customer email in the task log


def test_mailchimp_dag_end_to_end(airflow_home, sandbox, segment_db, specs_dir):
    existing = next(r for r in segment_data.rows(1000) if r[-1] == "newsletter")
    sandbox.seed_mailchimp_member(MAILCHIMP_AUDIENCE_ID, existing[1], "unsubscribed")
    result = dags_test(airflow_home, sandbox, segment_db, specs_dir, "e2e_mailchimp")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    newsletter = {r[1]: r for r in segment_data.rows(1000) if r[-1] == "newsletter"}
    members = mailchimp_members(sandbox.state(), MAILCHIMP_AUDIENCE_ID)
    assert set(members) == set(newsletter)
    assert members[existing[1]]["status"] == "unsubscribed"
    assert {m["status"] for e, m in members.items() if e != existing[1]} == {"pending"}
    summary = last_export_summary(airflow_home, "e2e_mailchimp")
    assert (summary["created"], summary["updated"], summary["rejected"]) == (len(newsletter) - 1, 1, 0)
    output = result.stdout + result.stderr
    assert MAILCHIMP_API_KEY not in output and "@example.com" not in output


def test_missing_column_fails_the_task_before_sending(airflow_home, sandbox, segment_db, specs_dir):
    result = dags_test(airflow_home, sandbox, segment_db, specs_dir, "e2e_missing_column")
    output = result.stdout + result.stderr
    assert "mapping.email: no column 'email_address'" in output
    assert "customer_id, email, first_name" in output
    assert "POST /api/profile-bulk-import-jobs" not in sandbox.state()["requests"]["by_endpoint"]
    assert "failed" in output.lower()


def writes(sandbox) -> dict[str, int]:
    by_endpoint = sandbox.state()["requests"]["by_endpoint"]
    return {k: v["count"] for k, v in by_endpoint.items() if not k.startswith("GET ")}


def test_sync_through_dag_runs(airflow_home, sandbox, segment_db, specs_dir):
    """Dry run, first run, unchanged rerun, one changed row, one leaver, full resync: each a real DAG run."""
    def run_ok(conf=None):
        result = dags_test(airflow_home, sandbox, segment_db, specs_dir, "e2e_mailchimp", conf)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return last_export_summary(airflow_home, "e2e_mailchimp"), result.stdout + result.stderr

    newsletter = [r for r in segment_data.rows(1000) if r[-1] == "newsletter"]
    plan, _ = run_ok({"dry_run": True})
    assert plan["dry_run"] and plan["planned"] == len(newsletter) and writes(sandbox) == {}
    assert mailchimp_members(sandbox.state(), MAILCHIMP_AUDIENCE_ID) == {}

    first, _ = run_ok()
    assert first["created"] == len(newsletter) and first["tags_added"] == len(newsletter)
    members = mailchimp_members(sandbox.state(), MAILCHIMP_AUDIENCE_ID)
    assert set(members) == {r[1] for r in newsletter} and all(m["tags"] == ["newsletter"] for m in members.values())

    before = writes(sandbox)
    second, output = run_ok()
    assert (second["sent"], second["unchanged"]) == (0, len(newsletter)) and writes(sandbox) == before
    assert "nothing to send" in output

    changed, gone = newsletter[0][1], newsletter[1][1]
    with sqlite3.connect(segment_db) as conn:
        conn.execute("UPDATE segment_members SET first_name = 'Renamed' WHERE email = ?", (changed,))
        conn.execute("DELETE FROM segment_members WHERE email = ?", (gone,))
    third, _ = run_ok()
    assert (third["sent"], third["updated"], third["removed"]) == (1, 1, 1)
    members = mailchimp_members(sandbox.state(), MAILCHIMP_AUDIENCE_ID)
    assert members[changed]["merge_fields"]["FNAME"] == "Renamed" and members[gone]["tags"] == []

    resync, _ = run_ok({"full_resync": True})
    assert resync["sent"] == len(newsletter) - 1
