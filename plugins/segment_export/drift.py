"""Drift: what a destination's target holds, compared with what the export's state says it sent. Pure.

A **verify** run reads the target's real membership (a Klaviyo list's profiles, the Mailchimp members that carry
the export's tags) as pages of :class:`Held` and compares it with the state's profile keys:

- ``added_outside``: held by the target, never exported (added by hand or by another tool);
- ``removed_outside``: exported (in the state), no longer held (removed, untagged or archived outside the export);
- ``unsubscribed``: exported and still held, but the person unsubscribed;
- ``suppressed``: exported and still held, but the destination will not email them (bounced, spam complaint,
  a suppression other than an unsubscribe; Mailchimp ``cleaned``).

Only ``removed_outside`` is something the export may put back (see ``verify``): the others are people's own
choices or other tools' data, and an export never re-subscribes anyone nor deletes anything.

Memory: the held membership is one dict (key → status) of the target's size; the state's keys are streamed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator

#: a held profile's status, in the destination-neutral words each destination maps its own to
MEMBER = "member"
UNSUBSCRIBED = "unsubscribed"
SUPPRESSED = "suppressed"
STATUSES = (MEMBER, UNSUBSCRIBED, SUPPRESSED)

ADDED_OUTSIDE = "added_outside"
REMOVED_OUTSIDE = "removed_outside"
#: every drift kind, in the order summaries list them
KINDS = (ADDED_OUTSIDE, REMOVED_OUTSIDE, UNSUBSCRIBED, SUPPRESSED)
#: the outcome action of a drift row (its reason is the kind)
ACTION = "drift"
# When one profile is seen twice (in two of the export's lists or tags), the status that says more wins.
_RANK = {MEMBER: 0, SUPPRESSED: 1, UNSUBSCRIBED: 2}


@dataclass(frozen=True, slots=True)
class Held:
    """One profile the target holds: its key (lower-cased email; ``""`` when it has none), its status (one of
    :data:`STATUSES`) and the destination's own id for it (a Klaviyo profile id, a Mailchimp subscriber hash),
    which names a profile the export never sent without writing its address anywhere."""

    key: str
    status: str
    ref: str

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown membership status {self.status!r}; one of {STATUSES}")


def collect(pages: Iterable[list[Held]]) -> dict[str, Held]:
    """The membership by key, from the destination's pages (any order, duplicates allowed). A held profile
    without an email is kept under ``"#" + ref`` (it cannot be one of the state's keys, which are emails)."""
    held: dict[str, Held] = {}
    for page in pages:
        for item in page:
            key = item.key or "#" + item.ref
            seen = held.get(key)
            if seen is None or _RANK[item.status] > _RANK[seen.status]:
                held[key] = item
    return held


def compare(remembered: Iterable[str], held: dict[str, Held]) -> Iterator[tuple[str, str]]:
    """``(outcome key, kind)`` of every drifted profile: the state's keys (streamed, each once) against the held
    membership. Keys of ``added_outside`` profiles are the destination's id (``klaviyo profile <id>``-style refs
    given by the destination), never an address the segment does not already have."""
    unseen = dict(held)
    for key in remembered:
        item = unseen.pop(key, None)
        if item is None:
            yield key, REMOVED_OUTSIDE
        elif item.status != MEMBER:
            yield key, item.status
    for item in unseen.values():
        yield item.ref, ADDED_OUTSIDE


@dataclass(slots=True)
class DriftReport:
    """The counts of one verify pass (XCom, log), and the keys it marked for the next run to send again."""

    held: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    repaired: int = 0  # removed_outside keys forgotten by the state: the next run sends them again
    repair: bool = False

    def as_dict(self) -> dict[str, int | bool]:
        return {"held": self.held, **{kind: self.counts[kind] for kind in KINDS}, "repair": self.repair,
                "repaired": self.repaired}
