"""SQL sources against real databases: SQLite (embedded default) and the machine's PostgreSQL."""

from __future__ import annotations

import pytest
import segment_data

from segment_export.sources import SourceError, source_for
from segment_export.sources.sql import SqlDialect, build_select, quote_identifier
from segment_export.spec import SourceSpec


def test_identifiers_are_quoted_part_by_part():
    assert quote_identifier("analytics.segment_members") == '"analytics"."segment_members"'
    assert quote_identifier('we"ird') == '"we""ird"'
    assert quote_identifier("t", "`{}`") == "`t`"
    with pytest.raises(SourceError):
        quote_identifier("a..b")


def test_select_binds_segments_and_quotes_everything():
    spec = SourceSpec(conn_id="w", table="s.t", segment_column="seg", segments=["vip", "x'); DROP TABLE t; --"])
    sql, params = build_select(spec, SqlDialect(placeholder="?"), ["email", "id"], order_by="id", tie_breaker="email", limit=5)
    assert sql == 'SELECT "email", "id" FROM "s"."t" WHERE "seg" IN (?, ?) ORDER BY "id", "email" LIMIT 5'
    assert params == ["vip", "x'); DROP TABLE t; --"]


def test_table_source_reads_segments_in_chunks(segment_db):
    source = source_for(SourceSpec(conn_id="warehouse", table="segment_members", segment_column="segment",
                                   segments=["vip", "newsletter"], chunk_size=64))
    expected = [r for r in segment_data.rows(1000) if r[-1] in ("vip", "newsletter")]
    assert source.count() == len(expected)
    assert "email" in source.columns() and "segment" in source.columns()
    chunks = list(source.chunks(["email", "customer_id"]))
    assert max(len(c) for c in chunks) == 64 and len(chunks) > 5
    assert sorted(r for c in chunks for r in c) == sorted((r[1], r[0]) for r in expected)
    source.close()


def test_query_source_and_truncation_are_deterministic(segment_db):
    spec = SourceSpec(conn_id="warehouse", query="SELECT * FROM segment_members WHERE tier <> 'bronze';",
                      segment_column="segment", segments=["vip"], chunk_size=10)
    source = source_for(spec)
    first = [r for c in source.chunks(["customer_id", "email"], order_by="customer_id", tie_breaker="email", limit=25) for r in c]
    again = [r for c in source.chunks(["customer_id", "email"], order_by="customer_id", tie_breaker="email", limit=25) for r in c]
    expected = sorted((r[0], r[1]) for r in segment_data.rows(1000) if r[-1] == "vip" and r[5] != "bronze")[:25]
    assert first == again == expected
    source.close()


def test_table_name_carrying_sql_is_an_identifier_not_sql(segment_db):
    # The spec refuses such a name; even past that check (model_construct skips it), it is only ever quoted.
    source = source_for(SourceSpec.model_construct(conn_id="warehouse", table="segment_members; DROP TABLE segment_members",
                                                   chunk_size=1000, query=None, path=None, segment_column=None, segments=None, format=None))
    with pytest.raises(SourceError, match="no such table"):
        source.count()
    source.close()
    assert source_for(SourceSpec(conn_id="warehouse", table="segment_members")).count() == 1100


def test_not_a_sql_connection(airflow_conn):
    airflow_conn("not_sql", conn_type="http", host="example.com")
    with pytest.raises(SourceError, match="not a SQL connection"):
        source_for(SourceSpec(conn_id="not_sql", table="t"))


@pytest.mark.postgres
def test_postgres_streams_with_a_server_side_cursor(pg_schema):
    conn, schema = pg_schema
    conn.execute(f'CREATE TABLE "{schema}"."Segment Members" (customer_id int, email text, segment text)')
    with conn.cursor() as cur:
        cur.executemany(
            f'INSERT INTO "{schema}"."Segment Members" VALUES (%s, %s, %s)',
            [(r[0], r[1], r[-1]) for r in segment_data.rows(20_000)],
        )
    spec = SourceSpec(conn_id="pg_warehouse", table=f"{schema}.Segment Members", segment_column="segment",
                      segments=["churn_risk"], chunk_size=500)
    source = source_for(spec)
    try:
        check_postgres_streaming(source)
    finally:
        source.close()  # an open read transaction would block dropping the schema


