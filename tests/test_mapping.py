"""Mapping rows to profiles: required email, text conversion, attributes, and the missing-column error."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

import pytest

from segment_export.mapping import MissingColumnsError, Profile, Rejection, RowMapper
from segment_export.spec import MappingSpec

COLUMNS = ["customer_id", "email", "first_name", "last_name", "phone", "tier", "ltv", "since", "secret"]
MAPPING = MappingSpec(
    email="email", first_name="first_name", last_name="last_name", phone_number="phone",
    external_id="customer_id", attributes={"loyalty_tier": "tier", "ltv": "ltv", "since": "since"},
)


def test_missing_column_names_it_and_the_available_ones():
    with pytest.raises(MissingColumnsError) as info:
        RowMapper(MAPPING, ["email", "first_name"])
    message = str(info.value)
    assert "'last_name'" in message and "'phone'" in message and "'customer_id'" in message
    assert "the source has: email, first_name" in message
    assert "first_name'" not in message.split("the source has")[0]


def test_row_becomes_profile_with_only_mapped_fields():
    mapper = RowMapper(MAPPING, COLUMNS)
    row = (42, "  Ada@Example.COM ", "Ada", None, "+14155550100", "gold", Decimal("12.50"), date(2020, 1, 2), "do-not-send")
    profile = mapper.map(row)
    assert isinstance(profile, Profile)
    assert profile.email == "Ada@Example.COM" and profile.key == "ada@example.com"
    assert profile.external_id == "42" and profile.first_name == "Ada" and profile.last_name is None
    assert profile.attributes == {"loyalty_tier": "gold", "ltv": 12.5, "since": "2020-01-02"}
    assert "do-not-send" not in repr(profile)


@pytest.mark.parametrize(
    "email, reason",
    [(None, "email is empty"), ("   ", "email is empty"), (float("nan"), "email is empty"),
     ("not-an-email", "email is not a valid address"), ("a@b", "email is not a valid address"),
     ("a b@example.com", "email is not a valid address"), ("x" * 250 + "@example.com", "email is not a valid address"),
     (b"\xff\xfe@example.com", "email is not valid UTF-8")],
)
def test_bad_emails_are_rejected_with_a_reason_without_the_address(email, reason):
    mapper = RowMapper(MappingSpec(email="email"), ["email"])
    result = mapper.map((email,))
    assert result == Rejection(reason)


def test_numbers_in_text_fields_become_text_and_blanks_are_dropped():
    mapper = RowMapper(MappingSpec(email="e", first_name="f", attributes={"A": "a", "B": "b"}), ["e", "f", "a", "b"])
    profile = mapper.map(("a@example.com", 12.0, "", 7))
    assert profile.first_name == "12" and profile.attributes == {"B": 7}


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), Decimal("Infinity")])
def test_an_infinite_number_rejects_the_row_instead_of_sending_null(value):
    mapper = RowMapper(MappingSpec(email="e", attributes={"A": "a"}), ["e", "a"])
    assert mapper.map(("a@example.com", value)) == Rejection("a mapped number is infinite")
    assert mapper.map(("a@example.com", Decimal("NaN"))).attributes == {}  # NaN is a blank


def test_numpy_scalars_and_str_subclasses_are_sent_as_plain_json():
    import json

    import numpy as np

    from segment_export.destinations.klaviyo.destination import profile_fragment

    class Code(str):
        pass

    mapper = RowMapper(MappingSpec(email="e", attributes={"f": "f", "i": "i", "s": "s", "c": "c"}), ["e", "f", "i", "s", "c"])
    profile = mapper.map(("a@example.com", np.float64(1.5), np.int64(3), np.str_("gold"), Code("x")))
    sent = json.loads(profile_fragment(profile))
    assert sent["attributes"]["properties"] == {"f": 1.5, "i": 3, "s": "gold", "c": "x"}


def with_region(mapping: MappingSpec, region: str | None) -> MappingSpec:
    """``mapping.phone_region`` (the spec field comes with the spec's own change; set here without validation)."""
    copy = mapping.model_copy()
    object.__setattr__(copy, "phone_region", region)
    return copy


@pytest.mark.parametrize(
    "region, written, sent",
    [(None, "+14155550100", "+14155550100"), (None, "+1 (415) 555-0100", "+14155550100"),
     (None, "+44 20 7946 0000", "+442079460000"), (None, 14155550100.0, None),
     ("US", "(415) 555-0100", "+14155550100"), ("US", "+44 20 7946 0000", "+442079460000"),
     ("GB", "020 7946 0000", "+442079460000"), ("US", 4155550100, "+14155550100")],
)
def test_phone_numbers_are_sent_in_e164_with_the_region_for_national_ones(region, written, sent):
    mapper = RowMapper(with_region(MappingSpec(email="e", phone_number="p"), region), ["e", "p"])
    result = mapper.map(("a@example.com", written))
    if sent is None:  # 14155550100 without a "+": no country code, and no region to assume
        assert result == Rejection("phone_number has no country code (+...) and mapping.phone_region is not set")
    else:
        assert result.phone_number == sent


@pytest.mark.parametrize(
    "region, written, reason",
    [(None, "(415) 555-0100", "phone_number has no country code (+...) and mapping.phone_region is not set"),
     (None, "+14150001234", "phone_number is not a valid number (libphonenumber)"),  # the old demo data's numbers
     ("US", "12", "phone_number is not a valid number (libphonenumber)"),
     ("US", "call me", "phone_number is not a phone number"),
     (None, "+999 1234567", "phone_number has an unknown country code"),
     ("US", "+999 1234567", "phone_number has an unknown country code")],
)
def test_bad_phone_numbers_reject_the_row_with_a_reason_without_the_number(region, written, reason):
    mapper = RowMapper(with_region(MappingSpec(email="e", phone_number="p"), region), ["e", "p"])
    assert mapper.map(("a@example.com", written)) == Rejection(reason)
    assert mapper.map(("a@example.com", "  ")).phone_number is None  # a blank phone is no phone


def test_phone_numbers_are_not_parsed_when_the_column_is_not_mapped(monkeypatch):
    import segment_export.mapping as mapping

    monkeypatch.setattr(mapping, "phone_normaliser", lambda region: pytest.fail("parsed without a phone column"))
    assert RowMapper(MappingSpec(email="e", first_name="p"), ["e", "p"]).map(("a@example.com", "+1415")).first_name == "+1415"


def test_numbers_written_in_e164_get_the_same_answer_as_through_the_librarys_parse():
    import phonenumbers

    from segment_export.mapping import phone_normaliser

    normalise = phone_normaliser(None)
    numbers = ["+14155550100", "+12015550199", "+14150001234", "+442079460000", "+4420794600", "+390612345678",
               "+393471234567", "+33142685300", "+8613912345678", "+61291234567", "+5511912345678", "+9715012345678",
               "+999123456789", "+1415555010", "+14155550100123", "+12015550100\n", "+12015550100x"]
    for number in numbers:
        try:
            parsed = phonenumbers.parse(number, None)
            full = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164) if phonenumbers.is_valid_number(parsed) else None
        except phonenumbers.NumberParseException:
            full = None
        got = normalise(number)
        assert (got if isinstance(got, str) else None) == full, number


