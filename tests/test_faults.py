"""Faults: a task killed mid-export (SIGKILL) and run again neither resends accepted work nor loses the rest.

The export runs as a real `airflow dags test` process against the sandbox; the check is what the sandbox holds.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import segment_data
from airflow_env import airflow_env, last_export_summary
from sandbox_state import klaviyo_profiles, mailchimp_members
from segment_export_sandbox import KLAVIYO_LIST_ID, MAILCHIMP_AUDIENCE_ID

pytestmark = pytest.mark.airflow
AIRFLOW = str(Path(sys.executable).parent / "airflow")
PROFILES = 40_000

SPECS = f"""
exports:
  - id: kill_klaviyo
    privacy_acknowledged: true
    source: {{conn_id: warehouse, table: segment_members}}
    destination: {{type: klaviyo, list_id: {KLAVIYO_LIST_ID}}}
    mapping: {{email: email, first_name: first_name}}
  - id: kill_mailchimp
    privacy_acknowledged: true
    source: {{conn_id: warehouse, table: segment_members}}
    destination: {{type: mailchimp, audience_id: {MAILCHIMP_AUDIENCE_ID}, new_member_status: subscribed}}
    mapping: {{email: email, first_name: first_name}}
"""


@pytest.fixture(scope="module")
def fault_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow-faults")
    subprocess.run([AIRFLOW, "db", "migrate"], env=airflow_env(home, "http://127.0.0.1:9", home / "x.db"),
                   check=True, capture_output=True, timeout=300)
    specs = home / "exports"
    specs.mkdir()
    (specs / "kill.yaml").write_text(SPECS)
    warehouse = segment_data.write_sqlite(home / "warehouse.db", PROFILES)
    return home, specs, warehouse


def start(fault_home, sandbox, dag_id) -> subprocess.Popen:
    home, specs, warehouse = fault_home
    env = airflow_env(home, sandbox.url, warehouse)
    env["SEGMENT_EXPORT_SPECS"] = str(specs)
    return subprocess.Popen([AIRFLOW, "dags", "test", dag_id], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(predicate, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)  # the worker is lost: no cleanup code runs
    proc.wait(timeout=30)


def unique_customers() -> set[str]:
    return {r[1] for r in segment_data.rows(PROFILES)}


def test_klaviyo_jobs_of_a_killed_task_are_awaited_not_resubmitted(fault_home, sandbox):
    sandbox.configure(klaviyo_profiles_per_second=4_000.0)  # each 10,000-profile job takes 2.5 s
    try:
        proc = start(fault_home, sandbox, "kill_klaviyo")
        jobs = lambda: next(iter(sandbox.state()["klaviyo"]["accounts"].values()))["jobs"]  # noqa: E731
        wait_for(lambda: len(jobs()) == PROFILES // 10_000)
        time.sleep(1.0)  # the exporter records job ids within a quarter second of their submission
        assert any(j["status"] != "complete" for j in jobs().values()), "killed too late to test anything"
        kill(proc)
        with sqlite3.connect(fault_home[2]) as conn:
            inflight = conn.execute("SELECT count(DISTINCT job_id) FROM segment_export_inflight_batches").fetchone()[0]
        assert inflight >= 1

        rerun = start(fault_home, sandbox, "kill_klaviyo")
        output, _ = rerun.communicate(timeout=300)
        assert rerun.returncode == 0, output[-3000:]
    finally:
        sandbox.configure(klaviyo_profiles_per_second=200_000.0)
    state = sandbox.state()
    all_jobs = next(iter(state["klaviyo"]["accounts"].values()))["jobs"].values()
    assert len(all_jobs) == PROFILES // 10_000  # nothing was submitted again
    imported = [pid for job in all_jobs for pid in job["profile_ids"]]
    assert len(imported) == len(set(imported)) == PROFILES  # every profile arrived exactly once
    assert set(klaviyo_profiles(state, KLAVIYO_LIST_ID)) == unique_customers()
    assert "resumed job" in output


def test_mailchimp_export_killed_midway_resends_only_what_was_not_confirmed(fault_home, sandbox):
    home, _, warehouse = fault_home
    sandbox.configure(latency={"mailchimp_batch": 0.4})
    try:
        proc = start(fault_home, sandbox, "kill_mailchimp")
        sent = lambda: sandbox.state()["requests"]["by_endpoint"].get("POST /3.0/lists/{list_id}", {}).get("count", 0)  # noqa: E731
        wait_for(lambda: sent() >= 30)
        kill(proc)
        time.sleep(1.5)  # requests already on the wire still land (the sandbox answers after its latency)
        members_at_kill = len(mailchimp_members(sandbox.state(), MAILCHIMP_AUDIENCE_ID))
        with sqlite3.connect(warehouse) as conn:
            (remembered,) = conn.execute(
                "SELECT count(*) FROM segment_export_state WHERE export_id = 'kill_mailchimp'"
            ).fetchone()
        assert 0 < remembered <= members_at_kill < PROFILES
        rerun = start(fault_home, sandbox, "kill_mailchimp")
        output, _ = rerun.communicate(timeout=300)
        assert rerun.returncode == 0, output[-3000:]
    finally:
        sandbox.configure(latency={"mailchimp_batch": 0.0})
    members = mailchimp_members(sandbox.state(), MAILCHIMP_AUDIENCE_ID)
    assert set(members) == unique_customers() and all(m["status"] == "subscribed" for m in members.values())
    summary = last_export_summary(home, "kill_mailchimp")
    assert summary["sent"] == PROFILES - remembered  # confirmed batches are not sent again
    # at-least-once: only members of batches in flight at the kill arrive a second time, as updates
    assert summary["updated"] == members_at_kill - remembered
    assert summary["created"] + summary["updated"] + remembered == PROFILES
