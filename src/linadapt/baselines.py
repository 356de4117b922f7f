"""Fine-tuning baselines: the standard way to adapt a trained network, to compare linadapt against.

``finetune`` copies the network and trains the chosen parameters (all, the last layer, or biases — the same
``params`` choices as linadapt) with Adam on the target data, early-stopping on a held-out part of it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .selection import ParamSpec, select_parameters

__all__ = ["FineTuned", "finetune"]


@dataclass
class FineTuned:
    """A fine-tuned copy of a network: ``model`` (eval mode), the epoch kept, and the epochs run."""

    model: nn.Module
    best_epoch: int
    epochs_run: int

    @torch.no_grad()
    def logits(self, X: torch.Tensor, batch: int = 1024) -> torch.Tensor:
        return torch.cat([self.model(X[i : i + batch]) for i in range(0, X.shape[0], batch)])

    def predict_proba(self, X: torch.Tensor) -> np.ndarray:
        return torch.softmax(self.logits(X).double(), 1).numpy()

    def predict(self, X: torch.Tensor) -> np.ndarray:
        return self.logits(X).double().numpy()


def finetune(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    task: str = "classification",
    params: ParamSpec = "all",
    epochs: int = 200,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    batch_size: int = 64,
    val_fraction: float = 0.2,
    patience: int = 20,
    seed: int = 0,
) -> FineTuned:
    """Fine-tune a copy of ``model`` on (X, y) and return the weights with the best held-out loss.

    Args:
        model: the trained network (not modified).
        X, y: target data; y holds class labels (classification) or targets shaped like the output (regression).
        task: ``"classification"`` (cross-entropy) or ``"regression"`` (mean squared error).
        params: which parameters are trained (as in linadapt); the others stay frozen.
        epochs: the budget; patience: stop after this many epochs without held-out improvement.
        val_fraction: share of (X, y) held out for early stopping (at least one example; none when n < 5,
            in which case the last epoch is kept).
        lr, weight_decay, batch_size: Adam settings. BatchNorm layers stay in eval mode (running statistics
            are not updated from a few target examples); dropout is active during training.
    """
    if task not in ("classification", "regression"):
        raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
    net = copy.deepcopy(model)
    names = set(select_parameters(net, params))
    trainable = []
    for name, p in net.named_parameters():
        p.requires_grad_(name in names)
        if name in names:
            trainable.append(p)
    gen = torch.Generator().manual_seed(seed)
    n = X.shape[0]
    n_val = max(1, round(val_fraction * n)) if n >= 5 and val_fraction > 0 else 0
    perm = torch.randperm(n, generator=gen)
    val, tr = perm[:n_val], perm[n_val:]

    def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if task == "classification":
            return nn.functional.cross_entropy(out, target)
        return nn.functional.mse_loss(out.reshape(target.shape), target.to(out.dtype))

    def set_mode() -> None:
        net.train()
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()

    opt = torch.optim.Adam(trainable, lr=lr, weight_decay=weight_decay)
    best, best_state, best_epoch, since = math.inf, copy.deepcopy(net.state_dict()), 0, 0
    epoch = 0
    for epoch in range(1, epochs + 1):
        set_mode()
        order = tr[torch.randperm(tr.numel(), generator=gen)]
        for i in range(0, order.numel(), batch_size):
            idx = order[i : i + batch_size]
            opt.zero_grad()
            loss_fn(net(X[idx]), y[idx]).backward()
            opt.step()
        if n_val:
            net.eval()
            with torch.no_grad():
                score = float(loss_fn(net(X[val]), y[val]))
            if score < best:
                best, best_state, best_epoch, since = score, copy.deepcopy(net.state_dict()), epoch, 0
            else:
                since += 1
                if since >= patience:
                    break
    if n_val:
        net.load_state_dict(best_state)
    else:
        best_epoch = epoch
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return FineTuned(net, best_epoch, epoch)
