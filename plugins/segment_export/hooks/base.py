"""What the Klaviyo and Mailchimp hooks share: connection to request settings, retries, pacing, error messages.

The hooks are ``BaseHook`` subclasses that build and own their HTTP clients (as the Fivetran provider does),
so nothing here depends on another provider's private methods. What a request *is* lives in one place,
:class:`DestinationApi`, shared by the synchronous hooks (``requests``, in the task) and the asynchronous ones
(``aiohttp``, on the triggerer):

- :class:`RequestSettings` from the Airflow connection: the base URL (the connection's host, or the
  destination's default), the auth headers or basic auth, the timeout and transport options from the
  extras (timeout, proxies, verify, cert, trust_env). Connection extras are never copied into request
  headers (they are configuration, and would leak to the destination);
- how an answer is judged (:meth:`DestinationApi.judge`): a success whose body is not the JSON the API always
  sends (e.g. a proxy's HTML page) is retried; throttling, 5xx, timeouts and dropped connections are retried
  with backoff, jitter and ``Retry-After``; what cannot succeed later (401, 403 that is not throttling, 404,
  validation errors) fails at once, with the destination's own message;
- how long to keep trying (:class:`Tries`): throttled answers for as long as ``max_retry_seconds`` allows
  (they were not applied and say "later"), other transient failures at most ``max_retries`` times;
- client-side pacing per endpoint (:class:`RateLimiter`, usable from threads and from an event loop), or,
  with a Redis connection configured, one budget per API key shared by every export on every worker
  (:mod:`segment_export.hooks.budget`: token buckets per endpoint, a semaphore for a connection cap);
- under throttling a synchronous hook with ``adaptive_concurrency`` lowers how many requests its threads may
  have in flight (:class:`AdaptiveConcurrency`) and raises it again as answers succeed, so an export shares a
  connection cap with other apps instead of failing on it.

Every error a hook raises starts with ``<Destination> connection '<conn_id>':`` so a user with several
connections knows which one to fix; no message carries the API key, an email address (``redact_emails``:
answers and request bodies may quote customers' addresses) or a request's query string (Klaviyo's
pagination links repeat the email filter).
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import re
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, ClassVar, Mapping, NamedTuple

import msgspec
import requests
from requests.adapters import HTTPAdapter
from requests.auth import HTTPBasicAuth

from airflow.sdk import BaseHook
from airflow.sdk.log import mask_secret

_EMAIL_IN_TEXT = re.compile(r"[^\s@\"'<>()]+@[^\s@\"'<>()]+")


def redact_emails(text: str) -> str:
    """A destination's message with any address it quotes replaced, so it can be logged and counted (every
    error a hook raises goes through it: answers and request bodies may quote customers' addresses)."""
    return _EMAIL_IN_TEXT.sub("<email>", text)


_decode = msgspec.json.decode

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})

#: how a failed answer is treated: ``throttled`` (not applied, come back later: retried, bounded by time only,
#: and the adaptive concurrency is cut), ``retry`` (transient: retried within ``max_retries``), ``fail``
THROTTLED, RETRY, FAIL = "throttled", "retry", "fail"
#: a throttled request waits at most base * 2**4 (8 s) between tries: it was refused for a connection held
#: elsewhere, which frees in seconds, and fewer requests are in flight meanwhile (AdaptiveConcurrency)
THROTTLED_BACKOFF_DOUBLINGS = 4


class DestinationError(RuntimeError):
    """A request the destination refused or that kept failing; the message is the destination's own."""

    def __init__(self, message: str, status: int | None = None, retryable: bool = False, throttled: bool = False):
        super().__init__(message)
        self.status, self.retryable, self.throttled = status, retryable or throttled, throttled


class UnreadableAnswer(ValueError):
    """A success answer whose body is not what the API sends (a proxy's page, a truncated download): retried."""

    what = "could not be read"


class NotJSONError(UnreadableAnswer):
    """A success answer whose body is not JSON: a proxy, load balancer or maintenance page answered."""

    what = "is not JSON"


