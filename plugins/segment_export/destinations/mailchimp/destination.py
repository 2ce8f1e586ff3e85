"""Mailchimp audience destination: new members by batch subscribe, existing ones by the documented upsert.

Each batch of (at most) 500 profiles is sent in two steps, each on documented behaviour only:

1. **Batch subscribe** (``POST /lists/{id}``) with ``update_existing: false`` and every member's ``status``
   (``new_member_status``, or ``status_without_consent`` where ``mapping.consent`` is not true). The reference
   documents ``update_existing`` as "whether this batch operation will change existing members' subscription
   status": with it false, new people are created with that status and answered in ``new_members`` (reported
   ``created``), and people already in the audience come back as ``ERROR_CONTACT_EXISTS``, untouched. Every
   member carries a status, so the request is valid whether or not Mailchimp takes status-less members (it does
   not document that; the sandbox switch ``mailchimp_batch_update_requires_status`` plays both).
2. For those existing members, **one batch operations job** (``POST /batches``) of ``PUT
   /lists/{id}/members/{subscriber_hash}`` ("Add or update a list member") with ``status_if_new`` and no
   ``status``: ``status_if_new`` is "required only if the email address is not already present on the list", and
   without ``status`` an existing member's status is left as it is while its merge fields are updated. A member
   who unsubscribed is never re-subscribed by an export; one deleted between the two steps is added back with the
   new-member status. The job is asynchronous (Mailchimp's guide "Run async requests with the batch endpoint"):
   it is polled with ``GET /batches/{id}`` (after half a second, the wait doubling up to 20 s, for at most an
   hour) until ``finished``, then the per-operation results are read from the gzipped tar of JSON files at
   ``response_body_url``; each operation's ``operation_id`` is the member's subscriber hash, which maps a result
   back to its profile. A 2xx result is the member ``updated``; results answered 429 or 5xx go out again in a new
   job (twice at most); any other result rejects that member with Mailchimp's ``title: detail`` (addresses
   redacted), or skips it for a lasting reason (permanently deleted, compliance state).
   A run has at most one job pending per connection (10), far under Mailchimp's limit of 500 pending batches per
   API key; were other apps on the key to fill it, the refusal on submit is retried as throttling is.

Batch ids are not kept across runs: the state advances only on confirmed results, so a killed run's members are
sent again by the next run, and the upsert makes that harmless. Mailchimp runs one batch request at a time
(reference, ``DELETE /batches/{batch_id}``), so a killed run's job cannot overtake the next run's.

Tags are static segments. Creating one is idempotent: a retried ``POST /segments`` whose first answer was lost is
refused with 400 "already exists", and the tag is then found by name. Mailchimp ignores non-members in tag
changes ("will be ignored", reference), so a member an add leaves out of ``members_added`` is looked up: one the
audience no longer has (deleted or archived in Mailchimp) fails its tag change and is listed in
:attr:`MailchimpDestination.not_in_audience`, for the exporter to forget it so that the next run adds it again
(or learns it was permanently deleted) instead of retrying the tag forever or counting it as tagged.
"""

from __future__ import annotations

import json
import time
from typing import Any, Iterator

from segment_export.batching import Batch
from segment_export.destinations.base import Destination, dump_bytes, redact_emails
from segment_export.drift import MEMBER, SUPPRESSED, UNSUBSCRIBED, Held
from segment_export.hooks.base import DestinationError
from segment_export.destinations.mailchimp.hook import MAX_CONNECTIONS_PER_KEY, MailchimpHook, batch_finished, subscriber_hash
from segment_export.mapping import Profile, Rejection
from segment_export.spec import ExportSpec, MappingSpec
from segment_export.summary import BatchResult

MAX_BATCH_MEMBERS = 500
MAX_BODY_BYTES = 10_000_000  # no documented cap per call; keeps one request well-sized
CONTACT_EXISTS = "ERROR_CONTACT_EXISTS"
MAX_MERGE_TEXT = 255  # characters in a text merge field
TRANSIENT_ROUNDS = 2  # further jobs for operations answered 429 or 5xx
MAX_PENDING_BATCHES = 500  # per API key (Mailchimp's batch operations guide); a run holds one per connection
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
    """A member with ``status`` last: batch subscribe creates new members with it; for existing ones it becomes
    ``status_if_new`` (see :func:`upsert_body`), so an existing member's status is never sent."""
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


def upsert_body(fragment: bytes) -> bytes:
    """The member as ``PUT /lists/{id}/members/{hash}`` takes it: the status becomes ``status_if_new``, which
    Mailchimp applies only if it creates the member."""
    cut = fragment.rindex(b',"status":')
    return fragment[:cut] + b',"status_if_new":' + fragment[cut + len(b',"status":'):]


