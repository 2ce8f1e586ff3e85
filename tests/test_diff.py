"""The sync diff (``segment_export.diff``): one merge pass over two key-sorted streams, pure, no I/O.

What the exporter relies on: every profile comes out exactly once with the right kind, carrying what the next
step needs (the fingerprint and payload to send, the segments now and before), in key order, and the inputs
are consumed as a stream (constant memory, whatever the size of the segment).
"""

from __future__ import annotations

from itertools import islice

import pytest

from segment_export.diff import Change, Current, Previous, diff


def cur(key: str, fingerprint: str = "fp", segments: tuple[str, ...] = ("vip",)) -> Current:
    """A current profile whose payload names its key and fingerprint, so a test can tell payloads apart."""
    return Current(key, fingerprint, f"{key}|{fingerprint}".encode(), segments)


def prev(key: str, fingerprint: str = "fp", segments: tuple[str, ...] = ("vip",)) -> Previous:
    return Previous(key, fingerprint, segments)


def kinds(changes) -> list[tuple[str, str]]:
    return [(c.key, c.kind) for c in changes]


# -- each kind of change --------------------------------------------------------------------------------------

def test_a_profile_not_in_the_state_is_created_with_its_payload_and_no_previous_segments():
    (change,) = diff([cur("a@x.com", "f1", ("vip", "new"))], [])
    assert change == Change("a@x.com", "create", "f1", b"a@x.com|f1", ("vip", "new"), ())
    assert change.send_profile is True
    assert change.segments_added == ("vip", "new") and change.segments_removed == ()


def test_a_remembered_profile_missing_from_the_segment_leaves_with_the_segments_it_was_in():
    (change,) = diff([], [prev("a@x.com", "f1", ("vip", "old"))])
    assert change == Change("a@x.com", "leave", None, None, (), ("vip", "old"))
    assert change.send_profile is False
    # a leaver loses every segment it had: that is what its tag / list removals are built from
    assert change.segments_removed == ("vip", "old") and change.segments_added == ()


def test_the_same_fingerprint_is_unchanged_and_not_sent():
    (change,) = diff([cur("a@x.com", "f1")], [prev("a@x.com", "f1")])
    assert change == Change("a@x.com", "unchanged", "f1", b"a@x.com|f1", ("vip",), ("vip",))
    assert change.send_profile is False


def test_another_fingerprint_is_an_update_carrying_the_new_fingerprint_and_payload():
    (change,) = diff([cur("a@x.com", "new")], [prev("a@x.com", "old")])
    assert change == Change("a@x.com", "update", "new", b"a@x.com|new", ("vip",), ("vip",))
    assert change.send_profile is True


def test_changes_are_change_tuples_readable_by_name_and_by_position():
    # the diff builds them with tuple.__new__ (speed); the exporter reads both change.kind and change[5]
    (change,) = diff([cur("a@x.com", "f2", ("b",))], [prev("a@x.com", "f1", ("a",))])
    assert type(change) is Change
    assert (change.key, change.kind, change.fingerprint, change.segments, change.previous_segments) == (
        "a@x.com", "update", "f2", ("b",), ("a",))
    assert change[5] == change.previous_segments == ("a",)


# -- segments moving ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fingerprint_now, kind", [("f1", "unchanged"), ("f2", "update")])
def test_segments_added_and_removed_are_independent_of_the_fingerprint(fingerprint_now, kind):
    # segments are not part of the fingerprint: a profile can move between segments and be "unchanged"
    (change,) = diff([cur("a@x.com", fingerprint_now, ("a", "c", "d"))], [prev("a@x.com", "f1", ("a", "b"))])
    assert change.kind == kind
    assert change.segments_added == ("c", "d")
    assert change.segments_removed == ("b",)


def test_the_same_segments_in_another_order_add_and_remove_nothing():
    (change,) = diff([cur("a@x.com", segments=("a", "b"))], [prev("a@x.com", segments=("b", "a"))])
    assert (change.kind, change.segments_added, change.segments_removed) == ("unchanged", (), ())


def test_a_remembered_profile_with_no_segments_gains_all_of_them():
    (change,) = diff([cur("a@x.com", segments=("vip",))], [prev("a@x.com", segments=())])
    assert (change.segments_added, change.segments_removed) == (("vip",), ())


