# kd-lightning: `make demo` (set up + quickstart), `make test` (set up + whole suite), `make bench`.
# Set-up is idempotent: the virtualenv is (re)built when pyproject.toml or constraints.txt change.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kd-lightning-installed

.PHONY: setup demo test bench lint clean

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

clean:
	rm -rf $(VENV) lightning_logs runs .pytest_cache
