"""Klaviyo hooks: API-key auth, the pinned revision, JSON:API errors, bulk profile import and subscription jobs.

:class:`KlaviyoApi` is what a Klaviyo request is (base URL, headers, error messages, pacing, which job statuses
are final), shared by :class:`KlaviyoHook` (the task's, synchronous) and :class:`KlaviyoAsyncHook` (the
triggerer's: polls bulk import jobs until they are finished).

Writes whose documented answer is empty (202/204) still go through ``request_json``: a proxy's HTML page with
a 200 is then retried instead of being taken for Klaviyo's acceptance.
"""

from __future__ import annotations

import json
from itertools import islice
from typing import Any, Iterator, Sequence

from segment_export.hooks.base import Call, DestinationApi, DestinationAsyncHook, DestinationError, DestinationHook

KLAVIYO_REVISION = "2026-07-15"
JSON_API = "application/vnd.api+json"
MAX_FILTER_EMAILS = 100  # addresses per any(email,[...]) lookup: one page of GET /api/profiles (page[size] max 100)
MAX_SUBSCRIBE_PROFILES = 1_000  # "Maximum number of profiles can be submitted for subscription: 1000"
#: the statuses of a bulk profile import job that will not change any more (the others: queued, processing)
BULK_IMPORT_FINAL_STATUSES = ("complete", "cancelled")


def bulk_import_finished(job: dict[str, Any]) -> bool:
    """Whether a bulk import job resource is finished: its outcome can be read, polling it again is useless."""
    return job["attributes"]["status"] in BULK_IMPORT_FINAL_STATUSES


def bulk_import_job_call(job_id: str) -> Call:
    """GET one bulk profile import job (its status and counts)."""
    return Call("GET", f"/api/profile-bulk-import-jobs/{job_id}", "bulk-import-read")


class KlaviyoApi(DestinationApi):
    """A Klaviyo request: private API key (connection password) in the ``Authorization`` header, the pinned
    ``revision``, JSON:API; host defaults to https://a.klaviyo.com."""

    default_conn_name = "klaviyo_default"
    conn_type = "klaviyo"
    hook_name = "Klaviyo"
    # Documented per-account limits (burst per second, steady per minute), see x-klaviyo-ratelimit; fixed windows
    # (reference README). Paced per process, or with a rate budget (hooks/budget.py) as one token bucket per API
    # key and endpoint shared by every export on every worker.
    rate_limits = {
        "bulk-import": (10, 150),
        "bulk-import-read": (10, 150),
        "lists": (75, 750),
        "accounts": (1, 15),
        "lists-write": (10, 150),
        "profiles": (75, 750),
        "subscriptions": (75, 750),  # POST /api/profile-subscription-bulk-create-jobs
        "list-profiles": (75, 750),  # GET /api/lists/{id}/profiles (get_profiles_for_list)
        "data-privacy": (3, 60),  # POST /api/data-privacy-deletion-jobs (Request Profile Deletion)
    }

    def default_base_url(self, connection: Any) -> str:
        return "https://a.klaviyo.com"

    def auth_headers(self, connection: Any) -> dict[str, str]:
        return {
            "Authorization": f"Klaviyo-API-Key {self.api_key(connection)}",
            "revision": KLAVIYO_REVISION,
            "Accept": JSON_API,
            "Content-Type": JSON_API,
        }

    def error_message(self, response: Any) -> str:
        try:
            errors = response.json()["errors"]
            parts = [f"{e.get('title') or e.get('code')}: {e.get('detail', '')}".rstrip(": ") for e in errors]
            pointers = [e.get("source", {}).get("pointer") for e in errors if e.get("source")]
            text = "; ".join(parts)
            if any(pointers):
                text += f" (at {', '.join(p for p in pointers if p)})"
            return f"HTTP {response.status_code} {text}"
        except (ValueError, KeyError, TypeError, AttributeError):
            return super().error_message(response)


