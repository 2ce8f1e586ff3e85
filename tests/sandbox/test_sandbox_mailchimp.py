"""Mailchimp half of the sandbox over real HTTP, bodies checked against the 3.0.55 spec."""

from __future__ import annotations

import concurrent.futures
import hashlib

import pytest
import requests
from sandbox_testlib import assert_mailchimp_problem, assert_matches_spec

from segment_export_sandbox import (
    MAILCHIMP_API_KEY,
    MAILCHIMP_AUDIENCE_ID,
    AudienceConfig,
    MailchimpAccountConfig,
    MergeFieldConfig,
    Sandbox,
    SandboxConfig,
)
from segment_export_sandbox.config import default_merge_fields

AUD = MAILCHIMP_AUDIENCE_ID
AUTH = ("anystring", MAILCHIMP_API_KEY)


def mc(sb: Sandbox, method: str, path: str, **kw) -> requests.Response:
    kw.setdefault("auth", AUTH)
    return requests.request(method, sb.mailchimp_host + path, timeout=30, **kw)


def batch(sb: Sandbox, members: list[dict], params: dict | None = None, **flags) -> dict:
    r = mc(sb, "POST", f"/lists/{AUD}", json={"members": members, **flags}, params=params)
    return assert_matches_spec("mailchimp", "/lists/{list_id}", "post", r)


def members(sb: Sandbox) -> dict:
    (acc,) = sb.state()["mailchimp"]["accounts"].values()
    return {m["email_address"].lower(): m for m in acc["audiences"][AUD]["members"].values()}


def md5(email: str) -> str:
    return hashlib.md5(email.lower().encode()).hexdigest()


# --- auth, ping, lists, merge fields -------------------------------------------------------


def test_auth_missing_and_invalid(sb):
    r = requests.get(sb.mailchimp_host + "/ping", timeout=10)
    assert_mailchimp_problem(r, 401, "API Key Missing")
    r = mc(sb, "GET", "/ping", auth=("user", "ffffffffffffffffffffffffffffffff-us6"))
    body = assert_mailchimp_problem(r, 401, "API Key Invalid")
    assert "API key" in body["detail"]


def test_ping(sb):
    r = mc(sb, "GET", "/ping")
    assert assert_matches_spec("mailchimp", "/ping", "get", r) == {"health_status": "Everything's Chimpy!"}


def test_get_list_and_404(sb):
    body = assert_matches_spec("mailchimp", "/lists/{list_id}", "get", mc(sb, "GET", f"/lists/{AUD}"))
    assert (body["id"], body["name"]) == (AUD, "Sandbox audience")
    assert_mailchimp_problem(mc(sb, "GET", "/lists/nosuchlist"), 404, "Resource Not Found")
    assert_mailchimp_problem(mc(sb, "POST", "/lists/nosuchlist", json={"members": []}), 404, "Resource Not Found")


def test_merge_fields_are_new_audience_defaults_and_paged(sb):
    body = assert_matches_spec("mailchimp", "/lists/{list_id}/merge-fields", "get", mc(sb, "GET", f"/lists/{AUD}/merge-fields"))
    assert [(f["tag"], f["type"], f["required"]) for f in body["merge_fields"]] == [
        ("FNAME", "text", False),
        ("LNAME", "text", False),
        ("ADDRESS", "address", False),
        ("PHONE", "phone", False),
        ("BIRTHDAY", "birthday", False),
    ]
    body = mc(sb, "GET", f"/lists/{AUD}/merge-fields", params={"count": 2, "offset": 1}).json()
    assert [f["tag"] for f in body["merge_fields"]] == ["LNAME", "ADDRESS"] and body["total_items"] == 5


# --- batch subscribe rules -------------------------------------------------------------------


