"""The segment as the export's last run read it, kept in the warehouse beside the state: the warehouse diff's memory.

Each export target has a table of its own, ``segment_export_snapshot_<digest>`` (``snapshot_table``), with one row per
source row of the segment that mapped to a profile: the hash of the row's source columns (computed by the database,
``sources.sql.hashed_rows``), the profile key, what the row was staged as (its payload fragment and segment), and the
profile those rows made (its fingerprint and segments, as the state stores them). ``segment_export_snapshots`` holds
one row per export target: the signature of the mapping the rows were staged under (``changes.signature``), their
count and when they were written.

Why a table per target: a full run rewrites its target's snapshot whole, which is cheapest with the table to itself
(emptied with ``TRUNCATE``, loaded without its indexes, which are then built once: ``_load_bare``). In one table
shared by every export, a full run could only delete its own rows (dead space until a VACUUM, scanned by every
export's diff until then) and insert the new ones into indexes kept for the others, sorted by hash, a conflict check
each: at 1.1M rows, 43-76 s against 17-21 s alone (session 14). And one export's exclusive lock never holds another.
The shared table of earlier versions (``segment_export_snapshot``) is dropped: it was a cache (see below).

Why the staged form and not the source's values: the staged form is the exporter's own text, so it goes in and
comes back exactly, whatever the source's column types (a PostgreSQL ``json`` or ``timestamptz`` would not survive
a trip through Python and back). It is also all the diff needs: a profile one of whose rows changed is staged again
from its other rows' snapshot rows without reading or mapping them.

The snapshot is only ever a cache: the run compares it with the state (``affected_keys``), so a profile the
destination did not accept, one the mass-removal guard held back, one a drift repair or an erasure made the state
forget, or a state edited by hand, is planned again as the full diff would plan it.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable, Iterator

from segment_export.sources.sql import tune_diff_transaction
from segment_export.state import _JSON_KEYS, STATE_TABLE, StateStore, _json_text, _now

#: the table earlier versions kept every target's snapshot in (dropped: see the module docstring)
SHARED_SNAPSHOT_TABLE = "segment_export_snapshot"
SNAPSHOTS_TABLE = "segment_export_snapshots"
_SNAPSHOTS_DDL = (
    f"CREATE TABLE IF NOT EXISTS {SNAPSHOTS_TABLE} ("
    " export_id VARCHAR(200) NOT NULL, target_id VARCHAR(200) NOT NULL, signature VARCHAR(64) NOT NULL,"
    " row_count INTEGER NOT NULL, written_at VARCHAR(40) NOT NULL, PRIMARY KEY (export_id, target_id))"
)


def snapshot_table(export_id: str, target_id: str) -> str:
    """The name of an export target's snapshot table: a digest of the two ids (any characters, any length), so the
    name is a plain identifier within PostgreSQL's 63 bytes."""
    digest = hashlib.blake2b(f"{export_id}\x00{target_id}".encode(), digest_size=8).hexdigest()
    return f"{SHARED_SNAPSHOT_TABLE}_{digest}"


#: a snapshot row as written: (row hash, profile key, fragment, segment, profile fingerprint, profile segments JSON)
SnapshotRow = tuple[str, str, str, str, str, str]
_CHUNK = 5000
#: the temporary table a full snapshot is loaded through without psycopg 3's COPY (``SnapshotStore._reload_sorted``)
_LOAD_TABLE = "segment_export_snapshot_load"
#: PostgreSQL, for the load's transaction: sorts and index builds in memory up to these sizes
_LOAD_SETTINGS = {"work_mem": "128MB", "maintenance_work_mem": "256MB"}


