"""Dense NTK by per-layer structure instead of per-example Jacobians of all p parameters.

For a layer z = W a + b applied once per example (``nn.Linear`` on (n, d_in) inputs), the Jacobian of
output a of example i with respect to W is the outer product g_{ia} a_iᵀ, with a_i the layer's input and
g_{ia} = ∂f_a(x_i)/∂z_i the gradient flowing back into the layer's output. So that layer's share of the
NTK is

    Θ_W[i a, j b] = (a_i · a_j) (g_{ia} · g_{jb}),      Θ_b[i a, j b] = g_{ia} · g_{jb},

an (n × n) Gram of inputs times an (n c × n c) Gram of output gradients: O(n² (d_in + c² d_out)) work
against O(n² c² d_in d_out) for contracting the layer's Jacobian, and no per-example gradient is stored.

For layers whose weights are reused over positions (convolutions; ``nn.Linear`` on (n, T, d) inputs) the
per-example, per-output gradient of the layer alone is formed from the layer's inputs (unfolded patches)
and output gradients — g_{ia} (d_out × P) times patches (P × d_in k) — and contracted: one layer at a time,
chunk by chunk, never for all p parameters at once. When the layer has few positions P and many weights
(a 1 × 1 convolution on a 2 × 2 map late in an image network) the position Gram is cheaper:

    Θ_W[i a, j b] = Σ_{s,t} (a_{is} · a_{jt}) (g_{ias} · g_{jbt})      (a_{is}: patch s of example i),

O(P² (d_in k + c² d_out)) per pair of examples against O(c² d_out d_in k); the cheaper form is chosen per layer.
Parameters outside a supported layer (normalisation scales, embeddings, layers used twice, grouped
convolutions, ...) fall back to the Jacobian contraction restricted to them. The layers' inputs and output
gradients come from one forward pass with hooks and c backward passes (one per output) per chunk of examples.

The same factors, kept for fixed training inputs (:class:`FactoredJacobian`), give J v and Jᵀ u without a
pass through the network; the iterative solvers use them (see :class:`~linadapt.inference.posterior.TrainingData`).

The rules assume what every per-example Jacobian in this package assumes: the network treats the
examples of a batch independently (it runs in eval mode). Before the first use on a model the structured
kernel of two examples is checked against the plain Jacobian contraction; if they differ, the plain
contraction is used instead, with a warning.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from linadapt._blocks import blocks, budget_blocks
from linadapt.jacobian.linearization import ALGEBRA_DTYPE, Linearization, _eval_mode

__all__ = ["FactoredJacobian", "StructuredNTK", "factored_jacobian"]

_FEATURE_BUDGET = 2**26  # float64 entries of materialised per-layer gradients held at once (512 MiB)
_FACTOR_MAX_OUTPUTS = 32  # cached factors: building them costs a backward pass per output
_PRODUCT_BUDGET = 2**24  # entries of the per-block temporaries of a product with the cached factors


@dataclass
class _Layer:
    """A supported module and which of its parameters are selected (names in the Linearization)."""

    name: str
    module: nn.Module
    weight: str | None
    bias: str | None


@dataclass
class _Features:
    """What one chunk of examples contributes to kernel blocks, per layer."""

    b: int
    # structured Linear layers: (input (b, d_in) or None when the weight is not selected, output gradients
    # (c, b, d_out), whether the bias is selected)
    outer: list[tuple[torch.Tensor | None, torch.Tensor, bool]] = field(default_factory=list)
    # materialised per-example, per-output gradients of some layers' parameters, (b, c, q)
    dense: list[torch.Tensor] = field(default_factory=list)
    # layers with few positions (position-Gram form): (patches (b, P, k), output gradients (c, b, P, d_out),
    # whether the bias is selected)
    spatial: list[tuple[torch.Tensor, torch.Tensor, bool]] = field(default_factory=list)
    # the parameters behind each entry: (weight name or None, bias name or None) per outer entry; the
    # names in column order per dense entry (each parameter's columns are its flattened entries)
    outer_names: list[tuple[str | None, str | None]] = field(default_factory=list)
    dense_names: list[list[str]] = field(default_factory=list)
    spatial_names: list[tuple[str, str | None]] = field(default_factory=list)
    # convolutions kept for products by convolution (only with ``products``): (layer input (b, C_in, H, W),
    # channels-last; output gradients (c, b, C_out·H'·W'); the layer's geometry)
    conv: list[tuple[torch.Tensor, torch.Tensor, _ConvGeometry]] = field(default_factory=list)
    # per conv entry: (weight name, bias name or None, whether the materialised form is wanted too: cheaper
    # for many vectors)
    conv_names: list[tuple[str, str | None, bool]] = field(default_factory=list)


@dataclass(frozen=True)
class _ConvGeometry:
    """A 2-d convolution's shape (a Conv1d as a 2-d one of height 1): weight (d_out, C_in, *kernel), output
    map ``out_hw``; and the per-example sizes the product cost model needs."""

    d_out: int
    c_in: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    out_hw: tuple[int, int]
    c: int  # network outputs
    stored: int  # output-gradient entries kept per example (d_out·P, times c unless rank one over the outputs)
    input_entries: int  # entries of the layer input per example

    @property
    def positions(self) -> int:  # P
        return self.out_hw[0] * self.out_hw[1]

    @property
    def k_in(self) -> int:  # inputs per patch, C_in·kh·kw
        return self.c_in * self.kernel[0] * self.kernel[1]

    def conv_cost(self, k: int) -> float:
        """:func:`_conv_cost` of this layer for k vectors."""
        return _conv_cost(k, self.positions * self.k_in * self.d_out, self.stored, self.input_entries)

    def dense_cost(self, k: int) -> float:
        """:func:`_dense_cost` of this layer's materialised gradients, c · d_out · (k_in + 1) per example."""
        return _dense_cost(k, self.c * self.d_out * (self.k_in + 1))


