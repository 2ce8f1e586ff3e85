"""The sync scenario under every value of every sandbox switch (``segment_export_sandbox.config.BEHAVIOURS``).

Where the vendors' documents are silent, the sandbox can behave each plausible way; the exporter must be right
under all of them (README, "Where the vendors' documents are silent"). Per destination and switch value:

1. a first run that is killed (SIGKILL, in its own process) while its first batch is in flight, then run again;
   Mailchimp runs with only 3 of the account's 10 connections free, so it is throttled throughout;
2. a rerun after 10 profiles changed and 5 left the warehouse (``on_leave: remove``);
3. throughout: a bad row, a profile the destination refuses or keeps its own way (a Mailchimp member who had
   unsubscribed; a Klaviyo profile suppressed before the export, and one whose phone belongs to another
   profile), and ``sent == accepted + rejected + skipped`` in every summary.

Each step checks what the sandbox holds, not only the summaries.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys

import pytest
import segment_data
from sandbox_state import klaviyo_profiles, mailchimp_members
from test_faults import wait_for
from segment_export_sandbox import KLAVIYO_LIST_ID, MAILCHIMP_AUDIENCE_ID
from segment_export_sandbox.config import BEHAVIOURS

from segment_export.destinations import destination_for
from segment_export.exporter import RunOptions, run_export
from segment_export.sources import source_for
from segment_export.spec import ExportSpec
from segment_export.state import StateStore
from segment_export.verify import run_verify

PROFILES = 1000  # 1,100 rows: every tenth customer is in two segments
CASES = [("defaults", None)] + [
    (f"{key}={value}", (key, value)) for key, values in BEHAVIOURS.items() for value in values[1:]
]

RUNNER = """
import json, sys
from segment_export.destinations import destination_for
from segment_export.exporter import RunOptions, run_export
from segment_export.sources import source_for
from segment_export.spec import ExportSpec
from segment_export.state import StateStore
spec = ExportSpec.model_validate(json.loads(sys.argv[1]))
state = StateStore.open(spec.state_conn_id, spec.id, destination_for(spec).target_id)
run_export(spec, source_for(spec.source), destination_for(spec), state=state, options=RunOptions(run_id="killed"))
"""


def raw_spec(destination: str) -> dict:
    if destination == "klaviyo":
        dest = {"type": "klaviyo", "list_id": KLAVIYO_LIST_ID, "subscribe": True}
        extra = {"consent": "opted_in"}
    else:
        dest = {"type": "mailchimp", "audience_id": MAILCHIMP_AUDIENCE_ID, "new_member_status": "subscribed"}
        extra = {}
    return {
        "id": f"behaviour_{destination}",
        "privacy_acknowledged": True,
        "source": {"conn_id": "warehouse", "table": "segment_members", "segment_column": "segment",
                   "segments": list(segment_data.SEGMENTS)},
        "destination": dest,
        "mapping": {"email": "email", "first_name": "first_name", "phone_number": "phone", **extra},
        "sync": {"on_leave": "remove"},
    }


def run(spec: ExportSpec, run_id: str):
    source, destination = source_for(spec.source), destination_for(spec)
    state = StateStore.open(spec.state_conn_id, spec.id, destination.target_id)
    try:
        summary = run_export(spec, source, destination, state=state, options=RunOptions(run_id=run_id))
    finally:
        source.close()
        state.close()
    assert summary.sent == summary.accepted + summary.rejected + summary.skipped, summary
    return summary


def drift(spec: ExportSpec) -> dict:
    """A verify pass (drift) after the scenario: what the target holds against the state, recorded, no repair."""
    destination = destination_for(spec)
    state = StateStore.open(spec.state_conn_id, spec.id, destination.target_id)
    try:
        return run_verify(spec, destination, state, run_id="verify", repair=False).as_dict()
    finally:
        state.close()


def sql(db, statement, params=()):
    with sqlite3.connect(db) as conn:
        return conn.execute(statement, params).fetchall()


def requests_to(sandbox, endpoint: str) -> int:
    return sandbox.state()["requests"]["by_endpoint"].get(endpoint, {}).get("count", 0)


def killed_then_rerun(sandbox, spec_raw: dict, in_flight) -> None:
    """Start the export in its own process, SIGKILL it once ``in_flight()`` is true, and run it again."""
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, json.dumps(spec_raw)], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: in_flight() or proc.poll() is not None)
        assert proc.poll() is None, f"the export ended before it could be killed: {proc.stdout.read()[-2000:]}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture
def scenario_db(segment_db):
    """The 1,000-customer table, plus a consent column, a bad row, and a row whose phone is another's."""
    sql(segment_db, "ALTER TABLE segment_members ADD COLUMN opted_in TEXT")
    sql(segment_db, "UPDATE segment_members SET opted_in = CASE WHEN customer_id % 3 = 0 THEN 'true' ELSE 'false' END")
    sql(segment_db, "INSERT INTO segment_members (customer_id, email, first_name, phone, segment, opted_in) "
                    "VALUES (100001, 'not-an-email', 'Bad', NULL, 'vip', 'true')")
    victim = sql(segment_db, "SELECT phone FROM segment_members WHERE customer_id = 7")[0][0]
    sql(segment_db, "INSERT INTO segment_members (customer_id, email, first_name, phone, segment, opted_in) "
                    "VALUES (100002, 'same.phone@example.com', 'Twin', ?, 'vip', 'false')", (victim,))
    return segment_db


