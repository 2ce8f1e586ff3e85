"""A first export streams its batches while the segment is read, and sends what the staged path sends
(``segment_export.streaming``).

Each comparison runs the same first export twice, each in a fresh sandbox with a fresh state: streamed (the
default for a first export) and staged (``streaming.why_not`` forced to give a reason). The two must agree on what
the destination holds, on the summary's counts (duplicates included), on the state the export remembers (keys,
fingerprints, segments) and on the outcome rows. The data has customers in two segments, the same address written
in other cases and with other payloads (the smallest fingerprint wins either way), and invalid rows.
"""

from __future__ import annotations

import csv
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import segment_data
from segment_export_sandbox import KLAVIYO_LIST_ID, MAILCHIMP_AUDIENCE_ID
from segment_export_sandbox.config import default_behaviour
from test_changes import _held
from test_sync import run

from segment_export import streaming
from segment_export.sources import source_for
from segment_export.spec import ExportSpec
from segment_export.state import STATE_TABLE

PROFILES = 1200
COUNTS = ("read", "sent", "accepted", "rejected", "skipped", "invalid", "duplicates", "tags_added", "unchanged")


def _rows() -> list[tuple[Any, ...]]:
    """The synthetic segment (every tenth customer in two segments), plus the same address in upper case with
    another first name in a third segment, a padded copy, and two invalid rows."""
    rows = [list(r) for r in segment_data.rows(PROFILES)]
    extra = []
    for n in (3, 40, 41):
        row = list(rows[n])
        row[1], row[2], row[7] = row[1].upper(), "Other", "winback"
        extra.append(row)
    padded = list(rows[77])
    padded[1] = f"  {padded[1]} "
    extra.append(padded)
    extra.append([99001, "not-an-address", "Bad", "Row", None, "gold", 1.0, "vip"])
    extra.append([99002, "", "Empty", "Row", None, "gold", 1.0, "vip"])
    # the extra rows in the middle, so that the first chunks go out before them
    middle = len(rows) // 2
    return [tuple(r) for r in rows[:middle] + extra + rows[middle:]]


