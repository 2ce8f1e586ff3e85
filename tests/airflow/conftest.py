"""A real Airflow deployment for the end-to-end and browser tests, without Docker: the same shape as
docker-compose.yaml (PostgreSQL metadata database, Redis broker, CeleryExecutor; api-server, scheduler,
dag-processor, Celery worker), started once per pytest session and stopped after it.

- PostgreSQL: a fresh database ``segment_export_e2e_<pid>`` on 127.0.0.1:5432, dropped at the end.
- Redis: database number 9..15 (chosen by pid); tasks go to a queue named after the pid (deleted after), so
  concurrent sessions never take each other's tasks. The same database holds the exports' shared rate budget
  (keys under ``<queue>:budget``, deleted after too), through the connection ``rate_budget``.
- Two Celery workers of two slots each.
- Auth: Airflow's simple auth manager with two users whose passwords the test writes (no FAB needed): ``admin``
  (role admin) and ``analyst`` (role viewer). A test-only subclass (``e2e_auth.E2EAuthManager``) adds one
  DAG-level rule, so that DAG-level authorization is exercised: viewers may not read the DAGs in
  ``E2E_HIDDEN_FROM_VIEWERS`` (the simple auth manager itself grants per role, not per DAG).
- Plugins: the provider's ``airflow.plugins`` entry point (the Segment exports pages); a checkout whose installed
  metadata predates the entry point gets the same plugin through the deployment's plugins folder.
- The export specs are a temporary folder (``SEGMENT_EXPORT_SPECS``); connections are AIRFLOW_CONN_* variables
  pointing at an API sandbox started here; OpenLineage events go to a file.
Each process logs to a file under the deployment's home; on a failure the tail of each is shown.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
AIRFLOW = str(Path(sys.executable).parent / "airflow")
PG = "host=127.0.0.1 port=5432 user=postgres"
ADMIN_USER = "admin"
VIEWER_USER = "analyst"
#: the demo export the viewer may not read (e2e_auth.E2EAuthManager)
HIDDEN_FROM_VIEWERS = "newsletter_to_mailchimp"

E2E_SPECS = """
exports:
  - id: e2e_celery_klaviyo
    name: E2E VIP customers to Klaviyo
    description: The VIP segment to the sandbox list, run by a Celery worker.
    owner: e2e-team
    tags: [e2e, vip]
    privacy_acknowledged: true
    source: {conn_id: warehouse, table: segment_members, segment_column: segment, segments: [vip]}
    destination: {type: klaviyo, list_id: %(list)s}
    mapping: {email: email, first_name: first_name, phone_number: phone, attributes: {tier: tier}}
    limit: {max_profiles: 50000, on_exceed: truncate, order_by: customer_id}
  - id: e2e_celery_mailchimp
    name: E2E newsletter to Mailchimp
    owner: e2e-team
    privacy_acknowledged: true
    source: {conn_id: warehouse, table: segment_members, segment_column: segment, segments: [newsletter]}
    destination: {type: mailchimp, audience_id: %(audience)s, new_member_status: pending}
    mapping: {email: email, first_name: first_name, last_name: last_name}
  - id: e2e_celery_deferrable
    name: E2E newsletter to Klaviyo, waiting on the triggerer
    owner: e2e-team
    privacy_acknowledged: true
    deferrable: true
    source: {conn_id: warehouse, table: segment_members, segment_column: segment, segments: [newsletter]}
    destination: {type: klaviyo, list_id: %(second_list)s}
    mapping: {email: email, first_name: first_name}
    sync: {on_leave: remove}
  - id: e2e_celery_failing
    name: E2E export with a missing column
    owner: e2e-team
    privacy_acknowledged: true
    source: {conn_id: warehouse, table: segment_members}
    destination: {type: klaviyo, list_id: %(list)s}
    mapping: {email: no_such_column}
    alerts: {callback: e2e_alert_sink.record_failure}
  - id: e2e_ui_rejects
    name: E2E addresses Mailchimp refuses
    owner: e2e-team
    privacy_acknowledged: true
    source: {conn_id: warehouse, table: segment_members, segment_column: segment, segments: [ui_rejects]}
    destination: {type: mailchimp, audience_id: %(audience)s, new_member_status: pending}
    mapping: {email: email, first_name: first_name}
    limit: {max_rejected_share: 1.0}
