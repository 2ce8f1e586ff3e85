"""The contract of a segment source: its columns, its size, and its rows in bounded chunks."""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from typing import Any, Iterable, Iterator, Sequence

Row = tuple[Any, ...]


class SourceError(RuntimeError):
    """The source cannot be read as the spec describes (missing column, bad file, SQL error...)."""


class ColumnNotFoundError(SourceError):
    """Columns the spec names that the source does not have, each with the spec field naming it.

    Raised before anything is read or sent: a misspelt column must never be read as something else (SQLite
    reads an unknown double-quoted identifier as a string literal, so ``segment_column: segmnt`` would match no
    row and every profile would "leave")."""

    def __init__(self, where: str, missing: list[tuple[str, str]], available: Sequence[str]):
        self.missing, self.available = missing, list(available)
        named = "; ".join(f"{field}: no column {column!r}{_hint(column, self.available)}" for field, column in missing)
        super().__init__(f"{where}: {named}. The source has: {', '.join(self.available) or 'no columns'}")


def _hint(column: str, available: Sequence[str]) -> str:
    same_case = [a for a in available if a.casefold() == column.casefold()]
    close = same_case or difflib.get_close_matches(column, available, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_columns(where: str, named: Iterable[tuple[str, str]], available: Sequence[str]) -> None:
    """Every (spec field, column) in ``named`` must be one of ``available``, exactly (case included)."""
    known = set(available)
    missing = list(dict.fromkeys((field, column) for field, column in named if column not in known))
    if missing:
        raise ColumnNotFoundError(where, missing, available)


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
