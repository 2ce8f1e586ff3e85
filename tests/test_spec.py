"""Spec validation and its error messages: every error names the file, the export and the field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from segment_export.destinations import destination_type
from segment_export.spec import load_specs, parse_spec_file

GOOD = """
exports:
  - id: vip_to_klaviyo
    privacy_acknowledged: true
    source: {conn_id: warehouse, table: analytics.segment_members, segment_column: segment, segments: [vip]}
    destination: {type: klaviyo, list_id: Y6nRLr}
    mapping: {email: email, first_name: first_name, attributes: {loyalty_tier: tier}}
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def only_error(path: Path):
    specs, errors = parse_spec_file(path)
    assert specs == [] and len(errors) == 1, errors
    return errors[0]


def test_good_spec_gets_defaults(tmp_path):
    specs, errors = parse_spec_file(write(tmp_path, "a.yaml", GOOD))
    assert errors == []
    (spec,) = specs
    assert spec.id == "vip_to_klaviyo"
    assert spec.destination.connection_id == "klaviyo_default"
    assert spec.max_profiles == destination_type("klaviyo").max_profiles == 100_000
    assert spec.limit.on_exceed == "fail"
    assert spec.mapping.columns() == ["email", "first_name", "tier"]
    assert spec.source.kind == "table"


def test_mailchimp_default_limit_is_one_million(tmp_path):
    text = GOOD.replace("{type: klaviyo, list_id: Y6nRLr}", "{type: mailchimp, audience_id: a1, new_member_status: pending}")
    text = text.replace("loyalty_tier", "TIER")
    (spec,), _ = parse_spec_file(write(tmp_path, "a.yaml", text))
    assert spec.max_profiles == 1_000_000


def test_unknown_key_is_an_error_naming_file_export_and_field(tmp_path):
    path = write(tmp_path, "typo.yaml", GOOD.replace("first_name: first_name", "firstname: first_name"))
    error = only_error(path)
    assert error.file == str(path) and error.export_id == "vip_to_klaviyo" and error.field == "mapping.firstname"
    assert "unknown key" in str(error) and "typo.yaml" in str(error) and "'mapping.firstname'" in str(error)


def test_missing_list_id(tmp_path):
    error = only_error(write(tmp_path, "a.yaml", GOOD.replace(", list_id: Y6nRLr", "")))
    assert error.field == "destination"
    assert "give either 'list_id'" in error.reason


def test_unknown_destination_type(tmp_path):
    error = only_error(write(tmp_path, "a.yaml", GOOD.replace("type: klaviyo", "type: hubspot")))
    assert error.field == "destination"
    assert "klaviyo" in error.reason and "mailchimp" in error.reason


def test_privacy_must_be_acknowledged(tmp_path):
    error = only_error(write(tmp_path, "a.yaml", GOOD.replace("privacy_acknowledged: true", "privacy_acknowledged: false")))
    assert error.field == "privacy_acknowledged" and "compliance boundary" in error.reason


def test_truncate_needs_order_by(tmp_path):
    text = GOOD + "    limit: {max_profiles: 10, on_exceed: truncate}\n"
    error = only_error(write(tmp_path, "a.yaml", text))
    assert error.field == "limit" and "order_by" in error.reason


@pytest.mark.parametrize(
    "source, message",
    [
        ("{conn_id: w}", "exactly one of 'table', 'query' or 'path'"),
        ("{conn_id: w, table: t, query: 'select 1'}", "exactly one of"),
        ("{table: t}", "'conn_id' is required"),
        ("{conn_id: w, table: t, segments: [a]}", "'segments' needs 'segment_column'"),
        ("{path: data.txt}", "cannot infer the file format"),
    ],
)
def test_source_rules(tmp_path, source, message):
    text = GOOD.replace(
        "{conn_id: warehouse, table: analytics.segment_members, segment_column: segment, segments: [vip]}", source
    )
    error = only_error(write(tmp_path, "a.yaml", text))
    assert error.field == "source" and message in error.reason


