# intaleq-signal — the two commands: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Oldest versions setup.cfg allows, tested by `make test-compat`.
COMPAT_VENV := .venv-compat
COMPAT_PINS := websockets==14.2 PyMySQL==1.1.0

.PHONY: run test lint unit e2e fuzz soak test-compat clean bench bench-memory bench-calllog bench-cluster install schema docs

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# What running needs: the package and its [fast] extra (uvloop), no test tools.
$(VENV)/.run-installed: setup.cfg pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[fast]'
	touch $@

# What the tests need on top: the [test] extra (pytest, ruff, hypothesis, ...).
$(VENV)/.installed: setup.cfg pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test,fast]'
	touch $@ $(VENV)/.run-installed

.env:
	@key=$$($(PYTHON) -c 'import secrets; print(secrets.token_urlsafe(32))'); \
	sed -e "s|^API_KEY=.*|API_KEY=$$key|" -e 's|^ENVIRONMENT=.*|ENVIRONMENT=development|' \
	    .env.example > .env; \
	echo "make run: no .env found; wrote a development one (ENVIRONMENT=development, new API_KEY," \
	     "call log in intaleq-signal.sqlite3). Edit .env to change settings."

## run: set up the virtualenv (no test tools), write a development .env if missing, start the server
run: $(VENV)/.run-installed .env
	$(PY) -m intaleq_signal --env-file .env

## test: lint, then every test (newest websockets), then the oldest supported versions
test: lint unit test-compat

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check intaleq_signal tests
	$(VENV)/bin/ruff format --check intaleq_signal tests

CHROMIUM := /usr/bin/chromium

unit: $(VENV)/.installed
	$(PY) -c 'import uvloop'  # this run covers the uvloop loop; test-compat the asyncio one
	@test -x $(CHROMIUM) || echo "make test: $(CHROMIUM) is missing, so the real WebRTC tests" \
	    "(tests/test_webrtc.py) will be SKIPPED; install it with: apt-get install chromium"
	@test -x /usr/bin/turnserver || echo "make test: coturn is missing, so the TURN tests" \
	    "(tests/test_turn.py, the relay calls) will be SKIPPED; install it with: apt-get install coturn"
	$(VENV)/bin/pytest -q

## fuzz: the property-based tests with many more examples (HYPOTHESIS_PROFILE=long)
fuzz: $(VENV)/.installed
	HYPOTHESIS_PROFILE=long $(VENV)/bin/pytest -q -m fuzz

## soak: CALLS concurrent calls churning for MINUTES, RSS and open files watched
CALLS ?= 50
MINUTES ?= 10
soak: $(VENV)/.installed
	$(PY) tests/soak.py --calls $(CALLS) --minutes $(MINUTES)

## e2e: only the real WebRTC calls through the daemon (Chromium, aiortc)
e2e: $(VENV)/.installed
	@test -x $(CHROMIUM) || { echo "make e2e: $(CHROMIUM) is missing: apt-get install chromium"; exit 1; }
	$(VENV)/bin/pytest -q -m e2e -rs

## docs: redraw the state-machine diagrams of docs/design.md from the tables
## (lifecycle.py, front.py); tests/test_diagrams.py fails until this is run
docs: $(VENV)/.run-installed
	$(PY) -m intaleq_signal.diagrams

