"""Sync like a reverse-ETL tool: changed rows only, members who left, tags per segment, per-row outcomes, dry run.

Every test runs the real exporter with real state (the segment's own SQLite database) against the sandbox,
and checks what the sandbox holds and which requests it received.
"""

from __future__ import annotations

import sqlite3

import pytest
import segment_data
from sandbox_state import klaviyo_profiles, mailchimp_members
from segment_export_sandbox import KLAVIYO_LIST_ID, MAILCHIMP_AUDIENCE_ID

from segment_export.destinations import destination_for
from segment_export.exporter import RunOptions, run_export
from segment_export.sources import source_for
from segment_export.spec import ExportSpec
from segment_export.state import OUTCOMES_TABLE, STATE_TABLE, StateStore

KLAVIYO = {"type": "klaviyo", "list_id": KLAVIYO_LIST_ID}
MAILCHIMP = {"type": "mailchimp", "audience_id": MAILCHIMP_AUDIENCE_ID, "new_member_status": "subscribed"}
WRITES = ("POST ", "DELETE ", "PUT ", "PATCH ")


def make_spec(destination, segments=("vip",), **extra) -> ExportSpec:
    raw = {
        "id": "sync_test",
        "privacy_acknowledged": True,
        "source": {"conn_id": "warehouse", "table": "segment_members", "segment_column": "segment", "segments": list(segments)},
        "destination": destination,
        "mapping": {"email": "email", "first_name": "first_name"},
    }
    raw.update(extra)
    return ExportSpec.model_validate(raw)


def run(spec: ExportSpec, **options):
    source = source_for(spec.source)
    destination = destination_for(spec)
    state = StateStore.open(spec.state_conn_id, spec.id, destination.target_id)
    try:
        return run_export(spec, source, destination, state=state, options=RunOptions(run_id=options.pop("run_id", "r"), **options))
    finally:
        source.close()
        state.close()


def writes(sandbox) -> dict[str, int]:
    return {k: v["count"] for k, v in sandbox.state()["requests"]["by_endpoint"].items() if k.startswith(WRITES)}


def sql(db, statement, params=()):
    with sqlite3.connect(db) as conn:
        return conn.execute(statement, params).fetchall()


def vip(n=1000):
    return [r for r in segment_data.rows(n) if r[-1] == "vip"]


def test_second_unchanged_run_sends_nothing_and_one_changed_row_sends_one(segment_db, sandbox):
    spec = make_spec(KLAVIYO)
    first = run(spec)
    assert first.sent == first.accepted == len(vip()) and first.unchanged == 0
    before = writes(sandbox)
    second = run(spec)
    assert (second.sent, second.unchanged) == (0, len(vip()))
    assert writes(sandbox) == before  # not one request that changes anything
    email = vip()[3][1]
    sql(segment_db, "UPDATE segment_members SET first_name = 'Changed' WHERE email = ?", (email,))
    third = run(spec)
    assert (third.sent, third.accepted, third.unchanged) == (1, 1, len(vip()) - 1)
    (account,) = sandbox.state()["klaviyo"]["accounts"].values()
    last_job = list(account["jobs"].values())[-1]
    assert last_job["total_count"] == 1
    assert klaviyo_profiles(sandbox.state(), KLAVIYO_LIST_ID)[email]["first_name"] == "Changed"


def test_full_resync_and_mapping_change_send_everything(segment_db, sandbox):
    spec = make_spec(KLAVIYO)
    run(spec)
    assert run(spec, full_resync=True).sent == len(vip())
    remapped = make_spec(KLAVIYO, mapping={"email": "email", "first_name": "first_name", "last_name": "last_name"})
    again = run(remapped)
    assert again.sent == len(vip())  # a new mapped field reaches every profile
    held = klaviyo_profiles(sandbox.state(), KLAVIYO_LIST_ID)
    assert all(held[r[1]]["last_name"] == r[3] for r in vip())


