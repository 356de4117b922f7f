"""The linearization of a network at its trained weights, and its matrix-free Jacobian products.

For a network f(x; θ) with selected parameters θ (p entries, see :mod:`linadapt.jacobian.selection`) at the
weights θ̂ it had when the :class:`Linearization` was made,

    f_lin(x; θ) = f(x; θ̂) + J(x) (θ − θ̂),      J(x) = ∂f(x; θ)/∂θ |θ̂   (c × p for one example).

Everything is computed with ``torch.func`` on a snapshot of the weights and buffers, with every module in
eval mode (BatchNorm uses running statistics, dropout is off); the user's model object is only borrowed
for its structure and is never changed (its ``training`` flags are restored after each call).

Conventions: for n examples the outputs are (n, c); a flat parameter-space vector has p entries, laid
out as the selected parameters flattened and concatenated in selection order. Results of products are
float64 whatever dtype the network runs in.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.func import jacrev, jvp, vjp, vmap

from linadapt._blocks import blocks
from linadapt._inputs import KeywordInputs, as_inputs
from linadapt._memory import MemoryBudgetError, format_bytes, resolve_memory_budget
from linadapt.jacobian._common import ALGEBRA_DTYPE, RHS_GROUP, LinearizationError, eval_mode, math_attention
from linadapt.jacobian.held import HeldJacobian
from linadapt.jacobian.inputs import (
    OutputFn,
    as_batch_of_one,
    check_examples_independent,
    network_outputs,
    vmappable,
)
from linadapt.jacobian.selection import ParamSpec, select_parameters
from linadapt.jacobian.structured import StructuredNTK, factored_jvp
from linadapt.jacobian.structured.costs import FACTOR_MAX_OUTPUTS

__all__ = ["ALGEBRA_DTYPE", "Linearization", "LinearizationError"]

_DEFAULT_CHUNK = 1024  # examples per chunk for products


class Linearization:
    """First-order Taylor expansion of ``model`` around its current weights, with Jacobian products.

    Args:
        model: any ``torch.nn.Module`` mapping a batch of n inputs to outputs of shape (n, c) or (n,)
            (the latter is treated as c = 1). Inputs are one tensor, ``model(X)``, or a mapping of tensors
            sharing the example dimension (a tokenizer's output), ``model(**X)``.
        params: which parameters θ are linearized (``"all"``, ``"last"``, ``"bias"`` or names / glob
            patterns); see :func:`linadapt.jacobian.selection.select_parameters`. The others stay at θ̂.
        chunk_size: examples per chunk in every product, bounding peak memory (default 1024; dense
            Jacobians use smaller chunks so a chunk stays under 1 GiB).
        device: where to compute (default: the device of the model's first parameter). The model is
            not moved: a snapshot of its weights and buffers is placed there.
        memory_budget: bytes (or a size such as ``"2GiB"``) linadapt's own arrays may take at once.
        output_fn: maps the network's return value to the (n, c) or (n,) outputs that are linearized (it is
            differentiated through: ``lambda out: out["logits"][:, 0]``, a pooled hidden state). Default: a
            tensor as returned, a dict's ``"logits"`` or an object's ``.logits`` (HuggingFace); see
            :mod:`linadapt.jacobian.inputs`.

    Attributes:
        param_names: the selected parameter names, in flat-vector order.
        num_params: p, the number of selected scalar parameters.
        net_dtype: the dtype the network runs in (that of its floating parameters).
    """

    def __init__(
        self,
        model: nn.Module,
        params: ParamSpec = "all",
        chunk_size: int | None = None,
        device: str | torch.device | None = None,
        memory_budget: int | float | str | None = None,
        output_fn: OutputFn | None = None,
    ) -> None:
        if output_fn is not None and not callable(output_fn):
            raise ValueError(f"output_fn must be a callable (or None), got {type(output_fn).__name__}")
        self.output_fn = output_fn
        self.memory_budget = resolve_memory_budget(memory_budget)
        self.param_names = select_parameters(model, params)
        named = dict(model.named_parameters(remove_duplicate=True))
        first = named[self.param_names[0]]
        self.device = torch.device(device) if device is not None else first.device
        if not first.is_floating_point():
            raise LinearizationError(f"parameter {self.param_names[0]!r} is not floating point: cannot differentiate")
        self.net_dtype = first.dtype
        if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        self.chunk_size = int(chunk_size) if chunk_size is not None else None
        self.model = model
        with torch.no_grad():
            self.theta = {n: named[n].detach().clone().to(self.device) for n in self.param_names}
            frozen = {n: p.detach().clone().to(self.device) for n, p in named.items() if n not in self.theta}
            frozen.update(
                {n: b.detach().clone().to(self.device) for n, b in model.named_buffers(remove_duplicate=True)}
            )
        self.frozen = frozen
        self.shapes = [self.theta[n].shape for n in self.param_names]
        self.numels = [self.theta[n].numel() for n in self.param_names]
        self.num_params = int(sum(self.numels))
        self._num_outputs: int | None = None
        self._per_example_jacobian = True
        self._per_example_checked = False
        self._activation_bytes: int | None = None  # saved activations per example (see product_chunk)
        self._forward_ad = True  # False once a module without forward-mode AD (e.g. EmbeddingBag) was met
        self._structured: Any = None  # StructuredNTK once built; False when it does not apply
        # J(X) held for repeated products (cached factors or the retained graph), for the most recent inputs
        self.held = HeldJacobian(self)
        # the per-example shape of the inputs an estimator was fitted on (set by its fit): named in the error
        # when the network fails on inputs of another shape (not checked up front: some networks take several)
        self.fitted_input_shape: tuple[int, ...] | None = None
        self.fitted_input_keys: list[str] | None = None  # the names of keyword inputs an estimator was fitted on
        self._examples_checked = False  # the network was seen to treat the examples of a batch independently
        self._fixed_entries = self._padding_rows(model)

    def _padding_rows(self, model: nn.Module) -> torch.Tensor:
        """Flat indices of the selected entries that autograd never differentiates: the ``padding_idx`` rows of
        embeddings (their backward gives them no gradient, so they stay fixed in training and J has zero columns
        for them in reverse mode). Forward mode would push a tangent through them; :meth:`jvp` zeroes these
        entries of its vectors so that J v is the adjoint of :meth:`vjp`."""
        offsets, start = {}, 0
        for name, numel in zip(self.param_names, self.numels):
            offsets[name] = start
            start += numel
        fixed = []
        for mname, mod in model.named_modules():
            if isinstance(mod, nn.Embedding | nn.EmbeddingBag) and getattr(mod, "padding_idx", None) is not None:
                name = f"{mname}.weight" if mname else "weight"
                if name in offsets:
                    row = mod.padding_idx % mod.num_embeddings
                    fixed.append(torch.arange(mod.embedding_dim) + offsets[name] + row * mod.embedding_dim)
        return torch.cat(fixed).to(self.device) if fixed else torch.zeros(0, dtype=torch.long, device=self.device)

    # ------------------------------------------------------------------ basics
    def __repr__(self) -> str:
        return (
            f"Linearization({type(self.model).__name__}, {len(self.param_names)} tensors, p={self.num_params}, "
            f"dtype={self.net_dtype}, device={self.device})"
        )

    def prepare_inputs(self, X: Any, name: str = "X") -> Any:
        """Validate inputs (a tensor or array, or a mapping of them: keyword inputs, see :mod:`linadapt._inputs`)
        and put them on the compute device; floating inputs take the network's dtype."""
        X = as_inputs(X, name)
        if isinstance(X, KeywordInputs):
            X = X.to(self.device, dtype=self.net_dtype)
        else:
            X = X.to(self.device, dtype=self.net_dtype if X.is_floating_point() else None)
        if not self._examples_checked and X.shape[0] >= 2:
            check_examples_independent(self, X)
        return X

    def _f(self, theta: dict[str, torch.Tensor], x: Any) -> torch.Tensor:
        """Network output on one chunk (a tensor, or keyword inputs), through ``output_fn``, as (b, c)."""
        return network_outputs(self.model, {**self.frozen, **theta}, x, self.output_fn)

    def _chunk_slices(self, n: int, size: int | None = None, X: torch.Tensor | None = None, k: int = 1) -> list[slice]:
        """Example slices of n: ``size``, else ``chunk_size``, else (with X) :meth:`product_chunk` for k vectors,
        else 1,024."""
        if size is None and self.chunk_size is None and X is not None:
            size = self.product_chunk(X, k)
        return blocks(n, size or self.chunk_size or _DEFAULT_CHUNK)

    def product_chunk(self, X: torch.Tensor, k: int = 1) -> int:
        """Examples per chunk of the torch.func products with k vectors at once (``chunk_size`` when given):
        as many as keep the activations their autograd graph saves (k-fold for k vmapped vectors) within an
        eighth of ``memory_budget``, at most 1,024. The activations per example are measured once, from the
        tensors saved by forward passes over one and three examples of X (the difference, so that saved
        weights are not counted per example)."""
        if self.chunk_size is not None:
            return self.chunk_size
        if self._activation_bytes is None and X.shape[0] > 0:
            self._activation_bytes = self._saved_bytes_per_example(X)
        per = max(1, self._activation_bytes or 1) * max(1, min(k, RHS_GROUP))
        return max(1, min(_DEFAULT_CHUNK, (self.memory_budget // 8) // per))

    def _saved_bytes_per_example(self, X: torch.Tensor) -> int:
        """Bytes of the tensors a forward pass saves for its backward pass, per example of X."""
        sizes = []
        for k in (1, 3) if X.shape[0] >= 3 else (1,):
            total = [0]

            def pack(t: torch.Tensor, total: list[int] = total) -> torch.Tensor:
                total[0] += t.numel() * t.element_size()
                return t

            theta = {n: v.detach().requires_grad_(True) for n, v in self.theta.items()}
            try:
                with (
                    torch.enable_grad(),
                    eval_mode(self.model),
                    torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
                ):
                    self._f(theta, X[:k])
            except Exception:  # the products themselves report what is wrong with the model
                return 0
            sizes.append(total[0])
        return max(0, (sizes[1] - sizes[0]) // 2) if len(sizes) == 2 else sizes[0]

    @property
    def num_outputs(self) -> int:
        """c, the number of network outputs (known after the first evaluation)."""
        if self._num_outputs is None:
            raise RuntimeError("num_outputs is known after the model has been evaluated once (call outputs(X))")
        return self._num_outputs

    def output_dim(self, X: torch.Tensor) -> int:
        """c, evaluating the network on one example if it has not been evaluated yet."""
        if self._num_outputs is None:
            self.outputs(X[:1])
        return self.num_outputs

    def restricted(self, names: list[str]) -> Linearization:
        """A copy linearized in ``names`` only (a subset of :attr:`param_names`; the other selected parameters
        are frozen at θ̂), sharing the snapshot's tensors, with no structured engine and nothing held."""
        sub = copy.copy(self)
        sub.param_names = list(names)
        sub.theta = {n: self.theta[n] for n in names}
        sub.frozen = {**self.frozen, **{n: v for n, v in self.theta.items() if n not in names}}
        sub.shapes = [sub.theta[n].shape for n in names]
        sub.numels = [sub.theta[n].numel() for n in names]
        sub.num_params = int(sum(sub.numels))
        sub._fixed_entries = sub._padding_rows(self.model)
        sub._structured = False
        sub.held = HeldJacobian(sub)
        return sub

    # ------------------------------------------------------------------ flat vectors
    def unflatten(self, V: torch.Tensor) -> dict[str, torch.Tensor]:
        """(..., p) flat vectors -> {name: (..., *shape)} in the network's dtype."""
        lead = V.shape[:-1]
        parts = V.to(self.net_dtype).split(self.numels, dim=-1)
        return {n: part.reshape(*lead, *s) for n, part, s in zip(self.param_names, parts, self.shapes)}

    def flatten(self, tree: dict[str, torch.Tensor], lead: int) -> torch.Tensor:
        """{name: (*lead_shape, *shape)} -> (*lead_shape, p) in float64; ``lead`` counts the leading dims."""
        first = tree[self.param_names[0]]
        lead_shape = first.shape[:lead]
        return torch.cat([tree[n].reshape(*lead_shape, -1).to(ALGEBRA_DTYPE) for n in self.param_names], dim=-1)

    def theta_vector(self) -> torch.Tensor:
        """θ̂ as a flat float64 vector (p,)."""
        return self.flatten(self.theta, 0)

    # ------------------------------------------------------------------ evaluation
    def _guard(self, what: str, fn, *args, inputs: torch.Tensor | None = None):
        """``fn(*args)`` in eval mode; any error but a LinearizationError reported as one clear
        LinearizationError — naming both shapes when ``inputs`` differ per example from those an estimator was
        fitted on (the likeliest cause then)."""
        try:
            with eval_mode(self.model):
                return fn(*args)
        except LinearizationError:
            raise
        except Exception as exc:  # torch raises many types; report them as one clear error
            fitted = self.fitted_input_shape
            if inputs is not None and fitted is not None and tuple(inputs.shape[1:]) != fitted:
                raise LinearizationError(
                    f"{what} failed on inputs of shape {tuple(inputs.shape[1:])} per example, but the model was "
                    f"fitted on inputs of shape {fitted} ({type(exc).__name__}: {exc})"
                ) from exc
            raise LinearizationError(
                f"{what} failed for {type(self.model).__name__} ({type(exc).__name__}: {exc}). The model must "
                "accept a batch of inputs and be differentiable with torch.func (functional_call, jvp, vjp, vmap)."
            ) from exc

    def outputs(self, X: Any) -> torch.Tensor:
        """f(X; θ̂), shape (n, c), float64."""
        X = self.prepare_inputs(X)
        outs = []
        with torch.no_grad():
            for sl in self._chunk_slices(X.shape[0]):
                out = self._guard("forward pass", self._f, self.theta, X[sl], inputs=X[sl])
                outs.append(out.to(ALGEBRA_DTYPE))
        result = torch.cat(outs)
        if self._num_outputs is None:
            self._num_outputs = int(result.shape[1])
        if not bool(torch.isfinite(result).all()):
            raise LinearizationError("model output contains NaN or inf on these inputs")
        return result

    def jvp(self, X: Any, V: torch.Tensor, with_outputs: bool = False) -> Any:
        """J(X) v for one or many parameter-space vectors.

        Args:
            X: (n, ...) inputs.
            V: (p,) or (k, p).
            with_outputs: also return f(X; θ̂), (n, c) float64, first: for one vector in forward mode it is the
                primal of the same pass (no separate forward pass).

        Returns:
            (n, c) or (k, n, c), float64: entry [j, i, a] = Σ_q ∂f_a(x_i)/∂θ_q · V[j, q].
        """
        X = self.prepare_inputs(X)
        single = V.dim() == 1
        V = V.reshape(-1, self.num_params).to(self.device)
        if self._fixed_entries.numel():  # (see _padding_rows)
            V = V.index_fill(1, self._fixed_entries, 0)
        fused = with_outputs and V.shape[0] == 1 and self._forward_ad
        groups, primals = [], []
        for g in range(0, V.shape[0], RHS_GROUP) if self._forward_ad else ():
            tangents = self.unflatten(V[g : g + RHS_GROUP])
            chunks = []
            for sl in self._chunk_slices(X.shape[0], X=X, k=min(RHS_GROUP, V.shape[0] - g)):
                xb = X[sl]

                def push(t: dict[str, torch.Tensor], xb: Any = xb, both: bool = False) -> Any:
                    with math_attention():  # attention by scaled_dot_product_attention has forward mode in it
                        out = jvp(lambda th: self._f(th, xb), (self.theta,), (t,))
                    return out if both else out[1]

                try:
                    if V.shape[0] - g == 1:  # one vector: no vmap (its overhead is ~30 % of a product here)
                        one = {name: t[0] for name, t in tangents.items()}
                        f, result = self._guard("Jacobian-vector product (jvp)", push, one, xb, True, inputs=xb)
                        result = result.unsqueeze(0)
                        primals.append(f.to(ALGEBRA_DTYPE).reshape(result.shape[1:]))
                    else:
                        result = self._guard("Jacobian-vector product (jvp)", vmap(push), tangents, inputs=xb)
                except LinearizationError as exc:
                    cause = str(exc.__cause__)
                    if not any(m in cause for m in ("forward AD", "forward mode AD", "forward-mode")):
                        raise
                    self._forward_ad = False  # a module torch has no forward mode for: reverse mode from now on
                    return self.jvp(X, V[0] if single else V, with_outputs)
                chunks.append(result.to(ALGEBRA_DTYPE))
            groups.append(torch.cat(chunks, dim=1))
        out = torch.cat(groups, dim=0) if groups else self._jvp_by_jacobian(X, V)
        self._num_outputs = int(out.shape[-1])
        out = out[0] if single else out
        if not with_outputs:
            return out
        return (torch.cat(primals) if fused and primals else self.outputs(X)), out

    def _jvp_by_jacobian(self, X: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """J(X) V for V (k, p) without forward-mode AD (a module torch has none for: ``nn.EmbeddingBag``): from the
        layer factors of chunks of X when layer rules apply (:func:`~linadapt.jacobian.structured.factored_jvp`),
        else through reverse-mode Jacobian chunks (memory-bounded). (k, n, c), float64."""
        engine = self.structured(X) if X.shape[0] > 0 else None
        if engine is not None and self.output_dim(X) <= FACTOR_MAX_OUTPUTS:
            out = factored_jvp(engine, X, V)
            self._num_outputs = int(out.shape[-1])
            return out
        V = V.to(ALGEBRA_DTYPE)
        parts = [torch.einsum("bcp,kp->kbc", J, V) for _, J in self.jacobian_chunks(X)]
        out = torch.cat(parts, dim=1)
        self._num_outputs = int(out.shape[-1])
        return out

    def vjp(self, X: Any, U: torch.Tensor) -> torch.Tensor:
        """J(X)ᵀ u for one or many output-space vectors.

        Args:
            X: (n, ...) inputs.
            U: (n, c) or (k, n, c).

        Returns:
            (p,) or (k, p), float64: entry [j, q] = Σ_{i,a} ∂f_a(x_i)/∂θ_q · U[j, i, a].
        """
        X = self.prepare_inputs(X)
        single = U.dim() == 2
        if single:
            U = U.unsqueeze(0)
        if U.dim() != 3 or U.shape[1] != X.shape[0]:
            raise ValueError(f"U must have shape (n, c) or (k, n, c) with n = {X.shape[0]}, got {tuple(U.shape)}")
        U = U.to(device=self.device, dtype=self.net_dtype)
        result = torch.zeros(U.shape[0], self.num_params, dtype=ALGEBRA_DTYPE, device=self.device)
        for sl in self._chunk_slices(X.shape[0], X=X, k=U.shape[0]):
            xb = X[sl]

            def pull(xb: torch.Tensor = xb, ub: torch.Tensor = U[:, sl]) -> torch.Tensor:
                # several vectors are pulled back by vmap, which has no batching rule for the backward of torch's
                # fused attention kernels (it would loop over them, warning): record attention in its math form
                with math_attention() if ub.shape[0] > 1 else contextlib.nullcontext():
                    out, fn = vjp(lambda th: self._f(th, xb), self.theta)
                if out.shape[1] != ub.shape[2]:
                    raise ValueError(f"U has {ub.shape[2]} outputs per example but the model has {out.shape[1]}")
                parts = []
                if ub.shape[0] == 1:  # one vector: no vmap
                    return self.flatten(fn(ub[0])[0], 0).unsqueeze(0)
                for g in range(0, ub.shape[0], RHS_GROUP):
                    parts.append(self.flatten(vmap(fn)(ub[g : g + RHS_GROUP])[0], 1))
                return torch.cat(parts)

            result += self._guard("vector-Jacobian product (vjp)", pull, inputs=xb)
        return result[0] if single else result

    # ------------------------------------------------------------------ dense Jacobians
    def _jacobian_chunk(self, xb: torch.Tensor) -> torch.Tensor:
        """Dense J for a chunk, (b, c, p), float64."""
        if self._per_example_jacobian:
            try:

                def f_single(th: dict[str, torch.Tensor], x: Any) -> torch.Tensor:
                    return self._f(th, as_batch_of_one(x))[0]

                with eval_mode(self.model):
                    jac = self.flatten(vmap(jacrev(f_single), in_dims=(None, 0))(self.theta, vmappable(xb)), 2)
                if not self._per_example_checked and xb.shape[0] >= 2:
                    # vmap's batching rules are not all right (PReLU's weight gradient comes out wrong, or
                    # fails, for some input shapes): check the per-example route once against reverse mode
                    # over a basis on two examples, and keep the latter if they disagree
                    self._per_example_checked = True
                    ref = self._guard("Jacobian", lambda: self._basis_jacobian(xb[:2]), inputs=xb[:2])
                    scale = float(ref.abs().max())
                    if float((jac[:2] - ref).abs().max()) > 1e-6 * max(scale, 1e-300):
                        raise RuntimeError("vmap's per-example Jacobian disagrees with reverse mode")
                return jac
            except LinearizationError:
                raise
            except Exception:
                # Some models cannot run on one example under vmap; use reverse mode over a basis instead.
                self._per_example_jacobian = False
        return self._guard("Jacobian", lambda: self._basis_jacobian(xb), inputs=xb)

    def _basis_jacobian(self, xb: torch.Tensor) -> torch.Tensor:
        """Dense J for a chunk, (b, c, p), float64: reverse mode over the basis of the b·c outputs."""

        def basis_pull() -> torch.Tensor:
            out, fn = vjp(lambda th: self._f(th, xb), self.theta)
            b, c = out.shape
            eye = torch.eye(b * c, dtype=out.dtype, device=out.device).reshape(b * c, b, c)
            rows = torch.cat([self.flatten(vmap(fn)(eye[g : g + RHS_GROUP])[0], 1) for g in range(0, b * c, RHS_GROUP)])
            return rows.reshape(b, c, -1)

        return basis_pull()

    @property
    def jacobian_entries(self) -> int:
        """float64 entries of Jacobian chunks held at once: half of ``memory_budget``."""
        return max(1, self.memory_budget // 2 // 8)

    def _jacobian_chunk_size(self, c: int) -> int:
        by_memory = max(1, self.jacobian_entries // max(1, c * self.num_params))
        return max(1, min(self.chunk_size or _DEFAULT_CHUNK, by_memory))

    def jacobian_chunks(self, X: Any) -> Iterator[tuple[slice, torch.Tensor]]:
        """Yield (slice, J(X[slice])) with J chunks of shape (b, c, p), float64, memory-bounded."""
        X = self.prepare_inputs(X)
        c = self.output_dim(X)
        for sl in self._chunk_slices(X.shape[0], self._jacobian_chunk_size(c)):
            yield sl, self._jacobian_chunk(X[sl])

    def jacobian(self, X: Any) -> torch.Tensor:
        """Dense J(X), shape (n, c, p), float64. Memory n·c·p·8 bytes: for small problems and tests."""
        return torch.cat([jac for _, jac in self.jacobian_chunks(X)])

    def structured(self, X: torch.Tensor) -> Any:
        """The per-layer NTK engine (:class:`~linadapt.jacobian.structured.StructuredNTK`) if some selected parameter
        has a layer rule and the rules agree with autodiff on this model (checked once, on X[:2]); else None."""
        if self._structured is None:
            engine = StructuredNTK(self)
            self._structured = engine if engine.layers else False
        if self._structured is not False and not self._structured.check(X):
            self._structured = False
        return self._structured or None

    def layer_forms(self, X: Any) -> list[dict[str, Any]]:
        """The form each layer's factors take in kernels and in products on inputs like X (see
        :meth:`~linadapt.jacobian.structured.StructuredNTK.layer_forms`): a debug listing of the per-layer cost
        model's choices. Empty when no layer rule applies (every parameter then goes through per-example
        Jacobians)."""
        X = self.prepare_inputs(X)
        engine = self.structured(X)
        return [] if engine is None else engine.layer_forms(X)

    def ntk_blocks(self, X: Any, method: str = "auto") -> torch.Tensor:
        """The per-example c×c blocks J(x_i) J(x_i)ᵀ, shape (n, c, c), float64, without storing J.

        ``method``: ``"auto"`` — per-layer rules where they apply (see :mod:`linadapt.jacobian.structured`);
        ``"jacobian"`` — contraction of per-example Jacobian chunks."""
        X = self.prepare_inputs(X)
        engine = self.structured(X) if _check_method(method) == "auto" else None
        if engine is not None:
            return engine.diagonal_blocks(X)
        return torch.cat([torch.einsum("bcp,bdp->bcd", jac, jac) for _, jac in self.jacobian_chunks(X)])

    def ntk(self, X1: Any, X2: Any | None = None, output: Any = None, method: str = "auto") -> torch.Tensor:
        """Dense NTK, float64.

        Args:
            X1: (n1, ...) inputs indexing the rows.
            X2: (n2, ...) inputs indexing the columns (None: X1).
            output: ``None`` — J(X1) J(X2)ᵀ, shape (n1·c, n2·c), example-major (entry [i·c + a, j·c + b] =
                J_a(x_i)·J_b(x'_j)); ``"sum"`` — the trace kernel Σ_a J_a(X1) J_a(X2)ᵀ, (n1, n2); an index a —
                J_a(X1) J_a(X2)ᵀ, (n1, n2).
            method: ``"auto"`` — per-layer structured products (Linear and convolution layers; the rest by
                Jacobian contraction restricted to them), ``"jacobian"`` — contraction of per-example
                Jacobian chunks of all selected parameters.
        """
        X1 = self.prepare_inputs(X1, "X1")
        X2t = None if X2 is None else self.prepare_inputs(X2, "X2")
        c = self.output_dim(X1)
        if output is not None and output != "sum":
            if isinstance(output, bool) or not isinstance(output, int) or not 0 <= output < c:
                raise ValueError(f"output must be None, 'sum' or an output index in [0, {c}); got {output!r}")
        n2 = X1.shape[0] if X2t is None else X2t.shape[0]
        need = 8 * X1.shape[0] * n2 * (c * c if output is None else 1)
        if need > self.memory_budget:
            raise MemoryBudgetError(
                f"the dense kernel of {X1.shape[0]:,} × {n2:,} examples ({c} outputs) needs {format_bytes(need)}, "
                f"above memory_budget ({format_bytes(self.memory_budget)}): use fewer examples at once, a "
                "matrix-free NTKOperator, or raise memory_budget"
            )
        engine = self.structured(X1) if _check_method(method) == "auto" else None
        if engine is not None:
            return engine.kernel(X1, X2t, output)
        K = self._ntk_jacobian(X1, X2t).reshape(X1.shape[0], c, -1, c)
        if output is None:
            return K.reshape(X1.shape[0] * c, -1)
        if output == "sum":
            return torch.diagonal(K, dim1=1, dim2=3).sum(-1)
        return K[:, output, :, output].contiguous()

    def cross_kernel_chunks(
        self, X: Any, Xs: Any, size: int, method: str = "auto"
    ) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
        """For consecutive chunks of ``size`` inputs of Xs: (sl, K(X, Xs[sl]) (n·c, b·c) example-major, the
        per-example blocks J(x*) J(x*)ᵀ (b, c, c)), float64 — what a function-space predictive needs of the
        test points, without a p-sized vector per test output. By per-layer rules where they apply (the
        factors of X computed once when they fit), else by Jacobian contraction."""
        X = self.prepare_inputs(X, "X")
        Xs = self.prepare_inputs(Xs, "Xs")
        engine = self.structured(X) if _check_method(method) == "auto" else None
        if engine is not None:
            yield from engine.cross_kernel_chunks(X, Xs, max(1, int(size)))
            return
        for start in range(0, Xs.shape[0], max(1, int(size))):
            sl = slice(start, min(start + max(1, int(size)), Xs.shape[0]))
            yield sl, self._ntk_jacobian(X, Xs[sl]), self.ntk_blocks(Xs[sl], method="jacobian")

    def cross_kernel_steps(self, X: Any, m: int, size: int) -> int:
        """How many chunks :meth:`cross_kernel_chunks` yields for m test points (a progress bar's total)."""
        engine = self.structured(X := self.prepare_inputs(X, "X"))
        return engine.cross_kernel_steps(X, m, max(1, size)) if engine else math.ceil(m / max(1, size))

    def _ntk_jacobian(self, X1: torch.Tensor, X2: torch.Tensor | None) -> torch.Tensor:
        """J(X1) J(X2)ᵀ, (n1·c, n2·c), by contracting Jacobian chunks."""
        X2t = X1 if X2 is None else X2
        c = self.output_dim(X1)
        n1, n2 = X1.shape[0], X2t.shape[0]
        K = torch.zeros(n1, c, n2, c, dtype=ALGEBRA_DTYPE, device=self.device)
        cache_second = n2 * c * self.num_params <= self.jacobian_entries
        second: list[tuple[slice, torch.Tensor]] | None = list(self.jacobian_chunks(X2t)) if cache_second else None
        for sl1, j1 in self.jacobian_chunks(X1):
            for sl2, j2 in second if second is not None else self.jacobian_chunks(X2t):
                if X2 is None and second is not None and sl2.start < sl1.start:
                    continue  # symmetric: fill from the transpose below
                block = torch.einsum("icp,jdp->icjd", j1, j2)
                K[sl1, :, sl2, :] = block
                if X2 is None and second is not None:
                    K[sl2, :, sl1, :] = block.permute(2, 3, 0, 1)
        return K.reshape(n1 * c, n2 * c)


def _check_method(method: str) -> str:
    if method not in ("auto", "jacobian"):
        raise ValueError(f"method must be 'auto' or 'jacobian', got {method!r}")
    return method
