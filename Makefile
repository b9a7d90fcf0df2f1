# Every target creates .venv on first use, so a fresh clone needs only `make train` / `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= runs/default
CONFIG ?= configs/default.py

.PHONY: setup train test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

train: setup
	$(PY) train.py --config=$(CONFIG) --workdir=$(WORKDIR)

test: setup
	$(PY) -m pytest

# Everything not marked `slow` (end-to-end, notebooks, multi-host, subprocesses): < 3 min on 2 cores.
test-fast: setup
	$(PY) -m pytest -m "not slow"

bench: setup
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/guard.py overhead

clean:
	rm -rf runs
