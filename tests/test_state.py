"""The sync state store on each path it takes: SQLite and PostgreSQL (rows as one JSON array per statement) and
any other DB-API driver (``executemany``), checked by what the tables hold afterwards."""

from __future__ import annotations

import sqlite3

import pytest

from segment_export.state import INFLIGHT_TABLE, OUTCOMES_TABLE, STATE_TABLE, StateStore


class _OtherDriver:
    """A DB-API connection the store does not recognise (as MySQL's would be): it must take the portable path."""

    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn

    def cursor(self):
        return self._conn.cursor()

    def commit(self):
        self._conn.commit()

    def rollback(self):
        self._conn.rollback()

    def close(self):
        self._conn.close()


@pytest.fixture(params=["sqlite", "postgres", "generic"])
def store(request, tmp_path):
    if request.param == "postgres":
        conn, schema = request.getfixturevalue("pg_schema")
        import psycopg

        pg = psycopg.connect(f"host=127.0.0.1 port=5432 user=postgres dbname=test options=-csearch_path={schema}")
        s = StateStore(pg, "%s", "exp", "list1", "postgres")
    elif request.param == "sqlite":
        s = StateStore(sqlite3.connect(tmp_path / "state.db"), "?", "exp", "list1", "sqlite")
    else:
        s = StateStore(_OtherDriver(sqlite3.connect(tmp_path / "state.db")), "?", "exp", "list1", "generic")
    s.ensure_tables()
    assert s.dialect == request.param
    yield s
    s.close()


def _rows(store: StateStore, sql: str) -> list[tuple]:
    cursor = store.conn.cursor()
    cursor.execute(sql)
    rows = [tuple(r) for r in cursor.fetchall()]
    cursor.close()
    return sorted(rows, key=repr)


def test_save_inserts_replaces_and_forgets(store):
    store.save([("a@x.io", "f1", ("vip",)), ("b@x.io", "f2", ()), ("c@x.io", "f3", ("vip", "news"))],
               new={"a@x.io", "b@x.io", "c@x.io"})
    store.save([("a@x.io", "f9", ("news",))], forgotten=["b@x.io"])
    assert sorted(store.previous()) == [("a@x.io", "f9", ("news",)), ("c@x.io", "f3", ("vip", "news"))]
    rows = _rows(store, f"SELECT export_id, target_id, profile_key, segments FROM {STATE_TABLE}")
    assert rows == [("exp", "list1", "a@x.io", '["news"]'), ("exp", "list1", "c@x.io", '["vip", "news"]')]


def test_outcomes_keep_reasons_and_nulls(store):
    store.record_outcomes("run1", [("a@x.io", "created", None), ("b@x.io", "rejected", 'Invalid "phone" — +1 555')])
    rows = _rows(store, f"SELECT export_id, run_id, profile_key, action, reason FROM {OUTCOMES_TABLE}")
    assert rows == [("exp", "run1", "a@x.io", "created", None), ("exp", "run1", "b@x.io", "rejected", 'Invalid "phone" — +1 555')]


def test_inflight_batches_round_trip_and_clear(store):
    store.begin_batch("b1", [("a@x.io", "f1", ("vip",), "create"), ("b@x.io", "f2", (), "update")])
    store.batch_submitted("b1", "job-1")
    store.begin_batch("b2", [("c@x.io", "f3", ("news",), "create")])
    store.end_batch("b2")
    assert store.inflight() == {"b1": ("job-1", [("a@x.io", "f1", ("vip",), "create"), ("b@x.io", "f2", (), "update")])}
    store.save([("a@x.io", "f1", ("vip",))], new={"a@x.io"})
    assert store.clear() == 1
    assert list(store.previous()) == [] and store.inflight() == {}


def test_a_batchs_job_id_is_a_row_of_its_own_and_rows_written_the_earlier_way_still_resume(store):
    rows = [(f"p{i}@x.io", f"{i:032x}", ("vip",), "create") for i in range(3)]
    store.begin_batch("b1", rows)
    store.batch_submitted("b1", "job-1")
    # the batch's profiles were not rewritten to add the job id: it has a row of its own
    assert _rows(store, f"SELECT part, job_id FROM {INFLIGHT_TABLE} ORDER BY part") == [(-1, "job-1"), (0, None)]
    store.begin_batch("b0", rows[:1])  # recorded by an earlier version: the job id on the profiles' row
    store._run(f"UPDATE {INFLIGHT_TABLE} SET job_id = 'job-0' WHERE batch_id = 'b0'", ()).close()
    assert store.inflight() == {"b0": ("job-0", rows[:1]), "b1": ("job-1", rows)}
    store.end_batch("b1")
    store.end_batch("b0")
    assert _rows(store, f"SELECT COUNT(*) FROM {INFLIGHT_TABLE}") == [(0,)]


def test_a_large_batch_in_flight_round_trips_in_parts_where_text_is_small(store):
    rows = [(f"p{i:05d}@x.io", f"{i:032x}", ("vip", "news") if i % 2 else (), "create") for i in range(1_234)]
    store.begin_batch("big", rows)
    parts = _rows(store, f"SELECT part, length(profiles) FROM {INFLIGHT_TABLE}")
    assert len(parts) == (1 if store.dialect != "generic" else 13)
    assert store.dialect != "generic" or max(size for _, size in parts) < 65_535  # a MySQL TEXT
    assert store.inflight() == {"big": (None, rows)}
    store.end_batch("big")
    assert store.inflight() == {}


