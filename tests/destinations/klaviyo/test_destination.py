"""A finished Klaviyo job's outcome, profile by profile, from its per-profile answers (not its counts)."""

from __future__ import annotations

import logging

import pytest

from segment_export.destinations.klaviyo.destination import KlaviyoDestination, import_error_reason


class FakeHook:
    """The job's answers as Klaviyo gives them; records which of them were asked for."""

    log = logging.getLogger("fake")

    def __init__(self, errors, imported):
        self.errors, self.imported, self.asked = errors, imported, []

    def iter_import_errors(self, job_id):
        self.asked.append("import-errors")
        return iter(self.errors)

    def iter_job_profiles(self, job_id):
        self.asked.append("profiles")
        return iter(self.imported.items())


def error(email=None, detail="Invalid phone number format (must be E.164): '+1 415 555 0100'.", code="invalid"):
    payload = {"email": email} if email else None
    return {"type": "import-error", "id": "e", "attributes": {"code": code, "title": "Invalid input.", "detail": detail,
                                                              "source": {"pointer": "/data/"}, "original_payload": payload}}


def job(status="complete", completed=0, failed=0):
    return {"id": "J1", "attributes": {"status": status, "completed_count": completed, "failed_count": failed, "total_count": 4}}


KEYS = ["a@x.io", "b@x.io", "c@x.io", "d@x.io"]


def outcome(hook, answer):
    return KlaviyoDestination(hook, "L1")._outcome(answer, KEYS)


@pytest.mark.parametrize("completed", [3, 4], ids=["completed excludes failed", "completed includes failed"])
def test_named_import_errors_reject_their_profiles_and_the_others_were_imported(completed):
    hook = FakeHook([error("B@x.io")], {})
    result = outcome(hook, job(completed=completed, failed=1))
    assert result.accepted_keys == {"a@x.io", "c@x.io", "d@x.io"} and result.accepted == 3
    reason = "invalid: Invalid phone number format (must be E.164): '<phone>'."  # Klaviyo's detail, number hidden
    assert result.rejected_keys == {"b@x.io": reason} and result.rejected == {reason: 1}
    assert hook.asked == ["import-errors"]  # every failure named: the job's profile list is not needed


def test_unnamed_failures_are_settled_by_the_jobs_profiles_relationship():
    hook = FakeHook([error(None, "A profile must have at least one identifier.")], {"a@x.io": "01A", "c@x.io": "01C", "d@x.io": "01D"})
    result = outcome(hook, job(completed=4, failed=1))
    assert hook.asked == ["import-errors", "profiles"]
    assert result.accepted_keys == {"a@x.io", "c@x.io", "d@x.io"} and result.profile_ids == {"a@x.io": "01A", "c@x.io": "01C", "d@x.io": "01D"}
    reason = ("not imported: Klaviyo reported 1 error(s) it did not attribute to a profile: "
              "invalid: A profile must have at least one identifier.")
    assert result.rejected_keys == {"b@x.io": reason}


def test_unnamed_errors_are_not_pinned_to_arbitrary_profiles():
    """Two unnamed errors, two rows not imported: which error was whose is unknown, so neither row gets another
    one's text; both get one generic reason naming the count and the first (redacted) detail."""
    hook = FakeHook([error(None, "A profile must have at least one identifier."), error(None, "Invalid email 'ann@x.io'.")],
                    {"a@x.io": "01A", "c@x.io": "01C"})
    result = outcome(hook, job(completed=4, failed=2))
    reason = ("not imported: Klaviyo reported 2 error(s) it did not attribute to a profile: "
              "invalid: A profile must have at least one identifier.")
    assert result.rejected_keys == {"b@x.io": reason, "d@x.io": reason} and result.rejected == {reason: 2}
    assert "ann@x.io" not in str(result.rejected)


def test_a_cancelled_job_accepts_only_what_it_imported():
    hook = FakeHook([], {"a@x.io": "01A"})
    result = outcome(hook, job(status="cancelled", completed=1))
    assert result.accepted_keys == {"a@x.io"}
    assert result.rejected == {"job cancelled by Klaviyo": 3} and len(result.rejected_keys) == 3
    assert result.accepted + sum(result.rejected.values()) == len(KEYS)


def test_import_error_reasons_hide_addresses_and_numbers():
    assert import_error_reason({"code": "invalid", "detail": "Invalid email address: 'ann@x.io'."}) == "invalid: Invalid email address: '<email>'."
    assert import_error_reason({"code": "duplicate_profile", "title": "Conflict."}) == "duplicate_profile: Conflict."
    assert import_error_reason({}) == "import_error: import error"


def test_figures_that_are_not_phone_numbers_stay_readable():
    assert import_error_reason({"code": "invalid", "detail": "Profile payload is 123456 bytes."}) == "invalid: Profile payload is 123456 bytes."
