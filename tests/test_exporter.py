"""The exporter against real parts: a SQLite segment table and the API sandbox; checked by the sandbox's state."""

from __future__ import annotations

import pytest
import segment_data
from sandbox_state import klaviyo_profiles, mailchimp_members
from segment_export_sandbox import KLAVIYO_LIST_ID, MAILCHIMP_AUDIENCE_ID

from segment_export.destinations import destination_for
from segment_export.exporter import ExportError, run_export
from segment_export.hooks.base import DestinationError
from segment_export.limit import LimitExceededError
from segment_export.sources import source_for
from segment_export.sources.base import ColumnNotFoundError
from segment_export.spec import ExportSpec


def spec(destination: dict, **overrides) -> ExportSpec:
    raw = {
        "id": "test_export",
        "privacy_acknowledged": True,
        "source": {"conn_id": "warehouse", "table": "segment_members", "segment_column": "segment", "segments": ["vip"]},
        "destination": destination,
        "mapping": {"email": "email", "first_name": "first_name", "last_name": "last_name"},
    }
    raw.update(overrides)
    return ExportSpec.model_validate(raw)


KLAVIYO = {"type": "klaviyo", "list_id": KLAVIYO_LIST_ID}
MAILCHIMP = {"type": "mailchimp", "audience_id": MAILCHIMP_AUDIENCE_ID, "new_member_status": "subscribed"}


def export(s: ExportSpec):
    source = source_for(s.source)
    try:
        return run_export(s, source, destination_for(s))
    finally:
        source.close()


def vip_rows(n=1000):
    return [r for r in segment_data.rows(n) if r[-1] == "vip"]


def test_klaviyo_export_lands_in_the_list(segment_db, sandbox):
    s = spec(KLAVIYO, mapping={"email": "email", "first_name": "first_name", "phone_number": "phone",
                               "external_id": "customer_id", "attributes": {"tier": "tier", "ltv": "lifetime_value"}})
    summary = export(s)
    expected = {r[1]: r for r in vip_rows()}
    held = klaviyo_profiles(sandbox.state(), KLAVIYO_LIST_ID)
    assert set(held) == set(expected)
    some = held[next(iter(expected))]
    row = expected[some["email"]]
    assert some["first_name"] == row[2] and some["external_id"] == str(row[0]) and some["phone_number"] == row[4]
    assert some["properties"] == {"tier": row[5], "ltv": row[6]}
    assert "last_name" not in some or some["last_name"] is None  # not mapped, not sent
    assert summary.read == summary.sent == summary.accepted == len(expected) and summary.rejected == 0
    assert summary.consistent


def test_mailchimp_export_creates_then_updates_without_touching_status(segment_db, sandbox):
    rows = vip_rows()
    unsubscribed = rows[0][1]
    sandbox.seed_mailchimp_member(MAILCHIMP_AUDIENCE_ID, unsubscribed, "unsubscribed", merge_fields={"FNAME": "Old"})
    s = spec(MAILCHIMP)
    first = export(s)
    members = mailchimp_members(sandbox.state(), MAILCHIMP_AUDIENCE_ID)
    assert set(members) == {r[1] for r in rows}
    assert members[unsubscribed]["status"] == "unsubscribed"  # never re-subscribed
    assert members[unsubscribed]["merge_fields"]["FNAME"] == rows[0][2]  # but its fields were updated
    assert {m["status"] for e, m in members.items() if e != unsubscribed} == {"subscribed"}
    assert (first.created, first.updated, first.rejected) == (len(rows) - 1, 1, 0)
    second = export(s)
    assert (second.created, second.updated, second.accepted) == (0, len(rows), len(rows))
    assert mailchimp_members(sandbox.state(), MAILCHIMP_AUDIENCE_ID)[unsubscribed]["status"] == "unsubscribed"


