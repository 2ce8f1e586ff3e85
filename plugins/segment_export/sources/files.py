"""File sources: CSV and Parquet, read in chunks.

CSV values are read as text (a zip code keeps its leading zero), a UTF-8 byte-order mark is ignored, blank
cells are empty. Parquet keeps its types. Segment filtering happens per chunk. Truncation in ``order_by``
order needs the whole key column once (one value per row, not whole rows): a first pass picks the row
positions to keep, a second pass streams them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

from segment_export.sources.base import Row, Source, SourceError
from segment_export.spec import SourceSpec


class FileSource(Source):
    """Shared logic; subclasses only know how to read raw chunks of some columns from their format."""

    def __init__(self, spec: SourceSpec):
        self.spec = spec
        self.path = Path(spec.path or "")
        self.chunk_size = spec.chunk_size
        self.description = f"{spec.file_format} file {self.path.name}"
        if not self.path.is_file():
            raise SourceError(f"the source file {self.path} does not exist")

    def _raw_chunks(self, columns: Sequence[str]) -> Iterator[list[Row]]:
        raise NotImplementedError

    def _unique_chunks(self, columns: Sequence[str]) -> Iterator[list[Row]]:
        """``_raw_chunks`` for columns that may repeat (the exporter asks for the segment column alongside the
        mapped ones, and a mapped column may be the segment or order column too): each is read once."""
        unique = list(dict.fromkeys(columns))
        if len(unique) == len(columns):
            yield from self._raw_chunks(columns)
            return
        positions = [unique.index(c) for c in columns]
        for rows in self._raw_chunks(unique):
            yield [tuple(r[i] for i in positions) for r in rows]

    def _segment_rows(self, columns: Sequence[str]) -> Iterator[list[Row]]:
        """Chunks of ``columns`` rows, filtered to the spec's segments (the segment column read alongside,
        once, whether or not it is one of ``columns``)."""
        seg_col = self.spec.segment_column
        if not seg_col:
            yield from self._unique_chunks(columns)
            return
        wanted = set(self.spec.segments or [])
        cols = list(columns) + [seg_col]
        for rows in self._unique_chunks(cols):
            kept = [r[:-1] for r in rows if r[-1] in wanted]
            if kept:
                yield kept

    def count(self) -> int:
        first = self.columns()[0]
        return sum(len(rows) for rows in self._segment_rows([first]))

    def chunks(self, columns, *, order_by=None, tie_breaker=None, limit=None) -> Iterator[list[Row]]:
        if limit is None:
            yield from self._segment_rows(columns)
            return
        keep = self._positions_to_keep(order_by, tie_breaker, limit)
        position = 0
        for rows in self._segment_rows(columns):
            kept = [row for offset, row in enumerate(rows) if position + offset in keep]
            position += len(rows)
            if kept:
                yield kept

    def _positions_to_keep(self, order_by: str | None, tie_breaker: str | None, limit: int) -> set[int]:
        """Positions (in segment order) of the first ``limit`` rows by ``order_by``, then ``tie_breaker``."""
        if not order_by:
            return set(range(limit))
        cols = list(dict.fromkeys(c for c in (order_by, tie_breaker) if c))
        primary: list[Any] = []
        secondary: list[Any] = []
        for rows in self._segment_rows(cols):
            primary.extend(r[0] for r in rows)
            secondary.extend(str(r[-1] or "") for r in rows)
        primary = _numeric_if_text_numbers(primary)
        try:
            order = sorted(
                range(len(primary)),
                key=lambda i: (primary[i] is None, 0 if primary[i] is None else primary[i], secondary[i]),
            )
        except TypeError as exc:  # mixed types in the key column
            raise SourceError(f"cannot order {self.description} by {order_by!r}: {exc}") from exc
        return set(order[:limit])


def _numeric_if_text_numbers(values: list[Any]) -> list[Any]:
    """CSV keys are text; order them as numbers when every one is a number, so "10" comes after "9"."""
    values = [None if v is None or v == "" else v for v in values]
    if not all(v is None or isinstance(v, str) for v in values):
        return values
    try:
        return [None if v is None else float(v) for v in values]
    except ValueError:
        return values


_SURROGATE = r"[\udc80-\udcff]"  # lone surrogates: where surrogateescape put undecodable bytes


def _original_bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


class CsvSource(FileSource):
    def columns(self) -> list[str]:
        import pandas as pd

        try:
            return [str(c) for c in pd.read_csv(self.path, nrows=0, encoding="utf-8-sig", encoding_errors="surrogateescape").columns]
        except (ValueError, UnicodeDecodeError, OSError) as exc:
            raise SourceError(f"cannot read the header of {self.path}: {exc}") from exc

    def _raw_chunks(self, columns: Sequence[str]) -> Iterator[list[Row]]:
        import pandas as pd

        order = list(columns)
        try:
            # Bytes that are not UTF-8 must cost their row, not the file: they are read as lone surrogates (in
            # object columns: Arrow strings cannot hold them) and
            # handed on as the original bytes, which the mapping rejects as "not valid UTF-8" for that row only.
            reader = pd.read_csv(
                self.path, usecols=order, dtype=object, keep_default_na=False, encoding="utf-8-sig",
                encoding_errors="surrogateescape", chunksize=self.chunk_size,
            )
            for frame in reader:
                frame = frame[order]
                for column in order:
                    bad = frame[column].str.contains(_SURROGATE, regex=True)
                    if bad.any():
                        frame.loc[bad, column] = frame.loc[bad, column].map(_original_bytes)
                yield list(frame.itertuples(index=False, name=None))
        except (ValueError, UnicodeDecodeError) as exc:
            raise SourceError(f"cannot read {self.path}: {exc}") from exc


class ParquetSource(FileSource):
    def _file(self):
        """The file's reader, without pre-buffering: pyarrow's default (``pre_buffer=True``) keeps every column
        chunk it has read in the reader's read-range cache until the reader is closed, so a read of the whole
        file held the file's compressed columns, growing with the file (pyarrow 26: 134 MB of Arrow memory at
        the end of a 5,000,000-profile segment, 8 MB without). See pyarrow.parquet.ParquetFile, ``pre_buffer``:
        "coalesce and issue file reads in parallel", meant for high-latency filesystems such as S3."""
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(self.path, pre_buffer=False)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds
            raise SourceError(f"cannot open {self.path} as Parquet: {exc}") from exc

    def _batches(self, columns: Sequence[str], batch_size: int) -> Iterator[Any]:
        """Record batches of ``columns``, one row group decoded at a time, on this thread (``use_threads=False``:
        Arrow's thread pool decodes columns in parallel, which the exporter's read does not need, at the cost of
        an allocator arena per thread: 154 -> 110 MB peak RSS reading a 5,000,000-profile file). The file is
        closed when the batches are consumed or abandoned."""
        with self._file() as file:
            yield from file.iter_batches(batch_size=batch_size, columns=list(columns), use_threads=False)

    def columns(self) -> list[str]:
        return list(self._file().schema_arrow.names)

    def count(self) -> int:
        if not self.spec.segment_column:
            return self._file().metadata.num_rows  # from the footer, without reading rows
        seg_col, wanted = self.spec.segment_column, self._wanted()
        if wanted is None:
            return super().count()
        import pyarrow.compute as pc

        total = 0
        for batch in self._batches([seg_col], max(self.chunk_size, 65_536)):
            total += pc.sum(pc.is_in(batch.column(0), value_set=wanted)).as_py() or 0
        return total

    def _wanted(self):
        """The segment names as an Arrow array matching the segment column's type, or None (then rows are
        filtered in Python, as for CSV)."""
        import pyarrow as pa

        field = self._file().schema_arrow.field(self.spec.segment_column)
        if not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
            return None
        return _string_array(list(self.spec.segments or [])).cast(field.type)

    def _segment_rows(self, columns: Sequence[str]) -> Iterator[list[Row]]:
        """Segment filtering in Arrow (a mask over the segment column), so only kept rows become tuples."""
        wanted = self._wanted() if self.spec.segment_column else None
        if wanted is None:
            yield from super()._segment_rows(columns)
            return
        import pyarrow.compute as pc

        seg_col = self.spec.segment_column
        read = list(dict.fromkeys(list(columns) + [seg_col]))
        for batch in self._batches(read, self.chunk_size):
            kept = batch.filter(pc.is_in(batch.column(seg_col), value_set=wanted))  # null segments are dropped
            if kept.num_rows:
                yield list(zip(*(kept.column(name).to_pylist() for name in columns)))

    def _raw_chunks(self, columns: Sequence[str]) -> Iterator[list[Row]]:
        for batch in self._batches(columns, self.chunk_size):
            yield list(zip(*(batch.column(name).to_pylist() for name in columns)))


def _string_array(values: Sequence[str]):
    """``values`` as an Arrow ``large_string`` array, built from its buffers rather than with ``pa.array``:
    any conversion of Python objects to Arrow (``pa.array``, ``pa.scalar``...) imports pandas when it is
    installed (pyarrow checks the values for pandas' missing-value markers), and importing pandas costs a
    Parquet export ~70 MB of peak RSS (measured at 100,000 profiles: 184 -> 256 MB at that step) for a value
    set of a few segment names. Layout: Arrow columnar format, variable-size binary ("an offsets buffer of
    length + 1 signed integers, then the data"), https://arrow.apache.org/docs/format/Columnar.html"""
    from array import array

    import pyarrow as pa

    encoded = [value.encode("utf-8") for value in values]
    offsets = array("q", [0])
    for value in encoded:
        offsets.append(offsets[-1] + len(value))
    return pa.Array.from_buffers(pa.large_string(), len(encoded), [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))])


def file_source(spec: SourceSpec) -> FileSource:
    return CsvSource(spec) if spec.file_format == "csv" else ParquetSource(spec)
