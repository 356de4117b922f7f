"""``nn.Linear``: on (b, d_in) inputs the weight's Jacobian is the outer product g_ia a_iᵀ (kept as input and
output-gradient Grams, the ``outer`` form); on (b, T, d_in) inputs the weight is reused over T positions
(patches and output gradients per position — ``spatial`` — or materialised per-example gradients, whichever the
cost model prefers: :func:`append_positions`, which other rules use for the linear maps inside their modules)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from linadapt.jacobian.structured.registry import Capture, positionwise_capture, register

__all__ = ["LinearRule", "append_positions"]


@register(nn.Linear)
class LinearRule:
    """The rule for ``nn.Linear`` with its stock ``forward``."""

    def applies(self, module: nn.Module) -> bool:
        """A subclass that changes ``forward`` computes something the rule cannot see: not handled."""
        return type(module).forward is nn.Linear.forward

    def capture(
        self, module: nn.Module, args: tuple, kwargs: dict, output: Any, b: int, memo: dict | None = None
    ) -> Capture | None:
        """Input and output with the batch in any leading dimension (:func:`positionwise_capture`)."""
        return positionwise_capture(module, args, kwargs, output, b, memo)

    def features(
        self, engine: Any, layer: Any, A: torch.Tensor, G: torch.Tensor, feats: Any, products: bool = False
    ) -> None:
        """Append the layer's factors: A (b, d_in) or (b, ..., d_in), G (c, b, ..., d_out)."""
        c, b = G.shape[0], A.shape[0]
        if A.dim() == 2:
            feats.outer.append((A if layer.weight else None, G, layer.bias is not None))
            feats.outer_names.append((layer.weight, layer.bias))
            return
        A3 = A.reshape(b, -1, A.shape[-1])  # (b, T, d_in)
        G4 = G.reshape(c, b, -1, G.shape[-1])  # (c, b, T, d_out)
        append_positions(engine, layer.name, A3, G4, layer.weight, layer.bias, feats, products)


def append_positions(
    engine: Any,
    key: str,
    A3: torch.Tensor,
    G4: torch.Tensor,
    weight: str | None,
    bias: str | None,
    feats: Any,
    products: bool,
) -> None:
    """Append the factors of a linear map z_t = W a_t + b applied at T positions of each example: inputs A3
    (b, T, d_in), output gradients G4 (c, b, T, d_out); ``weight`` / ``bias``: the selected parameters' names (or
    None). The per-example gradients are Σ_t g_iat a_itᵀ and Σ_t g_iat; they are kept as the position pairs
    (``spatial``: Θ = Σ_{s,t} (a_is · a_jt [+ 1]) (g_ias · g_jbt)) or materialised (``dense``), as
    :meth:`~linadapt.jacobian.structured.engine.StructuredNTK._unexpanded` decides for ``key`` (a name for the
    weight, the same in every chunk)."""
    c, b = G4.shape[:2]
    if weight and engine._unexpanded(key, A3.shape[1], A3.shape[2], G4, products):
        if engine.compact == "positions" and engine.trim_positions:  # kernels: only positions with a gradient
            A3, G4 = _live_positions(A3, G4)
        feats.spatial.append((A3, G4, bias is not None))
        feats.spatial_names.append((weight, bias))
        return
    parts = []
    if weight:
        parts.append(torch.einsum("cbto,bti->bcoi", G4, A3).reshape(b, c, -1))
    if bias:
        parts.append(G4.sum(2).permute(1, 0, 2))
    if parts:
        feats.dense.append(torch.cat(parts, -1))
        feats.dense_names.append([n for n in (weight, bias) if n])


def _live_positions(A3: torch.Tensor, G4: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions of each example whose output gradients are not all zero (padding tokens behind an attention
    mask and left out of the pooling get none), moved first in their order, and as many positions as the example
    with the most of them: A3 (b, P', d_in), G4 (c, b, P', d_out). Sums over positions (the weight's gradients
    Σ_t g_t a_tᵀ, Σ_t g_t; the position Gram over pairs) are unchanged: the positions left out, and those of shorter
    examples filled in, have zero output gradients."""
    live = G4.ne(0).any(3).any(0)  # (b, P)
    kept = int(live.sum(1).max()) if live.numel() else 0
    if kept == live.shape[1]:
        return A3, G4
    order = torch.argsort(live.logical_not().to(torch.int8), dim=1, stable=True)[:, : max(1, kept)]  # (b, P')
    A3 = A3.gather(1, order.unsqueeze(-1).expand(-1, -1, A3.shape[-1]))
    G4 = G4.gather(2, order.view(1, *order.shape, 1).expand(G4.shape[0], -1, -1, G4.shape[-1]))
    return A3, G4
