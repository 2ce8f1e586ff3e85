"""Field mapping: a source row becomes a profile, or a rejection with a reason. Pure, no I/O.

Only mapped columns are read, so nothing else from the segment row can ever leave.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any, Sequence

from segment_export.spec import PROFILE_FIELDS, MappingSpec

# Pragmatic address check: what both destinations would refuse anyway, caught before it is sent.
_EMAIL_RE = re.compile(r"^[^@\s\"<>(),;:\\\[\]]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+$")
MAX_EMAIL_LENGTH = 254
_E164_RE = re.compile(r"\+[1-9]\d{6,14}")  # with fullmatch(): "+" and 7 to 15 digits, nothing else


class MissingColumnsError(ValueError):
    """The mapping names columns the source does not have; raised before anything is sent."""

    def __init__(self, missing: list[str], available: Sequence[str]):
        self.missing, self.available = missing, list(available)
        super().__init__(
            f"mapped column(s) {missing} not found in the source; the source has: {', '.join(self.available)}"
        )


@dataclass(slots=True)
class Profile:
    """One customer as the destination will hold it. ``key`` is the normalised email, used to de-duplicate."""

    email: str
    key: str
    first_name: str | None = None
    last_name: str | None = None
    phone_number: str | None = None
    external_id: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    consent: bool | None = None  # from mapping.consent; never sent as a field


@dataclass(frozen=True, slots=True)
class Rejection:
    """A row that cannot become a profile; ``reason`` never contains the row's personal data."""

    reason: str


def is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and not value.strip())


def to_text(value: Any) -> str | None:
    """A text field's value: numbers and dates become their usual text, blanks become None."""
    if is_blank(value):
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8")  # a UnicodeDecodeError is turned into a rejection by the caller
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    return str(value).strip()


class NotFinite(ValueError):
    """An infinite number: JSON cannot carry it, and sending null instead would clear the destination's value."""


def to_json_value(value: Any) -> Any:
    """An attribute's value as JSON can carry it (Decimal, dates and numpy scalars included)."""
    if is_blank(value):
        return None
    if isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if math.isinf(value):
            raise NotFinite(value)
        return value
    if isinstance(value, Decimal):
        if value.is_nan():
            return None
        if value.is_infinite():
            raise NotFinite(value)
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if hasattr(value, "item"):  # numpy / pandas scalars
        return to_json_value(value.item())
    if hasattr(value, "isoformat"):  # pandas Timestamp
        return value.isoformat()
    return str(value)


_TRUE = {"true", "t", "yes", "y", "1"}


def to_consent(value: Any) -> bool:
    """True only for an explicit yes (true, 1, 'yes', 'y', 't'); blanks and anything else are not consent."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and not is_blank(value):
        return value == 1
    text = to_text(value)
    return text is not None and text.lower() in _TRUE


def phone_normaliser(region: str | None):
    """A function from a phone number as written to its E.164 form (what Klaviyo takes, and Mailchimp stores as
    given) or a :class:`Rejection` saying why it is not one, using Google's libphonenumber rules (the
    ``phonenumbers`` package). ``region`` (``mapping.phone_region``, e.g. ``"US"``) is assumed for numbers written
    without a country code; without it, only numbers that carry one (``+…``) are valid. Imported here, so
    mappings without a phone column never load it.

    Cost (per number, measured on North American numbers): ``parse`` 20 µs and ``is_valid_number`` 9-18 µs. A
    number already written in E.164 (``+`` and digits, the warehouse's usual form) skips ``parse``: its country
    code is the one prefix of 1 to 3 digits that the library knows (E.164 country codes are prefix-free), the
    rest is the national number, and it is sent as written; the validity check is the library's either way
    (``valid`` below halves it for most numbers)."""
    import phonenumbers
    from phonenumbers import NumberParseException, PhoneNumber, PhoneNumberFormat
    from phonenumbers.phonenumberutil import COUNTRY_CODE_TO_REGION_CODE, PhoneMetadata

    parse, is_valid, format_number, e164 = phonenumbers.parse, phonenumbers.is_valid_number, phonenumbers.format_number, PhoneNumberFormat.E164
    no_country = Rejection("phone_number has no country code (+...) and mapping.phone_region is not set")
    unknown_country = Rejection("phone_number has an unknown country code")
    not_a_number = Rejection("phone_number is not a phone number")
    invalid = Rejection("phone_number is not a valid number (libphonenumber)")

    country_codes = frozenset(COUNTRY_CODE_TO_REGION_CODE)
    e164_match = _E164_RE.fullmatch
    is_valid_for = phonenumbers.is_valid_number_for_region
    main_regions: dict[int, str | None] = {}

    def valid(number: PhoneNumber) -> bool:
        """``is_valid_number``, at half its cost for most numbers. It finds the number's region first (for +1,
        the first of 25 whose patterns match) and then checks the number against that region's patterns: two
        passes over the same patterns when the region is the country code's first (the US for +1). So the
        first region is tried directly; when the number is valid there, ``is_valid_number`` would have picked
        that region (it is the first of the list, and chosen by validity, not by leading digits) and said
        valid. Otherwise the library's own answer. Measured: 19 -> 10 µs a North American number."""
        code = number.country_code
        if code not in main_regions:
            regions = COUNTRY_CODE_TO_REGION_CODE.get(code) or ()
            first = regions[0] if regions else None
            metadata = PhoneMetadata.metadata_for_region(first, None) if first else None
            by_validity = metadata is not None and (len(regions) == 1 or metadata.leading_digits is None)
            main_regions[code] = first if by_validity else None
        main = main_regions[code]
        return (main is not None and is_valid_for(number, main)) or is_valid(number)

    def normalise(text: str) -> str | Rejection:
        if e164_match(text):
            for end in (2, 3, 4):
                code = int(text[1:end])
                if code in country_codes:
                    # A national number with a leading zero (Italy's) is parse's to represent: it goes that way.
                    # Invalid as written: parse's turn, which applies the country's national-prefix rules
                    # (Madagascar's +2615353704 is +261205353704) before judging it.
                    if text[end] != "0" and valid(PhoneNumber(country_code=code, national_number=int(text[end:]))):
                        return text
                    break
        try:
            number = parse(text, region)
        except NumberParseException as exc:
            if exc.error_type != NumberParseException.INVALID_COUNTRY_CODE:
                return not_a_number
            return no_country if region is None and not text.startswith("+") else unknown_country
        return format_number(number, e164) if valid(number) else invalid

    return normalise


