"""The export operator (``segment_export.operators.export``), called directly with a minimal task context.

No scheduler, no task runner: ``execute`` runs the real exporter on a small SQLite segment against the API
sandbox (the operator really sends), so each test checks what the sandbox and the state tables hold. What the
operator owns and these tests pin: the spec it keeps (validated, JSON), nothing templated, the trigger form's
params turned into run options, the run id, the XCom value, the asset event's counts, the log for each kind of
failure (the exception itself is re-raised: that is what fails the task), and that it closes what it opened.
"""

from __future__ import annotations

import json
import re
import sqlite3
from dataclasses import replace
from urllib.parse import urlsplit

import pytest
from pydantic import ValidationError
from sandbox_state import klaviyo_profiles, mailchimp_members
from segment_export_sandbox import KLAVIYO_LIST_ID, MAILCHIMP_AUDIENCE_ID

import segment_export.operators.export as operator_module
from segment_export.exporter import ExportError, MassLeaveError, RejectedShareError, RunOptions
from segment_export.limit import LimitExceededError
from segment_export.operators.export import SegmentExportOperator
from segment_export.spec import ExportSpec
from segment_export.state import OUTCOMES_TABLE, STATE_TABLE

KLAVIYO = {"type": "klaviyo", "list_id": KLAVIYO_LIST_ID}
MAILCHIMP = {"type": "mailchimp", "audience_id": MAILCHIMP_AUDIENCE_ID, "new_member_status": "subscribed"}
EMAILS = [f"customer{i}@example.com" for i in range(3)]
WRITES = ("POST ", "PUT ", "PATCH ", "DELETE ")


def raw_spec(destination: dict = MAILCHIMP, **extra) -> dict:
    raw = {
        "id": "operator_test",
        "privacy_acknowledged": True,
        "source": {"conn_id": "warehouse", "table": "segment_members", "segment_column": "segment", "segments": ["vip"]},
        "destination": destination,
        "mapping": {"email": "email", "first_name": "first_name"},
    }
    raw.update(extra)
    return raw


def operator(spec: dict | ExportSpec | None = None, **kwargs) -> SegmentExportOperator:
    return SegmentExportOperator(task_id="export", export=spec if spec is not None else raw_spec(), **kwargs)


@pytest.fixture
def warehouse(tmp_path, airflow_conn):
    """A SQLite segment of three VIP customers behind the connection ``warehouse`` (the state lives there too)."""
    db = tmp_path / "warehouse.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE segment_members (email TEXT, first_name TEXT, segment TEXT)")
        conn.executemany("INSERT INTO segment_members VALUES (?, 'Ada', 'vip')", [(e,) for e in EMAILS])
    airflow_conn("warehouse", conn_type="sqlite", host=str(db))
    return db


def sql(db, statement: str, params=()) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(statement, params).fetchall()


def writes(sandbox) -> int:
    return sum(v["count"] for k, v in sandbox.state()["requests"]["by_endpoint"].items() if k.startswith(WRITES))


# -- construction ---------------------------------------------------------------------------------------------

def test_the_spec_is_validated_at_construction_and_kept_as_json():
    from_dict = operator(raw_spec())
    from_model = operator(ExportSpec.model_validate(raw_spec()))
    assert from_dict.export == from_model.export == ExportSpec.model_validate(raw_spec()).model_dump(mode="json")
    assert json.loads(json.dumps(from_dict.export)) == from_dict.export  # serialisable with the DAG
    assert from_dict.export["destination"]["audience_id"] == MAILCHIMP_AUDIENCE_ID
    assert (from_dict.task_id, from_dict.ui_color) == ("export", "#ffe0b2")


def test_a_bad_spec_fails_at_construction_naming_the_field():
    with pytest.raises(ValidationError, match="mapping.email"):
        operator(raw_spec(mapping={"first_name": "first_name"}))
    with pytest.raises(ValidationError, match="unknown_key"):
        operator(raw_spec(unknown_key=1))  # unknown keys are refused, not ignored


def test_nothing_in_the_spec_is_templated():
    # a query with Jinja in it is run as written: the spec is what was reviewed, and no rendered field shows it
    query = "SELECT email, first_name FROM segment_members WHERE day = '{{ ds }}'"
    op = operator(raw_spec(source={"conn_id": "warehouse", "query": query}))
    assert tuple(op.template_fields) == ()
    before = json.dumps(op.export, sort_keys=True)
    op.render_template_fields({"ds": "2026-12-03"})
    assert json.dumps(op.export, sort_keys=True) == before and op.export["source"]["query"] == query


