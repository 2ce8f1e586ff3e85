"""KlaviyoAsyncHook against the API sandbox: the jobs the sync hook submitted, polled from an event loop by the
same requests and retry rules, until the sandbox has finished them."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from klaviyo_jobs import job_statuses, queued_for, submit_jobs
from sandbox_state import klaviyo_profiles
from segment_export_sandbox import KLAVIYO_API_KEY, KLAVIYO_LIST_ID

from segment_export.destinations.klaviyo import destination
from segment_export.destinations.klaviyo import hook as hooks
from segment_export.destinations.klaviyo.hook import (
    BULK_IMPORT_FINAL_STATUSES, KLAVIYO_REVISION, KlaviyoAsyncHook, KlaviyoHook,
)
from segment_export.hooks.base import DestinationError

JOB_ENDPOINT = "GET /api/profile-bulk-import-jobs/{job_id}"


def job_polls(sandbox) -> dict[str, int]:
    return sandbox.state()["requests"]["by_endpoint"][JOB_ENDPOINT]["status"]


def test_pending_jobs_are_those_the_sandbox_has_not_finished(sandbox):
    emails = [[f"async.{j}.{i}@example.com" for i in range(3)] for j in range(2)]
    with queued_for(sandbox, 1.0):
        ids = submit_jobs(KLAVIYO_LIST_ID, emails)
        assert asyncio.run(KlaviyoAsyncHook().pending_jobs(ids)) == ids  # both still queued
        assert set(job_statuses(sandbox, ids).values()) == {"queued"}
        time.sleep(1.2)
        assert asyncio.run(KlaviyoAsyncHook().pending_jobs(ids)) == []
    assert set(job_statuses(sandbox, ids).values()) == {"complete"}
    held = klaviyo_profiles(sandbox.state(), KLAVIYO_LIST_ID)
    assert set(held) == {e for job in emails for e in job}


def test_finished_is_what_the_export_treats_as_finished():
    # one definition: the sync export's polling and the async hook stop on the same statuses
    assert destination.bulk_import_finished is hooks.bulk_import_finished
    for status in ("queued", "processing", *BULK_IMPORT_FINAL_STATUSES):
        assert hooks.bulk_import_finished({"attributes": {"status": status}}) is (status in BULK_IMPORT_FINAL_STATUSES)


def test_a_429_is_waited_out_not_fatal(sandbox):
    (job_id,) = submit_jobs(KLAVIYO_LIST_ID, [["throttled.poll@example.com"]])
    sandbox.set_faults([{"endpoint": JOB_ENDPOINT, "kind": "429", "times": 2}])
    hook = KlaviyoAsyncHook()
    hook.retry_base_seconds = 0.01
    assert asyncio.run(hook.pending_jobs([job_id])) == []
    assert job_polls(sandbox) == {"429": 2, "200": 1}
    assert hook.retries == 2 and hook.requests == 3


def test_a_5xx_is_retried_within_max_retries_then_fails_with_klaviyos_words(sandbox):
    (job_id,) = submit_jobs(KLAVIYO_LIST_ID, [["flaky.poll@example.com"]])
    sandbox.set_faults([{"endpoint": JOB_ENDPOINT, "kind": "503", "times": 100}])
    hook = KlaviyoAsyncHook(max_retries=2)
    hook.retry_base_seconds = 0.01
    with pytest.raises(DestinationError, match=r"^Klaviyo connection 'klaviyo_default': GET /api/profile-bulk-import-"
                                               r"jobs/\w+ failed: HTTP 503") as info:
        asyncio.run(hook.pending_jobs([job_id]))
    assert info.value.retryable and hook.requests == 3 and job_polls(sandbox) == {"503": 3}


def test_an_unknown_job_fails_at_once(sandbox):
    hook = KlaviyoAsyncHook()
    with pytest.raises(DestinationError, match="HTTP 404") as info:
        asyncio.run(hook.pending_jobs(["NoSuchJob"]))
    assert info.value.status == 404 and not info.value.retryable and hook.retries == 0


def test_async_hook_reads_the_connection_as_the_sync_hook_does_off_the_event_loop(sandbox, airflow_conn, monkeypatch):
    airflow_conn("klaviyo_async", conn_type="klaviyo", host=sandbox.klaviyo_host + "/", password=KLAVIYO_API_KEY,
                 extra={"timeout": 9, "X-Leak": "config"})
    from airflow.sdk import BaseHook

    threads = []
    real = BaseHook.get_connection.__func__

    def recording(cls, conn_id):
        threads.append(threading.get_ident())
        return real(cls, conn_id)

    monkeypatch.setattr(BaseHook, "get_connection", classmethod(recording))

    async def read():
        return threading.get_ident(), await KlaviyoAsyncHook("klaviyo_async").settings()

    loop_thread, settings = asyncio.run(read())
    assert threads and loop_thread not in threads  # read in a worker thread, never on the event loop
    assert settings == KlaviyoHook("klaviyo_async").load_settings()
    assert settings.base_url == sandbox.klaviyo_host and settings.timeout == 9.0
    assert settings.headers["Authorization"] == f"Klaviyo-API-Key {KLAVIYO_API_KEY}"
    assert settings.headers["revision"] == KLAVIYO_REVISION and "X-Leak" not in settings.headers
    assert KLAVIYO_API_KEY not in repr(settings)


def test_a_missing_connection_is_the_sync_hooks_clear_error():
    with pytest.raises(DestinationError, match="connection 'nope_async' is not defined: add a klaviyo connection"):
        asyncio.run(KlaviyoAsyncHook("nope_async").pending_jobs(["x"]))
