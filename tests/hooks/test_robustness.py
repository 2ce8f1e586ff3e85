"""HTTP robustness of the hooks: garbage success answers, errors naming the connection, throttling 403s, AIMD."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from segment_export_sandbox import KLAVIYO_LIST_ID, MAILCHIMP_API_KEY, MAILCHIMP_AUDIENCE_ID

from segment_export.hooks.base import FAIL, RETRY, THROTTLED, AdaptiveConcurrency, DestinationError
from segment_export.destinations.klaviyo.hook import KlaviyoHook
from segment_export.destinations.mailchimp.hook import MailchimpHook


def fast(hook):
    hook.retry_base_seconds = 0.01
    return hook


# -- a 2xx whose body is not JSON ----------------------------------------------------------------------------
def test_a_200_html_page_is_retried_like_a_5xx_then_the_real_answer_is_used(sandbox):
    sandbox.set_faults([{"endpoint": "GET /api/lists/{id}", "kind": "garbage", "times": 2}])
    hook = fast(KlaviyoHook())
    assert hook.get_list(KLAVIYO_LIST_ID)["id"] == KLAVIYO_LIST_ID
    assert hook.retries == 2 and hook.requests == 3
    assert sandbox.state()["requests"]["by_endpoint"]["GET /api/lists/{id}"]["status"] == {"200": 3}


def test_garbage_retries_are_bounded_by_the_same_budget_as_5xx(sandbox):
    sandbox.set_faults([{"endpoint": "GET /3.0/lists/{list_id}", "kind": "garbage", "times": 100}])
    hook = fast(MailchimpHook())
    hook.max_retries = 2
    with pytest.raises(DestinationError, match=r"Mailchimp connection 'mailchimp_default': GET /lists/\w+: "
                                               r"the answer \(HTTP 200\) is not JSON \('<html>") as info:
        hook.get_audience(MAILCHIMP_AUDIENCE_ID)
    assert info.value.retryable and hook.requests == 3


def test_an_empty_answer_write_is_not_fooled_by_a_proxy_page(sandbox):
    """Klaviyo answers list additions with 204 and no body: a 200 HTML page there is not Klaviyo's acceptance."""
    hook = fast(KlaviyoHook())
    profile_id = hook.request_data("POST", "/api/profile-import", json={"data": {"type": "profile", "attributes": {
        "email": "proxy.page@example.com"}}}, limit_key="profiles")["id"]
    sandbox.set_faults([{"endpoint": "POST /api/lists/{id}/relationships/profiles", "kind": "garbage", "times": 1}])
    hook.add_to_list(KLAVIYO_LIST_ID, [profile_id])
    assert hook.retries == 1
    statuses = sandbox.state()["requests"]["by_endpoint"]["POST /api/lists/{id}/relationships/profiles"]["status"]
    assert statuses == {"200": 1, "204": 1}


# -- every error names its connection, never the key ---------------------------------------------------------
def test_a_401_names_the_connection_and_not_the_key(sandbox, airflow_conn):
    airflow_conn("klaviyo_badkey", conn_type="klaviyo", host=sandbox.klaviyo_host, password="pk_badkey_secret")
    with pytest.raises(DestinationError) as info:
        KlaviyoHook("klaviyo_badkey").get_list(KLAVIYO_LIST_ID)
    message = str(info.value)
    assert message.startswith(f"Klaviyo connection 'klaviyo_badkey': GET /api/lists/{KLAVIYO_LIST_ID} failed: HTTP 401")
    assert "pk_badkey_secret" not in message and info.value.status == 401 and not info.value.retryable
    airflow_conn("mailchimp_badkey", conn_type="mailchimp", host=sandbox.mailchimp_host, password="bad0-us6")
    ok, message = MailchimpHook("mailchimp_badkey").test_connection()
    assert not ok and message.startswith("Mailchimp connection 'mailchimp_badkey': GET /ping failed: HTTP 401")
    assert "bad0-us6" not in message


def test_configuration_errors_name_the_connection(airflow_conn):
    airflow_conn("mc_nodc", conn_type="mailchimp", password="nodatacenter")
    with pytest.raises(DestinationError, match="^Mailchimp connection 'mc_nodc': the Mailchimp API key has no data-center"):
        MailchimpHook("mc_nodc").get_conn()
    airflow_conn("k_nokey2", conn_type="klaviyo", host="http://127.0.0.1:9")
    with pytest.raises(DestinationError, match="^Klaviyo connection 'k_nokey2' has no API key"):
        KlaviyoHook("k_nokey2").get_conn()
    with pytest.raises(DestinationError, match="^Klaviyo connection 'nope' is not defined"):
        KlaviyoHook("nope").get_conn()


def test_transport_errors_name_the_connection(airflow_conn):
    airflow_conn("k_down", conn_type="klaviyo", host="http://127.0.0.1:9", password="pk_x")
    hook = fast(KlaviyoHook("k_down"))
    hook.max_retries = 0
    with pytest.raises(DestinationError, match="^Klaviyo connection 'k_down': GET /api/lists/x: ConnectionError"):
        hook.get_list("x")


# -- Mailchimp 403: throttling or refusal --------------------------------------------------------------------
def answer(status: int, body: bytes, content_type: str = "application/problem+json") -> requests.Response:
    response = requests.Response()
    response.status_code, response._content = status, body
    response.headers["Content-Type"] = content_type
    return response


def problem(status: int, title: str, detail: str) -> bytes:
    return json.dumps({"type": "https://mailchimp.com/developer/marketing/docs/errors/", "title": title,
                       "status": status, "detail": detail, "instance": "x"}).encode()


