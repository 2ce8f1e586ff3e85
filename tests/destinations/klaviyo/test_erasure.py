"""KlaviyoEraser against the sandbox: one Request Profile Deletion per address for the whole account."""

from __future__ import annotations

import pytest
from segment_export_sandbox import KLAVIYO_ACCOUNT_ID

from segment_export.destinations import destination_type
from segment_export.destinations.klaviyo.hook import KlaviyoApi
from segment_export.hooks.base import DestinationError


def test_erase_requests_the_deletion_and_the_profile_leaves_every_list(sandbox):
    sandbox.suppress_klaviyo_email("gone@example.com")  # a profile the account holds
    eraser = destination_type("klaviyo").build_eraser("klaviyo_default")
    answer = eraser.erase("gone@example.com", "account")
    assert answer.startswith("202") and "gone@example.com" not in answer
    account = sandbox.state()["klaviyo"]["accounts"][KLAVIYO_ACCOUNT_ID]
    assert account["profiles"] == {} and account["deletions"] == [{"identifier": "email", "status": "done", "deleted": 1}]
    assert sandbox.state()["requests"]["by_endpoint"]["POST /api/data-privacy-deletion-jobs"]["status"] == {"202": 1}


def test_a_refused_request_raises_naming_the_connection_never_the_key_or_address(sandbox, airflow_conn):
    airflow_conn("klaviyo_bad", conn_type="klaviyo", host=sandbox.klaviyo_host, password="pk_wrong_key")
    eraser = destination_type("klaviyo").build_eraser("klaviyo_bad")
    with pytest.raises(DestinationError) as err:
        eraser.erase("someone@example.com", "account")
    text = str(err.value)
    assert text.startswith("Klaviyo connection 'klaviyo_bad'") and "HTTP 401" in text
    assert "pk_wrong_key" not in text and "someone@example.com" not in text


def test_requests_are_paced_to_the_documented_limits():
    assert KlaviyoApi.rate_limits["data-privacy"] == (3, 60)  # x-klaviyo-ratelimit of Request Profile Deletion
