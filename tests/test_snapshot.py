"""The snapshot store's writes (``segment_export.snapshot``), on SQLite and PostgreSQL state: a full snapshot is
loaded sorted through a temporary table, and must leave other targets' rows and the key index as they were."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest

from segment_export.snapshot import SNAPSHOTS_TABLE, SnapshotStore, snapshot_table
from segment_export.state import StateStore


class Db:
    """One state database: its DB-API connection, placeholder, dialect, and how to list the snapshot's indexes."""

    def __init__(self, conn: Any, placeholder: str, dialect: str):
        self.conn, self.ph, self.dialect = conn, placeholder, dialect

    def execute(self, sql: str, params: tuple = ()) -> list[tuple]:
        cursor = self.conn.cursor()
        if params:
            cursor.execute(sql.replace("?", self.ph), params)
        else:
            cursor.execute(sql)
        rows = [tuple(r) for r in cursor.fetchall()] if cursor.description else []
        cursor.close()
        return rows

    def indexes(self, table: str) -> set[str]:
        if self.dialect == "sqlite":
            sql = "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ?"
        else:
            sql = "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema() AND tablename = ?"
        return {name for (name,) in self.execute(sql, (table,))}


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    if request.param == "sqlite":
        conn = sqlite3.connect(tmp_path / "state.db")
        yield Db(conn, "?", "sqlite")
        conn.close()
        return
    import psycopg

    _, schema = request.getfixturevalue("pg_schema")  # a fresh schema (skipped without PostgreSQL, outside CI)
    conn = psycopg.connect(f"host=127.0.0.1 port=5432 user=postgres dbname=test options=-csearch_path={schema}")
    yield Db(conn, "%s", "postgresql")
    conn.close()


def _store(db: Db, export_id: str, target_id: str = "t1") -> SnapshotStore:
    state = StateStore(db.conn, db.ph, export_id, target_id, "test", dialect_name=db.dialect)
    state.ensure_tables()
    snapshot = SnapshotStore(state)
    snapshot.ensure_tables()
    return snapshot


def _rows(prefix: str, n: int) -> list[tuple[str, str, str, str, str, str]]:
    # key order, as the staging file hands them over; hashes in another order
    return [(f"{(i * 7919) % n:08d}{prefix}", f"{prefix}{i:05d}", f'{{"n":{i}}}', "vip", f"fp{i}", '["vip"]') for i in range(n)]


def _held(db: Db, export_id: str, target_id: str = "t1") -> list[tuple]:
    return sorted(db.execute(f"SELECT row_hash, profile_key, fragment, segment, profile_fingerprint, profile_segments "
                               f"FROM {snapshot_table(export_id, target_id)}"))


def test_a_full_snapshot_replaces_only_its_own_target_and_keeps_the_key_index(db):
    a, b, a_other_target = _store(db, "a"), _store(db, "b"), _store(db, "a", "t2")
    b_rows, other_rows = _rows("b", 300), _rows("o", 50)
    assert b.replace([b_rows[:200], b_rows[200:]], "sig-b") == 300
    assert a_other_target.replace([other_rows], "sig-o") == 50
    first = _rows("a", 500)
    a.replace([first], "sig-a")
    second = _rows("x", 400)
    assert a.replace([second[:100], second[100:]], "sig-a2") == 400
    assert _held(db, "a") == sorted(second)
    assert _held(db, "b") == sorted(b_rows) and _held(db, "a", "t2") == sorted(other_rows)
    assert len({a.table, b.table, a_other_target.table}) == 3  # a table per export target
    assert all(f"{t.table}_by_key" in db.indexes(t.table) for t in (a, b, a_other_target))
    counts = dict(db.execute(f"SELECT export_id || '/' || target_id, row_count FROM {SNAPSHOTS_TABLE}"))
    assert counts == {"b/t1": 300, "a/t2": 50, "a/t1": 400} and a.signature() == "sig-a2"
    assert a.rows_for(["x00003"]) == [r[:4] for r in second if r[1] == "x00003"]


def test_a_target_alone_in_the_table_is_rewritten_whole_and_its_key_index_rebuilt(db):
    a = _store(db, "a")
    a.replace([_rows("a", 300)], "sig-1")
    rows = _rows("y", 250)
    assert a.replace([rows], "sig-2") == 250
    assert _held(db, "a") == sorted(rows) and f"{a.table}_by_key" in db.indexes(a.table)
    load_tables = ("SELECT count(*) FROM sqlite_temp_master" if db.dialect == "sqlite" else
                   "SELECT count(*) FROM pg_tables WHERE schemaname LIKE 'pg_temp%' AND tablename = 'segment_export_snapshot_load'")
    assert db.execute(load_tables) == [(0,)]  # the load table is gone
    if db.dialect == "sqlite":
        plan = " ".join(str(r) for r in db.execute(
            f"EXPLAIN QUERY PLAN SELECT * FROM {a.table} WHERE profile_key = 'y00001'"))
        assert f"{a.table}_by_key" in plan


