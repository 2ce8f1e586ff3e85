"""Mailchimp hook: basic auth with the API key, the data-center base URL, problem+json errors, throttling.

Throttling. Mailchimp allows 10 simultaneous connections per API key, shared with every other app using the
account, and answers the one over with 429 "Too Many Requests" ("You have exceeded the limit of 10 simultaneous
connections.", Mailchimp's error glossary, https://mailchimp.com/developer/marketing/docs/errors/); its
documents also mention a bare 403 under throttling (reference README). The hook therefore adapts its number of
requests in flight (``adaptive_concurrency``) and retries a 403 that is throttling, telling it from the 403s
that cannot succeed later by the problem document's ``title``/``detail``: the glossary's 403s are "Forbidden"
("You are not permitted to access this resource."), "User Disabled" ("This account has been disabled.") and
"Wrong Datacenter" -- permission and account errors, never retried -- while a throttling answer reads "Too Many
Requests" / "simultaneous connections". A 403 without a problem document (an edge server's bare refusal) is
not one of Mailchimp's own auth answers, which always carry one, so it is retried within the time budget too.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from functools import cached_property
from typing import Any, Iterator

import requests

from segment_export.hooks.base import (
    FAIL, THROTTLED, Call, DestinationApi, DestinationAsyncHook, DestinationError, DestinationHook, UnreadableAnswer,
)

MAX_CONNECTIONS_PER_KEY = 10  # Mailchimp refuses the 11th simultaneous connection of an API key
#: words of Mailchimp's throttling answer ("Too Many Requests": "... limit of 10 simultaneous connections.")
THROTTLING_WORDS = ("too many requests", "simultaneous connections", "throttl")


def subscriber_hash(email: str) -> str:
    """Mailchimp's member id: MD5 of the lower-cased address."""
    return hashlib.md5(email.lower().encode("utf-8")).hexdigest()


def data_center(api_key: str) -> str:
    """The key's data-center suffix (``…-us6`` → ``us6``), which names the API host."""
    _, sep, dc = api_key.rpartition("-")
    if not sep or not dc.isalnum():
        raise DestinationError(
            "the Mailchimp API key has no data-center suffix (it should end in '-us6' or similar); "
            "set the connection's host to the API base URL instead"
        )
    return dc


def is_throttling_403(response: Any) -> bool:
    """Whether a 403 answer is Mailchimp throttling rather than an auth, permission or account refusal."""
    try:
        body = response.json()
    except ValueError:
        return True  # no problem document: not one of Mailchimp's own (documented) auth refusals
    if not isinstance(body, dict) or not body.get("title"):
        return True
    text = f"{body.get('title')} {body.get('detail') or ''}".lower()
    return any(word in text for word in THROTTLING_WORDS)


class MailchimpApi(DestinationApi):
    """A Mailchimp request: HTTP basic auth with the API key (connection password), problem+json errors, the
    throttling 403 told from a refusal (see the module).

    The base URL is ``https://<dc>.api.mailchimp.com/3.0`` from the key's suffix, unless the connection's host
    gives one (e.g. the sandbox's ``http://127.0.0.1:PORT/3.0``)."""

    default_conn_name = "mailchimp_default"
    conn_type = "mailchimp"
    hook_name = "Mailchimp"
    #: with a rate budget, the key's 10 connections are one semaphore for every export on every worker
    connections_per_key = MAX_CONNECTIONS_PER_KEY

    def default_base_url(self, connection: Any) -> str:
        key = self.api_key(connection)
        try:
            return f"https://{data_center(key)}.api.mailchimp.com/3.0"
        except DestinationError as exc:
            raise self.error(str(exc)) from None

    def auth_headers(self, connection: Any) -> dict[str, str]:
        return {"Accept": "application/json"}

    def basic_auth(self, connection: Any) -> tuple[str, str] | None:
        return connection.login or "segment-export", self.api_key(connection)

    def error_message(self, response: Any) -> str:
        try:
            body = response.json()
            text = f"{body['title']}: {body.get('detail', '')}".rstrip(": ")
            errors = body.get("errors") or []
            if errors:
                text += " (" + "; ".join(f"{e.get('field')}: {e.get('message')}" for e in errors) + ")"
            return f"HTTP {response.status_code} {text}"
        except (ValueError, KeyError, TypeError):
            return super().error_message(response)

    def classify(self, response: Any) -> str:
        """A 403 is throttling when its problem document says so, or when it has none (see the module)."""
        if response.status_code != 403:
            return super().classify(response)
        return THROTTLED if is_throttling_403(response) else FAIL


