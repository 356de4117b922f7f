"""Products with a fixed training Jacobian J(X) from the network's retained autograd graph.

The iterative solvers multiply by the same J(X) hundreds of times. When the per-layer factors of
:class:`~linadapt.jacobian.structured.FactoredJacobian` do not apply (layers without a rule — normalisation,
attention, custom modules —, more than 32 outputs) or do not fit in memory, every product would otherwise
run the network twice (a torch.func vjp, then a jvp that recomputes the primal pass with its tangents).

Here the forward pass of each chunk of X is run once and its graph kept, together with the graph of one
backward pass taken with a symbolic output cotangent u (``create_graph=True``): g(u) = J(X)ᵀ u, linear in u.
Then, for any u and w,

    Jᵀ u  = a backward pass through the kept forward graph (no forward pass),
    J w   = ∂/∂u ⟨g(u), w⟩ — a backward pass through the kept backward graph (no forward pass),

so one K·v costs two backward-sized passes instead of a forward, a backward and a forward with tangents.

Only derivatives with respect to u are ever taken from the backward graph, so the tensors the forward pass
saved enter it as constants (they are detached when unpacked): the second pass never computes the
second-order terms a Hessian product would need. Saved tensors keep autograd's in-place check — a model
that modifies a saved tensor in place raises instead of returning a wrong product. PyTorch's own
double-backward of a convolution computes those second-order terms regardless (two extra convolutions per
layer), so while the graph is built, 1-d and 2-d convolutions go through a convolution whose backward pass
is differentiable in the output gradient only: its derivative is the convolution's jvp,
conv(ẋ, W) + conv(x, Ẇ) + ḃ (on the CNN of the benchmark this makes J w 2.3× cheaper); batch normalisation
in eval mode, likewise, goes through the affine map it computes.

The graph of a chunk takes a few times the memory of its activations (far less than the factors, which
hold c output gradients per example and layer); :func:`graph_jacobian` builds it only when the estimate fits
the budget and its products agree with torch.func's on the first examples, and returns None otherwise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from linadapt._blocks import blocks
from linadapt._inputs import input_tensors
from linadapt.jacobian._common import ALGEBRA_DTYPE, RHS_GROUP, eval_mode

if TYPE_CHECKING:
    from linadapt.jacobian.linearization import Linearization

__all__ = ["GraphJacobian", "graph_jacobian", "graph_products_work", "kernel_product"]

# relative disagreement with torch.func's jvp, on the first examples, above which the graph is not used: a
# wrong derivative is off by O(1); float32 routes differ by rounding — on EfficientNet-Lite0 with one thread
# torch.func's products are 1e-4 from the float64 network's and the graph's 1.5e-6
# (benchmarks/check_graph_accuracy.py), so the check is loose there
_CHECK_RTOL = {torch.float64: 1e-9, torch.float32: 1e-3}
_BATCH_ROWS = 1024  # examples × vectors per batched backward pass


class _Saved:
    """Pack / unpack hooks for the tensors autograd saves while the graph is built: stored detached (so no
    reference cycle through an output's grad_fn), unpacked detached (constants of the backward graph),
    with autograd's in-place version check kept, and their bytes counted — storages in ``skip`` (the inputs X,
    the parameters and buffers, which exist anyway) excluded, each other storage once."""

    def __init__(self, skip: set[int]) -> None:
        self.skip = skip
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> tuple[torch.Tensor, int]:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.skip:
            self.storages[ptr] = storage.nbytes()
        return t.detach(), t._version

    @staticmethod
    def unpack(saved: tuple[torch.Tensor, int]) -> torch.Tensor:
        t, version = saved
        if t._version != version:
            raise RuntimeError(
                "a tensor saved for the backward pass was modified in place after it was saved; the graph "
                "products cannot be used for this model"
            )
        return t

    def nbytes(self) -> int:
        return sum(self.storages.values())


class _ConvGrads(torch.autograd.Function):
    """gO ↦ (gx, gW, gb), the backward pass of a convolution, differentiable in gO only (x and W enter as
    constants): d(gx, gW, gb)ᵀ(ġx, ġW, ġb) = conv(ġx, W) + conv(x, ġW) + ġb."""

    generate_vmap_rule = True  # for autograd's batched backward (many vectors at once)

    @staticmethod
    def forward(gO: torch.Tensor, x: torch.Tensor, w: torch.Tensor, has_bias: bool, conf: tuple, mask: tuple):
        stride, padding, dilation, groups = conf
        bias_sizes = [w.shape[0]] if has_bias else None
        return torch.ops.aten.convolution_backward(
            gO, x, w, bias_sizes, stride, padding, dilation, False, [0] * len(stride), groups, list(mask)
        )

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        gO, x, w, _, conf, _ = inputs
        ctx.save_for_backward(x, w)
        ctx.conf, ctx.out_shape = conf, gO.shape

    @staticmethod
    def backward(ctx: Any, ggx: torch.Tensor | None, ggw: torch.Tensor | None, ggb: torch.Tensor | None):
        x, w = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        conv = F.conv2d if x.dim() == 4 else F.conv1d
        terms = []
        if ggx is not None:
            terms.append(conv(ggx, w, None, stride, padding, dilation, groups))
        if ggw is not None:
            terms.append(conv(x, ggw, None, stride, padding, dilation, groups))
        if ggb is not None:
            terms.append(ggb.reshape(1, -1, *([1] * (x.dim() - 2))))
        out = None
        for t in terms:
            out = t if out is None else out + t
        if out is not None:
            out = out.expand(ctx.out_shape)
        return out, None, None, None, None, None


class _LeanConv(torch.autograd.Function):
    """A 1-d / 2-d convolution whose backward pass is :class:`_ConvGrads` (see the module docstring)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, *conf: Any) -> torch.Tensor:
        return (F.conv2d if x.dim() == 4 else F.conv1d)(x, w, b, *conf)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        x, w, b, *conf = inputs
        ctx.save_for_backward(x, w)
        ctx.conf, ctx.has_bias = tuple(conf), b is not None

    @staticmethod
    def backward(ctx: Any, gO: torch.Tensor):
        x, w = ctx.saved_tensors
        needs = ctx.needs_input_grad
        mask = (needs[0], needs[1], ctx.has_bias and needs[2])
        gx, gw, gb = _ConvGrads.apply(gO, x.detach(), w.detach(), ctx.has_bias, ctx.conf, mask)
        return gx, gw, gb, None, None, None, None