# -- the trigger form's params --------------------------------------------------------------------------------

@pytest.mark.parametrize("context, expected", [
    (None, RunOptions()),
    ({}, RunOptions()),
    ({"params": None}, RunOptions()),
    ({"params": {}}, RunOptions()),
    ({"params": {"dry_run": False, "full_resync": False, "max_profiles": None, "allow_mass_leave": False}}, RunOptions()),
    ({"params": {"dry_run": True}}, RunOptions(dry_run=True)),
    ({"params": {"full_resync": True}}, RunOptions(full_resync=True)),
    ({"params": {"allow_mass_leave": True}}, RunOptions(allow_mass_leave=True)),
    ({"params": {"max_profiles": 5}}, RunOptions(max_profiles=5)),
    ({"params": {"max_profiles": "7"}}, RunOptions(max_profiles=7)),  # a form field left as text
    ({"params": {"max_profiles": ""}}, RunOptions()),  # the form's empty field: the export's limit
    ({"params": {"max_profiles": 0}}, RunOptions()),
], ids=lambda v: json.dumps(v) if isinstance(v, (dict, type(None))) else None)
def test_run_options_come_from_the_params_and_absent_ones_mean_a_normal_run(context, expected, monkeypatch):
    monkeypatch.delenv("AIRFLOW__SEGMENT_EXPORT__MAP_WORKERS", raising=False)
    assert SegmentExportOperator.run_options(context) == replace(expected, map_workers=operator_module.DEFAULT_MAP_WORKERS)


@pytest.mark.parametrize("setting, workers", [("0", 0), ("2", 2), ("-1", 0), ("", operator_module.DEFAULT_MAP_WORKERS)])
def test_map_workers_come_from_the_deployments_setting(setting, workers, monkeypatch):
    monkeypatch.setenv("AIRFLOW__SEGMENT_EXPORT__MAP_WORKERS", setting)
    assert SegmentExportOperator.run_options(None).map_workers == workers


def test_a_map_workers_setting_that_is_not_a_number_fails_naming_it(monkeypatch):
    monkeypatch.setenv("AIRFLOW__SEGMENT_EXPORT__MAP_WORKERS", "two")
    with pytest.raises(ValueError, match=r"\[segment_export\] map_workers must be a whole number of processes, not 'two'"):
        SegmentExportOperator.run_options(None)


# -- execute ----------------------------------------------------------------------------------------------------

def test_execute_exports_and_returns_the_summary_as_its_xcom_value(warehouse, sandbox, capfd):
    value = operator().execute({"run_id": "scheduled__2026-12-03"})
    members = mailchimp_members(sandbox.state(), MAILCHIMP_AUDIENCE_ID)
    assert set(members) == set(EMAILS) and {m["merge_fields"]["FNAME"] for m in members.values()} == {"Ada"}
    assert (value["sent"], value["accepted"], value["created"], value["rejected"], value["dry_run"]) == (3, 3, 3, 0, False)
    assert (value["export_id"], value["destination"], value["target_id"]) == ("operator_test", "mailchimp", MAILCHIMP_AUDIENCE_ID)
    assert json.loads(json.dumps(value)) == value  # an XCom value
    # the run id of the context is the one the outcomes are recorded under; the state remembers all three
    assert sql(warehouse, f"SELECT run_id, action, count(*) FROM {OUTCOMES_TABLE} GROUP BY 1, 2") == [
        ("scheduled__2026-12-03", "created", 3)]
    assert sql(warehouse, f"SELECT count(*) FROM {STATE_TABLE} WHERE export_id = 'operator_test'") == [(3,)]
    logged = "".join(capfd.readouterr())
    assert "sync state: connection warehouse" in logged and "export summary:\nexport operator_test -> mailchimp" in logged
    requests = int(re.search(r"(\d+) requests, 0 retried", logged).group(1))
    assert requests == sandbox.state()["requests"]["count"]  # every request the sandbox saw, counted once
    assert "@example.com" not in logged  # counts and reasons only, never an address


