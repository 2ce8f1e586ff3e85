# segment-export: the commands the README gives. Everything runs from a virtual environment in .venv.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test airflow sandbox bench clean

install: $(STAMP)

# The product and the API sandbox (its own distribution, in sandbox/), both editable, without dependencies:
# requirements.txt pins everything either needs.
$(STAMP): requirements.txt pyproject.toml sandbox/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m pip install --quiet --no-deps -e sandbox
	touch $(STAMP)

demo: install  ## run every export DAG with a real Airflow against the API sandbox
	$(PY) scripts/demo.py

test: install  ## the whole suite (PostgreSQL on 127.0.0.1:5432 for the postgres tests)
	$(PY) -m pytest $(PYTEST_ARGS)

airflow: install  ## Airflow UI on http://127.0.0.1:8080 (airflow standalone) with the sandbox behind the connections
	$(PY) scripts/airflow_ui.py

sandbox: install  ## the API sandbox alone, for trying the APIs by hand
	$(VENV)/bin/segment-export-sandbox --port 8765

bench: install  ## the export benchmark (README "Performance"); BENCH_ARGS="--profiles 20000" for a quick one
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

clean:
	rm -rf .airflow .demo