def test_klaviyo_member_who_left_is_removed_from_the_list(segment_db, sandbox):
    spec = make_spec(KLAVIYO, sync={"on_leave": "remove"})
    run(spec)
    gone = vip()[0][1]
    sql(segment_db, "UPDATE segment_members SET segment = 'winback' WHERE email = ? AND segment = 'vip'", (gone,))
    summary = run(spec)
    assert (summary.removed, summary.sent) == (1, 0)
    held = klaviyo_profiles(sandbox.state(), KLAVIYO_LIST_ID)
    assert gone not in held and len(held) == len(vip()) - 1
    assert gone in klaviyo_profiles(sandbox.state())  # the profile itself is never deleted
    assert sql(segment_db, f"SELECT action FROM {OUTCOMES_TABLE} WHERE profile_key = ? AND action = 'removed'", (gone,))
    assert not sql(segment_db, f"SELECT 1 FROM {STATE_TABLE} WHERE profile_key = ?", (gone,))


def test_klaviyo_keep_is_the_default(segment_db, sandbox):
    spec = make_spec(KLAVIYO)
    run(spec)
    gone = vip()[0][1]
    sql(segment_db, "DELETE FROM segment_members WHERE email = ?", (gone,))
    assert run(spec).removed == 0
    assert gone in klaviyo_profiles(sandbox.state(), KLAVIYO_LIST_ID)


def test_mailchimp_segments_become_tags_and_moves_change_tags(segment_db, sandbox):
    spec = make_spec(MAILCHIMP, segments=("vip", "newsletter"))
    first = run(spec)
    members = mailchimp_members(sandbox.state(), MAILCHIMP_AUDIENCE_ID)
    rows = [r for r in segment_data.rows(1000) if r[-1] in ("vip", "newsletter")]
    expected_tags: dict[str, set[str]] = {}
    for r in rows:
        expected_tags.setdefault(r[1], set()).add(r[-1])
    assert {e: set(m["tags"]) for e, m in members.items()} == expected_tags
    assert first.tags_added == len(rows)
    mover = next(r[1] for r in rows if expected_tags[r[1]] == {"vip"})
    sql(segment_db, "UPDATE segment_members SET segment = 'newsletter' WHERE email = ? AND segment = 'vip'", (mover,))
    before = writes(sandbox)
    second = run(spec)
    assert (second.sent, second.tags_added, second.tags_removed) == (0, 1, 1)
    assert set(mailchimp_members(sandbox.state(), MAILCHIMP_AUDIENCE_ID)[mover]["tags"]) == {"newsletter"}
    after = writes(sandbox)
    assert after.get("POST /3.0/lists/{list_id}", 0) == before.get("POST /3.0/lists/{list_id}", 0)  # no member call


def test_mailchimp_leaver_loses_its_tag_and_unsubscribed_member_stays_unsubscribed(segment_db, sandbox):
    rows = vip()
    unsub = rows[1][1]
    sandbox.seed_mailchimp_member(MAILCHIMP_AUDIENCE_ID, unsub, "unsubscribed")
    spec = make_spec(MAILCHIMP)
    run(spec)
    gone = rows[0][1]
    sql(segment_db, "DELETE FROM segment_members WHERE email = ?", (gone,))
    sql(segment_db, "UPDATE segment_members SET first_name = 'New' WHERE email = ?", (unsub,))
    summary = run(spec)
    members = mailchimp_members(sandbox.state(), MAILCHIMP_AUDIENCE_ID)
    assert summary.removed == 1 and members[gone]["tags"] == [] and members[gone]["status"] == "subscribed"
    assert members[unsub]["status"] == "unsubscribed" and members[unsub]["merge_fields"]["FNAME"] == "New"


