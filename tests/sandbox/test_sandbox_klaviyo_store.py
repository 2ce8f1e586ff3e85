"""The Klaviyo sandbox's compact store: a bulk import job decoded straight into structs answers exactly as the
general JSON + schema walk does, import errors keep the submitted payload, a complete job drops its profiles, and
a stored profile stays small (a 10,000,000-profile benchmark has to fit the machine)."""

from __future__ import annotations

import gc
import json
import re
import tracemalloc

import pytest

from segment_export_sandbox import KLAVIYO_API_KEY, KLAVIYO_LIST_ID, KLAVIYO_REVISION, Sandbox, SandboxConfig
from segment_export_sandbox import klaviyo
from segment_export_sandbox.common import ApiRequest

HEADERS = {"Authorization": f"Klaviyo-API-Key {KLAVIYO_API_KEY}", "revision": KLAVIYO_REVISION,
           "Content-Type": "application/vnd.api+json"}
JOBS = "/api/profile-bulk-import-jobs"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def service() -> tuple[Sandbox, Clock]:
    sb = Sandbox(SandboxConfig(rate_limits=False))
    clock = Clock()
    sb.klaviyo.clock = clock
    return sb, clock


def call(sb: Sandbox, method: str, target: str, body: bytes = b"") -> tuple[int, dict]:
    _, response = sb.process(sb.klaviyo, ApiRequest.build(method, target, HEADERS, body))
    return response.status, json.loads(response.encoded() or b"null")


def job(*resources: dict, lists: tuple[str, ...] = (KLAVIYO_LIST_ID,), **data: object) -> bytes:
    body: dict = {"data": {"type": "profile-bulk-import-job", "attributes": {"profiles": {"data": list(resources)}}, **data}}
    if lists:
        body["data"]["relationships"] = {"lists": {"data": [{"type": "list", "id": lid} for lid in lists]}}
    return json.dumps(body).encode()


def profile(**attributes: object) -> dict:
    return {"type": "profile", "attributes": attributes}


BODIES = {
    "plain": job(profile(email="a@example.com", first_name="Ann", properties={"tier": "gold", "ltv": 1.5}),
                 profile(email="A@EXAMPLE.COM", last_name="Lee", location={"city": "Boston", "latitude": 42.36}),
                 profile(phone_number="+12015550100", external_id="7"), profile(email="bad-address"), profile(first_name="x")),
    "unknown key beside a profile's attributes": job({**profile(email="b@example.com"), "relationships": {}}),
    "meta patch": job({**profile(email="c@example.com", properties={"tags": ["a"]}),
                       "meta": {"patch_properties": {"append": {"tags": "b"}, "unset": ["x"]}}}),
    "profile id and nulls": job({**profile(email="d@example.com", first_name=None, properties=None, location=None), "id": None}),
    "no lists": job(profile(email="e@example.com"), lists=()),
    "unknown key in data": job(profile(email="f@example.com"), meta={"x": 1}),
    "NaN (only json.loads takes it)": b'{"data":{"type":"profile-bulk-import-job","attributes":{"profiles":{"data":'
                                      b'[{"type":"profile","attributes":{"email":"g@example.com","properties":{"n":NaN}}}]}}}}',
    # refused, each with the general walk's error
    "unknown attribute": job(profile(email="h@example.com", emial="x")),
    "attribute of the wrong type": job(profile(email="i@example.com", first_name=12)),
    "location with an unknown key": job(profile(email="j@example.com", location={"planet": "Mars"})),
    "latitude a boolean": job(profile(email="k@example.com", location={"latitude": True})),
    "meta null": job({**profile(email="l@example.com"), "meta": None}),
    "patch_properties with an unknown key": job({**profile(email="m@example.com"), "meta": {"patch_properties": {"add": {}}}}),
    "profile type": job({**profile(email="n@example.com"), "type": "person"}),
    "job type": job(profile(email="o@example.com"), type="profile-bulk-import-jobs"),
    "list reference type": json.dumps({"data": {"type": "profile-bulk-import-job", "attributes": {"profiles": {"data": [
        profile(email="p@example.com")]}}, "relationships": {"lists": {"data": [{"type": "segment", "id": KLAVIYO_LIST_ID}]}}}}).encode(),
    "relationships null": job(profile(email="q@example.com"), lists=(), relationships=None),
    "no profiles": job(),
    "unknown list": job(profile(email="r@example.com"), lists=("NoSuch",)),
    "a profile over 100 KB": job(profile(email="s@example.com"), profile(email="t@example.com", properties={"blob": "x" * 103_000})),
    # 30 KB as sent, 114 KB as the compact JSON the cap is measured on (1e15 is written 1000000000000000.0)
    "a profile over 100 KB only once re-encoded": b'{"data":{"type":"profile-bulk-import-job","attributes":{"profiles":{"data":'
                                                  b'[{"type":"profile","attributes":{"email":"u@example.com","properties":{"n":['
                                                  + b",".join([b"1e15"] * 6_000) + b"]}}}]}}}}",
    "more than 10,000 profiles": job(*[profile(email=f"v{i}@example.com") for i in range(10_001)]),
    "not an object": b"[1, 2]",
}


