"""Verify runs against the sandbox: real exports, then the list or audience edited by hand, then drift.

Each test checks what the sandbox holds afterwards, the outcome rows and the state, under every value of the
sandbox switches the listing depends on (page order, which statuses a tag's member list shows by default).
"""

from __future__ import annotations

import sqlite3

import pytest
import segment_data
from sandbox_state import klaviyo_profiles, mailchimp_members
from segment_export_sandbox import KLAVIYO_LIST_ID, MAILCHIMP_AUDIENCE_ID
from test_sync import KLAVIYO, MAILCHIMP, WRITES, run
from test_sync import make_spec as sync_spec

from segment_export.destinations import destination_for
from segment_export.drift import ADDED_OUTSIDE, REMOVED_OUTSIDE, SUPPRESSED, UNSUBSCRIBED
from segment_export.exporter import RunOptions, run_export
from segment_export.sources import source_for
from segment_export.spec import ExportSpec
from segment_export.state import OUTCOMES_TABLE, STATE_TABLE, StateStore
from segment_export.verify import VerifyOptions, export_segments, run_verify

def make_spec(destination, segments=("vip",), **extra) -> ExportSpec:
    """test_sync's spec, as a verify_test export that verifies and repairs unless told otherwise."""
    extra.setdefault("id", "verify_test")
    extra.setdefault("verify", {"repair": True})
    return sync_spec(destination, segments, **extra)


def export(spec: ExportSpec, run_id: str = "r"):
    return run(spec, run_id=run_id)


def verify(spec: ExportSpec, run_id: str = "v", repair: bool = True, dry_run: bool = False):
    destination = destination_for(spec)
    state = StateStore.open(spec.state_conn_id, spec.id, destination.target_id)
    try:
        return run_verify(spec, destination, state, run_id=run_id, repair=repair, dry_run=dry_run)
    finally:
        state.close()


def writes(sandbox) -> dict[str, int]:
    return {k: v["count"] for k, v in sandbox.state()["requests"]["by_endpoint"].items() if k.startswith(WRITES)}


def sql(db, statement, params=()):
    with sqlite3.connect(db) as conn:
        return conn.execute(statement, params).fetchall()


def drift_rows(db, run_id):
    return sorted(sql(db, f"SELECT profile_key, reason FROM {OUTCOMES_TABLE} WHERE run_id = ? AND action = 'drift'", (run_id,)))


def emails(segment: str, n: int = 1000) -> list[str]:
    return [r[1] for r in segment_data.rows(n) if r[-1] == segment]


@pytest.mark.parametrize("order", ["joined", "newest"])
def test_klaviyo_verify_finds_hand_edits_and_repair_puts_back_only_the_removed(segment_db, sandbox, order):
    sandbox.configure(behaviour={"klaviyo_list_profiles_order": order})
    spec = make_spec(KLAVIYO)
    export(spec)
    vip = emails("vip")
    removed, unsubscribed, stranger = vip[0], vip[1], "added.by.hand@example.org"
    sandbox.edit_klaviyo_list(KLAVIYO_LIST_ID, removed, "remove")
    sandbox.edit_klaviyo_list(KLAVIYO_LIST_ID, stranger, "add")
    sandbox.suppress_klaviyo_email(unsubscribed)
    before = writes(sandbox)

    report = verify(spec)
    assert writes(sandbox) == before  # a verify pass changes nothing at the destination
    assert report.held == len(vip) and report.repaired == 1
    assert {k: report.counts[k] for k in (ADDED_OUTSIDE, REMOVED_OUTSIDE, UNSUBSCRIBED, SUPPRESSED)} == {
        ADDED_OUTSIDE: 1, REMOVED_OUTSIDE: 1, UNSUBSCRIBED: 1, SUPPRESSED: 0}
    stranger_id = next(pid for pid, p in sandbox.state()["klaviyo"]["accounts"].popitem()[1]["profiles"].items()
                       if p["email"] == stranger)
    assert drift_rows(segment_db, "v") == sorted([
        (removed, REMOVED_OUTSIDE), (unsubscribed, UNSUBSCRIBED), (f"klaviyo profile {stranger_id}", ADDED_OUTSIDE)])
    assert not sql(segment_db, f"SELECT 1 FROM {STATE_TABLE} WHERE profile_key = ?", (removed,))  # forgotten: sent again

    again = export(spec, "r2")
    assert again.sent == 1 and again.accepted == 1  # only the one removed outside
    held = klaviyo_profiles(sandbox.state(), KLAVIYO_LIST_ID)
    assert removed in held and stranger in held  # put back; the stranger is never removed by an export
    assert held[unsubscribed]["consent"] == "UNSUBSCRIBED"
    after = verify(spec, "v2")
    assert (after.counts[REMOVED_OUTSIDE], after.counts[ADDED_OUTSIDE], after.counts[UNSUBSCRIBED]) == (0, 1, 1)


