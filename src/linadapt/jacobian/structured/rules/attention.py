"""``nn.MultiheadAttention``: its linear maps as Linear layers over positions, from output gradients propagated
through the attention inside the rule.

The module computes, per example (batch first; H heads of width d_h = E / H),

    q_t = W_q x_t + b_q,  k_s = W_k y_s + b_k,  v_s = W_v z_s + b_v          (in-projection, rows of W_in)
    P = softmax(q kᵀ / √d_h + M),  o_t = Σ_s P_ts v_s   (per head)          (M: the additive masks)
    out_t = W_o o_t + b_o                                                    (out_proj)

from query x (T positions), key y and value z (S positions). Its ``forward`` hands W_o to the functional form
directly (``out_proj``'s own hooks never fire), so the rule covers every parameter of the module: it captures the
inputs, masks and options from the forward hook (keyword arguments included), recomputes the attention from them
in the algebra dtype and propagates the output gradients G_out (c, b, T, E) back by hand, for all c outputs at
once:

    G_o = G_out W_o,   dV = Pᵀ G_o,   dP = G_o vᵀ (+ the gradients of the returned weights),
    dS = P ⊙ (dP − rowsum(dP ⊙ P)),   G_q = dS k / √d_h,   G_k = dSᵀ q / √d_h.

Then out_proj is a Linear layer over the T positions with inputs o and output gradients G_out, and the packed
in-projection W_in (3E × E) one over the positions of the distinct inputs: for self-attention (query, key and
value the same tensor) inputs x with output gradients [G_q, G_k, G_v]; otherwise the distinct inputs' positions
stacked, each with its gradients in its block of the 3E outputs and zeros elsewhere (exact, at the cost of the
zeros). Separate projection weights (``kdim`` / ``vdim`` ≠ E) are three Linear layers over positions and the
bias Σ_t [G_q; G_k; G_v] is materialised, as are ``bias_k`` / ``bias_v`` (the gradients at the key and value
position they append). Each linear map takes the position-Gram or the materialised form by the cost model
(:func:`~linadapt.jacobian.structured.rules.linear.append_positions`).

Masks: ``key_padding_mask`` and ``attn_mask`` (2-d or per example and head, boolean or additive), ``is_causal``,
``add_zero_attn``, ``need_weights`` with averaged or per-head weights, ``batch_first`` either way. Dropout is off
(the linearization runs in eval mode). The recomputed output is compared with the module's own on every chunk: a
difference (a call the rule does not model) is a :class:`~linadapt.jacobian.structured.features.RuleError`,
which at the engine's first check hands the module's parameters to the Jacobian contraction. Unbatched (2-d)
inputs and subclasses with their own ``forward`` are refused the same way.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import nn

from linadapt.jacobian.structured.features import RuleError
from linadapt.jacobian.structured.registry import Capture, register
from linadapt.jacobian.structured.rules.linear import append_positions

__all__ = ["AttentionRule"]

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)
_PARAMETERS = (
    "in_proj_weight",
    "q_proj_weight",
    "k_proj_weight",
    "v_proj_weight",
    "in_proj_bias",
    "bias_k",
    "bias_v",
    "out_proj.weight",
    "out_proj.bias",
)


@register(nn.MultiheadAttention)
class AttentionRule:
    """The rule for ``nn.MultiheadAttention`` with its stock ``forward``."""

    def parameters(self, module: nn.Module) -> tuple[str, ...]:
        """Every parameter of the module, ``out_proj``'s included."""
        return _PARAMETERS

    def applies(self, module: nn.Module) -> bool:
        """Stock ``forward`` (and a stock ``out_proj``)."""
        return type(module).forward is nn.MultiheadAttention.forward and isinstance(module.out_proj, nn.Linear)

    def capture(
        self, module: nn.Module, args: tuple, kwargs: dict, output: Any, b: int, memo: dict | None = None
    ) -> Capture | None:
        """Query, key and value batch first, which of them are the same tensor, the masks and options, and the
        module's output (batch first, for the comparison); the outputs whose gradients are needed are the attention
        output, batch first (the module's output is replaced by a view of it when it is not), and the attention
        weights when returned."""
        try:
            call = _SIGNATURE.bind(module, *args, **kwargs)
        except TypeError:
            return None
        call.apply_defaults()
        a = call.arguments
        query, key, value = a["query"], a["key"], a["value"]
        if not all(isinstance(t, torch.Tensor) and t.dim() == 3 for t in (query, key, value)):
            return None
        if not (isinstance(output, tuple) and len(output) == 2 and isinstance(output[0], torch.Tensor)):
            return None
        # which input each of query, key, value is (0, 1 or 2: the first of them that is the same tensor)
        roles = (0, 0 if key is query else 1, 0 if value is query else 1 if value is key else 2)
        out, weights = output
        replacement = None
        if not module.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
            out = out.transpose(0, 1)
            replacement = (out.transpose(0, 1), weights)
        if query.shape[0] != b or key.shape[0] != b or out.shape[0] != b:
            return None
        inputs = {
            "query": query,
            "key": key,
            "value": value,
            "roles": roles,
            "key_padding_mask": a["key_padding_mask"],
            "attn_mask": a["attn_mask"],
            "need_weights": bool(a["need_weights"]),
            "average": bool(a["average_attn_weights"]),
            "is_causal": bool(a["is_causal"]),
            "output": out,
        }
        outputs = (out,) if weights is None else (out, weights)
        return Capture(inputs, outputs, replacement)

    def features(self, engine: Any, layer: Any, A: dict, G: Any, feats: Any, products: bool = False) -> None:
        """Append the factors of the module's selected parameters from the captured inputs A (see
        :meth:`capture`) and output gradients G: (c, b, T, E) for the attention output, or a tuple with the
        weights' (c, b, [H,] T, S) as well."""
        mod = layer.module
        G_out, G_w = G if isinstance(G, tuple) else (G, None)
        weight = {local: engine.snapshot(layer, local) for local in _PARAMETERS if _present(mod, local)}
        weight = {k: v.to(G_out.dtype) for k, v in weight.items()}
        run = _Attention(mod, A, weight)
        tol = 1e-9 if engine.lin.net_dtype == torch.float64 else 1e-4
        scale = float(A["output"].abs().max()) if A["output"].numel() else 0.0
        if float((run.out - A["output"]).abs().max()) > tol * max(scale, 1e-30):
            raise RuleError([layer.name], "its recomputed attention differs from the module's output")
        Gq, Gk, Gv = run.backward(G_out, G_w)  # (c, b, T, E), (c, b, S', E), (c, b, S', E) with S' ⊇ S
        S = A["key"].shape[1]
        sel = layer.params
        if "bias_k" in sel or "bias_v" in sel:  # the appended key / value position
            parts = [Gx[:, :, S].transpose(0, 1) for Gx, name in ((Gk, "bias_k"), (Gv, "bias_v")) if name in sel]
            feats.dense.append(torch.cat(parts, -1))
            feats.dense_names.append([sel[name] for name in ("bias_k", "bias_v") if name in sel])
        Gq, Gk, Gv = Gq, Gk[:, :, :S], Gv[:, :, :S]
        grads = (Gq, Gk, Gv)
        if mod._qkv_same_embed_dim:
            self._packed(engine, layer, A, grads, feats, products)
        else:
            names = ("q_proj_weight", "k_proj_weight", "v_proj_weight")
            for name, x, Gx in zip(names, (A["query"], A["key"], A["value"]), grads):
                if name in sel:
                    append_positions(engine, f"{layer.name}.{name}", x, Gx, sel[name], None, feats, products)
            if "in_proj_bias" in sel:
                feats.dense.append(torch.cat([Gx.sum(2) for Gx in grads], -1).transpose(0, 1))
                feats.dense_names.append([sel["in_proj_bias"]])
        if "out_proj.weight" in sel or "out_proj.bias" in sel:
            key = f"{layer.name}.out_proj.weight"
            w, bias = sel.get("out_proj.weight"), sel.get("out_proj.bias")
            append_positions(engine, key, run.o, G_out, w, bias, feats, products)

    def _packed(self, engine: Any, layer: Any, A: dict, grads: tuple, feats: Any, products: bool) -> None:
        """The packed in-projection W_in (3E × E), b_in: a Linear layer over the positions of the distinct inputs,
        each with the gradients of the projections it feeds in their blocks of the 3E outputs."""
        w, bias = layer.params.get("in_proj_weight"), layer.params.get("in_proj_bias")
        if w is None and bias is None:
            return
        roles = A["roles"]
        sources = [A["query"], A["key"], A["value"]]
        distinct = sorted(set(roles))
        if len(distinct) == 1:  # self-attention: [G_q, G_k, G_v] at each position
            x, G4 = sources[0], torch.cat(grads, -1)
        else:
            x = torch.cat([sources[r] for r in distinct], 1)
            c, b, E = grads[0].shape[0], x.shape[0], grads[0].shape[-1]
            G4 = grads[0].new_zeros(c, b, x.shape[1], 3 * E)
            starts = dict(zip(distinct, [0, *torch.tensor([sources[r].shape[1] for r in distinct]).cumsum(0).tolist()]))
            for block, (r, Gx) in enumerate(zip(roles, grads)):
                G4[:, :, starts[r] : starts[r] + Gx.shape[2], block * E : (block + 1) * E] = Gx
        append_positions(engine, f"{layer.name}.in_proj_weight", x, G4, w, bias, feats, products)


