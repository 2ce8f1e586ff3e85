"""The sandbox's erasure endpoints over real HTTP, as the reference specs describe them: Klaviyo's Request Profile
Deletion (``POST /api/data-privacy-deletion-jobs``) and Mailchimp's permanent delete
(``POST /lists/{list_id}/members/{subscriber_hash}/actions/delete-permanent``)."""

from __future__ import annotations

import json

import jsonschema
import pytest
import requests
from sandbox_testlib import _to_jsonschema, assert_klaviyo_error, assert_mailchimp_problem, klaviyo_spec
from segment_export_sandbox import (
    KLAVIYO_ACCOUNT_ID, KLAVIYO_API_KEY, KLAVIYO_LIST_ID, KLAVIYO_SECOND_LIST_ID, MAILCHIMP_ACCOUNT_ID,
    MAILCHIMP_API_KEY, MAILCHIMP_AUDIENCE_ID,
)
from segment_export_sandbox.mailchimp import subscriber_hash

K_HEADERS = {"Authorization": f"Klaviyo-API-Key {KLAVIYO_API_KEY}", "revision": "2026-07-15",
             "Content-Type": "application/vnd.api+json"}
DELETION_PATH = "/api/data-privacy-deletion-jobs"


def deletion(**identifier) -> dict:
    profile = {"type": "profile", "attributes": {k: v for k, v in identifier.items() if k != "id"}}
    if "id" in identifier:
        profile["id"] = identifier["id"]
    return {"data": {"type": "data-privacy-deletion-job", "attributes": {"profile": {"data": profile}}}}


def request_schema() -> dict:
    spec = klaviyo_spec()
    body = spec["paths"][DELETION_PATH]["post"]["requestBody"]["content"]["application/vnd.api+json"]["schema"]
    return _to_jsonschema(spec, body)


def import_profiles(sb, *emails: str) -> None:
    body = {"data": {"type": "profile-bulk-import-job", "attributes": {"profiles": {"data": [
        {"type": "profile", "attributes": {"email": e}} for e in emails]}},
        "relationships": {"lists": {"data": [{"type": "list", "id": KLAVIYO_LIST_ID},
                                             {"type": "list", "id": KLAVIYO_SECOND_LIST_ID}]}}}}
    r = requests.post(sb.url + "/api/profile-bulk-import-jobs", headers=K_HEADERS, data=json.dumps(body), timeout=10)
    assert r.status_code == 202, r.text


def klaviyo(sb) -> dict:
    return sb.state()["klaviyo"]["accounts"][KLAVIYO_ACCOUNT_ID]


@pytest.fixture
def behaviour(sb):
    def set_(value: str, delay: float = 0.0):
        sb.configure(behaviour={"klaviyo_profile_deletion": value}, latency={"klaviyo_deletion": delay})
    yield set_
    sb.configure(behaviour={"klaviyo_profile_deletion": "immediate"}, latency={"klaviyo_deletion": 0.0})


def test_the_request_bodies_are_the_documented_shape():
    for body in (deletion(email="a@example.com"), deletion(phone_number="+15005550006"), deletion(id="01GDDKASAP8TKDDA2GRZDSVP4H")):
        jsonschema.validate(body, request_schema())


def test_klaviyo_deletion_removes_the_profile_from_every_list_immediately(sb, behaviour):
    behaviour("immediate")
    import_profiles(sb, "gone@example.com", "stays@example.com")
    acc = klaviyo(sb)
    assert all(len(lst["profile_ids"]) == 2 for lst in acc["lists"].values() if lst["profile_ids"])
    r = requests.post(sb.url + DELETION_PATH, headers=K_HEADERS, data=json.dumps(deletion(email="Gone@Example.com")), timeout=10)
    assert r.status_code == 202 and r.content == b""  # the spec's only success: 202, no body
    acc = klaviyo(sb)
    emails = {p["email"] for p in acc["profiles"].values()}
    assert emails == {"stays@example.com"}
    for list_id in (KLAVIYO_LIST_ID, KLAVIYO_SECOND_LIST_ID):
        assert [acc["profiles"][pid]["email"] for pid in acc["lists"][list_id]["profile_ids"]] == ["stays@example.com"]
    assert acc["deletions"] == [{"identifier": "email", "status": "done", "deleted": 1}]
    assert "gone@example.com" not in json.dumps(acc["deletions"])
    # Klaviyo lets a deleted address come back as a new profile: nothing in Klaviyo stops a re-import.
    import_profiles(sb, "gone@example.com")
    assert "gone@example.com" in {p["email"] for p in klaviyo(sb)["profiles"].values()}


