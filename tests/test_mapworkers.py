"""A large segment's rows are mapped in a worker process beside the task's main thread (``segment_export.mapworkers``),
and the run is the same as when they are mapped in the task's process.

Each comparison runs the same first export twice, in a fresh sandbox with a fresh state: with a map worker (the
threshold lowered so that a small segment uses one) and without. The destination's end state, the summary's counts
and reasons, the state and the outcome rows (invalid rows keyed by position included) must be the same.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import segment_data
from segment_export_sandbox import KLAVIYO_LIST_ID, MAILCHIMP_AUDIENCE_ID
from segment_export_sandbox.config import default_behaviour
from test_changes import _held
from test_sync import run

from segment_export import mapworkers
from segment_export.spec import ExportSpec
from segment_export.state import STATE_TABLE

PROFILES = 1500
COUNTS = ("read", "sent", "accepted", "rejected", "skipped", "invalid", "duplicates", "tags_added", "invalid_reasons")


def _segment(path: Path) -> Path:
    """The synthetic segment with invalid rows spread over its chunks (no address, a bad address, a bad phone)."""
    segment_data.write_sqlite(path, PROFILES)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE segment_members SET email = '' WHERE customer_id % 97 = 5")
        conn.execute("UPDATE segment_members SET email = 'no-at-sign' WHERE customer_id % 89 = 7")
        conn.execute("UPDATE segment_members SET phone = '+1 000' WHERE customer_id % 83 = 3")
    return path


def _spec(destination: str) -> ExportSpec:
    if destination == "klaviyo":
        dest: dict[str, Any] = {"type": "klaviyo", "list_id": KLAVIYO_LIST_ID}
    else:
        dest = {"type": "mailchimp", "audience_id": MAILCHIMP_AUDIENCE_ID, "new_member_status": "subscribed"}
    return ExportSpec.model_validate({
        "id": f"mapworkers_{destination}", "privacy_acknowledged": True,
        "source": {"conn_id": "warehouse", "table": "segment_members", "segment_column": "segment",
                   "segments": segment_data.SEGMENTS, "chunk_size": 100},
        "destination": dest, "mapping": {"email": "email", "first_name": "first_name", "phone_number": "phone"},
        "sync": {"on_leave": "remove"},
    })


def _first_export(sandbox, tmp_path: Path, airflow_conn, destination: str, workers: int) -> dict[str, Any]:
    sandbox.reset()
    sandbox.configure(rate_limits=True, rate_limit_scale=1.0, behaviour=default_behaviour())
    db = _segment(tmp_path / f"segment-{workers}.db")
    airflow_conn("warehouse", conn_type="sqlite", host=str(db))
    summary = run(_spec(destination), run_id="r1", map_workers=workers)
    assert summary.consistent
    with sqlite3.connect(db) as conn:
        state = conn.execute(f"SELECT profile_key, fingerprint, segments FROM {STATE_TABLE} ORDER BY 1").fetchall()
        outcomes = conn.execute("SELECT profile_key, action, reason FROM segment_export_outcomes ORDER BY 1, 2, 3").fetchall()
    counts = {c: getattr(summary, c) for c in COUNTS}
    return {"counts": counts, "held": _held(sandbox, destination), "state": state, "outcomes": outcomes,
            "workers_cpu": summary.cpu_seconds.get("workers")}


@pytest.mark.parametrize("destination", ["klaviyo", "mailchimp"])
def test_rows_mapped_in_a_worker_make_the_same_run(destination, sandbox, tmp_path, airflow_conn, monkeypatch, caplog):
    monkeypatch.setattr(mapworkers, "MIN_ROWS", 100)
    with_worker = _first_export(sandbox, tmp_path, airflow_conn, destination, workers=1)
    alone = _first_export(sandbox, tmp_path, airflow_conn, destination, workers=0)
    assert with_worker["workers_cpu"] and with_worker["workers_cpu"] > 0 and alone["workers_cpu"] is None
    del with_worker["workers_cpu"], alone["workers_cpu"]
    assert with_worker == alone
    assert with_worker["counts"]["invalid"] > 30 and with_worker["counts"]["accepted"] > PROFILES * 0.9
    assert any(key.startswith("row ") for key, action, _ in with_worker["outcomes"] if action == "invalid")


def test_a_worker_that_dies_leaves_the_mapping_to_the_task(sandbox, tmp_path, airflow_conn, monkeypatch, caplog):
    """The worker is killed mid-read: the run maps the rest itself, logs it, and sends the whole segment."""
    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(mapworkers, "MIN_ROWS", 100)
    from segment_export.exporter import _Reader

    parent, original = os.getpid(), _Reader.map_rows

    def dying(self, rows, first, hash_index):  # inherited by the forked worker
        if os.getpid() != parent and first >= 600:
            os._exit(9)  # the worker dies mid-read
        return original(self, rows, first, hash_index)

    monkeypatch.setattr(_Reader, "map_rows", dying)
    died = _first_export(sandbox, tmp_path, airflow_conn, "klaviyo", workers=1)
    assert "the map workers failed" in caplog.text
    monkeypatch.setattr(_Reader, "map_rows", original)
    alone = _first_export(sandbox, tmp_path, airflow_conn, "klaviyo", workers=0)
    del died["workers_cpu"], alone["workers_cpu"]
    assert died == alone


def test_workers_that_cannot_start_leave_the_mapping_to_the_task(sandbox, tmp_path, airflow_conn, monkeypatch, caplog):
    """As under a process limit (fork fails)."""
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(mapworkers, "MIN_ROWS", 100)

    def refuse(*args, **kwargs):
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(mapworkers, "ProcessPoolExecutor", refuse)
    refused = _first_export(sandbox, tmp_path, airflow_conn, "mailchimp", workers=1)
    assert "map workers could not start (BlockingIOError: [Errno 11] Resource temporarily unavailable)" in caplog.text
    assert refused["workers_cpu"] is None and refused["counts"]["accepted"] > PROFILES * 0.9


def test_rows_that_do_not_pickle_are_mapped_in_the_task(sandbox, tmp_path, airflow_conn, monkeypatch, caplog):
    """A chunk the workers cannot take (here: a value pickle refuses) is mapped in the task's process, once."""
    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(mapworkers, "MIN_ROWS", 100)
    original = mapworkers.MapWorkers.submit

    def unpicklable(self, rows, first, hash_index):
        return original(self, [(*row, memoryview(b"x")) for row in rows] if first >= 300 else rows, first, hash_index)

    monkeypatch.setattr(mapworkers.MapWorkers, "submit", unpicklable)
    odd = _first_export(sandbox, tmp_path, airflow_conn, "klaviyo", workers=1)
    assert "the map workers failed" in caplog.text
    monkeypatch.setattr(mapworkers.MapWorkers, "submit", original)
    alone = _first_export(sandbox, tmp_path, airflow_conn, "klaviyo", workers=0)
    del odd["workers_cpu"], alone["workers_cpu"]
    assert odd == alone


