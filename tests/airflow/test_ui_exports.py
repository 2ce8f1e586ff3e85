"""The Segment exports pages (segment_export.ui) in the running deployment: the plugin's navigation entry and run
tab in the Airflow UI (headless Chromium), the exports list's counts against each run's XCom summary, a run's
outcomes with Mailchimp's reason for a refused address, and who may see what: no session, no page; a viewer does
not see the export whose DAG they may not read, nor its outcomes, nor any unmasked key.

With SEGMENT_EXPORT_UPDATE_SCREENSHOTS=1 the README's screenshots of the pages (docs/exports.png,
docs/export-run.png) are rewritten from this run.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from pathlib import Path

import pytest
import requests

pytestmark = [pytest.mark.airflow, pytest.mark.postgres]

DOCS = Path(__file__).resolve().parents[2] / "docs"
HIDDEN_FROM_VIEWERS = "newsletter_to_mailchimp"  # conftest.HIDDEN_FROM_VIEWERS (checked below)
DEMO_EXPORTS = ("vip_to_klaviyo", HIDDEN_FROM_VIEWERS)
REJECTS = "e2e_ui_rejects"
# Addresses the exporter's own check lets through (any non-ASCII local part is a valid address) and Mailchimp
# refuses: the sandbox, like Mailchimp, takes ASCII local parts only ("looks fake or invalid").
REFUSED = ["jürgen.ui@example.com", "zoë.ui@example.com"]
GOOD = "good.ui@example.com"


def _wait_idle(dep, dag_id: str, timeout: float = 300) -> None:
    """Until the DAG has no queued or running run (the scheduler starts a scheduled run on unpausing)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = dep.api("GET", f"/dags/{dag_id}/dagRuns", params={"state": ["queued", "running"]}).json()["dag_runs"]
        if not runs:
            return
        dep.check_alive()
        time.sleep(1)
    raise AssertionError(f"{dag_id} still has runs in progress\n{dep.logs_tail()}")


@pytest.fixture(scope="module")
def runs(airflow_deployment):
    """The demo's two warehouse exports and the refusing one, each run to completion."""
    dep = airflow_deployment
    with sqlite3.connect(dep.home / "segments.db") as conn:
        conn.executemany("INSERT INTO segment_members (customer_id, email, first_name, segment) VALUES (?, ?, ?, 'ui_rejects')",
                         [(900001 + i, email, "UI") for i, email in enumerate([GOOD, *REFUSED])])
    started = {dag_id: dep.trigger(dag_id) for dag_id in (*DEMO_EXPORTS, REJECTS)}
    for dag_id, run_id in started.items():
        assert dep.wait_for_run(dag_id, run_id)["state"] == "success", f"{dag_id}\n{dep.logs_tail()}"
    for dag_id in started:
        _wait_idle(dep, dag_id)
    return started


def _page_api(dep, path: str, token: str | None = None, **kw) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.get(f"{dep.url}/segment-exports{path}", headers=headers, timeout=60, **kw)


