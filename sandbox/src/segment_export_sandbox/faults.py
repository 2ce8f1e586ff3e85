"""Fault injection: make chosen requests fail the way real APIs and networks do, a set number of times.

A rule matches requests by endpoint name ("POST /api/profile-bulk-import-jobs", or any substring of it, or "*")
and fires on each of its next ``times`` matches:

- ``429``: the API's throttled answer, with ``Retry-After: seconds`` (Klaviyo) — the request is not applied;
  for Mailchimp its status follows behaviour ``mailchimp_throttle_status`` (429, or 403 with the same body);
- ``500``/``502``/``503``: a server error in the API's shape — not applied;
- ``slow``: the answer comes ``seconds`` late (past a client's timeout) — the request *is* applied, as a slow
  real server would;
- ``garbage``: a 200 whose body is an HTML page instead of JSON (a proxy or maintenance page); ``phase:
  before`` (default) answers it unapplied, ``phase: after`` applies the request and then answers the page
  (a proxy that lost the real answer) — a client must retry it like a 5xx, and only idempotent writes survive
  the ``after`` case;
- ``drop``: the connection is closed without an answer; ``phase: before`` (default) drops it unapplied,
  ``phase: after`` applies the request and then loses the answer (the case only idempotent writes survive).

Rules are set with ``PUT /_sandbox/faults`` (a JSON list) or ``Sandbox.set_faults``; ``GET /_sandbox/faults``
shows them with how often each fired.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

#: the body of a ``garbage`` answer: what a proxy or load balancer shows instead of the API's JSON
GARBAGE_BODY = b"<html><body>Service temporarily unavailable</body></html>"

KINDS = ("429", "500", "502", "503", "slow", "drop", "garbage")


@dataclass
class FaultRule:
    endpoint: str
    kind: str
    times: int = 1
    seconds: float = 1.0
    phase: str = "before"
    fired: int = field(default=0)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"fault kind must be one of {KINDS}, not {self.kind!r}")
        if self.phase not in ("before", "after"):
            raise ValueError("fault phase must be 'before' or 'after'")
        if self.times < 0 or self.seconds < 0:
            raise ValueError("times and seconds must not be negative")

    def matches(self, endpoint: str) -> bool:
        return self.fired < self.times and (self.endpoint == "*" or self.endpoint in endpoint)


class Faults:
    """The active rules; thread-safe, since requests are served on many threads."""

    def __init__(self) -> None:
        self._rules: list[FaultRule] = []
        self._lock = threading.Lock()

    def set(self, rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
        parsed = [FaultRule(**{k: v for k, v in r.items() if k != "fired"}) for r in rules]
        with self._lock:
            self._rules = parsed
        return self.describe()

    def take(self, endpoint: str) -> Optional[FaultRule]:
        """The rule that fires for this request, if any (counted as fired)."""
        with self._lock:
            for rule in self._rules:
                if rule.matches(endpoint):
                    rule.fired += 1
                    return rule
        return None

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            return [asdict(r) for r in self._rules]
