"""What Airflow reads from the package and the generated DAGs: provider info (connection forms, asset URIs),
the trigger form's params, doc_md, tags, owner, assets, access control, alerting and lineage. In-process, no
running servers (the running deployment is checked in test_celery_deployment.py)."""

from __future__ import annotations

import textwrap
import warnings

import pytest
from airflow.sdk import Asset

from segment_export.dag_factory import SPEC_ERRORS_DAG_ID, build_dags, export_dag
from segment_export.spec import ExportSpec, load_specs

BASE = dict(
    id="metadata_klaviyo",
    privacy_acknowledged=True,
    owner="growth-data",
    tags=["vip"],
    source=dict(conn_id="warehouse", table="analytics.members", segment_column="segment", segments=["vip"]),
    destination=dict(type="klaviyo", list_id="Y6nRLr"),
    mapping=dict(email="email", first_name="first_name", attributes={"tier": "tier"}),
    limit=dict(max_profiles=5000),
)


def spec(**changes) -> ExportSpec:
    return ExportSpec.model_validate({**BASE, **changes})


# --- provider info, as Airflow's providers manager reads it ---------------------------------------------------


@pytest.fixture(scope="module")
def providers_manager():
    from airflow.providers_manager import ProvidersManager

    pm = ProvidersManager()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm.initialize_providers_hooks()
        pm.initialize_providers_asset_uri_resources()
    return pm, [w for w in caught if "segment_export" in str(w.message)]


def test_connection_types_come_from_provider_info_without_deprecated_hook_methods(providers_manager):
    pm, our_warnings = providers_manager
    assert "segment-export" in pm.providers
    assert our_warnings == []  # no "get_ui_field_behaviour is deprecated" for our hooks
    for conn_type, hook_class, key_label in [
        ("klaviyo", "segment_export.destinations.klaviyo.hook.KlaviyoHook", "Private API key"),
        ("mailchimp", "segment_export.destinations.mailchimp.hook.MailchimpHook", "API key"),
    ]:
        meta = {m.connection_type: m for m in pm.iter_connection_type_hook_ui_metadata()}[conn_type]
        assert meta.hook_class_name == hook_class
        behaviour = pm.field_behaviours[conn_type]
        assert set(behaviour["hidden_fields"]) == {"schema", "port", "login"}
        assert behaviour["relabeling"]["password"] == key_label
        widget = pm.connection_form_widgets[f"extra__{conn_type}__timeout"]
        assert widget.field["schema"]["title"] == "Request timeout (seconds)"
        assert widget.is_sensitive is False


def test_hook_meta_for_the_ui_names_our_fields(providers_manager):
    from airflow.api_fastapi.core_api.services.ui.connections import HookMetaService

    HookMetaService.hook_meta_data.cache_clear()
    meta = {m.connection_type: m for m in HookMetaService.hook_meta_data()}
    klaviyo = meta["klaviyo"]
    assert klaviyo.hook_name == "Klaviyo"
    std = klaviyo.standard_fields
    assert std.password.title == "Private API key" and std.port.hidden and std.login.hidden and std.url_schema.hidden
    assert std.host.title == "API base URL (optional)" and not std.host.hidden
    assert set(klaviyo.extra_fields) == {"timeout", "rate_budget_conn_id", "rate_limit_share"}
    assert meta["mailchimp"].standard_fields.password.placeholder == "0123…-us6"


def test_destination_asset_uris_are_validated_and_normalised_by_our_handler(providers_manager):
    assert Asset("klaviyo://Y6nRLr/").uri == "klaviyo://Y6nRLr"  # id case kept, trailing slash gone
    assert Asset("mailchimp://a1b2c3d4e5").uri == "mailchimp://a1b2c3d4e5"
    with pytest.raises(ValueError, match="takes no path"):
        Asset("klaviyo://Y6nRLr/profiles")
    with pytest.raises(ValueError, match="must name the audience id"):
        Asset("mailchimp://user@host")


# --- the generated DAG --------------------------------------------------------------------------------------