def test_json_endpoints_refuse_without_a_session_and_follow_dag_level_authorization(airflow_deployment, runs):
    dep = airflow_deployment
    print(f"plugin loaded through the {dep.plugin_source}")
    run_id = runs[REJECTS]
    for path in ("/api/exports", f"/api/dags/{REJECTS}/runs/{run_id}", "/", f"/dags/{REJECTS}/runs/{run_id}",
                 f"/api/dags/{REJECTS}/runs/{run_id}/rows/1/key"):
        r = _page_api(dep, path)
        assert r.status_code == 401, (path, r.status_code, r.text[:200])
        assert _page_api(dep, path, token="not-a-token").status_code in (401, 403), path

    admin = dep.token()
    assert dep.hidden_from_viewers == HIDDEN_FROM_VIEWERS
    viewer = dep.token_for(dep.viewer_user, dep.viewer_password)
    seen_by_admin = {e["export_id"] for e in _page_api(dep, "/api/exports", admin).json()["exports"]}
    seen_by_viewer = {e["export_id"] for e in _page_api(dep, "/api/exports", viewer).json()["exports"]}
    assert {*DEMO_EXPORTS, REJECTS} <= seen_by_admin
    assert HIDDEN_FROM_VIEWERS not in seen_by_viewer and {"vip_to_klaviyo", REJECTS} <= seen_by_viewer
    # Airflow's own API agrees: the viewer may not read that DAG at all
    r = requests.get(f"{dep.url}/api/v2/dags/{HIDDEN_FROM_VIEWERS}", headers={"Authorization": f"Bearer {viewer}"}, timeout=30)
    assert r.status_code == 403

    hidden_run = runs[HIDDEN_FROM_VIEWERS]
    assert _page_api(dep, f"/api/dags/{HIDDEN_FROM_VIEWERS}/runs/{hidden_run}", viewer).status_code == 403
    assert _page_api(dep, f"/dags/{HIDDEN_FROM_VIEWERS}/runs/{hidden_run}", viewer).status_code == 403
    assert _page_api(dep, f"/api/dags/{HIDDEN_FROM_VIEWERS}/runs/{hidden_run}", admin).status_code == 200

    # Keys are masked for everyone in lists; the viewer (no edit right) cannot unmask one, the admin can.
    data = _page_api(dep, f"/api/dags/{REJECTS}/runs/{run_id}", viewer, params={"action": "rejected"}).json()
    assert data["can_edit"] is False and data["outcomes"]["keys_masked"]
    rows = data["outcomes"]["rows"]
    assert len(rows) == len(REFUSED) and all(r["key"] == "***@example.com" for r in rows)
    assert all("looks fake or invalid" in r["reason"] for r in rows)
    assert not any(email in _page_api(dep, f"/api/dags/{REJECTS}/runs/{run_id}", viewer).text for email in [GOOD, *REFUSED])
    n = rows[0]["n"]
    assert _page_api(dep, f"/api/dags/{REJECTS}/runs/{run_id}/rows/{n}/key", viewer).status_code == 403
    assert _page_api(dep, f"/dags/{REJECTS}/runs/{run_id}", viewer, params={"reveal": n}).status_code == 403
    # a viewer's search does not look into keys (it would tell whether an address was in the run)
    assert _page_api(dep, f"/api/dags/{REJECTS}/runs/{run_id}", viewer, params={"q": "zoë"}).json()["outcomes"]["total"] == 0
    r = _page_api(dep, f"/api/dags/{REJECTS}/runs/{run_id}/rows/{n}/key", admin)
    assert r.status_code == 200 and r.json()["profile_key"] in REFUSED and r.headers["cache-control"] == "no-store"
    # ... and the unmasked key is in no log of the deployment
    for log in dep.home.glob("*.log"):
        assert r.json()["profile_key"] not in log.read_text(errors="replace"), log.name