def _primary_key(db: Db, table: str) -> list[tuple]:
    return db.execute("SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND "
                      "a.attnum = ANY(i.indkey) WHERE i.indrelid = ?::regclass AND i.indisprimary ORDER BY a.attnum",
                      (table,))


def test_postgresql_copies_a_target_alone_straight_in_and_a_failure_rolls_the_whole_load_back(db):
    """Through psycopg 3, a full snapshot is copied straight into its table with its indexes dropped and built
    again (``SnapshotStore._load_bare``), in one transaction: a load that fails halfway leaves the table with its primary
    key, its key index and the old rows, and without a signature (the next run reads the whole segment)."""
    if db.dialect != "postgresql":
        pytest.skip("the straight COPY is PostgreSQL's")
    a = _store(db, "a")
    old = _rows("a", 300)
    assert a.replace([old[:100], old[100:]], "sig-1") == 300
    assert _held(db, "a") == sorted(old) and a.signature() == "sig-1"
    assert _primary_key(db, a.table) == [("row_hash",)] and f"{a.table}_by_key" in db.indexes(a.table)

    def failing():
        yield _rows("z", 50)
        raise RuntimeError("the staging file went away")

    with pytest.raises(RuntimeError, match="went away"):
        a.replace(failing(), "sig-2")
    a.state.rollback()  # as the snapshot writer does
    assert _held(db, "a") == sorted(old) and a.signature() is None
    assert _primary_key(db, a.table) == [("row_hash",)] and f"{a.table}_by_key" in db.indexes(a.table)
    with pytest.raises(Exception, match="unique|duplicate"):  # a repeated hash fails the key's build: rolled back too
        a.replace([_rows("d", 20) + _rows("d", 20)[:1]], "sig-3")
    a.state.rollback()
    assert _held(db, "a") == sorted(old) and _primary_key(db, a.table) == [("row_hash",)]


class _Psycopg2Like:
    """A psycopg 3 connection whose cursors have no ``copy`` (as psycopg 2's): the load goes as JSON arrays."""

    def __init__(self, conn):
        self._conn = conn

    def cursor(self, *args, **kwargs):
        cursor = self._conn.cursor(*args, **kwargs)

        class NoCopy:
            def __getattr__(self, name):
                if name == "copy":
                    raise AttributeError(name)
                return getattr(cursor, name)

        return NoCopy()

    def __getattr__(self, name):
        return getattr(self._conn, name)


def test_postgresql_loads_the_rows_by_copy_or_as_json_to_the_same_snapshot(db, monkeypatch):
    """psycopg 3 loads with COPY (``snapshot._copy_rows``); another driver as JSON arrays. Both keep every
    character of a staged row: tabs, newlines, backslashes and quotes in a fragment, text beyond ASCII."""
    if db.dialect != "postgresql":
        pytest.skip("COPY is PostgreSQL's")
    odd = [("h1", "k1", '{"a":"tab\there\\nnewline \\\\ \\"q\\""}', "vip\tx", "fp1", '["vip\\tx"]'),
           ("h2", "k2", '{"name":"Zoë \u00e9 \u4e2d"}', "news", "fp2", '["news"]'),
           ("h3", "k3", "line\nbreak\\N", "a\\b", "fp3", '["a\\\\b"]')]
    import segment_export.snapshot as snapshot_module

    copy_rows, loaded = snapshot_module._copy_rows, []
    monkeypatch.setattr(snapshot_module, "_copy_rows",
                        lambda *args, **kwargs: loaded.append(copy_rows(*args, **kwargs)) or loaded[-1])
    copied = _store(db, "copy")
    assert copied.replace([odd[:2], odd[2:]], "sig") == 3
    state = StateStore(_Psycopg2Like(db.conn), db.ph, "json", "t1", "test", dialect_name=db.dialect)
    as_json = SnapshotStore(state)
    as_json.ensure_tables()
    assert as_json.replace([odd], "sig") == 3
    assert loaded == [3]  # COPY through psycopg 3; the other loads JSON arrays
    assert _held(db, "copy") == _held(db, "json") == sorted(odd)
