"""What the steps of one export run share (see ``exporter``): the run's inputs, its summary, its scratch space and
its CPU clock, and the errors a run stops with. Kept apart so that the planner (``plan``), the executor
(``execute``) and the segment and leaver steps (``apply``) each take one object, not nine arguments."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from segment_export.destinations.base import Destination
from segment_export.diff import Change
from segment_export.sources.base import Source
from segment_export.spec import ExportSpec
from segment_export.staging import Staging
from segment_export.state import StateStore
from segment_export.summary import ExportSummary

if TYPE_CHECKING:
    from segment_export.exporter import RunOptions


class ExportError(RuntimeError):
    """The export stopped part-way; ``summary`` holds what the destination confirmed before it stopped."""

    def __init__(self, message: str, summary: ExportSummary):
        super().__init__(message)
        self.summary = summary


class MassLeaveError(ExportError):
    """The run would remove more of the export's remembered profiles than ``sync.max_leave_share`` allows (or the
    segment came back empty): additions and updates were sent, removals were not."""


class RejectedShareError(ExportError):
    """The run finished, but too much of the segment was invalid or rejected: fail so that alerting fires."""


class PhaseClock:
    """CPU seconds of the calling thread per phase (``summary.PHASES``); time in a phase entered inside another
    counts for the inner one only. Switched per chunk or batch, never per row."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.current: str | None = None
        self.since = time.thread_time()

    def switch(self, phase: str | None) -> str | None:
        """Start counting ``phase`` (None: stop counting); return the phase that was counted until now."""
        now = time.thread_time()
        if self.current is not None:
            self.seconds[self.current] = self.seconds.get(self.current, 0.0) + now - self.since
        previous, self.current, self.since = self.current, phase, now
        return previous

    def fetched(self, chunks: Iterable[Any], fetch: str = "read", work: str = "map") -> Iterator[Any]:
        """Each chunk of ``chunks``: the time taken to fetch it counts for ``fetch``, the caller's work on it (until
        it asks for the next) for ``work``; the phase before the loop counts again after it."""
        source = iter(chunks)
        while True:
            previous = self.switch(fetch)
            chunk = next(source, None)
            self.switch(work)
            if chunk is None:
                self.switch(previous)
                return
            yield chunk
            self.switch(previous)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        previous = self.switch(name)
        try:
            yield
        finally:
            self.switch(previous)


@dataclass
class RunContext:
    """One run's inputs and running totals, owned by the task's main thread (the state connection is its own:
    SQLite insists; the sending threads never touch the state)."""

    spec: ExportSpec
    source: Source
    destination: Destination
    state: StateStore | None
    options: RunOptions
    log: logging.Logger
    summary: ExportSummary
    staging: Staging = field(default_factory=Staging)
    clock: PhaseClock = field(default_factory=PhaseClock)
    #: keys whose outcome this run already counted from its own submit pass's jobs (RunOptions.resume_counts):
    #: the plan does not send them again in this run, even those the destination rejected (the next run retries)
    settled_keys: set[str] = field(default_factory=set)
    #: profile key -> date of every address erased through this export's destination connection (``erasure``):
    #: the plan never sends them, they are counted skipped ("erased on <date>")
    erased: dict[str, str] = field(default_factory=dict)
    #: how this run reads its segment (``changes.ChangeDetection``), chosen once the source is checked
    change_detection: Any = None
    #: CPU seconds of the processes that mapped rows beside the main thread (``mapworkers``)
    worker_seconds: float = 0.0

    @property
    def tracks_batches(self) -> bool:
        """Batches go through the in-flight table (``state.INFLIGHT_TABLE``): an asynchronous destination's
        handles outlive the task, so a killed or deferred run's batches are awaited, not sent twice."""
        return self.state is not None and self.destination.asynchronous and not self.options.dry_run

    @property
    def applies_changes(self) -> bool:
        """This run goes on to segment changes and leavers (not a dry run, nor a pass that only submits)."""
        return not self.options.dry_run and not (self.options.submit_only and self.tracks_batches)

    def queue_tags(self, *changes: Change) -> None:
        """Queue the segment (tag) changes of profiles, applied after the batches (``apply.apply_segments``)."""
        if not self.destination.manages_segments:
            return
        work = [(c.key, c.fingerprint or "", c.segments, c.segments_added, c.segments_removed)
                for c in changes if c.segments_added or c.segments_removed]
        if work:
            self.staging.queue_tags(work)

    def ids(self, keys: list[str], exclusive: bool = False) -> dict[str, Any]:
        """``profile_ids=`` the destination's remembered ids of these profiles, for a destination that acts by id
        (looked up here: the state connection belongs to this thread). ``exclusive`` (taking profiles off): only
        ids no other remembered profile holds (see ``StateStore.profile_ids``)."""
        if not self.destination.wants_profile_ids:
            return {}
        return {"profile_ids": self.state.profile_ids(keys, exclusive=exclusive) if self.state is not None else {}}
