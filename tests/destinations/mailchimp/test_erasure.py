"""MailchimpEraser against the sandbox: a permanent delete in each audience, a 404 for a non-member is an answer."""

from __future__ import annotations

import pytest
from sandbox_state import mailchimp_members
from segment_export_sandbox import MAILCHIMP_AUDIENCE_ID

from segment_export.destinations import destination_type
from segment_export.hooks.base import DestinationError


def test_erase_deletes_the_member_permanently_and_a_non_member_is_answered(sandbox):
    sandbox.seed_mailchimp_member(MAILCHIMP_AUDIENCE_ID, "gone@example.com", "subscribed", tags=["vip"])
    eraser = destination_type("mailchimp").build_eraser("mailchimp_default")
    assert eraser.targets([MAILCHIMP_AUDIENCE_ID]) == [MAILCHIMP_AUDIENCE_ID]
    assert eraser.erase("Gone@Example.com", MAILCHIMP_AUDIENCE_ID).startswith("204")
    assert mailchimp_members(sandbox.state(), MAILCHIMP_AUDIENCE_ID) == {}
    assert eraser.erase("gone@example.com", MAILCHIMP_AUDIENCE_ID).startswith("404")  # nothing left to erase


def test_a_missing_audience_or_a_bad_key_is_not_an_answer(sandbox, airflow_conn):
    eraser = destination_type("mailchimp").build_eraser("mailchimp_default")
    with pytest.raises(DestinationError, match="HTTP 404"):  # the same 404 as a non-member's, but no answer
        eraser.erase("someone@example.com", "no_such_audience")
    airflow_conn("mailchimp_bad", conn_type="mailchimp", host=sandbox.mailchimp_host, password="badbadbad-us6")
    with pytest.raises(DestinationError) as err:
        destination_type("mailchimp").build_eraser("mailchimp_bad").erase("someone@example.com", MAILCHIMP_AUDIENCE_ID)
    assert "HTTP 401" in str(err.value) and "badbadbad" not in str(err.value) and "someone@" not in str(err.value)
