"""A first export streams: its batches leave while the segment is still being read.

Why: the staged path (``exporter._Reader`` then ``plan.plan_run``) reads, maps and stages the whole segment, sorts it
and merges it with the state before the first batch leaves. When the state remembers nothing (a first export, or
one after ``clear``), every profile is new: the merge has nothing to compare, and what the sort still does is fold
the rows of a profile that is in several segments into one profile. Measured at 1,000,000 profiles to Klaviyo
(``make bench``, session 12): ~13 s of reading and mapping, then ~7 s of sorting and folding, all before or while
the jobs, whose own floor is 10.5 s, went out one after another.

How (two passes over the source, both through the ``Source`` contract, so every kind of source streams the same
way):

1. ``KeyCounts.read``: the email column alone. Each row's profile key (``mapping.profile_key``, the key the mapper
   gives a valid address) is hashed to 64 bits and counted with numpy: 8 bytes a row while they are counted
   (sorted in place), then 10 bytes a distinct key (its hash, and a byte each for repeated and sent).
2. The rows, mapped, validated and encoded as in the staged path. A profile whose key is on this row alone goes
   into a batch at once (a ``create``: nothing is remembered). The rows of a key that is on more than one row are
   staged and folded once the read is over (``Staging.current``: the same fold as the staged path, so the profile
   sent is the same), then batched. A hash collision only makes two unique keys wait for the fold.

The source may change between the two passes. A row whose key the first pass did not see waits for the fold
(with any other such rows). A second row of a key that the first pass counted once, and that has already gone out,
is left for the next run, as any row written after the read would be: it is neither sent nor staged (so the
snapshot of a warehouse diff does not hold it, and the next run reads it as new); the run logs how many there were
and counts them as duplicates. (Two keys whose 64-bit hashes collide are two rows of one key for the count, and
are folded, each as its own profile; a key that appears between the passes with the hash of a key already sent
would be left for the next run like such a row. Both are as likely as a collision among 2^64 values.)

When it applies (``why_not``): the state remembers no profile of the target (or the run keeps none), the change
detection is the full read, and no limit truncates the segment. Otherwise the staged path, logged with the reason.
When the source and the state are both SQLite (by default the same file), the state's writes after each batch
would wait on the read's open statement (one writer, who waits for readers in a rollback-journal database): the
rows are then read a chunk at a time by row id, each chunk by a statement of its own
(``SqlSource.paged_chunks``), and a segment that has no row ids (a query, a view, a table ``WITHOUT ROWID``) takes
the staged path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from segment_export import changes
from segment_export.diff import Change
from segment_export.mapping import profile_key

if TYPE_CHECKING:
    import numpy as np

    from segment_export.context import RunContext

_CREATE = "create"


def why_not(ctx: RunContext, *, truncated: bool) -> str | None:
    """Why this run takes the staged path (None: it streams)."""
    state, source = ctx.state, ctx.source
    if truncated or ctx.options.max_profiles is not None:
        return "the limit truncates the segment (its first rows by order_by)"
    if ctx.change_detection is not None and ctx.change_detection.mode != changes.FULL:
        return "a warehouse diff reads only what changed"
    if state is not None and state.count() > 0:
        return "the state remembers profiles: the staged diff finds what changed"
    if _shares_sqlite(ctx) and not source.pageable():  # type: ignore[attr-defined]
        return ("the state is SQLite, like the source, and the segment is not a table with row ids to read chunk by "
                "chunk: the state's writes would wait for the read")
    return None


def _shares_sqlite(ctx: RunContext) -> bool:
    """The source and the state are SQLite (by default, the same file): the rows are then read chunk by chunk
    (``SqlSource.paged_chunks``), so that no read statement is open while the state is written."""
    source_dialect = getattr(getattr(ctx.source, "dialect", None), "name", "")
    return ctx.state is not None and ctx.state.dialect_name == "sqlite" and source_dialect == "sqlite"


class KeyCounts:
    """The first pass: how many rows each profile key has, as sorted 64-bit hashes (``hashes``) and, aligned with
    them, whether a key is on several rows (``repeated``) and whether the second pass has sent it (``seen``)."""

    def __init__(self, hashes: np.ndarray, counts: np.ndarray):
        self.hashes = hashes
        self.repeated = bytearray((counts > 1).astype("u1").tobytes())
        self.seen = bytearray(len(hashes))

    @classmethod
    def read(cls, chunks: Iterator[list[tuple[Any, ...]]]) -> KeyCounts:
        """Count the keys of ``chunks``: rows of one column, the email. Blank and undecodable values count for
        nothing (the mapper rejects those rows)."""
        import numpy as np

        parts = []
        for rows in chunks:
            keys = [profile_key(row[0]) for row in rows]
            parts.append(np.fromiter((hash(k) for k in keys if k is not None), dtype=np.int64))
        every = np.concatenate(parts) if parts else np.empty(0, np.int64)
        del parts
        every.sort()  # in place: np.unique would sort a copy
        starts = np.flatnonzero(np.diff(every, prepend=every[:1] - 1)) if len(every) else np.empty(0, np.intp)
        counts = np.diff(np.append(starts, len(every)))
        return cls(every[starts], counts)

    @property
    def keys(self) -> int:
        return len(self.hashes)

    @property
    def repeated_keys(self) -> int:
        return sum(self.repeated)

    def positions(self, keys: Sequence[str]) -> list[int]:
        """Each key's position in ``hashes``, or -1 for a key the first pass did not count."""
        import numpy as np

        wanted = np.fromiter((hash(k) for k in keys), dtype=np.int64, count=len(keys))
        at = np.searchsorted(self.hashes, wanted)
        at[at == len(self.hashes)] = 0
        found = self.hashes[at] == wanted if len(self.hashes) else np.zeros(len(keys), bool)
        return np.where(found, at, -1).tolist()


