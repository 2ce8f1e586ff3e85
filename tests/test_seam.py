"""Proof of the seam: a destination declared only in the tests (``tests/seam_destination``) and registered through
``segment_export.destinations.register`` runs the real engine end to end, with a SQLite source and state, against
a small server this test starts: a first run, changed rows, leavers, per-row outcomes, a killed and resumed run.
Checked by what the server holds, and by the state, never by return values alone."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from seam_destination import SEAMTEST
from seam_destination.server import ContactServer

from segment_export.assets import create_asset
from segment_export.destinations import destination_for, register
from segment_export.destinations.registry import unregister
from segment_export.exporter import RunOptions, run_export
from segment_export.sources import source_for
from segment_export.spec import ExportSpec, parse_spec_file
from segment_export.state import OUTCOMES_TABLE, STATE_TABLE, StateStore

ROWS = 120  # 100 valid members, 10 refused by the server (reject.test), 10 invalid addresses


def rows() -> list[tuple[str, str, str]]:
    out = [(f"member{i}@example.com", f"Name{i}", "vip") for i in range(100)]
    out += [(f"refused{i}@reject.test", "R", "vip") for i in range(10)]
    out += [(f"not-an-address-{i}", "X", "vip") for i in range(10)]
    return out


@pytest.fixture
def seam(tmp_path, airflow_conn):
    """The destination registered, its server running behind ``seamtest_default``, a segment behind ``warehouse``."""
    db = tmp_path / "warehouse.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE segment_members (email TEXT, first_name TEXT, segment TEXT)")
        conn.executemany("INSERT INTO segment_members VALUES (?, ?, ?)", rows())
    airflow_conn("warehouse", conn_type="sqlite", host=str(db))
    register(SEAMTEST)
    with ContactServer(("L1",)) as server:
        airflow_conn("seamtest_default", conn_type="seamtest", host=server.url)
        server.db = db
        yield server
    unregister(SEAMTEST.name)


def raw_spec(**extra) -> dict:
    raw = {
        "id": "seam_export",
        "privacy_acknowledged": True,
        "source": {"conn_id": "warehouse", "table": "segment_members", "segment_column": "segment", "segments": ["vip"]},
        "destination": {"type": "seamtest", "list_id": "L1"},
        "mapping": {"email": "email", "first_name": "first_name"},
        "sync": {"on_leave": "remove", "allow_mass_leave": True},
        "limit": {"max_rejected_share": None},
    }
    raw.update(extra)
    return raw


def run(spec: ExportSpec, run_id: str = "r"):
    source, destination = source_for(spec.source), destination_for(spec)
    state = StateStore.open(spec.state_conn_id, spec.id, destination.target_id)
    try:
        return run_export(spec, source, destination, state=state, options=RunOptions(run_id=run_id))
    finally:
        source.close()
        state.close()


def sql(db: Path, statement: str, params=()) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(statement, params).fetchall()


def remembered(db: Path) -> set[str]:
    return {k for (k,) in sql(db, f"SELECT profile_key FROM {STATE_TABLE} WHERE export_id = 'seam_export'")}


def valid() -> set[str]:
    return {email for email, _, _ in rows() if email.startswith("member")}


def test_first_run_changed_rows_and_leavers_through_a_registered_destination(seam):
    spec = ExportSpec.model_validate(raw_spec())
    assert spec.max_profiles == SEAMTEST.max_profiles and spec.on_leave == "remove"

    first = run(spec, "first")
    assert set(seam.held()) == valid()
    assert (first.read, first.sent, first.accepted, first.rejected, first.invalid) == (120, 110, 100, 10, 10)
    assert first.sent == first.accepted + first.rejected + first.skipped
    assert first.rejected_reasons == {"domain refused": 10}
    assert remembered(seam.db) == valid()  # refused ones are not remembered: retried when they change
    outcomes = dict(sql(seam.db, f"SELECT action, count(*) FROM {OUTCOMES_TABLE} WHERE run_id = 'first' GROUP BY 1"))
    assert outcomes == {"created": 100, "rejected": 10, "invalid": 10}

    # Changed rows only: two names change; the ten refused rows are sent again (never accepted), nothing else.
    sql(seam.db, "UPDATE segment_members SET first_name = 'Changed' WHERE email IN ('member1@example.com', 'member2@example.com')")
    received = seam.received
    second = run(spec, "second")
    assert seam.received - received == 12 and (second.sent, second.accepted, second.unchanged) == (12, 2, 98)
    assert seam.held()["member1@example.com"]["first_name"] == "Changed"
    assert dict(sql(seam.db, f"SELECT action, count(*) FROM {OUTCOMES_TABLE} WHERE run_id = 'second' GROUP BY 1"))["updated"] == 2

    # Leavers: removed from the list, forgotten, one outcome row each.
    sql(seam.db, "DELETE FROM segment_members WHERE email IN ('member3@example.com', 'member4@example.com', 'member5@example.com')")
    third = run(spec, "third")
    assert third.removed == 3 and set(seam.held()) == valid() - {f"member{i}@example.com" for i in (3, 4, 5)}
    assert remembered(seam.db) == set(seam.held())
    removed = sql(seam.db, f"SELECT profile_key FROM {OUTCOMES_TABLE} WHERE run_id = 'third' AND action = 'removed'")
    assert {k for (k,) in removed} == {f"member{i}@example.com" for i in (3, 4, 5)}


KILLED_RUN = """
import sys
sys.path[:0] = {paths!r}
from segment_export.destinations import register
from seam_destination import SEAMTEST
register(SEAMTEST)
from test_seam import raw_spec, run
from segment_export.spec import ExportSpec
run(ExportSpec.model_validate(raw_spec()), "killed")
"""


def test_a_killed_run_is_resumed_by_the_next_and_nothing_unconfirmed_is_remembered(seam):
    seam.delay = 0.4  # 5 batches of 25 (110 profiles to send) take about a second each at 2 in flight
    tests = str(Path(__file__).parent)
    paths = [tests, *[p for p in sys.path if p]]
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN.format(paths=paths)], env=os.environ.copy(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while seam.batches < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    held_at_kill = set(seam.held())
    assert 0 < len(held_at_kill) < 100
    # What the state remembers, the server confirmed; it may hold more (answers the kill cut off), never less.
    confirmed = remembered(seam.db)
    assert confirmed <= held_at_kill

    seam.delay = 0.0
    resumed = run(ExportSpec.model_validate(raw_spec()), "after")
    assert set(seam.held()) == valid() == remembered(seam.db)
    assert resumed.sent == resumed.accepted + resumed.rejected + resumed.skipped
    # Only what the killed run had not seen confirmed is sent again; what it had is unchanged.
    assert (resumed.unchanged, resumed.accepted) == (len(confirmed), 100 - len(confirmed))


def test_the_registered_destination_reaches_specs_assets_and_errors(seam, tmp_path):
    asset = create_asset(destination="seamtest", target_id="L1")
    # (Airflow normalises a scheme its providers manager does not list; the built-in ones are in the provider info.)
    assert asset.uri.rstrip("/") == "seamtest://L1" and asset.extra == {"destination": "seamtest", "target_id": "L1"}
    spec = ExportSpec.model_validate(raw_spec())
    assert spec.destination.connection_id == "seamtest_default"
    assert ExportSpec.model_validate(spec.model_dump(mode="json")) == spec
    bad = tmp_path / "bad.yaml"
    bad.write_text("exports:\n  - id: x\n    privacy_acknowledged: true\n    source: {path: /tmp/a.csv}\n"
                   "    destination: {type: braze, list_id: L1}\n    mapping: {email: email}\n")
    _, errors = parse_spec_file(bad)
    (error,) = errors
    assert error.field == "destination" and "'klaviyo', 'mailchimp', 'seamtest'" in str(error)
    unknown_list = ExportSpec.model_validate(raw_spec(destination={"type": "seamtest", "list_id": "nope"}))
    with pytest.raises(ValueError, match="seamtest list 'nope' does not exist"):
        run(unknown_list)
    assert seam.batches == 0  # checked before anything was sent


def test_a_destination_that_cannot_list_its_target_gets_no_verify(seam):
    """verify is declared per destination (DestinationType.verifies): a spec asking it of one that does not list its
    target's membership is refused at parse time, and its DAG's trigger form has no drift options."""
    from segment_export.dag_factory import trigger_params

    assert SEAMTEST.verifies is False
    with pytest.raises(ValueError, match="verify: .* cannot list its list's membership"):
        ExportSpec.model_validate(raw_spec(verify=True))
    assert not {"verify", "verify_only", "repair"} & set(trigger_params(ExportSpec.model_validate(raw_spec())))
