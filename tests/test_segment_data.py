"""The demo's synthetic segment data: phone numbers the exporter accepts, one per customer."""

from __future__ import annotations

import phonenumbers
import segment_data


def test_demo_phone_numbers_are_valid_e164_and_unique_per_customer():
    customers = len(segment_data.AREA_CODES) * len(segment_data.LINES)
    assert customers > 1_400_000  # the benchmarks' million customers, each with a phone of its own
    phones = [segment_data.phone(i) for i in range(1, customers + 1)]
    assert len(set(phones)) == customers
    for number in phones[:: 997] + phones[:200] + phones[-200:]:
        parsed = phonenumbers.parse(number)
        assert phonenumbers.is_valid_number(parsed), number
        assert phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164) == number
    assert phones[0] == "+12015550100" and all(p[5:8] == "555" for p in phones[:: 997])
    assert {r[4] for r in segment_data.rows(30)} == {segment_data.phone(i) for i in range(1, 31)}


def test_segment_sizes_count_the_rows_of_each_segment():
    from collections import Counter

    assert segment_data.segment_sizes(1234) == dict(Counter(r[-1] for r in segment_data.rows(1234)))
