"""Mailchimp Marketing API 3.0 subset used by the exporter, over an in-memory store.

Like :mod:`segment_export_sandbox.klaviyo`, handlers take an ``ApiRequest`` and
return an ``ApiResponse``; the HTTP server adds auth, the connection cap and latency.

Modelled behaviour (and where it comes from)
--------------------------------------------
* Errors are ``application/problem+json`` ``{type, title, status, detail,
  instance}`` (spec ``default`` response); schema failures add ``errors:
  [{field, message}]`` with title "Invalid Resource" (Mailchimp's documented
  validation error); unparsable JSON -> 400 "JSON Parse Error".
* Auth: HTTP basic, any user name, password = API key.  No credentials -> 401
  "API Key Missing"; unknown key -> 401 "API Key Invalid" ("Your API key may be
  invalid, or you've attempted to access the wrong datacenter.").
* At most ``mailchimp_max_connections`` (10) requests in flight per API key; the
  next one gets 429 "Too Many Requests" at once (reference README), or 403 with
  the same problem document under behaviour ``mailchimp_throttle_status: 403``.
* ``POST /lists/{list_id}`` batch subscribe, <= 500 members (more -> 400 "Invalid
  Resource", field ``members``).  Response 200 with ``new_members``,
  ``updated_members``, ``errors``, ``total_created``, ``total_updated``,
  ``error_count``.  Per member, in this order:

  1. invalid email -> ``"<email> looks fake or invalid, please enter a real email
     address."`` (``ERROR_GENERIC``, field ``email_address``);
  2. the same address earlier in the request -> error, unless
     ``skip_duplicate_check=true``, then later copies are ignored ("the status of
     the first appearance in the request will be saved", spec);
  3. a permanently deleted ("forgotten") address -> ``"<email> was permanently
     deleted and cannot be re-imported. ..."`` (title "Forgotten Email Not
     Subscribed", reference README);
  4. existing member and ``update_existing`` false/absent -> ``"<email> is already
     a list member, do you want to update? please provide update_existing:true in
     the request body"``, ``ERROR_CONTACT_EXISTS`` (spec enum);
  5. existing member, ``update_existing: true``, ``status`` given: status changes
     ("whether this batch operation will change existing members' subscription
     status", spec) -- except that an ``unsubscribed`` or ``cleaned`` member
     cannot be set ``subscribed``/``pending``: ``"<email> is in a compliance state
     due to unsubscribe, bounce, or compliance review and cannot be subscribed."``
     (title "Member In Compliance State", reference README);
  6. existing member, ``update_existing: true``, *no* ``status``: merge fields and
     tags are updated, status is left unchanged.  The batch member schema in the
     3.0.55 spec does not require ``status`` (the single-member POST does, and PUT
     uses ``status_if_new``), so an absent status is read as "don't change".  This
     is a *guess* with a switch: with ``behaviour.mailchimp_batch_update_requires_status``
     true, any member without ``status`` fails the whole request with 400 "Invalid
     Resource", ``errors[].field`` = ``members.item:N.status`` (the shape a bad
     status has been seen to get);
  7. new member without ``status`` -> error, field ``status`` (*guess*: the text;
     a member cannot exist without a status);
  8. merge fields: a ``required`` field left empty on the resulting member ->
     ``"Your merge fields were invalid."`` with ``field`` = the tag and
     ``field_message`` "Please enter a value", unless ``skip_merge_validation``;
     values of the wrong shape (number, address, birthday MM/DD, date YYYY-MM-DD)
     -> same error with a type-specific ``field_message`` (not skippable);
     tags not defined on the audience are *ignored* (*guess*: Mailchimp drops
     unknown merge tags rather than failing the member).
  9. ``tags`` (a list of names, accepted though absent from the 3.0.55 batch
     schema) add the member to those tags; with ``sync_tags: true`` they replace
     the member's tags.
* Subscriber hash = MD5 of the lower-cased email (member ``id``); stored email
  keeps its first spelling.
* ``PUT /lists/{id}/members/{hash}`` (add or update): ``status_if_new`` is the
  status of a member the call creates; an existing member keeps its status unless
  ``status`` is given ("required only if the email address is not already present
  on the list", reference).  New members need ``email_address`` and
  ``status_if_new`` (400 "Invalid Resource" naming the field); forgotten addresses
  -> 400 "Forgotten Email Not Subscribed"; ``status`` subscribed/pending on an
  unsubscribed or cleaned member -> 400 "Member In Compliance State"; merge-field
  rules as in batch subscribe -> 400 "Invalid Resource", detail "Your merge fields
  were invalid.", ``errors: [{field: tag, message}]``.  Answer: the member.
* Batch operations (reference ``/batches``, Mailchimp's guide "Run async requests
  with the batch endpoint"): ``POST /batches`` ``{operations: [{method, path,
  params?, body? (a JSON *string*), operation_id?}]}`` answers a Batch with status
  ``pending``; the operations run ``latency.mailchimp_batch_operations`` seconds
  later (default 0: at the next request), each as its own request on the same
  account would (same handlers and rules, no connection slot), then the batch is
  ``finished`` with ``finished_operations``, ``errored_operations`` (status >= 400)
  and ``response_body_url``: a gzipped tar holding a folder of JSON files (at most
  200 results each), each an array of ``{status_code, operation_id, response}``
  with ``response`` the operation's answer as a JSON string, served without auth
  at ``/_sandbox/mailchimp/batch-results/{id}.tar.gz`` (Mailchimp's is a
  pre-signed download).  ``GET /batches/{id}``, ``GET /batches`` (paged).  More
  than 500 pending batches on an account -> 429 "You have more than 500 pending
  batches." (the text client libraries match; the status is a *guess*).  The
  intermediate statuses (preprocessing, started, finalizing) are not shown.
* Tags are static segments: ``GET/POST /lists/{id}/segments``, ``GET/POST
  /lists/{id}/segments/{segment_id}`` (``members_to_add``/``members_to_remove``
  <= 500 each; addresses not on the audience "will be ignored", reference: they
  are left out of ``members_added``/``members_removed`` and are not ``errors``;
  a member added that already has the tag is listed in ``members_added``
  (*guess*, with the switch ``behaviour.mailchimp_tag_add_lists_already_tagged``: false leaves it out)),
  ``GET .../segments/{segment_id}/members``, ``POST
  /lists/{id}/members/{hash}/tags`` (active/inactive).
* ``GET /lists/{id}/members`` and ``GET /lists/{id}/segments/{segment_id}/members`` honour ``fields`` and
  ``exclude_fields`` (reference: both operations take them, dot notation for sub-objects). The segment members
  list takes ``include_cleaned``, ``include_transactional`` and ``include_unsubscribed`` ("Include ... members in
  response"); what it does without them is not documented: switch
  ``behaviour.mailchimp_segment_members_include_by_default``: false (default: such members are left out unless
  asked for, as the names suggest) or true (listed anyway). Archived members are not tagged members: left out.
* Control: ``POST /_sandbox/mailchimp/audiences/{id}/untag {"email_address", "tag"}`` plays someone removing a
  tag from a member by hand in Mailchimp.
* ``POST /lists/{id}/members/{hash}/actions/delete-permanent`` (reference: "Delete all personally identifiable
  information related to a list member, and remove them from a list. This will make it impossible to re-import
  the list member."): 204; the member leaves the audience and every tag, and its address joins the audience's
  ``forgotten`` addresses, so batch subscribe and PUT answer "Forgotten Email Not Subscribed" for it from then
  on. A hash that is not a member -> 404 "Resource Not Found" (the API's answer for an unknown member).
  ``DELETE`` on a member (archive) is not modelled: the exporter never archives.
* Paging: ``count`` (default 10, max 1000 -> over: 400) and ``offset``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import re
import tarfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .common import (
    ApiError,
    ApiRequest,
    ApiResponse,
    BodyError,
    Route,
    is_valid_email,
    iso_now,
    match_route,
    new_hex,
    new_uuid,
    parse_json_body,
    query_bool,
    query_int,
    validate_schema,
)
from .config import MergeFieldConfig, SandboxConfig

PROBLEM_TYPE = "https://mailchimp.com/developer/marketing/docs/errors/"
PROBLEM_CONTENT_TYPE = "application/problem+json"
MAX_BATCH_MEMBERS = 500
MAX_SEGMENT_CHANGES = 500
MAX_COUNT = 1000
MAX_PENDING_BATCHES = 500  # per API key (Mailchimp's batch operations guide)
RESULTS_PER_FILE = 200  # results per JSON file in a batch's archive (Mailchimp splits them across files too)
STATUSES = ["subscribed", "unsubscribed", "cleaned", "pending", "transactional"]
COMPLIANCE_STATES = ("unsubscribed", "cleaned")


def subscriber_hash(email: str) -> str:
    """MD5 of the lower-cased address: the member id Mailchimp uses in URLs."""
    return hashlib.md5(email.lower().encode()).hexdigest()


def problem(status: int, title: str, detail: str, errors: Optional[list[dict[str, str]]] = None, headers: Optional[dict[str, str]] = None) -> ApiResponse:
    body: dict[str, Any] = {"type": PROBLEM_TYPE, "title": title, "status": status, "detail": detail, "instance": new_uuid()}
    if errors is not None:
        body["errors"] = errors
    return ApiResponse(status, body, PROBLEM_CONTENT_TYPE, headers or {})


def invalid_resource(errors: list[dict[str, str]], detail: str = "The resource submitted could not be validated. For field-specific details, see the 'errors' array.") -> ApiError:
    return ApiError(problem(400, "Invalid Resource", detail, errors))


def resource_not_found() -> ApiError:
    return ApiError(problem(404, "Resource Not Found", "The requested resource could not be found."))


def _schema_error(body: Any, schema: dict[str, Any]) -> None:
    found = validate_schema(body, schema)
    if found is None:
        return
    fld = ".".join(part for part in found.pointer.strip("/").split("/") if part)
    if found.kind == "required":
        message = "This value should not be blank."
    elif found.kind == "enum":
        message = f"Value must be one of: {', '.join(map(str, validate_enum(schema, found.pointer)))}."
    else:
        message = f"Schema describes {found.message.replace('expected ', '')}."
    raise invalid_resource([{"field": fld, "message": message}])


def validate_enum(schema: dict[str, Any], pointer: str) -> list[Any]:
    """Find the enum of the schema node at ``pointer`` (for error messages)."""
    node = schema
    for part in pointer.strip("/").split("/"):
        if part.isdigit() and "items" in node:
            node = node["items"]
        else:
            node = node.get("properties", {}).get(part, {})
    return node.get("enum", [])


# --- partial responses: fields / exclude_fields ----------------------------------------------


FieldTree = dict[str, Any]  # name -> subtree; an empty subtree means "this whole value"


def field_tree(text: Optional[str]) -> Optional[FieldTree]:
    """``a,b.c`` (Mailchimp's comma-separated, dot-notation field list) as a tree; None when absent or empty."""
    if not text:
        return None
    tree: FieldTree = {}
    for path in text.split(","):
        parts = [p for p in path.strip().split(".") if p]
        if not parts:
            continue
        node: Optional[FieldTree] = tree
        for part in parts[:-1]:
            if part in node and not node[part]:
                node = None  # an ancestor is already wanted whole
                break
            node = node.setdefault(part, {})
        if node is not None:
            node[parts[-1]] = {}
    return tree or None


def keep_fields(value: Any, tree: FieldTree) -> Any:
    """Only the fields named in ``tree``; a path into an array applies to each of its items."""
    if isinstance(value, list):
        return [keep_fields(item, tree) for item in value]
    if not isinstance(value, dict):
        return value
    out = {}
    for key, sub in value.items():
        wanted = tree.get(key)
        if wanted is None:
            continue
        out[key] = keep_fields(sub, wanted) if wanted else sub
    return out


def drop_fields(value: Any, tree: FieldTree) -> Any:
    """Without the fields named in ``tree``; a path into an array applies to each of its items."""
    if isinstance(value, list):
        return [drop_fields(item, tree) for item in value]
    if not isinstance(value, dict):
        return value
    out = {}
    for key, sub in value.items():
        unwanted = tree.get(key)
        if unwanted is None:
            out[key] = sub
        elif unwanted:
            out[key] = drop_fields(sub, unwanted)
    return out


def partial_response(req: ApiRequest, body: dict[str, Any]) -> dict[str, Any]:
    """Honour ``fields`` then ``exclude_fields`` (both may be given)."""
    keep, drop = field_tree(req.arg("fields")), field_tree(req.arg("exclude_fields"))
    if keep is not None:
        body = keep_fields(body, keep)
    if drop is not None:
        body = drop_fields(body, drop)
    return body


def member_keys(req: ApiRequest, collection: str) -> Optional[frozenset[str]]:
    """The member keys a partial response can show for the members in ``collection`` (None: all of them), so
    that a batch answer asked for e.g. ``new_members.email_address`` does not render whole members first."""
    keep = field_tree(req.arg("fields"))
    if keep is None:
        return None
    sub = keep.get(collection)
    if sub is None:
        return frozenset()
    return frozenset(sub) if sub else None


_MEMBER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "email_address": {"type": "string"},
        "email_type": {"type": "string", "enum": ["html", "text"]},
        "status": {"type": "string", "enum": STATUSES},
        "merge_fields": {"type": "object"},
        "interests": {"type": "object"},
        "language": {"type": "string"},
        "vip": {"type": "boolean"},
        "location": {"type": "object", "properties": {"latitude": {"type": "number"}, "longitude": {"type": "number"}}},
        "ip_signup": {"type": "string"},
        "timestamp_signup": {"type": "string"},
        "ip_opt": {"type": "string"},
        "timestamp_opt": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["email_address"],
}
BATCH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["members"],
    "properties": {
        "members": {"type": "array", "items": _MEMBER_SCHEMA},
        "update_existing": {"type": "boolean"},
        "sync_tags": {"type": "boolean"},
    },
}
# PUT /lists/{list_id}/members/{subscriber_hash} (Add_List_Members_2 in the reference): the reference lists
# email_address and status_if_new as required, and describes both as "required only if the email address is not
# already present on the list" -- so they are checked for new members only (see put_member).
MEMBER_PUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        **{k: v for k, v in _MEMBER_SCHEMA["properties"].items() if k != "tags"},
        "status_if_new": {"type": "string", "enum": STATUSES},
        "marketing_permissions": {"type": "array", "items": {"type": "object"}},
    },
}
# POST /batches (postBatches_request / Operations in the reference)
BATCHES_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["operations"],
    "properties": {
        "operations": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["method", "path"],
                "properties": {
                    "method": {"type": "string", "enum": ["GET", "POST", "PUT", "PATCH", "DELETE"]},
                    "path": {"type": "string"},
                    "params": {"type": "object"},
                    "body": {"type": "string"},
                    "operation_id": {"type": "string"},
                },
            },
        },
    },
}
SEGMENT_CREATE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string"}, "static_segment": {"type": "array", "items": {"type": "string"}}, "options": {"type": "object"}},
}
SEGMENT_MEMBERS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "members_to_add": {"type": "array", "items": {"type": "string"}},
        "members_to_remove": {"type": "array", "items": {"type": "string"}},
    },
}
MEMBER_TAGS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["tags"],
    "properties": {
        "tags": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "status"],
                "properties": {"name": {"type": "string"}, "status": {"type": "string", "enum": ["inactive", "active"]}},
            },
        },
        "is_syncing": {"type": "boolean"},
    },
}

