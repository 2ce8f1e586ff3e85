"""The erasure receipts (``segment_export_erasures``) beside the sync state, on SQLite, PostgreSQL and any other
DB-API driver: created beside the state, one receipt per request and target, retried receipts replaced, the
erased addresses by connection, an erased address dropped from the exports' state."""

from __future__ import annotations

import sqlite3

import pytest
from test_state import store  # noqa: F401 - the fixture, on SQLite, PostgreSQL and a generic driver

from segment_export.state import ERASURES_TABLE, ErasureStore, StateStore


@pytest.fixture
def state(store):
    """test_state's store (SQLite, PostgreSQL, a generic driver), under this module's name for it."""
    return store


def test_receipts_are_recorded_replaced_on_retry_and_read_back(state):
    store = ErasureStore.beside(state)
    assert store.receipt("r1", "klaviyo_default", "account") is None
    store.record("r1", "klaviyo", "klaviyo_default", "account", "a@example.com", "2026-12-01", "not answered: 503", False,
                 when="2026-12-02T10:00:00+00:00")
    assert store.receipt("r1", "klaviyo_default", "account") == (None, "not answered: 503")
    # asked already: skipped by every export on the connection, from the day it was first sent
    assert store.erased("klaviyo_default") == {"a@example.com": "2026-12-02"}
    store.record("r1", "klaviyo", "klaviyo_default", "account", "a@example.com", "2026-12-01", "202 Accepted", True,
                 when="2026-12-03T08:00:00+00:00")
    assert store.receipt("r1", "klaviyo_default", "account") == ("2026-12-03T08:00:00+00:00", "202 Accepted")
    store.record("r1", "mailchimp", "mailchimp_default", "a1b2", "a@example.com", None, "204 No Content", True)
    (klaviyo, mailchimp) = sorted(store.receipts(), key=lambda r: r["destination"])
    assert klaviyo == {"request_id": "r1", "destination": "klaviyo", "conn_id": "klaviyo_default", "target_id": "account",
                       "requested_at": "2026-12-01", "sent_at": "2026-12-02T10:00:00+00:00",
                       "answered_at": "2026-12-03T08:00:00+00:00", "answer": "202 Accepted"}
    assert mailchimp["target_id"] == "a1b2" and mailchimp["answered_at"]
    assert store.erased("other_conn") == {}
    assert len(_count(state)) == 1 and _count(state)[0][0] == 2


def test_an_erased_address_leaves_the_exports_state(state):
    state.save([("a@example.com", "f1", ("vip",)), ("b@example.com", "f2", ("vip",))], new={"a@example.com", "b@example.com"})
    store = ErasureStore.beside(state)
    assert store.forget_in_state(["exp", "other_export"], "a@example.com") == 1
    assert [p.key for p in state.previous()] == ["b@example.com"]


def test_forgetting_before_any_export_ran_is_harmless(tmp_path):
    conn = sqlite3.connect(tmp_path / "empty.db")
    store = ErasureStore(conn, "?")
    store.ensure_table()
    assert store.forget_in_state(["exp"], "a@example.com") == 0
    store.record("r", "klaviyo", "k", "account", "a@example.com", None, "202", True)  # the connection still works
    conn.close()


def _count(state):
    cursor = state.conn.cursor()
    cursor.execute(f"SELECT COUNT(*) FROM {ERASURES_TABLE}")
    rows = cursor.fetchall()
    cursor.close()
    return rows