def test_other_exports_are_untouched(store):
    other = StateStore(store.conn, store.ph, "other", "list1", "same database")
    other.save([("a@x.io", "f1", ())], new={"a@x.io"})
    store.save([("a@x.io", "f2", ())], new={"a@x.io"})
    store.clear()
    assert list(other.previous()) == [("a@x.io", "f1", ())]
    assert _rows(store, f"SELECT count(*) FROM {INFLIGHT_TABLE}") == [(0,)]


def test_an_uncommitted_batch_is_undone_by_rollback(store):
    store.save([("a@x.io", "f1", ())], new={"a@x.io"})
    store.save([("b@x.io", "f2", ())], new={"b@x.io"}, commit=False)
    store.record_outcomes("run1", [("b@x.io", "created", None)], commit=False)
    store.rollback()  # what the exporter does when writing a batch's outcome fails part-way
    assert list(store.previous()) == [("a@x.io", "f1", ())]
    assert _rows(store, f"SELECT count(*) FROM {OUTCOMES_TABLE}") == [(0,)]


def test_profile_ids_are_remembered_and_kept_by_saves_without_them(store):
    store.save([("a@x.io", "f1", ()), ("b@x.io", "f2", ())], new={"a@x.io", "b@x.io"}, profile_ids={"a@x.io": "01A"})
    assert store.profile_ids(["a@x.io", "b@x.io", "zz@x.io"]) == {"a@x.io": "01A"}
    store.save([("a@x.io", "f1", ("vip",)), ("b@x.io", "f3", ())], profile_ids={"b@x.io": "01B"})  # e.g. tags applied
    assert store.profile_ids(["a@x.io", "b@x.io"]) == {"a@x.io": "01A", "b@x.io": "01B"}
    store.save([("a@x.io", "f4", ())], profile_ids={"a@x.io": "01M"})  # merged into another profile: its id now
    store.save([], forgotten=["b@x.io"])
    assert store.profile_ids(["a@x.io", "b@x.io"]) == {"a@x.io": "01M"}
    keys = [f"p{i}@x.io" for i in range(1_200)]  # more keys than one IN list of the portable path
    store.save([(k, "f", ()) for k in keys], new=set(keys), profile_ids={k: k.upper() for k in keys})
    assert store.profile_ids(keys) == {k: k.upper() for k in keys} and store.profile_ids([]) == {}


def test_a_state_table_from_before_profile_ids_is_migrated(store):
    cursor = store.conn.cursor()
    cursor.execute(f"DROP TABLE {STATE_TABLE}")
    cursor.execute(  # the table as earlier versions created it
        f"CREATE TABLE {STATE_TABLE} (export_id VARCHAR(200) NOT NULL, target_id VARCHAR(200) NOT NULL,"
        " profile_key VARCHAR(320) NOT NULL, fingerprint VARCHAR(64) NOT NULL, segments TEXT NOT NULL,"
        " updated_at VARCHAR(40) NOT NULL, PRIMARY KEY (export_id, target_id, profile_key))"
    )
    cursor.execute(f"INSERT INTO {STATE_TABLE} VALUES ('exp', 'list1', 'old@x.io', 'f0', '[]', 'then')")
    cursor.close()
    store.conn.commit()
    store.ensure_tables()
    store.ensure_tables()  # once migrated, nothing more to do
    assert list(store.previous()) == [("old@x.io", "f0", ())] and store.profile_ids(["old@x.io"]) == {}
    store.save([("old@x.io", "f1", ()), ("new@x.io", "f2", ())], new={"new@x.io"}, profile_ids={"old@x.io": "01O", "new@x.io": "01N"})
    assert store.profile_ids(["old@x.io", "new@x.io"]) == {"old@x.io": "01O", "new@x.io": "01N"}
    assert sorted(store.previous()) == [("new@x.io", "f2", ()), ("old@x.io", "f1", ())]


def test_exclusive_profile_ids_leave_out_ids_another_remembered_profile_holds(store):
    # b and c were merged by the destination into one profile (a shared phone number): 01B
    store.save([("a@x.io", "f", ()), ("b@x.io", "f", ()), ("c@x.io", "f", ()), ("d@x.io", "f", ()), ("e@x.io", "f", ())],
               new={"a@x.io", "b@x.io", "c@x.io", "d@x.io", "e@x.io"},
               profile_ids={"a@x.io": "01A", "b@x.io": "01B", "c@x.io": "01B", "d@x.io": "01D", "e@x.io": "01D"})
    other = StateStore(store.conn, store.ph, "other", "list1", "same database")
    other.save([("z@x.io", "f", ())], new={"z@x.io"}, profile_ids={"z@x.io": "01A"})  # another export's: not ours
    assert store.profile_ids(["a@x.io", "b@x.io"], exclusive=True) == {"a@x.io": "01A", "b@x.io": None}  # c holds 01B
    assert store.profile_ids(["d@x.io", "e@x.io"], exclusive=True) == {"d@x.io": "01D", "e@x.io": "01D"}  # both go
    assert store.profile_ids(["b@x.io"]) == {"b@x.io": "01B"}
