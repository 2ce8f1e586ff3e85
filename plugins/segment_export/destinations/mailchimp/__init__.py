"""Mailchimp: members of an audience, upserted by batch-subscribe calls, segments kept as member tags.

This package holds everything about Mailchimp: the spec block (spec.py), the hook (hook.py), the payloads and
the sending (destination.py), and the declaration below, which is all the rest of the exporter reads.
"""

from segment_export.destinations.mailchimp.spec import MailchimpDestinationSpec
from segment_export.destinations.registry import DestinationType

MAILCHIMP = DestinationType(
    name="mailchimp",
    display_name="Mailchimp",
    target_kind="audience",
    spec_model=MailchimpDestinationSpec,
    destination="segment_export.destinations.mailchimp.destination:MailchimpDestination",
    hook="segment_export.destinations.mailchimp.hook.MailchimpHook",
    eraser="segment_export.destinations.mailchimp.erasure:MailchimpEraser",
    # The seed product's cap per export (its docs: up to 1,000,000 profiles).
    max_profiles=1_000_000,
    api_host="api.mailchimp.com",
    doc_url="https://mailchimp.com/developer/marketing/",
    connection_form={
        "hidden-fields": ["schema", "port", "login"],
        "relabeling": {"password": "API key", "host": "API base URL (optional)"},
        "placeholders": {"password": "0123…-us6", "host": "https://us6.api.mailchimp.com/3.0"},
    },
    # The export's segments are tags: a leaver loses the export's tags; 'unsubscribe' is an explicit opt-in.
    verifies=True,  # membership(): drift reports (verify runs)
    on_leave=("remove", "keep", "unsubscribe"),
)
