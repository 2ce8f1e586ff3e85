"""Awaiting many Klaviyo bulk import jobs at once: one request answers for every job in flight.

Klaviyo documents no cap on bulk profile import jobs in progress (it does for other jobs: catalog bulk jobs say
"The maximum number of jobs in progress at one time is 500"; the profile import job says only "up to 10,000
profiles per request", 5 MB, and its rate limits, 10/s burst and 150/m steady). So an export keeps many jobs in
flight, and what bounds it is how fast it learns that one finished. Polling each job costs one
``GET /api/profile-bulk-import-jobs/{id}`` per job per interval, all drawn from that endpoint's 150 a minute;
with twenty jobs in flight that is one look at each every eight seconds. Instead :class:`JobBoard` asks the
documented collection, ``GET /api/profile-bulk-import-jobs`` with ``filter=any(status,["complete","cancelled"])``,
``sort=-created_at`` and ``page[size]=100`` (Get Bulk Import Profiles Jobs: "Returns a maximum of 100 jobs per
request"; filter ``status``: ``any``, ``equals``), twice a second: one request finds every job of ours that
finished, newest first, with the same attributes as the job's own resource.

The collection is only a hint. A job it does not show yet (the documents do not say how soon a finished job is
listed, nor whether other jobs of the account crowd ours off the first page) is looked up by its own ``GET``
every ``direct_every`` rounds, which is authoritative; so a job is never missed, only seen later.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from segment_export.destinations.klaviyo.hook import bulk_import_finished

if TYPE_CHECKING:
    from segment_export.destinations.klaviyo.hook import KlaviyoHook

#: pages of the finished-jobs collection read per round at most (newest first: ours are on the first one)
MAX_PAGES = 3
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
    hands each waiting thread its job. A round that fails (after the hook's own retries) is tried again; when
    ``MAX_FAILED_ROUNDS`` fail in a row, the error is raised in every thread waiting then (their batches fail,
    and the run resumes their jobs next time: the handles are in the in-flight table)."""

    def __init__(self, hook: KlaviyoHook, interval: float = 0.5, direct_every: int = 10):
        self.hook, self.interval, self.direct_every = hook, interval, direct_every
        self._cond = threading.Condition()
        self._waiting: dict[str, dict[str, Any]] = {}  # job id → the job as submitted
        self._answers: dict[str, dict[str, Any] | BaseException] = {}
        self._poller: threading.Thread | None = None
        self.rounds = 0
        self.failed_rounds = 0  # in a row

    def wait(self, job: dict[str, Any]) -> dict[str, Any]:
        """The job once it is complete or cancelled."""
        if bulk_import_finished(job):
            return job
        job_id = job["id"]
        with self._cond:
            self._waiting[job_id] = job
            if self._poller is None:
                self._poller = threading.Thread(target=self._poll, name="segment-export-klaviyo-jobs", daemon=True)
                self._poller.start()
            while job_id not in self._answers:
                self._cond.wait()
            answer = self._answers.pop(job_id)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def _poll(self) -> None:
        try:
            self._rounds()
        except BaseException as exc:  # noqa: BLE001 - the poller is going away: nobody may wait on it for ever
            with self._cond:
                self._answers.update((job_id, exc) for job_id in self._waiting)
                self._waiting.clear()
                self._poller = None
                self._cond.notify_all()
            raise

    def _rounds(self) -> None:
        while True:
            time.sleep(self.interval)
            with self._cond:
                waiting = dict(self._waiting)
                if not waiting:
                    self._poller = None
                    return
            try:
                found: dict[str, Any] = self._finished(waiting)
                self.failed_rounds = 0
            except Exception as exc:  # noqa: BLE001 - tried again, then raised in every thread waiting
                self.failed_rounds += 1
                log.warning("looking for finished Klaviyo import jobs failed (%d in a row): %s", self.failed_rounds,
                            exc, exc_info=self.failed_rounds == 1)
                found = {job_id: exc for job_id in waiting} if self.failed_rounds >= MAX_FAILED_ROUNDS else {}
            with self._cond:
                for job_id, answer in found.items():
                    self._waiting.pop(job_id, None)
                    self._answers[job_id] = answer
                if found:
                    self._cond.notify_all()

    def _finished(self, waiting: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """The waiting jobs that are finished: from the collection, else (every ``direct_every`` rounds) by id."""
        self.rounds += 1
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
        if self.rounds % self.direct_every == 0:
            for job_id in waiting.keys() - found.keys():
                job = self.hook.get_bulk_import_job(job_id)
                if bulk_import_finished(job):
                    found[job_id] = job
        return found
