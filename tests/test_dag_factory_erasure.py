"""Real Airflow: a spec file's erasure block becomes its own DAG; through real DAG runs (`airflow dags test`), an
erasure request removes the person from every list and audience, each destination gives a receipt, and the next
export runs skip them. Checked by what the sandbox holds, the receipts table and the runs' XCom summaries."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
from datetime import datetime, timezone
from pathlib import Path

import pytest
import segment_data
from airflow_env import ROOT, airflow_env, last_export_summary
from sandbox_state import klaviyo_profiles, mailchimp_members
from segment_export_sandbox import KLAVIYO_LIST_ID, MAILCHIMP_AUDIENCE_ID

pytestmark = pytest.mark.airflow
AIRFLOW = str(Path(sys.executable).parent / "airflow")

SPECS = f"""
exports:
  - id: e2e_vip_klaviyo
    privacy_acknowledged: true
    source: {{conn_id: warehouse, table: segment_members, segment_column: segment, segments: [vip]}}
    destination: {{type: klaviyo, list_id: {KLAVIYO_LIST_ID}}}
    mapping: {{email: email, first_name: first_name}}
  - id: e2e_all_mailchimp
    privacy_acknowledged: true
    source: {{conn_id: warehouse, table: segment_members, segment_column: segment, segments: [newsletter, vip]}}
    destination: {{type: mailchimp, audience_id: {MAILCHIMP_AUDIENCE_ID}, new_member_status: subscribed}}
    mapping: {{email: email, first_name: first_name}}
erasure:
  id: e2e_erasures
  schedule: "@hourly"
  source: {{conn_id: warehouse, table: erasure_requests}}
  mapping: {{email: email, request_id: request_id, requested_at: requested_at}}
"""


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory):
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


def dags_test(home: Path, sandbox, warehouse: Path, specs: Path, dag_id: str) -> subprocess.CompletedProcess:
    env = airflow_env(home, sandbox.url, warehouse)
    env["SEGMENT_EXPORT_SPECS"] = str(specs)
    result = subprocess.run([AIRFLOW, "dags", "test", dag_id], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_the_erasure_dag_loads_beside_the_exports(specs_dir, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("SEGMENT_EXPORT_SPECS", str(specs_dir))
    bag = DagBag(str(ROOT / "dags"))
    assert bag.import_errors == {}
    assert sorted(bag.dag_ids) == ["e2e_all_mailchimp", "e2e_erasures", "e2e_vip_klaviyo"]
    dag = bag.dags["e2e_erasures"]
    assert [t.task_id for t in dag.tasks] == ["erase"] and set(dag.tags) == {"segment-export", "erasure"}
    assert "`e2e_vip_klaviyo`" in dag.doc_md and "Klaviyo connection `klaviyo_default`" in dag.doc_md


def test_the_erasure_dag_refuses_a_destination_without_an_erasure_capability(tmp_path):
    from dataclasses import replace

    from segment_export import dag_factory
    from segment_export.destinations import registry

    klaviyo = registry.destination_type("klaviyo")
    registry.register(replace(klaviyo, eraser=None), replace=True)
    try:
        (tmp_path / "a.yaml").write_text(SPECS)
        dags = dag_factory.build_dags(tmp_path)
    finally:
        registry.register(klaviyo, replace=True)
    assert "e2e_erasures" not in dags
    with pytest.raises(ValueError, match=r"field 'erasure': erasure requests cannot reach the destination of export\(s\) 'e2e_vip_klaviyo' \(Klaviyo\)"):
        dags[dag_factory.SPEC_ERRORS_DAG_ID].validate()


def test_an_erasure_through_dag_runs_removes_the_person_everywhere_and_the_next_exports_skip_them(
        airflow_home, sandbox, segment_db, specs_dir):
    for dag_id in ("e2e_vip_klaviyo", "e2e_all_mailchimp"):
        dags_test(airflow_home, sandbox, segment_db, specs_dir, dag_id)
    email = next(r for r in segment_data.rows(1000) if r[-1] == "vip")[1]
    state = sandbox.state()
    assert email in klaviyo_profiles(state, KLAVIYO_LIST_ID) and email in mailchimp_members(state, MAILCHIMP_AUDIENCE_ID)
    vip_before = set(klaviyo_profiles(state, KLAVIYO_LIST_ID))
    members_before = set(mailchimp_members(state, MAILCHIMP_AUDIENCE_ID))

    with sqlite3.connect(segment_db) as conn:
        conn.execute("CREATE TABLE erasure_requests (request_id TEXT, email TEXT, requested_at TEXT)")
        conn.execute("INSERT INTO erasure_requests VALUES ('gdpr-42', ?, '2026-12-02T10:00:00Z')", (email,))
    result = dags_test(airflow_home, sandbox, segment_db, specs_dir, "e2e_erasures")
    assert email not in result.stdout + result.stderr  # the log names the request, never the address
    summary = last_export_summary(airflow_home, "e2e_erasures", task_id="erase")
    assert (summary["requests"], summary["sent"], summary["answered"], summary["failed"]) == (1, 2, 2, 0)

    state = sandbox.state()
    assert set(klaviyo_profiles(state, KLAVIYO_LIST_ID)) == vip_before - {email}
    assert email not in klaviyo_profiles(state)  # deleted from the account, not only the list
    assert set(mailchimp_members(state, MAILCHIMP_AUDIENCE_ID)) == members_before - {email}
    with sqlite3.connect(segment_db) as conn:
        receipts = conn.execute("SELECT request_id, destination, target_id, answered_at IS NOT NULL, answer "
                                "FROM segment_export_erasures ORDER BY destination").fetchall()
    assert [(r[0], r[1], r[2], r[3]) for r in receipts] == [
        ("gdpr-42", "klaviyo", "account", 1), ("gdpr-42", "mailchimp", MAILCHIMP_AUDIENCE_ID, 1)]
    assert receipts[0][4].startswith("202") and receipts[1][4].startswith("204")

    today = datetime.now(timezone.utc).date().isoformat()
    for dag_id in ("e2e_vip_klaviyo", "e2e_all_mailchimp"):
        dags_test(airflow_home, sandbox, segment_db, specs_dir, dag_id)
        summary = last_export_summary(airflow_home, dag_id)
        assert (summary["sent"], summary["skipped"], summary["accepted"]) == (1, 1, 0), summary
        assert summary["skipped_reasons"] == {f"erased on {today}": 1}
    state = sandbox.state()
    assert set(klaviyo_profiles(state, KLAVIYO_LIST_ID)) == vip_before - {email}  # not re-created
    assert email not in klaviyo_profiles(state)
    assert set(mailchimp_members(state, MAILCHIMP_AUDIENCE_ID)) == members_before - {email}

    dags_test(airflow_home, sandbox, segment_db, specs_dir, "e2e_erasures")  # the same request: never sent again
    again = last_export_summary(airflow_home, "e2e_erasures", task_id="erase")
    assert (again["sent"], again["already_answered"]) == (0, 2)
    calls = {k: v["count"] for k, v in sandbox.state()["requests"]["by_endpoint"].items() if "delet" in k}
    assert calls == {"POST /api/data-privacy-deletion-jobs": 1,
                     "POST /3.0/lists/{list_id}/members/{subscriber_hash}/actions/delete-permanent": 1}
