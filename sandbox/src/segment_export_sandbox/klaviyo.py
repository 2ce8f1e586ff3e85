"""Klaviyo API (revision 2026-07-15) subset used by the exporter, over an in-memory store.

Everything here is plain Python: ``KlaviyoService.handle``-style route handlers
take an :class:`~segment_export_sandbox.common.ApiRequest` and return an
:class:`~segment_export_sandbox.common.ApiResponse`, so behaviour is testable
without sockets.  The HTTP server adds auth, revision, rate limits and latency
by calling the hooks below in order.

The store is sized for a benchmark of 10,000,000 imported profiles on a 24 GiB machine: profiles and jobs are
``msgspec.Struct`` objects without GC headers (:class:`Profile`: rarely set fields in one dict, properties packed
in a tuple, short texts shared), a job body is decoded straight into structs (any body that decoding does not
take goes through the general JSON + schema walk, so the errors are those of the schema), and a complete job keeps
only what the API still answers with. About 650 bytes and 5 µs of CPU per imported profile: 4.6-4.8 µs of the
sandbox process's CPU (utime+stime) for 10 jobs of 10,000 exporter-shaped profiles over HTTP, 7.5 µs for 100 jobs
(1M profiles: bigger indexes, and 1.8 s of system time, page faults), ~47,000 instructions a profile in-process (callgrind);
session 9's benchmark, beside the exporter on 2 cores, saw 14-16 (dicts: 2,200 bytes and 28 µs). ``state()`` and
every answer are the same as with dicts.

Modelled behaviour (and where it comes from)
--------------------------------------------
* Auth: ``Authorization: Klaviyo-API-Key <private key>``.  Missing header, wrong
  scheme or unknown key -> 401 ``not_authenticated`` "Authentication credentials
  were not provided." (the body Klaviyo returns, seen in public bug reports, with
  integer ``status`` and ``source.pointer = "/data/"``).
* ``revision`` header required (spec: every operation has it ``required: true``).
  Missing, malformed or not ``2026-07-15`` -> 400 ``invalid``.  *Guess*: the real
  API maps older dates to older behaviour; the sandbox only implements 2026-07-15,
  so it refuses others rather than pretend.
* Bodies: ``application/vnd.api+json`` or ``application/json``; anything else with
  a body -> 415.  Malformed JSON -> 400 ``parse_error``.  A body not matching the
  request schema (transcribed from the spec, plus "unknown attribute" checks that
  Klaviyo applies: "'x' is not a valid field for the resource 'profile'.") -> 400
  ``invalid`` with ``source.pointer`` naming the field.
* ``POST /api/profile-bulk-import-jobs`` -> 202 job (status ``queued``).  Caps
  from the spec description: <= 10,000 profiles (more -> 400, pointer
  ``/data/attributes/profiles/data``), <= 100 KB per profile (-> 400, pointer to
  that profile), <= 5 MB payload (-> 413).  *Guess*: the status codes for the caps
  are not documented; 400 for content rules and 413 for the raw payload size.
  ``relationships.lists`` naming a list that does not exist -> 400 pointing at the
  list id (*guess*: Klaviyo refuses the job; code/detail not documented).
* Job progress is computed from elapsed time: ``queued`` for
  ``klaviyo_job_queue_seconds``, then ``processing`` at
  ``klaviyo_profiles_per_second`` (each job at that speed, independently of the
  others), then ``complete``.  Profiles are applied to the store as they are
  processed (so reads mid-job see partial results). The documents name no cap on
  jobs in progress at once (the catalog bulk jobs name 500; the profile import job
  only its rate limits): switch ``klaviyo_jobs_in_progress`` (config.BEHAVIOURS):
  ``unlimited`` (default), ``queue_beyond_2`` (a job waits ``queued`` until fewer
  than two are in progress) or ``refuse_beyond_2`` (429 ``throttled`` with
  ``Retry-After: 1`` while two are in progress).
  ``completed_count`` counts successful profiles and ``failed_count`` failed ones
  (*guess*: the spec's wording allows both readings; disjoint counts sum to
  ``total_count`` at the end). Switch ``klaviyo_completed_count_includes_failed``
  (config.BEHAVIOURS): true makes ``completed_count`` count the failed profiles
  too (every processed profile), the other reading of the spec.
* Per-profile problems do not fail the request: an invalid email or phone
  (E.164), or no identifier (email/phone_number/external_id/_kx) becomes an
  *import error* ``{code: "invalid", title: "Invalid input.", detail, source:
  {pointer: "/data/attributes/profiles/data/<i>/attributes/<field>"},
  original_payload: <that profile's attributes>}`` and counts in ``failed_count``.
* Upsert: match by profile ``id``, then email (case-insensitive), phone number,
  external id. What a bulk import does with conflicting identifiers is not
  documented (single-profile calls answer ``409 duplicate_profile``), so switch
  ``klaviyo_identifier_conflict``: ``merge`` (default) matches by phone or external
  id and rewrites the matched profile's email; ``reject`` makes a profile whose
  phone number or external id belongs to another profile (one with a different
  email, or the one its email does not match) an import error ``duplicate_profile``
  with a detail naming the identifier, counted in ``failed_count``.  Given attributes overwrite, ``null`` clears (spec: "setting a field
  to null will clear out the field"), absent ones are kept; ``location`` and
  ``properties`` are merged key by key; ``meta.patch_properties`` append/unappend/
  unset are honoured.
* Every processed profile of a job is added to each list in the job's
  ``relationships.lists``.
* Suppressed profiles (seeded with ``/_sandbox/klaviyo/suppressed``) are kept.
  An import updates their attributes and adds them to lists, but never changes
  consent: neither bulk import nor list relationships grant consent in Klaviyo
  (its docs point to the Subscribe Profiles endpoint for consent, and say removing
  from a list does not affect consent).  Such a profile stays
  ``can_receive_email_marketing: false``; state shows ``suppressed: true``.
* ``GET /api/profiles``: ``equals(email,...)``/``any(email,[...])`` filters, sparse fieldsets, and
  ``additional-fields[profile]=subscriptions`` rendering ``subscriptions.email.marketing``: ``consent``
  (``NEVER_SUBSCRIBED``/``SUBSCRIBED``/``UNSUBSCRIBED``), ``consent_timestamp``, ``custom_method_detail``,
  ``suppression`` (``USER_SUPPRESSED`` for seeded suppressions) and ``list_suppressions`` (always empty: the
  sandbox has no per-list suppression). ``can_receive_email_marketing`` is "True if profile does not have any
  global suppressions" (the spec's words: implicit consent), so it does not require ``SUBSCRIBED``.
* ``POST /api/profile-subscription-bulk-create-jobs`` (Bulk Subscribe Profiles) -> 202 with no body (the spec's
  response has no content and no job id).  Request checked against the spec's schema (email channel only:
  another channel -> 400, *sandbox limit*); <= 1,000 profiles (the spec's "Maximum number of profiles can be
  submitted for subscription: 1000"; more -> 400, *guess* for the code); each profile needs ``email`` (the email
  channel's address; a missing or invalid one -> 400 pointing at it: *guess*, the real API may report per
  profile later); ``consented_at`` only with ``historical_import: true``, and then required and in the past
  (spec: "if the historical_import flag is not included, providing any value for this field will raise an
  error") -> 400; an unknown ``relationships.list`` -> 400 (*guess*, as for import jobs).  Applied at once
  (*guess*: Klaviyo runs it as a job it does not expose): a profile is found by id then email, or created; its
  email consent becomes ``SUBSCRIBED`` with ``custom_source`` as ``custom_method_detail``; per the spec ("This
  API will remove any UNSUBSCRIBE, SPAM_REPORT or USER_SUPPRESSED suppressions") a suppressed profile is
  **unsuppressed** and subscribed (the sandbox's suppressions are all ``USER_SUPPRESSED``); it is added to the
  given list.  Switch ``klaviyo_list_opt_in``: ``single`` (default) as above; ``double`` makes every list's
  ``opt_in_process`` ``double_opt_in`` and, per Klaviyo's docs ("on a double opt-in list the profile is sent a
  confirmation and is not subscribed until it confirms"), a subscription that names a list leaves the profile's
  consent as it was, records a pending confirmation (state: ``consent_pending``), and subscribes it (and adds it
  to the list) only when the control call ``POST /_sandbox/klaviyo/confirm {"email"}`` confirms it.  A
  subscription without a list is not a list's opt-in process: it subscribes at once.
* ``POST /api/profile-import``: one profile, 201 created / 200 updated; 100 KB cap
  (-> 413); invalid email/phone or no identifier -> 400 (not an import error).
* ``GET/POST/DELETE /api/lists/{id}/relationships/profiles``: <= 1,000 ids per
  call (-> 400), unknown profile ids -> 400 pointing at the id (*guess*: the spec, Add Profiles to List /
  Remove Profiles from List, lists only ``4XX``), 204.  Switch ``klaviyo_unknown_profile_id``: ``400``
  (default) or ``404`` (``not_found``, naming the id).
* ``GET /api/lists/{id}/profiles`` (Get Profiles for List, spec ``get_profiles_for_list``): the list's
  profiles, cursor paged (``page[size]`` default 20, max 100), sparse fieldsets (``fields[profile]``),
  ``additional-fields[profile]=subscriptions`` (as for ``GET /api/profiles``), ``filter`` on ``email``
  (``equals``/``any``, the spec's allowed operators; other filters -> 400, *sandbox limit*) and
  ``sort=joined_group_at|-joined_group_at``. Rate limit 75/s, 750/min (the operation's
  ``x-klaviyo-ratelimit``). The spec does not say in which order an unsorted request's pages come: switch
  ``klaviyo_list_profiles_order``: ``joined`` (default: oldest membership first) or ``newest`` (newest first).
* Control: ``POST /_sandbox/klaviyo/lists/{id}/members {"email", "action": "add"|"remove"}`` plays someone
  editing the list by hand in Klaviyo (add creates the profile if needed; neither touches consent).
* Cursor pagination: ``page[size]`` (spec min/max/default per endpoint), opaque
  ``page[cursor]``, ``links.self/next/prev``; bad values -> 400.
* ``POST /api/data-privacy-deletion-jobs`` (Request Profile Deletion): body checked against the spec's
  ``DataPrivacyCreateDeletionJobQuery`` (``data.type`` ``data-privacy-deletion-job``, ``attributes.profile.data``
  a profile with exactly one of ``id``, ``attributes.email``, ``attributes.phone_number``: "If multiple
  identifiers are provided, we will return an error" -> 400 pointing at the profile's data); answers 202 with no
  body (the spec's only success). "All profiles that match the provided identifier will be deleted": the
  profile leaves every list and the store (a later import of the address creates a new profile, as on Klaviyo).
  An identifier no profile has is accepted too (202; *guess*: the spec does not say, and a deletion request for
  someone Klaviyo never held has nothing to refuse). "The deletion occurs asynchronously" and its delay is not
  documented: switch ``klaviyo_profile_deletion``: ``immediate`` (default) deletes while answering;
  ``deferred`` deletes ``latency.klaviyo_deletion`` seconds later (default 0: at the next request). State:
  ``deletions`` per account (identifier kind, status ``pending``/``done``, deleted profile count, never the
  address). Rate limits 3/s burst, 60/min steady (``x-klaviyo-ratelimit``).
* Rate limits (per account, per endpoint, fixed windows) are the spec's
  ``x-klaviyo-ratelimit`` values, listed in ``RATE_LIMITS`` below.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Union

import msgspec
from msgspec import UNSET, UnsetType

from .common import (
    ApiError,
    ApiRequest,
    ApiResponse,
    BodyError,
    Route,
    compiled_schema,
    decode_cursor,
    encode_cursor,
    is_valid_email,
    iso_now,
    json_size,
    new_ulid,
    new_ulids,
    new_uuid,
    parse_json_body,
    query_int,
    validate_schema,
)
from .config import KLAVIYO_REVISION, SandboxConfig

CONTENT_TYPE = "application/vnd.api+json"
SUPPORTED_REVISIONS = frozenset({KLAVIYO_REVISION})
_REVISION_RE = re.compile(r"^\d{4}-\d{2}-\d{2}(\.[a-z]+)?$")
_E164_RE = re.compile(r"^\+[1-9]\d{6,14}$")

MAX_JOB_PROFILES = 10_000
MAX_JOB_BYTES = 5 * 1024 * 1024
MAX_PROFILE_BYTES = 100 * 1024
MAX_RELATIONSHIP_IDS = 1_000
JOB_TTL_SECONDS = 7 * 24 * 3600  # *guess*: expires_at a week after creation

# (burst per second, steady per minute), from each operation's x-klaviyo-ratelimit.
RATE_LIMITS: dict[str, tuple[int, int]] = {
    "accounts": (1, 15),
    "lists_read": (75, 750),
    "lists_write": (10, 150),
    "bulk_import": (10, 150),
    "profile_import": (75, 750),
    "profiles_read": (75, 750),
    "list_profiles": (75, 750),  # get_profiles_for_list
    "subscribe": (75, 750),
    "data_privacy": (3, 60),  # Request Profile Deletion
}
MAX_SUBSCRIBE_PROFILES = 1_000

PROFILE_ATTRIBUTE_FIELDS = (
    "email",
    "phone_number",
    "external_id",
    "_kx",
    "first_name",
    "last_name",
    "organization",
    "locale",
    "title",
    "image",
)
_STORED_FIELDS = tuple(k for k in PROFILE_ATTRIBUTE_FIELDS if k != "_kx")  # _kx identifies, it is not stored
LOCATION_FIELDS = ("address1", "address2", "city", "country", "latitude", "longitude", "region", "zip", "timezone", "ip")
IDENTIFIERS = ("email", "phone_number", "external_id", "_kx")

# --- request schemas (subset transcribed from the 2026-07-15 spec) --------------------

_NSTR = {"type": "string", "nullable": True}
_LOCATION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "nullable": True,
    "additionalProperties": False,
    "properties": {
        **{k: _NSTR for k in LOCATION_FIELDS},
        "latitude": {"nullable": True, "oneOf": [{"type": "string"}, {"type": "number"}]},
        "longitude": {"nullable": True, "oneOf": [{"type": "string"}, {"type": "number"}]},
    },
}
_PROFILE_ATTRIBUTES_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        **{k: _NSTR for k in PROFILE_ATTRIBUTE_FIELDS},
        "location": _LOCATION_SCHEMA,
        "properties": {"type": "object", "nullable": True},
    },
}
_PROFILE_META_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "patch_properties": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "append": {"type": "object", "nullable": True},
                "unappend": {"type": "object", "nullable": True},
                "unset": {"nullable": True, "oneOf": [{"type": "string"}, {"type": "array"}]},
            },
        },
        "patch_identifiers": {"type": "object"},
    },
}
PROFILE_RESOURCE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "attributes"],
    "properties": {
        "type": {"type": "string", "enum": ["profile"]},
        "id": _NSTR,
        "attributes": _PROFILE_ATTRIBUTES_SCHEMA,
        "meta": _PROFILE_META_SCHEMA,
    },
}
def _list_relationship(many: bool) -> dict[str, Any]:
    """A JSON:API relationship to one list (``data: {…}``) or several (``data: [{…}]``)."""
    identifier = {
        "type": "object",
        "required": ["type", "id"],
        "properties": {"type": {"type": "string", "enum": ["list"]}, "id": {"type": "string"}},
    }
    return {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"type": "array", "items": identifier} if many else identifier},
    }


def _job_schema(job_type: str, attributes: dict[str, Any], relationships: dict[str, Any]) -> dict[str, Any]:
    """The JSON:API envelope of a job-creating request: ``data.type``, ``data.attributes`` (a ``profiles`` list
    plus the job's own attributes) and ``data.relationships``, unknown keys refused."""
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "type": "object",
                "required": ["type", "attributes"],
                "properties": {
                    "type": {"type": "string", "enum": [job_type]},
                    "attributes": {
                        "type": "object",
                        "required": ["profiles"],
                        "additionalProperties": False,
                        "properties": attributes,
                    },
                    "relationships": {"type": "object", "additionalProperties": False, "properties": relationships},
                },
            }
        },
    }


