"""A batch's changes as the executor keeps them while the batch is in flight (``execute.BatchChanges``)."""

from __future__ import annotations

import sys

from segment_export.diff import Change
from segment_export.execute import BatchChanges
from segment_export.exporter import fingerprint


def _changes(n: int) -> list[Change]:
    both, one = ("a", "b"), ("a",)
    return [
        Change(f"p{i}@example.com", "create" if i % 3 else "update", fingerprint(str(i).encode()), b'{"x":1}',
               both if i % 2 else one, () if i % 3 else one)
        for i in range(n)
    ]


def _held(changes: list[Change]) -> BatchChanges:
    held = BatchChanges()
    for change in changes:
        held.append(change)
    held.seal()
    return held


def test_changes_come_back_as_added_without_their_payloads():
    given = _changes(50)
    held = _held(given)
    assert isinstance(held.fingerprints, str)  # joined: one string for the batch
    assert len(held) == 50
    assert list(held) == [c._replace(fragment=None) for c in given]
    assert list(held) == list(held)  # iterated again (the state, then the outcomes)
    assert all(type(c) is Change for c in held)


def test_fingerprints_of_another_length_stay_a_list():
    given = [Change("a@x.io", "create", "fp-short", None, ("s",), ()), Change("b@x.io", "update", None, None, (), ())]
    held = _held(given)
    assert isinstance(held.fingerprints, list)
    assert list(held) == given


def test_a_batch_in_flight_costs_well_under_the_tuples_it_replaces():
    given = _changes(10_000)
    held = _held(given)
    compact = sum(sys.getsizeof(part) for part in (held.keys, held.kinds, held.fingerprints, held.segments, held.previous))
    # what the executor kept before: a payload-free tuple and a fingerprint string per profile, in a list
    tuples = sys.getsizeof(given) + sum(sys.getsizeof(c) + sys.getsizeof(c.fingerprint) for c in given)
    assert compact < tuples / 2.5
