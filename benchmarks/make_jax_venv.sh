#!/usr/bin/env bash
# Build the separate venv for the neural-tangents side of the benchmark (never linadapt's own environment):
# neural-tangents 0.6.5 imports only with jax/jaxlib <= 0.4.25 and numpy 1.26, and declares tf2jax (hence
# TensorFlow), which its empirical NTK does not need: it is installed without dependencies, and
# src/linadapt/app/_nt_bench.py stubs out the TensorFlow-based `neural_tangents.experimental` subpackage.
#
#   bash benchmarks/make_jax_venv.sh [VENV_DIR]     (default .venv-bench-jax; about 250 MB)
set -euo pipefail
VENV="${1:-.venv-bench-jax}"
PYTHON="${PYTHON:-python3}"
# a dangling symlink in the venv's place (e.g. to a venv that has since been removed) would make `venv` fail
if [ -L "$VENV" ] && [ ! -e "$VENV" ]; then rm "$VENV"; fi
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet "jax==0.4.25" "jaxlib==0.4.25" "numpy==1.26.4" "frozendict>=2.3"
"$VENV/bin/python" -m pip install --quiet --no-deps "neural-tangents==0.6.5"
"$VENV/bin/python" - <<'PY'
import sys, types
sys.modules["neural_tangents.experimental"] = types.ModuleType("neural_tangents.experimental")
import jax, neural_tangents  # noqa: E401
print(f"{sys.prefix}: jax {jax.__version__}, neural-tangents ready")
PY
