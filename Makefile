# The two commands a newcomer needs: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[dev]' $(TORCH_PINS)
	touch $(STAMP)

# runs/demo is the demo's own folder: a second `make demo` replaces the first run there
# (--overwrite replaces only a folder the demo made, never a training run of yours).
demo: install
	$(BIN)/coembed demo --overwrite

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

test: install lint
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow and not browser"

bench: install
	$(BIN)/pip install -q -e '.[dev,bench]' $(TORCH_PINS)
	$(BIN)/python benchmarks/run_all.py --quick

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
