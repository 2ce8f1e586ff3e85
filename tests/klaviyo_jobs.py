"""Real Klaviyo bulk import jobs in the API sandbox, submitted the way the export does (tests of async polling)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

from segment_export.destinations.klaviyo.destination import job_envelope
from segment_export.destinations.klaviyo.hook import KlaviyoHook


def submit_jobs(list_id: str, emails_per_job: list[list[str]], conn_id: str = "klaviyo_default") -> list[str]:
    """One bulk import job per list of addresses, into ``list_id``, through the sync hook; their ids."""
    head, tail = job_envelope(list_id)
    hook = KlaviyoHook(conn_id)
    ids = []
    for emails in emails_per_job:
        fragments = [json.dumps({"type": "profile", "attributes": {"email": e}}).encode() for e in emails]
        ids.append(hook.submit_bulk_import(head + b",".join(fragments) + tail)["id"])
    return ids


def job_statuses(sandbox, job_ids: list[str]) -> dict[str, str]:
    """What the sandbox says of each job now."""
    (account,) = sandbox.state()["klaviyo"]["accounts"].values()
    return {job_id: account["jobs"][job_id]["status"] for job_id in job_ids}


@contextlib.contextmanager
def queued_for(sandbox, seconds: float) -> Iterator[None]:
    """Jobs wait ``seconds`` in the queue before processing; the session's sandbox is given its speed back after
    (``reset`` keeps runtime knobs)."""
    before = sandbox.configure()["klaviyo_job_queue_seconds"]
    sandbox.configure(klaviyo_job_queue_seconds=seconds)
    try:
        yield
    finally:
        sandbox.configure(klaviyo_job_queue_seconds=before)
