"""Helpers for the sandbox tests: load the official specs and validate bodies against them.

The specs stay outside the project, in ``<repo>/../shared/reference/`` (read-only);
they are loaded at run time.  OpenAPI 3.0 is close to JSON Schema: ``$ref``s are
inlined, ``nullable: true`` becomes "or null", and OpenAPI-only keywords dropped.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import jsonschema
import pytest

REFERENCE = Path(
    os.environ.get("SEGMENT_EXPORT_REFERENCE") or Path(__file__).resolve().parents[2].parent / "shared" / "reference"
)
_DROP = {"example", "examples", "readOnly", "writeOnly", "xml", "externalDocs", "discriminator", "deprecated"}


def _require(path: Path) -> Path:
    if not path.exists():
        message = f"reference spec not found: {path} (set SEGMENT_EXPORT_REFERENCE to the reference folder)"
        if os.environ.get("CI"):
            pytest.fail(message)  # in CI the specs are beside the clone; a missing one must not pass as a skip
        pytest.skip(message)
    return path


@functools.lru_cache(maxsize=None)
def klaviyo_spec() -> dict[str, Any]:
    return json.loads(_require(REFERENCE / "klaviyo" / "stable.json").read_text())


@functools.lru_cache(maxsize=None)
def mailchimp_spec() -> dict[str, Any]:
    import yaml

    text = _require(REFERENCE / "mailchimp" / "marketing-3.0.55-openapi3.yaml").read_text()
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _to_jsonschema(spec: dict[str, Any], node: Any, depth: int = 0) -> Any:
    if isinstance(node, list):
        return [_to_jsonschema(spec, x, depth) for x in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        if depth > 25:
            return {}
        target: Any = spec
        for part in node["$ref"].lstrip("#/").split("/"):
            target = target[part]
        return _to_jsonschema(spec, target, depth + 1)
    out = {k: _to_jsonschema(spec, v, depth) for k, v in node.items() if k not in _DROP and not k.startswith("x-")}
    if out.pop("nullable", False):
        out = {"anyOf": [out, {"type": "null"}]}
    return out


def _relax_merge_fields(node: Any) -> Any:
    """The converted Mailchimp spec types merge-field *values* as objects (a converter
    artifact: real values are strings, or an object for address fields).  Trust the
    field lists, not that."""
    if isinstance(node, dict):
        return {k: ({"type": "object"} if k == "merge_fields" and isinstance(v, dict) and v.get("type") == "object" else _relax_merge_fields(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [_relax_merge_fields(x) for x in node]
    return node


@functools.lru_cache(maxsize=None)
def response_schema(api: str, path: str, method: str, status: str) -> str:
    """JSON Schema (as JSON text, for caching) of ``paths[path][method].responses[status]``."""
    spec = klaviyo_spec() if api == "klaviyo" else mailchimp_spec()
    responses = spec["paths"][path][method.lower()]["responses"]
    resp = responses.get(status) or responses.get(status[0] + "XX") or responses["default"]
    if "$ref" in resp:
        resp = _to_jsonschema(spec, resp)
    content = resp["content"]
    schema = next(iter(content.values()))["schema"]
    converted = _to_jsonschema(spec, schema)
    if api == "mailchimp":
        converted = _relax_merge_fields(converted)
    return json.dumps(converted)


def assert_matches_spec(api: str, path: str, method: str, response) -> dict[str, Any]:
    """Validate a ``requests`` response body against the official response schema."""
    body = response.json()
    schema = json.loads(response_schema(api, path, method, str(response.status_code)))
    jsonschema.validate(body, schema)
    return body


def assert_klaviyo_error(response, status: int, code: str, pointer: str | None = None) -> dict[str, Any]:
    """Klaviyo JSON:API error document: errors[] with id, status, code, title, detail, source.pointer."""
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/vnd.api+json")
    body = response.json()
    jsonschema.validate(body, json.loads(response_schema("klaviyo", "/api/lists", "get", "400")))
    (err,) = body["errors"]
    assert set(err) >= {"id", "status", "code", "title", "detail", "source"}
    assert err["status"] == status and err["code"] == code
    assert isinstance(err["source"]["pointer"], str)
    if pointer is not None:
        assert err["source"]["pointer"] == pointer, err
    return err


def assert_mailchimp_problem(response, status: int, title: str) -> dict[str, Any]:
    """Mailchimp problem+json: type, title, status, detail, instance."""
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/problem+json")
    body = response.json()
    jsonschema.validate(body, json.loads(response_schema("mailchimp", "/ping", "get", "default")))
    assert body["status"] == status and body["title"] == title, body
    return body