def test_new_members_created_and_readable_by_hash(sb):
    body = batch(sb, [{"email_address": "Ann@Example.com", "status": "subscribed", "merge_fields": {"FNAME": "Ann", "BIRTHDAY": "07/04"}}, {"email_address": "bob@example.com", "status": "pending"}])
    assert (body["total_created"], body["total_updated"], body["error_count"]) == (2, 0, 0)
    assert body["new_members"][0]["id"] == md5("ann@example.com")
    r = mc(sb, "GET", f"/lists/{AUD}/members/{md5('ann@example.com')}")
    member = assert_matches_spec("mailchimp", "/lists/{list_id}/members/{subscriber_hash}", "get", r)
    assert member["email_address"] == "Ann@Example.com" and member["merge_fields"]["FNAME"] == "Ann"
    assert_mailchimp_problem(mc(sb, "GET", f"/lists/{AUD}/members/{md5('nobody@example.com')}"), 404, "Resource Not Found")


def test_existing_member_without_update_existing_is_contact_exists(sb):
    sb.seed_mailchimp_member(AUD, "old@example.com", "subscribed", {"FNAME": "Old"})
    body = batch(sb, [{"email_address": "OLD@example.com", "status": "subscribed", "merge_fields": {"FNAME": "New"}}])
    (err,) = body["errors"]
    assert err["error_code"] == "ERROR_CONTACT_EXISTS" and "already a list member" in err["error"]
    assert body["total_updated"] == 0 and members(sb)["old@example.com"]["merge_fields"]["FNAME"] == "Old"


def test_update_existing_with_status_changes_status(sb):
    sb.seed_mailchimp_member(AUD, "sub@example.com", "subscribed")
    body = batch(sb, [{"email_address": "sub@example.com", "status": "unsubscribed"}], update_existing=True)
    assert body["total_updated"] == 1 and body["updated_members"][0]["status"] == "unsubscribed"
    assert members(sb)["sub@example.com"]["status"] == "unsubscribed"


@pytest.mark.parametrize("old", ["unsubscribed", "cleaned"])
@pytest.mark.parametrize("new", ["subscribed", "pending"])
def test_compliance_state_cannot_be_resubscribed(sb, old, new):
    sb.seed_mailchimp_member(AUD, "gone@example.com", old)
    body = batch(sb, [{"email_address": "gone@example.com", "status": new, "merge_fields": {"FNAME": "X"}}], update_existing=True)
    (err,) = body["errors"]
    assert "compliance state" in err["error"] and err["email_address"] == "gone@example.com"
    assert members(sb)["gone@example.com"]["status"] == old
    assert members(sb)["gone@example.com"]["merge_fields"].get("FNAME", "") == ""


@pytest.mark.parametrize("old", ["unsubscribed", "cleaned", "subscribed", "pending"])
def test_update_existing_without_status_keeps_status(sb, old):
    sb.seed_mailchimp_member(AUD, "keep@example.com", old, {"FNAME": "Before", "LNAME": "Same"})
    body = batch(sb, [{"email_address": "keep@example.com", "merge_fields": {"FNAME": "After"}}], update_existing=True)
    assert (body["total_updated"], body["error_count"]) == (1, 0)
    m = members(sb)["keep@example.com"]
    assert m["status"] == old
    assert m["merge_fields"] == {"FNAME": "After", "LNAME": "Same"}


def test_new_member_needs_a_status(sb):
    body = batch(sb, [{"email_address": "nostatus@example.com", "merge_fields": {"FNAME": "N"}}], update_existing=True)
    (err,) = body["errors"]
    assert err["field"] == "status" and body["total_created"] == 0
    assert "nostatus@example.com" not in members(sb)


def test_invalid_email_is_a_member_error(sb):
    body = batch(sb, [{"email_address": "not-an-email", "status": "subscribed"}, {"email_address": "fine@example.com", "status": "subscribed"}])
    (err,) = body["errors"]
    assert "looks fake or invalid" in err["error"] and err["email_address"] == "not-an-email"
    assert body["total_created"] == 1


