# Everything a fresh machine needs comes from here: `make test`, `make demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test lint typecheck unit demo bench clean postgres

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy --strict celery_leader

# PostgreSQL for the django-celery-beat tests (Debian's server binaries; the tests
# skip, saying so, only where it cannot be installed).
postgres:
	@ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || \
		(apt-get install -y postgresql >/dev/null 2>&1 || \
		 (apt-get update >/dev/null 2>&1 && apt-get install -y postgresql >/dev/null 2>&1)) || \
		echo "postgresql could not be installed: its tests will be skipped"

test: lint typecheck postgres
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m example_project.demo $(DEMO_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/failover.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
