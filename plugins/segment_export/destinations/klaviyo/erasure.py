"""Klaviyo erasure: one Request Profile Deletion per address, for the whole account behind the connection.

Klaviyo's data privacy deletion (``POST /api/data-privacy-deletion-jobs``, revision 2026-07-15) deletes "all
profiles that match the provided identifier", in every list, asynchronously: the 202 says Klaviyo has the
request, not that the profile is gone ("The deletion occurs asynchronously; however, once it has completed, the
deleted profile will appear on the Deleted Profiles page"). So one request per connection (its account) covers
every Klaviyo list exports write to, and the receipt records the 202 as the answer. How long the deletion takes
is not documented: the exporter never relies on it (an erased address is skipped by every export at once), and
the sandbox's ``klaviyo_profile_deletion`` switch tests both an immediate and a later deletion.
"""

from __future__ import annotations

from segment_export.destinations.base import Eraser
from segment_export.destinations.klaviyo.hook import KlaviyoHook

#: the erasure target of a Klaviyo connection: its whole account (a deletion is not per list)
ACCOUNT = "account"


class KlaviyoEraser(Eraser):
    type = "klaviyo"

    def __init__(self, hook: KlaviyoHook):
        self.hook, self.conn_id = hook, hook.conn_id

    @classmethod
    def from_connection(cls, conn_id: str) -> KlaviyoEraser:
        return cls(KlaviyoHook(conn_id))

    def targets(self, target_ids: list[str]) -> list[str]:
        """One target whatever the lists: the deletion reaches every profile with the address in the account."""
        return [ACCOUNT]

    def erase(self, email: str, target: str) -> str:
        self.hook.request_profile_deletion(email)
        return "202 Accepted: profile deletion requested (Klaviyo deletes asynchronously, from every list)"