class AdaptiveConcurrency:
    """How many requests the hook's threads may have in flight: AIMD, as TCP does with its window.

    Starts at ``maximum``; a throttled answer halves the limit (at most once per round of requests, i.e. only
    for a request sent after the last cut, so ten answers to the same overload cut it once), every successful
    answer adds ``1/limit`` (one more connection per round of successes), never above ``maximum`` nor below 1.
    A connection cap shared with other apps (Mailchimp's 10 per API key) is found and followed this way.
    """

    def __init__(self, maximum: int):
        self.maximum = max(1, maximum)
        self.limit = float(self.maximum)
        self.lowest = self.maximum  # the smallest limit reached, for the summary and tests
        self.cuts = 0
        self._in_flight = 0
        self._cut_at = 0.0
        self._cond = threading.Condition()

    def acquire(self) -> float:
        """Wait for a slot; returns the send time to give back to :meth:`release`."""
        with self._cond:
            while self._in_flight >= int(self.limit):
                self._cond.wait()
            self._in_flight += 1
            return time.monotonic()

    def release(self, sent_at: float, outcome: str | None) -> bool:
        """Free the slot; ``outcome`` is ``THROTTLED``, ``None`` for a success, anything else leaves the limit.

        Returns whether this answer cut the limit."""
        cut = False
        with self._cond:
            self._in_flight -= 1
            if outcome == THROTTLED and sent_at >= self._cut_at:
                if self.limit > 1.0:
                    self.limit = max(1.0, self.limit / 2)
                    self.lowest = min(self.lowest, int(self.limit))
                    self.cuts += 1
                    cut = True
                self._cut_at = time.monotonic()
            elif outcome is None and self.limit < self.maximum:
                self.limit = min(float(self.maximum), self.limit + 1.0 / self.limit)
            self._cond.notify_all()
        return cut


class RateLimiter:
    """Client-side pacing for one endpoint: at most ``burst`` calls per second and ``steady`` per minute.

    Sliding windows over the send times of this process; thread-safe, and usable from an event loop
    (:meth:`wait`): the lock is only held to look at the windows, never while waiting. Pacing here avoids
    spending requests (and Retry-After waits) on discovering the limit through 429s.

    Each window is ``GUARD`` seconds longer than the API's: a send time is taken here, but the API counts
    arrivals, and a request that waited longer on its way (a new connection, a busy machine) than the one
    after it would put both into one of the API's windows (seen in CI: a 429 on the third of three calls
    paced exactly 1.0 s apart). The guard costs 0.2 % of a 60-second window.
    """

    GUARD = 0.1

    def __init__(self, burst_per_second: int, steady_per_minute: int):
        self.burst, self.steady = burst_per_second, steady_per_minute
        self._second: deque[float] = deque()
        self._minute: deque[float] = deque()
        self._lock = threading.Lock()

    def reserve(self) -> float:
        """Take a slot now and return 0, or return how long to wait before asking again (nothing taken)."""
        with self._lock:
            now = time.monotonic()
            second, minute = 1.0 + self.GUARD, 60.0 + self.GUARD
            while self._second and now - self._second[0] >= second:
                self._second.popleft()
            while self._minute and now - self._minute[0] >= minute:
                self._minute.popleft()
            waits = []
            if len(self._second) >= self.burst:
                waits.append(second - (now - self._second[0]))
            if len(self._minute) >= self.steady:
                waits.append(minute - (now - self._minute[0]))
            if not waits:
                self._second.append(now)
                self._minute.append(now)
                return 0.0
            return max(max(waits), 0.001)

    def acquire(self) -> None:
        """Block the calling thread until a slot is taken."""
        while wait := self.reserve():
            time.sleep(wait)

    async def wait(self) -> None:
        """Wait on the event loop until a slot is taken."""
        while wait := self.reserve():
            await asyncio.sleep(wait)


# -- what a request is ---------------------------------------------------------------------------------------
class Call(NamedTuple):
    """One API call as both hooks make it: ``hook.request_json(*call)`` / ``await hook.request_json(*call)``.

    ``limit_key`` names the rate limit that paces it (``rate_limits``); ``params`` its query."""

    method: str
    endpoint: str
    limit_key: str | None = None
    params: dict[str, Any] | None = None


@dataclass(frozen=True)
class RequestSettings:
    """Everything a request needs from the Airflow connection, whichever HTTP client sends it.

    Read once per hook (:meth:`DestinationApi.load_settings`); the API key is only in ``headers`` or ``auth``,
    never in ``repr`` (so a settings object in a traceback does not show it)."""

    base_url: str
    timeout: float
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    auth: tuple[str, str] | None = field(default=None, repr=False)
    proxies: dict[str, str] = field(default_factory=dict)
    verify: bool | str = True
    cert: str | tuple[str, str] | None = None
    trust_env: bool = True

    def url(self, endpoint: str | None) -> str:
        """The endpoint's URL; an absolute URL (a pagination link the API gave) is kept as it is."""
        if endpoint and "://" in endpoint:
            return endpoint
        return self.base_url + (endpoint if not endpoint or endpoint.startswith("/") else "/" + endpoint)


