# make demo   — create .venv if missing (torch 2.13.0 CPU first, then linadapt[dev]) and run the demo
# make test   — the same setup, then ruff and the test suite
# make bench  — the kernel-product benchmark (ratios to one forward+backward pass)

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.linadapt-installed

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/regression_demo.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples

test: $(STAMP) lint
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_kernel_products.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
