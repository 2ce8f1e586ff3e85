"""Shared fixtures. Airflow gets its own throw-away home so tests never touch a real deployment."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="segment-export-airflow-"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))  # for sandbox_state
#: The API sandbox's source folder: its own distribution (sandbox/), installed by `make install`.
SANDBOX_SRC = ROOT / "sandbox" / "src"
try:
    import segment_export_sandbox  # noqa: F401
except ImportError:  # not installed (e.g. a venv that has only the product): this checkout's copy
    sys.path.insert(0, str(SANDBOX_SRC))

import segment_data  # noqa: E402


def set_connection(monkeypatch: pytest.MonkeyPatch, conn_id: str, **fields) -> None:
    """Define an Airflow connection the way a deployment can: an AIRFLOW_CONN_<ID> environment variable."""
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(fields))


@pytest.fixture
def airflow_conn(monkeypatch):
    """``airflow_conn(conn_id, conn_type=..., host=..., ...)`` defines a connection for this test only."""
    return lambda conn_id, **fields: set_connection(monkeypatch, conn_id, **fields)


@pytest.fixture
def segment_db(tmp_path, monkeypatch):
    """A SQLite segment table of 1,000 customers (1,100 rows) behind the Airflow connection ``warehouse``."""
    path = segment_data.write_sqlite(tmp_path / "segments.db", 1000)
    set_connection(monkeypatch, "warehouse", conn_type="sqlite", host=str(path))
    return path


@pytest.fixture
def pg_schema(monkeypatch):
    """A fresh schema in the machine's PostgreSQL ``test`` database, behind the connection ``pg_warehouse``."""
    psycopg = pytest.importorskip("psycopg")
    try:
        conn = psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"PostgreSQL not reachable: {exc}")
    schema = f"segment_export_test_{os.getpid()}"
    conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    conn.execute(f'CREATE SCHEMA "{schema}"')
    set_connection(
        monkeypatch, "pg_warehouse", conn_type="postgres", host="127.0.0.1", port=5432, login="postgres", schema="test"
    )
    yield conn, schema
    conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    conn.close()


@pytest.fixture(scope="session")
def sandbox_server():
    """One API sandbox for the session; tests reset it (see ``sandbox``)."""
    from segment_export_sandbox import Sandbox, SandboxConfig

    with Sandbox(SandboxConfig()) as sb:
        yield sb


@pytest.fixture
def sandbox(sandbox_server, monkeypatch):
    """A clean sandbox, with the default Klaviyo and Mailchimp connections pointing at it (real rate limits)."""
    from segment_export_sandbox import KLAVIYO_API_KEY, MAILCHIMP_API_KEY
    from segment_export_sandbox.config import default_behaviour

    sandbox_server.reset()
    sandbox_server.configure(rate_limits=True, rate_limit_scale=1.0, behaviour=default_behaviour())
    set_connection(monkeypatch, "klaviyo_default", conn_type="klaviyo", host=sandbox_server.klaviyo_host, password=KLAVIYO_API_KEY)
    set_connection(monkeypatch, "mailchimp_default", conn_type="mailchimp", host=sandbox_server.mailchimp_host, password=MAILCHIMP_API_KEY)
    return sandbox_server

