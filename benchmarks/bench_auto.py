"""Are the automatic choices right? ``space="auto"`` / ``solver="auto"`` against every fixed choice.

Grid: n ∈ {100, 1000, 10000} training points × p ≈ {10k, 100k, 1M} weights (MLP 32-h-h-1, tanh, h = 85, 300,
983), regression on a smooth target with noise, ``LinearizedRegressor`` with hyperparameter learning (the
default). Each configuration — auto, and (function | parameter) × (cholesky | cg) where the dense matrix fits
the memory budget — is fitted in its own process with a wall-clock limit; a configuration that exceeds it
counts as slower than the limit. The table gives auto's choice, its time, the best fixed choice and the ratio
auto / best (target ≤ 1.3). Times on this 2-core machine are noisy (±30 %); the ratio is what matters.

    python benchmarks/bench_auto.py [--n 100 1000 10000] [--p 10k 100k 1M] [--timeout 300] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

WIDTHS = {"10k": 85, "100k": 300, "1M": 983}
CONFIGS = ("auto", "function/cholesky", "function/cg", "parameter/cholesky", "parameter/cg")


def _fit(n: int, width: int, config: str, threads: int) -> dict:
    import torch
    from torch import nn

    from linadapt import LinearizedRegressor

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1))
    X = torch.randn(n, 32)
    y = torch.sin(X[:, :4].sum(1)) + 0.1 * torch.randn(n)
    space, solver = ("auto", "auto") if config == "auto" else config.split("/")
    t0 = time.perf_counter()
    reg = LinearizedRegressor(net, space=space, solver=solver).fit(X, y)
    reg.predict(X[:10], return_std=True)
    seconds = time.perf_counter() - t0
    p = sum(q.numel() for q in net.parameters())
    return {"seconds": seconds, "space": reg.space_, "solver": reg.solver_, "p": p}


def _run(n: int, width: int, config: str, threads: int, timeout: float) -> dict | None:
    code = "import json, sys; sys.path.insert(0, 'benchmarks'); from bench_auto import _fit; "
    code += "print(json.dumps(_fit(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))))"
    try:
        out = subprocess.run(
            [sys.executable, "-c", code, str(n), str(width), config, str(threads)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cell(result: dict | None, timeout: float) -> str:
    if result is None:
        return f"> {timeout:.0f}"
    return "error" if "error" in result else f"{result['seconds']:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--p", nargs="+", default=list(WIDTHS), choices=list(WIDTHS))
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(
        f"regression fit with hyperparameter learning + 10 predictive stds, {args.threads} threads, limit "
        f"{args.timeout:.0f} s per configuration"
    )
    print()
    print("| n | p | auto picks | auto (s) | best fixed | best (s) | auto / best | all fixed (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.n:
        for tag in args.p:
            results = {cfg: _run(n, WIDTHS[tag], cfg, args.threads, args.timeout) for cfg in CONFIGS}
            auto = results["auto"]
            fixed = {k: v for k, v in results.items() if k != "auto" and v is not None and "seconds" in v}
            cells = ", ".join(f"{k} {_cell(v, args.timeout)}" for k, v in results.items() if k != "auto")
            if auto is None or "seconds" not in auto or not fixed:
                print(
                    f"| {n} | {tag} | — | {'timeout' if auto is None else 'error'} | — | — | — | {cells} |", flush=True
                )
                continue
            best = min(fixed, key=lambda k: fixed[k]["seconds"])
            ratio = auto["seconds"] / fixed[best]["seconds"]
            print(
                f"| {n} | {auto['p']:,} | {auto['space']}/{auto['solver']} | {auto['seconds']:.1f} | {best} | "
                f"{fixed[best]['seconds']:.1f} | {ratio:.2f} | {cells} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
