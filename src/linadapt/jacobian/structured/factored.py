"""J(X) for fixed inputs held as per-layer factors: products with no pass through the network."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from linadapt._blocks import blocks, budget_blocks
from linadapt.jacobian._common import ALGEBRA_DTYPE
from linadapt.jacobian.structured import costs
from linadapt.jacobian.structured.engine import StructuredNTK
from linadapt.jacobian.structured.features import feature_bytes, join
from linadapt.jacobian.structured.output_gradients import (
    OutputGradients,
    contract_any,
    expand_any,
    position_major,
    width,
)
from linadapt.jacobian.structured.output_gradients import compact as compact_outputs

if TYPE_CHECKING:
    from linadapt.jacobian.linearization import Linearization


__all__ = ["FactoredJacobian", "factored_jacobian", "factored_jvp"]


class FactoredJacobian:
    """J(X) for fixed inputs X, held as the per-layer factors of :class:`StructuredNTK` (layer inputs and
    output gradients; materialised per-example gradients for parameters without a rule; either for
    convolutions, or both).

    Products then need no pass through the network: for a Linear layer with inputs a_i and output
    gradients g_ia, (Jᵀ u)_W = Σ_i (Σ_a u_ia g_ia) a_iᵀ and (J v)_ia = g_ia · (V_W a_i + v_b); a
    materialised block D (n, c, q) gives Σ_ia u_ia D_ia and D v; a convolution held as its input and output
    gradients gives J v = g_ia · conv(a_i, V_W) (+ v_b) and Jᵀ u = the convolution's weight gradient for the
    output cotangent Σ_a u_ia g_ia (each for all vectors at once; the form per layer and per number of vectors
    by :func:`costs.conv_forms`, :func:`costs.conv_cost` and :func:`costs.dense_cost`). Built once (one forward and one
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
        f = join((engine._features(X[sl], self.dtype, products=True) for sl in chunks), self.n)
        self.c = lin.output_dim(X)
        # (built for a few vectors, by factored_jvp: not worth the search for the compact forms below)
        compact = _as_they_are if engine.few_vectors else compact_outputs
        # Linear layers: (inputs (n, d_in) or None, output gradients, weight, bias names); the output gradients
        # as None when they are the identity (a layer producing the network's outputs: g_ia = e_a), as the
        # factors (R (c, d_out), D (n, d_out)) when g_ia = R_a ⊙ D_i (a layer followed by an elementwise
        # activation and the output layer), else as (c, n, d_out)
        self.outer = [(A, compact(G), w, b) for (A, G, _), (w, b) in zip(f.outer, f.outer_names)]
        self._widths = [G.shape[0] * G.shape[2] for _, G, _ in f.outer]
        self.dense = list(zip(f.dense, f.dense_names))  # ((n, c, q), parameter names in column order)
        # reused-weight layers kept unexpanded: (patches (n, P, k), output gradients over P·d_out as above,
        # weight, bias names)
        self.spatial = [
            (A, compact(G.reshape(G.shape[0], G.shape[1], -1)), w, b)
            for (A, G, _), (w, b) in zip(f.spatial, f.spatial_names)
        ]
        self._widths += [G.shape[0] * G.shape[2] * G.shape[3] for _, G, _ in f.spatial]
        # embeddings: (ids (n, P), −1 where no row; output gradients over P·d as above; the table's name)
        self.index = [
            (ids, compact(G.reshape(G.shape[0], G.shape[1], -1)), w) for (ids, G), w in zip(f.index, f.index_names)
        ]
        self._widths += [G.shape[0] * G.shape[2] * G.shape[3] for _, G in f.index]
        # convolutions multiplied by convolution: (input (n, C_in, H, W) channels-last, output gradients over
        # P·d_out as above, reordered position-major — each position's d_out channels contiguous, the layout of a
        # channels-last convolution's result, so that the products need no copy —, geometry, weight, bias names)
        self.conv = []
        for (A, G, geo), (w, b, _) in zip(f.conv, f.conv_names):
            held = compact(G)
            if held is None:  # the network's outputs (g_ia = e_a): reordered, no longer the identity
                ones = torch.ones(1, G.shape[0], dtype=G.dtype, device=G.device).expand(self.n, -1)
                held = (torch.eye(G.shape[0], dtype=G.dtype, device=G.device), ones)
            self.conv.append((A, position_major(held, geo), geo, w, b))
        # per conv entry: whether its materialised form is wanted (cheaper for many vectors), and its index in
        # ``dense`` once formed (on the first product that prefers it, within ``budget``)
        self._wants_dense = [wanted for *_, wanted in f.conv_names]
        self._twin: list[int | None] = [None] * len(self.conv)
        self.budget = budget
        self._widths += [geo.d_out * geo.positions for _, _, geo in f.conv]
        self._shapes = dict(zip(lin.param_names, lin.shapes))
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

        def up(G: OutputGradients) -> OutputGradients:
            if G is None:
                return None
            return tuple(t.double() for t in G) if isinstance(G, tuple) else G.double()

        self.outer = [(None if A is None else A.double(), up(G), w, b) for A, G, w, b in self.outer]
        self.spatial = [(A.double(), up(G), w, b) for A, G, w, b in self.spatial]
        self.index = [(ids, up(G), w) for ids, G, w in self.index]
        self.conv = [(A.double(), up(G), geo, w, b) for A, G, geo, w, b in self.conv]  # keeps channels-last
        self.dense = [(D.double(), names) for D, names in self.dense]
        self.dtype = torch.float64
        return True

    def nbytes(self) -> int:
        """Memory held by the factors."""
        tensors = [D for D, _ in self.dense]
        pairs = [(A, G) for A, G, _, _ in self.outer + self.spatial] + [(A, G) for A, G, *_ in self.conv + self.index]
        for A, G in pairs:
            tensors += [t for t in (A, *(G if isinstance(G, tuple) else (G,))) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def _conv_routes(self, k: int) -> tuple[list[int], set[int]]:
        """For a product with k vectors: the conv entries used, and the dense blocks skipped because the same
        layer goes by convolution. A layer whose materialised form is wanted takes it when that is cheaper for k
        (:func:`costs.conv_cost`, :func:`costs.dense_cost`), forming it first if need be."""
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
        temporaries = self.c * geo.d_out * (P + k_in) + P * k_in
        for sl in budget_blocks(self.n, temporaries, costs.PRODUCT_BUDGET):
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
        return budget_blocks(self.n, k * width, costs.PRODUCT_BUDGET)

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
                W = contract_any(G, Ub, sl, examples_first=True).reshape(k, nb, h, wd, d)  # per position, channel
                # (nb, k·d_out, h, w) in channels-last memory: a view for one vector
                grad = W[0] if k == 1 else W.permute(1, 2, 3, 0, 4).reshape(nb, h, wd, k * d)
                grad = grad.permute(0, 3, 1, 2)
                shape = (k * d, geo.c_in, *geo.kernel)
                gw = torch.nn.grad.conv2d_weight(A[sl], shape, grad, geo.stride, geo.padding, geo.dilation)
                out[:, self._slices[w]] += gw.reshape(k, -1)
                if b is not None:
                    out[:, self._slices[b]] += W.reshape(k, -1, d).sum(1)
            for A, G, w, b in self.outer:
                W = contract_any(G, Ub, sl)  # (k, block, d_out): Σ_a u_ia g_ia
                if w is not None:  # Σ_i w_i a_iᵀ: one matrix product for all k vectors
                    Wt = W.transpose(1, 2).reshape(k * W.shape[-1], -1)  # (k·d_out, block); a view for k = 1
                    out[:, self._slices[w]] += torch.mm(Wt, A[sl]).reshape(k, -1)
                if b is not None:
                    out[:, self._slices[b]] += W.sum(1)
            for A, G, w, b in self.spatial:
                nb, P, d_in = A[sl].shape
                W = contract_any(G, Ub, sl).reshape(k, nb * P, -1)  # Σ_a u_ia g_ias, rows (example, s)
                out[:, self._slices[w]] += torch.einsum("kro,ri->koi", W, A[sl].reshape(nb * P, d_in)).reshape(k, -1)
                if b is not None:
                    out[:, self._slices[b]] += W.sum(1)
            for ids, G, w in self.index:  # Σ_a u_ia g_iat added to row id_it of the table
                nb, P = ids[sl].shape
                W = contract_any(G, Ub, sl, examples_first=True).reshape(k, nb * P, -1)
                table = out[:, self._slices[w]].view(k, -1, W.shape[-1])  # (k, V, d), a view of out
                table.index_add_(1, ids[sl].reshape(-1).clamp_min(0), W)  # (zero gradients where no row)
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
            d_out = width(G, self.c)
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
            d_out = width(G, self.c) // A.shape[1]
            Vw = V[:, self._slices[w]].reshape(k, d_out, A.shape[-1])
            spatial.append((A, G, Vw, None if b is None else V[:, self._slices[b]][:, None, :]))
        index = [(ids, G, V[:, self._slices[w]].reshape(k, *self._shapes[w])) for ids, G, w in self.index]
        for sl in self._blocks(k):
            for ids, G, table in index:  # g_iat · V_E[id_it]: the rows gathered (zero gradients where no row)
                M = table[:, ids[sl].clamp_min(0)]  # (k, block, P, d)
                out[:, sl] += expand_any(G, M.reshape(k, M.shape[1], -1), sl)
            for A, G, geo, Vw, vb in convs:  # the convolution of a_i with the k weight directions at once
                M = torch.nn.functional.conv2d(A[sl], Vw, vb, geo.stride, geo.padding, geo.dilation)
                nb, P = M.shape[0], geo.positions
                # (nb, k, P·d_out) position-major: a view of the channels-last result for one vector
                M = M.permute(0, 2, 3, 1).reshape(nb, P, k, geo.d_out).transpose(1, 2).reshape(nb, k, -1)
                out[:, sl] += expand_any(G, M, sl, examples_first=True)
            for A, G, Vw, vb in spatial:
                nb, P, d_in = A[sl].shape
                M = torch.einsum("ri,koi->kro", A[sl].reshape(nb * P, d_in), Vw)
                if vb is not None:
                    M += vb
                out[:, sl] += expand_any(G, M.reshape(k, nb, -1), sl)  # Σ_s g_ias · (V_W a_is + v_b)
            for A, G, Vw, vb in pieces:
                if Vw is None:
                    M = vb.transpose(0, 1).expand(sl.stop - sl.start, k, vb.shape[-1])
                else:  # (block, k, d_out): V_W a_i [+ v_b], one matrix product for all k vectors
                    d_out = Vw.shape[1]
                    M = torch.nn.functional.linear(A[sl], Vw.reshape(k * d_out, -1)).reshape(-1, k, d_out)
                    if vb is not None:
                        M += vb.transpose(0, 1)
                out[:, sl] += expand_any(G, M, sl, examples_first=True)
            for D, Vq in dense:
                out[:, sl] += torch.einsum("bcq,kq->kbc", D[sl], Vq)
        return out.to(ALGEBRA_DTYPE)


def _as_they_are(G: torch.Tensor) -> torch.Tensor:
    return G


def factored_jacobian(
    lin: Linearization, X: torch.Tensor, budget: int, max_outputs: int = costs.FACTOR_MAX_OUTPUTS
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
    if feature_bytes(probe) / probe.b * X.shape[0] > budget:
        return None
    size = engine._size(X, c)
    return FactoredJacobian(engine, X, blocks(X.shape[0], size), budget)


def factored_jvp(engine: StructuredNTK, X: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """J(X) V for V (k, p), (k, n, c) float64, from the layer factors of chunks of X: the Jacobian-vector product
    for networks torch has no forward-mode AD for (scaled_dot_product_attention, the fused transformer encoder
    layer), in place of per-example Jacobians of all p weights.

    Each chunk's factors come from one forward and one batched backward pass, with every reused-weight layer kept
    unexpanded — patches and output gradients (J v: Σ_t g_iat · (V_W a_it + v_b), one matrix product per vector),
    convolutions by convolution — since they serve these few vectors only; chunks hold those factors within a
    quarter of ``memory_budget``. Parameters without a rule still take their per-example Jacobians."""
    lin = engine.lin
    n = X.shape[0]
    engine.few_vectors = True
    try:
        per_example = feature_bytes(engine._features(X[:1], lin.net_dtype, products=True))
        size = max(1, min(lin.chunk_size or 256, lin.memory_budget // 4 // max(1, per_example)))
        if engine._sub is not None:  # their dense per-example Jacobians (c × p_fallback) as well
            size = min(size, engine._size(X, lin.output_dim(X)))
        parts = [FactoredJacobian(engine, X[sl], [slice(0, sl.stop - sl.start)]).jvp(V) for sl in blocks(n, size)]
    finally:
        engine.few_vectors = False
    return torch.cat(parts, dim=1)