class KlaviyoHook(KlaviyoApi, DestinationHook):
    """Talks to Klaviyo with a private API key (connection password); host defaults to https://a.klaviyo.com.

    :param conn_id: Airflow connection of type ``klaviyo`` (default ``klaviyo_default``).
    """

    # -- API ---------------------------------------------------------------------------------------------
    def test_connection(self) -> tuple[bool, str]:
        try:
            accounts = self.request_json("GET", "/api/accounts", limit_key="accounts")
            count = len(accounts.get("data", []))
            return True, f"Connected to Klaviyo ({count} account{'s' if count != 1 else ''}, revision {KLAVIYO_REVISION})"
        except DestinationError as exc:
            return False, str(exc)

    def get_list(self, list_id: str) -> dict[str, Any]:
        """The list resource; a missing list fails with Klaviyo's 404 message."""
        return self.request_data("GET", f"/api/lists/{list_id}", limit_key="lists")

    def submit_bulk_import(self, body: bytes) -> dict[str, Any]:
        """POST a pre-serialized bulk import job body; return the job resource (status ``queued``)."""
        return self.request_data("POST", "/api/profile-bulk-import-jobs", data=body, limit_key="bulk-import")

    def get_bulk_import_job(self, job_id: str) -> dict[str, Any]:
        return self.request_data(*bulk_import_job_call(job_id))

    def iter_finished_job_pages(self, *, max_pages: int) -> Iterator[list[dict[str, Any]]]:
        """The account's finished bulk import jobs, newest first, a page (up to 100) at a time, at most
        ``max_pages`` pages: Get Bulk Import Profiles Jobs with ``filter=any(status,[...])`` (allowed on
        ``status``: ``any``, ``equals``), ``sort=-created_at``, ``page[size]=100`` (its maximum)."""
        statuses = ",".join(f'"{s}"' for s in BULK_IMPORT_FINAL_STATUSES)
        params = {"filter": f"any(status,[{statuses}])", "sort": "-created_at", "page[size]": 100}
        return islice(self._page_data("/api/profile-bulk-import-jobs", params, "bulk-import-read"), max_pages)

    def iter_import_errors(self, job_id: str) -> Iterator[dict[str, Any]]:
        """Every import error of a job (100 per page)."""
        yield from self._pages(
            f"/api/profile-bulk-import-jobs/{job_id}/import-errors", {"page[size]": 100}, "bulk-import-read"
        )

    def iter_job_profiles(self, job_id: str) -> Iterator[tuple[str, str]]:
        """(lower-cased email, profile id) of every profile a bulk import job imported (its ``profiles``
        relationship, 100 per page, emails only); profiles without an email are left out."""
        found = self._pages(f"/api/profile-bulk-import-jobs/{job_id}/profiles",
                            {"page[size]": 100, "fields[profile]": "email"}, "bulk-import-read")
        for key, profile in _by_email(found):
            yield key, profile["id"]

    def iter_profiles(self, emails: Sequence[str], *, fields: Sequence[str] = ("email",),
                      additional: Sequence[str] = ()) -> Iterator[dict[str, Any]]:
        """The profiles of up to 100 addresses, one ``any(email,[...])`` lookup (unknown addresses are absent).

        ``fields`` is the sparse fieldset (``fields[profile]``) and ``additional`` the ``additional-fields[profile]``
        (``subscriptions``: consent and suppressions), so one request answers for 100 profiles."""
        if len(emails) > MAX_FILTER_EMAILS:
            raise ValueError(f"at most {MAX_FILTER_EMAILS} addresses per profile lookup, got {len(emails)}")
        params: dict[str, Any] = {
            "filter": f"any(email,{json.dumps(list(emails))})", "page[size]": 100, "fields[profile]": ",".join(fields),
        }
        if additional:
            params["additional-fields[profile]"] = ",".join(additional)
        yield from self._pages("/api/profiles", params, "profiles")

    def find_profile_ids(self, emails: Sequence[str]) -> dict[str, str]:
        """Profile id by lower-cased email for up to 100 addresses; unknown ones are absent."""
        return {key: profile["id"] for key, profile in _by_email(self.iter_profiles(emails))}

    def find_email_marketing(self, emails: Sequence[str]) -> dict[str, tuple[str, str, dict[str, Any]]]:
        """(profile id, stored email, ``subscriptions.email.marketing``) by lower-cased email for up to 100
        addresses: consent, global ``suppression`` and ``list_suppressions``; unknown addresses are absent."""
        found = self.iter_profiles(emails, fields=("email", "subscriptions"), additional=("subscriptions",))
        return {
            key: (profile["id"], profile["attributes"]["email"],
                  (((profile["attributes"].get("subscriptions") or {}).get("email") or {}).get("marketing") or {}))
            for key, profile in _by_email(found)
        }

    def bulk_subscribe(self, body: dict[str, Any]) -> None:
        """POST a Bulk Subscribe Profiles job (at most 1,000 profiles); Klaviyo answers 202 without a job id."""
        self.request_json("POST", "/api/profile-subscription-bulk-create-jobs", json=body, limit_key="subscriptions")

    def _pages(self, endpoint: str, params: dict[str, Any], limit_key: str) -> Iterator[dict[str, Any]]:
        """Every resource of a collection, following Klaviyo's cursor pagination (``links.next``)."""
        for data in self._page_data(endpoint, params, limit_key):
            yield from data

    def _page_data(self, endpoint: str, params: dict[str, Any], limit_key: str) -> Iterator[list[dict[str, Any]]]:
        """A collection's pages (their ``data``), requested only as they are iterated."""
        next_endpoint: str | None = endpoint
        next_params: dict[str, Any] | None = params
        while next_endpoint:
            page = self.request_json("GET", next_endpoint, params=next_params, limit_key=limit_key)
            yield page.get("data", [])
            next_endpoint, next_params = (page.get("links") or {}).get("next"), None

    def list_profile_pages(self, list_id: str) -> Iterator[list[dict[str, Any]]]:
        """The list's profiles (``GET /api/lists/{id}/profiles``), one page of up to 100 at a time: email and
        ``subscriptions`` only (sparse fieldset plus ``additional-fields[profile]=subscriptions``: consent and
        suppressions). Cursor pagination; 75/s, 750/min (the operation's documented limits)."""
        params = {"page[size]": 100, "fields[profile]": "email,subscriptions", "additional-fields[profile]": "subscriptions"}
        return self._page_data(f"/api/lists/{list_id}/profiles", params, "list-profiles")

    def request_profile_deletion(self, email: str) -> None:
        """Request Profile Deletion (``POST /api/data-privacy-deletion-jobs``, revision 2026-07-15): every profile
        with this address is deleted, asynchronously; Klaviyo answers 202 with no body once it has the request.
        One identifier per request ("If multiple identifiers are provided, we will return an error"); rate
        limits 3/s burst, 60/min steady (the operation's ``x-klaviyo-ratelimit``); scope ``data-privacy:write``."""
        body = {"data": {"type": "data-privacy-deletion-job",
                         "attributes": {"profile": {"data": {"type": "profile", "attributes": {"email": email}}}}}}
        self.request_json("POST", "/api/data-privacy-deletion-jobs", json=body, limit_key="data-privacy")

    def add_to_list(self, list_id: str, profile_ids: list[str]) -> None:
        """Add up to 1,000 existing profiles to a list (membership, not consent)."""
        body = {"data": [{"type": "profile", "id": pid} for pid in profile_ids]}
        self.request_json("POST", f"/api/lists/{list_id}/relationships/profiles", json=body, limit_key="lists-write")

    def remove_from_list(self, list_id: str, profile_ids: list[str]) -> None:
        """Remove up to 1,000 profiles from a list; list membership only, consent is not touched."""
        body = {"data": [{"type": "profile", "id": pid} for pid in profile_ids]}
        self.request_json("DELETE", f"/api/lists/{list_id}/relationships/profiles", json=body, limit_key="lists-write")



class KlaviyoAsyncHook(KlaviyoApi, DestinationAsyncHook):
    """Klaviyo from the triggerer: which bulk import jobs are still running, by the same requests, pacing and
    retry rules as :class:`KlaviyoHook` (a 429 is waited out, ``Retry-After`` honoured).

    :param conn_id: Airflow connection of type ``klaviyo`` (default ``klaviyo_default``).
    """

    async def get_job(self, client: Any, job_id: str) -> dict[str, Any]:
        """One bulk import job (``GET /api/profile-bulk-import-jobs/{id}``), as :meth:`KlaviyoHook.get_bulk_import_job`."""
        return await self.request_data(client, *bulk_import_job_call(job_id))

    def job_finished(self, job: dict[str, Any]) -> bool:
        return bulk_import_finished(job)


def _by_email(profiles: Iterator[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(lower-cased email, profile) for each profile that has an address."""
    for profile in profiles:
        email = (profile.get("attributes") or {}).get("email")
        if email:
            yield email.lower(), profile
