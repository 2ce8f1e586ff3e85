"""Klaviyo consent through a real export run against the sandbox: suppressed profiles, explicit subscriptions.

* Suppressed profiles (unsubscribed, bounced, spam complaint) are imported and stay in the list, but cannot be
  emailed: each run reports them as ``skipped`` with Klaviyo's reason and remembers them (not retried).
* With ``destination.subscribe`` (explicit opt-in) and ``mapping.consent``, rows whose consent is true are
  subscribed (Bulk Subscribe Profiles); suppressed profiles are never sent to it (it would lift their
  suppression); nobody is ever unsubscribed; a consent that flips from false to true is acted on next run.
"""

from __future__ import annotations

import sqlite3

import pytest
from sandbox_state import klaviyo_profiles
from segment_export_sandbox import KLAVIYO_LIST_ID
from test_sync import KLAVIYO, make_spec, run, sql, vip, writes

from segment_export.state import OUTCOMES_TABLE, STATE_TABLE

SUBSCRIBE = "POST /api/profile-subscription-bulk-create-jobs"
LOOKUP = "GET /api/profiles"


def requests_to(sandbox, endpoint: str) -> int:
    return sandbox.state()["requests"]["by_endpoint"].get(endpoint, {}).get("count", 0)


def test_suppressed_profiles_are_skipped_with_klaviyos_reason_and_not_retried(segment_db, sandbox):
    rows = vip()
    quiet = [rows[0][1], rows[5][1]]
    for email in quiet:
        sandbox.suppress_klaviyo_email(email.upper())  # identity is case-insensitive
    spec = make_spec({**KLAVIYO, "report_suppressed": True})
    first = run(spec)
    assert (first.sent, first.accepted, first.skipped, first.rejected) == (len(rows), len(rows) - 2, 2, 0)
    assert first.skipped_reasons == {"suppressed in Klaviyo: USER_SUPPRESSED": 2}
    assert first.consistent and first.subscribed is None
    # One lookup per 100 profiles sent (the sandbox's 1,000 customers give fewer than 100 VIPs: one request).
    assert requests_to(sandbox, LOOKUP) == -(-len(rows) // 100)
    held = klaviyo_profiles(sandbox.state(), KLAVIYO_LIST_ID)
    assert set(held) == {r[1] for r in rows}  # Klaviyo keeps them, in the list, updated ...
    assert all(held[e]["suppressed"] and held[e]["consent"] == "UNSUBSCRIBED" for e in quiet)  # ... and suppressed
    assert held[quiet[0]]["first_name"] == rows[0][2]
    outcomes = sql(segment_db, f"SELECT profile_key, reason FROM {OUTCOMES_TABLE} WHERE action = 'skipped'")
    assert sorted(outcomes) == sorted((e, "suppressed in Klaviyo: USER_SUPPRESSED") for e in quiet)
    assert len(sql(segment_db, f"SELECT 1 FROM {STATE_TABLE}")) == len(rows)  # remembered, so ...
    before = writes(sandbox)
    again = run(spec)
    assert (again.sent, again.skipped, again.unchanged) == (0, 0, len(rows))  # ... not retried
    assert writes(sandbox) == before


def test_the_suppression_lookup_is_off_by_default_without_subscribe(segment_db, sandbox):
    sandbox.suppress_klaviyo_email(vip()[0][1])
    for destination in (KLAVIYO, {**KLAVIYO, "report_suppressed": False}):
        sandbox.reset()
        summary = run(make_spec(destination, id=f"off_{len(destination)}"))
        assert (summary.accepted, summary.skipped) == (len(vip()), 0)
        assert requests_to(sandbox, LOOKUP) == 0


def consent_db(tmp_path, airflow_conn, rows):
    db = tmp_path / "consent.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE segment_members (email TEXT, first_name TEXT, opted_in TEXT, segment TEXT)")
        conn.executemany("INSERT INTO segment_members VALUES (?, ?, ?, 'vip')", rows)
    airflow_conn("warehouse", conn_type="sqlite", host=str(db))
    return db


SUBSCRIBING = {**KLAVIYO, "subscribe": True}
CONSENT_MAPPING = {"email": "email", "first_name": "first_name", "consent": "opted_in"}


