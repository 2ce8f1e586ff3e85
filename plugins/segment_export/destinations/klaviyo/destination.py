"""Klaviyo list destination: profiles go out as bulk profile import jobs with the list as relationship.

Each profile's outcome comes from the job's per-profile answers, never from its counts alone (whether
``completed_count`` includes the failed profiles is not documented): an import error names its profile by its
``original_payload`` and gives Klaviyo's ``detail`` as the reason; when every failure is named that way, the
job's other profiles were imported, otherwise the job's ``profiles`` relationship says which were. Each accepted
profile's Klaviyo id is remembered in the state, so that removals and list moves go by id, not by email (a
profile merged by its phone number or external id has another email in Klaviyo than the row's).

After each job, the profiles Klaviyo accepted are looked up (``GET /api/profiles``, 100 addresses a request,
with ``additional-fields[profile]=subscriptions``): suppressed ones (unsubscribed, bounced, spam complaint...)
stay in Klaviyo and in the list but cannot receive email, so they are reported as ``skipped`` with Klaviyo's
reason and remembered, not retried. With ``destination.subscribe`` the same answer decides who is subscribed
(Bulk Subscribe Profiles, at most 1,000 a request): rows whose consent column is true, whose Klaviyo consent is
``NEVER_SUBSCRIBED`` and who are not suppressed. Klaviyo's subscribe call lifts ``UNSUBSCRIBE``/``SPAM_REPORT``/
``USER_SUPPRESSED`` suppressions, so sending a suppressed or unsubscribed profile would re-subscribe someone
who opted out: that is never done. Nobody is ever unsubscribed by an export. On a double opt-in list
(``opt_in_process: double_opt_in``, read in preflight) Klaviyo sends a confirmation and subscribes only once the
profile confirms: those profiles are counted as ``pending``, not subscribed.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from typing import Any, Iterable, Iterator

from segment_export.batching import Batch
from segment_export.destinations.base import Destination, dump_bytes, redact_emails
from segment_export.drift import MEMBER, SUPPRESSED, UNSUBSCRIBED, Held
from segment_export.hooks.base import DestinationError
from segment_export.destinations.klaviyo.jobs import JobBoard
from segment_export.destinations.klaviyo.hook import (
    MAX_FILTER_EMAILS, MAX_SUBSCRIBE_PROFILES, KlaviyoHook, bulk_import_finished,
)
from segment_export.mapping import Profile
from segment_export.spec import ExportSpec
from segment_export.summary import BatchResult

MAX_JOB_PROFILES = 10_000
MAX_JOB_BYTES = 5_000_000  # "5 MB" per job; decimal megabytes, to stay clear of the cap either way
MAX_PROFILE_BYTES = 100_000  # "100 KB" per profile
# Jobs in flight at once. Klaviyo documents no cap on bulk profile import jobs in progress (see ``jobs``); the
# submissions are paced by the endpoint's rate limits (10/s burst, 150/m steady). A job takes about 2 s from its
# submission to being seen finished (the sandbox's documented-default latency, polled as ``jobs`` says), so at the
# burst rate about 20 are in flight: fewer, and the task waits on the cap instead of the rate limit (measured at
# 1,000,000 profiles from Parquet: 39.6 s with 10, 29-32 s with 20). Each job in flight keeps its profiles' keys,
# fingerprints and segments (``execute.BatchChanges``, about 64 bytes a profile: 0.65 MB a job), so this bounds memory.
JOBS_IN_FLIGHT = 20
KEPT_SHARED_PROFILE = "kept in the list: shares a Klaviyo profile with a row still in the segment"
# A list call naming a profile id Klaviyo no longer has (a remembered id gone stale): the spec lists only 4XX, so both
# the likely answers are read as that and the call is made again by email (a list that is gone fails again: raised).
STALE_ID_STATUSES = (400, 404)
# With destination.subscribe, a fragment ends with whether the row consents. The marker is part of the fingerprint
# (a consent that flips from false to true makes the row "changed", so the next run acts on it) and of the dry
# run's example, and is cut off before the profile goes into a job body (see :func:`without_consent`).
_CONSENT_KEY = b',"subscribe":'
_CONSENTS = _CONSENT_KEY + b"true}"
# Klaviyo's details may quote the value they refuse; a phone number is personal data like an email address.
# Only "+…" numbers: the exporter sends phone numbers in E.164, and other figures (sizes, counts) stay readable.
_PHONE_IN_TEXT = re.compile(r"\+\d[\d ().-]{5,}\d")
NOT_FOUND_AFTER_IMPORT = ("imported, but no Klaviyo profile has this email afterwards (merged into another profile "
                          "by its phone number or external id?): sent again next run")


def profile_fragment(profile: Profile) -> bytes:
    """A profile as a JSON:API resource of a bulk import job; unmapped or blank fields are left out."""
    attributes: dict[str, Any] = {"email": profile.email}
    # Spelled out, not a loop over getattr: this runs once per row.
    if profile.first_name is not None:
        attributes["first_name"] = profile.first_name
    if profile.last_name is not None:
        attributes["last_name"] = profile.last_name
    if profile.phone_number is not None:
        attributes["phone_number"] = profile.phone_number
    if profile.external_id is not None:
        attributes["external_id"] = profile.external_id
    if profile.attributes:
        attributes["properties"] = profile.attributes
    return dump_bytes({"type": "profile", "attributes": attributes})


def with_consent(fragment: bytes, consents: bool) -> bytes:
    """A profile fragment carrying the row's consent (``mapping.consent``) for a subscribing export."""
    return fragment[:-1] + _CONSENT_KEY + (b"true}" if consents else b"false}")


