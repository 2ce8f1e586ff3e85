"""Klaviyo half of the sandbox over real HTTP, bodies checked against the official spec."""

from __future__ import annotations

import concurrent.futures
import json
import time

import pytest
import requests
from sandbox_testlib import assert_klaviyo_error, assert_matches_spec

from segment_export_sandbox import (
    KLAVIYO_API_KEY,
    KLAVIYO_LIST_ID,
    KLAVIYO_SECOND_LIST_ID,
    Sandbox,
    SandboxConfig,
)

HEADERS = {"Authorization": f"Klaviyo-API-Key {KLAVIYO_API_KEY}", "revision": "2026-07-15", "Content-Type": "application/vnd.api+json", "Accept": "application/vnd.api+json"}
JOBS = "/api/profile-bulk-import-jobs"


def job_body(profiles: list[dict], lists: tuple[str, ...] = (KLAVIYO_LIST_ID,)) -> dict:
    body = {"data": {"type": "profile-bulk-import-job", "attributes": {"profiles": {"data": [{"type": "profile", "attributes": p} for p in profiles]}}}}
    if lists:
        body["data"]["relationships"] = {"lists": {"data": [{"type": "list", "id": lid} for lid in lists]}}
    return body


def k(sb: Sandbox, method: str, path: str, **kw) -> requests.Response:
    headers = {**HEADERS, **kw.pop("headers", {})}
    return requests.request(method, sb.url + path, headers=headers, timeout=30, **kw)


def wait_complete(sb: Sandbox, job_id: str, timeout: float = 10) -> dict:
    deadline = time.time() + timeout
    while True:
        r = k(sb, "GET", f"{JOBS}/{job_id}")
        body = assert_matches_spec("klaviyo", "/api/profile-bulk-import-jobs/{job_id}", "get", r)
        if body["data"]["attributes"]["status"] == "complete" or time.time() > deadline:
            return body
        time.sleep(0.02)


def account(sb: Sandbox) -> dict:
    (acc,) = sb.state()["klaviyo"]["accounts"].values()
    return acc


# --- auth, revision, request validation -----------------------------------------------


def test_missing_or_wrong_key_is_401_with_klaviyo_error(sb):
    r = requests.get(sb.url + "/api/accounts", headers={"revision": "2026-07-15"}, timeout=10)
    err = assert_klaviyo_error(r, 401, "not_authenticated")
    assert err["title"] == "Authentication credentials were not provided."
    r = k(sb, "GET", "/api/accounts", headers={"Authorization": "Klaviyo-API-Key pk_wrong"})
    assert_klaviyo_error(r, 401, "not_authenticated")
    r = k(sb, "GET", "/api/accounts", headers={"Authorization": f"Bearer {KLAVIYO_API_KEY}"})
    assert "Klaviyo-API-Key" in assert_klaviyo_error(r, 401, "not_authenticated")["detail"]


@pytest.mark.parametrize("revision", [None, "2020-01-01", "latest"])
def test_revision_header_is_required_and_must_be_known(sb, revision):
    headers = dict(HEADERS)
    headers.pop("revision")
    if revision:
        headers["revision"] = revision
    r = requests.get(sb.url + "/api/accounts", headers=headers, timeout=10)
    assert "revision" in assert_klaviyo_error(r, 400, "invalid")["detail"]


def test_accounts_and_lists_match_spec(sb):
    body = assert_matches_spec("klaviyo", "/api/accounts", "get", k(sb, "GET", "/api/accounts"))
    assert body["data"][0]["type"] == "account"
    r = k(sb, "GET", f"/api/lists/{KLAVIYO_LIST_ID}?additional-fields[list]=profile_count")
    body = assert_matches_spec("klaviyo", "/api/lists/{id}", "get", r)
    assert body["data"]["attributes"]["name"] == "Sandbox list"
    assert body["data"]["attributes"]["profile_count"] == 0
    body = assert_matches_spec("klaviyo", "/api/lists", "get", k(sb, "GET", "/api/lists"))
    assert {d["id"] for d in body["data"]} == {KLAVIYO_LIST_ID, KLAVIYO_SECOND_LIST_ID}
    r = k(sb, "GET", "/api/lists?filter=equals(name,'Sandbox list')")
    assert [d["id"] for d in r.json()["data"]] == [KLAVIYO_LIST_ID]


