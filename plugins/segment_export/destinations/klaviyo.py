"""Klaviyo list destination: profiles go out as bulk profile import jobs with the list as relationship."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from segment_export.batching import Batch
from segment_export.destinations.base import Destination, dump_bytes, redact_emails
from segment_export.hooks.base import DestinationError
from segment_export.hooks.klaviyo import KlaviyoHook
from segment_export.mapping import Profile
from segment_export.spec import ExportSpec
from segment_export.summary import BatchResult

MAX_JOB_PROFILES = 10_000
MAX_JOB_BYTES = 5_000_000  # "5 MB" per job; decimal megabytes, to stay clear of the cap either way
MAX_PROFILE_BYTES = 100_000  # "100 KB" per profile
FINAL_STATUSES = ("complete", "cancelled")


def profile_fragment(profile: Profile) -> bytes:
    """A profile as a JSON:API resource of a bulk import job; unmapped or blank fields are left out."""
    attributes: dict[str, Any] = {"email": profile.email}
    for name in ("first_name", "last_name", "phone_number", "external_id"):
        value = getattr(profile, name)
        if value is not None:
            attributes[name] = value
    if profile.attributes:
        attributes["properties"] = profile.attributes
    return dump_bytes({"type": "profile", "attributes": attributes})


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
                 concurrency: int = 10, poll_interval: float = 0.5, poll_max_interval: float = 5.0):
        """One ``list_id`` for every profile, or ``lists`` (segment → list) where profiles follow their segments."""
        self.hook = hook
        self.lists = lists
        self.manages_segments = lists is not None
        self.target_id = list_id or "+".join(sorted(set((lists or {}).values())))
        self.concurrency = concurrency
        self.poll_interval, self.poll_max_interval = poll_interval, poll_max_interval
        self._head, self._tail = job_envelope(list_id)
        self.max_batch_bytes = MAX_JOB_BYTES - len(self._head) - len(self._tail)

    @classmethod
    def from_spec(cls, spec: ExportSpec) -> KlaviyoDestination:
        dest = spec.destination
        return cls(KlaviyoHook(dest.connection_id, max_concurrency=10), dest.list_id, lists=dest.lists)  # type: ignore[union-attr]

    def preflight(self) -> None:
        for list_id in sorted(set(self.lists.values())) if self.lists else [self.target_id]:
            self.hook.get_list(list_id)

    def serialize(self, profile: Profile) -> bytes:
        return profile_fragment(profile)

    def job_body(self, batch: Batch) -> bytes:
        return self._head + b",".join(batch.fragments) + self._tail

    asynchronous = True

    def send(self, batch: Batch) -> BatchResult:
        job = self.hook.submit_bulk_import(self.job_body(batch))
        if self.on_submitted is not None:
            self.on_submitted(batch, job["id"])
        return self._outcome(self._await(job), batch.keys)

    def resume(self, job_id: str, keys: list[str]) -> BatchResult | None:
        """Await a job an interrupted run submitted, instead of importing its profiles again."""
        try:
            job = self.hook.get_bulk_import_job(job_id)
        except DestinationError as exc:
            if exc.status == 404:
                return None
            raise
        return self._outcome(self._await(job), keys)

    def _outcome(self, job: dict[str, Any], keys: list[str]) -> BatchResult:
        """A finished job's counts and import errors, profile by profile where Klaviyo names them."""
        attrs = job["attributes"]
        accepted = int(attrs.get("completed_count") or 0)
        failed = int(attrs.get("failed_count") or 0)
        rejected: Counter[str] = Counter()
        rejected_keys: dict[str, str] = {}
        if failed:
            for error in self.hook.iter_import_errors(job["id"]):
                a = error.get("attributes", {})
                reason = redact_emails(f"{a.get('code') or 'import_error'}: {a.get('title') or 'import error'}")
                rejected[reason] += 1
                key = _payload_email(a.get("original_payload"))
                if key:
                    rejected_keys[key] = reason
            # Count what Klaviyo reported even if its error listing was shorter than failed_count.
            missing = failed - sum(rejected.values())
            if missing > 0:
                rejected["import error without details"] += missing
        unaccounted = len(keys) - accepted - sum(rejected.values())
        if unaccounted > 0:
            reason = "job cancelled by Klaviyo" if attrs["status"] == "cancelled" else "not confirmed by Klaviyo"
            rejected[reason] += unaccounted
        # Profile by profile, only when Klaviyo's counts and its named errors agree with the batch.
        confident = unaccounted <= 0 and len(rejected_keys) == failed and accepted == len(keys) - failed
        accepted_keys = set(keys) - set(rejected_keys) if confident else set()
        return BatchResult(accepted=accepted, rejected=rejected, accepted_keys=accepted_keys, rejected_keys=rejected_keys)

    def remove(self, keys: list[str], how: str) -> set[str]:
        """Take profiles off the export's list (the list relationship only; consent is not touched).

        With one list per segment, leavers already lost their segments' lists through the segment changes."""
        if how != "remove":
            raise NotImplementedError(f"Klaviyo exports cannot {how} profiles")
        if self.lists is None:
            self._change_list(self.target_id, "-", keys)
        return set()

    def change_segment(self, segment: str, op: str, keys: list[str]) -> set[str]:
        """A profile joins or leaves its segment's list; profiles Klaviyo cannot find fail (retried next run)."""
        list_id = (self.lists or {}).get(segment)
        if list_id is None:
            return set()  # a segment without a list (no longer exported): nothing to change
        return self._change_list(list_id, op, keys)

    def _change_list(self, list_id: str, op: str, keys: list[str]) -> set[str]:
        ids: dict[str, str] = {}
        for start in range(0, len(keys), 100):
            ids.update(self.hook.find_profile_ids(keys[start : start + 100]))
        found = list(ids.values())
        for start in range(0, len(found), 1000):
            if op == "+":
                self.hook.add_to_list(list_id, found[start : start + 1000])
            else:
                self.hook.remove_from_list(list_id, found[start : start + 1000])
        # Removing a profile Klaviyo does not know is done already; adding one is not.
        return {k for k in keys if k not in ids} if op == "+" else set()

    def _await(self, job: dict[str, Any]) -> dict[str, Any]:
        """Poll a job until it is complete or cancelled, backing off between polls."""
        interval = self.poll_interval
        while job["attributes"]["status"] not in FINAL_STATUSES:
            time.sleep(interval)
            interval = min(self.poll_max_interval, interval * 1.5)
            job = self.hook.get_bulk_import_job(job["id"])
        return job

    @property
    def request_stats(self) -> dict[str, int]:
        return {"requests": self.hook.requests, "retries": self.hook.retries}


def _payload_email(payload: object) -> str | None:
    """The lower-cased email of an import error's original profile, wherever Klaviyo put it."""
    if not isinstance(payload, dict):
        return None
    email = payload.get("email") or (payload.get("attributes") or {}).get("email")
    return email.strip().lower() if isinstance(email, str) else None


__all__ = ["KlaviyoDestination", "profile_fragment", "job_envelope", "DestinationError"]
