"""The export benchmark: N synthetic profiles through the real operator, against the sandbox's real limits.

    make bench                                  # 1,000,000 profiles, every destination x source
    make bench BENCH_ARGS="--profiles 20000"    # smaller, while developing
    python benchmarks/bench.py --help

What it does:

1. Generates a segment table of N customers (1.1 N rows: every tenth customer is in two of the four
   segments, so the export de-duplicates 0.1 N rows) in SQLite and Parquet, and in PostgreSQL when
   127.0.0.1:5432 answers. Files are cached in ``benchmarks/data/`` (git-ignored) and reused.
2. Starts the API sandbox as its own process with the destinations' documented rate limits and the latency
   given (default 0.5 s per Klaviyo job submission, 1.0 s per Mailchimp batch, Klaviyo processing each job
   at ``--klaviyo-profiles-per-second``).
3. For each destination x source, resets the sandbox, empties the export's sync state (a first export: every
   profile new) and runs ``SegmentExportOperator.execute`` (the code a DAG runs) in a child process (``run_case.py``), which reports the export's wall and CPU time and its peak
   RSS. Requests sent and answered 429/5xx come from the sandbox's request log.
4. Computes each case's floor: the least time the destination's limits and the latency allow (formula
   printed), the ratio wall/floor and the CPU microseconds per exported profile.
5. Runs the baseline (one profile per request, Klaviyo ``POST /api/profile-import`` at 75/s, 750/min) on
   ``--baseline-profiles`` profiles, the 1%-changed rerun of the SQLite segment, and the 1%-changed reruns of
   the PostgreSQL segment at ``--rerun-postgres`` sizes (default 1,000,000; the warehouse diff).
   Their ``bench-rerun:`` lines come last.
6. Prints a table, then one ``bench:`` line per destination x source case, and writes ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
# This checkout's code, whatever is installed: the product, the API sandbox (its own distribution, sandbox/).
CODE_PATHS = [str(ROOT / "plugins"), str(ROOT / "sandbox" / "src")]
sys.path[:0] = [*CODE_PATHS, str(ROOT / "scripts")]

import segment_data  # noqa: E402

PG_CONNINFO = "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=3"
PG_SCHEMA = "segment_bench"
DATA_VERSION = 2  # bump when segment_data's rows change, to regenerate cached files (2: valid phone numbers)
SEGMENTS = list(segment_data.SEGMENTS)

# The destinations' documented limits (the product's constants would do, but the floor should not depend on
# the code it judges).
# Klaviyo, Bulk Import Profiles: "Accepts up to 10,000 profiles per request", rate limits "Burst: 10/s, Steady:
# 150/m"; no cap on jobs in progress is documented (other bulk jobs document one: catalog jobs, 500), so the floor
# has none. Mailchimp: 500 members per batch subscribe and per static-segment (tag) call, 10 simultaneous
# connections per key.
KLAVIYO_JOB_PROFILES, KLAVIYO_BURST, KLAVIYO_STEADY = 10_000, 10, 150
MAILCHIMP_BATCH, MAILCHIMP_CONNECTIONS = 500, 10
PROFILE_IMPORT_BURST, PROFILE_IMPORT_STEADY = 75, 750


# --- floors -------------------------------------------------------------------------------------------

def submit_time(k: int, burst: int, steady: int) -> float:
    """Earliest start of the k-th request (1-based) under burst/s and steady/min windows, from t=0."""
    return max(float((k - 1) // burst), 60.0 * ((k - 1) // steady))


def klaviyo_floor(n: int, latency: float, speed: float) -> tuple[float, str]:
    """Job k (1-based) can be submitted at submit_time(k) and is done L_job + n_k/P later; nothing else bounds it
    (no documented cap on jobs in progress): the floor is the latest of those ends."""
    jobs = math.ceil(n / KLAVIYO_JOB_PROFILES)
    ends = [submit_time(k, KLAVIYO_BURST, KLAVIYO_STEADY) + latency + min(KLAVIYO_JOB_PROFILES, n - (k - 1) * KLAVIYO_JOB_PROFILES) / speed
            for k in range(1, jobs + 1)]
    floor = max(ends) if ends else 0.0
    formula = (
        f"J=ceil(N/{KLAVIYO_JOB_PROFILES})={jobs} jobs; max over k of max(floor((k-1)/{KLAVIYO_BURST})*1s, "
        f"floor((k-1)/{KLAVIYO_STEADY})*60s) + L_job + n_k/P = {floor:.1f} with L_job={latency}s, P={speed:g} profiles/s "
        f"(Bulk Import Profiles: 10,000 profiles a job, 10/s burst, 150/m steady; no documented cap on jobs in progress)"
    )
    return floor, formula


def mailchimp_tag_calls(n: int) -> int:
    """Static-segment (tag) calls a first export needs: one per 500 members of each segment, each segment's
    members counted from the generated data (every tenth customer is in two segments)."""
    sizes = segment_data.segment_sizes(n)
    return sum(math.ceil(size / MAILCHIMP_BATCH) for size in sizes.values())


def mailchimp_floor(n: int, latency: float, write_latency: float, first_run: bool = True) -> tuple[float, str]:
    batches = math.ceil(n / MAILCHIMP_BATCH)
    tags = mailchimp_tag_calls(n) if first_run else 0
    floor = math.ceil(batches / MAILCHIMP_CONNECTIONS) * latency + math.ceil(tags / MAILCHIMP_CONNECTIONS) * write_latency
    formula = (
        f"B=ceil(N/{MAILCHIMP_BATCH})={batches} batch subscribe calls (new members: 1 each), T={tags} tag calls "
        f"(500 members of a segment each); ceil(B/{MAILCHIMP_CONNECTIONS} connections)*L_batch + "
        f"ceil(T/{MAILCHIMP_CONNECTIONS})*L_write = {floor:.1f} with L_batch={latency}s, L_write={write_latency}s"
    )
    return floor, formula


def profile_import_floor(n: int) -> tuple[float, str]:
    floor = submit_time(n, PROFILE_IMPORT_BURST, PROFILE_IMPORT_STEADY)
    formula = f"max(floor((N-1)/{PROFILE_IMPORT_BURST})*1s, floor((N-1)/{PROFILE_IMPORT_STEADY})*60s) = {floor:.1f}"
    return floor, formula


# --- data ---------------------------------------------------------------------------------------------

def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def expected_rows(n: int) -> int:
    return n + n // 10


def ensure_files(data: Path, n: int) -> dict[str, Path]:
    """SQLite and Parquet segments of n customers, generated once and cached (with a marker of what they hold)."""
    paths = {"sqlite": data / f"segments-{n}.db", "parquet": data / f"segments-{n}.parquet"}
    for kind, path in paths.items():
        marker = path.with_name(path.name + ".json")
        want = {"profiles": n, "rows": expected_rows(n), "version": DATA_VERSION}
        if path.exists() and marker.exists() and json.loads(marker.read_text()) == want:
            continue
        started = time.monotonic()
        tmp = path.with_name(path.name + ".tmp")
        tmp.unlink(missing_ok=True)
        (segment_data.write_sqlite if kind == "sqlite" else segment_data.write_parquet)(tmp, n)
        tmp.replace(path)
        marker.write_text(json.dumps(want))
        print(f"generated {_shown(path)} ({want['rows']:,} rows) in {time.monotonic() - started:.1f}s", flush=True)
    return paths


def postgres_table(n: int) -> str | None:
    """``segment_bench.segment_members_<n>`` in the local PostgreSQL, loaded once; None when unreachable."""
    try:
        import psycopg

        conn = psycopg.connect(PG_CONNINFO, autocommit=True)
    except Exception as exc:  # noqa: BLE001 - any failure means: no PostgreSQL case
        print(f"note: PostgreSQL not reachable ({type(exc).__name__}); skipping the postgres source", flush=True)
        return None
    table = f"{PG_SCHEMA}.segment_members_{n}"
    with conn:
        try:
            count = conn.execute(f'SELECT count(*) FROM "{PG_SCHEMA}"."segment_members_{n}"').fetchone()[0]
            # The rows of this version of segment_data (DATA_VERSION 2 changed the phone numbers)
            if conn.execute(f'SELECT phone FROM "{PG_SCHEMA}"."segment_members_{n}" WHERE customer_id = 1').fetchone() != (segment_data.phone(1),):
                count = -1
        except psycopg.Error:
            count = -1
    if count != expected_rows(n):
        started = time.monotonic()
        segment_data.write_postgres(PG_CONNINFO, table, n)
        with psycopg.connect(PG_CONNINFO, autocommit=True) as conn:
            conn.execute(f'ANALYZE "{PG_SCHEMA}"."segment_members_{n}"')
        print(f"generated PostgreSQL {table} ({expected_rows(n):,} rows) in {time.monotonic() - started:.1f}s", flush=True)
    return table


#: the exporter's tables in the benchmark's PostgreSQL database that runs rewrite (``vacuum_postgres``): the state
#: and every export target's snapshot table
PG_EXPORT_TABLES = "tablename = 'segment_export_state' OR tablename LIKE 'segment\\_export\\_snapshot\\_%'"


def vacuum_postgres(*, full: bool = False) -> None:
    """``VACUUM ANALYZE`` the exporter's tables in the benchmark's PostgreSQL database (``full``: ``VACUUM FULL``,
    which also gives the file's dead space back), before each PostgreSQL case.

    Why: a case clears the state and rewrites the snapshot, leaving a million dead rows each time, and a server with
    autovacuum off (this machine's is) never reclaims them: after a few cases, a rerun's warehouse diff scanned 3.2 GB
    of snapshot and 1.1 GB of state for 1.1M and 1M live rows, and each case measured the cases before it. On a
    default server autovacuum does this between runs; the benchmark does it between cases."""
    import psycopg

    with psycopg.connect(PG_CONNINFO, autocommit=True) as conn:
        tables = conn.execute(f"SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND ({PG_EXPORT_TABLES})")
        for (table,) in tables.fetchall():
            conn.execute(f'VACUUM {"FULL " if full else ""}ANALYZE "{table}"')


# --- the sandbox --------------------------------------------------------------------------------------

def with_code_paths(env: dict[str, str]) -> dict[str, str]:
    """``env`` with this checkout's code first on PYTHONPATH, so child processes run what this process runs."""
    env = dict(env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (*CODE_PATHS, env.get("PYTHONPATH", "")) if p)
    return env


class SandboxProcess:
    """``python -m segment_export_sandbox`` in its own process, with the benchmark's merge fields."""

    def __init__(self, args: argparse.Namespace, workdir: Path):
        from segment_export_sandbox.config import (
            MAILCHIMP_ACCOUNT_ID, MAILCHIMP_API_KEY, MAILCHIMP_AUDIENCE_ID, MAILCHIMP_AUDIENCE_NAME,
        )

        config = workdir / "sandbox.json"
        fields = [
            {"tag": "FNAME", "name": "First Name", "type": "text", "options": {"size": 25}},
            {"tag": "LNAME", "name": "Last Name", "type": "text", "options": {"size": 25}},
            {"tag": "PHONE", "name": "Phone Number", "type": "phone", "options": {"phone_format": "none"}},
            {"tag": "TIER", "name": "Loyalty tier", "type": "text"},
            {"tag": "LTV", "name": "Lifetime value", "type": "number"},
        ]
        config.write_text(json.dumps({"latency": {"mailchimp_write": args.latency_mailchimp_write}, "mailchimp_accounts": [{
            "api_key": MAILCHIMP_API_KEY, "account_id": MAILCHIMP_ACCOUNT_ID,
            "audiences": [{"id": MAILCHIMP_AUDIENCE_ID, "name": MAILCHIMP_AUDIENCE_NAME, "merge_fields": fields}],
        }]}))
        command = [
            sys.executable, "-m", "segment_export_sandbox", "--port", "0", "--config", str(config),
            "--latency-klaviyo-job", str(args.latency_klaviyo_job),
            "--latency-mailchimp-batch", str(args.latency_mailchimp_batch),
            "--klaviyo-profiles-per-second", str(args.klaviyo_profiles_per_second),
        ]
        self.log = open(workdir / "sandbox.log", "wb")
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self.log, cwd=ROOT,
                                        env=with_code_paths(os.environ))
        line = self.process.stdout.readline().decode().strip()
        if not line.startswith("SANDBOX_URL="):
            self.stop()
            raise RuntimeError(f"the sandbox did not start (see {workdir / 'sandbox.log'})")
        self.url = line.split("=", 1)[1]

    def call(self, method: str, path: str) -> Any:
        request = urllib.request.Request(self.url + path, method=method, data=b"" if method == "POST" else None)
        with urllib.request.urlopen(request, timeout=600) as response:
            return json.loads(response.read() or b"null")

    def cpu_seconds(self) -> float:
        try:
            import psutil

            times = psutil.Process(self.process.pid).cpu_times()
            return times.user + times.system
        except Exception:  # noqa: BLE001 - only informative
            return float("nan")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()


def request_counts(log: dict[str, Any]) -> tuple[int, int]:
    """(API requests, those answered 429 or 5xx: each is retried by the client) from the sandbox log."""
    sent = retried = 0
    for endpoint, entry in log.get("by_endpoint", {}).items():
        sent += entry["count"]
        retried += sum(n for status, n in entry["status"].items() if status == "429" or status.startswith("5"))
    return sent, retried


# --- cases --------------------------------------------------------------------------------------------

def export_spec(destination: str, source: str, n: int, paths: dict[str, Any]) -> dict[str, Any]:
    from segment_export_sandbox.config import KLAVIYO_LIST_ID, MAILCHIMP_AUDIENCE_ID

    if source == "parquet":
        src: dict[str, Any] = {"path": str(paths["parquet"])}
    elif source == "sqlite":
        src = {"conn_id": "bench_sqlite", "table": "segment_members"}
    else:
        src = {"conn_id": "bench_postgres", "table": paths["postgres"]}
    src.update({"segment_column": "segment", "segments": SEGMENTS})
    mapping: dict[str, Any] = {
        "email": "email", "first_name": "first_name", "last_name": "last_name", "phone_number": "phone",
    }
    if destination == "klaviyo":
        dest: dict[str, Any] = {"type": "klaviyo", "list_id": KLAVIYO_LIST_ID}
        mapping.update({"external_id": "customer_id", "attributes": {"loyalty_tier": "tier", "lifetime_value": "lifetime_value"}})
    else:
        dest = {"type": "mailchimp", "audience_id": MAILCHIMP_AUDIENCE_ID, "new_member_status": "subscribed"}
        mapping["attributes"] = {"TIER": "tier", "LTV": "lifetime_value"}
    return {
        "id": f"bench_{destination}_{source}",
        "privacy_acknowledged": True,
        "source": src,
        "destination": dest,
        "mapping": mapping,
        "limit": {"max_profiles": 10 * expected_rows(n)},
    }


def child_env(sandbox: SandboxProcess, paths: dict[str, Any], workdir: Path) -> dict[str, str]:
    from airflow_env import airflow_env

    env = airflow_env(workdir / "airflow-home", sandbox.url, paths["sqlite"])
    env["AIRFLOW_CONN_BENCH_SQLITE"] = json.dumps({"conn_type": "sqlite", "host": str(paths["sqlite"])})
    env["AIRFLOW_CONN_BENCH_POSTGRES"] = json.dumps(
        {"conn_type": "postgres", "host": "127.0.0.1", "port": 5432, "login": "postgres", "schema": "test"}
    )
    env.setdefault("SEGMENT_EXPORT_STATE_DB", str(workdir / "state.db"))
    return with_code_paths(env)



def run_child(case: dict[str, Any], env: dict[str, str], workdir: Path, name: str, py_spy: Path | None) -> dict[str, Any]:
    case_file = workdir / f"{name}.json"
    case_file.write_text(json.dumps(case))
    command = [sys.executable, str(HERE / "run_case.py"), str(case_file)]
    if py_spy is not None:
        py_spy.mkdir(parents=True, exist_ok=True)
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        idle = ["--idle"] if os.environ.get("BENCH_PY_SPY_IDLE") == "1" else []  # waits too: where the wall goes
        command = [spy, "record", "--threads", *idle, "--rate", "200", "--format", "raw", "-o", str(py_spy / f"{name}.txt"), "--", *command]
    log_file = workdir / f"{name}.log"
    with open(log_file, "wb") as log:  # the task's log lines (structlog writes them to stdout) and stderr
        completed = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    lines = [l for l in log_file.read_text(errors="replace").splitlines() if l.startswith("RESULT ")]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"case {name} failed (exit {completed.returncode}); its log: {workdir / (name + '.log')}")
    return json.loads(lines[-1][len("RESULT "):])


