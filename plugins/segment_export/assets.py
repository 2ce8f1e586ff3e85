"""Airflow asset URIs for the destinations: ``<destination type>://<target id>``, e.g. ``klaviyo://<list_id>``.

Registered in the provider info (``asset-uris``), so Airflow validates and normalises them like any provider's
scheme: the list or audience id is the URI's authority, case kept (ids are case-sensitive), nothing after it.
An export's task has its destination as an outlet; a DAG scheduled on ``Asset("klaviyo://Y6nRLr")`` runs after
each export to that list.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow.sdk import Asset

from segment_export.destinations.registry import destination_types

if TYPE_CHECKING:
    from urllib.parse import SplitResult



def schemes() -> list[str]:
    """One URI scheme per destination type (the provider info registers them)."""
    return list(destination_types())


def sanitize_uri(uri: SplitResult) -> SplitResult:
    known = destination_types().get(uri.scheme)
    kind = known.target_kind if known else "id"
    if not uri.netloc or "@" in uri.netloc or ":" in uri.netloc:
        raise ValueError(f"URI format {uri.scheme}://<{kind} id> must name the {kind} id, and nothing else")
    if uri.path not in ("", "/") or uri.query:
        raise ValueError(f"URI format {uri.scheme}://<{kind} id> takes no path or query")
    return uri._replace(path="")


def destination_targets(spec: Any) -> list[str]:
    """The ids an export writes to: its list or audience, or each list it spreads segments over."""
    return spec.destination.targets


def create_asset(*, destination: str, target_id: str, extra: dict[str, Any] | None = None) -> Asset:
    """The asset of one target (a list, an audience) of the destination type ``destination``."""
    if destination not in destination_types():
        raise ValueError(f"destination must be one of {schemes()}, not {destination!r}")
    uri = f"{destination}://{target_id}"
    return Asset(uri=uri, name=uri, extra=extra or {"destination": destination, "target_id": target_id})


def convert_asset_to_openlineage(asset: Asset, lineage_context: Any) -> Any:
    """The OpenLineage dataset of a destination asset: the same one the export operator reports."""
    from urllib.parse import urlsplit

    from airflow.providers.common.compat.openlineage.facet import Dataset

    parsed = urlsplit(asset.uri)
    return Dataset(namespace=f"{parsed.scheme}://{destination_types()[parsed.scheme].api_host}", name=parsed.netloc)
