#!/usr/bin/env bash
# The dense-NTK anchor side by side on this machine: linadapt's dense table (torch, structured per-layer
# products) and neural-tangents' structured derivatives (JAX, jit), each as ratios to one forward+backward pass
# of the same model in its own framework, run one after the other in one invocation.
#
#   bash benchmarks/bench_vs_neural_tangents.sh [REPS]     (needs `make setup`; builds .venv-bench-jax if missing)
set -euo pipefail
REPS="${1:-5}"
test -x .venv-bench-jax/bin/python || bash benchmarks/make_jax_venv.sh .venv-bench-jax
echo "== linadapt (torch $(.venv/bin/python -c 'import torch; print(torch.__version__)'))"
.venv/bin/python - "$REPS" <<'PY'
import sys
from linadapt.app.bench import format_dense_table, run_dense_bench
reps = int(sys.argv[1])
print(format_dense_table(run_dense_bench(reps, 2, plain=False), reps, 2))
PY
echo
echo "== neural-tangents"
.venv-bench-jax/bin/python src/linadapt/app/_nt_bench.py --reps "$REPS" --threads 2
