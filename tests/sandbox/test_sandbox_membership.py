"""The membership reads a verify run makes (Klaviyo Get Profiles for List, Mailchimp List members in segment),
over real HTTP with bodies checked against the reference specs, and the control calls that edit by hand."""

from __future__ import annotations

import hashlib

import pytest
import requests
from sandbox_testlib import assert_klaviyo_error, assert_matches_spec

from segment_export_sandbox import KLAVIYO_API_KEY, KLAVIYO_LIST_ID, MAILCHIMP_API_KEY, MAILCHIMP_AUDIENCE_ID, Sandbox

HEADERS = {"Authorization": f"Klaviyo-API-Key {KLAVIYO_API_KEY}", "revision": "2026-07-15", "Accept": "application/vnd.api+json"}
LIST_PROFILES = f"/api/lists/{KLAVIYO_LIST_ID}/profiles"
AUD = MAILCHIMP_AUDIENCE_ID


def k(sb: Sandbox, path: str, **params) -> requests.Response:
    return requests.get(sb.url + path, headers=HEADERS, params=params, timeout=30)


def mc(sb: Sandbox, path: str, **params) -> requests.Response:
    return requests.get(sb.mailchimp_host + path, auth=("any", MAILCHIMP_API_KEY), params=params, timeout=30)


def klaviyo_list(sb: Sandbox, n: int) -> list[str]:
    emails = [f"p{i:03d}@example.org" for i in range(n)]
    for email in emails:
        sb.edit_klaviyo_list(KLAVIYO_LIST_ID, email, "add")
    return emails


def all_pages(sb: Sandbox, **params) -> list[dict]:
    """Every page; each checked against the spec's response schema unless a sparse fieldset was asked for (the
    schema requires ``joined_group_at``, which a sparse fieldset leaves out)."""
    found, r = [], k(sb, LIST_PROFILES, **params)
    sparse = "fields[profile]" in params
    while True:
        body = r.json() if sparse else assert_matches_spec("klaviyo", "/api/lists/{id}/profiles", "get", r)
        assert r.status_code == 200
        found += body["data"]
        if not body["links"].get("next"):
            return found
        r = requests.get(body["links"]["next"], headers=HEADERS, timeout=30)


def test_klaviyo_list_profiles_pages_by_cursor_with_sparse_fields_and_subscriptions(sb):
    emails = klaviyo_list(sb, 45)
    sb.suppress_klaviyo_email(emails[3])
    found = all_pages(sb, **{"page[size]": 20, "fields[profile]": "email,subscriptions", "additional-fields[profile]": "subscriptions"})
    assert [p["attributes"]["email"] for p in found] == emails  # oldest membership first (the default switch)
    assert set(found[0]["attributes"]) == {"email", "subscriptions"}
    marketing = found[3]["attributes"]["subscriptions"]["email"]["marketing"]
    assert marketing["consent"] == "UNSUBSCRIBED" and marketing["suppression"][0]["reason"] == "USER_SUPPRESSED"
    whole = all_pages(sb)  # default page size 20: three pages, each valid against the spec
    assert len(whole) == 45 and whole[0]["attributes"]["joined_group_at"]


def test_klaviyo_list_profiles_refuses_bad_sizes_and_filters_and_honours_sort_and_email_filter(sb):
    emails = klaviyo_list(sb, 5)
    assert_klaviyo_error(k(sb, LIST_PROFILES, **{"page[size]": 101}), 400, "invalid")
    assert_klaviyo_error(k(sb, LIST_PROFILES, filter="equals(first_name,'x')"), 400, "invalid")
    assert_klaviyo_error(k(sb, LIST_PROFILES, sort="email"), 400, "invalid")
    newest = all_pages(sb, sort="-joined_group_at")
    assert [p["attributes"]["email"] for p in newest] == emails[::-1]
    picked = all_pages(sb, filter=f'any(email,["{emails[1]}","{emails[4].upper()}"])')
    assert [p["attributes"]["email"] for p in picked] == [emails[1], emails[4]]
    assert_klaviyo_error(k(sb, "/api/lists/NOPE/profiles"), 404, "not_found")


def test_klaviyo_list_profiles_order_switch(sb):
    emails = klaviyo_list(sb, 3)
    sb.configure(behaviour={"klaviyo_list_profiles_order": "newest"})
    assert [p["attributes"]["email"] for p in all_pages(sb)] == emails[::-1]


