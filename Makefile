# particleSeg platform. Every target sets itself up: `make demo` and `make test` work on a fresh
# Debian machine with Python 3.11 (RELION is installed with apt-get when we are root).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export DAGSTER_HOME := $(CURDIR)/dagster_home
export PARTICLESEG_DATA ?= $(CURDIR)/data
export PYTHONUNBUFFERED := 1
# The demo archive (built by `make demo`) served as EMPIAR/EMDB/archive on a fixed loopback port
DEMO_PORT ?= 8765
DEMO_ARCHIVE := $(PARTICLESEG_DATA)/demo/archive
DEMO_URL := http://127.0.0.1:$(DEMO_PORT)

.PHONY: setup relion postgres venv test test-fast lint demo dev serve env bench bench-refine bench-model pretrained \
	clean

setup: relion postgres venv

relion:
	@if command -v relion_project >/dev/null 2>&1; then \
		echo "RELION: $$(command -v relion_project)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "RELION missing: installing the Debian package (apt-get install -y relion)"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && apt-get install -y -qq relion >/dev/null \
		&& echo "RELION: $$(command -v relion_project)"; \
	else \
		echo "RELION is not installed and we are not root: run 'sudo apt-get install -y relion'" \
		     "(Debian/Ubuntu). Tests that need RELION are skipped until then." >&2; \
	fi

# PostgreSQL for the tests of the PostgreSQL instance storage (they start their own server on
# loopback from these binaries; nothing listens otherwise)
postgres:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; then \
		echo "PostgreSQL: $$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | tail -1)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "PostgreSQL missing: installing the Debian package (apt-get install -y postgresql)"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && apt-get install -y -qq postgresql >/dev/null \
		&& echo "PostgreSQL: $$(ls -d /usr/lib/postgresql/*/bin | tail -1)"; \
	else \
		echo "PostgreSQL is not installed and we are not root: run 'sudo apt-get install -y" \
		     "postgresql'. Tests of the PostgreSQL instance storage are skipped until then." >&2; \
	fi

venv: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "$(PYTHON) not found: install Python 3.11 or run make PYTHON=python3" >&2; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@mkdir -p $(DAGSTER_HOME)
	@touch $(STAMP)

# ruff (with docstring and complexity rules on the library); the import layers of pyproject's
# [tool.importlinter] (function-level imports count); pyright in basic mode on the library
lint: venv
	$(VENV)/bin/ruff check particleseg_model particleseg_assets tests benchmarks scripts
	$(VENV)/bin/lint-imports
	$(VENV)/bin/pyright

# pytest exits 5 when it collects no test; make fails on any non-zero status, so that cannot pass.
test: setup lint
	$(PY) -m pytest

# The fast lane while working: no RELION, no PostgreSQL server, no end-to-end runs (`make test`,
# which CI runs, runs them all)
test-fast: venv
	$(PY) -m pytest -m "not relion and not postgres and not slow"

demo: setup
	$(PY) -m particleseg_assets.demo

# The web UI on the demo instance, with the demo archive served beside it when there is one
dev: setup
	@if [ -d $(DEMO_ARCHIVE) ]; then \
		$(VENV)/bin/particleseg serve-archive $(DEMO_ARCHIVE) --port $(DEMO_PORT) & \
		server=$$!; trap "kill $$server 2>/dev/null" EXIT; \
		eval "$$($(MAKE) -s env)"; \
		$(VENV)/bin/dagster dev -w workspace.yaml; \
	else \
		echo "no demo archive yet (make demo builds it): the clients talk to EBI"; \
		$(VENV)/bin/dagster dev -w workspace.yaml; \
	fi

# The demo archive as EMPIAR/EMDB/archive on 127.0.0.1:$(DEMO_PORT), in the foreground
serve: setup
	@test -d $(DEMO_ARCHIVE) || { echo "$(DEMO_ARCHIVE) is missing: run make demo first" >&2; exit 1; }
	$(VENV)/bin/particleseg serve-archive $(DEMO_ARCHIVE) --port $(DEMO_PORT)

# `eval "$(make -s env)"`: the environment of a shell that talks to the demo instance and server
env:
	@echo "export DAGSTER_HOME=$(DAGSTER_HOME) PARTICLESEG_DATA=$(PARTICLESEG_DATA)"
	@echo "export PARTICLESEG_EMPIAR_URL=$(DEMO_URL)/empiar/api"
	@echo "export PARTICLESEG_EMDB_URL=$(DEMO_URL)/emdb/api"
	@echo "export PARTICLESEG_ARCHIVE_URL=$(DEMO_URL)/empiar/world_availability"
	@echo "export PARTICLESEG_EMDB_FILES_URL=$(DEMO_URL)/pub/databases/emdb"

bench: setup
	$(PY) benchmarks/catalog_refresh.py
	$(PY) benchmarks/catalog_refresh.py --latency-ms 30 --reference-sample 200
	$(PY) benchmarks/dataset_fetch.py
	$(PY) benchmarks/simulate_speed.py
	$(PY) benchmarks/projection_speed.py
	$(PY) benchmarks/corpus_build.py --n 20000 --box 128
	$(PY) benchmarks/loader_speed.py

# The model (IoU held-out and unseen, speeds, incremental; about 60 minutes on 2 cores), then
# cleaning with that model against the baselines (about 5 minutes)
BENCH_MODEL := $(PARTICLESEG_DATA)/bench/model
bench-model: setup
	$(PY) benchmarks/model_quality.py --work $(BENCH_MODEL)
	$(PY) benchmarks/clean_quality.py --keras $(BENCH_MODEL)/model_64_16/model.keras \
		--corpus $(BENCH_MODEL)/data/corpus --work $(PARTICLESEG_DATA)/bench/clean

# The pretrained model shipped in the package (particleseg_model/pretrained/): the diverse
# simulated corpus with real negatives, training, measurements, install (about 70 minutes on
# 2 cores); then its figures on real particles and the realism comparison
pretrained: setup
	$(PY) -m pip install -q -e '.[pretrained]'
	$(PY) scripts/build_pretrained.py --work $(PARTICLESEG_DATA)/pretrained-work
	-$(PY) benchmarks/real_particles.py --no-topaz
	-$(PY) benchmarks/realism.py

# RELION auto-refine of 400 simulated particles: about 13 minutes on 2 cores
bench-refine: setup
	$(PY) benchmarks/refine_accuracy.py

clean:
	rm -rf $(VENV) data .pytest_cache .ruff_cache .import_linter_cache .grimp_cache
	find dagster_home -mindepth 1 -maxdepth 1 ! -name dagster.yaml ! -name README.md ! -name postgres \
		-exec rm -rf {} +
	find dagster_home/postgres -mindepth 1 ! -name dagster.yaml -exec rm -rf {} +
