"""Batching: serialized profiles grouped into requests under a count cap and a byte cap. Pure, no I/O.

Profiles are serialized once, to bytes, by the destination's payload builder; a batch is the list of those
fragments, so the request body is a join, never a second serialization.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Batch:
    """The profiles of one request. ``keys`` (normalised emails) reconcile answers; they are never logged."""

    number: int
    fragments: list[bytes] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    size: int = 0

    def __len__(self) -> int:
        return len(self.keys)  # a sent batch may have let go of its fragments (see KlaviyoDestination.send)


class Batcher:
    """Fills batches of at most ``max_count`` profiles whose fragments add up to at most ``max_bytes``.

    ``max_bytes`` is the room left for profiles once the request's envelope is paid for; one separator byte
    is counted per fragment so the joined body never exceeds the destination's payload cap.
    """

    def __init__(self, max_count: int, max_bytes: int):
        if max_count < 1 or max_bytes < 1:
            raise ValueError("batch caps must be positive")
        self.max_count, self.max_bytes = max_count, max_bytes
        self._numbers = 0
        self._current = self._new()

    def _new(self) -> Batch:
        self._numbers += 1
        return Batch(number=self._numbers)

    def add(self, key: str, fragment: bytes) -> Batch | None:
        """Add one profile; return the batch it closed, if adding it would have overflowed one."""
        cost = len(fragment) + 1
        if cost > self.max_bytes:
            raise ValueError(f"a profile of {len(fragment)} bytes cannot fit in a batch of {self.max_bytes} bytes")
        closed = None
        current = self._current
        if len(current.fragments) >= self.max_count or current.size + cost > self.max_bytes:
            closed, current = current, self._new()
            self._current = current
        current.fragments.append(fragment)
        current.keys.append(key)
        current.size += cost
        return closed

    @property
    def current_number(self) -> int:
        """The number of the batch the next (or the last added) profile is in."""
        return self._current.number

    def flush(self) -> Batch | None:
        """The last, partly filled batch, if any."""
        if not self._current.fragments:
            return None
        closed, self._current = self._current, self._new()
        return closed
