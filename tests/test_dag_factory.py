"""Real Airflow: the DAG file parsed by a DagBag, and export DAGs run with `airflow dags test` against the sandbox.

Each run is checked by what the sandbox holds afterwards and by the task's XCom summary in the metadata DB.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import segment_data
from airflow_env import ROOT, airflow_env, last_export_summary
from sandbox_state import klaviyo_profiles, mailchimp_members
from segment_export_sandbox import KLAVIYO_API_KEY, KLAVIYO_LIST_ID, MAILCHIMP_API_KEY, MAILCHIMP_AUDIENCE_ID

pytestmark = pytest.mark.airflow
AIRFLOW = str(Path(sys.executable).parent / "airflow")

SPECS = """
exports:
  - id: e2e_klaviyo
    privacy_acknowledged: true
    schedule: "@daily"
    source: {conn_id: warehouse, table: segment_members, segment_column: segment, segments: [vip]}
    destination: {type: klaviyo, list_id: %(list)s}
    mapping:
      email: email
      first_name: first_name
      phone_number: phone
      attributes: {tier: tier}
  - id: e2e_mailchimp
    privacy_acknowledged: true
    source: {conn_id: warehouse, query: "SELECT * FROM segment_members", segment_column: segment, segments: [newsletter]}
    destination: {type: mailchimp, audience_id: %(audience)s, new_member_status: pending}
    mapping: {email: email, first_name: first_name, last_name: last_name}
  - id: e2e_missing_column
    privacy_acknowledged: true
    source: {conn_id: warehouse, table: segment_members}
    destination: {type: klaviyo, list_id: %(list)s}
    mapping: {email: email_address}
""" % {"list": KLAVIYO_LIST_ID, "audience": MAILCHIMP_AUDIENCE_ID}


@pytest.fixture(scope="session")
def airflow_home(tmp_path_factory):
    """An Airflow home with a migrated SQLite metadata database, shared by this module's runs."""
    home = tmp_path_factory.mktemp("airflow-home")
    env = airflow_env(home, "http://127.0.0.1:9", home / "unused.db")
    subprocess.run([AIRFLOW, "db", "migrate"], env=env, check=True, capture_output=True, timeout=300)
    return home


@pytest.fixture
def specs_dir(tmp_path):
    folder = tmp_path / "exports"
    folder.mkdir()
    (folder / "e2e.yaml").write_text(SPECS)
    return folder


def dags_test(airflow_home: Path, sandbox, warehouse: Path, specs: Path, dag_id: str, conf: dict | None = None) -> subprocess.CompletedProcess:
    env = airflow_env(airflow_home, sandbox.url, warehouse)
    env["SEGMENT_EXPORT_SPECS"] = str(specs)
    extra = ["-c", json.dumps(conf)] if conf else []
    return subprocess.run(
        [AIRFLOW, "dags", "test", dag_id, *extra], env=env, capture_output=True, text=True, timeout=600
    )