@pytest.mark.parametrize("response, outcome", [
    (answer(429, problem(429, "Too Many Requests", "You have exceeded the limit of 10 simultaneous connections.")), THROTTLED),
    (answer(403, problem(403, "Too Many Requests", "You have exceeded the limit of 10 simultaneous connections.")), THROTTLED),
    (answer(403, b""), THROTTLED),  # a bare 403: no problem document, so none of Mailchimp's auth refusals
    (answer(403, b"<html>Forbidden</html>", "text/html"), THROTTLED),
    (answer(403, problem(403, "Forbidden", "You are not permitted to access this resource.")), FAIL),
    (answer(403, problem(403, "User Disabled", "This account has been disabled.")), FAIL),
    (answer(403, problem(403, "Wrong Datacenter", "The API key provided is linked to a different datacenter.")), FAIL),
    (answer(401, problem(401, "API Key Invalid", "Your API key may be invalid.")), FAIL),
    (answer(503, problem(503, "Service Unavailable", "")), RETRY),
])
def test_mailchimp_tells_a_throttling_403_from_a_refusal(response, outcome):
    assert MailchimpHook().classify(response) == outcome


@pytest.fixture
def forbidding_server():
    """A one-endpoint server answering every request with Mailchimp's permission 403."""
    hits = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - stdlib name
            hits.append(self.path)
            body = problem(403, "Forbidden", "You are not permitted to access this resource.")
            self.send_response(403)
            self.send_header("Content-Type", "application/problem+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/3.0", hits
    server.shutdown()
    server.server_close()


def test_a_permission_403_fails_at_once(forbidding_server, airflow_conn):
    url, hits = forbidding_server
    airflow_conn("mc_forbidden", conn_type="mailchimp", host=url, password=MAILCHIMP_API_KEY)
    hook = fast(MailchimpHook("mc_forbidden"))
    with pytest.raises(DestinationError, match="^Mailchimp connection 'mc_forbidden': GET /lists/a1 failed: "
                                               "HTTP 403 Forbidden: You are not permitted") as info:
        hook.get_audience("a1")
    assert len(hits) == 1 and hook.retries == 0 and not info.value.retryable


def test_a_throttling_403_is_retried(sandbox):
    sandbox.configure(behaviour={"mailchimp_throttle_status": 403})
    sandbox.set_faults([{"endpoint": "GET /3.0/lists/{list_id}", "kind": "429", "times": 3}])
    hook = fast(MailchimpHook())
    assert hook.get_audience(MAILCHIMP_AUDIENCE_ID)["id"] == MAILCHIMP_AUDIENCE_ID
    assert sandbox.state()["requests"]["by_endpoint"]["GET /3.0/lists/{list_id}"]["status"] == {"403": 3, "200": 1}
    assert hook.retries == 3 and hook.adaptive_limit.cuts >= 1


def test_throttled_answers_are_bounded_by_time_not_by_the_retry_count(sandbox):
    """Throttled answers were not applied: more of them than ``max_retries`` are waited out, within the time budget."""
    sandbox.set_faults([{"endpoint": "GET /3.0/lists/{list_id}", "kind": "429", "times": 8}])
    hook = fast(MailchimpHook())
    hook.max_retries = 2
    assert hook.get_audience(MAILCHIMP_AUDIENCE_ID)["id"] == MAILCHIMP_AUDIENCE_ID and hook.retries == 8
    sandbox.set_faults([{"endpoint": "GET /3.0/lists/{list_id}", "kind": "429", "times": 1000}])
    hook.max_retry_seconds = 0.5
    with pytest.raises(DestinationError, match="HTTP 429 Too Many Requests") as info:
        hook.get_audience(MAILCHIMP_AUDIENCE_ID)
    assert info.value.throttled and info.value.retryable


# -- the adaptive limit ----------------------------------------------------------------------------------------
def test_adaptive_concurrency_halves_once_per_round_and_recovers():
    limit = AdaptiveConcurrency(10)
    sent = [limit.acquire() for _ in range(10)]  # a round of ten requests, all throttled by one overload
    for at in sent:
        limit.release(at, THROTTLED)
    assert int(limit.limit) == 5 and limit.cuts == 1
    at = limit.acquire()
    limit.release(at, THROTTLED)  # a request sent after the cut: a new overload
    assert int(limit.limit) == 2 and limit.lowest == 2
    for _ in range(200):  # successes add one connection per round
        limit.release(limit.acquire(), None)
    assert limit.limit == 10
    limit.release(limit.acquire(), RETRY)  # a 5xx is not congestion
    assert limit.limit == 10


def test_adaptive_concurrency_bounds_requests_in_flight():
    limit = AdaptiveConcurrency(4)
    limit.limit = 2.0
    held = [limit.acquire(), limit.acquire()]
    third = threading.Thread(target=lambda: limit.release(limit.acquire(), None))
    third.start()
    third.join(0.2)
    assert third.is_alive()  # waits for a slot
    limit.release(held[0], None)
    third.join(2)
    assert not third.is_alive()
    limit.release(held[1], None)


def test_hook_errors_never_carry_a_customer_address(airflow_conn):
    from segment_export.destinations.klaviyo.hook import KlaviyoHook

    airflow_conn("klaviyo_x", conn_type="klaviyo", host="http://127.0.0.1:9", password="pk_x")
    error = KlaviyoHook("klaviyo_x").error("400 invalid: 'ada.lovelace.1@example.com' is not a valid email")
    assert "example.com" not in str(error) and "<email>" in str(error) and "klaviyo_x" in str(error)
