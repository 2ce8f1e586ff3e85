"""Rate limiting as the two vendors do it.

* Klaviyo: per account, per endpoint, *fixed windows* (a 1-second burst window and
  a 1-minute steady window, both aligned to the clock); a request over either
  gets 429 with ``Retry-After`` = whole seconds until the window that refused it
  resets.  Non-429 answers carry ``RateLimit-Limit/Remaining/Reset`` for the
  steady window (documented in Klaviyo's "Rate limits, status codes, and errors").
* Mailchimp: at most N simultaneous connections per API key (N = 10); the
  (N+1)-th concurrent request gets 429 at once.  We count *in-flight requests*,
  which is what a keep-alive client's concurrency amounts to.

Both are thread-safe: the HTTP server runs one thread per connection.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Hashable, Optional


@dataclass
class WindowDecision:
    allowed: bool
    retry_after: int  # seconds, only meaningful when refused
    limit: int  # steady-window limit (for RateLimit-* headers)
    remaining: int
    reset: int  # seconds until the steady window resets


class FixedWindowLimiter:
    """Counts accepted requests per (key, window length) in clock-aligned windows."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._counts: dict[tuple[Hashable, float], tuple[int, int]] = {}  # -> (window index, count)

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()

    def hit(self, key: Hashable, limits: list[tuple[int, float]]) -> WindowDecision:
        """Try to take one slot in every ``(count, window seconds)`` window of ``key``.

        Refused requests do not consume a slot (a client honouring Retry-After is
        not punished for the attempt that told it to wait).
        """
        now = self._clock()
        with self._lock:
            current = []
            for count, window in limits:
                index = int(now // window)
                seen_index, seen = self._counts.get((key, window), (index, 0))
                used = seen if seen_index == index else 0
                current.append((count, window, index, used))
            refused = [(c, w, i) for c, w, i, used in current if used >= c]
            steady_count, steady_window, steady_index, steady_used = max(current, key=lambda item: item[1])
            steady_reset = max(1, math.ceil((steady_index + 1) * steady_window - now))
            if refused:
                wait = max((i + 1) * w - now for _, w, i in refused)
                return WindowDecision(False, max(1, math.ceil(wait)), steady_count, 0, steady_reset)
            for count, window, index, used in current:
                self._counts[(key, window)] = (index, used + 1)
            return WindowDecision(True, 0, steady_count, max(0, steady_count - steady_used - 1), steady_reset)


class InFlightLimiter:
    """Non-blocking counter of simultaneous requests per key."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight: dict[Hashable, int] = {}

    def try_acquire(self, key: Hashable, limit: int) -> bool:
        with self._lock:
            n = self._in_flight.get(key, 0)
            if n >= limit:
                return False
            self._in_flight[key] = n + 1
            return True

    def release(self, key: Hashable) -> None:
        with self._lock:
            n = self._in_flight.get(key, 0) - 1
            if n <= 0:
                self._in_flight.pop(key, None)
            else:
                self._in_flight[key] = n

    def current(self, key: Hashable) -> int:
        with self._lock:
            return self._in_flight.get(key, 0)


def scaled(count: int, scale: float) -> int:
    """Apply ``rate_limit_scale`` to a window count, never below 1."""
    return max(1, int(count * scale))


def window_limits(rate_limit: Optional[tuple[int, int]], scale: float) -> list[tuple[int, float]]:
    """``(burst/s, steady/min)`` -> limiter windows."""
    if rate_limit is None:
        return []
    burst, steady = rate_limit
    return [(scaled(burst, scale), 1.0), (scaled(steady, scale), 60.0)]
