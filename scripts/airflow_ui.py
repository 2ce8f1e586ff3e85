"""`make airflow`: the Airflow UI (airflow standalone) on http://127.0.0.1:8080, with the sandbox behind the
connections and the demo's sample data, so exports can be triggered and watched by hand. Ctrl-C stops both.

Works from a fresh shell: `airflow standalone` starts its scheduler, DAG processor, API server and triggerer
as `airflow` from PATH, so the virtual environment's bin directory is put first on that PATH. The UI listens on
127.0.0.1 only (a development server with a demo password; set AIRFLOW__API__HOST to change it), and the admin
password is printed on every start, not only the first (Airflow prints it only when it generates it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from airflow_env import airflow_env  # noqa: E402
from demo import AIRFLOW, DEMO, HOME, make_data, sandbox  # noqa: E402

HOST = "127.0.0.1"
PORT = 8080
PASSWORDS_FILE_ENV = "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"


def standalone_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` with the venv's bin first on PATH and the API server bound to 127.0.0.1 (unless set already)."""
    env = dict(env)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([venv_bin, *(p for p in env.get("PATH", "").split(os.pathsep) if p and p != venv_bin)])
    env.setdefault("AIRFLOW__API__HOST", HOST)
    env.setdefault("AIRFLOW__API__PORT", str(PORT))
    return env


def admin_password(home: Path, env: dict[str, str]) -> str | None:
    """The admin password `airflow standalone` generated on an earlier start (SimpleAuthManager's JSON file)."""
    path = Path(env.get(PASSWORDS_FILE_ENV) or home / "simple_auth_manager_passwords.json.generated")
    try:
        return json.loads(path.read_text()).get("admin")
    except (OSError, ValueError, AttributeError):
        return None


def main() -> int:
    warehouse = DEMO / "segments.db"
    if not warehouse.exists() or not (DEMO / "churn_risk.csv").exists():
        make_data()
    HOME.mkdir(exist_ok=True)
    with sandbox() as url:
        env = standalone_env(airflow_env(HOME, url, warehouse))
        ui = f"http://{env['AIRFLOW__API__HOST']}:{env['AIRFLOW__API__PORT']}"
        print(f"API sandbox: {url}; Airflow home: {HOME}; UI: {ui}", flush=True)
        password = admin_password(HOME, env)
        if password:
            print(f"Log in as admin, password {password}", flush=True)
        else:
            print("Log in as admin with the password Airflow prints below (first start)", flush=True)
        try:
            return subprocess.run([AIRFLOW, "standalone"], env=env).returncode
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    sys.exit(main())
