"""Mailchimp audience destination: batch subscribe, never changing an existing member's status.

Each batch is sent in (at most) two calls:

1. ``update_existing: false`` with the spec's status for new members: new people are created with that status,
   people already in the audience come back as ``ERROR_CONTACT_EXISTS`` and are left untouched;
2. for those, ``update_existing: true`` **without** a status: their merge fields are updated and their
   subscription status stays what it was, so an export never re-subscribes someone who unsubscribed.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from segment_export.batching import Batch
from segment_export.destinations.base import Destination, dump_bytes, redact_emails
from segment_export.hooks.base import DestinationError
from segment_export.hooks.mailchimp import MAX_CONNECTIONS_PER_KEY, MailchimpHook
from segment_export.mapping import Profile
from segment_export.spec import ExportSpec, MappingSpec
from segment_export.summary import BatchResult

MAX_BATCH_MEMBERS = 500
MAX_BODY_BYTES = 10_000_000  # no documented cap per call; keeps one request well-sized
CONTACT_EXISTS = "ERROR_CONTACT_EXISTS"
# Profile fields with a standard merge tag in every new Mailchimp audience.
STANDARD_MERGE_TAGS = {"first_name": "FNAME", "last_name": "LNAME", "phone_number": "PHONE"}


def merge_tags_for(mapping: MappingSpec) -> list[str]:
    """Every merge tag the mapping writes to."""
    tags = [tag for name, tag in STANDARD_MERGE_TAGS.items() if getattr(mapping, name)]
    return tags + list(mapping.attributes)


def member_fragment(profile: Profile) -> bytes:
    """A member without ``status``; the status is added only for the call that may create the member."""
    merge_fields: dict[str, Any] = {}
    for name, tag in STANDARD_MERGE_TAGS.items():
        value = getattr(profile, name)
        if value is not None:
            merge_fields[tag] = value
    merge_fields.update(profile.attributes)
    member: dict[str, Any] = {"email_address": profile.email}
    if merge_fields:
        member["merge_fields"] = merge_fields
    return dump_bytes(member)


def with_status(fragment: bytes, status_member: bytes) -> bytes:
    """The same member with ``"status": …`` appended (fragments are JSON objects ending in ``}``)."""
    return fragment[:-1] + status_member


def batch_body(fragments: list[bytes], update_existing: bool) -> bytes:
    flag = b"true" if update_existing else b"false"
    return b'{"members":[' + b",".join(fragments) + b'],"update_existing":' + flag + b',"sync_tags":false}'


class MailchimpDestination(Destination):
    type = "mailchimp"
    max_batch_profiles = MAX_BATCH_MEMBERS
    max_batch_bytes = MAX_BODY_BYTES

    def __init__(self, hook: MailchimpHook, audience_id: str, new_member_status: str, merge_tags: list[str], *, concurrency: int = MAX_CONNECTIONS_PER_KEY):
        self.hook, self.target_id = hook, audience_id
        self.merge_tags = merge_tags
        self.concurrency = min(concurrency, MAX_CONNECTIONS_PER_KEY)
        # b',"status":"…"}': appended to a member fragment in place of its closing brace
        self._status = b"," + dump_bytes({"status": new_member_status})[1:]

    @classmethod
    def from_spec(cls, spec: ExportSpec) -> MailchimpDestination:
        dest = spec.destination
        hook = MailchimpHook(dest.connection_id)
        return cls(hook, dest.audience_id, dest.new_member_status, merge_tags_for(spec.mapping))  # type: ignore[union-attr]

    def preflight(self) -> None:
        self.hook.get_audience(self.target_id)
        defined = {f["tag"]: f for f in self.hook.get_merge_fields(self.target_id)}
        missing = [tag for tag in self.merge_tags if tag not in defined]
        if missing:
            raise DestinationError(
                f"Mailchimp audience {self.target_id} has no merge field(s) {missing}; it has {sorted(defined)}. "
                "Create them in Mailchimp or change mapping.attributes"
            )
        required = [t for t, f in defined.items() if f.get("required") and t not in self.merge_tags]
        if required:
            self.hook.log.warning(
                "Mailchimp audience %s requires merge field(s) %s that the export does not map: new members "
                "without them will be rejected", self.target_id, required,
            )

    def serialize(self, profile: Profile) -> bytes:
        return member_fragment(profile)

    def send(self, batch: Batch) -> BatchResult:
        by_key = {key: i for i, key in enumerate(batch.keys)}
        first = self.hook.batch_subscribe(
            self.target_id, batch_body([with_status(f, self._status) for f in batch.fragments], update_existing=False)
        )
        rejected: Counter[str] = Counter()
        existing: list[int] = []
        for error in first.get("errors") or []:
            if error.get("error_code") == CONTACT_EXISTS:
                index = by_key.get(str(error.get("email_address", "")).strip().lower())
                if index is not None:
                    existing.append(index)
                    continue
            rejected[_reason(error)] += 1
        created = int(first.get("total_created") or 0)
        updated = 0
        if existing:
            second = self.hook.batch_subscribe(
                self.target_id, batch_body([batch.fragments[i] for i in existing], update_existing=True)
            )
            updated = int(second.get("total_updated") or 0)
            for error in second.get("errors") or []:
                rejected[_reason(error)] += 1
        unaccounted = len(batch) - created - updated - sum(rejected.values())
        if unaccounted > 0:
            rejected["not confirmed by Mailchimp"] += unaccounted
        return BatchResult(accepted=created + updated, rejected=rejected, created=created, updated=updated)

    @property
    def request_stats(self) -> dict[str, int]:
        return {"requests": self.hook.requests, "retries": self.hook.retries}


def _reason(error: dict[str, Any]) -> str:
    message = redact_emails(str(error.get("error") or "rejected"))
    code = error.get("error_code") or "ERROR"
    return f"{code}: {message}"
