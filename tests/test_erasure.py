"""Erasure requests end to end in one process: exports to both destinations, an erasure run through the operator,
then the next exports. Checked by what the sandbox holds, the receipts and the state (issue 13).

The Klaviyo deletion delay is undocumented: every scenario runs under each value of the sandbox switch
``klaviyo_profile_deletion`` (immediate, deferred)."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timezone

import pytest
import segment_data
from sandbox_state import klaviyo_profiles, mailchimp_members
from segment_export_sandbox import KLAVIYO_API_KEY, KLAVIYO_LIST_ID, KLAVIYO_SECOND_LIST_ID, MAILCHIMP_AUDIENCE_ID
from segment_export_sandbox.config import BEHAVIOURS

from segment_export.destinations import destination_for
from segment_export.erasure import ErasureFailedError, erasure_targets
from segment_export.exporter import RunOptions, run_export
from segment_export.operators.erasure import SegmentExportErasureOperator
from segment_export.sources import source_for
from segment_export.spec import ErasureSpec, ExportSpec
from segment_export.state import ErasureStore, StateStore

DELETION = BEHAVIOURS["klaviyo_profile_deletion"]


def export_spec(export_id: str, destination: dict, segments: list[str]) -> ExportSpec:
    return ExportSpec.model_validate({
        "id": export_id, "privacy_acknowledged": True,
        "source": {"conn_id": "warehouse", "table": "segment_members", "segment_column": "segment", "segments": segments},
        "destination": destination, "mapping": {"email": "email", "first_name": "first_name"},
    })


EXPORTS = [
    export_spec("vip_klaviyo", {"type": "klaviyo", "list_id": KLAVIYO_LIST_ID}, ["vip"]),
    export_spec("newsletter_klaviyo", {"type": "klaviyo", "list_id": KLAVIYO_SECOND_LIST_ID}, ["newsletter", "vip"]),
    export_spec("newsletter_mailchimp", {"type": "mailchimp", "audience_id": MAILCHIMP_AUDIENCE_ID,
                                         "new_member_status": "subscribed"}, ["newsletter", "vip"]),
]
ERASURE = ErasureSpec.model_validate({
    "source": {"conn_id": "warehouse", "table": "erasure_requests"},
    "mapping": {"email": "email", "request_id": "request_id", "requested_at": "requested_at"},
})


def run(spec: ExportSpec, run_id: str):
    destination = destination_for(spec)
    state = StateStore.open(spec.state_conn_id, spec.id, destination.target_id)
    source = source_for(spec.source)
    try:
        return run_export(spec, source, destination, state=state, options=RunOptions(run_id=run_id))
    finally:
        source.close()
        state.close()


def request_erasure(db, *requests: tuple[str, str]) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS erasure_requests (request_id TEXT, email TEXT, requested_at TEXT)")
        conn.executemany("INSERT INTO erasure_requests VALUES (?, ?, '2026-12-01T09:00:00Z')", requests)


def erase() -> dict:
    return SegmentExportErasureOperator(task_id="erase", erasure=ERASURE, exports=EXPORTS).execute({})


def receipts(db) -> list[dict]:
    conn = sqlite3.connect(db)
    try:
        return ErasureStore(conn, "?").receipts()
    finally:
        conn.close()


def state_keys(db, export_id: str) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {k for (k,) in conn.execute("SELECT profile_key FROM segment_export_state WHERE export_id = ?", (export_id,))}


def outcomes(db, export_id: str, run_id: str) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT profile_key, action, reason FROM segment_export_outcomes WHERE export_id = ? AND run_id = ?",
                            (export_id, run_id)).fetchall()


def held(sandbox) -> dict[str, set[str]]:
    state = sandbox.state()
    return {KLAVIYO_LIST_ID: set(klaviyo_profiles(state, KLAVIYO_LIST_ID)),
            KLAVIYO_SECOND_LIST_ID: set(klaviyo_profiles(state, KLAVIYO_SECOND_LIST_ID)),
            "klaviyo": set(klaviyo_profiles(state)),
            MAILCHIMP_AUDIENCE_ID: set(mailchimp_members(state, MAILCHIMP_AUDIENCE_ID))}


@pytest.mark.parametrize("deletion", DELETION)
def test_an_erasure_removes_the_person_everywhere_and_no_export_sends_them_again(segment_db, sandbox, deletion):
    sandbox.configure(behaviour={"klaviyo_profile_deletion": deletion},
                      latency={"klaviyo_deletion": 3600.0 if deletion == "deferred" else 0.0})
    for spec in EXPORTS:
        assert run(spec, "first").consistent
    vip = next(r for r in segment_data.rows(1000) if r[-1] == "vip")
    email = vip[1]
    before = held(sandbox)
    assert all(email in members for members in before.values())

    request_erasure(segment_db, ("req-1", email.upper()))  # the source's spelling does not matter
    summary = erase()
    assert (summary["requests"], summary["sent"], summary["answered"], summary["failed"]) == (1, 2, 2, 0)
    # one receipt per destination target: the Klaviyo account (one deletion covers both lists), the audience
    got = {(r["destination"], r["target_id"]): r for r in receipts(segment_db)}
    assert set(got) == {("klaviyo", "account"), ("mailchimp", MAILCHIMP_AUDIENCE_ID)}
    assert got[("klaviyo", "account")]["answer"].startswith("202") and got[("mailchimp", MAILCHIMP_AUDIENCE_ID)]["answer"].startswith("204")
    assert all(r["request_id"] == "req-1" and r["answered_at"] and r["requested_at"] == "2026-12-01T09:00:00Z" for r in got.values())
    assert all(email not in state_keys(segment_db, spec.id) for spec in EXPORTS)  # the state no longer claims them

    after = held(sandbox)
    assert email not in after[MAILCHIMP_AUDIENCE_ID]
    assert email in sandbox.state()["mailchimp"]["accounts"][next(iter(sandbox.state()["mailchimp"]["accounts"]))]["audiences"][MAILCHIMP_AUDIENCE_ID]["forgotten"]
    if deletion == "deferred":  # Klaviyo has the request; the profile is still there until Klaviyo gets to it
        assert email in after["klaviyo"]
    else:
        assert all(email not in after[k] for k in (KLAVIYO_LIST_ID, KLAVIYO_SECOND_LIST_ID, "klaviyo"))

    # The next exports: the address is still in the segment, skipped as erased, not re-created anywhere.
    today = datetime.now(timezone.utc).date().isoformat()
    for spec in EXPORTS:
        s = run(spec, "second")
        assert s.consistent and s.skipped == 1 and s.skipped_reasons == {f"erased on {today}": 1}, s.as_dict()
        assert s.accepted == 0 and s.rejected == 0
        assert outcomes(segment_db, spec.id, "second") == [(email, "skipped", f"erased on {today}")]
        assert email in state_keys(segment_db, spec.id)  # remembered: not counted again while the row is unchanged
    sandbox.configure(latency={"klaviyo_deletion": 0.0})  # deferred: Klaviyo now carries the deletion out
    final = held(sandbox)
    assert all(email not in final[k] for k in final), final
    assert all(final[k] == before[k] - {email} for k in final)
    deletions = next(iter(sandbox.state()["klaviyo"]["accounts"].values()))["deletions"]
    assert deletions == [{"identifier": "email", "status": "done", "deleted": 1}]

    third = [run(spec, "third") for spec in EXPORTS]
    assert all(s.sent == 0 and s.skipped == 0 for s in third)
    assert held(sandbox) == final

    # The same request again: answered before, never sent again; a new request for another person is.
    def erasure_calls():
        return {k: v["count"] for k, v in sandbox.state()["requests"]["by_endpoint"].items()
                if "delet" in k}

    calls = erasure_calls()
    assert sum(calls.values()) == 2
    again = erase()
    assert (again["sent"], again["already_answered"]) == (0, 2) and erasure_calls() == calls
    assert len(receipts(segment_db)) == 2


def test_an_unanswered_erasure_is_recorded_retried_and_then_never_sent_again(segment_db, sandbox, airflow_conn):
    spec = EXPORTS[0]
    run(spec, "first")
    email = next(r for r in segment_data.rows(1000) if r[-1] == "vip")[1]
    request_erasure(segment_db, ("req-9", email), ("bad-1", "not an address"), ("", email))
    airflow_conn("klaviyo_default", conn_type="klaviyo", host=sandbox.klaviyo_host, password="pk_revoked")
    with pytest.raises(ErasureFailedError) as failed:
        erase()
    assert failed.value.summary.invalid == 2 and failed.value.summary.failed == 1
    (receipt,) = [r for r in receipts(segment_db) if r["destination"] == "klaviyo"]
    assert receipt["answered_at"] is None and "HTTP 401" in receipt["answer"] and "pk_revoked" not in receipt["answer"]
    assert email in held(sandbox)[KLAVIYO_LIST_ID]
    # Meanwhile the person asked: every export on the connection skips them, even before Klaviyo answered.
    conn = sqlite3.connect(segment_db)
    assert email in ErasureStore(conn, "?").erased("klaviyo_default") and ErasureStore(conn, "?").erased("other") == {}
    conn.close()

    airflow_conn("klaviyo_default", conn_type="klaviyo", host=sandbox.klaviyo_host, password=KLAVIYO_API_KEY)
    retried = erase()
    # only the Klaviyo call again: the audience answered the first time (404: not a member)
    assert (retried["sent"], retried["answered"], retried["already_answered"]) == (1, 1, 1)
    (receipt,) = [r for r in receipts(segment_db) if r["destination"] == "klaviyo"]
    assert receipt["answer"].startswith("202") and receipt["sent_at"] <= receipt["answered_at"]
    assert email not in held(sandbox)["klaviyo"]
    assert erase()["sent"] == 0


def test_erasure_targets_follow_the_destinations_declarations():
    built = []

    def eraser_for(kind, conn_id):
        from segment_export.destinations import destination_type

        built.append((kind, conn_id))
        return destination_type(kind).build_eraser(conn_id)

    targets = erasure_targets(EXPORTS, eraser_for)
    assert [(t.destination, t.conn_id, t.target_id) for t in targets] == [
        ("klaviyo", "klaviyo_default", "account"), ("mailchimp", "mailchimp_default", MAILCHIMP_AUDIENCE_ID)]
    assert targets[0].exports_by_state == {"warehouse": ["vip_klaviyo", "newsletter_klaviyo"]}
    assert built == [("klaviyo", "klaviyo_default"), ("mailchimp", "mailchimp_default")]  # one eraser per connection
