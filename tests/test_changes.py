"""The warehouse diff sends exactly what the full read sends (``segment_export.changes``).

Each scenario runs the same edits of a segment table twice, in a fresh sandbox and a fresh state each time: once
with the warehouse diff (the default) and once with ``sync.warehouse_diff: false``. After every run the two must
agree on what the destination holds (members, their fields, Mailchimp's tags and statuses) and on the summary's
counts of what was sent, accepted, removed, tagged and left unchanged; the warehouse diff must have read only the
rows that changed. Edits: a changed row, rows whose raw value changes but whose mapped value does not, a move
between segments, a second segment for a profile, a leaver, a new profile, invalid rows, a profile the state
forgot (what a drift repair does), and a mapping change (which must re-send everyone). SQLite and PostgreSQL.
"""

from __future__ import annotations

import sqlite3
from typing import Any, Callable

import pytest
import segment_data
from sandbox_state import klaviyo_profiles, mailchimp_members
from segment_export_sandbox import KLAVIYO_LIST_ID, MAILCHIMP_AUDIENCE_ID
from segment_export_sandbox.config import default_behaviour
from test_sync import run

from segment_export.destinations import destination_for
from segment_export.snapshot import SNAPSHOTS_TABLE, SnapshotStore, snapshot_table
from segment_export.spec import ExportSpec
from segment_export.state import STATE_TABLE, StateStore

PROFILES = 300
COUNTS = ("sent", "accepted", "rejected", "skipped", "unchanged", "removed", "tags_added", "tags_removed", "invalid",
          "held_back")


def _spec(destination: str, conn_id: str, table: str, warehouse: bool, *, last_name: bool = False) -> ExportSpec:
    if destination == "klaviyo":
        dest: dict[str, Any] = {"type": "klaviyo", "list_id": KLAVIYO_LIST_ID}
        mapping: dict[str, Any] = {"email": "email", "first_name": "first_name", "phone_number": "phone",
                                   "external_id": "customer_id",
                                   "attributes": {"tier": "tier", "lifetime_value": "lifetime_value"}}
        sync: dict[str, Any] = {"on_leave": "remove"}
    else:
        dest = {"type": "mailchimp", "audience_id": MAILCHIMP_AUDIENCE_ID, "new_member_status": "subscribed"}
        mapping = {"email": "email", "first_name": "first_name", "phone_number": "phone"}
        sync = {"on_leave": "remove"}
    if last_name:
        mapping["last_name"] = "last_name"
    return ExportSpec.model_validate({
        "id": f"changes_{destination}", "privacy_acknowledged": True,
        "source": {"conn_id": conn_id, "table": table, "segment_column": "segment", "segments": segment_data.SEGMENTS},
        "destination": dest, "mapping": mapping, "sync": {**sync, "warehouse_diff": warehouse, "max_leave_share": None},
    })


def _held(sandbox, destination: str) -> dict[str, Any]:
    """What the destination holds, without ids and times the two passes cannot share."""
    state = sandbox.state()
    if destination == "klaviyo":
        return {email: (p.get("first_name"), p.get("last_name"), p.get("phone_number"), p.get("external_id"),
                        sorted((p.get("properties") or {}).items()))
                for email, p in klaviyo_profiles(state, KLAVIYO_LIST_ID).items()}
    return {email: (m["status"], sorted(m.get("merge_fields", {}).items()), sorted(t if isinstance(t, str) else t["name"] for t in m.get("tags", [])))
            for email, m in mailchimp_members(state, MAILCHIMP_AUDIENCE_ID).items()}


