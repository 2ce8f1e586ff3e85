"""The Airflow plugin: the Segment exports app on the api-server, its entry in the UI's navigation, and a tab on
every DAG run's page.

Registered through the ``airflow.plugins`` entry point (pyproject.toml), so installing the provider is enough.
Every Airflow process loads plugins (the scheduler, each task, ``airflow dags test``), and only the api-server
serves apps: so this module imports nothing but ``AirflowPlugin``, and the app (with Airflow's security module,
about two seconds of imports) is imported by the api-server's first request to it (:class:`LazyApp`). The two external views open the app's pages inside the UI (in its
iframe): ``nav`` for the exports list, ``dag_run`` for the run's outcomes (the UI fills in ``{DAG_ID}`` and
``{RUN_ID}``; on a DAG that is no export the tab says so). Their ``href`` has no leading slash, so a
deployment under a base URL works.
"""

from __future__ import annotations

from typing import Any

from airflow.plugins_manager import AirflowPlugin

from segment_export.ui import URL_PREFIX

NAME = "Segment exports"
ROUTE = "segment-exports"
HREF = URL_PREFIX.lstrip("/")


class LazyApp:
    """An ASGI app that imports :mod:`segment_export.ui.app` on its first request and hands every request to it
    (the api-server mounts any ASGI app; this one has no lifespan of its own)."""

    def __init__(self) -> None:
        self._app: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self._app is None:
            from segment_export.ui.app import app

            self._app = app
        await self._app(scope, receive, send)


class SegmentExportsPlugin(AirflowPlugin):
    name = "segment_export"
    fastapi_apps = [{"app": LazyApp(), "url_prefix": URL_PREFIX, "name": NAME}]
    external_views = [
        {"name": NAME, "href": f"{HREF}/", "url_route": ROUTE, "destination": "nav", "nav_top_level": True,
         "icon": f"{HREF}/icon.svg"},
        {"name": "Export outcomes", "href": f"{HREF}/dags/{{DAG_ID}}/runs/{{RUN_ID}}", "url_route": "segment-export-run",
         "destination": "dag_run"},
    ]
