"""The export's memory between runs, and its per-row outcomes, in two tables behind an Airflow SQL connection.

``segment_export_state`` holds, per export and destination target, one row per profile the destination
accepted: the fingerprint of what was sent, the segments it was tagged with and, where the destination names it,
the destination's own id for the profile (Klaviyo's profile id: removals and list moves go by it, not by email,
which another identifier may have merged away). A row is written only after
the destination confirmed it, so a failed or unconfirmed row is sent again by the next run.
``segment_export_outcomes`` holds one row per profile a run acted on (created, updated, removed, skipped,
rejected) with the destination's reason. Both hold the profile key (the lower-cased email), which is already
in the user's segment table, and nothing else personal.

By default the tables live next to the segment (the source's connection); file sources, and exports that say
so, use an embedded SQLite file. Statements are plain SQL that SQLite, PostgreSQL and MySQL all accept.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator

import msgspec

from segment_export.diff import Previous

STATE_TABLE = "segment_export_state"
OUTCOMES_TABLE = "segment_export_outcomes"
INFLIGHT_TABLE = "segment_export_inflight_batches"
ERASURES_TABLE = "segment_export_erasures"
DEFAULT_STATE_DB_ENV = "SEGMENT_EXPORT_STATE_DB"
INFLIGHT_PART_PROFILES = 100  # profiles per in-flight row on databases whose TEXT may be 64 KB
_HANDLE_PART = -1  # the in-flight row that holds a batch's job id (``StateStore.batch_submitted``)

_DDL = (
    f"CREATE TABLE IF NOT EXISTS {STATE_TABLE} ("
    " export_id VARCHAR(200) NOT NULL, target_id VARCHAR(200) NOT NULL, profile_key VARCHAR(320) NOT NULL,"
    " fingerprint VARCHAR(64) NOT NULL, segments TEXT NOT NULL, updated_at VARCHAR(40) NOT NULL,"
    " profile_id VARCHAR(100), PRIMARY KEY (export_id, target_id, profile_key))",
    f"CREATE TABLE IF NOT EXISTS {OUTCOMES_TABLE} ("
    " export_id VARCHAR(200) NOT NULL, run_id VARCHAR(250) NOT NULL, profile_key VARCHAR(320) NOT NULL,"
    " action VARCHAR(16) NOT NULL, reason TEXT, recorded_at VARCHAR(40) NOT NULL)",
    # Batches handed to an asynchronous destination (Klaviyo jobs): written before the job is submitted, the job
    # id in a row of its own (part -1) right after, all deleted once the outcome is saved. What a killed task leaves
    # here is resumed. The batch's profiles are JSON arrays ([key, fingerprint, segments, kind] each) rather than a
    # row per profile: one insert and one indexed delete per 10,000 profiles instead of 10,000 of each. SQLite and
    # PostgreSQL take a whole batch's profiles in one row (part 0); other databases get parts of
    # INFLIGHT_PART_PROFILES, so that a part fits in a 64 KB TEXT (MySQL's).
    f"CREATE TABLE IF NOT EXISTS {INFLIGHT_TABLE} ("
    " export_id VARCHAR(200) NOT NULL, target_id VARCHAR(200) NOT NULL, batch_id VARCHAR(100) NOT NULL,"
    " part INTEGER NOT NULL, job_id VARCHAR(100), profiles TEXT NOT NULL, PRIMARY KEY (batch_id, part))",
)


# The databases that unpack a JSON array of rows in one INSERT … SELECT, by common-sql dialect name
# (``DbApiHook.dialect_name``): the store's name for their statements below.
_JSON_DIALECTS = {"sqlite": "sqlite", "postgresql": "postgres"}
# The state's columns in the order rows are written (profile_id last in the table: tables from before it existed
# get it appended by ensure_tables, so inserts name their columns).
_STATE_COLUMNS = "(export_id, target_id, profile_key, fingerprint, segments, profile_id, updated_at)"
# A list of keys as one bound JSON array (SQLite, PostgreSQL): an index lookup per key, whatever the number of keys.
_JSON_KEYS = {
    "sqlite": "SELECT value FROM json_each(?)",
    "postgres": "SELECT json_array_elements_text(?::json)",
}
_JSON_ROWS = {
    "sqlite": ("json_each(?)", "json_extract(value, '$[{}]')"),
    "postgres": ("json_array_elements(?::json) AS rows(value)", "value->>{}"),
}


def _driver_dialect_name(conn: Any) -> str:
    """common-sql's dialect name for a bare DB-API connection handed to ``StateStore`` without one (the store's own
    tests; ``StateStore.open`` always knows it): DB-API connections do not say which database they reach, so the
    driver does; ``default`` (common-sql's name for an unknown database) for any other driver."""
    import sqlite3

    if isinstance(conn, sqlite3.Connection):
        return "sqlite"
    return "postgresql" if type(conn).__module__.split(".")[0] in ("psycopg", "psycopg2") else "default"


def _json_text(rows: list[tuple[Any, ...]]) -> str:
    return msgspec.json.encode(rows).decode()


def default_state_db() -> Path:
    """The embedded SQLite file used when no state connection applies."""
    env = os.environ.get(DEFAULT_STATE_DB_ENV)
    if env:
        return Path(env)
    home = os.environ.get("AIRFLOW_HOME") or str(Path.home() / "airflow")
    return Path(home) / "segment_export_state.db"


@lru_cache(maxsize=4096)
def segments_json(segments: tuple[str, ...]) -> str:
    """A profile's segments as stored: a JSON array. Cached: a segment holds few distinct combinations."""
    return json.dumps(list(segments))


@lru_cache(maxsize=4096)
def _segments_tuple(stored: str) -> tuple[str, ...]:
    return tuple(json.loads(stored))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def connect(conn_id: str | None) -> tuple[Any, str, str, str]:
    """(DB-API connection, placeholder, description, common-sql dialect name) of the state database: an Airflow SQL
    connection, or the embedded SQLite file when ``conn_id`` is None. The state and the erasure receipts share it."""
    if conn_id is None:
        import sqlite3

        path = default_state_db()
        path.parent.mkdir(parents=True, exist_ok=True)
        # No WAL: $AIRFLOW_HOME may be on a network filesystem, where SQLite's WAL is not safe.
        return sqlite3.connect(path, check_same_thread=False), "?", f"SQLite file {path}", "sqlite"
    from airflow.sdk import BaseHook

    from segment_export.sources.sql import dialect_name

    hook = BaseHook.get_connection(conn_id).get_hook()
    return hook.get_conn(), hook.placeholder or "%s", f"connection {conn_id}", dialect_name(hook)


class StateStore:
    """State and outcomes of one export's target, over a DB-API connection with the given placeholder.

    ``dialect_name`` is common-sql's name for the connection's database (``sqlite``, ``postgresql``, …): ``open``
    knows it (the hook's, or ``sqlite`` for the embedded file). A caller handing in a bare connection without it
    gets it from :func:`_driver_dialect_name`."""

    def __init__(self, conn: Any, placeholder: str, export_id: str, target_id: str, description: str,
                 dialect_name: str | None = None):
        self.conn, self.ph = conn, placeholder
        self.export_id, self.target_id = export_id, target_id
        self.description = description
        self.dialect_name = dialect_name if dialect_name is not None else _driver_dialect_name(conn)

    @classmethod
    def open(cls, conn_id: str | None, export_id: str, target_id: str) -> StateStore:
        """Through an Airflow SQL connection, or the embedded SQLite file when ``conn_id`` is None."""
        conn, placeholder, description, dialect = connect(conn_id)
        store = cls(conn, placeholder, export_id, target_id, description, dialect_name=dialect)
        store.ensure_tables()
        store.reconnect = lambda: cls.open(conn_id, export_id, target_id)
        return store

    #: a new store on its own connection to the same database (for another thread); None for a bare connection
    reconnect: Any = None

    def _run(self, sql: str, params: Iterable[Any] = ()) -> Any:
        cursor = self.conn.cursor()
        cursor.execute(sql.replace("?", self.ph), list(params))
        return cursor

    def ensure_tables(self) -> None:
        for ddl in _DDL:
            if ddl is _DDL[0] and self.dialect == "sqlite":
                # Clustered by its key: one B-tree per write instead of a table and its key's index (a table
                # created before keeps its layout; both work).
                ddl += " WITHOUT ROWID"
            self._run(ddl).close()
        self.conn.commit()
        self._add_profile_id_column()

    def _add_profile_id_column(self) -> None:
        """Migrate a state table created before ``profile_id`` existed: the column is added (NULL for the rows it
        holds; the next accepted send of each profile fills it in). Probed by selecting it, which any SQL database
        answers; the probe's error is rolled back (PostgreSQL aborts the transaction on it)."""
        try:
            self._run(f"SELECT profile_id FROM {STATE_TABLE} WHERE 1 = 0").close()
            return
        except Exception:  # noqa: BLE001 - the driver's "no such column", whatever its class
            self.conn.rollback()
        self._run(f"ALTER TABLE {STATE_TABLE} ADD COLUMN profile_id VARCHAR(100)").close()
        self.conn.commit()

    def profile_ids(self, keys: list[str], *, exclusive: bool = False) -> dict[str, str | None]:
        """The destination's profile id of each key that has one in the state (keys without are absent).

        ``exclusive``: an id another remembered key holds too is given as None (for removals: when the destination
        merged two rows into one profile, by a shared phone number, removing one row's profile would take the
        other row off the list; None says "leave it", where an absent key says "find it by email")."""
        found = dict(self._select_in("profile_key, profile_id", "profile_id IS NOT NULL AND profile_key", keys))
        if exclusive and found:
            # One pass over the export's rows per call (no index on profile_id: writes stay one B-tree each).
            leaving = set(keys)
            shared = {pid for key, pid in self._select_in("profile_key, profile_id", "profile_id", list(set(found.values())))
                      if key not in leaving}
            return {k: (None if pid in shared else pid) for k, pid in found.items()}
        return found  # type: ignore[return-value]

    def _select_in(self, columns: str, condition: str, values: list[str]) -> list[tuple[Any, ...]]:
        """Rows of this export's target where ``condition IN values`` (one JSON array, else IN lists of 500)."""
        head = f"SELECT {columns} FROM {STATE_TABLE} WHERE export_id = ? AND target_id = ? AND {condition}"
        if self.dialect in _JSON_KEYS:
            parts = [(f" IN ({_JSON_KEYS[self.dialect]})", [_json_text(values)])] if values else []  # type: ignore[arg-type]
        else:
            parts = [(f" IN ({', '.join('?' * len(chunk))})", chunk)
                     for chunk in (values[i:i + 500] for i in range(0, len(values), 500))]
        rows: list[tuple[Any, ...]] = []
        for clause, params in parts:
            cursor = self._run(head + clause, (self.export_id, self.target_id, *params))
            rows.extend(tuple(r) for r in cursor.fetchall())
            cursor.close()
        return rows

    def previous(self) -> Iterator[Previous]:
        """Every profile this export's target accepted before (any order; the staging area sorts)."""
        cursor = self._run(
            f"SELECT profile_key, fingerprint, segments FROM {STATE_TABLE} WHERE export_id = ? AND target_id = ?",
            (self.export_id, self.target_id),
        )
        try:
            while rows := cursor.fetchmany(5000):
                for key, fingerprint, segments in rows:
                    yield Previous(key, fingerprint, _segments_tuple(segments))
        finally:
            cursor.close()

    def previous_for(self, keys: list[str]) -> list[Previous]:
        """The remembered profiles among ``keys`` (a warehouse diff's planned profiles, ``changes``)."""
        return [Previous(key, fp, _segments_tuple(segments))
                for key, fp, segments in self._select_in("profile_key, fingerprint, segments", "profile_key", keys)]

    def count(self) -> int:
        """How many profiles this export's target remembers."""
        cursor = self._run(f"SELECT COUNT(*) FROM {STATE_TABLE} WHERE export_id = ? AND target_id = ?",
                           (self.export_id, self.target_id))
        try:
            return int(cursor.fetchone()[0])
        finally:
            cursor.close()

    @cached_property
    def dialect(self) -> str:
        """``sqlite`` or ``postgres`` when the database is one of those (rows then go in as one JSON array per
        statement), else ``generic`` (``executemany``, which any DB-API driver takes)."""
        dialect = _JSON_DIALECTS.get(self.dialect_name, "generic")
        if dialect == "sqlite":
            import sqlite3

            try:  # JSON functions are built into SQLite since 3.38; older builds may lack them
                self.conn.execute("SELECT json_extract('[1]', '$[0]')").fetchone()
            except Exception:  # noqa: BLE001 - then the portable path
                dialect = "generic"
            if sqlite3.sqlite_version_info < (3, 24):  # no upsert before 3.24
                dialect = "generic"
        return dialect

    def _insert(self, table: str, head: tuple[Any, ...], rows: list[tuple[Any, ...]], tail: tuple[Any, ...],
                upsert: str = "", columns: str = "") -> None:
        """Insert ``head + row + tail`` for each row. On SQLite and PostgreSQL the rows travel as one JSON array that
        the database unpacks (``json_each`` / ``json_array_elements``): measured on 10,000-row batches, PostgreSQL
        took 0.55 µs of client CPU a row against psycopg's ``executemany`` 21 µs (and half the wall time), SQLite 4 µs
        against 6. ``upsert``: an ``ON CONFLICT`` clause (SQLite and PostgreSQL spell it alike). ``columns``: the
        table's columns in the order given, e.g. ``"(a, b)"`` (default: the table's own order)."""
        if not rows:
            return
        if self.dialect == "generic":
            values = "(" + ", ".join([self.ph] * (len(head) + len(rows[0]) + len(tail))) + ")"
            cursor = self.conn.cursor()
            cursor.executemany(f"INSERT INTO {table} {columns} VALUES {values}", [head + row + tail for row in rows])
            cursor.close()
            return
        source, element = _JSON_ROWS[self.dialect]
        select = ", ".join(["?"] * len(head) + [element.format(i) for i in range(len(rows[0]))] + ["?"] * len(tail))
        sql = f"INSERT INTO {table} {columns} SELECT {select} FROM {source} WHERE true {upsert}"  # WHERE: SQLite's upsert parse
        self._run(sql, (*head, *tail, _json_text(rows))).close()

    def save(self, accepted: list[tuple[str, str, tuple[str, ...]]], forgotten: Iterable[str] = (),
             new: set[str] | frozenset[str] = frozenset(), *, commit: bool = True,
             profile_ids: dict[str, str] | None = None) -> None:
        """Remember accepted profiles (key, fingerprint, segments) and forget removed ones, in one transaction.

        ``new`` names accepted profiles the state cannot hold yet (first seen this run): no row to replace.
        ``profile_ids``: the destination's id of accepted profiles; a profile without one keeps the id it has.
        ``commit=False`` leaves the transaction open for what belongs with it (a batch's outcomes, its end)."""
        json_rows = self.dialect != "generic"
        ids = dict(profile_ids or {})
        if not json_rows:
            # Rows are deleted and inserted again here: carry over the ids of those saved without one.
            ids = {**self.profile_ids([a[0] for a in accepted if a[0] not in new and a[0] not in ids]), **ids}
        # SQLite and PostgreSQL replace rows with an upsert; elsewhere a profile's old row is deleted first.
        keys = list(forgotten) if json_rows else [a[0] for a in accepted if a[0] not in new] + list(forgotten)
        if keys:
            # One equality per key (executemany, pipelined by psycopg): always an index lookup. A long
            # "IN (…)" list of bound parameters was planned as a sequential scan by PostgreSQL (9 s a statement
            # on a 2,200,000-row state table in the benchmark).
            cursor = self.conn.cursor()
            cursor.executemany(
                f"DELETE FROM {STATE_TABLE} WHERE export_id = ? AND target_id = ? AND profile_key = ?".replace("?", self.ph),
                [(self.export_id, self.target_id, key) for key in keys],
            )
            cursor.close()
        self._insert(
            STATE_TABLE, (self.export_id, self.target_id),
            [(k, fp, segments_json(segs), ids.get(k)) for k, fp, segs in accepted], (_now(),),
            upsert="ON CONFLICT (export_id, target_id, profile_key) DO UPDATE SET fingerprint = excluded.fingerprint, "
                   "segments = excluded.segments, updated_at = excluded.updated_at, "
                   f"profile_id = COALESCE(excluded.profile_id, {STATE_TABLE}.profile_id)",
            columns=_STATE_COLUMNS,
        )
        if commit:
            self.conn.commit()

    def clear(self) -> int:
        """Forget everything this export's target accepted (its outcomes stay): the next run sends every profile
        as new. Returns the number of profiles forgotten."""
        cursor = self._run(f"DELETE FROM {STATE_TABLE} WHERE export_id = ? AND target_id = ?", (self.export_id, self.target_id))
        forgotten = cursor.rowcount
        cursor.close()
        self._run(f"DELETE FROM {INFLIGHT_TABLE} WHERE export_id = ? AND target_id = ?", (self.export_id, self.target_id)).close()
        self.conn.commit()
        return forgotten

    def record_outcomes(self, run_id: str, outcomes: list[tuple[str, str, str | None]], *, commit: bool = True) -> None:
        """One row per profile acted on: (key, action, reason)."""
        self._insert(OUTCOMES_TABLE, (self.export_id, run_id), outcomes, (_now(),))
        if commit:
            self.conn.commit()

    def begin_batch(self, batch_id: str, rows: list[tuple[str, str, tuple[str, ...], str]]) -> None:
        """Record a batch's profiles (key, fingerprint, segments, kind) before it is handed over."""
        size = (len(rows) or 1) if self.dialect != "generic" else INFLIGHT_PART_PROFILES
        parts = [(self.export_id, self.target_id, batch_id, n, _json_text(rows[start:start + size]))
                 for n, start in enumerate(range(0, max(len(rows), 1), size))]
        cursor = self.conn.cursor()
        cursor.executemany(f"INSERT INTO {INFLIGHT_TABLE} VALUES (?, ?, ?, ?, NULL, ?)".replace("?", self.ph), parts)
        cursor.close()
        self.conn.commit()

    def batch_submitted(self, batch_id: str, job_id: str) -> None:
        """The batch's job id, as a row of its own (part -1, no profiles) beside the batch's profiles. Why not an
        ``UPDATE`` of the batch's row: SQLite rewrites a whole record to change one column, here 10,000 profiles'
        JSON (~0.7 MB) per job; measured with py-spy, that update was 4.6 % of the task's main thread at 1,000,000
        profiles to Klaviyo. :meth:`inflight` reads the job id from whichever row of the batch has it, so rows
        written either way are resumed."""
        self._run(f"INSERT INTO {INFLIGHT_TABLE} VALUES (?, ?, ?, ?, ?, ?)",
                  (self.export_id, self.target_id, batch_id, _HANDLE_PART, job_id, "[]")).close()
        self.conn.commit()

    def end_batch(self, batch_id: str) -> None:
        self._run(f"DELETE FROM {INFLIGHT_TABLE} WHERE batch_id = ?", (batch_id,)).close()
        self.conn.commit()

    def inflight(self) -> dict[str, tuple[str | None, list[tuple[str, str, tuple[str, ...], str]]]]:
        """Batches a previous, interrupted run left behind: batch id → (job id or None, profiles)."""
        cursor = self._run(
            f"SELECT batch_id, job_id, profiles FROM {INFLIGHT_TABLE} WHERE export_id = ? AND target_id = ? "
            "ORDER BY batch_id, part",
            (self.export_id, self.target_id),
        )
        found: dict[str, tuple[str | None, list[tuple[str, str, tuple[str, ...], str]]]] = {}
        for batch_id, job_id, profiles in cursor.fetchall():
            entry = found.setdefault(batch_id, (job_id, []))
            if entry[0] is None and job_id is not None:  # the handle's own row (``batch_submitted``), or part 0's
                entry = found[batch_id] = (job_id, entry[1])
            entry[1].extend((key, fp, tuple(segments), kind) for key, fp, segments, kind in json.loads(profiles))
        cursor.close()
        return found

    def rollback(self) -> None:
        """Undo what the open transaction wrote (a batch's state and outcomes whose writing failed part-way)."""
        try:
            self.conn.rollback()
        except Exception:  # noqa: BLE001 - the original error is the one to report
            pass

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001 - closing is best effort
            pass


# -- erasure receipts ----------------------------------------------------------------------------------------

#: One row per erasure request and destination target (a Klaviyo account, reached through its connection; a
#: Mailchimp audience): the request, when it was first sent, the destination's answer once it answered. A row
#: with ``answered_at`` NULL was sent and failed: the next erasure run sends it again; an answered one never.
#: ``profile_key`` (the lower-cased address) is what every export on ``conn_id`` skips from then on.
_ERASURES_DDL = (
    f"CREATE TABLE IF NOT EXISTS {ERASURES_TABLE} ("
    " request_id VARCHAR(200) NOT NULL, destination VARCHAR(50) NOT NULL, conn_id VARCHAR(250) NOT NULL,"
    " target_id VARCHAR(200) NOT NULL, profile_key VARCHAR(320) NOT NULL, requested_at VARCHAR(40),"
    " sent_at VARCHAR(40) NOT NULL, answered_at VARCHAR(40), answer TEXT,"
    " PRIMARY KEY (request_id, conn_id, target_id))"
)


class ErasureStore:
    """The erasure receipts (``segment_export_erasures``) in one state database, next to the sync state.

    The exports whose state lives in this database read :meth:`erased` to skip erased addresses; the erasure
    operator writes a receipt per request and target with :meth:`record`. Plain SQL any DB-API driver takes."""

    def __init__(self, conn: Any, placeholder: str, description: str = "", *, owned: bool = True):
        self.conn, self.ph, self.description, self._owned = conn, placeholder, description, owned

    @classmethod
    def open(cls, conn_id: str | None) -> ErasureStore:
        conn, placeholder, description, _ = connect(conn_id)
        store = cls(conn, placeholder, description)
        store.ensure_table()
        return store

    @classmethod
    def beside(cls, state: StateStore) -> ErasureStore:
        """The receipts in a state store's database, over its connection (closed with the state store)."""
        store = cls(state.conn, state.ph, state.description, owned=False)
        store.ensure_table()
        return store

    def _run(self, sql: str, params: Iterable[Any] = ()) -> Any:
        cursor = self.conn.cursor()
        cursor.execute(sql.replace("?", self.ph), list(params))
        return cursor

    def ensure_table(self) -> None:
        self._run(_ERASURES_DDL).close()
        self.conn.commit()

    def receipt(self, request_id: str, conn_id: str, target_id: str) -> tuple[str | None, str | None] | None:
        """(answered_at, answer) of a request's receipt for a target, or None when it was never sent there."""
        cursor = self._run(
            f"SELECT answered_at, answer FROM {ERASURES_TABLE} WHERE request_id = ? AND conn_id = ? AND target_id = ?",
            (request_id, conn_id, target_id),
        )
        row = cursor.fetchone()
        cursor.close()
        return None if row is None else (row[0], row[1])

    def receipts_for(self, conn_id: str, target_id: str) -> dict[str, tuple[str | None, str | None]]:
        """request id -> (answered_at, answer) of every receipt of one target (one query for a whole run)."""
        cursor = self._run(f"SELECT request_id, answered_at, answer FROM {ERASURES_TABLE} WHERE conn_id = ? AND target_id = ?",
                           (conn_id, target_id))
        found = {row[0]: (row[1], row[2]) for row in cursor.fetchall()}
        cursor.close()
        return found

    def record(self, request_id: str, destination: str, conn_id: str, target_id: str, profile_key: str,
               requested_at: str | None, answer: str, answered: bool, when: str | None = None) -> None:
        """Write (or, for a retry, replace) a request's receipt for a target; ``answered`` False: try again later.
        A replaced receipt keeps its first ``sent_at``."""
        now = when or _now()
        previous = self.receipt(request_id, conn_id, target_id)
        if previous is not None:
            self._run(
                f"UPDATE {ERASURES_TABLE} SET answered_at = ?, answer = ? WHERE request_id = ? AND conn_id = ? "
                "AND target_id = ?", (now if answered else None, answer, request_id, conn_id, target_id),
            ).close()
        else:
            self._run(
                f"INSERT INTO {ERASURES_TABLE} (request_id, destination, conn_id, target_id, profile_key, requested_at,"
                " sent_at, answered_at, answer) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (request_id, destination, conn_id, target_id, profile_key, requested_at, now,
                 now if answered else None, answer),
            ).close()
        self.conn.commit()

    def erased(self, conn_id: str) -> dict[str, str]:
        """Every address erased through a destination connection: profile key -> the date (YYYY-MM-DD) its
        erasure was first sent. A request sent but not answered yet counts: the person asked, and an export must
        not re-create them meanwhile."""
        cursor = self._run(f"SELECT profile_key, sent_at FROM {ERASURES_TABLE} WHERE conn_id = ?", (conn_id,))
        found: dict[str, str] = {}
        for key, sent_at in cursor.fetchall():
            day = str(sent_at)[:10]
            if key not in found or day < found[key]:
                found[key] = day
        cursor.close()
        return found

    def receipts(self) -> list[dict[str, Any]]:
        """Every receipt (for the demo, tests and audits), oldest first."""
        cursor = self._run(
            f"SELECT request_id, destination, conn_id, target_id, requested_at, sent_at, answered_at, answer "
            f"FROM {ERASURES_TABLE} ORDER BY sent_at, request_id, conn_id, target_id"
        )
        names = ("request_id", "destination", "conn_id", "target_id", "requested_at", "sent_at", "answered_at", "answer")
        rows = [dict(zip(names, row)) for row in cursor.fetchall()]
        cursor.close()
        return rows

    def forget_in_state(self, export_ids: list[str], profile_key: str) -> int:
        """Drop an erased address from these exports' sync state: the destination no longer holds it, so the state
        must not say it does (the next run sees it as new, and skips it as erased)."""
        forgotten = 0
        try:
            for export_id in export_ids:
                cursor = self._run(f"DELETE FROM {STATE_TABLE} WHERE export_id = ? AND profile_key = ?",
                                   (export_id, profile_key))
                forgotten += max(cursor.rowcount or 0, 0)
                cursor.close()
        except Exception:  # noqa: BLE001 - no state table yet (no export has run here): nothing to forget
            self.conn.rollback()
            return 0
        self.conn.commit()
        return forgotten

    def close(self) -> None:
        if self._owned:
            try:
                self.conn.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
