"""The sync diff: what changed between the segment now and what was last accepted. Pure, no I/O.

Both sides arrive sorted by profile key (the normalised email), so the diff is one merge pass in constant memory,
whatever the size of the segment.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Literal, NamedTuple

Kind = Literal["create", "update", "unchanged", "leave"]


# Named tuples, not frozen dataclasses: one of each is built per profile per run, and a frozen dataclass's
# __init__ (object.__setattr__ per field) costs several times a tuple's. Hot paths build them with
# tuple.__new__(Cls, values), which skips the generated __new__; fields are then read by position.


class Current(NamedTuple):
    """A profile as the segment holds it now."""

    key: str
    fingerprint: str
    fragment: bytes
    segments: tuple[str, ...]


class Previous(NamedTuple):
    """A profile as the export's state remembers it: the fingerprint and segments last accepted."""

    key: str
    fingerprint: str
    segments: tuple[str, ...]


class Change(NamedTuple):
    key: str
    kind: Kind
    fingerprint: str | None  # the current fingerprint (None for a profile that left)
    fragment: bytes | None
    segments: tuple[str, ...]  # segments now
    previous_segments: tuple[str, ...]

    @property
    def send_profile(self) -> bool:
        return self.kind in ("create", "update")

    @property
    def segments_added(self) -> tuple[str, ...]:
        return tuple(s for s in self.segments if s not in self.previous_segments)

    @property
    def segments_removed(self) -> tuple[str, ...]:
        return tuple(s for s in self.previous_segments if s not in self.segments)


def diff(current: Iterable[Current], previous: Iterable[Previous], *, full_resync: bool = False) -> Iterator[Change]:
    """Merge two key-sorted streams into changes. ``full_resync`` turns every unchanged profile into an update."""
    make = tuple.__new__  # Change(...) through its generated __new__ costs a Python call per profile
    cur_iter, prev_iter = iter(current), iter(previous)
    cur, prev = next(cur_iter, None), next(prev_iter, None)
    while cur is not None or prev is not None:
        if prev is None or (cur is not None and cur[0] < prev[0]):
            yield make(Change, (cur[0], "create", cur[1], cur[2], cur[3], ()))
            cur = next(cur_iter, None)
        elif cur is None or prev[0] < cur[0]:
            yield make(Change, (prev[0], "leave", None, None, (), prev[2]))
            prev = next(prev_iter, None)
        else:
            same = cur[1] == prev[1] and not full_resync
            kind: Kind = "unchanged" if same else "update"
            yield make(Change, (cur[0], kind, cur[1], cur[2], cur[3], prev[2]))
            cur, prev = next(cur_iter, None), next(prev_iter, None)
