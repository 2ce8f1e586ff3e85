"""segment_export.ui.render: the pages' HTML and SVG (escaped, no script, no outside URL)."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

from segment_export.ui import render
from segment_export.ui.sections import Section
from segment_export.ui.views import ExportInfo, ExportRow, OutcomeCounts, OutcomeRow, RunInfo

T0 = datetime(2026, 12, 3, 9, 0, tzinfo=timezone.utc)
EXPORT = ExportInfo("vip", "VIP <b>customers</b>", "Klaviyo", "list Y6nRLr", "@daily")


def _run(run_id="manual__2026-12-03T09:00:00+00:00", **summary):
    base = {"export_id": "vip", "accepted": 1200, "rejected": 3, "skipped": 0, "removed": 2, "unchanged": 10, "sent": 1203}
    return RunInfo(run_id, "success", T0, T0 + timedelta(seconds=5), {**base, **summary})


def _no_outside_world(html: str) -> None:
    assert "<script" not in html.lower()
    assert not re.search(r'(src|href)="(https?:)?//', html)  # nothing from a CDN or another host


def test_the_list_escapes_spec_values_and_shows_counts_and_a_linked_chart():
    html = render.render_list([ExportRow(EXPORT, [_run(), _run("scheduled__1", accepted=5, rejected=0)])])
    assert "VIP &lt;b&gt;customers&lt;/b&gt;" in html and "<b>customers</b>" not in html
    assert re.search(r'data-count="accepted">1,200<', html) and re.search(r'data-count="rejected">3<', html)
    assert 'href="dags/vip/runs/manual__2026-12-03T09%3A00%3A00%2B00%3A00"' in html  # relative, quoted
    assert html.count("<rect") >= 4 and "<title>" in html
    _no_outside_world(html)


def test_a_run_page_shows_summary_reasons_rows_and_links_to_airflow():
    counts = OutcomeCounts.from_groups([("created", None, 1200), ("rejected", "<email> is <i>bad</i>", 3)])
    html = render.render_run(
        export=EXPORT, run=_run(), summary=_run().summary, can_edit=False, query="", selected_action="", offset=0,
        limit=100, counts=counts, rows=[OutcomeRow(1, "a@example.com", "rejected", "<email> is <i>bad</i>").masked()],
        total=1, unavailable=None, revealed=None, airflow_run_href="/dags/vip/runs/r", task_log_href="/dags/vip/runs/r/tasks/export",
        back_href="../../../", show_back=True, sections=[Section("Drift", rows=[("field", "rows"), ("tier", "<3>")])],
    )
    assert "&lt;email&gt; is &lt;i&gt;bad&lt;/i&gt;" in html and "<i>bad</i>" not in html
    assert "a@example.com" not in html and "***@example.com" in html
    assert 'class="reveal"' not in html  # no "show" without the right to edit
    assert 'target="_top" href="/dags/vip/runs/r/tasks/export"' in html
    assert "<th>field</th>" in html and "<td>&lt;3&gt;</td>" in html
    _no_outside_world(html)


def test_a_dry_runs_plan_and_examples():
    summary = {"export_id": "vip", "dry_run": True, "planned": 40, "unchanged": 2, "removed": 1, "examples": [{"email": "***@example.com"}]}
    run = RunInfo("r", "success", T0, T0, summary)
    html = render.render_run(export=EXPORT, run=run, summary=summary, can_edit=True, query="", selected_action="", offset=0,
                             limit=100, counts=OutcomeCounts(), rows=[], total=0, unavailable=None, revealed=None,
                             airflow_run_href="/a", task_log_href="/b", back_href="../", show_back=True)
    assert "Plan (dry run: nothing was sent)" in html and "would send" in html and "&#34;***@example.com&#34;" in html


def test_paging_and_filter_links_keep_the_search():
    html = render.render_run(export=EXPORT, run=_run(), summary=None, can_edit=True, query="fake", selected_action="rejected",
                             offset=100, limit=100, counts=OutcomeCounts.from_groups([("rejected", "x", 250)]),
                             rows=[OutcomeRow(101, "row 101", "rejected", "x")], total=250, unavailable=None,
                             revealed=None, airflow_run_href="/a", task_log_href="/b", back_href="../", show_back=True)
    assert 'href="?q=fake&amp;action=rejected">' in html  # previous: back to offset 0
    assert 'href="?q=fake&amp;action=rejected&amp;offset=200">' in html
    assert 'href="?q=fake&amp;action=rejected&amp;offset=100&amp;reveal=101"' in html
    assert "returned no summary" in html
