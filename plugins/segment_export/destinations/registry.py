"""The destinations the exporter knows: one :class:`DestinationType` each, declared in its own package.

Everything outside ``destinations/`` that depends on which destination an export writes to (the spec's
``destination`` block, the default connection and per-export cap, the DAG's documentation, asset URIs,
lineage namespaces, the provider's connection forms) reads it from here, so a destination is its package plus
one line in :data:`BUILT_IN`. Another destination (a test's, a plugin's) joins through :func:`register`.

Pure: importing this module imports no destination, no hook and no Airflow; a destination's package is imported
the first time it is asked for (the spec module imports this one, and a DAG file's parse must stay light).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from segment_export.destinations.base import Destination, Eraser
    from segment_export.spec import DestinationSpec, ExportSpec

#: the built-in destinations: "<module>:<attribute>" of each one's DestinationType
BUILT_IN = (
    "segment_export.destinations.klaviyo:KLAVIYO",
    "segment_export.destinations.mailchimp:MAILCHIMP",
)

#: the connection form's field every destination hook reads from the connection's extra (hooks.base)
TIMEOUT_FIELD = {
    "label": "Request timeout (seconds)",
    "description": "How long one request may take before it is retried. Default 120.",
    "schema": {"type": ["number", "null"], "minimum": 1},
}

#: the connection form's field naming the Redis connection of the API key's shared rate budget (hooks.budget)
RATE_BUDGET_FIELD = {
    "label": "Rate budget: Redis connection id (optional)",
    "description": "A redis connection through which every export using this API key, on every worker, shares "
                   "one rate budget (the destination's documented limits). Empty: the deployment's "
                   "[segment_export] rate_budget_conn_id, if set; otherwise each export paces itself.",
    "schema": {"type": ["string", "null"]},
}

#: the connection form's field for the share of the documented limits the connection's exports may use
LIMIT_SHARE_FIELD = {
    "label": "Share of the API's rate limits (optional)",
    "description": "Between 0 and 1 (default 1): the share of the destination's documented rate limits (and "
                   "connection cap) that exports through this connection may use, leaving the rest to other apps.",
    "schema": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1},
}

#: what ``sync.on_leave`` can ask of any destination; each declares the ones it supports
ON_LEAVE = ("keep", "remove", "unsubscribe")


def load(path: str) -> Any:
    """The object at ``package.module:name`` or ``package.module.name``."""
    module, _, name = path.rpartition(":") if ":" in path else path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class DestinationType:
    """Everything the exporter and Airflow need to know about one destination, in one place.

    ``name`` is the spec's ``destination.type``, the Airflow connection type, the asset URI scheme and the
    lineage namespace's scheme: one name for one destination everywhere.
    """

    name: str
    display_name: str
    #: what one export writes to there: "list" (Klaviyo) or "audience" (Mailchimp)
    target_kind: str
    #: the pydantic model of the spec's ``destination`` block (a subclass of :class:`spec.DestinationSpec`)
    spec_model: type[DestinationSpec]
    #: "<module>:<class>" of the :class:`~segment_export.destinations.base.Destination`; imported when built
    destination: str
    #: "<module>.<class>" of the sync hook (Airflow's provider info names hooks this way)
    hook: str
    #: the per-export cap when the spec gives none (the destination's documented or the seed product's limit)
    max_profiles: int
    #: the public API host: the lineage namespace when the connection does not name another
    api_host: str
    doc_url: str
    #: the connection form: Airflow's ``ui-field-behaviour`` and ``conn-fields``
    connection_form: dict[str, Any] = field(default_factory=dict)
    connection_fields: dict[str, Any] = field(
        default_factory=lambda: {"timeout": TIMEOUT_FIELD, "rate_budget_conn_id": RATE_BUDGET_FIELD,
                                 "rate_limit_share": LIMIT_SHARE_FIELD})
    #: the ``sync.on_leave`` values it supports; the first is the default
    on_leave: tuple[str, ...] = ("keep", "remove")
    #: "<module>.<class>" of the async hook a deferred run's trigger polls with (None: no deferrable mode)
    async_hook: str | None = None
    #: True when its Destination implements ``membership`` (a verify run can read the target's real membership)
    verifies: bool = False
    #: "<module>:<class>" of its :class:`~segment_export.destinations.base.Eraser` (None: erasure requests cannot
    #: reach it, and an erasure spec covering one of its exports is refused)
    eraser: str | None = None

    def __post_init__(self) -> None:
        unknown = set(self.on_leave) - set(ON_LEAVE)
        if not self.on_leave or unknown:
            raise ValueError(f"destination {self.name!r}: on_leave must be some of {ON_LEAVE}, not {self.on_leave}")

    @property
    def default_conn_id(self) -> str:
        return f"{self.name}_default"

    def build(self, spec: ExportSpec) -> Destination:
        """The destination an export sends to, with its hook (no request is made here)."""
        return load(self.destination).from_spec(spec)

    def build_eraser(self, conn_id: str) -> Eraser:
        """The eraser of one of its connections (no request is made here)."""
        if self.eraser is None:
            raise ValueError(f"{self.display_name} declares no erasure capability")
        return load(self.eraser).from_connection(conn_id)


_registry: dict[str, DestinationType] = {}
_loaded = False


def register(destination_type: DestinationType, *, replace: bool = False) -> DestinationType:
    """Make a destination known to specs, DAGs, assets and lineage. A name is registered once (``replace`` for
    tests that register a changed declaration)."""
    _load_built_in()
    if destination_type.name in _registry and not replace:
        raise ValueError(f"a destination named {destination_type.name!r} is already registered")
    _registry[destination_type.name] = destination_type
    return destination_type


def unregister(name: str) -> None:
    """Forget a registered destination (tests)."""
    _registry.pop(name, None)


def destination_types() -> dict[str, DestinationType]:
    """Every known destination by name, built-ins first."""
    _load_built_in()
    return dict(_registry)


def destination_type(name: str) -> DestinationType:
    """The destination called ``name``; a clear error naming the known ones otherwise."""
    types = destination_types()
    try:
        return types[name]
    except KeyError:
        raise ValueError(f"unknown destination type {name!r}; known: {', '.join(types)}") from None


def _load_built_in() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for path in BUILT_IN:
        declared = load(path)
        _registry.setdefault(declared.name, declared)