def measure(sandbox: SandboxProcess, run: callable) -> tuple[dict[str, Any], int, int, float]:
    sandbox.call("POST", "/_sandbox/reset")
    cpu0 = sandbox.cpu_seconds()
    result = run()
    sandbox_cpu = sandbox.cpu_seconds() - cpu0
    sent, retried = request_counts(sandbox.call("GET", "/_sandbox/requests"))
    return result, sent, retried, sandbox_cpu


def sync_state_available() -> str | None:
    """None when the exporter keeps sync state (issue 3); else why the 1%-changed rerun is skipped."""
    import importlib.util
    import inspect

    if importlib.util.find_spec("segment_export.state") is None:
        return "segment_export has no sync state module yet"
    import segment_export.exporter as exporter

    if "segment_export.state" not in inspect.getsource(exporter):
        return "the exporter does not use sync state yet (issue 3)"
    return None


# --- main ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export benchmark against the API sandbox (see the module docstring).")
    parser.add_argument("--profiles", type=int, default=1_000_000, help="customers in the segment (default 1,000,000)")
    parser.add_argument("--destinations", default="klaviyo,mailchimp")
    parser.add_argument("--sources", default="sqlite,parquet,postgres", help="postgres only when reachable")
    parser.add_argument("--latency-klaviyo-job", type=float, default=0.5, help="seconds per job submission (default 0.5)")
    parser.add_argument("--latency-mailchimp-batch", type=float, default=1.0, help="seconds per batch call (default 1.0)")
    parser.add_argument("--latency-mailchimp-write", type=float, default=0.0,
                        help="seconds per other Mailchimp write, tag calls included (default 0: the floor counts them at it)")
    parser.add_argument("--klaviyo-profiles-per-second", type=float, default=10_000.0,
                        help="Klaviyo's processing speed of one job (default 10,000: 1 s per full job)")
    parser.add_argument("--baseline-profiles", type=int, default=2_000, help="profiles for the one-per-request baseline (0: skip)")
    parser.add_argument("--no-rerun", action="store_true", help="skip the 1%%-changed reruns")
    parser.add_argument("--rerun-postgres", default="1000000", metavar="N,N",
                        help="profile counts of the 1%%-changed rerun cases on PostgreSQL (bench-rerun: lines; '' to skip). "
                             "1000000,10000000 adds the 10M case (~35 min here; the sandbox held 10M profiles in 1.7 GB)")
    parser.add_argument("--rerun-destinations", default="klaviyo", help="destinations of the PostgreSQL rerun cases")
    parser.add_argument("--data-dir", type=Path, default=HERE / "data")
    parser.add_argument("--results", type=Path, default=HERE / "results.json")
    parser.add_argument("--py-spy", type=Path, metavar="DIR", help="record each case with py-spy (raw stacks) into DIR")
    args = parser.parse_args(argv)

    n = args.profiles
    destinations = [d for d in args.destinations.split(",") if d]
    sources = [s for s in args.sources.split(",") if s]
    args.data_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Any] = dict(ensure_files(args.data_dir, n))
    if "postgres" in sources:
        table = postgres_table(n)
        if table is None:
            sources.remove("postgres")
        else:
            paths["postgres"] = table
            vacuum_postgres(full=True)  # earlier runs' dead rows out of the files (see vacuum_postgres)
    workdir = Path(tempfile.mkdtemp(prefix="run-", dir=args.data_dir))
    sandbox = SandboxProcess(args, workdir)
    env = child_env(sandbox, paths, workdir)
    print(f"sandbox {sandbox.url}; logs in {_shown(workdir)}", flush=True)
    results: list[dict[str, Any]] = []
    notes: list[str] = []
    try:
        for destination in destinations:
            for source in sources:
                name = f"{destination}-{source}"
                print(f"running {name} ({n:,} profiles)...", flush=True)
                case = {"mode": "export", "spec": export_spec(destination, source, n, paths), "params": {}, "fresh_state": True}
                if source == "postgres":
                    vacuum_postgres()
                result, sent, retried, sandbox_cpu = measure(sandbox, lambda: run_child(case, env, workdir, name, args.py_spy))
                if destination == "klaviyo":
                    floor, formula = klaviyo_floor(n, args.latency_klaviyo_job, args.klaviyo_profiles_per_second)
                else:
                    floor, formula = mailchimp_floor(n, args.latency_mailchimp_batch, args.latency_mailchimp_write)
                results.append(entry("export", destination, source, n, result, floor, formula, sent, retried, sandbox_cpu))
                print(f"  {line(results[-1])}", flush=True)

        if not args.no_rerun and "sqlite" in sources:
            why = sync_state_available()
            if why:
                notes.append(f"1%-changed rerun skipped: {why}")
                print(f"note: {notes[-1]}", flush=True)
            else:
                for destination in destinations:
                    results.extend(rerun(destination, n, paths, env, workdir, sandbox, args))

        reruns = [int(x) for x in args.rerun_postgres.split(",") if x] if not args.no_rerun and "postgres" in sources else []
        for size in reruns:
            rerun_paths = {**paths, "postgres": postgres_table(size) if size != n else paths["postgres"]}
            for destination in (d for d in args.rerun_destinations.split(",") if d):
                results.append(rerun_postgres(destination, size, rerun_paths, env, workdir, sandbox, args.py_spy))

        if args.baseline_profiles > 0:
            b = args.baseline_profiles
            print(f"running baseline: {b:,} profiles, one POST /api/profile-import each...", flush=True)
            from segment_export_sandbox.config import KLAVIYO_API_KEY

            case = {"mode": "baseline", "sqlite": str(paths["sqlite"]), "profiles": b, "url": sandbox.url, "api_key": KLAVIYO_API_KEY}
            result, sent, retried, sandbox_cpu = measure(sandbox, lambda: run_child(case, env, workdir, "baseline", None))
            floor, formula = profile_import_floor(b)
            results.append(entry("baseline-profile-import", "klaviyo", "sqlite", b, result, floor, formula, sent, retried, sandbox_cpu))
            print(f"  {line(results[-1])}", flush=True)
    finally:
        sandbox.stop()

    report = {
        "machine": machine(),
        "settings": {
            "profiles": n, "latency_klaviyo_job_s": args.latency_klaviyo_job,
            "latency_mailchimp_batch_s": args.latency_mailchimp_batch,
            "latency_mailchimp_write_s": args.latency_mailchimp_write,
            "klaviyo_profiles_per_second": args.klaviyo_profiles_per_second,
            "rows_per_profile": round(expected_rows(n) / n, 3), "segments": SEGMENTS,
        },
        "notes": notes,
        "cases": results,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(report, indent=2) + "\n")
    print_table(results, notes)
    print(f"results: {args.results}")
    for r in results:
        if r["case"] == "export":
            print(line(r))
    for r in results:
        if r["case"] == "rerun-postgres":
            print(rerun_line(r))
    return 0