def test_missing_list_is_404(sb):
    assert "nope42" in assert_klaviyo_error(k(sb, "GET", "/api/lists/nope42"), 404, "not_found")["detail"]


def test_malformed_json_is_400_never_200(sb):
    r = k(sb, "POST", JOBS, data=b'{"data": {"type": ')
    assert_klaviyo_error(r, 400, "parse_error")
    assert account(sb)["jobs"] == {}


@pytest.mark.parametrize(
    "mutate, pointer",
    [
        (lambda b: b["data"].update(type="profile-bulk-import-jobs"), "/data/type"),
        (lambda b: b["data"].pop("attributes"), "/data/attributes"),
        (lambda b: b["data"]["attributes"]["profiles"]["data"][0]["attributes"].update(emial="x@example.com"), "/data/attributes/profiles/data/0/attributes/emial"),
        (lambda b: b["data"]["attributes"]["profiles"]["data"][0]["attributes"].update(first_name=12), "/data/attributes/profiles/data/0/attributes/first_name"),
        (lambda b: b["data"]["attributes"]["profiles"]["data"][0].update(type="person"), "/data/attributes/profiles/data/0/type"),
        (lambda b: b["data"]["relationships"]["lists"]["data"][0].pop("id"), "/data/relationships/lists/data/0/id"),
        (lambda b: b["data"]["attributes"]["profiles"].update(data=[]), "/data/attributes/profiles/data"),
    ],
)
def test_body_not_matching_schema_is_400_with_pointer(sb, mutate, pointer):
    body = job_body([{"email": "ok@example.com"}])
    mutate(body)
    assert_klaviyo_error(k(sb, "POST", JOBS, json=body), 400, "invalid", pointer)
    assert account(sb)["jobs"] == {}


def test_unsupported_media_type(sb):
    r = k(sb, "POST", JOBS, data=json.dumps(job_body([{"email": "a@example.com"}])), headers={"Content-Type": "text/plain"})
    assert_klaviyo_error(r, 415, "unsupported_media_type")
    r = k(sb, "POST", JOBS, data=json.dumps(job_body([{"email": "a@example.com"}])), headers={"Content-Type": "application/json"})
    assert r.status_code == 202


# --- bulk import jobs --------------------------------------------------------------------


def test_job_lifecycle_import_errors_and_pagination(sb):
    profiles = [
        {"email": "ann@example.com", "first_name": "Ann", "properties": {"tier": "gold"}},
        {"email": "not-an-email"},
        {"email": "bob@example.com", "last_name": "Bee"},
        {"first_name": "NoIdentifier"},
        {"email": "also bad@example.com"},
        {"phone_number": "+15005550006"},
        {"email": "carl@example", "external_id": "c-1"},
    ]
    r = k(sb, "POST", JOBS, json=job_body(profiles))
    assert r.status_code == 202
    created = assert_matches_spec("klaviyo", JOBS, "post", r)["data"]
    assert created["type"] == "profile-bulk-import-job"
    assert created["attributes"]["status"] == "queued"
    assert created["attributes"]["total_count"] == 7
    assert created["links"]["self"].endswith(f"/api/profile-bulk-import-jobs/{created['id']}/")

    done = wait_complete(sb, created["id"])["data"]["attributes"]
    assert done["status"] == "complete"
    assert (done["completed_count"], done["failed_count"]) == (3, 4)
    assert done["completed_at"] is not None and done["started_at"] is not None

    errors, url = [], f"{JOBS}/{created['id']}/import-errors?page[size]=3"
    while url:
        body = assert_matches_spec("klaviyo", "/api/profile-bulk-import-jobs/{id}/import-errors", "get", k(sb, "GET", url))
        assert len(body["data"]) <= 3
        errors += body["data"]
        url = body["links"].get("next", "").replace(sb.url, "") or None
    assert len(errors) == 4 and len({e["id"] for e in errors}) == 4
    pointers = [e["attributes"]["source"]["pointer"] for e in errors]
    assert pointers == [
        "/data/attributes/profiles/data/1/attributes/email",
        "/data/attributes/profiles/data/3/attributes",
        "/data/attributes/profiles/data/4/attributes/email",
        "/data/attributes/profiles/data/6/attributes/email",
    ]
    assert errors[0]["attributes"]["original_payload"] == {"email": "not-an-email"}
    assert all(e["attributes"]["code"] == "invalid" for e in errors)

    r = k(sb, "GET", f"{JOBS}/{created['id']}/import-errors?page[size]=101")
    assert_klaviyo_error(r, 400, "invalid")
    r = k(sb, "GET", f"{JOBS}/{created['id']}/import-errors?page[cursor]=garbage!")
    assert_klaviyo_error(r, 400, "invalid")


