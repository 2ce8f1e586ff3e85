"""Many bulk import jobs in flight, awaited through one board (destinations/klaviyo/jobs.py), under every value of
the sandbox switch ``klaviyo_jobs_in_progress`` (the documents name no cap on jobs in progress)."""

from __future__ import annotations

import pytest
from sandbox_state import klaviyo_profiles
from segment_export_sandbox import KLAVIYO_LIST_ID
from segment_export_sandbox.config import BEHAVIOURS
from test_sync import KLAVIYO, make_spec, vip

from segment_export.destinations import destination_for
from segment_export.destinations.klaviyo.jobs import JobBoard
from segment_export.exporter import RunOptions, run_export
from segment_export.sources import source_for
from segment_export.state import StateStore

MODES = BEHAVIOURS["klaviyo_jobs_in_progress"]


def _run(spec, *, job_profiles: int, jobs_in_flight: int):
    source, destination = source_for(spec.source), destination_for(spec)
    destination.max_batch_profiles = job_profiles
    destination._jobs_in_flight = jobs_in_flight
    state = StateStore.open(spec.state_conn_id, spec.id, destination.target_id)
    try:
        return run_export(spec, source, destination, state=state, options=RunOptions(run_id="jobs")), destination
    finally:
        source.close()
        state.close()


@pytest.mark.parametrize("mode", MODES)
def test_many_jobs_in_flight_land_every_profile_under_each_cap(mode, segment_db, sandbox):
    sandbox.configure(behaviour={"klaviyo_jobs_in_progress": mode}, klaviyo_profiles_per_second=2000.0)
    spec = make_spec(KLAVIYO)
    summary, destination = _run(spec, job_profiles=40, jobs_in_flight=8)
    expected = {row[1].lower() for row in vip()}
    jobs = -(-len(expected) // 40)
    assert summary.sent == summary.accepted == len(expected)
    assert summary.sent == summary.accepted + summary.rejected + summary.skipped
    assert summary.batches == jobs
    state = sandbox.state()
    assert set(klaviyo_profiles(state, KLAVIYO_LIST_ID)) == expected
    (account,) = state["klaviyo"]["accounts"].values()
    assert len(account["jobs"]) == jobs  # a refused submission (429) is submitted again, never twice
    by_endpoint = state["requests"]["by_endpoint"]
    # One board for every job: the finished-jobs collection, not one GET per job per interval.
    listed = by_endpoint["GET /api/profile-bulk-import-jobs"]["count"]
    one_by_one = sum(v["count"] for k, v in by_endpoint.items() if k.startswith("GET /api/profile-bulk-import-jobs/"))
    assert 1 <= listed <= destination.jobs.rounds * 3
    assert one_by_one <= jobs  # only the board's direct look-ups of a job not listed for 30 s (none, usually)
    refused = by_endpoint["POST /api/profile-bulk-import-jobs"]["status"].get("429", 0)
    assert (refused > 0) == (mode == "refuse_beyond_2"), by_endpoint


class _Hook:
    """A hook whose finished-jobs collection never lists the job (a lagging or crowded collection)."""

    def __init__(self):
        self.looked_up = 0

    def iter_finished_job_pages(self, *, max_pages):
        yield [{"id": "someone-else", "attributes": {"status": "complete", "created_at": "2026-01-01T00:00:00+00:00"}}]

    def get_bulk_import_job(self, job_id):
        self.looked_up += 1
        return {"id": job_id, "attributes": {"status": "complete" if self.looked_up >= 2 else "processing"}}


def test_a_job_the_collection_never_lists_is_found_by_its_own_get():
    hook = _Hook()
    board = JobBoard(hook, interval=0.01, direct_after=0.05)  # type: ignore[arg-type]
    job = board.wait({"id": "ours", "attributes": {"status": "queued", "created_at": "2026-01-02T00:00:00+00:00"}})
    assert job["attributes"]["status"] == "complete"
    assert hook.looked_up == 2  # once after direct_after, not once a round
    assert board.rounds >= 8


def test_a_job_whose_own_get_keeps_failing_is_answered_with_the_error():
    class Gone(_Hook):
        def get_bulk_import_job(self, job_id):
            self.looked_up += 1
            raise RuntimeError("HTTP 404 not found")

    hook = Gone()
    board = JobBoard(hook, interval=0.01, direct_after=0.02)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="404"):
        board.wait({"id": "ours", "attributes": {"status": "queued"}})
    assert hook.looked_up == 3


def test_a_failed_round_is_tried_again_and_a_lasting_failure_raised_in_the_waiting_thread():
    class Flaky(_Hook):
        def __init__(self, failures):
            super().__init__()
            self.failures = failures

        def iter_finished_job_pages(self, *, max_pages):
            if self.failures:
                self.failures -= 1
                raise RuntimeError("HTTP 500")
            yield [{"id": "ours", "attributes": {"status": "complete"}}]

    board = JobBoard(Flaky(2), interval=0.01)  # type: ignore[arg-type]
    assert board.wait({"id": "ours", "attributes": {"status": "queued"}})["attributes"]["status"] == "complete"
    flaky = Flaky(3)
    board = JobBoard(flaky, interval=0.01)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="HTTP 500"):
        board.wait({"id": "ours", "attributes": {"status": "queued"}})
    # The count starts again after the error is handed out: one more transient failure is tried again.
    flaky.failures = 1
    assert board.wait({"id": "ours", "attributes": {"status": "queued"}})["attributes"]["status"] == "complete"
    # With nobody waiting the poller ends (after its interval); the next wait starts another.
    poller = board._poller
    if poller is not None:
        poller.join(timeout=2)
        assert not poller.is_alive()


def test_a_poller_starts_with_quick_rounds_only_after_a_minute_without_one(monkeypatch):
    """The first looks are QUICK_INTERVAL apart when the poller starts after a pause (a rerun's one job), not when
    it starts again right after the last one ended (one job after another)."""
    from types import SimpleNamespace

    import segment_export.destinations.klaviyo.jobs as jobs_module

    class Listed(_Hook):
        def iter_finished_job_pages(self, *, max_pages):
            yield [{"id": "ours", "attributes": {"status": "complete"}}]

    now = [1000.0]
    sleeps: list[float] = []
    monkeypatch.setattr(jobs_module, "time", SimpleNamespace(sleep=sleeps.append))  # the poller's only wait
    board = JobBoard(Listed(), interval=0.75, clock=lambda: now[0])  # type: ignore[arg-type]

    def wait_once() -> list[float]:
        sleeps.clear()
        assert board.wait({"id": "ours", "attributes": {"status": "queued"}})["attributes"]["status"] == "complete"
        while board._poller is not None:  # it ends at its next round: nobody waits
            board._poller.join(timeout=1)
        return list(sleeps)

    assert wait_once()[0] == jobs_module.QUICK_INTERVAL  # the first poller of the board
    now[0] += 5.0
    assert wait_once()[0] == 0.75  # started again 5 s after the last one stopped
    now[0] += jobs_module.QUICK_AFTER
    assert wait_once()[0] == jobs_module.QUICK_INTERVAL
