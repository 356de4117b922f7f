"""Cost of matrix-free NTK products, as ratios to one forward+backward pass of the same model.

For an MLP 64-256-256-10 (ReLU) and a CNN conv3x3(1→16)-ReLU-conv3x3(16→32)-ReLU-flatten-linear(2048→10)
on 1×8×8 inputs, float32 networks, n = 1024 inputs, this times

* one K·v = J (Jᵀ v) (a vjp then a jvp) on one vector, and the same cold product in one forward pass
  (:func:`~linadapt.jacobian.graph.kernel_product`: a backward pass with v as the cotangent, then one through
  its graph),
* K·V on 16 right-hand sides at once (vmap), reported per vector,
* the same two products through the cached per-layer factors the solvers use (amortised; the one-off
  cost of building the factors is reported separately),
* the same two products through the retained autograd graph, the solvers' path for models without factors
  (:class:`~linadapt.jacobian.graph.GraphJacobian`: a backward pass for Jᵀu and one through the kept backward
  graph for J w; its build cost and memory reported too),

and, for scale, one epoch of fine-tuning (Adam, batches of 64, cross-entropy against fixed random labels, on
a copy of the model), each divided by the time of one forward+backward pass (sum of outputs, gradients of all
parameters) over the same 1024 inputs. Timings are interleaved (unit, K·v, K·V, unit, ...) and the medians of the
repetitions are compared, so machine noise hits all of them alike.

The dense-kernel table (``dense=True``) times :func:`~linadapt.kernels.operator.ntk_gram` — the full NTK
(n·c × n·c) at n = 256 and the trace kernel (n × n) at n = 1024 — by per-layer structured products
(``method="auto"``) and, with ``plain=True``, by contraction of per-example Jacobians (``method="jacobian"``,
one repetition: it is slow), each as a ratio to the forward+backward pass over the same inputs, and checks
that both give the same kernel.

The memory table (``memory=True``) runs each product in a fresh Python process (so no earlier case's freed
memory is reused) and reports the peak resident memory during the product above the resident memory just
before it, after the model, the inputs and one forward+backward pass exist: Linux's peak counter (VmHWM) is
reset right before the product. This is the operating system's figure, so it covers torch's allocations.

The neural-tangents table (``neural_tangents=True``) is the dense table's anchor, side by side: the same
models and sizes in JAX (neural-tangents' structured derivatives and Jacobian contraction, jit-compiled), as
ratios to a JAX forward+backward pass, run under a separate interpreter (:func:`run_neural_tangents`); skipped
with a message saying how to get one when there is none.

    linadapt bench [--reps 9] [--n 1024] [--threads 2] [--no-dense] [--no-plain] [--no-memory]
                   [--no-neural-tangents] [--jax-python PATH]
    (or python benchmarks/bench_kernel_products.py with the same options)
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from linadapt.jacobian.graph import graph_jacobian, kernel_product
from linadapt.jacobian.structured import factored_jacobian
from linadapt.kernels.operator import NTKOperator, ntk_gram


def mlp() -> nn.Module:
    """The benchmark MLP 64-256-256-10 (83,466 weights)."""
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def cnn() -> nn.Module:
    """The benchmark CNN on 1×8×8 inputs (two 3×3 convolutions of 16 and 32 channels, a linear head)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2048, 10),
    )


