"""Segment sources: SQL (any Airflow SQL connection) and files (CSV, Parquet)."""

from __future__ import annotations

from segment_export.sources.base import Source, SourceError
from segment_export.spec import SourceSpec


def source_for(spec: SourceSpec) -> Source:
    """The source a spec describes (nothing is read here beyond opening a file's metadata lazily)."""
    if spec.kind == "file":
        from segment_export.sources.files import file_source

        return file_source(spec)
    from segment_export.sources.sql import SqlSource

    return SqlSource.from_spec(spec)


__all__ = ["Source", "SourceError", "source_for"]