class Stream:
    """The streamed read as a plan's changes (``plan.Plan``): iterate it once. ``map_chunk(rows, hash_index)`` maps
    one chunk of rows into staged-profile tuples (``exporter._Reader.map_chunk``); ``finish_read()`` runs once the
    read ends, however it ends (the invalid rows' outcome rows); ``after_read()`` once it is complete, before the
    folded profiles go out (the snapshot's writer)."""

    def __init__(self, ctx: RunContext, columns: Sequence[str], email_column: str,
                 map_chunk: Callable[[list[tuple[Any, ...]], int | None], list[tuple[str, str, bytes, str, str | None]]],
                 finish_read: Callable[[], None], after_read: Callable[[], None]):
        self.ctx, self.columns, self.email_column = ctx, list(columns), email_column
        self.map_chunk, self.finish_read, self.after_read = map_chunk, finish_read, after_read
        self.streamed = self.folded = self.late = 0
        #: every staged row must be in the staging file (a snapshot is written from it), not only the folded ones
        detection = ctx.change_detection
        self.stage_all = detection is not None and detection.hashes_rows
        self.alone: dict[str, tuple[str]] = {}

    def __iter__(self) -> Iterator[Change]:
        self._changes = self._stream()
        return self._changes

    def close(self) -> None:
        """End the read where it is (a failed run): the source's cursor is closed, the invalid rows recorded."""
        changes_ = getattr(self, "_changes", None)
        if changes_ is not None:
            changes_.close()

    def _stream(self) -> Iterator[Change]:
        ctx, clock = self.ctx, self.ctx.clock
        with clock.phase("map"):  # reading the column counts as read, hashing and counting as map
            counts = KeyCounts.read(clock.fetched(ctx.source.chunks([self.email_column])))
        ctx.log.info("streaming a first export: %d profile keys, %d of them on several rows (folded after the read)",
                     counts.keys, counts.repeated_keys)
        yield from self._read(counts)
        with clock.phase("stage"):
            self.after_read()
        if self.late:
            ctx.log.warning("%d rows appeared while the segment was read (the source changed between the key count "
                            "and the read), of profiles sent already: left for the next run, counted as duplicates",
                            self.late)
        ctx.log.info("streamed %d profiles during the read; %d rows of keys on several rows folded after it",
                     self.streamed, self.folded)
        yield from _creates(ctx.staging.current(folded_only=self.stage_all))
        ctx.staging.duplicates += self.late

    def _read(self, counts: KeyCounts) -> Iterator[Change]:
        """The second pass: each chunk's profiles mapped and staged, those alone on their row yielded at once (the
        executor's batching counts in its own phase, not in the read's)."""
        ctx, clock = self.ctx, self.ctx.clock
        read = ctx.source.paged_chunks if _shares_sqlite(ctx) else ctx.source.chunks  # type: ignore[attr-defined]
        chunks = read(self.columns, **({"row_hash": True} if self.stage_all else {}))
        hash_index = len(self.columns) if self.stage_all else None
        rows_read = 0
        try:
            while True:
                with clock.phase("read"):
                    rows = next(chunks, None)
                if rows is None:
                    break
                rows_read += len(rows)
                with clock.phase("map"):
                    out = self._chunk(counts, rows, hash_index)
                yield from out
        except BaseException:  # a batch failed, or the read did: what was read still gets its outcome rows
            getattr(chunks, "close", lambda: None)()
            try:
                self.finish_read()
            except Exception as exc:  # noqa: BLE001 - the first failure is the one to report
                ctx.log.warning("the invalid rows' outcome rows were not written (%s)", type(exc).__name__)
            raise
        getattr(chunks, "close", lambda: None)()
        self.finish_read()
        if rows_read == 0 and counts.keys:
            raise RuntimeError(f"export {ctx.spec.id}: the {ctx.source.description} gave {counts.keys} profile keys "
                               "when its email column was read, then no rows: nothing was sent")

    def _chunk(self, counts: KeyCounts, rows: list[tuple[Any, ...]], hash_index: int | None) -> list[Change]:
        profiles = self.map_chunk(rows, hash_index)
        repeated, seen, alone = counts.repeated, counts.seen, self.alone
        make = tuple.__new__
        out: list[Change] = []
        staged, folded = [], []
        for profile, at in zip(profiles, counts.positions([p[0] for p in profiles])):
            if at < 0 or repeated[at]:
                folded.append(profile)
                continue
            if seen[at]:
                self.late += 1  # the first pass counted this key once, and it went out: the next run's
                continue
            seen[at] = 1
            staged.append(profile)
            segment = profile[3]  # one shared tuple per segment: a batch in flight keeps 10,000 of them
            segments = alone.get(segment) or alone.setdefault(segment, (segment,))
            out.append(make(Change, (profile[0], _CREATE, profile[1], profile[2], segments, ())))
        staging = self.ctx.staging
        with self.ctx.clock.phase("stage"):
            staging.add(folded + staged if self.stage_all else folded)
            if folded and self.stage_all:
                staging.fold_later([p[0] for p in folded])
        self.streamed += len(out)
        self.folded += len(folded)
        return out


def _creates(current: Iterator[Any]) -> Iterator[Change]:
    """The folded profiles as ``create`` changes (the state remembers none of them)."""
    make = tuple.__new__
    for key, fingerprint, fragment, segments in current:
        yield make(Change, (key, _CREATE, fingerprint, fragment, segments, ()))