def test_forgotten_email_cannot_be_reimported(sb):
    sb.seed_mailchimp_member(AUD, "forget@example.com", "subscribed")
    sb.forget_mailchimp_email(AUD, "forget@example.com")
    assert "forget@example.com" not in members(sb)
    body = batch(sb, [{"email_address": "Forget@example.com", "status": "subscribed"}], update_existing=True)
    (err,) = body["errors"]
    assert "permanently deleted" in err["error"]
    assert "forget@example.com" not in members(sb)


def test_duplicates_in_one_request(sb):
    dupes = [{"email_address": "dup@example.com", "status": "subscribed"}, {"email_address": "DUP@example.com", "status": "unsubscribed"}]
    body = batch(sb, dupes)
    assert (body["total_created"], body["error_count"]) == (1, 1)
    assert body["errors"][0]["email_address"] == "DUP@example.com"
    sb.reset()
    body = batch(sb, dupes, params={"skip_duplicate_check": "true"})
    assert (body["total_created"], body["error_count"]) == (1, 0)
    assert members(sb)["dup@example.com"]["status"] == "subscribed"  # first appearance wins


def test_required_merge_field_and_skip_merge_validation():
    fields = default_merge_fields() + [MergeFieldConfig("COMPANY", "Company", "text", required=True), MergeFieldConfig("SCORE", "Score", "number")]
    cfg = SandboxConfig(rate_limits=False, mailchimp_accounts=[MailchimpAccountConfig(MAILCHIMP_API_KEY, "acct2", [AudienceConfig(AUD, "Strict", fields)])])
    with Sandbox(cfg) as sb:
        body = batch(sb, [{"email_address": "a@example.com", "status": "subscribed", "merge_fields": {"FNAME": "A"}}])
        (err,) = body["errors"]
        assert (err["error"], err["field"], err["field_message"]) == ("Your merge fields were invalid.", "COMPANY", "Please enter a value")
        body = batch(sb, [{"email_address": "a@example.com", "status": "subscribed", "merge_fields": {"FNAME": "A"}}], params={"skip_merge_validation": "true"})
        assert body["total_created"] == 1
        body = batch(sb, [{"email_address": "b@example.com", "status": "subscribed", "merge_fields": {"COMPANY": "Acme", "SCORE": "lots"}}])
        assert body["errors"][0]["field"] == "SCORE"
        body = batch(sb, [{"email_address": "c@example.com", "status": "subscribed", "merge_fields": {"COMPANY": "Acme", "SCORE": 7, "ADDRESS": {"addr1": "1 Main"}}}])
        assert body["errors"][0]["field"] == "ADDRESS"


def test_unknown_merge_tag_is_ignored(sb):
    body = batch(sb, [{"email_address": "u@example.com", "status": "subscribed", "merge_fields": {"FNAME": "U", "NOSUCHTAG": "x"}}])
    assert (body["total_created"], body["error_count"]) == (1, 0)
    assert members(sb)["u@example.com"]["merge_fields"] == {"FNAME": "U"}


def test_request_level_errors(sb):
    r = mc(sb, "POST", f"/lists/{AUD}", json={"members": [{"email_address": f"m{i}@example.com", "status": "subscribed"} for i in range(501)]})
    body = assert_mailchimp_problem(r, 400, "Invalid Resource")
    assert body["errors"][0]["field"] == "members"
    assert members(sb) == {}
    r = mc(sb, "POST", f"/lists/{AUD}", data=b'{"members": [', headers={"Content-Type": "application/json"})
    assert_mailchimp_problem(r, 400, "JSON Parse Error")
    r = mc(sb, "POST", f"/lists/{AUD}", json={"members": [{"email_address": "a@example.com", "status": "subscribe"}]})
    body = assert_mailchimp_problem(r, 400, "Invalid Resource")
    assert body["errors"][0]["field"] == "members.0.status"
    r = mc(sb, "POST", f"/lists/{AUD}", json={"update_existing": True})
    assert assert_mailchimp_problem(r, 400, "Invalid Resource")["errors"][0]["field"] == "members"
    ok = batch(sb, [{"email_address": f"m{i}@example.com", "status": "subscribed"} for i in range(500)])
    assert ok["total_created"] == 500