def without_consent(fragment: bytes) -> bytes:
    """The profile as the bulk import job takes it: the consent marker of :func:`with_consent` cut off."""
    return fragment[: fragment.rindex(_CONSENT_KEY)] + b"}"


def subscription_body(emails: Iterable[str], list_id: str | None, source: str) -> dict[str, Any]:
    """A Bulk Subscribe Profiles request: email marketing consent, now (not a historical import, so no
    ``consented_at``: Klaviyo refuses it without ``historical_import``), recorded with ``custom_source``."""
    profiles = [
        {"type": "profile", "attributes": {"email": email, "subscriptions": {"email": {"marketing": {"consent": "SUBSCRIBED"}}}}}
        for email in emails
    ]
    data: dict[str, Any] = {
        "type": "profile-subscription-bulk-create-job",
        "attributes": {"custom_source": source, "profiles": {"data": profiles}},
    }
    if list_id is not None:
        data["relationships"] = {"list": {"data": {"type": "list", "id": list_id}}}
    return {"data": data}


def suppression_reason(marketing: dict[str, Any], list_ids: Iterable[str]) -> str | None:
    """Why Klaviyo will not email this profile (a global suppression, or one from the export's lists), or None."""
    for suppression in marketing.get("suppression") or []:
        return f"suppressed in Klaviyo: {suppression.get('reason') or 'unknown reason'}"
    lists = set(list_ids)
    for suppression in marketing.get("list_suppressions") or []:
        if suppression.get("list_id") in lists:
            return f"suppressed from the list in Klaviyo: {suppression.get('reason') or 'unknown reason'}"
    return None


def job_envelope(list_id: str | None) -> tuple[bytes, bytes]:
    """The bytes before and after the joined profiles of a bulk import job body (no list: profiles only)."""
    head = b'{"data":{"type":"profile-bulk-import-job","attributes":{"profiles":{"data":['
    if list_id is None:
        return head, b"]}}}}"
    lists = dump_bytes({"lists": {"data": [{"type": "list", "id": list_id}]}})
    return head, b"]}},\"relationships\":" + lists + b"}}"