# -- full resync ----------------------------------------------------------------------------------------------

def test_full_resync_turns_every_unchanged_profile_into_an_update_and_nothing_else():
    current = [cur("a@x.com", "f1"), cur("b@x.com", "f2"), cur("c@x.com", "f3")]
    previous = [prev("b@x.com", "f2"), prev("c@x.com", "old"), prev("d@x.com", "f4")]
    normal = kinds(diff(current, previous))
    resync = list(diff(current, previous, full_resync=True))
    assert normal == [("a@x.com", "create"), ("b@x.com", "unchanged"), ("c@x.com", "update"), ("d@x.com", "leave")]
    assert kinds(resync) == [("a@x.com", "create"), ("b@x.com", "update"), ("c@x.com", "update"), ("d@x.com", "leave")]
    resent = resync[1]
    assert (resent.fingerprint, resent.fragment, resent.previous_segments) == ("f2", b"b@x.com|f2", ("vip",))


# -- the merge ------------------------------------------------------------------------------------------------

def test_interleaved_streams_give_one_change_per_key_in_key_order():
    current = [cur(k) for k in ("b", "c", "e", "f", "h")]
    previous = [prev(k) for k in ("a", "c", "d", "f", "g", "i")]
    assert kinds(diff(current, previous)) == [
        ("a", "leave"), ("b", "create"), ("c", "unchanged"), ("d", "leave"), ("e", "create"),
        ("f", "unchanged"), ("g", "leave"), ("h", "create"), ("i", "leave"),
    ]


def test_keys_compare_as_python_strings_by_code_point():
    # staging sorts with SQLite's BINARY collation (UTF-8 bytes), which orders like Python's str comparison;
    # the merge compares with <, so "Z" < "a" < "ä" and a prefix comes before its extensions
    keys = sorted(["ä@x.com", "a@x.com", "Z@x.com", "a.b@x.com", "ab@x.com", "a@x.co"])
    assert keys == ["Z@x.com", "a.b@x.com", "a@x.co", "a@x.com", "ab@x.com", "ä@x.com"]
    changes = list(diff([cur(k) for k in keys], [prev(k) for k in keys]))
    assert kinds(changes) == [(k, "unchanged") for k in keys]


def test_the_merge_assumes_sorted_input_and_does_not_sort_itself():
    # The contract is on the caller (Staging reads both sides back ORDER BY key): an out-of-order stream is not
    # detected, and the same key then reads as a create and a leave. Pinned so a change of contract is noticed.
    changes = kinds(diff([cur("b"), cur("a")], [prev("a")]))
    assert changes == [("a", "leave"), ("b", "create"), ("a", "create")]


def test_the_inputs_are_consumed_as_streams_never_read_ahead():
    pulled = {"current": 0, "previous": 0}

    def stream(side: str, make, keys):
        for key in keys:
            pulled[side] += 1
            yield make(key)

    current = stream("current", cur, (f"{i:06d}" for i in range(0, 10**9, 2)))  # endless: never materialised
    previous = stream("previous", prev, (f"{i:06d}" for i in range(0, 10**9, 3)))
    first = kinds(islice(diff(current, previous), 5))
    assert first == [("000000", "unchanged"), ("000002", "create"), ("000003", "leave"), ("000004", "create"),
                     ("000006", "unchanged")]
    # exactly the items behind those five changes (current 0, 2, 4, 6; previous 0, 3, 6): nothing read ahead
    assert pulled == {"current": 4, "previous": 3}


# -- empty inputs ---------------------------------------------------------------------------------------------

def test_both_sides_empty_give_no_changes():
    assert list(diff([], [])) == []
    assert list(diff(iter(()), iter(()), full_resync=True)) == []


def test_a_first_run_creates_everyone_and_an_empty_segment_makes_everyone_leave():
    keys = ["a", "b", "c"]
    assert kinds(diff([cur(k) for k in keys], [])) == [(k, "create") for k in keys]
    assert kinds(diff([], [prev(k) for k in keys])) == [(k, "leave") for k in keys]
    assert kinds(diff([], [prev(k) for k in keys], full_resync=True)) == [(k, "leave") for k in keys]