"""

ALERT_SINK = '''
"""Failure callback used by the e2e export with a missing column: appends what it was told to a file."""
import json, os


def record_failure(context):
    ti = context["ti"]
    with open(os.environ["E2E_ALERTS_FILE"], "a") as fh:
        fh.write(json.dumps({"dag_id": ti.dag_id, "task_id": ti.task_id, "run_id": ti.run_id,
                             "exception": str(context.get("exception"))}) + "\\n")
'''


AUTH_MANAGER = '''
"""Test-only: the simple auth manager with one DAG-level rule, so that DAG-level authorization can be tested
without FAB: users of role viewer may not read (or do anything with) the DAGs in E2E_HIDDEN_FROM_VIEWERS."""
import os

from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager


class E2EAuthManager(SimpleAuthManager):
    def is_authorized_dag(self, *, method, user, access_entity=None, details=None):
        hidden = set(filter(None, os.environ.get("E2E_HIDDEN_FROM_VIEWERS", "").split(",")))
        if details is not None and details.id in hidden and (user.role or "").upper() == "VIEWER":
            return False
        return super().is_authorized_dag(method=method, user=user, access_entity=access_entity, details=details)
'''

PLUGIN_SHIM = '''
"""Only for a checkout whose installed metadata has no airflow.plugins entry point yet: the same plugin."""
from segment_export.ui.plugin import SegmentExportsPlugin  # noqa: F401
'''


def _plugin_entry_point_installed() -> bool:
    from importlib.metadata import entry_points

    return any(ep.value.startswith("segment_export.ui.plugin") for ep in entry_points(group="airflow.plugins"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Deployment:
    url: str
    home: Path
    env: dict[str, str] = field(repr=False)
    password: str = field(repr=False)
    sandbox: object
    alerts_file: Path
    lineage_file: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict, repr=False)
    viewer_password: str = field(default="", repr=False)
    viewer_user: str = VIEWER_USER
    hidden_from_viewers: str = HIDDEN_FROM_VIEWERS  # a DAG the viewer may not read
    plugin_source: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    _token: str | None = field(default=None, repr=False)

    # --- REST API, as a user's script would use it ---------------------------------------------------------
    def token(self) -> str:
        if self._token is None:
            self._token = self.token_for(ADMIN_USER, self.password)
        return self._token

    def token_for(self, username: str, password: str) -> str:
        r = requests.post(f"{self.url}/auth/token", json={"username": username, "password": password}, timeout=30)
        r.raise_for_status()
        return r.json()["access_token"]

    def api(self, method: str, path: str, **kwargs) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.token()}", **kwargs.pop("headers", {})}
        return requests.request(method, f"{self.url}/api/v2{path}", headers=headers, timeout=60, **kwargs)

    def wait_for_dag(self, dag_id: str, timeout: float = 180) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.api("GET", f"/dags/{dag_id}")
            if r.status_code == 200:
                return r.json()
            self.check_alive()
            time.sleep(1)
        raise AssertionError(f"DAG {dag_id} not parsed within {timeout}s\n{self.logs_tail()}")

    def trigger(self, dag_id: str, conf: dict | None = None) -> str:
        self.wait_for_dag(dag_id)
        r = self.api("PATCH", f"/dags/{dag_id}", json={"is_paused": False})
        assert r.status_code == 200, r.text
        r = self.api("POST", f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf or {}})
        assert r.status_code == 200, r.text
        return r.json()["dag_run_id"]

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}").json()
            if run["state"] in ("success", "failed"):
                return run
            self.check_alive()
            time.sleep(1)
        raise AssertionError(f"run {dag_id}/{run_id} not finished in {timeout}s\n{self.logs_tail()}")

    def xcom(self, dag_id: str, run_id: str, task_id: str = "export") -> dict:
        r = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value",
                     params={"deserialize": "true"})
        assert r.status_code == 200, r.text
        value = r.json()["value"]
        return json.loads(value) if isinstance(value, str) else value

    def task_log(self, dag_id: str, run_id: str, task_id: str = "export", try_number: int = 1) -> str:
        r = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}",
                     params={"full_content": "true"}, headers={"Accept": "application/json"})
        assert r.status_code == 200, r.text
        content = r.json()["content"]
        if not isinstance(content, list):
            return str(content)
        lines = []
        for entry in content:
            if not isinstance(entry, dict):
                lines.append(str(entry))
                continue
            lines.append(str(entry.get("event", "")))
            for err in entry.get("error_detail") or []:  # a failed task's exception, as the UI shows it
                lines.append(f"{err.get('exc_type')}: {err.get('exc_value')}")
        return "\n".join(lines)

    # --- processes ---------------------------------------------------------------------------------------
    def check_alive(self) -> None:
        dead = {name: p.returncode for name, p in self.procs.items() if p.poll() is not None}
        if dead:
            raise AssertionError(f"Airflow processes exited: {dead}\n{self.logs_tail()}")

    def logs_tail(self, chars: int = 2500) -> str:
        parts = []
        for name in self.procs:
            path = self.home / f"{name}.log"
            text = path.read_text(errors="replace") if path.exists() else ""
            parts.append(f"--- {name} ---\n{text[-chars:]}")
        return "\n".join(parts)


CHROMIUM = "/usr/bin/chromium"
# Chromium as root, headless, with nothing reaching out to the internet (the machine has no route there).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    """Headless Debian chromium driven by Playwright (the browser tests: test_ui_browser.py, test_ui_exports.py)."""
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} missing: .ci/run installs Debian's chromium")
        pytest.skip(f"{CHROMIUM} missing (apt-get install chromium chromium-driver)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _start(dep: Deployment, name: str, args: list[str]) -> None:
    log = open(dep.home / f"{name}.log", "wb")
    dep.procs[name] = subprocess.Popen(
        [AIRFLOW, *args], env=dep.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True, cwd=dep.home,
    )
    log.close()


def _stop(procs: dict[str, subprocess.Popen], timeout: float = 30) -> None:
    """SIGTERM each process group we started, then SIGKILL what is left; every child goes with its group."""
    for p in procs.values():
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout
    for p in procs.values():
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs.values():
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the group may hold children even when the leader is gone
        except ProcessLookupError:
            pass
        if p.poll() is None:
            p.wait(10)


@pytest.fixture(scope="session")
def airflow_deployment(tmp_path_factory):
    psycopg = pytest.importorskip("psycopg")
    redis = pytest.importorskip("redis")
    import segment_data
    from airflow_env import airflow_env
    from budget_exports import (
        BUDGET_AUDIENCES, BUDGET_LIMIT_SHARE, BUDGET_LISTS, BUDGET_PROFILES, BUDGET_SEGMENTS, BUDGET_SPEC,
    )
    from segment_export_sandbox import KLAVIYO_API_KEY, KLAVIYO_LIST_ID, KLAVIYO_SECOND_LIST_ID, MAILCHIMP_AUDIENCE_ID, Sandbox, SandboxConfig
    from segment_export_sandbox.config import AudienceConfig

    started = time.monotonic()
    home = tmp_path_factory.mktemp("airflow-celery")
    db_name = f"segment_export_e2e_{os.getpid()}"
    redis_db = 9 + os.getpid() % 7
    queue = f"segment_export_e2e_{os.getpid()}"
    try:
        admin = psycopg.connect(f"{PG} dbname=postgres", autocommit=True, connect_timeout=5)
        broker = redis.Redis(host="127.0.0.1", port=6379, db=redis_db, socket_connect_timeout=5)
        broker.ping()
    except Exception as exc:  # noqa: BLE001
        if os.environ.get("CI"):
            raise
        pytest.skip(f"PostgreSQL or Redis not reachable: {exc}")
    admin.execute(f'DROP DATABASE IF EXISTS "{db_name}"')
    admin.execute(f'CREATE DATABASE "{db_name}"')

    specs = home / "exports"
    specs.mkdir()
    budget_specs = "".join(BUDGET_SPEC % {"segment": seg, "list": BUDGET_LISTS[seg], "audience": BUDGET_AUDIENCES[seg]}
                           for seg in BUDGET_SEGMENTS)
    (specs / "e2e.yaml").write_text(
        E2E_SPECS % {"list": KLAVIYO_LIST_ID, "second_list": KLAVIYO_SECOND_LIST_ID, "audience": MAILCHIMP_AUDIENCE_ID}
        + budget_specs)
    # The demo's exports too, so the UI looks as a user's would (the browser test's screenshots); not run here.
    (specs / "demo.yaml").write_text((ROOT / "dags" / "exports" / "demo.yaml").read_text())
    pylib = home / "pylib"
    pylib.mkdir()
    (pylib / "e2e_alert_sink.py").write_text(textwrap.dedent(ALERT_SINK))
    (pylib / "e2e_auth.py").write_text(textwrap.dedent(AUTH_MANAGER))
    plugin_source = "entry point"
    if not _plugin_entry_point_installed():
        (home / "plugins").mkdir()
        (home / "plugins" / "segment_export_ui.py").write_text(textwrap.dedent(PLUGIN_SHIM))
        plugin_source = "plugins folder"
    warehouse = segment_data.write_sqlite(home / "segments.db", 1000)
    segment_data.write_sqlite(warehouse, BUDGET_PROFILES, table="budget_members")

    config = SandboxConfig()
    config.mailchimp_accounts[0].audiences += [AudienceConfig(a, f"Budget {s}") for s, a in BUDGET_AUDIENCES.items()]
    sandbox = Sandbox(config).start()
    for segment, list_id in BUDGET_LISTS.items():
        sandbox.add_klaviyo_list(list_id, f"Budget {segment}")
    password = secrets.token_urlsafe(12)
    viewer_password = secrets.token_urlsafe(12)
    (home / "passwords.json").write_text(json.dumps({ADMIN_USER: password, VIEWER_USER: viewer_password}))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    pg_url = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{db_name}"
    env = airflow_env(home, sandbox.url, warehouse)
    env.update({
        "SEGMENT_EXPORT_SPECS": str(specs),
        "PYTHONPATH": os.pathsep.join([str(pylib), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "E2E_ALERTS_FILE": str(home / "alerts.jsonl"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": pg_url,
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:6379/{redis_db}",
        "AIRFLOW__CELERY__RESULT_BACKEND": f"db+postgresql://postgres@127.0.0.1:5432/{db_name}",
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2",
        # The rate budget: every export on both workers shares one budget per API key through this Redis database.
        "AIRFLOW__SEGMENT_EXPORT__RATE_BUDGET_CONN_ID": "rate_budget",
        "AIRFLOW_CONN_RATE_BUDGET": json.dumps({"conn_type": "redis", "host": "127.0.0.1", "port": 6379,
                                                "extra": {"db": redis_db, "key_prefix": f"{queue}:budget"}}),
        "AIRFLOW_CONN_KLAVIYO_BUDGET": json.dumps({"conn_type": "klaviyo", "host": sandbox.url, "password": KLAVIYO_API_KEY,
                                                   "extra": {"rate_limit_share": BUDGET_LIMIT_SHARE}}),
        # A queue of this run's own: two test sessions sharing a Redis database never take each other's tasks.
        "AIRFLOW__OPERATORS__DEFAULT_QUEUE": queue,
        "AIRFLOW__CORE__AUTH_MANAGER": "e2e_auth.E2EAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin,{VIEWER_USER}:viewer",
        "E2E_HIDDEN_FROM_VIEWERS": HIDDEN_FROM_VIEWERS,
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(home / "plugins"),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": url,
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{url}/execution/",
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
        "AIRFLOW__CORE__FERNET_KEY": "",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "5",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
        "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps(
            {"type": "file", "log_file_path": str(home / "openlineage.jsonl"), "append": True}
        ),
        "AIRFLOW__OPENLINEAGE__NAMESPACE": "segment-export-e2e",
    })
    dep = Deployment(url=url, home=home, env=env, password=password, sandbox=sandbox,
                     alerts_file=home / "alerts.jsonl", lineage_file=home / "openlineage.jsonl",
                     viewer_password=viewer_password, plugin_source=plugin_source)
    try:
        t = time.monotonic()
        migrate = subprocess.run([AIRFLOW, "db", "migrate"], env=env, capture_output=True, text=True, timeout=600)
        assert migrate.returncode == 0, migrate.stdout[-3000:] + migrate.stderr[-3000:]
        dep.timings["db migrate"] = time.monotonic() - t
        _start(dep, "api-server", ["api-server", "--port", str(port), "--host", "127.0.0.1"])
        _start(dep, "scheduler", ["scheduler"])
        _start(dep, "dag-processor", ["dag-processor"])
        _start(dep, "triggerer", ["triggerer"])  # deferrable exports wait for their jobs there
        # Two workers (two slots each), as a deployment with several hosts has: the budget tests run four exports
        # at once across them. One host here, so one log server (the task logs are local files either way).
        for name in ("celery-worker", "celery-worker-2"):
            _start(dep, name, ["celery", "worker", "--concurrency", "2", "--queues", queue, "--celery-hostname",
                               f"{name}-{os.getpid()}@%h", "--without-mingle", "--without-gossip",
                               *(["--skip-serve-logs"] if name != "celery-worker" else [])])
        deadline = time.monotonic() + 180
        while True:
            dep.check_alive()
            try:
                if requests.get(f"{url}/api/v2/monitor/health", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"api-server not up in 180s\n{dep.logs_tail()}")
            time.sleep(1)
        dep.timings["ready"] = time.monotonic() - started
        yield dep
    finally:
        t = time.monotonic()
        _stop(dep.procs)
        dep.timings["stop"] = time.monotonic() - t
        sandbox.stop()
        for key in broker.scan_iter(match=f"*{queue}*"):  # this run's queue, its bindings and its rate budget only
            broker.delete(key)
        broker.close()
        # Any connection left by a killed process is gone with it; FORCE covers the rest.
        admin.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
        admin.close()
        print(f"\nAirflow deployment timings: {json.dumps({k: round(v, 1) for k, v in dep.timings.items()})}")
