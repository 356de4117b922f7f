"""Real networks, every weight: linadapt against fine-tuning all weights, side by side in one run.

Each method runs in its own fresh process (so that its peak resident memory, ``VmHWM``, is its own), one after
the other on the same machine: wall time of fit plus prediction on the test images, peak memory, accuracy, NLL
and ECE. Methods:

* ``finetune-all``: Adam on all weights, early stopping on 20 % of the labels, ``--epochs`` epochs (100, as the
  pretrained-backbone experiment does), then predicting the test images;
* ``linadapt-all``: ``LinearizedClassifier(net, params="all", link=--link)`` — every weight — fit and
  ``predict_proba`` (``link="auto"``, the default here as in the experiments' ``-auto`` rows: the readout with
  the best leave-one-out likelihood on the labels — probit, bridge or the MAP logits);
* ``linadapt-all-groups``: every weight with two prior variances, one for the head block and one for the rest
  (``prior_groups=[head block]``), both learned by the Laplace evidence;
* ``linadapt-head``: the same on the head block only (the experiment's other variant);
* ``linadapt-last`` (not run by default): the same on the last layer only (Bayesian logistic regression on the
  network's features).

Networks (``_real_tasks.py``):

* ``efficientnet`` — the ImageNet-pretrained EfficientNet-Lite0 of the pretrained-backbone experiment (3.4M
  weights, new 10-way head) on Animal-MNIST at ``--size`` × ``--size``, ``--shots`` labels per class, ``--test``
  test images (the experiment's draw for ``--seed``);
* ``minilm`` — the pretrained sentence encoder all-MiniLM-L6-v2 (a 6-layer BERT, 22.6M weights, new 3-way head;
  the ``text`` extra) on Tate artwork titles → medium, ``--size`` tokens per title;
* ``resnet18`` — a ResNet-18 for small images (11.2M weights, BatchNorm, residual blocks; defined in
``_real_tasks.py``) trained here on the 5,000 MNIST digits at ``--size`` × ``--size`` and cached under
``~/.cache/linadapt/`` (trained once, before the methods run, outside their measured processes), with a new
10-way head on Animal-MNIST (the ``mnist-to-animals`` draw); its head block is the last residual stage and the head.

    python benchmarks/real_networks.py --network efficientnet --shots 10 --size 64 --test 500 --seed 0
    python benchmarks/real_networks.py --network resnet18 --shots 10 --size 32 --test 500 --seed 0 --threads 1
    python benchmarks/real_networks.py --network minilm --shots 10 --size 32 --test 500 --seed 0
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _real_tasks import PREPARE, TASKS

_CHILD = r"""
import json, sys, time
import numpy as np
import torch
torch.set_num_threads(THREADS)
from linadapt import LinearizedClassifier, metrics
from linadapt._memory import peak_rss
from linadapt.experiments.baselines import finetune
sys.path.insert(0, BENCH_DIR)
from _real_tasks import TASKS

seed, shots, size, n_test, epochs, method = SEED, SHOTS, SIZE, NTEST, EPOCHS, "METHOD"
task = TASKS["NETWORK"](seed, shots, size, n_test)
net, xa, ya, xt, yt = task["net"], task["xa"], task["ya"], task["xt"], task["yt"]
del task["net"], task["xa"], task["ya"], task["xt"], task["yt"]
start_rss = peak_rss()
t = time.perf_counter()
if method == "finetune-all":
    tuned = finetune(net, xa, ya, params="all", epochs=epochs, seed=seed, **task["finetune"])
    fit = time.perf_counter() - t
    proba = tuned.predict_proba(xt)
    extra = {"best_epoch": tuned.best_epoch}
else:
    params = {"linadapt-all": "all", "linadapt-all-groups": "all", "linadapt-last": "last"}.get(method, task["head"])
    groups = [task["head"]] if method == "linadapt-all-groups" else None
    clf = LinearizedClassifier(net, params=params, link="LINK", prior_groups=groups, memory_budget=BUDGET).fit(xa, ya)
    fit = time.perf_counter() - t
    proba = clf.predict_proba(xt)
    extra = {"prior_var": clf.prior_var_, "prior_vars": clf.prior_vars_, "link": clf.link_,
             "weights": clf.linearization_.num_params, "memory_budget": clf.linearization_.memory_budget}
total = time.perf_counter() - t
print(json.dumps({"method": method, "fit_s": fit, "total_s": total, "peak_gib": peak_rss() / 2**30,
                  "start_gib": start_rss / 2**30, "accuracy": metrics.accuracy(proba, yt),
                  "nll": metrics.nll(proba, yt), "ece": metrics.expected_calibration_error(proba, yt),
                  "n_train": int(xa.shape[0]), **extra}))
"""


def run(method: str, args: argparse.Namespace) -> dict:
    code = _CHILD
    for key, value in {
        "THREADS": args.threads,
        "SEED": args.seed,
        "SHOTS": args.shots,
        "SIZE": args.size,
        "NTEST": args.test,
        "EPOCHS": args.epochs,
        "METHOD": method,
        "NETWORK": args.network,
        "BENCH_DIR": repr(str(Path(__file__).resolve().parent)),
        "LINK": args.link,
        "BUDGET": repr(args.memory_budget),
    }.items():
        code = code.replace(key, str(value))
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode != 0:
        return {"method": method, "error": res.stderr[-2000:], "wall_s": time.perf_counter() - t}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--network", default="efficientnet", choices=sorted(TASKS))
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default="finetune-all,linadapt-all,linadapt-all-groups,linadapt-head")
    parser.add_argument("--link", default="auto", help="linadapt's readout (auto: chosen by leave-one-out)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--memory-budget", default=None, help="linadapt's memory_budget (default: the library's)")
    args = parser.parse_args()
    if args.network in PREPARE:  # e.g. train and cache the source network once, outside the measured processes
        print(json.dumps({"network": args.network, **PREPARE[args.network](args.size, args.threads)}), flush=True)
    rows = []
    for method in args.methods.split(","):
        row = run(method, args)
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = next((r for r in rows if r["method"] == "finetune-all" and "total_s" in r), None)
    size = f"{args.size} tokens" if args.network == "minilm" else f"{args.size}×{args.size}"
    print(
        f"\n{args.network}, {args.shots} labels per class at {size}, {args.test} test points, "
        f"seed {args.seed}, {args.threads} threads"
    )
    print("| method | weights | fit + predict (s) | × fine-tuning | peak memory (GiB) | accuracy | NLL | ECE |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['method']} | failed: {r['error'].splitlines()[-1][:80]} |")
            continue
        ratio = f"{r['total_s'] / base['total_s']:.2f}" if base else "–"
        print(
            f"| {r['method']} | {r.get('weights', 'all'):,} | {r['total_s']:.0f} | {ratio} | {r['peak_gib']:.2f} | "
            f"{r['accuracy']:.3f} | {r['nll']:.3f} | {r['ece']:.3f} |"
            if isinstance(r.get("weights"), int)
            else f"| {r['method']} | all | {r['total_s']:.0f} | {ratio} | {r['peak_gib']:.2f} | "
            f"{r['accuracy']:.3f} | {r['nll']:.3f} | {r['ece']:.3f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
