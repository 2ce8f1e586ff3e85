"""segment_export.ui.app: who may see what, through Airflow's own security dependencies, with a stand-in auth
manager and metadata (the real ones are exercised in tests/airflow/test_ui_exports.py): no user, no page; a user
who may not read a DAG sees neither its export nor its runs; only an editor gets one unmasked key."""

from __future__ import annotations

import sqlite3
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

import pytest
from fastapi import HTTPException, Request

from segment_export.spec import load_specs
from segment_export.state import StateStore
from segment_export.ui.views import RunInfo

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 12, 3, 9, 0, tzinfo=timezone.utc)
SUMMARY = {"export_id": "churn_risk_to_klaviyo", "accepted": 2, "rejected": 1, "skipped": 0, "removed": 0, "unchanged": 0, "sent": 3}


class User:
    def __init__(self, name, hidden=(), edit=False):
        self.name, self.hidden, self.edit = name, set(hidden), edit


USERS = {"admin": User("admin", edit=True), "viewer": User("viewer", hidden={"vip_to_klaviyo"})}


class FakeAuthManager:
    def is_authorized_dag(self, *, method, user, access_entity=None, details=None):
        if details is not None and details.id in user.hidden:
            return False
        return method == "GET" or user.edit

    def get_authorized_dag_ids(self, *, user, method="GET"):
        return {d for d in ("vip_to_klaviyo", "churn_risk_to_klaviyo", "newsletter_to_mailchimp")
                if self.is_authorized_dag(method=method, user=user, details=type("D", (), {"id": d})())}


@pytest.fixture
def client(monkeypatch, tmp_path):
    from fastapi.testclient import TestClient

    from airflow.api_fastapi.core_api import security
    from airflow.models.dag import DagModel

    from segment_export.ui import app as ui_app
    from segment_export.ui import metadata

    fake = FakeAuthManager()
    monkeypatch.setattr(security, "get_auth_manager", lambda: fake)
    monkeypatch.setattr(ui_app, "_auth_manager", lambda: fake)
    monkeypatch.setattr(DagModel, "get_team_name", staticmethod(lambda dag_id, **kw: None))
    monkeypatch.setattr("airflow.utils.session.create_session", lambda: nullcontext(None))
    specs, _ = load_specs(ROOT / "dags" / "exports")
    monkeypatch.setattr(metadata, "load_specs", lambda: ({s.id: s for s in specs}, 0))
    monkeypatch.setattr(metadata, "export_dags", lambda session, ids: {d: (None, False) for d in ids})
    run = RunInfo("run1", "success", T0, T0, SUMMARY)
    monkeypatch.setattr(metadata, "recent_runs", lambda session, dag_id, limit=20: [run])
    monkeypatch.setattr(metadata, "one_run", lambda session, dag_id, run_id: run if run_id == "run1" else None)
    state = tmp_path / "state.db"  # the file source's embedded state (churn_risk_to_klaviyo has no SQL connection)
    monkeypatch.setenv("SEGMENT_EXPORT_STATE_DB", str(state))
    store = StateStore(sqlite3.connect(state), "?", "churn_risk_to_klaviyo", "XyZ123", "test")
    store.ensure_tables()
    store.record_outcomes("run1", [("ann@example.com", "created", None), ("bob@example.com", "created", None),
                                   ("cy@example.com", "rejected", "Invalid email address: '<email>'.")])

    async def get_user(request: Request):
        name = request.headers.get("x-user")
        if name not in USERS:
            raise HTTPException(401, "Not authenticated")
        return USERS[name]

    ui_app.app.dependency_overrides[security.get_user] = get_user
    yield lambda user=None: TestClient(ui_app.app, headers={"x-user": user} if user else {})
    ui_app.app.dependency_overrides.clear()


def test_every_route_refuses_a_request_without_a_user(client):
    anonymous = client()
    for path in ("/", "/api/exports", "/dags/churn_risk_to_klaviyo/runs/run1", "/api/dags/churn_risk_to_klaviyo/runs/run1",
                 "/api/dags/churn_risk_to_klaviyo/runs/run1/rows/1/key"):
        assert anonymous.get(path).status_code == 401, path


def test_the_list_shows_only_exports_whose_dag_the_user_may_read(client):
    admin = {e["export_id"] for e in client("admin").get("/api/exports").json()["exports"]}
    viewer = {e["export_id"] for e in client("viewer").get("/api/exports").json()["exports"]}
    assert admin == {"vip_to_klaviyo", "churn_risk_to_klaviyo", "newsletter_to_mailchimp"}
    assert viewer == admin - {"vip_to_klaviyo"}
    page = client("viewer").get("/").text
    assert 'data-export-id="churn_risk_to_klaviyo"' in page and "vip_to_klaviyo" not in page
    (churn,) = [e for e in client("viewer").get("/api/exports").json()["exports"] if e["export_id"] == "churn_risk_to_klaviyo"]
    assert churn["counts"] == {"accepted": 2, "rejected": 1, "skipped": 0, "removed": 0, "unchanged": 0}
    assert churn["destination"] == "Klaviyo" and churn["target"] == "list XyZ123" and churn["schedule"] == "on demand"


def test_a_hidden_dags_runs_are_refused_and_unknown_ones_are_not_found(client):
    assert client("viewer").get("/api/dags/vip_to_klaviyo/runs/run1").status_code == 403
    assert client("viewer").get("/dags/vip_to_klaviyo/runs/run1").status_code == 403
    assert client("admin").get("/api/dags/churn_risk_to_klaviyo/runs/nope").status_code == 404
    assert client("admin").get("/api/dags/not_an_export/runs/run1").status_code == 404
    page = client("admin").get("/dags/not_an_export/runs/run1")  # the run tab, on a DAG that is no export
    assert page.status_code == 404 and "&#39;not_an_export&#39; is not a segment export" in page.text


def test_outcomes_are_masked_and_only_an_editor_unmasks_one_row(client):
    data = client("viewer").get("/api/dags/churn_risk_to_klaviyo/runs/run1").json()
    assert data["outcomes"]["by_action"] == {"created": 2, "rejected": 1} and data["can_edit"] is False
    assert {r["key"] for r in data["outcomes"]["rows"]} == {"***@example.com"}
    assert data["outcomes"]["by_reason"] == [{"action": "rejected", "reason": "Invalid email address: '<email>'.", "count": 1}]
    assert client("viewer").get("/api/dags/churn_risk_to_klaviyo/runs/run1/rows/3/key").status_code == 403
    assert client("viewer").get("/dags/churn_risk_to_klaviyo/runs/run1?reveal=3").status_code == 403
    r = client("admin").get("/api/dags/churn_risk_to_klaviyo/runs/run1/rows/3/key")
    assert r.json() == {"n": 3, "profile_key": "cy@example.com"} and r.headers["cache-control"] == "no-store"
    page = client("admin").get("/dags/churn_risk_to_klaviyo/runs/run1?reveal=3")
    assert '<code class="revealed">cy@example.com</code>' in page.text and "ann@example.com" not in page.text
    assert client("admin").get("/api/dags/churn_risk_to_klaviyo/runs/run1/rows/9/key").status_code == 404
