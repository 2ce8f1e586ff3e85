"""What the Klaviyo and Mailchimp hooks share: connection to session, retries, pacing, error messages.

Built on ``HttpHook`` (apache-airflow-providers-http) for connection handling, base URLs and transport
options, with two deliberate differences:

- connection extras are never copied into request headers (``HttpHook`` does that by default, which would
  leak configuration to the destination), only the transport options it knows (timeout, proxies, verify...);
- requests go through one exchange (:meth:`DestinationHook.request_json` and its siblings), which paces each
  endpoint to the destination's documented rate limits, retries what can succeed later (throttling, 5xx, timeouts, dropped connections,
  and a success answer whose body is not the JSON the API always sends, e.g. a proxy's HTML page) with
  backoff, jitter and ``Retry-After``, and fails at once, with the destination's own message, on what
  cannot (401, 403 that is not throttling, 404, validation errors);
- under throttling a hook with ``adaptive_concurrency`` lowers how many requests its threads may have in
  flight (:class:`AdaptiveConcurrency`) and raises it again as answers succeed, so an export shares a
  connection cap with other apps instead of failing on it.

Every error a hook raises starts with ``<Destination> connection '<conn_id>':`` so a user with several
connections knows which one to fix; no message carries the API key, an email address (``redact_emails``:
answers and request bodies may quote customers' addresses) or a request's query string (Klaviyo's
pagination links repeat the email filter).
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections import deque
from functools import cached_property
from typing import Any, ClassVar

import msgspec
import requests
from requests.adapters import HTTPAdapter

from airflow.providers.http.hooks.http import HttpHook, _process_extra_options_from_connection

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

    Sliding windows over the send times of this process; thread-safe. Pacing here avoids spending requests
    (and Retry-After waits) on discovering the limit through 429s.
    """

    def __init__(self, burst_per_second: int, steady_per_minute: int):
        self.burst, self.steady = burst_per_second, steady_per_minute
        self._second: deque[float] = deque()
        self._minute: deque[float] = deque()
        self._lock = threading.Lock()

    def acquire(self) -> None:
        while True:
            with self._lock:
                now = time.monotonic()
                while self._second and now - self._second[0] >= 1.0:
                    self._second.popleft()
                while self._minute and now - self._minute[0] >= 60.0:
                    self._minute.popleft()
                waits = []
                if len(self._second) >= self.burst:
                    waits.append(1.0 - (now - self._second[0]))
                if len(self._minute) >= self.steady:
                    waits.append(60.0 - (now - self._minute[0]))
                if not waits:
                    self._second.append(now)
                    self._minute.append(now)
                    return
                wait = max(waits)
            time.sleep(max(wait, 0.001))


