"""Mailchimp audience destination: batch subscribe, never changing an existing member's status.

Each batch is sent in (at most) two calls:

1. ``update_existing: false`` with the status for new members (``new_member_status``, or
   ``status_without_consent`` where ``mapping.consent`` is not true): new people are created with it,
   people already in the audience come back as ``ERROR_CONTACT_EXISTS`` and are left untouched;
2. for those, ``update_existing: true`` **without** a status: their merge fields are updated and their
   subscription status stays what it was, so an export never re-subscribes someone who unsubscribed.
"""

from __future__ import annotations

from typing import Any

from segment_export.batching import Batch
from segment_export.destinations.base import Destination, dump_bytes, redact_emails
from segment_export.hooks.base import DestinationError
from segment_export.hooks.mailchimp import MAX_CONNECTIONS_PER_KEY, MailchimpHook
from segment_export.mapping import Profile, Rejection
from segment_export.spec import ExportSpec, MappingSpec
from segment_export.summary import BatchResult

MAX_BATCH_MEMBERS = 500
MAX_BODY_BYTES = 10_000_000  # no documented cap per call; keeps one request well-sized
CONTACT_EXISTS = "ERROR_CONTACT_EXISTS"
MAX_MERGE_TEXT = 255  # characters in a text merge field
# What send() and remove() read of a batch answer (see _key, _reason, _is_lasting): asked for by name, the
# answer carries no whole member objects (each ~1 KB). Mailchimp documents `fields` for reads; its reference
# does not list it for this POST. Were it ignored, the whole answer comes and the same keys are read. ``errors``
# is asked for whole (it is small): were paths into it handled otherwise, existing members
# (ERROR_CONTACT_EXISTS) must still be seen, or they would never get their update.
BATCH_ANSWER_FIELDS = ",".join([
    "new_members.email_address", "updated_members.email_address", "total_created", "total_updated", "errors",
])
# Profile fields with a standard merge tag in every new Mailchimp audience.
STANDARD_MERGE_TAGS = {"first_name": "FNAME", "last_name": "LNAME", "phone_number": "PHONE"}


def merge_tags_for(mapping: MappingSpec) -> list[str]:
    """Every merge tag the mapping writes to."""
    tags = [tag for name, tag in STANDARD_MERGE_TAGS.items() if getattr(mapping, name)]
    return tags + list(mapping.attributes)


def member_fragment(profile: Profile, status: str) -> bytes:
    """A member with ``status`` last: the creating call sends it, the updating call cuts it off (see
    :func:`without_status`), so an existing member's status is never sent."""
    merge_fields: dict[str, Any] = {}
    for name, tag in STANDARD_MERGE_TAGS.items():
        value = getattr(profile, name)
        if value is not None:
            merge_fields[tag] = value
    merge_fields.update(profile.attributes)
    member: dict[str, Any] = {"email_address": profile.email}
    if merge_fields:
        member["merge_fields"] = merge_fields
    member["status"] = status
    return dump_bytes(member)


def without_status(fragment: bytes) -> bytes:
    """The member without its trailing ``"status"`` (fragments are written by :func:`member_fragment`)."""
    return fragment[: fragment.rindex(b',"status":')] + b"}"


def batch_body(fragments: list[bytes], update_existing: bool) -> bytes:
    flag = b"true" if update_existing else b"false"
    return b'{"members":[' + b",".join(fragments) + b'],"update_existing":' + flag + b',"sync_tags":false}'