def rerun_postgres(destination: str, n: int, paths: dict[str, Any], env: dict[str, str], workdir: Path,
                   sandbox: SandboxProcess, py_spy: Path | None = None) -> dict[str, Any]:
    """A first export of the PostgreSQL segment of ``n`` customers, 1 % of its rows changed, the next run: the
    warehouse diff's case (issue 14). The rows are restored afterwards."""
    import psycopg

    name = f"{destination}-postgres-{n}-rerun"
    spec = export_spec(destination, "postgres", n, paths)
    schema, table = paths["postgres"].split(".")
    qualified = f'"{schema}"."{table}"'
    print(f"running {name}: full run of {n:,} profiles, then 1% of rows changed...", flush=True)
    sandbox.call("POST", "/_sandbox/reset")
    vacuum_postgres()
    full = run_child({"mode": "export", "spec": spec, "params": {}, "fresh_state": True}, env, workdir, name + "-full", None)
    vacuum_postgres()  # what autovacuum does between the two runs on a default server
    with psycopg.connect(PG_CONNINFO, autocommit=True) as conn:
        changed = conn.execute(f"UPDATE {qualified} SET first_name = first_name || 'x' WHERE customer_id % 100 = 0").rowcount
        try:
            cpu0 = sandbox.cpu_seconds()
            result = run_child({"mode": "export", "spec": spec, "params": {}}, env, workdir, name, py_spy)
            sandbox_cpu = sandbox.cpu_seconds() - cpu0
        finally:
            conn.execute(f"UPDATE {qualified} SET first_name = left(first_name, -1) WHERE customer_id % 100 = 0")
            conn.execute(f"VACUUM ANALYZE {qualified}")
    summary = result.get("summary", {})
    out = {
        "case": "rerun-postgres", "destination": destination, "source": "postgres", "profiles": n, "changed": changed,
        "rows_read": summary.get("read"), "change_detection": summary.get("change_detection"),
        "wall_s": round(result["wall_s"], 2), "full_wall_s": round(full["wall_s"], 2),
        "share": round(result["wall_s"] / full["wall_s"], 4), "sent": summary.get("sent"),
        "cpu_s": round(result["cpu_s"], 2), "peak_rss_mb": round(result["peak_rss_mb"], 1),
        "full_peak_rss_mb": round(full["peak_rss_mb"], 1), "sandbox_cpu_s": round(sandbox_cpu, 2),
        "cpu_seconds_by_phase": result.get("cpu_seconds") or {}, "full_cpu_seconds_by_phase": full.get("cpu_seconds") or {},
    }
    print(f"  {rerun_line(out)}", flush=True)
    return out