@pytest.mark.parametrize("context", [None, {}, {"run_id": None}], ids=["no context", "empty", "run_id None"])
def test_a_run_without_a_run_id_is_recorded_as_manual(warehouse, sandbox, context):
    assert operator().execute(context)["accepted"] == 3
    assert sql(warehouse, f"SELECT DISTINCT run_id FROM {OUTCOMES_TABLE}") == [("manual",)]


@pytest.mark.parametrize("spec_dry_run, param_dry_run", [(True, False), (False, True)], ids=["spec", "trigger form"])
def test_a_dry_run_from_the_spec_or_the_form_sends_and_saves_nothing(warehouse, sandbox, spec_dry_run, param_dry_run):
    op = operator(raw_spec(sync={"dry_run": spec_dry_run}))
    value = op.execute({"run_id": "dry", "params": {"dry_run": param_dry_run}})
    assert (value["dry_run"], value["planned"], value["sent"], value["accepted"]) == (True, 3, 0, 0)
    assert [e["action"] for e in value["examples"]] == ["create"] * 3
    assert writes(sandbox) == 0 and mailchimp_members(sandbox.state(), MAILCHIMP_AUDIENCE_ID) == {}
    assert sql(warehouse, f"SELECT count(*) FROM {STATE_TABLE}") == [(0,)]


def test_full_resync_from_the_form_sends_every_profile_again(warehouse, sandbox):
    op = operator()
    op.execute({"run_id": "first"})
    again = op.execute({"run_id": "second"})
    assert (again["sent"], again["unchanged"]) == (0, 3)
    resync = op.execute({"run_id": "resync", "params": {"full_resync": True}})
    assert (resync["sent"], resync["updated"], resync["unchanged"]) == (3, 3, 0)
    assert sql(warehouse, f"SELECT action, count(*) FROM {OUTCOMES_TABLE} WHERE run_id = 'resync' GROUP BY 1") == [
        ("updated", 3)]


def test_max_profiles_from_the_form_lowers_this_runs_limit(warehouse, sandbox):
    op = operator(raw_spec(KLAVIYO, limit={"max_profiles": 3, "on_exceed": "truncate", "order_by": "email"}))
    value = op.execute({"run_id": "two", "params": {"max_profiles": "2"}})
    assert (value["read"], value["sent"], value["skipped_by_limit"]) == (2, 2, 1)
    assert set(klaviyo_profiles(sandbox.state(), KLAVIYO_LIST_ID)) == set(sorted(EMAILS)[:2])


def test_max_profiles_over_the_exports_limit_fails_before_sending(warehouse, sandbox):
    op = operator(raw_spec(limit={"max_profiles": 3}))
    with pytest.raises(ValueError, match="max_profiles 4 must be between 1 and the export's limit of 3"):
        op.execute({"run_id": "over", "params": {"max_profiles": 4}})
    assert writes(sandbox) == 0


def test_the_asset_event_carries_the_runs_counts(warehouse, sandbox):
    from airflow.sdk.execution_time.context import OutletEventAccessors

    from segment_export.dag_factory import destination_assets

    spec = ExportSpec.model_validate(raw_spec())
    (asset,) = destination_assets(spec)
    events = OutletEventAccessors()
    operator(spec, outlets=[asset]).execute({"run_id": "r", "outlet_events": events})
    assert events[asset].extra == {"accepted": 3, "rejected": 0, "created": 3, "updated": 0, "dry_run": False}


# -- failures: the log says what happened, the exception fails the task ------------------------------------------

def _failing_batches(monkeypatch, sandbox):
    """Every Mailchimp batch subscribe answers 500; the hook gives up at once (speed only: the same failure path)."""
    real = operator_module.destination_for

    def destination_for(spec):
        destination = real(spec)
        destination.hook.max_retries, destination.hook.retry_base_seconds = 0, 0.001
        return destination

    monkeypatch.setattr(operator_module, "destination_for", destination_for)
    sandbox.set_faults([{"endpoint": "POST /3.0/lists/{list_id}", "kind": "500", "times": 100}])


def _too_many_rejected(warehouse):
    sql(warehouse, "INSERT INTO segment_members VALUES ('not-an-email', 'X', 'vip')")  # 1 of 4: over 5 %


def _segment_emptied(warehouse):
    operator().execute({"run_id": "before"})  # remembered: then the whole segment leaves
    sql(warehouse, "DELETE FROM segment_members")


