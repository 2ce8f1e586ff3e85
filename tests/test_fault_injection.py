"""Fault injection: 429 storms, 5xx bursts, answers past the timeout, dropped connections.

Each test drives the sandbox into a fault, runs a real export, and checks from the sandbox's stored state that
every accepted row arrived, exactly once where the fault left the request unapplied, and that the summary says
exactly what the destination holds.
"""

from __future__ import annotations

import pytest
import segment_data
from sandbox_state import klaviyo_profiles, mailchimp_members
from segment_export_sandbox import KLAVIYO_API_KEY, KLAVIYO_LIST_ID, MAILCHIMP_API_KEY, MAILCHIMP_AUDIENCE_ID

from segment_export.destinations import destination_for
from segment_export.exporter import ExportError, run_export
from segment_export.hooks.base import DestinationError
from segment_export.sources import source_for
from segment_export.spec import ExportSpec

PROFILES = 3000


@pytest.fixture
def warehouse(tmp_path, airflow_conn):
    path = segment_data.write_sqlite(tmp_path / "w.db", PROFILES)
    airflow_conn("warehouse", conn_type="sqlite", host=str(path))
    return path


def spec(destination: dict) -> ExportSpec:
    return ExportSpec.model_validate({
        "id": "faults", "privacy_acknowledged": True,
        "source": {"conn_id": "warehouse", "table": "segment_members"},
        "destination": destination, "mapping": {"email": "email", "first_name": "first_name"},
    })


def export(s: ExportSpec, *, small_batches: int | None = None, max_retries: int | None = None,
           retry_base_seconds: float | None = None):
    source = source_for(s.source)
    destination = destination_for(s)
    if small_batches:
        destination.max_batch_profiles = small_batches
    if max_retries is not None:
        destination.hook.max_retries = max_retries
    if retry_base_seconds is not None:
        destination.hook.retry_base_seconds = retry_base_seconds
    try:
        return run_export(s, source, destination), destination
    finally:
        source.close()


KLAVIYO = {"type": "klaviyo", "list_id": KLAVIYO_LIST_ID}
MAILCHIMP = {"type": "mailchimp", "audience_id": MAILCHIMP_AUDIENCE_ID, "new_member_status": "subscribed"}
CUSTOMERS = {r[1] for r in segment_data.rows(PROFILES)}


def klaviyo_jobs(sandbox):
    return list(next(iter(sandbox.state()["klaviyo"]["accounts"].values()))["jobs"].values())


def statuses(sandbox, endpoint):
    return sandbox.state()["requests"]["by_endpoint"][endpoint]["status"]


def test_klaviyo_429_storm_is_waited_out_and_every_profile_arrives_once(warehouse, sandbox):
    sandbox.set_faults([{"endpoint": "POST /api/profile-bulk-import-jobs", "kind": "429", "times": 4, "seconds": 1}])
    summary, destination = export(spec(KLAVIYO), small_batches=1000)
    imported = [pid for job in klaviyo_jobs(sandbox) for pid in job["profile_ids"]]
    assert len(imported) == len(set(imported)) == PROFILES  # exactly once
    assert set(klaviyo_profiles(sandbox.state(), KLAVIYO_LIST_ID)) == CUSTOMERS
    assert summary.accepted == PROFILES and summary.consistent
    assert statuses(sandbox, "POST /api/profile-bulk-import-jobs") == {"429": 4, "202": 3}
    assert destination.hook.retries >= 4