# --- store ----------------------------------------------------------------------------


@dataclass
class Member:
    email_address: str
    status: str
    merge_fields: dict[str, Any]
    created: float
    last_changed: float
    unique_email_id: str = field(default_factory=lambda: new_hex(10))
    contact_id: str = field(default_factory=lambda: new_hex(32))
    web_id: int = 0
    email_type: str = "html"
    language: str = ""
    vip: bool = False

    @property
    def id(self) -> str:
        """The subscriber hash, computed once (``email_address`` keeps its first spelling: it never changes)."""
        cached = self.__dict__.get("_id")
        if cached is None or cached[0] != self.email_address:
            cached = (self.email_address, subscriber_hash(self.email_address))
            self.__dict__["_id"] = cached
        return cached[1]


@dataclass
class Segment:
    id: int
    name: str
    created: float
    updated: float
    member_ids: dict[str, None] = field(default_factory=dict)  # subscriber hashes, ordered


@dataclass
class Audience:
    id: str
    name: str
    merge_fields: list[MergeFieldConfig]
    created: float
    members: dict[str, Member] = field(default_factory=dict)
    segments: dict[int, Segment] = field(default_factory=dict)
    forgotten: set[str] = field(default_factory=set)  # lower-cased emails


@dataclass
class BatchJob:
    """A ``POST /batches`` request: its operations run once ``due``; then the results archive is built."""

    id: str
    account_id: str
    operations: list[dict[str, Any]]
    base_url: str
    submitted: float
    due: float
    completed: Optional[float] = None
    errored: int = 0
    archive: Optional[bytes] = None