FAILURES = {
    # exception, what the operator logs for it, what it must not log
    "batch failed": (ExportError, "export stopped; what the destination confirmed before:"),
    "rejected share": (RejectedShareError, "the run completed, then failed the rejected-share check"),
    "mass leave": (MassLeaveError, "the run sent its additions and updates, then stopped before any removal"),
}


@pytest.mark.parametrize("failure", FAILURES)
def test_each_failure_is_logged_with_the_summary_so_far_and_re_raised(warehouse, sandbox, monkeypatch, capfd, failure):
    if failure == "batch failed":
        _failing_batches(monkeypatch, sandbox)
    elif failure == "rejected share":
        _too_many_rejected(warehouse)
    else:
        _segment_emptied(warehouse)
    capfd.readouterr()
    error, message = FAILURES[failure]
    with pytest.raises(ExportError) as info:
        operator().execute({"run_id": "failing"})
    assert type(info.value) is error  # re-raised as it came: the task fails with the exporter's own message
    logged = "".join(capfd.readouterr())
    assert message in logged and info.value.summary.table() in logged
    assert [m for _, m in FAILURES.values() if m != message and m in logged] == []
    assert "export summary:" not in logged  # no success summary for a failed run
    held = mailchimp_members(sandbox.state(), MAILCHIMP_AUDIENCE_ID)
    expected = {"batch failed": (0, set()), "rejected share": (3, set(EMAILS)), "mass leave": (0, set(EMAILS))}
    assert (info.value.summary.accepted, set(held)) == expected[failure]


def _spy_on_closing(monkeypatch) -> dict[str, int]:
    """Count the close() calls of the source and state store the operator opens (the real ones still run)."""
    closed = {"source": 0, "state": 0}

    def counting(name, obj):
        real_close = obj.close

        def close():
            closed[name] += 1
            real_close()

        obj.close = close
        return obj

    real_source_for, real_open = operator_module.source_for, operator_module.StateStore.open
    monkeypatch.setattr(operator_module, "source_for", lambda spec: counting("source", real_source_for(spec)))
    monkeypatch.setattr(operator_module.StateStore, "open", lambda *a: counting("state", real_open(*a)))
    return closed


def test_source_and_state_are_closed_after_a_run(warehouse, sandbox, monkeypatch):
    closed = _spy_on_closing(monkeypatch)
    operator().execute({"run_id": "ok"})
    assert closed == {"source": 1, "state": 1}


def test_source_and_state_are_closed_when_the_run_fails_before_sending(warehouse, sandbox, monkeypatch):
    closed = _spy_on_closing(monkeypatch)
    with pytest.raises(LimitExceededError, match="nothing was sent"):
        operator(raw_spec(limit={"max_profiles": 2})).execute({"run_id": "over"})
    assert closed == {"source": 1, "state": 1} and writes(sandbox) == 0


# -- lineage ----------------------------------------------------------------------------------------------------

def _output(lineage):
    (output,) = lineage.outputs
    return output


def test_lineage_names_the_destination_by_its_connection_and_counts_what_was_accepted(warehouse, sandbox):
    op = operator()
    before = _output(op.get_openlineage_facets_on_complete(None))
    host = urlsplit(sandbox.mailchimp_host).netloc  # the API's host, without its /3.0 path
    assert (before.namespace, before.name) == (f"mailchimp://{host}", MAILCHIMP_AUDIENCE_ID)
    assert before.outputFacets == {}  # nothing run yet: no count
    op.execute({"run_id": "r"})
    after = _output(op.get_openlineage_facets_on_complete(None))
    assert after.outputFacets["outputStatistics"].rowCount == 3
    (source,) = op.get_openlineage_facets_on_complete(None).inputs
    assert (source.namespace, source.name) == ("sql://warehouse", "segment_members")


