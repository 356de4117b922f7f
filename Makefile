# make demo   — create .venv if missing (torch 2.13.0 CPU first, then linadapt[dev,data]; optional: laplace-torch,
#               ISLP and animal-mnist for their data) and run `linadapt demo`
# make test   — the same setup, then ruff and the test suite (installing headless Chromium with apt, if it can,
#               for the report-rendering test)
# make bench  — the kernel-product benchmark (ratios to one forward+backward pass)

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.linadapt-installed
LAPLACE_PKGS := laplace-torch==0.3 asdfghjkl==0.1a4 backpack-for-pytorch==1.7.1 curvlinops-for-pytorch==3.0.1 \
	opt-einsum==3.4.0 torchmetrics==1.9.0 tqdm==4.70.1 einops==0.8.2 unfoldNd==0.2.3 einconv==0.1.0 \
	lightning-utilities==0.15.3

.PHONY: setup demo test lint bench browser clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[dev,data]"
	# optional: laplace-torch for the agreement test. Its declared torchvision dependency would pull a CUDA
	# torch, and it never imports it, so it and its runtime dependencies go in without dependency resolution.
	$(BIN)/python -m pip install --quiet --no-deps $(LAPLACE_PKGS) \
		|| echo "laplace-torch not installed: its agreement test will be skipped"
	# datasets shipped inside packages (bikeshare, mnist-to-animals experiments); both declare heavy dependencies
	# (ISLP: statsmodels, lifelines, ...; animal-mnist: tensorflow) that reading their bundled data does not need
	$(BIN)/python -m pip install --quiet --no-deps ISLP==0.6.0 animal-mnist==0.4 \
		|| echo "ISLP / animal-mnist not installed: the bikeshare / mnist-to-animals experiments will be skipped"
	touch $(STAMP)

# optional, for the test suite only: headless Chromium + chromedriver (Debian packages, system-wide, needs root)
# for the report-rendering test; skipped with a message where apt is unavailable
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null \
		|| (echo "installing chromium + chromium-driver with apt-get for the report-rendering test" \
			&& (apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null 2>&1 \
				|| (apt-get update -qq >/dev/null 2>&1 \
					&& apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null 2>&1))) \
		|| echo "chromium not installed: the report-rendering test will be skipped"

demo: $(STAMP)
	$(BIN)/linadapt demo --out linadapt-demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples

test: $(STAMP) lint browser
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_kernel_products.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
