"""SQL sources: a table or a query behind any Airflow SQL connection (common-sql ``DbApiHook``).

Identifiers from the spec are quoted with the connection's own escape format (``"…"`` by default,
``escape_word_format`` in the connection extra otherwise; on SQLite without one, ```…```, because SQLite reads
an unknown ``"…"`` as a string literal), and every one is checked against the source's real columns before
it is used: a misspelt column is an error, never a constant. Segment names are bound parameters. Nothing
from the spec is pasted into SQL unquoted, except a ``query``, which is the user's own SQL by design.
Rows are fetched with ``fetchmany`` on a server-side cursor on PostgreSQL, so a large segment is never held in
memory. Which database a connection is comes from common-sql (``DbApiHook.dialect_name``), not from its driver.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import msgspec

from segment_export.sources.base import Row, Source, SourceError, check_columns
from segment_export.spec import SourceSpec


def dialect_name(hook: Any) -> str:
    """common-sql's name for the hook's database (``DbApiHook.dialect_name``: ``postgresql``, ``sqlite``, ``mysql``,
    …), which chooses the SQL that differs between databases; ``default``, common-sql's own name for a database it
    does not know, when the hook cannot say."""
    try:
        return str(hook.dialect_name)
    except Exception:  # noqa: BLE001 - a hook without common-sql's helpers, or whose URI cannot be built
        return "default"


def quote_identifier(name: str, escape_format: str = '"{}"') -> str:
    """Quote a possibly dotted identifier (``schema.table``), each part on its own, quotes doubled inside."""
    parts = name.split(".")
    if not name or any(not p.strip() or "\x00" in p for p in parts):
        raise SourceError(f"{name!r} is not a valid identifier")
    close = escape_format[-1]
    return ".".join(escape_format.format(p.replace(close, close * 2)) for p in parts)


@dataclass(frozen=True)
class SqlDialect:
    """What the SQL builder needs of a connection: how identifiers are quoted, how parameters look, and which
    database it is (common-sql's dialect name).

    Quoting stays :func:`quote_identifier`'s rather than common-sql's ``Dialect.escape_word``: that one quotes only
    reserved words and names with special characters, does not double a quote inside a name, and quotes
    ``schema.table`` as one name. The format it quotes with is the same one (the hook's ``escape_word_format``)."""

    escape_format: str = '"{}"'
    placeholder: str = "%s"
    name: str = "default"

    def q(self, name: str) -> str:
        return quote_identifier(name, self.escape_format)

    @property
    def server_side_cursor(self) -> bool:
        """Whether rows are streamed through a named cursor: PostgreSQL's (psycopg 2 and 3 both have them)."""
        return self.name == "postgresql"

    @classmethod
    def of(cls, hook: Any) -> SqlDialect:
        """The connection's quoting (common-sql's ``escape_word_format``) and placeholder. SQLite reads an unknown
        double-quoted identifier as a string literal, so there, unless the connection says otherwise, names are
        quoted with backticks, which SQLite only ever reads as identifiers (an unknown one is an error)."""
        name = dialect_name(hook)
        escape = getattr(hook, "escape_word_format", None) or '"{}"'
        placeholder = getattr(hook, "placeholder", None) or "%s"
        try:
            explicit = (hook.connection_extra or {}).get("escape_word_format")
        except Exception:  # noqa: BLE001 - a hook without common-sql's connection helpers: its own format then
            explicit = escape
        if name == "sqlite" and not explicit:
            escape = "`{}`"
        return cls(escape_format=escape, placeholder=placeholder, name=name)


def build_from(spec: SourceSpec, dialect: SqlDialect) -> tuple[str, list[Any]]:
    """``FROM … [WHERE segment IN (…)]`` for a table or query source, and its parameters."""
    if spec.table:
        relation = dialect.q(spec.table)
    else:
        query = (spec.query or "").strip().rstrip(";")
        relation = f"({query}) segment_source"
    sql, params = f"FROM {relation}", []
    if spec.segment_column and spec.segments:
        marks = ", ".join([dialect.placeholder] * len(spec.segments))
        sql += f" WHERE {dialect.q(spec.segment_column)} IN ({marks})"
        params = list(spec.segments)
    return sql, params


#: common-sql dialects whose rows can be hashed in SQL (``hashed_rows``), which the warehouse diff needs
ROW_HASH_DIALECTS = frozenset({"sqlite", "postgresql"})
#: the SQL function registered on a SQLite source connection to hash a row (``sqlite_row_hash``)
SQLITE_ROW_HASH = "segment_export_row_hash"


def sqlite_row_hash(*values: Any) -> str:
    """A row's hash on SQLite, which has no hash function of its own (registered on the source's connection, so
    it runs inside SQLite's query): 128 bits of BLAKE2b over the values' MessagePack encoding, which tells every
    SQLite value apart (NULL, integer, real to the bit, text, blob: ``1``, ``1.0`` and ``'1'`` differ)."""
    return hashlib.blake2b(msgspec.msgpack.encode(values), digest_size=16).hexdigest()


#: How rows are hashed (``hashed_rows``). Part of the snapshot's signature (``changes.signature``): rows hashed
#: another way are never compared with these (the run reads the whole segment and writes the snapshot again).
ROW_HASH_METHOD = "postgresql: hashtextextended seeds 0 and 1 of ROW()::text; sqlite: blake2b-128 of msgpack"


def hashed_rows(spec: SourceSpec, dialect: SqlDialect, columns: Sequence[str],
                extra: Sequence[str] = ()) -> tuple[str, list[Any]]:
    """``(SELECT …) src``: the segment's rows, their ``columns`` then ``extra`` as ``c0, c1, …``, and the hash of
    ``columns`` as ``row_hash`` (what the warehouse diff compares between runs); and the FROM's parameters.

    PostgreSQL: 128 bits, two 64-bit ``hashtextextended`` (seeds 0 and 1) of the row's text form
    (``ROW(a, b)::text``, computed once a row), in hex. The text form quotes every value that needs it, so a NULL
    (nothing) and an empty string (``""``) differ, as do ``("a,b")`` and ``(a,b)``; floats print exactly (the source
    session sets ``extra_float_digits = 3``). Values that print alike are equal for the mapping too, and a value
    printed differently between runs (another session time zone) only makes its row read again: the hash can report
    a change that did not happen, never miss one, short of a 128-bit collision. Why not ``md5``, the documented
    hash: measured at 1.1M rows, ``md5`` costs 1.0 s of PostgreSQL's CPU on top of the 0.9 s the text form takes,
    the two ``hashtextextended`` 0.1 s, and the warehouse diff's pass 2.0-2.3 -> 1.45-1.57 s. ``hashtextextended``
    is the text type's extended hash function in PostgreSQL's catalog (``pg_amproc``; hash partitioning routes rows
    with it) since PostgreSQL 11; were its values to change in a later release, every row would read as changed
    once: slower, not wrong. ``hash_record_extended`` of the row itself would be cheaper still but is 64 bits, fails on
    types without a hash function and hashes ``1.0`` and ``1.00`` alike, which the mapping tells apart.

    The subqueries are fenced with ``OFFSET 0`` so that neither is inlined: the row's text is made once a row, by
    the parallel workers where they scan, and the two hashes once a row above them, rather than wherever the outer
    query uses them (a join's condition, its filter, its output). Measured at 1.1M rows, the hashes computed beside
    the text in the workers (the text made twice): the diff's pass 2.8-2.9 s against 2.2-2.4 s this way. SQLite:
    :func:`sqlite_row_hash`."""
    from_sql, params = build_from(spec, dialect)
    names = [*columns, *(c for c in extra if c not in columns)]
    quoted = ", ".join(dialect.q(c) for c in columns)
    aliased = ", ".join(f"{dialect.q(c)} AS c{i}" for i, c in enumerate(names))
    if dialect.name == "postgresql":
        outer = ", ".join(f"c{i}" for i in range(len(names)))
        halves = " || '.' || ".join(f"to_hex(hashtextextended(row_text, {seed}))" for seed in (0, 1))
        return (f"(SELECT {outer}, {halves} AS row_hash FROM (SELECT {aliased}, ROW({quoted})::text AS row_text "
                f"{from_sql} OFFSET 0) segment_rows OFFSET 0) src"), params
    if dialect.name == "sqlite":
        return f"(SELECT {aliased}, {SQLITE_ROW_HASH}({quoted}) AS row_hash {from_sql}) src", params
    raise SourceError(f"rows cannot be hashed in SQL on {dialect.name!r} (only on {', '.join(sorted(ROW_HASH_DIALECTS))})")


def build_select(
    spec: SourceSpec,
    dialect: SqlDialect,
    columns: Sequence[str],
    *,
    order_by: str | None = None,
    tie_breaker: str | None = None,
    limit: int | None = None,
    row_hash: bool = False,
) -> tuple[str, list[Any]]:
    """The SELECT that reads the segment's rows (pure, so it can be tested without a database); ``row_hash``
    appends each row's hash (``hashed_rows``) as a last column."""
    keys = [order_by] + ([tie_breaker] if tie_breaker and tie_breaker != order_by else []) if order_by else []
    if row_hash:
        from_sql, params = hashed_rows(spec, dialect, columns, keys)
        names = [*columns, *(k for k in keys if k not in columns)]
        sql = f"SELECT {', '.join(f'src.c{i}' for i in range(len(columns)))}, src.row_hash FROM {from_sql}"
        order = [f"src.c{names.index(k)}" for k in keys]
    else:
        from_sql, params = build_from(spec, dialect)
        sql = f"SELECT {', '.join(dialect.q(c) for c in columns)} {from_sql}"
        order = [dialect.q(k) for k in keys]
    if order:
        sql += " ORDER BY " + ", ".join(order)
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    return sql, params


def build_changed_rows(spec: SourceSpec, dialect: SqlDialect, columns: Sequence[str], snapshot_table: str) -> tuple[str, list[Any]]:
    """The warehouse diff's one pass over the segment: the rows whose hash the export target's snapshot table does
    not hold (new or changed), each as its ``columns``, its hash and NULL; and the snapshot's rows the segment no
    longer holds (changed or gone), each as NULLs, its hash and its profile key. A full outer join on the hash
    (PostgreSQL hashes or merges it; SQLite, 3.39 and later, looks each row's hash up in the snapshot's primary
    key)."""
    src, params = hashed_rows(spec, dialect, columns)
    head = f"SELECT {', '.join(f'src.c{i}' for i in range(len(columns)))}, COALESCE(src.row_hash, snap.row_hash), snap.profile_key FROM {src} "
    sql = head + (f"FULL OUTER JOIN {snapshot_table} snap ON snap.row_hash = src.row_hash "
                  "WHERE src.row_hash IS NULL OR snap.row_hash IS NULL")
    return sql, params


#: PostgreSQL: the temporary table the warehouse diff's rows are written to (``SqlSource.changed_rows``)
CHANGED_TABLE = "segment_export_changed_rows"

#: PostgreSQL settings for the warehouse diff's statements, for their transaction only (``SET LOCAL``):
#: - ``work_mem``: at the default 4 MB a hash join over a million hashes is split into 32 batches spilled to
#:   temporary files; 128 MB (a hash table gets twice that, ``hash_mem_multiplier``) keeps a million rows' join in
#:   memory (2.0 → 1.2 s measured for the snapshot-to-state join at 1M). Larger segments spill again: slower, not wrong.
#: - ``parallel_tuple_cost`` (segment side only): the planner prices each row a parallel worker hands over at 0.1 and
#:   so scans a million rows in one backend, though hashing them (~3 µs a row) is the scan's real cost; at 0.01 the
#:   scan gets its parallel workers (~6.3 → ~4.5 s measured at 1.1M rows on two cores). Without workers
#:   (``max_parallel_workers_per_gather = 0``) nothing changes.
DIFF_SETTINGS = {"work_mem": "128MB"}
SEGMENT_DIFF_SETTINGS = {**DIFF_SETTINGS, "parallel_tuple_cost": "0.01"}


def tune_diff_transaction(conn: Any, settings: dict[str, str] = DIFF_SETTINGS) -> None:
    """``SET LOCAL`` the diff's settings (see ``DIFF_SETTINGS``) for the open transaction: the connection's other
    statements and later transactions keep the server's. On an autocommit connection PostgreSQL ignores them."""
    cursor = conn.cursor()
    try:
        for name, value in settings.items():
            cursor.execute(f"SET LOCAL {name} = '{value}'")
    finally:
        cursor.close()


class SqlSource(Source):
    def __init__(self, spec: SourceSpec, hook: Any):
        self.spec, self.hook = spec, hook
        self.chunk_size = spec.chunk_size
        self.dialect = SqlDialect.of(hook)
        what = f"table {spec.table}" if spec.table else "query"
        self.description = f"{what} on connection {spec.conn_id}"
        self._conn: Any = None
        self._columns: list[str] | None = None

    @classmethod
    def from_spec(cls, spec: SourceSpec) -> SqlSource:
        from airflow.sdk import BaseHook
        from airflow.sdk.exceptions import AirflowNotFoundException

        try:
            hook = BaseHook.get_connection(spec.conn_id).get_hook()
        except AirflowNotFoundException as exc:
            raise SourceError(f"source.conn_id {spec.conn_id!r}: no such Airflow connection") from exc
        if not hasattr(hook, "get_conn") or not hasattr(hook, "placeholder"):
            raise SourceError(f"connection {spec.conn_id!r} is not a SQL connection (its hook is {type(hook).__name__})")
        return cls(spec, hook)

    @property
    def conn(self) -> Any:
        if self._conn is None:
            conn = self.hook.get_conn()
            if self.hashes_rows:
                self._prepare_row_hash(conn)
            self._conn = conn
        return self._conn

    @property
    def hashes_rows(self) -> bool:
        """Whether this source can hash its rows in SQL (``hashed_rows``): the warehouse diff's condition."""
        return self.dialect.name in ROW_HASH_DIALECTS

    def _prepare_row_hash(self, conn: Any) -> None:
        """SQLite: register the row hash function; PostgreSQL: print floats exactly (their text is what is hashed)."""
        if self.dialect.name == "sqlite":
            conn.create_function(SQLITE_ROW_HASH, -1, sqlite_row_hash, deterministic=True)
        elif self.dialect.name == "postgresql":
            cursor = conn.cursor()
            cursor.execute("SET extra_float_digits = 3")
            cursor.close()

    def _execute(self, sql: str, params: list[Any], *, stream: bool = False) -> Any:
        conn = self.conn
        if stream and self.dialect.server_side_cursor:
            cursor = conn.cursor(name=f"segment_export_{uuid.uuid4().hex[:12]}")  # server-side cursor
            cursor.itersize = self.chunk_size
        else:
            cursor = conn.cursor()
        try:
            cursor.execute(sql, params)
        except Exception as exc:
            raise SourceError(f"reading the {self.description} failed: {type(exc).__name__}: {exc}") from exc
        return cursor

    def columns(self) -> list[str]:
        """The relation's columns, from a query that returns no row (without the segment filter, whose column
        is checked against them)."""
        if self._columns is None:
            relation = build_from(self.spec.model_copy(update={"segment_column": None, "segments": None}), self.dialect)[0]
            cursor = self._execute(f"SELECT * {relation} WHERE 1 = 0", [])
            try:
                self._columns = [str(d[0]) for d in cursor.description]
            finally:
                cursor.close()
        return self._columns

    def _check(self, columns: Sequence[str] = (), order_by: str | None = None, tie_breaker: str | None = None) -> None:
        """Every identifier a statement will quote must be a real column (see the module's docstring)."""
        named = [("requested column", c) for c in columns] + [("order_by", c) for c in (order_by, tie_breaker) if c]
        if self.spec.segment_column:
            named.insert(0, ("source.segment_column", self.spec.segment_column))
        check_columns(f"the {self.description}", named, self.columns())

    def count(self) -> int:
        self._check()
        from_sql, params = build_from(self.spec, self.dialect)
        cursor = self._execute(f"SELECT COUNT(*) {from_sql}", params)
        try:
            return int(cursor.fetchone()[0])
        finally:
            cursor.close()

    def chunks(self, columns, *, order_by=None, tie_breaker=None, limit=None, row_hash=False) -> Iterator[list[Row]]:
        """The rows (see ``Source.chunks``); ``row_hash``: each with its hash (``hashed_rows``) appended."""
        self._check(columns, order_by, tie_breaker)
        sql, params = build_select(self.spec, self.dialect, columns, order_by=order_by, tie_breaker=tie_breaker,
                                   limit=limit, row_hash=row_hash)
        return self._stream(sql, params)

    def changed_rows(self, columns: Sequence[str], snapshot_table: str) -> Iterator[list[Row]]:
        """The warehouse diff's rows (``build_changed_rows``): ``(*values, hash, None)`` for a row new or changed
        since the snapshot, ``(None, ..., hash, profile key)`` for a snapshot row the segment no longer holds."""
        self._check(columns)
        sql, params = build_changed_rows(self.spec, self.dialect, columns, snapshot_table)
        if self.dialect.name != "postgresql":
            return self._stream(sql, params)
        tune_diff_transaction(self.conn, SEGMENT_DIFF_SETTINGS)  # the read's transaction ends when the source is closed
        # Into a temporary table, then streamed from it: PostgreSQL never plans a cursor's query in parallel
        # ("a cursor created using DECLARE CURSOR will never use a parallel plan",
        # https://www.postgresql.org/docs/current/when-can-parallel-query-be-used.html), and the rows are streamed
        # through one so that a large change does not sit in the task's memory; CREATE TABLE AS may be planned in
        # parallel. Measured at 1.1M rows, 40,000 out: the pass 2.7-2.8 s through a cursor, 2.2-2.4 s into the table.
        # A role without the TEMPORARY privilege (granted to everyone by default) streams the pass itself instead.
        self._execute("SAVEPOINT segment_export_changed_rows", []).close()
        try:
            for statement, args in ((f"DROP TABLE IF EXISTS pg_temp.{CHANGED_TABLE}", []),
                                    (f"CREATE TEMPORARY TABLE {CHANGED_TABLE} ON COMMIT DROP AS {sql}", params)):
                self._execute(statement, args).close()
        except SourceError:
            self._execute("ROLLBACK TO SAVEPOINT segment_export_changed_rows", []).close()
            return self._stream(sql, params)
        return self._stream(f"SELECT * FROM pg_temp.{CHANGED_TABLE}", [])

    def _stream(self, sql: str, params: list[Any]) -> Iterator[list[Row]]:
        cursor = self._execute(sql, params, stream=True)
        try:
            while rows := cursor.fetchmany(self.chunk_size):
                # sqlite3 and psycopg already give a list of tuples: no copy then
                yield rows if type(rows) is list and type(rows[0]) is tuple else [tuple(r) for r in rows]
        finally:
            cursor.close()

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.rollback()  # a read-only transaction (named cursors open one); nothing to keep
            except Exception:  # noqa: BLE001 - some drivers have no transactions
                pass
            self._conn.close()
            self._conn = None
