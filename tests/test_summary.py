"""What an export did, in counts (``segment_export.summary``): the task's XCom value and the end of its log.

What the exporter and its readers rely on: batches add up (``sent == accepted + rejected + skipped``),
counts a destination does not give stay "not known" (None, "n/a") instead of 0, reasons are counted by kind,
and the XCom value is plain JSON with every count the README lists.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from segment_export.summary import PHASES, BatchResult, ExportSummary


def summary(**counts) -> ExportSummary:
    return ExportSummary("vip_to_klaviyo", "klaviyo", "Y6nRLr", **counts)


def result(accepted: int, rejected: dict | None = None, skipped: dict | None = None, **extra) -> BatchResult:
    return BatchResult(accepted, rejected=Counter(rejected or {}), skipped=Counter(skipped or {}), **extra)


# -- add_batch ------------------------------------------------------------------------------------------------

def test_batches_add_up_and_keep_the_invariant():
    s = summary()
    s.add_batch(10, result(7, {"invalid email": 2}, {"suppressed": 1}))
    s.add_batch(5, result(3, {"invalid email": 1, "too long": 1}))
    assert (s.batches, s.sent, s.accepted, s.rejected, s.skipped) == (2, 15, 10, 4, 1)
    assert s.sent == s.accepted + s.rejected + s.skipped and s.consistent is True
    assert s.rejected_reasons == Counter({"invalid email": 3, "too long": 1})
    assert s.skipped_reasons == Counter({"suppressed": 1})


def test_a_batch_with_profiles_unaccounted_for_breaks_the_invariant():
    s = summary()
    s.add_batch(10, result(8, {"invalid email": 1}))  # one profile neither accepted, rejected nor skipped
    assert s.consistent is False
    over = summary()
    over.add_batch(2, result(2, {"x": 1}))  # nor may more be accounted for than were sent
    assert over.consistent is False


def test_an_empty_summary_is_consistent():
    assert summary().consistent is True and summary().batches == 0


@pytest.mark.parametrize("field", ["created", "updated", "subscribed", "pending"])
def test_counts_a_destination_does_not_give_stay_unknown_until_one_batch_gives_them(field):
    s = summary()
    s.add_batch(3, result(3))  # Klaviyo's bulk import: created / updated not known
    assert getattr(s, field) is None
    s.add_batch(3, result(3, **{field: 0}))
    assert getattr(s, field) == 0  # known now, and zero
    s.add_batch(4, result(4, **{field: 4}))
    s.add_batch(2, result(2))  # a later batch that does not say leaves the known count alone
    assert getattr(s, field) == 4


def test_created_and_updated_add_up_per_batch():
    s = summary()
    s.add_batch(500, result(498, {"x": 2}, created=300, updated=198))
    s.add_batch(200, result(200, created=0, updated=200))
    assert (s.created, s.updated, s.accepted) == (300, 398, 698)


def test_per_profile_keys_and_ids_do_not_change_the_counts():
    # the counts come from the destination's answer counts; keys only advance the sync state (the exporter)
    s = summary()
    s.add_batch(2, result(1, {"bad": 1}, accepted_keys={"a@x.com", "b@x.com"}, rejected_keys={"c@x.com": "bad"},
                          profile_ids={"a@x.com": "01H"}, updated_keys={"a@x.com"}))
    assert (s.sent, s.accepted, s.rejected, s.created, s.updated) == (2, 1, 1, None, None)


# -- invalid rows ---------------------------------------------------------------------------------------------

def test_invalid_rows_are_counted_by_reason_and_are_not_sent():
    s = summary()
    for reason in ("email is empty", "email is not a valid address", "email is empty"):
        s.add_invalid(reason)
    assert s.invalid == 3 and s.invalid_reasons == Counter({"email is empty": 2, "email is not a valid address": 1})
    assert (s.sent, s.rejected, s.consistent) == (0, 0, True)


# -- as_dict: the XCom value ------------------------------------------------------------------------------------

README_COUNTS = {"read", "segment_rows", "change_detection", "invalid", "duplicates", "skipped_by_limit", "sent", "accepted", "created", "updated",
                 "rejected", "skipped", "unchanged", "removed", "held_back", "tags_added", "tags_removed",
                 "subscribed", "pending", "batches", "seconds", "cpu_seconds"}


def test_the_xcom_value_is_plain_json_with_every_count():
    s = summary(read=12, duplicates=1, skipped_by_limit=2, unchanged=3, removed=1, held_back=0, tags_added=4,
                tags_removed=1, resumed=2, seconds=1.23456, cpu_seconds={"read": 0.12345, "sending": 2.0})
    s.add_invalid("email is empty")
    s.add_batch(8, result(6, {"invalid: bad address": 1}, {"suppressed": 1}, created=5, updated=1))
    value = s.as_dict()
    assert json.loads(json.dumps(value)) == value  # nothing that is not JSON (Counter, set, tuple, dataclass)
    assert README_COUNTS <= set(value)
    assert value == {
        "export_id": "vip_to_klaviyo", "destination": "klaviyo", "target_id": "Y6nRLr",
        "read": 12, "segment_rows": 0, "change_detection": "full", "invalid": 1, "duplicates": 1, "skipped_by_limit": 2, "sent": 8, "accepted": 6,
        "created": 5, "updated": 1, "rejected": 1, "skipped": 1, "unchanged": 3, "removed": 1, "held_back": 0,
        "subscribed": None, "pending": None, "tags_added": 4, "tags_removed": 1, "resumed": 2, "submitted": 0, "handles": [], "batches": 1,
        "seconds": 1.235, "dry_run": False, "planned": 0,
        "invalid_reasons": {"email is empty": 1}, "rejected_reasons": {"invalid: bad address": 1},
        "skipped_reasons": {"suppressed": 1}, "examples": [], "cpu_seconds": {"read": 0.123, "sending": 2.0},
        "drift": None, "verify_only": False,
    }
    assert type(value["rejected_reasons"]) is dict


def test_reasons_are_listed_most_frequent_first():
    s = summary()
    s.add_batch(6, result(0, {"rare": 1, "common": 3, "middle": 2}))
    assert list(s.as_dict()["rejected_reasons"].items()) == [("common", 3), ("middle", 2), ("rare", 1)]


def test_the_xcom_value_does_not_share_counters_with_the_summary():
    s = summary()
    s.add_invalid("email is empty")
    value = s.as_dict()
    value["invalid_reasons"]["email is empty"] = 99
    s.add_invalid("email is empty")
    assert s.invalid_reasons == Counter({"email is empty": 2}) and s.as_dict()["invalid_reasons"] == {"email is empty": 2}


def test_every_cpu_phase_is_described():
    assert list(PHASES) == ["read", "map", "stage", "diff", "state", "other", "sending", "workers"]
    assert all(PHASES.values())


# -- table: the log lines ---------------------------------------------------------------------------------------

def lines(text: str) -> dict[str, str]:
    """The table's rows as label -> value."""
    out = {}
    for line in text.splitlines()[1:]:
        label, _, value = line.strip().rpartition("  ")
        out[label.strip()] = value.strip()
    return out