class SnapshotStore:
    """The snapshot of one export target, on the state's connection (SQLite or PostgreSQL: the JSON statements)."""

    def __init__(self, state: StateStore):
        self.state = state
        self.ids = (state.export_id, state.target_id)
        self.table = snapshot_table(*self.ids)

    @property
    def _ddl(self) -> tuple[str, ...]:
        """The target's table and its key index (``IF NOT EXISTS``: also what rebuilds the index after a load)."""
        return (f"CREATE TABLE IF NOT EXISTS {self.table} (row_hash VARCHAR(64) NOT NULL PRIMARY KEY,"
                " profile_key VARCHAR(320) NOT NULL, fragment TEXT NOT NULL, segment TEXT NOT NULL,"
                " profile_fingerprint VARCHAR(64) NOT NULL, profile_segments TEXT NOT NULL)",
                f"CREATE INDEX IF NOT EXISTS {self.table}_by_key ON {self.table} (profile_key)")

    def ensure_tables(self) -> None:
        self._drop_shared_table()
        for ddl in (_SNAPSHOTS_DDL, *self._ddl):
            self.state._run(ddl).close()
        self.state.conn.commit()

    def _drop_shared_table(self) -> None:
        """Drop the table earlier versions shared between targets, if it is there and free within two seconds: a
        worker still on an earlier version may hold it (a rolling upgrade), and then it is dropped by a later run."""
        state = self.state
        state.conn.commit()  # what the run wrote before stays, whatever happens to the drop
        try:
            if state.dialect == "postgres":
                state._run("SET LOCAL lock_timeout = '2s'").close()
            state._run(f"DROP TABLE IF EXISTS {SHARED_SNAPSHOT_TABLE}").close()
            state.conn.commit()
        except Exception:  # noqa: BLE001 - a cache nobody reads any more: left for a later run
            state.rollback()

    def signature(self) -> str | None:
        """The signature the snapshot was written under; None when there is none."""
        cursor = self.state._run(f"SELECT signature FROM {SNAPSHOTS_TABLE} WHERE export_id = ? AND target_id = ?", self.ids)
        row = cursor.fetchone()
        cursor.close()
        return row[0] if row else None

    def affected_keys(self) -> Iterator[str]:
        """The profiles whose state is not what the snapshot says their rows make (not accepted, accepted
        differently, forgotten, held back), and those the state holds without any snapshot row: the run plans
        them from their current rows whether or not a row changed."""
        # PostgreSQL: one full outer join by key (a hash join: one pass over each table). SQLite would scan one
        # side's subquery once per row of the other (quadratic: 127 s at 50,000 rows), so there: a join and an
        # anti-join, each looking keys up in the other table's index. A profile of several rows comes out once per
        # row; the caller keeps each key once.
        state_rows = f"SELECT profile_key, fingerprint, segments FROM {STATE_TABLE} WHERE export_id = ? AND target_id = ?"
        postgres = self.state.dialect == "postgres"
        if postgres:
            params = self.ids
            sql = (
                f"SELECT COALESCE(n.profile_key, s.profile_key) FROM {self.table} n FULL OUTER JOIN ({state_rows}) s "
                "ON s.profile_key = n.profile_key WHERE n.profile_key IS NULL OR s.profile_key IS NULL "
                "OR s.fingerprint <> n.profile_fingerprint OR s.segments <> n.profile_segments"
            )
        else:
            params = self.ids + self.ids
            sql = (
                f"SELECT n.profile_key FROM {self.table} n LEFT JOIN {STATE_TABLE} s ON s.export_id = ? "
                "AND s.target_id = ? AND s.profile_key = n.profile_key "
                "WHERE s.profile_key IS NULL OR s.fingerprint <> n.profile_fingerprint OR s.segments <> n.profile_segments "
                f"UNION ALL SELECT s.profile_key FROM {STATE_TABLE} s WHERE s.export_id = ? AND s.target_id = ? AND NOT EXISTS "
                f"(SELECT 1 FROM {self.table} n WHERE n.profile_key = s.profile_key)"
            )
        if postgres:
            tune_diff_transaction(self.state.conn)  # until the transaction ends (the state commits after each write)
        cursor = self.state._run(sql, params)
        try:
            while rows := cursor.fetchmany(_CHUNK):
                for (key,) in rows:
                    yield key
        finally:
            cursor.close()

    def rows_for(self, keys: list[str]) -> list[tuple[str, str, str, str]]:
        """(row hash, profile key, fragment, segment) of the snapshot rows of these profiles."""
        if not keys:
            return []
        cursor = self.state._run(f"SELECT row_hash, profile_key, fragment, segment {self._of_keys}", (_json_text(keys),))
        rows = [tuple(r) for r in cursor.fetchall()]
        cursor.close()
        return rows  # type: ignore[return-value]

    @property
    def _of_keys(self) -> str:
        """``FROM … WHERE`` the rows of the profiles in one bound JSON array of keys."""
        return f"FROM {self.table} WHERE profile_key IN ({_JSON_KEYS[self.state.dialect]})"

    def replace(self, rows: Iterable[list[SnapshotRow]], signature: str) -> int:
        """A full run's snapshot: every row, in place of whatever was there. Returns the rows written."""
        self._forget_signature()
        return self._finish(self._reload_sorted(rows), signature, replace=True)

    def _reload_sorted(self, rows: Iterable[list[SnapshotRow]]) -> int:
        """A full snapshot. On PostgreSQL through psycopg 3, :meth:`_load_bare`. Otherwise the table is emptied
        (``TRUNCATE``; SQLite: a truncating ``DELETE``), its key index dropped, the rows appended to a temporary
        table, copied into the snapshot in the order of its primary key (the row hash), and the key index built
        once at the end. Returns the rows loaded.

        Why: the rows come in profile-key order, so each insert landed on a random page of the primary key's B-tree
        (by hash) and, with the key index kept, of that index too. Measured on SQLite, 300,000 rows (CPU): a first
        write 11.6 -> ~5 s, a rewrite over the old rows 15.2 -> ~5 s. On PostgreSQL the random inserts stay cheap while
        the indexes fit in ``shared_buffers`` (1M profiles: 10-20 s beside the run) and not after: at 10M profiles
        (2.3 GB of indexes, 128 MB of buffers) the write took ~20 min of one backend's CPU."""
        state, postgres = self.state, self.state.dialect == "postgres"
        if postgres:
            loaded = self._load_bare(rows)
            if loaded is not None:
                return loaded
            state._run("SET LOCAL lock_timeout = '10s'").close()  # TRUNCATE and DROP wait for locks: not for ever
            state._run(f"TRUNCATE {self.table}").close()
        else:  # no WHERE: SQLite's truncate optimization (https://sqlite.org/lang_delete.html)
            state._run(f"DELETE FROM {self.table}").close()
        state._run(f"DROP INDEX IF EXISTS {self.table}_by_key").close()
        state.conn.commit()  # other writers are not held while the rows are loaded
        # Unqualified, a temporary table is found first on both (SQLite: temp, then main; PostgreSQL: pg_temp)
        state._run(f"CREATE TEMP TABLE IF NOT EXISTS {_LOAD_TABLE} (row_hash TEXT, profile_key TEXT, fragment TEXT, "
                   "segment TEXT, profile_fingerprint TEXT, profile_segments TEXT)").close()
        state._run(f"DELETE FROM {_LOAD_TABLE}").close()
        loaded = 0
        for chunk in rows:
            state._insert(_LOAD_TABLE, (), chunk, ())
            loaded += len(chunk)
        if postgres:
            tune_diff_transaction(state.conn, _LOAD_SETTINGS)
        # A row repeated in the source (same hash) is one snapshot row.
        state._run(f"INSERT INTO {self.table} SELECT * FROM {_LOAD_TABLE} WHERE true ORDER BY row_hash "
                   "ON CONFLICT DO NOTHING").close()
        state._run(f"DROP TABLE {_LOAD_TABLE}").close()
        state._run(self._ddl[1]).close()  # builds the key index dropped above
        state.conn.commit()
        return loaded

    def _load_bare(self, rows: Iterable[list[SnapshotRow]]) -> int | None:
        """PostgreSQL through psycopg 3: in one transaction, the table is emptied (``TRUNCATE``), its primary key
        and key index dropped, the rows copied straight in (``COPY``) and both indexes built again, each by one
        sort. None, and nothing done, without psycopg 3's COPY.

        Why: through a temporary table, PostgreSQL wrote every row twice and sorted the whole rows by hash to
        insert them in the primary key's order, one conflict check each (the ``INSERT … ORDER BY`` alone took 19 s
        of the write at 1.1M rows); building the primary key afterwards sorts only its column. Measured at 1.1M
        rows (session 14): the write 43-76 s -> 17-21 s, and the benchmark's first export from PostgreSQL no longer
        waits for it at its end. One transaction, so that a failure (a PostgreSQL error, the task killed) rolls the
        drops back with the rest: the table never stays without its key. Rows repeated in the source are one staged
        row each (``Staging.snapshot_rows`` keeps one row per hash), so building the key cannot fail on them."""
        conn = self.state.conn
        if not _can_copy(conn):
            return None
        run = self.state._run
        run("SET LOCAL lock_timeout = '10s'").close()  # TRUNCATE waits for other sessions' locks: not for ever
        tune_diff_transaction(conn, _LOAD_SETTINGS)
        run(f"TRUNCATE {self.table}").close()
        run(f"ALTER TABLE {self.table} DROP CONSTRAINT IF EXISTS {self.table}_pkey").close()
        run(f"DROP INDEX IF EXISTS {self.table}_by_key").close()
        loaded = _copy_rows(conn, self.table, rows)
        run(f"ALTER TABLE {self.table} ADD PRIMARY KEY (row_hash)").close()
        run(self._ddl[1]).close()
        conn.commit()
        return loaded

    def update(self, keys: Iterable[list[str]], rows: Iterable[list[SnapshotRow]], signature: str) -> int:
        """A warehouse-diff run's snapshot: the rows of the profiles it planned (``keys``) in place of theirs."""
        self._forget_signature()
        for chunk in keys:
            self.state._run(f"DELETE {self._of_keys}", (_json_text(chunk),)).close()
        return self._write(rows, signature, replace=False)

    def _forget_signature(self) -> None:
        """Before rows change: without its signature, a snapshot left half-written (a killed task, a failed write)
        is never used; the next run reads the whole segment and writes it again."""
        self.state._run(f"DELETE FROM {SNAPSHOTS_TABLE} WHERE export_id = ? AND target_id = ?", self.ids).close()
        self.state.conn.commit()

    def _write(self, rows: Iterable[list[SnapshotRow]], signature: str, *, replace: bool) -> int:
        """Write the rows, a transaction a chunk (on PostgreSQL it runs beside the export's own state writes), then
        the signature; on PostgreSQL, refresh the statistics after a large write."""
        written = 0
        for chunk in rows:
            # A row repeated in the source (same hash) is one snapshot row.
            self.state._insert(self.table, (), chunk, (), upsert="ON CONFLICT DO NOTHING")
            self.state.conn.commit()
            written += len(chunk)
        return self._finish(written, signature, replace=replace)

    def _finish(self, written: int, signature: str, *, replace: bool) -> int:
        """After the rows: the signature (the snapshot is usable from here on) and, on PostgreSQL, statistics."""
        count = self.state._run(f"SELECT COUNT(*) FROM {self.table}")
        total = int(count.fetchone()[0])
        count.close()
        self.state._run(f"INSERT INTO {SNAPSHOTS_TABLE} VALUES (?, ?, ?, ?, ?)", (*self.ids, signature, total, _now())).close()
        if self.state.dialect == "postgres" and (replace or written * 10 > total):
            # Fresh statistics for the next run's plans: a table just filled by this run is planned from its old,
            # near-empty statistics (autovacuum has not looked yet), and affected_keys, planned as a nested loop
            # over "one" row, took 6.7 s on 5,500 rows instead of milliseconds. ANALYZE reads a sample (30,000 rows).
            self.state._run(f"ANALYZE {self.table}").close()
        self.state.conn.commit()
        return written

    def analyze_state(self) -> None:
        """PostgreSQL: fresh statistics of the state table once a full run has written it (see ``_write``)."""
        if self.state.dialect == "postgres":
            self.state._run(f"ANALYZE {STATE_TABLE}").close()
            self.state.conn.commit()


