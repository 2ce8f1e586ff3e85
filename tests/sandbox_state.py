"""Reading the API sandbox's end state in tests."""

from __future__ import annotations


def klaviyo_profiles(state: dict, list_id: str | None = None) -> dict[str, dict]:
    """The sandbox's Klaviyo profiles by lower-cased email (only the list's members when a list is given)."""
    (account,) = state["klaviyo"]["accounts"].values()
    ids = set(account["lists"][list_id]["profile_ids"]) if list_id else set(account["profiles"])
    return {p["email"].lower(): p for pid, p in account["profiles"].items() if pid in ids}


def mailchimp_members(state: dict, audience_id: str) -> dict[str, dict]:
    """The sandbox's Mailchimp members of an audience by lower-cased email."""
    (account,) = state["mailchimp"]["accounts"].values()
    return {m["email_address"].lower(): m for m in account["audiences"][audience_id]["members"].values()}
