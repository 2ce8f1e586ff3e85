"""The spec file's optional ``erasure`` block: parsed beside the exports, errors naming the file and the field."""

from __future__ import annotations

import textwrap

from segment_export.spec import load_spec_folder, load_specs, parse_spec_document

EXPORTS = """
exports:
  - id: vip
    privacy_acknowledged: true
    source: {conn_id: warehouse, table: segment_members}
    destination: {type: klaviyo, list_id: L}
    mapping: {email: email}
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_an_erasure_block_is_read_beside_the_exports(tmp_path):
    path = write(tmp_path, "team.yaml", EXPORTS + """
erasure:
  schedule: "@hourly"
  source: {path: requests.csv}
  mapping: {email: email_address, request_id: id, requested_at: asked_at}
""")
    specs, erasure, errors = parse_spec_document(path)
    assert errors == [] and [s.id for s in specs] == ["vip"]
    assert erasure.dag_id == "team_erasures" and erasure.schedule == "@hourly"
    assert erasure.source.path == str(tmp_path / "requests.csv")  # relative to the spec file, like an export's
    assert erasure.mapping.columns() == ["email_address", "id", "asked_at"]
    assert load_specs(tmp_path) == ([*specs], [])  # the exports-only view is unchanged


def test_erasure_errors_name_the_file_and_field_and_leave_the_exports_loading(tmp_path):
    write(tmp_path, "a.yaml", EXPORTS + """
erasure:
  schedule: "@daly"
  source: {conn_id: warehouse, table: requests, segment_column: s, segments: [x]}
  mapping: {email: email, request: id}
""")
    specs, erasures, errors = load_spec_folder(tmp_path)
    assert [s.id for s in specs] == ["vip"] and erasures == []
    text = sorted(str(e) for e in errors)
    file = tmp_path / "a.yaml"
    assert f"file {file}, field 'erasure.mapping.request': unknown key (not part of the erasure block; check its spelling)" in text
    assert f"file {file}, field 'erasure.mapping.request_id': Field required" in text
    assert any(t.startswith(f"file {file}, field 'erasure.schedule': '@daly' is not a schedule preset") for t in text)
    assert any("field 'erasure.source'" in t and "no segments" in t for t in text)


def test_an_erasure_dag_id_must_not_clash_with_an_export(tmp_path):
    write(tmp_path, "a.yaml", EXPORTS + """
erasure:
  id: vip
  source: {conn_id: warehouse, table: requests}
  mapping: {email: email, request_id: id}
""")
    _, erasures, errors = load_spec_folder(tmp_path)
    assert erasures == [] and [e.field for e in errors] == ["erasure.id"] and "already used" in str(errors[0])


def test_only_exports_and_erasure_are_top_level_keys(tmp_path):
    path = write(tmp_path, "a.yaml", EXPORTS + "erasures: {}\n")
    specs, erasure, errors = parse_spec_document(path)
    assert specs == [] and erasure is None and "top-level key 'exports'" in str(errors[0])
