"""One rank of the data-parallel tests (run by tests/test_distributed.py as separate processes).

    python tests/dist_worker.py RANK WORLD PORT OUT_DIR [MODE]

Joins a gloo process group on 127.0.0.1:PORT, fits every case of :data:`CASES` on its shard with
``distributed=True`` and writes predictions and communication counts to OUT_DIR/rank{RANK}.pt.
MODE ``fit`` (default): every case; ``fit-cg``: the matrix-free cases only;
``bad-shard``: the last rank passes a shard containing NaN (every rank must fail with the same error);
MODE ``empty-shard``: the last rank passes no examples;
``exit``: the regressor and the classifier in both spaces with fixed and learned hyperparameters (Cholesky),
then ``destroy_process_group``, after which no thread of the process group may be left (exit 5 otherwise);
``update``: every case of :data:`CASES` at fixed hyperparameters fitted on this rank's shard of the training data
and then updated twice with its shares of :func:`new_data` (plus one search of the hyperparameters again, one
save, and an empty update on the last rank, which every rank must refuse).
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta

import torch
from torch import nn

CASES = [
    (kind, space, solver)
    for kind in ("regression", "classification")
    for space in ("function", "parameter")
    for solver in ("cholesky", "cg")
]


def make_model(kind: str) -> nn.Module:
    """A float64 3-12-(2|3) tanh MLP with fixed weights (same on every rank)."""
    torch.manual_seed(0)
    out = 2 if kind == "regression" else 3
    return nn.Sequential(nn.Linear(3, 12), nn.Tanh(), nn.Linear(12, out)).double()


def _targets(kind: str, X: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Noisy regression targets (n, 2), or labels in 0 … 2, for inputs X."""
    if kind == "regression":
        y = torch.stack([torch.sin(X[:, 0]) + 0.5 * X[:, 1], torch.cos(X[:, 2])], 1)
        return y + 0.3 * torch.randn(y.shape, generator=gen, dtype=torch.float64)
    return (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()


def make_data(kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training inputs / targets (n = 29) and test inputs (m = 7), deterministic."""
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(29, 3, generator=gen, dtype=torch.float64)
    Xs = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    return X, _targets(kind, X, gen), Xs


def new_data(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Examples for ``update`` (n = 13), from the same distribution as :func:`make_data`'s."""
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(13, 3, generator=gen, dtype=torch.float64)
    return X, _targets(kind, X, gen)


# the update batches: new examples 0–6 then 7–12, each split across the ranks by shard_bounds
UPDATE_BATCHES = [(0, 7), (7, 13)]
FIXED = {"regression": {"prior_var": 0.7, "noise_var": 0.09}, "classification": {"prior_var": 0.8}}


def shard_bounds(n: int, world: int) -> list[tuple[int, int]]:
    """Uneven contiguous shards; the last rank gets only 2 examples."""
    if world == 1:
        return [(0, n)]
    sizes = [2] * world
    rest = n - 2 * world
    weights = list(range(world - 1, 0, -1))  # decreasing shares for ranks 0 … world-2
    for r in range(world - 1):
        sizes[r] += rest * weights[r] // sum(weights)
    sizes[0] += n - sum(sizes)
    starts = [sum(sizes[:r]) for r in range(world)]
    return [(s, s + k) for s, k in zip(starts, sizes)]


def estimator(kind: str, space: str, solver: str, distributed: bool, optimize: bool = True, **kw):
    from linadapt import LinearizedClassifier, LinearizedRegressor

    cls = LinearizedRegressor if kind == "regression" else LinearizedClassifier
    # the classifier's default link="auto": the leave-one-out choice over all ranks' training points
    return cls(
        make_model(kind), space=space, solver=solver, distributed=distributed, optimize_hyperparameters=optimize, **kw
    )


def update_key(kind: str, space: str, solver: str) -> str:
    return f"update-{kind}-{space}-{solver}"


def fit_then_update(rank: int, world: int, out: str) -> dict[str, dict[str, torch.Tensor]]:
    """Mode ``update`` (see the module docstring); the results by :func:`update_key`, plus ``"search"`` (one update
    with ``optimize_hyperparameters=True``) and ``"empty"`` (the error message of the empty update, as a tensor of
    its bytes)."""
    from linadapt import DistributedError

    results: dict[str, dict[str, torch.Tensor]] = {}
    for kind, space, solver in CASES:
        X, y, Xs = make_data(kind)
        Xn, yn = new_data(kind)
        lo, hi = shard_bounds(X.shape[0], world)[rank]
        est = estimator(kind, space, solver, distributed=True, optimize=False, **FIXED[kind]).fit(X[lo:hi], y[lo:hi])
        for a, b in UPDATE_BATCHES:
            lo, hi = shard_bounds(b - a, world)[rank]
            est.update(Xn[a + lo : a + hi], yn[a + lo : a + hi])
        results[update_key(kind, space, solver)] = predictions(est, Xs)
        if (kind, space, solver) == ("regression", "function", "cholesky"):
            est.save(f"{out}/updated.linadapt")  # every rank calls save; rank 0 writes
        if (kind, space, solver) == ("classification", "function", "cholesky"):
            try:
                est.update(Xn[:0] if rank == world - 1 else Xn[:1], yn[:0] if rank == world - 1 else yn[:1])
            except DistributedError as exc:
                results["empty"] = {"message": torch.tensor(list(str(exc).encode()))}
    X, y, Xs = make_data("regression")
    Xn, yn = new_data("regression")
    lo, hi = shard_bounds(X.shape[0], world)[rank]
    est = estimator("regression", "function", "cholesky", distributed=True).fit(X[lo:hi], y[lo:hi])
    lo, hi = shard_bounds(Xn.shape[0], world)[rank]
    est.update(Xn[lo:hi], yn[lo:hi], optimize_hyperparameters=True)
    results["search"] = predictions(est, Xs)
    return results


def case_key(kind: str, space: str, solver: str, optimize: bool) -> str:
    return f"{kind}-{space}-{solver}" + ("" if optimize else "-fixed")


def predictions(est, Xs: torch.Tensor) -> dict[str, torch.Tensor]:
    if hasattr(est, "predict_proba"):
        mean, cov = est.predict_logits(Xs)
        return {
            "mean": torch.as_tensor(mean),
            "cov": torch.as_tensor(cov),
            "proba": torch.as_tensor(est.predict_proba(Xs)),
            "prior_var": torch.tensor(est.prior_var_),
            "evidence": torch.tensor(est.log_marginal_likelihood()),
            "loo_nll": torch.tensor([v for _, v in sorted(est.loo_nll_.items())]),
        }
    mean, std = est.predict(Xs, return_std=True)
    return {
        "mean": torch.as_tensor(mean),
        "std": torch.as_tensor(std),
        "prior_var": torch.tensor(est.prior_var_),
        "noise_var": torch.tensor(est.noise_var_),
        "evidence": torch.tensor(est.log_marginal_likelihood()),
    }


EXIT_CASES = [
    (kind, space, optimize)
    for kind in ("regression", "classification")
    for space in ("function", "parameter")
    for optimize in (True, False)
]


def threads() -> int:
    """This process's threads (Linux; 0 elsewhere)."""
    return len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 0


def fit_then_exit(rank: int, world: int) -> None:
    """Mode ``exit``: every fit of :data:`EXIT_CASES` on this rank's shard, one prediction each."""
    for kind, space, optimize in EXIT_CASES:
        X, y, Xs = make_data(kind)
        lo, hi = shard_bounds(X.shape[0], world)[rank]
        est = estimator(kind, space, "cholesky", distributed=True, optimize=optimize).fit(X[lo:hi], y[lo:hi])
        predictions(est, Xs)


def main() -> None:
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    mode = sys.argv[5] if len(sys.argv) > 5 else "fit"
    import torch.distributed as dist

    threads_before = threads()
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    results: dict[str, dict[str, torch.Tensor]] = {}
    try:
        if mode == "exit":
            fit_then_exit(rank, world)
            return
        if mode == "update":
            torch.save(fit_then_update(rank, world, out), f"{out}/rank{rank}.pt")
            return
        cases = {"fit": CASES, "fit-cg": [c for c in CASES if c[2] == "cg"]}.get(mode, CASES[:1])
        for kind, space, solver in cases:
            X, y, Xs = make_data(kind)
            lo, hi = shard_bounds(X.shape[0], world)[rank]
            Xr, yr = X[lo:hi], y[lo:hi]
            if mode == "bad-shard" and rank == world - 1:
                Xr = Xr.clone()
                Xr[0, 0] = float("nan")
            if mode == "empty-shard" and rank == world - 1:
                Xr, yr = Xr[:0], yr[:0]
            # fit-cg: the classifier at a fixed prior variance (its search costs ~2,500 all-reduces, slow when
            # 3 processes share 2 cores; the 2-process run covers the search)
            optimize = not (mode == "fit-cg" and kind == "classification")
            est = estimator(kind, space, solver, distributed=True, optimize=optimize)
            t0 = time.perf_counter()
            est.fit(Xr, yr)
            if rank == 0:
                print(
                    f"{kind}-{space}-{solver}: fit {time.perf_counter() - t0:.1f}s, "
                    f"{est._sharding.stats.all_reduce_calls} all-reduces",
                    file=sys.stderr,
                    flush=True,
                )
            sharding_stats = est._sharding.stats
            key = case_key(kind, space, solver, optimize)
            results[key] = predictions(est, Xs)
            results[key]["space"] = torch.tensor(est.space_ == "function")
            results[key]["all_reduce_elements"] = torch.tensor(sharding_stats.all_reduce_elements)
            results[key]["all_reduce_calls"] = torch.tensor(sharding_stats.all_reduce_calls)
            # one K·v (function space) / one JᵀJ·v (parameter space) product, alone
            problem = est.problem_
            sharding_stats.reset()
            if space == "function":
                problem.k_matmul(torch.ones(problem.n_obs, 1, dtype=torch.float64))
            else:
                problem.vjp(problem.jvp(torch.ones(1, problem.p, dtype=torch.float64)))
            results[key]["product_elements"] = torch.tensor(sharding_stats.all_reduce_elements)
        torch.save(results, f"{out}/rank{rank}.pt")
    except Exception as exc:  # the test reads the message from stderr
        print(f"rank {rank} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        sys.exit(3)
    finally:
        dist.destroy_process_group()
        # the backend (gloo's worker and I/O threads, the store's) must be gone now, not at interpreter exit
        if mode == "exit" and threads() > threads_before:
            print(
                f"rank {rank}: {threads() - threads_before} threads left after destroy_process_group", file=sys.stderr
            )
            sys.exit(5)


if __name__ == "__main__":
    main()
