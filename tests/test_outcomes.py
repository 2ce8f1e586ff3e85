"""What a run reports, with an in-memory source and a fake destination (no sandbox, no Airflow): outcome actions
from the destination's answers, outcome rows for rows rejected before sending, masked dry-run examples, and a
progress log in profiles (issue 16, defects 11-14)."""

from __future__ import annotations

import json
import logging
import sqlite3

import pytest

from segment_export.batching import Batch
from segment_export.destinations.base import Destination, dump_bytes
from segment_export.destinations.klaviyo.destination import profile_fragment, with_consent
from segment_export.destinations.mailchimp.destination import member_fragment
from segment_export.exporter import RunOptions, redacted_example, run_export
from segment_export.mapping import Profile
from segment_export.sources.base import Source
from segment_export.spec import ExportSpec
from segment_export.state import OUTCOMES_TABLE, StateStore
from segment_export.summary import BatchResult


class ListSource(Source):
    """Rows held in memory, read in chunks of ``chunk_size``."""

    description = "test rows"

    def __init__(self, columns, rows, chunk_size=2):
        self._columns, self.rows, self.chunk_size = list(columns), rows, chunk_size

    def columns(self):
        return self._columns

    def count(self):
        return len(self.rows)

    def chunks(self, columns, *, order_by=None, tie_breaker=None, limit=None):
        index = [self._columns.index(c) for c in columns]
        rows = self.rows[:limit] if limit is not None else self.rows
        for start in range(0, len(rows), self.chunk_size):
            yield [tuple(r[i] for i in index) for r in rows[start:start + self.chunk_size]]


class FakeDestination(Destination):
    """Accepts every profile; ``already_there`` are the keys it says it updated (None: it does not say)."""

    type = "klaviyo"  # for the summary's label only
    max_batch_profiles = 5
    max_batch_bytes = 1_000_000
    concurrency = 1
    target_id = "LIST"

    def __init__(self, already_there: set[str] | None = None):
        self.already_there = already_there
        self.batches: list[list[str]] = []

    def preflight(self):
        pass

    def serialize(self, profile: Profile) -> bytes:
        return profile_fragment(profile)

    def send(self, batch: Batch) -> BatchResult:
        self.batches.append(list(batch.keys))
        updated = None if self.already_there is None else set(batch.keys) & self.already_there
        return BatchResult(accepted=len(batch), accepted_keys=set(batch.keys), updated_keys=updated)

    @property
    def request_stats(self):
        return {"requests": len(self.batches), "retries": 0}


def make_spec(**mapping) -> ExportSpec:
    return ExportSpec.model_validate({
        "id": "fake_export", "privacy_acknowledged": True, "source": {"path": "unused.csv"},
        "destination": {"type": "klaviyo", "list_id": "LIST"},
        "mapping": {"email": "email", **mapping}, "limit": {"max_rejected_share": None},
    })


@pytest.fixture
def state():
    store = StateStore(sqlite3.connect(":memory:"), "?", "fake_export", "LIST", "in memory")
    store.ensure_tables()
    yield store
    store.close()


def outcomes(state, run_id="r"):
    cursor = state.conn.execute(
        f"SELECT profile_key, action, reason FROM {OUTCOMES_TABLE} WHERE run_id = ? ORDER BY profile_key", (run_id,))
    return cursor.fetchall()


def people(n):
    return [(f"p{i}@example.com", f"First{i}") for i in range(n)]


@pytest.mark.parametrize("answers", ["created vs updated", "does not say"])
def test_outcome_actions_come_from_the_destinations_answer(state, answers):
    # Mailchimp may already hold a member this export never sent (say, one who unsubscribed): the diff says
    # "create", the destination says it updated. The outcome must say what the destination did.
    rows = people(7)
    known = {"p1@example.com", "p5@example.com"}
    destination = FakeDestination(known if answers == "created vs updated" else None)
    run_export(make_spec(first_name="first_name"), ListSource(["email", "first_name"], rows), destination,
               state=state, options=RunOptions(run_id="r"))
    got = {key: action for key, action, _ in outcomes(state)}
    if answers == "created vs updated":
        assert got == {r[0]: "updated" if r[0] in known else "created" for r in rows}
    else:
        assert set(got.values()) == {"created"}  # Klaviyo's bulk import does not say: the diff's kind
    # A second run after a change: the state says "update"; a destination that answers "created" is believed.
    changed = [(email, name + "!") for email, name in rows]
    destination = FakeDestination(set() if answers == "created vs updated" else None)
    run_export(make_spec(first_name="first_name"), ListSource(["email", "first_name"], changed), destination,
               state=state, options=RunOptions(run_id="r2"))
    expected = "created" if answers == "created vs updated" else "updated"
    assert {action for _, action, _ in outcomes(state, "r2")} == {expected}


