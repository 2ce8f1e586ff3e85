"""Mailchimp sync end to end, under each value of the sandbox's guess about status-less batch-subscribe members.

Existing members are updated through the documented upsert (``PUT /lists/{id}/members/{hash}`` with
``status_if_new``, in batch operations jobs), never by a batch-subscribe member without ``status``: so the
export is right whether Mailchimp accepts such members (``mailchimp_batch_update_requires_status: false``) or
fails the whole request over them (``true``). Each run checks the sandbox's end state and
``sent == accepted + rejected + skipped``.
"""

from __future__ import annotations

import sqlite3

import pytest
from sandbox_state import mailchimp_members
from segment_export_sandbox import MAILCHIMP_AUDIENCE_ID, subscriber_hash

from segment_export.destinations import destination_for
from segment_export.destinations.mailchimp.destination import MailchimpDestination
from segment_export.exporter import RunOptions, run_export
from segment_export.sources import source_for
from segment_export.spec import ExportSpec
from segment_export.state import STATE_TABLE, StateStore

AUD = MAILCHIMP_AUDIENCE_ID
GOOD = [(f"p{i}@example.com", f"P{i}", "07/04", "vip") for i in range(29)]
ROWS = GOOD + [
    ("p29@example.com", "P29", "1990", "vip"),  # Mailchimp refuses the birthday (MM/DD): rejected, with its reason
    ("unsub@example.com", "U", "01/02", "vip"),  # already in the audience, unsubscribed
    ("not-an-email", "X", "01/01", "vip"),  # invalid: never sent
]
BATCH_SUBSCRIBE, BATCHES = "POST /3.0/lists/{list_id}", "POST /3.0/batches"


@pytest.fixture(params=[False, True], ids=["status-less-members-accepted", "status-less-members-refused"])
def guess(request, sandbox):
    """Both values of ``mailchimp_batch_update_requires_status``; the exporter must be right under each."""
    sandbox.configure(behaviour={"mailchimp_batch_update_requires_status": request.param})
    return request.param


@pytest.fixture
def warehouse(tmp_path, airflow_conn):
    db = tmp_path / "mc.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE segment_members (email TEXT, first_name TEXT, birthday TEXT, segment TEXT)")
        conn.executemany("INSERT INTO segment_members VALUES (?, ?, ?, ?)", ROWS)
    airflow_conn("warehouse", conn_type="sqlite", host=str(db))
    return db


def sql(db, statement, params=()):
    with sqlite3.connect(db) as conn:
        return conn.execute(statement, params).fetchall()


def make_spec(**extra) -> ExportSpec:
    raw = {
        "id": "mc_sync", "privacy_acknowledged": True,
        "source": {"conn_id": "warehouse", "table": "segment_members", "segment_column": "segment", "segments": ["vip", "newsletter"]},
        "destination": {"type": "mailchimp", "audience_id": AUD, "new_member_status": "subscribed"},
        "mapping": {"email": "email", "first_name": "first_name", "attributes": {"BIRTHDAY": "birthday"}},
        "limit": {"max_rejected_share": 0.5},
    }
    raw.update(extra)
    return ExportSpec.model_validate(raw)


def run(spec: ExportSpec, destination: MailchimpDestination | None = None):
    source = source_for(spec.source)
    destination = destination or destination_for(spec)
    destination.poll_interval = 0.05  # the sandbox finishes a job at the next request
    state = StateStore.open(spec.state_conn_id, spec.id, destination.target_id)
    try:
        summary = run_export(spec, source, destination, state=state, options=RunOptions(run_id="r"))
    finally:
        source.close()
        state.close()
    assert summary.consistent, summary.as_dict()
    return summary


def counts(sandbox) -> dict[str, int]:
    return {k: v["count"] for k, v in sandbox.state()["requests"]["by_endpoint"].items()}


def writes(sandbox) -> dict[str, int]:
    """Requests that change something, and member look-ups (every run reads the audience and its merge fields)."""
    return {k: n for k, n in counts(sandbox).items() if not k.startswith("GET") or "members/" in k or "batches" in k}


