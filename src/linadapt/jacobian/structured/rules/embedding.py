"""``nn.Embedding``: z_it = E[id_it], the row of the table E (V × d) named by each token id.

The per-example, per-output gradient scatters the output gradients into those rows,
∂f_a(x_i)/∂E[v] = Σ_{t: id_it = v} g_iat, so the layer's share of the kernel is the position Gram of a Linear
layer on one-hot inputs, whose input Gram is the id-equality mask:

    Θ_E[i a, j b] = Σ_{s,t} [id_is = id_jt] (g_ias · g_jbt).

The ``index`` form keeps the ids (b, P) and output gradients (c, b, P, d) and visits only the matching position
pairs (:func:`~linadapt.jacobian.structured.assembly.index_gram_block`): nothing of the table's size V is formed
(one-hot inputs would take V entries per position, materialised gradients c · V · d per example). Products gather
rows (J v: g_iat · V_E[id_it]) and add into them (Jᵀ u: Σ_a u_ia g_iat added to row id_it). A table with no more
rows than positions per example (token types, V = 2) is materialised instead: c · V · d entries per example,
cheaper than its P² matching pairs.

Rows at ``padding_idx`` get no gradient (their positions are dropped). The rule refuses ``max_norm`` (the forward
renormalises rows of the table in place), ``scale_grad_by_freq`` (the backward scales by counts in the batch:
not the derivative of the forward) and ``sparse`` (sparse gradients in the autodiff it is checked against); those
tables fall back to the Jacobian contraction.

Ids of a batch of one used for the whole batch (a (1, T) buffer of position ids, broadcast against the (b, T, d)
token embeddings, as BERT's position embeddings are) are handled by expanding the layer's output to the b
examples, so that its output gradients are per example.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from linadapt.jacobian.structured.registry import Capture, register

__all__ = ["EmbeddingRule"]


@register(nn.Embedding)
class EmbeddingRule:
    """The rule for ``nn.Embedding`` with its stock ``forward``."""

    def parameters(self, module: nn.Module) -> tuple[str, ...]:
        """The table, ``weight``."""
        return ("weight",)

    def applies(self, module: nn.Module) -> bool:
        """Stock ``forward``; no ``max_norm``, ``scale_grad_by_freq`` or ``sparse`` (see the module docstring)."""
        return (
            type(module).forward is nn.Embedding.forward
            and module.max_norm is None
            and not module.scale_grad_by_freq
            and not module.sparse
        )

    def capture(
        self, module: nn.Module, args: tuple, kwargs: dict, output: Any, b: int, memo: dict | None = None
    ) -> Capture | None:
        """The ids (b, ...) and the output (b, ..., d); ids of one example for a batch of b are expanded (and the
        output with them, in place of the module's)."""
        ids = args[0] if args else kwargs.get("input")
        if not isinstance(ids, torch.Tensor) or ids.dim() == 0 or not isinstance(output, torch.Tensor):
            return None
        if ids.shape[0] == b:
            return Capture(ids, (output,))
        if ids.shape[0] == 1:
            expanded = output.expand(b, *output.shape[1:])
            return Capture(ids.expand(b, *ids.shape[1:]), (expanded,), replacement=expanded)
        return None

    def features(
        self, engine: Any, layer: Any, A: torch.Tensor, G: torch.Tensor, feats: Any, products: bool = False
    ) -> None:
        """Append the table's factors: ids A (b, ...), output gradients G (c, b, ..., d)."""
        c, b = G.shape[:2]
        mod = layer.module
        ids = A.reshape(b, -1).long()  # (b, P)
        G4 = G.reshape(c, b, ids.shape[1], G.shape[-1])  # (c, b, P, d)
        if mod.padding_idx is not None:
            dropped = ids == mod.padding_idx
            ids = ids.masked_fill(dropped, -1)
            G4 = G4.masked_fill(dropped[None, :, :, None], 0.0)
        V, d = mod.num_embeddings, mod.embedding_dim
        if V <= ids.shape[1]:  # few rows: materialised, Σ_t g_iat one_hot(id_it)
            D = G4.new_zeros(b * V, c, d)  # rows (example, table row)
            rows = (ids.clamp_min(0) + V * torch.arange(b, device=ids.device).unsqueeze(1)).reshape(-1)
            D.index_add_(0, rows, G4.permute(1, 2, 0, 3).reshape(-1, c, d))  # (adds zeros at dropped positions)
            feats.dense.append(D.view(b, V, c, d).transpose(1, 2).reshape(b, c, V * d))
            feats.dense_names.append([layer.weight])
            return
        feats.index.append((ids, G4))
        feats.index_names.append(layer.weight)
