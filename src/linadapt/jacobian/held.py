"""The training Jacobian J(X) held for repeated products, one per linearization.

The iterative solvers (CG, Lanczos, Newton-CG) and a square :class:`~linadapt.kernels.operator.NTKOperator`
multiplied inside GPyTorch use the same J(X) hundreds of times. :class:`HeldJacobian` builds, once per inputs,
the cheapest form that fits the memory budget — per-layer factors
(:class:`~linadapt.jacobian.structured.FactoredJacobian`, no pass through the network per product), else the
network's retained autograd graph (:class:`~linadapt.jacobian.graph.GraphJacobian`) — and shares it between
everything multiplying with those inputs (the estimators' training data and any operator over it, however
often linear_operator rebuilds the operator). Each :class:`~linadapt.jacobian.linearization.Linearization`
owns one (``lin.held``); it remembers one X, the most recent, so a stream of different inputs never
accumulates memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from linadapt._inputs import KeywordInputs
from linadapt.jacobian import graph as graph_products
from linadapt.jacobian import structured

if TYPE_CHECKING:
    from linadapt.jacobian.linearization import Linearization

__all__ = ["HeldJacobian", "cached_jacobian", "inputs_key"]


def cached_jacobian(
    lin: Linearization, X: torch.Tensor, budget: int, factorize: bool = True, graph: bool = True
) -> Any:
    """J(X) in a form for repeated products: per-layer factors
    (:func:`~linadapt.jacobian.structured.factored_jacobian`) when they apply and fit ``budget`` bytes, else
    the retained graph (:func:`~linadapt.jacobian.graph.graph_jacobian`) when it fits, else None. Both have
    ``jvp(V)`` (k, p) -> (k, n, c) and ``vjp(U)`` (k, n, c) -> (k, p), float64."""
    held = structured.factored_jacobian(lin, X, budget) if factorize else None
    if held is None and graph:
        held = graph_products.graph_jacobian(lin, X, budget)
    return held


def inputs_key(X: Any) -> tuple:
    """Identifies a prepared input tensor across views and operator rebuilds (same memory, shape, strides,
    dtype and version); keyword inputs by their names and the keys of their tensors."""
    if isinstance(X, KeywordInputs):
        return tuple((name, inputs_key(t)) for name, t in X.items())
    return (X.data_ptr(), tuple(X.shape), tuple(X.stride()), X.dtype, str(X.device), X._version)


class HeldJacobian:
    """The J(X) one linearization holds, and what it learnt about holding one.

    Args:
        lin: the linearization that owns this object (``lin.held``).

    Attributes:
        key: :func:`inputs_key` of the inputs the entry is for (None before the first request).
        uses: requests counted for those inputs.
        value: the held object, ``False`` when nothing fitted (remembered), None when not built yet.
        graph_ok: whether products through a retained graph agree with torch.func's for this model (None:
            not checked yet; set by :func:`~linadapt.jacobian.graph.graph_jacobian`).
    """

    def __init__(self, lin: Linearization) -> None:
        self.lin = lin
        self.key: tuple | None = None
        self.uses = 0
        self.value: Any = None
        self.graph_ok: bool | None = None

    def get(
        self,
        X: torch.Tensor,
        budget: int,
        min_uses: int = 1,
        factorize: bool = True,
        graph: bool = True,
        count: bool = True,
    ) -> Any:
        """The J(X) held for repeated products (:func:`cached_jacobian`), built on the ``min_uses``-th request
        for these inputs. Returns the held object, or None (not yet requested often enough, or nothing fits; a
        refusal is remembered). ``count=False`` looks without counting a use."""
        key = inputs_key(X)
        if self.key != key:
            self.key, self.uses, self.value = key, 0, None
        if count:
            self.uses += 1
        if self.value is None and self.uses >= min_uses and count:
            held = cached_jacobian(self.lin, X, budget, factorize=factorize, graph=graph)
            self.value = held if held is not None else False
        return self.value or None

    def refused(self, X: torch.Tensor) -> bool:
        """Whether holding J(X) was tried for these inputs and nothing fitted."""
        return self.key == inputs_key(X) and self.value is False