def test_sync_scenario_never_changes_a_status_and_reports_what_mailchimp_did(warehouse, sandbox, guess):
    sandbox.seed_mailchimp_member(AUD, "unsub@example.com", "unsubscribed", {"FNAME": "Old"})
    spec = make_spec()

    first = run(spec)
    assert (first.read, first.invalid, first.sent) == (32, 1, 31)
    assert (first.created, first.updated, first.accepted, first.rejected, first.skipped) == (29, 1, 30, 1, 0)
    (reason,) = first.rejected_reasons
    assert "Your merge fields were invalid" in reason and "@" not in reason
    members = mailchimp_members(sandbox.state(), AUD)
    assert set(members) == {r[0] for r in GOOD} | {"unsub@example.com"}
    assert all(members[r[0]]["status"] == "subscribed" and members[r[0]]["tags"] == ["vip"] for r in GOOD)
    # an export never changes a subscription status: merge fields updated, still unsubscribed, tagged
    assert members["unsub@example.com"]["status"] == "unsubscribed"
    assert members["unsub@example.com"]["merge_fields"]["FNAME"] == "U" and members["unsub@example.com"]["tags"] == ["vip"]
    before = counts(sandbox)
    assert before[BATCH_SUBSCRIBE] == 1 and before[BATCHES] == 1  # one batch: new members, then one upsert job

    # rerun with changed rows: two members renamed, the bad birthday fixed, the unsubscribed member renamed
    sql(warehouse, "UPDATE segment_members SET first_name = 'Renamed' WHERE email IN ('p0@example.com', 'p1@example.com', 'unsub@example.com')")
    sql(warehouse, "UPDATE segment_members SET birthday = '12/24' WHERE email = 'p29@example.com'")
    second = run(spec)
    assert (second.sent, second.created, second.updated, second.rejected, second.unchanged) == (4, 1, 3, 0, 27)
    members = mailchimp_members(sandbox.state(), AUD)
    assert {e: members[e]["merge_fields"]["FNAME"] for e in ("p0@example.com", "p1@example.com", "unsub@example.com")} == dict.fromkeys(
        ("p0@example.com", "p1@example.com", "unsub@example.com"), "Renamed")
    assert members["unsub@example.com"]["status"] == "unsubscribed" and members["p0@example.com"]["status"] == "subscribed"
    assert members["p29@example.com"]["status"] == "subscribed" and members["p29@example.com"]["tags"] == ["vip"]

    # a member leaves; one moves to another segment; nothing else is sent
    sql(warehouse, "DELETE FROM segment_members WHERE email = 'p2@example.com'")
    sql(warehouse, "UPDATE segment_members SET segment = 'newsletter' WHERE email = 'p3@example.com'")
    calls = counts(sandbox)
    third = run(spec)
    assert (third.sent, third.removed, third.tags_added, third.tags_removed) == (0, 1, 1, 2)
    members = mailchimp_members(sandbox.state(), AUD)
    assert members["p2@example.com"]["tags"] == [] and members["p2@example.com"]["status"] == "subscribed"
    assert members["p3@example.com"]["tags"] == ["newsletter"]
    after = counts(sandbox)
    assert after.get(BATCH_SUBSCRIBE) == calls.get(BATCH_SUBSCRIBE) and after.get(BATCHES) == calls.get(BATCHES)

    assert run(spec).sent == 0 and counts(sandbox).get(BATCHES) == after.get(BATCHES)
    assert sql(warehouse, f"SELECT count(*) FROM {STATE_TABLE}") == [(30,)]


def test_updated_keys_come_from_mailchimps_answers(sandbox, guess, airflow_conn):
    """Defect 11: a member already in the audience (here unsubscribed) is reported updated, not created."""
    sandbox.seed_mailchimp_member(AUD, "old@example.com", "unsubscribed")
    spec = make_spec()
    destination = destination_for(spec)
    destination.poll_interval = 0.05
    fragments = [destination.serialize(p) for p in _profiles("new@example.com", "old@example.com")]
    from segment_export.batching import Batch

    result = destination.send(Batch(1, fragments=fragments, keys=["new@example.com", "old@example.com"]))
    assert result.accepted_keys == {"new@example.com", "old@example.com"}
    assert result.updated_keys == {"old@example.com"} and (result.created, result.updated) == (1, 1)
    assert mailchimp_members(sandbox.state(), AUD)["old@example.com"]["status"] == "unsubscribed"


