"""The environment the demo, the local UI and the tests give Airflow: a home inside the repository, the DAG
folder, and the connections pointing at a running sandbox (as AIRFLOW_CONN_* variables, never in code)."""

from __future__ import annotations

import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def airflow_env(home: Path, sandbox_url: str, warehouse_db: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    from segment_export_sandbox import KLAVIYO_API_KEY, MAILCHIMP_API_KEY

    env = dict(os.environ if base is None else base)
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__TEST_CONNECTION": "Enabled",
            "AIRFLOW_CONN_KLAVIYO_DEFAULT": json.dumps(
                {"conn_type": "klaviyo", "host": sandbox_url, "password": KLAVIYO_API_KEY}
            ),
            "AIRFLOW_CONN_MAILCHIMP_DEFAULT": json.dumps(
                {"conn_type": "mailchimp", "host": f"{sandbox_url}/3.0", "password": MAILCHIMP_API_KEY}
            ),
            "AIRFLOW_CONN_WAREHOUSE": json.dumps({"conn_type": "sqlite", "host": str(warehouse_db)}),
        }
    )
    return env


def last_export_summary(home: Path, dag_id: str, task_id: str = "export") -> dict | None:
    """The latest export task's XCom summary, read from the SQLite metadata database of an Airflow home
    (``task_id="erase"``: an erasure DAG's)."""
    import sqlite3

    with sqlite3.connect(home / "airflow.db") as conn:
        row = conn.execute(
            "SELECT value FROM xcom WHERE dag_id = ? AND task_id = ? ORDER BY timestamp DESC LIMIT 1", (dag_id, task_id)
        ).fetchone()
    if row is None:
        return None
    value = json.loads(row[0]) if isinstance(row[0], str) else row[0]
    return json.loads(value) if isinstance(value, str) else value
