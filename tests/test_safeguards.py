"""A typo never empties an audience: bad specs and bad sources fail before anything is sent; a run that would
remove most of the remembered profiles stops before any removal (issue 16).

Every test runs the real exporter with real state against the sandbox and checks what the sandbox holds.
"""

from __future__ import annotations

import os

import pytest
import segment_data
from sandbox_state import klaviyo_profiles, mailchimp_members
from segment_export_sandbox import KLAVIYO_LIST_ID, MAILCHIMP_AUDIENCE_ID
from test_sync import KLAVIYO, MAILCHIMP, make_spec, run, sql, vip, writes

from segment_export.sources.base import ColumnNotFoundError
from segment_export.state import OUTCOMES_TABLE, STATE_TABLE

SEGMENT_COLUMNS = "customer_id, email, first_name, last_name, phone, tier, lifetime_value, segment"


def everything(sandbox) -> dict:
    """What the sandbox holds (members, tags, list memberships), without the request counters."""
    state = sandbox.state()
    return {"klaviyo": state["klaviyo"], "mailchimp": state["mailchimp"]}


# -- every column the spec names is checked against the source's real columns --------------------------------

TYPOS = {
    "source.segment_column": {"source": {"conn_id": "warehouse", "table": "segment_members", "segment_column": "segmnt",
                                         "segments": ["vip"]}},
    "limit.order_by": {"limit": {"max_profiles": 3, "on_exceed": "truncate", "order_by": "tierr"}},
    "mapping.attributes.TIER": {"mapping": {"email": "email", "first_name": "first_name", "attributes": {"TIER": "tierr"}}},
    "mapping.email": {"mapping": {"email": "Email"}},
}


@pytest.mark.parametrize("field", TYPOS)
@pytest.mark.parametrize("destination", [KLAVIYO, MAILCHIMP], ids=["klaviyo", "mailchimp"])
def test_a_misspelt_column_on_sqlite_fails_naming_it_and_leaves_the_destination_untouched(segment_db, sandbox, field, destination):
    # SQLite reads an unknown "segmnt" as the string 'segmnt': the segment was empty and, with on_leave, every
    # profile the export had sent lost its tags (Mailchimp) or its list membership.
    run(make_spec(destination, sync={"on_leave": "remove"}))
    held, requests = everything(sandbox), writes(sandbox)
    state_before = sql(segment_db, f"SELECT profile_key, fingerprint, segments FROM {STATE_TABLE} ORDER BY 1")
    typo = TYPOS[field]
    column = next(v for v in _leaves(typo) if v in ("segmnt", "tierr", "Email"))
    bad = make_spec(destination, sync={"on_leave": "remove"}, **typo)
    with pytest.raises(ColumnNotFoundError) as info:
        run(bad, run_id="typo")
    message = str(info.value)
    assert f"{field}: no column {column!r}" in message and SEGMENT_COLUMNS in message
    assert "export sync_test" in message and "segment_members" in message
    assert everything(sandbox) == held and writes(sandbox) == requests  # not one change sent
    assert sql(segment_db, f"SELECT profile_key, fingerprint, segments FROM {STATE_TABLE} ORDER BY 1") == state_before
    assert sql(segment_db, f"SELECT count(*) FROM {OUTCOMES_TABLE} WHERE run_id = 'typo'") == [(0,)]


def _leaves(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, list):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


def test_the_error_suggests_the_column_meant(segment_db, sandbox):
    with pytest.raises(ColumnNotFoundError, match=r"mapping.email: no column 'Email' \(did you mean 'email'\?\)"):
        run(make_spec(KLAVIYO, mapping={"email": "Email"}))
    with pytest.raises(ColumnNotFoundError, match=r"no column 'segmnt' \(did you mean 'segment'\?\)"):
        run(make_spec(KLAVIYO, source={"conn_id": "warehouse", "table": "segment_members", "segment_column": "segmnt",
                                       "segments": ["vip"]}))
    assert sandbox.state()["requests"]["count"] == 0


def test_sqlite_identifiers_are_never_read_as_values(segment_db):
    # Even past the exporter's check, the SQL source itself refuses a name that is not a real column, and
    # quotes with backticks on SQLite (an unknown `name` is an error there, never a string).
    from segment_export.sources import source_for
    from segment_export.spec import SourceSpec

    source = source_for(SourceSpec(conn_id="warehouse", table="segment_members", segment_column="segmnt", segments=["vip"]))
    try:
        assert source.dialect.q("segment") == "`segment`"
        with pytest.raises(ColumnNotFoundError, match="source.segment_column: no column 'segmnt'"):
            source.count()
        good = source_for(SourceSpec(conn_id="warehouse", table="segment_members"))
        with pytest.raises(ColumnNotFoundError, match="order_by: no column 'tierr'"):
            next(iter(good.chunks(["email"], order_by="tierr", limit=3)))
        with pytest.raises(ColumnNotFoundError, match="requested column: no column 'emial'"):
            next(iter(good.chunks(["emial"])))
        good.close()
    finally:
        source.close()


