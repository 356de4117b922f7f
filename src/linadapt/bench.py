"""Cost of matrix-free NTK products, as ratios to one forward+backward pass of the same model.

For an MLP 64-256-256-10 (ReLU) and a CNN conv3x3(1→16)-ReLU-conv3x3(16→32)-ReLU-flatten-linear(2048→10)
on 1×8×8 inputs, float32 networks, n = 1024 inputs, this times

* one K·v = J (Jᵀ v) (a vjp then a jvp) on one vector,
* K·V on 16 right-hand sides at once (vmap), reported per call and per vector,

each divided by the time of one forward+backward pass (sum of outputs, gradients of all parameters) over
the same 1024 inputs. Timings are interleaved (unit, K·v, K·V, unit, ...) and the medians of the
repetitions are compared, so machine noise hits all of them alike.

    linadapt bench [--reps 9] [--n 1024] [--threads 2]     (or python benchmarks/bench_kernel_products.py)
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from .operators import NTKOperator


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def cnn() -> nn.Module:
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


def bench(name: str, model: nn.Module, X: torch.Tensor, reps: int) -> dict[str, float]:
    """Median times of one forward+backward pass, one K·v and K·V (16 vectors), as ratios to the pass."""
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    op = NTKOperator(model, X)
    N = op.shape[0]
    g = torch.Generator().manual_seed(0)
    v1 = torch.randn(N, 1, generator=g, dtype=torch.float64)
    v16 = torch.randn(N, 16, generator=g, dtype=torch.float64)

    def unit() -> None:
        out = model(X)
        torch.autograd.grad(out.sum(), params)

    def kv() -> None:
        op.apply_rows(v1.T)

    def kv16() -> None:
        op.apply_rows(v16.T)

    for fn in (unit, kv, kv16):  # warm up
        fn()
    times: dict[str, list[float]] = {"unit": [], "kv": [], "kv16": []}
    for _ in range(reps):
        times["unit"].append(timed(unit))
        times["kv"].append(timed(kv))
        times["kv16"].append(timed(kv16))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": name,
        "p": sum(p.numel() for p in params),
        "unit_ms": med["unit"] * 1e3,
        "kv": med["kv"] / med["unit"],
        "kv16": med["kv16"] / med["unit"],
        "kv16_per_vec": med["kv16"] / med["unit"] / 16,
    }


def run_bench(reps: int = 9, n: int = 1024, threads: int = 2) -> list[dict[str, float]]:
    """The kernel-product benchmark on the MLP and the CNN; one row (dict) per model. The caller's torch
    thread count and random state are restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return [
                bench("MLP 64-256-256-10", mlp(), torch.randn(n, 64), reps),
                bench("CNN 1x8x8 (16,32 ch)", cnn(), torch.randn(n, 1, 8, 8), reps),
            ]
    finally:
        torch.set_num_threads(previous)


def format_table(rows: list[dict[str, float]], reps: int, n: int, threads: int) -> str:
    """The rows as a Markdown table with its caption."""
    lines = [
        f"n = {n}, {threads} threads, medians of {reps} interleaved repetitions",
        "ratios to one forward+backward pass of the same model over the same inputs",
        "",
        "| model | p | fwd+bwd (ms) | one K·v | K·V, 16 vectors | per vector |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['p']:,} | {r['unit_ms']:.1f} | {r['kv']:.2f}× | {r['kv16']:.2f}× | "
            f"{r['kv16_per_vec']:.2f}× |"
        )
    return "\n".join(lines)
