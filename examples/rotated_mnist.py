"""Adapt a digit classifier to rotated digits from a few labels (real MNIST, offline).

The experiment lives in ``linadapt.experiments.rotated_mnist`` (``linadapt experiment rotated-mnist`` runs it too):
a small CNN trained on 3,500 upright digits, adapted to 60°-rotated digits from ``--shots`` labels per class by
fine-tuning (last layer / all weights) and by ``LinearizedClassifier`` (all weights / last layer; probit,
Laplace bridge and MAP-logit read-outs), scored on the remaining rotated digits.

    python examples/rotated_mnist.py [--seeds 3] [--shots 10] [--output results.json]
"""

from __future__ import annotations

import argparse
import json

from linadapt.experiments.registry import run_experiment, summarize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--shots", type=int, default=10, help="labelled rotated digits per class")
    parser.add_argument("--output", default=None, help="write the records as JSON here")
    args = parser.parse_args()
    records = run_experiment("rotated-mnist", args.seeds, args.shots, step=lambda msg: print(msg, flush=True))
    print(f"\nMNIST upright → rotated 60°, {args.shots} labels per class, {args.seeds} seeds (mean ± std)\n")
    print(summarize(records))
    if args.output:
        with open(args.output, "w") as fh:
            json.dump(records, fh, indent=1)


if __name__ == "__main__":
    main()
