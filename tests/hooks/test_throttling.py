"""Mailchimp throttling: other apps hold most of the account's connections and a storm of throttled answers hits.

Mailchimp caps an API key at 10 simultaneous connections, shared with every app on the account, and answers the
one over with 429 -- or, as its documents also say, a bare 403 (sandbox behaviour ``mailchimp_throttle_status``).
The export must slow down (fewer connections in flight), recover, and finish, with every member in the audience
and ``sent == accepted + rejected + skipped``; under either status.
"""

from __future__ import annotations

import pytest
import segment_data
from sandbox_state import mailchimp_members
from segment_export_sandbox import MAILCHIMP_AUDIENCE_ID

from segment_export.destinations import destination_for
from segment_export.exporter import run_export
from segment_export.sources import source_for
from segment_export.spec import ExportSpec

PROFILES = 20_000
OTHER_APPS_LEAVE = 3  # of Mailchimp's 10 connections, other apps on the account hold 7
STORM = 100  # throttled answers to batch calls, on top of the cap's own


@pytest.fixture
def crowded_mailchimp(sandbox):
    """The sandbox with only a few Mailchimp connections free and requests that take a while."""
    sandbox.configure(mailchimp_max_connections=OTHER_APPS_LEAVE, latency={"mailchimp_batch": 0.05})
    try:
        yield sandbox
    finally:
        sandbox.configure(mailchimp_max_connections=10, latency={"mailchimp_batch": 0.0})


@pytest.mark.parametrize("status", [429, 403])
def test_a_throttled_mailchimp_export_slows_down_and_finishes(tmp_path, airflow_conn, crowded_mailchimp, status):
    sandbox = crowded_mailchimp
    path = segment_data.write_sqlite(tmp_path / "w.db", PROFILES)
    airflow_conn("warehouse", conn_type="sqlite", host=str(path))
    sandbox.configure(behaviour={"mailchimp_throttle_status": status})
    sandbox.set_faults([{"endpoint": "POST /3.0/lists/{list_id}", "kind": "429", "times": STORM}])
    spec = ExportSpec.model_validate({
        "id": "throttled", "privacy_acknowledged": True,
        "source": {"conn_id": "warehouse", "table": "segment_members"},
        "destination": {"type": "mailchimp", "audience_id": MAILCHIMP_AUDIENCE_ID, "new_member_status": "subscribed"},
        "mapping": {"email": "email", "first_name": "first_name"},
    })
    source = source_for(spec.source)
    destination = destination_for(spec)
    destination.hook.retry_base_seconds = 0.02  # the test's clock; the schedule's shape is the product's
    try:
        summary = run_export(spec, source, destination)
    finally:
        source.close()

    state = sandbox.state()
    members = mailchimp_members(state, MAILCHIMP_AUDIENCE_ID)
    assert set(members) == {r[1] for r in segment_data.rows(PROFILES)}
    assert summary.accepted == PROFILES == summary.created and summary.consistent
    assert summary.sent == summary.accepted + summary.rejected + summary.skipped
    answers = state["requests"]["by_endpoint"]["POST /3.0/lists/{list_id}"]["status"]
    assert answers.get(str(status), 0) > 0 and set(answers) == {"200", str(status)}  # throttled, and only that
    assert sandbox.faults.describe()[0]["fired"] == STORM
    concurrency = destination.hook.adaptive_limit
    assert concurrency.cuts > 0 and concurrency.lowest <= OTHER_APPS_LEAVE  # it slowed down...
    assert concurrency.limit > concurrency.lowest  # ...and came back up
