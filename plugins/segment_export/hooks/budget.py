"""One rate budget per API key, shared by every export on every worker, kept in Redis.

Without it each export paces itself as if it were alone (``hooks.base.RateLimiter``, ``AdaptiveConcurrency``):
four exports sharing a Klaviyo key send four times the documented rate and are refused (429), four sharing a
Mailchimp key open 40 connections where Mailchimp allows 10. With a Redis connection named (the destination
connection's extra ``rate_budget_conn_id``, or ``[segment_export] rate_budget_conn_id`` for the deployment),
every request first draws from the budget of its API key:

- **rate limits** (Klaviyo's per-endpoint burst and steady limits, declared by the destination's hook as
  ``rate_limits``): a two-window limiter per key and endpoint, taken atomically by a Lua script on Redis's own
  clock (``TIME``), so the workers' clocks do not matter. Klaviyo counts in fixed windows of one second and one
  minute (reference README: "per-account fixed-window rate limits per endpoint"): bulk import jobs may send 10 a
  second until 150 are spent in the minute. A request *reserves* a time to be sent: the script keeps the times it
  granted (a sorted set per key and endpoint, trimmed of those older than a window) and grants the earliest time,
  no earlier than the last one granted (first asked, first served, no polling), at which every **sliding** window
  of ``second`` seconds holds at most ``burst`` grants, the new one included, and every one of ``minute`` seconds
  at most ``steady``; the caller is told how long to wait. Why sliding: Klaviyo's windows are fixed but how they
  line up with Redis's clock is unknown, and windows fixed on Redis's clock could put 2 x 10 requests into one of
  Klaviyo's seconds (10 at the end of one Redis second, 10 at the start of the next); fixed windows would be safe
  only at half the limits (5/s, 75/min). A sliding window bounds *every* interval, so every fixed window, whatever
  its alignment, at the full count. The headroom (``RATE_SHARE``, 0.95) stretches the windows rather than cutting
  the counts: ``second`` = 1 / 0.95 = 1.053 s and ``minute`` = 60 / 0.95 = 63.2 s, so the limiter uses 95 % of
  both rates (also for small limits, 1/s or 3/s, where 95 % of the count would round down to much less) and an
  interval of 1 s holds at most ``burst`` requests as long as the delays between grant and arrival at Klaviyo
  differ by at most 52 ms, one of 60 s at most ``steady`` as long as they differ by at most 3.1 s. Bulk import
  jobs (10/s, 150/min): 150 requests asked at once are granted 10 every 1.053 s, all within 14.7 s of the first
  (measured: 14.7 s), the 151st 63.2 s after the first; in the long run 9.5 a second and 142.5 a minute. (The
  token bucket this replaces had to keep every 1 s window within 10 and every 60 s within 150 from one depth and
  refill: 7 at once, then 2.4 a second, the 150th at 60 s.) A 429's ``Retry-After`` holds the endpoint for every
  worker until then; Klaviyo's ``RateLimit-Remaining`` / ``RateLimit-Reset`` headers (on every answer, for its
  steady window) cap it: at most ``remaining`` more grants before the reset, less those already granted for that
  time (requests sent but not yet counted by Klaviyo are not: the windows still bound them), the newest answer
  replacing the cap (another app using the same key shows there); none left holds until the reset;
- **a connection cap** (Mailchimp's 10 simultaneous connections per key, declared as ``connections_per_key``):
  a distributed semaphore, a sorted set of slot holders scored by their expiry time. A holder renews its slots
  while its requests run (a thread per process, every third of ``slot_ttl``); the slots of a worker that died
  expire after ``slot_ttl`` seconds and are taken by the others.

Redis keys are ``<prefix>:<destination>:<key id>:...`` where the key id is a hash of the API key: the key itself
is never in Redis, in a log or in an error. If Redis stops answering mid-run, the hook logs it once and falls
back to per-process pacing (the export slows down or meets 429s, which it retries, rather than failing).
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Mapping

#: the share of each documented rate (burst and steady) the budget uses, by stretching its windows to
#: 1 / RATE_SHARE and 60 / RATE_SHARE seconds: headroom for the delay between grant and arrival (see the module)
RATE_SHARE = 0.95
#: Redis key prefix (a deployment sharing a Redis with others may set another in the Redis connection's extra)
DEFAULT_PREFIX = "segment_export:budget"
#: how long a Mailchimp connection slot lives without renewal: a dead worker's slots are free after this
DEFAULT_SLOT_TTL = 30.0
#: the Airflow configuration option (``AIRFLOW__SEGMENT_EXPORT__RATE_BUDGET_CONN_ID``) naming the Redis connection
CONFIG_SECTION, CONFIG_OPTION = "segment_export", "rate_budget_conn_id"
#: the destination connection's extra naming the Redis connection (wins over the configuration)
EXTRA_FIELD = "rate_budget_conn_id"

# KEYS[1]: a sorted set of the granted send times (score: Redis time; member: unique), KEYS[2]: a hash of what
# the destination said {hold, cap_until, cap_left}. Every constraint on the new time ``at`` is a lower bound, so
# the earliest time is their maximum: now; the hold; the last time granted (FIFO, and so the new time is the
# latest of the set: the windows to check are the ones ending at it); the burst-th latest grant + ``second``
# (then (at - second, at] holds burst - 1 earlier grants at most); the steady-th latest + ``minute``. A cap
# (``cap_left`` grants until ``cap_until``) then takes one, or, none left, moves ``at`` to its end (later only
# loosens the windows). Times are written with '%.6f' rounded up: Lua's tostring keeps 14 digits (0.1 ms here).
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local burst, steady = tonumber(ARGV[1]), tonumber(ARGV[2])
local second, minute = tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.6f', now - minute - 0.001))
local h = redis.call('HMGET', KEYS[2], 'hold', 'cap_until', 'cap_left')
local at = math.max(now, tonumber(h[1]) or 0)
local function nth_latest(n)
  local r = redis.call('ZREVRANGE', KEYS[1], n - 1, n - 1, 'WITHSCORES')
  return tonumber(r[2])
end
local last = nth_latest(1)
if last then at = math.max(at, last) end
local b = nth_latest(burst)
if b then at = math.max(at, b + second) end
local s = nth_latest(steady)
if s then at = math.max(at, s + minute) end
local cap_until, cap_left = tonumber(h[2]) or 0, tonumber(h[3]) or 0
if at < cap_until then
  if cap_left >= 1 then redis.call('HSET', KEYS[2], 'cap_left', tostring(cap_left - 1)) else at = cap_until end
end
at = math.ceil(at * 1000000) / 1000000
redis.call('ZADD', KEYS[1], string.format('%.6f', at), ARGV[5])
redis.call('EXPIRE', KEYS[1], math.ceil(at - now + minute) + 1)
return string.format('%.6f', math.max(0, at - now))
"""

