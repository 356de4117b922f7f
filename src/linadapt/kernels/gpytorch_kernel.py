"""The network's tangent kernel as a GPyTorch kernel, for use inside a user's own GP model (GPyTorch, BoTorch)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from gpytorch.kernels import Kernel
from torch import nn

from linadapt.jacobian.inputs import OutputFn
from linadapt.jacobian.linearization import Linearization
from linadapt.jacobian.selection import ParamSpec
from linadapt.kernels.jacobian_features import jacobian_features
from linadapt.kernels.operator import NTKOperator

__all__ = ["NTKKernel"]


class NTKKernel(Kernel):
    """k(x, x') = J_a(x) · J_a(x') for one output a, or Σ_a J_a(x) · J_a(x') (the trace kernel).

    A ``gpytorch.kernels.Kernel`` for single-output GPs (``ExactGP``, BoTorch's ``SingleTaskGP``). Inputs are
    (..., n, d) with any batch dimensions, broadcast against each other and the kernel's ``batch_shape`` as in
    every GPyTorch kernel (BoTorch evaluates (b, q, d) candidates against (n, d) training inputs, or
    (b1, b2, q, d)); each d-vector is reshaped to ``input_shape`` before it reaches the network.

    Two routes compute it:

    * (n, d) inputs that do not require grad (a GP's training kernel, fits, predictions without gradients): a lazy,
      matrix-free :class:`~linadapt.kernels.operator.NTKOperator`, so GPyTorch's CG / Lanczos inference runs on
      products and the dense kernel, when asked for, comes from the per-layer rules;
    * batched inputs, a kernel with a ``batch_shape``, or inputs that require grad: a dense tensor from per-example
      Jacobians kept differentiable in the inputs (:mod:`~linadapt.kernels.jacobian_features`), so ∂k(x, x')/∂x
      flows by autograd (a second derivative of the network) — what BoTorch's ``optimize_acqf`` needs. It holds
      the Jacobians of every input at once: 8·N·c·p bytes for N inputs (twice that with gradients), checked against
      the network's memory budget (a ``MemoryBudgetError`` past it). A batch dimension along which inputs that do
      not require grad are all equal (BoTorch's copies of the training inputs) is computed once.

    Args:
        model: the trained network (linearized at its current weights, in eval mode; never modified and
            not registered as a submodule, so a GP optimiser never sees its weights).
        params: the parameters θ the kernel differentiates with respect to (``"all"``, ``"last"``,
            ``"bias"``, names / globs).
        input_shape: the shape of one network input, e.g. ``(1, 28, 28)``; ``None`` passes inputs as given.
        output: ``"sum"`` (default) — the trace kernel over all c outputs (for c = 1, the kernel of the only
            output); an integer a — the kernel of output a alone.
        chunk_size: examples per chunk in the Jacobian products.
        output_fn: maps the network's return value to its (n, c) or (n,) outputs (e.g. ``lambda out:
            out["logits"]``; the default reads a tensor, a dict's ``"logits"`` or an object's ``.logits``). The
            kernel's inputs are GPyTorch's (..., n, d) tensors: a network taking keyword inputs needs a wrapper
            module that builds them from such a tensor.
        **kwargs: GPyTorch's kernel options: ``batch_shape``, ``active_dims`` (``ard_num_dims`` does not apply:
            the kernel has no lengthscales).

    The kernel has no hyperparameters of its own; wrap it in ``gpytorch.kernels.ScaleKernel`` to learn
    the prior variance s². Results are in the dtype of the GP's inputs (float32 inputs: float32, the float64
    computation rounded; otherwise float64). ``kernel.dtype`` follows ``to(dtype)``; ``kernel.device`` is the
    network's, and ``kernel.to(device)`` takes a new snapshot of the weights there (the network itself is not
    moved). Copies (``copy.deepcopy``, indexing a batched kernel) share the linearization.
    """

    is_stationary = False
    has_lengthscale = False

    def __init__(
        self,
        model: nn.Module,
        params: ParamSpec = "all",
        input_shape: Sequence[int] | None = None,
        output: int | str = "sum",
        chunk_size: int | None = None,
        output_fn: OutputFn | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("ard_num_dims") is not None:
            raise ValueError("NTKKernel has no lengthscales: ard_num_dims does not apply")
        super().__init__(**kwargs)
        self.linearization = Linearization(model, params, chunk_size, output_fn=output_fn)
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        if not (output == "sum" or (isinstance(output, int) and not isinstance(output, bool) and output >= 0)):
            raise ValueError(f"output must be 'sum' or a non-negative output index, got {output!r}")
        self.output = output
        self._kernel_dtype = torch.get_default_dtype()

    # -- dtype, device, copies, indexing ---------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """The kernel's dtype: that of its last ``to(dtype)`` / ``double()`` / ``float()`` (torch's default dtype
        before), and of any parameters registered on it."""
        dtypes = {self._kernel_dtype} | {p.dtype for p in self.parameters()}
        if len(dtypes) > 1:
            raise RuntimeError(f"The kernel's parameters have multiple dtypes: {dtypes}.")
        return dtypes.pop()

    @property
    def device(self) -> torch.device:
        """The device the kernel computes on: its network snapshot's."""
        devices = {self.linearization.device} | {p.device for p in self.parameters()}
        if len(devices) > 1:
            raise RuntimeError(f"The kernel's parameters are on multiple devices: {devices}.")
        return devices.pop()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> NTKKernel:
        # what ``to`` / ``double`` / ``cuda`` do to a tensor, seen on a probe: the kernel's dtype follows, and a new
        # device gets a snapshot of the weights there
        module = super()._apply(fn, recurse)
        lin = self.linearization
        probe = fn(torch.zeros((), dtype=self._kernel_dtype, device=lin.device))
        if isinstance(probe, torch.Tensor):
            if probe.is_floating_point():
                self._kernel_dtype = probe.dtype
            if probe.device != lin.device:
                self.linearization = Linearization(
                    lin.model, list(lin.param_names), lin.chunk_size, probe.device, lin.memory_budget, lin.output_fn
                )
        return module

    def __deepcopy__(self, memo: dict[int, Any]) -> NTKKernel:
        memo[id(self.linearization)] = self.linearization  # the weight snapshot is shared, not copied
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    def __getitem__(self, index: Any) -> NTKKernel:
        """The kernel of a batch index: the same kernel with the indexed ``batch_shape`` (it has no parameters to
        index)."""
        if len(self.batch_shape) == 0:
            return self
        new = copy.deepcopy(self)
        new._batch_shape = torch.zeros(self.batch_shape)[index].shape
        return new

    # -- evaluation ------------------------------------------------------------------------------
    def _to_network(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """(..., n, d) kernel inputs as (..., n, *input_shape) network inputs."""
        if self.input_shape is not None:
            size = math.prod(self.input_shape)
            if x.shape[-1] != size:
                raise ValueError(f"{name} has {x.shape[-1]} features but input_shape {self.input_shape} needs {size}")
            x = x.reshape(*x.shape[:-1], *self.input_shape)
        return x

    def forward(
        self, x1: torch.Tensor, x2: torch.Tensor, diag: bool = False, last_dim_is_batch: bool = False, **params: Any
    ) -> Any:
        """The kernel between x1 (..., n1, d) and x2 (..., n2, d): a lazy :class:`~linadapt.NTKOperator` for
        (n, d) inputs without gradients, else a dense (..., n1, n2) tensor differentiable in the inputs; with
        ``diag`` (x1 and x2 the same inputs) the diagonal (..., n)."""
        if last_dim_is_batch:
            raise ValueError(
                "NTKKernel does not support last_dim_is_batch: the network takes the d features of an input "
                "together, so they cannot be a batch dimension (give the network the features it should see, "
                "e.g. with active_dims)"
            )
        if x1.dim() < 2 or x2.dim() < 2:
            raise ValueError(f"NTKKernel takes inputs of shape (..., n, d); got {tuple(x1.shape)}, {tuple(x2.shape)}")
        same = x1 is x2 or (x1.shape == x2.shape and torch.equal(x1, x2))
        if diag and not same:
            raise ValueError("diag=True needs x1 and x2 to be the same inputs")
        # the GP's own dtype (float32 models run their solves in float32); the products stay float64 inside
        dtype = torch.float32 if x1.dtype == torch.float32 else torch.float64
        tracked = torch.is_grad_enabled() and (x1.requires_grad or x2.requires_grad)
        if x1.dim() > 2 or x2.dim() > 2 or len(self.batch_shape) > 0 or tracked:
            return self._dense(x1, x2, diag, same, tracked).to(dtype)
        a = self.linearization.prepare_inputs(self._to_network(x1, "x1"), "x1")
        b = a if same else self.linearization.prepare_inputs(self._to_network(x2, "x2"), "x2")
        if diag:
            return NTKOperator(self.linearization, a, output=self.output, dtype=dtype).diagonal()
        return NTKOperator(self.linearization, a, None if same else b, output=self.output, dtype=dtype)

    def _features(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """φ(x) (..., n, w) for kernel inputs x (..., n, d), float64, differentiable in x."""
        net = self._to_network(x, name)
        # the checks every input gets (finite values, examples independent of each other), on a detached copy
        self.linearization.prepare_inputs(net.detach().reshape(-1, *net.shape[x.dim() - 1 :]), name)
        return jacobian_features(self.linearization, net, x.dim() - 2, self.output)

    def _dense(self, x1: torch.Tensor, x2: torch.Tensor, diag: bool, same: bool, tracked: bool) -> torch.Tensor:
        """The dense kernel (or its diagonal) over broadcast batch dimensions, float64, differentiable in x1, x2."""
        shape = torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2], self.batch_shape)
        F1 = self._features(_compact(x1), "x1")
        # equal inputs share their features, unless both sides need their own gradient
        F2 = F1 if x1 is x2 or (same and not tracked) else self._features(_compact(x2), "x2")
        if diag:
            return (F1 * F2).sum(-1).expand(*shape, x1.shape[-2])
        return (F1 @ F2.transpose(-1, -2)).expand(*shape, x1.shape[-2], x2.shape[-2])


def _compact(x: torch.Tensor) -> torch.Tensor:
    """x (..., n, d) with each batch dimension along which all entries are the same narrowed to size 1 (the
    results broadcast back): a dimension that is an expanded view, or — for inputs that need no gradient — whose
    slices are equal in value."""
    free = not (torch.is_grad_enabled() and x.requires_grad)
    for i in range(x.dim() - 2):
        if x.shape[i] > 1 and (x.stride(i) == 0 or (free and torch.equal(x, x.narrow(i, 0, 1).expand_as(x)))):
            x = x.narrow(i, 0, 1)
    return x