def test_dagbag_loads_good_exports_and_reports_a_broken_spec_as_import_error(specs_dir, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    (specs_dir / "broken.yaml").write_text(textwrap.dedent("""
        exports:
          - id: broken_export
            privacy_acknowledged: true
            source: {conn_id: warehouse, table: t}
            destination: {type: klaviyo, lst_id: X}
            mapping: {email: email}
    """))
    monkeypatch.setenv("SEGMENT_EXPORT_SPECS", str(specs_dir))
    bag = DagBag(str(ROOT / "dags"))
    assert sorted(bag.dag_ids) == ["e2e_klaviyo", "e2e_mailchimp", "e2e_missing_column"]
    (error,) = bag.import_errors.values()
    assert "broken.yaml" in error and "export 'broken_export'" in error
    assert "field 'destination.lst_id': unknown key" in error
    dag = bag.dags["e2e_klaviyo"]
    assert dag.schedule == "@daily" or str(dag.timetable.summary) == "@daily"
    assert set(dag.tags) >= {"segment-export", "klaviyo"} and [t.task_id for t in dag.tasks] == ["export"]


REFUSED = """
exports:
  - id: bad_cron
    privacy_acknowledged: true
    schedule: "61 25 * * *"
    source: {conn_id: warehouse, table: t}
    destination: {type: klaviyo, list_id: L}
    mapping: {email: email}
  - id: bad_preset
    privacy_acknowledged: true
    schedule: "@daly"
    source: {conn_id: warehouse, table: t}
    destination: {type: klaviyo, list_id: L}
    mapping: {email: email}
  - id: long_tag
    privacy_acknowledged: true
    tags: [%(tag)s]
    source: {conn_id: warehouse, table: t}
    destination: {type: klaviyo, list_id: L}
    mapping: {email: email}
  - id: bad_alerts
    privacy_acknowledged: true
    source: {conn_id: warehouse, table: t}
    destination: {type: klaviyo, list_id: L}
    mapping: {email: email}
    alerts: {callback: no_such_module_xyz.page}
""" % {"tag": "t" * 101}


def test_exports_airflow_would_refuse_get_no_dag_and_hide_nothing(specs_dir, monkeypatch):
    """Bad cron, preset typo, long tag, a callback that does not import, a file over the size cap: each export
    loses its DAG (no task-less DAG that 'succeeds'), every other export loads, and the one import error names
    each file, export and field."""
    from airflow.dag_processing.dagbag import DagBag

    (specs_dir / "refused.yaml").write_text(REFUSED)
    (specs_dir / "huge.yaml").write_text(SPECS.replace("e2e_", "huge_") + "#" * 20_000 + "\n")
    monkeypatch.setenv("SEGMENT_EXPORT_SPECS", str(specs_dir))
    monkeypatch.setenv("SEGMENT_EXPORT_SPEC_MAX_BYTES", "10000")
    bag = DagBag(str(ROOT / "dags"))
    assert sorted(bag.dag_ids) == ["e2e_klaviyo", "e2e_mailchimp", "e2e_missing_column"]
    assert all([t.task_id for t in dag.tasks] == ["export"] for dag in bag.dags.values())
    (error,) = bag.import_errors.values()
    refused = f"file {specs_dir / 'refused.yaml'}"
    assert "5 invalid export spec(s)" in error
    assert f"{refused}, export 'bad_cron', field 'schedule': '61 25 * * *' is not a cron expression" in error
    assert f"{refused}, export 'bad_preset', field 'schedule': '@daly' is not a schedule preset" in error
    assert f"{refused}, export 'long_tag', field 'tags': tag 1 has 101 characters" in error
    assert f"{refused}, export 'bad_alerts', field 'alerts.callback': cannot import module 'no_such_module_xyz'" in error
    assert f"file {specs_dir / 'huge.yaml'}: the file is larger than the spec size cap of 10,000 bytes" in error


def test_a_callback_that_does_not_import_leaves_no_runnable_dag(specs_dir, monkeypatch):
    """Before, the export's DAG was auto-registered half-built: no task, and a triggered run 'succeeded'."""
    from airflow.dag_processing.dagbag import DagBag

    (specs_dir / "alerts.yaml").write_text("exports:\n  - id: bad_alerts" + REFUSED.split("  - id: bad_alerts")[1])
    monkeypatch.setenv("SEGMENT_EXPORT_SPECS", str(specs_dir))
    bag = DagBag(str(ROOT / "dags"))
    assert "bad_alerts" not in bag.dag_ids and "e2e_klaviyo" in bag.dag_ids
    (error,) = bag.import_errors.values()
    assert f"file {specs_dir / 'alerts.yaml'}, export 'bad_alerts', field 'alerts.callback'" in error


def test_the_dag_processor_records_every_refused_export_as_an_import_error(specs_dir, tmp_path):
    """Through the path a deployment takes (parse, serialize, write import errors to the metadata DB), as the
    README tells it: `airflow dags reserialize` parses, then `airflow dags list-import-errors` shows them."""
    (specs_dir / "refused.yaml").write_text(REFUSED)
    env = airflow_env(tmp_path / "home", "http://127.0.0.1:9", tmp_path / "unused.db")
    env["SEGMENT_EXPORT_SPECS"] = str(specs_dir)
    for command in (["db", "migrate"], ["dags", "reserialize"]):
        subprocess.run([AIRFLOW, *command], env=env, check=True, capture_output=True, timeout=300)
    listed = subprocess.run([AIRFLOW, "dags", "list-import-errors", "-o", "json"], env=env, capture_output=True, text=True, timeout=300)
    (error,) = json.loads(listed.stdout.strip().splitlines()[-1])  # after Airflow's warnings
    assert error["filepath"] == "segment_exports.py" and "4 invalid export spec(s)" in error["error"]
    for export_id, field in [("bad_cron", "schedule"), ("bad_preset", "schedule"), ("long_tag", "tags"), ("bad_alerts", "alerts.callback")]:
        assert f"file {specs_dir / 'refused.yaml'}, export '{export_id}', field '{field}'" in error["error"]
    dags = subprocess.run([AIRFLOW, "dags", "list", "-o", "json"], env=env, capture_output=True, text=True, timeout=300)
    listed_ids = {d["dag_id"] for d in json.loads(dags.stdout.strip().splitlines()[-1])}
    assert listed_ids == {"e2e_klaviyo", "e2e_mailchimp", "e2e_missing_column"}


def test_whatever_else_airflow_refuses_costs_only_that_export_its_dag(tmp_path, monkeypatch):
    """The backstop behind spec validation: a DAG that fails Airflow's own validation becomes a spec error."""
    from segment_export import dag_factory

    (tmp_path / "a.yaml").write_text(SPECS)
    real = dag_factory.export_dag

    def export_dag(spec):
        dag = real(spec)
        if spec.id == "e2e_mailchimp":
            dag.owner_links = {"someone": "not a link"}  # DAG.validate() refuses it, as the DagBag would
        return dag

    monkeypatch.setattr(dag_factory, "export_dag", export_dag)
    dags = dag_factory.build_dags(tmp_path)
    assert sorted(dags) == ["e2e_klaviyo", "e2e_missing_column", dag_factory.SPEC_ERRORS_DAG_ID]
    with pytest.raises(ValueError) as err:
        dags[dag_factory.SPEC_ERRORS_DAG_ID].validate()
    assert f"file {tmp_path / 'a.yaml'}, export 'e2e_mailchimp': Airflow refuses the export's DAG: ValueError" in str(err.value)


def test_the_spec_restates_airflow_limits_exactly():
    """spec.py restates Airflow's limits to stay free of Airflow imports; a new Airflow that changes one fails here."""
    from airflow.models.dag import DagModel
    from airflow.models.pool import Pool
    from airflow.sdk.definitions._internal import node
    from airflow.sdk.definitions.dag import TAG_MAX_LEN
    from airflow.sdk.definitions.timetables._cron import CRON_PRESETS
    from airflow.utils.dates import cron_presets

    from segment_export import spec

    assert spec.AIRFLOW_TAG_MAX_LEN == TAG_MAX_LEN
    assert spec.AIRFLOW_CRON_PRESETS == CRON_PRESETS == cron_presets
    assert spec.AIRFLOW_TEXT_MAX_LEN == DagModel.__table__.c.owners.type.length
    assert spec.AIRFLOW_TEXT_MAX_LEN == DagModel.__table__.c.dag_display_name.type.length
    assert spec.AIRFLOW_POOL_MAX_LEN == Pool.__table__.c.pool.type.length
    node.validate_key("a" * 200)  # the spec's longest id is a valid dag_id


def test_klaviyo_dag_end_to_end(airflow_home, sandbox, segment_db, specs_dir):
    result = dags_test(airflow_home, sandbox, segment_db, specs_dir, "e2e_klaviyo")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    vip = {r[1]: r for r in segment_data.rows(1000) if r[-1] == "vip"}
    held = klaviyo_profiles(sandbox.state(), KLAVIYO_LIST_ID)
    assert set(held) == set(vip)
    email, profile = next(iter(held.items()))
    assert profile["first_name"] == vip[email][2] and profile["properties"] == {"tier": vip[email][5]}
    summary = last_export_summary(airflow_home, "e2e_klaviyo")
    assert summary["accepted"] == summary["sent"] == len(held) and summary["rejected"] == 0
    output = result.stdout + result.stderr
    assert "batch 1: " in output and "export summary" in output
    assert KLAVIYO_API_KEY not in output  # the key is masked in every log line
    assert "@example.com" not in output  # no customer email in the task log


def test_mailchimp_dag_end_to_end(airflow_home, sandbox, segment_db, specs_dir):
    existing = next(r for r in segment_data.rows(1000) if r[-1] == "newsletter")
    sandbox.seed_mailchimp_member(MAILCHIMP_AUDIENCE_ID, existing[1], "unsubscribed")
    result = dags_test(airflow_home, sandbox, segment_db, specs_dir, "e2e_mailchimp")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    newsletter = {r[1]: r for r in segment_data.rows(1000) if r[-1] == "newsletter"}
    members = mailchimp_members(sandbox.state(), MAILCHIMP_AUDIENCE_ID)
    assert set(members) == set(newsletter)
    assert members[existing[1]]["status"] == "unsubscribed"
    assert {m["status"] for e, m in members.items() if e != existing[1]} == {"pending"}
    summary = last_export_summary(airflow_home, "e2e_mailchimp")
    assert (summary["created"], summary["updated"], summary["rejected"]) == (len(newsletter) - 1, 1, 0)
    output = result.stdout + result.stderr
    assert MAILCHIMP_API_KEY not in output and "@example.com" not in output


def test_missing_column_fails_the_task_before_sending(airflow_home, sandbox, segment_db, specs_dir):
    result = dags_test(airflow_home, sandbox, segment_db, specs_dir, "e2e_missing_column")
    output = result.stdout + result.stderr
    assert "mapping.email: no column 'email_address'" in output
    assert "customer_id, email, first_name" in output
    assert "POST /api/profile-bulk-import-jobs" not in sandbox.state()["requests"]["by_endpoint"]
    assert "failed" in output.lower()


def writes(sandbox) -> dict[str, int]:
    by_endpoint = sandbox.state()["requests"]["by_endpoint"]
    return {k: v["count"] for k, v in by_endpoint.items() if not k.startswith("GET ")}


def test_sync_through_dag_runs(airflow_home, sandbox, segment_db, specs_dir):
    """Dry run, first run, unchanged rerun, one changed row, one leaver, full resync: each a real DAG run."""
    def run_ok(conf=None):
        result = dags_test(airflow_home, sandbox, segment_db, specs_dir, "e2e_mailchimp", conf)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return last_export_summary(airflow_home, "e2e_mailchimp"), result.stdout + result.stderr

    newsletter = [r for r in segment_data.rows(1000) if r[-1] == "newsletter"]
    plan, _ = run_ok({"dry_run": True})
    assert plan["dry_run"] and plan["planned"] == len(newsletter) and writes(sandbox) == {}
    assert mailchimp_members(sandbox.state(), MAILCHIMP_AUDIENCE_ID) == {}

    first, _ = run_ok()
    assert first["created"] == len(newsletter) and first["tags_added"] == len(newsletter)
    members = mailchimp_members(sandbox.state(), MAILCHIMP_AUDIENCE_ID)
    assert set(members) == {r[1] for r in newsletter} and all(m["tags"] == ["newsletter"] for m in members.values())

    before = writes(sandbox)
    second, output = run_ok()
    assert (second["sent"], second["unchanged"]) == (0, len(newsletter)) and writes(sandbox) == before
    assert "nothing to send" in output

    changed, gone = newsletter[0][1], newsletter[1][1]
    with sqlite3.connect(segment_db) as conn:
        conn.execute("UPDATE segment_members SET first_name = 'Renamed' WHERE email = ?", (changed,))
        conn.execute("DELETE FROM segment_members WHERE email = ?", (gone,))
    third, _ = run_ok()
    assert (third["sent"], third["updated"], third["removed"]) == (1, 1, 1)
    members = mailchimp_members(sandbox.state(), MAILCHIMP_AUDIENCE_ID)
    assert members[changed]["merge_fields"]["FNAME"] == "Renamed" and members[gone]["tags"] == []

    resync, _ = run_ok({"full_resync": True})
    assert resync["sent"] == len(newsletter) - 1


def test_the_trigger_form_allows_mass_leave_for_one_run(tmp_path):
    """The mass-removal guard's per-run override: a boolean param, default false, reaching RunOptions."""
    from segment_export.dag_factory import build_dags
    from segment_export.operators.export import SegmentExportOperator

    (tmp_path / "a.yaml").write_text(SPECS)
    dag = build_dags(tmp_path)["e2e_mailchimp"]
    assert dag.params["allow_mass_leave"] is False and dag.params.get_param("allow_mass_leave").schema["type"] == "boolean"
    assert "`allow_mass_leave`" in dag.doc_md
    assert SegmentExportOperator.run_options({"params": {"allow_mass_leave": True}}).allow_mass_leave is True
    assert SegmentExportOperator.run_options({"params": {}}).allow_mass_leave is False


def test_the_spec_errors_dag_id_is_reserved(tmp_path):
    from segment_export.dag_factory import SPEC_ERRORS_DAG_ID, build_dags

    (tmp_path / "a.yaml").write_text(SPECS.replace("e2e_klaviyo", SPEC_ERRORS_DAG_ID))
    dags = build_dags(tmp_path)
    assert sorted(dags) == ["e2e_mailchimp", "e2e_missing_column", SPEC_ERRORS_DAG_ID]
    with pytest.raises(ValueError, match=f"export '{SPEC_ERRORS_DAG_ID}', field 'id': this dag_id is reserved"):
        dags[SPEC_ERRORS_DAG_ID].validate()