def _present(module: nn.Module, local: str) -> bool:
    obj: Any = module
    for part in local.split("."):
        obj = getattr(obj, part, None)
    return isinstance(obj, torch.Tensor)


class _Attention:
    """The module's forward recomputed from captured inputs A and weights (batch first), keeping what the
    backward pass needs: ``out`` (b, T, E) and ``o`` (b, T, E), the input of out_proj."""

    def __init__(self, mod: nn.MultiheadAttention, A: dict, weight: dict[str, torch.Tensor]) -> None:
        E, H = mod.embed_dim, mod.num_heads
        self.H, self.dh = H, E // H
        x, y, z = A["query"], A["key"], A["value"]
        b, T, S = x.shape[0], x.shape[1], y.shape[1]
        if mod._qkv_same_embed_dim:
            Wq, Wk, Wv = weight["in_proj_weight"].chunk(3)
        else:
            Wq, Wk, Wv = weight["q_proj_weight"], weight["k_proj_weight"], weight["v_proj_weight"]
        bq = bk = bv = None
        if "in_proj_bias" in weight:
            bq, bk, bv = weight["in_proj_bias"].chunk(3)
        q = nn.functional.linear(x, Wq, bq)
        k = nn.functional.linear(y, Wk, bk)
        v = nn.functional.linear(z, Wv, bv)
        extra = 0  # key / value positions appended: bias_k and bias_v, then a zero one
        if "bias_k" in weight and "bias_v" in weight:
            k = torch.cat([k, weight["bias_k"].reshape(1, 1, E).expand(b, 1, E)], 1)
            v = torch.cat([v, weight["bias_v"].reshape(1, 1, E).expand(b, 1, E)], 1)
            extra += 1
        if mod.add_zero_attn:
            k, v = (torch.cat([t, t.new_zeros(b, 1, E)], 1) for t in (k, v))
            extra += 1
        self.q, self.k, self.v = (self._heads(t) for t in (q, k, v))  # (b, H, L, d_h)
        mask = self._mask(A, b, T, S, extra, x.dtype)
        scores = self.q @ self.k.transpose(-1, -2) / math.sqrt(self.dh)
        if mask is not None:
            scores = scores + mask
        # rows with every key masked: zero weights (not NaN), as torch's scaled_dot_product_attention gives
        self.P = torch.softmax(scores, -1).nan_to_num(0.0)  # (b, H, T, S')
        self.o = (self.P @ self.v).transpose(1, 2).reshape(b, T, E)
        self.Wo = weight["out_proj.weight"]
        self.out = nn.functional.linear(self.o, self.Wo, weight.get("out_proj.bias"))
        self.average = A["average"]

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], t.shape[1], self.H, self.dh).transpose(1, 2)

    def _mask(self, A: dict, b: int, T: int, S: int, extra: int, dtype: torch.dtype) -> torch.Tensor | None:
        """The additive mask (b or 1, H or 1, T, S + extra) as F.multi_head_attention_forward forms it."""
        kpm, am = A["key_padding_mask"], A["attn_mask"]
        if A["is_causal"] and kpm is None and not A["need_weights"]:
            am = torch.ones(T, S, dtype=torch.bool, device=A["query"].device).tril().logical_not()
        mask = None
        if am is not None:
            am = _additive(am, dtype)
            am = am.reshape(1, 1, T, S) if am.dim() == 2 else am.reshape(b, self.H, T, S)
            mask = am
        if kpm is not None:
            kpm = _additive(kpm, dtype).reshape(b, 1, 1, S)
            mask = kpm if mask is None else mask + kpm
        if mask is not None and extra:
            mask = nn.functional.pad(mask, (0, extra))
        return mask

    def backward(self, G_out: torch.Tensor, G_w: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """Gradients at q, k, v (c, b, L, E) from those at the output (c, b, T, E) and, when returned, at the
        attention weights (c, b, T, S') averaged over heads, or (c, b, H, T, S')."""
        c, b, T, E = G_out.shape
        Go = (G_out @ self.Wo).reshape(c, b, T, self.H, self.dh).transpose(2, 3)  # (c, b, H, T, d_h)
        P = self.P
        dV = P.transpose(-1, -2) @ Go
        dP = Go @ self.v.transpose(-1, -2)
        if G_w is not None:
            dP = dP + (G_w.unsqueeze(2) / self.H if self.average else G_w)
        dS = P * (dP - (dP * P).sum(-1, keepdim=True))
        dQ = dS @ self.k / math.sqrt(self.dh)
        dK = dS.transpose(-1, -2) @ self.q / math.sqrt(self.dh)

        def merged(t: torch.Tensor) -> torch.Tensor:  # (c, b, H, L, d_h) → (c, b, L, E)
            return t.transpose(2, 3).reshape(c, b, t.shape[3], E)

        return merged(dQ), merged(dK), merged(dV)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True: masked) as −inf / 0, a floating one as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)