def test_the_phone_validity_shortcut_answers_as_the_library_does():
    """mapping.phone_normaliser's shortcut (the country code's first region tried first) against
    phonenumbers.is_valid_number, on valid and invalid numbers of several countries, +1's regions included."""
    import phonenumbers

    import segment_data

    written = [segment_data.phone(i) for i in range(1, 200)] + [
        "+14165550123", "+16135550199", "+18095550123", "+12425550123", "+12025550142", "+12345678901",
        "+447911123456", "+441624123456", "+441534123456", "+442071234567", "+4479111234",  # GB, IM, JE
        "+79161234567", "+77012345678", "+33612345678", "+3361234", "+393123456789", "+390612345678",
        "+61412345678", "+8613812345678", "+5511912345678", "+4915112345678", "+12125550000", "+19999999999",
        "+2615353704", "+67287545",  # valid once parse applies Madagascar's and Norfolk Island's prefix rules
    ]
    mapper = RowMapper(MappingSpec(email="e", phone_number="p"), ["e", "p"])
    for number in written:
        parsed = phonenumbers.parse(number, None)
        expected = phonenumbers.is_valid_number(parsed)
        result = mapper.map(("a@example.com", number))
        assert (not isinstance(result, Rejection)) == expected, number
        if expected:
            assert result.phone_number == phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
