"""A run's scratch file (``segment_export.staging``): the segment as read, the previous state, the work queues.

What the exporter relies on: the staged segment comes back one profile per key, in the order the diff merges
by, with every segment its rows were in and the same payload whatever order the source returned rows in;
the previous state comes back in that same order; the queues hand back exactly what was queued, grouped and
chunked as the destinations send it; the mass-removal guard's hold keeps removed segments remembered.
"""

from __future__ import annotations

import random
import tracemalloc

import pytest

from segment_export.diff import Current, Previous, diff
from segment_export.staging import Staging


@pytest.fixture
def staging(tmp_path):
    s = Staging(str(tmp_path))
    yield s
    s.close()


def row(key: str, segment: str = "vip", fingerprint: str | None = None) -> tuple[str, str, bytes, str, None]:
    """A staged source row; the payload names its fingerprint so a test can tell which row's payload won."""
    fingerprint = fingerprint or f"fp-{key}"
    return key, fingerprint, f"payload {fingerprint}".encode(), segment, None


# -- the file ---------------------------------------------------------------------------------------------------

def test_the_file_lives_in_the_given_folder_until_closed(tmp_path):
    s = Staging(str(tmp_path))
    assert s.path.parent == tmp_path and s.path.name.startswith("segment-export-") and s.path.suffix == ".db"
    assert s.path.exists()
    s.add([row("a@x.com")])
    s.close()
    assert not s.path.exists()
    assert list(tmp_path.iterdir()) == []


def test_seal_keeps_the_one_transaction_and_the_connection_reads_its_own_writes(staging):
    # why: a commit per statement wrote the dirty pages out each time (12.3 s against 1.2 s, see seal's docstring)
    assert staging.conn.in_transaction
    staging.add([row("a@x.com")])
    staging.seal()
    assert staging.conn.in_transaction
    staging.queue_tags([("a@x.com", "fp-a@x.com", ("vip",), ("vip",), ())])
    assert staging.conn.in_transaction
    assert [c.key for c in staging.current()] == ["a@x.com"]
    assert list(staging.tag_chunks(10)) == [("vip", "+", ["a@x.com"])]


# -- the staged segment: current() ------------------------------------------------------------------------------

def test_rows_come_back_as_profiles_in_key_order_with_their_payloads(staging):
    staging.add([row("c@x.com"), row("a@x.com", "new")])
    staging.add([row("b@x.com")])
    staging.seal()
    assert list(staging.current()) == [
        Current("a@x.com", "fp-a@x.com", b"payload fp-a@x.com", ("new",)),
        Current("b@x.com", "fp-b@x.com", b"payload fp-b@x.com", ("vip",)),
        Current("c@x.com", "fp-c@x.com", b"payload fp-c@x.com", ("vip",)),
    ]
    assert (staging.rows, staging.duplicates) == (3, 0)


def test_a_profile_in_several_segments_is_staged_once_with_all_of_them_sorted(staging):
    staging.add([row("a@x.com", "vip"), row("b@x.com", "vip")])
    staging.add([row("a@x.com", "churn"), row("a@x.com", "newsletter")])
    staging.seal()
    profiles = list(staging.current())
    assert [(p.key, p.segments) for p in profiles] == [("a@x.com", ("churn", "newsletter", "vip")), ("b@x.com", ("vip",))]
    assert staging.rows == 4 and staging.duplicates == 2  # the two rows folded into a@x.com's profile


def test_the_same_row_twice_counts_as_a_duplicate_and_does_not_repeat_its_segment(staging):
    staging.add([row("a@x.com"), row("a@x.com"), row("a@x.com")])
    (profile,) = staging.current()
    assert profile.segments == ("vip",)
    assert staging.duplicates == 2


def test_snapshot_rows_keep_one_row_per_hash_and_the_profile_each_key_makes(staging):
    hashed = [("b@x.com", "fp-b", b"payload b", "vip", "h1"), ("a@x.com", "fp-a2", b"payload a2", "news", "h3"),
              ("a@x.com", "fp-a1", b"payload a1", "vip", "h2"), ("a@x.com", "fp-a1", b"payload a1", "vip", "h2"),
              ("c@x.com", "fp-c", b"payload c", "vip", None)]  # no hash: not in the snapshot (e.g. invalid)
    staging.add(hashed)
    rows = [r for chunk in staging.snapshot_rows(2) for r in chunk]
    assert rows == [("h2", "a@x.com", "payload a1", "vip", "fp-a1", '["news", "vip"]'),  # the repeated row once
                    ("h3", "a@x.com", "payload a2", "news", "fp-a1", '["news", "vip"]'),
                    ("h1", "b@x.com", "payload b", "vip", "fp-b", '["vip"]')]


