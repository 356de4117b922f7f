"""Data-parallel scaling: one K·v and one regression fit on 1, 2, … processes (gloo on this machine).

    python benchmarks/bench_distributed.py [--worlds 1 2] [--n 2048] [--reps 7] [--threads-per-process 1]

Model: MLP 64-256-256-1 (ReLU, 82,945 parameters), float32 network, n inputs in total, split evenly over the
processes. For each world size it reports the median time of one K·v = J (Jᵀ v) over all n examples, the
time of a ``LinearizedRegressor(solver="cg", optimize_hyperparameters=False)`` fit (a preconditioned CG
solve in function space), and what the collectives moved per product (float64 elements and bytes
all-reduced per rank): one p-vector (the vjp) plus one N-vector (the jvp rows), O(p + N), never O(N·p).

On a 2-core machine the point is correctness and communication volume, not speed-up: each process gets
``--threads-per-process`` torch threads, and times are ratios to the 1-process run of the same script.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.multiprocessing as mp
from torch import nn


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1))


def _data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(n, 64, generator=gen)
    y = torch.sin(X[:, 0]) + 0.1 * torch.randn(n, generator=gen)
    return X, y


def _worker(rank: int, world: int, port: int, n: int, reps: int, threads: int, out: str) -> None:
    import torch.distributed as dist

    from linadapt import LinearizedRegressor

    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    X, y = _data(n)
    lo, hi = n * rank // world, n * (rank + 1) // world
    est = LinearizedRegressor(
        _model(),
        solver="cg",
        space="function",
        optimize_hyperparameters=False,
        noise_var=0.01,
        cg_tol=1e-6,
        distributed=world > 1,
    )
    t0 = time.perf_counter()
    est.fit(X[lo:hi], y[lo:hi])
    fit_s = time.perf_counter() - t0
    problem = est.problem_
    v = torch.randn(problem.n_obs, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    stats = est._sharding.stats if world > 1 else None
    times = []
    for _ in range(reps):
        if world > 1:
            dist.barrier()
            stats.reset()
        t0 = time.perf_counter()
        problem.k_matmul(v)
        times.append(time.perf_counter() - t0)
    if rank == 0:
        row = {
            "world": world,
            "kv_s": statistics.median(times),
            "fit_s": fit_s,
            "p": problem.p,
            "N": problem.n_obs,
            "cg_products": est.solve_info_.iterations if est.solve_info_ else None,
            "elements_per_product": stats.all_reduce_elements if stats else 0,
            "bytes_per_product": stats.all_reduce_bytes if stats else 0,
            "calls_per_product": stats.all_reduce_calls if stats else 0,
        }
        with open(out, "w") as fh:
            json.dump(row, fh)
    if world > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(worlds: list[int], n: int, reps: int, threads: int) -> list[dict]:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in worlds:
            out = os.path.join(tmp, f"w{world}.json")
            mp.spawn(_worker, args=(world, _free_port(), n, reps, threads, out), nprocs=world, join=True)
            with open(out) as fh:
                rows.append(json.load(fh))
    return rows


def format_table(rows: list[dict]) -> str:
    base = rows[0]
    lines = [
        f"MLP 64-256-256-1, p = {base['p']:,}, N = {base['N']:,} outputs in total (medians; ratios to world 1)",
        "",
        "| processes | K·v time ratio | fit time ratio | CG products | all-reduces per K·v | floats per K·v "
        "| bytes per K·v | p + N |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['world']} | {r['kv_s'] / base['kv_s']:.2f} | {r['fit_s'] / base['fit_s']:.2f} | "
            f"{r['cg_products']} | {r['calls_per_product']} | {r['elements_per_product']:,} | "
            f"{r['bytes_per_product']:,} | {r['p'] + r['N']:,} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads-per-process", type=int, default=1)
    args = parser.parse_args()
    print(format_table(run(args.worlds, args.n, args.reps, args.threads_per_process)))


if __name__ == "__main__":
    main()
