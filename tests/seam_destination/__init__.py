"""A destination that exists only in the tests: the proof that a destination is one package plus one
``register`` call. Nothing in the product names it; the spec, the engine, assets and the provider info reach it
through ``segment_export.destinations.register`` alone.

It writes to a "contact list" kept by :mod:`seam_destination.server`, a small HTTP server the tests start:
upserts answered per contact (an address at ``reject.test`` is refused with a reason), removals, and a delay per
batch so that a run can be killed while it sends.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal

import requests
from airflow.sdk import BaseHook

from segment_export.batching import Batch
from segment_export.destinations.base import Destination, dump_bytes
from segment_export.destinations.registry import DestinationType
from segment_export.mapping import Profile
from segment_export.spec import DestinationSpec, ExportSpec
from segment_export.summary import BatchResult

NAME = "seamtest"


class SeamSpec(DestinationSpec):
    type: Literal["seamtest"]
    list_id: str

    @property
    def target_id(self) -> str:
        return self.list_id


class SeamHook(BaseHook):
    """The connection (``host``: the server's URL) and one session; no retries: the server never throttles."""

    conn_name_attr = "seamtest_conn_id"
    default_conn_name = f"{NAME}_default"
    conn_type = NAME
    hook_name = "Seam test"

    def __init__(self, conn_id: str = default_conn_name) -> None:
        super().__init__()
        self.base_url = self.get_connection(conn_id).host.rstrip("/")
        self.session = requests.Session()
        self.requests = 0

    def call(self, method: str, path: str, body: bytes | None = None) -> requests.Response:
        self.requests += 1
        return self.session.request(method, self.base_url + path, data=body, timeout=30,
                                    headers={"Content-Type": "application/json"})


class SeamDestination(Destination):
    type = NAME
    max_batch_profiles = 25
    max_batch_bytes = 1_000_000
    concurrency = 2

    def __init__(self, hook: SeamHook, list_id: str) -> None:
        self.hook, self.target_id = hook, list_id

    @classmethod
    def from_spec(cls, spec: ExportSpec) -> SeamDestination:
        return cls(SeamHook(spec.destination.connection_id), spec.destination.target_id)

    def preflight(self) -> None:
        answer = self.hook.call("GET", f"/lists/{self.target_id}")
        if answer.status_code == 404:
            raise ValueError(f"seamtest list {self.target_id!r} does not exist")
        answer.raise_for_status()

    def serialize(self, profile: Profile) -> bytes:
        return dump_bytes({"email": profile.email, "first_name": profile.first_name})

    def send(self, batch: Batch) -> BatchResult:
        body = b'{"contacts":[' + b",".join(batch.fragments) + b"]}"
        answer = self.hook.call("POST", f"/lists/{self.target_id}/contacts:batch", body)
        answer.raise_for_status()
        accepted, updated, rejected = set(), set(), {}
        for item in answer.json()["results"]:
            key = item["email"].lower()
            if item["status"] == "rejected":
                rejected[key] = item["reason"]
            else:
                accepted.add(key)
                if item["status"] == "updated":
                    updated.add(key)
        return BatchResult(accepted=len(accepted), rejected=Counter(rejected.values()), accepted_keys=accepted,
                           rejected_keys=rejected, updated_keys=updated)

    def remove(self, keys: list[str], how: str, **_: Any) -> set[str]:
        answer = self.hook.call("POST", f"/lists/{self.target_id}/contacts:remove", dump_bytes({"emails": keys}))
        answer.raise_for_status()
        return set(keys) - set(answer.json()["removed"])

    @property
    def request_stats(self) -> dict[str, int]:
        return {"requests": self.hook.requests, "retries": 0}


SEAMTEST = DestinationType(
    name=NAME,
    display_name="Seam test",
    target_kind="list",
    spec_model=SeamSpec,
    destination="seam_destination:SeamDestination",
    hook="seam_destination.SeamHook",
    max_profiles=500,
    api_host="seam.invalid",
    doc_url="https://seam.invalid/",
    on_leave=("keep", "remove"),
)
