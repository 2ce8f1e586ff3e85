"""Batches respect both caps, keep order, and never lose or repeat a profile."""

from __future__ import annotations

import pytest

from segment_export.batching import Batcher
from segment_export.limit import LimitExceededError, decide_limit


def drain(batcher: Batcher, items):
    out = []
    for key, fragment in items:
        if (closed := batcher.add(key, fragment)) is not None:
            out.append(closed)
    if (last := batcher.flush()) is not None:
        out.append(last)
    return out


def test_count_cap():
    batches = drain(Batcher(max_count=3, max_bytes=10_000), [(str(i), b"x") for i in range(7)])
    assert [len(b) for b in batches] == [3, 3, 1]
    assert [b.number for b in batches] == [1, 2, 3]
    assert [k for b in batches for k in b.keys] == [str(i) for i in range(7)]


def test_byte_cap_counts_separators():
    # each fragment costs 10 bytes + 1 separator; 33 bytes fit 3, not 4
    batches = drain(Batcher(max_count=100, max_bytes=33), [(str(i), b"0123456789") for i in range(5)])
    assert [len(b) for b in batches] == [3, 2]
    assert all(b.size <= 33 for b in batches)


def test_profile_larger_than_a_batch_is_an_error():
    with pytest.raises(ValueError, match="cannot fit"):
        Batcher(max_count=10, max_bytes=5).add("k", b"0123456789")


def test_empty_input_gives_no_batch():
    assert drain(Batcher(10, 100), []) == []


def test_limit_under_cap_reads_everything():
    decision = decide_limit(100, 100, "fail")
    assert decision.read_limit is None and decision.skipped == 0 and not decision.truncated


def test_limit_fail_says_counts_and_that_nothing_was_sent():
    with pytest.raises(LimitExceededError, match=r"101 rows, over the export's limit of 100 profiles; nothing was sent"):
        decide_limit(101, 100, "fail")


def test_limit_truncate_counts_skipped():
    decision = decide_limit(250, 100, "truncate")
    assert decision.read_limit == 100 and decision.skipped == 150 and decision.truncated
