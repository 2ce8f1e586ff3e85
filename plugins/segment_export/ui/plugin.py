"""The Airflow plugin: the Segment exports app on the api-server, its entry in the UI's navigation, and a tab on
every DAG run's page.

Registered through the ``airflow.plugins`` entry point (pyproject.toml), so installing the provider is enough; the
api-server imports the app when it starts. The two external views open the app's pages inside the UI (in its
iframe): ``nav`` for the exports list, ``dag_run`` for the run's outcomes (the UI fills in ``{DAG_ID}`` and
``{RUN_ID}``; on a DAG that is no export the tab says so). Their ``href`` has no leading slash, so a
deployment under a base URL works.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from segment_export.ui.app import URL_PREFIX, app

NAME = "Segment exports"
ROUTE = "segment-exports"
HREF = URL_PREFIX.lstrip("/")


class SegmentExportsPlugin(AirflowPlugin):
    name = "segment_export"
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": NAME}]
    external_views = [
        {"name": NAME, "href": f"{HREF}/", "url_route": ROUTE, "destination": "nav", "nav_top_level": True,
         "icon": f"{HREF}/icon.svg"},
        {"name": "Export outcomes", "href": f"{HREF}/dags/{{DAG_ID}}/runs/{{RUN_ID}}", "url_route": "segment-export-run",
         "destination": "dag_run"},
    ]
