# pagemesh: every target installs what it needs; a fresh clone needs only `make serve` or `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
CORE := pagemesh services worker gateway tokenizer_svc deploy

.PHONY: install model serve test lint typecheck proto bench clean

PROTO_SRC := $(wildcard protos/pagemesh/v1/*.proto)
PROTO_GEN := protos/pagemesh/v1/.generated

install: $(STAMP) $(PROTO_GEN)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "pagemesh: installing into $(VENV) (torch 2.13.0 CPU build first, then the rest)"
	$(PY) -m pip install -q --disable-pip-version-check "torch==2.13.0"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	$(PY) -m worker.cpu_kernels || echo "pagemesh: CPU kernels not built; the torch path will run"
	@touch $(STAMP)

model: install
	$(PY) -m pagemesh.model_store

$(PROTO_GEN): $(PROTO_SRC) $(STAMP)
	$(PY) -m protos.build
	@touch $@

proto: $(STAMP)
	$(PY) -m protos.build
	@touch $(PROTO_GEN)

serve: install model
	$(VENV)/bin/pagemesh serve $(ARGS)

lint: install
	$(VENV)/bin/ruff check $(CORE) tests

typecheck: install
	$(VENV)/bin/mypy $(CORE)

test: install model lint typecheck
	$(VENV)/bin/pytest -q -ra $(PYTEST_ARGS)

bench: install model
	$(PY) -m pagemesh.bench.compare

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