def rerun_line(r: dict[str, Any]) -> str:
    return (f"bench-rerun: destination={r['destination']} source={r['source']} profiles={r['profiles']} "
            f"changed={r['changed']} rows_read={r['rows_read']} wall_s={r['wall_s']:.2f} "
            f"full_wall_s={r['full_wall_s']:.2f} share={r['share']:.3f}")


def rerun(destination: str, n: int, paths: dict[str, Any], env: dict[str, str], workdir: Path,
          sandbox: SandboxProcess, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Full run, 1% of rows changed in the SQLite segment, then a normal (incremental) run; rows restored after."""
    import sqlite3

    name = f"{destination}-sqlite-rerun"
    spec = export_spec(destination, "sqlite", n, paths)
    out = []
    print(f"running {name}: full run, then 1% of rows changed...", flush=True)
    sandbox.call("POST", "/_sandbox/reset")
    full = run_child({"mode": "export", "spec": spec, "params": {}, "fresh_state": True}, env, workdir, name + "-full", None)
    db = sqlite3.connect(paths["sqlite"])
    try:
        with db:
            db.execute("UPDATE segment_members SET first_name = first_name || 'x' WHERE customer_id % 100 = 0")
        cpu0 = sandbox.cpu_seconds()
        before = request_counts(sandbox.call("GET", "/_sandbox/requests"))
        result = run_child({"mode": "export", "spec": spec, "params": {}}, env, workdir, name, None)
        after = request_counts(sandbox.call("GET", "/_sandbox/requests"))
    finally:
        with db:
            db.execute("UPDATE segment_members SET first_name = substr(first_name, 1, length(first_name) - 1) WHERE customer_id % 100 = 0")
        db.close()
    floor = 0.15 * full["wall_s"]
    formula = f"target: 15% of the full run's {full['wall_s']:.1f}s"
    out.append(entry("rerun-1pct", destination, "sqlite", n, result, floor, formula, after[0] - before[0],
                     after[1] - before[1], sandbox.cpu_seconds() - cpu0))
    print(f"  {line(out[-1])}", flush=True)
    return out


def entry(case: str, destination: str, source: str, n: int, result: dict[str, Any], floor: float, formula: str,
          sent: int, retried: int, sandbox_cpu: float) -> dict[str, Any]:
    wall = result["wall_s"]
    return {
        "case": case, "destination": destination, "source": source, "profiles": n,
        "wall_s": round(wall, 2), "floor_s": round(floor, 2), "ratio": round(wall / floor, 3) if floor > 0 else float("inf"),
        "floor_formula": formula,
        "cpu_s": round(result["cpu_s"], 2), "cpu_us_per_profile": round(result["cpu_s"] / n * 1e6, 2),
        "peak_rss_mb": round(result["peak_rss_mb"], 1), "process_cpu_s": round(result["process_cpu_s"], 2),
        "requests": sent, "retried": retried, "client_requests": result.get("client_requests"),
        "client_retries": result.get("client_retries"), "sandbox_cpu_s": round(sandbox_cpu, 2),
        "summary": result.get("summary", {}),
        # The CPU target counts reading, mapping, validating and serializing: the exporter's "read" and
        # "map" phases. cpu_us_per_profile above counts everything (staging, diff, state, sending threads).
        "core_cpu_us_per_profile": core_us(result.get("cpu_seconds") or {}, n),
        "cpu_seconds_by_phase": result.get("cpu_seconds") or {},
    }


def core_us(phases: dict[str, float], n: int) -> float | None:
    if "read" not in phases and "map" not in phases:
        return None  # the baseline: no phases
    return round((phases.get("read", 0.0) + phases.get("map", 0.0) + phases.get("workers", 0.0)) / n * 1e6, 2)


def line(r: dict[str, Any]) -> str:
    return (
        f"bench: destination={r['destination']} source={r['source']} profiles={r['profiles']} wall_s={r['wall_s']:.2f} "
        f"floor_s={r['floor_s']:.2f} ratio={r['ratio']:.3f} cpu_us_per_profile={r['cpu_us_per_profile']:.2f} "
        f"peak_rss_mb={r['peak_rss_mb']:.1f}"
    )


def print_table(results: list[dict[str, Any]], notes: list[str]) -> None:
    head = f"{'case':<24}{'destination':<12}{'source':<10}{'profiles':>10}{'wall s':>9}{'floor s':>9}{'ratio':>7}" \
           f"{'cpu us/p':>10}{'core us/p':>10}{'rss MB':>8}{'requests':>9}{'retried':>8}{'sbx cpu s':>10}"
    print()
    print(head)
    print("-" * len(head))
    for r in (r for r in results if r["case"] != "rerun-postgres"):
        print(f"{r['case']:<24}{r['destination']:<12}{r['source']:<10}{r['profiles']:>10,}{r['wall_s']:>9.1f}"
              f"{r['floor_s']:>9.1f}{r['ratio']:>7.2f}{r['cpu_us_per_profile']:>10.1f}"
              f"{'' if r.get('core_cpu_us_per_profile') is None else format(r['core_cpu_us_per_profile'], '.1f'):>10}"
              f"{r['peak_rss_mb']:>8.0f}"
              f"{r['requests']:>9,}{r['retried']:>8,}{r['sandbox_cpu_s']:>10.1f}")
    print()
    seen = set()
    for r in (r for r in results if r["case"] != "rerun-postgres"):
        key = (r["case"], r["destination"])
        if key not in seen:
            seen.add(key)
            print(f"floor {r['case']} {r['destination']}: {r['floor_formula']}")
    for r in results:
        if r.get("cpu_seconds_by_phase"):
            phases = ", ".join(f"{k} {v:.1f}" for k, v in r["cpu_seconds_by_phase"].items())
            print(f"cpu s by phase {r['case']} {r['destination']} {r['source']} {r['profiles']:,}: {phases}")
    print("core us/p: the read and map phases (read, map, validate, serialize; the map workers' too): the issue's CPU target")
    for note in notes:
        print(f"note: {note}")
    print()


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        for raw in Path("/proc/cpuinfo").read_text().splitlines():
            if raw.startswith("model name"):
                info["cpu"] = raw.split(":", 1)[1].strip()
                break
        for raw in Path("/proc/meminfo").read_text().splitlines():
            if raw.startswith("MemTotal"):
                info["memory_gib"] = round(int(raw.split()[1]) / 1024 / 1024, 1)
                break
    except OSError:
        pass
    return info


if __name__ == "__main__":
    sys.exit(main())