def timed(fn) -> float:
    """Wall seconds of one call."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved_medians(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median wall seconds of each function over ``reps`` rounds, each round calling every function once in
    order (so that slow drifts of the machine hit all alike), after one warm-up call each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {key: [] for key in fns}
    for _ in range(reps):
        for key, fn in fns.items():
            times[key].append(timed(fn))
    return {key: statistics.median(t) for key, t in times.items()}


def bench(name: str, model: nn.Module, X: torch.Tensor, reps: int) -> dict[str, float]:
    """Median times of one forward+backward pass, one K·v and K·V (16 vectors) — by torch.func products and
    by the cached per-layer factors the solvers use (:class:`~linadapt.jacobian.structured.FactoredJacobian`,
    amortised: built once) — as ratios to the pass; plus the one-off cost of building the factors."""
    model.eval()
    op = NTKOperator(model, X, hold=False)
    lin, Xp = op.linearization, op.X1
    n, c = Xp.shape[0], op.num_outputs
    g = torch.Generator().manual_seed(0)
    v1 = torch.randn(1, n, c, generator=g, dtype=torch.float64)
    v16 = torch.randn(16, n, c, generator=g, dtype=torch.float64)

    unit = _unit(model, X)
    tuned = copy.deepcopy(model)
    opt = torch.optim.Adam(tuned.parameters(), lr=1e-3)
    labels = torch.randint(0, c, (n,), generator=g)

    def epoch() -> None:
        for i in range(0, n, 64):
            opt.zero_grad()
            nn.functional.cross_entropy(tuned(X[i : i + 64]), labels[i : i + 64]).backward()
            opt.step()

    fns = {
        "unit": unit,
        "kv": lambda: op.apply_rows(v1.reshape(1, -1)),
        "cold": lambda: kernel_product(lin, Xp, v1[0]),
        "kv16": lambda: op.apply_rows(v16.reshape(16, -1)),
        "epoch": epoch,
    }
    # J(X) held for repeated products, each kind built twice (the first build also warms up torch), the
    # second timed: "cached" = per-layer factors, "graph" = the retained autograd graph
    held: dict[str, tuple] = {}
    for kind, build in (("cached", factored_jacobian), ("graph", graph_jacobian)):
        if build(lin, Xp, budget=2**31) is None:
            continue
        t0 = time.perf_counter()
        obj = build(lin, Xp, budget=2**31)
        held[kind] = (obj, time.perf_counter() - t0)
        fns[kind] = lambda obj=obj: obj.jvp(obj.vjp(v1))
        fns[f"{kind}16"] = lambda obj=obj: obj.jvp(obj.vjp(v16))
    med = interleaved_medians(fns, reps)
    row = {
        "model": name,
        "p": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "unit_ms": med["unit"] * 1e3,
        "kv": med["kv"] / med["unit"],
        "cold": med["cold"] / med["unit"],
        "kv16": med["kv16"] / med["unit"],
        "kv16_per_vec": med["kv16"] / med["unit"] / 16,
        "epoch": med["epoch"] / med["unit"],
    }
    for kind, (obj, seconds) in held.items():
        row[kind] = med[kind] / med["unit"]
        row[f"{kind}16_per_vec"] = med[f"{kind}16"] / med["unit"] / 16
        row[f"{kind}_build"] = seconds / med["unit"]
        row[f"{kind}_mib"] = obj.nbytes() / 2**20
    return row


def _unit(model: nn.Module, X: torch.Tensor):
    params = [p for p in model.parameters() if p.requires_grad]

    def unit() -> None:
        torch.autograd.grad(model(X).sum(), params)

    return unit


def bench_dense(
    name: str, model: nn.Module, X_full: torch.Tensor, X_trace: torch.Tensor, reps: int, plain: bool = True
) -> dict[str, float]:
    """Dense NTK timings as ratios to one forward+backward pass over the same inputs (medians, interleaved).

    full: ntk_gram(model, X_full) (n·c × n·c); trace: ntk_gram(model, X_trace, output="sum") (n × n); with
    ``plain`` also the Jacobian contraction of the full kernel (one run) and the largest relative difference
    between the two full kernels."""
    model.eval()
    unit_full, unit_trace = _unit(model, X_full), _unit(model, X_trace)

    def full() -> None:
        ntk_gram(model, X_full)

    def trace() -> None:
        ntk_gram(model, X_trace, output="sum")

    med = interleaved_medians({"unit_full": unit_full, "full": full, "unit_trace": unit_trace, "trace": trace}, reps)
    row = {
        "model": name,
        "p": sum(p.numel() for p in model.parameters()),
        "n_full": X_full.shape[0],
        "n_trace": X_trace.shape[0],
        "full": med["full"] / med["unit_full"],
        "trace": med["trace"] / med["unit_trace"],
    }
    if plain:
        K = ntk_gram(model, X_full)
        t0 = time.perf_counter()
        K_plain = ntk_gram(model, X_full, method="jacobian")
        row["full_plain"] = (time.perf_counter() - t0) / statistics.median([timed(unit_full) for _ in range(reps)])
        row["max_rel_diff"] = float((K - K_plain).abs().max() / K_plain.abs().max())
    return row


NT_SCRIPT = Path(__file__).with_name("_nt_bench.py")
NT_VENV_PYTHON = Path(".venv-bench-jax") / "bin" / "python"
_NT_HOWTO = (
    "build one with `bash benchmarks/make_jax_venv.sh .venv-bench-jax` from a linadapt checkout, or pass "
    "--jax-python PATH to a Python with jax/jaxlib 0.4.25, numpy 1.26 and neural-tangents 0.6.5"
)


def run_neural_tangents(python: str | Path | None, reps: int, threads: int, timeout: float = 1800) -> tuple[bool, str]:
    """neural-tangents' dense-NTK table (full and trace kernels of the same two models, ratios to a JAX
    forward+backward pass), run by :data:`NT_SCRIPT` under another interpreter — JAX and neural-tangents
    never live in linadapt's environment. ``python``: that interpreter; None looks for ``$LINADAPT_JAX_PYTHON``,
    then ``.venv-bench-jax/bin/python`` in the working directory. Returns (ran, table or the reason it was
    skipped)."""
    if python is None:
        python = os.environ.get("LINADAPT_JAX_PYTHON") or (NT_VENV_PYTHON if NT_VENV_PYTHON.exists() else None)
    if python is None:
        return False, f"neural-tangents comparison skipped: no Python with JAX found ({_NT_HOWTO})"
    if not Path(python).exists():
        return False, f"neural-tangents comparison skipped: {python} does not exist ({_NT_HOWTO})"
    cmd = [str(python), str(NT_SCRIPT), "--reps", str(reps), "--threads", str(threads)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"neural-tangents comparison skipped: {python} ran past {timeout:.0f} s"
    if res.returncode != 0:
        reason = (res.stderr.strip().splitlines() or [f"exit status {res.returncode}"])[-1]
        return False, f"neural-tangents comparison skipped: {reason}"
    return True, res.stdout.rstrip()


@contextlib.contextmanager
def _threads_and_seed(threads: int) -> Iterator[None]:
    """torch on ``threads`` threads with seed 0; the caller's thread count and random state are restored."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            yield
    finally:
        torch.set_num_threads(previous)