def test_rejected_rows_are_counted_with_reasons_and_never_reported_as_accepted(tmp_path, sandbox, airflow_conn):
    import sqlite3

    db = tmp_path / "bad.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE segment_members (email TEXT, first_name TEXT, last_name TEXT, phone TEXT, segment TEXT)")
        conn.executemany("INSERT INTO segment_members VALUES (?, ?, ?, ?, 'vip')", [
            ("good@example.com", "A", "B", "+14155550100"),
            ("GOOD@example.com ", "A", "B", "+14155550100"),  # duplicate after normalising
            ("", "empty", None, None),
            ("not-an-email", None, None, None),
            ("phone@example.com", "P", None, "+1 12"),   # not a valid number (libphonenumber): not sent
            ("two..dots@example.com", "T", None, None),  # Klaviyo refuses the address: an import error
        ])
    airflow_conn("warehouse", conn_type="sqlite", host=str(db))
    s = spec(KLAVIYO, mapping={"email": "email", "first_name": "first_name", "phone_number": "phone"},
             limit={"max_rejected_share": None})
    summary = export(s)
    assert (summary.read, summary.invalid, summary.duplicates) == (6, 3, 1)
    assert summary.sent == 2 and summary.accepted == 1 and summary.rejected == 1
    assert summary.invalid_reasons == {"email is empty": 1, "email is not a valid address": 1,
                                       "phone_number is not a valid number (libphonenumber)": 1}
    (reason,) = summary.rejected_reasons
    assert "@" not in reason and reason.startswith("invalid: Invalid email address")  # Klaviyo's detail, redacted
    held = klaviyo_profiles(sandbox.state(), KLAVIYO_LIST_ID)
    assert set(held) == {"good@example.com"} and held["good@example.com"]["first_name"] == "A"


def test_missing_column_fails_before_anything_is_sent(segment_db, sandbox):
    s = spec(KLAVIYO, mapping={"email": "email", "first_name": "given_name"})
    with pytest.raises(ColumnNotFoundError, match=r"mapping.first_name: no column 'given_name'.* has: customer_id, email"):
        export(s)
    assert sandbox.state()["requests"]["count"] == 0


def test_limit_fail_sends_nothing(segment_db, sandbox):
    s = spec(KLAVIYO, limit={"max_profiles": 10})
    with pytest.raises(LimitExceededError, match="nothing was sent"):
        export(s)
    assert sandbox.state()["requests"]["count"] == 0


def test_limit_truncate_keeps_the_same_rows_every_run(segment_db, sandbox):
    s = spec(MAILCHIMP, limit={"max_profiles": 30, "on_exceed": "truncate", "order_by": "customer_id"})
    summary = export(s)
    expected = {r[1] for r in sorted(vip_rows(), key=lambda r: (r[0], r[1]))[:30]}
    assert set(mailchimp_members(sandbox.state(), MAILCHIMP_AUDIENCE_ID)) == expected
    assert summary.skipped_by_limit == len(vip_rows()) - 30 and summary.accepted == 30
    again = export(s)
    assert again.updated == 30 and again.created == 0
    assert set(mailchimp_members(sandbox.state(), MAILCHIMP_AUDIENCE_ID)) == expected


def test_many_batches_go_out_concurrently_within_the_mailchimp_cap(tmp_path, sandbox, airflow_conn):
    path = segment_data.write_sqlite(tmp_path / "big.db", 6000)
    airflow_conn("warehouse", conn_type="sqlite", host=str(path))
    sandbox.configure(latency={"mailchimp_batch": 0.2})
    try:
        s = spec(MAILCHIMP, source={"conn_id": "warehouse", "table": "segment_members"})
        summary = export(s)
    finally:
        sandbox.configure(latency={"mailchimp_batch": 0.0})
    state = sandbox.state()
    assert summary.accepted == 6000 and summary.batches == 12 and summary.duplicates == 600
    assert len(mailchimp_members(state, MAILCHIMP_AUDIENCE_ID)) == 6000
    assert 1 < state["requests"]["max_in_flight"]["mailchimp"] <= 10
    assert state["requests"]["by_endpoint"]["POST /3.0/lists/{list_id}"]["status"] == {"200": 12}


def test_missing_list_fails_with_klaviyos_message_before_sending(segment_db, sandbox):
    s = spec({"type": "klaviyo", "list_id": "NoSuchList"})
    with pytest.raises(DestinationError, match="HTTP 404"):
        export(s)
    assert "POST /api/profile-bulk-import-jobs" not in sandbox.state()["requests"]["by_endpoint"]