$(COMPAT_VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(COMPAT_VENV)/bin/python -m pip install --quiet $(COMPAT_PINS) -e '.[test]'
	touch $@

## test-compat: the HTTP front, the wire edge and the protocol against the oldest
## allowed versions, on the standard asyncio loop (no uvloop in that venv)
test-compat: $(COMPAT_VENV)/.installed
	$(COMPAT_VENV)/bin/python -c 'import websockets; assert websockets.version.version == "14.2", websockets.version.version'
	$(COMPAT_VENV)/bin/python -c 'import importlib.util; assert not importlib.util.find_spec("uvloop")'
	$(COMPAT_VENV)/bin/pytest -q -m "compat and not cluster"

## schema: rewrite intaleq_signal/calllog/call_logs.sql (database.sql) from the
## table defined in intaleq_signal/calllog/sql.py
schema: $(VENV)/.run-installed
	$(PY) -m intaleq_signal.calllog.sql

clean:
	rm -rf $(VENV) $(COMPAT_VENV) *.egg-info .pytest_cache

## install: as root, put the service in place (user, venv, config, units: the service and
## its optional socket, for socket activation); see docs/operations.md
PREFIX ?= /opt/intaleq-signal
# The extras installed: fast (uvloop); add redis for several instances (EXTRAS=fast,redis).
EXTRAS ?= fast
SYSCONFDIR ?= /etc/intaleq-signal
UNITDIR ?= /etc/systemd/system
install:
	id -u intaleq-signal >/dev/null 2>&1 || useradd --system --home-dir /var/lib/intaleq-signal \
	    --shell /usr/sbin/nologin intaleq-signal
	$(PYTHON) -m venv $(PREFIX)/venv
	$(PREFIX)/venv/bin/pip install --quiet --upgrade '.[$(EXTRAS)]'
	install -d -m 0750 -g intaleq-signal $(SYSCONFDIR)
	test -e $(SYSCONFDIR)/intaleq-signal.env || \
	    install -m 0640 -g intaleq-signal .env.example $(SYSCONFDIR)/intaleq-signal.env
	install -m 0644 intaleq-signal.service $(UNITDIR)/intaleq-signal.service
	install -m 0644 intaleq-signal.socket $(UNITDIR)/intaleq-signal.socket
	install -m 0644 intaleq-signal@.service $(UNITDIR)/intaleq-signal@.service
	-systemctl daemon-reload
	@echo "make install: edit $(SYSCONFDIR)/intaleq-signal.env (API_KEY, DB_*), then" \
	      "systemctl enable --now intaleq-signal.socket intaleq-signal" \
	      "(or without socket activation: systemctl enable --now intaleq-signal;" \
	      "several instances: EXTRAS=fast,redis and intaleq-signal@PORT, docs/operations.md)"

# -- benchmarks (docs/performance.md) ---------------------------------------
# The harness (Node.js load generator, PeerJS baseline) is not part of this
# repository: a checkout of it beside the repository, at BENCH_DIR. Without
# it the bench targets say so and stop without failing.
BENCH_DIR := ../shared/bench
BENCH_BASE_PORT ?= 20100

ifeq ($(wildcard $(BENCH_DIR)/run.sh),)
bench bench-memory bench-calllog bench-cluster:
	@echo "make $@: skipped: the benchmark harness is not checked out at $(BENCH_DIR) (see docs/performance.md)"
else
## bench: the side-by-side benchmark against PeerJS, with and without uvloop;
## REPEAT=3 by default, QUICK=1 for a smoke run. The servers listen below the
## ephemeral port range (BASE_PORT), so that the load generator's own sockets
## of one scenario cannot hold the next one's port, and each start gets a
## fresh call-log file (tests/bench_target.sh).
bench: $(VENV)/.installed
	status=0; \
	REPEAT=$${REPEAT:-3} BASE_PORT=$(BENCH_BASE_PORT) TARGET_NAME=uvloop \
	    TARGET_CMD="$(CURDIR)/tests/bench_target.sh $(CURDIR)/$(PY) -m intaleq_signal" TARGET_DIR=$(CURDIR) \
	    $(BENCH_DIR)/run.sh || status=1; \
	REPEAT=$${REPEAT:-3} BASE_PORT=$(BENCH_BASE_PORT) TARGET_NAME=asyncio \
	    TARGET_CMD="$(CURDIR)/tests/bench_target.sh env INTALEQ_EVENT_LOOP=asyncio $(CURDIR)/$(PY) -m intaleq_signal" \
	    TARGET_DIR=$(CURDIR) $(BENCH_DIR)/run.sh || status=1; \
	exit $$status

## bench-memory: CONNS (10000) idle sockets inside a memory cgroup of LIMIT (128M,
## the unit's MemoryMax); needs root and a `make bench` run before (npm packages)
bench-memory: $(VENV)/.installed
	BENCH=$(abspath $(BENCH_DIR)) tests/bench_memory_limit.sh

## bench-calllog: session creation and loop lag with no store, SQLite and MySQL
bench-calllog: $(VENV)/.installed
	BENCH_DIR=$(BENCH_DIR) tests/bench_calllog.sh

## bench-cluster: one instance against two sharing sessions through Redis
## (REDIS_URL, default the machine's), calls whole on one instance and calls
## relayed between the two; REPEAT=3 by default, QUICK=1 for a smoke run
bench-cluster: $(VENV)/.installed
	BENCH_DIR=$(BENCH_DIR) $(PY) tests/bench_cluster.py --base-port $(BENCH_BASE_PORT)
endif
