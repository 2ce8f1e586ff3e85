"""Change detection: which rows a run reads. The full read, or the warehouse diff, which reads only what changed.

The full read takes every row of the segment, maps it and lets the staged diff (``plan``) find what changed: at a
million rows with 1 % changed, it still reads, maps and sorts a million. The warehouse diff asks the database
instead. Each run leaves the segment's rows, hashed by the database and staged, in a snapshot beside the state
(``snapshot``); the next run's one pass over the segment (``SqlSource.changed_rows``, a full outer join on the
hash) returns only the rows the snapshot does not hold (new or changed) and the snapshot rows the segment no longer
holds (changed or gone). The run then plans exactly the profiles those rows belong to, plus those whose state
differs from the snapshot (``SnapshotStore.affected_keys``): it stages their current rows (the changed ones as read
and mapped, the others from the snapshot, as they were staged), loads their state, and the ordinary plan and diff
run over them. Every other profile has the same rows as when its state was written, so the full read would find it
unchanged too: it is counted unchanged without being read. The result is what the full read sends, removes and
tags (tests/test_changes.py runs both on the same data); only ``read`` (rows read) and ``duplicates`` count less.

When it applies (``choose``): an SQL source on SQLite or PostgreSQL whose state lives in the same database (the
default: ``sync.state_conn_id`` unset), ``sync.warehouse_diff`` not switched off, no limit truncating the segment,
a state that remembers profiles, no full resync asked for, and a snapshot written under the same signature (the
mapping, the destination's settings, the columns, and the code that maps and encodes: a change to any of them
changes every payload, so the full read re-sends everyone). Otherwise the full read, logged with the reason; it
writes the snapshot the next run needs when the rest of the conditions hold.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from segment_export.snapshot import SnapshotStore
from segment_export.sources.sql import ROW_HASH_METHOD

if TYPE_CHECKING:
    from segment_export.context import RunContext
    from segment_export.spec import ExportSpec

WAREHOUSE, FULL = "warehouse", "full"
#: affected profiles per statement (their keys travel as one JSON array)
KEYS_PER_STATEMENT = 10_000
_HERE = Path(__file__).parent


@lru_cache(maxsize=8)
def _code_digest(destination_type: str) -> str:
    """A digest of the code a staged row depends on: the mapping and the destination's encoding. A new release that
    maps or encodes differently must not reuse rows staged by the old one."""
    digest = hashlib.blake2b(digest_size=16)
    files = [_HERE / "mapping.py", _HERE / "destinations" / "base.py",
             *sorted((_HERE / "destinations" / destination_type).glob("*.py"))]
    for path in files:
        digest.update(path.read_bytes() if path.exists() else b"")
    import phonenumbers

    digest.update(phonenumbers.__version__.encode())
    return digest.hexdigest()


def signature(spec: ExportSpec, columns: Sequence[str]) -> str:
    """What a snapshot's staged rows depend on besides the rows: the export (its id is the segment of a source
    without a segment column), the mapping, the destination's settings, the columns read and their order, the code,
    and how rows are hashed (a snapshot hashed another way would read as every row changed and gone)."""
    described = {
        "export": spec.id, "columns": list(columns), "segment_column": spec.source.segment_column,
        "mapping": spec.mapping.model_dump(mode="json"), "destination": spec.destination.model_dump(mode="json"),
        "code": _code_digest(spec.destination.type), "row_hash": ROW_HASH_METHOD,
    }
    return hashlib.blake2b(json.dumps(described, sort_keys=True).encode(), digest_size=16).hexdigest()


@dataclass
class ChangeDetection:
    """How one run reads its segment: ``mode`` (``warehouse`` or ``full``), why (``reason``, logged), and the
    snapshot it writes at the end (None: none is kept for this export)."""

    mode: str
    reason: str
    snapshot: SnapshotStore | None = None
    signature: str = ""

    @property
    def hashes_rows(self) -> bool:
        """The run reads each row's hash with it (for the snapshot it writes)."""
        return self.snapshot is not None


def _unsupported(ctx: RunContext, truncated: bool) -> str | None:
    """Why this export keeps no snapshot (None: it can)."""
    spec, source, state = ctx.spec, ctx.source, ctx.state
    if not spec.sync.warehouse_diff:
        return "sync.warehouse_diff is off"
    if state is None:
        return "the run keeps no sync state"
    if not getattr(source, "hashes_rows", False):
        return f"the {source.description} cannot hash rows in SQL (SQLite and PostgreSQL can)"
    if getattr(source, "dialect", None) is not None and source.dialect.name == "sqlite" and sqlite3.sqlite_version_info < (3, 39):
        return f"SQLite {sqlite3.sqlite_version} has no full outer join (3.39 and later do)"
    if spec.sync.state_conn_id not in (None, spec.source.conn_id):
        return f"the state lives on connection {spec.state_conn_id}, not beside the segment"
    if state.dialect not in ("sqlite", "postgres"):
        return f"the state database ({state.dialect_name}) has no JSON statements"
    if truncated or ctx.options.max_profiles is not None:
        return "the limit truncates the segment"
    return None


