"""`make airflow`: the Airflow UI (airflow standalone) on http://localhost:8080, with the sandbox behind the
connections and the demo's sample data, so exports can be triggered and watched by hand. Ctrl-C stops both."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from airflow_env import airflow_env  # noqa: E402
from demo import AIRFLOW, DEMO, HOME, make_data, sandbox  # noqa: E402


def main() -> int:
    warehouse = DEMO / "segments.db"
    if not warehouse.exists() or not (DEMO / "churn_risk.csv").exists():
        make_data()
    HOME.mkdir(exist_ok=True)
    with sandbox() as url:
        env = airflow_env(HOME, url, warehouse)
        print(f"API sandbox: {url}; Airflow home: {HOME}; UI: http://localhost:8080 (the admin password is printed below)")
        try:
            return subprocess.run([AIRFLOW, "standalone"], env=env).returncode
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    sys.exit(main())
