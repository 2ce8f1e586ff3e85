"""Destinations: payload building (pure) and batch sending (through the hooks) for Klaviyo and Mailchimp."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from segment_export.destinations.base import Destination
    from segment_export.spec import ExportSpec


def destination_for(spec: ExportSpec) -> Destination:
    """The destination an export sends to, with its hook (no request is made here)."""
    if spec.destination.type == "klaviyo":
        from segment_export.destinations.klaviyo.destination import KlaviyoDestination

        return KlaviyoDestination.from_spec(spec)
    from segment_export.destinations.mailchimp.destination import MailchimpDestination

    return MailchimpDestination.from_spec(spec)
