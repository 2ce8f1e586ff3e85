"""Control API, state layout, reset, config, CLI; plus the API classes without HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import requests
import pytest

import segment_export_sandbox
from segment_export_sandbox import (
    KLAVIYO_ACCOUNT_ID,
    KLAVIYO_API_KEY,
    KLAVIYO_LIST_ID,
    MAILCHIMP_ACCOUNT_ID,
    MAILCHIMP_API_KEY,
    MAILCHIMP_AUDIENCE_ID,
    SandboxConfig,
    subscriber_hash,
)
from segment_export_sandbox.common import ApiRequest
from segment_export_sandbox.klaviyo import KlaviyoService
from segment_export_sandbox.mailchimp import MailchimpService
from segment_export_sandbox.ratelimit import FixedWindowLimiter, InFlightLimiter

#: Where the sandbox these tests import comes from, so the CLI in a subprocess runs that same copy.
SANDBOX_PATH = Path(segment_export_sandbox.__file__).resolve().parents[1]
K_HEADERS = {"Authorization": f"Klaviyo-API-Key {KLAVIYO_API_KEY}", "revision": "2026-07-15"}


def test_public_api_and_hosts(sb):
    assert sb.url.startswith("http://127.0.0.1:") and sb.port > 0
    assert sb.klaviyo_host == sb.url
    assert sb.mailchimp_host == sb.url + "/3.0"


def test_state_layout_and_no_keys_leak(sb):
    sb.seed_mailchimp_member(MAILCHIMP_AUDIENCE_ID, "s@example.com", "subscribed", {"FNAME": "S"}, tags=["t"])
    requests.get(sb.url + "/api/lists", headers=K_HEADERS, timeout=10)
    state = requests.get(sb.url + "/_sandbox/state", timeout=10).json()
    assert state == json.loads(json.dumps(sb.state()))
    assert set(state) == {"klaviyo", "mailchimp", "requests"}
    k_acc = state["klaviyo"]["accounts"][KLAVIYO_ACCOUNT_ID]
    assert set(k_acc) == {"lists", "profiles", "jobs", "deletions"}
    assert k_acc["lists"][KLAVIYO_LIST_ID] == {"name": "Sandbox list", "profile_ids": []}
    audience = state["mailchimp"]["accounts"][MAILCHIMP_ACCOUNT_ID]["audiences"][MAILCHIMP_AUDIENCE_ID]
    assert set(audience) >= {"name", "members", "merge_fields", "segments"}
    assert audience["members"][subscriber_hash("S@example.com")] == {"email_address": "s@example.com", "status": "subscribed", "merge_fields": {"FNAME": "S"}, "tags": ["t"]}
    (segment,) = audience["segments"].values()
    assert segment["name"] == "t" and segment["member_count"] == 1
    assert state["requests"]["count"] == 1
    assert state["requests"]["by_endpoint"] == {"GET /api/lists": {"count": 1, "status": {"200": 1}}}
    text = json.dumps(state)
    assert KLAVIYO_API_KEY not in text and MAILCHIMP_API_KEY not in text


def test_reset_restores_initial_accounts(sb):
    requests.post(sb.url + "/_sandbox/klaviyo/lists", json={"id": "NewL1", "name": "New"}, timeout=10).raise_for_status()
    requests.post(sb.url + f"/_sandbox/mailchimp/audiences/{MAILCHIMP_AUDIENCE_ID}/members", json={"email_address": "r@example.com", "status": "cleaned"}, timeout=10).raise_for_status()
    requests.post(sb.url + "/_sandbox/klaviyo/suppressed", json={"email": "sup@example.com"}, timeout=10).raise_for_status()
    requests.get(sb.url + "/api/lists/NewL1", headers=K_HEADERS, timeout=10).raise_for_status()
    before = sb.state()
    assert "NewL1" in before["klaviyo"]["accounts"][KLAVIYO_ACCOUNT_ID]["lists"] and before["requests"]["count"] == 1
    assert requests.post(sb.url + "/_sandbox/reset", timeout=10).status_code == 200
    after = sb.state()
    assert set(after["klaviyo"]["accounts"][KLAVIYO_ACCOUNT_ID]["lists"]) == {KLAVIYO_LIST_ID, "XyZ123"}
    assert after["klaviyo"]["accounts"][KLAVIYO_ACCOUNT_ID]["profiles"] == {}
    assert after["mailchimp"]["accounts"][MAILCHIMP_ACCOUNT_ID]["audiences"][MAILCHIMP_AUDIENCE_ID]["members"] == {}
    assert after["requests"]["count"] == 0


def test_seeding_over_http(sb):
    r = requests.post(sb.url + f"/_sandbox/mailchimp/audiences/{MAILCHIMP_AUDIENCE_ID}/members", json={"email_address": "u@example.com", "status": "unsubscribed", "merge_fields": {"LNAME": "U"}}, timeout=10)
    assert r.status_code == 201
    r = requests.post(sb.url + f"/_sandbox/mailchimp/audiences/{MAILCHIMP_AUDIENCE_ID}/forgotten", json={"email_address": "f@example.com"}, timeout=10)
    assert r.status_code == 201
    audience = sb.state()["mailchimp"]["accounts"][MAILCHIMP_ACCOUNT_ID]["audiences"][MAILCHIMP_AUDIENCE_ID]
    assert audience["members"][subscriber_hash("u@example.com")]["status"] == "unsubscribed"
    assert audience["forgotten"] == ["f@example.com"]
    r = requests.post(sb.url + "/_sandbox/klaviyo/suppressed", json={"email": "q@example.com"}, timeout=10)
    assert r.status_code == 201
    (profile,) = sb.state()["klaviyo"]["accounts"][KLAVIYO_ACCOUNT_ID]["profiles"].values()
    assert profile["email"] == "q@example.com" and profile["suppressed"] is True
    assert requests.post(sb.url + "/_sandbox/mailchimp/audiences/nope/members", json={"email_address": "x@example.com"}, timeout=10).status_code == 404
    assert requests.post(sb.url + "/_sandbox/klaviyo/lists", json={"name": "no id"}, timeout=10).status_code == 400
    assert requests.get(sb.url + "/_sandbox/nothing", timeout=10).status_code == 404


def test_put_config_changes_a_running_server(sb):
    r = requests.put(sb.url + "/_sandbox/config", json={"latency": {"klaviyo_read": 0.3}, "klaviyo_profiles_per_second": 5}, timeout=10)
    assert r.status_code == 200 and r.json()["latency"]["klaviyo_read"] == 0.3
    start = time.monotonic()
    requests.get(sb.url + "/api/lists", headers=K_HEADERS, timeout=10).raise_for_status()
    assert time.monotonic() - start >= 0.3
    assert requests.put(sb.url + "/_sandbox/config", json={"latency": {"bogus": 1}}, timeout=10).status_code == 400
    assert requests.put(sb.url + "/_sandbox/config", json={"port": 1}, timeout=10).status_code == 400
    assert requests.put(sb.url + "/_sandbox/config", json={"rate_limits": "yes"}, timeout=10).status_code == 400


def test_non_api_path_is_404(sb):
    assert requests.get(sb.url + "/v2/whatever", timeout=10).status_code == 404


def test_cli_prints_url_and_serves_until_terminated(tmp_path):
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"klaviyo_accounts": [{"api_key": "pk_cli", "account_id": "CliAcc", "lists": [{"id": "L1", "name": "CLI list"}]}]}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SANDBOX_PATH), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "segment_export_sandbox", "--port", "0", "--config", str(config), "--no-rate-limits", "--latency-mailchimp-batch", "0.01"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("SANDBOX_URL=http://127.0.0.1:"), (line, proc.stderr.read() if proc.poll() is not None else "")
        url = line.split("=", 1)[1]
        state = requests.get(url + "/_sandbox/state", timeout=10).json()
        assert state["klaviyo"]["accounts"]["CliAcc"]["lists"]["L1"]["name"] == "CLI list"
        config_now = requests.get(url + "/_sandbox/config", timeout=10).json()
        assert config_now["rate_limits"] is False and config_now["latency"]["mailchimp_batch"] == 0.01
        proc.terminate()
        assert proc.wait(timeout=10) == 0
        assert proc.stdout.read() == ""  # exactly one line on stdout
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- behaviour classes without HTTP ------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_klaviyo_job_progress_is_a_function_of_time():
    clock = FakeClock()
    cfg = SandboxConfig(klaviyo_profiles_per_second=100, klaviyo_job_queue_seconds=2)
    svc = KlaviyoService(cfg, clock)
    body = {"data": {"type": "profile-bulk-import-job", "attributes": {"profiles": {"data": [{"type": "profile", "attributes": {"email": f"p{i}@example.com"}} for i in range(300)]}}}}
    req = ApiRequest.build("POST", "/api/profile-bulk-import-jobs", {"Content-Type": "application/json"}, body)
    assert svc.authenticate(req) is not None  # no key
    req.headers["authorization"] = f"Klaviyo-API-Key {KLAVIYO_API_KEY}"
    assert svc.authenticate(req) is None
    job_id = svc.create_job(req).body["data"]["id"]

    def job() -> dict:
        svc.advance()
        return svc.state()["accounts"][KLAVIYO_ACCOUNT_ID]["jobs"][job_id]

    assert job()["status"] == "queued"
    clock.now += 2.5  # 0.5 s of processing at 100/s
    assert (job()["status"], job()["completed_count"]) == ("processing", 50)
    clock.now += 2.49
    assert job()["status"] == "processing"
    clock.now += 0.02
    assert (job()["status"], job()["completed_count"]) == ("complete", 300)


def test_fixed_windows_and_retry_after():
    clock = FakeClock(120.2)
    limiter = FixedWindowLimiter(clock)
    windows = [(2, 1.0), (3, 60.0)]
    assert [limiter.hit("k", windows).allowed for _ in range(3)] == [True, True, False]
    refused = limiter.hit("k", windows)
    assert refused.retry_after == 1  # burst window ends at 121.0
    clock.now = 121.1
    assert limiter.hit("k", windows).allowed  # third of the minute
    refused = limiter.hit("k", windows)
    assert not refused.allowed and refused.retry_after == 59  # steady window ends at 180
    assert limiter.hit("other", windows).allowed  # per key


def test_in_flight_limiter():
    limiter = InFlightLimiter()
    assert all(limiter.try_acquire("key", 2) for _ in range(2))
    assert not limiter.try_acquire("key", 2)
    limiter.release("key")
    assert limiter.try_acquire("key", 2) and limiter.current("key") == 2


def test_mailchimp_service_without_http():
    svc = MailchimpService(SandboxConfig())
    req = ApiRequest.build("POST", f"/3.0/lists/{MAILCHIMP_AUDIENCE_ID}", {}, {"members": [{"email_address": "x@example.com", "status": "subscribed"}]})
    assert svc.authenticate(req).status == 401
    import base64

    req.headers["authorization"] = "Basic " + base64.b64encode(f"any:{MAILCHIMP_API_KEY}".encode()).decode()
    assert svc.authenticate(req) is None
    req.path_params = {"list_id": MAILCHIMP_AUDIENCE_ID}
    assert svc.batch_subscribe(req).body["total_created"] == 1


def test_behaviour_switches_default_validate_and_apply_at_runtime():
    from segment_export_sandbox.config import BEHAVIOURS, SandboxConfig

    cfg = SandboxConfig.from_dict({"behaviour": {"klaviyo_identifier_conflict": "reject"}})
    assert cfg.behaviour["klaviyo_identifier_conflict"] == "reject"
    assert cfg.behaviour["mailchimp_throttle_status"] == 429  # the others keep their default
    assert set(cfg.behaviour) == set(BEHAVIOURS)
    for bad in ({"no_such_switch": True}, {"mailchimp_throttle_status": 500}, {"klaviyo_list_opt_in": True}):
        with pytest.raises(ValueError, match="behaviour"):
            SandboxConfig.from_dict({"behaviour": bad})
    cfg.apply_runtime({"behaviour": {"klaviyo_list_opt_in": "double"}})
    assert cfg.behaviour["klaviyo_list_opt_in"] == "double" and cfg.behaviour["klaviyo_identifier_conflict"] == "reject"
