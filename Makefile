# Two commands set everything up on a fresh machine with python3 (3.10+) and make:
#   make test   create .venv if missing, install the test dependencies, run the whole suite
#   make docs   create .venv if missing, install the docs dependencies, build docs/_build/html
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# torch is pinned here (a local CPU wheel); pyproject only declares a range for library users.
CONSTRAINTS := requirements/constraints.txt
PYTEST_ARGS ?=
QUICK ?=

.PHONY: help test docs bench lint clean

help:
	@echo "make test    install test dependencies into $(VENV) and run the test suite"
	@echo "make docs    install docs dependencies into $(VENV) and build docs/_build/html"
	@echo "make bench   run the benchmarks (QUICK=1 for the reduced set)"
	@echo "make lint    ruff check"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# One stamp per extra: reinstall only when the project's metadata or the pins change.
$(VENV)/.installed-%: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(PIP) install --quiet -c $(CONSTRAINTS) -e ".[$*]"
	@touch $@

# The `bench` extra brings the peers the benchmarks compare against (Opacus, BackPACK); the test
# suite checks them too. BackPACK declares torchvision but imports it only in its examples, and
# PyPI's torchvision is built for CUDA torch: beside the CPU wheel pinned here its import fails
# ("operator torchvision::nms does not exist"), so it is uninstalled again. With a CUDA torch
# (`pip install goodfellow[bench]` on a GPU machine) it works and can stay.
$(VENV)/.installed-bench: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(PIP) install --quiet -c $(CONSTRAINTS) -e ".[bench]"
	$(PIP) uninstall --quiet --yes torchvision
	@touch $@

test: $(VENV)/.installed-test $(VENV)/.installed-docs $(VENV)/.installed-bench
	$(BIN)/python -m pytest $(PYTEST_ARGS)

docs: $(VENV)/.installed-docs
	rm -rf docs/_build/html
	$(BIN)/python -m sphinx -W --keep-going -n -b html docs docs/_build/html
	@echo
	@echo "The site is built: open file://$(CURDIR)/docs/_build/html/index.html"

bench: $(VENV)/.installed-bench $(VENV)/.installed-docs
	$(BIN)/python -m benchmarks.run $(if $(QUICK),--quick,)
	$(BIN)/python -m benchmarks.dpsgd $(if $(QUICK),--quick,)
	$(BIN)/python -m benchmarks.ddp $(if $(QUICK),--quick,)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check goodfellow tests benchmarks tutorials docs examples

clean:
	rm -rf docs/_build docs/tutorials .pytest_cache