def test_a_failed_row_is_retried_on_the_next_run_and_only_that_row(tmp_path, sandbox, airflow_conn):
    db = tmp_path / "s.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE segment_members (email TEXT, first_name TEXT, phone TEXT, segment TEXT)")
        conn.executemany("INSERT INTO segment_members VALUES (?, ?, ?, 'vip')",
                         [(f"p{i}@example.com", f"P{i}", f"+1415555{i:04d}") for i in range(20)] + [("bad..dots@example.com", "B", None)])
    airflow_conn("warehouse", conn_type="sqlite", host=str(db))
    spec = make_spec(KLAVIYO, mapping={"email": "email", "first_name": "first_name", "phone_number": "phone"})
    first = run(spec)
    assert (first.sent, first.accepted, first.rejected) == (21, 20, 1)
    # Klaviyo refuses the address (an import error); the exporter's own check lets it through
    assert sql(db, f"SELECT profile_key, action FROM {OUTCOMES_TABLE} WHERE action = 'rejected'") == [("bad..dots@example.com", "rejected")]
    second = run(spec)
    assert (second.sent, second.rejected, second.unchanged) == (1, 1, 20)  # only the failed row, again
    sql(db, "UPDATE segment_members SET email = 'bad.dots@example.com' WHERE email = 'bad..dots@example.com'")
    third = run(spec)
    assert (third.sent, third.accepted) == (1, 1)
    assert run(spec).sent == 0


def test_dry_run_leaves_the_sandbox_and_the_state_untouched(segment_db, sandbox):
    spec = make_spec(MAILCHIMP, segments=("vip", "newsletter"))
    plan = run(spec, dry_run=True)
    assert plan.dry_run and plan.sent == 0 and plan.planned > 0 and plan.tags_added > 0
    assert writes(sandbox) == {}
    assert mailchimp_members(sandbox.state(), MAILCHIMP_AUDIENCE_ID) == {}
    assert sql(segment_db, f"SELECT count(*) FROM {STATE_TABLE}") == [(0,)]
    (example, *_) = plan.examples
    assert example["action"] == "create" and example["payload"]["email_address"].startswith("***@")
    run(spec)
    sql(segment_db, "DELETE FROM segment_members WHERE segment = 'vip'")
    plan = run(spec, dry_run=True)
    assert plan.removed > 0 and plan.planned == 0 and writes(sandbox).get("POST /3.0/lists/{list_id}/segments/{segment_id}")


def test_state_is_kept_per_export_and_target(segment_db, sandbox):
    run(make_spec(KLAVIYO))
    other_list = make_spec({"type": "klaviyo", "list_id": "XyZ123"})
    assert run(other_list).sent == len(vip())  # a new target starts from nothing
    keys = sql(segment_db, f"SELECT DISTINCT target_id FROM {STATE_TABLE}")
    assert sorted(k for (k,) in keys) == sorted([KLAVIYO_LIST_ID, "XyZ123"])


def test_unsubscribe_on_leave_is_an_explicit_mailchimp_opt_in(segment_db, sandbox):
    with pytest.raises(ValueError, match="sync.on_leave: Klaviyo exports take 'keep' or 'remove', not 'unsubscribe'"):
        make_spec(KLAVIYO, sync={"on_leave": "unsubscribe"})
    spec = make_spec(MAILCHIMP, sync={"on_leave": "unsubscribe"})
    run(spec)
    gone = vip()[0][1]
    sql(segment_db, "DELETE FROM segment_members WHERE email = ?", (gone,))
    assert run(spec).removed == 1
    assert mailchimp_members(sandbox.state(), MAILCHIMP_AUDIENCE_ID)[gone]["status"] == "unsubscribed"