_IDS = re.compile(r"\b[0-9A-HJKMNP-TV-Z]{26}\b|\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")


def outcome(general: bool, body: bytes, monkeypatch: pytest.MonkeyPatch) -> object:
    """What the sandbox answers and then holds once the job is complete (ids by their order of appearance)."""
    with monkeypatch.context() as patch:
        if general:
            patch.setattr(klaviyo, "_decode_job", lambda raw: None)
        sb, clock = service()
        answers = [call(sb, "POST", JOBS, body)]
    if answers[0][0] == 202:
        clock.now += 10
        job_id = answers[0][1]["data"]["id"]
        answers += [call(sb, "GET", f"{JOBS}/{job_id}"), call(sb, "GET", f"{JOBS}/{job_id}/import-errors"),
                    call(sb, "GET", f"{JOBS}/{job_id}/profiles"), call(sb, "GET", f"/api/lists/{KLAVIYO_LIST_ID}/profiles")]
    ids: dict[str, str] = {}
    text = _IDS.sub(lambda m: ids.setdefault(m.group(0), f"<id{len(ids)}>"), json.dumps([answers, sb.state()["klaviyo"]]))
    return json.loads(text)


@pytest.mark.parametrize("name", list(BODIES))
def test_typed_decoding_answers_as_the_general_walk(name, monkeypatch):
    body = BODIES[name]
    typed, general = outcome(False, body, monkeypatch), outcome(True, body, monkeypatch)
    assert typed == general
    accepted = ("plain", "unknown key beside a profile's attributes", "meta patch", "profile id and nulls", "no lists",
                "unknown key in data", "NaN (only json.loads takes it)")
    assert (typed[0][0][0] == 202) is (name in accepted), typed[0][0]


def test_typed_decoding_is_the_path_of_an_ordinary_job():
    assert klaviyo._decode_job(BODIES["plain"]) is not None
    assert klaviyo._decode_job(BODIES["unknown attribute"]) is None


def test_import_error_keeps_the_payload_as_submitted_and_a_complete_job_drops_its_profiles():
    sb, clock = service()
    status, answer = call(sb, "POST", JOBS, job(profile(phone_number="555", last_name="Lee", email="w@example.com"),
                                                 profile(email="x@example.com")))
    assert status == 202
    job_id = answer["data"]["id"]
    stored = next(iter(sb.klaviyo.accounts.values())).jobs[job_id]
    assert stored.resources is not None  # queued: the profiles are still to be processed
    clock.now += 10
    status, errors = call(sb, "GET", f"{JOBS}/{job_id}/import-errors")
    (error,) = errors["data"]
    assert list(error["attributes"]["original_payload"]) == ["phone_number", "last_name", "email"]
    assert error["attributes"]["source"] == {"pointer": "/data/attributes/profiles/data/0/attributes/phone_number"}
    assert stored.resources is None and stored.originals is None and stored.profile_ids == tuple(stored.profile_ids)
    _, profiles = call(sb, "GET", f"{JOBS}/{job_id}/profiles")
    assert [p["attributes"]["email"] for p in profiles["data"]] == ["x@example.com"]