def test_dag_carries_owner_tags_and_a_readable_doc_table():
    dag = export_dag(spec(description="VIPs | daily"))
    assert dag.tags == {"segment-export", "klaviyo", "vip"} or set(dag.tags) == {"segment-export", "klaviyo", "vip"}
    assert dag.owner == "growth-data" and dag.tasks[0].owner == "growth-data"
    doc = dag.doc_md
    for line in [
        "| Destination | Klaviyo list `Y6nRLr` (connection `klaviyo_default`) |",
        "| Source | table `analytics.members` (connection `warehouse`), rows whose `segment` is `vip` |",
        "| Mapping | `email` → email, `first_name` → first_name, `tier` → attributes.tier |",
        "| Limit | 5,000 profiles, on exceed: fail |",
        "| Schedule | on demand only (trigger by hand) |",
    ]:
        assert line in doc
    assert "VIPs \\| daily" in doc  # a pipe in the description does not break the table


def test_trigger_form_params_validate_by_json_schema():
    from airflow.sdk.definitions.param import ParamsDict

    dag = export_dag(spec())
    schema = {k: p.schema for k, p in dag.params.items()}
    assert schema["dry_run"]["type"] == "boolean" and schema["full_resync"]["type"] == "boolean"
    assert schema["max_profiles"] == {**schema["max_profiles"], "type": ["null", "integer"], "minimum": 1, "maximum": 5000}
    assert dag.params.validate() == {"dry_run": False, "full_resync": False, "max_profiles": None, "allow_mass_leave": False,
                                     "verify": False, "verify_only": False, "repair": False}
    assert all(schema[k]["type"] == "boolean" for k in ("verify", "verify_only", "repair"))

    def check(**values):
        params = ParamsDict({k: v for k, v in dag.params.items()})
        params.update(values)
        return params.validate()

    assert check(max_profiles=5000, dry_run=True)["max_profiles"] == 5000
    for bad in ({"max_profiles": 5001}, {"max_profiles": 0}, {"max_profiles": "ten"}, {"dry_run": "yes"}, {"allow_mass_leave": "yes"},
                {"verify_only": "yes"}):
        with pytest.raises(Exception, match="Invalid input for param"):
            check(**bad)


def test_assets_inlet_outlet_and_schedule_on_the_source_asset():
    dag = export_dag(spec(schedule="@daily"))
    task = dag.tasks[0]
    assert [a.uri for a in task.inlets] == ["sql://warehouse/analytics.members"]
    assert [a.uri for a in task.outlets] == ["klaviyo://Y6nRLr"]
    assert dag.schedule == "@daily"

    on_asset = export_dag(spec(schedule_on_source_asset=True, source={**BASE["source"], "asset": "postgres://db:5432/dw/analytics/members"}))
    assert on_asset.timetable.asset_condition == Asset("postgres://db:5432/dw/analytics/members")
    assert "when the asset `postgres://db:5432/dw/analytics/members` is updated" in on_asset.doc_md

    mailchimp = export_dag(spec(destination=dict(type="mailchimp", audience_id="a1b2c3d4e5", new_member_status="pending"), mapping=dict(email="email")))
    assert [a.uri for a in mailchimp.tasks[0].outlets] == ["mailchimp://a1b2c3d4e5"]


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(schedule="@daily", schedule_on_source_asset=True), "give either 'schedule' or this option"),
        (dict(source=dict(conn_id="w", query="SELECT 1"), schedule_on_source_asset=True), "the source has no asset"),
        (dict(source={**BASE["source"], "asset": "not a uri"}), "is not an asset URI"),
        (dict(source={**BASE["source"], "asset": "airflow://x"}), "reserved"),
        (dict(access_control={"Marketing": ["read", "launch"]}), "Input should be 'read', 'trigger', 'edit' or 'delete'"),
        (dict(access_control={"Marketing": []}), "give at least one of"),
        (dict(alerts={"email": ["not-an-address"]}), "1 entry is not an e-mail address"),
        (dict(alerts={"callback": "not a path"}), "is not an import path"),
        (dict(alerts={"emails": ["a@b.co"]}), "Extra inputs are not permitted"),
    ],
)
def test_bad_airflow_options_are_spec_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        spec(**changes)


def test_access_control_becomes_dag_permissions_per_role():
    dag = export_dag(spec(access_control={"Marketing": ["read", "trigger"], "Data": ["edit", "delete"]}))
    assert dag.access_control == {
        "Marketing": {"DAGs": {"can_read"}, "DAG Runs": {"can_read", "can_create"}},
        "Data": {"DAGs": {"can_read", "can_edit", "can_delete"}, "DAG Runs": {"can_read", "can_create", "can_edit", "can_delete"}},
    }
    assert export_dag(spec()).access_control is None