def test_lineage_without_the_connection_falls_back_to_the_public_api_host(monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_MAILCHIMP_DEFAULT", raising=False)
    assert _output(operator().get_openlineage_facets_on_complete(None)).namespace == "mailchimp://api.mailchimp.com"


# -- deferrable -----------------------------------------------------------------------------------------------

def _first_event(trigger):
    import asyncio

    async def first():
        async for event in trigger.run():
            return event.payload

    return asyncio.run(first())


def test_a_deferrable_export_submits_defers_to_the_jobs_trigger_and_finishes_in_execute_complete(warehouse, sandbox):
    from airflow.sdk.exceptions import TaskDeferred

    from segment_export.triggers.jobs import DestinationJobsTrigger

    op = operator(raw_spec(KLAVIYO, deferrable=True, sync={"on_leave": "remove", "allow_mass_leave": True}))
    with pytest.raises(TaskDeferred) as deferred:
        op.execute({"run_id": "deferred"})
    trigger = deferred.value.trigger
    assert isinstance(trigger, DestinationJobsTrigger) and deferred.value.method_name == "execute_complete"
    handles = trigger.handles
    assert handles  # the Klaviyo job ids, kept in the in-flight table until execute_complete records them
    inflight = sql(warehouse, "SELECT count(DISTINCT batch_id) FROM segment_export_inflight_batches")[0][0]
    assert inflight == len(handles)

    event = _first_event(trigger)  # what the triggerer runs
    assert event == {"status": "success", "handles": handles}
    value = op.execute_complete({"run_id": "deferred"}, event)
    assert value["sent"] == value["accepted"] == 3 and value["rejected"] == value["skipped"] == 0
    assert set(klaviyo_profiles(sandbox.state(), KLAVIYO_LIST_ID)) == set(EMAILS)
    assert sql(warehouse, "SELECT count(*) FROM segment_export_inflight_batches")[0][0] == 0
    outcomes = sql(warehouse, f"SELECT action, count(*) FROM {OUTCOMES_TABLE} WHERE run_id = 'deferred' GROUP BY 1")
    assert dict(outcomes) == {"created": 3}

    # A leaver is applied by the pass that awaits the jobs, not by the submit pass.
    sql(warehouse, "DELETE FROM segment_members WHERE email = ?", (EMAILS[0],))
    again = op.execute({"run_id": "second"})  # nothing to submit: no deferral, the leaver goes at once
    assert again["removed"] == 1 and again["sent"] == 0
    assert set(klaviyo_profiles(sandbox.state(), KLAVIYO_LIST_ID)) == set(EMAILS[1:])


def test_a_failed_wait_fails_the_task_with_the_triggers_message(warehouse, sandbox):
    op = operator(raw_spec(KLAVIYO, deferrable=True))
    with pytest.raises(operator_module.ExportWaitError, match="HTTP 401"):
        op.execute_complete({"run_id": "x"}, {"status": "error", "message": "GET ... failed: HTTP 401"})


def test_deferrable_is_refused_for_a_destination_without_jobs():
    with pytest.raises(ValidationError, match="no jobs to wait for"):
        operator(raw_spec(MAILCHIMP, deferrable=True))


def test_deferrable_is_refused_for_a_subscribing_klaviyo_export():
    subscribing = {**KLAVIYO, "subscribe": True}
    with pytest.raises(ValidationError, match="cannot defer yet"):
        operator(raw_spec(subscribing, deferrable=True, mapping={"email": "email", "consent": "first_name"}))


def _deferred_run(op, run_id: str, params: dict | None = None) -> dict:
    from airflow.sdk.exceptions import TaskDeferred

    context = {"run_id": run_id, "params": params or {}}
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(context)
    return op.execute_complete(context, _first_event(deferred.value.trigger))


def test_a_deferred_run_counts_a_rejection_and_a_resync_once(warehouse, sandbox):
    # The sandbox refuses this address in the import job (Klaviyo's own rule), after our validation let it through.
    sql(warehouse, "INSERT INTO segment_members VALUES ('a..b@example.com', 'Ada', 'vip')")
    op = operator(raw_spec(KLAVIYO, deferrable=True, limit={"max_rejected_share": 0.5}))
    value = _deferred_run(op, "first")
    assert (value["read"], value["sent"], value["accepted"], value["rejected"]) == (4, 4, 3, 1)
    rows = sql(warehouse, f"SELECT action, count(*) FROM {OUTCOMES_TABLE} WHERE run_id = 'first' GROUP BY 1")
    assert dict(rows) == {"created": 3, "rejected": 1}
    jobs = sandbox.state()["requests"]["by_endpoint"]["POST /api/profile-bulk-import-jobs"]["count"]
    resync = _deferred_run(op, "resync", {"full_resync": True})
    assert (resync["sent"], resync["accepted"], resync["rejected"]) == (4, 3, 1)  # each profile once, not twice
    assert sandbox.state()["requests"]["by_endpoint"]["POST /api/profile-bulk-import-jobs"]["count"] == jobs + 1
