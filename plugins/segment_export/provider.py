"""Provider metadata, as data: what Airflow's providers manager reads through the entry point.

Built from the destination registry: each destination brings its integration, hook, connection form and asset
scheme (see ``destinations/registry.py``).
"""

from __future__ import annotations

from typing import Any

from segment_export import __version__
from segment_export.destinations.registry import destination_types


def get_provider_info() -> dict[str, Any]:
    kinds = list(destination_types().values())
    names = ", ".join(kind.display_name for kind in kinds)
    return {
        "package-name": "segment-export",
        "name": f"Segment export ({names})",
        "description": "Export customer segments from a warehouse to "
        + " and ".join(f"{kind.display_name} {kind.target_kind}s" for kind in kinds) + ".",
        "versions": [__version__],
        "integrations": [
            {"integration-name": kind.display_name, "external-doc-url": kind.doc_url, "tags": ["service"]}
            for kind in kinds
        ],
        "hooks": [
            {"integration-name": kind.display_name, "python-modules": [kind.hook.rpartition(".")[0]]} for kind in kinds
        ],
        "operators": [
            {"integration-name": kind.display_name,
             "python-modules": ["segment_export.operators.export", *(["segment_export.operators.erasure"] if kind.eraser else [])]}
            for kind in kinds
        ],
        "asset-uris": [
            {
                "schemes": [kind.name for kind in kinds],
                "handler": "segment_export.assets.sanitize_uri",
                "factory": "segment_export.assets.create_asset",
                "to_openlineage_converter": "segment_export.assets.convert_asset_to_openlineage",
            }
        ],
        "config": {
            "segment_export": {
                "description": "Settings of the segment-export provider.",
                "options": {
                    "rate_budget_conn_id": {
                        "description": "A Redis connection (type redis) through which every export, on every "
                        "worker, shares one rate budget per destination API key and endpoint. Empty: each export "
                        "paces itself. A destination connection's extra rate_budget_conn_id overrides it.",
                        "version_added": None,
                        "type": "string",
                        "example": "redis_budget",
                        "default": "",
                    },
                    "map_workers": {
                        "description": "Worker processes that map a large segment's rows (50,000 and more) while "
                        "the export task reads and stages them; 0 maps them in the task's process. Linux (fork) only.",
                        "version_added": None,
                        "type": "integer",
                        "example": "0",
                        "default": "1",
                    },
                },
            },
        },
        "connection-types": [
            {
                "connection-type": kind.name,
                "hook-class-name": kind.hook,
                "hook-name": kind.display_name,
                "ui-field-behaviour": kind.connection_form,
                "conn-fields": kind.connection_fields,
            }
            for kind in kinds
        ],
    }