def consents(sandbox) -> dict[str, str]:
    return {e: p["consent"] for e, p in klaviyo_profiles(sandbox.state()).items()}


def test_only_consenting_rows_are_subscribed_and_never_a_suppressed_one(tmp_path, sandbox, airflow_conn):
    consent_db(tmp_path, airflow_conn, [
        ("yes@example.com", "Y", "true"), ("no@example.com", "N", "false"), ("blank@example.com", "B", None),
        ("Quiet@example.com", "Q", "yes"), ("already@example.com", "A", "1"),
    ])
    sandbox.suppress_klaviyo_email("quiet@example.com")
    spec = make_spec(SUBSCRIBING, mapping=CONSENT_MAPPING)
    summary = run(spec)
    assert consents(sandbox) == {
        "yes@example.com": "SUBSCRIBED", "already@example.com": "SUBSCRIBED",
        "no@example.com": "NEVER_SUBSCRIBED", "blank@example.com": "NEVER_SUBSCRIBED",
        "quiet@example.com": "UNSUBSCRIBED",  # suppressed: never sent to the subscribe call, which would lift it
    }
    held = klaviyo_profiles(sandbox.state(), KLAVIYO_LIST_ID)
    assert len(held) == 5 and held["quiet@example.com"]["suppressed"] is True
    assert "opted_in" not in str(held) and "subscribe" not in str(held)  # the consent column is never sent itself
    assert (summary.accepted, summary.skipped, summary.subscribed) == (4, 1, 2)
    assert requests_to(sandbox, SUBSCRIBE) == 1  # both in one request (up to 1,000 a request)
    assert held["yes@example.com"]["consent_source"] == "segment-export sync_test"
    assert run(spec).sent == 0 and requests_to(sandbox, SUBSCRIBE) == 1  # unchanged: nothing sent


def test_consent_that_flips_is_acted_on_next_run_and_never_unsubscribes(tmp_path, sandbox, airflow_conn):
    db = consent_db(tmp_path, airflow_conn, [("flip@example.com", "F", "false"), ("stay@example.com", "S", "false")])
    spec = make_spec(SUBSCRIBING, mapping=CONSENT_MAPPING)
    first = run(spec)
    assert (first.sent, first.subscribed) == (2, 0) and requests_to(sandbox, SUBSCRIBE) == 0
    sql(db, "UPDATE segment_members SET opted_in = 'true' WHERE email = 'flip@example.com'")
    second = run(spec)  # the consent is part of the fingerprint: the row changed
    assert (second.sent, second.unchanged, second.subscribed) == (1, 1, 1)
    assert consents(sandbox) == {"flip@example.com": "SUBSCRIBED", "stay@example.com": "NEVER_SUBSCRIBED"}
    sql(db, "UPDATE segment_members SET opted_in = 'false' WHERE email = 'flip@example.com'")
    third = run(spec)
    assert (third.sent, third.subscribed) == (1, 0)
    assert consents(sandbox)["flip@example.com"] == "SUBSCRIBED"  # consent withdrawn in the warehouse: not unsubscribed
    assert requests_to(sandbox, SUBSCRIBE) == 1


def test_dry_run_shows_who_would_be_subscribed_and_sends_nothing(tmp_path, sandbox, airflow_conn):
    consent_db(tmp_path, airflow_conn, [("yes@example.com", "Y", "true")])
    summary = run(make_spec(SUBSCRIBING, mapping=CONSENT_MAPPING), dry_run=True)
    assert summary.examples[0]["payload"]["subscribe"] is True and "yes@" not in str(summary.examples)
    assert writes(sandbox) == {}


def test_subscribing_is_an_explicit_opt_in_with_a_consent_column():
    with pytest.raises(ValueError, match="destination.subscribe: true"):
        make_spec(KLAVIYO, mapping={"email": "email", "consent": "opted_in"})
    with pytest.raises(ValueError, match="destination.subscribe: true"):
        make_spec(SUBSCRIBING)
    with pytest.raises(ValueError, match="'subscribe' needs 'report_suppressed'"):
        make_spec({**SUBSCRIBING, "report_suppressed": False}, mapping={"email": "email", "consent": "opted_in"})