def test_klaviyo_hand_edits_change_membership_only(sb):
    (email,) = klaviyo_list(sb, 1)
    sb.edit_klaviyo_list(KLAVIYO_LIST_ID, email, "remove")
    assert all_pages(sb) == []
    (account,) = sb.state()["klaviyo"]["accounts"].values()
    (profile,) = account["profiles"].values()
    assert profile["email"] == email and profile["consent"] == "NEVER_SUBSCRIBED"  # the profile stays
    r = requests.post(sb.url + f"/_sandbox/klaviyo/lists/{KLAVIYO_LIST_ID}/members", json={"email": email, "action": "add"}, timeout=10)
    assert r.status_code == 200 and r.json()["member"] is True and len(all_pages(sb)) == 1
    r = requests.post(sb.url + f"/_sandbox/klaviyo/lists/{KLAVIYO_LIST_ID}/members", json={"email": email, "action": "drop"}, timeout=10)
    assert r.status_code == 400


def segment_id(sb: Sandbox, name: str) -> int:
    body = assert_matches_spec("mailchimp", "/lists/{list_id}/segments", "get", mc(sb, f"/lists/{AUD}/segments", count=1000))
    return next(s["id"] for s in body["segments"] if s["name"] == name)


def seed_tagged(sb: Sandbox) -> dict[str, str]:
    statuses = {"sub@example.org": "subscribed", "pend@example.org": "pending", "unsub@example.org": "unsubscribed",
                "clean@example.org": "cleaned", "trans@example.org": "transactional", "arch@example.org": "archived"}
    for email, status in statuses.items():
        sb.seed_mailchimp_member(AUD, email, status, tags=["news"])
    sb.seed_mailchimp_member(AUD, "other@example.org", "subscribed", tags=["other"])
    return statuses


@pytest.mark.parametrize("include_by_default", [False, True])
def test_mailchimp_segment_members_include_flags_and_their_undocumented_default(sb, include_by_default):
    sb.configure(behaviour={"mailchimp_segment_members_include_by_default": include_by_default})
    seed_tagged(sb)
    path = f"/lists/{AUD}/segments/{segment_id(sb, 'news')}/members"
    plain = assert_matches_spec("mailchimp", "/lists/{list_id}/segments/{segment_id}/members", "get", mc(sb, path, count=1000))
    shown = {m["email_address"] for m in plain["members"]}
    always = {"sub@example.org", "pend@example.org"}
    assert shown == (always | {"unsub@example.org", "clean@example.org", "trans@example.org"} if include_by_default else always)
    asked = mc(sb, path, count=1000, include_cleaned="true", include_transactional="true", include_unsubscribed="true",
               fields="members.email_address,members.status,total_items")
    body = assert_matches_spec("mailchimp", "/lists/{list_id}/segments/{segment_id}/members", "get", asked)
    assert body["total_items"] == 5 and set(body) == {"members", "total_items"}  # archived members are not tagged members
    assert all(set(m) == {"email_address", "status"} for m in body["members"])
    assert {m["email_address"]: m["status"] for m in body["members"]}["clean@example.org"] == "cleaned"
    paged = mc(sb, path, count=2, offset=4, include_cleaned="true", include_transactional="true", include_unsubscribed="true")
    assert len(paged.json()["members"]) == 1


def test_mailchimp_members_list_honours_fields(sb):
    seed_tagged(sb)
    body = assert_matches_spec("mailchimp", "/lists/{list_id}/members", "get",
                               mc(sb, f"/lists/{AUD}/members", count=1000, fields="members.email_address,members.tags"))
    assert set(body) == {"members"} and all(set(m) == {"email_address", "tags"} for m in body["members"])


def test_mailchimp_untag_by_hand(sb):
    sb.seed_mailchimp_member(AUD, "sub@example.org", "subscribed", tags=["news", "vip"])
    r = requests.post(sb.url + f"/_sandbox/mailchimp/audiences/{AUD}/untag", json={"email_address": "sub@example.org", "tag": "news"}, timeout=10)
    assert r.status_code == 200
    (account,) = sb.state()["mailchimp"]["accounts"].values()
    member = account["audiences"][AUD]["members"][hashlib.md5(b"sub@example.org").hexdigest()]
    assert member["tags"] == ["vip"] and member["status"] == "subscribed"
    r = requests.post(sb.url + f"/_sandbox/mailchimp/audiences/{AUD}/untag", json={"email_address": "nobody@example.org", "tag": "news"}, timeout=10)
    assert r.status_code == 404
