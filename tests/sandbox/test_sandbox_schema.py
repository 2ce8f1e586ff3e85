"""The sandbox's per-profile helpers: the compiled schema check answers like the reference walk, ULIDs are
well-formed and ordered, json_size is the compact UTF-8 size."""

from __future__ import annotations

import copy
import json
import random
import re

import pytest

from segment_export_sandbox import common, klaviyo, mailchimp
from segment_export_sandbox.common import _conforms, compiled_schema, json_size, new_ulid, validate_schema

SCHEMAS = {
    name: value
    for module in (klaviyo, mailchimp)
    for name, value in vars(module).items()
    if name.isupper() and name.endswith("SCHEMA") and isinstance(value, dict)
}

_SCALARS = [None, True, False, 0, 1, -3, 2.5, float("inf"), "", "x", "profile", "list", "SUBSCRIBED", "subscribed", "html", "é"]


def _value_for(schema: dict, rng: random.Random, depth: int = 0) -> object:
    """Mostly valid values for ``schema``, with random mistakes (wrong types, nulls, unknown or missing keys)."""
    roll = rng.random()
    if roll < 0.06 or depth > 6:
        return rng.choice(_SCALARS + [{}, [], {"x": 1}, ["a"]])
    if "oneOf" in schema:
        return _value_for(rng.choice(schema["oneOf"]), rng, depth + 1)
    if "enum" in schema and rng.random() < 0.8:
        return rng.choice(schema["enum"])
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        out = {}
        for key, sub in schema.get("properties", {}).items():
            if key in schema.get("required", ()) and rng.random() < 0.97 or rng.random() < 0.5:
                out[key] = _value_for(sub, rng, depth + 1)
        if rng.random() < 0.1:
            out[rng.choice(["extra", "zz", "type"])] = rng.choice(_SCALARS)
        return out
    if kind == "array":
        n = rng.choice([0, 1, 2, 3])
        return [_value_for(schema.get("items") or {}, rng, depth + 1) for _ in range(n)]
    if kind == "string":
        return rng.choice(["a@b.co", "x", ""]) if rng.random() < 0.9 else rng.choice(_SCALARS)
    if kind == "boolean":
        return rng.random() < 0.5 if rng.random() < 0.9 else rng.choice(_SCALARS)
    if kind in ("number", "integer"):
        return rng.choice([1, 2.5, -1]) if rng.random() < 0.9 else rng.choice(_SCALARS)
    return rng.choice(_SCALARS)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_compiled_check_answers_like_the_reference_walk(name):
    schema = SCHEMAS[name]
    rng = random.Random(name)
    check = compiled_schema(schema)
    verdicts = set()
    for _ in range(3000):
        value = _value_for(schema, rng)
        expected = _conforms(value, schema)
        assert check(value) is expected, (name, value)
        assert (validate_schema(value, schema) is None) is expected
        verdicts.add(expected)
    assert verdicts == {True, False}  # the generator reached both answers


def test_compiled_check_on_a_real_job_body_and_its_mistakes():
    profile = {"type": "profile", "attributes": {"email": "a@b.co", "first_name": None, "properties": {"k": [1]},
                                                 "location": {"latitude": 1.5, "city": "X"}}, "meta": {"patch_properties": {"unset": ["a"]}}}
    body = {"data": {"type": "profile-bulk-import-job", "attributes": {"profiles": {"data": [copy.deepcopy(profile) for _ in range(3)]}},
                     "relationships": {"lists": {"data": [{"type": "list", "id": "L"}]}}}}
    schema = klaviyo.BULK_IMPORT_SCHEMA
    assert compiled_schema(schema)(body) and _conforms(body, schema)
    for path, bad in [(("attributes", "email"), 5), (("attributes", "nope"), "x"), (("type",), "list"), (("attributes", "location", "latitude"), True),
                      (("attributes", "properties"), "s"), (("meta", "patch_properties", "unset"), 3), (("attributes",), None)]:
        broken = copy.deepcopy(body)
        node = broken["data"]["attributes"]["profiles"]["data"][1]
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = bad
        assert compiled_schema(schema)(broken) is False is _conforms(broken, schema), path
        assert validate_schema(broken, schema).pointer.startswith("/data/attributes/profiles/data/1")


def test_compiled_schema_is_rebuilt_for_another_schema_at_a_reused_address():
    first = {"type": "string"}
    assert compiled_schema(first)("x")
    common._compiled_schemas[id(first)] = ({"type": "string"}, lambda v: True)  # stale entry for another object
    assert compiled_schema(first)(3) is False


_ULID = re.compile(r"^[0-7][0-9A-HJKMNP-TV-Z]{25}$")


def test_ulids_are_well_formed_unique_and_ordered():
    ids = [new_ulid() for _ in range(20_000)]
    assert all(_ULID.match(i) for i in ids)
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)  # monotonic, within a millisecond too


def test_ulid_time_part_is_the_millisecond(monkeypatch):
    monkeypatch.setattr(common.time, "time", lambda: 1_700_000_000.123)
    monkeypatch.setattr(common, "_ulid_state", [-1, "", 0, ""])
    value = 1_700_000_000_123
    text = "".join(common._CROCKFORD_PAIRS[(value >> s) & 1023] for s in (40, 30, 20, 10, 0))
    a, b = new_ulid(), new_ulid()
    assert a[:10] == b[:10] == text
    assert a < b  # the same millisecond: the random part moved on


def test_ulid_stays_ordered_when_the_clock_steps_back(monkeypatch):
    now = [1_700_000_000.5]
    monkeypatch.setattr(common.time, "time", lambda: now[0])
    monkeypatch.setattr(common, "_ulid_state", [-1, "", 0, ""])
    a = new_ulid()
    now[0] -= 5
    b = new_ulid()
    now[0] += 10
    c = new_ulid()
    assert a < b < c and a[:10] == b[:10] != c[:10]


def test_ulid_carries_into_the_head_of_the_random_part(monkeypatch):
    monkeypatch.setattr(common.time, "time", lambda: 1_700_000_000.5)
    monkeypatch.setattr(common, "_ulid_state", [-1, "", 0, ""])
    new_ulid()
    state = common._ulid_state
    state[2], state[3] = (state[2] | 1023) - 1, ""  # next increments: ...1023, then a carry out of the last 10 bits
    a, b, c = new_ulid(), new_ulid(), new_ulid()
    assert a < b < c and a[-2:] == "ZZ" and b[-2:] == "00" and a[10:24] != b[10:24] == c[10:24]
    decoded = sum(common._CROCKFORD.index(ch) << (5 * (25 - i)) for i, ch in enumerate(c))
    assert decoded & ((1 << 80) - 1) == state[2]


@pytest.mark.parametrize(
    "value", [{"a": [1, 2.5, None, True, "é\u2028", float("nan")]}, [], {}, 1e300, "x\"\\", {"k": "\U0001F600\n"}, 7, None]
)
def test_json_size_is_the_compact_utf8_size(value):
    assert json_size(value) == len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def test_json_size_keeps_the_encoders_errors():
    loop: list = []
    loop.append(loop)
    for _ in range(2):
        with pytest.raises(ValueError, match="Circular"):
            json_size({"x": loop})
    assert json_size({"b": [1]}) == 9  # the encoder is usable again
    with pytest.raises(UnicodeEncodeError):
        json_size({"a": "\ud800"})