class Answer:
    """An HTTP answer as the rules read it (status, headers, body), whichever client received it.

    It has the attributes of ``requests.Response`` that :meth:`DestinationApi.classify`,
    :meth:`DestinationApi.error_message` and the readers use, so they take either."""

    __slots__ = ("status_code", "headers", "content")

    def __init__(self, status_code: int, headers: Mapping[str, str], content: bytes):
        self.status_code, self.headers, self.content = status_code, headers, content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)


class Verdict(NamedTuple):
    """What one answer (or its absence) means: ``outcome`` is ``None`` for a success (``result`` read from it),
    else ``THROTTLED``, ``RETRY`` or ``FAIL`` with the error to raise if no retry is left."""

    outcome: str | None
    result: Any = None
    failure: DestinationError | None = None
    retry_after: float | None = None


class Tries:
    """The retry budget of one request: how many attempts, transient failures and seconds it has used.

    Time spent waiting for a connection slot (adaptive concurrency) or for the rate limiter is not counted: it
    is the export being polite."""

    def __init__(self) -> None:
        self.attempt = self.transient = 0
        self.spent = 0.0


class DestinationApi:
    """What a destination's request is, shared by its synchronous and asynchronous hooks.

    The connection-form attributes (``conn_type``, ``hook_name``...) are here too: Airflow's providers manager
    reads them from the hook class named in the provider info."""

    conn_name_attr = "conn_id"
    default_conn_name: ClassVar[str]
    conn_type: ClassVar[str]
    hook_name: ClassVar[str]
    #: (burst per second, steady per minute) per endpoint key, from the destination's documentation.
    rate_limits: ClassVar[dict[str, tuple[int, int]]] = {}
    #: simultaneous connections the destination allows one API key (None: no such cap); with a rate budget the
    #: cap is shared by every export using the key, on every worker (a distributed semaphore)
    connections_per_key: ClassVar[int | None] = None
    #: first retry delay in seconds (doubled per attempt, at most 30 s), unless the answer says Retry-After
    retry_base_seconds: float = 0.5

    conn_id: str
    timeout: float
    max_retries: int
    max_retry_seconds: float
    log: Any

    def _init_api(self, conn_id: str | None, timeout: float, max_retries: int, max_retry_seconds: float) -> None:
        """The state both kinds of hook keep (a mixin has no ``__init__`` of its own, to keep the MRO simple)."""
        self.conn_id = conn_id or self.default_conn_name
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_retry_seconds = max_retry_seconds
        self.base_url = ""
        self._limiters = {key: RateLimiter(*limits) for key, limits in self.rate_limits.items()}
        #: the key's shared budget (hooks.budget), read with the connection; None: per-process pacing
        self.budget: Any = None
        self._budget_warned = False
        self.limit_share = 1.0  # the connection's rate_limit_share, read with it
        self.retries = 0  # how many requests were repeated, for the summary and benchmarks
        self.requests = 0

    # -- connection -> settings (synchronous: the async hooks run it in a worker thread) --------------------
    def destination_connection(self) -> Any:
        """The Airflow connection, after checking it exists and is of this destination's type."""
        from airflow.sdk.exceptions import AirflowNotFoundException

        try:
            connection = BaseHook.get_connection(self.conn_id)
        except AirflowNotFoundException as exc:
            raise DestinationError(
                f"{self.hook_name} connection {self.conn_id!r} is not defined: add a {self.conn_type} connection "
                "with that id (Admin > Connections, `airflow connections add`, or an AIRFLOW_CONN_ environment variable)"
            ) from exc
        if connection.conn_type != self.conn_type:
            raise DestinationError(
                f"{self.hook_name} connection {self.conn_id!r} is of type {connection.conn_type!r}, not "
                f"{self.conn_type!r}: a {self.hook_name} export needs a {self.conn_type} connection"
            )
        return connection

    def load_settings(self) -> RequestSettings:
        """The connection read into :class:`RequestSettings`; sets ``base_url`` and ``timeout`` on the hook."""
        connection = self.destination_connection()
        settings = self.request_settings(connection)
        self.base_url, self.timeout = settings.base_url, settings.timeout
        self.limit_share = limit_share(connection, self.error)
        self._limiters = {key: RateLimiter(*limits) for key, limits in self.limits().items()}
        self.budget = self.rate_budget(connection)
        return settings

    def limits(self) -> dict[str, tuple[int, int]]:
        """The documented ``rate_limits`` times the connection's ``rate_limit_share`` (never below 1 a window)."""
        return {key: (_share(burst, self.limit_share), _share(steady, self.limit_share))
                for key, (burst, steady) in self.rate_limits.items()}

    def connections(self) -> int | None:
        """The documented ``connections_per_key`` times the connection's ``rate_limit_share`` (at least 1)."""
        return None if self.connections_per_key is None else _share(self.connections_per_key, self.limit_share)

    def rate_budget(self, connection: Any) -> Any:
        """The API key's budget shared through Redis (:mod:`segment_export.hooks.budget`), when the connection's
        extra ``rate_budget_conn_id`` or the deployment's ``[segment_export] rate_budget_conn_id`` names a Redis
        connection; None otherwise (each export paces itself, per process)."""
        from segment_export.hooks import budget as shared

        conn_id = shared.configured_conn_id(connection)
        if conn_id is None or not (self.rate_limits or self.connections_per_key):
            return None
        from airflow.sdk.exceptions import AirflowNotFoundException

        try:
            budget = shared.budget_for(connection, self.conn_type, self.api_key(connection), self.limits(),
                                       self.connections())
        except AirflowNotFoundException as exc:
            raise self.error(
                f"the rate budget's Redis connection {conn_id!r} is not defined: add a redis connection with that id, "
                f"or remove {shared.EXTRA_FIELD!r} from the connection's extra / [segment_export] {shared.CONFIG_OPTION}"
            ) from exc
        self.log.info("%s connection %r: pacing with the shared rate budget of its API key (Redis connection %r)",
                      self.hook_name, self.conn_id, conn_id)
        return budget

    # -- pacing: the shared budget when there is one, else this process's limiters ---------------------------
    def _budget_failed(self, exc: BaseException) -> None:
        """Redis stopped answering: pace per process from now on (logged once), rather than fail the export."""
        if not self._budget_warned:
            self._budget_warned = True
            self.log.warning("%s connection %r: the shared rate budget is unreachable (%s); pacing this export on "
                             "its own from now on", self.hook_name, self.conn_id, type(exc).__name__)
        self.budget = None

    def _budget_wait(self, limit_key: str | None) -> float | None:
        """Seconds to wait for the budget's token for ``limit_key``; None when the budget does not pace it."""
        budget = self.budget
        if budget is None or not budget.paces(limit_key):
            return None
        try:
            return budget.reserve(limit_key)
        except _redis_errors() as exc:
            self._budget_failed(exc)
            return None

    def _budget_observe(self, limit_key: str | None, response: Any, verdict: Verdict) -> None:
        """Share what an answer said of the key's limit (its RateLimit-* headers, a 429's Retry-After)."""
        budget = self.budget
        if budget is None or not budget.paces(limit_key):
            return
        try:
            budget.observe(limit_key, response.headers, verdict.retry_after if verdict.outcome == THROTTLED else None)
        except _redis_errors() as exc:
            self._budget_failed(exc)

    def _try_slot(self) -> tuple[bool, str | None]:
        """(whether a slot is needed, the slot's token if one was free): the key's shared connection cap."""
        budget = self.budget
        if budget is None or not budget.connections:
            return False, None
        try:
            return True, budget.try_acquire_slot()
        except _redis_errors() as exc:
            self._budget_failed(exc)
            return False, None

    def _release_slot(self, token: str | None) -> None:
        budget = self.budget
        if token is None or budget is None:
            return
        try:
            budget.release_slot(token)
        except _redis_errors() as exc:  # the slot expires by itself
            self._budget_failed(exc)

    def request_settings(self, connection: Any) -> RequestSettings:
        """Base URL, auth and transport options of a connection; extras other than transport options are
        ignored, never sent as headers."""
        extra = connection.extra_dejson
        return RequestSettings(
            base_url=self.connection_base_url(connection),
            timeout=float(extra.get("timeout") or self.timeout),
            headers=self.auth_headers(connection),
            auth=self.basic_auth(connection),
            proxies=dict(extra.get("proxies", extra.get("proxy")) or {}),
            verify=extra.get("verify", extra.get("verify_ssl", True)),
            cert=extra.get("cert"),
            trust_env=bool(extra.get("trust_env", True)),
        )

    def connection_base_url(self, connection: Any) -> str:
        """The connection's host as a base URL (``host`` may be a whole URL; ``schema`` and ``port`` complete
        a bare host name), or the destination's default when the host is empty."""
        host = (connection.host or "").strip()
        if not host:
            return self.default_base_url(connection)
        url = host if "://" in host else f"{connection.schema or 'https'}://{host}"
        if connection.port:
            url = f"{url}:{connection.port}"
        return url.rstrip("/")

    def api_key(self, connection: Any) -> str:
        key = connection.password
        if not key:
            raise DestinationError(
                f"{self.hook_name} connection {self.conn_id!r} has no API key: put the {self.hook_name} API key "
                "in its password field"
            )
        mask_secret(key)
        return key

    def default_base_url(self, connection: Any) -> str:
        raise NotImplementedError

    def auth_headers(self, connection: Any) -> dict[str, str]:
        """Headers every request carries (the API key, when the destination takes it in a header)."""
        return {}

    def basic_auth(self, connection: Any) -> tuple[str, str] | None:
        """(login, password) for HTTP basic auth, when the destination takes the key that way."""
        return None

    def url_from_endpoint(self, endpoint: str | None) -> str:
        """The endpoint's URL under the connection's base URL (an absolute URL is kept as the API gave it)."""
        return RequestSettings(self.base_url, self.timeout).url(endpoint)

    # -- answers ---------------------------------------------------------------------------------------------
    def error(self, text: str, **kwargs: Any) -> DestinationError:
        """An error naming this hook's connection (never its key): ``Klaviyo connection 'x': <text>``."""
        return DestinationError(f"{self.hook_name} connection {self.conn_id!r}: {redact_emails(text)}", **kwargs)

    def error_message(self, response: Any) -> str:
        """The destination's own explanation of a failed response (a ``requests.Response`` or an :class:`Answer`)."""
        return f"HTTP {response.status_code}: {response.text[:500]}"

    def classify(self, response: Any) -> str:
        """``THROTTLED``, ``RETRY`` or ``FAIL`` for an answer of status 400 or more (see the hooks' overrides)."""
        if response.status_code == 429:
            return THROTTLED
        return RETRY if response.status_code in RETRYABLE_STATUS else FAIL

    def judge(self, where: str, response: Any, read: Callable[[Any], Any]) -> Verdict:
        """What an answer means: a success read by ``read`` (an unreadable one is retried), or a failure."""
        if response.status_code < 400:
            try:
                return Verdict(None, read(response))
            except UnreadableAnswer as exc:
                return Verdict(RETRY, failure=self.error(
                    f"{where}: the answer (HTTP {response.status_code}) {exc.what} ({response.text[:200]!r})",
                    status=response.status_code, retryable=True,
                ))
        outcome = self.classify(response)
        failure = self.error(
            f"{where} failed: {self.error_message(response)}", status=response.status_code,
            retryable=outcome == RETRY, throttled=outcome == THROTTLED,
        )
        return Verdict(outcome, failure=failure, retry_after=_retry_after(response))

    def no_answer(self, where: str, exc: BaseException) -> Verdict:
        """A request that got no answer (timeout, refused or dropped connection): retried."""
        name = "Timeout" if isinstance(exc, asyncio.TimeoutError) else type(exc).__name__
        return Verdict(RETRY, failure=self.error(f"{where}: {name}", retryable=True))

    def next_delay(self, where: str, verdict: Verdict, tries: Tries) -> float:
        """How long to wait before trying again, or raise the verdict's error when the budget is spent."""
        assert verdict.failure is not None
        if verdict.outcome == FAIL:
            raise verdict.failure
        if verdict.outcome == RETRY:
            tries.transient += 1
            if tries.transient > self.max_retries:
                raise verdict.failure
        if verdict.retry_after is not None:
            delay = verdict.retry_after
        elif verdict.outcome == THROTTLED:  # the adaptive limit does the slowing down; keep coming back soon
            delay = self.retry_base_seconds * 2 ** min(tries.attempt - 1, THROTTLED_BACKOFF_DOUBLINGS)
        else:
            delay = min(30.0, self.retry_base_seconds * 2 ** (tries.attempt - 1))
        delay += random.uniform(0, 0.25 * delay + 0.2 * self.retry_base_seconds)  # jitter: not in lock-step
        if tries.spent + delay > self.max_retry_seconds:
            raise verdict.failure
        self.retries += 1
        self.log.warning(
            "%s connection %r: %s: %s, retry %d in %.1fs",
            self.hook_name, self.conn_id, where, verdict.failure.status or "no answer", tries.attempt, delay,
        )
        tries.spent += delay
        return delay

    def data_of(self, body: Any, method: str, endpoint: str, key: str = "data") -> Any:
        """``body[key]``, failing with a clear message when the answer has another shape."""
        if not isinstance(body, dict) or key not in body:
            raise self.error(f"{_where(method, endpoint)}: unexpected answer (no {key!r}): {str(body)[:200]!r}")
        return body[key]


