# pricefeed — `make run` serves it, `make test` proves it. Both install what they need.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run migrate test lint bench clean

$(STAMP): pyproject.toml app/prices/_fanout.c
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "pricefeed needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

migrate: install
	$(VENV)/bin/alembic upgrade head

run: migrate
	$(PY) -m app

test: install
	@scripts/ensure-redis.sh
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check app tests bench
	$(VENV)/bin/mypy

bench: install
	$(PY) -m pip install -q -r bench/requirements.txt
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) pricefeed.db .pytest_cache .mypy_cache .ruff_cache build app/prices/_fanout.*.so
