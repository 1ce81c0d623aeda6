# Everything a fresh machine needs comes from here: `make test`, `make demo`.
# Every Python package they install comes from uv.lock (`make lock` refreshes it).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
UV_STAMP := $(VENV)/.uv-installed
STAMP := $(VENV)/.installed
# uv uses $(PYTHON)'s interpreter, never one it would download.
export UV_PYTHON_DOWNLOADS := never

.PHONY: test lint typecheck tls-redis unit demo bench clean chromium postgres promtool rabbitmq \
	lock test-oldest test-latest

# uv itself, at the version uv.lock pins and checked against the lock's hashes of it;
# pip (from the venv module) installs it, then uv installs everything else.
$(UV_STAMP): uv.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	awk '/^\[\[package\]\]/ { uv = 0 } /^name = "uv"$$/ { uv = 1 } \
	  uv && /^version = / { gsub(/"/, "", $$3); req = "uv==" $$3 } \
	  uv { while (match($$0, /sha256:[0-9a-f]+/)) { \
	    req = req " --hash=" substr($$0, RSTART, RLENGTH); $$0 = substr($$0, RSTART + RLENGTH) } } \
	  END { print req }' uv.lock > $(VENV)/uv-requirement.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --require-hashes \
	  -r $(VENV)/uv-requirement.txt
	touch $(UV_STAMP)

# The venv is exactly the lock (--locked: it fails, saying so, when pyproject.toml
# changed and uv.lock was not refreshed): the dev extra for the tests and the demo,
# the bench extra for benchmarks/; the project itself is installed editable.
$(STAMP): pyproject.toml uv.lock $(UV_STAMP)
	UV_PROJECT_ENVIRONMENT=$(VENV) $(UV) sync --quiet --locked --extra dev --extra bench \
	  --python $(PY)
	touch $(STAMP)

# Refresh uv.lock to the newest versions pyproject.toml allows; `make` then installs it.
lock: $(UV_STAMP)
	$(UV) lock --upgrade

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

# RabbitMQ for the tests that run on it (tests/rabbitmq.py runs Debian's
# rabbitmq-server as a child process on loopback; its service never starts):
# installed where it is missing and we are root, else those tests skip.
rabbitmq:
	@test -x /usr/lib/rabbitmq/bin/rabbitmq-server || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server) \
	      >/dev/null 2>&1 || echo "rabbitmq-server not installed: the RabbitMQ tests will skip"; }

# Two test processes (pytest-xdist): most tests wait on real processes and
# Redis, so two share 2 cores well; TEST_PROCS=0 runs them in this process.
TEST_PROCS ?= 2

test: lint typecheck tls-redis chromium postgres promtool rabbitmq
	$(PY) -m pytest -q -n $(TEST_PROCS) $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m example_project.demo $(DEMO_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/failover.py

# The versions pyproject.toml declares, tested: the lowest it allows for each direct
# dependency (the library's, its extras' and the dev tools'), resp. the newest, each in
# a venv of its own, not from the lock: the unit tests and the worker, schedule,
# leader-queue, metrics, Django, Sentinel, Cluster and TLS integration tests.
# test-latest also type-checks against the newest versions (what the next `make lock`
# brings); the oldest are not type-checked (redis-py 5.x types every reply as
# maybe-awaitable).
# Outside `make test`'s time budget: 6-10 min each on 2 shared cores.
COMPAT_TESTS := tests/test_scheduler_unit.py tests/test_elector_unit.py tests/test_config.py \
	tests/test_settings.py tests/test_cron.py tests/test_record.py tests/test_user_errors.py \
	tests/test_redislock.py tests/test_elector_redis.py tests/test_celery_worker.py \
	tests/test_worker_identity.py tests/test_worker_events.py tests/test_tick_start.py \
	tests/test_schedule_modes.py tests/test_schedule_shared.py tests/test_runtime_entries.py \
	tests/test_beat_stop.py tests/test_herd.py tests/test_herd_runs.py \
	tests/test_leader_queue.py tests/test_leader_only_claims.py tests/test_metrics.py \
	tests/test_django_beat.py tests/test_django_beat_procs.py tests/test_django_beat_standalone.py \
	tests/test_topologies.py tests/test_tls.py
COMPAT_EXTRAS := dev,metrics,django
# The packages whose resolved versions each run prints first.
COMPAT_SHOW := celery kombu redis croniter django-celery-beat prometheus-client django psycopg \
	psycopg-binary billiard click pytest mypy

test-oldest: RESOLUTION := lowest-direct
test-latest: RESOLUTION := highest
test-oldest test-latest: $(STAMP) tls-redis postgres
	$(UV) venv --quiet --clear --python $(PYTHON) $(VENV)-$(@:test-%=%)
	$(UV) pip install --quiet --python $(VENV)-$(@:test-%=%)/bin/python \
	  --resolution $(RESOLUTION) -e '.[$(COMPAT_EXTRAS)]'
	@$(UV) pip list --python $(VENV)-$(@:test-%=%)/bin/python --format freeze | \
	  grep -iE '^($(shell echo $(COMPAT_SHOW) | tr ' ' '|'))=='
	$(if $(filter test-latest,$@),$(VENV)/bin/mypy --strict --cache-dir $(VENV)-latest/.mypy_cache \
	  --python-executable $(VENV)-latest/bin/python celery_leader)
	$(VENV)-$(@:test-%=%)/bin/python -m pytest -q -p no:cacheprovider -n $(TEST_PROCS) \
	  $(COMPAT_TESTS) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(VENV)-oldest $(VENV)-latest .pytest_cache .mypy_cache .ruff_cache
