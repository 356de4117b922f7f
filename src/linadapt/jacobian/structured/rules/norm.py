"""Normalisation layers' affine weights: ``nn.BatchNorm1d/2d/3d`` in eval mode (running statistics),
``nn.LayerNorm`` and ``nn.GroupNorm``.

Each computes y = x̂ ⊙ γ + β with x̂ the normalised input, which the layer input alone determines (running
statistics, or the example's own mean and variance): the per-example gradients are Σ_s g_s ⊙ x̂_s for γ and
Σ_s g_s for β, summed over the positions s that share a weight (the spatial positions for BatchNorm and
GroupNorm, the leading positions for LayerNorm). They have as many entries as the layer has channels, so they are
kept materialised (``dense``): per example c × (|γ| + |β|) numbers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from linadapt.jacobian.structured.registry import Capture, default_capture, positionwise_capture, register

__all__ = ["NormRule"]

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _stock(module: nn.Module) -> bool:
    for base in (*_BATCH_NORMS, nn.LayerNorm, nn.GroupNorm):
        if isinstance(module, base):
            return type(module).forward is base.forward
    return False


@register(nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)
class NormRule:
    """The rule for the affine weights of BatchNorm (running statistics), LayerNorm and GroupNorm."""

    def applies(self, module: nn.Module) -> bool:
        """Stock ``forward``; a BatchNorm must normalise by running statistics in eval mode (otherwise its
        output mixes the examples of a batch, which the linearization refuses anyway)."""
        if not _stock(module):
            return False
        if isinstance(module, _BATCH_NORMS):
            return bool(module.track_running_stats) and module.running_mean is not None
        return True

    def capture(
        self, module: nn.Module, args: tuple, kwargs: dict, output: Any, b: int, memo: dict | None = None
    ) -> Capture | None:
        """A LayerNorm normalises each position of its leading dimensions on its own: the batch may be any of
        those (:func:`positionwise_capture`); the others take it first."""
        if isinstance(module, nn.LayerNorm):
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and x.dim() - len(module.normalized_shape) >= 2:
                return positionwise_capture(module, args, kwargs, output, b, memo)
        return default_capture(module, args, kwargs, output, b)

    def features(
        self, engine: Any, layer: Any, A: torch.Tensor, G: torch.Tensor, feats: Any, products: bool = False
    ) -> None:
        """Append the layer's materialised per-example gradients: A (b, ...) its input, G (c, b, ...)."""
        mod = layer.module
        c, b = G.shape[0], A.shape[0]
        xhat = _normalised(mod, A)
        if isinstance(mod, nn.LayerNorm):  # weights over the trailing normalized_shape, shared by the rest
            k = len(mod.normalized_shape)
            G3 = G.reshape(c, b, -1, *G.shape[G.dim() - k :]).flatten(3)  # (c, b, positions, weight entries)
            x3 = xhat.reshape(b, -1, G3.shape[-1])
        else:  # a weight per channel (dim 1), shared over the spatial positions
            G3 = G.reshape(c, b, G.shape[2], -1).transpose(2, 3)  # (c, b, positions, channels)
            x3 = xhat.reshape(b, xhat.shape[1], -1).transpose(1, 2)
        parts = []
        if layer.weight:
            parts.append(torch.einsum("cbsk,bsk->bck", G3, x3))
        if layer.bias:
            parts.append(G3.sum(2).transpose(0, 1))
        feats.dense.append(torch.cat(parts, -1))
        feats.dense_names.append([n for n in (layer.weight, layer.bias) if n])


def _normalised(mod: nn.Module, A: torch.Tensor) -> torch.Tensor:
    """x̂: the layer's input normalised as its forward does, without the affine weights."""
    if isinstance(mod, _BATCH_NORMS):
        return torch.nn.functional.batch_norm(
            A, mod.running_mean.to(A.dtype), mod.running_var.to(A.dtype), None, None, False, 0.0, mod.eps
        )
    if isinstance(mod, nn.LayerNorm):
        return torch.nn.functional.layer_norm(A, mod.normalized_shape, None, None, mod.eps)
    return torch.nn.functional.group_norm(A, mod.num_groups, None, None, mod.eps)