def test_the_table_gives_each_count_and_says_what_is_not_known():
    s = summary(read=12, unchanged=3, tags_added=4, tags_removed=1, seconds=2.26)
    s.add_batch(8, result(6, {"bad": 2}))
    text = s.table()
    assert text.splitlines()[0] == "export vip_to_klaviyo -> klaviyo Y6nRLr"
    rows = lines(text)
    assert rows["read"] == "12" and rows["sent"] == "8" and rows["accepted"] == "6"
    assert rows["rejected by destination"] == "2" and rows["unchanged (not sent)"] == "3"
    assert rows["created"] == rows["updated"] == rows["subscribed (consent)"] == "n/a"
    assert rows["tags added / removed"] == "4 / 1" and rows["seconds"] == "2.3"
    assert "pending (double opt-in)" not in rows  # only on a double opt-in list
    assert "would send (dry run)" not in rows and "CPU s:" not in text


def test_the_table_shows_known_zeroes_pending_and_cpu():
    s = summary(cpu_seconds={"read": 0.31, "sending": 1.0})
    s.add_batch(2, result(2, created=0, updated=2, subscribed=0, pending=2))
    rows = lines(s.table())
    assert (rows["created"], rows["updated"], rows["subscribed (consent)"], rows["pending (double opt-in)"]) == (
        "0", "2", "0", "2")
    assert s.table().splitlines()[-1] == "  CPU s: read 0.3, sending 1.0"


def test_a_dry_runs_table_says_nothing_was_sent_and_what_would_be():
    s = summary(dry_run=True, planned=42, read=50)
    text = s.table()
    assert text.splitlines()[0] == "export vip_to_klaviyo -> klaviyo Y6nRLr (DRY RUN: nothing sent)"
    assert text.splitlines()[5] == f"  {'would send (dry run)':<24} {42:>10}"  # after read, invalid, duplicates, limit
    assert lines(text)["sent"] == "0"


def test_the_table_lists_the_five_commonest_reasons_of_each_kind():
    s = summary()
    s.add_batch(21, result(0, {f"reason {i}": i for i in range(1, 7)}))
    s.add_invalid("email is empty")
    reasons = [line for line in s.table().splitlines() if line.startswith(("  rejected:", "  invalid:"))]
    assert reasons == ["  invalid: 1 x email is empty"] + [f"  rejected: {i} x reason {i}" for i in (6, 5, 4, 3, 2)]