@pytest.mark.parametrize("error", [KeyError, NotImplementedError])  # NotImplementedError: a RuntimeError
def test_a_mapping_error_is_raised_as_without_workers(segment_db, sandbox, monkeypatch, error):
    from segment_export.mapping import RowMapper

    monkeypatch.setattr(mapworkers, "MIN_ROWS", 100)

    def broken(self, row):
        raise error("a bug in the mapping")

    monkeypatch.setattr(RowMapper, "map", broken)
    with pytest.raises(error, match="a bug in the mapping"):
        run(_spec("klaviyo"), run_id="r1", map_workers=1)


def _map_in_a_daemonic_process(_: int) -> tuple[bool, list[int], bool]:
    """In a Celery prefork (billiard) process: map three chunks with a worker; (daemonic before, mapped, after)."""
    import logging as logging_

    daemonic = mapworkers.multiprocessing.current_process().daemon
    with mapworkers.MapWorkers(lambda n: n * 2, 1, logging_.getLogger("test")) as mapping:
        started = mapping.processes is not None
        done = [*mapping.submit(1), *mapping.submit(2), *mapping.submit(3), *mapping.finish()]
    return daemonic and started, sorted(done), mapworkers.multiprocessing.current_process().daemon


def test_workers_start_in_celerys_prefork_pool():
    """Celery's prefork processes count as daemonic, which multiprocessing forbids to have children; the workers
    start there all the same (they die with the task), and the process is daemonic again after."""
    billiard = pytest.importorskip("billiard")
    with billiard.get_context("fork").Pool(1) as pool:
        assert pool.map(_map_in_a_daemonic_process, [0]) == [(True, [2, 4, 6], True)]