@dataclass
class MAccount:
    api_key: str
    account_id: str
    audiences: dict[str, Audience] = field(default_factory=dict)
    batches: dict[str, BatchJob] = field(default_factory=dict)


class MergeValueError(ValueError):
    pass


_BIRTHDAY_RE = re.compile(r"^(0[1-9]|1[0-2])/(0[1-9]|[12]\d|3[01])$")
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def coerce_merge_value(mf: MergeFieldConfig, value: Any) -> Any:
    """Validate one merge value by field type; return the stored form."""
    if value is None or value == "":
        return ""
    kind = mf.type
    if kind == "address":
        if not isinstance(value, dict) or not all(str(value.get(k) or "").strip() for k in ("addr1", "city", "state", "zip")):
            raise MergeValueError("Please enter a complete address")
        return {k: str(value.get(k) or "") for k in ("addr1", "addr2", "city", "state", "zip", "country")}
    if isinstance(value, (dict, list)):
        raise MergeValueError("Please enter a value")
    text = str(value)
    if kind == "number":
        try:
            float(text)
        except ValueError:
            raise MergeValueError("Please enter a number") from None
        return value if isinstance(value, (int, float)) else text
    if kind == "birthday" and not _BIRTHDAY_RE.match(text):
        raise MergeValueError("Please enter a valid date (MM/DD)")
    if kind == "date" and not _DATE_RE.match(text):
        raise MergeValueError("Please enter a valid date")
    return text


def _compliance_message(email: str) -> str:
    return f"{email} is in a compliance state due to unsubscribe, bounce, or compliance review and cannot be subscribed."


def _forgotten_message(email: str) -> str:
    return f"{email} was permanently deleted and cannot be re-imported. The contact must re-subscribe to get back on the list."


