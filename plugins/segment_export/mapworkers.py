"""Mapping a large segment's rows in a worker process while the task's main thread reads and stages them.

Why: at 1,000,000 profiles the task's main thread bounds a first export (py-spy, session 13: of its ~36 s of CPU,
~15 s go to mapping, validating and serializing rows, ~5 s of them libphonenumber's validity check), and the
machine's second core idles through the read: nothing is sent before the staged segment is complete, so neither
the sending threads nor the API have work yet. Threads cannot share pure-Python work (the GIL); a forked process
can, and it inherits what the mapping needs (the compiled ``RowMapper``, the destination's encoder) without
pickling them. Only the rows and the mapped profiles cross, pickled: about 2 µs a row each way, against ~14 µs to
map one. An experiment that streamed a first export's batches during the read instead (session 13, commits
fa3aa35..89a356d, reverted by f3b897d) was slower: it moved none of this work off the main thread.

How: the main thread reads each chunk and hands it to a worker while fewer than ``AHEAD`` chunks wait per worker,
else maps it itself, so both stay busy whatever their speeds; each mapped chunk is staged as it comes back. The
order chunks are staged in does not matter (the staging sorts); a rejected row's position (its outcome key,
``row <n>``) is fixed when its chunk is read. A chunk handed to a worker is mapped exactly once: if the worker
fails it (it died, or the rows do not pickle), the task's process maps it, and an error of the mapping itself is
then raised from there, as without workers. Whenever the workers fail, or cannot start (no ``fork`` on the
platform, a process limit), that is logged once and the rest of the segment is mapped in the task's process. In
Celery's prefork pool, whose processes count as daemonic (and a daemonic process may not have children), the
flag is lifted while the workers are forked: they die with the task, which is what the rule is for.

Each worker dies with the task's process (``PR_SET_PDEATHSIG``), takes the default action on SIGTERM and SIGINT
(not the task runner's handlers it inherited), and starts with the parent's objects frozen out of its garbage
collector, so that a collection does not copy the parent's memory. Its CPU, measured by itself per chunk, is the
summary's ``workers`` phase; pickling on the task's side runs in the executor's queue thread (the ``sending`` phase).

Used by the full read of a segment of at least ``MIN_ROWS`` rows, with ``workers`` from the run's options (the
operator's default: the ``[segment_export] map_workers`` setting, 1; 0 maps in the task's process).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import multiprocessing
import signal
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Callable, Generic, TypeVar

#: segments smaller than this are mapped in the task's process: a fork and its pickling would cost more
MIN_ROWS = 50_000
#: chunks handed to each worker before the main thread maps the next one itself
AHEAD = 2
_PR_SET_PDEATHSIG = 1  # linux/prctl.h

Mapped = TypeVar("Mapped")

#: the mapping the workers run: set in the task's process before the workers fork, inherited by each of them
_MAP: Callable[..., Any] | None = None


def _start_worker() -> None:
    """In a new worker: die with the task's process, and leave SIGTERM and SIGINT to their default action."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the worker ends when its queue closes
        pass
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _ready() -> bool:
    return _MAP is not None


def _run_in_worker(*args: Any) -> tuple[float, Any]:
    """(the worker's CPU seconds for this chunk, the mapped chunk)."""
    assert _MAP is not None, "a map worker runs only what its parent set before it forked"
    started = time.process_time()
    mapped = _MAP(*args)
    return time.process_time() - started, mapped