def test_job_list_relationship_adds_profiles_to_lists(sb):
    r = k(sb, "POST", JOBS, json=job_body([{"email": f"p{i}@example.com"} for i in range(25)], (KLAVIYO_LIST_ID, KLAVIYO_SECOND_LIST_ID)))
    job_id = r.json()["data"]["id"]
    wait_complete(sb, job_id)
    acc = account(sb)
    job_profiles = acc["jobs"][job_id]["profile_ids"]
    assert len(job_profiles) == 25
    assert acc["lists"][KLAVIYO_LIST_ID]["profile_ids"] == job_profiles
    assert acc["lists"][KLAVIYO_SECOND_LIST_ID]["profile_ids"] == job_profiles

    ids, url = [], f"/api/lists/{KLAVIYO_LIST_ID}/relationships/profiles?page[size]=10"
    while url:
        body = assert_matches_spec("klaviyo", "/api/lists/{id}/relationships/profiles", "get", k(sb, "GET", url))
        ids += [d["id"] for d in body["data"]]
        url = body["links"].get("next", "").replace(sb.url, "") or None
    assert ids == job_profiles

    body = assert_matches_spec("klaviyo", "/api/profile-bulk-import-jobs/{id}/profiles", "get", k(sb, "GET", f"{JOBS}/{job_id}/profiles?page[size]=100"))
    assert {d["attributes"]["email"] for d in body["data"]} == {f"p{i}@example.com" for i in range(25)}
    body = assert_matches_spec(
        "klaviyo", "/api/profile-bulk-import-jobs/{id}/relationships/profiles", "get", k(sb, "GET", f"{JOBS}/{job_id}/relationships/profiles")
    )
    assert len(body["data"]) == 20 and "next" in body["links"]
    body = assert_matches_spec("klaviyo", "/api/profile-bulk-import-jobs/{id}/lists", "get", k(sb, "GET", f"{JOBS}/{job_id}/lists"))
    assert [d["id"] for d in body["data"]] == [KLAVIYO_LIST_ID, KLAVIYO_SECOND_LIST_ID]
    body = assert_matches_spec("klaviyo", "/api/profile-bulk-import-jobs/{id}/relationships/lists", "get", k(sb, "GET", f"{JOBS}/{job_id}/relationships/lists"))
    assert len(body["data"]) == 2
    body = assert_matches_spec("klaviyo", JOBS, "get", k(sb, "GET", f"{JOBS}?filter=equals(status,'complete')"))
    assert [d["id"] for d in body["data"]] == [job_id]
    assert k(sb, "GET", f"{JOBS}?filter=equals(status,'queued')").json()["data"] == []


def test_job_with_missing_list_is_refused(sb):
    r = k(sb, "POST", JOBS, json=job_body([{"email": "a@example.com"}], (KLAVIYO_LIST_ID, "nolist")))
    assert_klaviyo_error(r, 400, "invalid", "/data/relationships/lists/data/1/id")
    assert account(sb)["jobs"] == {}


def test_profiles_upserted_by_email_case_insensitively(sb):
    first = k(sb, "POST", JOBS, json=job_body([{"email": "Jane.Doe@Example.com", "first_name": "Jane", "properties": {"a": 1, "b": 2}}])).json()
    wait_complete(sb, first["data"]["id"])
    second = k(sb, "POST", JOBS, json=job_body([{"email": "jane.doe@example.COM", "last_name": "Doe", "properties": {"b": 3, "c": 4}}])).json()
    wait_complete(sb, second["data"]["id"])
    profiles = account(sb)["profiles"]
    assert len(profiles) == 1
    (p,) = profiles.values()
    assert p["email"].lower() == "jane.doe@example.com"
    assert (p["first_name"], p["last_name"]) == ("Jane", "Doe")
    assert p["properties"] == {"a": 1, "b": 3, "c": 4}
    # upsert by external id and phone too, and null clears a field
    third = k(sb, "POST", JOBS, json=job_body([{"external_id": "X1", "phone_number": "+15005550006"}, {"external_id": "X1", "first_name": None, "title": "CTO"}])).json()
    wait_complete(sb, third["data"]["id"])
    assert len(account(sb)["profiles"]) == 2