def test_query_source_columns_are_checked_too(segment_db, sandbox):
    spec = make_spec(KLAVIYO, source={"conn_id": "warehouse", "query": "SELECT email, segment AS seg FROM segment_members",
                                      "segment_column": "segment", "segments": ["vip"]},
                     mapping={"email": "email"})
    with pytest.raises(ColumnNotFoundError, match=r"source.segment_column: no column 'segment'.*has: email, seg$"):
        run(spec)
    assert sandbox.state()["requests"]["count"] == 0


@pytest.mark.postgres
def test_a_misspelt_segment_column_on_postgres_fails_naming_it_and_leaves_the_destination_untouched(pg_schema, sandbox):
    conn, schema = pg_schema
    conn.execute(f'CREATE TABLE "{schema}".segment_members (customer_id int, email text, first_name text, segment text)')
    with conn.cursor() as cur:
        cur.executemany(f'INSERT INTO "{schema}".segment_members VALUES (%s, %s, %s, %s)',
                        [(r[0], r[1], r[2], r[-1]) for r in segment_data.rows(300)])
    export_id = f"pg_typo_{os.getpid()}"  # the state tables live in the database's public schema
    table = {"conn_id": "pg_warehouse", "table": f"{schema}.segment_members"}
    good = make_spec(MAILCHIMP, id=export_id, source={**table, "segment_column": "segment", "segments": ["vip"]})
    bad = make_spec(MAILCHIMP, id=export_id, source={**table, "segment_column": "segmnt", "segments": ["vip"]})
    try:
        assert run(good).accepted == len(vip(300))
        held, requests = everything(sandbox), writes(sandbox)
        with pytest.raises(ColumnNotFoundError) as info:
            run(bad)
        message = str(info.value)
        assert "source.segment_column: no column 'segmnt' (did you mean 'segment'?)" in message
        assert "has: customer_id, email, first_name, segment" in message and f"export {export_id}" in message
        assert everything(sandbox) == held and writes(sandbox) == requests
        members = mailchimp_members(sandbox.state(), MAILCHIMP_AUDIENCE_ID)
        assert len(members) == len(vip(300)) and all(m["tags"] == ["vip"] for m in members.values())
    finally:
        conn.execute(f"DELETE FROM {STATE_TABLE} WHERE export_id = %s", (export_id,))
        conn.execute(f"DELETE FROM {OUTCOMES_TABLE} WHERE export_id = %s", (export_id,))


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_file_sources_check_every_named_column(tmp_path, sandbox, kind, monkeypatch):
    monkeypatch.setenv("SEGMENT_EXPORT_STATE_DB", str(tmp_path / "state.db"))
    path = (segment_data.write_csv if kind == "csv" else segment_data.write_parquet)(tmp_path / f"s.{kind}", 100)
    source = {"path": str(path), "segment_column": "segmnt", "segments": ["vip"]}
    with pytest.raises(ColumnNotFoundError, match=rf"file s\.{kind}: source.segment_column: no column 'segmnt'.*{SEGMENT_COLUMNS}"):
        run(make_spec(MAILCHIMP, source=source))
    source = {"path": str(path), "segment_column": "segment", "segments": ["vip"]}
    with pytest.raises(ColumnNotFoundError, match=r"mapping.consent: no column 'opted_in'"):
        run(make_spec(MAILCHIMP, source=source, mapping={"email": "email", "consent": "opted_in"}))
    assert sandbox.state()["requests"]["count"] == 0


# -- a CSV export filtered by segment (defect 1) ----------------------------------------------------------------

def test_a_csv_export_filtered_by_segment_succeeds(tmp_path, sandbox, monkeypatch):
    monkeypatch.setenv("SEGMENT_EXPORT_STATE_DB", str(tmp_path / "state.db"))
    path = segment_data.write_csv(tmp_path / "members.csv", 500)
    spec = make_spec(MAILCHIMP, segments=("vip", "winback"),
                     source={"path": str(path), "segment_column": "segment", "segments": ["vip", "winback"], "chunk_size": 64})
    summary = run(spec)
    rows = [r for r in segment_data.rows(500) if r[-1] in ("vip", "winback")]
    expected: dict[str, set[str]] = {}
    for r in rows:
        expected.setdefault(r[1], set()).add(r[-1])
    members = mailchimp_members(sandbox.state(), MAILCHIMP_AUDIENCE_ID)
    assert {e: set(m["tags"]) for e, m in members.items()} == expected
    assert members[rows[0][1]]["merge_fields"]["FNAME"] == rows[0][2]
    assert (summary.read, summary.accepted, summary.tags_added) == (len(rows), len(expected), len(rows))
    assert run(spec).sent == 0  # the state remembered it: nothing changed, nothing sent


