"""Awaiting many Klaviyo bulk import jobs at once: one request answers for every job in flight.

Klaviyo documents no cap on bulk profile import jobs in progress (it does for other jobs: catalog bulk jobs say
"The maximum number of jobs in progress at one time is 500"; the profile import job says only "up to 10,000
profiles per request", 5 MB, and its rate limits, 10/s burst and 150/m steady). So an export keeps many jobs in
flight, and what bounds it is how fast it learns that one finished. Polling each job costs one
``GET /api/profile-bulk-import-jobs/{id}`` per job per interval, all drawn from the 150 a minute those reads
share; with ten jobs in flight that is one look at each every four seconds. Instead :class:`JobBoard` asks the
documented collection, ``GET /api/profile-bulk-import-jobs`` with ``filter=any(status,["complete","cancelled"])``,
``sort=-created_at`` and ``page[size]=100`` (Get Bulk Import Profiles Jobs: "Returns a maximum of 100 jobs per
request"; filter ``status``: ``any``, ``equals``), every ``interval`` (0.75 s: 80 of the 150 a minute): one
request finds every job of ours that finished, newest first, with the same attributes as the job's own resource.
When the poller starts after a minute without one (the run's first job, say), its first ``QUICK_ROUNDS`` looks
are ``QUICK_INTERVAL`` (0.25 s) apart: a short run's one or two jobs (a rerun's) are seen within a quarter second
of finishing rather than 0.75 s. Six rounds in 1.5 s stay within the 10/s burst, and the first minute's (~83)
within the 150 a minute; a poller started again sooner (one job after another) keeps the 0.75 s.

The collection is only a hint. A job it has not shown after ``direct_after`` seconds (the documents do not say
how soon a finished job is listed, nor whether other jobs of the account crowd ours off the first pages) is
looked up by its own ``GET``, which is authoritative, and again every ``direct_after`` seconds while it waits:
a job is never missed, only seen later, and a long job costs a few reads a minute, not one per round.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable

from segment_export.destinations.klaviyo.hook import bulk_import_finished

if TYPE_CHECKING:
    from segment_export.destinations.klaviyo.hook import KlaviyoHook

#: pages of the finished-jobs collection read per round at most (newest first: ours are on the first one)
MAX_PAGES = 3
#: the first rounds after the poller starts, and how far apart (see the module docstring)
QUICK_ROUNDS, QUICK_INTERVAL = 6, 0.25
#: seconds without a poller after which a new one starts with quick rounds again
QUICK_AFTER = 60.0
#: rounds in a row that may fail (after the hook's own retries) before the waiting threads are given the error
MAX_FAILED_ROUNDS = 3

log = logging.getLogger(__name__)


def _created(job: dict[str, Any]) -> datetime | None:
    text = (job.get("attributes") or {}).get("created_at")
    try:
        when = datetime.fromisoformat(text) if isinstance(text, str) else None
    except ValueError:
        return None
    return when.replace(tzinfo=timezone.utc) if when is not None and when.tzinfo is None else when


class JobBoard:
    """Which of this process's bulk import jobs have finished, for every sending thread at once.

    A sending thread calls :meth:`wait` with the job Klaviyo answered its submission with; one poller thread
    (started while anyone waits, gone when nobody does) reads the finished jobs every ``interval`` seconds and
    hands each waiting thread its job. A read that fails (after the hook's own retries) is tried again: when the
    collection fails ``MAX_FAILED_ROUNDS`` rounds in a row, every thread waiting then gets the error; when one
    job's own ``GET`` fails that many times in a row, its thread does (their batches fail, and the run resumes
    their jobs next time: the handles are in the in-flight table)."""

    def __init__(self, hook: KlaviyoHook, interval: float = 0.75, direct_after: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self.hook, self.interval, self.direct_after, self.clock = hook, interval, direct_after, clock
        self._cond = threading.Condition()
        self._waiting: dict[str, dict[str, Any]] = {}  # job id → the job as submitted
        self._answers: dict[str, dict[str, Any] | BaseException] = {}
        self._look_at: dict[str, float] = {}  # job id → when to look it up by its own GET
        self._job_failures: dict[str, int] = {}  # job id → its own GETs failed in a row
        self._poller: threading.Thread | None = None
        self._stopped_at: float | None = None  # when the last poller went away (quick rounds: QUICK_AFTER)
        self.rounds = 0
        self.failed_rounds = 0  # of the collection, in a row

    def wait(self, job: dict[str, Any]) -> dict[str, Any]:
        """The job once it is complete or cancelled."""
        if bulk_import_finished(job):
            return job
        job_id = job["id"]
        with self._cond:
            self._waiting[job_id] = job
            self._look_at[job_id] = self.clock() + self.direct_after
            if self._poller is None:
                quick = self._stopped_at is None or self.clock() - self._stopped_at >= QUICK_AFTER
                poller = threading.Thread(target=self._poll, args=(QUICK_ROUNDS if quick else 0,),
                                          name="segment-export-klaviyo-jobs", daemon=True)
                try:
                    poller.start()
                except BaseException:
                    self._forget(job_id)
                    raise
                self._poller = poller
            while job_id not in self._answers:
                self._cond.wait()
            answer = self._answers.pop(job_id)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def _forget(self, job_id: str) -> None:
        self._waiting.pop(job_id, None)
        self._look_at.pop(job_id, None)
        self._job_failures.pop(job_id, None)

    def _poll(self, quick_rounds: int) -> None:
        try:
            self._rounds(quick_rounds)
        except BaseException as exc:  # noqa: BLE001 - the poller is going away: nobody may wait on it for ever
            with self._cond:
                for job_id in list(self._waiting):
                    self._answers[job_id] = exc
                    self._forget(job_id)
                self._poller, self._stopped_at = None, self.clock()
                self._cond.notify_all()
            raise

    def _rounds(self, quick_rounds: int) -> None:
        for started in itertools.count():
            time.sleep(min(QUICK_INTERVAL, self.interval) if started < quick_rounds else self.interval)
            with self._cond:
                waiting = dict(self._waiting)
                if not waiting:
                    self._poller, self._stopped_at = None, self.clock()
                    return
            found = self._round(waiting)
            with self._cond:
                for job_id, answer in found.items():
                    self._forget(job_id)
                    self._answers[job_id] = answer
                if found:
                    self._cond.notify_all()

    def _round(self, waiting: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any] | BaseException]:
        """The waiting jobs that are finished (or whose reads failed for good): from the collection, and by
        their own ``GET`` for those it has not shown for ``direct_after`` seconds."""
        self.rounds += 1
        found: dict[str, dict[str, Any] | BaseException] = {}
        try:
            found.update(self._listed(waiting))
            self.failed_rounds = 0
        except Exception as exc:  # noqa: BLE001 - tried again, then raised in every thread waiting
            self.failed_rounds += 1
            log.warning("looking for finished Klaviyo import jobs failed (%d in a row): %s", self.failed_rounds,
                        exc, exc_info=self.failed_rounds == 1)
            if self.failed_rounds >= MAX_FAILED_ROUNDS:
                self.failed_rounds = 0
                return {job_id: exc for job_id in waiting}
        now = self.clock()
        for job_id in waiting.keys() - found.keys():
            if self._look_at.get(job_id, now) > now:
                continue
            self._look_at[job_id] = now + self.direct_after
            try:
                job = self.hook.get_bulk_import_job(job_id)
            except Exception as exc:  # noqa: BLE001 - this job's thread gets it after MAX_FAILED_ROUNDS in a row
                failures = self._job_failures[job_id] = self._job_failures.get(job_id, 0) + 1
                log.warning("looking up Klaviyo import job %s failed (%d in a row): %s", job_id, failures, exc)
                if failures >= MAX_FAILED_ROUNDS:
                    found[job_id] = exc
                continue
            self._job_failures.pop(job_id, None)
            if bulk_import_finished(job):
                found[job_id] = job
        return found

    def _listed(self, waiting: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """The waiting jobs the finished-jobs collection shows (newest first, at most ``MAX_PAGES`` pages)."""
        found: dict[str, dict[str, Any]] = {}
        dates = [d for d in map(_created, waiting.values()) if d is not None]
        oldest = min(dates) if len(dates) == len(waiting) else None
        for page in self.hook.iter_finished_job_pages(max_pages=MAX_PAGES):
            for job in page:
                if job.get("id") in waiting:
                    found[job["id"]] = job
            last = _created(page[-1]) if page else None
            # Newest first: once a page reaches back past our oldest job, later pages hold none of ours.
            if len(found) == len(waiting) or (oldest is not None and last is not None and last < oldest):
                break
        return found