class DestinationHook(HttpHook):
    """Base for the destination hooks: the API key lives in the connection's password field."""

    conn_name_attr = "conn_id"
    default_conn_name: ClassVar[str]
    conn_type: ClassVar[str]
    hook_name: ClassVar[str]
    #: (burst per second, steady per minute) per endpoint key, from the destination's documentation.
    rate_limits: ClassVar[dict[str, tuple[int, int]]] = {}
    #: whether throttled answers lower the number of requests in flight (a connection cap, not a rate window)
    adaptive_concurrency: ClassVar[bool] = False
    #: first retry delay in seconds (doubled per attempt, at most 30 s), unless the answer says Retry-After
    retry_base_seconds: float = 0.5

    def __init__(
        self,
        conn_id: str | None = None,
        *,
        max_concurrency: int = 10,
        timeout: float = 120.0,
        max_retries: int = 6,
        max_retry_seconds: float = 300.0,
    ) -> None:
        conn_id = conn_id or self.default_conn_name
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=max_concurrency, max_retries=0)
        super().__init__(method="GET", http_conn_id=conn_id, adapter=adapter)
        self.conn_id = conn_id
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_retry_seconds = max_retry_seconds
        self._limiters = {key: RateLimiter(*limits) for key, limits in self.rate_limits.items()}
        self.adaptive_limit = AdaptiveConcurrency(max_concurrency) if self.adaptive_concurrency else None
        self.retries = 0  # how many requests were repeated, for the summary and benchmarks
        self.requests = 0

    # -- connection -> session -------------------------------------------------------------------------
    def get_conn(self, headers: dict[Any, Any] | None = None, extra_options: dict[str, Any] | None = None) -> requests.Session:
        """HttpHook's session, after checking the connection exists and is of this destination's type."""
        from airflow.sdk.exceptions import AirflowNotFoundException

        try:
            connection = self.get_connection(self.conn_id)
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
        return super().get_conn(headers, extra_options)

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

    def _set_base_url(self, connection: Any) -> None:
        if connection.host:
            super()._set_base_url(connection)
            self.base_url = self.base_url.rstrip("/")
        else:
            self.base_url = self.default_base_url(connection)
        self._base_url_initialized = True

    def _configure_session_from_extra(self, session: requests.Session, connection: Any, extra_options: dict) -> requests.Session:
        # Transport options only; unlike HttpHook, leftover extras are configuration, not headers.
        _, self.merged_extra = _process_extra_options_from_connection(connection, extra_options)
        session.proxies = self.merged_extra.get("proxies", self.merged_extra.get("proxy", {}))
        session.verify = self.merged_extra.get("verify", self.merged_extra.get("verify_ssl", True))
        session.cert = self.merged_extra.get("cert")
        session.trust_env = self.merged_extra.get("trust_env", True)
        if self.merged_extra.get("timeout"):
            self.timeout = float(self.merged_extra["timeout"])
        return session

    @cached_property
    def session(self) -> requests.Session:
        """One session per hook, shared by the sender threads (its pool is sized to the concurrency)."""
        return self.get_conn()

    # -- requests ----------------------------------------------------------------------------------------
    def error(self, text: str, **kwargs: Any) -> DestinationError:
        """An error naming this hook's connection (never its key): ``Klaviyo connection 'x': <text>``."""
        return DestinationError(f"{self.hook_name} connection {self.conn_id!r}: {redact_emails(text)}", **kwargs)

    def error_message(self, response: requests.Response) -> str:
        """The destination's own explanation of a failed response."""
        return f"HTTP {response.status_code}: {response.text[:500]}"

    def classify(self, response: requests.Response) -> str:
        """``THROTTLED``, ``RETRY`` or ``FAIL`` for an answer of status 400 or more (see the hooks' overrides)."""
        if response.status_code == 429:
            return THROTTLED
        return RETRY if response.status_code in RETRYABLE_STATUS else FAIL

    def request_json(self, method: str, endpoint: str, **kwargs: Any) -> Any:
        """The decoded JSON answer (``None`` when empty); a success answer that is not JSON is retried."""
        return self._exchange(method, endpoint, _json_body, **kwargs)[1]

    def _exchange(self, method: str, endpoint: str, read: Any, *, limit_key: str | None = None,
                  url: str | None = None, session: requests.Session | None = None,
                  **send: Any) -> tuple[requests.Response, Any]:
        """The retry loop: ``(response, read(response))`` of the first answer that succeeds.

        Throttled answers are retried for as long as ``max_retry_seconds`` allows (they were not applied and
        say "later"); other transient failures at most ``max_retries`` times within that time. Time spent
        waiting for a connection slot (adaptive concurrency) is not counted: it is the export being polite.
        ``url`` and ``session`` replace the API's (a download link of its own, fetched without the API key).
        """
        session = session or self.session
        url = url or self.url_from_endpoint(endpoint)
        where = f"{method} {endpoint.split('?', 1)[0]}"  # never the query: Klaviyo's links repeat the email filter
        limiter = self._limiters.get(limit_key) if limit_key else None
        spent = 0.0
        attempt = transient = 0
        while True:
            attempt += 1
            if limiter:
                limiter.acquire()
            sent_at = self.adaptive_limit.acquire() if self.adaptive_limit else time.monotonic()
            outcome: str | None = RETRY
            retry_after = None
            try:
                self.requests += 1
                try:
                    response = session.request(method, url, timeout=self.timeout, **send)
                except (requests.ConnectionError, requests.Timeout) as exc:
                    failure = self.error(f"{where}: {type(exc).__name__}", retryable=True)
                else:
                    if response.status_code < 400:
                        try:
                            result = read(response)
                        except UnreadableAnswer as exc:
                            failure = self.error(
                                f"{where}: the answer (HTTP {response.status_code}) {exc.what} "
                                f"({response.text[:200]!r})", status=response.status_code, retryable=True,
                            )
                        else:
                            outcome = None
                            return response, result
                    else:
                        outcome = self.classify(response)
                        failure = self.error(
                            f"{where} failed: {self.error_message(response)}", status=response.status_code,
                            retryable=outcome == RETRY, throttled=outcome == THROTTLED,
                        )
                        retry_after = _retry_after(response)
            finally:
                if self.adaptive_limit and self.adaptive_limit.release(sent_at, outcome):
                    self.log.warning("%s connection %r: throttled; now at most %d requests in flight, raised again "
                                     "as answers succeed", self.hook_name, self.conn_id, int(self.adaptive_limit.limit))
            spent += time.monotonic() - sent_at
            if outcome == FAIL:
                raise failure
            if outcome == RETRY:
                transient += 1
                if transient > self.max_retries:
                    raise failure
            if retry_after is not None:
                delay = retry_after
            elif outcome == THROTTLED:  # the adaptive limit does the slowing down; keep coming back soon
                delay = self.retry_base_seconds * 2 ** min(attempt - 1, THROTTLED_BACKOFF_DOUBLINGS)
            else:
                delay = min(30.0, self.retry_base_seconds * 2 ** (attempt - 1))
            delay += random.uniform(0, 0.25 * delay + 0.2 * self.retry_base_seconds)  # jitter: not in lock-step
            if spent + delay > self.max_retry_seconds:
                raise failure
            self.retries += 1
            self.log.warning(
                "%s connection %r: %s: %s, retry %d in %.1fs",
                self.hook_name, self.conn_id, where, failure.status or "no answer", attempt, delay,
            )
            time.sleep(delay)
            spent += delay

    def request_data(self, method: str, endpoint: str, key: str = "data", **kwargs: Any) -> Any:
        """``request_json(...)[key]``, failing with a clear message when the answer has another shape."""
        body = self.request_json(method, endpoint, **kwargs)
        if not isinstance(body, dict) or key not in body:
            raise self.error(
                f"{method} {endpoint.split('?', 1)[0]}: unexpected answer (no {key!r}): {str(body)[:200]!r}"
            )
        return body[key]

    def test_connection(self) -> tuple[bool, str]:
        raise NotImplementedError


def _json_body(response: requests.Response) -> Any:
    if not response.content:
        return None
    try:
        return _decode(response.content)  # msgspec: a 500-member Mailchimp answer decodes several times faster
    except ValueError as exc:
        raise NotJSONError(str(exc)) from exc


def _retry_after(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