class MailchimpDestination(Destination):
    type = "mailchimp"
    max_batch_profiles = MAX_BATCH_MEMBERS
    max_batch_bytes = MAX_BODY_BYTES

    def __init__(self, hook: MailchimpHook, audience_id: str, new_member_status: str, merge_tags: list[str], *,
                 status_without_consent: str = "transactional", uses_consent: bool = False,
                 concurrency: int = MAX_CONNECTIONS_PER_KEY):
        self.hook, self.target_id = hook, audience_id
        self.merge_tags = merge_tags
        self.concurrency = min(concurrency, MAX_CONNECTIONS_PER_KEY)
        self.new_member_status, self.status_without_consent = new_member_status, status_without_consent
        self.uses_consent = uses_consent

    @classmethod
    def from_spec(cls, spec: ExportSpec) -> MailchimpDestination:
        dest = spec.destination
        hook = MailchimpHook(dest.connection_id)
        return cls(
            hook, dest.audience_id, dest.new_member_status, merge_tags_for(spec.mapping),  # type: ignore[union-attr]
            status_without_consent=dest.status_without_consent,  # type: ignore[union-attr]
            uses_consent=spec.mapping.consent is not None,
        )

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

    def encode(self, profile: Profile) -> bytes | Rejection:
        """Mailchimp keeps at most 255 characters in a text merge field; longer values are refused here, by name."""
        for name, tag in STANDARD_MERGE_TAGS.items():
            value = getattr(profile, name)
            if value is not None and len(value) > MAX_MERGE_TEXT:
                return Rejection(f"merge field {tag} is longer than {MAX_MERGE_TEXT} characters")
        for tag, value in profile.attributes.items():
            if isinstance(value, str) and len(value) > MAX_MERGE_TEXT:
                return Rejection(f"merge field {tag} is longer than {MAX_MERGE_TEXT} characters")
        return super().encode(profile)

    def serialize(self, profile: Profile) -> bytes:
        consented = profile.consent if self.uses_consent else True
        return member_fragment(profile, self.new_member_status if consented else self.status_without_consent)

    def send(self, batch: Batch) -> BatchResult:
        by_key = {key: i for i, key in enumerate(batch.keys)}
        first = self.hook.batch_subscribe(
            self.target_id, batch_body(batch.fragments, update_existing=False), fields=BATCH_ANSWER_FIELDS
        )
        result = BatchResult(accepted=0, created=0, updated=0)
        existing: list[int] = []
        for error in first.get("errors") or []:
            key = _key(error)
            if error.get("error_code") == CONTACT_EXISTS and key in by_key:
                existing.append(by_key[key])
                continue
            _fold_error(result, error, key)
        result.created = int(first.get("total_created") or 0)
        result.accepted_keys.update(_key(m) for m in first.get("new_members") or [])
        if existing:
            second = self.hook.batch_subscribe(
                self.target_id, batch_body([without_status(batch.fragments[i]) for i in existing], update_existing=True),
                fields=BATCH_ANSWER_FIELDS,
            )
            result.updated = int(second.get("total_updated") or 0)
            result.accepted_keys.update(_key(m) for m in second.get("updated_members") or [])
            for error in second.get("errors") or []:
                _fold_error(result, error, _key(error))
        result.accepted = result.created + result.updated
        unaccounted = len(batch) - result.accepted - sum(result.rejected.values()) - sum(result.skipped.values())
        if unaccounted > 0:
            result.rejected["not confirmed by Mailchimp"] += unaccounted
        result.accepted_keys &= set(by_key)
        return result

    # -- tags and leavers ----------------------------------------------------------------------------------
    manages_segments = True

    def prepare_segments(self, names: list[str]) -> None:
        self._tags = self.hook.static_segments(self.target_id)
        for name in names:
            if name not in self._tags:
                self._tags[name] = self.hook.create_static_segment(self.target_id, name)

    def change_segment(self, segment: str, op: str, keys: list[str]) -> set[str]:
        tags = getattr(self, "_tags", None) or self.hook.static_segments(self.target_id)
        self._tags = tags
        if segment not in tags:
            return set() if op == "-" else set(keys)  # nothing to remove from a tag that does not exist
        failed: set[str] = set()
        for start in range(0, len(keys), MAX_BATCH_MEMBERS):
            part = keys[start : start + MAX_BATCH_MEMBERS]
            add, remove = (part, []) if op == "+" else ([], part)
            answer = self.hook.update_segment_members(self.target_id, tags[segment], add, remove)
            for error in answer.get("errors") or []:
                failed.update(str(e).strip().lower() for e in error.get("email_addresses") or [])
        return failed

    def remove(self, keys: list[str], how: str) -> set[str]:
        """``remove`` is done by the tag changes; ``unsubscribe`` sets the members' status, explicitly opted in."""
        if how == "remove":
            return set()
        members = [dump_bytes({"email_address": key, "status": "unsubscribed"}) for key in keys]
        failed: set[str] = set()
        for start in range(0, len(members), MAX_BATCH_MEMBERS):
            answer = self.hook.batch_subscribe(
                self.target_id, batch_body(members[start : start + MAX_BATCH_MEMBERS], True), fields=BATCH_ANSWER_FIELDS
            )
            failed.update(_key(e) for e in answer.get("errors") or [] if not _is_lasting(e))
        return failed

    @property
    def request_stats(self) -> dict[str, int]:
        return {"requests": self.hook.requests, "retries": self.hook.retries}


def _key(item: dict[str, Any]) -> str:
    return str(item.get("email_address") or "").strip().lower()


# Member errors that will not change by sending again: reported as skipped, not retried.
_LASTING = ("compliance state", "permanently deleted", "forgotten email")


def _is_lasting(error: dict[str, Any]) -> bool:
    text = str(error.get("error") or "").lower()
    return any(marker in text for marker in _LASTING)


def _reason(error: dict[str, Any]) -> str:
    message = redact_emails(str(error.get("error") or "rejected"))
    code = error.get("error_code") or "ERROR"
    return f"{code}: {message}"


def _fold_error(result: BatchResult, error: dict[str, Any], key: str) -> None:
    reason = _reason(error)
    if _is_lasting(error):
        result.skipped[reason] += 1
        if key:
            result.skipped_keys[key] = reason
    else:
        result.rejected[reason] += 1
        if key:
            result.rejected_keys[key] = reason
