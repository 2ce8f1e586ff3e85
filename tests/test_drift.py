"""The drift comparison (pure): the state's keys against what the destination holds."""

from __future__ import annotations

import pytest

from segment_export.drift import (
    ADDED_OUTSIDE, KINDS, MEMBER, REMOVED_OUTSIDE, SUPPRESSED, UNSUBSCRIBED, DriftReport, Held, collect, compare,
)


def held(*items: tuple[str, str]) -> list[Held]:
    return [Held(key, status, f"ref {key}") for key, status in items]


def test_each_kind_is_found_and_members_in_step_are_not_reported():
    membership = collect([
        held(("a@x.org", MEMBER), ("b@x.org", UNSUBSCRIBED)),
        held(("c@x.org", SUPPRESSED), ("hand@x.org", MEMBER)),
    ])
    found = dict(compare(["a@x.org", "b@x.org", "c@x.org", "gone@x.org"], membership))
    assert found == {
        "b@x.org": UNSUBSCRIBED, "c@x.org": SUPPRESSED, "gone@x.org": REMOVED_OUTSIDE,
        "ref hand@x.org": ADDED_OUTSIDE,  # keyed by the destination's id: not an address the segment has
    }


def test_an_empty_target_makes_every_remembered_profile_removed_and_an_empty_state_every_held_one_added():
    assert list(compare(["a@x.org"], {})) == [("a@x.org", REMOVED_OUTSIDE)]
    assert list(compare([], collect([held(("a@x.org", MEMBER))]))) == [("ref a@x.org", ADDED_OUTSIDE)]
    assert list(compare([], {})) == []


def test_a_profile_seen_twice_counts_once_with_the_status_that_says_more():
    membership = collect([held(("a@x.org", MEMBER)), held(("a@x.org", UNSUBSCRIBED)), held(("a@x.org", MEMBER))])
    assert list(membership) == ["a@x.org"] and membership["a@x.org"].status == UNSUBSCRIBED
    assert list(compare(["a@x.org"], membership)) == [("a@x.org", UNSUBSCRIBED)]


def test_page_order_does_not_change_the_result():
    pages = [held(("a@x.org", MEMBER), ("b@x.org", SUPPRESSED)), held(("c@x.org", MEMBER))]
    forward = sorted(compare(["a@x.org", "b@x.org", "d@x.org"], collect(pages)))
    backward = sorted(compare(["d@x.org", "b@x.org", "a@x.org"], collect([list(reversed(p)) for p in reversed(pages)])))
    assert forward == backward == [
        ("b@x.org", SUPPRESSED), ("d@x.org", REMOVED_OUTSIDE), ("ref c@x.org", ADDED_OUTSIDE)]


def test_a_held_profile_without_an_email_is_added_outside_by_its_id():
    membership = collect([[Held("", MEMBER, "klaviyo profile 01P")]])
    assert list(compare(["a@x.org"], membership)) == [("a@x.org", REMOVED_OUTSIDE), ("klaviyo profile 01P", ADDED_OUTSIDE)]


def test_an_unknown_status_is_refused():
    with pytest.raises(ValueError, match="unknown membership status 'archived'"):
        Held("a@x.org", "archived", "r")


def test_the_report_lists_every_kind():
    report = DriftReport(held=3, repair=True, repaired=1)
    report.counts[REMOVED_OUTSIDE] += 1
    assert report.as_dict() == {"held": 3, **dict.fromkeys(KINDS, 0), REMOVED_OUTSIDE: 1, "repair": True, "repaired": 1}