def _csv(path: Path) -> Path:
    with path.open("w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(segment_data.COLUMNS)
        out.writerows(_rows())
    return path


def _spec(destination: str, csv_path: Path, chunk_size: int = 100) -> ExportSpec:
    if destination == "klaviyo":
        dest: dict[str, Any] = {"type": "klaviyo", "list_id": KLAVIYO_LIST_ID}
        mapping: dict[str, Any] = {"email": "email", "first_name": "first_name", "phone_number": "phone",
                                   "attributes": {"tier": "tier"}}
    else:
        dest = {"type": "mailchimp", "audience_id": MAILCHIMP_AUDIENCE_ID, "new_member_status": "subscribed"}
        mapping = {"email": "email", "first_name": "first_name", "phone_number": "phone"}
    return ExportSpec.model_validate({
        "id": f"streaming_{destination}", "privacy_acknowledged": True,
        "source": {"path": str(csv_path), "segment_column": "segment", "segments": segment_data.SEGMENTS,
                   "chunk_size": chunk_size},
        "destination": dest, "mapping": mapping,
        "sync": {"state_conn_id": "state_db", "on_leave": "remove"},
    })


def _remembered(db: Path, export_id: str) -> tuple[list[tuple], list[tuple]]:
    with sqlite3.connect(db) as conn:
        state = conn.execute(f"SELECT profile_key, fingerprint, segments FROM {STATE_TABLE} WHERE export_id = ? "
                             "ORDER BY profile_key", (export_id,)).fetchall()
        outcomes = conn.execute("SELECT profile_key, action, reason FROM segment_export_outcomes WHERE export_id = ? "
                                "ORDER BY profile_key, action", (export_id,)).fetchall()
    return state, outcomes


def _first_export(sandbox, tmp_path: Path, airflow_conn, destination: str, name: str) -> dict[str, Any]:
    sandbox.reset()
    sandbox.configure(rate_limits=True, rate_limit_scale=1.0, behaviour=default_behaviour())
    db = tmp_path / f"{name}.db"
    airflow_conn("state_db", conn_type="sqlite", host=str(db))
    spec = _spec(destination, _csv(tmp_path / f"{name}.csv"))
    summary = run(spec, run_id="r1")
    assert summary.consistent
    state, outcomes = _remembered(db, spec.id)
    return {"counts": {c: getattr(summary, c) for c in COUNTS}, "held": _held(sandbox, destination),
            "state": state, "outcomes": outcomes}


@pytest.mark.parametrize("destination", ["klaviyo", "mailchimp"])
def test_a_streamed_first_export_sends_what_the_staged_path_sends(destination, sandbox, tmp_path, airflow_conn,
                                                                  monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    streamed = _first_export(sandbox, tmp_path, airflow_conn, destination, "streamed")
    assert "streaming a first export" in caplog.text
    caplog.clear()
    with monkeypatch.context() as patched:
        patched.setattr(streaming, "why_not", lambda ctx, truncated: "forced by the test")
        staged = _first_export(sandbox, tmp_path, airflow_conn, destination, "staged")
    assert "staged read (forced by the test)" in caplog.text and "streaming a first export" not in caplog.text
    assert streamed == staged
    counts = streamed["counts"]
    assert counts["invalid"] == 2 and counts["duplicates"] >= PROFILES // 10 + 4
    assert counts["sent"] == counts["accepted"] == PROFILES == len(streamed["held"])
    if destination == "mailchimp":  # every segment of a profile in several is its tag
        assert counts["tags_added"] > PROFILES
        upper = segment_data.rows(PROFILES)
        third = next(r for n, r in enumerate(upper) if n == 3)
        assert "winback" in streamed["held"][third[1].lower()][2]


def test_batches_leave_while_the_segment_is_read(sandbox, tmp_path, airflow_conn, monkeypatch):
    """The first batch goes out before the source's last chunk is read (Mailchimp: 500 profiles a batch, the source
    read 100 rows at a time)."""
    airflow_conn("state_db", conn_type="sqlite", host=str(tmp_path / "state.db"))
    spec = _spec("mailchimp", _csv(tmp_path / "segment.csv"))
    events: list[str] = []
    from segment_export.destinations.mailchimp.destination import MailchimpDestination

    send = MailchimpDestination.send

    def record_send(self, batch):
        events.append("send")
        return send(self, batch)

    chunks = type(source_for(spec.source)).chunks

    def record_chunks(self, columns, **kwargs):
        for rows in chunks(self, columns, **kwargs):
            events.append(f"chunk {len(columns)}")
            yield rows

    monkeypatch.setattr(MailchimpDestination, "send", record_send)
    monkeypatch.setattr(type(source_for(spec.source)), "chunks", record_chunks)
    summary = run(spec, run_id="r1")
    assert summary.accepted == PROFILES
    full_chunks = [n for n, e in enumerate(events) if e.startswith("chunk") and e != "chunk 1"]
    assert events.index("send") < full_chunks[-1]  # sent while there were rows left to read
    assert events.count("send") >= 3


def test_rows_that_appear_between_the_two_passes(sandbox, tmp_path, airflow_conn, monkeypatch, caplog):
    """The source changes between the key count and the read: a row of a key the count did not see waits for the
    fold (with the key's other new rows); another row of a key already sent is left for the next run, which sends
    it as any later change."""
    caplog.set_level(logging.INFO)
    airflow_conn("state_db", conn_type="sqlite", host=str(tmp_path / "state.db"))
    spec = _spec("mailchimp", _csv(tmp_path / "segment.csv"))
    first = next(r for r in segment_data.rows(PROFILES))
    appeared = [
        (first[0], first[1], first[2], first[3], first[4], first[5], first[6], "winback"),  # already sent by then
        (99100, "late@example.com", "Late", "One", None, "gold", 1.0, "vip"),
        (99100, "LATE@example.com", "Late", "One", None, "gold", 1.0, "newsletter"),
    ]
    chunks = type(source_for(spec.source)).chunks

    def changing(self, columns, **kwargs):
        yield from chunks(self, columns, **kwargs)
        if len(columns) > 1:  # the second pass: three rows written meanwhile
            index = [segment_data.COLUMNS.index(c) for c in columns]
            yield [tuple(str(r[i]) if r[i] is not None else "" for i in index) for r in appeared]

    with monkeypatch.context() as patched:
        patched.setattr(type(source_for(spec.source)), "chunks", changing)
        summary = run(spec, run_id="r1")
    assert "1 rows appeared while the segment was read" in caplog.text
    assert summary.accepted == PROFILES + 1 and summary.consistent
    held = _held(sandbox, "mailchimp")
    assert held["late@example.com"][2] == ["newsletter", "vip"]  # its two rows folded into one profile
    assert "winback" not in held[first[1].lower()][2]  # left for the next run
    # the next run (the rows are in the file now) sends it, through the staged diff
    with Path(spec.source.path).open("a", newline="") as handle:
        csv.writer(handle).writerows(appeared)
    second = run(spec, run_id="r2")
    assert (second.sent, second.tags_added) == (0, 1)  # the same payload, one more segment: its tag
    assert "winback" in _held(sandbox, "mailchimp")[first[1].lower()][2]


def test_a_sqlite_table_with_the_state_in_the_same_file_streams_chunk_by_chunk(segment_db, sandbox, monkeypatch, caplog):
    """The default for a SQLite source: the state in the source's file. Each page of rows is its own statement, so
    the state's writes during the read (each Klaviyo job is recorded in flight before it is submitted, here one per
    50 profiles) never wait for the read ("database is locked", with one statement for the whole read)."""
    caplog.set_level(logging.INFO)
    spec = ExportSpec.model_validate({
        "id": "paged_sqlite", "privacy_acknowledged": True,
        "source": {"conn_id": "warehouse", "table": "segment_members", "segment_column": "segment",
                   "segments": segment_data.SEGMENTS, "chunk_size": 50},
        "destination": {"type": "klaviyo", "list_id": KLAVIYO_LIST_ID},
        "mapping": {"email": "email", "first_name": "first_name"},
    })
    from segment_export.destinations.klaviyo.destination import KlaviyoDestination

    monkeypatch.setattr(KlaviyoDestination, "max_batch_profiles", 50)
    with sqlite3.connect(segment_db) as conn:  # row ids with gaps
        conn.execute("DELETE FROM segment_members WHERE customer_id % 7 = 0")
        expected = conn.execute("SELECT COUNT(DISTINCT lower(email)) FROM segment_members").fetchone()[0]
    summary = run(spec, run_id="r1")
    assert "streaming a first export" in caplog.text
    assert summary.accepted == expected == len(_held(sandbox, "klaviyo")) and summary.consistent
    with sqlite3.connect(segment_db) as conn:
        assert conn.execute(f"SELECT COUNT(*) FROM {STATE_TABLE} WHERE export_id = 'paged_sqlite'").fetchone()[0] == expected
    assert run(spec, run_id="r2").sent == 0


def test_the_staged_path_where_streaming_does_not_apply(segment_db, sandbox, tmp_path, airflow_conn, caplog):
    caplog.set_level(logging.INFO)
    sqlite_spec = ExportSpec.model_validate({
        "id": "staged_sqlite", "privacy_acknowledged": True,
        "source": {"conn_id": "warehouse", "table": "segment_members", "segment_column": "segment", "segments": ["vip"]},
        "destination": {"type": "klaviyo", "list_id": KLAVIYO_LIST_ID}, "mapping": {"email": "email"},
    })
    query_spec = ExportSpec.model_validate({**sqlite_spec.model_dump(exclude_none=True), "source": {
        "conn_id": "warehouse", "query": "SELECT * FROM segment_members", "segment_column": "segment", "segments": ["vip"]}})
    run(query_spec, run_id="r1")
    assert "staged read (the state is SQLite, like the source, and the segment is not a table" in caplog.text
    caplog.clear()
    with sqlite3.connect(segment_db) as conn:  # a view has a NULL _rowid_ on SQLite: not read chunk by chunk
        conn.execute("CREATE VIEW vip_members AS SELECT * FROM segment_members")
    view_spec = ExportSpec.model_validate({**sqlite_spec.model_dump(exclude_none=True), "id": "staged_view", "source": {
        "conn_id": "warehouse", "table": "vip_members", "segment_column": "segment", "segments": ["vip"]}})
    assert run(view_spec, run_id="r1").accepted == len([r for r in segment_data.rows(1000) if r[-1] == "vip"])
    assert "staged read (the state is SQLite, like the source, and the segment is not a table" in caplog.text
    caplog.clear()
    airflow_conn("state_db", conn_type="sqlite", host=str(tmp_path / "state.db"))
    spec = _spec("klaviyo", _csv(tmp_path / "segment.csv"))
    run(spec, run_id="r1", max_profiles=50)
    assert "staged read (the limit truncates" in caplog.text
    caplog.clear()
    run(spec, run_id="r2")
    assert "staged read (the state remembers profiles" in caplog.text


def test_key_counts_count_rows_per_profile_key():
    counts = streaming.KeyCounts.read(iter([[("A@x.com",), (" a@x.com ",), ("b@x.com",)], [(None,), ("",), ("c@x.com",)]]))
    assert (counts.keys, counts.repeated_keys) == (3, 1)  # blanks count for nothing
    a, b, unknown = counts.positions(["a@x.com", "b@x.com", "d@x.com"])
    assert counts.repeated[a] == 1 and counts.repeated[b] == 0 and unknown == -1
    empty = streaming.KeyCounts.read(iter([]))
    assert (empty.keys, empty.positions(["a@x.com"])) == (0, [-1])


def test_a_batch_failing_mid_read_closes_the_read_and_records_the_invalid_rows(sandbox, tmp_path, airflow_conn,
                                                                              monkeypatch):
    from segment_export.context import ExportError
    from segment_export.destinations.mailchimp.destination import MailchimpDestination

    db = tmp_path / "state.db"
    airflow_conn("state_db", conn_type="sqlite", host=str(db))
    spec = _spec("mailchimp", _csv(tmp_path / "segment.csv"))
    closed = []
    chunks = type(source_for(spec.source)).chunks

    def tracked(self, columns, **kwargs):
        try:
            yield from chunks(self, columns, **kwargs)
        finally:
            closed.append(len(columns))

    def fail(self, batch):
        raise RuntimeError("the destination is down")

    monkeypatch.setattr(type(source_for(spec.source)), "chunks", tracked)
    monkeypatch.setattr(MailchimpDestination, "send", fail)
    monkeypatch.setattr(MailchimpDestination, "max_batch_profiles", 10)  # the pool fills, and fails, mid-read
    with pytest.raises(ExportError, match="the destination is down") as failed:
        run(spec, run_id="r1")
    assert failed.value.summary.read < len(_rows())  # it stopped mid-read
    assert sorted(closed) == [1, 4]  # both passes' reads ended (email; email, first name, phone, segment)
    _, outcomes = _remembered(db, spec.id)
    assert {o[1] for o in outcomes} <= {"invalid"}  # only what was read is recorded; nothing claimed as sent