class Warehouse:
    """The segment table on SQLite or PostgreSQL, with the edits the scenario makes."""

    def __init__(self, kind: str, tmp_path, airflow_conn, pg_schema=None):
        self.kind = kind
        if kind == "sqlite":
            self.path = tmp_path / "warehouse.db"
            self.conn_id, self.table = "warehouse", "segment_members"
            airflow_conn("warehouse", conn_type="sqlite", host=str(self.path))
        else:
            self.pg, schema = pg_schema
            self.conn_id, self.table = "pg_warehouse", f"{schema}.segment_members"

    def reset(self) -> None:
        """A fresh segment table and no state, snapshot or outcomes of the scenario's exports."""
        if self.kind == "sqlite":
            self.path.unlink(missing_ok=True)
            segment_data.write_sqlite(self.path, PROFILES)
        else:
            segment_data.write_postgres("host=127.0.0.1 port=5432 user=postgres dbname=test", self.table, PROFILES)
            if self.pg.execute("SELECT to_regclass(%s)", (SNAPSHOTS_TABLE,)).fetchone()[0]:
                for ids in self.pg.execute(f"SELECT export_id, target_id FROM {SNAPSHOTS_TABLE} WHERE export_id LIKE 'changes_%%'").fetchall():
                    self.pg.execute(f"DROP TABLE IF EXISTS {snapshot_table(*ids)}")
            for table in (STATE_TABLE, SNAPSHOTS_TABLE, "segment_export_outcomes"):
                if self.pg.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0]:
                    self.pg.execute(f"DELETE FROM {table} WHERE export_id LIKE 'changes_%%'")

    def execute(self, sql: str, params: tuple = ()) -> list[tuple]:
        sql = sql.replace("{t}", self.table if self.kind == "sqlite" else ".".join(f'"{p}"' for p in self.table.split(".")))
        if self.kind == "sqlite":
            with sqlite3.connect(self.path) as conn:
                return conn.execute(sql, params).fetchall()
        cursor = self.pg.execute(sql.replace("%", "%%").replace("?", "%s"), params)
        return cursor.fetchall() if cursor.description else []


def _edits(wh: Warehouse, destination: str) -> list[tuple[str, Callable[[], None], bool]]:
    """(name, edit, mapping with last_name) in order; each is followed by a run."""
    first = lambda n: wh.execute("SELECT email FROM {t} WHERE customer_id = ? LIMIT 1", (n,))[0][0]  # noqa: E731

    def forget() -> None:  # what a drift repair does: the state forgets a profile, whose rows have not changed
        wh.execute(f"DELETE FROM {STATE_TABLE} WHERE export_id = ? AND profile_key = ?",
                   (f"changes_{destination}", first(7).lower()))

    return [
        ("first run", lambda: None, False),
        ("nothing changed", lambda: None, False),
        ("one row changed", lambda: wh.execute("UPDATE {t} SET first_name = 'Changed' WHERE customer_id = 3"), False),
        ("raw changed, mapped the same", lambda: (
            wh.execute("UPDATE {t} SET first_name = '  ' || first_name || ' ' WHERE customer_id IN (4, 5)"),
            wh.execute("UPDATE {t} SET phone = '+1 ' || substr(phone, 3) WHERE customer_id = 6 AND phone LIKE '+1%'"),
        ), False),
        ("moves, a second segment, a leaver, a newcomer", lambda: (
            wh.execute("UPDATE {t} SET segment = 'winback' WHERE customer_id = 10 AND segment <> 'winback'"),
            wh.execute("INSERT INTO {t} SELECT customer_id, email, first_name, last_name, phone, tier, lifetime_value, "
                       "'churn_risk' FROM {t} WHERE customer_id = 11 AND segment <> 'churn_risk'"),
            wh.execute("DELETE FROM {t} WHERE customer_id = 12"),
            wh.execute("INSERT INTO {t} VALUES (99001, 'newcomer@example.com', 'New', 'Comer', NULL, 'gold', 1.5, 'vip')"),
        ), False),
        ("invalid rows", lambda: (
            wh.execute("INSERT INTO {t} VALUES (99002, 'not-an-address', 'Bad', 'Row', NULL, 'gold', 2.0, 'vip')"),
            wh.execute("UPDATE {t} SET phone = '+1 000' WHERE customer_id = 13"),
        ), False),
        ("the state forgot a profile", forget, False),
        ("mapping changed", lambda: None, True),
        ("nothing changed after the mapping change", lambda: None, True),
    ]


def _scenario(sandbox_server, wh: Warehouse, destination: str, warehouse: bool) -> list[dict[str, Any]]:
    sandbox_server.reset()
    sandbox_server.configure(rate_limits=True, rate_limit_scale=1.0, behaviour=default_behaviour())
    wh.reset()
    steps = []
    for n, (name, edit, last_name) in enumerate(_edits(wh, destination)):
        edit()
        summary = run(_spec(destination, wh.conn_id, wh.table, warehouse, last_name=last_name), run_id=f"run{n}")
        assert summary.consistent
        steps.append({"step": name, "counts": {c: getattr(summary, c) for c in COUNTS}, "held": _held(sandbox_server, destination),
                      "read": summary.read, "segment_rows": summary.segment_rows, "mode": summary.change_detection})
    return steps