class MapWorkers(Generic[Mapped]):
    """``map_chunk(*args)`` for each chunk, in ``workers`` forked processes and the calling thread at once.

    ``submit(*args)`` maps a chunk (in a worker when one has room, else here) and returns the chunks mapped since the
    last call; ``finish()`` returns the rest and stops the workers. ``cpu_seconds``: the workers' CPU. Use it as a
    context manager, so that the workers stop on an error too."""

    def __init__(self, map_chunk: Callable[..., Mapped], workers: int, log: logging.Logger):
        self.map_chunk, self.workers, self.log = map_chunk, workers, log
        self.processes: ProcessPoolExecutor | None = None
        self.pending: deque[tuple[Future[tuple[float, Mapped]], tuple[Any, ...]]] = deque()
        self.cpu_seconds = 0.0
        if workers > 0:
            self._start()

    def _start(self) -> None:
        """Fork the workers now (not at the first chunk), so that a platform or process that cannot is found here."""
        global _MAP
        _MAP = self.map_chunk
        gc.collect()
        gc.freeze()  # the parent's objects stay out of the workers' collections (no copy-on-write of its memory)
        # In Celery's prefork pool the task's process counts as daemonic, and a daemonic process may not start
        # children: the rule keeps a daemon's children from outliving it when it is ended. These die with it
        # (PR_SET_PDEATHSIG), so the flag is lifted while they are forked (the public ``daemon`` setter).
        current = multiprocessing.current_process()
        lifted = False
        try:
            if current.daemon:
                current.daemon = False
                lifted = True
            processes = ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("fork"),
                                            initializer=_start_worker)
            try:
                started = [processes.submit(_ready) for _ in range(self.workers)]  # the workers fork here
                if lifted:
                    current.daemon, lifted = True, False
                for ready in started:
                    if not ready.result(timeout=30):
                        raise RuntimeError("a worker started without the mapping")
            except BaseException:
                processes.shutdown(wait=False, cancel_futures=True)
                raise
        except Exception as exc:  # noqa: BLE001 - no fork here, a process limit...
            _MAP = None
            self.log.info("rows are mapped in the task's process: map workers could not start (%s: %s)",
                          type(exc).__name__, exc)
            return
        finally:
            gc.unfreeze()
            if lifted:
                current.daemon = True
        self.processes = processes

    def __enter__(self) -> MapWorkers[Mapped]:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop(wait=exc[0] is None)

    def submit(self, *args: Any) -> list[Mapped]:
        """Map one chunk; return the chunks mapped since the last call (in no particular order)."""
        if self.processes is not None and len(self.pending) < AHEAD * self.workers:
            try:
                future = self.processes.submit(_run_in_worker, *args)
            except Exception as exc:  # noqa: BLE001 - the workers are gone (BrokenProcessPool): map it here
                self._give_up(exc)
            else:
                self.pending.append((future, args))
                return self._done()
        return [self.map_chunk(*args), *self._done()]

    def finish(self) -> list[Mapped]:
        """The chunks still being mapped, once they all are; then the workers stop."""
        done = []
        while self.pending:
            done.append(self._result(*self.pending.popleft()))
        self._stop(wait=True)
        return done

    def _done(self) -> list[Mapped]:
        done = []
        while self.pending and self.pending[0][0].done():
            done.append(self._result(*self.pending.popleft()))
        return done

    def _result(self, future: Future[tuple[float, Mapped]], args: tuple[Any, ...]) -> Mapped:
        """A handed-over chunk's mapping: the worker's, or, when the worker failed it, this process's (which raises
        the mapping's own error, if that was the failure)."""
        try:
            cpu, mapped = future.result()
        except Exception as exc:  # noqa: BLE001 - whatever failed, the chunk is mapped here, once
            mapped = self.map_chunk(*args)
            self._give_up(exc)  # the mapping did not fail here: the workers did (a dead one, rows that do not pickle)
            return mapped
        self.cpu_seconds += cpu
        return mapped

    def _give_up(self, exc: BaseException) -> None:
        if self.processes is not None:
            self.log.warning("the map workers failed (%s: %s): the rest of the segment is mapped in the task's process",
                             type(exc).__name__, exc)
            self._stop(wait=False)

    def _stop(self, *, wait: bool) -> None:
        """Stop the workers. The chunks still handed to them stay in ``pending``: :meth:`finish` maps them here."""
        global _MAP
        if self.processes is None:
            return
        processes, self.processes = self.processes, None
        processes.shutdown(wait=wait, cancel_futures=not wait)
        _MAP = None
