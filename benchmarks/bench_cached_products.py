"""One K·v (and 16 at once) through the cached training-Jacobian factors, as ratios to one forward+backward
pass, with more interleaved repetitions than ``linadapt bench`` (whose table also times torch.func products
and a fine-tuning epoch in the same loop).

To compare two versions of the code side by side, run it twice in one shell, the other version first on
``PYTHONPATH`` (e.g. ``git worktree add /tmp/old COMMIT``):

    python benchmarks/bench_cached_products.py [--reps 30] [--n 1024] [--threads 2]
    PYTHONPATH=/tmp/old/src python benchmarks/bench_cached_products.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from linadapt import Linearization
from linadapt.bench import _unit, cnn, mlp
from linadapt.structured import factored_jacobian


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print("| model | fwd+bwd (ms) | one K·v, cached | vjp | jvp | 16 vectors, per vector |")
    print("|---|---|---|---|---|---|")
    for name, model, X in (
        ("MLP 64-256-256-10", mlp(), torch.randn(args.n, 64)),
        ("CNN 1x8x8 (16,32 ch)", cnn(), torch.randn(args.n, 1, 8, 8)),
    ):
        f = factored_jacobian(Linearization(model), X, budget=2**31)
        unit = _unit(model, X)
        g = torch.Generator().manual_seed(0)
        v = torch.randn(1, args.n, 10, generator=g, dtype=torch.float64)
        v16 = torch.randn(16, args.n, 10, generator=g, dtype=torch.float64)
        u = f.vjp(v)
        fns = {
            "unit": unit,
            "kv": lambda f=f, v=v: f.jvp(f.vjp(v)),
            "vjp": lambda f=f, v=v: f.vjp(v),
            "jvp": lambda f=f, u=u: f.jvp(u),
            "kv16": lambda f=f, v16=v16: f.jvp(f.vjp(v16)),
        }
        for fn in fns.values():
            fn()
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(args.reps):
            for key, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
        med = {k: statistics.median(t) for k, t in times.items()}
        r = {k: med[k] / med["unit"] for k in med}
        print(
            f"| {name} | {med['unit'] * 1e3:.1f} | {r['kv']:.2f}× | {r['vjp']:.2f}× | {r['jvp']:.2f}× | "
            f"{r['kv16'] / 16:.2f}× |"
        )


if __name__ == "__main__":
    main()
