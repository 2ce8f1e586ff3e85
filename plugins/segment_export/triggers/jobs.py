"""A trigger that waits, on the triggerer, for a destination's jobs to finish.

A deferrable export submits its jobs (Klaviyo bulk imports; any destination whose declaration names an
async hook) from the task, then defers to
:class:`DestinationJobsTrigger` with the jobs' handles: the triggerer polls them with the destination's async
hook (same requests, pacing and retry rules as the task's hook) and wakes the task when none is pending, so
no worker slot is held while the destination works. The trigger is generic: ``async_hook`` names the hook
class (the destination registry supplies it) and the hook's ``pending_jobs`` says which handles are not done.
"""

from __future__ import annotations

import asyncio
import importlib
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from segment_export.hooks.base import DestinationError, redact_emails


class DestinationJobsTrigger(BaseTrigger):
    """Poll a destination's jobs until none is pending; one event: ``success`` with the handles, or ``error``.

    :param async_hook: import path of the async hook class, e.g.
        ``segment_export.destinations.klaviyo.hook.KlaviyoAsyncHook`` (it has ``pending_jobs(handles)``).
    :param conn_id: the destination's Airflow connection.
    :param handles: the jobs' ids, as the destination gave them.
    :param poll_interval: seconds between polling rounds (each round asks only for the jobs still pending).
    :param timeout: seconds after which the trigger gives up with an ``error`` event; ``None`` waits as long as
        the jobs take (the deferring task's own ``timeout`` still applies).
    """

    def __init__(self, async_hook: str, conn_id: str, handles: list[str], poll_interval: float = 1.0,
                 timeout: float | None = None):
        super().__init__()
        self.async_hook, self.conn_id, self.handles = async_hook, conn_id, list(handles)
        self.poll_interval, self.timeout = float(poll_interval), timeout

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {"async_hook": self.async_hook, "conn_id": self.conn_id, "handles": self.handles,
             "poll_interval": self.poll_interval, "timeout": self.timeout},
        )

    def hook(self) -> Any:
        """A new async hook of the configured class, on this trigger's connection."""
        module, _, name = self.async_hook.rpartition(".")
        try:
            hook_class = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ImportError(f"async hook {self.async_hook!r} cannot be imported: {exc}") from exc
        return hook_class(self.conn_id)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            message = await self._wait(self.hook())
        except Exception as exc:  # noqa: BLE001 - every failure becomes the task's error event, not a crash
            message = failure_message(exc)
        if message is None:
            yield TriggerEvent({"status": "success", "handles": self.handles})
        else:
            yield TriggerEvent({"status": "error", "message": message})

    async def _wait(self, hook: Any) -> str | None:
        """Poll until nothing is pending (``None``) or the timeout passes (its message)."""
        started = time.monotonic()
        pending = list(self.handles)
        while True:
            pending = await hook.pending_jobs(pending)
            if not pending:
                self.log.info("all %d jobs finished on connection %r", len(self.handles), self.conn_id)
                return None
            waited = time.monotonic() - started
            self.log.info("%d of %d jobs still pending on connection %r after %.1fs",
                          len(pending), len(self.handles), self.conn_id, waited)
            if self.timeout is not None and waited >= self.timeout:
                return (f"{len(pending)} of {len(self.handles)} jobs on connection {self.conn_id!r} were not "
                        f"finished after {self.timeout:g}s (timeout): {', '.join(pending[:10])}")
            left = self.poll_interval if self.timeout is None else min(self.poll_interval, self.timeout - waited)
            await asyncio.sleep(left)  # the last poll is at the deadline, not a whole interval past it


def failure_message(exc: BaseException) -> str:
    """An exception as an event message: a hook's error is already safe (names the connection, never the key,
    addresses redacted); anything else gets its type and its text with any address redacted."""
    if isinstance(exc, DestinationError):
        return str(exc)
    return f"{type(exc).__name__}: {redact_emails(str(exc))}"
