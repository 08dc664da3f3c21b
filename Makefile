# Two commands do everything on a fresh machine:
#   make run   - set up .venv, start Redis + the gRPC service on localhost, send a demo request
#                through the SDK, leave the service running (make stop stops it)
#   make test  - set up .venv (and redis-server), run lint + the test suite
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml clients/python/pyproject.toml | md5sum | cut -c1-12)
OUT ?= out
RUN_DIR := $(abspath run)
GRPC_PORT ?= 9000
HTTP_PORT ?= 8000
METRICS_PORT ?= 8080
REDIS_PORT ?= 6379
START_TIMEOUT ?= 600
CONFIG ?=

.PHONY: venv run start stop test lint bench bench-service protos redis-server prometheus-tools clean

venv: $(STAMP)

$(STAMP): pyproject.toml clients/python/pyproject.toml
	@# A venv whose pip does not run (python3-venv missing, an interrupted create) is made again.
	@$(BIN)/python -m pip --version >/dev/null 2>&1 || { \
		[ -n "$(PYTHON)" ] && $(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || { \
			echo "creating $(VENV) needs Python 3.11, and PYTHON='$(PYTHON)' is not;" \
				"run: make PYTHON=/path/to/python3.11 ..."; exit 1; }; \
		rm -rf $(VENV); \
		$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
			echo "$(PYTHON) -m venv failed: on Debian/Ubuntu install python3.11-venv"; exit 1; }; \
	}
	$(BIN)/python -m pip install --disable-pip-version-check -q --upgrade pip
	# torch and torchvision pinned first, so the resolver never picks another build; on Linux PyPI's
	# torch 2.14.1 is the CUDA build (~5.5 GB with its nvidia-* wheels; it runs on CPU too). For a
	# CPU-only image use PyTorch's CPU index, as the Dockerfile's TORCH_INDEX does.
	$(BIN)/python -m pip install --disable-pip-version-check -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[dev,serve]' -e clients/python
	@rm -f $(VENV)/.installed-*
	@touch $@

# Debian's redis-server, installed once if missing (root, or sudo without a password).
redis-server:
	@command -v redis-server >/dev/null || { \
		echo "installing redis-server (apt-get)"; \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server >/dev/null; \
		: "the package starts a system Redis on 6379 where systemd runs; make start runs its own"; \
		if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then \
			$$SUDO systemctl disable --now redis-server >/dev/null 2>&1 || true; fi; \
	}
	@command -v redis-server >/dev/null || { echo "redis-server is missing and could not be installed"; exit 1; }

# promtool and prometheus, taken out of Debian's prometheus .deb (apt-get download + dpkg-deb -x) into
# $(VENV)/tools without installing the package: no service, no system user, nothing left running. The deploy
# tests (tests/serving/test_deploy_tools.py) check the alert rules and the dashboard's queries with them;
# under CI=1 they fail when the binaries are missing instead of skipping.
TOOLS := $(VENV)/tools
prometheus-tools: $(TOOLS)/promtool

$(TOOLS)/promtool: | $(STAMP)
	@command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || { \
		echo "no apt-get/dpkg-deb here: install promtool and prometheus into $(TOOLS) yourself;" \
			"the deploy tests skip without them (and fail under CI)"; exit 0; }; \
	set -e; tools=$(abspath $(TOOLS)); cache=$$(mktemp -d); trap 'rm -rf "$$cache"' EXIT; cd "$$cache"; \
	echo "fetching Debian's prometheus package for promtool and prometheus (apt-get download)"; \
	if ! apt-get download -qq prometheus >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
		$$SUDO apt-get update -qq || true; apt-get download -qq prometheus >/dev/null 2>&1 || { \
			echo "apt-get download prometheus failed (no Debian/Ubuntu package source?)"; exit 1; }; fi; \
	dpkg-deb -x prometheus_*.deb root; mkdir -p "$$tools"; \
	install -m 755 root/usr/bin/promtool root/usr/bin/prometheus "$$tools"/; \
	"$$tools"/promtool --version 2>&1 | head -1

