# The Airflow image with segment-export installed: used by every Airflow service in docker-compose.yaml.
# Same Airflow and Python versions as requirements.txt; the official image already has the Celery, Redis and
# PostgreSQL providers. Build: docker compose build (or: docker build -t segment-export-airflow .)
ARG AIRFLOW_VERSION=3.3.2
FROM apache/airflow:${AIRFLOW_VERSION}-python3.11
ARG AIRFLOW_VERSION

COPY --chown=airflow:0 pyproject.toml README.md /opt/segment-export/
COPY --chown=airflow:0 plugins /opt/segment-export/plugins
# The API sandbox is its own distribution (standard library only); the image carries it for the optional
# segment-export-sandbox service of docker-compose.yaml. The product never imports it.
COPY --chown=airflow:0 sandbox /opt/segment-export/sandbox
# Pin apache-airflow so that installing the package can never up- or downgrade the image's Airflow.
RUN pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" \
      "/opt/segment-export[postgres,sqlite,openlineage,celery]" /opt/segment-export/sandbox