def test_mailchimp_consent_column_chooses_a_new_members_status_only(tmp_path, sandbox, airflow_conn):
    db = tmp_path / "c.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE segment_members (email TEXT, first_name TEXT, opted_in TEXT, segment TEXT)")
        conn.executemany("INSERT INTO segment_members VALUES (?, ?, ?, 'vip')", [
            ("yes@example.com", "Y", "true"), ("no@example.com", "N", "false"), ("blank@example.com", "B", None),
            ("old@example.com", "O", "true"),
        ])
    airflow_conn("warehouse", conn_type="sqlite", host=str(db))
    sandbox.seed_mailchimp_member(MAILCHIMP_AUDIENCE_ID, "old@example.com", "unsubscribed")
    spec = make_spec(MAILCHIMP, mapping={"email": "email", "first_name": "first_name", "consent": "opted_in"})
    summary = run(spec)
    members = mailchimp_members(sandbox.state(), MAILCHIMP_AUDIENCE_ID)
    assert {e: m["status"] for e, m in members.items()} == {
        "yes@example.com": "subscribed", "no@example.com": "transactional", "blank@example.com": "transactional",
        "old@example.com": "unsubscribed",  # consent in the warehouse never re-subscribes through an export
    }
    assert "opted_in" not in str(members) and (summary.created, summary.updated) == (3, 1)
    with pytest.raises(ValueError, match="set both 'destination.subscribe: true' and 'mapping.consent'"):
        make_spec(KLAVIYO, mapping={"email": "email", "consent": "opted_in"})


def test_klaviyo_one_list_per_segment_and_moves_between_lists(segment_db, sandbox):
    lists = {"vip": KLAVIYO_LIST_ID, "newsletter": "XyZ123"}
    spec = make_spec({"type": "klaviyo", "lists": lists}, segments=("vip", "newsletter"), sync={"on_leave": "remove"})
    first = run(spec)
    rows = [r for r in segment_data.rows(1000) if r[-1] in lists]
    for segment, list_id in lists.items():
        assert set(klaviyo_profiles(sandbox.state(), list_id)) == {r[1] for r in rows if r[-1] == segment}
    assert first.tags_added == len(rows)
    mover = next(r[1] for r in rows if r[-1] == "vip" and sum(1 for x in rows if x[1] == r[1]) == 1)
    sql(segment_db, "UPDATE segment_members SET segment = 'newsletter' WHERE email = ? AND segment = 'vip'", (mover,))
    second = run(spec)
    assert (second.sent, second.tags_added, second.tags_removed) == (0, 1, 1)
    assert mover not in klaviyo_profiles(sandbox.state(), KLAVIYO_LIST_ID)
    assert mover in klaviyo_profiles(sandbox.state(), "XyZ123")
    with pytest.raises(ValueError, match=r"no list for \['newsletter'\]"):
        make_spec({"type": "klaviyo", "lists": {"vip": "A"}}, segments=("vip", "newsletter"))
    with pytest.raises(ValueError, match="either 'list_id'"):
        make_spec({"type": "klaviyo", "list_id": "A", "lists": {"vip": "A"}})


@pytest.mark.parametrize("warehouse_diff", [True, False])
def test_invalid_rows_beyond_the_first_chunk_with_the_state_in_the_segments_own_sqlite_file(segment_db, sandbox, warehouse_diff):
    # The outcome rows of invalid rows used to be committed while the read's statement was open: SQLite made the
    # write wait for the reader (this same thread) and failed with "database is locked" after 5 s.
    sql(segment_db, "UPDATE segment_members SET email = 'not-an-address-' || customer_id WHERE customer_id % 250 = 0")
    spec = make_spec(KLAVIYO, segments=segment_data.SEGMENTS, sync={"warehouse_diff": warehouse_diff})
    spec = spec.model_copy(update={"source": spec.source.model_copy(update={"chunk_size": 100})})
    (bad,) = sql(segment_db, "SELECT COUNT(*) FROM segment_members WHERE email LIKE 'not-an-address-%'")[0]
    assert bad == 8  # customers 250, 500, 750 and 1000, two rows each, in chunks 3 to 11
    for run_id in ("r1", "r2"):
        summary = run(spec, run_id=run_id)
        assert summary.invalid == bad
        recorded = sql(segment_db, f"SELECT COUNT(*) FROM {OUTCOMES_TABLE} WHERE run_id = ? AND action = 'invalid'", (run_id,))
        assert recorded == [(bad,)]
    assert summary.change_detection == ("warehouse" if warehouse_diff else "full")
