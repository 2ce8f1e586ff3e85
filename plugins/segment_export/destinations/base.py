"""The contract between the exporter and a destination."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Iterator

import msgspec

from segment_export.batching import Batch
from segment_export.drift import Held
from segment_export.hooks.base import redact_emails  # noqa: F401 - the destinations' one redaction
from segment_export.mapping import Profile, Rejection
from segment_export.summary import BatchResult

def _plain(value: Any) -> Any:
    """What msgspec leaves to us: subclasses of str, int and float (numpy scalars, enums, a driver's own
    string type) become the plain value; anything else is the mapping's bug, refused loudly."""
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    for kind in (bool, int, float, str):
        if isinstance(value, kind):
            return kind(value)
    raise TypeError(f"cannot send a value of type {type(value).__name__}")


# msgspec (already an Airflow dependency): a profile's fragment in 0.8 µs against the json module's 7.7 µs, and
# straight to UTF-8 bytes. Values reach it as JSON types (mapping.to_json_value converts the rest).
_encode = msgspec.json.Encoder(enc_hook=_plain).encode


def dump_bytes(value: Any) -> bytes:
    """Compact UTF-8 JSON, the form every payload fragment takes (the mapping never hands it NaN or infinity)."""
    return _encode(value)




def settled(destination: Destination, handle: str, keys: list[str]) -> BatchResult:
    """The result of a batch submitted in this process: that the destination forgot it at once is an error."""
    result = destination.result(handle, keys)
    if result is None:
        raise RuntimeError(f"{destination.type} does not know the job {handle} it was just given")
    return result


class Destination(ABC):
    """One Klaviyo list or Mailchimp audience: what a batch may hold, how a profile is written, how it is sent."""

    type: str
    #: profiles per request and the bytes they may take in it (the request envelope already paid for)
    max_batch_profiles: int
    max_batch_bytes: int
    #: the largest serialized profile the destination takes (None: no separate cap)
    max_profile_bytes: int | None = None
    #: requests at once (the sending threads of segment changes and removals); the hook's pool is sized to it
    concurrency: int = 10

    @property
    def batches_in_flight(self) -> int:
        """Batches sent and not yet answered at once: ``concurrency``, unless a destination's batches are jobs that
        wait on the destination's side without holding a connection (Klaviyo's)."""
        return self.concurrency

    target_id: str

    @abstractmethod
    def preflight(self) -> None:
        """Check, before anything is sent, that the target exists and can take the mapped fields."""

    @abstractmethod
    def serialize(self, profile: Profile) -> bytes:
        """One profile's payload fragment (pure)."""

    def encode(self, profile: Profile) -> bytes | Rejection:
        fragment = self.serialize(profile)
        if self.max_profile_bytes is not None and len(fragment) > self.max_profile_bytes:
            return Rejection(f"profile is larger than the {self.type} limit of {self.max_profile_bytes:,} bytes")
        return fragment

    def send(self, batch: Batch) -> BatchResult:
        """Send one batch and return what the destination accepted and rejected, with reasons.

        Synchronous destinations implement it. An asynchronous one gets ``result(submit(batch))``: the engine calls
        the two itself (to record the handle in between), this is for callers with no state."""
        if not self.asynchronous:
            raise NotImplementedError(f"{type(self).__name__} implements neither send nor submit/result")
        return settled(self, self.submit(batch), batch.keys)

    #: True when the destination shows segments itself (Mailchimp tags), so segment changes must be sent
    manages_segments: bool = False
    #: True when a batch is a job the destination finishes later (Klaviyo): it implements ``submit`` and
    #: ``result``, and a run killed (or deferred) between the two awaits the job instead of sending it again
    asynchronous: bool = False

    def submit(self, batch: Batch) -> str:
        """Hand a batch over for work and return its handle at once: a short JSON-serialisable string (Klaviyo's
        job id) that names the work to this destination in any process, for ``result``. May release
        ``batch.fragments`` (the request holds the payloads)."""
        raise NotImplementedError(f"{self.type} batches are not asynchronous")

    def result(self, handle: str, keys: list[str]) -> BatchResult | None:
        """Await the work ``submit`` returned ``handle`` for (in this process or an earlier one) and return each of
        ``keys``' outcome (``keys``: the batch's profile keys, in its order). None when the destination no longer
        knows the handle, or cannot tell the outcome: the profiles are then sent again."""
        raise NotImplementedError(f"{self.type} batches are not asynchronous")

    def prepare_segments(self, names: list[str]) -> None:
        """Make sure every segment the run will tag exists (Mailchimp creates missing tags)."""

    #: True when segment changes and removals go by the destination's own profile ids (Klaviyo): the exporter then
    #: passes ``profile_ids=`` (key → id remembered in the state, where known) to ``change_segment`` and ``remove``
    wants_profile_ids: bool = False

    def change_segment(self, segment: str, op: str, keys: list[str]) -> set[str]:
        """Add (``+``) or remove (``-``) profiles to a segment's tag; return the keys that failed."""
        raise NotImplementedError(f"{self.type} does not manage segments")

    def remove(self, keys: list[str], how: str) -> set[str]:
        """Apply the export's ``on_leave`` to profiles that left the segment; return the keys that failed."""
        raise NotImplementedError(f"{self.type} cannot {how} profiles")

    def membership(self, segments: list[str]) -> Iterator[list[Held]]:
        """The target's real membership, a page at a time, for a verify run (``segment_export.verify``): every
        profile the export's list holds, or every member carrying one of the export's ``segments`` (tags), with
        its status in :mod:`segment_export.drift`'s words. Read-only. A destination that cannot list its target
        leaves this out (its ``DestinationType.verifies`` is false, and specs asking for ``verify`` are refused)."""
        raise NotImplementedError(f"{self.type} cannot list its target's membership")

    @property
    @abstractmethod
    def request_stats(self) -> dict[str, int]:
        """Requests sent and retried so far (for the summary and benchmarks)."""


class Eraser(ABC):
    """A destination's erasure capability: forget one person everywhere an export put them (issue 13).

    Declared by the destination's :class:`~segment_export.destinations.registry.DestinationType` (``eraser``) and
    built per destination connection. An erasure goes to each of the connection's *erasure targets*: what one
    deletion request reaches there (a whole Klaviyo account; one Mailchimp audience)."""

    type: str
    conn_id: str

    @classmethod
    @abstractmethod
    def from_connection(cls, conn_id: str) -> Eraser:
        """The eraser of one destination connection (no request is made here)."""

    def targets(self, target_ids: list[str]) -> list[str]:
        """The erasure targets that cover what exports on this connection write to (``target_ids``: their lists
        or audiences). Default: each of them."""
        return list(dict.fromkeys(target_ids))

    @abstractmethod
    def erase(self, email: str, target: str) -> str:
        """Ask the destination to erase ``email`` from ``target`` and return its answer, in words and without the
        address (it is the receipt's ``answer``). Raise ``DestinationError`` when it did not answer the request
        (the receipt then says so, and the request is sent again by the next erasure run)."""