def _profiles(items: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": ["data"], "properties": {"data": {"type": "array", "minItems": 1, "items": items}}}


BULK_IMPORT_SCHEMA: dict[str, Any] = _job_schema(
    "profile-bulk-import-job", {"profiles": _profiles(PROFILE_RESOURCE_SCHEMA)}, {"lists": _list_relationship(many=True)}
)
_SUBSCRIPTION_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "required": ["consent"],
    "additionalProperties": False,
    "properties": {
        "consent": {"type": "string", "enum": ["SUBSCRIBED"]},
        "consented_at": {"type": "string", "nullable": True},
    },
}
_SUBSCRIBE_PROFILE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "attributes"],
    "properties": {
        "type": {"type": "string", "enum": ["profile"]},
        "id": _NSTR,
        "attributes": {
            "type": "object",
            "required": ["subscriptions"],
            "additionalProperties": False,
            "properties": {
                "email": _NSTR,
                "phone_number": _NSTR,
                "age_gated_date_of_birth": _NSTR,
                "subscriptions": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "email": {
                            "type": "object",
                            "nullable": True,
                            "additionalProperties": False,
                            "properties": {
                                "marketing": {**_SUBSCRIPTION_PARAMETERS, "nullable": True},
                            },
                        },
                    },
                },
            },
        },
    },
}
SUBSCRIBE_JOB_SCHEMA: dict[str, Any] = _job_schema(
    "profile-subscription-bulk-create-job",
    {
        "custom_source": _NSTR,
        "historical_import": {"type": "boolean", "nullable": True},
        "profiles": _profiles(_SUBSCRIBE_PROFILE_SCHEMA),
    },
    {"list": _list_relationship(many=False)},
)
PROFILE_IMPORT_SCHEMA: dict[str, Any] = {"type": "object", "required": ["data"], "properties": {"data": PROFILE_RESOURCE_SCHEMA}}
RELATIONSHIP_PROFILES_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["type", "id"],
                "properties": {"type": {"type": "string", "enum": ["profile"]}, "id": {"type": "string"}},
            },
        }
    },
}


# --- errors ---------------------------------------------------------------------------


def error_response(
    status: int, code: str, title: str, detail: str, pointer: str = "/data/", headers: Optional[dict[str, str]] = None
) -> ApiResponse:
    """A Klaviyo JSON:API error document with one error."""
    err = {"id": new_uuid(), "status": status, "code": code, "title": title, "detail": detail, "source": {"pointer": pointer}}
    return ApiResponse(status, {"errors": [err]}, CONTENT_TYPE, headers or {})


def invalid(detail: str, pointer: str = "/data/") -> ApiError:
    return ApiError(error_response(400, "invalid", "Invalid input.", detail, pointer))


def not_found(detail: str) -> ApiError:
    return ApiError(error_response(404, "not_found", "Not found.", detail))


def _schema_error(body: Any, schema: dict[str, Any], resource: str) -> None:
    problem = validate_schema(body, schema)
    if problem is None:
        return
    if problem.kind == "required":
        detail = f"'{problem.field}' is a required field."
    elif problem.kind == "additional":
        detail = f"'{problem.field}' is not a valid field for the resource '{resource}'."
    elif problem.kind == "enum":
        detail = f"'{problem.value}' is not a valid choice for '{problem.field}'."
    elif problem.kind == "min_items":
        detail = f"'{problem.field}' must contain at least one item."
    else:
        detail = f"Invalid value for '{problem.field or 'data'}': {problem.message}."
    raise invalid(detail, problem.pointer)


# --- store ----------------------------------------------------------------------------


@dataclass
class KList:
    id: str
    name: str
    created: str
    updated: str
    #: the members in the order they joined, each with when it last joined (``joined_group_at`` of Get Profiles
    #: for List: "the datetime when this profile most recently joined the list"): one dict, an ordered set whose
    #: values are the join times, as a list may hold millions of profiles
    profile_ids: dict[str, str] = field(default_factory=dict)

    def join(self, profile_id: str, when: str) -> None:
        if profile_id not in self.profile_ids:
            self.profile_ids[profile_id] = when