def test_members_listing_paging_and_status_filter(sb):
    batch(sb, [{"email_address": f"l{i}@example.com", "status": "subscribed" if i % 2 else "unsubscribed"} for i in range(30)])
    r = mc(sb, "GET", f"/lists/{AUD}/members", params={"count": 7, "offset": 7})
    body = assert_matches_spec("mailchimp", "/lists/{list_id}/members", "get", r)
    assert len(body["members"]) == 7 and body["total_items"] == 30
    assert body["members"][0]["email_address"] == "l7@example.com"
    body = mc(sb, "GET", f"/lists/{AUD}/members", params={"status": "unsubscribed", "count": 1000}).json()
    assert body["total_items"] == 15 and {m["status"] for m in body["members"]} == {"unsubscribed"}
    assert_mailchimp_problem(mc(sb, "GET", f"/lists/{AUD}/members", params={"count": 1001}), 400, "Invalid Resource")


# --- tags / static segments ------------------------------------------------------------------


def test_static_segments_as_tags(sb):
    batch(sb, [{"email_address": f"t{i}@example.com", "status": "subscribed"} for i in range(4)])
    r = mc(sb, "POST", f"/lists/{AUD}/segments", json={"name": "vip", "static_segment": ["t0@example.com", "stranger@example.com"]})
    seg = assert_matches_spec("mailchimp", "/lists/{list_id}/segments", "post", r)
    assert seg["type"] == "static" and seg["member_count"] == 1
    r = mc(sb, "POST", f"/lists/{AUD}/segments/{seg['id']}", json={"members_to_add": ["t1@example.com", "t2@example.com", "nobody@example.com"], "members_to_remove": ["t0@example.com"]})
    body = assert_matches_spec("mailchimp", "/lists/{list_id}/segments/{segment_id}", "post", r)
    # "Any emails provided that are not present on the list will be ignored" (reference): not errors
    assert (body["total_added"], body["total_removed"], body["error_count"], body["errors"]) == (2, 1, 0, [])
    assert {m["email_address"] for m in body["members_added"]} == {"t1@example.com", "t2@example.com"}
    r = mc(sb, "POST", f"/lists/{AUD}/segments/{seg['id']}", json={"members_to_remove": ["nobody@example.com", "t3@example.com"]})
    assert (r.json()["total_removed"], r.json()["error_count"]) == (0, 0)
    r = mc(sb, "GET", f"/lists/{AUD}/segments/{seg['id']}/members")
    body = assert_matches_spec("mailchimp", "/lists/{list_id}/segments/{segment_id}/members", "get", r)
    assert {m["email_address"] for m in body["members"]} == {"t1@example.com", "t2@example.com"}
    assert all(m["tags"] == [{"id": seg["id"], "name": "vip"}] for m in body["members"])
    body = assert_matches_spec("mailchimp", "/lists/{list_id}/segments", "get", mc(sb, "GET", f"/lists/{AUD}/segments"))
    assert body["total_items"] == 1
    too_many = [f"t{i}@example.com" for i in range(501)]
    assert_mailchimp_problem(mc(sb, "POST", f"/lists/{AUD}/segments/{seg['id']}", json={"members_to_add": too_many}), 400, "Invalid Resource")
    assert_mailchimp_problem(mc(sb, "GET", f"/lists/{AUD}/segments/999"), 404, "Resource Not Found")
    r = mc(sb, "POST", f"/lists/{AUD}/members/{md5('t3@example.com')}/tags", json={"tags": [{"name": "vip", "status": "active"}, {"name": "new", "status": "active"}]})
    assert r.status_code == 204
    assert members(sb)["t3@example.com"]["tags"] == ["vip", "new"]


