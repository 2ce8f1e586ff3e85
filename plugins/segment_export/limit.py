"""The per-export limit: how many rows of a segment may be exported, decided before anything is sent. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


class LimitExceededError(ValueError):
    """The segment is larger than the export's limit and the spec says ``on_exceed: fail``."""


@dataclass(frozen=True, slots=True)
class LimitDecision:
    """``read_limit`` is the number of rows to read (None: all); ``skipped`` the rows left out by the limit."""

    read_limit: int | None
    skipped: int
    truncated: bool


def decide_limit(row_count: int, max_profiles: int, on_exceed: Literal["fail", "truncate"]) -> LimitDecision:
    """Decide from the segment's row count; raise when it is too large and truncation is not allowed."""
    if row_count <= max_profiles:
        return LimitDecision(read_limit=None, skipped=0, truncated=False)
    if on_exceed == "fail":
        raise LimitExceededError(
            f"the segment has {row_count:,} rows, over the export's limit of {max_profiles:,} profiles; nothing "
            "was sent. Raise limit.max_profiles, narrow the segment, or set limit.on_exceed: truncate"
        )
    return LimitDecision(read_limit=max_profiles, skipped=row_count - max_profiles, truncated=True)
