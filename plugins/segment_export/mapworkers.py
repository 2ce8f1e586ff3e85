"""Mapping a large segment's rows in a worker process while the task's main thread reads and stages them.

Why: at 1,000,000 profiles the task's main thread bounds a first export (py-spy, session 13: of its ~36 s of CPU,
~15 s go to mapping, validating and serializing rows, ~5 s of them libphonenumber's validity check), and the
machine's second core idles through the read: nothing is sent before the staged segment is complete, so neither
the sending threads nor the API have work yet. Threads cannot share pure-Python work (the GIL); a forked process
can, and it inherits what the mapping needs (the compiled ``RowMapper``, the destination's encoder) without
pickling them. Only the rows and the mapped profiles cross, pickled: about 2 µs a row each way, against ~14 µs to
map one. An experiment that streamed a first export's batches during the read instead (session 13, branch
``experiment/streaming-first-export``) was slower: it moved none of this work off the main thread.

How: the main thread reads each chunk and hands it to a worker while fewer than ``AHEAD`` chunks wait per worker,
else maps it itself, so both stay busy whatever their speeds; each mapped chunk is staged as it comes back. The
order chunks are staged in does not matter (the staging sorts); a rejected row's position (its outcome key,
``row <n>``) is fixed when its chunk is read. A worker that dies (or a pool that cannot start) is logged and the
rest of the segment is mapped in the task's process; an error of the mapping itself is raised as it would be
without workers, by mapping that chunk again in the task's process.

Used by the full read of a segment of at least ``MIN_ROWS`` rows, with ``workers`` from the run's options (the
operator's default: the ``[segment_export] map_workers`` setting, 1; 0 maps in the task's process). Fork only
(Linux, the Airflow workers' platform): elsewhere the rows are mapped in the task's process. The workers' CPU
is reported as the ``workers`` phase of the summary's ``cpu_seconds``.
"""

from __future__ import annotations

import logging
import multiprocessing
import resource
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Generic, TypeVar

#: segments smaller than this are mapped in the task's process: a fork and its pickling would cost more
MIN_ROWS = 50_000
#: chunks handed to each worker before the main thread maps the next one itself
AHEAD = 2

Mapped = TypeVar("Mapped")

#: the mapping the workers run: set in the task's process before the pool forks, inherited by each worker
_MAP: Callable[..., Any] | None = None


def _run_in_worker(*args: Any) -> Any:
    assert _MAP is not None, "a map worker runs only what its parent set before it forked"
    return _MAP(*args)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class MapWorkers(Generic[Mapped]):
    """``map(*args)`` for each chunk, in ``workers`` forked processes and the calling thread at once.

    ``submit(*args)`` maps a chunk (in a worker when one has room, else here) and returns what has been mapped since
    the last call; ``finish()`` returns the rest and stops the workers. ``cpu_seconds``: the workers' CPU, once
    finished. Use it as a context manager, so that the workers stop on an error too."""

    def __init__(self, map_chunk: Callable[..., Mapped], workers: int, log: logging.Logger):
        self.map_chunk, self.log = map_chunk, log
        self.pool: ProcessPoolExecutor | None = None
        self.pending: deque[tuple[Future[Mapped], tuple[Any, ...]]] = deque()
        self.workers = workers
        self.cpu_seconds = 0.0
        self._cpu_before = 0.0
        if workers > 0:
            self._start()

    def _start(self) -> None:
        global _MAP
        try:
            context = multiprocessing.get_context("fork")
        except ValueError:
            self.log.info("rows are mapped in the task's process: this platform cannot fork")
            return
        _MAP = self.map_chunk
        self._cpu_before = _children_cpu()
        self.pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=context)

    def __enter__(self) -> MapWorkers[Mapped]:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop(wait=exc[0] is None)

    def submit(self, *args: Any) -> list[Mapped]:
        """Map one chunk; return the chunks mapped since the last call (in no particular order)."""
        if self.pool is not None and len(self.pending) < AHEAD * self.workers:
            try:
                self.pending.append((self.pool.submit(_run_in_worker, *args), args))
                return self._ready()
            except (BrokenProcessPool, RuntimeError) as exc:  # RuntimeError: the pool could not start a worker
                self._give_up(exc)
        return [self.map_chunk(*args), *self._ready()]

    def finish(self) -> list[Mapped]:
        """The chunks still being mapped, once they all are; then the workers stop."""
        done = [self._result(future, args) for future, args in self.pending]
        self.pending.clear()
        self._stop(wait=True)
        return done

    def _ready(self) -> list[Mapped]:
        done = []
        while self.pending and self.pending[0][0].done():
            future, args = self.pending.popleft()
            done.append(self._result(future, args))
        return done

    def _result(self, future: Future[Mapped], args: tuple[Any, ...]) -> Mapped:
        try:
            return future.result()
        except BrokenProcessPool as exc:
            self._give_up(exc)
        except Exception:  # noqa: BLE001 - mapped again here: the mapping's own error is raised with its traceback
            pass
        return self.map_chunk(*args)

    def _give_up(self, exc: BaseException) -> None:
        if self.pool is not None:
            self.log.warning("the map worker stopped (%s: %s): the rest of the segment is mapped in the task's process",
                             type(exc).__name__, exc)
            self._stop(wait=False)

    def _stop(self, *, wait: bool) -> None:
        global _MAP
        if self.pool is None:
            return
        pool, self.pool = self.pool, None
        pool.shutdown(wait=wait, cancel_futures=not wait)
        _MAP = None
        if wait:
            self.cpu_seconds = max(_children_cpu() - self._cpu_before, 0.0)

