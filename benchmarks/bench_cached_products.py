"""One K·v (and 16 at once) through the cached training-Jacobian factors, as ratios to one forward+backward
pass, with more interleaved repetitions than ``linadapt bench`` (whose table also times torch.func products
and a fine-tuning epoch in the same loop); the one-off cost of building the factors (``--build-reps`` builds,
each beside a pass); and for the image model, the K·v against the same model and inputs in channels-last
memory (the products run their convolutions channels-last: is the model's own NCHW pass a flattering unit?).

To compare two versions of the code side by side, run it twice in one shell, the other version first on
``PYTHONPATH`` (e.g. ``git worktree add /tmp/old COMMIT``):

    python benchmarks/bench_cached_products.py [--reps 30] [--n 1024] [--threads 2]
    PYTHONPATH=/tmp/old/src python benchmarks/bench_cached_products.py
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from linadapt import Linearization
from linadapt.app.bench import _unit, cnn, interleaved_medians, mlp
from linadapt.jacobian.structured import factored_jacobian


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--build-reps", type=int, default=5, help="builds of the factors timed (interleaved with the pass; 0: none)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        "| model | fwd+bwd (ms) | one K·v, cached | vjp | jvp | 16 vectors, per vector | building the factors |"
        " one K·v against a channels-last pass |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, model, X in (
        ("MLP 64-256-256-10", mlp(), torch.randn(args.n, 64)),
        ("CNN 1x8x8 (16,32 ch)", cnn(), torch.randn(args.n, 1, 8, 8)),
    ):
        lin = Linearization(model)
        f = factored_jacobian(lin, X, budget=2**31)
        unit = _unit(model, X)
        # the same model and inputs in channels-last memory (image models only): is the NCHW pass the unit
        # that flatters products run in channels-last?
        unit_cl = None
        if X.dim() == 4:
            cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
            unit_cl = _unit(cl_model, X.contiguous(memory_format=torch.channels_last))
        g = torch.Generator().manual_seed(0)
        v = torch.randn(1, args.n, 10, generator=g, dtype=torch.float64)
        v16 = torch.randn(16, args.n, 10, generator=g, dtype=torch.float64)
        u = f.vjp(v)
        fns = {
            "unit": unit,
            "kv": lambda f=f, v=v: f.jvp(f.vjp(v)),
            "vjp": lambda f=f, v=v: f.vjp(v),
            "jvp": lambda f=f, u=u: f.jvp(u),
            "kv16": lambda f=f, v16=v16: f.jvp(f.vjp(v16)),
        }
        if unit_cl is not None:
            fns["unit_cl"] = unit_cl
        med = interleaved_medians(fns, args.reps)
        builds, passes = [], []
        for _ in range(args.build_reps):  # slow: a few, each beside a pass
            t0 = time.perf_counter()
            factored_jacobian(lin, X, budget=2**31)
            builds.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            unit()
            passes.append(time.perf_counter() - t0)
        r = {k: med[k] / med["unit"] for k in med}
        build = f"{statistics.median(builds) / statistics.median(passes):.1f}×" if builds else "—"
        cl = f"{med['kv'] / med['unit_cl']:.2f}× (pass {med['unit_cl'] * 1e3:.1f} ms)" if unit_cl is not None else "—"
        print(
            f"| {name} | {med['unit'] * 1e3:.1f} | {r['kv']:.2f}× | {r['vjp']:.2f}× | {r['jvp']:.2f}× | "
            f"{r['kv16'] / 16:.2f}× | {build} | {cl} |"
        )


if __name__ == "__main__":
    main()
