"""MailchimpAsyncHook against the API sandbox: batch operations jobs the sync hook submitted, polled from an event
loop (and by the generic trigger) until the sandbox has run them."""

from __future__ import annotations

import asyncio
import contextlib
import json

from sandbox_state import mailchimp_members
from segment_export_sandbox import MAILCHIMP_AUDIENCE_ID

from segment_export.destinations.mailchimp.hook import MailchimpAsyncHook, MailchimpHook, subscriber_hash
from segment_export.triggers.jobs import DestinationJobsTrigger


def submit_batch(emails: list[str]) -> str:
    """One ``POST /batches`` of member upserts, through the sync hook; its id."""
    operations = [{"method": "PUT", "path": f"/lists/{MAILCHIMP_AUDIENCE_ID}/members/{subscriber_hash(e)}",
                   "body": json.dumps({"email_address": e, "status_if_new": "subscribed"})} for e in emails]
    return MailchimpHook().start_batch(json.dumps({"operations": operations}).encode())["id"]


def batch_statuses(sandbox, ids: list[str]) -> dict[str, str]:
    (account,) = sandbox.state()["mailchimp"]["accounts"].values()
    return {i: account["batches"][i]["status"] for i in ids}


@contextlib.contextmanager
def batches_take(sandbox, seconds: float):
    """Batches run ``seconds`` after submission; the session's sandbox gets its latencies back after."""
    before = sandbox.configure()["latency"]
    sandbox.configure(latency={**before, "mailchimp_batch_operations": seconds})
    try:
        yield
    finally:
        sandbox.configure(latency=before)


def test_pending_batches_then_the_trigger_waits_for_them(sandbox):
    emails = [[f"mc.async.{j}.{i}@example.com" for i in range(3)] for j in range(2)]
    with batches_take(sandbox, 0.8):
        ids = [submit_batch(batch) for batch in emails]
        assert asyncio.run(MailchimpAsyncHook().pending_jobs(ids)) == ids
        assert set(batch_statuses(sandbox, ids).values()) == {"pending"}

        async def run():
            trigger = DestinationJobsTrigger("segment_export.destinations.mailchimp.hook.MailchimpAsyncHook",
                                             "mailchimp_default", ids, poll_interval=0.2)
            return [event.payload async for event in trigger.run()]

        assert asyncio.run(run()) == [{"status": "success", "handles": ids}]
    assert set(batch_statuses(sandbox, ids).values()) == {"finished"}
    held = mailchimp_members(sandbox.state(), MAILCHIMP_AUDIENCE_ID)
    assert {e for batch in emails for e in batch} <= set(held)


def test_a_throttled_poll_is_waited_out(sandbox):
    sandbox.set_faults([{"endpoint": "GET /3.0/batches/{batch_id}", "kind": "429", "times": 2}])
    hook = MailchimpAsyncHook()
    hook.retry_base_seconds = 0.01
    with batches_take(sandbox, 0.0):
        batch_id = submit_batch(["mc.throttled.poll@example.com"])
        assert asyncio.run(hook.pending_jobs([batch_id])) == []
    assert sandbox.state()["requests"]["by_endpoint"]["GET /3.0/batches/{batch_id}"]["status"] == {"429": 2, "200": 1}
    assert hook.retries == 2


def test_the_async_hook_keeps_to_the_keys_connection_cap():
    assert MailchimpAsyncHook(max_concurrency=50).max_concurrency == 10