def upsert_operation(audience_id: str, key: str, fragment: bytes) -> bytes:
    """One batch operation: the member's upsert, identified by its subscriber hash (no address in the id)."""
    member = subscriber_hash(key)
    return dump_bytes({
        "method": "PUT", "path": f"/lists/{audience_id}/members/{member}", "operation_id": member,
        "body": upsert_body(fragment).decode("utf-8"),
    })


def operations_body(operations: list[bytes]) -> bytes:
    return b'{"operations":[' + b",".join(operations) + b"]}"


def batch_body(fragments: list[bytes], update_existing: bool) -> bytes:
    flag = b"true" if update_existing else b"false"
    return b'{"members":[' + b",".join(fragments) + b'],"update_existing":' + flag + b',"sync_tags":false}'


class MailchimpDestination(Destination):
    type = "mailchimp"
    max_batch_profiles = MAX_BATCH_MEMBERS
    max_batch_bytes = MAX_BODY_BYTES

    def __init__(self, hook: MailchimpHook, audience_id: str, new_member_status: str, merge_tags: list[str], *,
                 status_without_consent: str = "transactional", uses_consent: bool = False,
                 concurrency: int = MAX_CONNECTIONS_PER_KEY, poll_interval: float = 0.5,
                 poll_max_interval: float = 20.0, max_batch_wait: float = 3600.0):
        self.hook, self.target_id = hook, audience_id
        self.poll_interval, self.poll_max_interval, self.max_batch_wait = poll_interval, poll_max_interval, max_batch_wait
        #: members a tag add found missing from the audience (deleted or archived in Mailchimp): to be forgotten
        self.not_in_audience: set[str] = set()
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
            raise self.hook.error(
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
        result = BatchResult(accepted=0, created=0, updated=0, updated_keys=set())
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
            self._update_existing({batch.keys[i]: batch.fragments[i] for i in existing}, result)
        result.accepted = result.created + result.updated
        unaccounted = len(batch) - result.accepted - sum(result.rejected.values()) - sum(result.skipped.values())
        if unaccounted > 0:
            result.rejected["not confirmed by Mailchimp"] += unaccounted
        result.accepted_keys &= set(by_key)
        return result

    def _update_existing(self, fragments: dict[str, bytes], result: BatchResult) -> None:
        """Upsert existing members in batch operations jobs; fold each operation's result into ``result``."""
        assert result.updated_keys is not None
        by_operation = {subscriber_hash(key): key for key in fragments}
        todo = list(fragments)
        last: dict[str, str] = {}
        for _ in range(1 + TRANSIENT_ROUNDS):
            again: list[str] = []
            body = operations_body([upsert_operation(self.target_id, key, fragments[key]) for key in todo])
            for outcome in self._run_batch(body):
                key = by_operation.get(str(outcome.get("operation_id")))
                if key is None or key in result.updated_keys:
                    continue
                status = int(outcome.get("status_code") or 0)
                if 200 <= status < 300:
                    result.updated_keys.add(key)
                    result.accepted_keys.add(key)
                elif status == 429 or status >= 500:
                    again.append(key)
                    last[key] = _operation_reason(status, outcome.get("response"))
                else:
                    last.pop(key, None)
                    _fold_error(result, {"error": _operation_reason(status, outcome.get("response"))}, key, coded=False)
            todo = again
            if not todo:
                break
        for key in todo:  # still throttled or failing on Mailchimp's side: not remembered, sent again next run
            _fold_error(result, {"error": last[key]}, key, coded=False)
        result.updated = len(result.updated_keys)

    def _run_batch(self, body: bytes) -> list[dict[str, Any]]:
        """Submit one batch operations job, wait until it is finished, return its per-operation results."""
        job = self.hook.start_batch(body)
        interval, waited = self.poll_interval, 0.0
        while not batch_finished(job):
            if waited >= self.max_batch_wait:
                raise self.hook.error(
                    f"Mailchimp batch {job.get('id')} was not finished after {waited:.0f} s (status "
                    f"{job.get('status')!r}); its members are not counted as sent and go out again next run"
                )
            time.sleep(interval)
            waited += interval
            interval = min(self.poll_max_interval, interval * 2)
            job = self.hook.get_batch(job["id"])
        if not int(job.get("total_operations") or 0) or not job.get("response_body_url"):
            return []
        return self.hook.batch_results(job["response_body_url"])

    # -- tags and leavers ----------------------------------------------------------------------------------
    manages_segments = True

    def prepare_segments(self, names: list[str]) -> None:
        self._tags = self.hook.static_segments(self.target_id)
        for name in names:
            if name not in self._tags:
                self._tags[name] = self._create_tag(name)

    def _create_tag(self, name: str) -> int:
        """Create a tag, safely retried: a repeated ``POST /segments`` whose first answer was lost is refused with
        400 ("A segment or tag named ... already exists"); the tag made by the first one is then found by name."""
        try:
            return self.hook.create_static_segment(self.target_id, name)
        except DestinationError as exc:
            if exc.status != 400:
                raise
            found = self.hook.static_segments(self.target_id)
            if name not in found:
                raise
            self._tags.update(found)
            return found[name]

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
            named = {str(e).strip().lower() for error in answer.get("errors") or [] for e in error.get("email_addresses") or []}
            failed |= named
            if op == "+" and "members_added" in answer:
                added = {_key(m) for m in answer["members_added"] or []}
                failed |= self._not_tagged([k for k in part if k not in added and k not in named], segment)
        return failed

    def _not_tagged(self, keys: list[str], segment: str) -> set[str]:
        """Of members an add left out of ``members_added``, those without the tag: the ones the audience no longer
        has are also kept in :attr:`not_in_audience` (Mailchimp ignores non-members rather than naming them)."""
        missing: set[str] = set()
        for key in keys:
            member = self.hook.find_member(self.target_id, key)
            if member is None or member.get("status") == "archived":
                missing.add(key)
                self.not_in_audience.add(key)
            elif segment not in {t.get("name") for t in member.get("tags") or []}:
                missing.add(key)
        if missing:
            self.hook.log.warning(
                "%d member(s) could not be tagged %r: %d no longer in the audience (they are added again next run)",
                len(missing), segment, len(missing & self.not_in_audience),
            )
        return missing

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

    def membership(self, segments: list[str]) -> Iterator[list[Held]]:
        """The members carrying one of the export's tags (its ``segments``), a page of up to 1,000 at a time:
        the export's part of an audience other tools share. Statuses: ``unsubscribed`` stays ``unsubscribed``,
        ``cleaned`` (bounced) is ``suppressed``, subscribed, pending and transactional members are members;
        archived ones are not held. One request per 1,000 tagged members and tag; a tag that does not exist
        holds nobody. A member the audience still has but without the export's tags counts as not held."""
        tags = self.hook.static_segments(self.target_id)
        for name in dict.fromkeys(segments):
            if name not in tags:
                continue
            for page in self.hook.segment_member_pages(self.target_id, tags[name]):
                yield [held for member in page if (held := _held(member)) is not None]

    @property
    def request_stats(self) -> dict[str, int]:
        return {"requests": self.hook.requests, "retries": self.hook.retries}


_HELD_STATUS = {"unsubscribed": UNSUBSCRIBED, "cleaned": SUPPRESSED}


def _held(member: dict[str, Any]) -> Held | None:
    status = str(member.get("status") or "")
    if status == "archived":
        return None
    key = _key(member)
    return Held(key, _HELD_STATUS.get(status, MEMBER), f"mailchimp member {subscriber_hash(key)}")


def _key(item: dict[str, Any]) -> str:
    return str(item.get("email_address") or "").strip().lower()


# Member errors that will not change by sending again: reported as skipped, not retried.
_LASTING = ("compliance state", "permanently deleted", "forgotten email")


def _is_lasting(error: dict[str, Any]) -> bool:
    text = str(error.get("error") or "").lower()
    return any(marker in text for marker in _LASTING)


def _reason(error: dict[str, Any], coded: bool = True) -> str:
    message = redact_emails(str(error.get("error") or "rejected"))
    if not coded:
        return message
    code = error.get("error_code") or "ERROR"
    return f"{code}: {message}"


def _operation_reason(status: int, response: Any) -> str:
    """A batch operation's failure in Mailchimp's words (``title: detail``, field errors), addresses redacted."""
    try:
        body = json.loads(response) if isinstance(response, str) else response
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return f"HTTP {status}"
    text = f"{body.get('title') or f'HTTP {status}'}: {body.get('detail') or ''}".rstrip(": ")
    errors = [e for e in body.get("errors") or [] if isinstance(e, dict)]
    if errors:
        text += " (" + "; ".join(f"{e.get('field')}: {e.get('message')}" for e in errors) + ")"
    return redact_emails(text)


def _fold_error(result: BatchResult, error: dict[str, Any], key: str, coded: bool = True) -> None:
    reason = _reason(error, coded)
    if _is_lasting(error):
        result.skipped[reason] += 1
        if key:
            result.skipped_keys[key] = reason
    else:
        result.rejected[reason] += 1
        if key:
            result.rejected_keys[key] = reason