def results_archive(batch_id: str, results: list[dict[str, Any]]) -> bytes:
    """A gzipped tar holding a folder of JSON files, each an array of ``{status_code, operation_id, response}``
    (``response`` is the operation's answer as a JSON string), as Mailchimp's ``response_body_url`` serves."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        folder = tarfile.TarInfo(batch_id)
        folder.type, folder.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(folder)
        for start in range(0, len(results), RESULTS_PER_FILE):
            data = json.dumps(results[start : start + RESULTS_PER_FILE]).encode()
            info = tarfile.TarInfo(f"{batch_id}/{new_hex(32)}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class MailchimpService:
    """The Mailchimp half of the sandbox: audiences, members, merge fields, tags."""

    name = "mailchimp"
    prefix = "/3.0"

    def __init__(self, config: SandboxConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.lock = threading.RLock()
        self.accounts: dict[str, MAccount] = {}
        self._keys: dict[str, MAccount] = {}
        self._next_id = 0
        self.reset()

    # --- lifecycle / seeding ---------------------------------------------------------

    def reset(self) -> None:
        with self.lock:
            now = self.clock()
            self.accounts = {}
            self._next_id = 10_000
            for acc_cfg in self.config.mailchimp_accounts:
                acc = MAccount(acc_cfg.api_key, acc_cfg.account_id)
                for au in acc_cfg.audiences:
                    acc.audiences[au.id] = Audience(au.id, au.name, [MergeFieldConfig(**vars(mf)) for mf in au.merge_fields], now)
                self.accounts[acc.account_id] = acc
            self._keys = {a.api_key: a for a in self.accounts.values()}
            self._pending: dict[str, tuple[MAccount, BatchJob]] = {}

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _find_audience(self, audience_id: str) -> Audience:
        for acc in self.accounts.values():
            if audience_id in acc.audiences:
                return acc.audiences[audience_id]
        raise KeyError(f"unknown Mailchimp audience {audience_id!r}")

    def seed_member(self, audience_id: str, email: str, status: str, merge_fields: Optional[dict[str, Any]] = None, tags: Optional[list[str]] = None) -> dict[str, Any]:
        """Create or overwrite a member directly (no API rules): test setup."""
        if status not in STATUSES + ["archived"]:
            raise ValueError(f"status must be one of {STATUSES}")
        if not is_valid_email(email):
            raise ValueError(f"invalid email {email!r}")
        with self.lock:
            au = self._find_audience(audience_id)
            au.forgotten.discard(email.lower())
            now = self.clock()
            member = au.members.get(subscriber_hash(email))
            if member is None:
                member = Member(email, status, {}, now, now, web_id=self._new_id())
                au.members[member.id] = member
            member.status = status
            by_tag = {mf.tag: mf for mf in au.merge_fields}
            for tag, value in (merge_fields or {}).items():
                if tag in by_tag:
                    member.merge_fields[tag] = coerce_merge_value(by_tag[tag], value)
            for tag in tags or []:
                self._segment_by_name(au, tag, create=True).member_ids[member.id] = None
            return {"id": member.id, "email_address": member.email_address, "status": member.status}

    def untag(self, audience_id: str, email: str, tag: str) -> dict[str, Any]:
        """Someone removes a tag from a member by hand in Mailchimp (the member and its status stay)."""
        with self.lock:
            au = self._find_audience(audience_id)
            h = subscriber_hash(email)
            if h not in au.members:
                raise KeyError(f"unknown Mailchimp member {email!r}")
            self._segment_by_name(au, tag).member_ids.pop(h, None)
            return {"email_address": au.members[h].email_address, "tag": tag, "tagged": False}

    def forget_email(self, audience_id: str, email: str) -> dict[str, Any]:
        """Permanently delete an address: it leaves the audience and cannot come back."""
        with self.lock:
            au = self._find_audience(audience_id)
            h = subscriber_hash(email)
            au.members.pop(h, None)
            for seg in au.segments.values():
                seg.member_ids.pop(h, None)
            au.forgotten.add(email.lower())
            return {"email_address": email, "forgotten": True}

    # --- hooks used by the HTTP server -----------------------------------------------

    def routes(self) -> list[Route]:
        return [
            Route("GET", "/3.0/ping", self.ping, "mailchimp_read"),
            Route("GET", "/3.0/lists/{list_id}", self.get_list, "mailchimp_read"),
            Route("POST", "/3.0/lists/{list_id}", self.batch_subscribe, "mailchimp_batch"),
            Route("GET", "/3.0/lists/{list_id}/merge-fields", self.get_merge_fields, "mailchimp_read"),
            Route("GET", "/3.0/lists/{list_id}/members", self.get_members, "mailchimp_read"),
            Route("GET", "/3.0/lists/{list_id}/members/{subscriber_hash}", self.get_member, "mailchimp_read"),
            Route("PUT", "/3.0/lists/{list_id}/members/{subscriber_hash}", self.put_member, "mailchimp_write"),
            Route("POST", "/3.0/lists/{list_id}/members/{subscriber_hash}/tags", self.post_member_tags, "mailchimp_write"),
            Route("POST", "/3.0/lists/{list_id}/members/{subscriber_hash}/actions/delete-permanent", self.delete_permanent, "mailchimp_write"),
            Route("GET", "/3.0/lists/{list_id}/segments", self.get_segments, "mailchimp_read"),
            Route("POST", "/3.0/lists/{list_id}/segments", self.create_segment, "mailchimp_write"),
            Route("GET", "/3.0/lists/{list_id}/segments/{segment_id}", self.get_segment, "mailchimp_read"),
            Route("POST", "/3.0/lists/{list_id}/segments/{segment_id}", self.update_segment_members, "mailchimp_write"),
            Route("GET", "/3.0/lists/{list_id}/segments/{segment_id}/members", self.get_segment_members, "mailchimp_read"),
            Route("POST", "/3.0/batches", self.post_batches, "mailchimp_write"),
            Route("GET", "/3.0/batches", self.list_batches, "mailchimp_read"),
            Route("GET", "/3.0/batches/{batch_id}", self.get_batch, "mailchimp_read"),
        ]

    def authenticate(self, req: ApiRequest) -> Optional[ApiResponse]:
        header = req.header("authorization") or ""
        scheme, _, token = header.partition(" ")
        key = None
        if scheme.lower() == "basic":
            try:
                _, _, key = base64.b64decode(token.strip(), validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                key = ""
        elif scheme.lower() in ("bearer", "apikey"):
            key = token.strip()  # OAuth-style header; Mailchimp accepts it too
        if not key:
            return problem(401, "API Key Missing", "Your request did not include an API key.")
        account = self._keys.get(key)
        if account is None:
            return problem(401, "API Key Invalid", "Your API key may be invalid, or you've attempted to access the wrong datacenter.")
        req.account = account
        return None

    def precheck(self, req: ApiRequest) -> Optional[ApiResponse]:
        return None

    def tick(self) -> None:
        """Batch operations whose time has come are run (``latency.mailchimp_batch_operations`` after submission)."""
        if not self._pending:
            return
        now = self.clock()
        with self.lock:
            for job_id, (acc, job) in list(self._pending.items()):
                if now >= job.due:
                    del self._pending[job_id]
                    self._run_batch(acc, job)

    def account_key(self, req: ApiRequest) -> str:
        return req.account.account_id

    def connection_limit(self) -> Optional[int]:
        """Simultaneous requests allowed per API key."""
        return self.config.mailchimp_max_connections

    def throttled(self, retry_after: Optional[int]) -> ApiResponse:
        """Mailchimp's throttling answer, with the status of behaviour ``mailchimp_throttle_status``.

        429 "Too Many Requests" is the error glossary's answer (https://mailchimp.com/developer/marketing/docs/
        errors/, TooManyRequests); its documents also mention a bare 403 under throttling, with no body given.
        Under 403 the same problem document is kept, so it reads as throttling ("Too Many Requests", "...
        simultaneous connections"), unlike the glossary's auth and permission 403s ("Forbidden", "User
        Disabled", "Wrong Datacenter"). No Retry-After: Mailchimp sends no rate-limit headers.
        """
        limit = self.config.mailchimp_max_connections
        status = int(self.config.behaviour.get("mailchimp_throttle_status", 429))
        return problem(status, "Too Many Requests", f"You have exceeded the limit of {limit} simultaneous connections.")

    def not_found_response(self, req: ApiRequest) -> ApiResponse:
        return resource_not_found().response

    def method_not_allowed(self, req: ApiRequest) -> ApiResponse:
        return problem(405, "Method Not Allowed", "The requested method and resource are not compatible. See the Allow header for this resource's available methods.")

    def server_error(self, req: ApiRequest) -> ApiResponse:
        return problem(500, "Internal Server Error", "An unexpected internal error has occurred. Please contact Support for more information.")

    # --- helpers ---------------------------------------------------------------------

    def _audience(self, req: ApiRequest) -> Audience:
        au = req.account.audiences.get(req.path_params["list_id"])
        if au is None:
            raise resource_not_found()
        return au

    @staticmethod
    def _body(req: ApiRequest) -> Any:
        try:
            return parse_json_body(req.body)
        except BodyError:
            raise ApiError(problem(400, "JSON Parse Error", "We encountered an unspecified JSON parsing error.")) from None

    @staticmethod
    def _paging(req: ApiRequest) -> tuple[int, int]:
        count = query_int(req.arg("count"), 10)
        offset = query_int(req.arg("offset"), 0)
        if count is None or not 0 <= count <= MAX_COUNT:
            raise invalid_resource([{"field": "count", "message": f"count must be an integer between 0 and {MAX_COUNT}."}], "The request parameters are invalid.")
        if offset is None or offset < 0:
            raise invalid_resource([{"field": "offset", "message": "offset must be a non-negative integer."}], "The request parameters are invalid.")
        return count, offset

    @staticmethod
    def _links(req: ApiRequest, path: str, methods: tuple[str, ...] = ("GET",)) -> list[dict[str, str]]:
        href = req.base_url + path
        return [{"rel": "self" if m == "GET" else m.lower(), "href": href, "method": m} for m in methods]

    def _segment_by_name(self, au: Audience, name: str, create: bool = False) -> Segment:
        for seg in au.segments.values():
            if seg.name == name:
                return seg
        if not create:
            raise KeyError(name)
        now = self.clock()
        seg = Segment(self._new_id(), name, now, now)
        au.segments[seg.id] = seg
        return seg

    def _member_json(self, req: ApiRequest, au: Audience, m: Member, keys: Optional[frozenset[str]] = None) -> dict[str, Any]:
        """A member as the API shows it; with ``keys``, only those of its fields (the rest not even computed)."""
        if keys is not None:
            return {key: value(self, req, au, m) for key, value in _MEMBER_FIELDS if key in keys}
        merge = {mf.tag: m.merge_fields.get(mf.tag, "") for mf in au.merge_fields}
        mid = m.id
        tags = [{"id": s.id, "name": s.name} for s in au.segments.values() if mid in s.member_ids]
        return {
            "id": mid,
            "email_address": m.email_address,
            "unique_email_id": m.unique_email_id,
            "contact_id": m.contact_id,
            "full_name": " ".join(str(merge.get(t) or "") for t in ("FNAME", "LNAME")).strip(),
            "web_id": m.web_id,
            "email_type": m.email_type,
            "status": m.status,
            "consents_to_one_to_one_messaging": True,
            "merge_fields": merge,
            "stats": {"avg_open_rate": 0, "avg_click_rate": 0},
            "ip_signup": "",
            "timestamp_signup": "",
            "ip_opt": "",
            "timestamp_opt": iso_now(m.created),
            "member_rating": 2,
            "last_changed": iso_now(m.last_changed),
            "language": m.language,
            "vip": m.vip,
            "email_client": "",
            "location": {"latitude": 0, "longitude": 0, "gmtoff": 0, "dstoff": 0, "country_code": "", "timezone": "", "region": ""},
            "source": "API - Generic",
            "tags_count": len(tags),
            "tags": tags,
            "list_id": au.id,
            "_links": self._links(req, f"/3.0/lists/{au.id}/members/{mid}"),
        }

    def _segment_json(self, req: ApiRequest, au: Audience, seg: Segment) -> dict[str, Any]:
        return {
            "id": seg.id,
            "name": seg.name,
            "member_count": len(seg.member_ids),
            "type": "static",
            "created_at": iso_now(seg.created),
            "updated_at": iso_now(seg.updated),
            "list_id": au.id,
            "_links": self._links(req, f"/3.0/lists/{au.id}/segments/{seg.id}"),
        }

    # --- handlers --------------------------------------------------------------------

    def ping(self, req: ApiRequest) -> ApiResponse:
        return ApiResponse(200, {"health_status": "Everything's Chimpy!"})

    def get_list(self, req: ApiRequest) -> ApiResponse:
        au = self._audience(req)
        counts = {s: sum(1 for m in au.members.values() if m.status == s) for s in STATUSES}
        body = {
            "id": au.id,
            "web_id": abs(hash(au.id)) % 10**6,
            "name": au.name,
            "contact": {"company": "Segment Export Sandbox", "address1": "1 Sandbox Way", "address2": "", "city": "Atlanta", "state": "GA", "zip": "30308", "country": "US", "phone": ""},
            "permission_reminder": "You signed up for updates from the sandbox.",
            "use_archive_bar": True,
            "campaign_defaults": {"from_name": "Sandbox", "from_email": "sandbox@example.com", "subject": "", "language": "en"},
            "notify_on_subscribe": "",
            "notify_on_unsubscribe": "",
            "date_created": iso_now(au.created),
            "list_rating": 0,
            "email_type_option": False,
            "subscribe_url_short": "https://eepurl.com/sandbox",
            "subscribe_url_long": f"https://example.us6.list-manage.com/subscribe?u=sandbox&id={au.id}",
            "beamer_address": f"us6-sandbox-{au.id}@inbound.mailchimp.com",
            "visibility": "prv",
            "double_optin": False,
            "has_welcome": False,
            "marketing_permissions": False,
            "modules": [],
            "stats": {
                "member_count": counts["subscribed"],
                "unsubscribe_count": counts["unsubscribed"],
                "cleaned_count": counts["cleaned"],
                "member_count_since_send": counts["subscribed"],
                "unsubscribe_count_since_send": counts["unsubscribed"],
                "cleaned_count_since_send": counts["cleaned"],
                "campaign_count": 0,
                "merge_field_count": len(au.merge_fields),
                "avg_sub_rate": 0,
                "avg_unsub_rate": 0,
                "target_sub_rate": 0,
                "open_rate": 0,
                "click_rate": 0,
                "total_contacts": len(au.members),
            },
            "_links": self._links(req, f"/3.0/lists/{au.id}", ("GET", "POST", "PATCH", "DELETE")),
        }
        return ApiResponse(200, body)

    def get_merge_fields(self, req: ApiRequest) -> ApiResponse:
        au = self._audience(req)
        count, offset = self._paging(req)
        fields = [
            {
                "merge_id": i + 1,
                "tag": mf.tag,
                "name": mf.name,
                "type": mf.type,
                "required": mf.required,
                "default_value": "",
                "public": True,
                "display_order": i + 2,
                "options": dict(mf.options),
                "help_text": "",
                "list_id": au.id,
                "_links": self._links(req, f"/3.0/lists/{au.id}/merge-fields/{i + 1}"),
            }
            for i, mf in enumerate(au.merge_fields)
        ]
        return ApiResponse(
            200,
            {"merge_fields": fields[offset : offset + count], "list_id": au.id, "total_items": len(fields), "_links": self._links(req, f"/3.0/lists/{au.id}/merge-fields")},
        )

    def get_members(self, req: ApiRequest) -> ApiResponse:
        au = self._audience(req)
        count, offset = self._paging(req)
        status = req.arg("status")
        if status is not None and status not in STATUSES + ["archived"]:
            raise invalid_resource([{"field": "status", "message": f"Value must be one of: {', '.join(STATUSES)}."}], "The request parameters are invalid.")
        members = [m for m in au.members.values() if status is None or m.status == status]
        keys = member_keys(req, "members")
        return ApiResponse(
            200,
            partial_response(req, {
                "members": [self._member_json(req, au, m, keys) for m in members[offset : offset + count]],
                "list_id": au.id,
                "total_items": len(members),
                "_links": self._links(req, f"/3.0/lists/{au.id}/members"),
            }),
        )

    def get_member(self, req: ApiRequest) -> ApiResponse:
        au = self._audience(req)
        key = req.path_params["subscriber_hash"]
        member = au.members.get(key.lower()) or au.members.get(subscriber_hash(key))  # Mailchimp also takes the email
        if member is None:
            raise resource_not_found()
        return ApiResponse(200, self._member_json(req, au, member))

    def delete_permanent(self, req: ApiRequest) -> ApiResponse:
        """Permanently delete a member: out of the audience and its tags, its address forgotten (module docstring)."""
        au = self._audience(req)
        key = req.path_params["subscriber_hash"].lower()
        member = au.members.get(key)
        if member is None:
            raise resource_not_found()
        del au.members[key]
        for seg in au.segments.values():
            seg.member_ids.pop(key, None)
        au.forgotten.add(member.email_address.lower())
        return ApiResponse(204, None)

    def batch_subscribe(self, req: ApiRequest) -> ApiResponse:
        au = self._audience(req)
        body = self._body(req)
        if isinstance(body, dict) and isinstance(body.get("members"), list) and len(body["members"]) > MAX_BATCH_MEMBERS:
            raise invalid_resource([{"field": "members", "message": f"Schema describes array with at most {MAX_BATCH_MEMBERS} items, {len(body['members'])} found."}])
        _schema_error(body, BATCH_SCHEMA)
        if self.config.behaviour["mailchimp_batch_update_requires_status"]:
            # The alternative to rule 6: a member without ``status`` fails the whole request, as a bad status does.
            missing = [i for i, item in enumerate(body["members"]) if "status" not in item]
            if missing:
                raise invalid_resource([{"field": f"members.item:{i}.status", "message": "This value should not be blank."} for i in missing])
        update_existing = bool(body.get("update_existing", False))
        sync_tags = bool(body.get("sync_tags", False))
        skip_merge = query_bool(req.arg("skip_merge_validation"))
        skip_dupes = query_bool(req.arg("skip_duplicate_check"))
        new_members: list[dict[str, Any]] = []
        updated: list[dict[str, Any]] = []
        errors: list[dict[str, str]] = []
        seen: set[str] = set()
        new_keys, updated_keys = member_keys(req, "new_members"), member_keys(req, "updated_members")

        def fail(email: str, message: str, code: str = "ERROR_GENERIC", fld: str = "", field_message: str = "") -> None:
            errors.append({"email_address": email, "error": message, "error_code": code, "field": fld, "field_message": field_message})

        for item in body["members"]:
            email = item["email_address"].strip()
            if not is_valid_email(email):
                fail(email, f"{email} looks fake or invalid, please enter a real email address.", fld="email_address", field_message="Please enter a real email address.")
                continue
            key = email.lower()
            if key in seen:
                if not skip_dupes:
                    fail(email, f"{email} is a duplicate of an earlier member in this request.", fld="email_address", field_message="Duplicate email address in the request.")
                continue
            seen.add(key)
            if key in au.forgotten:
                fail(email, _forgotten_message(email))
                continue
            existing = au.members.get(subscriber_hash(email))
            status = item.get("status")
            if existing is not None and not update_existing:
                fail(email, f"{email} is already a list member, do you want to update? please provide update_existing:true in the request body", "ERROR_CONTACT_EXISTS")
                continue
            if existing is not None and status in ("subscribed", "pending") and existing.status in COMPLIANCE_STATES:
                fail(email, _compliance_message(email))
                continue
            if existing is None and status is None:
                fail(email, f"{email} is not a list member yet and no status was given; a status is required to add a member.", fld="status", field_message="This value should not be blank.")
                continue
            merged, bad = self._merged_fields(au, existing, item, skip_merge)
            if bad is not None:
                fail(email, "Your merge fields were invalid.", fld=bad[0], field_message=bad[1])
                continue
            member = self._save_member(au, email, existing, status, merged, item)
            if "tags" in item or sync_tags:
                wanted = list(dict.fromkeys(item.get("tags") or []))
                if sync_tags:
                    for seg in au.segments.values():
                        if seg.name not in wanted:
                            seg.member_ids.pop(member.id, None)
                for name in wanted:
                    self._segment_by_name(au, name, create=True).member_ids[member.id] = None
            (updated if existing else new_members).append(self._member_json(req, au, member, updated_keys if existing else new_keys))

        return ApiResponse(
            200,
            partial_response(req, {
                "new_members": new_members,
                "updated_members": updated,
                "errors": errors,
                "total_created": len(new_members),
                "total_updated": len(updated),
                "error_count": len(errors),
                "_links": self._links(req, f"/3.0/lists/{au.id}", ("GET", "POST")),
            }),
        )

    def _merged_fields(self, au: Audience, existing: Optional[Member], item: dict[str, Any], skip_merge: bool) -> tuple[dict[str, Any], Optional[tuple[str, str]]]:
        """The member's merge fields after this write, or the first bad one as (tag, message): shapes first (never
        skippable), then required fields left empty (unless ``skip_merge_validation``)."""
        by_tag = {mf.tag: mf for mf in au.merge_fields}
        merged = dict(existing.merge_fields) if existing else {}
        for tag, value in (item.get("merge_fields") or {}).items():
            mf = by_tag.get(tag.upper())
            if mf is None:
                continue  # unknown merge tag: ignored
            try:
                merged[mf.tag] = coerce_merge_value(mf, value)
            except MergeValueError as exc:
                return merged, (mf.tag, str(exc))
        if not skip_merge:
            missing = [mf.tag for mf in au.merge_fields if mf.required and merged.get(mf.tag) in (None, "")]
            if missing:
                return merged, (missing[0], "Please enter a value")
        return merged, None

    def _save_member(self, au: Audience, email: str, existing: Optional[Member], status: Optional[str], merged: dict[str, Any], item: dict[str, Any]) -> Member:
        """Create the member with ``status``, or update it (its status only when ``status`` is given)."""
        now = self.clock()
        member = existing
        if member is None:
            member = Member(email, status or "subscribed", {}, now, now, web_id=self._new_id())
            au.members[member.id] = member
        elif status is not None:
            member.status = status
        member.merge_fields = merged
        member.last_changed = now
        for attr in ("email_type", "language", "vip"):
            if attr in item:
                setattr(member, attr, item[attr])
        return member

    def put_member(self, req: ApiRequest) -> ApiResponse:
        """Add or update one member. ``status_if_new`` is the status of a member this call creates; an existing
        member keeps its status unless ``status`` is given (reference: status_if_new "required only if the email
        address is not already present on the list")."""
        au = self._audience(req)
        body = self._body(req)
        _schema_error(body, MEMBER_PUT_SCHEMA)
        key = req.path_params["subscriber_hash"].lower()
        existing = au.members.get(key) or au.members.get(subscriber_hash(key))  # the email is taken as well
        if existing is None:
            for name in ("email_address", "status_if_new"):
                if name not in body:
                    raise invalid_resource([{"field": name, "message": "This value should not be blank."}])
            email = body["email_address"].strip()
            if not is_valid_email(email):
                raise invalid_resource([{"field": "email_address", "message": "Please enter a real email address."}],
                                       f"{email} looks fake or invalid, please enter a real email address.")
            if key not in (subscriber_hash(email), email.lower()):  # *guess*: the text
                raise invalid_resource([{"field": "email_address", "message": "The email address does not match the subscriber hash in the path."}])
            if email.lower() in au.forgotten:
                raise ApiError(problem(400, "Forgotten Email Not Subscribed", _forgotten_message(email)))
        else:
            email = existing.email_address
        status = body.get("status") or (None if existing is not None else body["status_if_new"])
        if existing is not None and status in ("subscribed", "pending") and existing.status in COMPLIANCE_STATES:
            raise ApiError(problem(400, "Member In Compliance State", _compliance_message(email)))
        merged, bad = self._merged_fields(au, existing, body, query_bool(req.arg("skip_merge_validation")))
        if bad is not None:
            raise invalid_resource([{"field": bad[0], "message": bad[1]}], "Your merge fields were invalid.")
        member = self._save_member(au, email, existing, status, merged, body)
        return ApiResponse(200, partial_response(req, self._member_json(req, au, member)))

    # --- batch operations --------------------------------------------------------------

    def post_batches(self, req: ApiRequest) -> ApiResponse:
        body = self._body(req)
        _schema_error(body, BATCHES_SCHEMA)
        acc: MAccount = req.account
        if sum(1 for job in acc.batches.values() if job.completed is None) >= MAX_PENDING_BATCHES:
            raise ApiError(problem(429, "Too Many Requests", f"You have more than {MAX_PENDING_BATCHES} pending batches."))
        now = self.clock()
        job = BatchJob(new_hex(10), acc.account_id, body["operations"], req.base_url, now,
                       now + self.config.latency_for("mailchimp_batch_operations"))
        acc.batches[job.id] = job
        self._pending[job.id] = (acc, job)
        return ApiResponse(200, self._batch_json(req, job))

    def get_batch(self, req: ApiRequest) -> ApiResponse:
        job = req.account.batches.get(req.path_params["batch_id"])
        if job is None:
            raise resource_not_found()
        return ApiResponse(200, partial_response(req, self._batch_json(req, job)))

    def list_batches(self, req: ApiRequest) -> ApiResponse:
        count, offset = self._paging(req)
        jobs = list(req.account.batches.values())
        return ApiResponse(200, partial_response(req, {
            "batches": [self._batch_json(req, job) for job in jobs[offset : offset + count]],
            "total_items": len(jobs),
            "_links": self._links(req, "/3.0/batches", ("GET", "POST")),
        }))

    def batch_archive(self, name: str) -> Optional[bytes]:
        """The gzipped tar of a finished batch's results (served at its ``response_body_url``), or None."""
        self.tick()
        with self.lock:
            for acc in self.accounts.values():
                job = acc.batches.get(name.removesuffix(".tar.gz"))
                if job is not None:
                    return job.archive
        return None

    def _batch_json(self, req: ApiRequest, job: BatchJob) -> dict[str, Any]:
        done = job.completed is not None
        return {
            "id": job.id,
            "status": "finished" if done else "pending",
            "total_operations": len(job.operations),
            "finished_operations": len(job.operations) if done else 0,
            "errored_operations": job.errored,
            "submitted_at": iso_now(job.submitted),
            "completed_at": iso_now(job.completed) if done else "",
            "response_body_url": f"{job.base_url}/_sandbox/mailchimp/batch-results/{job.id}.tar.gz" if done else "",
            "_links": self._links(req, f"/3.0/batches/{job.id}", ("GET", "DELETE")),
        }

    def _run_batch(self, acc: MAccount, job: BatchJob) -> None:
        """Run every operation as its own request would, then keep the results as Mailchimp's archive does."""
        routes = self.__dict__.get("_operation_routes") or self.__dict__.setdefault("_operation_routes", self.routes())
        results = []
        for op in job.operations:
            path = "/3.0/" + str(op["path"]).lstrip("/")
            params = op.get("params") or {}
            req = ApiRequest(method=op["method"], path=path, query={k: [str(v)] for k, v in params.items()},
                             body=str(op.get("body") or "").encode(), base_url=job.base_url, account=acc)
            route, exists, req.path_params = match_route(routes, req.method, path)
            if route is None or route.template.startswith("/3.0/batches"):
                response = self.method_not_allowed(req) if exists else self.not_found_response(req)
            else:
                try:
                    response = route.handler(req)
                except ApiError as exc:
                    response = exc.response
            results.append({"status_code": response.status, "operation_id": op.get("operation_id"),
                            "response": json.dumps(response.body, separators=(",", ":"))})
        job.errored = sum(1 for r in results if r["status_code"] >= 400)
        job.completed = self.clock()
        job.archive = results_archive(job.id, results)

    def post_member_tags(self, req: ApiRequest) -> ApiResponse:
        au = self._audience(req)
        member = au.members.get(req.path_params["subscriber_hash"].lower())
        if member is None:
            raise resource_not_found()
        body = self._body(req)
        _schema_error(body, MEMBER_TAGS_SCHEMA)
        for tag in body["tags"]:
            if tag["status"] == "active":
                self._segment_by_name(au, tag["name"], create=True).member_ids[member.id] = None
            else:
                try:
                    self._segment_by_name(au, tag["name"]).member_ids.pop(member.id, None)
                except KeyError:
                    pass
        return ApiResponse(204, None)

    def get_segments(self, req: ApiRequest) -> ApiResponse:
        au = self._audience(req)
        count, offset = self._paging(req)
        kind = req.arg("type")
        segments = [s for s in au.segments.values() if kind in (None, "static")]
        return ApiResponse(
            200,
            {
                "segments": [self._segment_json(req, au, s) for s in segments[offset : offset + count]],
                "list_id": au.id,
                "total_items": len(segments),
                "_links": self._links(req, f"/3.0/lists/{au.id}/segments", ("GET", "POST")),
            },
        )

    def create_segment(self, req: ApiRequest) -> ApiResponse:
        au = self._audience(req)
        body = self._body(req)
        _schema_error(body, SEGMENT_CREATE_SCHEMA)
        if "static_segment" not in body:
            raise invalid_resource([{"field": "static_segment", "message": "The sandbox only supports static segments (tags)."}])
        if any(s.name == body["name"] for s in au.segments.values()):
            raise invalid_resource([{"field": "name", "message": f"A segment or tag named \"{body['name']}\" already exists."}], "The resource submitted could not be validated.")
        seg = self._segment_by_name(au, body["name"], create=True)
        for email in body["static_segment"]:
            if subscriber_hash(email) in au.members:
                seg.member_ids[subscriber_hash(email)] = None
        return ApiResponse(200, self._segment_json(req, au, seg))

    def _segment(self, req: ApiRequest, au: Audience) -> Segment:
        try:
            seg = au.segments.get(int(req.path_params["segment_id"]))
        except ValueError:
            seg = None
        if seg is None:
            raise resource_not_found()
        return seg

    def get_segment(self, req: ApiRequest) -> ApiResponse:
        au = self._audience(req)
        return ApiResponse(200, self._segment_json(req, au, self._segment(req, au)))

    def update_segment_members(self, req: ApiRequest) -> ApiResponse:
        au = self._audience(req)
        seg = self._segment(req, au)
        body = self._body(req)
        _schema_error(body, SEGMENT_MEMBERS_SCHEMA)
        to_add, to_remove = body.get("members_to_add") or [], body.get("members_to_remove") or []
        for name, values in (("members_to_add", to_add), ("members_to_remove", to_remove)):
            if len(values) > MAX_SEGMENT_CHANGES:
                raise invalid_resource([{"field": name, "message": f"Schema describes array with at most {MAX_SEGMENT_CHANGES} items, {len(values)} found."}])
        added, removed = [], []
        # "Any emails provided that are not present on the list will be ignored" (reference, members_to_add and
        # members_to_remove): not an error, just not in members_added / members_removed.
        # Whether a member that already has the tag is listed in members_added is not documented: a switch.
        lists_tagged = self.config.behaviour.get("mailchimp_tag_add_lists_already_tagged", True)
        for email in to_add:
            member = au.members.get(subscriber_hash(email))
            if member is not None:
                already = member.id in seg.member_ids
                seg.member_ids[member.id] = None
                if lists_tagged or not already:
                    added.append(self._member_json(req, au, member))
        for email in to_remove:
            member = au.members.get(subscriber_hash(email))
            if member is not None and member.id in seg.member_ids:
                seg.member_ids.pop(member.id, None)
                removed.append(self._member_json(req, au, member))
        seg.updated = self.clock()
        errors: list[dict[str, Any]] = []
        return ApiResponse(
            200,
            {
                "members_added": added,
                "members_removed": removed,
                "errors": errors,
                "total_added": len(added),
                "total_removed": len(removed),
                "error_count": len(errors),
                "_links": self._links(req, f"/3.0/lists/{au.id}/segments/{seg.id}", ("GET", "POST")),
            },
        )

    def get_segment_members(self, req: ApiRequest) -> ApiResponse:
        au = self._audience(req)
        seg = self._segment(req, au)
        count, offset = self._paging(req)
        # Which statuses are listed without include_*: not documented (a switch); archived ones never are.
        by_default = self.config.behaviour.get("mailchimp_segment_members_include_by_default", False)
        wanted = {"subscribed", "pending"}
        for status, flag in (("cleaned", "include_cleaned"), ("transactional", "include_transactional"), ("unsubscribed", "include_unsubscribed")):
            given = req.arg(flag)
            if (query_bool(given) if given is not None else by_default):
                wanted.add(status)
        members = [au.members[h] for h in seg.member_ids if h in au.members and au.members[h].status in wanted]
        keys = member_keys(req, "members")
        return ApiResponse(
            200,
            partial_response(req, {
                "members": [self._member_json(req, au, m, keys) for m in members[offset : offset + count]],
                "total_items": len(members),
                "_links": self._links(req, f"/3.0/lists/{au.id}/segments/{seg.id}/members"),
            }),
        )

    # --- state -----------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        self.tick()
        with self.lock:
            accounts = {}
            for acc in self.accounts.values():
                audiences = {}
                for au in acc.audiences.values():
                    tags_of = {h: [s.name for s in au.segments.values() if h in s.member_ids] for h in au.members}
                    audiences[au.id] = {
                        "name": au.name,
                        "members": {
                            h: {"email_address": m.email_address, "status": m.status, "merge_fields": dict(m.merge_fields), "tags": tags_of[h]}
                            for h, m in au.members.items()
                        },
                        "merge_fields": [{"tag": mf.tag, "name": mf.name, "type": mf.type, "required": mf.required} for mf in au.merge_fields],
                        "segments": {
                            str(s.id): {"name": s.name, "type": "static", "member_count": len(s.member_ids), "members": [au.members[h].email_address for h in s.member_ids if h in au.members]}
                            for s in au.segments.values()
                        },
                        "forgotten": sorted(au.forgotten),
                    }
                batches = {
                    job.id: {"status": "finished" if job.completed is not None else "pending",
                             "total_operations": len(job.operations), "errored_operations": job.errored}
                    for job in acc.batches.values()
                }
                accounts[acc.account_id] = {"audiences": audiences, "batches": batches}
            return {"accounts": accounts}


def _whole(key: str) -> Callable[[MailchimpService, ApiRequest, Audience, Member], Any]:
    """A member field read from the whole rendering (fields needing the audience: merge fields, tags, links)."""
    return lambda svc, req, au, m: svc._member_json(req, au, m)[key]


# Member fields in the order _member_json renders them, each computable on its own for partial responses.
_MEMBER_FIELDS: list[tuple[str, Callable[[MailchimpService, ApiRequest, Audience, Member], Any]]] = [
    ("id", lambda svc, req, au, m: m.id),
    ("email_address", lambda svc, req, au, m: m.email_address),
    ("unique_email_id", lambda svc, req, au, m: m.unique_email_id),
    ("contact_id", lambda svc, req, au, m: m.contact_id),
    ("full_name", _whole("full_name")),
    ("web_id", lambda svc, req, au, m: m.web_id),
    ("email_type", lambda svc, req, au, m: m.email_type),
    ("status", lambda svc, req, au, m: m.status),
    ("consents_to_one_to_one_messaging", _whole("consents_to_one_to_one_messaging")),
    ("merge_fields", _whole("merge_fields")),
    ("stats", _whole("stats")),
    ("ip_signup", _whole("ip_signup")),
    ("timestamp_signup", _whole("timestamp_signup")),
    ("ip_opt", _whole("ip_opt")),
    ("timestamp_opt", lambda svc, req, au, m: iso_now(m.created)),
    ("member_rating", _whole("member_rating")),
    ("last_changed", lambda svc, req, au, m: iso_now(m.last_changed)),
    ("language", lambda svc, req, au, m: m.language),
    ("vip", lambda svc, req, au, m: m.vip),
    ("email_client", _whole("email_client")),
    ("location", _whole("location")),
    ("source", _whole("source")),
    ("tags_count", _whole("tags_count")),
    ("tags", _whole("tags")),
    ("list_id", lambda svc, req, au, m: au.id),
    ("_links", _whole("_links")),
]