def _profiles(*emails):
    from segment_export.mapping import Profile

    return [Profile(email=e, key=e, first_name="F") for e in emails]


def test_per_operation_errors_become_rejections_and_throttled_operations_are_sent_again(sandbox, monkeypatch):
    sandbox.seed_mailchimp_member(AUD, "a@example.com", "subscribed")
    sandbox.seed_mailchimp_member(AUD, "b@example.com", "cleaned")
    destination = destination_for(make_spec())
    destination.poll_interval = 0.05
    real = destination.hook.batch_results
    calls = []

    def flaky(url):
        results = real(url)
        calls.append(len(results))
        if len(calls) == 1:  # Mailchimp answered one operation 503 the first time
            (hit,) = [r for r in results if r["operation_id"] == subscriber_hash("a@example.com")]
            hit.update(status_code=503, response='{"title":"Service Unavailable","status":503}')
        return results

    monkeypatch.setattr(destination.hook, "batch_results", flaky)
    sandbox.forget_mailchimp_email(AUD, "c@example.com")
    from segment_export.batching import Batch
    from segment_export.mapping import Profile

    profiles = [Profile(email="a@example.com", key="a@example.com", first_name="A"),
                Profile(email="b@example.com", key="b@example.com", attributes={"BIRTHDAY": "13/45"})]
    result = destination.send(Batch(1, fragments=[destination.serialize(p) for p in profiles], keys=[p.key for p in profiles]))
    assert calls == [2, 1]  # the throttled operation alone went out again
    assert result.accepted_keys == result.updated_keys == {"a@example.com"}
    assert result.rejected_keys == {"b@example.com": "Invalid Resource: Your merge fields were invalid. (BIRTHDAY: Please enter a valid date (MM/DD))"}
    assert (result.accepted, sum(result.rejected.values())) == (1, 1)
    assert mailchimp_members(sandbox.state(), AUD)["b@example.com"]["status"] == "cleaned"


def test_a_lost_answer_to_tag_creation_is_retried_safely(warehouse, sandbox):
    """Defect 8: the retry of POST /segments finds the tag its lost first attempt created, and uses it."""
    sandbox.set_faults([{"endpoint": "POST /3.0/lists/{list_id}/segments", "kind": "drop", "phase": "after", "times": 1}])
    summary = run(make_spec())
    (segment,) = next(iter(sandbox.state()["mailchimp"]["accounts"].values()))["audiences"][AUD]["segments"].values()
    assert segment["name"] == "vip" and segment["member_count"] == summary.accepted == summary.tags_added == 30
    statuses = sandbox.state()["requests"]["by_endpoint"]["POST /3.0/lists/{list_id}/segments"]["status"]
    assert statuses == {"599": 1, "400": 1}  # dropped after it was applied, then "already exists"


def test_a_member_gone_from_the_audience_is_added_again_not_retagged_forever(warehouse, sandbox):
    """Mailchimp ignores non-members in tag changes: the exporter finds out, does not count the tag, and forgets
    the profile so that the next run adds it back, tagged."""
    sql(warehouse, "UPDATE segment_members SET birthday = '12/24' WHERE email = 'p29@example.com'")  # no rejected row
    spec = make_spec()
    run(spec)
    audience = sandbox.mailchimp._find_audience(AUD)
    with sandbox.mailchimp.lock:  # deleted in Mailchimp's UI since the last run
        audience.members.pop(subscriber_hash("p3@example.com"))
        for seg in audience.segments.values():
            seg.member_ids.pop(subscriber_hash("p3@example.com"), None)
    sql(warehouse, "UPDATE segment_members SET segment = 'newsletter' WHERE email IN ('p3@example.com', 'p4@example.com')")
    second = run(spec)
    assert (second.sent, second.tags_added) == (0, 1)  # p4 tagged; p3 not counted
    assert "p3@example.com" not in mailchimp_members(sandbox.state(), AUD)
    third = run(spec)
    assert (third.sent, third.created, third.tags_added) == (1, 1, 1)
    members = mailchimp_members(sandbox.state(), AUD)
    assert members["p3@example.com"]["tags"] == ["newsletter"] and members["p3@example.com"]["status"] == "subscribed"
    calls = writes(sandbox)
    fourth = run(spec)
    assert (fourth.sent, fourth.tags_added, fourth.tags_removed) == (0, 0, 0) and writes(sandbox) == calls


