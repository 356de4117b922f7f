"""Fits whose solver products go through the retained autograd graph, against the same fits with torch.func
products (vjp, then a jvp that recomputes the primal pass) — side by side in one run, with the predictions
compared.

The graph is the solvers' path when the per-layer factors do not apply or fit. Two cases where they do not:

* a 100-class classifier (MLP 64-256-256-100, ReLU, float32): building factors would cost 100 backward passes
  per chunk, so they are declined above 32 outputs; ``LinearizedClassifier(space="function",
  solver="cg")`` at fixed prior variance (Newton-CG and its predictive variances, all matrix-free);
* a ResNet-style CNN (conv-BatchNorm-ReLU stem, a residual block with BatchNorm, global pooling, 10-way
  head, float32) whose factors are made not to fit (the budget is set to 0 for the factors only), so the
  regression fit ``LinearizedRegressor(solver="cg", space="function")`` uses the graph.

    python benchmarks/bench_graph_products.py [--n 512] [--reps 3] [--threads 2] [--only classifier|regressor]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from unittest import mock

import numpy as np
import torch
from torch import nn

import linadapt as la
import linadapt.jacobian.graph as gc


def mlp100() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 100))


class Block(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(ch, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch)
        self.c2, self.b2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


def resnet() -> nn.Module:
    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        Block(16),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    with torch.no_grad():  # non-trivial running statistics, as after training
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def _no_graph(*args, **kwargs):
    return None


def timed_fit(make, graph: bool, factors_budget_zero: bool = False):
    patches = []
    if not graph:
        patches.append(mock.patch.object(gc, "graph_jacobian", _no_graph))
    if factors_budget_zero:
        import linadapt.jacobian.structured as st

        real = st.factored_jacobian
        patches.append(mock.patch.object(st, "factored_jacobian", lambda lin, X, budget, **kw: real(lin, X, 0, **kw)))
    for p in patches:
        p.start()
    try:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est, out = make()
        return time.perf_counter() - t0, est, out
    finally:
        for p in patches:
            p.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=("classifier", "regressor"), default=None, help="run one of the two fits")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n = args.n

    net = mlp100()
    X = torch.randn(n, 64)
    y = torch.randint(0, 100, (n,))
    Xs = torch.randn(4, 64)

    def classifier():
        clf = la.LinearizedClassifier(
            net, space="function", solver="cg", prior_var=0.05, optimize_hyperparameters=False, cg_tol=1e-8
        )
        clf.fit(X, y)
        return clf, clf.predict_proba(Xs)

    cnn = resnet()
    Xc = torch.randn(n, 1, 8, 8)
    Yc = torch.randn(n, 10)
    Xcs = torch.randn(8, 1, 8, 8)

    def regressor():
        reg = la.LinearizedRegressor(
            cnn, space="function", solver="cg", prior_var=0.1, noise_var=0.1, optimize_hyperparameters=False
        )
        reg.fit(Xc, Yc)
        return reg, reg.predict(Xcs, return_std=True)

    print(f"n = {n}, {args.threads} threads, medians of {args.reps} interleaved repetitions")
    print()
    print("| fit | products | seconds (graph) | seconds (torch.func) | speed-up | max abs. difference of predictions |")
    print("|---|---|---|---|---|---|")
    cases = (
        ("classifier", "LinearizedClassifier, MLP 64-256-256-100, Newton-CG + predict_proba", classifier, False),
        ("regressor", "LinearizedRegressor, ResNet-style CNN with BatchNorm, CG + predictive std", regressor, True),
    )
    for key, label, make, zero in cases:
        if args.only not in (None, key):
            continue
        times = {True: [], False: []}
        outs = {}
        kinds = {}
        for _ in range(args.reps):
            for graph in (True, False):
                t, est, out = timed_fit(make, graph, zero)
                times[graph].append(t)
                outs[graph] = out
                kinds[graph] = type(est.problem_.factored()).__name__
        a, b = statistics.median(times[True]), statistics.median(times[False])
        if isinstance(outs[True], tuple):
            diff = max(float(np.abs(np.asarray(u) - np.asarray(v)).max()) for u, v in zip(outs[True], outs[False]))
        else:
            diff = float(np.abs(np.asarray(outs[True]) - np.asarray(outs[False])).max())
        print(f"| {label} | {kinds[True]} vs {kinds[False]} | {a:.2f} | {b:.2f} | {b / a:.2f}× | {diff:.1e} |")


if __name__ == "__main__":
    main()