def check_postgres_streaming(source):
    expected = sorted((r[0], r[1]) for r in segment_data.rows(20_000) if r[-1] == "churn_risk")
    assert source.count() == len(expected)
    got, open_cursors = [], []
    for chunk in source.chunks(["customer_id", "email"]):
        got.extend(chunk)
        if len(open_cursors) < 1:  # while rows stream, the segment stays on the server behind a named cursor
            probe = source.conn.cursor()
            probe.execute("SELECT count(*) FROM pg_cursors WHERE name LIKE 'segment_export_%%'")
            open_cursors.append(probe.fetchone()[0])
            probe.close()
        assert len(chunk) <= 500
    assert open_cursors == [1]
    assert sorted(got) == expected
    limited = [r for c in source.chunks(["customer_id", "email"], order_by="customer_id", tie_breaker="email", limit=7) for r in c]
    assert limited == expected[:7]


def test_missing_source_connection_names_the_field():
    with pytest.raises(SourceError, match="source.conn_id 'no_such_warehouse': no such Airflow connection"):
        source_for(SourceSpec(conn_id="no_such_warehouse", table="t"))


#: rows whose hashed columns (name, segment, score) differ only in what a careless row hash would mix up: NULL and
#: '', a comma inside a value and between values, quotes, a float's last bit; the last row repeats the first
_HASHED_ROWS = [
    (1, None, 0.1, "vip"), (2, "", 0.1, "vip"), (3, "a,b", 0.1, "c"), (4, "a", 0.1, "b,c"),
    (5, "x", 0.30000000000000004, "vip"), (6, "x", 0.3, "vip"), (7, '"x"', 0.3, "vip"), (8, None, 0.1, "vip"),
]
_HASHED = ["name", "segment", "score"]


def _hashes(source):
    return [row[-1] for chunk in source.chunks(_HASHED, row_hash=True) for row in chunk]


def _check_row_hashes(source):
    hashes = _hashes(source)  # in the rows' order: one small table, written once
    assert len(hashes) == len(_HASHED_ROWS) and all(isinstance(h, str) and len(h) >= 32 for h in hashes)
    assert len(set(hashes)) == len(_HASHED_ROWS) - 1  # only the repeated row hashes alike
    assert hashes[0] == hashes[-1]
    assert _hashes(source) == hashes  # the same on every read
    ordered = [r for c in source.chunks(_HASHED, order_by="id", row_hash=True, limit=3) for r in c]
    assert [r[0] for r in ordered] == [None, "", "a,b"] and [r[-1] for r in ordered] == hashes[:3]


def test_sqlite_row_hashes_tell_rows_apart(tmp_path, airflow_conn):
    import sqlite3

    path = tmp_path / "hashed.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE t (id INTEGER, name TEXT, score REAL, segment TEXT)")
        db.executemany("INSERT INTO t VALUES (?, ?, ?, ?)", _HASHED_ROWS)
    airflow_conn("hashed", conn_type="sqlite", host=str(path))
    source = source_for(SourceSpec(conn_id="hashed", table="t"))
    try:
        _check_row_hashes(source)
    finally:
        source.close()


@pytest.mark.postgres
def test_postgres_row_hashes_tell_rows_apart(pg_schema):
    conn, schema = pg_schema
    conn.execute(f'CREATE TABLE "{schema}".t (id int, name text, score double precision, segment text)')
    with conn.cursor() as cur:
        cur.executemany(f'INSERT INTO "{schema}".t VALUES (%s, %s, %s, %s)', _HASHED_ROWS)
    source = source_for(SourceSpec(conn_id="pg_warehouse", table=f"{schema}.t"))
    try:
        _check_row_hashes(source)
    finally:
        source.close()


def test_hashed_select_orders_by_columns_it_does_not_return():
    spec = SourceSpec(conn_id="w", table="t", segment_column="seg", segments=["vip"])
    sql, params = build_select(spec, SqlDialect(name="postgresql"), ["email"], order_by="id", tie_breaker="email",
                               limit=5, row_hash=True)
    assert sql.startswith("SELECT src.c0, src.row_hash FROM (SELECT c0, c1, ")
    assert '"email" AS c0, "id" AS c1, ROW("email")::text AS row_text FROM "t" WHERE "seg" IN (%s)' in sql
    assert sql.endswith(" ORDER BY src.c1, src.c0 LIMIT 5") and params == ["vip"]
