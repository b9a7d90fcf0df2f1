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

# Two pytest workers, a test file each at a time (its module fixtures compiled once): most of
# the suite is single-threaded (imports, compiles, subprocesses), so the second core halves
# little of the work but overlaps most of it (1,690 -> 1,147 s on 2 cores).
PYTEST := $(PY) -m pytest -n 2 --dist loadfile

test: setup
	$(PYTEST)

# Everything not marked `slow` (end-to-end, notebooks, multi-host, subprocesses): < 3 min on 2 cores.
test-fast: setup
	$(PYTEST) -m "not slow"

bench: setup
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/guard.py overhead

clean:
	rm -rf runs