def choose(ctx: RunContext, columns: Sequence[str], *, truncated: bool) -> ChangeDetection:
    """The run's change detection (see the module docstring)."""
    why_not = _unsupported(ctx, truncated)
    if why_not:
        return ChangeDetection(FULL, why_not)
    snapshot = SnapshotStore(ctx.state)  # type: ignore[arg-type]
    snapshot.ensure_tables()
    sig = signature(ctx.spec, columns)
    if ctx.options.full_resync:
        why_not = "a full resync was asked for"
    elif ctx.state.count() == 0:  # type: ignore[union-attr]
        why_not = "the state remembers no profile yet (a first export)"
    else:
        written = snapshot.signature()
        if written is None:
            why_not = "no snapshot of the segment yet (this run writes it)"
        elif written != sig:
            why_not = "the mapping, the destination's settings or the code changed since the snapshot (this run writes a new one)"
    if why_not:
        return ChangeDetection(FULL, why_not, snapshot, sig)
    return ChangeDetection(WAREHOUSE, "only the rows that changed since the last run are read", snapshot, sig)


def read_changes(ctx: RunContext, columns: Sequence[str], stage_chunk: Any) -> None:
    """The warehouse diff's read: stage the current rows of every affected profile and load their state.

    ``stage_chunk(rows, hash_index)`` maps, validates and stages source rows (``exporter._Reader._chunk``)."""
    detection, staging, state, clock = ctx.change_detection, ctx.staging, ctx.state, ctx.clock
    snapshot: SnapshotStore = detection.snapshot
    hash_index = len(columns)
    compared = _compare_beside(ctx)  # the snapshot against the state, while the segment is read
    gone: set[str] = set()
    for rows in clock.fetched(ctx.source.changed_rows(columns, snapshot.table)):  # type: ignore[attr-defined]
        current = [row for row in rows if row[-1] is None]
        left = [(row[-2], row[-1]) for row in rows if row[-1] is not None]
        if left:
            gone.update(h for h, _ in left)
            staging.add_affected([key for _, key in left])
        if current:
            stage_chunk(current, hash_index)
    with clock.phase("stage"):
        staging.affected_from_profiles()
        staging.add_affected(compared.result() if compared is not None else snapshot.affected_keys())
        # The affected profiles' other rows, as the snapshot staged them, and their state.
        for keys in staging.affected_chunks(KEYS_PER_STATEMENT):
            staging.add_staged([row for row in snapshot.rows_for(keys) if row[0] not in gone])
            staging.load_previous(state.previous_for(keys))  # type: ignore[union-attr]
        remembered = state.count()  # type: ignore[union-attr]
        staging.unchanged_elsewhere = remembered - staging.previous_rows
        staging.previous_rows = remembered
    ctx.log.info("warehouse diff: %d rows new or changed, %d gone; %d profiles planned, %d unchanged without reading",
                 ctx.summary.read, len(gone), staging.affected_count(), staging.unchanged_elsewhere)


def _compare_beside(ctx: RunContext) -> Future[list[str]] | None:
    """``SnapshotStore.affected_keys`` on a second connection to the state's database, in a thread, while the main
    thread reads the changed rows: the two are independent passes of the database (the segment against the
    snapshot, the snapshot against the state), each ~1-4 s at a million rows, so on PostgreSQL they run at once on
    two of its backends. None (compared after the read, on the state's connection) on SQLite, whose connections
    belong to the thread that opened them, or when a second connection cannot be opened. The keys come back as a
    list: as many as the profiles whose state differs from the snapshot (few, unless most were rejected)."""
    state = ctx.state
    if state.dialect != "postgres" or state.reconnect is None:  # type: ignore[union-attr]
        return None
    try:
        store = state.reconnect()  # type: ignore[union-attr]  # in the task's thread (see SnapshotWriter.start)
    except Exception as exc:  # noqa: BLE001 - then compared after the read, on the state's own connection
        ctx.log.info("the snapshot is compared with the state after the read (a second connection failed: %s)", exc)
        return None
    pool = ThreadPoolExecutor(1, thread_name_prefix="segment-export-compare")
    future = pool.submit(_affected_keys, store)
    pool.shutdown(wait=False)  # the thread ends with its one task
    return future


