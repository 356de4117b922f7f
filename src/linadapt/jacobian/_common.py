"""What every Jacobian engine shares: the algebra dtype, eval mode for the borrowed model, the error type.

The engines (:mod:`~linadapt.jacobian.linearization`, :mod:`~linadapt.jacobian.structured`,
:mod:`~linadapt.jacobian.graph`) import these from here: the structured rules and the graph need only these
and the linearization's methods, so they import :mod:`~linadapt.jacobian.linearization` for type checking
only, and the linearization can import them (it owns a structured engine and a held Jacobian).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["ALGEBRA_DTYPE", "RHS_GROUP", "LinearizationError", "eval_mode", "math_attention"]

ALGEBRA_DTYPE = torch.float64  # every product result, kernel and solve, whatever dtype the network runs in
RHS_GROUP = 64  # right-hand sides pushed through one vmapped product


class LinearizationError(ValueError):
    """The model cannot be evaluated or differentiated as required (raised with the original error chained)."""


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode for the duration, then restore each module's own flag. Embeddings
    with ``sparse=True`` give dense gradients meanwhile (torch.func cannot differentiate through sparse ones;
    the values are the same)."""
    modes = [(m, m.training) for m in model.modules()]
    sparse = [m for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse]
    try:
        for m, _ in modes:
            m.training = False
        for m in sparse:
            m.sparse = False
        yield
    finally:
        for m, was_training in modes:
            m.training = was_training
        for m in sparse:
            m.sparse = True


def math_attention() -> contextlib.AbstractContextManager:
    """A context in which ``scaled_dot_product_attention`` takes its math form (matrix products and a softmax),
    which has forward-mode derivatives; torch's fused CPU / CUDA attention kernels have none."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)
