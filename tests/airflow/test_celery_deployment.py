"""A running Airflow with the CeleryExecutor (see conftest.py): exports triggered through the REST API v2 as a
user would, checked by the sandbox's end state, the task's XCom and log, asset events, lineage events and the
failure callback. Also the UI's connection metadata and the connection Test button, through the API."""

from __future__ import annotations

import json

import pytest
import segment_data
from sandbox_state import klaviyo_profiles, mailchimp_members
from budget_exports import BUDGET_AUDIENCES, BUDGET_LIMIT_SHARE, BUDGET_LISTS, BUDGET_PROFILES, BUDGET_SEGMENTS
from segment_export_sandbox import KLAVIYO_API_KEY, KLAVIYO_LIST_ID, KLAVIYO_SECOND_LIST_ID, MAILCHIMP_API_KEY, MAILCHIMP_AUDIENCE_ID

pytestmark = [pytest.mark.airflow, pytest.mark.postgres]

ROWS = list(segment_data.rows(1000))


def test_klaviyo_export_runs_on_a_celery_worker_and_reports_everywhere(airflow_deployment):
    dep = airflow_deployment
    run_id = dep.trigger("e2e_celery_klaviyo")
    run = dep.wait_for_run("e2e_celery_klaviyo", run_id)
    assert run["state"] == "success", dep.logs_tail()

    vip = {r[1]: r for r in ROWS if r[-1] == "vip"}
    held = klaviyo_profiles(dep.sandbox.state(), KLAVIYO_LIST_ID)
    assert set(held) == set(vip)
    email, profile = next(iter(held.items()))
    assert profile["first_name"] == vip[email][2] and profile["properties"] == {"tier": vip[email][5]}

    summary = dep.xcom("e2e_celery_klaviyo", run_id)
    assert summary["export_id"] == "e2e_celery_klaviyo" and summary["destination"] == "klaviyo"
    assert summary["read"] == summary["sent"] == summary["accepted"] == len(vip) and summary["rejected"] == 0

    ti = dep.api("GET", f"/dags/e2e_celery_klaviyo/dagRuns/{run_id}/taskInstances/export").json()
    assert ti["state"] == "success" and ti["queue"] == dep.env["AIRFLOW__OPERATORS__DEFAULT_QUEUE"] and ti["hostname"]
    worker_log = "".join((dep.home / f"{name}.log").read_text() for name in ("celery-worker", "celery-worker-2"))
    assert "Executing workload in Celery" in worker_log and "dag_id=e2e_celery_klaviyo" in worker_log

    log = dep.task_log("e2e_celery_klaviyo", run_id)
    assert "read plan:" in log and "batch 1: " in log and "profiles/s" in log and "export summary" in log
    assert KLAVIYO_API_KEY not in log and "@example.com" not in log

    # The destination asset got an event carrying counts; a DAG scheduled on it would run now.
    assets = dep.api("GET", "/assets", params={"uri_pattern": "klaviyo://"}).json()["assets"]
    (asset,) = [a for a in assets if a["uri"] == f"klaviyo://{KLAVIYO_LIST_ID}"]
    events = dep.api("GET", "/assets/events", params={"asset_id": asset["id"]}).json()["asset_events"]
    assert any(e["source_run_id"] == run_id and e["extra"].get("accepted") == len(vip) for e in events)
    inlets = dep.api("GET", "/assets", params={"uri_pattern": "sql://warehouse"}).json()["assets"]
    assert sorted(a["uri"] for a in inlets) == ["sql://warehouse/budget_members", "sql://warehouse/segment_members"]

    # OpenLineage: the COMPLETE event names the segment table and the list, in their own namespaces.
    events = [json.loads(line) for line in dep.lineage_file.read_text().splitlines() if line.strip()]
    (complete,) = [e for e in events if e["eventType"] == "COMPLETE" and e["run"]["runId"] and
                   e["job"]["name"] == "e2e_celery_klaviyo.export"]
    assert [(d["namespace"], d["name"]) for d in complete["inputs"]] == [("sql://warehouse", "segment_members")]
    host = dep.sandbox.url.split("://", 1)[1]
    (out,) = complete["outputs"]
    assert (out["namespace"], out["name"]) == (f"klaviyo://{host}", KLAVIYO_LIST_ID)
    assert out["outputFacets"]["outputStatistics"]["rowCount"] == len(vip)
    assert "@example.com" not in dep.lineage_file.read_text() and KLAVIYO_API_KEY not in dep.lineage_file.read_text()


