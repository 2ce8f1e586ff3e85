"""The shared base: hooks own their session (no other provider's private methods), read the connection into one
set of request settings, and judge answers by one set of rules whichever HTTP client received them."""

from __future__ import annotations

import ast
import asyncio
import ssl
import time
from pathlib import Path

import pytest
import requests
from segment_export_sandbox import KLAVIYO_API_KEY, MAILCHIMP_API_KEY

import segment_export.hooks.base as base
from segment_export.destinations.klaviyo.hook import KlaviyoAsyncHook, KlaviyoHook
from segment_export.destinations.mailchimp.hook import MailchimpHook
from segment_export.hooks.base import FAIL, RETRY, THROTTLED, Answer, RateLimiter, RequestSettings


def imported_modules(module) -> set[str]:
    tree = ast.parse(Path(module.__file__).read_text())
    return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}


def test_hooks_are_base_hooks_that_own_their_session_not_http_hooks():
    from airflow.sdk import BaseHook

    assert not any(m.startswith("airflow.providers.http") for m in imported_modules(base))
    for hook in (KlaviyoHook, MailchimpHook, KlaviyoAsyncHook):
        assert issubclass(hook, BaseHook)
        assert not any(cls.__module__.startswith("airflow.providers.http") for cls in hook.__mro__)


def test_connection_form_attributes_are_the_providers(airflow_conn):
    from airflow.sdk import BaseHook

    for hook, conn_type, name in [(KlaviyoHook, "klaviyo", "Klaviyo"), (MailchimpHook, "mailchimp", "Mailchimp"),
                                  (KlaviyoAsyncHook, "klaviyo", "Klaviyo")]:
        assert (hook.conn_name_attr, hook.conn_type, hook.hook_name) == ("conn_id", conn_type, name)
        assert hook.default_conn_name == f"{conn_type}_default"
    # what the UI's "Test" button does: the connection's hook, by conn_name_attr
    airflow_conn("k_ui", conn_type="klaviyo", host="http://127.0.0.1:9", password=KLAVIYO_API_KEY)
    hook = BaseHook.get_connection("k_ui").get_hook()
    assert type(hook) is KlaviyoHook and hook.conn_id == "k_ui"


def test_session_pool_auth_and_transport_options_come_from_the_connection(airflow_conn, tmp_path):
    airflow_conn("m_opts", conn_type="mailchimp", host="mc.example.test", port=8443, login="me", password=MAILCHIMP_API_KEY,
                 extra={"proxies": {"https": "http://proxy.test:3128"}, "verify": False, "trust_env": False,
                        "timeout": 15, "header_like": "never-sent"})
    hook = MailchimpHook("m_opts", max_concurrency=4)
    session = hook.session
    assert hook.base_url == "https://mc.example.test:8443"  # a bare host is https, with the port
    assert session.auth.username == "me" and session.auth.password == MAILCHIMP_API_KEY
    assert session.proxies == {"https": "http://proxy.test:3128"} and session.verify is False
    assert session.trust_env is False and hook.timeout == 15.0 and "header_like" not in session.headers
    adapter = session.get_adapter("https://mc.example.test:8443/3.0/ping")
    assert adapter._pool_maxsize == 4 and adapter.max_retries.total == 0  # retries are the hook's, not urllib3's
    assert session.get_adapter("http://x") is adapter
    assert MailchimpHook("m_opts", max_concurrency=50).session.get_adapter("https://x")._pool_maxsize == 10  # the key's cap


def test_one_settings_object_for_both_clients(airflow_conn):
    airflow_conn("k_same", conn_type="klaviyo", host="https://k.example.test/", password=KLAVIYO_API_KEY,
                 extra={"verify": "/etc/ssl/certs/ca-certificates.crt"})
    sync_settings = KlaviyoHook("k_same").load_settings()
    assert asyncio.run(KlaviyoAsyncHook("k_same").settings()) == sync_settings
    assert sync_settings.url("/api/lists/x") == "https://k.example.test/api/lists/x"
    assert sync_settings.url("https://k.example.test/api/profiles?page=2") == "https://k.example.test/api/profiles?page=2"


