"""The network's tangent kernel as a GPyTorch kernel, for use inside a user's own GP model."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from gpytorch.kernels import Kernel
from torch import nn

from linadapt.jacobian.linearization import Linearization
from linadapt.jacobian.selection import ParamSpec
from linadapt.kernels.operator import NTKOperator

__all__ = ["NTKKernel"]


class NTKKernel(Kernel):
    """k(x, x') = J_a(x) · J_a(x') for one output a, or Σ_a J_a(x) · J_a(x') (the trace kernel).

    A ``gpytorch.kernels.Kernel`` for single-output GPs (``ExactGP``, BoTorch models): GPyTorch hands the
    kernel flat (n, d) inputs, reshaped here to ``(n, *input_shape)`` before they reach the network.

    Args:
        model: the trained network (linearized at its current weights, in eval mode; never modified and
            not registered as a submodule, so a GP optimiser never sees its weights).
        params: the parameters θ the kernel differentiates with respect to (``"all"``, ``"last"``,
            ``"bias"``, names / globs).
        input_shape: the shape of one network input, e.g. ``(1, 28, 28)``; ``None`` passes inputs as given.
        output: ``"sum"`` (default) — the trace kernel over all c outputs (for c = 1, the kernel of the only
            output); an integer a — the kernel of output a alone.
        chunk_size: examples per chunk in the Jacobian products.

    The kernel has no hyperparameters of its own; wrap it in ``gpytorch.kernels.ScaleKernel`` to learn
    the prior variance s². It returns a lazy :class:`~linadapt.kernels.operator.NTKOperator`, so GPyTorch's
    CG / Lanczos inference runs matrix-free on it, in the dtype of the GP's inputs (float32 inputs: a float32
    operator, the float64 operator's results rounded; otherwise float64).
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
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.linearization = Linearization(model, params, chunk_size)
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        if not (output == "sum" or (isinstance(output, int) and not isinstance(output, bool) and output >= 0)):
            raise ValueError(f"output must be 'sum' or a non-negative output index, got {output!r}")
        self.output = output

    def _to_network(self, x: torch.Tensor, name: str) -> torch.Tensor:
        if x.dim() != 2:
            raise ValueError(
                f"NTKKernel takes inputs of shape (n, d) without batch dimensions; {name} is {tuple(x.shape)}"
            )
        if self.input_shape is not None:
            size = math.prod(self.input_shape)
            if x.shape[1] != size:
                raise ValueError(f"{name} has {x.shape[1]} features but input_shape {self.input_shape} needs {size}")
            x = x.reshape(x.shape[0], *self.input_shape)
        return self.linearization.prepare_inputs(x, name)

    def forward(
        self, x1: torch.Tensor, x2: torch.Tensor, diag: bool = False, last_dim_is_batch: bool = False, **params
    ):
        """The kernel between x1 (n1, d) and x2 (n2, d) as a lazy :class:`~linadapt.NTKOperator` (with
        ``diag``: its diagonal, dense)."""
        if last_dim_is_batch:
            raise ValueError("NTKKernel does not support last_dim_is_batch")
        same = x1.shape == x2.shape and torch.equal(x1, x2)
        # the GP's own dtype (float32 models run their solves in float32); the products stay float64 inside
        dtype = torch.float32 if x1.dtype == torch.float32 else torch.float64
        a = self._to_network(x1, "x1")
        b = a if same else self._to_network(x2, "x2")
        if diag:
            if not same:
                raise ValueError("diag=True needs x1 and x2 to be the same inputs")
            return NTKOperator(self.linearization, a, output=self.output, dtype=dtype).diagonal()
        return NTKOperator(self.linearization, a, None if same else b, output=self.output, dtype=dtype)
