# Two entry points, each doing all the set-up on a fresh machine:
#   make search   create .venv, install, run a 50-trial search
#   make test     create .venv, install, run the tests
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# DATA=/path/to/root is passed on when given; without it the CLI's own rule finds the set (README, top)
DATA ?=
DATA_DIR := $(if $(DATA),--data-dir $(DATA))
DATA_ENV := $(if $(DATA),BUDGETNAS_DATA=$(DATA))
TRIALS ?= 50

.PHONY: install search best report test bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, so nothing else can pull in another build
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

search: install
	$(PY) cli.py search --trials $(TRIALS) $(DATA_DIR)

best: install
	$(PY) cli.py best $(DATA_DIR)

report: install
	$(PY) cli.py report

test: install
	$(DATA_ENV) $(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(DATA_ENV) $(PY) benchmarks/train_throughput.py
	$(DATA_ENV) $(PY) benchmarks/accuracy.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