class MailchimpHook(MailchimpApi, DestinationHook):
    """Talks to the Mailchimp Marketing API 3.0 with an API key (connection password).

    :param conn_id: Airflow connection of type ``mailchimp`` (default ``mailchimp_default``).
    """

    adaptive_concurrency = True  # the cap is on connections, and other apps on the account hold some of them

    def __init__(self, conn_id: str | None = None, *, max_concurrency: int = MAX_CONNECTIONS_PER_KEY, **kwargs: Any):
        super().__init__(conn_id, max_concurrency=min(max_concurrency, MAX_CONNECTIONS_PER_KEY), **kwargs)

    # -- API ---------------------------------------------------------------------------------------------
    def test_connection(self) -> tuple[bool, str]:
        try:
            body = self.request_json("GET", "/ping")
            return True, f"Connected to Mailchimp: {body.get('health_status', 'ok')}"
        except DestinationError as exc:
            return False, str(exc)

    def get_audience(self, audience_id: str) -> dict[str, Any]:
        return self.request_json("GET", f"/lists/{audience_id}")

    def get_merge_fields(self, audience_id: str) -> list[dict[str, Any]]:
        body = self.request_json("GET", f"/lists/{audience_id}/merge-fields", params={"count": 1000})
        return body.get("merge_fields", [])

    def static_segments(self, audience_id: str) -> dict[str, int]:
        """Tag (static segment) id by name."""
        found: dict[str, int] = {}
        offset = 0
        while True:
            body = self.request_json(
                "GET", f"/lists/{audience_id}/segments", params={"type": "static", "count": 1000, "offset": offset}
            )
            segments = body.get("segments", [])
            found.update({s["name"]: s["id"] for s in segments})
            offset += len(segments)
            if not segments or offset >= int(body.get("total_items", 0)):
                return found

    def segment_member_pages(self, audience_id: str, segment_id: int) -> Iterator[list[dict[str, Any]]]:
        """A tag's members (``GET /lists/{id}/segments/{segment_id}/members``), 1,000 a page (the documented
        maximum ``count``; ``offset`` paging), asking only for each member's ``email_address`` and ``status``
        (``fields``) and for every status (``include_cleaned``, ``include_transactional``,
        ``include_unsubscribed``: what the endpoint shows without them is not documented)."""
        offset = 0
        while True:
            body = self.request_json("GET", f"/lists/{audience_id}/segments/{segment_id}/members", params={
                "count": 1000, "offset": offset, "fields": "members.email_address,members.status,total_items",
                "include_cleaned": "true", "include_transactional": "true", "include_unsubscribed": "true",
            })
            members = body.get("members") or []
            yield members
            offset += len(members)
            if not members or offset >= int(body.get("total_items") or 0):
                return

    def create_static_segment(self, audience_id: str, name: str) -> int:
        body = self.request_json("POST", f"/lists/{audience_id}/segments", json={"name": name, "static_segment": []})
        return body["id"]

    def update_segment_members(self, audience_id: str, segment_id: int, add: list[str], remove: list[str]) -> dict[str, Any]:
        """Add or remove up to 500 members each to a tag; per-member errors come back in the answer."""
        body = {"members_to_add": add, "members_to_remove": remove}
        return self.request_json("POST", f"/lists/{audience_id}/segments/{segment_id}", json=body)

    def batch_subscribe(self, audience_id: str, body: bytes, fields: str | None = None) -> dict[str, Any]:
        """POST /lists/{id}: at most 500 members; per-member errors come back in a 200 answer.

        :param fields: Mailchimp's partial-response list (``a,b.c``, dot notation into objects and arrays) of what
            the caller reads: the answer otherwise carries every created or updated member whole.
        """
        return self.request_json(
            "POST", f"/lists/{audience_id}", data=body, headers={"Content-Type": "application/json"},
            params={"fields": fields} if fields else None,
        )

    # -- batch operations (appended: POST /batches, its status, its results archive) ---------------------
    def start_batch(self, body: bytes) -> dict[str, Any]:
        """``POST /batches`` with ``{"operations": [...]}`` already encoded; Mailchimp answers at once with the
        batch (``status: pending``) and runs the operations later."""
        return self.request_json("POST", "/batches", data=body, headers={"Content-Type": "application/json"})

    def get_batch(self, batch_id: str) -> dict[str, Any]:
        return self.request_json(*batch_call(batch_id))

    def batch_results(self, url: str) -> list[dict[str, Any]]:
        """Every result in a finished batch's archive (``response_body_url``): a gzipped tar of JSON files, each an
        array of ``{status_code, operation_id, response}``; every file is read, whatever the folder layout.

        The URL is a download link of its own (on Mailchimp, pre-signed storage on another host), so it is fetched
        without the API key, with this connection's transport options, retried like an API call."""
        return self._exchange("GET", "batch results archive", _read_results, url=url, session=self._anonymous)[1]

    @cached_property
    def _anonymous(self) -> requests.Session:
        """A session with this connection's transport options (proxies, TLS) and no API key."""
        session, anonymous = self.session, requests.Session()
        anonymous.proxies, anonymous.verify, anonymous.cert = session.proxies, session.verify, session.cert
        return anonymous

    def delete_permanent(self, audience_id: str, email: str) -> None:
        """Permanently delete a member (``POST /lists/{list_id}/members/{subscriber_hash}/actions/delete-permanent``,
        Marketing API 3.0.55): "Delete all personally identifiable information related to a list member, and
        remove them from a list. This will make it impossible to re-import the list member." Answers 204; an
        address that is not a member is a 404 ``DestinationError`` (``DELETE`` on the member would only archive
        it, which is not an erasure)."""
        self.request_json("POST", f"/lists/{audience_id}/members/{subscriber_hash(email)}/actions/delete-permanent")

    def find_member(self, audience_id: str, email: str, fields: str = "status,tags") -> dict[str, Any] | None:
        """One member by address (its subscriber hash), or None when the audience has no such member."""
        try:
            return self.request_json("GET", f"/lists/{audience_id}/members/{subscriber_hash(email)}", params={"fields": fields})
        except DestinationError as exc:
            if exc.status == 404:
                return None
            raise