def test_mailchimp_rules(tmp_path):
    text = GOOD.replace("{type: klaviyo, list_id: Y6nRLr}", "{type: mailchimp, audience_id: a1}")
    error = only_error(write(tmp_path, "a.yaml", text))
    assert error.field == "destination.new_member_status"
    text = GOOD.replace("{type: klaviyo, list_id: Y6nRLr}", "{type: mailchimp, audience_id: a1, new_member_status: subscribed}")
    error = only_error(write(tmp_path, "b.yaml", text))  # 'loyalty_tier' is not a merge tag
    assert "merge tags" in error.reason and "loyalty_tier" in error.reason


def test_bad_schedule_and_bad_id(tmp_path):
    error = only_error(write(tmp_path, "a.yaml", GOOD.replace("privacy_acknowledged", "schedule: every day\n    privacy_acknowledged")))
    assert error.field == "schedule"
    error = only_error(write(tmp_path, "b.yaml", GOOD.replace("id: vip_to_klaviyo", "id: vip to klaviyo")))
    assert error.field == "id" and error.export_id == "vip to klaviyo"


def test_malformed_yaml_names_line(tmp_path):
    error = only_error(write(tmp_path, "a.yaml", "exports:\n  - id: [unclosed\n"))
    assert "malformed YAML" in error.reason and "line" in error.reason and error.file.endswith("a.yaml")


def test_top_level_must_be_exports(tmp_path):
    error = only_error(write(tmp_path, "a.yaml", "export: []\n"))
    assert error.field == "exports"


def test_one_bad_export_does_not_hide_the_good_one(tmp_path):
    bad = GOOD.replace("id: vip_to_klaviyo", "id: second").replace("list_id: Y6nRLr", "list_idd: Y6nRLr")
    text = GOOD + bad.split("exports:\n", 1)[1]
    specs, errors = parse_spec_file(write(tmp_path, "a.yaml", text))
    assert [s.id for s in specs] == ["vip_to_klaviyo"]
    assert {e.export_id for e in errors} == {"second"}


def test_folder_load_rejects_duplicate_ids_and_keeps_going(tmp_path):
    write(tmp_path, "a.yaml", GOOD)
    write(tmp_path, "b.yaml", GOOD)
    write(tmp_path, "c.yml", GOOD.replace("vip_to_klaviyo", "other"))
    write(tmp_path, "notes.txt", "not a spec")
    specs, errors = load_specs(tmp_path)
    assert sorted(s.id for s in specs) == ["other", "vip_to_klaviyo"]
    assert len(errors) == 1 and errors[0].field == "id" and "already used" in errors[0].reason
    assert errors[0].file.endswith("b.yaml")


def test_relative_file_paths_resolve_against_the_spec(tmp_path):
    text = GOOD.replace(
        "{conn_id: warehouse, table: analytics.segment_members, segment_column: segment, segments: [vip]}",
        "{path: data/seg.parquet}",
    )
    (spec,), _ = parse_spec_file(write(tmp_path, "a.yaml", text))
    assert spec.source.path == str((tmp_path / "data" / "seg.parquet").resolve())
    assert spec.source.file_format == "parquet"


@pytest.mark.parametrize("table", ["segment_members; DROP TABLE x", "t -- comment", "a'b", ""])
def test_table_name_carrying_sql_is_a_spec_error(tmp_path, table):
    text = GOOD.replace("table: analytics.segment_members", f"table: {table!r}" if table else "table: ''")
    error = only_error(write(tmp_path, "a.yaml", text))
    assert error.field == "source.table"
    assert "SQL punctuation" in error.reason or "exactly one" in error.reason


def test_pool_reaches_the_export_task(tmp_path):
    from segment_export.dag_factory import export_dag

    (spec,), _ = parse_spec_file(write(tmp_path, "a.yaml", GOOD.replace("privacy_acknowledged", "pool: mailchimp_key_1\n    privacy_acknowledged")))
    assert export_dag(spec).get_task("export").pool == "mailchimp_key_1"