def test_differing_payloads_of_one_key_fold_to_the_smallest_fingerprint_whatever_the_row_order(tmp_path):
    rows = [row("a@x.com", "vip", "fp-2"), row("a@x.com", "churn", "fp-1"), row("a@x.com", "new", "fp-3"),
            row("b@x.com", "vip", "fp-0")]
    seen = set()
    for seed in range(6):
        shuffled = rows[:]
        random.Random(seed).shuffle(shuffled)
        s = Staging(str(tmp_path))
        try:
            s.add(shuffled)
            seen.add(tuple(s.current()))
        finally:
            s.close()
    assert seen == {(
        Current("a@x.com", "fp-1", b"payload fp-1", ("churn", "new", "vip")),
        Current("b@x.com", "fp-0", b"payload fp-0", ("vip",)),
    )}


def test_duplicates_are_counted_afresh_on_each_read(staging):
    staging.add([row("a@x.com", "vip"), row("a@x.com", "churn")])
    assert len(list(staging.current())) == 1 and staging.duplicates == 1
    assert len(list(staging.current())) == 1 and staging.duplicates == 1  # not 2: the count is of one read


def test_a_key_whose_rows_straddle_a_read_chunk_is_still_one_profile(staging):
    # current() fetches 5,000 rows at a time; the fold must carry a profile across that boundary
    staging.add([row(f"k{i:05d}") for i in range(4999)])
    staging.add([row("k04999", seg) for seg in ("a", "b", "c")])  # rows 4,999, 5,000 and 5,001 in key order
    staging.add([row("k05000")])
    profiles = list(staging.current())
    assert len(profiles) == 5001 and staging.duplicates == 2
    assert profiles[4999].key == "k04999" and profiles[4999].segments == ("a", "b", "c")
    assert profiles[5000].key == "k05000"


@pytest.mark.parametrize("side", ["current", "previous"])
def test_reading_a_side_back_holds_a_chunk_in_memory_not_the_whole_segment(staging, side):
    # why a file: the exporter's memory stays flat at any segment size. These 30,000 profiles are ~14 MB as
    # Python objects read at once; streamed 5,000 at a time, ~4 MB.
    n, padding = 30_000, "x" * 100
    if side == "current":
        staging.add([(f"k{i:06d}@x.com", f"{i:032x}", padding.encode(), "vip", None) for i in range(n)])
    else:
        staging.load_previous(Previous(f"k{i:06d}@x.com", f"{i:032x}", (padding,)) for i in range(n))
    tracemalloc.start()
    try:
        count = sum(1 for _ in getattr(staging, side)())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == n
    assert peak < 8_000_000, f"peak {peak / 1e6:.1f} MB reading {n} staged profiles back"


def test_an_empty_segment_stages_nothing(staging):
    staging.add([])
    staging.seal()
    assert list(staging.current()) == [] and (staging.rows, staging.duplicates) == (0, 0)


# -- the previous state: load_previous() / previous() -----------------------------------------------------------

def test_previous_comes_back_in_key_order_with_its_segments(staging):
    staging.load_previous(iter([
        Previous("c@x.com", "f3", ("vip",)),
        Previous("a@x.com", "f1", ("churn", "vip")),
        Previous("b@x.com", "f2", ()),
    ]))
    assert list(staging.previous()) == [
        Previous("a@x.com", "f1", ("churn", "vip")),
        Previous("b@x.com", "f2", ()),  # no segments: an empty tuple, not ("",)
        Previous("c@x.com", "f3", ("vip",)),
    ]
    assert staging.previous_rows == 3


def test_previous_over_one_insert_batch_is_loaded_whole(staging):
    # load_previous writes 10,000 rows at a time: the rows past a full batch, and the last partial one, count too
    staging.load_previous(Previous(f"k{i:05d}", "fp", ("vip",)) for i in range(10_001))
    keys = [p.key for p in staging.previous()]
    assert len(keys) == 10_001 == staging.previous_rows and keys[-1] == "k10000"


def test_both_sides_come_back_in_the_order_the_diff_merges_by(staging):
    # why the state is copied here: both sides must be sorted by one collation (PostgreSQL sorts by locale);
    # SQLite's BINARY order must be Python's str order, the order diff() compares keys with
    keys = ["ä@x.com", "z@x.com", "a@x.com", "Z@x.com", "a.b@x.com", "ab@x.com", "a@x.co", "ø@x.com", "😀@x.com"]
    staging.add([row(k) for k in reversed(keys)])
    staging.load_previous(Previous(k, f"fp-{k}", ("vip",)) for k in keys)
    assert [c.key for c in staging.current()] == sorted(keys) == [p.key for p in staging.previous()]
    changes = list(diff(staging.current(), staging.previous()))
    assert [(c.key, c.kind) for c in changes] == [(k, "unchanged") for k in sorted(keys)]


# -- tag queue: queue_tags / tag_chunks / tag_segments / pending ------------------------------------------------

