"""Both hooks against the sandbox: auth, base URLs, test_connection, errors in the destination's words, retries."""

from __future__ import annotations

import pytest
from segment_export_sandbox import KLAVIYO_API_KEY, MAILCHIMP_API_KEY

from segment_export.hooks.base import DestinationError
from segment_export.destinations.klaviyo.hook import KLAVIYO_REVISION, KlaviyoHook
from segment_export.destinations.mailchimp.hook import MailchimpHook, data_center, subscriber_hash


def test_klaviyo_test_connection(sandbox):
    ok, message = KlaviyoHook().test_connection()
    assert ok, message
    assert "Connected to Klaviyo" in message
    assert sandbox.state()["requests"]["by_endpoint"]["GET /api/accounts"]["status"] == {"200": 1}


def test_mailchimp_test_connection(sandbox):
    ok, message = MailchimpHook().test_connection()
    assert ok and "Everything's Chimpy!" in message
    assert sandbox.state()["requests"]["by_endpoint"]["GET /3.0/ping"]["status"] == {"200": 1}


def test_wrong_keys_fail_with_the_destinations_message(sandbox, airflow_conn):
    airflow_conn("klaviyo_bad", conn_type="klaviyo", host=sandbox.klaviyo_host, password="pk_wrong")
    airflow_conn("mailchimp_bad", conn_type="mailchimp", host=sandbox.mailchimp_host, password="wrong-us6")
    ok, message = KlaviyoHook("klaviyo_bad").test_connection()
    assert not ok and "HTTP 401" in message and "pk_wrong" not in message
    ok, message = MailchimpHook("mailchimp_bad").test_connection()
    assert not ok and "HTTP 401 API Key Invalid" in message and "wrong-us6" not in message


def test_missing_list_is_not_retried(sandbox):
    hook = KlaviyoHook()
    with pytest.raises(DestinationError, match="HTTP 404") as info:
        hook.get_list("NoSuch")
    assert info.value.status == 404 and not info.value.retryable
    assert hook.requests == 1 and hook.retries == 0
    with pytest.raises(DestinationError, match="HTTP 404 Resource Not Found"):
        MailchimpHook().get_audience("nosuch")


def test_klaviyo_headers_and_no_extras_in_headers(sandbox, airflow_conn):
    airflow_conn(
        "klaviyo_extra", conn_type="klaviyo", host=sandbox.klaviyo_host, password=KLAVIYO_API_KEY,
        extra={"timeout": 7, "list_hint": "do-not-send", "X-Leak": "config"},
    )
    hook = KlaviyoHook("klaviyo_extra")
    session = hook.session
    assert session.headers["Authorization"] == f"Klaviyo-API-Key {KLAVIYO_API_KEY}"
    assert session.headers["revision"] == KLAVIYO_REVISION == "2026-07-15"
    assert "list_hint" not in session.headers and "X-Leak" not in session.headers
    assert hook.timeout == 7.0


def test_default_base_urls(airflow_conn):
    airflow_conn("k", conn_type="klaviyo", password=KLAVIYO_API_KEY)
    airflow_conn("m", conn_type="mailchimp", password=MAILCHIMP_API_KEY)
    k, m = KlaviyoHook("k"), MailchimpHook("m")
    k.get_conn(), m.get_conn()
    assert k.base_url == "https://a.klaviyo.com"
    assert m.base_url == "https://us6.api.mailchimp.com/3.0"
    assert m.session.auth.password == MAILCHIMP_API_KEY


def test_mailchimp_key_helpers():
    assert data_center("abc-us21") == "us21"
    with pytest.raises(DestinationError, match="data-center suffix"):
        data_center("nodc")
    assert subscriber_hash("Ada@Example.com") == subscriber_hash("ada@example.com") == "3e3417d7ef77d5932a6734b916515ed5"


def test_missing_api_key(airflow_conn):
    airflow_conn("k_nokey", conn_type="klaviyo", host="http://127.0.0.1:9")
    with pytest.raises(DestinationError, match="has no API key"):
        KlaviyoHook("k_nokey").get_conn()


def test_retries_429_with_retry_after_then_succeeds(sandbox):
    # accounts: 1/s burst; three quick calls force at least one 429 that the hook waits out
    hook = KlaviyoHook()
    for _ in range(3):
        hook._limiters.clear()  # bypass client pacing to meet the server's limit
        assert hook.request_json("GET", "/api/accounts")["data"]
    statuses = sandbox.state()["requests"]["by_endpoint"]["GET /api/accounts"]["status"]
    assert statuses["200"] == 3 and statuses.get("429", 0) >= 1
    assert hook.retries == statuses["429"]


def test_pacing_avoids_429(sandbox):
    hook = KlaviyoHook()
    for _ in range(3):
        hook.request_json("GET", "/api/accounts", limit_key="accounts")
    statuses = sandbox.state()["requests"]["by_endpoint"]["GET /api/accounts"]["status"]
    assert statuses == {"200": 3} and hook.retries == 0


def test_missing_or_wrong_type_connection_is_a_clear_error(airflow_conn):
    with pytest.raises(DestinationError, match="connection 'nope' is not defined: add a klaviyo connection"):
        KlaviyoHook("nope").get_conn()
    airflow_conn("mc_as_klaviyo", conn_type="mailchimp", password=MAILCHIMP_API_KEY)
    with pytest.raises(DestinationError, match="is of type 'mailchimp', not 'klaviyo'"):
        KlaviyoHook("mc_as_klaviyo").get_conn()


def test_api_key_is_masked_in_airflow_logs(airflow_conn):
    from airflow.sdk._shared.secrets_masker import redact

    airflow_conn("k_mask", conn_type="klaviyo", host="http://127.0.0.1:9", password="pk_masked_0123456789")
    KlaviyoHook("k_mask").get_conn()
    assert "pk_masked_0123456789" not in str(redact("key is pk_masked_0123456789 here"))


def test_mailchimp_batch_subscribe_asks_for_fields(sandbox):
    from segment_export_sandbox import MAILCHIMP_AUDIENCE_ID

    from segment_export.destinations.mailchimp.destination import BATCH_ANSWER_FIELDS, batch_body

    body = batch_body([b'{"email_address":"f@example.com","status":"subscribed"}', b'{"email_address":"bad","status":"subscribed"}'], False)
    answer = MailchimpHook().batch_subscribe(MAILCHIMP_AUDIENCE_ID, body, fields=BATCH_ANSWER_FIELDS)
    assert answer["new_members"] == [{"email_address": "f@example.com"}] and answer["total_created"] == 1
    assert len(answer["errors"]) == 1 and {"email_address", "error", "error_code"} <= set(answer["errors"][0])  # whole
    assert "_links" not in answer and "updated_members" in answer and answer["total_updated"] == 0
    whole = MailchimpHook().batch_subscribe(MAILCHIMP_AUDIENCE_ID, body.replace(b"f@", b"g@"))
    assert "unique_email_id" in whole["new_members"][0]  # without fields: whole members
