"""Drift through real DAG runs (`airflow dags test`): the list or audience edited by hand, a verify run finds it,
the repair puts back what the export owns on the next run, and nobody who unsubscribed is subscribed again.

Checked by what the sandbox holds, the task's XCom summary and the outcome rows in the state database.
"""

from __future__ import annotations

import sqlite3

import pytest
import segment_data
from airflow_env import last_export_summary
from sandbox_state import klaviyo_profiles, mailchimp_members
from segment_export_sandbox import KLAVIYO_LIST_ID, MAILCHIMP_AUDIENCE_ID
from test_dag_factory import airflow_home, dags_test  # noqa: F401 - the module's Airflow home fixture

pytestmark = pytest.mark.airflow

SPECS = """
exports:
  - id: drift_klaviyo
    privacy_acknowledged: true
    source: {conn_id: warehouse, query: "SELECT *, 1 AS opted_in FROM segment_members", segment_column: segment, segments: [vip]}
    destination: {type: klaviyo, list_id: %(list)s, subscribe: true}
    mapping: {email: email, first_name: first_name, consent: opted_in}
    verify: {repair: true}
  - id: drift_mailchimp
    privacy_acknowledged: true
    source: {conn_id: warehouse, table: segment_members, segment_column: segment, segments: [newsletter]}
    destination: {type: mailchimp, audience_id: %(audience)s, new_member_status: subscribed}
    mapping: {email: email, first_name: first_name}
""" % {"list": KLAVIYO_LIST_ID, "audience": MAILCHIMP_AUDIENCE_ID}


@pytest.fixture
def specs_dir(tmp_path):
    folder = tmp_path / "exports"
    folder.mkdir()
    (folder / "drift.yaml").write_text(SPECS)
    return folder


def drift_rows(db, run_id_like: str = "%") -> list[tuple[str, str]]:
    with sqlite3.connect(db) as conn:
        return sorted(conn.execute(
            "SELECT profile_key, reason FROM segment_export_outcomes WHERE action = 'drift' AND run_id LIKE ?",
            (run_id_like,)).fetchall())


def writes(sandbox) -> dict[str, int]:
    return {k: v["count"] for k, v in sandbox.state()["requests"]["by_endpoint"].items() if not k.startswith("GET ")}


def test_klaviyo_verify_in_the_spec_finds_hand_edits_and_repairs_without_resubscribing(airflow_home, sandbox, segment_db, specs_dir):
    def run_ok(conf=None):
        result = dags_test(airflow_home, sandbox, segment_db, specs_dir, "drift_klaviyo", conf)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        output = result.stdout + result.stderr
        assert "@example.com" not in output  # no address in the task log, drift included
        return last_export_summary(airflow_home, "drift_klaviyo")

    vip = [r[1] for r in segment_data.rows(1000) if r[-1] == "vip"]
    first = run_ok()
    assert first["accepted"] == len(vip) and first["subscribed"] == len(vip)
    assert first["drift"] == {"held": len(vip), "added_outside": 0, "removed_outside": 0, "unsubscribed": 0,
                              "suppressed": 0, "repair": True, "repaired": 0}

    removed, unsubscribed, gone_and_unsubscribed = vip[0], vip[1], vip[2]
    stranger = "added.by.hand@example.org"
    sandbox.edit_klaviyo_list(KLAVIYO_LIST_ID, stranger, "add")
    sandbox.edit_klaviyo_list(KLAVIYO_LIST_ID, removed, "remove")
    sandbox.suppress_klaviyo_email(unsubscribed)
    sandbox.suppress_klaviyo_email(gone_and_unsubscribed)  # unsubscribed, then taken off the list
    sandbox.edit_klaviyo_list(KLAVIYO_LIST_ID, gone_and_unsubscribed, "remove")

    second = run_ok()  # nothing changed in the warehouse: sends nothing, then verifies
    assert second["sent"] == 0
    assert (second["drift"]["added_outside"], second["drift"]["removed_outside"], second["drift"]["unsubscribed"],
            second["drift"]["repaired"]) == (1, 2, 1, 2)
    keys = dict(drift_rows(segment_db))
    assert keys[removed] == keys[gone_and_unsubscribed] == "removed_outside" and keys[unsubscribed] == "unsubscribed"
    assert [k for k, kind in keys.items() if kind == "added_outside"][0].startswith("klaviyo profile ")
    assert stranger not in keys  # the outcomes never hold an address the segment does not have

    third = run_ok()  # the repair: the two removed outside go out again
    assert third["sent"] == 2 and third["accepted"] == 1 and third["skipped"] == 1  # the unsubscribed one: skipped
    held = klaviyo_profiles(sandbox.state(), KLAVIYO_LIST_ID)
    assert removed in held and gone_and_unsubscribed in held and stranger in held
    assert held[removed]["consent"] == "SUBSCRIBED"
    assert held[unsubscribed]["consent"] == held[gone_and_unsubscribed]["consent"] == "UNSUBSCRIBED"  # never re-subscribed
    assert held[unsubscribed]["suppressed"] and held[gone_and_unsubscribed]["suppressed"]
    assert third["drift"]["removed_outside"] == 0 and third["drift"]["unsubscribed"] == 2