def test_unknown_merge_tag_fails_before_sending(segment_db, sandbox):
    s = spec(MAILCHIMP, mapping={"email": "email", "attributes": {"TIER": "tier"}})
    with pytest.raises(DestinationError, match=r"no merge field\(s\) \['TIER'\]"):
        export(s)
    assert "POST /3.0/lists/{list_id}" not in sandbox.state()["requests"]["by_endpoint"]


def test_unreachable_destination_fails_clearly_after_bounded_retries(segment_db, sandbox, airflow_conn):
    from segment_export_sandbox import KLAVIYO_API_KEY

    airflow_conn("klaviyo_down", conn_type="klaviyo", host="http://127.0.0.1:9", password=KLAVIYO_API_KEY)
    s = spec({"type": "klaviyo", "list_id": KLAVIYO_LIST_ID, "conn_id": "klaviyo_down"})
    source = source_for(s.source)
    destination = destination_for(s)
    destination.hook.max_retries = 1
    with pytest.raises(DestinationError, match="ConnectionError"):
        run_export(s, source, destination)
    assert destination.hook.retries == 1


def test_a_failed_batch_stops_the_export_and_the_summary_matches_the_destination(segment_db, sandbox):
    from segment_export.destinations.klaviyo.destination import KlaviyoDestination

    class FailsOnBatchThree(KlaviyoDestination):
        max_batch_profiles = 50

        def submit(self, batch):
            if batch.number == 3:
                raise DestinationError("Klaviyo POST /api/profile-bulk-import-jobs failed: HTTP 503", status=503)
            return super().submit(batch)

    s = spec(KLAVIYO)
    base = destination_for(s)
    destination = FailsOnBatchThree(base.hook, KLAVIYO_LIST_ID)
    destination.concurrency = 1
    source = source_for(s.source)
    with pytest.raises(ExportError, match="HTTP 503.*unknown outcome") as info:
        run_export(s, source, destination)
    source.close()
    summary = info.value.summary
    held = klaviyo_profiles(sandbox.state(), KLAVIYO_LIST_ID)
    assert summary.accepted == len(held) >= 100  # batches 1 and 2 landed, and the summary says exactly that
    assert summary.sent == summary.accepted + summary.rejected


def test_dry_run_plans_and_sends_nothing(segment_db, sandbox):
    from segment_export.exporter import RunOptions

    s = spec(MAILCHIMP)
    source = source_for(s.source)
    summary = run_export(s, source, destination_for(s), options=RunOptions(dry_run=True))
    source.close()
    assert summary.dry_run and summary.planned == len(vip_rows()) and summary.sent == 0
    by_endpoint = sandbox.state()["requests"]["by_endpoint"]
    assert all(name.startswith("GET ") for name in by_endpoint), by_endpoint  # preflight reads only
    assert mailchimp_members(sandbox.state(), MAILCHIMP_AUDIENCE_ID) == {}


def test_run_time_limit_truncates_within_the_exports_limit(segment_db, sandbox):
    from segment_export.exporter import RunOptions

    s = spec(KLAVIYO)
    source = source_for(s.source)
    summary = run_export(s, source, destination_for(s), options=RunOptions(max_profiles=5))
    expected = {r[1] for r in sorted(vip_rows(), key=lambda r: r[1])[:5]}  # no order_by: first by email
    assert set(klaviyo_profiles(sandbox.state(), KLAVIYO_LIST_ID)) == expected and summary.accepted == 5
    with pytest.raises(ValueError, match="between 1 and the export's limit of 100000"):
        run_export(s, source, destination_for(s), options=RunOptions(max_profiles=100_001))
    source.close()


