"""The snapshot store's writes (``segment_export.snapshot``), on the embedded SQLite state: a full snapshot is
loaded sorted through a temporary table, and must leave other targets' rows and the key index as they were."""

from __future__ import annotations

import sqlite3

from segment_export.snapshot import SNAPSHOT_TABLE, SNAPSHOTS_TABLE, SnapshotStore
from segment_export.state import StateStore


def _store(conn: sqlite3.Connection, export_id: str, target_id: str = "t1") -> SnapshotStore:
    state = StateStore(conn, "?", export_id, target_id, "test", dialect_name="sqlite")
    state.ensure_tables()
    snapshot = SnapshotStore(state)
    snapshot.ensure_tables()
    return snapshot


def _rows(prefix: str, n: int) -> list[tuple[str, str, str, str, str, str]]:
    # key order, as the staging file hands them over; hashes in another order
    return [(f"{(i * 7919) % n:08d}{prefix}", f"{prefix}{i:05d}", f'{{"n":{i}}}', "vip", f"fp{i}", '["vip"]') for i in range(n)]


def _held(conn: sqlite3.Connection, export_id: str, target_id: str = "t1") -> list[tuple]:
    return sorted(conn.execute(f"SELECT row_hash, profile_key, fragment, segment, profile_fingerprint, profile_segments "
                               f"FROM {SNAPSHOT_TABLE} WHERE export_id = ? AND target_id = ?", (export_id, target_id)))


def _indexes(conn: sqlite3.Connection) -> set[str]:
    return {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ?", (SNAPSHOT_TABLE,))}


def test_a_full_snapshot_replaces_only_its_own_target_and_keeps_the_key_index(tmp_path):
    conn = sqlite3.connect(tmp_path / "state.db")
    a, b, a_other_target = _store(conn, "a"), _store(conn, "b"), _store(conn, "a", "t2")
    b_rows, other_rows = _rows("b", 300), _rows("o", 50)
    assert b.replace([b_rows[:200], b_rows[200:]], "sig-b") == 300
    assert a_other_target.replace([other_rows], "sig-o") == 50
    first = _rows("a", 500)
    a.replace([first], "sig-a")
    second = _rows("x", 400)
    assert a.replace([second[:100], second[100:] + second[:1]], "sig-a2") == 401  # a row repeated in the source
    assert _held(conn, "a") == sorted(second)
    assert _held(conn, "b") == sorted(b_rows) and _held(conn, "a", "t2") == sorted(other_rows)
    assert f"{SNAPSHOT_TABLE}_by_key" in _indexes(conn)
    counts = dict(conn.execute(f"SELECT export_id || '/' || target_id, row_count FROM {SNAPSHOTS_TABLE}"))
    assert counts == {"b/t1": 300, "a/t2": 50, "a/t1": 400} and a.signature() == "sig-a2"
    assert a.rows_for(["x00003"]) == [r[:4] for r in second if r[1] == "x00003"]


def test_a_target_alone_in_the_table_is_rewritten_whole_and_its_key_index_rebuilt(tmp_path):
    conn = sqlite3.connect(tmp_path / "state.db")
    a = _store(conn, "a")
    a.replace([_rows("a", 300)], "sig-1")
    rows = _rows("y", 250)
    assert a.replace([rows], "sig-2") == 250
    assert _held(conn, "a") == sorted(rows) and f"{SNAPSHOT_TABLE}_by_key" in _indexes(conn)
    assert conn.execute("SELECT count(*) FROM sqlite_temp_master").fetchone() == (0,)  # the load table is gone
    plan = " ".join(str(r) for r in conn.execute(
        f"EXPLAIN QUERY PLAN SELECT * FROM {SNAPSHOT_TABLE} WHERE export_id = 'a' AND target_id = 't1' AND profile_key = 'y00001'"))
    assert f"{SNAPSHOT_TABLE}_by_key" in plan