#: what the exporter reads of a batch's status
BATCH_FIELDS = "id,status,total_operations,finished_operations,errored_operations,response_body_url"
#: a batch operations job's status once every operation has run (before: pending, preprocessing, started...)
BATCH_FINISHED = "finished"


def batch_call(batch_id: str) -> Call:
    """GET one batch operations job's status (only the fields the exporter reads)."""
    return Call("GET", f"/batches/{batch_id}", None, {"fields": BATCH_FIELDS})


def batch_finished(batch: dict[str, Any]) -> bool:
    """Whether a batch operations job has run all its operations: its results archive can be read."""
    return batch.get("status") == BATCH_FINISHED


class MailchimpAsyncHook(MailchimpApi, DestinationAsyncHook):
    """Mailchimp from the triggerer: which batch operations jobs are still running, by the same requests and
    retry rules as :class:`MailchimpHook` (throttling 429/403 waited out), within the key's connection cap.

    :param conn_id: Airflow connection of type ``mailchimp`` (default ``mailchimp_default``).
    """

    def __init__(self, conn_id: str | None = None, *, max_concurrency: int = MAX_CONNECTIONS_PER_KEY, **kwargs: Any):
        super().__init__(conn_id, max_concurrency=min(max_concurrency, MAX_CONNECTIONS_PER_KEY), **kwargs)

    async def get_job(self, client: Any, job_id: str) -> dict[str, Any]:
        """One batch (``GET /batches/{id}``), as :meth:`MailchimpHook.get_batch`."""
        return await self.request_json(client, *batch_call(job_id))

    def job_finished(self, job: dict[str, Any]) -> bool:
        return batch_finished(job)


def _read_results(response: requests.Response) -> list[dict[str, Any]]:
    """The results in a batch's archive; a truncated or garbled download is retried like a proxy's page."""
    results: list[dict[str, Any]] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:gz") as archive:
            for info in archive.getmembers():
                handle = archive.extractfile(info) if info.isfile() else None
                if handle is not None:
                    results.extend(json.load(handle))
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        raise UnreadableAnswer(f"batch results archive: {type(exc).__name__}") from exc
    return results
