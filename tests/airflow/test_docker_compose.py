"""docker-compose.yaml and Dockerfile: the official Airflow 3 shape (CeleryExecutor, PostgreSQL, Redis,
api-server, scheduler, dag-processor, triggerer, worker, init) with this package in the image and the sandbox
behind a profile. No Docker engine runs here: the file is checked as data, and by `docker compose config`
where the Compose plugin is installed."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yaml"
AIRFLOW_SERVICES = {
    "airflow-apiserver": "api-server",
    "airflow-scheduler": "scheduler",
    "airflow-dag-processor": "dag-processor",
    "airflow-triggerer": "triggerer",
    "airflow-worker": "celery worker",
}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def pinned(name: str) -> str:
    (line,) = [l for l in (ROOT / "requirements.txt").read_text().splitlines() if l.startswith(f"{name}==")]
    return line.split("==", 1)[1]


def test_services_follow_the_official_airflow_3_layout(compose):
    services = compose["services"]
    assert set(services) >= {"postgres", "redis", "airflow-init", *AIRFLOW_SERVICES}
    for name, command in AIRFLOW_SERVICES.items():
        svc = services[name]
        assert svc["command"] == command, name
        assert svc["build"] == "." and svc["image"].startswith("${AIRFLOW_IMAGE_NAME:-segment-export-airflow")
        assert svc["healthcheck"]["test"], name
        assert svc["depends_on"]["airflow-init"] == {"condition": "service_completed_successfully"}
        assert svc["depends_on"]["postgres"]["condition"] == svc["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["airflow-apiserver"]["ports"] == ["8080:8080"]
    assert services["airflow-worker"]["environment"]["DUMB_INIT_SETSID"] == "0"
    init_env = services["airflow-init"]["environment"]
    assert init_env["_AIRFLOW_DB_MIGRATE"] == "true" and init_env["_AIRFLOW_WWW_USER_CREATE"] == "true"


def test_common_environment_is_a_celery_deployment_of_this_package(compose):
    env = compose["x-airflow-common"]["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://") and "@postgres/" in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://") and "@redis:6379" in env["AIRFLOW__CELERY__BROKER_URL"]
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
    assert env["AIRFLOW__CORE__TEST_CONNECTION"] == "Enabled"
    assert env["SEGMENT_EXPORT_SPECS"] == "/opt/airflow/dags/exports"
    # the exports share one rate budget per API key through the broker's Redis (another database number)
    assert env["AIRFLOW__SEGMENT_EXPORT__RATE_BUDGET_CONN_ID"] == "rate_budget"
    assert env["AIRFLOW_CONN_RATE_BUDGET"] == "redis://redis:6379/1"
    assert "FabAuthManager" in env["AIRFLOW__CORE__AUTH_MANAGER"]  # per-export access_control takes effect
    assert "${AIRFLOW_PROJ_DIR:-.}/dags:/opt/airflow/dags" in compose["x-airflow-common"]["volumes"]
    assert not any("KEY" in k and v and not str(v).startswith("${") for k, v in env.items())  # no baked-in API keys


def test_sandbox_is_optional_behind_a_profile(compose):
    sandbox = compose["services"]["segment-export-sandbox"]
    assert sandbox["profiles"] == ["sandbox"]
    assert sandbox["entrypoint"] == ["segment-export-sandbox"] and "0.0.0.0" in sandbox["command"]
    assert all("profiles" not in compose["services"][s] for s in ("postgres", "redis", "airflow-init", *AIRFLOW_SERVICES))


def test_dockerfile_installs_this_package_on_the_pinned_airflow():
    text = (ROOT / "Dockerfile").read_text()
    assert f"ARG AIRFLOW_VERSION={pinned('apache-airflow')}" in text
    assert re.search(r"^FROM apache/airflow:\$\{AIRFLOW_VERSION\}-python3\.11$", text, re.M)
    assert "COPY --chown=airflow:0 plugins /opt/segment-export/plugins" in text
    assert '"apache-airflow==${AIRFLOW_VERSION}"' in text and "/opt/segment-export[" in text
    # the sandbox service's entry point: the sandbox's own distribution is copied and installed too
    assert "COPY --chown=airflow:0 sandbox /opt/segment-export/sandbox" in text
    assert re.search(r'/opt/segment-export\[[a-z,]+\]"? /opt/segment-export/sandbox$', text, re.M)
    # every path the image copies exists, and the extras it asks for are declared
    for path in ("pyproject.toml", "README.md", "plugins", "sandbox/pyproject.toml"):
        assert (ROOT / path).exists()
    extras = re.search(r"/opt/segment-export\[([a-z,]+)\]", text).group(1).split(",")
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert all(re.search(rf"^{e} = \[", pyproject, re.M) for e in extras), extras


def test_docker_compose_config_accepts_the_file(tmp_path):
    docker = shutil.which("docker")
    if not docker or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("the Docker Compose plugin is not installed (the docker client here has no 'compose')")
    result = subprocess.run([docker, "compose", "-f", str(COMPOSE), "config", "--quiet"], capture_output=True,
                            text=True, cwd=ROOT, env={"AIRFLOW_UID": "50000", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
