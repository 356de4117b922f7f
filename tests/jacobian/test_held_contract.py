"""The contract every held-Jacobian implementation keeps, against the plain-autograd Jacobian.

A held J(X) — the cached per-layer factors (:class:`~linadapt.jacobian.structured.FactoredJacobian`), the
retained autograd graph (:class:`~linadapt.jacobian.graph.GraphJacobian`) — and torch.func's products on the
linearization itself all give ``jvp(V)``: (k, p) -> (k, n, c) and ``vjp(U)``: (k, n, c) -> (k, p). Each must
equal the explicit J(X) (n, c, p) built by plain autograd one output at a time, and the two products must be
adjoint: ⟨U, J V⟩ = ⟨Jᵀ U, V⟩. A new implementation adds one entry to ``IMPLEMENTATIONS``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from models import BUILDERS, inputs_for, reference_jacobian
from test_structured import ZOO

from linadapt.jacobian.graph import graph_jacobian
from linadapt.jacobian.linearization import Linearization
from linadapt.jacobian.structured import factored_jacobian


class _TorchFunc:
    """torch.func's products on the linearization (no J(X) held): the baseline implementation."""

    def __init__(self, lin: Linearization, X: torch.Tensor) -> None:
        self.lin, self.X = lin, X

    def jvp(self, V: torch.Tensor) -> torch.Tensor:
        return self.lin.jvp(self.X, V)

    def vjp(self, U: torch.Tensor) -> torch.Tensor:
        return self.lin.vjp(self.X, U)


IMPLEMENTATIONS: dict[str, Callable[[Linearization, torch.Tensor], object | None]] = {
    "torch.func": _TorchFunc,
    "factored": lambda lin, X: factored_jacobian(lin, X, budget=2**30),
    "graph": lambda lin, X: graph_jacobian(lin, X, budget=2**30),
}
# where an implementation must apply (it may decline elsewhere, e.g. the factors with no layer rule at all)
# The graph differentiates the network's backward pass: torch has no derivative of the CPU backward of
# scaled_dot_product_attention (which nn.MultiheadAttention calls), so it declines the attention models.
ATTENTION = {"attention", "transformer", "transformer-seq"}
MUST_APPLY = {
    "torch.func": set(ZOO),
    "factored": {"mlp", "conv", "tokens", "resnet", "embedder"} | ATTENTION,
    "graph": set(ZOO) - ATTENTION,
}


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("name", sorted(ZOO))
def test_held_jacobian_products_match_the_autograd_jacobian(impl: str, name: str) -> None:
    model, X = ZOO[name]
    lin = Linearization(model, chunk_size=3)  # several chunks
    Xp = lin.prepare_inputs(X)
    held = IMPLEMENTATIONS[impl](lin, Xp)
    if held is None:
        assert name not in MUST_APPLY[impl], f"{impl} declined {name}"
        pytest.skip(f"{impl} does not apply to {name}")
    J = reference_jacobian(model, X, lin.param_names)  # (n, c, p)
    n, c, p = J.shape
    g = torch.Generator().manual_seed(0)
    V = torch.randn(3, p, generator=g, dtype=torch.float64)
    U = torch.randn(3, n, c, generator=g, dtype=torch.float64)
    JV, JtU = held.jvp(V), held.vjp(U)
    assert JV.shape == (3, n, c) and JtU.shape == (3, p)
    assert JV.dtype == JtU.dtype == torch.float64
    scale = float(J.abs().max())
    torch.testing.assert_close(JV, torch.einsum("icp,kp->kic", J, V), rtol=0, atol=1e-10 * scale * p)
    torch.testing.assert_close(JtU, torch.einsum("icp,kic->kp", J, U), rtol=0, atol=1e-10 * scale * n * c)
    # adjointness, each product against the other
    lhs = (U * JV).sum(dim=(1, 2))
    rhs = (JtU * V).sum(dim=1)
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-10 * scale)


@pytest.mark.parametrize("impl", ["factored", "graph"])
def test_a_single_vector_takes_the_same_values_as_a_batch(impl: str) -> None:
    """One vector goes through its own code path (no vmap, views instead of copies): the same numbers."""
    model = BUILDERS["mlp"]()
    X = inputs_for("mlp", 9)
    lin = Linearization(model)
    held = IMPLEMENTATIONS[impl](lin, lin.prepare_inputs(X))
    g = torch.Generator().manual_seed(1)
    V = torch.randn(4, lin.num_params, generator=g, dtype=torch.float64)
    U = torch.randn(4, 9, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(held.jvp(V[:1])[0], held.jvp(V)[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(held.vjp(U[:1])[0], held.vjp(U)[0], rtol=1e-12, atol=1e-14)