def test_job_moves_queued_processing_complete_by_speed(sb):
    # queued for 0.3 s, then 1 s of processing: generous margins for a loaded machine
    sb.configure(klaviyo_profiles_per_second=1000, klaviyo_job_queue_seconds=0.3)
    job_id = k(sb, "POST", JOBS, json=job_body([{"email": f"s{i}@example.com"} for i in range(1000)])).json()["data"]["id"]
    first = k(sb, "GET", f"{JOBS}/{job_id}").json()["data"]["attributes"]
    assert first["status"] == "queued" and first["completed_count"] == 0 and first["started_at"] is None
    time.sleep(0.6)
    mid = k(sb, "GET", f"{JOBS}/{job_id}").json()["data"]["attributes"]
    assert mid["status"] == "processing"
    assert 0 < mid["completed_count"] < 1000
    assert 0 < len(account(sb)["lists"][KLAVIYO_LIST_ID]["profile_ids"]) < 1000
    done = wait_complete(sb, job_id)["data"]["attributes"]
    assert done["completed_count"] == 1000


def test_job_caps(sb):
    r = k(sb, "POST", JOBS, json=job_body([{"email": f"c{i}@example.com"} for i in range(10_001)]))
    assert "10000" in assert_klaviyo_error(r, 400, "invalid", "/data/attributes/profiles/data")["detail"]

    big = "x" * 101 * 1024
    r = k(sb, "POST", JOBS, json=job_body([{"email": "ok@example.com"}, {"email": "big@example.com", "properties": {"blob": big}}]))
    assert_klaviyo_error(r, 400, "invalid", "/data/attributes/profiles/data/1")

    filler = "y" * 1100
    r = k(sb, "POST", JOBS, json=job_body([{"email": f"f{i}@example.com", "properties": {"f": filler}} for i in range(5000)]))
    assert r.status_code == 413
    assert r.json()["errors"][0]["status"] == 413
    assert account(sb)["jobs"] == {}

    r = k(sb, "POST", JOBS, json=job_body([{"email": f"c{i}@example.com"} for i in range(10_000)]))
    assert r.status_code == 202


# --- single profile import and list relationships ----------------------------------------


def test_profile_import_create_then_update(sb):
    body = {"data": {"type": "profile", "attributes": {"email": "solo@example.com", "first_name": "Solo"}}}
    r = k(sb, "POST", "/api/profile-import", json=body)
    assert r.status_code == 201
    created = assert_matches_spec("klaviyo", "/api/profile-import", "post", r)["data"]
    body["data"]["attributes"] = {"email": "SOLO@example.com", "last_name": "Han"}
    r = k(sb, "POST", "/api/profile-import", json=body)
    assert r.status_code == 200
    updated = assert_matches_spec("klaviyo", "/api/profile-import", "post", r)["data"]
    assert updated["id"] == created["id"]
    assert (updated["attributes"]["first_name"], updated["attributes"]["last_name"]) == ("Solo", "Han")
    r = k(sb, "POST", "/api/profile-import", json={"data": {"type": "profile", "attributes": {"email": "nope"}}})
    assert_klaviyo_error(r, 400, "invalid", "/data/attributes/email")


def test_list_relationships_add_remove_and_cap(sb):
    ids = []
    for i in range(3):
        r = k(sb, "POST", "/api/profile-import", json={"data": {"type": "profile", "attributes": {"email": f"r{i}@example.com"}}})
        ids.append(r.json()["data"]["id"])
    path = f"/api/lists/{KLAVIYO_SECOND_LIST_ID}/relationships/profiles"
    r = k(sb, "POST", path, json={"data": [{"type": "profile", "id": pid} for pid in ids]})
    assert r.status_code == 204 and r.content == b""
    assert account(sb)["lists"][KLAVIYO_SECOND_LIST_ID]["profile_ids"] == ids
    r = k(sb, "DELETE", path, json={"data": [{"type": "profile", "id": ids[1]}]})
    assert r.status_code == 204
    assert account(sb)["lists"][KLAVIYO_SECOND_LIST_ID]["profile_ids"] == [ids[0], ids[2]]
    r = k(sb, "POST", path, json={"data": [{"type": "profile", "id": ids[0]}] * 1001})
    assert_klaviyo_error(r, 400, "invalid", "/data")
    r = k(sb, "POST", path, json={"data": [{"type": "profile", "id": "01UNKNOWN"}]})
    assert_klaviyo_error(r, 400, "invalid", "/data/0/id")
    assert_klaviyo_error(k(sb, "POST", "/api/lists/zzz/relationships/profiles", json={"data": []}), 404, "not_found")