run: venv redis-server start
	@mkdir -p $(OUT)
	$(BIN)/ierf demo-image coffee -o $(OUT)/coffee.png
	$(BIN)/ierf --server 127.0.0.1:$(GRPC_PORT) explain $(OUT)/coffee.png -o $(OUT)/coffee_srd.png
	@echo
	@echo "SRD overlay (computed by the service) written to $(OUT)/coffee_srd.png"
	@echo "gRPC     127.0.0.1:$(GRPC_PORT)  ierf.v1.ExplainService, grpc.health.v1.Health, reflection"
	@echo "metrics  http://127.0.0.1:$(METRICS_PORT)/metrics"
	@echo "healthz  http://127.0.0.1:$(HTTP_PORT)/-/healthz"
	@echo "redis    redis://127.0.0.1:$(REDIS_PORT)/0"
	@echo "logs     $(RUN_DIR)/service.log, $(RUN_DIR)/redis.log; replicas: $$(sed -n 's/^replica logs //p' $(RUN_DIR)/service.log)"
	@echo "stop     make stop"

# A pid file names our process only while that pid runs what we started: after a reboot, a crash or an
# OOM kill the number may belong to someone else, who must neither be stopped nor taken for the service.
# (A zombie, a dead process nobody has reaped yet, counts as gone.)
LIVE = { kill -0 $$pid 2>/dev/null && ! ps -o stat= -p $$pid 2>/dev/null | grep -q Z; }
OURS = $(LIVE) && ps -o args= -p $$pid 2>/dev/null | grep -q
SERVICE_ARGS = 'ierf[.]serving serve'
REDIS_ARGS = 'redis-server'

# Start Redis and the service in the background (no-ops for parts already running from here).
start: venv redis-server
	@mkdir -p $(RUN_DIR)
	@pid=$$(cat $(RUN_DIR)/redis.pid 2>/dev/null); \
	if [ -n "$$pid" ] && ! { $(OURS) $(REDIS_ARGS); }; then \
		echo "removing a stale redis pid file (pid $$pid is not the redis this Makefile started)"; rm -f $(RUN_DIR)/redis.pid $(RUN_DIR)/redis.port; fi
	@if [ -f $(RUN_DIR)/redis.pid ]; then \
		running=$$(cat $(RUN_DIR)/redis.port 2>/dev/null); \
		if [ -n "$$running" ] && [ "$$running" != "$(REDIS_PORT)" ]; then \
			echo "redis from an earlier make run is on port $$running (pid $$(cat $(RUN_DIR)/redis.pid)), not $(REDIS_PORT): make stop first"; exit 1; fi; \
		echo "redis already running (pid $$(cat $(RUN_DIR)/redis.pid), port $(REDIS_PORT))"; \
	else \
		if (exec 3<>/dev/tcp/127.0.0.1/$(REDIS_PORT)) 2>/dev/null; then \
			echo "port $(REDIS_PORT) is taken by another process; try REDIS_PORT=6380 make run"; exit 1; fi; \
		redis-server --daemonize yes --pidfile $(RUN_DIR)/redis.pid --bind 127.0.0.1 --port $(REDIS_PORT) \
			--save "" --appendonly no --maxmemory 1536mb --maxmemory-policy allkeys-lru \
			--dir $(RUN_DIR) --logfile $(RUN_DIR)/redis.log; \
		for i in $$(seq 50); do [ -s $(RUN_DIR)/redis.pid ] && break; sleep 0.1; done; \
		echo $(REDIS_PORT) > $(RUN_DIR)/redis.port; \
		echo "redis started (pid $$(cat $(RUN_DIR)/redis.pid), port $(REDIS_PORT))"; \
	fi
	@pid=$$(cat $(RUN_DIR)/service.pid 2>/dev/null); \
	if [ -n "$$pid" ] && ! { $(OURS) $(SERVICE_ARGS); }; then \
		echo "removing a stale service pid file (pid $$pid is not the service this Makefile started)"; \
		rm -f $(RUN_DIR)/service.pid $(RUN_DIR)/service.ready $(RUN_DIR)/service.port; fi
	@if [ -f $(RUN_DIR)/service.pid ]; then \
		running=$$(cat $(RUN_DIR)/service.port 2>/dev/null); \
		if [ -n "$$running" ] && [ "$$running" != "$(GRPC_PORT) $(METRICS_PORT) $(HTTP_PORT)" ]; then \
			echo "the service from an earlier make run has gRPC, metrics and HTTP ports $$running (pid $$(cat $(RUN_DIR)/service.pid)), not $(GRPC_PORT) $(METRICS_PORT) $(HTTP_PORT): make stop first"; exit 1; fi; \
		echo "service already running (pid $$(cat $(RUN_DIR)/service.pid), gRPC port $(GRPC_PORT))"; \
	else \
		if [ -n "$(CONFIG)" ] && [ ! -r "$(CONFIG)" ]; then echo "CONFIG=$(CONFIG): no readable file there"; exit 1; fi; \
		rm -f $(RUN_DIR)/service.ready; \
		RAY_USAGE_STATS_ENABLED=0 nohup setsid $(BIN)/python -m ierf.serving serve $(if $(CONFIG),--config "$(abspath $(CONFIG))") \
			--grpc-port $(GRPC_PORT) --http-port $(HTTP_PORT) --metrics-port $(METRICS_PORT) \
			--redis-url redis://127.0.0.1:$(REDIS_PORT)/0 --ready-file $(RUN_DIR)/service.ready \
			--keep-logs $(RUN_DIR)/serve-logs \
			> $(RUN_DIR)/service.log 2>&1 & echo $$! > $(RUN_DIR)/service.pid; echo "$(GRPC_PORT) $(METRICS_PORT) $(HTTP_PORT)" > $(RUN_DIR)/service.port; \
		echo "starting the service (pid $$(cat $(RUN_DIR)/service.pid)); log: $(RUN_DIR)/service.log"; \
		for i in $$(seq $(START_TIMEOUT)); do \
			[ -f $(RUN_DIR)/service.ready ] && break; \
			kill -0 $$(cat $(RUN_DIR)/service.pid) 2>/dev/null || { tail -20 $(RUN_DIR)/service.log; rm -f $(RUN_DIR)/service.pid; \
				echo "the service did not start; Redis stays up: make stop stops it"; exit 1; }; \
			sleep 1; \
		done; \
		[ -f $(RUN_DIR)/service.ready ] || { echo "service not ready after $(START_TIMEOUT) s"; tail -20 $(RUN_DIR)/service.log; exit 1; }; \
		echo "service ready on 127.0.0.1:$(GRPC_PORT)"; \
	fi

