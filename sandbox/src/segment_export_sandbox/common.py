"""Plumbing shared by both emulated APIs: request/response objects, routing,
JSON and schema helpers, ids, timestamps, the request log.

Why here: the brief for the sandbox is that Klaviyo and Mailchimp share no
copy-pasted code.  Each API module only holds that API's *behaviour*; anything
about HTTP shape (parsing bodies, matching paths, counting requests, validating a
body against a schema) is written once here and used by both.
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import json.encoder as _json_encoder
import math
import os
import random
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Optional
from urllib.parse import parse_qs, urlencode

import msgspec

JSON = Any

# --- requests and responses ------------------------------------------------------------


@dataclass
class ApiRequest:
    """An HTTP request as the API classes see it (no sockets, easy to build in tests)."""

    method: str
    path: str
    query: dict[str, list[str]] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)  # keys lower-cased
    body: bytes = b""
    base_url: str = "http://127.0.0.1"
    path_params: dict[str, str] = field(default_factory=dict)
    account: Any = None  # set by the API's authenticate()

    @classmethod
    def build(
        cls,
        method: str,
        target: str,
        headers: Optional[dict[str, str]] = None,
        body: bytes | str | JSON = b"",
        base_url: str = "http://127.0.0.1",
    ) -> "ApiRequest":
        """Convenience constructor for tests: ``target`` may carry a query string."""
        path, _, qs = target.partition("?")
        if not isinstance(body, (bytes, str)):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode()
        return cls(
            method=method.upper(),
            path=path,
            query=parse_qs(qs, keep_blank_values=True),
            headers={k.lower(): v for k, v in (headers or {}).items()},
            body=body,
            base_url=base_url,
        )

    def header(self, name: str) -> Optional[str]:
        return self.headers.get(name.lower())

    def arg(self, name: str) -> Optional[str]:
        """First value of a query parameter, or None."""
        values = self.query.get(name)
        return values[0] if values else None

    def url(self, path: Optional[str] = None, **query: str) -> str:
        """Absolute URL on this server (for JSON:API ``links``)."""
        url = self.base_url + (self.path if path is None else path)
        return url + ("?" + urlencode(query) if query else "")


@dataclass
class ApiResponse:
    status: int
    body: JSON = None
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)

    def encoded(self) -> bytes:
        if self.body is None:
            return b""
        if isinstance(self.body, bytes):  # a raw body (e.g. an injected HTML error page)
            return self.body
        return json.dumps(self.body, separators=(",", ":")).encode()


class ApiError(Exception):
    """Raised inside handlers to answer with an error response right away."""

    def __init__(self, response: ApiResponse):
        super().__init__(response.status)
        self.response = response


Handler = Callable[[ApiRequest], ApiResponse]


@dataclass
class Route:
    """One endpoint: ``template`` uses ``{name}`` placeholders for path segments.

    ``kind`` selects the latency knob; ``rate_limit`` is ``(burst per second,
    steady per minute)`` or None.
    """

    method: str
    template: str
    handler: Handler
    kind: str
    rate_limit: Optional[tuple[int, int]] = None
    regex: re.Pattern[str] = field(init=False)

    def __post_init__(self) -> None:
        pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(self.template))
        self.regex = re.compile("^" + pattern + "/?$")

    @property
    def name(self) -> str:
        return f"{self.method} {self.template}"


def match_route(routes: list[Route], method: str, path: str) -> tuple[Optional[Route], bool, dict[str, str]]:
    """Return (route, path_exists, params).  ``path_exists`` tells 405 from 404."""
    path_exists = False
    for route in routes:
        m = route.regex.match(path)
        if m:
            path_exists = True
            if route.method == method:
                return route, True, m.groupdict()
    return None, path_exists, {}


# --- JSON helpers ----------------------------------------------------------------------


class BodyError(ValueError):
    """The body is not a JSON document."""


_decode = msgspec.json.decode


def parse_json_body(body: bytes) -> JSON:
    """A request body as JSON values. msgspec's decoder, not ``json.loads``: an import job is 10,000 profiles and
    decoding it was a quarter of the sandbox's CPU (the benchmark's ``sbx cpu s``); the values are the same
    (dicts, lists, str, int, float, bool, None). A body ``json.loads`` alone would take (NaN, a lone surrogate)
    falls back to it, so nothing the sandbox accepted before is refused now."""
    if not body.strip():
        raise BodyError("empty body")
    try:
        return _decode(body)
    except msgspec.DecodeError:
        pass
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BodyError(str(exc)) from exc


_COMPACT_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_COMPACT = _COMPACT_ENCODER.encode


def _c_compact() -> Any:
    """JSONEncoder.encode builds a C encoder on every call; json_size runs per profile, so it keeps one, built
    with the arguments JSONEncoder.iterencode gives it (circular check on, allow_nan on).  None without the C
    accelerator."""
    if _json_encoder.c_make_encoder is None:
        return None
    return _json_encoder.c_make_encoder({}, _COMPACT_ENCODER.default, _json_encoder.encode_basestring, None, ":", ",", False, False, True)


_C_COMPACT = [_c_compact()]


def json_size(value: JSON) -> int:
    """Bytes of the compact JSON encoding (how size caps are measured)."""
    encoder = _C_COMPACT[0]
    if encoder is not None and not isinstance(value, str):
        try:
            text = "".join(encoder(value, 0))
        except Exception:  # its circular-reference marks may be left half-set: a fresh one, and the usual error
            _C_COMPACT[0] = _c_compact()
        else:
            return len(text) if text.isascii() else len(text.encode())  # ASCII: a byte a character
    return len(_COMPACT(value).encode())


def query_bool(value: Optional[str]) -> bool:
    return value is not None and value.lower() in ("true", "1", "yes")


def query_int(value: Optional[str], default: int) -> Optional[int]:
    """Parse an int query param; None means 'present but not an integer'."""
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        return None


# --- a small JSON-schema subset validator -------------------------------------------------


@dataclass
class SchemaViolation:
    """First problem found in a body: where (JSON pointer), what kind, which field."""

    pointer: str
    kind: str  # required | type | enum | additional | max_items | min_items | format
    field: str
    message: str
    value: Any = None


_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
}


def _conforms(value: Any, schema: dict[str, Any]) -> bool:
    """True exactly when :func:`validate_schema` finds no problem; the same rules without building pointers
    (a bulk import job body has 10,000 profiles: this runs for each, the detailed walk only on a bad body)."""
    if value is None:
        return bool(schema.get("nullable")) or not ("type" in schema or "oneOf" in schema)
    if "oneOf" in schema:
        return any(_conforms(value, alt) for alt in schema["oneOf"])
    expected = schema.get("type")
    if expected and not _TYPES[expected](value):
        return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    if isinstance(value, dict):
        for req in schema.get("required", ()):
            if req not in value:
                return False
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, sub in value.items():
            if key in props:
                if not _conforms(sub, props[key]):
                    return False
            elif extra is False:
                return False
            elif isinstance(extra, dict) and not _conforms(sub, extra):
                return False
    elif isinstance(value, list):
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            return False
        if "minItems" in schema and len(value) < schema["minItems"]:
            return False
        items = schema.get("items")
        if items is not None:
            for item in value:
                if not _conforms(item, items):
                    return False
    return True


_LEAF_CLASSES: dict[str, type] = {"string": str, "object": dict, "array": list, "boolean": bool}
_compiled_schemas: dict[int, tuple[dict[str, Any], Callable[[Any], bool]]] = {}


def _compile(schema: dict[str, Any]) -> Callable[[Any], bool]:
    """:func:`_conforms` for one schema as a closure: the schema's keys read once, not per value.

    An object's properties whose schema is a plain leaf (only ``type`` string/object/array/boolean, ``nullable``,
    ``enum``) are checked inline, without a call: a profile is mostly such fields.  Same answers as
    :func:`_conforms` (tests/sandbox/test_sandbox_schema.py compares the two on generated values).
    """
    null_ok = bool(schema.get("nullable")) or not ("type" in schema or "oneOf" in schema)
    if "oneOf" in schema:
        alternatives = [_compile(alt) for alt in schema["oneOf"]]

        def check_one_of(value: Any) -> bool:
            if value is None:
                return null_ok
            for alt in alternatives:
                if alt(value):
                    return True
            return False

        return check_one_of
    expected = schema.get("type")
    type_ok = _TYPES[expected] if expected else None
    enum = schema["enum"] if "enum" in schema else None
    has_enum = "enum" in schema
    required = tuple(schema.get("required", ()))
    leaves: dict[str, tuple[type, bool, Any]] = {}
    others: dict[str, Callable[[Any], bool]] = {}
    for key, sub in schema.get("properties", {}).items():
        if set(sub) <= {"type", "nullable", "enum"} and sub.get("type") in _LEAF_CLASSES:
            leaves[key] = (_LEAF_CLASSES[sub["type"]], bool(sub.get("nullable")), sub["enum"] if "enum" in sub else None)
        else:
            others[key] = _compile(sub)
    extra = schema.get("additionalProperties")
    extra_refused = extra is False
    extra_check = _compile(extra) if isinstance(extra, dict) else None
    max_items = schema.get("maxItems") if "maxItems" in schema else None
    min_items = schema.get("minItems") if "minItems" in schema else None
    has_max, has_min = "maxItems" in schema, "minItems" in schema
    items = schema.get("items")
    item_check = _compile(items) if items is not None else None

    def check(value: Any) -> bool:
        if value is None:
            return null_ok
        if type_ok is not None and not type_ok(value):
            return False
        if has_enum and value not in enum:
            return False
        if isinstance(value, dict):
            for req in required:
                if req not in value:
                    return False
            for key, sub in value.items():
                leaf = leaves.get(key)
                if leaf is not None:
                    if sub is None:
                        if not leaf[1]:
                            return False
                    elif not isinstance(sub, leaf[0]) or (leaf[2] is not None and sub not in leaf[2]):
                        return False
                    continue
                other = others.get(key)
                if other is not None:
                    if not other(sub):
                        return False
                elif extra_refused:
                    return False
                elif extra_check is not None and not extra_check(sub):
                    return False
        elif isinstance(value, list):
            if has_max and len(value) > max_items:
                return False
            if has_min and len(value) < min_items:
                return False
            if item_check is not None:
                for item in value:
                    if not item_check(item):
                        return False
        return True

    return check


def compiled_schema(schema: dict[str, Any]) -> Callable[[Any], bool]:
    """The compiled check of a schema, built on first use (request schemas are module constants)."""
    entry = _compiled_schemas.get(id(schema))
    if entry is None or entry[0] is not schema:
        entry = (schema, _compile(schema))
        _compiled_schemas[id(schema)] = entry
    return entry[1]


def validate_schema(value: Any, schema: dict[str, Any], pointer: str = "", name: str = "") -> Optional[SchemaViolation]:
    """Check ``value`` against a JSON-schema subset (type/nullable/enum/required/
    properties/additionalProperties/items/maxItems/minItems/oneOf-of-types).

    Both APIs describe their request bodies with this subset, taken from the
    official specs' request schemas, so a malformed body is refused with a pointer
    to the field instead of being half-processed.
    """
    if compiled_schema(schema)(value):  # the common case, cheaply; the walk below says where a bad body is wrong
        return None
    return _violation(value, schema, pointer, name)


def _violation(value: Any, schema: dict[str, Any], pointer: str = "", name: str = "") -> Optional[SchemaViolation]:
    if value is None:
        if schema.get("nullable"):
            return None
        if "type" in schema or "oneOf" in schema:
            return SchemaViolation(pointer or "/", "type", name, f"expected {schema.get('type', 'a value')}, got null")
        return None
    if "oneOf" in schema:
        if not any(_violation(value, alt, pointer, name) is None for alt in schema["oneOf"]):
            types = "/".join(alt.get("type", "?") for alt in schema["oneOf"])
            return SchemaViolation(pointer or "/", "type", name, f"expected {types}")
        return None
    expected = schema.get("type")
    if expected and not _TYPES[expected](value):
        return SchemaViolation(pointer or "/", "type", name, f"expected {expected}, got {type(value).__name__}", value)
    if "enum" in schema and value not in schema["enum"]:
        return SchemaViolation(pointer or "/", "enum", name, f"must be one of {schema['enum']}", value)
    if isinstance(value, dict):
        for req in schema.get("required", ()):
            if req not in value:
                return SchemaViolation(f"{pointer}/{req}", "required", req, f"'{req}' is required")
        props = schema.get("properties", {})
        for key, sub in value.items():
            if key in props:
                problem = _violation(sub, props[key], f"{pointer}/{key}", key)
                if problem:
                    return problem
            elif schema.get("additionalProperties") is False:
                return SchemaViolation(f"{pointer}/{key}", "additional", key, f"'{key}' is not allowed")
            elif isinstance(schema.get("additionalProperties"), dict):
                problem = _violation(sub, schema["additionalProperties"], f"{pointer}/{key}", key)
                if problem:
                    return problem
    if isinstance(value, list):
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            return SchemaViolation(pointer or "/", "max_items", name, f"at most {schema['maxItems']} items", len(value))
        if "minItems" in schema and len(value) < schema["minItems"]:
            return SchemaViolation(pointer or "/", "min_items", name, f"at least {schema['minItems']} items", len(value))
        if "items" in schema:
            for i, item in enumerate(value):
                problem = _violation(item, schema["items"], f"{pointer}/{i}", name)
                if problem:
                    return problem
    return None


# --- identifiers, emails, time -----------------------------------------------------------

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


_CROCKFORD_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]  # 10 bits -> 2 characters


_ulid_lock = threading.Lock()
_ulid_random = random.Random()  # ids need uniqueness and order, not secrecy: no os.urandom per profile
# [millisecond, its 10 time characters, 80-bit random part, its first 14 characters]
_ulid_state: list[Any] = [-1, "", 0, ""]


def new_ulid() -> str:
    """A 26-char ULID (time-ordered), the shape of Klaviyo profile and job ids (see :func:`new_ulids`)."""
    return new_ulids(1)[0]


def new_ulids(count: int) -> list[str]:
    """``count`` consecutive ULIDs of the current millisecond (time-ordered), the shape of Klaviyo profile and
    job ids; one clock read and one lock for the lot, as an import job stamps thousands of profiles at once.

    Monotonic as the ULID spec allows: the first id of a millisecond draws 79 random bits (the top one clear, so
    the increments below cannot overflow 80 bits), later ids of the same millisecond, or of an earlier one if the
    clock steps back, add 1 to the last random part.  The time characters are encoded once per millisecond and
    the random part's first 14 once per 1,024 ids.  ``count`` calls of :func:`new_ulid` in one millisecond give
    the same ids.
    """
    ms = int(time.time() * 1000)
    pairs = _CROCKFORD_PAIRS
    out: list[str] = []
    append = out.append
    with _ulid_lock:
        state = _ulid_state
        if ms > state[0]:
            rand = _ulid_random.getrandbits(79) - 1  # the loop adds 1 before the first id
            state[0], state[1] = ms, "".join([pairs[(ms >> shift) & 1023] for shift in (40, 30, 20, 10, 0)])
            state[3] = ""
        else:
            rand = state[2]
        head, middle = state[1], state[3]
        for _ in range(count):
            rand += 1
            low = rand & 1023
            if low == 0 or not middle:  # a new draw, or the increment carried out of the last two characters
                middle = "".join([pairs[(rand >> shift) & 1023] for shift in (70, 60, 50, 40, 30, 20, 10)])
            append(head + middle + pairs[low])
        state[2], state[3] = rand, middle
    return out


def new_uuid() -> str:
    return str(uuid.uuid4())


def new_hex(n: int) -> str:
    return os.urandom((n + 1) // 2).hex()[:n]


# Deliberately plain: one @, a dot in the domain, no spaces, sane length.  Both
# vendors refuse addresses like "not-an-email", "a@b", "x y@z.com".
_EMAIL_RE = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+$")


# A plainer shape that the rules below always accept (dot-separated atoms of common characters, alphanumeric
# domain labels, a top-level domain of letters): one match decides the usual address.
_PLAIN_EMAIL_RE = re.compile(r"[A-Za-z0-9_+-]+(?:\.[A-Za-z0-9_+-]+)*@[A-Za-z0-9]+(?:\.[A-Za-z0-9]+)*\.[A-Za-z]{2,}")


def is_valid_email(value: Any) -> bool:
    if type(value) is str and len(value) <= 254 and _PLAIN_EMAIL_RE.fullmatch(value):
        return True
    if not isinstance(value, str) or len(value) > 254 or ".." in value:
        return False
    if not _EMAIL_RE.match(value):
        return False
    tld = value.rsplit(".", 1)[-1]
    return len(tld) >= 2 and not tld.isdigit()


_last_second: list[Any] = [None, ""]  # (whole second, its text): profiles are stamped thousands per second


def iso_now(ts: Optional[float] = None, *, micro: bool = False) -> str:
    """ISO-8601 UTC with ``+00:00`` (both vendors' style)."""
    ts = time.time() if ts is None else ts
    if not micro:
        second = math.floor(ts)
        cached = _last_second
        if cached[0] != second:
            text = _dt.datetime.fromtimestamp(second, _dt.timezone.utc).isoformat(timespec="seconds")
            cached[:] = [second, text]
            return text
        return cached[1]
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat(timespec="microseconds")


def encode_cursor(offset: int) -> str:
    """Opaque page cursor (Klaviyo's cursors are opaque strings too)."""
    return base64.urlsafe_b64encode(f"o:{offset}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> Optional[int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    if not raw.startswith("o:") or not raw[2:].isdigit():
        return None
    return int(raw[2:])


# --- request log -------------------------------------------------------------------------


class RequestLog:
    """Counts requests per endpoint and status; tracks in-flight peaks per API.

    Tests and benchmarks read it through ``state()['requests']`` to prove e.g. that
    the exporter retried after a 429, or sent N batches.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._count = 0
            self._by_endpoint: dict[str, dict[str, Any]] = {}
            self._in_flight: dict[str, int] = {}
            self._max_in_flight: dict[str, int] = {}
            self._by_account: dict[str, dict[str, Any]] = {}

    # --- per API key (account): what the limits admitted and refused, for tests of a budget shared by exports ---

    def _account(self, api: str, account: str) -> dict[str, Any]:
        return self._by_account.setdefault(f"{api} {account}", {
            "refused": {}, "admitted": {}, "in_flight": 0, "max_in_flight": 0, "busy_seconds": 0.0,
            "first": None, "last": None,
        })

    def admit(self, api: str, account: str, endpoint: str) -> float:
        """A request of the account passed the limits (connection cap, rate windows); returns its start time."""
        now = time.time()
        with self._lock:
            acc = self._account(api, account)
            acc["in_flight"] += 1
            acc["max_in_flight"] = max(acc["max_in_flight"], acc["in_flight"])
            ep = acc["admitted"].setdefault(endpoint, {"count": 0, "first": now, "last": now})
            ep["count"] += 1
            ep["last"] = now
            acc["first"] = now if acc["first"] is None else acc["first"]
        return now

    def done(self, api: str, account: str, started: float) -> None:
        """An admitted request ended: its time counts as one connection busy (``busy_seconds``)."""
        now = time.time()
        with self._lock:
            acc = self._account(api, account)
            acc["in_flight"] -= 1
            acc["busy_seconds"] += now - started
            acc["last"] = now

    def refuse(self, api: str, account: str, endpoint: str) -> None:
        """A request of the account refused for going over its limit (not an injected fault)."""
        with self._lock:
            refused = self._account(api, account)["refused"]
            refused[endpoint] = refused.get(endpoint, 0) + 1

    def enter(self, api: str) -> None:
        with self._lock:
            n = self._in_flight.get(api, 0) + 1
            self._in_flight[api] = n
            self._max_in_flight[api] = max(n, self._max_in_flight.get(api, 0))

    def leave(self, api: str) -> None:
        with self._lock:
            self._in_flight[api] = self._in_flight.get(api, 1) - 1

    def record(self, endpoint: str, status: int) -> None:
        with self._lock:
            self._count += 1
            entry = self._by_endpoint.setdefault(endpoint, {"count": 0, "status": {}})
            entry["count"] += 1
            entry["status"][str(status)] = entry["status"].get(str(status), 0) + 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "count": self._count,
                "by_endpoint": {k: {"count": v["count"], "status": dict(v["status"])} for k, v in sorted(self._by_endpoint.items())},
                "max_in_flight": dict(self._max_in_flight),
                "by_account": {
                    k: {**v, "refused": dict(v["refused"]), "admitted": {e: dict(c) for e, c in v["admitted"].items()}}
                    for k, v in sorted(self._by_account.items())
                },
            }
