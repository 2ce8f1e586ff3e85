"""The "Segment exports" pages in the Airflow UI: an Airflow plugin (``plugin.py``, registered through the
``airflow.plugins`` entry point) whose FastAPI app (``app.py``) the api-server serves under ``/segment-exports``.

Split so that what the pages show can be tested without Airflow: ``views.py`` turns runs, summaries and outcome
rows into what a page shows (pure), ``outcomes.py`` reads the outcomes table over any DB-API connection,
``render.py`` writes the HTML and SVG (server-rendered, no JavaScript, nothing from a CDN), ``sections.py`` is
where other features (drift, erasure receipts) add their own part of a run's page. Only ``metadata.py`` and
``app.py`` touch Airflow: its metadata database (runs, XCom summaries) and its own authentication and DAG-level
authorization.
"""

#: where the api-server serves the app (plugin.py mounts it there; its pages link relative to it)
URL_PREFIX = "/segment-exports"