@pytest.fixture(params=["sqlite", "postgresql"])
def warehouse(request, tmp_path, airflow_conn):
    pg = request.getfixturevalue("pg_schema") if request.param == "postgresql" else None
    return Warehouse(request.param, tmp_path, airflow_conn, pg)


@pytest.mark.parametrize("destination", ["klaviyo", "mailchimp"])
def test_the_warehouse_diff_sends_what_the_full_read_sends(warehouse, destination, sandbox):
    full = _scenario(sandbox, warehouse, destination, warehouse=False)
    diffed = _scenario(sandbox, warehouse, destination, warehouse=True)
    for f, d in zip(full, diffed, strict=True):
        assert f["mode"] == "full"
        assert d["counts"] == f["counts"], d["step"]
        assert d["held"] == f["held"], d["step"]
    steps = {d["step"]: d for d in diffed}
    # the full read where it must be, the warehouse diff everywhere else, reading only what changed
    assert [d["step"] for d in diffed if d["mode"] == "full"] == ["first run", "mapping changed"]
    assert steps["nothing changed"]["read"] == 0 and steps["nothing changed"]["counts"]["sent"] == 0
    assert steps["one row changed"]["read"] <= 2 and steps["one row changed"]["counts"]["sent"] == 1
    raw = steps["raw changed, mapped the same"]
    assert raw["read"] >= 2 and raw["counts"]["sent"] == 0  # read again, found unchanged once mapped
    assert steps["invalid rows"]["counts"]["invalid"] == 2 == full[5]["counts"]["invalid"]
    assert steps["the state forgot a profile"]["counts"]["sent"] == 1  # planned again though no row changed
    assert steps["the state forgot a profile"]["read"] == 2  # only the invalid rows, read every run
    everyone = full[-2]["counts"]["sent"]
    assert steps["mapping changed"]["counts"]["sent"] == everyone > PROFILES // 2
    assert steps["nothing changed after the mapping change"]["mode"] == "warehouse"
    assert steps["nothing changed after the mapping change"]["counts"]["sent"] == 0
    assert all(d["segment_rows"] == f["segment_rows"] for f, d in zip(full, diffed))


def test_a_rejected_profile_is_sent_again_by_the_next_warehouse_diff(segment_db, sandbox):
    """The destination refused a profile: its rows do not change, but the state does not hold it, so every run
    plans it again (as the full read would), until it is accepted."""
    spec = _spec("mailchimp", "warehouse", "segment_members", True)
    first = run(spec, run_id="r1")
    assert first.change_detection == "full"
    email = sqlite3.connect(segment_db).execute("SELECT email FROM segment_members WHERE customer_id = 20").fetchone()[0]
    with sqlite3.connect(segment_db) as conn:
        conn.execute(f"DELETE FROM {STATE_TABLE} WHERE profile_key = ?", (email.lower(),))
    second = run(spec, run_id="r2")
    assert (second.change_detection, second.read, second.sent, second.accepted) == ("warehouse", 0, 1, 1)
    third = run(spec, run_id="r3")
    assert (third.read, third.sent) == (0, 0)