class ProfileAttributes(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A submitted profile's ``attributes`` (``_PROFILE_ATTRIBUTES_SCHEMA``), decoded straight from the body.
    ``UNSET`` is an absent attribute (kept), ``None`` an explicit null (cleared: "setting a field to null will
    clear out the field"). ``location`` and ``properties`` stay dicts: they are merged key by key."""

    email: Union[str, None, UnsetType] = UNSET
    phone_number: Union[str, None, UnsetType] = UNSET
    external_id: Union[str, None, UnsetType] = UNSET
    kx: Union[str, None, UnsetType] = msgspec.field(name="_kx", default=UNSET)
    first_name: Union[str, None, UnsetType] = UNSET
    last_name: Union[str, None, UnsetType] = UNSET
    organization: Union[str, None, UnsetType] = UNSET
    locale: Union[str, None, UnsetType] = UNSET
    title: Union[str, None, UnsetType] = UNSET
    image: Union[str, None, UnsetType] = UNSET
    location: Union[dict, None, UnsetType] = UNSET
    properties: Union[dict, None, UnsetType] = UNSET


#: the plain text attributes few profiles have (_upsert handles the identifiers and names one by one)
_RARE_TEXT_FIELDS = ("organization", "locale", "title", "image")


class ProfileResource(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """One profile of a bulk import job (``PROFILE_RESOURCE_SCHEMA``). Unknown keys are refused by the decoder so
    that such a profile takes the schema walk (which allows them) and its size cap counts them."""

    type: str
    attributes: ProfileAttributes
    id: Union[str, None, UnsetType] = UNSET
    meta: Union[dict, UnsetType] = UNSET


class _ListRef(msgspec.Struct, gc=False):
    type: str
    id: str


class _ListsRelationship(msgspec.Struct, gc=False):
    data: list[_ListRef]


class _JobRelationships(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    lists: Union[_ListsRelationship, UnsetType] = UNSET


class _JobProfiles(msgspec.Struct, gc=False):
    data: list[msgspec.Raw]  # each profile's own bytes: decoded on its own, and again for an import error's payload


class _JobAttributes(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    profiles: _JobProfiles


class _JobData(msgspec.Struct, gc=False):
    type: str
    attributes: _JobAttributes
    relationships: Union[_JobRelationships, UnsetType] = UNSET


class _JobBody(msgspec.Struct, gc=False):
    data: _JobData


_job_decoder = msgspec.json.Decoder(_JobBody)
_resource_decoder = msgspec.json.Decoder(ProfileResource)
_raw_decode = msgspec.json.decode


#: what a profile holds that few profiles set, with the value it has when it is not set (kept out of Profile's
#: slots: an imported profile sets none of them, and every slot is 8 bytes times millions of profiles)
_RARE_DEFAULTS: dict[str, Any] = {
    "organization": None, "locale": None, "title": None, "image": None, "location": None,
    "suppressed": False, "consent": "NEVER_SUBSCRIBED", "consent_timestamp": None, "consent_source": None,
    "consent_pending": None,
}


def _rare(name: str) -> property:
    """A Profile attribute kept in its ``more`` dict (absent while it has its default)."""
    default = _RARE_DEFAULTS[name]

    def get(self: "Profile") -> Any:
        more = self.more
        return default if more is None else more.get(name, default)

    def put(self: "Profile", value: Any) -> None:
        more = self.more
        if value is default or (value == default and type(value) is type(default)):
            if more is not None:
                more.pop(name, None)
                if not more:
                    self.more = None
        elif more is None:
            self.more = {name: value}
        else:
            more[name] = value

    return property(get, put, doc=f"``{name}`` (kept in ``more`` unless it is {default!r})")


_KEY_TUPLES: dict[tuple, tuple] = {}
_KEY_TUPLES_MAX = 4_096  # distinct key sequences shared; past that each profile keeps its own tuple of keys


def _pack(props: Optional[dict], values: Callable[[dict], Any] = dict.values) -> Optional[tuple]:
    """A properties dict as one tuple, ``(keys, value, value, ...)``, with the keys tuple shared by every profile
    whose properties have the same keys in the same order (an export sends the same few): 64 bytes for two
    properties instead of a dict's 180. None stands for none. ``values``: the values to pack (by default the
    dict's own)."""
    if not props:
        return None
    keys = tuple(props)
    shared = _KEY_TUPLES.get(keys)
    if shared is None:
        shared = keys
        if len(_KEY_TUPLES) < _KEY_TUPLES_MAX:
            _KEY_TUPLES[keys] = keys
    return (shared, *values(props))


def _unpack(packed: Optional[tuple]) -> Optional[dict]:
    """The dict :func:`_pack` packed (a new one, in the same order), or None."""
    if packed is None:
        return None
    return dict(zip(packed[0], packed[1:]))


class Profile(msgspec.Struct, gc=False):
    """A stored profile: fixed slots, no GC header (it holds only strings, tuples and JSON dicts, so it can be in
    no reference cycle). What most imported profiles set has a slot; the rest (``_RARE_DEFAULTS``) reads and
    writes like a slot but lives in ``more``. ``properties`` reads as a new dict and is stored packed
    (:func:`_pack`) in ``props``: write it back after changing it. ``properties`` and ``location`` are None while
    empty (shown as ``{}``)."""

    id: str
    email: Optional[str] = None
    phone_number: Optional[str] = None
    external_id: Optional[str] = None
    first_name: Optional[str] = None
    last_name: Optional[str] = None
    props: Optional[tuple] = None
    created: Optional[str] = None
    updated: Optional[str] = None
    more: Optional[dict] = None

    @property
    def properties(self) -> Optional[dict]:
        return _unpack(self.props)

    @properties.setter
    def properties(self, value: Optional[dict]) -> None:
        self.props = _pack(value)

    for _name in _RARE_DEFAULTS:
        locals()[_name] = _rare(_name)
    del _name


#: the fields ``state()`` shows, in its order (the order of the stored profile dicts before Profile)
_STATE_FIELDS = ("email", "phone_number", "external_id", "first_name", "last_name", "organization", "locale", "title",
                 "image", "location", "properties", "created", "updated", "suppressed", "consent", "consent_timestamp",
                 "consent_source", "consent_pending")


class JobError(msgspec.Struct, gc=False):
    """One import error, as ``GET .../import-errors`` answers it (``original_payload``: the profile's attributes
    as submitted, in their order)."""

    id: str
    code: str
    title: str
    detail: str
    pointer: str
    original_payload: Any


class ImportJob(msgspec.Struct, gc=False):
    """A bulk import job. While it is not complete it holds its submitted profiles (``resources``, and
    ``originals``: each one's bytes or dict, for an import error's ``original_payload``); once complete only what
    the API still answers with: counts, times, list ids, the processed profiles' ids and the import errors."""

    id: str
    created: float
    total: int
    list_ids: list[str]
    resources: Optional[list[Optional[ProfileResource]]]  # None once processed
    originals: Optional[list[Any]]
    start_at: float = 0.0  # when processing starts (the queue time, and waiting for a slot: klaviyo_jobs_in_progress)
    applied: int = 0
    completed_count: int = 0
    failed_count: int = 0
    started: Optional[float] = None
    completed: Optional[float] = None
    #: the processed profiles' ids, each once, in order: an ordered set while processing, a tuple once complete
    profile_ids: Union[dict, tuple] = msgspec.field(default_factory=dict)
    errors: list[JobError] = msgspec.field(default_factory=list)

    @property
    def status(self) -> str:
        if self.completed is not None:
            return "complete"
        return "processing" if self.started is not None else "queued"

    def original_payload(self, index: int) -> Any:
        """The attributes of the job's ``index``-th profile as submitted (a dict in the submitted key order)."""
        original = self.originals[index]
        return (_raw_decode(original) if isinstance(original, msgspec.Raw) else original)["attributes"]


@dataclass
class KAccount:
    api_key: str
    account_id: str
    lists: dict[str, KList] = field(default_factory=dict)
    profiles: dict[str, Profile] = field(default_factory=dict)
    by_email: dict[str, str] = field(default_factory=dict)
    by_phone: dict[str, str] = field(default_factory=dict)
    by_external_id: dict[str, str] = field(default_factory=dict)
    jobs: dict[str, ImportJob] = field(default_factory=dict)
    deletions: list["Deletion"] = field(default_factory=list)


@dataclass
class Deletion:
    """A Request Profile Deletion: the identifier it names, when it was asked, whether it was carried out."""

    kind: str  # "id", "email" or "phone_number"
    value: str
    requested: float
    done: Optional[float] = None
    deleted: int = 0


def _phone_ok(value: Any) -> bool:
    return isinstance(value, str) and bool(_E164_RE.match(value))


def _parse_time(value: Any) -> Optional[float]:
    """An ISO 8601 date-time as epoch seconds (naive ones read as UTC), or None when it is not one."""
    from datetime import datetime, timezone

    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).timestamp()


def check_profile(attrs: ProfileAttributes) -> Optional[tuple[str, str]]:
    """Per-profile validation: (field, detail) of the first problem, or None (an absent attribute is UNSET, which
    is falsy like None)."""
    email, phone = attrs.email, attrs.phone_number
    if not (email or phone or attrs.external_id or attrs.kx):  # IDENTIFIERS
        return "", "A profile must have at least one identifier: email, phone_number, external_id or _kx."
    if email is not None and email is not UNSET and not is_valid_email(email):
        return "email", f"Invalid email address: '{email}'."
    if phone is not None and phone is not UNSET and not _E164_RE.match(phone):  # _phone_ok: phone is a str here
        return "phone_number", f"Invalid phone number format (must be E.164): '{phone}'."
    return None


_SHARED: dict[str, str] = {}
_SHARED_MAX = 1 << 16  # distinct values kept; past that, new values are stored as they come (the cache stays small)
_SHARED_LENGTH = 40


def _share(value: Any) -> Any:
    """One string object for every profile's equal short text (first names, a tier property): a decoded body
    makes a new string per profile, and millions of copies of "Ada" or "gold" are most of a profile's bytes."""
    if type(value) is not str or len(value) > _SHARED_LENGTH:
        return value
    shared = _SHARED.get(value)
    if shared is not None:
        return shared
    if len(_SHARED) < _SHARED_MAX:
        _SHARED[value] = value
    return value


def _shared_values(given: dict) -> Iterator[Any]:
    """A dict's values, short strings shared (:func:`_share`); an iterator, as :func:`_pack` unpacks it at once
    (``map`` runs no frame of its own per profile, a list comprehension does)."""
    return map(_share, given.values())


def _merged(current: Optional[dict], given: Optional[dict]) -> Optional[dict]:
    """``location``/``properties`` after an import gave them: ``null`` clears, a dict is merged key by key into
    what is stored (into a new dict, when nothing was); None stands for empty."""
    if given is None:
        return None
    if not given:
        return current
    merged = {} if current is None else current
    for key, value in given.items():
        merged[key] = _share(value)
    return merged


class _IdBlocks:
    """New profile ids for one pass of :meth:`KlaviyoService.advance`, drawn from :func:`new_ulids` a block at a
    time (one clock read and lock per block, not per profile). At most ``budget`` are drawn (the profiles this
    pass applies); the pass draws no other ids, so profile ids still follow creation order."""

    __slots__ = ("_budget", "_block")

    def __init__(self, budget: int) -> None:
        self._budget, self._block = budget, []

    def take(self) -> str:
        if not self._block:
            count = max(1, min(256, self._budget))
            self._budget -= count
            self._block = new_ulids(count)
            self._block.reverse()
        return self._block.pop()


_TOO_MANY_JOB_PROFILES = "A bulk import job accepts at most {cap} profiles."
#: A profile's compact JSON (how the 100 KB cap is measured) is at most this many times as long as its submitted
#: bytes: whitespace and escapes only shrink when re-encoded, and the worst growth is a number token such as
#: ``1e15`` (4 bytes) written back as ``1000000000000000.0`` (18). Shorter profiles cannot be over the cap.
_MAX_GROWTH = 8


def _check_profile_size(size: int, index: int) -> None:
    if size > MAX_PROFILE_BYTES:
        raise invalid(f"Profile payload is {size} bytes; the maximum per profile is 100KB ({MAX_PROFILE_BYTES} bytes).", f"/data/attributes/profiles/data/{index}")


def _decode_job(body: bytes) -> Optional[tuple[list[ProfileResource], list[msgspec.Raw], list[str]]]:
    """A bulk import job body decoded straight into its typed form (profiles, each one's bytes, list ids), or
    None when it does not decode so or breaks a rule the types do not carry (``type`` values, at least one
    profile, ``location``/``meta`` shapes): the caller then checks it the general way, which finds the same
    problem and answers the same 400. Only the profile count and size caps are checked here (a valid body over
    them gets the same error either way); decoding a 10,000-profile job this way skips the per-value schema walk.
    """
    try:
        data = _job_decoder.decode(body).data
        originals = data.attributes.profiles.data
        if len(originals) > MAX_JOB_PROFILES:
            raise invalid(f"Too many profiles: {len(originals)}. {_TOO_MANY_JOB_PROFILES.format(cap=MAX_JOB_PROFILES)}", "/data/attributes/profiles/data")
        resources = [_resource_decoder.decode(raw) for raw in originals]
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None
    if data.type != "profile-bulk-import-job" or not resources:
        return None
    lists = data.relationships.lists if data.relationships is not UNSET else UNSET
    list_refs = lists.data if lists is not UNSET else []
    if any(ref.type != "list" for ref in list_refs):
        return None
    location_ok, meta_ok = compiled_schema(_LOCATION_SCHEMA), compiled_schema(_PROFILE_META_SCHEMA)
    for resource in resources:
        if resource.type != "profile":
            return None
        location = resource.attributes.location
        if location and not location_ok(location):
            return None
        if resource.meta is not UNSET and not meta_ok(resource.meta):
            return None
    for i, raw in enumerate(originals):
        if len(raw) * _MAX_GROWTH > MAX_PROFILE_BYTES:  # possibly over the cap: measured as the general way does
            _check_profile_size(json_size(_raw_decode(raw)), i)
    return resources, originals, [ref.id for ref in list_refs]


def _profiles_within(body: Any, cap: int, limit_text: str) -> Any:
    """``data.attributes.profiles`` of a bulk request (None when absent or malformed, for the schema check to
    name); more than ``cap`` profiles is refused before anything else is looked at."""
    data = body.get("data") if isinstance(body, dict) else None
    profiles = ((data or {}).get("attributes") or {}).get("profiles") if isinstance(data, dict) else None
    if isinstance(profiles, dict) and isinstance(profiles.get("data"), list) and len(profiles["data"]) > cap:
        raise invalid(f"Too many profiles: {len(profiles['data'])}. {limit_text.format(cap=cap)}", "/data/attributes/profiles/data")
    return profiles


class KlaviyoService:
    """The Klaviyo half of the sandbox: accounts, lists, profiles, import jobs."""

    name = "klaviyo"
    prefix = "/api"

    def __init__(self, config: SandboxConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.lock = threading.RLock()
        self.accounts: dict[str, KAccount] = {}
        self._keys: dict[str, KAccount] = {}
        self.reset()

    # --- lifecycle / seeding ---------------------------------------------------------

    def reset(self) -> None:
        with self.lock:
            now = iso_now(self.clock())
            self.accounts = {}
            for acc_cfg in self.config.klaviyo_accounts:
                acc = KAccount(acc_cfg.api_key, acc_cfg.account_id)
                for lst in acc_cfg.lists:
                    acc.lists[lst.id] = KList(lst.id, lst.name, now, now)
                self.accounts[acc.account_id] = acc
            self._keys = {a.api_key: a for a in self.accounts.values()}

    def _account(self, account_id: Optional[str]) -> KAccount:
        if account_id is None:
            return next(iter(self.accounts.values()))
        if account_id not in self.accounts:
            raise KeyError(f"unknown Klaviyo account {account_id!r}")
        return self.accounts[account_id]

    def add_list(self, list_id: str, name: str, account_id: Optional[str] = None) -> dict[str, Any]:
        with self.lock:
            acc = self._account(account_id)
            now = iso_now(self.clock())
            if list_id in acc.lists:
                acc.lists[list_id].name = name
            else:
                acc.lists[list_id] = KList(list_id, name, now, now)
            return {"id": list_id, "name": name}

    def suppress(self, email: str, account_id: Optional[str] = None) -> dict[str, Any]:
        """Mark (creating if needed) the profile with this email globally suppressed."""
        with self.lock:
            acc = self._account(account_id)
            profile, _ = self._upsert(acc, ProfileAttributes(email=email), None, None)
            profile.suppressed = True
            profile.consent = "UNSUBSCRIBED"
            return {"id": profile.id, "email": profile.email}

    # --- hooks used by the HTTP server -----------------------------------------------

    def routes(self) -> list[Route]:
        rl = RATE_LIMITS
        return [
            Route("GET", "/api/accounts", self.get_accounts, "klaviyo_read", rl["accounts"]),
            Route("GET", "/api/lists", self.get_lists, "klaviyo_read", rl["lists_read"]),
            Route("GET", "/api/lists/{id}", self.get_list, "klaviyo_read", rl["lists_read"]),
            Route("GET", "/api/lists/{id}/profiles", self.get_list_profiles, "klaviyo_read", rl["list_profiles"]),
            Route("GET", "/api/lists/{id}/relationships/profiles", self.get_list_profile_ids, "klaviyo_read", rl["lists_read"]),
            Route("POST", "/api/lists/{id}/relationships/profiles", self.add_list_profiles, "klaviyo_write", rl["lists_write"]),
            Route("DELETE", "/api/lists/{id}/relationships/profiles", self.remove_list_profiles, "klaviyo_write", rl["lists_write"]),
            Route("POST", "/api/profile-bulk-import-jobs", self.create_job, "klaviyo_job", rl["bulk_import"]),
            Route("GET", "/api/profile-bulk-import-jobs", self.get_jobs, "klaviyo_read", rl["bulk_import"]),
            Route("GET", "/api/profile-bulk-import-jobs/{job_id}", self.get_job, "klaviyo_read", rl["bulk_import"]),
            Route("GET", "/api/profile-bulk-import-jobs/{id}/import-errors", self.get_job_errors, "klaviyo_read", rl["bulk_import"]),
            Route("GET", "/api/profile-bulk-import-jobs/{id}/profiles", self.get_job_profiles, "klaviyo_read", rl["bulk_import"]),
            Route("GET", "/api/profile-bulk-import-jobs/{id}/relationships/profiles", self.get_job_profile_ids, "klaviyo_read", rl["bulk_import"]),
            Route("GET", "/api/profile-bulk-import-jobs/{id}/lists", self.get_job_lists, "klaviyo_read", rl["bulk_import"]),
            Route("GET", "/api/profile-bulk-import-jobs/{id}/relationships/lists", self.get_job_list_ids, "klaviyo_read", rl["bulk_import"]),
            Route("POST", "/api/profile-import", self.profile_import, "klaviyo_write", rl["profile_import"]),
            Route("GET", "/api/profiles", self.get_profiles, "klaviyo_read", rl["profiles_read"]),
            Route("POST", "/api/profile-subscription-bulk-create-jobs", self.bulk_subscribe, "klaviyo_write", rl["subscribe"]),
            Route("POST", "/api/data-privacy-deletion-jobs", self.request_deletion, "klaviyo_write", rl["data_privacy"]),
        ]

    def authenticate(self, req: ApiRequest) -> Optional[ApiResponse]:
        header = req.header("authorization") or ""
        scheme, _, key = header.partition(" ")
        if scheme != "Klaviyo-API-Key":
            return error_response(
                401,
                "not_authenticated",
                "Authentication credentials were not provided.",
                "Missing or invalid authorization scheme. Please use Klaviyo-API-Key.",
            )
        account = self._keys.get(key.strip())
        if account is None:
            return error_response(401, "not_authenticated", "Authentication credentials were not provided.", "Missing or invalid private key.")
        req.account = account
        return None

    def precheck(self, req: ApiRequest) -> Optional[ApiResponse]:
        """Revision header and body media type, checked before rate limits."""
        revision = req.header("revision")
        if not revision:
            return error_response(400, "invalid", "Invalid input.", "Missing required header: 'revision'.")
        if not _REVISION_RE.match(revision) or revision not in SUPPORTED_REVISIONS:
            return error_response(
                400,
                "invalid",
                "Invalid input.",
                f"Invalid revision '{revision}'. The sandbox implements revision {KLAVIYO_REVISION}.",
            )
        if req.body and req.method in ("POST", "PATCH", "DELETE"):
            ctype = (req.header("content-type") or "").split(";")[0].strip().lower()
            if ctype not in ("application/json", "application/vnd.api+json"):
                return error_response(415, "unsupported_media_type", f'Unsupported media type "{ctype}" in request.', "Use application/vnd.api+json.")
        return None

    def account_key(self, req: ApiRequest) -> str:
        return req.account.account_id

    def connection_limit(self) -> Optional[int]:
        return None  # Klaviyo limits by fixed windows (Route.rate_limit), not connections

    def throttled(self, retry_after: Optional[int]) -> ApiResponse:
        retry_after = retry_after or 1
        unit = "second" if retry_after == 1 else "seconds"
        return error_response(
            429,
            "throttled",
            "Request was throttled.",
            f"Request was throttled. Expected available in {retry_after} {unit}.",
            headers={"Retry-After": str(retry_after)},
        )

    def not_found_response(self, req: ApiRequest) -> ApiResponse:
        return error_response(404, "not_found", "Not found.", f"The path {req.path} was not found.")

    def method_not_allowed(self, req: ApiRequest) -> ApiResponse:
        return error_response(405, "method_not_allowed", f'Method "{req.method}" not allowed.', f'Method "{req.method}" not allowed.')

    def server_error(self, req: ApiRequest) -> ApiResponse:
        return error_response(500, "error", "A server error occurred.", "A server error occurred.")

    # --- job progress ----------------------------------------------------------------

    def tick(self) -> None:
        """Called by the server before each request: jobs move with time."""
        self.advance()

    def advance(self, now: Optional[float] = None) -> None:
        """Bring every job to where elapsed time says it is; apply processed profiles."""
        now = self.clock() if now is None else now
        self._carry_out_deletions(now)
        speed = self.config.klaviyo_profiles_per_second
        queue = self.config.klaviyo_job_queue_seconds
        with self.lock:
            for acc in self.accounts.values():
                for job in acc.jobs.values():
                    if job.completed is not None:
                        continue
                    start = job.start_at
                    if now < start:
                        continue
                    job.started = start
                    target = min(job.total, int((now - start) * speed))
                    if job.applied < target:
                        self._apply(acc, job, target)
                    if job.applied >= job.total:
                        job.completed = start + job.total / speed
                        # What the API answers with after completion stays; the submitted profiles go.
                        job.resources = job.originals = None
                        job.profile_ids = tuple(job.profile_ids)

    def _apply(self, acc: KAccount, job: ImportJob, target: int) -> None:
        """Process the job's profiles up to ``target``: each valid one is upserted and joins the job's lists, each
        invalid one (or conflicting, under ``klaviyo_identifier_conflict = reject``) becomes an import error.
        What is the same for every profile of the pass (the switch, the lists, an id source) is looked up once."""
        reject = self.config.behaviour["klaviyo_identifier_conflict"] == "reject"
        lists = [acc.lists[list_id] for list_id in job.list_ids if list_id in acc.lists]
        ids = _IdBlocks(target - job.applied).take
        resources, processed, upsert = job.resources, job.profile_ids, self._upsert
        # The pass's profiles are processed at one moment of the model: one timestamp (to the second) for them all.
        now = iso_now(self.clock())
        index = job.applied
        completed = 0  # added to job.completed_count once, when the pass ends (however it ends)
        try:
            while index < target:
                resource = resources[index]
                resources[index] = None  # processed: its memory is free for the profiles that follow
                attrs = resource.attributes
                problem = check_profile(attrs)
                if problem is not None:
                    code, title = "invalid", "Invalid input."
                elif reject:
                    problem = self._conflict(acc, attrs, resource.id)
                    code, title = "duplicate_profile", "Conflict."
                if problem is not None:
                    fld, detail = problem
                    pointer = f"/data/attributes/profiles/data/{index}/attributes" + (f"/{fld}" if fld else "")
                    job.errors.append(JobError(new_uuid(), code, title, detail, pointer, job.original_payload(index)))
                    job.failed_count += 1
                else:
                    profile, _ = upsert(acc, attrs, resource.id, resource.meta, ids, now)
                    pid = profile.id
                    for lst in lists:
                        lst.join(pid, now)
                    processed[pid] = None
                    completed += 1
                index += 1
        finally:
            job.applied = index
            job.completed_count += completed

    # --- profiles --------------------------------------------------------------------

    @staticmethod
    def _conflict(acc: KAccount, attrs: ProfileAttributes, profile_id: Any) -> Optional[tuple[str, str]]:
        """Under ``klaviyo_identifier_conflict = reject``: (field, detail) when the profile's phone number or
        external id belongs to another profile than the one its id or email names, else None. A profile without
        an email or id is matched by its other identifiers as usual (nothing to conflict with)."""
        own = profile_id if isinstance(profile_id, str) and profile_id in acc.profiles else None
        email = attrs.email
        if own is None and isinstance(email, str):
            own = acc.by_email.get(email.lower())
        if own is None and not isinstance(email, str):
            return None
        for key, index, name in (("phone_number", acc.by_phone, "phone number"), ("external_id", acc.by_external_id, "external id")):
            value = getattr(attrs, key)
            other = index.get(value) if isinstance(value, str) else None
            # Another profile that has an email of its own: merging would rewrite it (a phone-only one is the same person).
            if other is not None and other != own and acc.profiles[other].email is not None:
                return key, f"A profile already exists with this {name}, under another email or id ({other})."
        return None

    def _upsert(
        self, acc: KAccount, attrs: ProfileAttributes, profile_id: Any, meta: Any, new_id: Callable[[], str] = new_ulid,
        now: Optional[str] = None,
    ) -> tuple[Profile, bool]:
        """Find the profile (by id, then email case-insensitively, phone number, external id) or create it, and
        apply the attributes (see the module docstring). Runs once per imported profile (millions in a benchmark):
        fields spelled out, stored values tested against None (they are str or None), no per-call closures.
        ``now``: the ``updated`` (and ``created``) stamp, the clock's second by default."""
        if now is None:
            now = iso_now(self.clock())
        profiles = acc.profiles
        email = attrs.email
        email_key = email.lower() if email is not None and email is not UNSET else None
        profile = profiles.get(profile_id) if profile_id and type(profile_id) is str else None
        if profile is None and email_key is not None:
            pid = acc.by_email.get(email_key)
            profile = profiles[pid] if pid else None
        if profile is None:
            value = attrs.phone_number
            pid = acc.by_phone.get(value) if value is not None and value is not UNSET else None
            if not pid:
                value = attrs.external_id
                pid = acc.by_external_id.get(value) if value is not None and value is not UNSET else None
            if pid:
                profile = profiles[pid]
        created = profile is None
        patch = meta.get("patch_properties") if type(meta) is dict else None
        if created and not patch and (
                attrs.organization is attrs.locale is attrs.title is attrs.image is attrs.location is UNSET):
            # The usual imported profile: new, none of the rare fields. Built in one call with what the general
            # path below would set one by one (UNSET as None, names and property values shared, properties
            # packed as given), and indexed under identifiers nothing else has (the lookups above missed).
            pid = new_id()
            phone, external = attrs.phone_number, attrs.external_id
            if email is UNSET:
                email = None
            if phone is UNSET:
                phone = None
            if external is UNSET:
                external = None
            first, last, value = attrs.first_name, attrs.last_name, attrs.properties
            profile = profiles[pid] = Profile(
                pid, email, phone, external, None if first is UNSET else _share(first),
                None if last is UNSET else _share(last), _pack(value, _shared_values) if value else None, now, now)
            if email is not None:
                acc.by_email[email if email_key == email else email_key] = pid  # a lower-case address is its own key
            if phone is not None:
                acc.by_phone[phone] = pid
            if external is not None:
                acc.by_external_id[external] = pid
            return profile, True
        if profile is None:
            pid = new_id()
            profile = profiles[pid] = Profile(pid, created=now)
        old_email, old_phone, old_external = profile.email, profile.phone_number, profile.external_id
        if email is not UNSET and not (email_key is not None and old_email is not None and email_key == old_email.lower()):
            profile.email = email  # (the same address in another case keeps the stored spelling)
        if attrs.phone_number is not UNSET:
            profile.phone_number = attrs.phone_number
        if attrs.external_id is not UNSET:
            profile.external_id = attrs.external_id
        value = attrs.first_name
        if value is not UNSET:
            profile.first_name = _share(value)
        value = attrs.last_name
        if value is not UNSET:
            profile.last_name = _share(value)
        if not (attrs.organization is attrs.locale is attrs.title is attrs.image is UNSET):
            for key in _RARE_TEXT_FIELDS:
                value = getattr(attrs, key)
                if value is not UNSET:
                    setattr(profile, key, _share(value))
        value = attrs.location
        if value is not UNSET:
            profile.location = _merged(profile.location, value)
        value = attrs.properties
        if created and not patch and value:
            profile.props = _pack(value, _shared_values)  # the usual new profile: packed as given, no dict between
        elif value is not UNSET or patch:
            props = None if created else profile.properties
            if value is not UNSET:
                props = _merged(props, value)
            if patch:
                props = props if props is not None else {}
                self._patch_properties(props, patch)
            profile.properties = props
        profile.updated = now
        pid = profile.id
        new = profile.email
        if old_email is not None and old_email != new:
            acc.by_email.pop(old_email.lower(), None)
        if new is not None:
            key = email_key if new is email else new.lower()
            acc.by_email[new if key == new else key] = pid  # an address already in lower case is its own key
        new = profile.phone_number
        if old_phone is not None and old_phone != new:
            acc.by_phone.pop(old_phone, None)
        if new is not None:
            acc.by_phone[new] = pid
        new = profile.external_id
        if old_external is not None and old_external != new:
            acc.by_external_id.pop(old_external, None)
        if new is not None:
            acc.by_external_id[new] = pid
        return profile, created

    @staticmethod
    def _patch_properties(props: dict[str, Any], patch: dict[str, Any]) -> None:
        for key, value in (patch.get("append") or {}).items():
            current = props.get(key)
            current = list(current) if isinstance(current, list) else ([] if current is None else [current])
            current.extend(value if isinstance(value, list) else [value])
            props[key] = current
        for key, value in (patch.get("unappend") or {}).items():
            if isinstance(props.get(key), list):
                drop = value if isinstance(value, list) else [value]
                props[key] = [v for v in props[key] if v not in drop]
        unset = patch.get("unset")
        for key in [unset] if isinstance(unset, str) else (unset or []):
            props.pop(key, None)

    # --- resource rendering ----------------------------------------------------------

    def _profile_resource(self, req: ApiRequest, profile: Profile, joined_group_at: Optional[str] = None) -> dict[str, Any]:
        url = req.base_url + f"/api/profiles/{profile.id}/"
        attributes = {k: getattr(profile, k) for k in _STORED_FIELDS}
        location = profile.location or {}
        attributes.update(
            {
                "created": profile.created,
                "updated": profile.updated,
                "last_event_date": None,
                "location": {k: location.get(k) for k in LOCATION_FIELDS},
                "properties": dict(profile.properties or {}),
            }
        )
        if joined_group_at is not None:  # a list's member (Get Profiles for List)
            attributes["joined_group_at"] = joined_group_at
        if "subscriptions" in (req.arg("additional-fields[profile]") or ""):
            attributes["subscriptions"] = {
                "email": {
                    "marketing": {
                        "can_receive_email_marketing": not profile.suppressed,
                        "consent": profile.consent,
                        "consent_timestamp": profile.consent_timestamp,
                        "custom_method_detail": profile.consent_source,
                        "suppression": [{"reason": "USER_SUPPRESSED", "timestamp": profile.updated}] if profile.suppressed else [],
                        "list_suppressions": [],
                    }
                }
            }
        return {
            "type": "profile",
            "id": profile.id,
            "attributes": self._sparse(req, "profile", attributes),
            "relationships": {
                "lists": {"links": {"self": url + "relationships/lists/", "related": url + "lists/"}},
                "segments": {"links": {"self": url + "relationships/segments/", "related": url + "segments/"}},
            },
            "links": {"self": url},
        }

    def _list_resource(self, req: ApiRequest, lst: KList, with_count: bool = False) -> dict[str, Any]:
        url = req.base_url + f"/api/lists/{lst.id}/"
        attributes: dict[str, Any] = {"name": lst.name, "created": lst.created, "updated": lst.updated, "opt_in_process": "double_opt_in" if self._double_opt_in() else "single_opt_in"}
        if with_count:
            attributes["profile_count"] = len(lst.profile_ids)
        return {
            "type": "list",
            "id": lst.id,
            "attributes": self._sparse(req, "list", attributes),
            "relationships": {
                rel: {"links": {"self": url + f"relationships/{rel}/", "related": url + f"{rel}/"}} for rel in ("profiles", "tags", "flow-triggers")
            },
            "links": {"self": url},
        }

    def _job_resource(self, req: ApiRequest, job: ImportJob) -> dict[str, Any]:
        url = req.base_url + f"/api/profile-bulk-import-jobs/{job.id}/"
        attributes = {
            "status": job.status,
            "created_at": iso_now(job.created, micro=True),
            "total_count": job.total,
            "completed_count": self._completed_count(job),
            "failed_count": job.failed_count,
            "completed_at": iso_now(job.completed, micro=True) if job.completed is not None else None,
            "expires_at": iso_now(job.created + JOB_TTL_SECONDS, micro=True),
            "started_at": iso_now(job.started, micro=True) if job.started is not None else None,
        }

        def rel(name: str) -> dict[str, str]:
            return {"self": url + f"relationships/{name}/", "related": url + f"{name}/"}

        return {
            "type": "profile-bulk-import-job",
            "id": job.id,
            "attributes": self._sparse(req, "profile-bulk-import-job", attributes),
            "relationships": {
                "lists": {"data": [{"type": "list", "id": lid} for lid in job.list_ids], "links": rel("lists")},
                "profiles": {"links": rel("profiles")},
                "import-errors": {"links": {"related": url + "import-errors/"}},
            },
            "links": {"self": url},
        }

    def _completed_count(self, job: ImportJob) -> int:
        """The job's ``completed_count`` under ``klaviyo_completed_count_includes_failed`` (see the docstring)."""
        if self.config.behaviour["klaviyo_completed_count_includes_failed"]:
            return job.completed_count + job.failed_count
        return job.completed_count

    @staticmethod
    def _sparse(req: ApiRequest, rtype: str, attributes: dict[str, Any]) -> dict[str, Any]:
        """Honour ``fields[<type>]=a,b`` sparse fieldsets."""
        wanted = req.arg(f"fields[{rtype}]")
        if not wanted:
            return attributes
        keep = {w.strip().split(".")[0] for w in wanted.split(",")}
        return {k: v for k, v in attributes.items() if k in keep}

    def _page(self, req: ApiRequest, items: list[Any], default: int, maximum: int) -> tuple[list[Any], dict[str, str]]:
        size = query_int(req.arg("page[size]"), default)
        if size is None or not 1 <= size <= maximum:
            raise invalid(f"Page size must be an integer between 1 and {maximum}.", "/data/")
        offset = 0
        cursor = req.arg("page[cursor]")
        if cursor:
            decoded = decode_cursor(cursor)
            if decoded is None:
                raise invalid("Invalid cursor provided.")
            offset = decoded
        page = items[offset : offset + size]
        others = {k: v[0] for k, v in req.query.items() if k not in ("page[cursor]",)}
        links = {"self": req.url(**{**others, **({"page[cursor]": cursor} if cursor else {})})}
        if offset + size < len(items):
            links["next"] = req.url(**others, **{"page[cursor]": encode_cursor(offset + size)})
        if offset > 0:
            links["prev"] = req.url(**others, **{"page[cursor]": encode_cursor(max(0, offset - size))})
        return page, links

    @staticmethod
    def _ok(status: int, body: Any) -> ApiResponse:
        return ApiResponse(status, body, CONTENT_TYPE)

    @staticmethod
    def _body(req: ApiRequest) -> Any:
        try:
            return parse_json_body(req.body)
        except BodyError as exc:
            raise ApiError(error_response(400, "parse_error", "Malformed request.", f"JSON parse error - {exc}")) from exc

    def _list_or_404(self, acc: KAccount, list_id: str) -> KList:
        lst = acc.lists.get(list_id)
        if lst is None:
            raise not_found(f"A list with id {list_id} does not exist.")
        return lst

    def _job_or_404(self, acc: KAccount, job_id: str) -> ImportJob:
        job = acc.jobs.get(job_id)
        if job is None:
            raise not_found(f"A profile-bulk-import-job with id {job_id} does not exist.")
        return job

    # --- handlers: accounts and lists ------------------------------------------------

    def get_accounts(self, req: ApiRequest) -> ApiResponse:
        acc: KAccount = req.account
        resource = {
            "type": "account",
            "id": acc.account_id,
            "attributes": {
                "test_account": True,
                "contact_information": {
                    "default_sender_name": "Segment Export Sandbox",
                    "default_sender_email": "sandbox@example.com",
                    "website_url": "https://example.com",
                    "organization_name": "Segment Export Sandbox",
                    "street_address": {"address1": "1 Sandbox Way", "address2": None, "city": "Boston", "region": "MA", "country": "US", "zip": "02110"},
                },
                "industry": "Software / SaaS",
                "timezone": "UTC",
                "preferred_currency": "USD",
                "public_api_key": acc.account_id,
                "locale": "en-US",
            },
            "links": {"self": req.base_url + f"/api/accounts/{acc.account_id}/"},
        }
        return self._ok(200, {"data": [resource], "links": {"self": req.url()}})

    _FILTER_RE = re.compile(r"^(equals|any)\((\w+),(.+)\)$")

    def _filter(self, req: ApiRequest, allowed: set[str]) -> Optional[tuple[str, list[str]]]:
        """Parse a simple ``equals(field,'v')`` / ``any(field,['a','b'])`` filter."""
        raw = req.arg("filter")
        if not raw:
            return None
        m = self._FILTER_RE.match(raw.strip())
        if not m or m.group(2) not in allowed:
            raise invalid(f"Invalid filter provided: {raw}", "/data/")
        values = re.findall(r"['\"]([^'\"]*)['\"]", m.group(3))
        if not values:
            raise invalid(f"Invalid filter provided: {raw}", "/data/")
        return m.group(2), values

    def get_lists(self, req: ApiRequest) -> ApiResponse:
        acc: KAccount = req.account
        lists = list(acc.lists.values())
        flt = self._filter(req, {"id", "name"})
        if flt:
            lists = [lst for lst in lists if getattr(lst, flt[0]) in flt[1]]
        page, links = self._page(req, lists, 10, 10)
        return self._ok(200, {"data": [self._list_resource(req, lst) for lst in page], "links": links})

    def get_list(self, req: ApiRequest) -> ApiResponse:
        lst = self._list_or_404(req.account, req.path_params["id"])
        with_count = "profile_count" in (req.arg("additional-fields[list]") or "")
        return self._ok(200, {"data": self._list_resource(req, lst, with_count), "links": {"self": req.url()}})

    @staticmethod
    def _email_filter(req: ApiRequest) -> Optional[list[str]]:
        """The addresses of an ``equals(email,"a")`` / ``any(email,["a","b"])`` filter (None without a filter);
        any other filter is refused with 400 ``invalid``."""
        text = (req.arg("filter") or "").strip()
        if not text:
            return None
        match = re.fullmatch(r'(equals|any)\(email,(.*)\)', text, re.S)
        try:
            value = json.loads(match.group(2)) if match else None
        except ValueError:
            value = None
        emails = [value] if match and match.group(1) == "equals" and isinstance(value, str) else value
        if not isinstance(emails, list) or not all(isinstance(e, str) for e in emails):
            raise invalid(f"Invalid filter provided: {text!r}. Supported here: equals(email,...), any(email,[...]).", "/data/")
        return emails

    def get_profiles(self, req: ApiRequest) -> ApiResponse:
        """``GET /api/profiles`` with the email filters the exporter uses to find profile ids.

        Supports ``equals(email,"a@x")`` and ``any(email,["a@x","b@x"])`` (the spec allows ``any``/``equals`` on
        email); other filters get Klaviyo's 400. Matching is case-insensitive, like profile identity.
        """
        acc: KAccount = req.account
        emails = self._email_filter(req)
        if emails is None:
            ids = list(acc.profiles)
        else:
            ids = [acc.by_email[e.lower()] for e in emails if e.lower() in acc.by_email]
        page, links = self._page(req, ids, 20, 100)
        return self._ok(200, {"data": [self._profile_resource(req, acc.profiles[pid]) for pid in page], "links": links})

    def get_list_profiles(self, req: ApiRequest) -> ApiResponse:
        """``GET /api/lists/{id}/profiles`` (Get Profiles for List): the list's profiles, paged by cursor.

        The spec (``get_profiles_for_list``): page[size] 1..100 (default 20), ``fields[profile]``,
        ``additional-fields[profile]`` (``subscriptions``), ``filter`` (``email``: ``any``/``equals``; the
        sandbox implements those) and ``sort`` by ``joined_group_at``. Unsorted, the order is not documented:
        behaviour ``klaviyo_list_profiles_order`` (``joined``: oldest membership first; ``newest``)."""
        acc: KAccount = req.account
        lst = self._list_or_404(acc, req.path_params["id"])
        ids = [pid for pid in lst.profile_ids if pid in acc.profiles]
        sort = req.arg("sort")
        if sort not in (None, "joined_group_at", "-joined_group_at"):
            raise invalid(f"Invalid sort provided: {sort}", "/data/")
        newest = sort == "-joined_group_at" or (sort is None and self.config.behaviour["klaviyo_list_profiles_order"] == "newest")
        if newest:
            ids.reverse()
        emails = self._email_filter(req)
        if emails is not None:
            wanted = {e.lower() for e in emails}
            ids = [pid for pid in ids if (acc.profiles[pid].email or "").lower() in wanted]
        page, links = self._page(req, ids, 20, 100)
        data = [self._profile_resource(req, acc.profiles[pid], joined_group_at=lst.profile_ids.get(pid)) for pid in page]
        return self._ok(200, {"data": data, "links": links})

    def edit_list(self, list_id: str, email: str, action: str, account_id: Optional[str] = None) -> dict[str, Any]:
        """Someone adds a profile to the list, or takes one off, by hand in Klaviyo (membership only, consent
        untouched, as the list relationship calls)."""
        if action not in ("add", "remove"):
            raise ValueError("action must be 'add' or 'remove'")
        with self.lock:
            acc = self._account(account_id)
            if list_id not in acc.lists:
                raise KeyError(f"unknown Klaviyo list {list_id!r}")
            if action == "add":
                profile, _ = self._upsert(acc, ProfileAttributes(email=email), None, None)
                acc.lists[list_id].join(profile.id, iso_now(self.clock()))
                return {"id": profile.id, "list_id": list_id, "member": True}
            pid = acc.by_email.get(email.lower())
            if pid is None:
                raise KeyError(f"unknown Klaviyo profile {email!r}")
            acc.lists[list_id].profile_ids.pop(pid, None)
            return {"id": pid, "list_id": list_id, "member": False}

    def get_list_profile_ids(self, req: ApiRequest) -> ApiResponse:
        lst = self._list_or_404(req.account, req.path_params["id"])
        page, links = self._page(req, list(lst.profile_ids), 20, 100)
        return self._ok(200, {"data": [{"type": "profile", "id": pid} for pid in page], "links": links})

    def _relationship_ids(self, req: ApiRequest, acc: KAccount) -> list[str]:
        body = self._body(req)
        _schema_error(body, RELATIONSHIP_PROFILES_SCHEMA, "profile")
        items = body["data"]
        if len(items) > MAX_RELATIONSHIP_IDS:
            raise invalid(f"Too many profiles: {len(items)}. At most {MAX_RELATIONSHIP_IDS} profiles can be sent per request.", "/data")
        for i, item in enumerate(items):
            if item["id"] not in acc.profiles:
                detail = f"A profile with id {item['id']} does not exist."
                if self.config.behaviour["klaviyo_unknown_profile_id"] == 404:
                    raise not_found(detail)
                raise invalid(detail, f"/data/{i}/id")
        return [item["id"] for item in items]

    def add_list_profiles(self, req: ApiRequest) -> ApiResponse:
        acc: KAccount = req.account
        lst = self._list_or_404(acc, req.path_params["id"])
        now = iso_now(self.clock())
        for pid in self._relationship_ids(req, acc):
            lst.join(pid, now)
        return ApiResponse(204, None, CONTENT_TYPE)

    def remove_list_profiles(self, req: ApiRequest) -> ApiResponse:
        acc: KAccount = req.account
        lst = self._list_or_404(acc, req.path_params["id"])
        for pid in self._relationship_ids(req, acc):
            lst.profile_ids.pop(pid, None)
        return ApiResponse(204, None, CONTENT_TYPE)

    # --- handlers: bulk import jobs --------------------------------------------------

    def create_job(self, req: ApiRequest) -> ApiResponse:
        acc: KAccount = req.account
        if len(req.body) > MAX_JOB_BYTES:
            raise ApiError(
                error_response(413, "request_too_large", "Request entity too large.", f"The payload is {len(req.body)} bytes; the maximum is 5MB ({MAX_JOB_BYTES} bytes).")
            )
        parsed = _decode_job(req.body)
        if parsed is None:  # not a valid job as the decoder reads it: the general walk names what is wrong
            parsed = self._checked_job(req)
        resources, originals, list_ids = parsed
        for i, list_id in enumerate(list_ids):
            if list_id not in acc.lists:
                raise invalid(f"A list with id {list_id} does not exist.", f"/data/relationships/lists/data/{i}/id")
        created = self.clock()
        start_at = self._start_time(acc, created, len(resources))
        job = ImportJob(new_ulid(), created, len(resources), list_ids, resources, originals, start_at=start_at)
        acc.jobs[job.id] = job
        return self._ok(202, {"data": self._job_resource(req, job), "links": {"self": req.url()}})

    def _checked_job(self, req: ApiRequest) -> tuple[list[ProfileResource], list[Any], list[str]]:
        """A job body :func:`_decode_job` did not take, checked the general way (JSON values, then the schema):
        the 400 of the first problem, in the order Klaviyo's checks are modelled (parse, profile count, schema,
        per-profile size); or, when the body is valid after all, its profiles."""
        body = self._body(req)
        data = body.get("data") if isinstance(body, dict) else None
        _profiles_within(body, MAX_JOB_PROFILES, _TOO_MANY_JOB_PROFILES)
        _schema_error(body, BULK_IMPORT_SCHEMA, "profile-bulk-import-job")
        items = data["attributes"]["profiles"]["data"]
        for i, item in enumerate(items):
            _check_profile_size(json_size(item), i)
        list_ids = [rel["id"] for rel in ((data.get("relationships") or {}).get("lists") or {}).get("data", [])]
        resources = [
            ProfileResource(item["type"], msgspec.convert(item["attributes"], ProfileAttributes), item.get("id", UNSET), item.get("meta", UNSET))
            for item in items
        ]
        return resources, items, list_ids

    def _start_time(self, acc: KAccount, created: float, total: int) -> float:
        """When a job submitted now starts processing, under switch ``klaviyo_jobs_in_progress`` (jobs are FIFO:
        with a cap of N, it starts when the N-th last of the jobs still running ends); ``refuse_beyond_2`` answers
        429 while the cap is reached."""
        start = created + self.config.klaviyo_job_queue_seconds
        mode = self.config.behaviour["klaviyo_jobs_in_progress"]
        if mode == "unlimited":
            return start
        cap, speed = 2, self.config.klaviyo_profiles_per_second
        ends = sorted(j.start_at + j.total / speed for j in acc.jobs.values() if j.start_at + j.total / speed > created)
        if len(ends) < cap:
            return start
        if mode == "refuse_beyond_2":
            raise ApiError(self.throttled(max(1, math.ceil(ends[len(ends) - cap] - created))))
        return max(start, ends[len(ends) - cap])

    def get_jobs(self, req: ApiRequest) -> ApiResponse:
        jobs = list(req.account.jobs.values())
        flt = self._filter(req, {"status"})
        if flt:
            jobs = [j for j in jobs if j.status in flt[1]]
        sort = req.arg("sort")
        if sort not in (None, "created_at", "-created_at"):
            raise invalid(f"'{sort}' is not a valid sort field.", "/data/")
        jobs.sort(key=lambda j: j.created, reverse=sort == "-created_at")
        page, links = self._page(req, jobs, 20, 100)
        return self._ok(200, {"data": [self._job_resource(req, j) for j in page], "links": links})

    def get_job(self, req: ApiRequest) -> ApiResponse:
        acc: KAccount = req.account
        job = self._job_or_404(acc, req.path_params["job_id"])
        body: dict[str, Any] = {"data": self._job_resource(req, job), "links": {"self": req.url()}}
        if "lists" in (req.arg("include") or ""):
            body["included"] = [self._list_resource(req, acc.lists[lid]) for lid in job.list_ids if lid in acc.lists]
        return self._ok(200, body)

    def get_job_errors(self, req: ApiRequest) -> ApiResponse:
        job = self._job_or_404(req.account, req.path_params["id"])
        page, links = self._page(req, job.errors, 20, 100)
        data = [
            {"type": "import-error", "id": e.id, "attributes": self._sparse(req, "import-error", {
                "code": e.code, "title": e.title, "detail": e.detail, "source": {"pointer": e.pointer},
                "original_payload": e.original_payload})}
            for e in page
        ]
        return self._ok(200, {"data": data, "links": links})

    def get_job_profiles(self, req: ApiRequest) -> ApiResponse:
        acc: KAccount = req.account
        job = self._job_or_404(acc, req.path_params["id"])
        page, links = self._page(req, list(job.profile_ids), 20, 100)
        return self._ok(200, {"data": [self._profile_resource(req, acc.profiles[pid]) for pid in page], "links": links})

    def get_job_profile_ids(self, req: ApiRequest) -> ApiResponse:
        job = self._job_or_404(req.account, req.path_params["id"])
        page, links = self._page(req, list(job.profile_ids), 20, 100)
        return self._ok(200, {"data": [{"type": "profile", "id": pid} for pid in page], "links": links})

    def get_job_lists(self, req: ApiRequest) -> ApiResponse:
        acc: KAccount = req.account
        job = self._job_or_404(acc, req.path_params["id"])
        data = [self._list_resource(req, acc.lists[lid]) for lid in job.list_ids if lid in acc.lists]
        return self._ok(200, {"data": data, "links": {"self": req.url()}})

    def get_job_list_ids(self, req: ApiRequest) -> ApiResponse:
        job = self._job_or_404(req.account, req.path_params["id"])
        return self._ok(200, {"data": [{"type": "list", "id": lid} for lid in job.list_ids], "links": {"self": req.url()}})

    # --- handlers: consent ----------------------------------------------------------

    def bulk_subscribe(self, req: ApiRequest) -> ApiResponse:
        """Bulk Subscribe Profiles: email marketing consent (see the module docstring for what is a guess)."""
        acc: KAccount = req.account
        body = self._body(req)
        data = body.get("data") if isinstance(body, dict) else None
        profiles = _profiles_within(body, MAX_SUBSCRIBE_PROFILES, "At most {cap} profiles can be subscribed per request.")
        for i, item in enumerate((profiles or {}).get("data") or [] if isinstance(profiles, dict) else []):
            channels = ((item or {}).get("attributes") or {}).get("subscriptions") if isinstance(item, dict) else None
            for channel in channels or {} if isinstance(channels, dict) else {}:
                if channel != "email":
                    raise invalid(f"The sandbox models the email channel only, not '{channel}'.",
                                  f"/data/attributes/profiles/data/{i}/attributes/subscriptions/{channel}")
        _schema_error(body, SUBSCRIBE_JOB_SCHEMA, "profile-subscription-bulk-create-job")
        historical = data["attributes"].get("historical_import") is True
        now = self.clock()
        items = data["attributes"]["profiles"]["data"]
        for i, item in enumerate(items):
            attrs, pointer = item["attributes"], f"/data/attributes/profiles/data/{i}/attributes"
            marketing = (attrs["subscriptions"].get("email") or {}).get("marketing")
            if marketing is None:
                raise invalid("'subscriptions.email.marketing' is required to subscribe to the email channel.", pointer + "/subscriptions")
            if not isinstance(attrs.get("email"), str) or not is_valid_email(attrs["email"]):
                raise invalid("An email subscription needs a valid 'email'.", pointer + "/email")
            consented_at = marketing.get("consented_at")
            at = pointer + "/subscriptions/email/marketing/consented_at"
            if consented_at is not None and not historical:
                raise invalid("'consented_at' can only be provided with 'historical_import' set to true.", at)
            if historical:
                when = _parse_time(consented_at)
                if when is None or when >= now:
                    raise invalid("With 'historical_import', 'consented_at' is required and must be in the past.", at)
        list_rel = (data.get("relationships") or {}).get("list")
        list_id = list_rel["data"]["id"] if list_rel else None
        if list_id is not None and list_id not in acc.lists:
            raise invalid(f"A list with id {list_id} does not exist.", "/data/relationships/list/data/id")
        source = data["attributes"].get("custom_source")
        for item in items:
            attrs = item["attributes"]
            profile, _ = self._upsert(acc, ProfileAttributes(email=attrs["email"]), item.get("id"), None)
            consented_at = attrs["subscriptions"]["email"]["marketing"].get("consented_at")
            if list_id is not None and self._double_opt_in():
                # A confirmation is sent; nothing changes until the profile confirms (POST /_sandbox/klaviyo/confirm).
                profile.consent_pending = {"list_id": list_id, "source": source, "consented_at": consented_at}
                continue
            self._subscribe(acc, profile, list_id, source, consented_at or iso_now(now))
        return ApiResponse(202, None, CONTENT_TYPE)

    def _double_opt_in(self) -> bool:
        return self.config.behaviour["klaviyo_list_opt_in"] == "double"

    @staticmethod
    def _subscribe(acc: KAccount, profile: Profile, list_id: Optional[str], source: Any, when: str) -> None:
        profile.consent_pending = None
        profile.suppressed = False  # the spec: subscribing removes UNSUBSCRIBE/SPAM_REPORT/USER_SUPPRESSED
        profile.consent = "SUBSCRIBED"
        profile.consent_timestamp = when
        profile.consent_source = source
        if list_id is not None:
            acc.lists[list_id].join(profile.id, when)

    def confirm(self, email: str, account_id: Optional[str] = None) -> dict[str, Any]:
        """The profile clicks the double opt-in confirmation: its pending subscription takes effect."""
        with self.lock:
            acc = self._account(account_id)
            pid = acc.by_email.get(email.lower())
            pending = acc.profiles[pid].consent_pending if pid else None
            if pending is None:
                raise KeyError(f"unknown pending confirmation for {email!r}")
            profile = acc.profiles[pid]
            when = pending["consented_at"] or iso_now(self.clock())
            self._subscribe(acc, profile, pending["list_id"] if pending["list_id"] in acc.lists else None, pending["source"], when)
            return {"id": pid, "consent": profile.consent}

    # --- data privacy: profile deletion ----------------------------------------------

    def request_deletion(self, req: ApiRequest) -> ApiResponse:
        """Request Profile Deletion (see the module docstring: one identifier, 202, asynchronous)."""
        acc: KAccount = req.account
        body = self._body(req)
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, dict):
            raise invalid("'data' is a required field.", "/data")
        if data.get("type") != "data-privacy-deletion-job":
            raise invalid(f"'{data.get('type')}' is not a valid resource type for this endpoint; expected "
                          "'data-privacy-deletion-job'.", "/data/type")
        attributes = data.get("attributes")
        profile = ((attributes or {}).get("profile") or {}).get("data") if isinstance(attributes, dict) else None
        pointer = "/data/attributes/profile/data"
        if not isinstance(profile, dict) or profile.get("type") != "profile":
            raise invalid("'profile' must be a profile resource.", pointer)
        attrs = profile.get("attributes")
        if not isinstance(attrs, dict):
            raise invalid("'attributes' is a required field.", pointer + "/attributes")
        unknown = set(attrs) - {"email", "phone_number"}
        if unknown:
            raise invalid(f"'{sorted(unknown)[0]}' is not a valid field for the resource 'profile'.", pointer + "/attributes")
        given = [(k, v) for k, v in (("id", profile.get("id")), ("email", attrs.get("email")),
                                     ("phone_number", attrs.get("phone_number"))) if v is not None]
        if len(given) != 1:
            raise invalid("Exactly one of 'id', 'email' or 'phone_number' must be provided"
                          f" (got {len(given)}).", pointer)
        kind, value = given[0]
        if not isinstance(value, str) or (kind == "email" and not is_valid_email(value)) or (
                kind == "phone_number" and not _phone_ok(value)):
            raise invalid(f"Invalid {kind}.", pointer + ("" if kind == "id" else f"/attributes/{kind}"))
        deletion = Deletion(kind, value, self.clock())
        acc.deletions.append(deletion)
        if self.config.behaviour["klaviyo_profile_deletion"] == "immediate":
            self._delete(acc, deletion, deletion.requested)
        return ApiResponse(202, None, CONTENT_TYPE)

    def _carry_out_deletions(self, now: float) -> None:
        """Deferred deletions whose time has come (``latency.klaviyo_deletion`` after their request)."""
        delay = self.config.latency_for("klaviyo_deletion")
        with self.lock:
            for acc in self.accounts.values():
                for deletion in acc.deletions:
                    if deletion.done is None and now >= deletion.requested + delay:
                        self._delete(acc, deletion, now)

    @staticmethod
    def _delete(acc: KAccount, deletion: Deletion, now: float) -> None:
        """Every profile the identifier matches leaves every list and the store (and its identifier indexes)."""
        if deletion.kind == "id":
            matched = [deletion.value] if deletion.value in acc.profiles else []
        else:
            index = acc.by_email if deletion.kind == "email" else acc.by_phone
            pid = index.get(deletion.value.lower() if deletion.kind == "email" else deletion.value)
            matched = [pid] if pid else []
        for pid in matched:
            profile = acc.profiles.pop(pid)
            for lst in acc.lists.values():
                lst.profile_ids.pop(pid, None)
            for index, value in ((acc.by_email, (profile.email or "").lower()),
                                 (acc.by_phone, profile.phone_number),
                                 (acc.by_external_id, profile.external_id)):
                if value and index.get(value) == pid:
                    del index[value]
        deletion.done, deletion.deleted = now, len(matched)

    # --- handlers: single profile ----------------------------------------------------

    def profile_import(self, req: ApiRequest) -> ApiResponse:
        acc: KAccount = req.account
        if len(req.body) > MAX_PROFILE_BYTES:
            raise ApiError(
                error_response(413, "request_too_large", "Request entity too large.", f"The payload is {len(req.body)} bytes; the maximum is 100KB ({MAX_PROFILE_BYTES} bytes).")
            )
        body = self._body(req)
        _schema_error(body, PROFILE_IMPORT_SCHEMA, "profile")
        data = body["data"]
        attrs = msgspec.convert(data["attributes"], ProfileAttributes)  # the schema above admits only its fields
        problem = check_profile(attrs)
        if problem:
            fld, detail = problem
            raise invalid(detail, "/data/attributes" + (f"/{fld}" if fld else ""))
        profile, created = self._upsert(acc, attrs, data.get("id"), data.get("meta"))
        return self._ok(201 if created else 200, {"data": self._profile_resource(req, profile), "links": {"self": req.url()}})

    # --- state -----------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        self.advance()
        with self.lock:
            accounts = {}
            for acc in self.accounts.values():
                accounts[acc.account_id] = {
                    "lists": {lst.id: {"name": lst.name, "profile_ids": list(lst.profile_ids)} for lst in acc.lists.values()},
                    "profiles": {pid: _profile_state(p) for pid, p in acc.profiles.items()},
                    "jobs": {
                        job.id: {
                            "status": job.status,
                            "total_count": job.total,
                            "completed_count": self._completed_count(job),
                            "failed_count": job.failed_count,
                            "list_ids": list(job.list_ids),
                            "profile_ids": list(job.profile_ids),
                            "errors": [{"code": e.code, "detail": e.detail, "pointer": e.pointer} for e in job.errors],
                            "created_at": iso_now(job.created, micro=True),
                        }
                        for job in acc.jobs.values()
                    },
                    # never the address: what kind of identifier, and whether it was carried out
                    "deletions": [{"identifier": d.kind, "status": "done" if d.done is not None else "pending",
                                   "deleted": d.deleted} for d in acc.deletions],
                }
            return {"accounts": accounts}


def _profile_state(profile: Profile) -> dict[str, Any]:
    """A profile as ``state()`` shows it: every stored field but the id, dicts copied (empty ones as ``{}``)."""
    shown = {k: getattr(profile, k) for k in _STATE_FIELDS}
    for key, value in shown.items():
        if isinstance(value, dict):
            shown[key] = dict(value)
    shown["location"] = shown["location"] or {}
    shown["properties"] = shown["properties"] or {}
    return shown