# --- values Airflow would refuse, caught by the spec (per export, naming the file, export and field) ----------


def with_key(text: str, line: str) -> str:
    """GOOD with one more top-level key in its export."""
    return text.replace("    privacy_acknowledged", f"    {line}\n    privacy_acknowledged", 1)


@pytest.mark.parametrize(
    "schedule, message",
    [
        ('"61 25 * * *"', "is not a cron expression Airflow accepts"),
        ('"*/0 * * * *"', "is not a cron expression Airflow accepts"),
        ("'@daly'", "is not a schedule preset Airflow knows (@hourly, @daily"),
        ("'@reboot'", "is not a schedule preset Airflow knows"),
        ('"0 0 31 2 *"', "never fires"),
        ("every day", "is not a cron expression"),
    ],
)
def test_a_schedule_airflow_refuses_is_a_spec_error(tmp_path, schedule, message):
    path = write(tmp_path, "sched.yaml", with_key(GOOD, f"schedule: {schedule}"))
    error = only_error(path)
    assert (error.file, error.export_id, error.field) == (str(path), "vip_to_klaviyo", "schedule")
    assert message in error.reason and "sched.yaml" in str(error)


@pytest.mark.parametrize("schedule", ["'@daily'", "'@once'", "'@continuous'", "'@quarterly'", '"0 6 * * 1-5"', '"*/15 * * * *"'])
def test_schedules_airflow_accepts_are_accepted(tmp_path, schedule):
    (spec,), errors = parse_spec_file(write(tmp_path, "a.yaml", with_key(GOOD, f"schedule: {schedule}")))
    assert errors == [] and spec.schedule == schedule.strip("'\"")


def test_a_bad_schedule_hides_no_other_export_or_error(tmp_path):
    second = GOOD.split("exports:\n", 1)[1].replace("vip_to_klaviyo", "second")
    third = GOOD.split("exports:\n", 1)[1].replace("vip_to_klaviyo", "third").replace("list_id: Y6nRLr", "lst_id: Y6nRLr")
    text = with_key(GOOD, 'schedule: "61 25 * * *"') + second + third
    specs, errors = parse_spec_file(write(tmp_path, "a.yaml", text))
    assert [s.id for s in specs] == ["second"]
    assert sorted((e.export_id, e.field) for e in errors) == [("third", "destination.lst_id"), ("vip_to_klaviyo", "schedule")]


@pytest.mark.parametrize(
    "line, field, message",
    [
        ("tags: [ok, " + "t" * 101 + "]", "tags", "tag 2 has 101 characters; Airflow allows at most 100"),
        ("tags: ['']", "tags", "tag 1 is empty"),
        ("owner: ''", "owner", "at least 1 character"),
        ("owner: " + "o" * 2001, "owner", "at most 2000 characters"),
        ("name: " + "n" * 2001, "name", "at most 2000 characters"),
        ("pool: " + "p" * 257, "pool", "at most 256 characters"),
    ],
)
def test_values_airflow_refuses_are_spec_errors(tmp_path, line, field, message):
    path = write(tmp_path, "a.yaml", with_key(GOOD, line))
    error = only_error(path)
    assert (error.file, error.export_id, error.field) == (str(path), "vip_to_klaviyo", field)
    assert message in error.reason


def test_a_hundred_character_tag_is_fine(tmp_path):
    (spec,), _ = parse_spec_file(write(tmp_path, "a.yaml", with_key(GOOD, "tags: [" + "t" * 100 + "]")))
    assert spec.tags == ["t" * 100]


def test_an_id_with_a_trailing_newline_is_refused():
    from segment_export.spec import ExportSpec

    with pytest.raises(ValueError, match="it becomes the dag_id"):
        ExportSpec._valid_id("vip\n")


# --- reading the file: the C loader and a size cap ------------------------------------------------------------