class DestinationHook(DestinationApi, BaseHook):
    """Base for the synchronous destination hooks: one ``requests`` session, shared by the sender threads.

    The API key lives in the connection's password field; the session's pool is sized to ``max_concurrency``."""

    #: whether throttled answers lower the number of requests in flight (a connection cap, not a rate window)
    adaptive_concurrency: ClassVar[bool] = False

    def __init__(
        self,
        conn_id: str | None = None,
        *,
        max_concurrency: int = 10,
        timeout: float = 120.0,
        max_retries: int = 6,
        max_retry_seconds: float = 300.0,
    ) -> None:
        super().__init__()
        self._init_api(conn_id, timeout, max_retries, max_retry_seconds)
        self.max_concurrency = max(1, max_concurrency)
        self.adaptive_limit = AdaptiveConcurrency(max_concurrency) if self.adaptive_concurrency else None

    # -- connection -> session -------------------------------------------------------------------------
    def get_conn(self) -> requests.Session:
        """A new session configured from the connection (base URL, auth, transport options, pool size)."""
        return self.build_session(self.load_settings())

    def build_session(self, settings: RequestSettings) -> requests.Session:
        session = requests.Session()
        session.headers.update(settings.headers)
        session.auth = HTTPBasicAuth(*settings.auth) if settings.auth else None
        session.proxies.update(settings.proxies)
        session.verify, session.cert, session.trust_env = settings.verify, settings.cert, settings.trust_env
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=self.max_concurrency, max_retries=0)
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        return session

    @cached_property
    def session(self) -> requests.Session:
        """One session per hook, shared by the sender threads (its pool is sized to the concurrency)."""
        return self.get_conn()

    # -- requests ----------------------------------------------------------------------------------------
    def request_json(self, method: str, endpoint: str, limit_key: str | None = None,
                     params: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        """The decoded JSON answer (``None`` when empty); a success answer that is not JSON is retried."""
        return self._exchange(method, endpoint, _json_body, limit_key=limit_key, params=params, **kwargs)[1]

    def request_data(self, method: str, endpoint: str, limit_key: str | None = None,
                     params: dict[str, Any] | None = None, key: str = "data", **kwargs: Any) -> Any:
        """``request_json(...)[key]``, failing with a clear message when the answer has another shape."""
        body = self.request_json(method, endpoint, limit_key, params, **kwargs)
        return self.data_of(body, method, endpoint, key)

    def _exchange(self, method: str, endpoint: str, read: Any, *, limit_key: str | None = None,
                  url: str | None = None, session: requests.Session | None = None,
                  **send: Any) -> tuple[requests.Response, Any]:
        """The retry loop: ``(response, read(response))`` of the first answer that succeeds.

        ``url`` and ``session`` replace the API's (a download link of its own, fetched without the API key).
        """
        own_link = url is not None  # a download link of its own: not a request on the API's connections
        session = session or self.session
        url = url or self.url_from_endpoint(endpoint)
        where = _where(method, endpoint)
        limiter = self._limiters.get(limit_key) if limit_key else None
        tries = Tries()
        while True:
            tries.attempt += 1
            wait = self._budget_wait(limit_key)
            if wait is not None:
                if wait > 0:
                    time.sleep(wait)
            elif limiter:
                limiter.acquire()
            sent_at = self.adaptive_limit.acquire() if self.adaptive_limit else time.monotonic()
            slot = None if own_link else self._wait_slot()
            started = time.monotonic()  # waiting for a shared slot is not part of the retry budget
            verdict = Verdict(RETRY)
            try:
                self.requests += 1
                try:
                    response = session.request(method, url, timeout=self.timeout, **send)
                except (requests.ConnectionError, requests.Timeout) as exc:
                    verdict = self.no_answer(where, exc)
                else:
                    verdict = self.judge(where, response, read)
                    self._budget_observe(limit_key, response, verdict)
                    if verdict.outcome is None:
                        return response, verdict.result
            finally:
                self._release_slot(slot)
                if self.adaptive_limit and self.adaptive_limit.release(sent_at, verdict.outcome):
                    self.log.warning("%s connection %r: throttled; now at most %d requests in flight, raised again "
                                     "as answers succeed", self.hook_name, self.conn_id, int(self.adaptive_limit.limit))
            tries.spent += time.monotonic() - started
            time.sleep(self.next_delay(where, verdict, tries))

    def _wait_slot(self) -> str | None:
        """One of the key's shared connections (waiting for it), or None when there is no shared cap."""
        delay = 0.01
        while True:
            needed, token = self._try_slot()
            if token is not None or not needed:
                return token
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(0.2, delay * 1.5)

    def test_connection(self) -> tuple[bool, str]:
        raise NotImplementedError


#: what an aiohttp request may raise instead of answering: retried like requests' ConnectionError and Timeout
def _async_transport_errors() -> tuple[type[BaseException], ...]:
    import aiohttp

    return (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError)


class DestinationAsyncHook(DestinationApi, BaseHook):
    """Base for the asynchronous destination hooks, used on the triggerer: same settings, rules and budget as
    the synchronous hook (:class:`DestinationApi`), sent with ``aiohttp``.

    The connection is read once, in a worker thread (``sync_to_async``, as the HTTP provider's async hook does
    on Airflows whose connection API would block the event loop): reading it and masking the key talk to the
    supervisor synchronously, which must not happen on the triggerer's event loop. Requests run one
    ``aiohttp.ClientSession`` per :meth:`client` (a polling round), never shared across event loops.
    There is no adaptive concurrency here: a trigger's requests are few, paced by the rate limits, and the
    client never opens more than ``max_concurrency`` connections."""

    def __init__(self, conn_id: str | None = None, *, max_concurrency: int = 10, timeout: float = 120.0,
                 max_retries: int = 6, max_retry_seconds: float = 300.0) -> None:
        super().__init__()
        self._init_api(conn_id, timeout, max_retries, max_retry_seconds)
        self.max_concurrency = max(1, max_concurrency)
        self._settings: RequestSettings | None = None

    async def settings(self) -> RequestSettings:
        """The connection's :class:`RequestSettings`, read once (in a worker thread)."""
        if self._settings is None:
            from asgiref.sync import sync_to_async

            self._settings = await sync_to_async(self.load_settings)()
        return self._settings

    async def client(self) -> Any:
        """A new ``aiohttp.ClientSession`` with the connection's headers, auth and transport options; use it as
        ``async with await hook.client() as client:`` and pass it to the requests of one round."""
        import aiohttp

        settings = await self.settings()
        headers = dict(settings.headers)
        if settings.auth:  # aiohttp 3.14 deprecates auth=BasicAuth; the header is the same on every version
            headers["Authorization"] = "Basic " + base64.b64encode(":".join(settings.auth).encode()).decode("ascii")
        return aiohttp.ClientSession(
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=settings.timeout),
            trust_env=settings.trust_env,
            connector=aiohttp.TCPConnector(ssl=_ssl_option(settings), limit=self.max_concurrency),
        )

    async def request_json(self, client: Any, method: str, endpoint: str, limit_key: str | None = None,
                           params: dict[str, Any] | None = None, **send: Any) -> Any:
        """The decoded JSON answer (``None`` when empty), retried by the same rules as the synchronous hook."""
        settings = await self.settings()
        url = settings.url(endpoint)
        where = _where(method, endpoint)
        limiter = self._limiters.get(limit_key) if limit_key else None
        proxy = settings.proxies.get(url.split(":", 1)[0]) or settings.proxies.get("all")
        query = {k: v for k, v in params.items() if v is not None} if params else None  # as requests drops them
        transport_errors = _async_transport_errors()
        tries = Tries()
        while True:
            tries.attempt += 1
            wait = await asyncio.to_thread(self._budget_wait, limit_key) if self.budget is not None else None
            if wait is not None:
                if wait > 0:
                    await asyncio.sleep(wait)
            elif limiter:
                await limiter.wait()
            slot = await self._wait_slot()
            sent_at = time.monotonic()
            self.requests += 1
            try:
                async with client.request(method, url, params=query, proxy=proxy, **send) as response:
                    answer = Answer(response.status, response.headers, await response.read())
            except transport_errors as exc:
                verdict = self.no_answer(where, exc)
            else:
                verdict = self.judge(where, answer, _json_body)
                if self.budget is not None:
                    await asyncio.to_thread(self._budget_observe, limit_key, answer, verdict)
                if verdict.outcome is None:
                    return verdict.result
            finally:
                if slot is not None:
                    await asyncio.to_thread(self._release_slot, slot)
            tries.spent += time.monotonic() - sent_at
            await asyncio.sleep(self.next_delay(where, verdict, tries))

    async def _wait_slot(self) -> str | None:
        """One of the key's shared connections, waited for on the event loop (Redis is asked from a thread)."""
        if self.budget is None or not self.budget.connections:
            return None
        delay = 0.01
        while True:
            needed, token = await asyncio.to_thread(self._try_slot)
            if token is not None or not needed:
                return token
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(0.2, delay * 1.5)

    async def request_data(self, client: Any, method: str, endpoint: str, limit_key: str | None = None,
                           params: dict[str, Any] | None = None, key: str = "data", **send: Any) -> Any:
        """``(await request_json(...))[key]``, failing with a clear message when the answer has another shape."""
        body = await self.request_json(client, method, endpoint, limit_key, params, **send)
        return self.data_of(body, method, endpoint, key)

    async def pending_jobs(self, job_ids: list[str]) -> list[str]:
        """The ids, among ``job_ids`` and in their order, of the jobs the destination has not finished yet (what
        :class:`~segment_export.triggers.jobs.DestinationJobsTrigger` polls).

        The jobs are asked for concurrently (at most ``max_concurrency`` connections, paced by the rate limits);
        a failure that outlives the retries is raised once every request has ended."""
        async with await self.client() as client:
            jobs = await asyncio.gather(*(self.get_job(client, job_id) for job_id in job_ids),
                                        return_exceptions=True)  # every request ends before the client closes
        failed = next((job for job in jobs if isinstance(job, BaseException)), None)
        if failed is not None:
            raise failed
        return [job_id for job_id, job in zip(job_ids, jobs) if not self.job_finished(job)]

    async def get_job(self, client: Any, job_id: str) -> dict[str, Any]:
        """One job as the destination describes it (the same request as the synchronous hook's)."""
        raise NotImplementedError

    def job_finished(self, job: dict[str, Any]) -> bool:
        """Whether a job will not change any more (the destination's definition, shared with the export)."""
        raise NotImplementedError


