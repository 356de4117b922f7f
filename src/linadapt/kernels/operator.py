"""The finite-width neural tangent kernel as a matrix-free ``linear_operator.LinearOperator``.

K = J(X1) J(X2)ᵀ has shape (n1·c, n2·c) and is **example-major**: row i·c + a is example i, output a.
A product K V costs one vector-Jacobian product over X2 and one Jacobian-vector product over X1, for
all columns of V at once (vmap), chunked over the data; K is never formed. A square operator (X2 = X1)
multiplied more than once — as inside CG or Lanczos — holds J(X) for its later products, as per-layer
factors or as the network's retained autograd graph (:class:`~linadapt.jacobian.held.HeldJacobian`, within
half the memory budget, shared through the linearization with the estimators' training data), so they need no
forward pass; its first single-vector product runs one forward pass instead of two
(:func:`~linadapt.jacobian.graph.kernel_product`).
"""

from __future__ import annotations

from typing import Any

import torch
from linear_operator.operators import LinearOperator
from torch import nn

from linadapt.jacobian.graph import kernel_product
from linadapt.jacobian.held import inputs_key
from linadapt.jacobian.inputs import OutputFn
from linadapt.jacobian.linearization import ALGEBRA_DTYPE, Linearization
from linadapt.jacobian.selection import ParamSpec

__all__ = ["NTKOperator", "ntk_gram"]

OutputSpec = int | str | None
HELD_BYTES: int | None = None  # memory a square operator may hold for its products; None: half memory_budget


def _check_output(output: OutputSpec, c: int) -> OutputSpec:
    if output is None or output == "sum":
        return output
    if isinstance(output, bool) or not isinstance(output, int):
        raise ValueError(f"output must be None (all outputs), 'sum', or an output index; got {output!r}")
    if not 0 <= output < c:
        raise ValueError(f"output index {output} is out of range for a model with {c} outputs")
    return output


