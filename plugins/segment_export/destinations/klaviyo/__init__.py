"""Klaviyo: profiles go to a list by bulk import jobs (asynchronous), by the Klaviyo API (revision in hook.py).

This package holds everything about Klaviyo: the spec block (spec.py), the hook (hook.py), the payloads and the
sending (destination.py), and the declaration below, which is all the rest of the exporter reads.
"""

from segment_export.destinations.klaviyo.spec import KlaviyoDestinationSpec
from segment_export.destinations.registry import DestinationType

KLAVIYO = DestinationType(
    name="klaviyo",
    display_name="Klaviyo",
    target_kind="list",
    spec_model=KlaviyoDestinationSpec,
    destination="segment_export.destinations.klaviyo.destination:KlaviyoDestination",
    hook="segment_export.destinations.klaviyo.hook.KlaviyoHook",
    async_hook="segment_export.destinations.klaviyo.hook.KlaviyoAsyncHook",
    eraser="segment_export.destinations.klaviyo.erasure:KlaviyoEraser",
    # The seed product's cap per export (its docs: "up to 100,000 profiles per export").
    max_profiles=100_000,
    api_host="a.klaviyo.com",
    doc_url="https://developers.klaviyo.com/",
    connection_form={
        "hidden-fields": ["schema", "port", "login"],
        "relabeling": {"password": "Private API key", "host": "API base URL (optional)"},
        "placeholders": {"password": "pk_…", "host": "https://a.klaviyo.com"},
    },
    # Removing from a list leaves consent alone; Klaviyo has no unsubscribe an export should send.
    verifies=True,  # membership(): drift reports (verify runs)
    on_leave=("keep", "remove"),
)