@pytest.mark.parametrize("include_by_default", [False, True])
def test_mailchimp_verify_reads_the_export_s_tags_and_never_resubscribes(segment_db, sandbox, include_by_default):
    sandbox.configure(behaviour={"mailchimp_segment_members_include_by_default": include_by_default})
    spec = make_spec(MAILCHIMP, segments=("newsletter",))
    export(spec)
    newsletter = emails("newsletter")
    untagged, unsubscribed, bounced = newsletter[0], newsletter[1], newsletter[2]
    stranger, other_tool = "added.by.hand@example.org", "other.tool@example.org"
    sandbox.untag_mailchimp_member(MAILCHIMP_AUDIENCE_ID, untagged, "newsletter")
    sandbox.seed_mailchimp_member(MAILCHIMP_AUDIENCE_ID, unsubscribed, "unsubscribed")
    sandbox.seed_mailchimp_member(MAILCHIMP_AUDIENCE_ID, bounced, "cleaned")
    sandbox.seed_mailchimp_member(MAILCHIMP_AUDIENCE_ID, stranger, "subscribed", tags=["newsletter"])
    sandbox.seed_mailchimp_member(MAILCHIMP_AUDIENCE_ID, other_tool, "subscribed", tags=["someone-else"])

    report = verify(spec)
    assert (report.counts[ADDED_OUTSIDE], report.counts[REMOVED_OUTSIDE], report.counts[UNSUBSCRIBED],
            report.counts[SUPPRESSED]) == (1, 1, 1, 1)  # the other tool's member is not the export's
    from segment_export.destinations.mailchimp.hook import subscriber_hash

    assert drift_rows(segment_db, "v") == sorted([
        (untagged, REMOVED_OUTSIDE), (unsubscribed, UNSUBSCRIBED), (bounced, SUPPRESSED),
        (f"mailchimp member {subscriber_hash(stranger)}", ADDED_OUTSIDE)])

    again = export(spec, "r2")
    assert again.sent == 1 and again.tags_added == 1
    members = mailchimp_members(sandbox.state(), MAILCHIMP_AUDIENCE_ID)
    assert members[untagged]["tags"] == ["newsletter"] and members[untagged]["status"] == "subscribed"
    assert members[unsubscribed]["status"] == "unsubscribed" and members[bounced]["status"] == "cleaned"
    assert members[stranger]["tags"] == ["newsletter"]  # reported, never untagged by the export
    after = verify(spec, "v2")
    assert (after.counts[REMOVED_OUTSIDE], after.counts[UNSUBSCRIBED], after.counts[SUPPRESSED]) == (0, 1, 1)


def test_without_repair_and_in_a_dry_run_the_state_is_untouched(segment_db, sandbox):
    spec = make_spec(KLAVIYO)
    export(spec)
    removed = emails("vip")[0]
    sandbox.edit_klaviyo_list(KLAVIYO_LIST_ID, removed, "remove")
    state_before = sql(segment_db, f"SELECT profile_key, fingerprint FROM {STATE_TABLE} ORDER BY 1")

    dry = verify(spec, "dry", dry_run=True)
    assert dry.counts[REMOVED_OUTSIDE] == 1 and dry.repaired == 0 and not dry.repair
    assert drift_rows(segment_db, "dry") == []  # a dry run records nothing
    plain = verify(spec, "plain", repair=False)
    assert plain.counts[REMOVED_OUTSIDE] == 1 and plain.repaired == 0
    assert drift_rows(segment_db, "plain") == [(removed, REMOVED_OUTSIDE)]
    assert sql(segment_db, f"SELECT profile_key, fingerprint FROM {STATE_TABLE} ORDER BY 1") == state_before
    assert export(spec, "r2").sent == 0  # nothing forgotten, nothing sent again


def test_a_klaviyo_export_with_one_list_per_segment_verifies_each_list(segment_db, sandbox):
    from segment_export_sandbox import KLAVIYO_SECOND_LIST_ID

    spec = make_spec({"type": "klaviyo", "lists": {"vip": KLAVIYO_LIST_ID, "newsletter": KLAVIYO_SECOND_LIST_ID}},
                     segments=("vip", "newsletter"))
    export(spec)
    gone = emails("newsletter")[0]
    sandbox.edit_klaviyo_list(KLAVIYO_SECOND_LIST_ID, gone, "remove")
    report = verify(spec)
    expected = len(set(emails("vip")) | set(emails("newsletter")))
    assert report.held == expected - 1 and report.counts[REMOVED_OUTSIDE] == 1 and report.counts[ADDED_OUTSIDE] == 0


def test_options_follow_the_spec_then_the_trigger_form():
    spec = make_spec(KLAVIYO)
    assert VerifyOptions.for_run(spec, {}) == VerifyOptions(enabled=True, only=False, repair=True)
    assert VerifyOptions.for_run(spec, {"verify": False, "repair": True}) == VerifyOptions()
    plain = make_spec(KLAVIYO, verify=None)
    assert VerifyOptions.for_run(plain, {}) == VerifyOptions()
    assert VerifyOptions.for_run(plain, {"verify_only": True}) == VerifyOptions(enabled=True, only=True)
    assert VerifyOptions.for_run(plain, {"verify": True, "repair": True}).repair is True


def test_the_export_s_segments():
    assert export_segments(make_spec(KLAVIYO, segments=("vip", "winback")), None) == ["vip", "winback"]  # type: ignore[arg-type]
    no_column = ExportSpec.model_validate({
        "id": "whole", "privacy_acknowledged": True, "source": {"conn_id": "w", "table": "t"},
        "destination": KLAVIYO, "mapping": {"email": "email"}})
    assert export_segments(no_column, None) == ["whole"]  # type: ignore[arg-type]


def test_the_dag_documents_drift_and_its_form_defaults_follow_the_spec(tmp_path):
    from segment_export.dag_factory import doc_md, trigger_params

    spec = make_spec(KLAVIYO)
    assert "| Drift | verified after each run, repaired by the next run |" in doc_md(spec)
    params = trigger_params(spec)
    assert (params["verify"].value, params["verify_only"].value, params["repair"].value) == (True, False, True)
    plain = make_spec(KLAVIYO, verify=None)
    assert "| Drift |" not in doc_md(plain) and trigger_params(plain)["verify"].value is False
