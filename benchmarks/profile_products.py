"""Where the time of a cached-factor product goes, for the MLP of the performance issue (64-256-256-10 ReLU):

1. the multiply-adds of one forward+backward pass against those of one K·v through the cached factors
   (per vector; counted from the layer shapes: the floor of any product that forms J V and Jᵀ U);
2. this machine's float32 matrix-product rates at the pass's shapes and at the shapes of a 16-vector
   product (GMAC/s, median of repetitions), and the float64 rate of the CNN's dense-kernel Gram;
3. the pass against its own matrix products run alone (how much of the pass is matrix products);
4. a torch.profiler table of one K·v with k vectors (default 16), grouped by operator and input shapes.

    python benchmarks/profile_products.py [--n 1024] [--k 16] [--threads 2] [--rows 20]

Rates and times on a shared 2-core machine vary by ±10–30 % run to run; read them as a breakdown, not as a
benchmark (``bench_cached_products.py`` gives the ratios).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from linadapt import Linearization
from linadapt.app.bench import _unit, interleaved_medians, mlp
from linadapt.jacobian.structured import factored_jacobian


def _macs(model: nn.Module, f, n: int) -> tuple[int, int]:
    """(multiply-adds of one forward+backward pass, of one K·v through the factors per vector), Linear layers
    only: the pass is 3 products per layer (forward, weight gradient, input gradient; no input gradient for
    the first layer); the K·v is J V_W a_i and Σ_i w_i a_iᵀ (2 per layer) plus the contractions with the
    output gradients (2·c·d_out per example unless they are the identity)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    pass_macs = sum(n * m.in_features * m.out_features * (2 if i == 0 else 3) for i, m in enumerate(linears))
    product = 0
    for A, G, w, _ in f.outer:
        d_out = f.c if G is None else (G[1].shape[-1] if isinstance(G, tuple) else G.shape[-1])
        product += 2 * n * A.shape[-1] * d_out if w is not None else 0
        product += 0 if G is None else 2 * n * f.c * d_out
    return pass_macs, product


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--k", type=int, default=16, help="vectors of the profiled product")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--rows", type=int, default=20, help="rows of the profiler table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, k = args.n, args.k
    model, X = mlp(), torch.randn(n, 64)
    f = factored_jacobian(Linearization(model), X, budget=2**31)
    pass_macs, product_macs = _macs(model, f, n)
    print(
        f"multiply-adds: pass {pass_macs / 1e6:.0f} M, one K·v per vector {product_macs / 1e6:.0f} M "
        f"({product_macs / pass_macs:.2f}× the pass's)"
    )

    print("\n| matrix product (float32 unless said) | shape m×k×n | ms | GMAC/s |\n|---|---|---|---|")
    shapes = [
        ("pass: forward, 256 × 256 layer", (n, 256, 256)),
        ("pass: forward, first layer", (n, 64, 256)),
        ("pass: weight gradient, 256 × 256 layer", (256, n, 256)),
        (f"{k} vectors: J V, 256 × 256 layer", (n, 256, 256 * k)),
        (f"{k} vectors: Jᵀ U, 256 × 256 layer", (256 * k, n, 256)),
        (f"{k} vectors: J V, first layer", (n, 64, 256 * k)),
        (f"{k} vectors: Jᵀ U, first layer", (256 * k, n, 64)),
    ]
    for label, (m, kk, nn_) in shapes:
        a, b = torch.randn(m, kk), torch.randn(kk, nn_)
        s = interleaved_medians({"product": lambda a=a, b=b: a @ b}, args.reps)["product"]
        print(f"| {label} | {m}×{kk}×{nn_} | {s * 1e3:.2f} | {m * kk * nn_ / s / 1e9:.0f} |")
    a = torch.randn(2560, 4640, dtype=torch.float64)  # the CNN's second-convolution gradients, n = 256, c = 10
    s = interleaved_medians({"gram": lambda: a @ a.T}, 5)["gram"]
    print(
        f"| float64 Gram of the CNN's conv2 gradients (n·c = 2560, 4640 each) | 2560×4640×2560 | {s * 1e3:.0f} |"
        f" {2560 * 4640 * 2560 / s / 1e9:.0f} |"
    )

    # the pass against its matrix products alone (same shapes, same inputs, no autograd)
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, nn.Linear)]
    acts = [X]
    for W in weights[:-1]:
        acts.append(torch.relu(acts[-1] @ W.T))
    grads = [torch.randn(n, W.shape[0]) for W in weights]

    def matmuls() -> None:
        for i, (W, a, g) in enumerate(zip(weights, acts, grads)):
            a @ W.T  # forward
            g.T @ a  # weight gradient
            if i > 0:
                g @ W  # input gradient

    med = interleaved_medians({"pass": _unit(model, X), "matmuls": matmuls}, args.reps)
    u, mm = med["pass"], med["matmuls"]
    print(
        f"\npass {u * 1e3:.2f} ms ({pass_macs / u / 1e9:.0f} GMAC/s); its matrix products alone {mm * 1e3:.2f} ms "
        f"({mm / u:.2f} of the pass)"
    )

    g = torch.Generator().manual_seed(0)
    V = torch.randn(k, n, f.c, generator=g, dtype=torch.float64)
    t_kv = interleaved_medians({"kv": lambda: f.jvp(f.vjp(V))}, args.reps)["kv"]
    print(
        f"K·v with {k} vectors: {t_kv * 1e3:.1f} ms, {t_kv / u / k:.2f}× the pass per vector "
        f"(its multiply-adds at the pass's rate: {product_macs / pass_macs:.2f}×)\n"
    )
    from torch.profiler import profile

    with profile(record_shapes=True) as prof:
        for _ in range(5):
            f.jvp(f.vjp(V))
    table = prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=20, max_shapes_column_width=60
    )
    print(f"profile of 5 products with {k} vectors (times include the profiler's overhead):")
    print(table)


if __name__ == "__main__":
    main()