def test_exports_page_in_the_airflow_ui_shows_counts_runs_and_outcomes(airflow_deployment, runs, browser, tmp_path):
    from playwright.sync_api import expect

    dep = airflow_deployment
    exports = {e["export_id"]: e for e in _page_api(dep, "/api/exports", dep.token()).json()["exports"]}
    expected = {}
    for dag_id in (*DEMO_EXPORTS, REJECTS):
        export = exports[dag_id]
        summary = dep.xcom(dag_id, export["counts_run_id"])  # the newest run with a summary
        expected[dag_id] = {k: summary[k] for k in ("accepted", "rejected", "skipped", "removed", "unchanged")}
        assert export["counts"] == expected[dag_id], dag_id
    assert expected[REJECTS]["rejected"] == len(REFUSED) and expected[REJECTS]["accepted"] == 1

    page = browser.new_page(viewport={"width": 1500, "height": 950})
    page.set_default_timeout(30_000)
    page.goto(dep.url)
    page.get_by_label("Username").fill("admin")
    page.get_by_label("Password").fill(dep.password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(lambda u: "/auth/login" not in u)

    # The navigation entry opens the page inside the UI.
    page.get_by_role("link", name="Segment exports").first.click()
    page.wait_for_url(lambda u: "/plugin/segment-exports" in u)
    frame = page.frame_locator("iframe")
    table = frame.locator("#exports")
    expect(table).to_be_visible()
    for dag_id, counts in expected.items():
        row = table.locator(f'tr[data-export-id="{dag_id}"]')
        expect(row).to_have_count(1)
        for name, value in counts.items():
            expect(row.locator(f'td[data-count="{name}"]')).to_have_text(f"{value:,}")
        expect(row.locator("svg.chart")).to_have_count(1)
    expect(table.locator('tr[data-export-id="vip_to_klaviyo"]')).to_contain_text("Klaviyo")
    expect(table.locator('tr[data-export-id="vip_to_klaviyo"]')).to_contain_text("@daily")
    page.wait_for_load_state("networkidle")
    shot = tmp_path / "exports.png"
    page.screenshot(path=str(shot))

    # One click on the run: its outcomes, by action and by reason, the refused rows with Mailchimp's message.
    table.locator(f'tr[data-export-id="{REJECTS}"] a.run-link').click()
    expect(frame.locator("#by-action")).to_contain_text("rejected")
    expect(frame.locator("#by-reason")).to_contain_text("looks fake or invalid, please enter a real email address")
    frame.get_by_label("Search rows").fill("fake")
    frame.get_by_role("button", name="Search").click()
    rejected = frame.locator('#rows tr[data-action="rejected"]')
    expect(rejected).to_have_count(len(REFUSED))
    expect(rejected.first).to_contain_text("looks fake or invalid")
    expect(rejected.first).to_contain_text("***@example.com")
    expect(frame.locator("#airflow-run")).to_have_attribute("href", f"/dags/{REJECTS}/runs/{runs[REJECTS]}".replace(":", "%3A").replace("+", "%2B"))
    body = frame.locator("body").inner_text()
    assert not any(email in body for email in REFUSED)
    # the admin may edit the DAG: "show" reveals that row's key
    rejected.first.locator("a.reveal").click()
    expect(frame.locator("code.revealed")).to_have_count(1)
    assert frame.locator("code.revealed").inner_text() in REFUSED
    page.wait_for_load_state("networkidle")
    run_shot = tmp_path / "export-run.png"

    # The run's tab on the DAG run page shows the same.
    page.goto(f"{dep.url}/dags/{REJECTS}/runs/{runs[REJECTS]}/plugin/segment-export-run")
    expect(page.get_by_text("Export outcomes").first).to_be_visible()
    frame = page.frame_locator("iframe")
    expect(frame.locator("#by-reason")).to_contain_text("looks fake or invalid")
    page.wait_for_load_state("networkidle")
    page.screenshot(path=str(run_shot))

    if os.environ.get("SEGMENT_EXPORT_UPDATE_SCREENSHOTS") == "1":
        DOCS.mkdir(exist_ok=True)
        shutil.copyfile(shot, DOCS / "exports.png")
        shutil.copyfile(run_shot, DOCS / "export-run.png")


def test_a_dry_runs_page_shows_its_plan_and_masked_example_payloads(airflow_deployment, runs):
    dep = airflow_deployment
    run_id = dep.trigger("vip_to_klaviyo", {"dry_run": True, "full_resync": True})
    assert dep.wait_for_run("vip_to_klaviyo", run_id)["state"] == "success", dep.logs_tail()
    summary = dep.xcom("vip_to_klaviyo", run_id)
    data = _page_api(dep, f"/api/dags/vip_to_klaviyo/runs/{run_id}", dep.token()).json()
    assert data["run"]["dry_run"] and data["summary"]["planned"] == summary["planned"] > 0
    assert data["summary"]["examples"] and data["outcomes"]["total"] == 0  # nothing was sent, nothing recorded
    page = _page_api(dep, f"/dags/vip_to_klaviyo/runs/{run_id}", dep.token()).text
    assert "Plan (dry run: nothing was sent)" in page and f"{summary['planned']:,}" in page
    assert "***@example.com" in page and ".1@example.com" not in page  # example payloads, masked
