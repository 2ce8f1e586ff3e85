"""The contract of a segment source: its columns, its size, and its rows in bounded chunks."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Iterator, Sequence

Row = tuple[Any, ...]


class SourceError(RuntimeError):
    """The source cannot be read as the spec describes (missing column, bad file, SQL error...)."""


class Source(ABC):
    """A segment: rows of one table, query or file, optionally filtered to some segment names.

    ``chunks`` yields lists of at most ``chunk_size`` rows, each a tuple in the order of the columns asked for,
    so memory stays bounded whatever the size of the segment. With ``order_by`` and ``limit`` it yields the
    first ``limit`` rows in that order (ties broken by ``tie_breaker``), the same rows on every run.
    """

    chunk_size: int
    description: str

    @abstractmethod
    def columns(self) -> list[str]:
        """The columns the source offers (read without reading the segment)."""

    @abstractmethod
    def count(self) -> int:
        """How many rows the segment has."""

    @abstractmethod
    def chunks(
        self,
        columns: Sequence[str],
        *,
        order_by: str | None = None,
        tie_breaker: str | None = None,
        limit: int | None = None,
    ) -> Iterator[list[Row]]:
        """The segment's rows, projected to ``columns``, in chunks."""

    def close(self) -> None:
        """Release connections or file handles."""
