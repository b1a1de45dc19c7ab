# sockpolicy developer entry points. `make run` and `make test` are all you need; both run `make setup`
# first, which is idempotent (scripts/setup.sh: apt packages, .venv, editable install, bpffs).

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
LINT_PATHS := sockpolicy tests bench build_tools

.PHONY: setup run test lint format progs bench clean distclean help

help:
	@echo "make run     - set up, then serve the built-in echo (sockpolicy serve)"
	@echo "make test    - set up, then run the whole pytest suite (PYTEST_ADDOPTS is honoured)"
	@echo "make lint    - ruff check + ruff format --check"
	@echo "make format  - ruff format + ruff check --fix"
	@echo "make progs   - recompile sockpolicy/progs/*.bpf.c in place"
	@echo "make bench   - run bench/run.py if present"
	@echo "make clean   - remove build outputs and caches (keeps .venv); distclean also removes .venv"

setup:
	@bash scripts/setup.sh

run: setup
	exec $(VENV)/bin/sockpolicy serve

# The suite includes a smoke run of the benchmark harness, which needs HAProxy and matplotlib.
test: setup
	@bash bench/setup.sh
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check $(wildcard $(LINT_PATHS))
	$(VENV)/bin/ruff format --check $(wildcard $(LINT_PATHS))

format: setup
	$(VENV)/bin/ruff format $(wildcard $(LINT_PATHS))
	$(VENV)/bin/ruff check --fix $(wildcard $(LINT_PATHS))

progs: setup
	$(PY) build_tools/build_progs.py

bench: setup
	@bash bench/setup.sh
	$(PY) bench/run.py $(BENCH_ARGS)

clean:
	rm -rf build dist .pytest_cache .ruff_cache .hypothesis bench/out
	rm -f sockpolicy/_libbpf_cffi*.so sockpolicy/_libbpf_cffi.c sockpolicy/progs/*.o
	rm -f $(VENV)/.sockpolicy-installed
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) *.egg-info