def test_a_deferrable_export_frees_its_worker_while_the_triggerer_waits_for_the_jobs(airflow_deployment):
    """deferrable: true: the task submits its import jobs, defers to DestinationJobsTrigger (which polls them on
    the triggerer with the async hook), and resumes on a worker to record the outcomes."""
    dep = airflow_deployment
    dag_id = "e2e_celery_deferrable"
    run_id = dep.trigger(dag_id)
    run = dep.wait_for_run(dag_id, run_id)
    assert run["state"] == "success", dep.logs_tail()

    newsletter = {r[1] for r in ROWS if r[-1] == "newsletter"}
    assert set(klaviyo_profiles(dep.sandbox.state(), KLAVIYO_SECOND_LIST_ID)) == newsletter

    summary = dep.xcom(dag_id, run_id)
    assert summary["read"] == summary["sent"] == summary["accepted"] == len(newsletter)
    assert summary["sent"] == summary["accepted"] + summary["rejected"] + summary["skipped"]

    # The task logged its deferral, and execute_complete (which only a trigger event starts) its resumption.
    log = dep.task_log(dag_id, run_id)
    assert "deferring to the triggerer" in log and "resumed: " in log, log[-3000:]


def test_trigger_form_values_are_validated_then_used(airflow_deployment):
    dep = airflow_deployment
    dag_id = "e2e_celery_mailchimp"
    dep.wait_for_dag(dag_id)
    details = dep.api("GET", f"/dags/{dag_id}/details").json()
    assert details["params"]["max_profiles"]["schema"]["maximum"] == 1_000_000
    assert details["owners"] == ["e2e-team"] and {t["name"] for t in details["tags"]} >= {"segment-export", "mailchimp"}
    assert f"| Destination | Mailchimp audience `{MAILCHIMP_AUDIENCE_ID}`" in details["doc_md"]

    dep.api("PATCH", f"/dags/{dag_id}", json={"is_paused": False})
    for bad in ({"max_profiles": 0}, {"max_profiles": 1_000_001}, {"dry_run": "yes"}):
        r = dep.api("POST", f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": bad})
        assert r.status_code == 400, (bad, r.status_code, r.text)

    dry = dep.trigger(dag_id, {"dry_run": True})
    assert dep.wait_for_run(dag_id, dry)["state"] == "success"
    assert dep.xcom(dag_id, dry)["dry_run"] is True
    assert mailchimp_members(dep.sandbox.state(), MAILCHIMP_AUDIENCE_ID) == {}

    capped = dep.trigger(dag_id, {"max_profiles": 100})
    assert dep.wait_for_run(dag_id, capped)["state"] == "success", dep.logs_tail()
    summary = dep.xcom(dag_id, capped)
    members = mailchimp_members(dep.sandbox.state(), MAILCHIMP_AUDIENCE_ID)
    newsletter = {r[1] for r in ROWS if r[-1] == "newsletter"}
    assert len(members) == summary["accepted"] == 100 and set(members) <= newsletter
    assert {m["status"] for m in members.values()} == {"pending"}
    assert MAILCHIMP_API_KEY not in dep.task_log(dag_id, capped)


def test_a_failing_export_fails_its_run_and_calls_the_spec_callback(airflow_deployment):
    dep = airflow_deployment
    run_id = dep.trigger("e2e_celery_failing")
    assert dep.wait_for_run("e2e_celery_failing", run_id)["state"] == "failed"
    log = dep.task_log("e2e_celery_failing", run_id)
    assert "mapping.email: no column 'no_such_column'" in log
    (alert,) = [json.loads(line) for line in dep.alerts_file.read_text().splitlines()]
    assert (alert["dag_id"], alert["task_id"], alert["run_id"]) == ("e2e_celery_failing", "export", run_id)
    assert "no_such_column" in alert["exception"]


def test_connection_form_metadata_and_test_button(airflow_deployment):
    dep = airflow_deployment
    r = requests_get_ui(dep, "/ui/connections/hook_meta")
    meta = {m["connection_type"]: m for m in r}
    klaviyo = meta["klaviyo"]
    assert klaviyo["hook_name"] == "Klaviyo"
    assert klaviyo["standard_fields"]["password"]["title"] == "Private API key"
    assert klaviyo["standard_fields"]["login"]["hidden"] is True
    assert klaviyo["extra_fields"]["timeout"]["schema"]["title"] == "Request timeout (seconds)"
    assert meta["mailchimp"]["standard_fields"]["password"]["title"] == "API key"

    good = {"connection_id": "klaviyo_try", "conn_type": "klaviyo", "host": dep.sandbox.url, "password": KLAVIYO_API_KEY}
    r = dep.api("POST", "/connections/test", json=good)
    assert r.status_code == 200 and r.json()["status"] is True, r.text
    r = dep.api("POST", "/connections/test", json={**good, "password": "pk_wrong_key_0000000000000000"})
    assert r.json()["status"] is False and "401" in r.json()["message"], r.text
    assert KLAVIYO_API_KEY not in r.text
    mc = {"connection_id": "mc_try", "conn_type": "mailchimp", "host": f"{dep.sandbox.url}/3.0", "password": MAILCHIMP_API_KEY}
    r = dep.api("POST", "/connections/test", json=mc)
    assert r.json()["status"] is True, r.text


def requests_get_ui(dep, path: str):
    import requests

    r = requests.get(f"{dep.url}{path}", headers={"Authorization": f"Bearer {dep.token()}"}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


# --- one rate budget per API key, shared by every export on every worker (hooks/budget.py) -------------------
BUDGET_ROWS = list(segment_data.rows(BUDGET_PROFILES))


def _run_four_at_once(dep, destination: str) -> dict[str, tuple[str, dict]]:
    """Trigger the four exports on one key together; (run id, summary) by segment once all have finished."""
    dags = {segment: f"e2e_budget_{destination}_{segment}" for segment in BUDGET_SEGMENTS}
    for dag_id in dags.values():
        dep.wait_for_dag(dag_id)
        assert dep.api("PATCH", f"/dags/{dag_id}", json={"is_paused": False}).status_code == 200
    dep.sandbox.reset_requests()  # the request log from here on is these four runs'
    runs = {segment: dep.trigger(dag_id) for segment, dag_id in dags.items()}
    for segment, run_id in runs.items():
        assert dep.wait_for_run(dags[segment], run_id)["state"] == "success", dep.logs_tail()
    return {segment: (run_id, dep.xcom(dags[segment], run_id)) for segment, run_id in runs.items()}


def _account(state: dict, api: str) -> dict:
    (account,) = [v for k, v in state["requests"]["by_account"].items() if k.startswith(f"{api} ")]
    return account


def _ran_on_both_workers(dep, destination: str) -> bool:
    """Whether each Celery worker ran one of the four (two slots each: four at once need both)."""
    logs = [(dep.home / f"{name}.log").read_text() for name in ("celery-worker", "celery-worker-2")]
    return all(f"dag_id=e2e_budget_{destination}_" in log for log in logs)


def test_four_klaviyo_exports_on_one_key_share_its_rate_limit(airflow_deployment):
    """Four exports on one Klaviyo key, on two workers, at once: each learns its profiles' ids (one GET
    /api/profiles per 100 profiles). The key's limits are the documented ones times BUDGET_LIMIT_SHARE, in the
    sandbox and in the connection's ``rate_limit_share`` (profile reads: 30/s burst, 300/min steady), so that they
    bind within seconds: each export alone may read at 30/s, four together would go over. Through the shared
    budget none is refused for going over the key's limit, all finish, and together they read at >= 80 % of the
    steady limit."""
    dep = airflow_deployment
    dep.sandbox.configure(rate_limit_scale=BUDGET_LIMIT_SHARE)
    try:
        results = _run_four_at_once(dep, "klaviyo")
    finally:
        dep.sandbox.configure(rate_limit_scale=1.0)

    state = dep.sandbox.state()
    for segment, (run_id, summary) in results.items():
        expected = {r[1] for r in BUDGET_ROWS if r[-1] == segment}
        assert set(klaviyo_profiles(state, BUDGET_LISTS[segment])) == expected
        assert summary["accepted"] == summary["sent"] == len(expected) and summary["rejected"] == 0
    assert _ran_on_both_workers(dep, "klaviyo")
    account = _account(state, "klaviyo")
    lookups = account["admitted"]["GET /api/profiles"]
    steady = int(750 * BUDGET_LIMIT_SHARE) / 60  # per second
    rate = (lookups["count"] - 1) / (lookups["last"] - lookups["first"])
    print(f"four Klaviyo exports: {lookups['count']} profile lookups in {lookups['last'] - lookups['first']:.1f}s, "
          f"{rate:.1f}/s (steady limit {steady:.1f}/s), refused: {account['refused']}")
    assert account["refused"] == {}, account["refused"]
    assert lookups["count"] >= 4 * 40
    assert rate >= 0.8 * steady, rate
    for segment, (run_id, _) in results.items():
        log = dep.task_log(f"e2e_budget_klaviyo_{segment}", run_id)
        assert "shared rate budget of its API key" in log and KLAVIYO_API_KEY not in log


def test_four_mailchimp_exports_on_one_key_share_its_ten_connections(airflow_deployment):
    """Four exports on one Mailchimp key, on two workers, at once, each able to open 10 connections: through the
    shared semaphore the key never has more than Mailchimp's 10 in flight, none is refused, all finish."""
    dep = airflow_deployment
    dep.sandbox.configure(latency={"mailchimp_batch": 1.0, "mailchimp_write": 0.2})
    try:
        results = _run_four_at_once(dep, "mailchimp")
    finally:
        dep.sandbox.configure(latency={"mailchimp_batch": 0.0, "mailchimp_write": 0.0})

    state = dep.sandbox.state()
    for segment, (run_id, summary) in results.items():
        expected = {r[1] for r in BUDGET_ROWS if r[-1] == segment}
        assert set(mailchimp_members(state, BUDGET_AUDIENCES[segment])) == expected
        assert summary["accepted"] == summary["created"] == len(expected)
        assert MAILCHIMP_API_KEY not in dep.task_log(f"e2e_budget_mailchimp_{segment}", run_id)
    assert _ran_on_both_workers(dep, "mailchimp")
    account = _account(state, "mailchimp")
    assert account["refused"] == {}, account["refused"]
    assert account["max_in_flight"] == 10  # the cap, reached and never passed
    busy = account["busy_seconds"] / (10 * (account["last"] - account["first"]))
    print(f"four Mailchimp exports: 10 connections busy {busy:.0%} of {account['last'] - account['first']:.1f}s")
