"""SQL sources: a table or a query behind any Airflow SQL connection (common-sql ``DbApiHook``).

Identifiers from the spec are quoted with the connection's own escape format (``"…"`` by default,
``escape_word_format`` in the connection extra otherwise); segment names are bound parameters. Nothing
from the spec is pasted into SQL unquoted, except a ``query``, which is the user's own SQL by design.
Rows are fetched with ``fetchmany`` on a server-side cursor where the driver has one (PostgreSQL), so a
large segment is never held in memory.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from segment_export.sources.base import Row, Source, SourceError
from segment_export.spec import SourceSpec


def quote_identifier(name: str, escape_format: str = '"{}"') -> str:
    """Quote a possibly dotted identifier (``schema.table``), each part on its own, quotes doubled inside."""
    parts = name.split(".")
    if not name or any(not p.strip() or "\x00" in p for p in parts):
        raise SourceError(f"{name!r} is not a valid identifier")
    close = escape_format[-1]
    return ".".join(escape_format.format(p.replace(close, close * 2)) for p in parts)


@dataclass(frozen=True)
class SqlDialect:
    """What the SQL builder needs of a connection: how identifiers are quoted and how parameters look."""

    escape_format: str = '"{}"'
    placeholder: str = "%s"

    def q(self, name: str) -> str:
        return quote_identifier(name, self.escape_format)


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


def build_select(
    spec: SourceSpec,
    dialect: SqlDialect,
    columns: Sequence[str],
    *,
    order_by: str | None = None,
    tie_breaker: str | None = None,
    limit: int | None = None,
) -> tuple[str, list[Any]]:
    """The SELECT that reads the segment's rows (pure, so it can be tested without a database)."""
    from_sql, params = build_from(spec, dialect)
    sql = f"SELECT {', '.join(dialect.q(c) for c in columns)} {from_sql}"
    if order_by:
        keys = [order_by] + ([tie_breaker] if tie_breaker and tie_breaker != order_by else [])
        sql += " ORDER BY " + ", ".join(dialect.q(k) for k in keys)
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    return sql, params


class SqlSource(Source):
    def __init__(self, spec: SourceSpec, hook: Any):
        self.spec, self.hook = spec, hook
        self.chunk_size = spec.chunk_size
        self.dialect = SqlDialect(
            escape_format=getattr(hook, "escape_word_format", '"{}"') or '"{}"',
            placeholder=getattr(hook, "placeholder", "%s") or "%s",
        )
        what = f"table {spec.table}" if spec.table else "query"
        self.description = f"{what} on connection {spec.conn_id}"
        self._conn: Any = None

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
            self._conn = self.hook.get_conn()
        return self._conn

    def _execute(self, sql: str, params: list[Any], *, stream: bool = False) -> Any:
        conn = self.conn
        if stream and type(conn).__module__.split(".")[0] in ("psycopg2", "psycopg"):
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
        from_sql, params = build_from(self.spec, self.dialect)
        cursor = self._execute(f"SELECT * {from_sql} AND 1 = 0" if params else f"SELECT * {from_sql} WHERE 1 = 0", params)
        try:
            return [d[0] for d in cursor.description]
        finally:
            cursor.close()

    def count(self) -> int:
        from_sql, params = build_from(self.spec, self.dialect)
        cursor = self._execute(f"SELECT COUNT(*) {from_sql}", params)
        try:
            return int(cursor.fetchone()[0])
        finally:
            cursor.close()

    def chunks(self, columns, *, order_by=None, tie_breaker=None, limit=None) -> Iterator[list[Row]]:
        sql, params = build_select(self.spec, self.dialect, columns, order_by=order_by, tie_breaker=tie_breaker, limit=limit)
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
