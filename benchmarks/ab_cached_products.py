"""Two versions of the cached-factor products side by side in ONE process: another tree's package (its
``src`` folder) is loaded beside the installed one under another name, both build the factors of the same
model and inputs, and their products are timed interleaved against the same forward+backward pass.

Separate processes (``bench_cached_products.py`` run twice) differ by up to ±25 % on this machine — the
pass itself lands in a fast or a slow mode per process — which hides changes of a few per cent; here both
versions share the process, the pass and the inputs.

    git worktree add /tmp/old HEAD        # or any commit
    python benchmarks/ab_cached_products.py /tmp/old/src [--models mlp cnn] [--reps 20]

Prints, per model, the products' medians (ms) and ratios to the pass for the old and the new code, and the
largest relative difference of their results (the two must agree to float32 rounding).
"""

from __future__ import annotations

import argparse
import importlib
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch

import linadapt.jacobian.structured as current
from linadapt import Linearization
from linadapt.app.bench import _unit, cnn, interleaved_medians, mlp


def _load(src: str):
    """(the other tree's ``Linearization``, its ``factored_jacobian``): its ``linadapt`` package copied to a
    temporary folder as ``linadapt_under_test``, its absolute imports renamed to match (relative ones need
    nothing), and imported beside the installed one. Trees from before and after the layer folders work."""
    tmp = Path(tempfile.mkdtemp(prefix="linadapt-ab-"))
    dst = tmp / "linadapt_under_test"
    shutil.copytree(Path(src) / "linadapt", dst)
    for f in dst.rglob("*.py"):
        f.write_text(re.sub(r"\blinadapt(?=[. ])", "linadapt_under_test", f.read_text(encoding="utf-8")))
    sys.path.insert(0, str(tmp))
    pkg = importlib.import_module("linadapt_under_test")
    try:
        structured = importlib.import_module("linadapt_under_test.jacobian.structured")
    except ModuleNotFoundError:  # a tree from before the layer folders
        structured = importlib.import_module("linadapt_under_test.structured")
    return pkg.Linearization, structured.factored_jacobian


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", help="the other tree's src folder (the one holding its linadapt package)")
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--k", type=int, default=16, help="vectors of the many-vector product")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    OldLinearization, old_factored = _load(args.old)
    for name in args.models:
        torch.manual_seed(0)
        model, X = (mlp(), torch.randn(args.n, 64)) if name == "mlp" else (cnn(), torch.randn(args.n, 1, 8, 8))
        lin = Linearization(model)
        versions = {
            "old": old_factored(OldLinearization(model), X, budget=2**31),
            "new": current.factored_jacobian(lin, X, budget=2**31),
        }
        g = torch.Generator().manual_seed(0)
        v1 = torch.randn(1, args.n, 10, generator=g, dtype=torch.float64)
        vk = torch.randn(args.k, args.n, 10, generator=g, dtype=torch.float64)
        for v in (v1, vk):
            a, b = (f.jvp(f.vjp(v)) for f in versions.values())
            diff = ((a - b).abs().max() / a.abs().max()).item()
            print(f"{name}, {v.shape[0]} vector(s): largest relative difference old/new {diff:.1e}")
        fns = {"pass": _unit(model, X)}
        for tag, f in versions.items():
            fns[f"{tag} K·v"] = lambda f=f, v=v1: f.jvp(f.vjp(v))
            fns[f"{tag} vjp"] = lambda f=f, v=v1: f.vjp(v)
            fns[f"{tag} K·v, {args.k} vectors"] = lambda f=f, v=vk: f.jvp(f.vjp(v))
            fns[f"{tag} vjp, {args.k} vectors"] = lambda f=f, v=vk: f.vjp(v)
        med = interleaved_medians(fns, args.reps)
        unit = med["pass"]
        print(f"\n| {name}, n = {args.n} | ms | × the pass (per vector) |\n|---|---|---|")
        print(f"| pass | {unit * 1e3:.2f} | 1 |")
        for key in list(fns)[1:]:
            per = args.k if "vectors" in key else 1
            print(f"| {key} | {med[key] * 1e3:.2f} | {med[key] / unit / per:.3f} |")
        print()


if __name__ == "__main__":
    main()
