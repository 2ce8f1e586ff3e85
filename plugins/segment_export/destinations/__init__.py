"""Destinations: one package each (spec block, hook, payloads, sending, declaration), listed in registry.py."""

from __future__ import annotations

from typing import TYPE_CHECKING

from segment_export.destinations.registry import (  # noqa: F401 - the public seam
    DestinationType,
    destination_type,
    destination_types,
    register,
)

if TYPE_CHECKING:
    from segment_export.destinations.base import Destination
    from segment_export.spec import ExportSpec


def destination_for(spec: ExportSpec) -> Destination:
    """The destination an export sends to, with its hook (no request is made here)."""
    return spec.destination.kind.build(spec)
