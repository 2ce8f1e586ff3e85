"""``segment-export validate`` and ``segment-export plan``, each run as the command is, in its own process.

``validate`` must need no Airflow metadata database and no network: its process gets a metadata database URL in
a folder that does not exist (any use of it would fail) and proxies that lead nowhere."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path = ROOT, env: dict | None = None, tmp_path: Path) -> subprocess.CompletedProcess:
    base = dict(os.environ if env is None else env)
    nowhere = tmp_path / "no-such-folder"
    base.update({
        "PYTHONPATH": os.pathsep.join([str(ROOT / "plugins"), str(ROOT / "sandbox" / "src"), base.get("PYTHONPATH", "")]),
        "AIRFLOW_HOME": str(tmp_path / "airflow-home"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{nowhere}/airflow.db",
    })
    return subprocess.run([sys.executable, "-m", "segment_export.cli", *args], cwd=cwd, env=base,
                          capture_output=True, text=True, timeout=300)


def no_network(tmp_path) -> dict:
    env = dict(os.environ)
    env.update({"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""})
    return env


def test_validate_passes_the_demo_specs_without_database_or_network(tmp_path):
    result = cli("validate", tmp_path=tmp_path, env=no_network(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 spec file(s), 3 valid export(s), 1 erasure block(s): ok, 4 DAG(s)" in result.stdout
    assert not (tmp_path / "no-such-folder").exists()
    assert not (tmp_path / "airflow-home" / "airflow.db").exists()


def test_validate_fails_a_broken_spec_naming_file_export_and_field(tmp_path):
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "good.yaml").write_text((ROOT / "dags" / "exports" / "demo.yaml").read_text().replace("../../.demo", str(ROOT / ".demo")))
    broken = specs / "broken.yaml"
    broken.write_text(textwrap.dedent("""
        exports:
          - id: vip_typo
            privacy_acknowledged: true
            schedule: "61 25 * * *"
            source: {conn_id: warehouse, table: t}
            destination: {type: klaviyo, list_id: X}
            mapping: {email: email, firstname: first_name}
    """))
    result = cli("validate", str(specs), tmp_path=tmp_path, env=no_network(tmp_path))
    assert result.returncode == 1
    out = result.stdout
    # the very messages of Airflow's import error (spec.SpecError)
    assert f"error: file {broken}, export 'vip_typo', field 'mapping.firstname': unknown key" in out
    assert f"error: file {broken}, export 'vip_typo', field 'schedule': '61 25 * * *' is not a cron expression" in out
    assert "3 valid export(s), 1 erasure block(s): 2 error(s)" in out
    # a single file can be given too
    assert cli("validate", str(broken), tmp_path=tmp_path).returncode == 1
    assert cli("validate", str(specs / "good.yaml"), tmp_path=tmp_path).returncode == 0
    missing = cli("validate", str(tmp_path / "nope"), tmp_path=tmp_path)
    assert missing.returncode == 1 and "no such file or folder" in missing.stdout


def test_validate_reports_what_only_airflow_refuses(tmp_path):
    (tmp_path / "a.yaml").write_text(textwrap.dedent("""
        exports:
          - id: bad_alerts
            privacy_acknowledged: true
            source: {conn_id: warehouse, table: t}
            destination: {type: klaviyo, list_id: L}
            mapping: {email: email}
            alerts: {callback: no_such_module_xyz.page}
    """))
    result = cli("validate", str(tmp_path / "a.yaml"), tmp_path=tmp_path)
    assert result.returncode == 1 and "export 'bad_alerts', field 'alerts.callback'" in result.stdout


def test_plan_prints_the_dry_run_and_writes_nothing_to_the_destination(tmp_path, segment_db, sandbox):
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "a.yaml").write_text(textwrap.dedent("""
        exports:
          - id: vip_plan
            privacy_acknowledged: true
            source: {conn_id: warehouse, table: segment_members, segment_column: segment, segments: [vip]}
            destination: {type: mailchimp, audience_id: a1b2c3d4e5, new_member_status: subscribed}
            mapping: {email: email, first_name: first_name}
    """))
    result = cli("plan", "vip_plan", "--path", str(specs), tmp_path=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "DRY RUN: nothing sent" in result.stdout and "would send (dry run)" in result.stdout
    assert '"email_address": "***@example.com"' in result.stdout
    assert "@example.com\"" not in result.stdout.replace('"***@example.com"', "")  # no address but masked ones
    writes = [k for k in sandbox.state()["requests"]["by_endpoint"] if not k.startswith("GET ")]
    assert writes == []
    unknown = cli("plan", "nope", "--path", str(specs), tmp_path=tmp_path)
    assert unknown.returncode == 1 and "no export 'nope'" in unknown.stdout and "vip_plan" in unknown.stdout


@pytest.mark.parametrize("argv", [["--help"], ["validate", "--help"], ["plan", "--help"]])
def test_help(argv, tmp_path):
    assert cli(*argv, tmp_path=tmp_path).returncode == 0


def test_the_command_is_declared_in_pyproject():
    import tomllib

    from segment_export import cli

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"segment-export": "segment_export.cli:main"} and callable(cli.main)