def test_specs_are_parsed_with_the_c_loader(tmp_path, monkeypatch):
    import yaml

    assert yaml.__with_libyaml__  # PyYAML's wheels ship libyaml; the venv has it
    loaders = []
    real_load = yaml.load
    monkeypatch.setattr(yaml, "load", lambda stream, Loader: loaders.append(Loader) or real_load(stream, Loader))
    (spec,), _ = parse_spec_file(write(tmp_path, "a.yaml", GOOD))
    assert loaders == [yaml.CSafeLoader] and spec.id == "vip_to_klaviyo"


def test_a_spec_file_over_the_size_cap_is_an_error_naming_file_and_cap(tmp_path, monkeypatch):
    from segment_export.spec import DEFAULT_SPEC_MAX_BYTES, SPEC_MAX_BYTES_ENV

    assert DEFAULT_SPEC_MAX_BYTES == 10 * 1024 * 1024
    big = write(tmp_path, "big.yaml", GOOD + "# " + "x" * 2000 + "\n")
    write(tmp_path, "small.yaml", GOOD.replace("vip_to_klaviyo", "small"))
    monkeypatch.setenv(SPEC_MAX_BYTES_ENV, "1500")
    specs, errors = load_specs(tmp_path)
    assert [s.id for s in specs] == ["small"]
    (error,) = errors
    assert error.file == str(big) and "larger than the spec size cap of 1,500 bytes" in error.reason
    assert SPEC_MAX_BYTES_ENV in error.reason
    monkeypatch.setenv(SPEC_MAX_BYTES_ENV, "ten megabytes")
    error = only_error(big)
    assert "SEGMENT_EXPORT_SPEC_MAX_BYTES must be a positive number of bytes" in error.reason
    monkeypatch.delenv(SPEC_MAX_BYTES_ENV)
    assert parse_spec_file(big)[1] == [] and parse_spec_file(big, max_bytes=100)[1][0].reason.startswith("the file is larger")


# --- fields other parts of the product read --------------------------------------------------------------------


def test_mass_leave_guard_fields(tmp_path):
    (spec,), _ = parse_spec_file(write(tmp_path, "a.yaml", GOOD))
    assert spec.sync.max_leave_share == 0.2 and spec.sync.allow_mass_leave is False
    text = GOOD + "    sync: {max_leave_share: null, allow_mass_leave: true}\n"
    (spec,), _ = parse_spec_file(write(tmp_path, "b.yaml", text))
    assert spec.sync.max_leave_share is None and spec.sync.allow_mass_leave is True
    error = only_error(write(tmp_path, "c.yaml", GOOD + "    sync: {max_leave_share: 1.5}\n"))
    assert error.field == "sync.max_leave_share" and "less than or equal to 1" in error.reason


@pytest.mark.parametrize(
    "region, field, message",
    [
        ("us", "mapping.phone_region", "two upper-case letters"),
        ("USA", "mapping.phone_region", "two upper-case letters"),
        ("XX", "mapping.phone_region", "not a region the phone number library knows"),
    ],
)
def test_phone_region_is_an_iso_region(tmp_path, region, field, message):
    text = GOOD.replace("first_name: first_name,", f"first_name: first_name, phone_number: phone, phone_region: {region},")
    error = only_error(write(tmp_path, "a.yaml", text))
    assert error.field == field and message in error.reason


def test_phone_region_needs_a_phone_number(tmp_path):
    ok = GOOD.replace("first_name: first_name,", "first_name: first_name, phone_number: phone, phone_region: US,")
    (spec,), _ = parse_spec_file(write(tmp_path, "a.yaml", ok))
    assert spec.mapping.phone_region == "US"
    error = only_error(write(tmp_path, "b.yaml", GOOD.replace("first_name: first_name,", "first_name: first_name, phone_region: US,")))
    assert error.field == "mapping" and "'phone_region' applies to 'phone_number'" in error.reason
