# kd-lightning: `make demo` (set up + quickstart), `make test` (set up + whole suite), `make bench`.
# Set-up is idempotent: the virtualenv is (re)built when pyproject.toml or constraints.txt change.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kd-lightning-installed

.PHONY: setup demo test bench lint clean
.PHONY: docs docs-serve

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt pip setuptools
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt --no-build-isolation -e ".[all]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/kd-lightning fit --config configs/quickstart.yaml --overwrite true  # a re-run replaces the last demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/overhead.py --json benchmarks/results.json

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

docs: setup  # the documentation site into site/, strict: a warning (broken link, missing API object) fails it
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

docs-serve: setup  # the site on http://127.0.0.1:8000, rebuilt on every change
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

clean:
	rm -rf $(VENV) lightning_logs runs .pytest_cache
