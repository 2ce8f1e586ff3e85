"""Mailchimp erasure: a permanent delete in each audience exports on the connection write to.

Mailchimp has no account-wide deletion: ``POST /lists/{list_id}/members/{subscriber_hash}/actions/delete-permanent``
(Marketing API 3.0.55) erases the member's personal data in one audience and makes the address impossible to
re-import there ("Forgotten Email Not Subscribed" afterwards). So the erasure targets of a Mailchimp connection
are its exports' audiences, one receipt each. An address that is not a member of the audience is answered 404
(Mailchimp's "Resource Not Found"): there is nothing to erase, and that answer is the receipt, once the audience
itself is known to exist (a missing audience is answered with the same 404, and is an error).
"""

from __future__ import annotations

from segment_export.destinations.base import Eraser
from segment_export.destinations.mailchimp.hook import MailchimpHook
from segment_export.hooks.base import DestinationError


class MailchimpEraser(Eraser):
    type = "mailchimp"

    def __init__(self, hook: MailchimpHook):
        self.hook, self.conn_id = hook, hook.conn_id

    @classmethod
    def from_connection(cls, conn_id: str) -> MailchimpEraser:
        return cls(MailchimpHook(conn_id, max_concurrency=1))

    def erase(self, email: str, target: str) -> str:
        try:
            self.hook.delete_permanent(target, email)
        except DestinationError as exc:
            if exc.status != 404:
                raise
            # Mailchimp answers a missing audience with the same 404 as a missing member: only the latter is an
            # answer to keep (the audience lookup raises for a missing audience, and the request is retried).
            self.hook.get_audience(target)
            return "404 Resource Not Found: not a member of the audience, nothing to erase"
        return "204 No Content: member permanently deleted"
