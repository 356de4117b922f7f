"""neural-tangents' dense empirical NTK on the benchmark models, as ratios to one forward+backward pass in JAX.

The side-by-side anchor for ``linadapt bench``'s dense table: the same architectures (MLP 64-256-256-10 ReLU;
CNN conv3x3(1→16)-ReLU-conv3x3(16→32)-ReLU-flatten-linear(2048→10) on 8×8×1 inputs, "SAME" padding), the same
sizes (full NTK n·c × n·c at n = 256, trace-over-outputs kernel n × n at n = 1024), each timed against one
forward+backward pass (gradient of the summed outputs with respect to all parameters) of the same JAX model over
the same inputs, everything jit-compiled and warmed up, medians of interleaved repetitions.

JAX and neural-tangents do not belong in linadapt's environment (neural-tangents 0.6.5 needs jax ≤ 0.4.25 and
numpy 1.26, and its ``experimental`` subpackage imports TensorFlow), so this file imports neither linadapt nor
anything outside the standard library until it runs: ``linadapt bench`` runs it with the interpreter of a
separate venv (``--jax-python``; ``benchmarks/make_jax_venv.sh`` builds one), or by hand:

    .venv-bench-jax/bin/python src/linadapt/app/_nt_bench.py [--reps 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
import types


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-contraction", action="store_true", help="skip the Jacobian-contraction timing")
    args = parser.parse_args()
    os.environ.setdefault("XLA_FLAGS", f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={args.threads}")
    # neural_tangents/__init__ imports its TensorFlow-based experimental subpackage, which nothing here uses.
    sys.modules.setdefault("neural_tangents.experimental", types.ModuleType("neural_tangents.experimental"))
    try:
        import jax
        import neural_tangents as nt
        from neural_tangents import stax
    except ImportError as exc:
        sys.exit(f"needs jax 0.4.25 and neural-tangents 0.6.5 (benchmarks/make_jax_venv.sh builds a venv): {exc}")

    models = {
        "MLP 64-256-256-10": (
            stax.serial(
                stax.Dense(256, parameterization="standard", b_std=1.0),
                stax.Relu(),
                stax.Dense(256, parameterization="standard", b_std=1.0),
                stax.Relu(),
                stax.Dense(10, parameterization="standard", b_std=1.0),
            ),
            (64,),
        ),
        "CNN 1x8x8 (16,32 ch)": (
            stax.serial(
                stax.Conv(16, (3, 3), padding="SAME", parameterization="standard", b_std=1.0),
                stax.Relu(),
                stax.Conv(32, (3, 3), padding="SAME", parameterization="standard", b_std=1.0),
                stax.Relu(),
                stax.Flatten(),
                stax.Dense(10, parameterization="standard", b_std=1.0),
            ),
            (8, 8, 1),
        ),
    }
    print(f"jax {jax.__version__}, neural-tangents, {args.threads} threads, medians of {args.reps} repetitions")
    print("ratios to one jit-compiled forward+backward pass of the same model over the same inputs")
    print()
    header = "| model | p | fwd+bwd n = 256 (ms) | full NTK, n = 256, structured derivatives | "
    header += "" if args.no_contraction else "full NTK, Jacobian contraction | "
    print(header + "trace NTK, n = 1024, structured derivatives |")
    print("|---|---|---|---|" + ("" if args.no_contraction else "---|") + "---|")
    for name, ((init_fn, apply_fn, _), shape) in models.items():
        print(_row(jax, nt, name, init_fn, apply_fn, shape, args.reps, not args.no_contraction), flush=True)


def _row(jax, nt, name: str, init_fn, apply_fn, shape: tuple, reps: int, contraction: bool) -> str:
    """One table row: medians of interleaved repetitions as ratios to the forward+backward pass."""
    impl = nt.NtkImplementation
    _, params = init_fn(jax.random.PRNGKey(0), (-1, *shape))
    p = sum(x.size for x in jax.tree_util.tree_leaves(params))
    x_full = jax.random.normal(jax.random.PRNGKey(1), (256, *shape))
    x_trace = jax.random.normal(jax.random.PRNGKey(2), (1024, *shape))
    unit = jax.jit(jax.grad(lambda prm, x: apply_fn(prm, x).sum()))

    def ntk(trace: bool, implementation):
        fn = nt.empirical_ntk_fn(
            apply_fn, trace_axes=(-1,) if trace else (), vmap_axes=0, implementation=implementation
        )
        return jax.jit(lambda x: fn(x, None, params))

    fns = {
        "unit_full": functools.partial(unit, params, x_full),
        "full": functools.partial(ntk(False, impl.STRUCTURED_DERIVATIVES), x_full),
        "unit_trace": functools.partial(unit, params, x_trace),
        "trace": functools.partial(ntk(True, impl.STRUCTURED_DERIVATIVES), x_trace),
    }
    if contraction:
        fns["contraction"] = functools.partial(ntk(False, impl.JACOBIAN_CONTRACTION), x_full)
    for fn in fns.values():  # compile and warm up
        jax.block_until_ready(fn())
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    K = fns["full"]()
    assert K.shape == (256, 256, 10, 10), K.shape
    row = f"| {name} | {p:,} | {med['unit_full'] * 1e3:.2f} | {med['full'] / med['unit_full']:.0f}× | "
    if contraction:
        row += f"{med['contraction'] / med['unit_full']:.0f}× | "
    return row + f"{med['trace'] / med['unit_trace']:.0f}× |"


if __name__ == "__main__":
    main()