@pytest.mark.parametrize("verify, cert, expected", [(True, None, True), (False, None, False)])
def test_async_tls_options_follow_requests_semantics(verify, cert, expected):
    settings = RequestSettings("https://x", 1.0, verify=verify, cert=cert)
    assert base._ssl_option(settings) is expected


def test_async_tls_with_a_ca_bundle_is_a_verifying_context():
    bundle = ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt"
    if not Path(bundle).exists():
        pytest.skip("no CA bundle on this machine")
    context = base._ssl_option(RequestSettings("https://x", 1.0, verify=bundle))
    assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_REQUIRED


def mailchimp_403(detail: str) -> bytes:
    return ('{"title": "%s", "detail": "%s", "status": 403}' % ("Forbidden" if "permitted" in detail else
                                                               "Too Many Requests", detail)).encode()


@pytest.mark.parametrize("status, body, outcome", [
    (429, b"", THROTTLED),
    (503, b"", RETRY),
    (404, b'{"title": "Resource Not Found", "detail": "x"}', FAIL),
    (403, mailchimp_403("You are not permitted to access this resource."), FAIL),
    (403, mailchimp_403("You have exceeded the limit of 10 simultaneous connections."), THROTTLED),
])
def test_an_answer_is_judged_the_same_from_requests_or_aiohttp(status, body, outcome, airflow_conn):
    airflow_conn("m_rules", conn_type="mailchimp", password=MAILCHIMP_API_KEY)
    as_requests = requests.Response()
    as_requests.status_code, as_requests._content = status, body
    as_requests.headers["Retry-After"] = "3"
    as_answer = Answer(status, {"Retry-After": "3"}, body)  # what the async hook builds from aiohttp's answer
    hook = MailchimpHook("m_rules")
    one, other = hook.judge("GET /x", as_requests, base._json_body), hook.judge("GET /x", as_answer, base._json_body)
    assert one.outcome == other.outcome == outcome and one.retry_after == other.retry_after == 3.0
    assert str(one.failure) == str(other.failure) and one.failure.throttled == (outcome == THROTTLED)


def test_a_proxy_page_is_retried_from_either_client(airflow_conn):
    airflow_conn("k_rules", conn_type="klaviyo", password=KLAVIYO_API_KEY)
    verdict = KlaviyoHook("k_rules").judge("GET /api/lists/x", Answer(200, {}, b"<html>maintenance</html>"), base._json_body)
    assert verdict.outcome == RETRY and "is not JSON" in str(verdict.failure)


def test_the_rate_limiter_paces_threads_and_event_loops_alike():
    limiter = RateLimiter(2, 100)
    started = time.monotonic()
    limiter.acquire(), limiter.acquire()
    assert time.monotonic() - started < 0.5  # the burst

    async def third_while_the_loop_runs() -> int:
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1

        ticker = asyncio.create_task(tick())
        await limiter.wait()
        ticker.cancel()
        return ticks

    ticks = asyncio.run(third_while_the_loop_runs())
    assert 0.9 <= time.monotonic() - started < 2  # the third waits for the window...
    assert ticks >= 10  # ...without blocking the event loop meanwhile


def test_the_async_client_sends_the_same_basic_auth_as_the_session(airflow_conn):
    from requests.auth import _basic_auth_str

    from segment_export.destinations.mailchimp.hook import MailchimpAsyncHook

    airflow_conn("m_basic", conn_type="mailchimp", login="me", password=MAILCHIMP_API_KEY)

    async def client_headers():
        async with await MailchimpAsyncHook("m_basic").client() as client:
            return dict(client.headers)

    headers = asyncio.run(client_headers())
    assert headers["Authorization"] == _basic_auth_str("me", MAILCHIMP_API_KEY) and headers["Accept"] == "application/json"