def test_a_slow_batch_job_is_polled_with_backoff_and_one_never_finished_fails_the_batch(sandbox):
    from segment_export.batching import Batch
    from segment_export.hooks.base import DestinationError

    sandbox.seed_mailchimp_member(AUD, "old@example.com", "pending")
    destination = destination_for(make_spec())
    destination.poll_interval = 0.05
    fragments = [destination.serialize(p) for p in _profiles("old@example.com")]
    try:
        sandbox.configure(latency={"mailchimp_batch_operations": 0.5})
        result = destination.send(Batch(1, fragments=fragments, keys=["old@example.com"]))
        assert result.updated_keys == {"old@example.com"}
        polls = counts(sandbox)["GET /3.0/batches/{batch_id}"]
        assert 3 <= polls <= 6  # 0.05, 0.1, 0.2, 0.4 s...: short at first, then further apart
        sandbox.configure(latency={"mailchimp_batch_operations": 60.0})
        destination.max_batch_wait = 0.3
        with pytest.raises(DestinationError, match="not finished after"):
            destination.send(Batch(2, fragments=fragments, keys=["old@example.com"]))
    finally:
        sandbox.configure(latency={"mailchimp_batch_operations": 0.0})
    assert mailchimp_members(sandbox.state(), AUD)["old@example.com"]["status"] == "pending"


def test_the_results_archive_is_downloaded_without_the_api_key_and_a_truncated_one_is_retried(sandbox):
    """``response_body_url`` is a download link of its own (pre-signed storage on Mailchimp): the key stays home.
    A download cut short is not a Mailchimp answer to give up on: it is fetched again, like a 5xx."""
    import io
    import json
    import tarfile
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from segment_export.destinations.mailchimp.hook import MailchimpHook

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, results in (("b/1.json", [{"status_code": 200, "operation_id": "x", "response": "{}"}]), ("b/2.json", [])):
            data = json.dumps(results).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    archive, seen = buffer.getvalue(), []

    class Storage(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            seen.append(self.headers.get("Authorization"))
            body = archive[: len(archive) // 2] if len(seen) == 1 else archive  # the first download is cut short
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Storage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        hook = MailchimpHook()
        hook.retry_base_seconds = 0.01
        url = f"http://127.0.0.1:{server.server_port}/b.tar.gz"
        assert hook.batch_results(url) == [{"status_code": 200, "operation_id": "x", "response": "{}"}]
    finally:
        server.shutdown()
    assert seen == [None, None] and hook.retries == 1  # never the key; the cut download fetched once more


@pytest.mark.parametrize("lists_tagged", [True, False])
def test_re_tagging_members_who_have_the_tag_counts_them_whatever_members_added_lists(lists_tagged, segment_db, sandbox):
    """After a lost state every member is sent and tagged again, though it has the tag: whether Mailchimp then
    lists it in ``members_added`` is not documented (switch ``mailchimp_tag_add_lists_already_tagged``)."""
    from test_sync import MAILCHIMP, make_spec as sync_spec, run as sync_run

    sandbox.configure(behaviour={"mailchimp_tag_add_lists_already_tagged": lists_tagged})
    spec = sync_spec(MAILCHIMP)
    first = sync_run(spec)
    state = StateStore.open(spec.state_conn_id, spec.id, AUD)
    state.clear()  # the state is lost: the next run is a first run again
    state.close()
    again = sync_run(spec)
    assert again.sent == first.sent and again.tags_added == first.tags_added  # each tag counted, none failed
    members = mailchimp_members(sandbox.state(), AUD)
    assert len(members) == first.accepted and all(m["tags"] == ["vip"] for m in members.values())
    assert sync_run(spec).sent == 0  # everything remembered again: no tag is retried
