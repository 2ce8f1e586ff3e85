"""segment_export.ui.views: what the pages show, from plain runs and summaries."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

from segment_export.ui.views import (
    ExportInfo,
    ExportRow,
    OutcomeCounts,
    OutcomeRow,
    RunInfo,
    chart_bars,
    describe_schedule,
    format_duration,
    mask_key,
    rejection_alert,
    summary_value,
)

T0 = datetime(2026, 12, 3, 9, 0, tzinfo=timezone.utc)
EXPORT = ExportInfo("vip", "VIP", "Klaviyo", "list Y6nRLr", "@daily")


def summary(**counts):
    base = {"export_id": "vip", "sent": 0, "accepted": 0, "rejected": 0, "skipped": 0, "removed": 0, "unchanged": 0}
    return {**base, **counts}


def run(run_id, state="success", **counts):
    return RunInfo(run_id, state, T0, T0 + timedelta(seconds=75), summary(**counts) if state == "success" else None)


def test_the_list_shows_the_newest_runs_state_and_the_newest_summarys_counts():
    row = ExportRow(EXPORT, [run("r3", "failed"), run("r2", sent=10, accepted=8, rejected=2, unchanged=90), run("r1", accepted=100)])
    assert row.last.run_id == "r3" and row.last.state == "failed"
    assert row.counts_run.run_id == "r2"  # a failed run returns no summary: the one before it has the counts
    assert row.last_counts == {"accepted": 8, "rejected": 2, "skipped": 0, "removed": 0, "unchanged": 90}
    assert row.last.duration_s == 75 and format_duration(75) == "1 min 15 s" and format_duration(3.21) == "3.2 s"


def test_an_export_never_run_has_no_counts():
    row = ExportRow(EXPORT, [])
    assert row.last is None and row.last_counts == dict.fromkeys(("accepted", "rejected", "skipped", "removed", "unchanged"))
    assert chart_bars([]) == []


def test_xcom_values_as_airflow_stores_them():
    value = summary(accepted=3)
    assert summary_value(value) == value
    assert summary_value(json.dumps(value)) == value
    assert summary_value(json.dumps(json.dumps(value))) == value  # a JSON string of JSON
    assert summary_value("not json") is None and summary_value({"other": 1}) is None and summary_value(None) is None


def test_profile_keys_are_masked_to_their_domain_and_row_numbers_stay():
    assert mask_key("anna.smith.3@example.com") == "***@example.com"
    assert mask_key("row 17") == "row 17"
    assert mask_key("no-at-sign") == "***"
    masked = OutcomeRow(4, "bob@shop.example", "rejected", "bad").masked()
    assert masked == OutcomeRow(4, "***@shop.example", "rejected", "bad")


def test_outcome_counts_by_action_in_the_documented_order_and_reasons_most_first():
    counts = OutcomeCounts.from_groups([("rejected", "b", 2), ("created", None, 50), ("rejected", "a", 7), ("invalid", "email", 1),
                                        ("updated", None, 3)])
    assert list(counts.by_action) == ["created", "updated", "rejected", "invalid"]
    assert counts.by_action["rejected"] == 9 and counts.total == 63
    assert counts.by_reason == [("rejected", "a", 7), ("rejected", "b", 2), ("invalid", "email", 1)]


def test_chart_bars_are_the_last_runs_oldest_first():
    runs = [run(f"r{i}", accepted=i, rejected=i % 2) for i in range(30, 0, -1)]  # newest first
    bars = chart_bars(runs, limit=20)
    assert [b.run_id for b in bars] == [f"r{i}" for i in range(11, 31)]
    assert bars[-1].counts == {"accepted": 30, "rejected": 0, "skipped": 0, "removed": 0}
    failed = chart_bars([run("x", "failed")])[0]
    assert failed.failed and failed.counts == {"accepted": 0, "rejected": 0, "skipped": 0, "removed": 0}


def test_a_spike_of_rejections_or_a_drop_of_accepted_stands_out():
    steady = [run(f"r{i}", read=1000, sent=100, accepted=100, rejected=1) for i in range(5)]
    assert rejection_alert(steady) is None
    assert "40 rejected" in rejection_alert([run("new", read=1000, sent=100, accepted=60, rejected=40), *steady])
    assert rejection_alert([run("rerun", read=1000, sent=10, accepted=10), *steady]) is None  # the sync, not a drop
    assert "fell to 300 rows (from 1,000)" in rejection_alert([run("new", read=300, sent=10, accepted=10), *steady])
    assert rejection_alert([run("only", rejected=5)]) is None  # nothing to compare with
    # a warehouse diff reads only the changed rows: the segment's size is segment_rows
    diffed = run("diffed", read=12, segment_rows=1000, sent=10, accepted=10)
    assert rejection_alert([diffed, *steady]) is None
    assert "fell to 300 rows" in rejection_alert([run("new", read=3, segment_rows=300, sent=1, accepted=1), diffed, *steady])


def test_schedule_as_the_spec_says_it():
    assert describe_schedule("@daily") == "@daily"
    assert describe_schedule(None) == "on demand"
    assert describe_schedule(None, on_source_asset=True) == "on its source asset"
