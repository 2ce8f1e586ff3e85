"""The ``destination`` block of a Mailchimp export (``type: mailchimp``). Pure: pydantic only."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from segment_export.spec import DestinationSpec

if TYPE_CHECKING:
    from segment_export.spec import ExportSpec

# Mailchimp merge tags: letters, digits and underscores, at most 10 characters.
MERGE_TAG_RE = re.compile(r"^[A-Z0-9_]{1,10}$")


class MailchimpDestinationSpec(DestinationSpec):
    type: Literal["mailchimp"]
    audience_id: str = Field(min_length=1, description="The Mailchimp audience (list) id.")
    new_member_status: Literal["subscribed", "pending", "unsubscribed", "transactional"] = Field(
        description=(
            "Status given to members the export creates. Required: adding a person to an audience is a consent "
            "decision. Existing members' status is never changed by an export."
        )
    )
    status_without_consent: Literal["pending", "unsubscribed", "transactional"] = Field(
        "transactional",
        description="With mapping.consent: the status of a new member whose consent column is not true.",
    )

    @property
    def target_id(self) -> str:
        return self.audience_id

    def doc_rows(self) -> list[tuple[str, str]]:
        return [("New members' status", f"`{self.new_member_status}` (existing members' status is never changed)")]

    def check_export(self, export: ExportSpec) -> None:
        if export.mapping.external_id:
            raise ValueError(
                "mapping.external_id: Mailchimp has no external id; map the column to a merge field in "
                "'mapping.attributes' instead"
            )
        bad = [tag for tag in export.mapping.attributes if not MERGE_TAG_RE.match(tag)]
        if bad:
            raise ValueError(
                f"mapping.attributes: {bad} are not Mailchimp merge tags (A-Z, 0-9, '_', at most 10 characters)"
            )
