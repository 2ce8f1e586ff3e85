"""One benchmark case in its own process, so its CPU time and peak RSS are the exporter's alone.

    python benchmarks/run_case.py CASE.json

``CASE.json`` holds ``{"mode": "export", "spec": {...}, "params": {...}, "fresh_state": bool}`` (the real
SegmentExportOperator, connections from the AIRFLOW_CONN_* environment; ``fresh_state`` empties the export's sync
state first) or ``{"mode": "baseline", ...}`` (one profile per request,
see ``baseline``). The last line printed is ``RESULT {json}``: wall and CPU seconds of the export itself,
the process's peak RSS, the summary's counts and the hook's request counts. Nothing personal is printed.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from typing import Any


def _usage() -> tuple[float, float]:
    """(CPU seconds of this process, all threads, user + system, and of its children that ended: the map workers
    (``segment_export.mapworkers``); wall clock)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime, time.monotonic()


def export(case: dict[str, Any]) -> dict[str, Any]:
    import segment_export.operators.export as operator_module
    from segment_export.operators.export import SegmentExportOperator

    destinations = []  # keep the destination the operator builds, to read its hook's request counts
    build = operator_module.destination_for

    def tracked(spec):
        destinations.append(build(spec))
        return destinations[-1]

    operator_module.destination_for = tracked
    operator = SegmentExportOperator(task_id="bench", export=case["spec"])
    if case.get("fresh_state"):
        # A first export: whatever an earlier benchmark left in this export's sync state is forgotten (the
        # sandbox is reset by the caller), so every source measures the same thing: all profiles new.
        from segment_export.spec import ExportSpec
        from segment_export.state import StateStore

        spec = ExportSpec.model_validate(case["spec"])
        store = StateStore.open(spec.state_conn_id, spec.id, build(spec).target_id)
        store.clear()
        store.close()
    cpu0, wall0 = _usage()
    summary = operator.execute({"params": case.get("params") or {}})
    cpu1, wall1 = _usage()
    stats = destinations[-1].request_stats if destinations else {}
    return {
        "wall_s": wall1 - wall0,
        "cpu_s": cpu1 - cpu0,
        "summary": {k: summary.get(k) for k in ("read", "segment_rows", "change_detection", "invalid", "duplicates", "sent", "accepted", "rejected",
                                                 "unchanged", "batches", "skipped_by_limit") if k in summary},
        "cpu_seconds": summary.get("cpu_seconds") or {},  # by phase, as the exporter counted it
        "client_requests": stats.get("requests"),
        "client_retries": stats.get("retries"),
    }


def baseline(case: dict[str, Any]) -> dict[str, Any]:
    """What many tools do: one ``POST /api/profile-import`` per profile, paced to its documented 75/s, 750/min.

    Rows come from the same SQLite segment (the first ``profiles`` distinct addresses). ``threads`` workers
    share one client-side pacer (the product's sliding-window RateLimiter) and honour 429 ``Retry-After``.
    """
    import sqlite3
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import requests

    from segment_export.hooks.base import RateLimiter

    cpu0, wall0 = _usage()
    with sqlite3.connect(case["sqlite"]) as conn:
        rows = conn.execute(
            "SELECT customer_id, email, first_name, last_name, phone, tier, lifetime_value FROM segment_members "
            "GROUP BY email ORDER BY MIN(rowid) LIMIT ?",
            (case["profiles"],),
        ).fetchall()
    limiter = RateLimiter(75, 750)
    headers = {
        "Authorization": f"Klaviyo-API-Key {case['api_key']}",
        "revision": "2026-07-15",
        "Content-Type": "application/vnd.api+json",
        "Accept": "application/vnd.api+json",
    }
    local = threading.local()
    counts = {"requests": 0, "retries": 0, "ok": 0, "failed": 0}
    lock = threading.Lock()

    def send(row: tuple) -> None:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        customer_id, email, first, last, phone, tier, ltv = row
        body = json.dumps({"data": {"type": "profile", "attributes": {
            "email": email, "first_name": first, "last_name": last, "phone_number": phone,
            "external_id": str(customer_id), "properties": {"loyalty_tier": tier, "lifetime_value": ltv},
        }}}, separators=(",", ":"))
        for _attempt in range(10):
            limiter.acquire()
            response = session.post(case["url"] + "/api/profile-import", data=body, headers=headers, timeout=60)
            with lock:
                counts["requests"] += 1
            if response.status_code == 429:
                with lock:
                    counts["retries"] += 1
                time.sleep(float(response.headers.get("Retry-After") or 1))
                continue
            with lock:
                counts["ok" if response.status_code < 300 else "failed"] += 1
            return
        with lock:
            counts["failed"] += 1

    with ThreadPoolExecutor(max_workers=case.get("threads", 10)) as pool:
        list(pool.map(send, rows))
    cpu1, wall1 = _usage()
    return {
        "wall_s": wall1 - wall0,
        "cpu_s": cpu1 - cpu0,
        "summary": {"read": len(rows), "sent": len(rows), "accepted": counts["ok"], "rejected": counts["failed"]},
        "client_requests": counts["requests"],
        "client_retries": counts["retries"],
    }


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as fh:
        case = json.load(fh)
    result = baseline(case) if case.get("mode") == "baseline" else export(case)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    result["peak_rss_mb"] = ru.ru_maxrss / 1024  # Linux: KiB
    result["process_cpu_s"] = ru.ru_utime + ru.ru_stime  # including interpreter and Airflow start-up
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