def test_mailchimp_5xx_burst_is_retried_and_every_member_is_created_once(warehouse, sandbox):
    sandbox.set_faults([{"endpoint": "POST /3.0/lists/{list_id}", "kind": "503", "times": 5}])
    summary, _ = export(spec(MAILCHIMP))
    assert set(mailchimp_members(sandbox.state(), MAILCHIMP_AUDIENCE_ID)) == CUSTOMERS
    assert (summary.created, summary.updated, summary.accepted) == (PROFILES, 0, PROFILES)
    assert statuses(sandbox, "POST /3.0/lists/{list_id}") == {"503": 5, "200": PROFILES // 500}


def test_dropped_connections_before_the_request_is_applied(warehouse, sandbox):
    sandbox.set_faults([
        {"endpoint": "POST /api/profile-bulk-import-jobs", "kind": "drop", "times": 2},
        {"endpoint": "GET /api/profile-bulk-import-jobs/{job_id}", "kind": "drop", "times": 2},
    ])
    summary, _ = export(spec(KLAVIYO), small_batches=1000)
    imported = [pid for job in klaviyo_jobs(sandbox) for pid in job["profile_ids"]]
    assert len(imported) == len(set(imported)) == PROFILES and summary.accepted == PROFILES


def test_an_answer_lost_after_klaviyo_applied_the_job_is_at_least_once_and_counted_once(warehouse, sandbox):
    sandbox.set_faults([{"endpoint": "POST /api/profile-bulk-import-jobs", "kind": "drop", "phase": "after", "times": 1}])
    summary, _ = export(spec(KLAVIYO), small_batches=1000)
    jobs = klaviyo_jobs(sandbox)
    assert len(jobs) == 4  # the lost answer's job, and the retry's
    assert set(klaviyo_profiles(sandbox.state(), KLAVIYO_LIST_ID)) == CUSTOMERS  # held once: profiles upsert
    assert summary.accepted == PROFILES and summary.sent == PROFILES  # the summary counts what it saw confirmed


def test_answers_past_the_timeout_are_retried(warehouse, sandbox, airflow_conn):
    airflow_conn("mailchimp_default", conn_type="mailchimp", host=sandbox.mailchimp_host, password=MAILCHIMP_API_KEY,
                 extra={"timeout": 0.5})
    sandbox.set_faults([{"endpoint": "POST /3.0/lists/{list_id}", "kind": "slow", "seconds": 1.0, "times": 2}])
    summary, destination = export(spec(MAILCHIMP))
    members = mailchimp_members(sandbox.state(), MAILCHIMP_AUDIENCE_ID)
    assert set(members) == CUSTOMERS and all(m["status"] == "subscribed" for m in members.values())
    # a slow call was still applied: its retry found those members and updated them, never twice created
    assert summary.accepted == PROFILES and summary.created + summary.updated == PROFILES
    assert destination.hook.retries >= 2 and summary.consistent


def test_retries_are_bounded_and_a_failure_reports_no_success_for_unconfirmed_rows(warehouse, sandbox):
    sandbox.set_faults([{"endpoint": "POST /3.0/lists/{list_id}", "kind": "500", "times": 1000}])
    with pytest.raises(ExportError, match="HTTP 500") as info:
        export(spec(MAILCHIMP), max_retries=2)
    assert info.value.summary.accepted == 0 == len(mailchimp_members(sandbox.state(), MAILCHIMP_AUDIENCE_ID))


@pytest.mark.parametrize("status", ["401", "404"])
def test_errors_that_cannot_succeed_fail_at_once(warehouse, sandbox, airflow_conn, status):
    if status == "401":
        airflow_conn("klaviyo_default", conn_type="klaviyo", host=sandbox.klaviyo_host, password="pk_revoked")
        with pytest.raises(DestinationError, match="HTTP 401") as info:
            export(spec(KLAVIYO))
        assert KLAVIYO_API_KEY not in str(info.value) and "pk_revoked" not in str(info.value)
    else:
        with pytest.raises(DestinationError, match="HTTP 404"):
            export(spec({"type": "klaviyo", "list_id": "Gone01"}))
    assert "POST /api/profile-bulk-import-jobs" not in sandbox.state()["requests"]["by_endpoint"]


@pytest.mark.parametrize("destination, endpoint", [
    (KLAVIYO, "POST /api/profile-bulk-import-jobs"), (MAILCHIMP, "POST /3.0/lists/{list_id}"),
])
def test_an_unexpected_answer_fails_clearly_and_nothing_is_reported_as_sent(warehouse, sandbox, destination, endpoint):
    sandbox.set_faults([{"endpoint": endpoint, "kind": "garbage", "times": 1000}])
    with pytest.raises(ExportError, match="not JSON|unexpected answer") as info:
        export(spec(destination), max_retries=2, retry_base_seconds=0.01)
    assert info.value.summary.accepted == 0 and info.value.summary.sent == 0
    pages = statuses(sandbox, endpoint)
    assert set(pages) == {"200"} and pages["200"] >= 3 and pages["200"] % 3 == 0  # each call: 1 + 2 retries, as 5xx


@pytest.mark.parametrize("destination, endpoint", [
    (KLAVIYO, "POST /api/profile-bulk-import-jobs"), (MAILCHIMP, "POST /3.0/lists/{list_id}"),
])
def test_a_proxy_page_instead_of_the_answer_is_retried_and_every_profile_arrives_once(
        warehouse, sandbox, destination, endpoint):
    sandbox.set_faults([{"endpoint": endpoint, "kind": "garbage", "times": 3}])
    summary, used = export(spec(destination), small_batches=1000 if destination is KLAVIYO else None,
                           retry_base_seconds=0.01)
    assert summary.accepted == PROFILES and summary.consistent and used.hook.retries >= 3
    if destination is KLAVIYO:
        imported = [pid for job in klaviyo_jobs(sandbox) for pid in job["profile_ids"]]
        assert len(imported) == len(set(imported)) == PROFILES  # the pages were not applied: once each
        assert set(klaviyo_profiles(sandbox.state(), KLAVIYO_LIST_ID)) == CUSTOMERS
    else:
        assert set(mailchimp_members(sandbox.state(), MAILCHIMP_AUDIENCE_ID)) == CUSTOMERS
        assert (summary.created, summary.updated) == (PROFILES, 0)


def test_a_proxy_page_after_klaviyo_applied_the_job_costs_a_second_job_not_a_second_profile(warehouse, sandbox):
    """The one non-idempotent POST whose retry repeats work: a bulk import job. Profiles upsert by identity, so
    the retried job imports the same profiles into the same list again; the list holds them once."""
    sandbox.set_faults([{"endpoint": "POST /api/profile-bulk-import-jobs", "kind": "garbage", "phase": "after", "times": 1}])
    summary, _ = export(spec(KLAVIYO), small_batches=1000, retry_base_seconds=0.01)
    assert len(klaviyo_jobs(sandbox)) == 4
    assert set(klaviyo_profiles(sandbox.state(), KLAVIYO_LIST_ID)) == CUSTOMERS
    assert summary.accepted == PROFILES == summary.sent and summary.consistent


def test_a_proxy_page_after_mailchimp_created_the_members_turns_the_retry_into_updates(warehouse, sandbox):
    """Batch subscribe creates members; retried after its answer was lost, the members exist, so the retry's
    answer lists them as already members and the destination updates them, status untouched, never twice."""
    sandbox.seed_mailchimp_member(MAILCHIMP_AUDIENCE_ID, sorted(CUSTOMERS)[0], "unsubscribed")
    sandbox.set_faults([{"endpoint": "POST /3.0/lists/{list_id}", "kind": "garbage", "phase": "after", "times": 1}])
    summary, _ = export(spec(MAILCHIMP), retry_base_seconds=0.01)
    members = mailchimp_members(sandbox.state(), MAILCHIMP_AUDIENCE_ID)
    assert set(members) == CUSTOMERS and summary.accepted == PROFILES and summary.consistent
    assert members[sorted(CUSTOMERS)[0]]["status"] == "unsubscribed"
    assert summary.created + summary.updated == PROFILES and summary.updated >= 500


def test_an_empty_segment_sends_nothing_and_succeeds(warehouse, sandbox):
    s = ExportSpec.model_validate({
        "id": "empty", "privacy_acknowledged": True,
        "source": {"conn_id": "warehouse", "table": "segment_members", "segment_column": "segment", "segments": ["nobody"]},
        "destination": KLAVIYO, "mapping": {"email": "email"},
    })
    summary, _ = export(s)
    assert (summary.read, summary.sent, summary.accepted) == (0, 0, 0)
    assert "POST /api/profile-bulk-import-jobs" not in sandbox.state()["requests"]["by_endpoint"]