_CONV_DIMS = {F.conv1d: 1, torch.conv1d: 1, F.conv2d: 2, torch.conv2d: 2}  # spatial dimensions
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = (None, None, None, 1, 0, 1, 1)
_BN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_BN_DEFAULTS = (None, None, None, None, None, False, 0.1, 1e-5)


def _bind(args: tuple, kwargs: dict, names: tuple, defaults: tuple) -> list[Any]:
    return [args[i] if i < len(args) else kwargs.get(k, d) for i, (k, d) in enumerate(zip(names, defaults))]


class _LeanMode(TorchFunctionMode):
    """While a graph is built: routes ``conv1d`` / ``conv2d`` calls with numeric padding through
    :class:`_LeanConv`, and batch normalisation with running statistics (eval mode) through the affine map
    it is, x·a + (b − μ·a) with a = γ/√(σ² + ε), whose backward pass is differentiated by elementwise
    products (PyTorch's double-backward of batch normalisation computes the training-mode terms: 60 % of a
    product on a ResNet-style CNN, measured). ``convolutions`` counts the convolution calls seen."""

    def __init__(self) -> None:
        super().__init__()
        self.convolutions = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        d = _CONV_DIMS.get(func)
        if d is not None:
            self.convolutions += 1
            x, w, b, stride, padding, dilation, groups = _bind(args, kwargs, _CONV_ARGS, _CONV_DEFAULTS)
            if isinstance(x, torch.Tensor) and x.dim() == d + 2 and not isinstance(padding, str):
                return _LeanConv.apply(x, w, b, _tuple(stride, d), _tuple(padding, d), _tuple(dilation, d), int(groups))
        elif func is F.batch_norm:
            x, mean, var, w, b, training, _, eps = _bind(args, kwargs, _BN_ARGS, _BN_DEFAULTS)
            if not training and mean is not None and var is not None and x.dim() >= 2:
                scale = torch.rsqrt(var + eps)
                if w is not None:
                    scale = scale * w
                shift = -mean * scale
                if b is not None:
                    shift = shift + b
                shape = (1, -1) + (1,) * (x.dim() - 2)
                return (x * scale.reshape(shape) + shift.reshape(shape)).to(x.dtype)
        return func(*args, **kwargs)


