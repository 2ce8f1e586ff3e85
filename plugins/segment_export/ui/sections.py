"""The extension point of a run's page: parts other features add (drift reports, erasure receipts), each a
function of the run that returns a :class:`Section` or None (nothing to show for this run).

A section is data, not HTML: a title, an optional note and rows of cells; the page escapes every cell, so a
section cannot inject markup, and the run's JSON endpoint carries the same sections. Register at import time of
the feature's module, e.g. in ``segment_export/drift.py``::

    from segment_export.ui.sections import Section, register_run_section

    def drift_section(ctx):
        report = load_drift_report(ctx.state_conn_id, ctx.export_id, ctx.run_id)
        if report is None:
            return None
        return Section("Drift", rows=[("field", "changed")] + report.rows, note="...")

    register_run_section("drift", drift_section)

and name the module in :data:`SECTION_MODULES` so that the api-server imports it before rendering. A section
function sees the masked view of the run only (``ctx.can_edit`` tells whether the user may edit the DAG); it
must not put a profile key in a cell unless ``can_edit`` is true, and never log one.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger(__name__)

#: modules that register sections, imported (once) before a run's page is built; a missing one is skipped
SECTION_MODULES: list[str] = []


@dataclass(frozen=True)
class RunContext:
    export_id: str
    run_id: str
    state_conn_id: str | None
    summary: dict[str, Any] | None
    can_edit: bool


@dataclass(frozen=True)
class Section:
    title: str
    rows: list[tuple[Any, ...]] = field(default_factory=list)  # the first row is the header when ``header``
    note: str = ""
    header: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {"title": self.title, "note": self.note, "header": self.header, "rows": [list(map(str, r)) for r in self.rows]}


_SECTIONS: dict[str, Callable[[RunContext], Section | None]] = {}
_imported = False


def register_run_section(name: str, build: Callable[[RunContext], Section | None]) -> None:
    """Add (or replace, by name) a part of every run's page."""
    _SECTIONS[name] = build


def unregister_run_section(name: str) -> None:
    _SECTIONS.pop(name, None)


def run_sections(ctx: RunContext) -> list[Section]:
    """Every registered section that has something for this run. A section that fails is left out, with its
    error in the api-server's log (its message, which must name no profile): one broken feature does not take
    the run's page down."""
    global _imported
    if not _imported:
        for module in SECTION_MODULES:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                log.warning("segment-export UI: section module %s not imported: %s", module, exc)
        _imported = True
    found = []
    for name, build in list(_SECTIONS.items()):
        try:
            section = build(ctx)
        except Exception as exc:  # noqa: BLE001
            log.warning("segment-export UI: section %r failed for %s/%s: %s", name, ctx.export_id, ctx.run_id,
                        type(exc).__name__)
            continue
        if section is not None:
            found.append(section)
    return found