def test_mailchimp_verify_only_from_the_trigger_form_then_the_next_run_puts_back_the_untagged(airflow_home, sandbox, segment_db, specs_dir):
    def run_ok(conf=None):
        result = dags_test(airflow_home, sandbox, segment_db, specs_dir, "drift_mailchimp", conf)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return last_export_summary(airflow_home, "drift_mailchimp")

    newsletter = [r[1] for r in segment_data.rows(1000) if r[-1] == "newsletter"]
    first = run_ok()
    assert first["created"] == len(newsletter) and first["drift"] is None  # no verify unless asked

    untagged, unsubscribed, stranger = newsletter[0], newsletter[1], "added.by.hand@example.org"
    sandbox.untag_mailchimp_member(MAILCHIMP_AUDIENCE_ID, untagged, "newsletter")
    sandbox.seed_mailchimp_member(MAILCHIMP_AUDIENCE_ID, unsubscribed, "unsubscribed")
    sandbox.seed_mailchimp_member(MAILCHIMP_AUDIENCE_ID, stranger, "subscribed", tags=["newsletter"])
    before = writes(sandbox)

    check = run_ok({"verify_only": True, "repair": True})
    assert writes(sandbox) == before  # read-only: nothing sent, nothing tagged
    assert check["verify_only"] and check["read"] == check["sent"] == 0
    assert (check["drift"]["held"], check["drift"]["added_outside"], check["drift"]["removed_outside"],
            check["drift"]["unsubscribed"], check["drift"]["repaired"]) == (len(newsletter), 1, 1, 1, 1)
    assert {k: v for k, v in drift_rows(segment_db) if v != "added_outside"} == {
        untagged: "removed_outside", unsubscribed: "unsubscribed"}

    again = run_ok()  # the next run sends the untagged member again: upserted (status untouched), tagged
    assert (again["sent"], again["updated"], again["tags_added"]) == (1, 1, 1)
    members = mailchimp_members(sandbox.state(), MAILCHIMP_AUDIENCE_ID)
    assert members[untagged]["tags"] == ["newsletter"] and members[untagged]["status"] == "subscribed"
    assert members[unsubscribed]["status"] == "unsubscribed"  # reported, never re-subscribed
    assert members[stranger]["tags"] == ["newsletter"]  # not the export's: left alone

    after = run_ok({"verify": True})
    assert (after["drift"]["removed_outside"], after["drift"]["unsubscribed"], after["drift"]["added_outside"]) == (0, 1, 1)
    assert after["drift"]["repair"] is False and after["drift"]["repaired"] == 0
