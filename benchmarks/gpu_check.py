"""The prepared GPU check (run it when a GPU is lent; ≤ 5 minutes on one H200-class device).

1. CUDA correctness on small models: everything computed on the device against the same computation on the
   CPU — the dense NTK (structured and Jacobian contraction), K·v by torch.func and by the cached factors,
   the regression fit and predictive (function-space Cholesky, function-space CG, parameter-space CG) and the
   classifier's probabilities — float32 networks, float64 algebra; relative differences are printed and
   checked (≤ 1e-5).
2. The speed table at n = 100,000 points, p ≈ 800,000 weights (MLP 32-880-880-1, tanh, float32): one
   forward+backward pass, one K·v (torch.func, cached factors), and a matrix-free regression fit at fixed
   prior and noise variance (CG, tol 1e-6) in function space and in parameter space, each with its CG
   iterations; for reference, the paper's PyTorch code took 320 s (function space) and 90 s (parameter space)
   on a GPU for this size.

    python benchmarks/gpu_check.py [--device cuda] [--n 100000] [--width 880]
    python benchmarks/gpu_check.py --device cpu --n 2000 --width 64     # a dry run of the script itself
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch import nn


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = torch.as_tensor(a).double().cpu(), torch.as_tensor(b).double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _factors_by_convolution(lin, X, budget):
    """Cached factors with every convolution held for products by convolution (cuDNN's conv2d and its
    weight gradient), whatever the cost model would pick for these small layers."""
    from linadapt.jacobian import structured
    from linadapt.jacobian.structured import costs

    keep, engine = costs.conv_forms, None
    costs.conv_forms = lambda *_: (True, False)
    try:
        engine = lin.structured(X)
        if engine is not None:
            engine._conv_forms.clear()
        return structured.factored_jacobian(lin, X, budget=budget)
    finally:
        costs.conv_forms = keep
        if engine is not None:
            engine._conv_forms.clear()


def correctness(device: str) -> list[tuple[str, float]]:
    from linadapt import LinearizedClassifier, LinearizedRegressor, NTKOperator, ntk_gram
    from linadapt.jacobian.graph import graph_jacobian
    from linadapt.jacobian.structured import factored_jacobian

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))
    cnn = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(288, 3)
    )
    X_mlp, X_cnn = torch.randn(40, 6), torch.randn(40, 1, 8, 8)
    checks: list[tuple[str, float]] = []
    for name, net, X in (("mlp", mlp, X_mlp), ("cnn", cnn, X_cnn)):
        gpu_net = net.to(device)
        Xd = X.to(device)
        K_cpu = ntk_gram(net.cpu(), X)
        gpu_net = net.to(device)
        checks.append((f"{name}: structured NTK", _rel(ntk_gram(gpu_net, Xd), K_cpu)))
        checks.append((f"{name}: Jacobian-contraction NTK", _rel(ntk_gram(gpu_net, Xd, method="jacobian"), K_cpu)))
        V = torch.randn(2, X.shape[0] * 3, dtype=torch.float64)
        kv_cpu = NTKOperator(net.cpu(), X).apply_rows(V)
        gpu_net = net.to(device)
        op = NTKOperator(gpu_net, Xd, hold=False)
        checks.append((f"{name}: K·v torch.func", _rel(op.apply_rows(V.to(device)), kv_cpu)))
        for label, build in (
            ("cached factors", factored_jacobian),
            ("cached factors, convolutions by convolution", _factors_by_convolution),
            ("retained graph", graph_jacobian),
        ):
            held = build(op.linearization, op.X1, budget=2**30)
            if held is not None:
                kv = held.jvp(held.vjp(V.to(device).reshape(2, X.shape[0], 3))).reshape(2, -1)
                checks.append((f"{name}: K·v {label}", _rel(kv, kv_cpu)))
    torch.manual_seed(1)
    reg_net = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 1))
    y = torch.sin(X_mlp[:, 0]) + 0.1 * torch.randn(40)
    Xt = torch.randn(7, 6)
    for space, solver in (("function", "cholesky"), ("function", "cg"), ("parameter", "cg")):
        kw = {"space": space, "solver": solver, "prior_var": 0.5, "noise_var": 0.05, "optimize_hyperparameters": False}
        ref = LinearizedRegressor(reg_net.cpu(), **kw).fit(X_mlp, y).predict(Xt, return_std=True)
        dev = LinearizedRegressor(reg_net.to(device), **kw).fit(X_mlp.to(device), y.to(device))
        got = dev.predict(Xt.to(device), return_std=True)
        checks.append((f"regressor {space}/{solver}: mean", _rel(got[0], ref[0])))
        checks.append((f"regressor {space}/{solver}: std", _rel(got[1], ref[1])))
    labels = (X_mlp[:, 0] > 0).long() + (X_mlp[:, 1] > 0).long()
    ref = LinearizedClassifier(mlp.cpu()).fit(X_mlp, labels).predict_proba(Xt)
    got = LinearizedClassifier(mlp.to(device)).fit(X_mlp.to(device), labels.to(device)).predict_proba(Xt.to(device))
    checks.append(("classifier probabilities", _rel(got, ref)))
    return checks


def speed(device: str, n: int, width: int) -> list[tuple[str, float, str]]:
    from linadapt import LinearizedRegressor, NTKOperator
    from linadapt.jacobian.graph import graph_jacobian
    from linadapt.jacobian.structured import factored_jacobian

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1))
    net = net.to(device)
    p = sum(q.numel() for q in net.parameters())
    X = torch.randn(n, 32, device=device)
    y = torch.sin(X[:, :4].sum(1)) + 0.1 * torch.randn(n, device=device)
    rows: list[tuple[str, float, str]] = []

    def timed(fn):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        return time.perf_counter() - t0, out

    params = list(net.parameters())
    timed(lambda: torch.autograd.grad(net(X).sum(), params))
    unit, _ = timed(lambda: torch.autograd.grad(net(X).sum(), params))
    rows.append((f"forward+backward, n = {n:,}, p = {p:,}", unit, "1×"))
    op = NTKOperator(net, X, hold=False)
    v = torch.randn(1, n, dtype=torch.float64, device=device)
    op.apply_rows(v)
    t, _ = timed(lambda: op.apply_rows(v))
    rows.append(("one K·v, torch.func", t, f"{t / unit:.2f}×"))
    held_kinds = (
        ("building the cached factors", "one K·v, cached factors", factored_jacobian),
        ("keeping the autograd graph", "one K·v, retained graph", graph_jacobian),
    )
    for build_label, product_label, build in held_kinds:
        t_build, held = timed(lambda build=build: build(op.linearization, op.X1, budget=2**33))
        if held is not None:
            rows.append((build_label, t_build, f"{t_build / unit:.2f}×"))
            held.jvp(held.vjp(v.reshape(1, n, 1)))
            t, _ = timed(lambda held=held: held.jvp(held.vjp(v.reshape(1, n, 1))))
            rows.append((product_label, t, f"{t / unit:.2f}×"))
        held = None  # free one before building the next
    for space in ("function", "parameter"):
        reg = LinearizedRegressor(
            net, space=space, solver="cg", prior_var=1e-4, noise_var=0.05, optimize_hyperparameters=False, cg_tol=1e-6
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t, reg = timed(lambda reg=reg: reg.fit(X, y))
        info = reg.solve_info_
        rows.append((f"regression fit, {space} space, CG (tol 1e-6)", t, f"{t / unit:.0f}×; {info}"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--width", type=int, default=880)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here (use --device cpu for a dry run)")
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device: {name}, torch {torch.__version__}")
    print()
    print("| correctness check (device vs CPU) | max relative difference |")
    print("|---|---|")
    worst = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny CG systems may fall back to Cholesky: same on both devices
        checks = correctness(args.device)
    for what, rel in checks:
        worst = max(worst, rel)
        print(f"| {what} | {rel:.1e} |", flush=True)
    print()
    print("| step | seconds | ratio to forward+backward |")
    print("|---|---|---|")
    for what, seconds, ratio in speed(args.device, args.n, args.width):
        print(f"| {what} | {seconds:.2f} | {ratio} |", flush=True)
    if worst > 1e-5:
        raise SystemExit(f"device results differ from the CPU's by up to {worst:.1e}")


if __name__ == "__main__":
    main()