def _ssl_option(settings: RequestSettings) -> Any:
    """aiohttp's ``ssl`` for the connection's ``verify``/``cert`` extras (as requests reads them)."""
    if settings.verify is False and not settings.cert:
        return False
    if settings.verify is True and not settings.cert:
        return True
    context = ssl.create_default_context(cafile=settings.verify if isinstance(settings.verify, str) else None)
    if settings.verify is False:
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    if settings.cert:
        context.load_cert_chain(*((settings.cert,) if isinstance(settings.cert, str) else settings.cert))
    return context


def limit_share(connection: Any, error: Callable[..., DestinationError]) -> float:
    """The share of the destination's documented limits a connection's exports may use (its extra
    ``rate_limit_share``, default 1): less leaves room to other apps on the same account or key."""
    value = connection.extra_dejson.get("rate_limit_share")
    if value in (None, ""):
        return 1.0
    try:
        share = float(value)
    except (TypeError, ValueError):
        share = -1.0
    if not 0 < share <= 1:
        raise error(f"extra rate_limit_share must be a number above 0 and at most 1, not {value!r}")
    return share


def _share(count: int, share: float) -> int:
    """A limit's count times a share, never below 1 (as the sandbox scales its limits)."""
    return max(1, int(count * share))


def _redis_errors() -> tuple[type[BaseException], ...]:
    """What a budget call raises when Redis does not answer (redis-py is imported only with a budget)."""
    try:
        import redis
    except ImportError:  # pragma: no cover - no redis-py, so no budget either
        return (OSError,)
    return (redis.RedisError, OSError)


def _where(method: str, endpoint: str) -> str:
    """A request as errors and logs name it: never the query (Klaviyo's links repeat the email filter)."""
    return f"{method} {endpoint.split('?', 1)[0]}"


def _json_body(response: Any) -> Any:
    if not response.content:
        return None
    try:
        return _decode(response.content)  # msgspec: a 500-member Mailchimp answer decodes several times faster
    except ValueError as exc:
        raise NotJSONError(str(exc)) from exc


def _retry_after(response: Any) -> float | None:
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