# -- the mass-removal guard --------------------------------------------------------------------------------------

def state_rows(db, export_id="sync_test"):
    return sql(db, f"SELECT profile_key, fingerprint, segments FROM {STATE_TABLE} WHERE export_id = ? ORDER BY 1", (export_id,))


def removal_requests(sandbox) -> dict[str, int]:
    """Requests that could take a profile out: Mailchimp tag changes and member writes after the first run are
    compared by the caller; Klaviyo list removals are their own endpoint."""
    return {k: v for k, v in writes(sandbox).items() if "DELETE" in k or "segments/{segment_id}" in k}


@pytest.mark.parametrize("on_leave", ["remove", "unsubscribe"])
def test_an_empty_segment_against_a_full_state_stops_before_any_removal(segment_db, sandbox, on_leave):
    from segment_export.exporter import MassLeaveError

    spec = make_spec(MAILCHIMP, sync={"on_leave": on_leave})
    run(spec)
    members_before = mailchimp_members(sandbox.state(), MAILCHIMP_AUDIENCE_ID)
    state_before, requests = state_rows(segment_db), writes(sandbox)
    sql(segment_db, "UPDATE segment_members SET segment = 'vip_old' WHERE segment = 'vip'")  # e.g. a renamed segment
    with pytest.raises(MassLeaveError) as info:
        run(spec, run_id="empty")
    n = len(vip())
    message = str(info.value)
    assert f"{n} of the {n} profiles the export remembers (100.0%: {n} left the segment" in message
    assert "segment came back empty" in message and "export sync_test" in message and "allow_mass_leave" in message
    assert info.value.summary.held_back == n and info.value.summary.removed == 0
    assert mailchimp_members(sandbox.state(), MAILCHIMP_AUDIENCE_ID) == members_before  # every member, tag, status
    assert writes(sandbox) == requests and state_rows(segment_db) == state_before
    assert sql(segment_db, f"SELECT count(*) FROM {OUTCOMES_TABLE} WHERE run_id = 'empty' AND action = 'removed'") == [(0,)]
    # Even with no share limit, an empty segment stops; asked for explicitly, the removal goes through.
    with pytest.raises(MassLeaveError):
        run(make_spec(MAILCHIMP, sync={"on_leave": on_leave, "max_leave_share": None}))
    assert run(spec, allow_mass_leave=True).removed == n
    members = mailchimp_members(sandbox.state(), MAILCHIMP_AUDIENCE_ID)
    assert all(m["tags"] == [] for m in members.values()) and state_rows(segment_db) == []
    if on_leave == "unsubscribe":
        assert {m["status"] for m in members.values()} == {"unsubscribed"}