class NTKOperator(LinearOperator):
    """K = J(X1) J(X2)ᵀ as a lazy, matrix-free linear operator (float64 unless ``dtype`` says otherwise).

    Args:
        model: a ``torch.nn.Module`` (linearized at its current weights, in eval mode) or an existing
            :class:`~linadapt.jacobian.linearization.Linearization` (then ``params`` and ``chunk_size`` are ignored).
        X1: (n1, ...) inputs indexing the rows, or a mapping of such tensors (keyword inputs: ``model(**X1)``).
        X2: (n2, ...) inputs indexing the columns; ``None`` means X1 (a square, symmetric PSD operator).
        params: parameter selection, see :func:`linadapt.jacobian.selection.select_parameters`.
        chunk_size: examples per chunk in the products.
        output: ``None`` — all outputs, shape (n1·c, n2·c), example-major; an index ``a`` — the kernel of
            output a alone, J_a(X1) J_a(X2)ᵀ of shape (n1, n2); ``"sum"`` — the trace kernel
            Σ_a J_a(X1) J_a(X2)ᵀ of shape (n1, n2).
        hold: whether a square operator holds J(X) for its products from the second one on (see
            :meth:`held`) and runs a first single-vector product through the retained graph (one forward
            pass, :func:`~linadapt.jacobian.graph.kernel_product`); ``False`` makes every product torch.func's vjp
            then jvp, as for benchmarks.
        memory_budget: bytes (or a size such as ``"2GiB"``) the products' chunks and the held J(X) may take
            (half of it); default :func:`~linadapt._memory.default_memory_budget`. Ignored when ``model`` is a
            Linearization (its own budget is used).
        dtype: the dtype of the operator's results through the linear_operator interface (``matmul``, entries,
            ``diagonal()``, ``to_dense()``, hence ``solve`` and the rest): float64 (default) or float32, for a
            float32 GPyTorch model (:class:`~linadapt.kernels.gpytorch_kernel.NTKKernel` passes its inputs' dtype).
        output_fn: maps the network's return value to its (n, c) or (n,) outputs (default: a tensor, a dict's
            ``"logits"``, an object's ``.logits``); ignored when ``model`` is a Linearization (it has its own).
            The results
            are the float64 operator's, rounded; :meth:`apply_rows` stays float64. ``float()`` / ``double()`` /
            ``to(dtype)`` change this dtype, not the inputs'.

    The operator plugs into linear_operator's algorithms (``solve``, ``inv_quad_logdet``, CG, Lanczos,
    pivoted Cholesky); ``to_dense()`` builds the dense kernel with :func:`ntk_gram`'s per-layer products.
    """

    def __init__(
        self,
        model: nn.Module | Linearization,
        X1: Any,
        X2: Any | None = None,
        params: ParamSpec = "all",
        chunk_size: int | None = None,
        output: OutputSpec = None,
        symmetric: bool | None = None,
        hold: bool = True,
        dtype: torch.dtype = ALGEBRA_DTYPE,
        memory_budget: int | str | None = None,
        output_fn: OutputFn | None = None,
    ) -> None:
        if dtype not in (torch.float64, torch.float32):
            raise ValueError(f"dtype must be torch.float64 or torch.float32, got {dtype}")
        if isinstance(model, Linearization):
            lin = model
        else:
            lin = Linearization(model, params, chunk_size, memory_budget=memory_budget, output_fn=output_fn)
        X1t = lin.prepare_inputs(X1, "X1")
        if X2 is None:
            X2t = X1t
            symmetric = True if symmetric is None else symmetric
        else:
            X2t = X1t if X2 is X1 else lin.prepare_inputs(X2, "X2")
            symmetric = bool(symmetric) if symmetric is not None else X2t is X1t
        c = lin.output_dim(X1t)
        output = _check_output(output, c)
        super().__init__(X1=X1t, X2=X2t, model=lin, output=output, symmetric=symmetric, hold=hold, dtype=dtype)
        self._dtype = dtype
        self.linearization = lin
        self.X1, self.X2 = X1t, X2t
        self.output = output
        self.symmetric = symmetric
        self.num_outputs = c
        self._width = c if output is None else 1
        self._memo: dict[str, Any] = {}
        self.hold = bool(hold)

    # -- the linear_operator contract ------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the operator's results (float64 unless built for a float32 model)."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        """The network's device, where every product is computed."""
        return self.linearization.device

    def _rebuilt(self, X1: torch.Tensor, X2: torch.Tensor, dtype: torch.dtype) -> NTKOperator:
        """This operator's settings (linearization, output, symmetry, hold) over other inputs or dtype."""
        return NTKOperator(
            self.linearization, X1=X1, X2=X2, output=self.output, symmetric=self.symmetric, hold=self.hold, dtype=dtype
        )

    def type(self, dtype: torch.dtype) -> NTKOperator:
        """The same operator with results in ``dtype`` (float64 or float32); the inputs and the network are
        left as they are (linear_operator's default would cast the inputs instead). ``double()`` / ``float()``
        come here too; other dtypes raise."""
        return self._rebuilt(self.X1, self.X2, dtype)

    def to(self, *args: Any, **kwargs: Any) -> NTKOperator:
        """``to(dtype)`` as :meth:`type`; a device other than the network's raises (move the network instead)."""
        device, dtype, *_ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None and torch.device(device) != self.device:
            raise ValueError(
                f"NTKOperator computes on its network's device ({self.device}); move the network to {device} and "
                "build the operator there"
            )
        return self if dtype is None or dtype == self._dtype else self.type(dtype)

    def _size(self) -> torch.Size:
        return torch.Size((self.X1.shape[0] * self._width, self.X2.shape[0] * self._width))

    def _transpose_nonbatch(self) -> NTKOperator:
        return self._rebuilt(self.X2, self.X1, self._dtype)

    def _matmul(self, rhs: torch.Tensor) -> torch.Tensor:
        is_vec = rhs.dim() == 1
        R = rhs.unsqueeze(-1) if is_vec else rhs
        batch, (N2, k) = R.shape[:-2], R.shape[-2:]
        rows = R.reshape(-1, N2, k).transpose(-1, -2).reshape(-1, N2)
        out = self.apply_rows(rows).to(self._dtype)  # (B*k, N1)
        out = out.reshape(*batch, k, -1).transpose(-1, -2)
        return out.squeeze(-1) if is_vec else out

    def _square(self) -> bool:
        # the same inputs, also after linear_operator rebuilt the operator from its arguments
        return self.symmetric and (self.X2 is self.X1 or inputs_key(self.X1) == inputs_key(self.X2))

    def held(self, count: bool = False) -> Any:
        """J(X) held for this square operator's products from the second product with these inputs on (per-layer
        factors or the retained graph, shared with the estimators' training data through the linearization,
        see :class:`~linadapt.jacobian.held.HeldJacobian`), or None: a rectangular operator, ``hold=False``, the
        first product, or nothing fits in half the linearization's ``memory_budget``. ``count`` counts a product."""
        if not (self.hold and self._square()):
            return None
        budget = HELD_BYTES if HELD_BYTES is not None else self.linearization.memory_budget // 2
        return self.linearization.held.get(self.X1, budget, min_uses=2, count=count)

    def apply_rows(self, V: torch.Tensor) -> torch.Tensor:
        """K applied to each row of V: V (m, n2·w) -> (m, n1·w), w = c or 1 per ``output``."""
        lin, c = self.linearization, self.num_outputs
        V = V.to(device=self.device, dtype=ALGEBRA_DTYPE)
        m, n2, n1 = V.shape[0], self.X2.shape[0], self.X1.shape[0]
        held = self.held(count=True)
        if held is None and self.hold and self.output is None and m == 1 and self._square():
            # a first product: one forward pass instead of two (unless J(X) was found too big to hold)
            out = None if lin.held.refused(self.X1) else kernel_product(lin, self.X1, V.reshape(n1, c))
            if out is not None:
                return out.reshape(1, n1 * c)
        vjp = held.vjp if held is not None else (lambda U: lin.vjp(self.X2, U))
        jvp = held.jvp if held is not None else (lambda W: lin.jvp(self.X1, W))
        if self.output is None:
            return jvp(vjp(V.reshape(m, n2, c))).reshape(m, n1 * c)
        if self.output == "sum":
            U = torch.zeros(c, m, n2, c, dtype=V.dtype, device=V.device)
            for a in range(c):
                U[a, :, :, a] = V
            out = jvp(vjp(U.reshape(c * m, n2, c))).reshape(c, m, n1, c)
            return torch.diagonal(out, dim1=0, dim2=3).sum(-1)
        a = int(self.output)
        U = torch.zeros(m, n2, c, dtype=V.dtype, device=V.device)
        U[:, :, a] = V
        return jvp(vjp(U))[:, :, a]

    def to_dense(self) -> torch.Tensor:
        """The dense kernel by per-layer products (:func:`ntk_gram`), not by multiplying the identity."""
        if "dense" not in self._memo:
            X2 = None if self.symmetric and self.X2 is self.X1 else self.X2
            self._memo["dense"] = self.linearization.ntk(self.X1, X2, output=self.output).to(self._dtype)
        return self._memo["dense"]

    def _diagonal(self) -> torch.Tensor:
        if not self.symmetric:
            raise RuntimeError("the diagonal is defined for the square operator J(X) J(X)ᵀ (X2 = None)")
        blocks = self.linearization.ntk_blocks(self.X1)  # (n, c, c)
        diag = torch.diagonal(blocks, dim1=-2, dim2=-1)  # (n, c)
        if self.output is None:
            return diag.reshape(-1).to(self._dtype)
        if self.output == "sum":
            return diag.sum(-1).to(self._dtype)
        return diag[:, int(self.output)].to(self._dtype)

    def _held_for_rows(self) -> Any:
        """The J(X) this square, all-outputs operator already holds (see :meth:`held`), for computing selected
        rows without a pass over X — as pivoted-Cholesky preconditioners ask for; else None."""
        return self.held(count=False) if self.output is None else None

    def _get_indices(self, row_index: Any, col_index: Any, *batch_indices: Any) -> torch.Tensor:
        # Entries K[row_index, col_index] (broadcast): compute the needed rows from the few examples they
        # touch (a vjp over those examples, a jvp over X2 — through the held J(X) when there is one), then
        # gather the columns.
        row_index, col_index = torch.broadcast_tensors(torch.as_tensor(row_index), torch.as_tensor(col_index))
        w = self._width
        uniq_rows, row_inv = torch.unique(row_index.reshape(-1), return_inverse=True)
        examples, ex_inv = torch.unique(uniq_rows // w, return_inverse=True)
        sub = self.X1[examples.to(self.X1.device)]
        basis = torch.zeros(uniq_rows.numel(), examples.numel() * w, dtype=ALGEBRA_DTYPE, device=self.device)
        basis[torch.arange(uniq_rows.numel()), ex_inv * w + uniq_rows % w] = 1.0
        held = self._held_for_rows()
        if held is not None:  # J(X) held: the rows are J(X) (J(sub)ᵀ e), one small vjp, no pass over X
            U = basis.reshape(-1, examples.numel(), w)
            rows = held.jvp(self.linearization.vjp(sub, U)).reshape(U.shape[0], -1)
        else:  # rows of K(sub, X2) = (K(X2, sub) applied to the one-hot vectors)ᵀ
            rows = NTKOperator(self.linearization, X1=self.X2, X2=sub, output=self.output, symmetric=False)
            rows = rows.apply_rows(basis)
        picked = rows[row_inv.to(rows.device), col_index.reshape(-1).to(rows.device)]
        return picked.reshape(row_index.shape).to(self._dtype)

    def _expand_batch(self, batch_shape: torch.Size) -> LinearOperator:  # pragma: no cover - no batch support
        raise NotImplementedError("NTKOperator does not support batch dimensions")

    def __repr__(self) -> str:
        return (
            f"NTKOperator(shape={tuple(self.shape)}, outputs={self.num_outputs}, output={self.output!r}, "
            f"p={self.linearization.num_params})"
        )


def ntk_gram(
    model: nn.Module | Linearization,
    X1: Any,
    X2: Any | None = None,
    params: ParamSpec = "all",
    chunk_size: int | None = None,
    output: OutputSpec = None,
    method: str = "auto",
    memory_budget: int | str | None = None,
    output_fn: OutputFn | None = None,
) -> torch.Tensor:
    """Dense NTK J(X1) J(X2)ᵀ, float64.

    ``output=None``: shape (n1·c, n2·c), example-major, the same ordering as :class:`NTKOperator`: entry
    [i·c + a, j·c + b] = J_a(x_i) · J_b(x'_j). ``"sum"``: the trace kernel Σ_a J_a(X1) J_a(X2)ᵀ, (n1, n2). An
    index a: J_a(X1) J_a(X2)ᵀ, (n1, n2).

    ``method="auto"`` computes it layer by layer — for a Linear layer (a·a') (g·g'), inputs times output
    gradients; for a convolution its per-example gradient formed from patches and output gradients — and
    contracts per-example Jacobians only for parameters without a rule (see :mod:`linadapt.jacobian.structured`);
    ``"jacobian"`` contracts per-example Jacobian chunks of all selected parameters. Memory is bounded by a
    chunk either way; the full J is never stored. ``memory_budget`` (bytes or a size such as ``"2GiB"``; default
    :func:`~linadapt._memory.default_memory_budget`) sizes the chunks; a kernel larger than it is a
    ``MemoryBudgetError`` naming the size. X1 and X2 may be mappings of tensors (keyword inputs); ``output_fn``
    maps the network's return value to its outputs (see :class:`NTKOperator`).
    """
    if isinstance(model, Linearization):
        lin = model
    else:
        lin = Linearization(model, params, chunk_size, memory_budget=memory_budget, output_fn=output_fn)
    return lin.ntk(X1, X2, output=output, method=method)
