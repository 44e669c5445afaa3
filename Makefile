# pricefeed — `make run` serves it, `make test` proves it. Both install what they need.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# Every install (make, CI, the Dockerfile) takes exact, hashed versions from these files;
# `make lock` writes them from pyproject.toml.
LOCKS  := requirements/lock.txt requirements/build.lock.txt requirements/dev.lock.txt

# uv resolves the locks; it lives in a venv of its own, pinned so that the same pyproject.toml
# gives the same lock files on every machine.
UV_VERSION ?= 0.13.10
TOOLS  ?= .tools
UV     := $(TOOLS)/bin/uv
# One universal resolution (Linux x86_64 and aarch64, macOS, Windows) for CPython 3.11 and
# newer, each pin with the hashes of all its files. An existing lock's pins are kept unless
# pyproject.toml rules them out: `make lock LOCK_ARGS=--upgrade` takes the newest of everything.
COMPILE = $(UV) pip compile --quiet --universal --python-version 3.11 --generate-hashes \
          --no-emit-package pricefeed-client \
          --custom-compile-command 'make lock' $(LOCK_ARGS)

# The suite runs on two pytest-xdist workers: most of its time is waiting (on servers starting,
# timers, tokens expiring), not computing, so two workers take ~55% of one's time on 2 cores.
# Each worker has ports of its own (tests/support.py: free_port). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2

.PHONY: install lock run migrate test lint bench clean

$(STAMP): pyproject.toml clients/python/pyproject.toml app/prices/_fanout.c $(LOCKS)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "pricefeed needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --require-hashes -r requirements/dev.lock.txt
	@# The SDK (clients/python), which the app depends on: from this repo, not from an index.
	$(PY) -m pip install -q --no-deps --no-build-isolation -e clients/python
	@# The project itself: its dependencies are all in already, and setuptools (from the lock)
	@# builds the C extension here rather than a fresh, unpinned one fetched for the build.
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

install: $(STAMP)

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install -q uv==$(UV_VERSION)

# Runtime first; the build and dev locks are held to its pins, so the tests run on exactly
# what the image ships.
lock: $(UV)
	@mkdir -p requirements
	$(COMPILE) pyproject.toml -o requirements/lock.txt
	$(PYTHON) -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")' \
	  | $(COMPILE) - -c requirements/lock.txt -o requirements/build.lock.txt
	$(COMPILE) pyproject.toml --extra dev -c requirements/lock.txt -c requirements/build.lock.txt \
	  -o requirements/dev.lock.txt

migrate: install
	$(VENV)/bin/alembic upgrade head

run: migrate
	$(PY) -m app

test: install
	@scripts/ensure-redis.sh
	@scripts/ensure-node.sh
	$(PY) -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check app tests bench scripts clients/python/pricefeed_client
	$(VENV)/bin/mypy
	$(VENV)/bin/ruff format --check app tests bench scripts clients/python/pricefeed_client

bench: install
	$(PY) -m pip install -q -r bench/requirements.txt
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(TOOLS) pricefeed.db .pytest_cache .mypy_cache .ruff_cache .hypothesis build app/prices/_fanout.*.so