def test_too_many_rejected_rows_fail_the_run_after_it_with_counts_and_reasons(tmp_path, sandbox, airflow_conn):
    import sqlite3

    from segment_export.exporter import RejectedShareError

    db = tmp_path / "r.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE segment_members (email TEXT, first_name TEXT, last_name TEXT, segment TEXT)")
        conn.executemany("INSERT INTO segment_members VALUES (?, 'A', 'B', 'vip')",
                         [(f"ok{i}@example.com",) for i in range(18)] + [("nope",), ("",)])
    airflow_conn("warehouse", conn_type="sqlite", host=str(db))
    s = spec(KLAVIYO)  # default limit: 5%; here 2 of 20 = 10%
    with pytest.raises(RejectedShareError, match=r"2 of 20 rows \(10.0%\).*5.0%.*Accepted: 18.*email is") as info:
        export(s)
    assert info.value.summary.accepted == 18
    assert len(klaviyo_profiles(sandbox.state(), KLAVIYO_LIST_ID)) == 18  # the good rows went through
    relaxed = spec(KLAVIYO, limit={"max_rejected_share": 0.2})
    assert export(relaxed).accepted == 18


def test_duplicates_with_differing_attributes_resolve_the_same_way_whatever_the_row_order(tmp_path, sandbox, airflow_conn):
    import sqlite3

    results = []
    for order in ("ASC", "DESC"):
        db = tmp_path / f"d{order}.db"
        with sqlite3.connect(db) as conn:
            conn.execute("CREATE TABLE segment_members (email TEXT, first_name TEXT, last_name TEXT, segment TEXT)")
            rows = [("Same@Example.com", "First", "X"), (" same@example.com ", "Second", "Y")]
            conn.executemany("INSERT INTO segment_members VALUES (?, ?, ?, 'vip')", rows if order == "ASC" else rows[::-1])
        airflow_conn("warehouse", conn_type="sqlite", host=str(db))
        sandbox.reset()
        summary = export(spec(KLAVIYO))
        assert (summary.read, summary.duplicates, summary.sent) == (2, 1, 1)
        (profile,) = klaviyo_profiles(sandbox.state(), KLAVIYO_LIST_ID).values()
        results.append(profile["first_name"])
    assert results[0] == results[1]


@pytest.mark.parametrize("destination", [KLAVIYO, MAILCHIMP])
def test_only_mapped_fields_leave(segment_db, sandbox, destination):
    import json

    export(spec(destination))  # maps email, first_name, last_name; the table also has tier, phone, value...
    held = json.dumps(sandbox.state()["klaviyo" if destination is KLAVIYO else "mailchimp"])
    assert "+1415" not in held and "platinum" not in held and "lifetime" not in held
    assert vip_rows()[0][2] in held  # a mapped first name did arrive


# -- deferrable mode: a submit-only pass, then a pass that awaits the handles ------------------------------------

def _deferred_pass(s: ExportSpec, batch_profiles: int | None = None, **options):
    """One pass of a run with the export's state (a fresh destination each time, as a task after a deferral)."""
    from segment_export.exporter import RunOptions
    from segment_export.state import StateStore

    source, destination = source_for(s.source), destination_for(s)
    if batch_profiles is not None:
        destination.max_batch_profiles = batch_profiles
    state = StateStore.open(s.state_conn_id, s.id, destination.target_id)
    try:
        return run_export(s, source, destination, state=state, options=RunOptions(**options))
    finally:
        source.close()
        state.close()


def _inflight(s: ExportSpec) -> dict:
    from segment_export.state import StateStore

    state = StateStore.open(s.state_conn_id, s.id, KLAVIYO_LIST_ID)
    try:
        return state.inflight()
    finally:
        state.close()


def _klaviyo_jobs(sandbox) -> dict:
    (account,) = sandbox.state()["klaviyo"]["accounts"].values()
    return account["jobs"]