def test_over_the_share_the_additions_go_out_and_the_removals_do_not(segment_db, sandbox):
    from segment_export.exporter import MassLeaveError

    spec = make_spec(KLAVIYO, sync={"on_leave": "remove"})
    run(spec)
    rows = vip()
    gone = [r[1] for r in rows[: len(rows) // 4]]  # about 25%: over the default 20%
    sql(segment_db, f"DELETE FROM segment_members WHERE email IN ({', '.join('?' * len(gone))})", gone)
    sql(segment_db, "INSERT INTO segment_members (customer_id, email, first_name, segment) VALUES "
                    "(90001, 'new.one@example.com', 'New', 'vip'), (90002, 'new.two@example.com', 'Two', 'vip')")
    with pytest.raises(MassLeaveError, match=rf"would remove, untag or unsubscribe {len(gone)} of the {len(rows)} profiles "
                                             rf"the export remembers \({len(gone) / len(rows):.1%}.*over the limit of 20.0% \(sync.max_leave_share\)"
                       r".*2 profiles accepted") as info:
        run(spec)
    assert info.value.summary.accepted == 2 and info.value.summary.removed == 0
    held = klaviyo_profiles(sandbox.state(), KLAVIYO_LIST_ID)
    assert {"new.one@example.com", "new.two@example.com"} <= set(held)  # additions went out
    assert set(gone) <= set(held) and len(held) == len(rows) + 2  # nobody was removed
    assert "DELETE /api/lists/{id}/relationships/profiles" not in writes(sandbox)
    # The next run stops again (the leavers are still remembered); a higher limit in the spec lets it through.
    with pytest.raises(MassLeaveError):
        run(spec)
    relaxed = make_spec(KLAVIYO, sync={"on_leave": "remove", "max_leave_share": 0.3})
    assert run(relaxed).removed == len(gone)
    assert set(klaviyo_profiles(sandbox.state(), KLAVIYO_LIST_ID)) == {r[1] for r in rows[len(gone):]} | {
        "new.one@example.com", "new.two@example.com"}


def test_a_misspelt_segment_name_keeps_the_tags_of_profiles_that_stay(segment_db, sandbox):
    from segment_export.exporter import MassLeaveError

    good = make_spec(MAILCHIMP, segments=("vip", "newsletter"))
    run(good)
    tags_before = {e: sorted(m["tags"]) for e, m in mailchimp_members(sandbox.state(), MAILCHIMP_AUDIENCE_ID).items()}
    state_before = state_rows(segment_db)
    both = [e for e, t in tags_before.items() if t == ["newsletter", "vip"]]
    assert both  # profiles in both segments: with the typo they stay (vip) but would lose the newsletter tag
    typo = make_spec(MAILCHIMP, segments=("vip", "newsleter"))
    with pytest.raises(MassLeaveError, match=rf"{len(both)} lost one of their segments") as info:
        run(typo)
    assert info.value.summary.held_back > 0.2 * len(tags_before)
    after = {e: sorted(m["tags"]) for e, m in mailchimp_members(sandbox.state(), MAILCHIMP_AUDIENCE_ID).items()}
    assert after == tags_before and state_rows(segment_db) == state_before
    again = run(good)  # the state still matches the audience: nothing to send, add or remove
    assert (again.sent, again.tags_added, again.tags_removed, again.removed) == (0, 0, 0, 0)


def test_a_dry_run_reports_that_a_real_run_would_stop(segment_db, sandbox, caplog):
    spec = make_spec(MAILCHIMP)
    run(spec)
    sql(segment_db, "DELETE FROM segment_members WHERE segment = 'vip'")
    with caplog.at_level("WARNING"):
        plan = run(spec, dry_run=True)
    assert plan.removed == plan.held_back == len(vip())
    assert "a real run would stop here" in caplog.text and "segment came back empty" in caplog.text


def test_below_the_share_and_with_keep_nothing_stops(segment_db, sandbox):
    spec = make_spec(MAILCHIMP)
    run(spec)
    rows = vip()
    sql(segment_db, "DELETE FROM segment_members WHERE email = ?", (rows[0][1],))
    assert run(spec).removed == 1
    keep = make_spec(KLAVIYO)  # on_leave keep: an empty segment removes nothing, so nothing to stop
    run(keep)
    sql(segment_db, "DELETE FROM segment_members WHERE segment = 'vip'")
    assert run(keep).removed == 0


# -- what the operator says -----------------------------------------------------------------------------------

def _operator(spec):
    from segment_export.operators.export import SegmentExportOperator

    return SegmentExportOperator(task_id="export", export=spec)


def test_the_operator_says_a_rejected_share_failure_came_after_a_completed_run(tmp_path, sandbox, airflow_conn, capfd):
    from segment_export.exporter import RejectedShareError

    db = tmp_path / "r.db"
    import sqlite3

    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE segment_members (email TEXT, first_name TEXT, segment TEXT)")
        conn.executemany("INSERT INTO segment_members VALUES (?, 'A', 'vip')", [(f"ok{i}@example.com",) for i in range(9)] + [("nope",)])
    airflow_conn("warehouse", conn_type="sqlite", host=str(db))
    with pytest.raises(RejectedShareError):
        _operator(make_spec(KLAVIYO)).execute({"run_id": "share"})
    logged = "".join(capfd.readouterr())  # the task logger (structlog) writes to the console
    assert "the run completed, then failed the rejected-share check" in logged and "export stopped" not in logged
    assert len(klaviyo_profiles(sandbox.state(), KLAVIYO_LIST_ID)) == 9


def test_the_trigger_forms_allow_mass_leave_lets_the_removal_through(segment_db, sandbox, capfd):
    from segment_export.exporter import MassLeaveError

    spec = make_spec(MAILCHIMP)
    run(spec)
    sql(segment_db, "DELETE FROM segment_members WHERE segment = 'vip'")
    with pytest.raises(MassLeaveError):
        _operator(spec).execute({"run_id": "guarded", "params": {}})
    logged = "".join(capfd.readouterr())
    assert "then stopped before any removal" in logged and "export stopped" not in logged
    summary = _operator(spec).execute({"run_id": "allowed", "params": {"allow_mass_leave": True}})
    assert summary["removed"] == len(vip()) and summary["held_back"] == 0
    assert all(m["tags"] == [] for m in mailchimp_members(sandbox.state(), MAILCHIMP_AUDIENCE_ID).values())
