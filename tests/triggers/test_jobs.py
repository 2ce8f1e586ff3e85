"""DestinationJobsTrigger with the Klaviyo async hook against the API sandbox: one event once every job is
finished, an error event on a timeout or a refused key, serialization as the triggerer stores it."""

from __future__ import annotations

import asyncio
import importlib
import re
import time

import pytest
from klaviyo_jobs import job_statuses, queued_for, submit_jobs
from sandbox_state import klaviyo_profiles
from segment_export_sandbox import KLAVIYO_LIST_ID

from segment_export.triggers.jobs import DestinationJobsTrigger

KLAVIYO_ASYNC = "segment_export.destinations.klaviyo.hook.KlaviyoAsyncHook"


def events(trigger: DestinationJobsTrigger) -> list:
    """Every event the trigger yields, run as the triggerer runs it (on an event loop)."""
    async def collect():
        return [event async for event in trigger.run()]

    return asyncio.run(collect())


def test_serialize_round_trips():
    trigger = DestinationJobsTrigger(KLAVIYO_ASYNC, "klaviyo_x", ["J1", "J2"], poll_interval=2.5, timeout=60)
    path, kwargs = trigger.serialize()
    module, _, name = path.rpartition(".")
    again = getattr(importlib.import_module(module), name)(**kwargs)
    assert type(again) is DestinationJobsTrigger and again.serialize() == (path, kwargs)
    assert kwargs == {"async_hook": KLAVIYO_ASYNC, "conn_id": "klaviyo_x", "handles": ["J1", "J2"],
                      "poll_interval": 2.5, "timeout": 60}


def test_one_success_event_once_every_job_is_finished(sandbox, capsys):
    emails = [[f"trigger.{j}.{i}@example.com" for i in range(5)] for j in range(3)]
    with queued_for(sandbox, 0.6):
        ids = submit_jobs(KLAVIYO_LIST_ID, emails)
        capsys.readouterr()
        got = events(DestinationJobsTrigger(KLAVIYO_ASYNC, "klaviyo_default", ids, poll_interval=0.2))
        log = capsys.readouterr().out  # Airflow's structlog writes the task/trigger log lines there
    assert [e.payload for e in got] == [{"status": "success", "handles": ids}]
    assert set(job_statuses(sandbox, ids).values()) == {"complete"}
    assert set(klaviyo_profiles(sandbox.state(), KLAVIYO_LIST_ID)) == {e for job in emails for e in job}
    polls = sandbox.state()["requests"]["by_endpoint"]["GET /api/profile-bulk-import-jobs/{job_id}"]["status"]
    assert polls["200"] > len(ids)  # polled while pending, then stopped
    progress = [line for line in log.splitlines() if "still pending" in line]
    assert progress and re.search(r"\b3 of 3 jobs still pending on connection 'klaviyo_default' after \d+\.\ds", progress[0])
    assert "all 3 jobs finished on connection 'klaviyo_default'" in log
    assert "@" not in log and "Klaviyo-API-Key" not in log


def test_a_timeout_is_an_error_event_naming_the_jobs(sandbox):
    with queued_for(sandbox, 30):
        ids = submit_jobs(KLAVIYO_LIST_ID, [["slow.job@example.com"]])
        started = time.monotonic()
        (event,) = events(DestinationJobsTrigger(KLAVIYO_ASYNC, "klaviyo_default", ids, poll_interval=0.2, timeout=0.5))
        took = time.monotonic() - started
        assert job_statuses(sandbox, ids) == {ids[0]: "queued"}  # not finished: the trigger gave up on it
    assert event.payload["status"] == "error"
    assert event.payload["message"] == (f"1 of 1 jobs on connection 'klaviyo_default' were not finished after 0.5s "
                                        f"(timeout): {ids[0]}")
    assert 0.5 <= took < 3


def test_a_refused_key_is_an_error_event_without_the_key(sandbox, airflow_conn):
    ids = submit_jobs(KLAVIYO_LIST_ID, [["refused.key@example.com"]])
    airflow_conn("klaviyo_wrong", conn_type="klaviyo", host=sandbox.klaviyo_host, password="pk_wrong_trigger_key")
    (event,) = events(DestinationJobsTrigger(KLAVIYO_ASYNC, "klaviyo_wrong", ids, poll_interval=0.1))
    assert event.payload["status"] == "error"
    message = event.payload["message"]
    assert message.startswith(f"Klaviyo connection 'klaviyo_wrong': GET /api/profile-bulk-import-jobs/{ids[0]} "
                              "failed: HTTP 401")
    assert "pk_wrong_trigger_key" not in message and "@" not in message
    polls = sandbox.state()["requests"]["by_endpoint"]["GET /api/profile-bulk-import-jobs/{job_id}"]["status"]
    assert polls == {"401": 1}  # not retried


@pytest.mark.parametrize("path", ["segment_export.destinations.klaviyo.hook.NoSuchHook", "no_such_module_xyz.Hook"])
def test_a_hook_path_that_does_not_import_is_an_error_event(path):
    (event,) = events(DestinationJobsTrigger(path, "klaviyo_default", ["J1"]))
    assert event.payload["status"] == "error"
    assert event.payload["message"].startswith(f"ImportError: async hook {path!r} cannot be imported")


def test_an_unexpected_failure_is_redacted(monkeypatch):
    class Exploding:
        def __init__(self, conn_id):
            pass

        async def pending_jobs(self, handles):
            raise ValueError("could not parse 'ada.lovelace@example.com'")

    monkeypatch.setattr(DestinationJobsTrigger, "hook", lambda self: Exploding(self.conn_id))
    (event,) = events(DestinationJobsTrigger(KLAVIYO_ASYNC, "klaviyo_default", ["J1"]))
    assert event.payload == {"status": "error", "message": "ValueError: could not parse '<email>'"}
