"""``nn.Conv1d`` / ``nn.Conv2d`` (zero padding, stock ``forward``): the per-example weight gradient is the layer's
output gradients times its input patches. With one group, kernels take it materialised or, with few positions,
as a position Gram (``spatial``); products keep the input and output gradients and multiply by convolution
(``conv``), materialised as well when the cost model says many-vector products prefer it. Grouped and
depthwise convolutions (few weights per output channel) are materialised per group: for group g, the
gradient of its d_out/G filters is G_g (d_out/G × P) times its patches (P × C_in/G·kh·kw). A Conv1d is handled
as a 2-d convolution of height 1."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from linadapt.jacobian.structured import costs
from linadapt.jacobian.structured.features import ConvGeometry
from linadapt.jacobian.structured.registry import register

__all__ = ["ConvRule"]


@register(nn.Conv1d, nn.Conv2d)
class ConvRule:
    """The rule for 1-d and 2-d convolutions."""

    def applies(self, module: nn.Module) -> bool:
        """Stock ``forward``, zero padding given as numbers (not "same"): otherwise the layer computes something
        its input alone does not show (it goes to the Jacobian-contraction fallback)."""
        stock = {nn.Conv1d: nn.Conv1d.forward, nn.Conv2d: nn.Conv2d.forward}
        base = nn.Conv2d if isinstance(module, nn.Conv2d) else nn.Conv1d
        return (
            type(module).forward is stock[base]
            and module.padding_mode == "zeros"
            and not isinstance(module.padding, str)
        )

    def features(
        self, engine: Any, layer: Any, A: torch.Tensor, G: torch.Tensor, feats: Any, products: bool = False
    ) -> None:
        """Append the layer's factors: A (b, C_in, [H,] W), G (c, b, d_out, [H',] W')."""
        conv = layer.module
        c, b = G.shape[0], A.shape[0]
        if isinstance(conv, nn.Conv1d):
            A, G = A.unsqueeze(-2), G.unsqueeze(-2)
            kernel, dilation, padding, stride = (
                (1, conv.kernel_size[0]),
                (1, conv.dilation[0]),
                (0, conv.padding[0]),
                (1, conv.stride[0]),
            )
        else:
            kernel, dilation, padding, stride = conv.kernel_size, conv.dilation, conv.padding, conv.stride
        Gf = G.reshape(c, b, G.shape[2], -1)  # (c, b, d_out, P)
        parts = []
        if conv.groups > 1:
            if layer.weight:
                groups = conv.groups
                patches = torch.nn.functional.unfold(A, kernel, dilation=dilation, padding=padding, stride=stride)
                patches = patches.reshape(b, groups, -1, patches.shape[-1])  # (b, G, C_in/G·kh·kw, P)
                Gg = Gf.reshape(c, b, groups, -1, Gf.shape[-1])  # (c, b, G, d_out/G, P)
                parts.append(torch.einsum("cbgop,bgkp->bcgok", Gg, patches).reshape(b, c, -1))
            if layer.bias:
                parts.append(Gf.sum(-1).permute(1, 0, 2))
            feats.dense.append(torch.cat(parts, -1))
            feats.dense_names.append([n for n in (layer.weight, layer.bias) if n])
            return
        if layer.weight and products:
            by_conv, materialised = engine._conv_product_forms(layer, A, kernel, Gf)
            if by_conv:
                stored = engine._conv_forms[layer.name][2]
                geometry = _geometry(A, G, kernel, stride, padding, dilation, stored)
                feats.conv.append((A.contiguous(memory_format=torch.channels_last), Gf.reshape(c, b, -1), geometry))
                feats.conv_names.append((layer.weight, layer.bias, materialised))
                return  # the materialised form, if wanted too, is formed from these on first use
        if layer.weight:
            P, k_in, d_out = Gf.shape[3], A.shape[1] * kernel[0] * kernel[1], Gf.shape[2]
            if not products and engine._unexpanded(layer.name, P, k_in, Gf.transpose(2, 3), products):
                patches = torch.nn.functional.unfold(A, kernel, dilation=dilation, padding=padding, stride=stride)
                feats.spatial.append((patches.transpose(1, 2), Gf.transpose(2, 3), layer.bias is not None))
                feats.spatial_names.append((layer.weight, layer.bias))
                return
            if not products and engine.compact and costs.held_as_raw(A[0].numel(), c, d_out, P, k_in):
                # kernels, held for later blocks: input and output gradients take less memory than the
                # materialised gradients (expanded when a block is formed)
                geometry = _geometry(A, G, kernel, stride, padding, dilation, c * d_out * P)
                feats.raw.append((A, Gf, geometry, layer.bias is not None))
                feats.raw_names.append((layer.weight, layer.bias))
                return
            patches = torch.nn.functional.unfold(A, kernel, dilation=dilation, padding=padding, stride=stride)
            parts.append(torch.einsum("cbop,bkp->bcok", Gf, patches).reshape(b, c, -1))
        if layer.bias:
            parts.append(Gf.sum(-1).permute(1, 0, 2))
        feats.dense.append(torch.cat(parts, -1))
        feats.dense_names.append([n for n in (layer.weight, layer.bias) if n])


def _geometry(A: torch.Tensor, G: torch.Tensor, kernel, stride, padding, dilation, stored: int) -> ConvGeometry:
    """The layer's :class:`ConvGeometry` from its input A (b, C_in, H, W), output gradients G (c, b, d_out, H', W')
    and settings; ``stored``: the output-gradient entries kept per example."""
    return ConvGeometry(
        d_out=G.shape[2],
        c_in=A.shape[1],
        kernel=tuple(kernel),
        stride=tuple(stride),
        padding=tuple(padding),
        dilation=tuple(dilation),
        out_hw=tuple(G.shape[3:]),
        c=G.shape[0],
        stored=stored,
        input_entries=A[0].numel(),
    )
