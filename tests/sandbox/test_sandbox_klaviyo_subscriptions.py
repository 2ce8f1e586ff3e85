"""Klaviyo consent in the sandbox over real HTTP: the subscriptions lookup and Bulk Subscribe Profiles.

Request bodies are validated against the reference spec's request schema before they are sent, so the sandbox
is only ever shown requests Klaviyo's own document allows; answers are validated against its response schemas.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
from sandbox_testlib import _to_jsonschema, assert_klaviyo_error, assert_matches_spec, klaviyo_spec
from test_sandbox_klaviyo import account, job_body, k, wait_complete

from segment_export_sandbox import KLAVIYO_LIST_ID, KLAVIYO_SECOND_LIST_ID

SUBSCRIBE = "/api/profile-subscription-bulk-create-jobs"


def subscribe_body(emails, list_id=KLAVIYO_LIST_ID, historical=None, consented_at=None, source="test") -> dict:
    marketing = {"consent": "SUBSCRIBED", **({"consented_at": consented_at} if consented_at else {})}
    attrs = {"custom_source": source, "profiles": {"data": [
        {"type": "profile", "attributes": {"email": e, "subscriptions": {"email": {"marketing": marketing}}}} for e in emails
    ]}}
    if historical is not None:
        attrs["historical_import"] = historical
    body = {"data": {"type": "profile-subscription-bulk-create-job", "attributes": attrs}}
    if list_id:
        body["data"]["relationships"] = {"list": {"data": {"type": "list", "id": list_id}}}
    return body


def assert_request_matches_spec(body: dict) -> None:
    spec = klaviyo_spec()
    schema = spec["paths"][SUBSCRIBE]["post"]["requestBody"]["content"]["application/vnd.api+json"]["schema"]
    jsonschema.validate(body, _to_jsonschema(spec, schema))


def post_subscribe(sb, body: dict, *, valid: bool = True):
    if valid:
        assert_request_matches_spec(body)
    return k(sb, "POST", SUBSCRIBE, data=json.dumps(body))


def profiles_by_email(sb) -> dict[str, dict]:
    return {p["email"].lower(): p for p in account(sb)["profiles"].values()}


def lookup(sb, emails: list[str]) -> dict[str, dict]:
    r = k(sb, "GET", "/api/profiles", params={
        "filter": f"any(email,{json.dumps(emails)})", "page[size]": 100,
        "additional-fields[profile]": "subscriptions", "fields[profile]": "email,subscriptions",
    })
    body = assert_matches_spec("klaviyo", "/api/profiles", "get", r)
    return {p["attributes"]["email"].lower(): p["attributes"] for p in body["data"]}


def test_lookup_by_email_renders_consent_and_suppression_only_when_asked(sb):
    r = k(sb, "POST", "/api/profile-bulk-import-jobs", data=json.dumps(job_body([{"email": f"p{i}@example.com"} for i in range(3)])))
    wait_complete(sb, r.json()["data"]["id"])
    sb.suppress_klaviyo_email("P1@example.com")
    found = lookup(sb, ["p0@example.com", "P1@EXAMPLE.COM", "nobody@example.com"])
    assert set(found) == {"p0@example.com", "p1@example.com"}  # unknown addresses are absent; case-insensitive
    assert all(set(a) == {"email", "subscriptions"} for a in found.values())  # the sparse fieldset
    quiet, fine = found["p1@example.com"]["subscriptions"]["email"]["marketing"], found["p0@example.com"]["subscriptions"]["email"]["marketing"]
    assert (quiet["can_receive_email_marketing"], quiet["consent"], quiet["suppression"][0]["reason"]) == (False, "UNSUBSCRIBED", "USER_SUPPRESSED")
    assert (fine["can_receive_email_marketing"], fine["consent"], fine["suppression"]) == (True, "NEVER_SUBSCRIBED", [])
    r = k(sb, "GET", "/api/profiles", params={"filter": 'equals(email,"p0@example.com")'})
    assert "subscriptions" not in assert_matches_spec("klaviyo", "/api/profiles", "get", r)["data"][0]["attributes"]


def test_bulk_subscribe_is_202_without_body_and_subscribes_into_the_list(sb):
    r = post_subscribe(sb, subscribe_body(["New@example.com", "other@example.com"], source="segment-export vip"))
    assert r.status_code == 202 and r.content == b""
    held = profiles_by_email(sb)
    assert {e: p["consent"] for e, p in held.items()} == {"new@example.com": "SUBSCRIBED", "other@example.com": "SUBSCRIBED"}
    assert held["new@example.com"]["consent_source"] == "segment-export vip" and held["new@example.com"]["consent_timestamp"]
    assert set(account(sb)["lists"][KLAVIYO_LIST_ID]["profile_ids"]) == set(account(sb)["profiles"])
    marketing = lookup(sb, ["new@example.com"])["new@example.com"]["subscriptions"]["email"]["marketing"]
    assert (marketing["consent"], marketing["custom_method_detail"]) == ("SUBSCRIBED", "segment-export vip")


def test_bulk_subscribe_lifts_a_user_suppression_as_the_spec_says(sb):
    sb.suppress_klaviyo_email("quiet@example.com")
    assert post_subscribe(sb, subscribe_body(["quiet@example.com"], list_id=None)).status_code == 202
    p = profiles_by_email(sb)["quiet@example.com"]
    assert (p["suppressed"], p["consent"]) == (False, "SUBSCRIBED")  # why the exporter never sends suppressed profiles
    assert account(sb)["lists"][KLAVIYO_LIST_ID]["profile_ids"] == []  # no list given: consent only


def test_consented_at_only_with_historical_import_and_in_the_past(sb):
    r = post_subscribe(sb, subscribe_body(["a@example.com"], consented_at="2024-01-01T00:00:00+00:00"))
    assert "historical_import" in assert_klaviyo_error(r, 400, "invalid", "/data/attributes/profiles/data/0/attributes/subscriptions/email/marketing/consented_at")["detail"]
    r = post_subscribe(sb, subscribe_body(["a@example.com"], historical=True))
    assert_klaviyo_error(r, 400, "invalid", "/data/attributes/profiles/data/0/attributes/subscriptions/email/marketing/consented_at")
    r = post_subscribe(sb, subscribe_body(["a@example.com"], historical=True, consented_at="2999-01-01T00:00:00+00:00"))
    assert "past" in assert_klaviyo_error(r, 400, "invalid")["detail"]
    r = post_subscribe(sb, subscribe_body(["a@example.com"], historical=True, consented_at="2024-01-01T00:00:00+00:00"))
    assert r.status_code == 202
    assert profiles_by_email(sb)["a@example.com"]["consent_timestamp"] == "2024-01-01T00:00:00+00:00"


@pytest.mark.parametrize("mutate, pointer", [
    (lambda b: b["data"].update(type="profile-bulk-import-job"), "/data/type"),
    (lambda b: b["data"]["attributes"]["profiles"]["data"][0]["attributes"].pop("subscriptions"), "/data/attributes/profiles/data/0/attributes/subscriptions"),
    (lambda b: b["data"]["attributes"]["profiles"]["data"][0]["attributes"]["subscriptions"]["email"]["marketing"].update(consent="UNSUBSCRIBED"),
     "/data/attributes/profiles/data/0/attributes/subscriptions/email/marketing/consent"),
    (lambda b: b["data"]["attributes"]["profiles"]["data"][0]["attributes"].update(email="not-an-address"), "/data/attributes/profiles/data/0/attributes/email"),
    (lambda b: b["data"]["relationships"]["list"]["data"].update(id="NoSuch"), "/data/relationships/list/data/id"),
])
def test_bulk_subscribe_refuses_what_the_spec_refuses(sb, mutate, pointer):
    body = subscribe_body(["a@example.com"])
    mutate(body)
    assert_klaviyo_error(post_subscribe(sb, body, valid=False), 400, "invalid", pointer)
    assert profiles_by_email(sb) == {}  # nothing applied


def test_bulk_subscribe_takes_at_most_1000_profiles(sb):
    emails = [f"p{i}@example.com" for i in range(1001)]
    assert_klaviyo_error(post_subscribe(sb, subscribe_body(emails)), 400, "invalid", "/data/attributes/profiles/data")
    assert post_subscribe(sb, subscribe_body(emails[:1000], list_id=KLAVIYO_SECOND_LIST_ID)).status_code == 202
    assert len(account(sb)["lists"][KLAVIYO_SECOND_LIST_ID]["profile_ids"]) == 1000