def expected_members() -> dict[str, str]:
    """Email -> first name of every valid customer in the table (the twin included)."""
    return {r[1]: r[2] for r in segment_data.rows(PROFILES)} | {"same.phone@example.com": "Twin"}


@pytest.mark.parametrize("case", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_mailchimp_sync_scenario(case, scenario_db, sandbox):
    if case:
        sandbox.configure(behaviour=dict([case]))
    unsubscribed = next(r[1] for r in segment_data.rows(PROFILES) if r[0] == 11)
    sandbox.seed_mailchimp_member(MAILCHIMP_AUDIENCE_ID, unsubscribed, "unsubscribed")
    raw = raw_spec("mailchimp")
    spec = ExportSpec.model_validate(raw)

    # Other apps on the account hold 7 of its 10 connections: the exporter is throttled all along.
    sandbox.configure(latency={"mailchimp_batch": 1.5}, mailchimp_max_connections=3)
    try:
        killed_then_rerun(sandbox, raw, lambda: requests_to(sandbox, "POST /3.0/lists/{list_id}") >= 1)
        sandbox.configure(latency={"mailchimp_batch": 0.05})
        first = run(spec, "first")
    finally:
        sandbox.configure(latency={"mailchimp_batch": 0.0}, mailchimp_max_connections=10)
    assert first.invalid == 1 and first.rejected == 0
    members = mailchimp_members(sandbox.state(), MAILCHIMP_AUDIENCE_ID)
    expected = expected_members()
    assert set(members) == set(expected)
    assert members[unsubscribed]["status"] == "unsubscribed"  # an export never re-subscribes anyone
    assert all(m["status"] == "subscribed" for e, m in members.items() if e != unsubscribed)
    tags = {}
    for r in segment_data.rows(PROFILES):
        tags.setdefault(r[1], set()).add(r[-1])
    assert all(set(members[e]["tags"]) == t for e, t in tags.items())

    rows = list(segment_data.rows(PROFILES))
    changed = [r[1] for r in rows[20:30]]
    left = [r[1] for r in rows[40:45] if r[0] % 10]  # customers in one segment only
    sql(scenario_db, f"UPDATE segment_members SET first_name = 'Changed' WHERE email IN ({','.join('?' * len(changed))})", changed)
    sql(scenario_db, f"DELETE FROM segment_members WHERE email IN ({','.join('?' * len(left))})", left)
    sql(scenario_db, "UPDATE segment_members SET first_name = 'Again' WHERE email = ?", (unsubscribed,))
    rerun = run(spec, "rerun")
    assert rerun.sent == len(set(changed)) + 1 and rerun.accepted == rerun.sent and rerun.removed == len(left)
    members = mailchimp_members(sandbox.state(), MAILCHIMP_AUDIENCE_ID)
    assert all(members[e]["merge_fields"]["FNAME"] == "Changed" for e in changed)
    assert all(members[e]["tags"] == [] and members[e]["status"] == "subscribed" for e in left)
    assert members[unsubscribed]["status"] == "unsubscribed" and members[unsubscribed]["merge_fields"]["FNAME"] == "Again"
    assert run(spec, "quiet").sent == 0
    found = drift(spec)  # the audience's tagged members are what the state says, but for the one who unsubscribed
    assert (found["added_outside"], found["removed_outside"], found["unsubscribed"], found["suppressed"]) == (0, 0, 1, 0)
    assert found["held"] == len(expected) - len(left)


@pytest.mark.parametrize("case", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_klaviyo_sync_scenario(case, scenario_db, sandbox):
    if case:
        sandbox.configure(behaviour=dict([case]))
    behaviour = sandbox.configure()["behaviour"]
    suppressed = next(r[1] for r in segment_data.rows(PROFILES) if r[0] == 12)
    sandbox.suppress_klaviyo_email(suppressed)
    raw = raw_spec("klaviyo")
    spec = ExportSpec.model_validate(raw)

    sandbox.configure(klaviyo_profiles_per_second=400.0)  # the first run's one job takes ~2.5 s
    try:
        inflight = lambda: bool(sql(scenario_db, "SELECT count(*) FROM sqlite_master WHERE name = 'segment_export_inflight_batches'")[0][0]) and bool(  # noqa: E731
            sql(scenario_db, "SELECT count(*) FROM segment_export_inflight_batches WHERE job_id IS NOT NULL")[0][0])
        killed_then_rerun(sandbox, raw, inflight)
        first = run(spec, "first")
    finally:
        sandbox.configure(klaviyo_profiles_per_second=200_000.0)
    (account,) = sandbox.state()["klaviyo"]["accounts"].values()
    # The killed run's job was awaited; a subscribing export then sends its profiles once more (only keys are kept
    # in flight, not consent: README), so at most one more job, and none left unfinished.
    assert len(account["jobs"]) <= 2 and all(j["status"] == "complete" for j in account["jobs"].values())
    assert first.invalid == 1

    held = klaviyo_profiles(sandbox.state(), KLAVIYO_LIST_ID)
    expected = expected_members()
    twin, victim = "same.phone@example.com", next(r[1] for r in segment_data.rows(PROFILES) if r[0] == 7)
    # every customer without an identity conflict is in the list, with its name
    plain = {e: n for e, n in expected.items() if e not in (twin, victim)}
    assert all(held[e]["first_name"] == n for e, n in plain.items())
    outcomes = dict(sql(scenario_db, "SELECT profile_key, action FROM segment_export_outcomes WHERE run_id = 'first'"))
    if behaviour["klaviyo_identifier_conflict"] == "reject":
        assert twin not in held and outcomes.get(twin) == "rejected"
    consenting = {r[1] for r in segment_data.rows(PROFILES) if r[0] % 3 == 0} - {suppressed}
    state_consent = {e: held[e]["consent"] for e in consenting if e in held}
    if behaviour["klaviyo_list_opt_in"] == "double":
        assert all(c != "SUBSCRIBED" for c in state_consent.values())  # a confirmation is sent; not subscribed yet
    else:
        assert all(c == "SUBSCRIBED" for e, c in state_consent.items() if e not in (twin, victim))
    assert klaviyo_profiles(sandbox.state())[suppressed]["consent"] != "SUBSCRIBED"

    rows = list(segment_data.rows(PROFILES))
    changed = [r[1] for r in rows[20:30]]
    left = [r[1] for r in rows[40:45] if r[0] % 10]
    sql(scenario_db, f"UPDATE segment_members SET first_name = 'Changed' WHERE email IN ({','.join('?' * len(changed))})", changed)
    sql(scenario_db, f"DELETE FROM segment_members WHERE email IN ({','.join('?' * len(left))})", left)
    rerun = run(spec, "rerun")
    assert rerun.removed == len(left)
    held = klaviyo_profiles(sandbox.state(), KLAVIYO_LIST_ID)
    assert all(held[e]["first_name"] == "Changed" for e in changed)
    assert not set(left) & set(held)
    assert all(e in klaviyo_profiles(sandbox.state()) for e in left)  # removed from the list, never deleted
    found = drift(spec)
    assert (found["added_outside"], found["unsubscribed"], found["suppressed"]) == (0, 1, 0)  # the suppressed one
    # Merged by a shared phone number, the twin and its victim are one profile under one address: the other
    # address, remembered by the state, is not in the list (drift the verify run reports as removed outside).
    merged = behaviour["klaviyo_identifier_conflict"] == "merge"
    assert found["removed_outside"] == (1 if merged else 0)
    removed = [k for k, r in sql(scenario_db, "SELECT profile_key, reason FROM segment_export_outcomes "
                                              "WHERE run_id = 'verify' AND reason = 'removed_outside'")]
    assert set(removed) <= {twin, victim}