def _can_copy(conn: Any) -> bool:
    """Whether the connection's cursors stream rows into ``COPY … FROM STDIN`` (psycopg 3's ``Cursor.copy``;
    psycopg 2's ``copy_expert`` takes a file, not rows, and its snapshot is loaded as JSON arrays)."""
    cursor = conn.cursor()
    try:
        return callable(getattr(cursor, "copy", None))
    finally:
        cursor.close()


def _copy_rows(conn: Any, table: str, rows: Iterable[list[SnapshotRow]]) -> int:
    """PostgreSQL through psycopg 3 (``_can_copy``): the rows loaded with one ``COPY … FROM STDIN`` (psycopg's
    ``Cursor.copy``, https://www.psycopg.org/psycopg3/docs/basic/copy.html). Returns the rows loaded.

    Why: at 1,100,000 rows the JSON arrays cost PostgreSQL 10.1 s to unpack (``json_array_elements`` and ``->>`` a
    field), about as much as sorting and writing the snapshot itself (8.0 s); COPY's text format is parsed as it
    streams. Measured (session 13): the whole write alone 26.4 -> 20.4 s (the client's CPU 5.9 -> 8.0 s: psycopg
    formats each row); in the benchmark's first export from PostgreSQL at 1M, which waits for this write, 78.6 s
    with JSON against 62.4 and 68.5 s with COPY, run alternately (indicative: the same JSON code also took 73.3 s)."""
    cursor = conn.cursor()
    loaded = 0
    try:
        with cursor.copy(f"COPY {table} FROM STDIN") as copy:
            for chunk in rows:
                for row in chunk:
                    copy.write_row(row)
                loaded += len(chunk)
    finally:
        cursor.close()
    return loaded
