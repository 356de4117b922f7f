"""Per-example Jacobians as kernel features that stay differentiable in the inputs.

k(x, x') = J(x) J(x')ᵀ is an inner product of features φ(x) = J(x) (c × p per example, flattened). The other
kernel routes (:class:`~linadapt.kernels.operator.NTKOperator`, the per-layer rules) detach their inputs;
here φ(x) is computed with ``torch.func`` (a vmapped reverse-mode Jacobian per example) on inputs that keep their
autograd history, so ∂k/∂x is available by ordinary autograd through the Jacobian computation — a second
derivative of the network, mixed in x and θ. BoTorch needs this to optimise an acquisition function over x.

Inputs may carry any number of batch dimensions; the features of (*batch, n, ...) inputs have shape
(*batch, n, w), with w = c·p for the trace kernel and w = p for the kernel of one output.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.func import jacrev, vjp, vmap

from linadapt._memory import MemoryBudgetError, format_bytes
from linadapt.jacobian._common import ALGEBRA_DTYPE, RHS_GROUP
from linadapt.jacobian.linearization import Linearization

__all__ = ["feature_width", "jacobian_features"]


def feature_width(lin: Linearization, c: int, output: Any) -> int:
    """w, the length of one example's feature vector: c·p for ``"sum"`` / all outputs, p for one output."""
    return lin.num_params * (c if output in (None, "sum") else 1)


def jacobian_features(lin: Linearization, X: torch.Tensor, batch_dims: int, output: Any = "sum") -> torch.Tensor:
    """φ(X) with φ(x)·φ(x') = k(x, x'), differentiable in X.

    Args:
        lin: the linearization.
        X: (*batch, n, *input_shape) inputs, in any floating dtype (cast to the network's, keeping the graph)
            or integer.
        batch_dims: how many leading dimensions of X are batch dimensions (before the example dimension n).
        output: ``"sum"`` or None — J(x) flattened over its c outputs (the trace kernel); an index a — J_a(x).

    Returns:
        (*batch, n, w), float64.

    Raises:
        MemoryBudgetError: the features of all examples (and their graph when X requires grad, counted as the
            features again) take more than the linearization's ``memory_budget``.
    """
    lead = X.shape[: batch_dims + 1]
    rows = X.reshape(math.prod(lead), *X.shape[batch_dims + 1 :])
    if rows.is_floating_point():
        rows = rows.to(dtype=lin.net_dtype)
    rows = rows.to(lin.device)
    c = lin.output_dim(rows.detach())
    width = feature_width(lin, c, output)
    need = 8 * rows.shape[0] * c * lin.num_params * (2 if rows.requires_grad else 1)
    if need > lin.memory_budget:
        raise MemoryBudgetError(
            f"the NTK features of {rows.shape[0]:,} inputs (batch {tuple(lead[:-1])} × {lead[-1]} examples, "
            f"{c} outputs × {lin.num_params:,} weights) need {format_bytes(need)}, above memory_budget "
            f"({format_bytes(lin.memory_budget)}): evaluate fewer candidates at once (e.g. BoTorch's "
            "options={'batch_limit': ...}, fewer raw_samples), select fewer weights (params=), or raise memory_budget"
        )
    if lin._per_example_jacobian and not lin._per_example_checked and rows.shape[0] >= 2:
        lin._jacobian_chunk(rows[:2].detach())  # the linearization's one-off check of vmap's per-example route
    size = max(1, (lin.memory_budget // 8) // max(1, 8 * c * lin.num_params))
    parts = []
    for start in range(0, rows.shape[0], size):
        xb = rows[start : start + size]
        jac = lin._guard("Jacobian (differentiable in the inputs)", _chunk_jacobian, lin, xb, inputs=xb)
        parts.append(jac if output in (None, "sum") else jac[:, int(output)])
    return torch.cat(parts).reshape(*lead, width)


def _chunk_jacobian(lin: Linearization, xb: torch.Tensor) -> torch.Tensor:
    """J(xb), (b, c, p) float64, keeping xb's autograd graph: a vmapped per-example jacrev, or reverse mode
    over the basis of the b·c outputs where the network cannot run on one example under vmap."""
    if lin._per_example_jacobian:

        def f_single(theta: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return lin._f(theta, x.unsqueeze(0))[0]

        try:
            return lin.flatten(vmap(jacrev(f_single), in_dims=(None, 0))(lin.theta, xb), 2)
        except Exception:  # e.g. a network that refuses a single example: the basis route below
            pass
    out, pull = vjp(lambda theta: lin._f(theta, xb), lin.theta)
    b, c = out.shape
    eye = torch.eye(b * c, dtype=out.dtype, device=out.device).reshape(b * c, b, c)
    jac = torch.cat([lin.flatten(vmap(pull)(eye[g : g + RHS_GROUP])[0], 1) for g in range(0, b * c, RHS_GROUP)])
    return jac.reshape(b, c, -1).to(ALGEBRA_DTYPE)
