"""segment_export.ui.plugin: registered through the airflow.plugins entry point, with views Airflow accepts."""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_entry_point_names_the_plugin_class():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (value,) = project["entry-points"]["airflow.plugins"].values()
    module, _, name = value.partition(":")
    plugin = getattr(importlib.import_module(module), name)
    from airflow.plugins_manager import AirflowPlugin

    assert issubclass(plugin, AirflowPlugin) and plugin.name == "segment_export"


def test_views_and_app_as_airflow_reads_them():
    from airflow.api_fastapi.app import RESERVED_URL_PREFIXES
    from airflow.api_fastapi.core_api.datamodels.plugins import ExternalViewResponse

    from segment_export.ui.plugin import SegmentExportsPlugin

    (app,) = SegmentExportsPlugin.fastapi_apps
    assert not any(app["url_prefix"].startswith(p) for p in RESERVED_URL_PREFIXES)
    views = {v["destination"]: ExternalViewResponse(**v) for v in SegmentExportsPlugin.external_views}
    assert views["nav"].name == "Segment exports" and views["nav"].nav_top_level
    assert not views["nav"].href.startswith("/")  # relative to the UI's base URL
    assert views["dag_run"].href.endswith("/dags/{DAG_ID}/runs/{RUN_ID}")
    assert app["url_prefix"].lstrip("/") == views["nav"].href.rstrip("/")


def test_loading_the_plugin_does_not_import_the_app(tmp_path):
    """Every Airflow process loads plugins; only the api-server needs the app and Airflow's security module."""
    import subprocess
    import sys

    code = ("import sys; import segment_export.ui.plugin as p; "
            "print('segment_export.ui.app' in sys.modules, 'airflow.api_fastapi.core_api.security' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split()[-2:] == ["False", "False"], out.stdout + out.stderr


def test_the_lazy_app_serves_the_app():
    from fastapi.testclient import TestClient
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from segment_export.ui.plugin import SegmentExportsPlugin

    (entry,) = SegmentExportsPlugin.fastapi_apps
    client = TestClient(Starlette(routes=[Mount(entry["url_prefix"], app=entry["app"])]))
    r = client.get(f"{entry['url_prefix']}/icon.svg")
    assert r.status_code == 200 and r.headers["content-type"].startswith("image/svg+xml")
    assert client.get(f"{entry['url_prefix']}/api/exports").status_code == 401  # no user
