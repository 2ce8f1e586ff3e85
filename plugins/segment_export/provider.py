"""Provider metadata, as data: what Airflow's providers manager reads through the entry point."""

from __future__ import annotations

from typing import Any

from segment_export import __version__

_TIMEOUT_FIELD = {
    "label": "Request timeout (seconds)",
    "description": "How long one request may take before it is retried. Default 120.",
    "schema": {"type": ["number", "null"], "minimum": 1},
}


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "segment-export",
        "name": "Segment export (Klaviyo, Mailchimp)",
        "description": "Export customer segments from a warehouse to Klaviyo lists and Mailchimp audiences.",
        "versions": [__version__],
        "integrations": [
            {"integration-name": "Klaviyo", "external-doc-url": "https://developers.klaviyo.com/", "tags": ["service"]},
            {"integration-name": "Mailchimp", "external-doc-url": "https://mailchimp.com/developer/marketing/", "tags": ["service"]},
        ],
        "hooks": [
            {"integration-name": "Klaviyo", "python-modules": ["segment_export.destinations.klaviyo.hook"]},
            {"integration-name": "Mailchimp", "python-modules": ["segment_export.destinations.mailchimp.hook"]},
        ],
        "operators": [
            {"integration-name": "Klaviyo", "python-modules": ["segment_export.operators.export"]},
            {"integration-name": "Mailchimp", "python-modules": ["segment_export.operators.export"]},
        ],
        "asset-uris": [
            {
                "schemes": ["klaviyo", "mailchimp"],
                "handler": "segment_export.assets.sanitize_uri",
                "factory": "segment_export.assets.create_asset",
                "to_openlineage_converter": "segment_export.assets.convert_asset_to_openlineage",
            }
        ],
        "connection-types": [
            {
                "connection-type": "klaviyo",
                "hook-class-name": "segment_export.destinations.klaviyo.hook.KlaviyoHook",
                "hook-name": "Klaviyo",
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "port", "login"],
                    "relabeling": {"password": "Private API key", "host": "API base URL (optional)"},
                    "placeholders": {"password": "pk_…", "host": "https://a.klaviyo.com"},
                },
                "conn-fields": {"timeout": _TIMEOUT_FIELD},
            },
            {
                "connection-type": "mailchimp",
                "hook-class-name": "segment_export.destinations.mailchimp.hook.MailchimpHook",
                "hook-name": "Mailchimp",
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "port", "login"],
                    "relabeling": {"password": "API key", "host": "API base URL (optional)"},
                    "placeholders": {"password": "0123…-us6", "host": "https://us6.api.mailchimp.com/3.0"},
                },
                "conn-fields": {"timeout": _TIMEOUT_FIELD},
            },
        ],
    }
