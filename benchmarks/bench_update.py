"""``update`` against a refit: adding k points to an n-point Cholesky regression fit.

Network: MLP d-256-256-c (tanh, float64); inputs N(0, I), targets a smooth function plus noise; fixed
hyperparameters (prior_var 0.5, noise_var 0.01), ``space="function"``, ``solver="cholesky"`` (the path whose
refit costs N²p + N³/3 and whose update N²k). Each repetition fits n points, then times side by side
``update`` with k new ones and a ``fit`` on all n + k, and checks that their predictions agree; the median over
the repetitions is reported.

    python benchmarks/bench_update.py [--n 1500] [--k 10] [--outputs 1] [--reps 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1500)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--outputs", type=int, default=1)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--space", default="function", choices=("function", "parameter"))
    args = parser.parse_args()

    import numpy as np
    import torch
    from torch import nn

    import linadapt as la

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d, w, c = 8, args.width, args.outputs
    net = nn.Sequential(nn.Linear(d, w), nn.Tanh(), nn.Linear(w, w), nn.Tanh(), nn.Linear(w, c)).double()
    X = torch.randn(args.n + args.k, d, dtype=torch.float64)
    y = torch.sin(X[:, :3].sum(1, keepdim=True)).repeat(1, c) + 0.1 * torch.randn(args.n + args.k, c).double()
    Xs = torch.randn(20, d, dtype=torch.float64)
    kw = {
        "space": args.space,
        "solver": "cholesky",
        "prior_var": 0.5,
        "noise_var": 0.01,
        "optimize_hyperparameters": False,
        "memory_budget": "4GiB",
    }
    old, new = slice(0, args.n), slice(args.n, args.n + args.k)
    t_update, t_fit, t_first, gaps = [], [], [], []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        reg = la.LinearizedRegressor(net, **kw).fit(X[old], y[old])
        t_first.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        reg.update(X[new], y[new])
        t_update.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        full = la.LinearizedRegressor(net, **kw).fit(X, y)
        t_fit.append(time.perf_counter() - t0)
        a, b = reg.predict(Xs, return_std=True), full.predict(Xs, return_std=True)
        gaps.append(max(float(np.abs(u - v).max() / np.abs(v).max()) for u, v in zip(a, b)))
    upd, fit = statistics.median(t_update), statistics.median(t_fit)
    report = {
        "n": args.n,
        "k": args.k,
        "outputs": c,
        "p": sum(p.numel() for p in net.parameters()),
        "space": args.space,
        "threads": args.threads,
        "fit_n_s": round(statistics.median(t_first), 4),
        "update_s": round(upd, 4),
        "refit_s": round(fit, 4),
        "update_over_refit": round(upd / fit, 4),
        "max_relative_gap": max(gaps),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
