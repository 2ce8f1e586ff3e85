"""`make demo`: every generated export DAG, run by a real Airflow against the local API sandbox.

Creates the sample segment data (SQLite table and a CSV extract of synthetic customers), starts the sandbox,
initialises an Airflow home inside the repository (.airflow/, SQLite metadata database), defines the
connections, runs each export DAG with `airflow dags test`, then one erasure request (the erasure DAG) and two
reruns (changed rows and leavers; the erased customer skipped), and prints one line per export run and the erasure's
receipts. Exits non-zero if any run failed. Task logs of each run are kept in .demo/logs/.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))

import segment_data  # noqa: E402
from airflow_env import ROOT, airflow_env, last_export_summary  # noqa: E402

DEMO = ROOT / ".demo"
HOME = ROOT / ".airflow"
ERASURES = DEMO / "erasure_requests.csv"
ERASURE_DAG = "demo_erasures"
PROFILES = 30_000
AIRFLOW = str(Path(sys.executable).parent / "airflow")


@contextmanager
def sandbox() -> Iterator[str]:
    """Start the sandbox CLI on a free port; yield its URL; stop it.

    ``SEGMENT_EXPORT_SANDBOX_CONFIG`` names a JSON file of sandbox config fields (e.g. ``{"behaviour":
    {"klaviyo_identifier_conflict": "reject"}}``), so the whole demo can run under an alternative behaviour."""
    command = [sys.executable, "-m", "segment_export_sandbox", "--port", "0"]
    extra = os.environ.get("SEGMENT_EXPORT_SANDBOX_CONFIG")
    if extra:
        if not Path(extra).is_file():
            raise SystemExit(f"SEGMENT_EXPORT_SANDBOX_CONFIG: no such file {extra}")
        command += ["--config", extra]
        print(f"sandbox config from {extra}: {Path(extra).read_text().strip()}")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip() if proc.stdout else ""
        if not line.startswith("SANDBOX_URL="):
            raise SystemExit(f"the sandbox did not start (it printed {line!r})")
        yield line.split("=", 1)[1]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def make_data() -> Path:
    # A fresh start: the segment file also holds the exports' sync state, and the sandbox starts empty.
    for stale in (DEMO / "segments.db", HOME / "segment_export_state.db"):
        stale.unlink(missing_ok=True)
    db = segment_data.write_sqlite(DEMO / "segments.db", PROFILES)
    segment_data.write_csv(DEMO / "churn_risk.csv", PROFILES, segment="churn_risk")
    ERASURES.write_text("request_id,email,requested_at\n")  # no request yet: the demo adds one after the first exports
    return db


def request_erasure(warehouse: Path) -> str:
    """One person asks to be forgotten: the VIP customer with the lowest id (in the Klaviyo VIP list and, through
    the vip segment, in the Mailchimp audience). Returns the request id."""
    with sqlite3.connect(warehouse) as conn:
        (email,) = conn.execute("SELECT email FROM segment_members WHERE segment = 'vip' ORDER BY customer_id LIMIT 1").fetchone()
    with ERASURES.open("a") as f:
        f.write(f"demo-erasure-1,{email},2026-12-01T09:00:00Z\n")
    return "demo-erasure-1"


def export_ids(env: dict[str, str]) -> list[str]:
    from segment_export.dag_factory import specs_folder
    from segment_export.spec import load_specs

    specs, errors = load_specs(specs_folder(ROOT / "dags" / "exports"))  # exports only: the erasure DAG runs later
    for error in errors:
        print(f"spec error: {error}")
    if errors:
        raise SystemExit(1)
    return [s.id for s in specs]


def held_addresses(state: dict) -> dict[str, list[str]]:
    """Every list's and audience's addresses (lower-cased, sorted), by target."""
    (klaviyo,) = state["klaviyo"]["accounts"].values()
    (mailchimp,) = state["mailchimp"]["accounts"].values()
    held = {f"klaviyo {list_id}": sorted(klaviyo["profiles"][pid]["email"].lower() for pid in lst["profile_ids"])
            for list_id, lst in klaviyo["lists"].items()}
    held.update({f"mailchimp {audience_id}": sorted(m["email_address"].lower() for m in audience["members"].values())
                 for audience_id, audience in mailchimp["audiences"].items()})
    return held


def held_digest(state: dict) -> str:
    """One digest of who is held where, to compare whole demo runs (e.g. under other sandbox behaviours)."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(held_addresses(state), sort_keys=True).encode()).hexdigest()[:16]


def held(state: dict, summary: dict) -> int:
    """How many profiles the sandbox holds in the export's list or audience."""
    if summary["destination"] == "klaviyo":
        (account,) = state["klaviyo"]["accounts"].values()
        return len(account["lists"][summary["target_id"]]["profile_ids"])
    (account,) = state["mailchimp"]["accounts"].values()
    return len(account["audiences"][summary["target_id"]]["members"])