def _tuple(v: Any, d: int) -> tuple[int, ...]:
    return tuple(int(e) for e in v) if isinstance(v, (tuple, list)) else (int(v),) * d


class _Chunk:
    """One chunk's kept graphs: outputs f (b, c), the symbolic cotangent u (b, c) and g(u) = J_bᵀ u (one
    tensor per parameter, None where the parameter does not depend on u)."""

    def __init__(self, rows: slice, out: torch.Tensor, u: torch.Tensor, grads: list[torch.Tensor | None]) -> None:
        self.rows, self.out, self.u, self.grads = rows, out, u, grads


class GraphJacobian:
    """J(X) for fixed inputs X as the retained autograd graphs of its chunks (see the module docstring).

    Products are in the network's dtype, like the torch.func products, and returned as float64.

    Args:
        lin: the linearization. X: (n, ...) prepared inputs. chunks: example slices, one graph each.
    """

    def __init__(self, lin: Linearization, X: torch.Tensor, chunks: list[slice]) -> None:
        self.lin, self.n, self.dtype = lin, X.shape[0], lin.net_dtype
        self.c = lin.output_dim(X)
        self._leaves = [lin.theta[name].detach().requires_grad_(True) for name in lin.param_names]
        existing = [*input_tensors(X), *lin.theta.values(), *lin.frozen.values()]
        self._skip = {t.untyped_storage().data_ptr() for t in existing if isinstance(t, torch.Tensor)}
        self._saved_bytes = 0
        self._batched = True  # autograd's batched backward works for this model (until it fails once)
        self.chunks: list[_Chunk] = []
        for rows in chunks:
            self.add(X, rows)

    def add(self, X: torch.Tensor, rows: slice, u0: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Run the forward pass of X[rows] and one backward pass with a symbolic cotangent u; keep both graphs.

        u is taken at ``u0`` ((b, c); zeros by default) — the graph of g(u) = J_bᵀu is the same for every
        value, since g is linear — and J_bᵀ u0 is returned as a flat (p,) float64 vector."""
        lin = self.lin
        theta = dict(zip(lin.param_names, self._leaves))
        saved = _Saved(self._skip)
        mode = _LeanMode()
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            with eval_mode(lin.model), mode:
                out = lin._f(theta, X[rows])
            u = torch.zeros_like(out) if u0 is None else u0.to(device=out.device, dtype=out.dtype).clone()
            u.requires_grad_(True)
            grads = torch.autograd.grad(out, self._leaves, u, create_graph=True, allow_unused=True)
        if mode.convolutions:
            # autograd's batched backward runs convolutions as grouped convolutions, 2–3× slower per vector
            # than one backward pass per vector (a ResNet-style CNN, measured); for linear layers it is faster
            self._batched = False
        kept = [g if g is not None and g.requires_grad else None for g in grads]
        self._saved_bytes += saved.nbytes() + sum(t.numel() * t.element_size() for t in (out, u))
        self._saved_bytes += sum(g.numel() * g.element_size() for g in kept if g is not None)
        self.chunks.append(_Chunk(rows, out, u, kept))
        return self._flat(grads, None)

    def _flat(self, grads: tuple[torch.Tensor | None, ...], batch: int | None) -> torch.Tensor:
        """Parameter gradients (with a leading ``batch`` dimension, or none) as flat float64 rows (k, p) or
        (p,); a parameter the outputs do not depend on (None) contributes zeros."""
        lead = () if batch is None else (batch,)
        tree = {
            name: leaf.new_zeros(*lead, *leaf.shape) if g is None else g.detach()
            for name, g, leaf in zip(self.lin.param_names, grads, self._leaves)
        }
        return self.lin.flatten(tree, len(lead))

    def nbytes(self) -> int:
        """Bytes held by the kept graphs (saved activations, outputs, cotangents and g(u); parameters not
        counted)."""
        return self._saved_bytes

    def _grad(self, outputs: Any, inputs: Any, cotangents: Any, batch: int | None) -> tuple[torch.Tensor | None, ...]:
        """torch.autograd.grad through the kept graphs for one vector (``batch`` None), or for ``batch``
        vectors (cotangents with that leading dimension) by autograd's batched backward; a model whose
        backward has no batching rule falls back to one pass per vector for good."""
        if batch is None:
            return torch.autograd.grad(outputs, inputs, cotangents, retain_graph=True, allow_unused=True)
        if self._batched:
            try:
                return torch.autograd.grad(
                    outputs, inputs, cotangents, retain_graph=True, allow_unused=True, is_grads_batched=True
                )
            except RuntimeError:
                self._batched = False
        per_vector = [
            torch.autograd.grad(outputs, inputs, [t[j] for t in cotangents], retain_graph=True, allow_unused=True)
            for j in range(batch)
        ]
        return tuple(None if parts[0] is None else torch.stack(parts) for parts in zip(*per_vector))

    def _group(self) -> int:
        """Vectors per backward pass: several through autograd's batched backward while a batch stays within
        ``_BATCH_ROWS`` examples × vectors (small chunks: per-call overhead dominates, batching wins), else
        one (an MLP at 1,024 examples: 1.5× faster per vector than batching 16, measured)."""
        if not self._batched:
            return 1
        rows = max(ch.rows.stop - ch.rows.start for ch in self.chunks)
        return max(1, min(RHS_GROUP, _BATCH_ROWS // max(rows, 1)))

    def vjp(self, U: torch.Tensor) -> torch.Tensor:
        """Jᵀ u for each row of U (k, n, c): (k, p), float64 — one backward pass per chunk through the kept
        forward graph, for one vector or a group of them (:meth:`_group`)."""
        lin = self.lin
        U = U.to(device=lin.device, dtype=self.dtype)
        result = torch.zeros(U.shape[0], lin.num_params, dtype=ALGEBRA_DTYPE, device=lin.device)
        for group in blocks(U.shape[0], self._group()):
            k = group.stop - group.start
            for ch in self.chunks:
                cot = U[group, ch.rows] if k > 1 else U[group.start, ch.rows]
                batch = k if k > 1 else None
                result[group] += self._flat(self._grad(ch.out, self._leaves, [cot], batch), batch).reshape(k, -1)
        return result

    def jvp(self, V: torch.Tensor) -> torch.Tensor:
        """J v for each row of V (k, p): (k, n, c), float64 — one pass per chunk through the kept backward
        graph, (J_b v) = ∂/∂u ⟨g_b(u), v⟩, for one vector or a group of them (:meth:`_group`)."""
        lin = self.lin
        V = V.reshape(-1, lin.num_params).to(lin.device)
        out = torch.zeros(V.shape[0], self.n, self.c, dtype=ALGEBRA_DTYPE, device=lin.device)
        for group in blocks(V.shape[0], self._group()):
            k = group.stop - group.start
            tangents = list(lin.unflatten(V[group] if k > 1 else V[group.start]).values())
            for ch in self.chunks:
                pairs = [(g, t) for g, t in zip(ch.grads, tangents) if g is not None]
                if not pairs:
                    continue
                (Jv,) = self._grad([g for g, _ in pairs], [ch.u], [t for _, t in pairs], k if k > 1 else None)
                if Jv is not None:
                    out[group, ch.rows] = Jv.reshape(k, -1, self.c).to(ALGEBRA_DTYPE)
        return out


def graph_jacobian(lin: Linearization, X: torch.Tensor, budget: int) -> GraphJacobian | None:
    """A :class:`GraphJacobian` of J(X) when its graphs fit in ``budget`` bytes (estimated from the first
    chunk) and its products agree with torch.func's on the first examples of that chunk; else None (callers
    then use torch.func products). Models whose backward pass cannot itself be differentiated give None, and
    the outcome of the agreement check is remembered on ``lin`` (``lin.held.graph_ok``). The check sees the first
    chunk only: a code path the model takes only for later inputs is not checked."""
    n = X.shape[0]
    if n == 0:
        return None
    chunks = lin._chunk_slices(n, X=X)
    try:
        graph = GraphJacobian(lin, X, chunks[:1])
        first = graph.chunks[0].rows
        estimate = graph.nbytes() * n / (first.stop - first.start)
        if estimate > budget:
            return None
        lin.held.graph_ok = _agrees(graph, lin, X[first])
    except torch.OutOfMemoryError:
        return None
    except Exception:  # the model's backward cannot be differentiated here (or its forward failed)
        lin.held.graph_ok = False
        return None
    if not lin.held.graph_ok:
        return None
    try:
        for rows in chunks[1:]:
            graph.add(X, rows)
    except Exception:  # out of memory, or an input-dependent path the graph cannot take: torch.func products
        return None
    return graph


def graph_products_work(lin: Linearization, X: torch.Tensor) -> bool:
    """Whether this linearization's products through a retained graph agree with torch.func's — checked once
    on the first 16 examples of X (a graph over those alone) and remembered on ``lin``."""
    if lin.held.graph_ok is None:
        graph_jacobian(lin, X[:16], budget=2**62)
    return bool(lin.held.graph_ok)


def kernel_product(lin: Linearization, X: torch.Tensor, u: torch.Tensor) -> torch.Tensor | None:
    """A cold K u = J(X)(J(X)ᵀu) for one u (n, c) in one forward and two backward passes: the forward pass,
    a backward pass with u as the symbolic cotangent (its value is Jᵀu, its graph gives J w), then J(Jᵀu)
    through that graph — torch.func's vjp then jvp costs a forward pass more (the jvp recomputes the primal).

    Returns (n, c) float64, or None when X spans more than one chunk (the graph of all of X would have to be
    kept), the model's graph products do not work (:func:`graph_products_work`) or the product fails (then
    the caller's torch.func products run, and report any error of the model itself)."""
    n = X.shape[0]
    if n == 0 or len(lin._chunk_slices(n, X=X)) != 1 or not graph_products_work(lin, X):
        return None
    try:
        graph = GraphJacobian(lin, X, [])
        w = graph.add(X, slice(0, n), u0=u)  # Jᵀu
        return graph.jvp(w.unsqueeze(0))[0]
    except Exception:
        return None


def _agrees(graph: GraphJacobian, lin: Linearization, xb: torch.Tensor, rows: int = 16) -> bool:
    """Whether J v and Jᵀu through the kept graph match torch.func's jvp and vjp on the first ``rows``
    examples of the first chunk, for random v and u."""
    gen = torch.Generator().manual_seed(0)
    m = min(rows, xb.shape[0])
    v = torch.randn(1, lin.num_params, generator=gen, dtype=ALGEBRA_DTYPE).to(lin.device)
    u = torch.zeros(1, graph.n, graph.c, dtype=ALGEBRA_DTYPE, device=lin.device)
    u[0, :m] = torch.randn(m, graph.c, generator=gen, dtype=ALGEBRA_DTYPE).to(lin.device)
    rtol = _CHECK_RTOL.get(lin.net_dtype, 1e-2)
    pairs = ((graph.jvp(v)[0, :m], lin.jvp(xb[:m], v[0])), (graph.vjp(u)[0], lin.vjp(xb[:m], u[0, :m])))
    return all(
        bool(torch.isfinite(ours).all()) and float((ours - ref).norm()) <= rtol * max(float(ref.norm()), 1e-30)
        for ours, ref in pairs
    )