def test_a_deferred_run_submits_every_batch_then_its_second_pass_awaits_them_and_reads_like_one_run(segment_db, sandbox):
    import json

    s = spec(KLAVIYO)
    expected = {r[1] for r in vip_rows()}
    first = _deferred_pass(s, batch_profiles=50, run_id="deferred", submit_only=True)
    jobs = -(-len(expected) // 50)
    assert (first.submitted, len(first.handles), first.sent, first.batches) == (len(expected), jobs, 0, 0)
    assert json.loads(json.dumps(first.as_dict()))["handles"] == first.handles  # what the operator hands a trigger
    # Every handle is recorded with its batch; nothing is remembered as accepted yet, nothing else was sent.
    inflight = _inflight(s)
    assert sorted(handle for handle, _ in inflight.values()) == sorted(first.handles) == sorted(_klaviyo_jobs(sandbox))
    assert {row[0] for _, rows in inflight.values() for row in rows} == expected

    second = _deferred_pass(s, run_id="deferred", resume_counts=True)
    assert set(klaviyo_profiles(sandbox.state(), KLAVIYO_LIST_ID)) == expected
    assert len(_klaviyo_jobs(sandbox)) == jobs  # the handles were awaited, not one profile sent again
    assert second.sent == second.accepted + second.rejected + second.skipped == len(expected)
    assert (second.batches, second.resumed, second.submitted, second.unchanged) == (jobs, 0, 0, len(expected))
    assert _inflight(s) == {}

    third = _deferred_pass(s, run_id="later")
    assert (third.sent, third.unchanged) == (0, len(expected)) and len(_klaviyo_jobs(sandbox)) == jobs


def test_a_deferred_run_applies_its_leavers_only_in_the_pass_that_awaits_its_jobs(segment_db, sandbox):
    import sqlite3

    s = spec(KLAVIYO, sync={"on_leave": "remove"})
    rows = vip_rows()
    _deferred_pass(s, run_id="first")
    leaver, changed = rows[0][1], rows[1][1]
    with sqlite3.connect(segment_db) as conn:
        conn.execute("DELETE FROM segment_members WHERE email = ?", (leaver,))
        conn.execute("UPDATE segment_members SET first_name = 'Changed' WHERE email = ?", (changed,))
    submit = _deferred_pass(s, run_id="deferred", submit_only=True)
    assert (submit.submitted, len(submit.handles), submit.removed) == (1, 1, 0)
    assert leaver in klaviyo_profiles(sandbox.state(), KLAVIYO_LIST_ID)  # leavers wait for the second pass

    finish = _deferred_pass(s, run_id="deferred", resume_counts=True)
    held = klaviyo_profiles(sandbox.state(), KLAVIYO_LIST_ID)
    assert leaver not in held and held[changed]["first_name"] == "Changed"
    assert (finish.sent, finish.accepted, finish.removed) == (1, 1, 1) and finish.consistent


def test_a_killed_runs_jobs_are_counted_as_resumed_not_as_this_runs_sends(segment_db, sandbox):
    s = spec(KLAVIYO)
    expected = {r[1] for r in vip_rows()}
    _deferred_pass(s, run_id="killed", submit_only=True)  # what a run killed after submitting leaves behind
    rerun = _deferred_pass(s, run_id="rerun")
    assert (rerun.resumed, rerun.sent, rerun.unchanged) == (len(expected), 0, len(expected))
    assert set(klaviyo_profiles(sandbox.state(), KLAVIYO_LIST_ID)) == expected and _inflight(s) == {}


def test_submit_only_needs_an_asynchronous_destination_and_a_state(segment_db, sandbox):
    from segment_export.exporter import RunOptions

    for s, with_state in ((spec(MAILCHIMP), True), (spec(KLAVIYO), False)):
        with pytest.raises(ValueError, match="submit_only needs an asynchronous destination and a sync state"):
            if with_state:
                _deferred_pass(s, submit_only=True)
            else:
                run_export(s, source_for(s.source), destination_for(s), options=RunOptions(submit_only=True))
    assert not [k for k in sandbox.state()["requests"]["by_endpoint"] if not k.startswith("GET ")]


def test_an_asynchronous_destination_sends_a_batch_by_submitting_it_and_awaiting_its_result(segment_db, sandbox):
    from segment_export.batching import Batcher
    from segment_export.mapping import RowMapper

    s = spec(KLAVIYO)
    destination = destination_for(s)
    mapper = RowMapper(s.mapping, ["email", "first_name", "last_name"])
    batcher = Batcher(destination.max_batch_profiles, destination.max_batch_bytes)
    for row in vip_rows()[:3]:
        profile = mapper.map((row[1], row[2], row[3]))
        batcher.add(profile.key, destination.encode(profile))
    batch = batcher.flush()
    result = destination.send(batch)
    assert result.accepted_keys == set(batch.keys) == set(klaviyo_profiles(sandbox.state(), KLAVIYO_LIST_ID))
    assert destination.result("no-such-job", batch.keys) is None  # a handle Klaviyo does not know: sent again