# What the destination said: ``remaining`` more requests (its count, so our grants still to be sent for that
# time are taken off) before its window resets in ``reset`` seconds (no reset given: ``second``), 0 remaining
# holding until then; ``retry_after``: hold for that long (a 429's answer). Returns the hold (Redis time).
_OBSERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local remaining, reset, retry_after, second = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local h = redis.call('HMGET', KEYS[2], 'hold', 'cap_until', 'cap_left')
local hold = tonumber(h[1]) or 0
local cap_until, cap_left = tonumber(h[2]) or 0, tonumber(h[3]) or 0
if remaining >= 0 then
  if reset <= 0 then reset = second end
  cap_until = now + reset
  local queued = redis.call('ZCOUNT', KEYS[1], string.format('(%.6f', now), string.format('(%.6f', cap_until))
  cap_left = math.max(0, math.floor(remaining) - queued)
  if remaining < 1 then hold = math.max(hold, cap_until) end
end
if retry_after > 0 then hold = math.max(hold, now + retry_after) end
redis.call('HSET', KEYS[2], 'hold', string.format('%.6f', hold), 'cap_until', string.format('%.6f', cap_until),
           'cap_left', tostring(cap_left))
redis.call('EXPIRE', KEYS[2], math.max(1, math.ceil(math.max(hold, cap_until) - now) + 1))
return string.format('%.6f', hold)
"""

# The connection semaphore: a sorted set of holder -> expiry (Redis time). Expired holders are dropped first.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local limit, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[3])
  redis.call('EXPIRE', KEYS[1], math.ceil(ttl) * 2 + 1)
  return 1
end
return 0
"""

