"""The benchmark script at a tiny size: it runs end to end and reports in the documented form (no timings checked)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(
    r"^bench: destination=(klaviyo|mailchimp) source=(sqlite|parquet|postgres) profiles=(\d+) wall_s=[\d.]+ "
    r"floor_s=[\d.]+ ratio=[\d.]+ cpu_us_per_profile=[\d.]+ peak_rss_mb=[\d.]+$"
)


@pytest.mark.airflow
def test_bench_prints_bench_lines_and_writes_results(tmp_path):
    results = tmp_path / "results.json"
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--profiles", "2000", "--sources", "sqlite,parquet",
         "--latency-klaviyo-job", "0.01", "--latency-mailchimp-batch", "0.01", "--klaviyo-profiles-per-second", "1000000",
         "--baseline-profiles", "20", "--data-dir", str(tmp_path / "data"), "--results", str(results)],
        capture_output=True, text=True, timeout=180, cwd=ROOT,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = completed.stdout.strip().splitlines()
    tail = lines[-4:]
    assert all(LINE.match(line) for line in tail), tail
    assert {LINE.match(line).group(1, 2) for line in tail} == {
        (d, s) for d in ("klaviyo", "mailchimp") for s in ("sqlite", "parquet")
    }
    report = json.loads(results.read_text())
    exports = [c for c in report["cases"] if c["case"] == "export"]
    assert len(exports) == 4
    for case in exports:
        assert case["profiles"] == 2000 and case["summary"]["accepted"] == 2000
        assert case["floor_s"] > 0 and case["peak_rss_mb"] > 0 and case["requests"] > 0
    baseline = [c for c in report["cases"] if c["case"] == "baseline-profile-import"]
    assert baseline and baseline[0]["requests"] >= 20
    assert "@" not in completed.stdout  # no customer address is ever printed


RERUN = re.compile(
    r"^bench-rerun: destination=klaviyo source=postgres profiles=(\d+) changed=(\d+) rows_read=(\d+) "
    r"wall_s=[\d.]+ full_wall_s=[\d.]+ share=[\d.]+$"
)


@pytest.mark.airflow
def test_bench_prints_a_bench_rerun_line_per_postgres_rerun_case(tmp_path, pg_schema):
    results = tmp_path / "results.json"
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--profiles", "2000", "--sources", "postgres",
         "--destinations", "klaviyo", "--rerun-postgres", "2000", "--latency-klaviyo-job", "0.01",
         "--klaviyo-profiles-per-second", "1000000", "--baseline-profiles", "0", "--data-dir", str(tmp_path / "data"),
         "--results", str(results)],
        capture_output=True, text=True, timeout=180, cwd=ROOT,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    last = completed.stdout.strip().splitlines()[-1]
    match = RERUN.match(last)
    assert match, last
    profiles, changed, rows_read = map(int, match.groups())
    # customers 100, 200, ... 2000 changed, each in two segments (every tenth customer is): 40 rows, only they read
    assert (profiles, changed, rows_read) == (2000, 40, 40)
    (case,) = [c for c in json.loads(results.read_text())["cases"] if c["case"] == "rerun-postgres"]
    assert case["change_detection"] == "warehouse" and case["sent"] == 20
