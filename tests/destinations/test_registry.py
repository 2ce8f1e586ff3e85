"""The destination registry (``segment_export.destinations.registry``): what every other module reads about a
destination comes from one declaration, and a new one joins through ``register``."""

from __future__ import annotations

from dataclasses import replace

import pytest

from segment_export.assets import schemes
from segment_export.destinations import destination_type, destination_types, register
from segment_export.destinations.klaviyo import KLAVIYO
from segment_export.destinations.mailchimp import MAILCHIMP
from segment_export.destinations.registry import BUILT_IN, DestinationType, load, unregister
from segment_export.provider import get_provider_info
from segment_export.spec import DestinationSpec, ExportSpec


def test_the_built_ins_are_listed_once_and_named_as_they_are_everywhere():
    assert list(destination_types()) == ["klaviyo", "mailchimp"] == [load(p).name for p in BUILT_IN]
    assert destination_type("klaviyo") is KLAVIYO and destination_type("mailchimp") is MAILCHIMP
    assert (KLAVIYO.default_conn_id, KLAVIYO.target_kind, KLAVIYO.on_leave[0]) == ("klaviyo_default", "list", "keep")
    assert (MAILCHIMP.default_conn_id, MAILCHIMP.target_kind, MAILCHIMP.on_leave[0]) == ("mailchimp_default", "audience", "remove")


def test_every_declared_import_path_imports():
    for kind in destination_types().values():
        assert load(kind.destination).__name__.endswith("Destination")
        assert load(kind.hook).conn_type == kind.name  # the connection type is the destination's name
        if kind.async_hook:
            assert load(kind.async_hook).conn_type == kind.name
        assert issubclass(kind.spec_model, DestinationSpec)


def test_an_unknown_type_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown destination type 'braze'; known: klaviyo, mailchimp"):
        destination_type("braze")


def test_a_name_is_registered_once_and_on_leave_choices_are_checked():
    with pytest.raises(ValueError, match="already registered"):
        register(KLAVIYO)
    with pytest.raises(ValueError, match="on_leave must be some of"):
        replace(KLAVIYO, name="other", on_leave=("delete",))


def test_a_registered_destination_reaches_the_spec_assets_and_provider_info():
    other = replace(MAILCHIMP, name="mailchimp_eu", display_name="Mailchimp EU", max_profiles=5)
    # its spec model must accept its own type name: a subclass with the Literal widened
    from typing import Literal

    from segment_export.destinations.mailchimp.spec import MailchimpDestinationSpec

    class EuSpec(MailchimpDestinationSpec):
        type: Literal["mailchimp_eu"]  # type: ignore[assignment]

    register(replace(other, spec_model=EuSpec))
    try:
        spec = ExportSpec.model_validate({
            "id": "eu", "privacy_acknowledged": True, "source": {"path": "/tmp/x.csv"},
            "destination": {"type": "mailchimp_eu", "audience_id": "A1", "new_member_status": "pending"},
            "mapping": {"email": "email"},
        })
        assert isinstance(spec.destination, EuSpec) and spec.max_profiles == 5
        assert spec.destination.connection_id == "mailchimp_eu_default"
        assert ExportSpec.model_validate(spec.model_dump(mode="json")) == spec  # the operator's round trip
        assert "mailchimp_eu" in schemes()
        info = get_provider_info()
        assert "mailchimp_eu" in info["asset-uris"][0]["schemes"]
        assert [c["connection-type"] for c in info["connection-types"]] == ["klaviyo", "mailchimp", "mailchimp_eu"]
    finally:
        unregister("mailchimp_eu")
    assert "mailchimp_eu" not in destination_types()


def test_a_declaration_is_frozen():
    with pytest.raises(Exception):
        KLAVIYO.max_profiles = 1  # type: ignore[misc]
    assert isinstance(KLAVIYO, DestinationType)


def test_every_built_in_destination_declares_how_it_erases():
    from segment_export.destinations.base import Eraser

    assert all(issubclass(load(kind.eraser), Eraser) for kind in (KLAVIYO, MAILCHIMP))
    assert destination_type("klaviyo").build_eraser("k").targets(["L1", "L2"]) == ["account"]  # one per account
    assert destination_type("mailchimp").build_eraser("m").targets(["A", "B", "A"]) == ["A", "B"]  # one per audience
    with pytest.raises(ValueError, match="declares no erasure capability"):
        replace(KLAVIYO, eraser=None).build_eraser("k")
