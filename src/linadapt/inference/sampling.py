"""Joint samples of the posterior over the network's outputs at a set of inputs (function samples, e.g. for
Thompson sampling).

The posterior of the linearized network at m inputs is a Gaussian over their m·c outputs: the mean (m, c) and
the joint covariance J* S J*ᵀ (m·c × m·c, example-major: row i·c + a is input i, output a) that the posteriors'
``latent_cov`` gives. A sample is mean + L z with L Lᵀ the covariance (a float64 Cholesky factor, with jitter
when the covariance is singular to rounding, as it is for more outputs than weights or repeated inputs) and
z standard normal. The covariance and its factor take 2 · 8·(m·c)² bytes: :func:`check_sample_memory` refuses,
with a ``MemoryBudgetError``, what would not fit the budget.
"""

from __future__ import annotations

import torch

from linadapt._memory import MemoryBudgetError, format_bytes
from linadapt.jacobian._common import ALGEBRA_DTYPE

__all__ = ["check_sample_memory", "gaussian_samples", "sample_count"]

JITTERS = (0.0, 1e-12, 1e-10, 1e-8, 1e-6)  # relative to the mean diagonal entry, tried in turn


def sample_count(n_samples: int) -> int:
    """``n_samples`` as a positive int (ValueError otherwise)."""
    if isinstance(n_samples, bool) or int(n_samples) != n_samples or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    return int(n_samples)


def check_sample_memory(m: int, c: int, n_samples: int, memory_budget: int) -> None:
    """Raise ``MemoryBudgetError`` when the joint covariance of m·c outputs, its factor and the samples
    (8·(2·(m·c)² + 2·n_samples·m·c) bytes) pass ``memory_budget``."""
    mc = m * c
    need = 8 * (2 * mc * mc + 2 * n_samples * mc)
    if need > memory_budget:
        raise MemoryBudgetError(
            f"joint samples over {m:,} inputs × {c} outputs need their {mc:,} × {mc:,} covariance and its Cholesky "
            f"factor, {format_bytes(need)}, above memory_budget ({format_bytes(memory_budget)}): sample fewer "
            "inputs at once (samples of separate calls are independent of each other) or raise memory_budget"
        )


def gaussian_samples(
    mean: torch.Tensor, cov: torch.Tensor, n_samples: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """n_samples draws of N(mean, cov): mean (m, c), cov (m·c, m·c) example-major; (n_samples, m, c), float64.

    The standard normal draws come from ``generator`` (torch's global generator when None), on its device."""
    m, c = mean.shape
    cov = cov.to(ALGEBRA_DTYPE)
    root = _root(0.5 * (cov + cov.T))
    device = generator.device if generator is not None else cov.device
    z = torch.randn(n_samples, m * c, generator=generator, dtype=ALGEBRA_DTYPE, device=device).to(cov.device)
    return (mean.to(ALGEBRA_DTYPE).reshape(1, m * c) + z @ root.T).reshape(n_samples, m, c)


def _root(cov: torch.Tensor) -> torch.Tensor:
    """L with L Lᵀ ≈ cov: Cholesky, with jitter (relative to the mean variance) added until it succeeds; past the
    largest jitter, the symmetric square root from the eigendecomposition with negative eigenvalues (rounding)
    set to zero."""
    n = cov.shape[0]
    scale = float(cov.diagonal().abs().mean()) if n else 0.0
    eye = torch.eye(n, dtype=cov.dtype, device=cov.device)
    for jitter in JITTERS:
        L, info = torch.linalg.cholesky_ex(cov + (jitter * scale) * eye if jitter else cov)
        if int(info) == 0:
            return L
    values, vectors = torch.linalg.eigh(cov)
    return vectors * values.clamp_min(0.0).sqrt()
