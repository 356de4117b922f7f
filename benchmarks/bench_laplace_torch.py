"""linadapt against laplace-torch's FunctionalLaplace on the same regression (time ratio and test NLL).

Task: a 1-50-50-1 tanh network trained by Adam (2,000 full-batch steps, seeded) on 200 noisy points of
y = sin(2x) + 0.1·ε, x ~ U[-3, 3]; 500 test points from the same distribution. Both methods take the
trained network and learn the prior and the noise variance by marginal likelihood:

* linadapt: ``LinearizedRegressor(net)`` (prior centred at the trained weights) and
  ``LinearizedRegressor(net, prior_mean="zero")`` (θ ~ N(0, s² I), the prior laplace-torch uses); evidence
  maximised by L-BFGS (``hyperprior=None``: type-II maximum likelihood, as laplace-torch's; the estimator's
  default adds a prior on the noise); dense function space at this size;
* laplace-torch: ``FunctionalLaplace`` (the NTK-kernel GP of the linearized network, all 200 points as
  its subset), then 100 Adam steps (lr 0.1) on log prior precision and log noise std of its marginal
  likelihood — the recipe of its documentation.

Times are wall-clock medians of ``--reps`` alternating runs, reported as a ratio; the NLL is the test
Gaussian negative log likelihood per point with the learned noise.

    python benchmarks/bench_laplace_torch.py [--seeds 5] [--reps 3] [--threads 2]

Needs laplace-torch (installed by `make setup` where possible); exits with a message without it.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings

import numpy as np
import torch
from torch import nn

import linadapt as la


def task(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(700, 1, generator=g) * 6 - 3
    y = torch.sin(2 * x) + 0.1 * torch.randn(700, 1, generator=g)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(1, 50), nn.Tanh(), nn.Linear(50, 50), nn.Tanh(), nn.Linear(50, 1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(2000):
        opt.zero_grad()
        loss = ((net(x[:200]) - y[:200]) ** 2).mean()
        loss.backward()
        opt.step()
    return net, x[:200], y[:200], x[200:], y[200:]


def gaussian_nll(mean: np.ndarray, var: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(0.5 * np.log(2 * math.pi * var) + 0.5 * (y - mean) ** 2 / var))


def run_linadapt(net, X, y, Xt, yt, prior_mean: str = "network", prior_groups: str | None = None):
    t0 = time.perf_counter()
    reg = la.LinearizedRegressor(net, prior_mean=prior_mean, prior_groups=prior_groups, hyperprior=None)
    reg.fit(X, y[:, 0])
    seconds = time.perf_counter() - t0
    mean, std = reg.predict(Xt, return_std=True)  # std of y: includes the learned noise
    var = std**2
    return seconds, float(np.sqrt(np.mean((mean - yt[:, 0].numpy()) ** 2))), gaussian_nll(mean, var, yt[:, 0].numpy())


def run_laplace_torch(net, X, y, Xt, yt):
    from laplace import FunctionalLaplace
    from laplace.curvature import BackPackGGN

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=200)
    t0 = time.perf_counter()
    lap = FunctionalLaplace(net, "regression", n_subset=200, backend=BackPackGGN)
    lap.fit(loader)
    log_prior, log_sigma = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([log_prior, log_sigma], lr=0.1)
    for _ in range(100):
        opt.zero_grad()
        (-lap.log_marginal_likelihood(log_prior.exp(), log_sigma.exp())).backward()
        opt.step()
    seconds = time.perf_counter() - t0
    f_mu, f_var = lap(Xt, pred_type="gp")
    mean = f_mu.detach()[:, 0].numpy()
    var = f_var.detach().reshape(-1).numpy() + float(lap.sigma_noise) ** 2
    return seconds, float(np.sqrt(np.mean((mean - yt[:, 0].numpy()) ** 2))), gaussian_nll(mean, var, yt[:, 0].numpy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    try:
        import laplace  # noqa: F401
    except ImportError:
        sys.exit("laplace-torch is not installed: pip install --no-deps laplace-torch==0.3 (see the Makefile)")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    names = {
        "network": "linadapt LinearizedRegressor (prior at the trained weights)",
        "zero": "linadapt LinearizedRegressor(prior_mean='zero') (weight-decay prior)",
        "layers": "linadapt LinearizedRegressor(prior_groups='layers') (a prior variance per layer)",
        "laplace": "laplace-torch FunctionalLaplace + marglik Adam",
    }
    # per seed (new data, new network): median time over reps, and the test RMSE / NLL
    per_seed: dict[str, list[tuple[float, float, float]]] = {k: [] for k in names}
    for seed in range(args.seeds):
        net, X, y, Xt, yt = task(seed)
        runs: dict[str, list] = {k: [] for k in names}
        for _ in range(args.reps):
            runs["network"].append(run_linadapt(net, X, y, Xt, yt, "network"))
            runs["zero"].append(run_linadapt(net, X, y, Xt, yt, "zero"))
            runs["layers"].append(run_linadapt(net, X, y, Xt, yt, "network", "layers"))
            runs["laplace"].append(run_laplace_torch(net, X, y, Xt, yt))
        for k, v in runs.items():
            per_seed[k].append((statistics.median(r[0] for r in v), v[-1][1], v[-1][2]))
    print(
        f"1-50-50-1 tanh regression, 200 training points, 500 test points, {args.threads} threads; "
        f"{args.seeds} seeds (mean ± std), each timed as the median of {args.reps} alternating runs"
    )
    print("speed ratio: laplace-torch's fit time / this method's, per seed")
    print()
    print("| method | fit with hyperparameter learning (s) | laplace-torch slower by | test RMSE | test NLL |")
    print("|---|---|---|---|---|")
    lap_t = np.array([r[0] for r in per_seed["laplace"]])
    for key, name in names.items():
        arr = np.array(per_seed[key])
        ratio = lap_t / arr[:, 0]
        rmse = f"{arr[:, 1].mean():.4f} ± {arr[:, 1].std():.4f}"
        nll = f"{arr[:, 2].mean():.4f} ± {arr[:, 2].std():.4f}"
        print(f"| {name} | {arr[:, 0].mean():.3f} | {ratio.mean():.1f}× | {rmse} | {nll} |")
    lap_nll = np.array([r[2] for r in per_seed["laplace"]])
    print()
    print("paired test-NLL difference to laplace-torch, per seed (negative: linadapt better)")
    for key, name in names.items():
        if key != "laplace":
            d = np.array([r[2] for r in per_seed[key]]) - lap_nll
            err = d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
            better = int((d < 0).sum())
            print(f"  {name}: {d.mean():+.4f} ± {err:.4f} (standard error), better on {better} of {len(d)} seeds")


if __name__ == "__main__":
    main()