def test_klaviyo_deletion_deferred_happens_after_the_configured_delay(sb, behaviour):
    behaviour("deferred", 3600.0)
    import_profiles(sb, "later@example.com")
    r = requests.post(sb.url + DELETION_PATH, headers=K_HEADERS, data=json.dumps(deletion(email="later@example.com")), timeout=10)
    assert r.status_code == 202
    acc = klaviyo(sb)
    assert {p["email"] for p in acc["profiles"].values()} == {"later@example.com"}
    assert acc["deletions"] == [{"identifier": "email", "status": "pending", "deleted": 0}]
    sb.configure(latency={"klaviyo_deletion": 0.0})
    acc = klaviyo(sb)
    assert acc["profiles"] == {} and all(lst["profile_ids"] == [] for lst in acc["lists"].values())
    assert acc["deletions"] == [{"identifier": "email", "status": "done", "deleted": 1}]


def test_klaviyo_deletion_of_an_unknown_address_or_id_is_accepted(sb, behaviour):
    behaviour("immediate")
    for body in (deletion(email="nobody@example.com"), deletion(id="01GDDKASAP8TKDDA2GRZDSVP4H")):
        r = requests.post(sb.url + DELETION_PATH, headers=K_HEADERS, data=json.dumps(body), timeout=10)
        assert r.status_code == 202
    assert [d["deleted"] for d in klaviyo(sb)["deletions"]] == [0, 0]


def test_klaviyo_deletion_refuses_two_identifiers_and_bad_bodies(sb):
    pointer = "/data/attributes/profile/data"
    r = requests.post(sb.url + DELETION_PATH, headers=K_HEADERS,
                      data=json.dumps(deletion(email="a@example.com", phone_number="+15005550006")), timeout=10)
    assert_klaviyo_error(r, 400, "invalid", pointer)
    r = requests.post(sb.url + DELETION_PATH, headers=K_HEADERS, data=json.dumps(deletion()), timeout=10)
    assert_klaviyo_error(r, 400, "invalid", pointer)
    body = deletion(email="a@example.com")
    body["data"]["type"] = "profile"
    r = requests.post(sb.url + DELETION_PATH, headers=K_HEADERS, data=json.dumps(body), timeout=10)
    assert_klaviyo_error(r, 400, "invalid", "/data/type")
    r = requests.post(sb.url + DELETION_PATH, headers=K_HEADERS, data=json.dumps(deletion(email="not-an-address")), timeout=10)
    assert_klaviyo_error(r, 400, "invalid", pointer + "/attributes/email")
    assert klaviyo(sb)["deletions"] == []


def test_klaviyo_deletion_rate_limit_is_the_documented_3_per_second(sb):
    sb.configure(rate_limits=True)
    try:
        statuses = [requests.post(sb.url + DELETION_PATH, headers=K_HEADERS,
                                  data=json.dumps(deletion(email=f"p{i}@example.com")), timeout=10) for i in range(4)]
    finally:
        sb.configure(rate_limits=False)
    assert [r.status_code for r in statuses[:3]] == [202, 202, 202]
    assert_klaviyo_error(statuses[3], 429, "throttled")
    assert int(statuses[3].headers["Retry-After"]) >= 1


def test_mailchimp_delete_permanent_erases_the_member_and_forbids_a_re_import(sb):
    sb.seed_mailchimp_member(MAILCHIMP_AUDIENCE_ID, "Gone@example.com", "subscribed", {"FNAME": "G"}, tags=["vip"])
    sb.seed_mailchimp_member(MAILCHIMP_AUDIENCE_ID, "stays@example.com", "subscribed", tags=["vip"])
    auth = ("any", MAILCHIMP_API_KEY)
    url = f"{sb.mailchimp_host}/lists/{MAILCHIMP_AUDIENCE_ID}/members/{subscriber_hash('gone@example.com')}/actions/delete-permanent"
    r = requests.post(url, auth=auth, timeout=10)
    assert r.status_code == 204 and r.content == b""
    audience = sb.state()["mailchimp"]["accounts"][MAILCHIMP_ACCOUNT_ID]["audiences"][MAILCHIMP_AUDIENCE_ID]
    assert [m["email_address"] for m in audience["members"].values()] == ["stays@example.com"]
    (segment,) = audience["segments"].values()
    assert segment["members"] == ["stays@example.com"] and audience["forgotten"] == ["gone@example.com"]
    # Not a member any more: the API's 404.
    assert_mailchimp_problem(requests.post(url, auth=auth, timeout=10), 404, "Resource Not Found")
    # "This will make it impossible to re-import the list member."
    r = requests.post(f"{sb.mailchimp_host}/lists/{MAILCHIMP_AUDIENCE_ID}", auth=auth, timeout=10, json={
        "members": [{"email_address": "gone@example.com", "status": "subscribed"}]})
    assert r.status_code == 200 and r.json()["error_count"] == 1 and "permanently deleted" in r.json()["errors"][0]["error"]
