"""A regression with default settings on many points: the issue's MLP 8-256-256-1 (float32, 68k weights),
y = sin(Σx) + 0.1·noise, fit with ``LinearizedRegressor(net)`` and predict the mean (and, with ``--std``, the std)
at 1,000 test points; prints wall times, the peak resident memory and what the fit chose.

    python benchmarks/big_regression.py --n 16000            # fit + predictive mean
    python benchmarks/big_regression.py --n 4000 --std       # also the predictive std
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch import nn

import linadapt as la
from linadapt._memory import peak_rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=16000)
    parser.add_argument("--m", type=int, default=1000)
    parser.add_argument("--std", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("always", la.ConvergenceWarning)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 1))
    X = torch.randn(args.n, 8)
    y = torch.sin(X.sum(1)) + 0.1 * torch.randn(args.n)
    Xs = torch.randn(args.m, 8)
    ys = torch.sin(Xs.sum(1)) + 0.1 * torch.randn(args.m)
    t = time.perf_counter()
    reg = la.LinearizedRegressor(net).fit(X, y)
    print(
        f"n = {args.n}: fit {time.perf_counter() - t:.1f} s, peak {peak_rss() / 2**30:.2f} GiB, "
        f"{reg.space_}/{reg.solver_}, s² = {reg.prior_var_:.3g}, σ² = {reg.noise_var_:.3g}, {reg.solve_info_}",
        flush=True,
    )
    t = time.perf_counter()
    mean = torch.as_tensor(reg.predict(Xs))
    rmse = float((mean - ys).pow(2).mean().sqrt())
    print(f"predictive mean of {args.m} points: {time.perf_counter() - t:.2f} s, test RMSE {rmse:.3f}", flush=True)
    if args.std:
        t = time.perf_counter()
        mean, std = (torch.as_tensor(a) for a in reg.predict(Xs, return_std=True))
        seconds = time.perf_counter() - t
        basis = getattr(reg.posterior_, "_basis", None)
        how = f"Lanczos basis of {basis.size} vectors" if basis is not None else "no basis"
        nll = float(torch.distributions.Normal(mean, std).log_prob(ys).neg().mean())
        print(f"with std: {seconds:.1f} s ({how}), test NLL {nll:.3f}, peak {peak_rss() / 2**30:.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
