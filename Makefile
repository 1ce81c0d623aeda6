# Everything a fresh machine needs comes from here: `make test`, `make demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test lint typecheck tls-redis unit demo bench clean chromium postgres promtool

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy --strict celery_leader

# Debian's redis-server (built with TLS) for tests/test_tls.py; its service never starts.
tls-redis:
	@sh tests/tls/install-redis-server.sh

# The status page test drives a real headless Chromium: install Debian's where it
# is missing and we are root; otherwise that one test skips, saying why.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
	      >/dev/null 2>&1 || echo "chromium not installed: the status page test will skip"; }

# PostgreSQL for the django-celery-beat tests (Debian's server binaries; the tests
# skip, saying so, only where it cannot be installed).
postgres:
	@ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || \
		(apt-get install -y postgresql >/dev/null 2>&1 || \
		 (apt-get update >/dev/null 2>&1 && apt-get install -y postgresql >/dev/null 2>&1)) || \
		echo "postgresql could not be installed: its tests will be skipped"

# promtool (Debian's prometheus package) for tests/test_prometheus_rules.py, which
# runs `promtool test rules` on docs/prometheus-rules.yaml; installed where it is
# missing and we are root (its service never starts), else those tests skip.
promtool:
	@command -v promtool >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus || \
	     (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus)) \
	      >/dev/null 2>&1 || echo "promtool not installed: the alert rule tests will skip"; }

# Two test processes (pytest-xdist): most tests wait on real processes and
# Redis, so two share 2 cores well; TEST_PROCS=0 runs them in this process.
TEST_PROCS ?= 2

test: lint typecheck tls-redis chromium postgres promtool
	$(PY) -m pytest -q -n $(TEST_PROCS) $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m example_project.demo $(DEMO_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/failover.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
