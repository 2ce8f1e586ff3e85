"""Payload builders (pure): what exactly goes out for a profile."""

from __future__ import annotations

import json

from segment_export.destinations.klaviyo.destination import job_envelope, profile_fragment
from segment_export.destinations.mailchimp.destination import MailchimpDestination, batch_body, member_fragment, upsert_body
from segment_export.mapping import Profile, Rejection


def test_klaviyo_fragment_leaves_out_blank_fields_and_wraps_properties():
    p = Profile(email="a@example.com", key="a@example.com", first_name="Ada", attributes={"tier": "gold"})
    assert json.loads(profile_fragment(p)) == {
        "type": "profile", "attributes": {"email": "a@example.com", "first_name": "Ada", "properties": {"tier": "gold"}}
    }
    head, tail = job_envelope("L1")
    body = json.loads(head + profile_fragment(p) + tail)
    assert body["data"]["relationships"]["lists"]["data"] == [{"type": "list", "id": "L1"}]
    head, tail = job_envelope(None)
    assert "relationships" not in json.loads(head + profile_fragment(p) + tail)["data"]


def test_mailchimp_member_status_becomes_status_if_new_for_existing_members():
    p = Profile(email="a@example.com", key="a@example.com", first_name="Ada", phone_number="+1415", attributes={"STATUS": 'x,"status":"y"'})
    fragment = member_fragment(p, "pending")
    assert json.loads(fragment)["status"] == "pending"
    existing = json.loads(upsert_body(fragment))
    assert "status" not in existing and existing["status_if_new"] == "pending" and existing["merge_fields"] == {"FNAME": "Ada", "PHONE": "+1415", "STATUS": 'x,"status":"y"'}
    body = json.loads(batch_body([fragment], update_existing=False))
    assert body["update_existing"] is False and body["sync_tags"] is False and len(body["members"]) == 1


def test_mailchimp_refuses_merge_values_over_255_characters():
    destination = MailchimpDestination.__new__(MailchimpDestination)
    destination.new_member_status, destination.uses_consent = "subscribed", False
    long = Profile(email="a@example.com", key="a@example.com", last_name="x" * 256)
    assert destination.encode(long) == Rejection("merge field LNAME is longer than 255 characters")
    ok = Profile(email="a@example.com", key="a@example.com", last_name="x" * 255)
    assert isinstance(destination.encode(ok), bytes)


def test_mailchimp_upsert_operation_sends_status_if_new_and_no_status():
    from segment_export.destinations.mailchimp.destination import operations_body, upsert_body, upsert_operation
    from segment_export.destinations.mailchimp.hook import subscriber_hash

    p = Profile(email="Ada@Example.com", key="ada@example.com", first_name="Ada", attributes={"NOTE": 'x,"status":"y"'})
    fragment = member_fragment(p, "transactional")
    member = json.loads(upsert_body(fragment))
    assert member == {"email_address": "Ada@Example.com", "merge_fields": {"FNAME": "Ada", "NOTE": 'x,"status":"y"'},
                      "status_if_new": "transactional"}
    operation = json.loads(upsert_operation("A1", p.key, fragment))
    assert operation == {"method": "PUT", "path": f"/lists/A1/members/{subscriber_hash('ada@example.com')}",
                         "operation_id": subscriber_hash("ada@example.com"), "body": upsert_body(fragment).decode()}
    assert "@" not in operation["operation_id"] + operation["path"]  # no address outside the body
    assert json.loads(operations_body([upsert_operation("A1", p.key, fragment)] * 2))["operations"][1] == operation