def test_alerts_become_failure_callbacks(tmp_path):
    from airflow.providers.smtp.notifications.smtp import SmtpNotifier

    dag = export_dag(spec(alerts={"email": ["data-oncall@example.org"], "smtp_conn_id": "smtp_alerts",
                                  "callback": "segment_export.notifications.import_callable"}))
    callbacks = dag.tasks[0].on_failure_callback
    notifier, func = callbacks
    assert isinstance(notifier, SmtpNotifier) and notifier.to == ["data-oncall@example.org"]
    assert notifier.smtp_conn_id == "smtp_alerts" and "failed" in notifier.subject
    from segment_export.notifications import import_callable

    assert func is import_callable
    assert not export_dag(spec()).tasks[0].on_failure_callback


def test_a_callback_that_does_not_import_is_an_import_error_naming_the_export(tmp_path):
    (tmp_path / "a.yaml").write_text(textwrap.dedent("""
        exports:
          - id: good_one
            privacy_acknowledged: true
            source: {conn_id: w, table: t}
            destination: {type: klaviyo, list_id: L}
            mapping: {email: email}
          - id: bad_alerts
            privacy_acknowledged: true
            source: {conn_id: w, table: t}
            destination: {type: klaviyo, list_id: L}
            mapping: {email: email}
            alerts: {callback: no_such_module_xyz.page}
    """))
    dags = build_dags(tmp_path)
    assert set(dags) == {"good_one", SPEC_ERRORS_DAG_ID}
    with pytest.raises(ValueError) as err:
        dags[SPEC_ERRORS_DAG_ID].validate()
    assert "export 'bad_alerts', field 'alerts.callback': cannot import module 'no_such_module_xyz'" in str(err.value)


def test_openlineage_facets_name_the_segment_and_the_destination(airflow_conn):
    pytest.importorskip("airflow.providers.openlineage")
    airflow_conn("klaviyo_default", conn_type="klaviyo", host="http://127.0.0.1:8765", password="pk_not_used")
    op = export_dag(spec()).tasks[0]
    op._summary = {"accepted": 42, "dry_run": False}
    lineage = op.get_openlineage_facets_on_complete(None)
    (inp,), (out,) = lineage.inputs, lineage.outputs
    assert (inp.namespace, inp.name) == ("sql://warehouse", "analytics.members")
    assert [f.name for f in inp.facets["schema"].fields] == ["email", "first_name", "tier"]
    assert (out.namespace, out.name) == ("klaviyo://127.0.0.1:8765", "Y6nRLr")
    assert [f.name for f in out.facets["schema"].fields] == ["email", "first_name", "attributes.tier"]
    assert out.outputFacets["outputStatistics"].rowCount == 42


def test_demo_specs_still_load():
    specs, errors = load_specs("dags/exports")
    assert errors == [] and len(specs) == 3
    assert all(export_dag(s).params for s in specs)


def test_one_list_per_segment_gives_one_outlet_and_one_lineage_output_per_list(airflow_conn):
    lists_spec = spec(
        source={**BASE["source"], "segments": ["vip", "newsletter"]},
        destination=dict(type="klaviyo", lists={"vip": "VipL1st", "newsletter": "NewsL1st"}),
    )
    dag = export_dag(lists_spec)
    assert sorted(a.uri for a in dag.tasks[0].outlets) == ["klaviyo://NewsL1st", "klaviyo://VipL1st"]
    assert "Klaviyo lists `VipL1st` (segment `vip`), `NewsL1st` (segment `newsletter`)" in dag.doc_md
    pytest.importorskip("airflow.providers.openlineage")
    airflow_conn("klaviyo_default", conn_type="klaviyo", password="pk_not_used")
    lineage = dag.tasks[0].get_openlineage_facets_on_complete(None)
    assert sorted((o.namespace, o.name) for o in lineage.outputs) == [
        ("klaviyo://a.klaviyo.com", "NewsL1st"), ("klaviyo://a.klaviyo.com", "VipL1st")]