_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ttl = tonumber(ARGV[1])
local kept = 0
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], now + ttl, ARGV[i]); kept = kept + 1
  end
end
redis.call('EXPIRE', KEYS[1], math.ceil(ttl) * 2 + 1)
return kept
"""


def key_id(destination: str, api_key: str) -> str:
    """The name of a key's budget: a hash of the destination and the key (the key itself is never stored)."""
    return hashlib.sha256(f"{destination}\0{api_key}".encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Windows:
    """The two sliding windows of one endpoint's limit (see the module): at most ``burst`` grants in any
    ``second`` seconds and ``steady`` in any ``minute`` seconds, the windows stretched by :data:`RATE_SHARE`."""

    burst: int
    steady: int
    second: float
    minute: float

    @classmethod
    def for_limits(cls, burst: int, steady: int) -> Windows:
        return cls(max(1, int(burst)), max(1, int(steady)), 1.0 / RATE_SHARE, 60.0 / RATE_SHARE)


def redis_client(connection: Any) -> Any:
    """A redis-py client for an Airflow connection of type ``redis``: host, port, login/password, ``db`` (the
    extra, or the schema, as ``redis://host:6379/0`` gives it) and ``ssl`` from the extra."""
    import redis

    extra = connection.extra_dejson
    db = extra.get("db")
    if db is None and str(connection.schema or "").isdigit():
        db = int(connection.schema)
    return redis.Redis(
        host=connection.host or "127.0.0.1", port=int(connection.port or 6379), db=int(db or 0),
        username=connection.login or None, password=connection.password or None,
        ssl=bool(extra.get("ssl", False)), socket_timeout=float(extra.get("socket_timeout", 5.0)),
        socket_connect_timeout=float(extra.get("socket_timeout", 5.0)), health_check_interval=30,
    )


class RateBudget:
    """The shared budget of one API key at one destination: its endpoints' windows and its connection slots.

    ``limits`` are the destination's documented ``(burst per second, steady per minute)`` per endpoint key;
    ``connections`` its simultaneous connection cap per key (``None``: none)."""

    def __init__(self, client: Any, destination: str, api_key: str, limits: Mapping[str, tuple[int, int]],
                 connections: int | None = None, *, prefix: str = DEFAULT_PREFIX, slot_ttl: float = DEFAULT_SLOT_TTL):
        self.client = client
        self.name = f"{prefix}:{destination}:{key_id(destination, api_key)}"
        self.windows = {key: Windows.for_limits(*value) for key, value in limits.items()}
        self.connections = connections
        self.slot_ttl = float(slot_ttl)
        self._reserve = client.register_script(_RESERVE)
        self._observe = client.register_script(_OBSERVE)
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._held: set[str] = set()
        self._held_lock = threading.Lock()
        self._renewer: threading.Thread | None = None
        self._holder = f"{os.getpid()}:{uuid.uuid4().hex[:12]}"

    def __repr__(self) -> str:  # the name carries a hash only, never the key
        return f"RateBudget({self.name!r})"

    # -- rate limits --------------------------------------------------------------------------------------
    def granted_key(self, limit_key: str) -> str:
        """The sorted set of the endpoint's granted send times."""
        return f"{self.name}:rate:{limit_key}"

    def observed_key(self, limit_key: str) -> str:
        """The hash of what the destination said of the endpoint's limit (hold, cap)."""
        return f"{self.name}:rate:{limit_key}:observed"

    def paces(self, limit_key: str | None) -> bool:
        return limit_key is not None and limit_key in self.windows

    def reserve(self, limit_key: str) -> float:
        """Reserve a send time in the endpoint's windows; the seconds to wait before sending (0: send now)."""
        w = self.windows[limit_key]
        wait = self._reserve(keys=[self.granted_key(limit_key), self.observed_key(limit_key)],
                             args=[w.burst, w.steady, w.second, w.minute, uuid.uuid4().hex])
        return float(wait)

    def observe(self, limit_key: str, headers: Mapping[str, str], retry_after: float | None = None) -> None:
        """Tell the endpoint's limiter what an answer said: ``RateLimit-Remaining``/``-Reset`` and a 429's
        ``Retry-After``."""
        w = self.windows[limit_key]
        remaining = _number(headers.get("RateLimit-Remaining"))
        reset = _number(headers.get("RateLimit-Reset"))
        if remaining is None and not retry_after:
            return
        self._observe(keys=[self.granted_key(limit_key), self.observed_key(limit_key)], args=[
            -1 if remaining is None else remaining, reset or 0, retry_after or 0, w.second,
        ])

    # -- connection slots ----------------------------------------------------------------------------------
    @property
    def slots_key(self) -> str:
        return f"{self.name}:connections"

    def try_acquire_slot(self) -> str | None:
        """A slot's token if one of the key's ``connections`` is free now, else None."""
        token = f"{self._holder}:{uuid.uuid4().hex[:8]}"
        if not self._acquire(keys=[self.slots_key], args=[self.connections, self.slot_ttl, token]):
            return None
        with self._held_lock:
            self._held.add(token)
            if self._renewer is None or not self._renewer.is_alive():
                self._renewer = threading.Thread(target=self._renew_held, name="rate-budget-renew", daemon=True)
                self._renewer.start()
        return token

    def acquire_slot(self) -> str:
        """Wait for one of the key's connections; polls with a short, jittered backoff (a slot frees when a
        request ends, in well under a second on Mailchimp's batch calls)."""
        delay = 0.01
        while (token := self.try_acquire_slot()) is None:
            time.sleep(delay * (0.5 + _jitter()))
            delay = min(0.2, delay * 1.5)
        return token

    def release_slot(self, token: str) -> None:
        with self._held_lock:
            self._held.discard(token)
        self.client.zrem(self.slots_key, token)

    def slots_in_use(self) -> int:
        """Slots held now (expired ones excluded), for tests and the log."""
        return int(self.client.zcount(self.slots_key, f"({self._redis_now()}", "+inf"))

    def _renew_held(self) -> None:
        """Push the expiry of this process's held slots forward, every third of their lifetime, while any is held."""
        while True:
            time.sleep(self.slot_ttl / 3)
            with self._held_lock:
                held = sorted(self._held)
                if not held:
                    self._renewer = None
                    return
            try:
                self._renew(keys=[self.slots_key], args=[self.slot_ttl, *held])
            except Exception:  # noqa: BLE001 - Redis away: the slots expire, the requests go on
                pass

    def _redis_now(self) -> float:
        seconds, micros = self.client.time()
        return seconds + micros / 1e6


def configured_conn_id(connection: Any) -> str | None:
    """The Redis connection of a destination connection's budget: its extra ``rate_budget_conn_id`` when set,
    else the deployment's ``[segment_export] rate_budget_conn_id``; None: no budget, per-process pacing.

    An empty extra (what the connection form saves for a field left blank) means the deployment's setting."""
    value = str(connection.extra_dejson.get(EXTRA_FIELD) or "").strip()
    if value:
        return value
    value = os.environ.get(f"AIRFLOW__{CONFIG_SECTION.upper()}__{CONFIG_OPTION.upper()}")
    if value is None:
        try:
            from airflow.sdk.configuration import conf

            value = conf.get(CONFIG_SECTION, CONFIG_OPTION, fallback=None)
        except Exception:  # noqa: BLE001 - no configuration to read (a plain script): no deployment default
            value = None
    return (value or "").strip() or None


_clients: dict[str, Any] = {}
_clients_lock = threading.Lock()


def budget_for(connection: Any, destination: str, api_key: str, limits: Mapping[str, tuple[int, int]],
               connections: int | None) -> RateBudget | None:
    """The budget a destination connection draws from, or None without a Redis connection configured.

    The Redis client is one per Redis connection and process (its pool is shared by the sender threads)."""
    conn_id = configured_conn_id(connection)
    if conn_id is None or (not limits and not connections):
        return None
    from airflow.sdk import BaseHook

    redis_conn = BaseHook.get_connection(conn_id)
    with _clients_lock:
        client = _clients.get(conn_id)
        if client is None:
            client = _clients[conn_id] = redis_client(redis_conn)
    extra = redis_conn.extra_dejson
    return RateBudget(client, destination, api_key, limits, connections,
                      prefix=str(extra.get("key_prefix") or DEFAULT_PREFIX),
                      slot_ttl=float(extra.get("slot_ttl") or DEFAULT_SLOT_TTL))


def _number(value: Any) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _jitter() -> float:
    import random

    return random.random()
