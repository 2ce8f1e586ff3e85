"""One rate budget per API key, shared by every export on every worker, kept in Redis.

Without it each export paces itself as if it were alone (``hooks.base.RateLimiter``, ``AdaptiveConcurrency``):
four exports sharing a Klaviyo key send four times the documented rate and are refused (429), four sharing a
Mailchimp key open 40 connections where Mailchimp allows 10. With a Redis connection named (the destination
connection's extra ``rate_budget_conn_id``, or ``[segment_export] rate_budget_conn_id`` for the deployment),
every request first draws from the budget of its API key:

- **rate limits** (Klaviyo's per-endpoint burst and steady limits, declared by the destination's hook as
  ``rate_limits``): one token bucket per key and endpoint, taken atomically by a Lua script on Redis's own
  clock (``TIME``), so the workers' clocks do not matter. Klaviyo counts in fixed windows of one second and one
  minute (reference README: "per-account fixed-window rate limits per endpoint"), so the bucket's depth and
  refill are chosen such that no interval of 1 s holds more than the burst and none of 60 s more than the steady
  count: ``depth + refill * 1 s <= burst`` and ``depth + refill * 60 s <= steady``, with the refill at
  ``STEADY_SHARE`` of the steady rate. A token is *reserved*: the bucket may go below zero, and the caller is
  told how long to wait before sending, so waiting workers are served in the order they asked, without polling.
  An answer's ``Retry-After`` holds the bucket for every worker; Klaviyo's ``RateLimit-Remaining`` /
  ``RateLimit-Reset`` headers, when an answer carries them, cap it (another app using the same key shows there);
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

from segment_export.settings import setting

#: the refill of a bucket, as a share of the documented steady rate: headroom for clock skew and network jitter
STEADY_SHARE = 0.95
#: Redis key prefix (a deployment sharing a Redis with others may set another in the Redis connection's extra)
DEFAULT_PREFIX = "segment_export:budget"
#: how long a Mailchimp connection slot lives without renewal: a dead worker's slots are free after this
DEFAULT_SLOT_TTL = 30.0
#: the Airflow configuration option (``AIRFLOW__SEGMENT_EXPORT__RATE_BUDGET_CONN_ID``) naming the Redis connection
CONFIG_OPTION = "rate_budget_conn_id"
#: the destination connection's extra naming the Redis connection (wins over the configuration)
EXTRA_FIELD = "rate_budget_conn_id"

# A bucket is a hash {tokens, at, hold}; ``at`` is when ``tokens`` was counted. Reserving takes one token even
# below zero and answers how long the caller waits before its token exists (FIFO between callers).
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local depth, refill, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local s = redis.call('HMGET', KEYS[1], 'tokens', 'at', 'hold')
local tokens = tonumber(s[1]) or depth
local at = tonumber(s[2]) or now
local hold = tonumber(s[3]) or 0
if now > at then tokens = math.min(depth, tokens + (now - at) * refill); at = now end
tokens = tokens - 1
local ready = at
if tokens < 0 then ready = at + (-tokens) / refill end
if hold > ready then ready = hold end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(at))
redis.call('EXPIRE', KEYS[1], ttl)
return tostring(math.max(0, ready - now))
"""

# Cap the bucket from what the destination says: ``remaining`` more requests before the window resets in
# ``reset`` seconds (0 remaining: hold until then); ``retry_after``: hold for that long (a 429's answer).
_OBSERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local depth, refill, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local remaining, reset, retry_after = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local s = redis.call('HMGET', KEYS[1], 'tokens', 'at', 'hold')
local tokens = tonumber(s[1]) or depth
local at = tonumber(s[2]) or now
local hold = tonumber(s[3]) or 0
if now > at then tokens = math.min(depth, tokens + (now - at) * refill); at = now end
if remaining >= 0 then
  if remaining == 0 and reset > 0 then hold = math.max(hold, now + reset) end
  tokens = math.min(tokens, remaining)
end
if retry_after > 0 then hold = math.max(hold, now + retry_after); tokens = math.min(tokens, 0) end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(at), 'hold', tostring(hold))
redis.call('EXPIRE', KEYS[1], ttl)
return tostring(hold)
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
class Bucket:
    """A token bucket that never lets a fixed 1-second window hold more than ``burst`` requests, nor a fixed
    60-second window more than ``steady`` (see the module): ``depth`` tokens at most, ``refill`` per second."""

    depth: float
    refill: float

    @classmethod
    def for_limits(cls, burst: int, steady: int) -> Bucket:
        refill = STEADY_SHARE * steady / 60.0
        depth = max(1.0, math.floor(min(burst - refill, steady - 60.0 * refill)))
        return cls(depth, refill)


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
    """The shared budget of one API key at one destination: its endpoints' buckets and its connection slots.

    ``limits`` are the destination's documented ``(burst per second, steady per minute)`` per endpoint key;
    ``connections`` its simultaneous connection cap per key (``None``: none)."""

    def __init__(self, client: Any, destination: str, api_key: str, limits: Mapping[str, tuple[int, int]],
                 connections: int | None = None, *, prefix: str = DEFAULT_PREFIX, slot_ttl: float = DEFAULT_SLOT_TTL):
        self.client = client
        self.name = f"{prefix}:{destination}:{key_id(destination, api_key)}"
        self.buckets = {key: Bucket.for_limits(*value) for key, value in limits.items()}
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
    def bucket_key(self, limit_key: str) -> str:
        return f"{self.name}:rate:{limit_key}"

    def paces(self, limit_key: str | None) -> bool:
        return limit_key is not None and limit_key in self.buckets

    def reserve(self, limit_key: str) -> float:
        """Take a token of the endpoint's bucket; the seconds to wait before sending (0: send now)."""
        bucket = self.buckets[limit_key]
        wait = self._reserve(keys=[self.bucket_key(limit_key)], args=[bucket.depth, bucket.refill, self._bucket_ttl(bucket)])
        return float(wait)

    def observe(self, limit_key: str, headers: Mapping[str, str], retry_after: float | None = None) -> None:
        """Tell the bucket what an answer said: ``RateLimit-Remaining``/``-Reset`` and a 429's ``Retry-After``."""
        bucket = self.buckets[limit_key]
        remaining = _number(headers.get("RateLimit-Remaining"))
        reset = _number(headers.get("RateLimit-Reset"))
        if remaining is None and not retry_after:
            return
        self._observe(keys=[self.bucket_key(limit_key)], args=[
            bucket.depth, bucket.refill, self._bucket_ttl(bucket),
            -1 if remaining is None else remaining, reset or 0, retry_after or 0,
        ])

    @staticmethod
    def _bucket_ttl(bucket: Bucket) -> int:
        """A bucket untouched for long enough to be full again is forgotten (it would read as full anyway)."""
        return int(math.ceil(bucket.depth / bucket.refill)) + 120

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
    value = setting(CONFIG_OPTION)
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
