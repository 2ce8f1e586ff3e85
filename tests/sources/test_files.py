"""CSV and Parquet sources: chunks, segment filter, byte-order mark, text values, deterministic truncation."""

from __future__ import annotations

import pytest
import segment_data

from segment_export.sources import SourceError, source_for
from segment_export.spec import SourceSpec


@pytest.fixture(params=["csv", "parquet"])
def segment_file(request, tmp_path):
    if request.param == "csv":
        return segment_data.write_csv(tmp_path / "seg.csv", 500)
    return segment_data.write_parquet(tmp_path / "seg.parquet", 500)


def all_rows(source, columns, **kwargs):
    return [r for chunk in source.chunks(columns, **kwargs) for r in chunk]


def test_chunks_and_segment_filter(segment_file):
    source = source_for(SourceSpec(path=str(segment_file), segment_column="segment", segments=["vip"], chunk_size=40))
    expected = [r for r in segment_data.rows(500) if r[-1] == "vip"]
    assert source.count() == len(expected)
    chunks = list(source.chunks(["email"]))
    assert all(len(c) <= 40 for c in chunks)
    assert [r[0] for c in chunks for r in c] == [r[1] for r in expected]
    assert "lifetime_value" in source.columns()


def test_truncation_orders_numeric_keys_as_numbers_and_is_repeatable(segment_file):
    source = source_for(SourceSpec(path=str(segment_file), chunk_size=33))
    rows = all_rows(source, ["customer_id", "email"], order_by="customer_id", tie_breaker="email", limit=15)
    # rows come back in file order; the rows kept are the 15 lowest by (customer_id, email)
    expected = sorted(((r[0], r[1]) for r in segment_data.rows(500)), key=lambda r: (r[0], r[1]))[:15]
    assert sorted((int(r[0]), r[1]) for r in rows) == expected
    assert rows == all_rows(source, ["customer_id", "email"], order_by="customer_id", tie_breaker="email", limit=15)


def test_csv_keeps_text_and_ignores_bom(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffemail,zip\r\na@example.com,02134\r\nb@example.com,\r\n".encode("utf-8"))
    source = source_for(SourceSpec(path=str(path)))
    assert source.columns() == ["email", "zip"]
    assert all_rows(source, ["email", "zip"]) == [("a@example.com", "02134"), ("b@example.com", "")]


def test_missing_file_and_bad_parquet(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        source_for(SourceSpec(path=str(tmp_path / "nope.csv")))
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    with pytest.raises(SourceError, match="cannot open .* as Parquet"):
        source_for(SourceSpec(path=str(bad))).columns()


def test_csv_bytes_that_are_not_utf8_cost_their_row_only(tmp_path):
    from segment_export.mapping import Rejection, RowMapper
    from segment_export.spec import MappingSpec

    path = tmp_path / "latin1.csv"
    path.write_bytes(b"email,first_name\r\nok@example.com,Ana\r\nbad@example.com,Jos\xe9\r\n\xff@example.com,X\r\n")
    source = source_for(SourceSpec(path=str(path)))
    rows = all_rows(source, ["email", "first_name"])
    mapper = RowMapper(MappingSpec(email="email", first_name="first_name"), ["email", "first_name"])
    results = [mapper.map(r) for r in rows]
    assert results[0].first_name == "Ana"
    assert results[1] == Rejection("a mapped field is not valid UTF-8")
    assert results[2] == Rejection("email is not valid UTF-8")


def test_segment_column_asked_for_as_the_exporter_asks_is_read_once(segment_file):
    # The exporter reads the mapped columns plus the segment column (to know each row's segment); the source
    # filters on that same column. Asked for twice, CSV crashed ("'DataFrame' object has no attribute 'str'").
    spec = SourceSpec(path=str(segment_file), segment_column="segment", segments=["vip", "winback"], chunk_size=64)
    source = source_for(spec)
    expected = [(r[1], r[2], r[-1]) for r in segment_data.rows(500) if r[-1] in ("vip", "winback")]
    assert all_rows(source, ["email", "first_name", "segment"]) == expected
    assert all_rows(source, ["segment", "email"]) == [(r[2], r[0]) for r in expected]
    keep = all_rows(source, ["email", "segment"], order_by="segment", tie_breaker="email", limit=5)
    assert sorted(keep) == sorted((r[0], r[2]) for r in expected)[:5]


def test_segment_column_first_in_the_file_counts(tmp_path):
    path = tmp_path / "first.csv"
    path.write_text("segment,email\nvip,a@example.com\nother,b@example.com\nvip,c@example.com\n")
    source = source_for(SourceSpec(path=str(path), segment_column="segment", segments=["vip"]))
    assert source.count() == 2
    assert all_rows(source, ["email", "segment"]) == [("a@example.com", "vip"), ("c@example.com", "vip")]


def test_parquet_read_holds_a_few_row_groups_not_the_file(tmp_path):
    # pyarrow's ParquetFile pre-buffers by default and keeps every column chunk it read until the reader closes:
    # reading this file of 110 row groups so held 3.4 MB of Arrow memory, half its 7.4 MB decoded size, growing
    # with the file. Read without pre-buffering it holds a few row groups (0.41 MB), whatever the file's length.
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = segment_data.write_parquet(tmp_path / "long.parquet", 100_000, row_group_size=1_000)
    meta = pq.ParquetFile(path).metadata
    decoded = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    assert meta.num_row_groups == 110
    spec = SourceSpec(path=str(path), segment_column="segment", segments=list(segment_data.SEGMENTS), chunk_size=1_000)
    source = source_for(spec)
    before = pa.total_allocated_bytes()
    held, rows = 0, 0
    for chunk in source.chunks(list(segment_data.COLUMNS)):
        held = max(held, pa.total_allocated_bytes() - before)
        rows += len(chunk)
    assert rows == 110_000
    assert held < decoded / 8, f"{held:,} bytes of Arrow memory held reading a file of {decoded:,} decoded bytes"


def test_parquet_read_does_not_import_pandas(tmp_path):
    # Any Python-to-Arrow conversion (pa.array of the segment names) imports pandas when it is installed, which
    # cost a Parquet export ~70 MB of RSS; the CSV source needs pandas, the Parquet source must not. A fresh
    # interpreter, since other tests import pandas into this one.
    import json
    import os
    import subprocess
    import sys

    path = segment_data.write_parquet(tmp_path / "seg.parquet", 200)
    code = (
        "import json, sys\n"
        "from segment_export.sources import source_for\n"
        "from segment_export.spec import SourceSpec\n"
        f"source = source_for(SourceSpec(path={str(path)!r}, segment_column='segment', segments=['vip', 'winback']))\n"
        "rows = [r for c in source.chunks(['email', 'segment']) for r in c]\n"
        "print(json.dumps({'count': source.count(), 'rows': len(rows), 'pandas': 'pandas' in sys.modules}))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    expected = sum(1 for r in segment_data.rows(200) if r[-1] in ("vip", "winback"))
    assert json.loads(done.stdout.splitlines()[-1]) == {"count": expected, "rows": expected, "pandas": False}