def run_dag(dag_id: str, env: dict[str, str], label: str, url: str, task_id: str = "export") -> tuple:
    """Run one DAG; (label, return code, its summary, seconds, log, what the sandbox held right after it)."""
    import requests

    log_path = DEMO / "logs" / f"{label.strip().split(':')[0]}-{dag_id}.log" if label != dag_id else DEMO / "logs" / f"{dag_id}.log"
    started = time.monotonic()
    with log_path.open("w") as log:
        rc = subprocess.run([AIRFLOW, "dags", "test", dag_id], env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    summary = last_export_summary(HOME, dag_id, task_id) if rc == 0 else None
    state = requests.get(f"{url}/_sandbox/state", timeout=30).json()
    return label, rc, summary, time.monotonic() - started, log_path, state


def print_erasure(run: tuple) -> int:
    """The erasure DAG's line and one line per receipt; 1 when it failed."""
    dag_id, rc, summary, seconds, log_path, after = run
    if summary is None:
        print(f"\n{dag_id}: FAILED, see {log_path.relative_to(ROOT)}")
        return 1
    print(f"\n{dag_id}: {summary['requests']} erasure request, {summary['sent']} sent, {summary['answered']} answered, "
          f"{summary['failed']} failed; receipts:")
    for receipt in summary["receipts"]:
        print(f"  {receipt['request_id']:<16} {receipt['destination'] + ' ' + receipt['target_id']:<22} {receipt['answer']}")
    return 0


def main() -> int:
    import requests

    print(f"sample data: {PROFILES:,} synthetic customers in .demo/segments.db and .demo/churn_risk.csv")
    warehouse = make_data()
    (DEMO / "logs").mkdir(parents=True, exist_ok=True)
    HOME.mkdir(exist_ok=True)
    with sandbox() as url:
        print(f"API sandbox: {url}")
        env = airflow_env(HOME, url, warehouse)
        subprocess.run([AIRFLOW, "db", "migrate"], env=env, check=True, capture_output=True)
        results = [run_dag(dag_id, env, dag_id, url) for dag_id in export_ids(env)]
        # Erasure: one VIP customer asks to be forgotten; the erasure DAG reaches Klaviyo and Mailchimp.
        request_erasure(warehouse)
        erasure = run_dag(ERASURE_DAG, env, ERASURE_DAG, url, task_id="erase")
        # Sync: change 10 customers and drop 5 from the warehouse, then run one export again; then the VIP export,
        # where the erased customer is still in the segment and is skipped.
        with sqlite3.connect(warehouse) as conn:
            conn.execute("UPDATE segment_members SET first_name = 'Changed' WHERE customer_id IN (SELECT customer_id FROM segment_members WHERE segment = 'newsletter' ORDER BY customer_id LIMIT 10)")
            conn.execute("DELETE FROM segment_members WHERE customer_id IN (SELECT customer_id FROM segment_members WHERE segment = 'newsletter' ORDER BY customer_id DESC LIMIT 5)")
        results.append(run_dag("newsletter_to_mailchimp", env, "  rerun: 10 changed, 5 left", url))
        results.append(run_dag("vip_to_klaviyo", env, "  rerun: after the erasure", url))
        state = requests.get(f"{url}/_sandbox/state", timeout=10).json()

    header = (f"{'export':<28} {'destination':<22} {'status':<7} {'read':>7} {'sent':>7} {'created':>8} {'updated':>8} "
              f"{'unchanged':>9} {'removed':>7} {'rejected':>8} {'skipped':>7} {'limit-skipped':>13} {'held':>7}")
    print("\n" + header + "\n" + "-" * len(header))
    failed = 0
    for dag_id, rc, summary, seconds, log_path, after in results:
        if summary is None:
            failed += 1
            print(f"{dag_id:<28} {'':<22} {'FAILED':<7} see {log_path.relative_to(ROOT)}")
            continue
        fmt = lambda v: "n/a" if v is None else f"{v:,}"  # noqa: E731
        dest = f"{summary['destination']} {summary['target_id']}"
        print(
            f"{dag_id:<28} {dest:<22} {'ok':<7} {summary['read']:>7,} {summary['sent']:>7,} {fmt(summary['created']):>8} "
            f"{fmt(summary['updated']):>8} {summary['unchanged']:>9,} {summary['removed']:>7,} {summary['rejected']:>8,} "
            f"{summary['skipped']:>7,} {summary['skipped_by_limit']:>13,} {held(after, summary):>7,}"
        )
    failed += print_erasure(erasure)
    print("\n'held' is what the sandbox held in the list or audience right after that run (for the Mailchimp rerun: the")
    print("audience, whose tags the 5 leavers lost, without the erased customer); Klaviyo does not say created vs updated;")
    print("'skipped' on the reruns is the erased customer, still in the segment, never sent again. State, per-row")
    print("outcomes and erasure receipts: tables segment_export_state, segment_export_outcomes and segment_export_erasures")
    print("in .demo/segments.db.")
    print(f"Held profiles digest (who is in every list and audience): {held_digest(state)}")
    print("Task logs: .demo/logs/. Open the UI with `make airflow`.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