def test_no_snapshot_for_file_sources_truncating_limits_or_when_switched_off(segment_db, sandbox, tmp_path):
    off = _spec("klaviyo", "warehouse", "segment_members", False)
    run(off, run_id="r1")
    assert run(off, run_id="r2").change_detection == "full"
    with sqlite3.connect(segment_db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE name LIKE 'segment_export_snapshot%'").fetchone()[0] == 0
    csv = segment_data.write_csv(tmp_path / "segment.csv", 50)
    file_spec = ExportSpec.model_validate({**off.model_dump(exclude_none=True), "id": "changes_file",
                                           "source": {"path": str(csv), "segment_column": "segment", "segments": ["vip"]},
                                           "sync": {"on_leave": "remove"}})
    run(file_spec, run_id="f1")
    assert run(file_spec, run_id="f2").change_detection == "full"


def test_snapshot_rows_are_the_segment_hashed_by_the_database(segment_db, sandbox):
    spec = _spec("klaviyo", "warehouse", "segment_members", True)
    run(spec, run_id="r1")
    state = StateStore.open("warehouse", spec.id, destination_for(spec).target_id)
    try:
        snapshot = SnapshotStore(state)
        assert snapshot.signature() is not None
        rows = state.conn.execute(f"SELECT COUNT(*), COUNT(DISTINCT profile_key) FROM {snapshot.table}").fetchone()
        source_rows = state.conn.execute("SELECT COUNT(*), COUNT(DISTINCT lower(email)) FROM segment_members").fetchone()
        assert rows == source_rows  # every row maps to a profile in this segment; repeated rows are one
        assert list(snapshot.affected_keys()) == []  # the state is what the snapshot says
    finally:
        state.close()


def test_a_failed_snapshot_write_is_logged_and_the_next_run_reads_the_whole_segment(segment_db, sandbox, monkeypatch, caplog):
    spec = _spec("klaviyo", "warehouse", "segment_members", True)

    def fail(self, *args, **kwargs):
        raise RuntimeError("disk full")

    with monkeypatch.context() as patched:
        patched.setattr(SnapshotStore, "_finish", fail)  # the rows are written, the signature is not
        first = run(spec, run_id="r1")
    assert first.sent == first.accepted > 0  # the run's outcome stands: the snapshot is a cache
    assert "snapshot could not be written (RuntimeError: disk full)" in caplog.text
    second = run(spec, run_id="r2")
    assert (second.change_detection, second.sent) == ("full", 0)  # no snapshot: everything read, nothing changed
    assert run(spec, run_id="r3").change_detection == "warehouse"


def test_sqlite_before_3_39_reads_the_whole_segment(segment_db, sandbox, monkeypatch):
    spec = _spec("klaviyo", "warehouse", "segment_members", True)
    run(spec, run_id="r1")
    monkeypatch.setattr("segment_export.changes.sqlite3.sqlite_version_info", (3, 34, 1))
    assert run(spec, run_id="r2").change_detection == "full"  # no FULL OUTER JOIN there: the full read, logged


def test_without_a_second_connection_the_state_is_compared_after_the_read(pg_schema, tmp_path, airflow_conn, sandbox,
                                                                          monkeypatch, caplog):
    """On PostgreSQL the snapshot is compared with the state on a second connection while the segment is read;
    when that connection cannot be opened, the comparison runs after the read and plans the same profiles."""
    wh = Warehouse("postgresql", tmp_path, airflow_conn, pg_schema)
    wh.reset()
    spec = _spec("klaviyo", wh.conn_id, wh.table, True)
    run(spec, run_id="r1")
    email = wh.execute("SELECT email FROM {t} WHERE customer_id = 7 LIMIT 1")[0][0]
    wh.execute(f"DELETE FROM {STATE_TABLE} WHERE export_id = ? AND profile_key = ?", (spec.id, email.lower()))
    opened = StateStore.open.__func__

    def without_second_connection(cls, *args, **kwargs):
        store = opened(cls, *args, **kwargs)

        def refuse():
            raise RuntimeError("too many connections")

        store.reconnect = refuse
        return store

    monkeypatch.setattr(StateStore, "open", classmethod(without_second_connection))
    second = run(spec, run_id="r2")
    assert (second.change_detection, second.read, second.sent, second.accepted) == ("warehouse", 0, 1, 1)
    assert "compared with the state after the read (a second connection failed: too many connections)" in caplog.text


def test_without_a_temporary_table_the_diff_streams_its_pass_and_finds_the_same_rows(pg_schema, tmp_path, airflow_conn,
                                                                                      sandbox, monkeypatch):
    """On PostgreSQL the diff's pass is written to a temporary table (so it may run in parallel); where that cannot
    be created (a role without the TEMPORARY privilege; here, a name PostgreSQL refuses), the pass is streamed
    through a cursor instead, in the same transaction, and finds the same changed rows."""
    wh = Warehouse("postgresql", tmp_path, airflow_conn, pg_schema)
    wh.reset()
    spec = _spec("klaviyo", wh.conn_id, wh.table, True)
    run(spec, run_id="r1")
    wh.execute("UPDATE {t} SET first_name = 'Changed' WHERE customer_id = 7")
    monkeypatch.setattr("segment_export.sources.sql.CHANGED_TABLE", 'no"such')
    second = run(spec, run_id="r2")
    assert (second.change_detection, second.sent, second.accepted) == ("warehouse", 1, 1)
    assert 0 < second.read <= 2  # the changed row (and its profile's other row, if it has one)
    email = wh.execute("SELECT email FROM {t} WHERE customer_id = 7 LIMIT 1")[0][0].lower()
    assert klaviyo_profiles(sandbox.state(), KLAVIYO_LIST_ID)[email]["first_name"] == "Changed"