def test_an_unknown_profile_id_in_a_list_call_can_be_answered_404(sb):
    """Switch klaviyo_unknown_profile_id: the spec lists only 4XX for a list call naming an id it does not have."""
    sb.configure(behaviour={"klaviyo_unknown_profile_id": 404})
    path = f"/api/lists/{KLAVIYO_SECOND_LIST_ID}/relationships/profiles"
    for method in ("POST", "DELETE"):
        r = k(sb, method, path, json={"data": [{"type": "profile", "id": "01UNKNOWN"}]})
        assert "01UNKNOWN" in assert_klaviyo_error(r, 404, "not_found")["detail"]


def test_suppressed_profile_updated_but_consent_untouched(sb):
    sb.suppress_klaviyo_email("Quiet@example.com")
    job_id = k(sb, "POST", JOBS, json=job_body([{"email": "quiet@example.com", "first_name": "Q"}])).json()["data"]["id"]
    wait_complete(sb, job_id)
    acc = account(sb)
    (pid, p) = next(iter(acc["profiles"].items()))
    assert len(acc["profiles"]) == 1
    assert p["first_name"] == "Q" and p["suppressed"] is True and p["consent"] == "UNSUBSCRIBED"
    assert pid in acc["lists"][KLAVIYO_LIST_ID]["profile_ids"]
    r = k(sb, "GET", f"{JOBS}/{job_id}/profiles?additional-fields[profile]=subscriptions")
    marketing = r.json()["data"][0]["attributes"]["subscriptions"]["email"]["marketing"]
    assert marketing["can_receive_email_marketing"] is False
    assert marketing["suppression"][0]["reason"] == "USER_SUPPRESSED"


def test_unknown_path_and_method(sb):
    assert_klaviyo_error(k(sb, "GET", "/api/nothing-here"), 404, "not_found")
    assert_klaviyo_error(k(sb, "PUT", f"/api/lists/{KLAVIYO_LIST_ID}", json={}), 405, "method_not_allowed")


# --- rate limits -------------------------------------------------------------------------


def test_burst_gets_429_with_retry_after_then_recovers():
    cfg = SandboxConfig(rate_limit_scale=0.3)  # bulk import jobs: 3/s burst, 45/min steady
    with Sandbox(cfg) as sb:
        ok = k(sb, "GET", JOBS)
        assert ok.status_code == 200
        assert ok.headers["RateLimit-Limit"] == "45" and int(ok.headers["RateLimit-Remaining"]) == 44

        while not 0.05 < time.time() % 1 < 0.4:  # windows are clock-aligned: burst inside one second
            time.sleep(0.01)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda _: k(sb, "POST", JOBS, json=job_body([{"email": "x@example.com"}])), range(8)))
        statuses = sorted(r.status_code for r in responses)
        assert statuses.count(202) == 3 and statuses.count(429) == 5, statuses
        throttled = next(r for r in responses if r.status_code == 429)
        err = assert_klaviyo_error(throttled, 429, "throttled")
        assert err["title"] == "Request was throttled."
        retry_after = int(throttled.headers["Retry-After"])
        assert 1 <= retry_after <= 60

        counts = sb.state()["requests"]["by_endpoint"][f"POST {JOBS}"]["status"]
        assert counts.get("429", 0) == statuses.count(429)
        # windows are per endpoint: another endpoint is not throttled
        assert k(sb, "GET", f"/api/lists/{KLAVIYO_LIST_ID}").status_code == 200
        time.sleep(min(retry_after, 1) + 0.05)
        assert k(sb, "POST", JOBS, json=job_body([{"email": "y@example.com"}])).status_code == 202