class KlaviyoDestination(Destination):
    type = "klaviyo"
    max_batch_profiles = MAX_JOB_PROFILES
    max_profile_bytes = MAX_PROFILE_BYTES

    def __init__(self, hook: KlaviyoHook, list_id: str | None, *, lists: dict[str, str] | None = None,
                 subscribe: bool = False, report_suppressed: bool = True, source: str = "segment-export",
                 concurrency: int = 10, jobs_in_flight: int = JOBS_IN_FLIGHT, poll_interval: float = 0.75,
                 remember_ids: bool = True):
        """One ``list_id`` for every profile, or ``lists`` (segment → list) where profiles follow their segments.

        ``subscribe``: rows whose consent is true are subscribed to email marketing after their import (with the
        list as the subscription's list; with ``lists``, the account's default opt-in process applies).
        ``report_suppressed``: look up the accepted profiles after each job to report suppressed ones as skipped
        (one GET per 100 profiles); subscribing needs it. ``source`` is recorded on Klaviyo's consent records.
        ``remember_ids``: learn each accepted profile's Klaviyo id (free with the suppression check, else one GET
        per 100 profiles), for removals and list moves by id; exports that never remove nor move need not."""
        if subscribe and not report_suppressed:
            raise ValueError("subscribing needs the suppression check (report_suppressed): it never subscribes a suppressed profile")
        self.hook = hook
        self.lists = lists
        self.list_id = list_id
        self.subscribe, self.report_suppressed, self.source = subscribe, report_suppressed, source
        self.remember_ids = remember_ids or lists is not None
        self.double_opt_in = False  # the list's opt_in_process, read in preflight
        self.manages_segments = lists is not None
        self.target_id = list_id or "+".join(sorted(set((lists or {}).values())))
        self.concurrency = concurrency
        self._jobs_in_flight = max(jobs_in_flight, 1)
        self.jobs = JobBoard(hook, interval=poll_interval)
        self._head, self._tail = job_envelope(list_id)
        self.max_batch_bytes = MAX_JOB_BYTES - len(self._head) - len(self._tail)
        #: leavers :meth:`remove` left in the list on purpose (key → why): their profile is a remembered row's
        #: still in the segment (merged by a shared phone number). The exporter reports them skipped, not removed.
        self.kept: dict[str, str] = {}
        #: jobs this process submitted and has not awaited yet: job id → (Klaviyo's first answer, consenting keys)
        self._submitted: dict[str, tuple[dict[str, Any], set[str]]] = {}

    @classmethod
    def from_spec(cls, spec: ExportSpec) -> KlaviyoDestination:
        dest = spec.destination
        return cls(
            KlaviyoHook(dest.connection_id, max_concurrency=JOBS_IN_FLIGHT + 1), dest.list_id, lists=dest.lists,  # type: ignore[union-attr]
            subscribe=dest.subscribe, report_suppressed=dest.checks_suppression,  # type: ignore[union-attr]
            source=f"segment-export {spec.id}", remember_ids=spec.on_leave == "remove",
        )

    wants_profile_ids = True

    def preflight(self) -> None:
        for list_id in sorted(set(self.lists.values())) if self.lists else [self.target_id]:
            found = self.hook.get_list(list_id)
            if list_id == self.list_id:
                self.double_opt_in = (found.get("attributes") or {}).get("opt_in_process") == "double_opt_in"

    def serialize(self, profile: Profile) -> bytes:
        fragment = profile_fragment(profile)
        return with_consent(fragment, profile.consent is True) if self.subscribe else fragment

    def job_body(self, batch: Batch) -> bytes:
        fragments = [without_consent(f) for f in batch.fragments] if self.subscribe else batch.fragments
        return self._head + b",".join(fragments) + self._tail

    asynchronous = True

    def submit(self, batch: Batch) -> str:
        """Submit the batch as a bulk import job; its handle is the job id. The job's first answer and the rows'
        consent stay in this process for :meth:`result` (only keys are kept in flight)."""
        body = self.job_body(batch)
        consenting = {k for k, f in zip(batch.keys, batch.fragments) if f.endswith(_CONSENTS)} if self.subscribe else set()
        # The body holds the payloads now; a job in flight (up to a minute) keeps only its keys.
        batch.fragments = []
        job = self.hook.submit_bulk_import(body)
        del body
        self._submitted[job["id"]] = (job, consenting)
        return job["id"]

    def result(self, handle: str, keys: list[str]) -> BatchResult | None:
        """Await the job ``handle`` (polling, backing off) and read each profile's outcome.

        A job submitted by another process (an interrupted or deferred run's) is looked up first (None when
        Klaviyo no longer knows it). A subscribing export does not know such a job's rows' consent any more (only
        keys are kept in flight): it awaits the job, then answers None so that the profiles are sent again, and
        subscribed, by this run."""
        submitted = self._submitted.pop(handle, None)
        if submitted is None:
            try:
                job = self.hook.get_bulk_import_job(handle)
            except DestinationError as exc:
                if exc.status == 404:
                    return None
                raise
            consenting = None
        else:
            job, consenting = submitted
        result = self._outcome(self._await(job), keys)
        if consenting is None:
            return None if self.subscribe else self._settle(result, set())
        return self._settle(result, consenting)

    def _settle(self, result: BatchResult, consenting: set[str]) -> BatchResult:
        """Learn the accepted profiles' ids; move those Klaviyo suppresses to ``skipped``; subscribe the consenting
        ones it may.

        Only profiles this run sent are looked up (only changed profiles are sent), 100 per request. A profile no
        longer found by its email was merged into another one: rejected (not confirmed), so sent again."""
        check = self.report_suppressed
        keys = sorted(result.accepted_keys if check else result.accepted_keys - result.profile_ids.keys())
        if not keys or not (check or self.remember_ids):
            return result
        # A list suppression counts for the export's one list; with one list per segment, only global ones do.
        list_ids = [self.list_id] if self.list_id else []
        to_subscribe: list[str] = []
        missing: list[str] = []
        for start in range(0, len(keys), MAX_FILTER_EMAILS):
            part = keys[start : start + MAX_FILTER_EMAILS]
            if check:
                found = self.hook.find_email_marketing(part)
            else:
                found = {k: (pid, k, None) for k, pid in self.hook.find_profile_ids(part).items()}
            for key in part:
                if key not in found:
                    missing.append(key)
                    continue
                profile_id, email, marketing = found[key]
                result.profile_ids[key] = profile_id  # the profile that holds the email now
                if marketing is None:
                    continue
                reason = suppression_reason(marketing, list_ids)
                if reason is None and key in consenting and marketing.get("consent") == "UNSUBSCRIBED":
                    reason = "unsubscribed in Klaviyo: not subscribed again"
                if reason is not None:
                    result.skipped[reason] += 1
                    result.skipped_keys[key] = reason
                elif key in consenting and marketing.get("consent") != "SUBSCRIBED":
                    to_subscribe.append(email)
        if missing:
            self.hook.log.warning("%d imported profiles were not found by email afterwards; they are sent again next run", len(missing))
            for key in missing:
                result.accepted_keys.discard(key)
                result.profile_ids.pop(key, None)
                result.rejected[NOT_FOUND_AFTER_IMPORT] += 1
                result.rejected_keys[key] = NOT_FOUND_AFTER_IMPORT
        result.accepted_keys -= result.skipped_keys.keys()
        result.accepted = len(result.accepted_keys)
        subscription_list = self.list_id  # one list per segment: consent is per profile; the account's opt-in applies
        for start in range(0, len(to_subscribe), MAX_SUBSCRIBE_PROFILES):
            self.hook.bulk_subscribe(subscription_body(to_subscribe[start : start + MAX_SUBSCRIBE_PROFILES], subscription_list, self.source))
        if self.subscribe:
            # Double opt-in: Klaviyo sends a confirmation; the profile is subscribed once it confirms.
            pending = self.double_opt_in and subscription_list is not None
            result.subscribed = 0 if pending else len(to_subscribe)
            result.pending = len(to_subscribe) if pending else None
        return result

    def _outcome(self, job: dict[str, Any], keys: list[str]) -> BatchResult:
        """Each profile's outcome from the job's per-profile answers (see the module docstring); the counts only
        say whether more answers must be fetched. ``sent == accepted + rejected`` for the batch, always."""
        attrs = job["attributes"]
        failed = int(attrs.get("failed_count") or 0)
        batch = set(keys)
        rejected_keys: dict[str, str] = {}
        unnamed: list[str] = []  # reasons of import errors whose profile Klaviyo did not name
        if failed:
            for error in self.hook.iter_import_errors(job["id"]):
                reason = import_error_reason(error.get("attributes") or {})
                key = _payload_email((error.get("attributes") or {}).get("original_payload"))
                if key in batch:
                    rejected_keys[key] = reason
                else:
                    unnamed.append(reason)
        profile_ids: dict[str, str] = {}
        if attrs["status"] == "complete" and not unnamed and len(rejected_keys) >= failed:
            accepted_keys = batch - rejected_keys.keys()  # every failure is named: the others were imported
        else:  # a cancelled job, or failures Klaviyo did not name: the job's own list of imported profiles
            profile_ids = {k: pid for k, pid in self.hook.iter_job_profiles(job["id"]) if k in batch and k not in rejected_keys}
            accepted_keys = set(profile_ids)
        rejected: Counter[str] = Counter(rejected_keys.values())
        fallback = "job cancelled by Klaviyo" if attrs["status"] == "cancelled" else "not confirmed by Klaviyo"
        if unnamed:  # which profile an unnamed error was about is unknown: one reason for all, not another's text
            fallback = (f"not imported: Klaviyo reported {len(unnamed)} error(s) it did not attribute to a profile: "
                        f"{unnamed[0]}")
        for key in keys:
            if key not in accepted_keys and key not in rejected_keys:
                reason = fallback
                rejected[reason] += 1
                rejected_keys[key] = reason
        return BatchResult(accepted=len(accepted_keys), rejected=rejected, accepted_keys=accepted_keys,
                           rejected_keys=rejected_keys, profile_ids=profile_ids)

    def remove(self, keys: list[str], how: str, profile_ids: dict[str, str | None] | None = None) -> set[str]:
        """Take profiles off the export's list (the list relationship only; consent is not touched), by the
        Klaviyo ids the state remembers (by email for profiles remembered before ids were).

        With one list per segment, leavers already lost their segments' lists through the segment changes."""
        if how != "remove":
            raise NotImplementedError(f"Klaviyo exports cannot {how} profiles")
        if self.lists is None:
            known = profile_ids or {}
            self._change_list(self.target_id, "-", keys, known)
            self.kept.update((k, KEPT_SHARED_PROFILE) for k in keys if k in known and known[k] is None)
        return set()

    def change_segment(self, segment: str, op: str, keys: list[str], profile_ids: dict[str, str | None] | None = None) -> set[str]:
        """A profile joins or leaves its segment's list; profiles Klaviyo cannot find fail (retried next run)."""
        list_id = (self.lists or {}).get(segment)
        if list_id is None:
            return set()  # a segment without a list (no longer exported): nothing to change
        return self._change_list(list_id, op, keys, profile_ids or {})

    def _change_list(self, list_id: str, op: str, keys: list[str], known: dict[str, str | None]) -> set[str]:
        """Add or remove profiles by id: the remembered ones, else found by email; a key known with None (its
        profile is another remembered row's too) is left alone. A call Klaviyo refuses (an id it no longer has:
        400 or 404, the spec says only 4XX) is made once more with every id found again by email."""
        ids: dict[str, str] = {k: pid for k in keys if (pid := known.get(k))}
        unknown = [k for k in keys if k not in known]
        try:
            self._by_ids(list_id, op, ids, unknown)
        except DestinationError as exc:
            if exc.status not in STALE_ID_STATUSES or not ids:
                raise
            ids = {}
            self._by_ids(list_id, op, ids, [k for k in keys if k not in known or known[k]])
        # Removing a profile Klaviyo does not know is done already; adding one is not.
        return {k for k in keys if k not in ids} if op == "+" else set()

    def _by_ids(self, list_id: str, op: str, ids: dict[str, str], unknown: list[str]) -> None:
        for start in range(0, len(unknown), MAX_FILTER_EMAILS):
            ids.update(self.hook.find_profile_ids(unknown[start : start + MAX_FILTER_EMAILS]))
        found = list(dict.fromkeys(ids.values()))
        for start in range(0, len(found), 1000):
            if op == "+":
                self.hook.add_to_list(list_id, found[start : start + 1000])
            else:
                self.hook.remove_from_list(list_id, found[start : start + 1000])

    @property
    def batches_in_flight(self) -> int:
        return self._jobs_in_flight

    def membership(self, segments: list[str]) -> Iterator[list[Held]]:
        """Every profile of the export's list (with ``lists``: of each segment's list), a page of 100 at a time,
        with its email-marketing status: ``unsubscribed`` when its consent is ``UNSUBSCRIBED``, ``suppressed`` when
        Klaviyo holds another suppression for it (globally or for this list), else ``member``. One request per 100
        profiles, on the endpoint's 75/s, 750/min: a 100,000-profile list takes 1,000 requests, at least 80 s."""
        list_ids = [self.lists[s] for s in segments if s in self.lists] if self.lists else [self.target_id]
        for list_id in dict.fromkeys(list_ids):
            for page in self.hook.list_profile_pages(list_id):
                yield [_held(profile, list_id) for profile in page]

    def _await(self, job: dict[str, Any]) -> dict[str, Any]:
        """The job once complete or cancelled: every sending thread waits on one board (see ``jobs``)."""
        return self.jobs.wait(job)

    @property
    def request_stats(self) -> dict[str, int]:
        return {"requests": self.hook.requests, "retries": self.hook.retries}