def run_dense_bench(reps: int = 5, threads: int = 2, plain: bool = True) -> list[dict[str, float]]:
    """The dense-kernel benchmark on the MLP and the CNN (n = 256 full, n = 1024 trace)."""
    with _threads_and_seed(threads):
        return [
            bench_dense("MLP 64-256-256-10", mlp(), torch.randn(256, 64), torch.randn(1024, 64), reps, plain),
            bench_dense(
                "CNN 1x8x8 (16,32 ch)", cnn(), torch.randn(256, 1, 8, 8), torch.randn(1024, 1, 8, 8), reps, plain
            ),
        ]


def format_dense_table(rows: list[dict[str, float]], reps: int, threads: int) -> str:
    """The dense-kernel rows as a Markdown table with its caption."""
    plain = "full_plain" in rows[0]
    lines = [
        f"dense NTK, {threads} threads, medians of {reps} interleaved repetitions (Jacobian contraction: one run)",
        "ratios to one forward+backward pass of the same model over the same inputs",
        "",
        "| model | p | full NTK, n = 256, structured | "
        + ("full NTK, Jacobian contraction | speed-up | max rel. difference | " if plain else "")
        + "trace NTK, n = 1024, structured |",
        "|---|---|---|" + ("---|---|---|" if plain else "") + "---|",
    ]
    for r in rows:
        extra = (
            f"{r['full_plain']:,.0f}× | {r['full_plain'] / r['full']:,.0f}× | {r['max_rel_diff']:.1e} | "
            if plain
            else ""
        )
        lines.append(f"| {r['model']} | {r['p']:,} | {r['full']:.0f}× | {extra}{r['trace']:.0f}× |")
    return "\n".join(lines)


def run_bench(reps: int = 9, n: int = 1024, threads: int = 2) -> list[dict[str, float]]:
    """The kernel-product benchmark on the MLP and the CNN; one row (dict) per model. The caller's torch
    thread count and random state are restored afterwards."""
    with _threads_and_seed(threads):
        return [
            bench("MLP 64-256-256-10", mlp(), torch.randn(n, 64), reps),
            bench("CNN 1x8x8 (16,32 ch)", cnn(), torch.randn(n, 1, 8, 8), reps),
        ]