def test_a_stored_profile_stays_small():
    """20,000 imported profiles of the benchmark's shape (email, names, phone, external id, two properties, one
    list). Stored as dicts they took ~2,100 bytes each; the structs take ~550 (the indexes' hash tables
    are not at their fullest at this size, so a few bytes more than at millions)."""
    sb, clock = service()
    bodies = [job(*[profile(email=f"p{i}@example.com", first_name="Ada", last_name="Lovelace", phone_number=f"+1201555{i:04d}",
                            external_id=str(i), properties={"loyalty_tier": "gold", "lifetime_value": i / 7})
                    for i in range(start, start + 10_000)]) for start in (0, 10_000)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for body in bodies:
            assert call(sb, "POST", JOBS, body)[0] == 202
        clock.now += 10
        sb.klaviyo.advance()
        gc.collect()
        per_profile = (tracemalloc.get_traced_memory()[0] - before) / 20_000
    finally:
        tracemalloc.stop()
    assert len(sb.state()["klaviyo"]["accounts"][next(iter(sb.klaviyo.accounts))]["profiles"]) == 20_000
    assert per_profile < 900, per_profile


NEW_PROFILES = [
    dict(email="a@example.com", first_name="Ada", last_name="Lovelace", phone_number="+12015550100", external_id="1",
         properties={"loyalty_tier": "gold", "lifetime_value": 1.5}),
    dict(email="Mixed.Case@Example.com", first_name=None, properties={}),
    dict(email="c@example.com", last_name="Hopper", properties=None),
    dict(phone_number="+12015550101", first_name="Grace"),
    dict(external_id="5", email=None, phone_number=None, properties={"a": [1, 2], "b": {"c": "d"}, "e": None}),
    dict(_kx="kx-token", first_name="Alan"),
]


def _stored(sb: Sandbox) -> tuple[list, dict]:
    """The account's profiles in creation order (ids left out) and its identifier indexes (ids as positions)."""
    sb.klaviyo.advance()
    acc = next(iter(sb.klaviyo.accounts.values()))
    order = {pid: i for i, pid in enumerate(acc.profiles)}
    state = sb.state()["klaviyo"]["accounts"][acc.account_id]
    indexes = {name: {key: order[pid] for key, pid in getattr(acc, name).items()}
               for name in ("by_email", "by_phone", "by_external_id")}
    members = [order[pid] for pid in state["lists"][KLAVIYO_LIST_ID]["profile_ids"]]
    return list(state["profiles"].values()), {**indexes, "members": members}


def test_a_new_profile_is_stored_as_the_general_path_stores_it():
    """_upsert builds the usual new profile (no rare field, no patch) in one call; an explicit null organization
    sends the same profile through the field-by-field path, with the same end state."""
    fast, clock = service()
    general, general_clock = service()
    assert call(fast, "POST", JOBS, job(*[profile(**p) for p in NEW_PROFILES]))[0] == 202
    assert call(general, "POST", JOBS, job(*[profile(**p, organization=None) for p in NEW_PROFILES]))[0] == 202
    clock.now += 10
    general_clock.now += 10
    assert _stored(fast) == _stored(general)
    profiles, indexes = _stored(fast)
    assert len(profiles) == len(NEW_PROFILES)
    assert indexes["by_email"] == {"a@example.com": 0, "mixed.case@example.com": 1, "c@example.com": 2}
    assert profiles[1]["email"] == "Mixed.Case@Example.com" and profiles[0]["properties"] == NEW_PROFILES[0]["properties"]
