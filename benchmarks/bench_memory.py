"""Peak memory of a K·v and of a matrix-free regression fit at n = 20,000, p ≈ 1.1M (the J it never forms
would take n·p·8 bytes = 176 GB in float64).

Each measurement runs in a fresh subprocess and reports its peak resident memory (``ru_maxrss``), so the
figures include Python, torch and the data themselves. Network: MLP 100-1000-1000-1 (tanh, float32,
1,103,001 parameters); inputs N(0, I); targets a smooth function of the inputs plus noise.

    python benchmarks/bench_memory.py [--n 20000] [--threads 2]

Cases: ``baseline`` (import, build the network and the data, one forward+backward pass), ``kv-plain`` (one
K·v by torch.func products), ``kv-cached`` (build the cached per-layer factors, one K·v through them),
``fit`` (``LinearizedRegressor(solver="cg", space="function", cg_tol=1e-6)`` at fixed prior and noise variance
(1e-5, 1.0: a well-conditioned system, this measures memory), CG with
the pivoted-Cholesky preconditioner, and predictive standard deviations on 10 test points).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _case(name: str, n: int, threads: int) -> dict:
    import torch
    from torch import nn

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(100, 1000), nn.Tanh(), nn.Linear(1000, 1000), nn.Tanh(), nn.Linear(1000, 1))
    X = torch.randn(n, 100)
    y = torch.sin(X[:, :3].sum(1)) + 0.1 * torch.randn(n)
    params = list(net.parameters())
    t0 = time.perf_counter()
    torch.autograd.grad(net(X).sum(), params)
    unit = time.perf_counter() - t0
    info: dict = {"case": name, "n": n, "p": sum(p.numel() for p in params), "unit_s": unit}
    t0 = time.perf_counter()
    if name == "kv-plain":
        from linadapt import NTKOperator

        op = NTKOperator(net, X)
        op.apply_rows(torch.randn(1, n, dtype=torch.float64))
    elif name == "kv-cached":
        from linadapt.jacobian.linearization import Linearization
        from linadapt.jacobian.structured import factored_jacobian

        lin = Linearization(net)
        Xp = lin.prepare_inputs(X)
        fj = factored_jacobian(lin, Xp, budget=2**30)
        info["factors_mib"] = None if fj is None else fj.nbytes() / 2**20
        if fj is not None:
            fj.jvp(fj.vjp(torch.randn(1, n, 1, dtype=torch.float64)))
    elif name == "fit":
        import warnings

        from linadapt import LinearizedRegressor

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            settings = {"optimize_hyperparameters": False, "solver": "cg", "space": "function", "cg_tol": 1e-6}
            reg = LinearizedRegressor(net, prior_var=1e-5, noise_var=1.0, **settings).fit(X, y)
            reg.predict(torch.randn(10, 100), return_std=True)
        info["cg"] = None if reg.solve_info_ is None else str(reg.solve_info_)
        info["warnings"] = sorted({str(w.message)[:160] for w in caught if "jit.script" not in str(w.message)})
    info["seconds"] = time.perf_counter() - t0
    info["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(_case(args.case, args.n, args.threads)))
        return
    rows = []
    for case in ("baseline", "kv-plain", "kv-cached", "fit"):
        cmd = [sys.executable, __file__, "--case", case, "--n", str(args.n), "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr)
    r0 = rows[0]
    print(f"MLP 100-1000-1000-1, p = {r0['p']:,}, n = {r0['n']:,}, {args.threads} threads; peak resident memory")
    print(f"(a dense J would be {r0['n'] * r0['p'] * 8 / 1e9:.0f} GB in float64)")
    print()
    print("| case | peak memory (MiB) | seconds | ratio to one forward+backward pass |")
    print("|---|---|---|---|")
    for r in rows:
        timing = "— | —" if r["case"] == "baseline" else f"{r['seconds']:.1f} | {r['seconds'] / r['unit_s']:.1f}×"
        print(f"| {r['case']} | {r['peak_mib']:,.0f} | {timing} |")
    for r in rows:
        if r.get("cg") or r.get("warnings"):
            print(f"\n{r['case']}: CG {r.get('cg')}; warnings: {r.get('warnings')}")


if __name__ == "__main__":
    main()
