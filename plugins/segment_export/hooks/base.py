"""What the Klaviyo and Mailchimp hooks share: connection to session, retries, pacing, error messages.

Built on ``HttpHook`` (apache-airflow-providers-http) for connection handling, base URLs and transport
options, with two deliberate differences:

- connection extras are never copied into request headers (``HttpHook`` does that by default, which would
  leak configuration to the destination), only the transport options it knows (timeout, proxies, verify...);
- requests go through :meth:`DestinationHook.request`, which paces each endpoint to the destination's
  documented rate limits, retries what can succeed later (429, 5xx, timeouts, dropped connections) with
  backoff, jitter and ``Retry-After``, and fails at once, with the destination's own message, on what
  cannot (401, 403, 404, validation errors).
"""

from __future__ import annotations

import random
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

_decode = msgspec.json.decode

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


class DestinationError(RuntimeError):
    """A request the destination refused or that kept failing; the message is the destination's own."""

    def __init__(self, message: str, status: int | None = None, retryable: bool = False):
        super().__init__(message)
        self.status, self.retryable = status, retryable


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
                f"connection {self.conn_id!r} is not defined: add a {self.conn_type} connection with that id "
                "(Admin > Connections, `airflow connections add`, or an AIRFLOW_CONN_ environment variable)"
            ) from exc
        if connection.conn_type != self.conn_type:
            raise DestinationError(
                f"connection {self.conn_id!r} is of type {connection.conn_type!r}, not {self.conn_type!r}: "
                f"a {self.hook_name} export needs a {self.conn_type} connection"
            )
        return super().get_conn(headers, extra_options)

    def api_key(self, connection: Any) -> str:
        key = connection.password
        if not key:
            raise DestinationError(
                f"connection {self.conn_id!r} has no API key: put the {self.hook_name} API key in its password field"
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
    def error_message(self, response: requests.Response) -> str:
        """The destination's own explanation of a failed response."""
        return f"HTTP {response.status_code}: {response.text[:500]}"

    def request(
        self,
        method: str,
        endpoint: str,
        *,
        limit_key: str | None = None,
        json: Any = None,
        data: bytes | None = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> requests.Response:
        """Send one request with pacing and bounded retries; return the successful response."""
        session = self.session
        url = self.url_from_endpoint(endpoint)
        limiter = self._limiters.get(limit_key) if limit_key else None
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            if limiter:
                limiter.acquire()
            self.requests += 1
            try:
                response = session.request(
                    method, url, json=json, data=data, params=params, headers=headers, timeout=self.timeout
                )
            except (requests.ConnectionError, requests.Timeout) as exc:
                failure: DestinationError = DestinationError(
                    f"{self.hook_name} {method} {endpoint}: {type(exc).__name__}", retryable=True
                )
                retry_after = None
            else:
                if response.status_code < 400:
                    return response
                retryable = response.status_code in RETRYABLE_STATUS
                failure = DestinationError(
                    f"{self.hook_name} {method} {endpoint} failed: {self.error_message(response)}",
                    status=response.status_code,
                    retryable=retryable,
                )
                retry_after = _retry_after(response)
            elapsed = time.monotonic() - started
            if not failure.retryable or attempt > self.max_retries:
                raise failure
            delay = retry_after if retry_after is not None else min(30.0, 0.5 * 2 ** (attempt - 1))
            delay += random.uniform(0, 0.25 * delay + 0.1)  # jitter: don't retry in lock-step
            if elapsed + delay > self.max_retry_seconds:
                raise failure
            self.retries += 1
            self.log.warning(
                "%s %s %s: %s, retry %d/%d in %.1fs",
                self.hook_name, method, endpoint, failure.status or "no answer", attempt, self.max_retries, delay,
            )
            time.sleep(delay)

    def request_json(self, method: str, endpoint: str, **kwargs: Any) -> Any:
        response = self.request(method, endpoint, **kwargs)
        if not response.content:
            return None
        try:
            return _decode(response.content)  # msgspec: a 500-member Mailchimp answer decodes several times faster
        except ValueError as exc:
            raise DestinationError(
                f"{self.hook_name} {method} {endpoint}: the answer is not JSON ({response.text[:200]!r})"
            ) from exc

    def request_data(self, method: str, endpoint: str, key: str = "data", **kwargs: Any) -> Any:
        """``request_json(...)[key]``, failing with a clear message when the answer has another shape."""
        body = self.request_json(method, endpoint, **kwargs)
        if not isinstance(body, dict) or key not in body:
            raise DestinationError(
                f"{self.hook_name} {method} {endpoint}: unexpected answer (no {key!r}): {str(body)[:200]!r}"
            )
        return body[key]

    def test_connection(self) -> tuple[bool, str]:
        raise NotImplementedError


def _retry_after(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