def test_batch_tags_and_sync_tags(sb):
    batch(sb, [{"email_address": "tg@example.com", "status": "subscribed", "tags": ["a", "b"]}])
    assert members(sb)["tg@example.com"]["tags"] == ["a", "b"]
    batch(sb, [{"email_address": "tg@example.com", "tags": ["c"]}], update_existing=True)
    assert members(sb)["tg@example.com"]["tags"] == ["a", "b", "c"]
    batch(sb, [{"email_address": "tg@example.com", "tags": ["b"]}], update_existing=True, sync_tags=True)
    assert members(sb)["tg@example.com"]["tags"] == ["b"]


# --- connection cap ---------------------------------------------------------------------------


def test_eleventh_simultaneous_request_gets_429():
    cfg = SandboxConfig(latency={"mailchimp_read": 0.6})
    with Sandbox(cfg) as sb:
        with concurrent.futures.ThreadPoolExecutor(11) as pool:
            responses = list(pool.map(lambda _: mc(sb, "GET", "/ping"), range(11)))
        statuses = [r.status_code for r in responses]
        assert statuses.count(429) >= 1 and statuses.count(200) == 11 - statuses.count(429), statuses
        assert statuses.count(200) >= 5
        assert_mailchimp_problem(next(r for r in responses if r.status_code == 429), 429, "Too Many Requests")
        state = sb.state()["requests"]
        assert state["by_endpoint"]["GET /3.0/ping"]["status"]["429"] == statuses.count(429)
        assert state["max_in_flight"]["mailchimp"] >= 10
        # slots are given back: a later request goes through
        assert mc(sb, "GET", "/ping").status_code == 200


# --- partial responses on batch subscribe ------------------------------------------------------


def test_batch_fields_keep_only_the_dotted_paths(sb):
    sb.seed_mailchimp_member(AUD, "old@example.com", "subscribed")
    people = [{"email_address": "new@example.com", "status": "subscribed", "merge_fields": {"FNAME": "Ada"}},
              {"email_address": "old@example.com", "status": "subscribed"}, {"email_address": "not-an-email", "status": "subscribed"}]
    fields = "new_members.email_address,new_members.status,errors.email_address,errors.error_code,total_created,error_count"
    r = mc(sb, "POST", f"/lists/{AUD}", json={"members": people}, params={"fields": fields})
    assert r.status_code == 200
    assert r.json() == {
        "new_members": [{"email_address": "new@example.com", "status": "subscribed"}],
        "errors": [{"email_address": "old@example.com", "error_code": "ERROR_CONTACT_EXISTS"},
                   {"email_address": "not-an-email", "error_code": "ERROR_GENERIC"}],
        "total_created": 1,
        "error_count": 2,
    }
    assert members(sb)["new@example.com"]["merge_fields"]["FNAME"] == "Ada"  # the work is done in full


def test_batch_fields_whole_objects_and_exclude_fields(sb):
    sb.seed_mailchimp_member(AUD, "old@example.com", "unsubscribed")
    people = [{"email_address": "old@example.com", "merge_fields": {"LNAME": "Lovelace"}}]
    full = batch(sb, people, update_existing=True)
    r = mc(sb, "POST", f"/lists/{AUD}", json={"members": people, "update_existing": True},
           params={"fields": "updated_members,total_updated"})
    assert list(r.json()) == ["updated_members", "total_updated"]
    assert list(r.json()["updated_members"][0]) == list(full["updated_members"][0])  # wanted whole: every field
    r = mc(sb, "POST", f"/lists/{AUD}", json={"members": people, "update_existing": True},
           params={"exclude_fields": "_links,updated_members._links,updated_members.merge_fields,updated_members.tags,errors"})
    body = r.json()
    assert "_links" not in body and "errors" not in body and body["total_updated"] == 1
    member = body["updated_members"][0]
    assert set(full["updated_members"][0]) - set(member) == {"_links", "merge_fields", "tags"}
    assert member["status"] == "unsubscribed" and member["tags_count"] == 0
    r = mc(sb, "POST", f"/lists/{AUD}", json={"members": people, "update_existing": True},
           params={"fields": "updated_members.email_address,updated_members.status,total_updated", "exclude_fields": "updated_members.status"})
    assert r.json() == {"updated_members": [{"email_address": "old@example.com"}], "total_updated": 1}


