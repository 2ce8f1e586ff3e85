"""OpenLineage for an export: where customer data came from and where it went.

Input: the segment (a SQL table or query, or a file). Output: the destination's list or audience, as a
dataset in the destination's namespace (``<destination type>://<api host>``, e.g. ``klaviyo://a.klaviyo.com``)
named by the list or audience id. Facets carry the mapped fields (names only) and, after a run, how many profiles the destination
accepted. Used only when ``apache-airflow-providers-openlineage`` is installed; pure otherwise.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from segment_export.spec import ExportSpec


def output_namespace(spec: ExportSpec, api_base_url: str | None = None) -> str:
    host = urlsplit(api_base_url).netloc if api_base_url else ""
    return f"{spec.destination.type}://{host or spec.destination.kind.api_host}"


def input_dataset(spec: ExportSpec) -> tuple[str, str]:
    """(namespace, name) of the segment. SQL sources are named by their Airflow connection id."""
    src = spec.source
    if src.kind == "file":
        return "file", str(src.path)
    if src.kind == "table":
        return f"sql://{src.conn_id}", str(src.table)
    return f"sql://{src.conn_id}", f"query:{spec.id}"


def mapped_fields(spec: ExportSpec) -> list[tuple[str, str]]:
    """(destination field, source column) pairs: what leaves the warehouse."""
    return spec.mapping.fields()


def operator_lineage(spec: ExportSpec, summary: dict[str, Any] | None, api_base_url: str | None = None):
    """An OpenLineage ``OperatorLineage`` for one run, or ``None`` without the OpenLineage provider."""
    try:
        from airflow.providers.common.compat.openlineage.facet import (
            Dataset,
            OutputDataset,
            OutputStatisticsOutputDatasetFacet,
            SchemaDatasetFacet,
            SchemaDatasetFacetFields,
        )
        from airflow.providers.openlineage.extractors import OperatorLineage
    except ImportError:
        return None
    fields = mapped_fields(spec)
    in_ns, in_name = input_dataset(spec)
    inputs = [
        Dataset(
            namespace=in_ns,
            name=in_name,
            facets={"schema": SchemaDatasetFacet(fields=[SchemaDatasetFacetFields(name=col) for _, col in fields])},
        )
    ]
    output_facets: dict[str, Any] = {
        "schema": SchemaDatasetFacet(fields=[SchemaDatasetFacetFields(name=dest) for dest, _ in fields])
    }
    output_ds_facets: dict[str, Any] = {}
    if summary and not summary.get("dry_run"):
        output_ds_facets["outputStatistics"] = OutputStatisticsOutputDatasetFacet(rowCount=int(summary["accepted"]))
    from segment_export.assets import destination_targets

    targets = destination_targets(spec)
    outputs = [
        OutputDataset(
            namespace=output_namespace(spec, api_base_url),
            name=target,
            facets=output_facets,
            # the accepted count is the export's; per list it is known only when there is one list
            outputFacets=output_ds_facets if len(targets) == 1 else {},
        )
        for target in targets
    ]
    return OperatorLineage(inputs=inputs, outputs=outputs)