def test_rows_rejected_before_sending_get_outcome_rows_without_personal_data(state):
    rows = [
        ("ok@example.com", "Ana", 1.0),
        ("", "Empty", 2.0),                       # row 2: no address
        ("not-an-email", "Nobody", 3.0),          # row 3: an invalid address is not a key: "row 3"
        ("Utf8@Example.com", b"Jos\xe9", 4.0),    # valid address, a field that is not UTF-8
        ("inf@example.com", "Inf", float("inf")),  # valid address, a number JSON cannot carry
        ("also.ok@example.com", "Bo", 6.0),
    ]
    spec = make_spec(first_name="first_name", attributes={"ltv": "ltv"})
    source = ListSource(["email", "first_name", "ltv"], rows, chunk_size=2)
    summary = run_export(spec, source, FakeDestination(), state=state, options=RunOptions(run_id="r"))
    assert (summary.read, summary.invalid, summary.accepted) == (6, 4, 2)
    assert outcomes(state) == [
        ("also.ok@example.com", "created", None),
        ("inf@example.com", "invalid", "a mapped number is infinite"),
        ("ok@example.com", "created", None),
        ("row 2", "invalid", "email is empty"),
        ("row 3", "invalid", "email is not a valid address"),
        ("utf8@example.com", "invalid", "a mapped field is not valid UTF-8"),
    ]
    everything = json.dumps(state.conn.execute(f"SELECT * FROM {OUTCOMES_TABLE}").fetchall())
    assert "not-an-email" not in everything and "Nobody" not in everything and "Jos" not in everything
    # A dry run saves nothing, not even the invalid rows' outcomes.
    run_export(spec, source, FakeDestination(), state=state, options=RunOptions(run_id="dry", dry_run=True))
    assert outcomes(state, "dry") == []


def test_dry_run_examples_mask_every_mapped_personal_field(state):
    rows = [("Ada.Lovelace@Example.com", "Ada", "Lovelace", "+14155550100", "C-17", "platinum", 4999.5)]
    spec = make_spec(first_name="first_name", last_name="last_name", phone_number="phone", external_id="customer_id",
                     attributes={"tier": "tier", "ltv": "ltv"})
    source = ListSource(["email", "first_name", "last_name", "phone", "customer_id", "tier", "ltv"], rows)
    summary = run_export(spec, source, FakeDestination(), state=state, options=RunOptions(dry_run=True))
    (example,) = summary.as_dict()["examples"]
    assert example == {"action": "create", "payload": {"type": "profile", "attributes": {
        "email": "***@Example.com", "first_name": "***", "last_name": "***", "phone_number": "***",
        "external_id": "***", "properties": {"tier": "***", "ltv": "***"}}}}
    shown = json.dumps(summary.as_dict())
    for value in ("Ada", "Lovelace", "+1415", "C-17", "platinum", "4999"):
        assert value not in shown


def test_both_destinations_payloads_are_masked_but_keep_their_shape():
    profile = Profile("ada@example.com", "ada@example.com", "Ada", "Lovelace", "+14155550100", None,
                      {"TIER": "gold", "CITY": "London", "LTV": 12})
    assert redacted_example(member_fragment(profile, "pending")) == {
        "email_address": "***@example.com", "status": "pending",
        "merge_fields": {"FNAME": "***", "LNAME": "***", "PHONE": "***", "TIER": "***", "CITY": "***", "LTV": "***"},
    }
    klaviyo = redacted_example(with_consent(profile_fragment(profile), True))
    assert klaviyo["subscribe"] is True and klaviyo["attributes"]["properties"] == {"TIER": "***", "CITY": "***", "LTV": "***"}
    nested = dump_bytes({"type": "profile", "attributes": {"location": {"city": "London", "zip": "NW1"}, "tags": ["a"]}})
    assert redacted_example(nested) == {"type": "profile", "attributes": {"location": {"city": "***", "zip": "***"}, "tags": ["***"]}}


def test_progress_log_counts_profiles_not_rows(state, caplog):
    # 20 profiles in 30 rows (every other profile is in the segment twice): the log must compare profiles
    # sent with profiles to send, never with rows.
    rows = people(20) + [r for r in people(20) if int(r[0][1:].split("@")[0]) % 2 == 0]
    source = ListSource(["email", "first_name"], rows, chunk_size=7)
    logger = logging.getLogger("progress-test")
    with caplog.at_level(logging.INFO, logger="progress-test"):
        summary = run_export(make_spec(first_name="first_name"), source, FakeDestination(), state=state,
                             options=RunOptions(run_id="r"), logger=logger)
    assert (summary.read, summary.sent, summary.duplicates) == (30, 20, 10)
    totals = [m.split("| total ")[1].split(" profiles sent")[0] for m in caplog.messages if "| total " in m]
    assert totals[-1] == "20/20" and not any(t.endswith("/30") for t in totals)