def test_batch_fields_unknown_names_and_errors_are_unchanged(sb):
    r = mc(sb, "POST", f"/lists/{AUD}", json={"members": [{"email_address": "a@example.com", "status": "subscribed"}]},
           params={"fields": "nope,new_members.nope"})
    assert r.status_code == 200 and r.json() == {"new_members": [{}]}
    r = mc(sb, "POST", f"/lists/{AUD}", json={"members": [{"status": "subscribed"}]}, params={"fields": "total_created"})
    assert r.status_code == 400 and r.json()["title"] == "Invalid Resource"  # errors are problem documents, whole


def test_field_trees():
    from segment_export_sandbox.mailchimp import drop_fields, field_tree, keep_fields

    assert field_tree(None) is None and field_tree(" , ") is None
    assert field_tree("a.b, a.c ,d") == {"a": {"b": {}, "c": {}}, "d": {}}
    assert field_tree("a,a.b") == field_tree("a.b,a") == {"a": {}}
    value = {"a": [{"b": 1, "c": {"d": 2, "e": 3}}, {"b": 4}], "f": 5}
    assert keep_fields(value, field_tree("a.c.e,f")) == {"a": [{"c": {"e": 3}}, {}], "f": 5}
    assert drop_fields(value, field_tree("a.c.e,a.b")) == {"a": [{"c": {"d": 2}}, {}], "f": 5}


# --- add or update one member: PUT with status_if_new ----------------------------------------------


def put(sb: Sandbox, email: str, body: dict, params: dict | None = None) -> requests.Response:
    return mc(sb, "PUT", f"/lists/{AUD}/members/{md5(email)}", json=body, params=params)


@pytest.mark.parametrize("old", ["unsubscribed", "cleaned", "subscribed", "pending", "transactional"])
def test_put_keeps_an_existing_members_status_and_creates_new_ones_with_status_if_new(sb, old):
    sb.seed_mailchimp_member(AUD, "Keep@example.com", old, {"FNAME": "Before", "LNAME": "Same"})
    r = put(sb, "keep@example.com", {"email_address": "keep@example.com", "status_if_new": "subscribed", "merge_fields": {"FNAME": "After"}})
    # the converted spec's 200 points at the collection schema (reference README): the answer is one member
    member = assert_matches_spec("mailchimp", "/lists/{list_id}/members/{subscriber_hash}", "get", r)
    assert (member["status"], member["email_address"]) == (old, "Keep@example.com")
    assert members(sb)["keep@example.com"]["merge_fields"] == {"FNAME": "After", "LNAME": "Same"}
    r = put(sb, "new@example.com", {"email_address": "new@example.com", "status_if_new": "pending", "merge_fields": {"FNAME": "N"}})
    assert assert_matches_spec("mailchimp", "/lists/{list_id}/members/{subscriber_hash}", "get", r)["status"] == "pending"
    assert members(sb)["new@example.com"]["status"] == "pending"
    r = put(sb, "keep@example.com", {"merge_fields": {"LNAME": "Only"}})  # an existing member needs neither field
    assert r.status_code == 200 and members(sb)["keep@example.com"]["status"] == old