def format_table(rows: list[dict[str, float]], reps: int, n: int, threads: int) -> str:
    """The rows as a Markdown table with its caption."""
    lines = [
        f"n = {n}, {threads} threads, medians of {reps} interleaved repetitions",
        "ratios to one forward+backward pass of the same model over the same inputs",
        "",
        "torch.func: vjp then jvp, primal pass recomputed; one forward pass: a backward pass with v as cotangent, "
        "then one through its graph (an operator's first product); cached: per-layer factors built once (the "
        "solvers' path); graph: the retained autograd graph (the solvers' path for models without factors), kept once",
        "",
        "| model | p | fwd+bwd (ms) | one K·v, torch.func | one K·v, one forward pass | 16 vectors, per vector | "
        "one K·v, cached | "
        "16 vectors, cached, per vector | building the factors | factors (MiB) | one K·v, graph | "
        "16 vectors, graph, per vector | keeping the graph | graph (MiB) | one fine-tuning epoch |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cached, graph = (
            f"{r[k]:.2f}× | {r[f'{k}16_per_vec']:.2f}× | {r[f'{k}_build']:.1f}× | {r[f'{k}_mib']:.0f} |"
            if k in r
            else "— | — | — | — |"
            for k in ("cached", "graph")
        )
        lines.append(
            f"| {r['model']} | {r['p']:,} | {r['unit_ms']:.1f} | {r['kv']:.2f}× | {r['cold']:.2f}× | "
            f"{r['kv16_per_vec']:.2f}× | {cached}"
            f" {graph} {r['epoch']:.1f}× |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- peak memory
MEMORY_CASES = ("kv", "kv16", "cached", "graph", "full")
_MODELS = {"MLP 64-256-256-10": (mlp, (64,)), "CNN 1x8x8 (16,32 ch)": (cnn, (1, 8, 8))}


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def memory_case(model_name: str, case: str, n: int, threads: int) -> dict:
    """Run one case in this process: the resident memory before it and the peak during it (MiB).

    Cases: ``kv`` (one K·v by torch.func), ``kv16`` (16 vectors at once), ``cached`` (build the cached
    factors, one K·v through them), ``graph`` (keep the autograd graph, one K·v through it), ``full`` (the
    full structured NTK at 256 of the inputs). Before the case: the model, the inputs, one forward+backward
    pass, the operator and the vectors; then the peak counter is reset (Linux: ``/proc/self/clear_refs``)."""
    make, shape = _MODELS[model_name]
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = make().eval()
    X = torch.randn(n, *shape)
    _unit(model, X)()
    op = NTKOperator(model, X, hold=False)
    k = 16 if case == "kv16" else 1
    V = torch.randn(k, n * op.num_outputs, dtype=torch.float64)
    before = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident size
    if case in ("kv", "kv16"):
        op.apply_rows(V)
    elif case == "cached":
        factors = factored_jacobian(op.linearization, op.X1, budget=2**31)
        if factors is None:
            raise RuntimeError("no cached factors for this model")
        factors.jvp(factors.vjp(V.reshape(1, n, -1)))
    elif case == "graph":
        graph = graph_jacobian(op.linearization, op.X1, budget=2**31)
        if graph is None:
            raise RuntimeError("no retained graph for this model")
        graph.jvp(graph.vjp(V.reshape(1, n, -1)))
    elif case == "full":
        ntk_gram(model, X[:256])
    else:
        raise ValueError(f"unknown memory case {case!r}")
    return {"model": model_name, "case": case, "before_mib": before, "peak_mib": _status_mib("VmHWM")}


def _run_case(model_name: str, case: str, n: int, threads: int) -> dict:
    code = (
        "import json, sys; from linadapt.app.bench import memory_case; "
        "print(json.dumps(memory_case(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, model_name, case, str(n), str(threads)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"memory case {case} of {model_name} failed: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_memory_bench(n: int = 1024, threads: int = 2) -> list[dict[str, float]]:
    """Peak memory of each case above the resident memory before it, one row per model (MiB), and the
    largest resident size before a case; each case in its own process (``python -c``)."""
    rows = []
    for name in _MODELS:
        row: dict = {"model": name, "base_mib": 0.0}
        for case in MEMORY_CASES:
            res = _run_case(name, case, n, threads)
            row[case] = res["peak_mib"] - res["before_mib"]
            row["base_mib"] = max(row["base_mib"], res["before_mib"])
        rows.append(row)
    return rows


def format_memory_table(rows: list[dict[str, float]], n: int) -> str:
    """The memory rows as a Markdown table with its caption."""
    lines = [
        f"peak resident memory during each product above the memory just before it (MiB; n = {n}; each case in a "
        "fresh process holding the model, the inputs and the vectors)",
        "",
        "| model | resident before (MiB) | one K·v, torch.func | 16 vectors | cached factors + one K·v | "
        "kept graph + one K·v | full NTK, n = 256 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = " | ".join(f"{max(r[c], 0.0):,.0f}" for c in MEMORY_CASES)
        lines.append(f"| {r['model']} | {r['base_mib']:,.0f} | {cells} |")
    return "\n".join(lines)
