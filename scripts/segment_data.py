"""Synthetic segment tables for the demo, the tests and the benchmarks (no real person's data).

Rows look like a warehouse's segment membership table: one row per customer and segment, with names, phone,
loyalty tier and lifetime value. Deterministic for a given seed, so tests can compute what to expect.

    python scripts/segment_data.py sqlite .demo/segments.db --profiles 30000
"""

from __future__ import annotations

import argparse
import csv
import random
import sqlite3
from pathlib import Path
from typing import Iterator

COLUMNS = ["customer_id", "email", "first_name", "last_name", "phone", "tier", "lifetime_value", "segment"]
SEGMENTS = ["vip", "newsletter", "churn_risk", "winback"]
FIRST = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Radia", "Tim", "Margaret", "Linus"]
LAST = ["Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson", "Perlman", "Lee"]
TIERS = ["bronze", "silver", "gold", "platinum"]
# Phone numbers valid by libphonenumber (the exporter rejects others) yet nobody's: the 555 exchange of North
# American area codes from the original plan (middle digit 0 or 1). Its lines 0100-0199 are reserved for
# fiction and come first (the first 14,200 customers); the rest of 555 is not assigned to subscribers (555-1212,
# directory assistance, is skipped). 142 area codes x 9,999 lines: unique for 1,419,858 customers.
AREA_CODES = [a for a in range(201, 1000) if a // 10 % 10 in (0, 1) and a % 100 not in (0, 11) and a not in (710, 809, 900)]
LINES = list(range(100, 200)) + [n for n in range(10_000) if not 100 <= n < 200 and n != 1212]


def phone(i: int) -> str:
    """Customer ``i``'s (1-based) phone number in E.164."""
    n = i - 1
    return f"+1{AREA_CODES[n % len(AREA_CODES)]}555{LINES[n // len(AREA_CODES) % len(LINES)]:04d}"


def rows(profiles: int, seed: int = 7) -> Iterator[tuple]:
    """``profiles`` customers; each is in one segment, and every tenth customer in a second one."""
    rng = random.Random(seed)
    for i in range(1, profiles + 1):
        first, last = FIRST[i % len(FIRST)], LAST[(i // len(FIRST)) % len(LAST)]
        base = (
            i,
            f"{first.lower()}.{last.lower()}.{i}@example.com",
            first,
            last,
            phone(i),  # unique per customer: destinations match profiles by phone too
            TIERS[rng.randrange(len(TIERS))],
            round(rng.uniform(0, 5000), 2),
        )
        yield base + (SEGMENTS[i % len(SEGMENTS)],)
        if i % 10 == 0:
            yield base + (SEGMENTS[(i + 1) % len(SEGMENTS)],)


def segment_sizes(profiles: int) -> dict[str, int]:
    """Members of each segment in :func:`rows` (without generating them)."""
    sizes = dict.fromkeys(SEGMENTS, 0)
    for i in range(1, profiles + 1):
        sizes[SEGMENTS[i % len(SEGMENTS)]] += 1
        if i % 10 == 0:
            sizes[SEGMENTS[(i + 1) % len(SEGMENTS)]] += 1
    return sizes


def write_sqlite(path: str | Path, profiles: int, table: str = "segment_members", seed: int = 7) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as conn:
        conn.execute(f'DROP TABLE IF EXISTS "{table}"')
        conn.execute(
            f'CREATE TABLE "{table}" (customer_id INTEGER, email TEXT, first_name TEXT, last_name TEXT, '
            "phone TEXT, tier TEXT, lifetime_value REAL, segment TEXT)"
        )
        conn.executemany(f'INSERT INTO "{table}" VALUES (?, ?, ?, ?, ?, ?, ?, ?)', rows(profiles, seed))
    return path


def write_csv(path: str | Path, profiles: int, seed: int = 7, segment: str | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(COLUMNS)
        out.writerows(r for r in rows(profiles, seed) if segment is None or r[-1] == segment)
    return path


def write_parquet(path: str | Path, profiles: int, seed: int = 7, row_group_size: int = 50_000) -> Path:
    """Streamed one row group at a time, so a file of millions of rows never sits in memory whole."""
    import itertools

    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema(
        [("customer_id", pa.int64()), ("email", pa.string()), ("first_name", pa.string()), ("last_name", pa.string()),
         ("phone", pa.string()), ("tier", pa.string()), ("lifetime_value", pa.float64()), ("segment", pa.string())]
    )
    source = rows(profiles, seed)
    with pq.ParquetWriter(path, schema) as writer:
        while group := list(itertools.islice(source, row_group_size)):
            columns = list(zip(*group))
            writer.write_table(pa.table({name: list(col) for name, col in zip(COLUMNS, columns)}, schema=schema))
    return path


def write_postgres(conninfo: str, table: str, profiles: int, seed: int = 7) -> None:
    """``table`` (optionally ``schema.table``, created if missing) in PostgreSQL, loaded with COPY."""
    import psycopg

    schema, _, name = table.rpartition(".")
    qualified = f'"{schema}"."{name}"' if schema else f'"{name}"'
    with psycopg.connect(conninfo, autocommit=False) as conn:
        if schema:
            conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        conn.execute(f"DROP TABLE IF EXISTS {qualified}")
        conn.execute(
            f"CREATE TABLE {qualified} (customer_id BIGINT, email TEXT, first_name TEXT, last_name TEXT, "
            "phone TEXT, tier TEXT, lifetime_value DOUBLE PRECISION, segment TEXT)"
        )
        with conn.cursor() as cur, cur.copy(f"COPY {qualified} FROM STDIN") as copy:
            for row in rows(profiles, seed):
                copy.write_row(row)
        conn.commit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("format", choices=["sqlite", "csv", "parquet"])
    parser.add_argument("path")
    parser.add_argument("--profiles", type=int, default=30_000)
    parser.add_argument("--segment", help="csv only: keep the rows of this segment")
    args = parser.parse_args()
    if args.format == "sqlite":
        write_sqlite(args.path, args.profiles)
    elif args.format == "csv":
        write_csv(args.path, args.profiles, segment=args.segment)
    else:
        write_parquet(args.path, args.profiles)
    print(f"wrote {args.path}")


if __name__ == "__main__":
    main()