def test_put_refusals_are_problem_documents(sb):
    body = assert_mailchimp_problem(put(sb, "a@example.com", {"email_address": "a@example.com"}), 400, "Invalid Resource")
    assert body["errors"][0]["field"] == "status_if_new"
    body = assert_mailchimp_problem(put(sb, "not-an-email", {"email_address": "not-an-email", "status_if_new": "subscribed"}), 400, "Invalid Resource")
    assert "looks fake or invalid" in body["detail"]
    sb.seed_mailchimp_member(AUD, "gone@example.com", "subscribed")
    sb.forget_mailchimp_email(AUD, "gone@example.com")
    assert_mailchimp_problem(put(sb, "gone@example.com", {"email_address": "gone@example.com", "status_if_new": "subscribed"}), 400, "Forgotten Email Not Subscribed")
    sb.seed_mailchimp_member(AUD, "unsub@example.com", "unsubscribed")
    assert_mailchimp_problem(put(sb, "unsub@example.com", {"email_address": "unsub@example.com", "status": "subscribed"}), 400, "Member In Compliance State")
    body = assert_mailchimp_problem(put(sb, "b@example.com", {"email_address": "b@example.com", "status_if_new": "subscribed", "merge_fields": {"BIRTHDAY": "1990"}}), 400, "Invalid Resource")
    assert body["errors"] == [{"field": "BIRTHDAY", "message": "Please enter a valid date (MM/DD)"}]
    assert_mailchimp_problem(put(sb, "c@example.com", {"email_address": "c@example.com", "status_if_new": "subscribe"}), 400, "Invalid Resource")
    assert set(members(sb)) == {"unsub@example.com"} and members(sb)["unsub@example.com"]["status"] == "unsubscribed"


# --- batch operations -----------------------------------------------------------------------------------


@pytest.fixture
def batch_delay(sb):
    """Batch jobs take ``seconds`` before they finish (the latency kind ``mailchimp_batch_operations``)."""
    yield lambda seconds: sb.configure(latency={"mailchimp_batch_operations": seconds})
    sb.configure(latency={"mailchimp_batch_operations": 0.0})


def results_of(url: str) -> list[dict]:
    """Every result in a batch's archive: a gzipped tar of JSON files, each an array of results."""
    import io
    import json
    import tarfile

    r = requests.get(url, timeout=30)  # a plain download: no API key goes to the archive's host
    assert r.status_code == 200
    out = []
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
        for info in tar.getmembers():
            if info.isfile():
                out += json.load(tar.extractfile(info))
    return out


def test_batch_operations_run_later_and_their_results_come_in_a_gzipped_tar(sb, batch_delay):
    import json
    import time

    batch_delay(0.6)
    sb.seed_mailchimp_member(AUD, "unsub@example.com", "unsubscribed")
    operations = [
        {"method": "PUT", "path": f"/lists/{AUD}/members/{md5(e)}", "operation_id": e,
         "body": json.dumps({"email_address": e, "status_if_new": "subscribed", "merge_fields": {"FNAME": "X"}})}
        for e in ("unsub@example.com", "new@example.com", "not-an-email")
    ] + [{"method": "GET", "path": f"lists/{AUD}", "operation_id": "read", "params": {"count": 1}},
         {"method": "GET", "path": "/nowhere", "operation_id": "lost"}]
    r = mc(sb, "POST", "/batches", json={"operations": operations})
    job = assert_matches_spec("mailchimp", "/batches", "post", r)
    assert (job["status"], job["total_operations"], job["finished_operations"], job["response_body_url"]) == ("pending", 5, 0, "")
    assert "new@example.com" not in members(sb)  # asynchronous: nothing applied yet
    assert assert_matches_spec("mailchimp", "/batches/{batch_id}", "get", mc(sb, "GET", f"/batches/{job['id']}"))["status"] == "pending"
    time.sleep(0.7)
    done = assert_matches_spec("mailchimp", "/batches/{batch_id}", "get", mc(sb, "GET", f"/batches/{job['id']}"))
    assert (done["status"], done["finished_operations"], done["errored_operations"]) == ("finished", 5, 2)
    results = {res["operation_id"]: res for res in results_of(done["response_body_url"])}
    assert {k: v["status_code"] for k, v in results.items()} == {
        "unsub@example.com": 200, "new@example.com": 200, "not-an-email": 400, "read": 200, "lost": 404}
    assert json.loads(results["unsub@example.com"]["response"])["status"] == "unsubscribed"  # kept
    assert json.loads(results["read"]["response"])["id"] == AUD
    assert json.loads(results["not-an-email"]["response"])["title"] == "Invalid Resource"
    assert {e: m["status"] for e, m in members(sb).items()} == {"unsub@example.com": "unsubscribed", "new@example.com": "subscribed"}
    listing = assert_matches_spec("mailchimp", "/batches", "get", mc(sb, "GET", "/batches"))
    assert listing["total_items"] == 1 and listing["batches"][0]["id"] == job["id"]
    assert_mailchimp_problem(mc(sb, "GET", "/batches/nosuchbatch"), 404, "Resource Not Found")


