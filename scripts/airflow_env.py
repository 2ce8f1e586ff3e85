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
