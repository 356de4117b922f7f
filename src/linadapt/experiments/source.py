"""What several experiments share: the digit CNN and how a source network is trained on the source task."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["Step", "make_cnn", "train_source"]

Step = Callable[[str], None]  # progress callback: one line of text per stage


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