# Stop what start/run started, by PID (never `ray stop`: that would kill every Ray on the host).
# The service runs in its own session (setsid): its process group, numbered by its pid, holds what it started,
# and what is left of the group once it is gone (Ray's agents outlive a killed launcher) goes too, but only
# while that pid is unused (else the number, and so maybe the group, is someone else's).
stop:
	@[ -f $(RUN_DIR)/service.pid ] || [ -f $(RUN_DIR)/redis.pid ] || echo "nothing to stop (no pid files in $(RUN_DIR))"
	@if [ -f $(RUN_DIR)/service.pid ]; then \
		pid=$$(cat $(RUN_DIR)/service.pid); \
		if $(OURS) $(SERVICE_ARGS); then \
			kill -TERM $$pid; \
			for i in $$(seq 120); do $(LIVE) || break; sleep 0.5; done; \
			$(LIVE) && { echo "service did not stop in 60 s; killing"; kill -KILL $$pid; sleep 0.2; }; \
			echo "service stopped (pid $$pid)"; \
		elif $(LIVE); then \
			echo "left pid $$pid alone: it is not the service this Makefile started (a stale pid file)"; \
		fi; \
		if ! $(LIVE) && [ -n "$$(ps -o pid=,stat= -g $$pid 2>/dev/null | grep -v Z)" ]; then \
			kill -TERM -- -$$pid 2>/dev/null; sleep 1; kill -KILL -- -$$pid 2>/dev/null; \
			echo "stopped what the service had left running (process group $$pid)"; \
		fi; \
		rm -f $(RUN_DIR)/service.pid $(RUN_DIR)/service.ready $(RUN_DIR)/service.port; \
	fi
	@if [ -f $(RUN_DIR)/redis.pid ]; then \
		pid=$$(cat $(RUN_DIR)/redis.pid); \
		if $(OURS) $(REDIS_ARGS); then \
			kill -TERM $$pid; \
			for i in $$(seq 100); do $(LIVE) || break; sleep 0.1; done; \
			echo "redis stopped (pid $$pid)"; \
		fi; \
		rm -f $(RUN_DIR)/redis.pid $(RUN_DIR)/redis.port; \
	fi

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: venv redis-server prometheus-tools
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

bench: venv
	$(BIN)/python benchmarks/srd_speed.py

bench-service: venv redis-server
	$(BIN)/python benchmarks/service_latency.py

# Regenerate the committed gRPC stubs after editing protos/ (tests fail while they are stale).
protos: venv
	$(BIN)/python protos/generate.py

clean: stop
	rm -rf $(VENV) $(OUT) $(RUN_DIR)
