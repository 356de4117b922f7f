"""The per-layer NTK engine: layer factors from one forward and one batched backward pass, checked against autodiff."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from linadapt.jacobian._common import ALGEBRA_DTYPE, eval_mode
from linadapt.jacobian.structured import assembly, costs, rules  # noqa: F401  (rules: registers the layer rules)
from linadapt.jacobian.structured.features import Features, Layer, RuleError, feature_bytes, only_output, promoted
from linadapt.jacobian.structured.output_gradients import rank_one_outputs
from linadapt.jacobian.structured.registry import Capture, capture_for, parameters_for, rule_for

MIN_TEST_CHUNK = 32  # test examples per cross-kernel chunk at least when the training factors are kept
PROGRESS_STEPS = 16  # ... and about this many chunks for a long prediction (a progress bar's steps)

if TYPE_CHECKING:
    from linadapt.jacobian.linearization import Linearization


__all__ = ["StructuredNTK"]


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
        self.compact = False  # while forming features for kernels that are held: see Features.raw
        self.few_vectors = False  # while forming features for products with a few vectors (factored_jvp)
        self.trim_positions = True  # held per position: positions without a gradient left out (not in size probes)
        self._product_forms: dict[str, bool] = {}  # per layer: unexpanded form for products (decided once)
        self._conv_forms: dict[str, tuple[bool, bool, int]] = {}  # per conv: (by convolution, materialised, stored)
        self._memo: dict[str, dict] = {}  # per layer: what its rule's capture decided on the first call
        self._replaced: set[str] = set()
        selected = set(lin.param_names)
        owners: dict[int, int] = {}
        for mod in lin.model.modules():
            for p in mod.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        claimed: set[int] = set()  # parameters covered by an enclosing module's rule (MHA's out_proj)
        self.layers: list[Layer] = []
        for mname, mod in lin.model.named_modules():
            rule = rule_for(mod)
            if rule is None:
                continue
            names = {}
            for local in parameters_for(rule, mod):
                p = _attribute(mod, local)
                if not isinstance(p, nn.Parameter) or id(p) in claimed:
                    continue
                claimed.add(id(p))
                full = f"{mname}.{local}" if mname else local
                if full in selected and owners.get(id(p), 0) == 1:
                    names[local] = full
            if names:
                self.layers.append(Layer(mname, mod, names))
        self._set_fallback()

    def _set_fallback(self) -> None:
        covered = {n for layer in self.layers for n in layer.params.values()}
        self.fallback = [n for n in self.lin.param_names if n not in covered]
        self._sub = self.lin.restricted(self.fallback) if self.fallback else None

    def _demote(self, names: list[str]) -> None:
        """Stop using the rules of these layers; their parameters join the Jacobian-contraction fallback."""
        self.layers = [layer for layer in self.layers if layer.name not in names]
        self._set_fallback()

    # ------------------------------------------------------------------ features of one chunk
    def _features(
        self,
        xb: torch.Tensor,
        dtype: torch.dtype = ALGEBRA_DTYPE,
        products: bool = False,
        compact: bool | str = False,
    ) -> Features:
        """Per-layer factors of J(xb) in ``dtype`` (float64 for kernels, see below); with ``products``, each
        reused-weight layer in the form cheaper for Jacobian-vector products rather than for kernels; with
        ``compact``, convolutions whose input and output gradients are smaller than their materialised
        gradients are kept as those (``Features.raw``, for kernels whose factors are held across blocks); with
        ``compact="positions"``, every reused-weight Linear layer is kept as its inputs and output gradients per
        position as well (the position-Gram form: see :meth:`_held_mode`)."""
        self.compact = compact
        try:
            return self._layer_factors(xb, dtype, products)
        finally:
            self.compact = False

    def _layer_factors(self, xb: torch.Tensor, dtype: torch.dtype, products: bool) -> Features:
        lin = self.lin
        b = xb.shape[0]
        captured: dict[str, list[Capture | None]] = {layer.name: [] for layer in self.layers}
        self._replaced: set[str] = set()  # layers whose output the network ran on in place of the module's

        def hook_for(layer: Layer):
            capture = capture_for(rule_for(layer.module))

            memo = self._memo.setdefault(layer.name, {})

            def hook(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
                got = capture(mod, args, kwargs, out, b, memo)
                captured[layer.name].append(got)
                if got is None or got.replacement is None:
                    return None
                self._replaced.add(layer.name)
                return got.replacement

            return hook

        handles = [layer.module.register_forward_hook(hook_for(layer), with_kwargs=True) for layer in self.layers]
        try:
            theta = {k: v.detach().requires_grad_(True) for k, v in lin.theta.items()}
            with torch.enable_grad(), eval_mode(lin.model):
                out = lin._f(theta, xb)
                # reused (or unused) in the forward pass, or called in a way the rule does not handle (e.g. the
                # batch not first)
                bad = [n for n, got in captured.items() if len(got) != 1 or got[0] is None]
                if bad:
                    raise RuleError(bad)
                caps = [captured[layer.name][0] for layer in self.layers]
                grads = self._output_gradients(out, [z for cap in caps for z in cap.outputs])
        finally:
            for h in handles:
                h.remove()
        feats = Features(b)
        start = 0
        for layer, cap in zip(self.layers, caps):
            # products in float64 whatever the network's dtype: the kernel must stay positive semi-definite
            # to float64 precision for the solves (float32 products perturb its eigenvalues by ~1e-7·‖K‖)
            Gs = [g.detach().to(dtype) for g in grads[start : start + len(cap.outputs)]]  # each (c, b, *out_shape)
            start += len(cap.outputs)
            A = _prepared(cap.inputs, dtype)
            self._layer_features(layer, A, Gs[0] if len(Gs) == 1 else tuple(Gs), feats, products)
        if self._sub is not None:
            feats.dense.append(self._sub._jacobian_chunk(xb).to(dtype))
            feats.dense_names.append(list(self.fallback))
        return feats

    def _output_gradients(self, out: torch.Tensor, zs: list[torch.Tensor]) -> list[torch.Tensor]:
        """∂f_a/∂z for every layer output z and output a, each (c, b, *z.shape[1:]): one batched backward
        pass over the c one-hot cotangents (c separate passes where batching is not supported). Zero for an output
        that does not depend on the selected parameters or the inputs (no graph to differentiate)."""
        c = out.shape[1]
        live = [k for k, z in enumerate(zs) if z.requires_grad]
        if len(live) < len(zs):
            got = self._output_gradients(out, [zs[k] for k in live]) if live else []
            grads = [z.new_zeros(c, *z.shape) for z in zs]
            for k, g in zip(live, got):
                grads[k] = g
            return grads
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
        self, layer: Layer, A: torch.Tensor, G: torch.Tensor, feats: Features, products: bool = False
    ) -> None:
        """Append the factors of one layer (input A, output gradients G (c, b, *out_shape)) to ``feats`` by the
        rule registered for its module type (:mod:`~linadapt.jacobian.structured.rules`)."""
        rule_for(layer.module).features(self, layer, A, G, feats, products)

    def _unexpanded(self, key: str, P: int, k: int, G4: torch.Tensor, products: bool) -> bool:
        """Whether a reused-weight layer is kept as patches and output gradients G4 (c, b, P, d_out) rather than
        as materialised per-example gradients. For products the choice is made on the first chunk and kept per
        ``key`` (a name for the weight: all chunks must agree to be joined); output gradients of rank one over
        the outputs (see :func:`rank_one_outputs`) are stored once rather than per output."""
        c, d_out = G4.shape[0], G4.shape[-1]
        if not products:  # kernels: the position-Gram form (held that way when it saves recomputing: _held_mode)
            return self.compact == "positions" or costs.position_gram_cheaper(P, k, d_out, c)
        if self.few_vectors:  # one matrix product per vector, against materialising c·d_out·k per example
            return True
        if key not in self._product_forms:
            rank_one = rank_one_outputs(G4.reshape(c, G4.shape[1], -1)) is not None
            self._product_forms[key] = costs.position_form_for_products(P, k, d_out, c, rank_one)
        return self._product_forms[key]

    def snapshot(self, layer: Layer, local: str) -> torch.Tensor:
        """The value, in the linearization's weight snapshot, of the parameter or buffer ``local`` (its name in the
        module) of ``layer``, selected or not (for rules that recompute part of a module's forward)."""
        full = f"{layer.name}.{local}" if layer.name else local
        if full in self.lin.theta:
            return self.lin.theta[full]
        if full in self.lin.frozen:
            return self.lin.frozen[full]
        return _attribute(layer.module, local).detach()  # (a tied tensor, listed under another name)

    def _conv_product_forms(
        self, layer: Layer, A: torch.Tensor, kernel: tuple[int, int], Gf: torch.Tensor
    ) -> tuple[bool, bool]:
        """For products: whether a convolution is kept for products by convolution (its input and output
        gradients) and whether as materialised per-example gradients — by :func:`costs.conv_forms`, decided on the
        first chunk and kept (all chunks must agree to be joined). When both win for some number of vectors, the
        factors keep the convolution form and materialise the other on the first product that wants it. For a few
        vectors (``few_vectors``), by convolution only."""
        if layer.name not in self._conv_forms:
            c, d_out, P = Gf.shape[0], Gf.shape[2], Gf.shape[3]
            rank_one = rank_one_outputs(Gf.reshape(c, Gf.shape[1], -1)) is not None
            stored = (1 if rank_one else c) * P * d_out
            k_in = A.shape[1] * kernel[0] * kernel[1]
            by_conv, materialised = costs.conv_forms(P, k_in, d_out, c, stored, A[0].numel())
            self._conv_forms[layer.name] = (by_conv, materialised, stored)
        by_conv, materialised, _ = self._conv_forms[layer.name]
        return (True, False) if self.few_vectors else (by_conv, materialised)

    # ------------------------------------------------------------------ blocks

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
            except RuleError as exc:  # layers run twice, or not batch-first: their parameters fall back
                self._demote(exc.args[0])
            except (
                Exception
            ):  # the network failed on an output a rule replaced (e.g. an expanded view): those fall back
                if not self._replaced:
                    raise
                self._demote(list(self._replaced))
        if not self.verify:
            return True
        mine = assembly.block(f, f, trace=False)
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

    def _stored(self) -> torch.dtype:
        """The dtype factors held across kernel blocks are kept in: the network's (float32 or float64: its
        forward and backward passes produced them at that precision), float32 for lower precisions. Blocks are
        formed in float64 from them, so the kernel is exactly the Gram matrix of those factors."""
        return self.lin.net_dtype if self.lin.net_dtype in (torch.float32, torch.float64) else torch.float32

    def _held_bytes(self, mode: bool | str = True) -> int:
        """Bytes per example of the factors held across blocks (compact form ``mode``, stored dtype)."""
        held = self._positions_bytes if mode == "positions" else self._compact_bytes
        return held * torch.finfo(self._stored()).bits // 64

    def _held_mode(self, n: int, share: int, group_share: int) -> bool | str:
        """The compact form for holding the factors of n examples within ``share`` bytes: ``True`` (the cost
        model's forms; when they do not fit, groups of examples within ``group_share`` are held and the other
        examples' factors recomputed for each group) or ``"positions"`` — reused-weight Linear layers held as
        inputs and output gradients per position (position Grams: P² (k + c² d_out) per pair of examples instead
        of c² k d_out, but P (k + c d_out) entries per example instead of c k d_out) — when only those fit and
        the extra position-pair work costs less than the recomputed factors (:func:`costs.hold_positions`)."""
        if n * self._held_bytes(True) <= share or n * self._held_bytes("positions") > share:
            return True
        group = max(1, group_share // max(1, self._held_bytes(True)))
        return "positions" if costs.hold_positions(*self._position_costs, group) else True

    def kernel(self, X1: torch.Tensor, X2: torch.Tensor | None = None, output: Any = None) -> torch.Tensor:
        """Dense NTK, float64, for prepared inputs.

        ``output=None``: J(X1) J(X2)ᵀ, (n1·c, n2·c) example-major; ``"sum"``: Σ_a J_a(X1) J_a(X2)ᵀ, (n1, n2);
        an index a: J_a(X1) J_a(X2)ᵀ, (n1, n2).

        Each chunk's factors come from one forward and one batched backward pass. When those of all of X2 fit
        half of ``memory_budget`` they are computed once; otherwise groups of X1's chunks are held (a quarter of
        the budget) while X2's chunks are computed once per group and streamed past them.
        """
        c = self.lin.output_dim(X1)
        trace = output is not None
        pick = None if output is None or output == "sum" else int(output)
        store = self._stored()

        second = X1 if X2 is None else X2
        budget = self.lin.memory_budget
        self._size(X1, c)  # (measures the factors' sizes)
        mode = self._held_mode(second.shape[0], budget // 2, budget // 4)

        def features(x: torch.Tensor) -> Features:
            f = self._features(x, dtype=store, compact=mode)
            return f if pick is None else only_output(f, pick)

        size = self._size(X1, c, mode)
        if X2 is None:  # compute blocks j ≥ i only: with 4 or more chunks that is ≤ 5/8 of the work
            size = min(size, max(32, -(-X1.shape[0] // 4)))
        chunks1 = [X1[i : i + size] for i in range(0, X1.shape[0], size)]
        chunks2 = chunks1 if X2 is None else [second[i : i + size] for i in range(0, second.shape[0], size)]
        cache = second.shape[0] * self._held_bytes(mode) <= budget // 2  # X2's factors held
        feats2 = [features(x) for x in chunks2] if cache else None
        if cache:
            groups = [[i] for i in range(len(chunks1))]
        else:
            per_group = max(1, (budget // 4) // max(1, size * self._held_bytes(mode)))
            groups = [list(range(g, min(g + per_group, len(chunks1)))) for g in range(0, len(chunks1), per_group)]
        offsets1 = [i * size for i in range(len(chunks1))]
        offsets2 = [j * size for j in range(len(chunks2))]
        n1, n2 = X1.shape[0], second.shape[0]
        K = torch.zeros((n1, n2) if trace else (n1, c, n2, c), dtype=ALGEBRA_DTYPE, device=self.lin.device)
        for group in groups:
            rows = {i: feats2[i] if (X2 is None and feats2 is not None) else features(chunks1[i]) for i in group}
            for j in range(group[0] if X2 is None else 0, len(chunks2)):
                if feats2 is not None:
                    f2 = feats2[j]
                else:
                    f2 = rows[j] if (X2 is None and j in rows) else features(chunks2[j])
                f2_64 = promoted(f2, ALGEBRA_DTYPE)
                for i in group:
                    if X2 is None and j < i:
                        continue
                    o1, o2, b1, b2 = offsets1[i], offsets2[j], rows[i].b, f2.b
                    # a diagonal block gets one object on both sides: its held convolutions are expanded once
                    f1_64 = f2_64 if (X2 is None and i == j) else promoted(rows[i], ALGEBRA_DTYPE)
                    block = assembly.block(f1_64, f2_64, trace)
                    del f1_64
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
                del f2, f2_64
            del rows
        return K if trace else K.reshape(n1 * c, n2 * c)

    def cross_kernel_chunks(
        self, X: torch.Tensor, Xs: torch.Tensor, size: int
    ) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
        """For consecutive chunks of ``size`` test inputs Xs[sl]: (sl, K(X, Xs[sl]) of shape (n·c, b·c)
        example-major, the blocks J(x*) J(x*)ᵀ of the chunk (b, c, c)), float64.

        The factors of X are computed once for all test chunks when they fit a quarter of ``memory_budget`` (else
        once per test chunk, and the test chunks take up to half of it); each test chunk's factors (within a
        quarter of the budget, which may shorten ``size``) serve both its cross kernel and its diagonal blocks:
        the function-space predictive needs nothing else. Factors are held in :meth:`_stored`'s dtype."""
        c = self.lin.output_dim(X)
        n = X.shape[0]
        store = self._stored()
        keep, mode, size = self._cross_plan(X, Xs.shape[0], size)
        tsize = self._size(X, c, mode)
        train = [X[i : i + tsize] for i in range(0, n, tsize)]
        kept = [self._features(x, store, compact=mode) for x in train] if keep else None
        for start in range(0, Xs.shape[0], size):
            sl = slice(start, min(start + size, Xs.shape[0]))
            test = [
                self._features(Xs[j : min(j + tsize, sl.stop)], store, compact=mode)
                for j in range(sl.start, sl.stop, tsize)
            ]
            b = sl.stop - sl.start
            K = torch.empty(n, c, b, c, dtype=ALGEBRA_DTYPE, device=self.lin.device)
            o1 = 0
            for i, x in enumerate(train):
                f1 = kept[i] if kept is not None else self._features(x, store, compact=mode)
                f1 = promoted(f1, ALGEBRA_DTYPE)
                o2 = 0
                for f2 in test:
                    K[o1 : o1 + f1.b, :, o2 : o2 + f2.b, :] = assembly.block(f1, promoted(f2, ALGEBRA_DTYPE), False)
                    o2 += f2.b
                o1 += f1.b
                del f1
            diag = torch.cat([assembly.diagonal_blocks(promoted(f, ALGEBRA_DTYPE)) for f in test])
            yield sl, K.reshape(n * c, b * c), diag

    def _cross_plan(self, X: torch.Tensor, m: int, size: int) -> tuple[bool, bool | str, int]:
        """For :meth:`cross_kernel_chunks` with training inputs X, m test points and at most ``size`` per chunk:
        (whether the training factors are kept across test chunks — within a quarter of the budget —, their
        compact form, test examples per chunk). Factors not kept are recomputed per test chunk, and the test
        chunks then take up to half the budget. Kept factors cost nothing per chunk, so the chunks are then also
        at most ⌈m / PROGRESS_STEPS⌉ (at least MIN_TEST_CHUNK) for a progress bar that advances in steps."""
        n, c = X.shape[0], self.lin.output_dim(X)
        quarter = self.lin.memory_budget // 4
        self._size(X, c)  # (measures the factors' sizes)
        mode = self._held_mode(n, quarter, 2 * quarter)
        keep = n * self._held_bytes(mode) <= quarter
        size = max(1, min(size, (quarter if keep else 2 * quarter) // max(1, self._held_bytes(mode))))
        if keep:
            size = min(size, max(MIN_TEST_CHUNK, math.ceil(m / PROGRESS_STEPS)))
        return keep, mode, size

    def cross_kernel_steps(self, X: torch.Tensor, m: int, size: int) -> int:
        """How many chunks :meth:`cross_kernel_chunks` yields for training inputs X and m test examples."""
        return math.ceil(m / self._cross_plan(X, m, size)[2]) if m else 0

    def layer_forms(self, X: torch.Tensor) -> list[dict[str, Any]]:
        """How each selected parameter's layer enters kernels and products, from the factors of (up to) eight
        examples of X: one dict per layer (and one for the parameters without a rule) with ``layer``,
        ``type``, ``weights`` (selected entries), ``kernel`` and ``products`` — ``"outer"`` (input and
        output-gradient Grams), ``"position Gram"``, ``"inputs and output gradients"`` (expanded per block),
        ``"by convolution"``, ``"index Gram"`` (embeddings: ids and output gradients), ``"materialised"``
        (per-example gradients) or ``"per-example Jacobian"`` (no rule: the Jacobian contraction restricted to
        those parameters); for a module with several parameters in different forms (attention), its distinct
        forms, the largest parameter's first."""
        xb = X[:8]
        forms: dict[str, dict[str, str]] = {}
        for what, f in (
            ("kernel", self._features(xb, compact=True)),
            ("products", self._features(xb, self.lin.net_dtype, products=True)),
        ):
            tagged = [(names, "outer") for names in f.outer_names]
            tagged += [(names, "position Gram") for names in f.spatial_names]
            tagged += [(names, "inputs and output gradients") for names in f.raw_names]
            tagged += [((w, b), "by convolution") for w, b, _ in f.conv_names]
            tagged += [((name,), "index Gram") for name in f.index_names]
            tagged += [(names, "materialised") for names in f.dense_names]
            for names, form in tagged:
                for name in names:
                    if name:
                        forms.setdefault(name, {})[what] = form
        numel = dict(zip(self.lin.param_names, self.lin.numels))
        rows = []
        for layer in self.layers:
            names = sorted(layer.params.values(), key=lambda n: -numel[n])  # the largest parameter's form first

            def form(what: str, names: list[str] = names) -> str:
                found = [forms.get(n, {}).get(what, "none") for n in names]
                return ", ".join(dict.fromkeys(found))  # distinct forms (several for a module with several maps)

            rows.append(
                {
                    "layer": layer.name,
                    "type": type(layer.module).__name__,
                    "weights": sum(numel[n] for n in names),
                    "kernel": form("kernel"),
                    "products": form("products"),
                }
            )
        if self.fallback:
            rows.append(
                {
                    "layer": ", ".join(self.fallback),
                    "type": "(no rule)",
                    "weights": sum(numel[n] for n in self.fallback),
                    "kernel": "per-example Jacobian",
                    "products": "per-example Jacobian",
                }
            )
        return rows

    def pair_flops(self, X: torch.Tensor) -> float:
        """Multiply-adds per pair of examples of the full (c × c block) kernel by these rules: Σ over Linear
        layers of d_in + c² d_out, over position-Gram layers of P² (k + c² d_out), over embeddings of P c² d
        (about P matching position pairs), over materialised blocks of c² q (q: their columns, the fallback's
        included). From the features of one example of X."""
        f = self._features(X[:1])
        flops = 0.0
        for A, G, _ in f.outer:
            c = G.shape[0]
            flops += (0 if A is None else A.shape[-1]) + c * c * G.shape[-1]
        for A, G, _ in f.spatial:
            c, P = G.shape[0], A.shape[1]
            flops += P * P * (A.shape[-1] + c * c * G.shape[-1])
        for ids, G in f.index:  # as many matching position pairs as positions, taken as typical
            c = G.shape[0]
            flops += ids.shape[1] * c * c * G.shape[-1]
        for D in f.dense:
            flops += D.shape[1] ** 2 * D.shape[2]
        return flops

    def diagonal_blocks(self, X: torch.Tensor) -> torch.Tensor:
        """Per-example blocks J(x_i) J(x_i)ᵀ, (n, c, c), float64."""
        c = self.lin.output_dim(X)
        size = self._size(X, c)
        chunks = range(0, X.shape[0], size)
        return torch.cat([assembly.diagonal_blocks(self._features(X[i : i + size])) for i in chunks])

    def _size(self, X: torch.Tensor, c: int, mode: bool | str = False) -> int:
        """Examples per chunk so that a chunk's per-layer gradients stay within budget: materialised ones
        (``mode`` False); for kernel blocks from the held compact factors (``mode`` True), whose convolutions held
        as input and output gradients are expanded a slab at a time (:func:`assembly.block`), so that those count
        by their input and output gradients; or the per-position factors (``mode`` "positions")."""
        if not hasattr(self, "_dense_q"):
            probe = self._features(X[:1])
            self._dense_q = sum(f.shape[-1] for f in probe.dense)
            self._dense_q += sum(G.shape[2] * G.shape[3] for _, G, _ in probe.spatial)
            self._dense_q += sum(G.shape[2] * G.shape[3] for _, G in probe.index)
            self._example_bytes = feature_bytes(probe)
            held = self._features(X[:1], compact=True)
            self._compact_bytes = feature_bytes(held)
            self._compact_q = sum(f.shape[-1] for f in held.dense)
            self._compact_q += sum(G.shape[2] * G.shape[3] for _, G, _ in held.spatial)
            self._raw_entries = sum(A[0].numel() + G[:, 0].numel() for A, G, *_ in held.raw)
            self.trim_positions = False  # sizes and costs for every position (the probe may be a short sequence)
            try:
                positions = self._features(X[:1], compact="positions")
            finally:
                self.trim_positions = True
            self._positions_bytes = feature_bytes(positions)
            self._position_costs = _position_costs(positions)
        if mode == "positions":
            per_example = max(1, self._positions_bytes // 8)
        elif mode:
            per_example = max(1, c * self._compact_q + self._raw_entries)
        else:
            per_example = max(1, c * self._dense_q)
        return max(1, min(self.lin.chunk_size or 256, self.feature_entries // per_example))

    @property
    def feature_entries(self) -> int:
        """float64 entries of one chunk's materialised per-layer gradients: ``memory_budget`` / 32 (64 MiB per
        GiB of budget; 2²⁶ entries for the default 2 GiB)."""
        return max(1, self.lin.memory_budget // 32)


def _position_costs(f: Features) -> tuple[float, float, float]:
    """From factors of one example with every reused-weight Linear layer kept per position: over the layers that
    the cost model would materialise, multiply-adds per pair of examples of their kernel blocks materialised
    (c² d_out (k + 1)) and as position Grams (P² (k + c² d_out)), and of forming their factors ((1 + 2c) P k d_out:
    forward, backward and materialisation)."""
    materialised = position_grams = forming = 0.0
    for A, G, _ in f.spatial:
        c, P, k, d_out = G.shape[0], A.shape[1], A.shape[2], G.shape[3]
        if costs.position_gram_cheaper(P, k, d_out, c):
            continue
        materialised += c * c * d_out * (k + 1)
        position_grams += P * P * (k + c * c * d_out)
        forming += (1 + 2 * c) * P * k * d_out
    return materialised, position_grams, forming


def _attribute(module: nn.Module, dotted: str) -> Any:
    """``module``'s attribute at a dotted path (``"out_proj.weight"``), or None."""
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _prepared(x: Any, dtype: torch.dtype) -> Any:
    """Captured layer inputs for a rule: tensors detached, floating ones in ``dtype`` (integer ids kept), inside
    tuples, lists and dicts too."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, tuple | list):
        return type(x)(_prepared(v, dtype) for v in x)
    if isinstance(x, dict):
        return {k: _prepared(v, dtype) for k, v in x.items()}
    return x
