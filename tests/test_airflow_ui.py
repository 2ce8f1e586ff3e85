"""`make airflow` (scripts/airflow_ui.py): what it hands `airflow standalone`, without starting Airflow."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import airflow_ui
import pytest


@pytest.fixture
def started(tmp_path, monkeypatch):
    """Run main() in a fresh shell's environment (the venv's bin not on PATH); return the standalone call."""
    home, demo = tmp_path / "home", tmp_path / "demo"
    demo.mkdir()
    (demo / "segments.db").touch()
    (demo / "churn_risk.csv").touch()

    @contextmanager
    def sandbox():
        yield "http://127.0.0.1:9"

    calls = []

    def run(args, env):
        calls.append((args, env))
        return subprocess.CompletedProcess(args, 0)

    monkeypatch.setattr(airflow_ui, "HOME", home)
    monkeypatch.setattr(airflow_ui, "DEMO", demo)
    monkeypatch.setattr(airflow_ui, "sandbox", sandbox)
    monkeypatch.setattr(airflow_ui.subprocess, "run", run)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    for key in ("AIRFLOW__API__HOST", "AIRFLOW__API__PORT", "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"):
        monkeypatch.delenv(key, raising=False)

    def start():
        calls.clear()
        assert airflow_ui.main() == 0
        (call,) = calls
        return call

    return home, start


def test_standalone_finds_airflow_on_path_in_a_fresh_shell(started):
    _, start = started
    args, env = start()
    assert args[1:] == ["standalone"]
    venv_bin = str(Path(sys.executable).parent)
    assert env["PATH"].split(":")[0] == venv_bin and env["PATH"].endswith("/usr/bin:/bin")
    # what `airflow standalone` does for its scheduler, DAG processor, API server and triggerer:
    assert shutil.which("airflow", path=env["PATH"]) == str(Path(venv_bin) / "airflow")


def test_the_ui_listens_on_localhost_only(started, capsys):
    _, start = started
    _, env = start()
    assert env["AIRFLOW__API__HOST"] == "127.0.0.1"
    assert "UI: http://127.0.0.1:8080" in capsys.readouterr().out


def test_the_admin_password_is_printed_on_every_start(started, capsys):
    home, start = started
    start()
    assert "the password Airflow prints below (first start)" in capsys.readouterr().out
    (home / "simple_auth_manager_passwords.json.generated").write_text(json.dumps({"admin": "s3cret-Pw"}))
    start()
    assert "Log in as admin, password s3cret-Pw" in capsys.readouterr().out