def _affected_keys(store: Any) -> list[str]:
    try:
        return list(SnapshotStore(store).affected_keys())
    finally:
        store.rollback()
        store.close()


class SnapshotWriter:
    """Writes the snapshot the next run diffs against (all of it after a full read, the planned profiles' rows after
    a warehouse diff) while the run plans and sends, on PostgreSQL: at a million rows the write is ~10-20 s of the
    database's time, which would otherwise come after the last batch. On its own connection to the state's
    database, reading the staged rows through the staging file's connection (SQLite serializes the two threads'
    statements on it). On SQLite, after the run (one writer at a time; see ``start``). Writing it
    before the run's outcome is known is sound: the snapshot says what the segment held, the state what the
    destination accepted, and the next run plans every profile where the two differ. A failed write is logged and
    leaves no snapshot (the next run reads the whole segment)."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.detection: ChangeDetection | None = ctx.change_detection
        self.thread: threading.Thread | None = None
        self.written: int | None = None
        self.error: BaseException | None = None
        #: how long the write took, and how long the run waited for it at its end (seconds)
        self.seconds = self.waited = 0.0

    @property
    def wanted(self) -> bool:
        return self.detection is not None and self.detection.snapshot is not None and self.ctx.applies_changes

    def start(self) -> None:
        """Begin writing beside the run, when the state can open a second connection (else ``finish`` writes)."""
        state = self.ctx.state
        # SQLite has one writer at a time: the write's statements (deleting a million old rows is one) would make
        # the export's own state writes wait past their 5 s timeout ("database is locked", measured at 1M rows).
        if not self.wanted or state.reconnect is None or state.dialect != "postgres":  # type: ignore[union-attr]
            return
        try:
            # Opened here, in the task's own thread: in a task, reading a connection talks to Airflow's supervisor.
            store = state.reconnect()  # type: ignore[union-attr]
        except Exception as exc:  # noqa: BLE001 - then written after the run, on the state's own connection
            self.ctx.log.info("the segment snapshot is written after the run (a second connection failed: %s)", exc)
            return
        self.thread = threading.Thread(target=self._write_beside, args=(store,), name="segment-export-snapshot", daemon=True)
        self.thread.start()

    def _write_beside(self, store: Any) -> None:
        started = time.monotonic()
        try:
            self.written = self._write(SnapshotStore(store))
            self.seconds = time.monotonic() - started
        except BaseException as exc:  # noqa: BLE001 - reported by finish()
            self.error = exc
            store.rollback()
        finally:
            store.close()

    def _write(self, snapshot: SnapshotStore) -> int:
        detection, staging = self.detection, self.ctx.staging
        rows = staging.snapshot_rows(KEYS_PER_STATEMENT)
        if detection.mode == FULL:  # type: ignore[union-attr]
            return snapshot.replace(rows, detection.signature)  # type: ignore[union-attr]
        return snapshot.update(staging.affected_chunks(KEYS_PER_STATEMENT), rows, detection.signature)  # type: ignore[union-attr]

    def finish(self, *, succeeded: bool) -> None:
        """Wait for the write (or write now, without a second connection, after a run that succeeded) and log it."""
        if not self.wanted:
            return
        ctx = self.ctx
        if self.thread is not None:
            waited = time.monotonic()
            self.thread.join()
            self.waited = time.monotonic() - waited
        elif succeeded:
            with ctx.clock.phase("state"):
                started = time.monotonic()
                try:
                    self.written = self._write(self.detection.snapshot)  # type: ignore[union-attr]
                    self.seconds = self.waited = time.monotonic() - started
                except Exception as exc:  # noqa: BLE001 - the snapshot is a cache: the run's outcome stands
                    self.error = exc
                    ctx.state.rollback()  # type: ignore[union-attr]
        if self.error is not None:
            ctx.log.warning("the segment snapshot could not be written (%s: %s); the next run reads the whole segment",
                            type(self.error).__name__, self.error)
        elif self.written is not None:
            if self.detection.mode == FULL and succeeded:  # type: ignore[union-attr]
                self.detection.snapshot.analyze_state()  # type: ignore[union-attr]
            ctx.log.info("segment snapshot for the next run's warehouse diff: %d rows written (%s) in %.1f s, of which "
                         "the run waited %.1f s at its end", self.written,
                         "all" if self.detection.mode == FULL else "the planned profiles'",  # type: ignore[union-attr]
                         self.seconds, self.waited)