def normalise_email(value: Any) -> str | None:
    """The address to send (surrounding spaces removed) or None when blank."""
    text = to_text(value)
    return text or None


class RowMapper:
    """Compiled mapping for one source's column order: ``map(row)`` turns a row tuple into a profile."""

    _TEXT_FIELDS = PROFILE_FIELDS[1:]  # every standard field but the email, which is checked apart

    def __init__(self, mapping: MappingSpec, columns: Sequence[str]):
        index = {name: i for i, name in enumerate(columns)}
        missing = [c for c in mapping.columns() if c not in index]
        if missing:
            raise MissingColumnsError(missing, columns)
        self._email = index[mapping.email]
        self._text = [(f, index[getattr(mapping, f)]) for f in self._TEXT_FIELDS if getattr(mapping, f)]
        self._attrs = [(name, index[col]) for name, col in mapping.attributes.items()]
        self._consent = index[mapping.consent] if mapping.consent else None
        # Only a mapped phone column is parsed (the hot path pays for it only then).
        self._phone = phone_normaliser(mapping.phone_region) if mapping.phone_number else None
        self._map = self._compile()

    def map(self, row: Sequence[Any]) -> Profile | Rejection:
        """One row as a profile, or a rejection with its reason (compiled per mapping in ``__init__``)."""
        return self._map(row)

    def _compile(self):
        """The per-row function, generated for this mapping's columns (it runs once per row, so every attribute
        lookup and loop counts). Plain ``str`` values, the common case, are handled inline; any other type goes
        through ``to_text`` / ``to_json_value``, which define the conversions."""
        lines = [
            "def map_row(row):",
            f"    value = row[{self._email}]",
            "    if type(value) is str:",
            "        email = value.strip() or None",
            "    else:",
            "        try:",
            "            email = normalise_email(value)",
            "        except UnicodeDecodeError:",
            "            return Rejection('email is not valid UTF-8')",
            "    if email is None:",
            "        return Rejection('email is empty')",
            "    if len(email) > MAX_EMAIL_LENGTH or not email_match(email):",
            "        return Rejection('email is not a valid address')",
            "    try:",
        ]
        for n, (name, i) in enumerate(self._text):
            lines += [
                f"        value = row[{i}]",
                "        kind = type(value)",
                f"        t{n} = (value.strip() or None) if kind is str else str(value) if kind is int else to_text(value)",
            ]
            if name == "phone_number":
                lines += [
                    f"        if t{n} is not None:",
                    f"            t{n} = phone(t{n})",
                    f"            if type(t{n}) is Rejection:",
                    f"                return t{n}",
                ]
        lines.append("        attributes = {}")
        for name, i in self._attrs:
            lines += [
                f"        value = row[{i}]",
                "        kind = type(value)",
                "        if kind is str:",
                "            if value.strip():",
                f"                attributes[{name!r}] = value",
                "        elif kind is int or (kind is float and -INF < value < INF):  # NaN and infinities: below",
                f"            attributes[{name!r}] = value",
                "        else:",
                "            value = to_json_value(value)",
                "            if value is not None:",
                f"                attributes[{name!r}] = value",
            ]
        lines += [
            "    except UnicodeDecodeError:",
            "        return Rejection('a mapped field is not valid UTF-8')",
            "    except NotFinite:",
            "        return Rejection('a mapped number is infinite')",
        ]
        consent = f"to_consent(row[{self._consent}])" if self._consent is not None else "None"
        # Positional (cheaper than keywords per row), in the order of Profile's own fields.
        values = {"email": "email", "key": "email.lower()", "attributes": "attributes", "consent": consent}
        values.update({name: f"t{n}" for n, (name, _) in enumerate(self._text)})
        arguments = ", ".join(values.get(f.name, "None") for f in fields(Profile))
        lines.append(f"    return Profile({arguments})")
        scope = {
            "Rejection": Rejection, "Profile": Profile, "normalise_email": normalise_email, "to_text": to_text,
            "to_json_value": to_json_value, "to_consent": to_consent, "MAX_EMAIL_LENGTH": MAX_EMAIL_LENGTH, "email_match": _EMAIL_RE.match,
            "UnicodeDecodeError": UnicodeDecodeError, "NotFinite": NotFinite, "INF": math.inf, "phone": self._phone,
        }
        exec("\n".join(lines), scope)  # noqa: S102 - our own code over column indexes and validated field names
        return scope["map_row"]
