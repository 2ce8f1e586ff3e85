"""segment_export.ui.outcomes: a run's outcome rows read back from the table StateStore writes (SQLite here; the
same SQL runs on PostgreSQL in the deployment test)."""

from __future__ import annotations

import sqlite3

import pytest

from segment_export.state import StateStore
from segment_export.ui.outcomes import OutcomesReader, OutcomesUnavailable, open_reader

ROWS = [
    ("c@example.com", "created", None),
    ("a@example.com", "rejected", "<email> looks fake or invalid, please enter a real email address."),
    ("b@example.com", "rejected", "Invalid phone number"),
    ("row 7", "invalid", "email is not a valid address"),
    ("d@example.com", "skipped", "compliance state"),
]


@pytest.fixture
def reader(tmp_path):
    conn = sqlite3.connect(tmp_path / "state.db")
    store = StateStore(conn, "?", "vip", "L1", "test")
    store.ensure_tables()
    store.record_outcomes("run1", ROWS)
    store.record_outcomes("run2", [("z@example.com", "created", None)])
    StateStore(conn, "?", "other", "L1", "test").record_outcomes("run1", [("x@example.com", "rejected", "x")])
    return OutcomesReader(conn, "?", "vip")


def test_counts_are_this_exports_run_only(reader):
    counts = reader.counts("run1")
    assert counts.by_action == {"created": 1, "skipped": 1, "rejected": 2, "invalid": 1}
    assert ("rejected", "Invalid phone number", 1) in counts.by_reason
    assert reader.counts("run2").total == 1 and reader.counts("nope").total == 0


def test_rows_are_numbered_by_key_and_the_number_finds_the_key(reader):
    rows, total = reader.rows("run1")
    assert total == 5 and [r.key for r in rows] == ["a@example.com", "b@example.com", "c@example.com", "d@example.com", "row 7"]
    assert [r.n for r in rows] == [1, 2, 3, 4, 5]
    assert reader.key("run1", 2) == "b@example.com" and reader.key("run1", 99) is None


def test_search_by_reason_and_action_keeps_each_rows_number(reader):
    rows, total = reader.rows("run1", query="FAKE")
    assert total == 1 and (rows[0].n, rows[0].action) == (1, "rejected")
    rows, total = reader.rows("run1", action="rejected")
    assert total == 2 and [r.n for r in rows] == [1, 2]
    rows, total = reader.rows("run1", query="invalid")  # "fake or invalid", "Invalid phone number", the action invalid
    assert [r.n for r in rows] == [1, 2, 5]


def test_only_editors_search_keys(reader):
    assert reader.rows("run1", query="b@example")[1] == 0
    rows, total = reader.rows("run1", query="b@example", search_keys=True)
    assert total == 1 and rows[0].key == "b@example.com"


def test_pages(reader):
    rows, total = reader.rows("run1", limit=2, offset=2)
    assert total == 5 and [r.n for r in rows] == [3, 4]


def test_no_table_yet_is_said_not_raised_as_a_driver_error(tmp_path):
    reader = OutcomesReader(sqlite3.connect(tmp_path / "empty.db"), "?", "vip")
    with pytest.raises(OutcomesUnavailable, match="segment_export_outcomes"):
        reader.counts("run1")


def test_the_embedded_file_is_opened_read_only(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGMENT_EXPORT_STATE_DB", str(tmp_path / "missing.db"))
    with pytest.raises(OutcomesUnavailable, match="no state file"):
        with open_reader(None, "vip"):
            pass
    path = tmp_path / "state.db"
    monkeypatch.setenv("SEGMENT_EXPORT_STATE_DB", str(path))
    store = StateStore(sqlite3.connect(path), "?", "vip", "L1", "test")
    store.ensure_tables()
    store.record_outcomes("run1", ROWS)
    with open_reader(None, "vip") as reader:
        assert reader.counts("run1").total == 5
        with pytest.raises(sqlite3.OperationalError):
            reader.conn.execute("DELETE FROM segment_export_outcomes")