def test_tag_changes_come_back_grouped_by_segment_and_operation_in_chunks(staging):
    staging.queue_tags([
        ("c@x.com", "f3", ("vip", "new"), ("vip", "new"), ()),
        ("a@x.com", "f1", ("vip",), ("vip",), ("old",)),
        ("b@x.com", "f2", ("vip",), ("vip",), ("old",)),
        ("d@x.com", "f4", ("new",), (), ("vip",)),
    ])
    assert list(staging.tag_chunks(2)) == [
        ("new", "+", ["c@x.com"]),
        ("old", "-", ["a@x.com", "b@x.com"]),
        ("vip", "+", ["a@x.com", "b@x.com"]),
        ("vip", "+", ["c@x.com"]),
        ("vip", "-", ["d@x.com"]),
    ]
    assert sorted(staging.tag_segments()) == ["new", "vip"]  # only segments something is added to (created first)


def test_tag_chunks_never_exceed_their_size(staging):
    keys = [f"k{i:04d}" for i in range(1001)]
    staging.queue_tags([(k, "fp", ("vip",), ("vip",), ()) for k in keys])
    chunks = list(staging.tag_chunks(500))
    assert [len(keys_) for _, _, keys_ in chunks] == [500, 500, 1]
    assert [k for _, _, keys_ in chunks for k in keys_] == keys


def test_nothing_queued_gives_no_chunks(staging):
    assert (list(staging.tag_chunks(500)), staging.tag_segments(), list(staging.pending())) == ([], [], [])


def test_profiles_waiting_on_tags_are_pending_with_their_segments_now(staging):
    staging.queue_tags([
        ("b@x.com", "f2", ("new", "vip"), ("new",), ()),
        ("a@x.com", "f1", ("vip",), (), ("old",)),
        ("gone@x.com", "", (), (), ("vip",)),  # a leaver (no fingerprint): forgotten, never remembered again
    ])
    assert list(staging.pending()) == [("a@x.com", "f1", ("vip",)), ("b@x.com", "f2", ("new", "vip"))]
    assert ("vip", "-", ["gone@x.com"]) in list(staging.tag_chunks(10))  # but its tag still goes


def test_a_profile_queued_again_is_pending_once_with_the_last_queued_state(staging):
    staging.queue_tags([("a@x.com", "f1", ("vip",), ("vip",), ())])
    staging.queue_tags([("a@x.com", "f2", ("vip", "new"), ("new",), ())])
    assert list(staging.pending()) == [("a@x.com", "f2", ("vip", "new"))]


def test_withheld_removals_are_not_sent_and_their_segments_stay_remembered(staging):
    staging.queue_tags([
        ("a@x.com", "f1", ("new",), ("new",), ("vip", "churn")),
        ("b@x.com", "f2", ("vip",), ("vip",), ()),
    ])
    staging.queue_tags([("gone@x.com", "", (), (), ("vip",))])
    assert staging.withheld is False
    staging.withhold_removals()
    assert staging.withheld is True
    assert list(staging.tag_chunks(10)) == [("new", "+", ["a@x.com"]), ("vip", "+", ["b@x.com"])]
    # a@x.com gained "new" but keeps the segments whose removal was held: the next run tries them again
    assert list(staging.pending()) == [("a@x.com", "f1", ("churn", "new", "vip")), ("b@x.com", "f2", ("vip",))]


def test_withholding_is_per_staging_file(tmp_path, staging):
    staging.withhold_removals()
    other = Staging(str(tmp_path))
    try:
        other.queue_tags([("a@x.com", "f1", (), (), ("vip",))])
        assert other.withheld is False and list(other.tag_chunks(10)) == [("vip", "-", ["a@x.com"])]
    finally:
        other.close()


# -- leavers ----------------------------------------------------------------------------------------------------

def test_leavers_come_back_by_key_with_their_segments_in_chunks(staging):
    for i in (3, 0, 4, 1, 2):
        staging.queue_leaver(f"k{i}@x.com", ("vip", "churn") if i == 0 else ())
    assert list(staging.leavers(2)) == [
        [("k0@x.com", ("vip", "churn")), ("k1@x.com", ())],
        [("k2@x.com", ()), ("k3@x.com", ())],
        [("k4@x.com", ())],
    ]
    assert list(staging.leaver_chunks(3)) == [["k0@x.com", "k1@x.com", "k2@x.com"], ["k3@x.com", "k4@x.com"]]


def test_a_leaver_queued_twice_leaves_once(staging):
    staging.queue_leaver("a@x.com", ("vip",))
    staging.queue_leaver("a@x.com", ("vip", "churn"))
    assert list(staging.leavers(10)) == [[("a@x.com", ("vip", "churn"))]]


def test_no_leavers_give_no_chunks(staging):
    assert list(staging.leavers(10)) == [] and list(staging.leaver_chunks(10)) == []


def test_staged_leavers_are_what_the_diff_found_against_the_previous_state(staging):
    staging.add([row("a@x.com"), row("c@x.com")])
    staging.load_previous([Previous("a@x.com", "fp-a@x.com", ("vip",)), Previous("b@x.com", "x", ("vip", "old"))])
    staging.seal()
    for change in diff(staging.current(), staging.previous()):
        if change.kind == "leave":
            staging.queue_leaver(change.key, change.previous_segments)
    assert list(staging.leavers(10)) == [[("b@x.com", ("vip", "old"))]]