def test_batch_archive_splits_results_across_files_and_the_state_shows_batches(sb):
    import json

    operations = [{"method": "PUT", "path": f"/lists/{AUD}/members/{md5(f'm{i}@example.com')}", "operation_id": str(i),
                   "body": json.dumps({"email_address": f"m{i}@example.com", "status_if_new": "transactional"})} for i in range(450)]
    job = mc(sb, "POST", "/batches", json={"operations": operations}).json()
    done = mc(sb, "GET", f"/batches/{job['id']}").json()
    assert done["status"] == "finished" and sorted(int(r["operation_id"]) for r in results_of(done["response_body_url"])) == list(range(450))
    (acc,) = sb.state()["mailchimp"]["accounts"].values()
    assert acc["batches"][job["id"]] == {"status": "finished", "total_operations": 450, "errored_operations": 0}
    assert len(members(sb)) == 450


def test_batch_request_errors_and_the_pending_batch_cap(sb, batch_delay, monkeypatch):
    from segment_export_sandbox import mailchimp

    assert_mailchimp_problem(mc(sb, "POST", "/batches", json={}), 400, "Invalid Resource")
    body = assert_mailchimp_problem(mc(sb, "POST", "/batches", json={"operations": [{"method": "PUT", "path": "/x", "body": {"a": 1}}]}), 400, "Invalid Resource")
    assert body["errors"][0]["field"] == "operations.0.body"  # the body is a JSON *string*
    assert_mailchimp_problem(mc(sb, "POST", "/batches", json={"operations": [{"method": "FETCH", "path": "/x"}]}), 400, "Invalid Resource")
    batch_delay(60)
    monkeypatch.setattr(mailchimp, "MAX_PENDING_BATCHES", 2)
    for _ in range(2):
        assert mc(sb, "POST", "/batches", json={"operations": []}).status_code == 200
    body = assert_mailchimp_problem(mc(sb, "POST", "/batches", json={"operations": []}), 429, "Too Many Requests")
    assert "pending batches" in body["detail"]


@pytest.mark.parametrize("requires_status", [False, True])
def test_batch_subscribe_member_without_status_under_both_guesses(sb, requires_status):
    sb.configure(behaviour={"mailchimp_batch_update_requires_status": requires_status})
    try:
        sb.seed_mailchimp_member(AUD, "old@example.com", "unsubscribed", {"FNAME": "Old"})
        people = [{"email_address": "new@example.com", "status": "subscribed"}, {"email_address": "old@example.com", "merge_fields": {"FNAME": "New"}}]
        r = mc(sb, "POST", f"/lists/{AUD}", json={"members": people, "update_existing": True})
        if requires_status:
            body = assert_mailchimp_problem(r, 400, "Invalid Resource")
            assert body["errors"] == [{"field": "members.item:1.status", "message": "This value should not be blank."}]
            assert members(sb)["old@example.com"]["merge_fields"]["FNAME"] == "Old" and "new@example.com" not in members(sb)
        else:
            assert assert_matches_spec("mailchimp", "/lists/{list_id}", "post", r)["total_updated"] == 1
            assert members(sb)["old@example.com"] == {**members(sb)["old@example.com"], "status": "unsubscribed"}
            assert members(sb)["old@example.com"]["merge_fields"]["FNAME"] == "New"
        with_status = [{"email_address": "x@example.com", "status": "subscribed"}]
        assert mc(sb, "POST", f"/lists/{AUD}", json={"members": with_status}).status_code == 200  # unaffected either way
    finally:
        sb.configure(behaviour={"mailchimp_batch_update_requires_status": False})
