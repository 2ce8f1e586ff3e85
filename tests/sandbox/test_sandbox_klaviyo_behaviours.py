"""The sandbox's Klaviyo switches (config.BEHAVIOURS) over real HTTP, answers checked against the spec."""

from __future__ import annotations

import pytest
import requests
from sandbox_testlib import assert_matches_spec
from test_sandbox_klaviyo import JOBS, account, job_body, k, wait_complete
from test_sandbox_klaviyo_subscriptions import SUBSCRIBE, subscribe_body

from segment_export_sandbox import KLAVIYO_LIST_ID
from segment_export_sandbox.config import default_behaviour


@pytest.fixture(autouse=True)
def default_behaviours(sb):
    """Each test starts, and leaves the module's server, with every switch at its default."""
    sb.configure(behaviour=default_behaviour())
    yield
    sb.configure(behaviour=default_behaviour())


def run_job(sb, profiles) -> tuple[dict, list[dict]]:
    r = k(sb, "POST", JOBS, json=job_body(profiles))
    assert r.status_code == 202, r.text
    job = wait_complete(sb, r.json()["data"]["id"])["data"]
    errors = k(sb, "GET", f"{JOBS}/{job['id']}/import-errors")
    return job, assert_matches_spec("klaviyo", "/api/profile-bulk-import-jobs/{id}/import-errors", "get", errors)["data"]


def test_completed_count_excludes_or_includes_the_failed_profiles(sb):
    profiles = [{"email": "a@example.com"}, {"email": "b@example.com"}, {"email": "not-an-email"}]
    job, _ = run_job(sb, profiles)
    assert (job["attributes"]["completed_count"], job["attributes"]["failed_count"]) == (2, 1)
    sb.configure(behaviour={"klaviyo_completed_count_includes_failed": True})
    job, errors = run_job(sb, profiles)
    assert (job["attributes"]["completed_count"], job["attributes"]["failed_count"], job["attributes"]["total_count"]) == (3, 1, 3)
    assert errors[0]["attributes"]["original_payload"] == {"email": "not-an-email"}
    # the profiles relationship lists the imported profiles only, whatever the counts say
    ids = k(sb, "GET", f"{JOBS}/{job['id']}/relationships/profiles").json()["data"]
    assert len(ids) == 2
    r = k(sb, "GET", f"{JOBS}/{job['id']}/profiles", params={"fields[profile]": "email", "page[size]": 100})
    imported = assert_matches_spec("klaviyo", "/api/profile-bulk-import-jobs/{id}/profiles", "get", r)["data"]
    assert sorted(p["attributes"]["email"] for p in imported) == ["a@example.com", "b@example.com"]
    assert {p["id"] for p in imported} == {i["id"] for i in ids}
    assert account(sb)["jobs"][job["id"]]["completed_count"] == 3


def test_identifier_conflict_merges_by_default_and_rejects_when_switched(sb):
    run_job(sb, [{"email": "old@example.com", "phone_number": "+14155550101", "external_id": "c1"}])
    job, errors = run_job(sb, [{"email": "new@example.com", "phone_number": "+14155550101"}])
    assert errors == [] and job["attributes"]["completed_count"] == 1
    (profile,) = account(sb)["profiles"].values()
    assert profile["email"] == "new@example.com"  # merged: the matched profile's email rewritten

    sb.reset()
    sb.configure(behaviour={"klaviyo_identifier_conflict": "reject"})
    run_job(sb, [{"email": "old@example.com", "phone_number": "+14155550101", "external_id": "c1"}])
    job, errors = run_job(sb, [
        {"email": "new@example.com", "phone_number": "+14155550101"},
        {"email": "other@example.com", "external_id": "c1"},
        {"email": "old@example.com", "phone_number": "+14155550101", "first_name": "Same"},  # its own phone: fine
        {"phone_number": "+14155550101", "first_name": "Phone only"},  # no email: matched by phone as usual
    ])
    assert (job["attributes"]["completed_count"], job["attributes"]["failed_count"]) == (2, 2)
    assert [e["attributes"]["code"] for e in errors] == ["duplicate_profile"] * 2
    assert [e["attributes"]["source"]["pointer"].rsplit("/", 1)[1] for e in errors] == ["phone_number", "external_id"]
    assert "phone number" in errors[0]["attributes"]["detail"]
    assert errors[0]["attributes"]["original_payload"]["email"] == "new@example.com"
    (profile,) = account(sb)["profiles"].values()
    assert (profile["email"], profile["first_name"]) == ("old@example.com", "Phone only")


def test_double_opt_in_list_subscribes_only_once_confirmed(sb):
    def opt_in():
        r = k(sb, "GET", f"/api/lists/{KLAVIYO_LIST_ID}")
        return assert_matches_spec("klaviyo", "/api/lists/{id}", "get", r)["data"]["attributes"]["opt_in_process"]

    assert opt_in() == "single_opt_in"
    sb.configure(behaviour={"klaviyo_list_opt_in": "double"})
    assert opt_in() == "double_opt_in"
    run_job(sb, [{"email": "a@example.com"}])
    assert k(sb, "POST", SUBSCRIBE, json=subscribe_body(["a@example.com"])).status_code == 202
    (pid, profile), = account(sb)["profiles"].items()
    assert profile["consent"] == "NEVER_SUBSCRIBED" and profile["consent_pending"]["list_id"] == KLAVIYO_LIST_ID
    r = requests.post(sb.url + "/_sandbox/klaviyo/confirm", json={"email": "A@example.com"}, timeout=10)
    assert r.status_code == 200 and r.json()["consent"] == "SUBSCRIBED"
    profile = account(sb)["profiles"][pid]
    assert profile["consent"] == "SUBSCRIBED" and profile["consent_pending"] is None and profile["consent_source"] == "test"
    assert requests.post(sb.url + "/_sandbox/klaviyo/confirm", json={"email": "a@example.com"}, timeout=10).status_code == 404
    # Without a list there is no list opt-in process: subscribed at once
    assert k(sb, "POST", SUBSCRIBE, json=subscribe_body(["b@example.com"], list_id=None)).status_code == 202
    assert {p["email"]: p["consent"] for p in account(sb)["profiles"].values()}["b@example.com"] == "SUBSCRIBED"
