# Two entry points: `make experiment` (the main job) and `make test`.
# Both create and reuse a local virtual environment in .venv.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA_DIR ?= data
WORKDIR ?= runs/sentiment
CONFIG ?= experiments/configs/sentiment.py

.PHONY: venv data experiment test test-slow lint format bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -e '.[test,experiments]'
	touch $(STAMP)

venv: $(STAMP)

data: $(STAMP)
	$(BIN)/python -m infalign_jax.data.fetch --data_dir=$(DATA_DIR)

experiment: $(STAMP) data
	$(BIN)/python -m experiments.main --config=$(CONFIG) --workdir=$(WORKDIR)

# Lint, the default suite, then the multi-device tests in their own
# process, because XLA_FLAGS must be set before JAX starts.
test: $(STAMP) data lint
	$(BIN)/python -m pytest -n 2 --ignore=tests/multidevice tests
	XLA_FLAGS=--xla_force_host_platform_device_count=8 \
	  $(BIN)/python -m pytest tests/multidevice

test-slow: $(STAMP) data
	$(BIN)/python -m pytest -n 2 -m slow --ignore=tests/multidevice tests

lint: $(STAMP)
	$(BIN)/ruff check infalign_jax experiments tests bench
	$(BIN)/pyink --check infalign_jax experiments tests bench

format: $(STAMP)
	$(BIN)/pyink infalign_jax experiments tests bench
	$(BIN)/ruff check --fix infalign_jax experiments tests bench

clean:
	rm -rf $(VENV) runs