def _held(profile: dict[str, Any], list_id: str) -> Held:
    attributes = profile.get("attributes") or {}
    marketing = ((attributes.get("subscriptions") or {}).get("email") or {}).get("marketing") or {}
    if marketing.get("consent") == "UNSUBSCRIBED":
        status = UNSUBSCRIBED
    elif suppression_reason(marketing, [list_id]):
        status = SUPPRESSED
    else:
        status = MEMBER
    return Held(str(attributes.get("email") or "").strip().lower(), status, f"klaviyo profile {profile.get('id')}")


def import_error_reason(error: dict[str, Any]) -> str:
    """An import error as a reason: Klaviyo's code and its ``detail`` (the title alone says "Invalid input." for
    every error), with any email address or phone number it quotes hidden."""
    text = f"{error.get('code') or 'import_error'}: {error.get('detail') or error.get('title') or 'import error'}"
    return _PHONE_IN_TEXT.sub("<phone>", redact_emails(text))


def _payload_email(payload: object) -> str | None:
    """The lower-cased email of an import error's original profile, wherever Klaviyo put it."""
    if not isinstance(payload, dict):
        return None
    email = payload.get("email") or (payload.get("attributes") or {}).get("email")
    return email.strip().lower() if isinstance(email, str) else None


__all__ = [
    "KlaviyoDestination", "profile_fragment", "job_envelope", "with_consent", "without_consent", "subscription_body",
    "suppression_reason", "import_error_reason", "DestinationError",
]