class StructuredNTK:
    """Dense NTK blocks of a :class:`~linadapt.jacobian.linearization.Linearization` by per-layer rules.

    Args:
        lin: the linearization (its selected parameters and weight snapshot are used).
        verify: check the rules against the plain Jacobian contraction on two examples before first use.

    Attributes:
        layers: names of the modules handled by a rule. fallback: selected parameters that are not.
        usable: False after a failed check (callers then use the plain contraction).
    """

    def __init__(self, lin: Linearization, verify: bool = True) -> None:
        self.lin = lin
        self.verify = verify
        self.usable = True
        self._checked = False
        self._batched_backward = True
        self._product_forms: dict[str, bool] = {}  # per layer: unexpanded form for products (decided once)
        self._conv_forms: dict[str, tuple[bool, bool, int]] = {}  # per conv: (by convolution, materialised, stored)
        selected = set(lin.param_names)
        owners: dict[int, int] = {}
        for mod in lin.model.modules():
            for p in mod.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        self.layers: list[_Layer] = []
        for mname, mod in lin.model.named_modules():
            if not _supported(mod):
                continue
            names = {}
            for pname in ("weight", "bias"):
                full = f"{mname}.{pname}" if mname else pname
                p = getattr(mod, pname, None)
                if full in selected and isinstance(p, nn.Parameter) and owners.get(id(p), 0) == 1:
                    names[pname] = full
            if names:
                self.layers.append(_Layer(mname, mod, names.get("weight"), names.get("bias")))
        self._set_fallback()

    def _set_fallback(self) -> None:
        covered = {n for layer in self.layers for n in (layer.weight, layer.bias) if n}
        self.fallback = [n for n in self.lin.param_names if n not in covered]
        self._sub = _restricted(self.lin, self.fallback) if self.fallback else None

    def _demote(self, names: list[str]) -> None:
        """Stop using the rules of these layers; their parameters join the Jacobian-contraction fallback."""
        self.layers = [layer for layer in self.layers if layer.name not in names]
        self._set_fallback()

    # ------------------------------------------------------------------ features of one chunk
    def _features(self, xb: torch.Tensor, dtype: torch.dtype = ALGEBRA_DTYPE, products: bool = False) -> _Features:
        """Per-layer factors of J(xb) in ``dtype`` (float64 for kernels, see below); with ``products``, each
        reused-weight layer in the form cheaper for Jacobian-vector products rather than for kernels."""
        lin = self.lin
        b = xb.shape[0]
        inputs: dict[str, list[torch.Tensor]] = {layer.name: [] for layer in self.layers}
        outputs: dict[str, list[torch.Tensor]] = {layer.name: [] for layer in self.layers}

        def hook_for(name: str):
            def hook(_mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
                inputs[name].append(args[0])
                outputs[name].append(out)

            return hook

        handles = [layer.module.register_forward_hook(hook_for(layer.name)) for layer in self.layers]
        try:
            theta = {k: v.detach().requires_grad_(True) for k, v in lin.theta.items()}
            with torch.enable_grad(), _eval_mode(lin.model):
                out = lin._f(theta, xb)
                bad = [
                    layer.name
                    for layer in self.layers
                    if len(outputs[layer.name]) != 1  # reused (or unused) in the forward pass
                    or inputs[layer.name][0].shape[0] != b
                    or outputs[layer.name][0].shape[0] != b  # batch not the first dimension
                ]
                if bad:
                    raise _RuleError(bad)
                zs = [outputs[layer.name][0] for layer in self.layers]
                grads = self._output_gradients(out, zs)
        finally:
            for h in handles:
                h.remove()
        feats = _Features(b)
        for layer, G in zip(self.layers, grads):  # G: (c, b, *out_shape)
            # products in float64 whatever the network's dtype: the kernel must stay positive semi-definite
            # to float64 precision for the solves (float32 products perturb its eigenvalues by ~1e-7·‖K‖)
            G = G.detach().to(dtype)
            A = inputs[layer.name][0].detach().to(dtype)
            self._layer_features(layer, A, G, feats, products)
        if self._sub is not None:
            feats.dense.append(self._sub._jacobian_chunk(xb).to(dtype))
            feats.dense_names.append(list(self.fallback))
        return feats

    def _output_gradients(self, out: torch.Tensor, zs: list[torch.Tensor]) -> list[torch.Tensor]:
        """∂f_a/∂z for every layer output z and output a, each (c, b, *z.shape[1:]): one batched backward
        pass over the c one-hot cotangents (c separate passes where batching is not supported)."""
        c = out.shape[1]
        if self._batched_backward:
            eye = torch.eye(c, dtype=out.dtype, device=out.device)
            cot = eye[:, None, :].expand(c, out.shape[0], c)
            try:
                gs = torch.autograd.grad(out, zs, cot, retain_graph=True, allow_unused=True, is_grads_batched=True)
                return [z.new_zeros(c, *z.shape) if g is None else g for g, z in zip(gs, zs)]
            except RuntimeError:
                self._batched_backward = False
        per_output: list[list[torch.Tensor]] = [[] for _ in zs]
        for a in range(c):
            gs = torch.autograd.grad(out[:, a].sum(), zs, retain_graph=True, allow_unused=True)
            for k, (g, z) in enumerate(zip(gs, zs)):
                per_output[k].append(torch.zeros_like(z) if g is None else g)
        return [torch.stack(g) for g in per_output]

    def _layer_features(
        self, layer: _Layer, A: torch.Tensor, G: torch.Tensor, feats: _Features, products: bool = False
    ) -> None:
        mod, c, b = layer.module, G.shape[0], A.shape[0]
        if isinstance(mod, nn.Linear):
            if A.dim() == 2:
                feats.outer.append((A if layer.weight else None, G, layer.bias is not None))
                feats.outer_names.append((layer.weight, layer.bias))
                return
            A3 = A.reshape(b, -1, A.shape[-1])  # (b, T, d_in)
            G4 = G.reshape(c, b, -1, G.shape[-1])  # (c, b, T, d_out)
            if layer.weight and self._unexpanded(layer, A3.shape[1], A3.shape[2], G4, products):
                feats.spatial.append((A3, G4, layer.bias is not None))
                feats.spatial_names.append((layer.weight, layer.bias))
                return
            parts = []
            if layer.weight:
                parts.append(torch.einsum("cbto,bti->bcoi", G4, A3).reshape(b, c, -1))
            if layer.bias:
                parts.append(G4.sum(2).permute(1, 0, 2))
            feats.dense.append(torch.cat(parts, -1))
            feats.dense_names.append([n for n in (layer.weight, layer.bias) if n])
            return
        # Conv1d / Conv2d, groups = 1, zero padding
        conv = mod
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
        if layer.weight and products:
            by_conv, materialised = self._conv_product_forms(layer, A, kernel, Gf)
            if by_conv:
                geometry = _ConvGeometry(
                    d_out=G.shape[2],
                    c_in=A.shape[1],
                    kernel=tuple(kernel),
                    stride=tuple(stride),
                    padding=tuple(padding),
                    dilation=tuple(dilation),
                    out_hw=tuple(G.shape[3:]),
                    c=c,
                    stored=self._conv_forms[layer.name][2],
                    input_entries=A[0].numel(),
                )
                feats.conv.append((A.contiguous(memory_format=torch.channels_last), Gf.reshape(c, b, -1), geometry))
                feats.conv_names.append((layer.weight, layer.bias, materialised))
                return  # the materialised form, if wanted too, is formed from these on first use
        if layer.weight:
            patches = torch.nn.functional.unfold(A, kernel, dilation=dilation, padding=padding, stride=stride)
            G4 = Gf.transpose(2, 3)  # (c, b, P, d_out)
            if not products and self._unexpanded(layer, patches.shape[2], patches.shape[1], G4, products):
                feats.spatial.append((patches.transpose(1, 2), G4, layer.bias is not None))
                feats.spatial_names.append((layer.weight, layer.bias))
                return
            parts.append(torch.einsum("cbop,bkp->bcok", Gf, patches).reshape(b, c, -1))
        if layer.bias:
            parts.append(Gf.sum(-1).permute(1, 0, 2))
        feats.dense.append(torch.cat(parts, -1))
        feats.dense_names.append([n for n in (layer.weight, layer.bias) if n])

    def _unexpanded(self, layer: _Layer, P: int, k: int, G4: torch.Tensor, products: bool) -> bool:
        """Whether a reused-weight layer is kept as patches and output gradients G4 (c, b, P, d_out) rather than
        as materialised per-example gradients. For products the choice is made on the first chunk and kept
        (all chunks must agree to be joined); output gradients of rank one over the outputs (see
        :func:`_rank_one_outputs`) are stored once rather than per output."""
        c, d_out = G4.shape[0], G4.shape[-1]
        if not products:  # kernels: the position-Gram form
            return _position_gram_cheaper(P, k, d_out, c)
        if layer.name not in self._product_forms:
            rank_one = _rank_one_outputs(G4.reshape(c, G4.shape[1], -1)) is not None
            self._product_forms[layer.name] = _position_form_for_products(P, k, d_out, c, rank_one)
        return self._product_forms[layer.name]

    def _conv_product_forms(
        self, layer: _Layer, A: torch.Tensor, kernel: tuple[int, int], Gf: torch.Tensor
    ) -> tuple[bool, bool]:
        """For products: whether a convolution is kept for products by convolution (its input and output
        gradients) and whether as materialised per-example gradients — by :func:`_conv_forms`, decided on the
        first chunk and kept (all chunks must agree to be joined). When both win for some number of vectors, the
        factors keep the convolution form and materialise the other on the first product that wants it."""
        if layer.name not in self._conv_forms:
            c, d_out, P = Gf.shape[0], Gf.shape[2], Gf.shape[3]
            rank_one = _rank_one_outputs(Gf.reshape(c, Gf.shape[1], -1)) is not None
            stored = (1 if rank_one else c) * P * d_out
            k_in = A.shape[1] * kernel[0] * kernel[1]
            by_conv, materialised = _conv_forms(P, k_in, d_out, c, stored, A[0].numel())
            self._conv_forms[layer.name] = (by_conv, materialised, stored)
        by_conv, materialised, _ = self._conv_forms[layer.name]
        return by_conv, materialised

    # ------------------------------------------------------------------ blocks
    @staticmethod
    def _block(f1: _Features, f2: _Features, trace: bool) -> torch.Tensor:
        """Kernel block between two chunks: (b1, c, b2, c), or (b1, b2) summed over outputs with ``trace``."""
        b1, b2 = f1.b, f2.b
        out = None
        for (A1, G1, bias), (A2, G2, _) in zip(f1.outer, f2.outer):
            # weight and bias share the output-gradient Gram: Θ = (g·g) ⊙ (a·a [+ 1 with the bias])
            if trace:  # Σ_a g_ia · g_ja: G as (b, c·d_out)
                term = G1.permute(1, 0, 2).reshape(b1, -1) @ G2.permute(1, 0, 2).reshape(b2, -1).T
                if A1 is not None:
                    term.mul_(A1 @ A2.T + 1.0 if bias else A1 @ A2.T)
            else:  # rows (i, a): G as (b·c, d_out)
                term = G1.permute(1, 0, 2).reshape(b1 * G1.shape[0], -1)
                term = term @ G2.permute(1, 0, 2).reshape(b2 * G2.shape[0], -1).T
                term = term.view(b1, G1.shape[0], b2, G2.shape[0])
                if A1 is not None:
                    term.mul_((A1 @ A2.T + 1.0 if bias else A1 @ A2.T)[:, None, :, None])
            out = term if out is None else out.add_(term)
        for (A1, G1, bias), (A2, G2, _) in zip(f1.spatial, f2.spatial):
            term = _position_gram_block(A1, G1, A2, G2, bias, trace)
            out = term if out is None else out.add_(term)
        for D1, D2 in zip(f1.dense, f2.dense):
            if trace:
                term = torch.einsum("iaq,jaq->ij", D1, D2)
            else:
                term = (D1.reshape(b1 * D1.shape[1], -1) @ D2.reshape(b2 * D2.shape[1], -1).T).view(
                    b1, D1.shape[1], b2, D2.shape[1]
                )
            out = term if out is None else out.add_(term)
        assert out is not None
        return out

    @staticmethod
    def _diag_blocks(f: _Features) -> torch.Tensor:
        """Per-example c × c blocks J(x_i) J(x_i)ᵀ, (b, c, c), float64."""
        out = None
        for A, G, bias in f.outer:
            Gi = G.permute(1, 0, 2)  # (b, c, d_out)
            term = Gi @ Gi.transpose(1, 2)
            if A is not None:
                sq = (A * A).sum(1)
                term.mul_((sq + 1.0 if bias else sq)[:, None, None])
            out = term if out is None else out.add_(term)
        for A, G, bias in f.spatial:
            AA = A @ A.transpose(1, 2)  # (b, P, P)
            if bias:
                AA = AA + 1.0
            Gi = G.permute(1, 0, 2, 3)  # (b, c, P, d_out)
            term = torch.einsum("bst,bcso,bdto->bcd", AA, Gi, Gi)
            out = term if out is None else out.add_(term)
        for D in f.dense:
            term = D @ D.transpose(1, 2)
            out = term if out is None else out.add_(term)
        assert out is not None
        return out

    # ------------------------------------------------------------------ public
    def check(self, X: torch.Tensor) -> bool:
        """Compare the rules with plain autodiff on (up to) two examples; remember the outcome.

        With U three random output-space vectors on those examples, Uᵀ K U from the rules must equal
        (Jᵀ U)ᵀ (Jᵀ U) from vector-Jacobian products (one vjp, no per-example Jacobian of all p parameters).
        """
        if self._checked:
            return self.usable
        self._checked = True
        xb = X[:2]
        while True:
            if not self.layers:  # no layer keeps a rule (e.g. every one is run twice): no structured kernel
                self.usable = False
                return False
            try:
                f = self._features(xb)
                break
            except _RuleError as exc:  # layers run twice, or not batch-first: their parameters fall back
                self._demote(exc.args[0])
        if not self.verify:
            return True
        mine = self._block(f, f, trace=False)
        b, c = mine.shape[0], mine.shape[1]
        gen = torch.Generator().manual_seed(0)
        U = torch.randn(3, b, c, generator=gen, dtype=ALGEBRA_DTYPE).to(self.lin.device)
        W = self.lin.vjp(xb, U)  # (3, p)
        ref = W @ W.T
        Uf = U.reshape(3, b * c)
        got = Uf @ mine.reshape(b * c, b * c) @ Uf.T
        scale = ref.diagonal().abs().sqrt()
        err = ((got - ref).abs() / (scale[:, None] * scale[None, :]).clamp_min(1e-30)).max()
        tol = 1e-4 if self.lin.net_dtype != torch.float64 else 1e-9
        if float(err) > tol:
            self.usable = False
            warnings.warn(
                f"structured NTK of {type(self.lin.model).__name__} disagrees with autodiff (relative error "
                f"{float(err):.2e}; does the model mix the examples of a batch?): using the Jacobian contraction",
                stacklevel=3,
            )
        return self.usable

    def kernel(self, X1: torch.Tensor, X2: torch.Tensor | None = None, output: Any = None) -> torch.Tensor:
        """Dense NTK, float64, for prepared inputs.

        ``output=None``: J(X1) J(X2)ᵀ, (n1·c, n2·c) example-major; ``"sum"``: Σ_a J_a(X1) J_a(X2)ᵀ, (n1, n2);
        an index a: J_a(X1) J_a(X2)ᵀ, (n1, n2).
        """
        c = self.lin.output_dim(X1)
        trace = output is not None
        pick = None if output is None or output == "sum" else int(output)
        features = self._features if pick is None else (lambda x: _only_output(self._features(x), pick))
        size = self._size(X1, c)
        if X2 is None:  # compute blocks j ≥ i only: with 4 or more chunks that is ≤ 5/8 of the work
            size = min(size, max(32, -(-X1.shape[0] // 4)))
        chunks1 = [X1[i : i + size] for i in range(0, X1.shape[0], size)]
        second = X1 if X2 is None else X2
        chunks2 = chunks1 if X2 is None else [second[i : i + size] for i in range(0, second.shape[0], size)]
        cache = second.shape[0] * self._example_bytes <= 8 * 2 * _FEATURE_BUDGET  # all features of X2 ≤ 1 GiB
        feats2 = [features(x) for x in chunks2] if cache else None
        n1, n2 = X1.shape[0], second.shape[0]
        K = torch.zeros((n1, n2) if trace else (n1, c, n2, c), dtype=ALGEBRA_DTYPE, device=self.lin.device)
        o1 = 0
        for i, x1 in enumerate(chunks1):
            f1 = feats2[i] if (X2 is None and feats2 is not None) else features(x1)
            o2 = 0
            for j, x2 in enumerate(chunks2):
                b1, b2 = x1.shape[0], x2.shape[0]
                if X2 is None and j < i:
                    o2 += b2
                    continue
                f2 = feats2[j] if feats2 is not None else features(x2)
                block = self._block(f1, f2, trace)
                if X2 is None and j == i:  # exactly symmetric diagonal blocks
                    block = 0.5 * (block + (block.T if trace else block.permute(2, 3, 0, 1)))
                if trace:
                    K[o1 : o1 + b1, o2 : o2 + b2] = block
                    if X2 is None and j > i:
                        K[o2 : o2 + b2, o1 : o1 + b1] = block.T
                else:
                    K[o1 : o1 + b1, :, o2 : o2 + b2, :] = block
                    if X2 is None and j > i:
                        K[o2 : o2 + b2, :, o1 : o1 + b1, :] = block.permute(2, 3, 0, 1)
                o2 += b2
            o1 += x1.shape[0]
        return K if trace else K.reshape(n1 * c, n2 * c)

    def pair_flops(self, X: torch.Tensor) -> float:
        """Multiply-adds per pair of examples of the full (c × c block) kernel by these rules: Σ over Linear
        layers of d_in + c² d_out, over position-Gram layers of P² (k + c² d_out), over materialised blocks of
        c² q (q: their columns, the fallback's included). From the features of one example of X."""
        f = self._features(X[:1])
        flops = 0.0
        for A, G, _ in f.outer:
            c = G.shape[0]
            flops += (0 if A is None else A.shape[-1]) + c * c * G.shape[-1]
        for A, G, _ in f.spatial:
            c, P = G.shape[0], A.shape[1]
            flops += P * P * (A.shape[-1] + c * c * G.shape[-1])
        for D in f.dense:
            flops += D.shape[1] ** 2 * D.shape[2]
        return flops

    def diagonal_blocks(self, X: torch.Tensor) -> torch.Tensor:
        """Per-example blocks J(x_i) J(x_i)ᵀ, (n, c, c), float64."""
        c = self.lin.output_dim(X)
        size = self._size(X, c)
        return torch.cat([self._diag_blocks(self._features(X[i : i + size])) for i in range(0, X.shape[0], size)])

    def _size(self, X: torch.Tensor, c: int) -> int:
        """Examples per chunk so that a chunk's materialised per-layer gradients stay within budget."""
        if not hasattr(self, "_dense_q"):
            probe = self._features(X[:1])
            self._dense_q = sum(f.shape[-1] for f in probe.dense)
            self._dense_q += sum(G.shape[2] * G.shape[3] for _, G, _ in probe.spatial)
            self._example_bytes = FactoredJacobian.feature_bytes(probe)
        per_example = max(1, c * self._dense_q)
        return max(1, min(self.lin.chunk_size or 256, _FEATURE_BUDGET // per_example))


def _only_output(f: _Features, a: int) -> _Features:
    """The features of output a alone (the kernel of J_a)."""
    return _Features(
        f.b,
        [(A, G[a : a + 1], bias) for A, G, bias in f.outer],
        [D[:, a : a + 1] for D in f.dense],
        [(A, G[a : a + 1], bias) for A, G, bias in f.spatial],
        f.outer_names,
        f.dense_names,
        f.spatial_names,
    )


class FactoredJacobian:
    """J(X) for fixed inputs X, held as the per-layer factors of :class:`StructuredNTK` (layer inputs and
    output gradients; materialised per-example gradients for parameters without a rule; either for
    convolutions, or both).

    Products then need no pass through the network: for a Linear layer with inputs a_i and output
    gradients g_ia, (Jᵀ u)_W = Σ_i (Σ_a u_ia g_ia) a_iᵀ and (J v)_ia = g_ia · (V_W a_i + v_b); a
    materialised block D (n, c, q) gives Σ_ia u_ia D_ia and D v; a convolution held as its input and output
    gradients gives J v = g_ia · conv(a_i, V_W) (+ v_b) and Jᵀ u = the convolution's weight gradient for the
    output cotangent Σ_a u_ia g_ia (each for all vectors at once; the form per layer and per number of vectors
    by :func:`_conv_forms`, :func:`_conv_cost` and :func:`_dense_cost`). Built once (one forward and one
    batched backward pass over the c outputs per chunk); used by the iterative solvers, which multiply by the
    same training Jacobian hundreds of times.

    The factors and the products are in the network's dtype, as in the torch.func products (for a float32
    network these are float32 products, returned as float64), until :meth:`promote` holds them in float64.

    Args:
        engine: a checked :class:`StructuredNTK`. X: (n, ...) prepared inputs. chunks: the example slices
            the factors are built over (bounding the memory of each backward pass); they are then joined.
            budget: bytes the factors may take, materialised convolution gradients formed later included
            (None: no limit).
    """

    def __init__(self, engine: StructuredNTK, X: torch.Tensor, chunks: list[slice], budget: int | None = None) -> None:
        lin = engine.lin
        self.lin, self.n, self.dtype = lin, X.shape[0], lin.net_dtype
        f = _join((engine._features(X[sl], self.dtype, products=True) for sl in chunks), self.n)
        self.c = lin.output_dim(X)
        # Linear layers: (inputs (n, d_in) or None, output gradients, weight, bias names); the output gradients
        # as None when they are the identity (a layer producing the network's outputs: g_ia = e_a), as the
        # factors (R (c, d_out), D (n, d_out)) when g_ia = R_a ⊙ D_i (a layer followed by an elementwise
        # activation and the output layer), else as (c, n, d_out)
        self.outer = [(A, _compact(G), w, b) for (A, G, _), (w, b) in zip(f.outer, f.outer_names)]
        self._widths = [G.shape[0] * G.shape[2] for _, G, _ in f.outer]
        self.dense = list(zip(f.dense, f.dense_names))  # ((n, c, q), parameter names in column order)
        # reused-weight layers kept unexpanded: (patches (n, P, k), output gradients over P·d_out as above,
        # weight, bias names)
        self.spatial = [
            (A, _compact(G.reshape(G.shape[0], G.shape[1], -1)), w, b)
            for (A, G, _), (w, b) in zip(f.spatial, f.spatial_names)
        ]
        self._widths += [G.shape[0] * G.shape[2] * G.shape[3] for _, G, _ in f.spatial]
        # convolutions multiplied by convolution: (input (n, C_in, H, W) channels-last, output gradients over
        # P·d_out as above, reordered position-major — each position's d_out channels contiguous, the layout of a
        # channels-last convolution's result, so that the products need no copy —, geometry, weight, bias names)
        self.conv = []
        for (A, G, geo), (w, b, _) in zip(f.conv, f.conv_names):
            compact = _compact(G)
            if compact is None:  # the network's outputs (g_ia = e_a): reordered, no longer the identity
                ones = torch.ones(1, G.shape[0], dtype=G.dtype, device=G.device).expand(self.n, -1)
                compact = (torch.eye(G.shape[0], dtype=G.dtype, device=G.device), ones)
            self.conv.append((A, _position_major(compact, geo), geo, w, b))
        # per conv entry: whether its materialised form is wanted (cheaper for many vectors), and its index in
        # ``dense`` once formed (on the first product that prefers it, within ``budget``)
        self._wants_dense = [wanted for *_, wanted in f.conv_names]
        self._twin: list[int | None] = [None] * len(self.conv)
        self.budget = budget
        self._widths += [geo.d_out * geo.positions for _, _, geo in f.conv]
        offsets, start = {}, 0
        for name, numel in zip(lin.param_names, lin.numels):
            offsets[name] = slice(start, start + numel)
            start += numel
        self._slices = offsets

    def promote(self) -> bool:
        """Hold the factors in float64 from now on, so that products are exact to float64 rounding for the
        linear map they define (float32 rounding makes the products neither exactly linear nor symmetric: CG stalls at
        ≈ condition number × 1e-7). True if done; False when already float64 or the doubled factors would
        exceed ``budget``."""
        if self.dtype == torch.float64:
            return False
        if self.budget is not None and 2 * self.nbytes() > self.budget:
            return False

        def up(G: _OutputGradients) -> _OutputGradients:
            if G is None:
                return None
            return tuple(t.double() for t in G) if isinstance(G, tuple) else G.double()

        self.outer = [(None if A is None else A.double(), up(G), w, b) for A, G, w, b in self.outer]
        self.spatial = [(A.double(), up(G), w, b) for A, G, w, b in self.spatial]
        self.conv = [(A.double(), up(G), geo, w, b) for A, G, geo, w, b in self.conv]  # keeps channels-last
        self.dense = [(D.double(), names) for D, names in self.dense]
        self.dtype = torch.float64
        return True

    def nbytes(self) -> int:
        """Memory held by the factors."""
        tensors = [D for D, _ in self.dense]
        pairs = [(A, G) for A, G, _, _ in self.outer + self.spatial] + [(A, G) for A, G, *_ in self.conv]
        for A, G in pairs:
            tensors += [t for t in (A, *(G if isinstance(G, tuple) else (G,))) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    @staticmethod
    def feature_bytes(f: _Features) -> int:
        tensors = [t for A, G, _ in f.outer for t in (A, G) if t is not None] + list(f.dense)
        tensors += [t for A, G, _ in f.spatial for t in (A, G)]
        tensors += [t for A, G, _ in f.conv for t in (A, G)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def _conv_routes(self, k: int) -> tuple[list[int], set[int]]:
        """For a product with k vectors: the conv entries used, and the dense blocks skipped because the same
        layer goes by convolution. A layer whose materialised form is wanted takes it when that is cheaper for k
        (:func:`_conv_cost`, :func:`_dense_cost`), forming it first if need be."""
        used, skipped = [], set()
        for i, (_, _, geo, _, _) in enumerate(self.conv):
            if self._wants_dense[i] and geo.dense_cost(k) < geo.conv_cost(k):
                if self._twin[i] is None:
                    self._twin[i] = self._materialise(i)
                if self._twin[i] is not None:
                    continue
            used.append(i)
            if self._twin[i] is not None:
                skipped.add(self._twin[i])
        return used, skipped

    def _materialise(self, i: int) -> int | None:
        """Form the per-example gradients of conv entry i from its held input and output gradients (no pass
        through the network) as a block of ``dense``; its index, or None (and not wanted again) when it would
        not fit the budget."""
        A, G, geo, w, b = self.conv[i]
        P, k_in = geo.positions, geo.k_in
        q = geo.d_out * k_in + (geo.d_out if b is not None else 0)
        if self.budget is not None and self.nbytes() + self.n * self.c * q * A.element_size() > self.budget:
            self._wants_dense[i] = False
            return None
        D = A.new_empty(self.n, self.c, q)
        for sl in budget_blocks(self.n, self.c * geo.d_out * (P + k_in) + P * k_in, _PRODUCT_BUDGET):  # temporaries
            Gb = (G[0][:, None] * G[1][None, sl]) if isinstance(G, tuple) else G[:, sl]  # (c, nb, P·d_out)
            Gb = Gb.unflatten(-1, (P, geo.d_out))
            patches = torch.nn.functional.unfold(A[sl], geo.kernel, geo.dilation, geo.padding, geo.stride)
            D[sl, :, : geo.d_out * k_in] = torch.einsum("cbpo,bkp->bcok", Gb, patches).flatten(2)
            if b is not None:
                D[sl, :, geo.d_out * k_in :] = Gb.sum(2).transpose(0, 1)
        self.dense.append((D, [w] if b is None else [w, b]))
        return len(self.dense) - 1

    def _blocks(self, k: int) -> list[slice]:
        """Example blocks bounding the temporaries of a product with k vectors (k · block · width entries)."""
        width = max([*self._widths, self.c])
        return budget_blocks(self.n, k * width, _PRODUCT_BUDGET)

    def vjp(self, U: torch.Tensor) -> torch.Tensor:
        """Jᵀ U for U (k, n, c): (k, p), float64."""
        U = U.to(self.dtype)
        k = U.shape[0]
        out = torch.zeros(k, self.lin.num_params, dtype=self.dtype, device=U.device)
        conv, skipped = self._conv_routes(k)
        for sl in self._blocks(k):
            Ub = U[:, sl]
            for i in conv:  # Σ_i (Σ_a u_ia g_ia) ⋆ a_i: the convolution's weight gradient, all k vectors at once
                A, G, geo, w, b = self.conv[i]
                nb, (h, wd), d = A[sl].shape[0], geo.out_hw, geo.d_out
                W = _contract_any(G, Ub, sl, examples_first=True).reshape(k, nb, h, wd, d)  # per position, channel
                # (nb, k·d_out, h, w) in channels-last memory: a view for one vector
                grad = W[0] if k == 1 else W.permute(1, 2, 3, 0, 4).reshape(nb, h, wd, k * d)
                grad = grad.permute(0, 3, 1, 2)
                shape = (k * d, geo.c_in, *geo.kernel)
                gw = torch.nn.grad.conv2d_weight(A[sl], shape, grad, geo.stride, geo.padding, geo.dilation)
                out[:, self._slices[w]] += gw.reshape(k, -1)
                if b is not None:
                    out[:, self._slices[b]] += W.reshape(k, -1, d).sum(1)
            for A, G, w, b in self.outer:
                W = _contract_any(G, Ub, sl)  # (k, block, d_out): Σ_a u_ia g_ia
                if w is not None:  # Σ_i w_i a_iᵀ: one matrix product for all k vectors
                    Wt = W.transpose(1, 2).reshape(k * W.shape[-1], -1)  # (k·d_out, block); a view for k = 1
                    out[:, self._slices[w]] += torch.mm(Wt, A[sl]).reshape(k, -1)
                if b is not None:
                    out[:, self._slices[b]] += W.sum(1)
            for A, G, w, b in self.spatial:
                nb, P, d_in = A[sl].shape
                W = _contract_any(G, Ub, sl).reshape(k, nb * P, -1)  # Σ_a u_ia g_ias, rows (example, s)
                out[:, self._slices[w]] += torch.einsum("kro,ri->koi", W, A[sl].reshape(nb * P, d_in)).reshape(k, -1)
                if b is not None:
                    out[:, self._slices[b]] += W.sum(1)
            for j, (D, names) in enumerate(self.dense):
                if j in skipped:
                    continue
                flat = torch.einsum("bcq,kbc->kq", D[sl], Ub)
                q0 = 0
                for name in names:
                    sl_p = self._slices[name]
                    out[:, sl_p] += flat[:, q0 : q0 + sl_p.stop - sl_p.start]
                    q0 += sl_p.stop - sl_p.start
        return out.to(ALGEBRA_DTYPE)

    def jvp(self, V: torch.Tensor) -> torch.Tensor:
        """J V for V (k, p): (k, n, c), float64."""
        V = V.to(self.dtype)
        k = V.shape[0]
        out = torch.zeros(k, self.n, self.c, dtype=self.dtype, device=V.device)
        pieces = []
        for A, G, w, b in self.outer:
            d_out = _width(G, self.c)
            Vw = None if w is None else V[:, self._slices[w]].reshape(k, d_out, A.shape[-1])  # (k, o, i)
            vb = None if b is None else V[:, self._slices[b]].unsqueeze(1)  # (k, 1, o)
            pieces.append((A, G, Vw, vb))
        conv, skipped = self._conv_routes(k)
        dense = [
            (D, torch.cat([V[:, self._slices[name]] for name in names], dim=1))
            for j, (D, names) in enumerate(self.dense)
            if j not in skipped
        ]
        convs = []
        for i in conv:
            A, G, geo, w, b = self.conv[i]
            Vw = V[:, self._slices[w]].reshape(k * geo.d_out, geo.c_in, *geo.kernel)
            convs.append((A, G, geo, Vw, None if b is None else V[:, self._slices[b]].reshape(-1)))
        spatial = []
        for A, G, w, b in self.spatial:
            d_out = _width(G, self.c) // A.shape[1]
            Vw = V[:, self._slices[w]].reshape(k, d_out, A.shape[-1])
            spatial.append((A, G, Vw, None if b is None else V[:, self._slices[b]][:, None, :]))
        for sl in self._blocks(k):
            for A, G, geo, Vw, vb in convs:  # the convolution of a_i with the k weight directions at once
                M = torch.nn.functional.conv2d(A[sl], Vw, vb, geo.stride, geo.padding, geo.dilation)
                nb, P = M.shape[0], geo.positions
                # (nb, k, P·d_out) position-major: a view of the channels-last result for one vector
                M = M.permute(0, 2, 3, 1).reshape(nb, P, k, geo.d_out).transpose(1, 2).reshape(nb, k, -1)
                out[:, sl] += _expand_any(G, M, sl, examples_first=True)
            for A, G, Vw, vb in spatial:
                nb, P, d_in = A[sl].shape
                M = torch.einsum("ri,koi->kro", A[sl].reshape(nb * P, d_in), Vw)
                if vb is not None:
                    M += vb
                out[:, sl] += _expand_any(G, M.reshape(k, nb, -1), sl)  # Σ_s g_ias · (V_W a_is + v_b)
            for A, G, Vw, vb in pieces:
                if Vw is None:
                    M = vb.transpose(0, 1).expand(sl.stop - sl.start, k, vb.shape[-1])
                else:  # (block, k, d_out): V_W a_i [+ v_b], one matrix product for all k vectors
                    d_out = Vw.shape[1]
                    M = torch.nn.functional.linear(A[sl], Vw.reshape(k * d_out, -1)).reshape(-1, k, d_out)
                    if vb is not None:
                        M += vb.transpose(0, 1)
                out[:, sl] += _expand_any(G, M, sl, examples_first=True)
            for D, Vq in dense:
                out[:, sl] += torch.einsum("bcq,kq->kbc", D[sl], Vq)
        return out.to(ALGEBRA_DTYPE)


def _join(parts: Iterable[_Features], n: int) -> _Features:
    """The factors of consecutive chunks (n examples in all) as one, concatenated along the examples: each
    chunk is copied into tensors allocated for all n examples as it comes, so the peak memory is the joined
    factors plus one chunk's (a concatenation at the end would hold every chunk twice)."""
    joined, start = None, 0
    for f in parts:
        if joined is None:
            if f.b == n:
                return f
            joined = _Features(
                n,
                outer=[(_allocate(A, 0, n), _allocate(G, 1, n), bias) for A, G, bias in f.outer],
                dense=[_allocate(D, 0, n) for D in f.dense],
                spatial=[(_allocate(A, 0, n), _allocate(G, 1, n), bias) for A, G, bias in f.spatial],
                outer_names=f.outer_names,
                dense_names=f.dense_names,
                spatial_names=f.spatial_names,
                conv=[(_allocate(A, 0, n), _allocate(G, 1, n), geo) for A, G, geo in f.conv],
                conv_names=f.conv_names,
            )
        pairs = [(t, jt, 0) for t, jt in zip(f.dense, joined.dense)]
        for mine, theirs in ((f.outer, joined.outer), (f.spatial, joined.spatial), (f.conv, joined.conv)):
            for (A, G, _), (jA, jG, _) in zip(mine, theirs):
                pairs += [(A, jA, 0), (G, jG, 1)]
        for t, jt, dim in pairs:
            if t is not None:
                jt.narrow(dim, start, t.shape[dim]).copy_(t)
        start += f.b
        del f, pairs  # this chunk's factors are freed before the next one is computed
    assert joined is not None and start == n
    return joined


def _allocate(t: torch.Tensor | None, dim: int, n: int) -> torch.Tensor | None:
    """An empty tensor like ``t`` (channels-last if ``t`` is) with n entries along ``dim``."""
    if t is None:
        return None
    shape = list(t.shape)
    shape[dim] = n
    last = t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    layout = torch.channels_last if last else torch.contiguous_format
    return torch.empty(shape, dtype=t.dtype, device=t.device, memory_format=layout)


_READ_COST = 16  # multiply-adds per entry read from memory (≈ 60 GMAC/s of matrix products against ≈ 15 GB/s)
_BOTH_FORMS_AT = 16  # a convolution's materialised gradients are also kept if they win at this many vectors


def _conv_cost(k: int, macs: int, stored: int, input_entries: int) -> float:
    """Multiply-add equivalents per example of J(Jᵀ·) for k vectors through a convolution by convolution
    (``macs`` per vector and direction): two convolutions per vector, and one pass per direction over the
    stored output gradients (k multiply-adds per entry) and the layer input."""
    return 2 * k * macs + 2 * (_READ_COST + k) * stored + 2 * _READ_COST * input_entries


def _dense_cost(k: int, entries: int) -> float:
    """The same through materialised per-example gradients (``entries`` per example): one pass over them and
    k multiply-adds per entry, per direction."""
    return 2 * (_READ_COST + k) * entries


def _conv_forms(P: int, k_in: int, d_out: int, c: int, stored: int, input_entries: int) -> tuple[bool, bool]:
    """(by convolution, materialised): how a convolution (P output positions, k_in = C_in·kh·kw inputs per
    patch, d_out channels, c network outputs, ``stored`` output-gradient entries per example) is kept for
    products. By convolution when that is cheaper for one vector (the conjugate-gradient case: a materialised
    block is then a memory-bound pass for little arithmetic); materialised as well when that is cheaper for
    :data:`_BOTH_FORMS_AT` vectors (the probes of the evidence's stochastic estimates)."""
    macs, entries = P * k_in * d_out, c * d_out * (k_in + 1)
    by_conv = _conv_cost(1, macs, stored, input_entries) < _dense_cost(1, entries)
    at = _BOTH_FORMS_AT
    materialised = not by_conv or _dense_cost(at, entries) < _conv_cost(at, macs, stored, input_entries)
    return by_conv, materialised


_MAX_POSITION_PAIRS = 256  # the position-Gram form loops over P² position pairs


def _position_gram_cheaper(P: int, k: int, d_out: int, c: int) -> bool:
    """Whether a reused-weight layer (P positions, k inputs per position, d_out outputs, c network outputs)
    is cheaper in the position-Gram form — O(P² (k + c² d_out)) per pair of examples — than by contracting its
    materialised per-example gradients, O(c² d_out k); with a factor 2 in favour of the latter."""
    return P * P <= _MAX_POSITION_PAIRS and 2 * P * P * (k + c * c * (d_out + 1)) < c * c * d_out * k


def _position_form_for_products(P: int, k: int, d_out: int, c: int, rank_one: bool = False) -> bool:
    """Whether Jacobian-vector products through a reused-weight layer are cheaper from its patches (P, k) and
    output gradients (c, P, d_out) per example — a matrix product with P·k·d_out multiply-adds per vector plus a
    pass over those factors — than from its materialised per-example gradients (c, d_out·(k + 1)). The latter
    are one pass per product, memory-bound for one vector but shared by many (solvers multiply 17 vectors at
    once for the evidence), so the unexpanded form must win on arithmetic alone. Output gradients of rank one
    over the outputs are stored once, not c times."""
    stored = (1 if rank_one else c) * P * d_out + P * k
    return P * k * d_out + stored < c * d_out * (k + 1)


def _position_gram_block(
    A1: torch.Tensor, G1: torch.Tensor, A2: torch.Tensor, G2: torch.Tensor, bias: bool, trace: bool
) -> torch.Tensor:
    """Σ_{s,t} (a_is · a_jt [+ 1]) (g_ias · g_jbt) for patches A (b, P, k) and output gradients G (c, b, P, o):
    (b1, c, b2, c), or (b1, b2) summed over a = b with ``trace``; one matrix product per position pair."""
    AA = torch.einsum("isk,jtk->ijst", A1, A2)
    if bias:
        AA = AA + 1.0
    c, b1, P, _ = G1.shape
    b2 = G2.shape[1]
    rows1 = G1.permute(2, 1, 0, 3).reshape(P, b1, -1) if trace else G1.permute(2, 1, 0, 3).reshape(P, b1 * c, -1)
    rows2 = G2.permute(2, 1, 0, 3).reshape(P, b2, -1) if trace else G2.permute(2, 1, 0, 3).reshape(P, b2 * c, -1)
    out = torch.zeros((b1, b2) if trace else (b1, c, b2, c), dtype=G1.dtype, device=G1.device)
    for s_ in range(P):
        for t in range(P):
            M = rows1[s_] @ rows2[t].T
            if trace:
                out.add_(AA[:, :, s_, t] * M)
            else:
                out.add_(AA[:, None, :, None, s_, t] * M.view(b1, c, b2, c))
    return out


_CACHE_ENTRIES = 2**19  # entries of a product's temporary that stay in the CPU caches
_FEW = 4  # up to this many vectors, per-example contractions over outputs run as broadcast products


def _contract_outputs(G: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """W[k, b, o] = Σ_a U[k, b, a] G[a, b, o] for G (c, n, o), U (k, n, c)."""
    if U.shape[0] <= _FEW:  # accumulate over the outputs in place: one pass over G, no (c, n, o) temporary
        out = []
        for u in U.transpose(1, 2):  # (c, n)
            w = G[0] * u[0].unsqueeze(1)
            for a in range(1, G.shape[0]):
                w.addcmul_(G[a], u[a].unsqueeze(1))
            out.append(w)
        return torch.stack(out)
    return torch.einsum("kba,abo->kbo", U, G)


def _expand_outputs(G: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """out[k, b, a] = Σ_o G[a, b, o] M[k, b, o] for G (c, n, o), M (k, n, o)."""
    c, n, o = G.shape
    rows = max(1, _CACHE_ENTRIES // (c * o))  # row blocks whose temporaries stay in cache
    if M.shape[0] > _FEW:  # per example (c × o)(o × k), on a copy of the block's G laid out per example
        per_example = torch.empty(n, c, M.shape[0], dtype=G.dtype, device=G.device)
        for s in range(0, n, rows):
            blk = G[:, s : s + rows].transpose(0, 1).contiguous()
            torch.bmm(blk, M[:, s : s + rows].permute(1, 2, 0), out=per_example[s : s + rows])
        return per_example.permute(2, 0, 1)
    out = torch.empty(M.shape[0], n, c, dtype=G.dtype, device=G.device)
    for m, res in zip(M, out):  # multiply and sum
        for s in range(0, n, rows):
            res[s : s + rows] = (G[:, s : s + rows] * m[s : s + rows]).sum(-1).t()
    return out


_OutputGradients = torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None


def _compact(G: torch.Tensor) -> _OutputGradients:
    """Output gradients G (c, n, m) in their most compact exact form: None for the identity, (R, D) when of
    rank one over the outputs, else G."""
    if _is_identity(G):
        return None
    factors = _rank_one_outputs(G)
    return G if factors is None else factors


def _position_major(
    G: torch.Tensor | tuple[torch.Tensor, torch.Tensor], geo: _ConvGeometry
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """A convolution's output gradients over (channel, position) reordered to (position, channel); for the
    rank-one form only the two factors are reordered."""

    def reorder(T: torch.Tensor) -> torch.Tensor:  # (..., d_out·P) → (..., P·d_out)
        return T.unflatten(-1, (geo.d_out, -1)).transpose(-1, -2).flatten(-2).contiguous()

    return (reorder(G[0]), reorder(G[1])) if isinstance(G, tuple) else reorder(G)


def _width(G: _OutputGradients, c: int) -> int:
    return c if G is None else G[1].shape[-1] if isinstance(G, tuple) else G.shape[-1]


def _contract_any(G: _OutputGradients, U: torch.Tensor, sl: slice, examples_first: bool = False) -> torch.Tensor:
    """Σ_a U[k, b, a] g_ba for the examples ``sl`` (U already restricted to them): (k, b, m); with
    ``examples_first`` contiguous in that layout (else, for the rank-one form and several vectors, a view of
    a (k, m, b) tensor)."""
    if G is None:
        return U
    if isinstance(G, tuple):  # D ⊙ (U R)
        R, D = G
        if examples_first or U.shape[0] == 1:  # contiguous operands; its transpose is still a view for k = 1
            return (U @ R) * D[sl]
        # laid out (k, m, b), so that Σ_b w_b a_bᵀ for all k needs no copy
        return ((R.T @ U.transpose(1, 2)) * D[sl].T).transpose(1, 2)
    return _contract_outputs(G[:, sl], U)


def _expand_any(G: _OutputGradients, M: torch.Tensor, sl: slice, examples_first: bool = False) -> torch.Tensor:
    """out[k, b, a] = g_ba · M[k, b] for the examples ``sl``: (k, b, c); M is (k, b, m), or (b, k, m) with
    ``examples_first`` (the layout a matrix product for all k vectors at once gives)."""
    if G is None:
        return M.transpose(0, 1) if examples_first else M
    if isinstance(G, tuple):
        R, D = G
        if examples_first:
            return ((M * D[sl].unsqueeze(1)) @ R.T).transpose(0, 1)
        return (D[sl] * M) @ R.T
    return _expand_outputs(G[:, sl], M.transpose(0, 1) if examples_first else M)


def _rank_one_outputs(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(R (c, m), D (n, m)) with G[a, i, j] = R[a, j] D[i, j] to rounding, for output gradients G (c, n, m);
    else None. This holds for a layer followed by an elementwise map and the output layer (g_ia = W_a ⊙ σ'(z_i)):
    products then cost a small matrix product instead of a pass over c·n·m entries. Checked entry by entry
    (within 32 ulps of the largest entry of each output in each column); one output gains nothing (None)."""
    c, n, m = G.shape
    if c < 2 or n == 0:
        return None
    col_max = torch.linalg.vector_norm(G, float("inf"), dim=1)  # (c, m), max |entry| without a |G| temporary
    a_star = col_max.argmax(0)  # per column, the output with the largest entry
    D = G.gather(0, a_star.view(1, 1, m).expand(1, n, m))[0]  # (n, m)
    i_star = D.abs().argmax(0)  # per column, the example with the largest entry
    pivot = D.gather(0, i_star.view(1, m))[0]
    G_pivot = G.gather(1, i_star.view(1, 1, m).expand(c, 1, m))[:, 0]  # (c, m)
    nonzero = pivot != 0
    R = torch.where(nonzero, G_pivot / torch.where(nonzero, pivot, torch.ones_like(pivot)), torch.zeros_like(pivot))
    tol = 32 * torch.finfo(G.dtype).eps * col_max  # (c, m): each output's own scale in each column
    rows = max(1, _PRODUCT_BUDGET // max(1, c * m))
    for s in range(0, n, rows):
        residual = torch.addcmul(G[:, s : s + rows], R[:, None], D[None, s : s + rows], value=-1).abs_()
        if bool((residual > tol[:, None]).any()):
            return None
    return R, D


def _is_identity(G: torch.Tensor) -> bool:
    """Whether the output gradients G (c, n, o) are g_ia = e_a for every example (a layer whose outputs are the
    network's outputs)."""
    c, n, o = G.shape
    eye = torch.eye(c, dtype=G.dtype, device=G.device).unsqueeze(1)
    return c == o and torch.equal(G, eye.expand(c, n, c))


def factored_jacobian(
    lin: Linearization, X: torch.Tensor, budget: int, max_outputs: int = _FACTOR_MAX_OUTPUTS
) -> FactoredJacobian | None:
    """A :class:`FactoredJacobian` of J(X) when the per-layer rules apply to the model, the model has at most
    ``max_outputs`` outputs (building costs one backward pass per output and chunk) and the factors fit in
    ``budget`` bytes; else None (callers then use torch.func products)."""
    if X.shape[0] == 0 or lin.output_dim(X) > max_outputs:
        return None
    engine = lin.structured(X)
    if engine is None:
        return None
    c = lin.output_dim(X)
    # sized in the layout the products use (which also fixes each reused-weight layer's form, on a few
    # examples so that the rank-one test means something)
    probe = engine._features(X[:8], lin.net_dtype, products=True)
    if FactoredJacobian.feature_bytes(probe) / probe.b * X.shape[0] > budget:
        return None
    size = engine._size(X, c)
    return FactoredJacobian(engine, X, blocks(X.shape[0], size), budget)


class _RuleError(RuntimeError):
    """Layer rules that do not apply to how the model uses the layers; args[0]: the module names."""


_STOCK_FORWARD = {nn.Linear: nn.Linear.forward, nn.Conv1d: nn.Conv1d.forward, nn.Conv2d: nn.Conv2d.forward}


def _supported(mod: nn.Module) -> bool:
    """A layer rule applies: a Linear / Conv1d / Conv2d (groups = 1, zero padding) whose ``forward`` is the
    stock one. A subclass that changes ``forward`` (e.g. "same" padding applied before ``F.conv2d``) computes
    something the rule cannot see from the module's input, so it goes to the Jacobian-contraction fallback."""
    for base, forward in _STOCK_FORWARD.items():
        if isinstance(mod, base) and type(mod).forward is forward:
            if base is nn.Linear:
                return True
            return mod.groups == 1 and mod.padding_mode == "zeros" and not isinstance(mod.padding, str)
    return False


def _restricted(lin: Linearization, names: list[str]) -> Linearization:
    """A copy of ``lin`` linearized in ``names`` only (the other selected parameters frozen at θ̂)."""
    sub = copy.copy(lin)
    sub.param_names = list(names)
    sub.theta = {n: lin.theta[n] for n in names}
    sub.frozen = {**lin.frozen, **{n: v for n, v in lin.theta.items() if n not in names}}
    sub.shapes = [sub.theta[n].shape for n in names]
    sub.numels = [sub.theta[n].numel() for n in names]
    sub.num_params = int(sum(sub.numels))
    sub._structured = False
    sub._graph_ok = None
    sub._held = None
    return sub
