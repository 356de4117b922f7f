"""What every Gaussian posterior over the linearized weights shares: predictions through the Jacobian.

With δ = θ − θ̂ ~ N(δ̄, S) a posterior (regression: exact; classification: Laplace), the latent outputs at
test inputs X* are Gaussian with mean f(X*; θ̂) + J* δ̄ and covariance J* S J*ᵀ. Subclasses provide δ̄
and B S Bᵀ for rows B of a Jacobian as a short sum of products (``_cov_terms``), without ever forming
S (p × p); only the per-example blocks are computed when only those are wanted.
"""

from __future__ import annotations

from typing import Any

import torch

from .linearize import Linearization
from .operators import NTKOperator

__all__ = ["LinearizedPosterior", "TrainingData"]


class TrainingData:
    """Training inputs of a linearized model and the kernel / Jacobian pieces every problem needs.

    Attributes: lin, X (prepared inputs), options (solver settings), c (outputs per example), n_obs = n·c,
    p (parameters), operator (K = J(X) J(X)ᵀ, matrix-free), cache (dense pieces, computed on first use).
    """

    def __init__(self, lin: Linearization, X: torch.Tensor, options: Any, c: int) -> None:
        self.lin, self.X, self.options, self.c = lin, X, options, c
        self.n_obs = X.shape[0] * c
        self.p = lin.num_params
        self.operator = NTKOperator(lin, X)
        self.cache: dict[str, Any] = {}

    def kernel(self) -> torch.Tensor:
        """Dense K = J(X) J(X)ᵀ (N × N, example-major), cached."""
        if "K" not in self.cache:
            self.cache["K"] = self.lin.ntk(self.X)
        return self.cache["K"]

    def jacobian_matrix(self) -> torch.Tensor:
        """Dense J(X) as (N × p), cached."""
        if "J" not in self.cache:
            self.cache["J"] = self.lin.jacobian(self.X).reshape(self.n_obs, self.p)
        return self.cache["J"]

    def k_matmul(self, V: torch.Tensor) -> torch.Tensor:
        """K V for V (N, k), matrix-free."""
        return self.operator.apply_rows(V.T).T


class LinearizedPosterior:
    """Base class: ``lin`` (the linearization), ``delta`` (δ̄, shape (p,)), ``c`` (outputs per example),
    ``memory_budget`` (bytes a dense Jacobian of test points may take). Subclasses give ``_cov_terms``."""

    lin: Linearization
    delta: torch.Tensor
    c: int
    memory_budget: int

    def _cov_terms(self, B: torch.Tensor) -> list[tuple[float, torch.Tensor, torch.Tensor]]:
        """Terms (coef, L, R) with B S Bᵀ = Σ coef · L R, L (k, D), R (D, k), for rows B (k, p)."""
        raise NotImplementedError

    def latent_cov_rows(self, B: torch.Tensor) -> torch.Tensor:
        """Posterior covariance of B δ for rows B (k, p) of a Jacobian: B S Bᵀ, shape (k, k)."""
        return sum(coef * (L @ R) for coef, L, R in self._cov_terms(B))  # type: ignore[return-value]

    def latent_cov_row_blocks(self, B: torch.Tensor, c: int) -> torch.Tensor:
        """Only the diagonal c × c blocks of B S Bᵀ for B = (b·c, p) rows grouped by example: (b, c, c).

        Costs O(D·b·c²) after the solves instead of O(D·(b·c)²) for the full matrix."""
        b = B.shape[0] // c
        out = torch.zeros(b, c, c, dtype=B.dtype, device=B.device)
        for coef, L, R in self._cov_terms(B):
            out += coef * torch.einsum("iad,dib->iab", L.reshape(b, c, -1), R.reshape(-1, b, c))
        return out

    def mean_shift(self, Xs: torch.Tensor) -> torch.Tensor:
        """J(X*) δ̄, shape (m, c)."""
        return self.lin.jvp(Xs, self.delta)

    def latent_blocks(self, Xs: torch.Tensor) -> torch.Tensor:
        """Per-example c × c posterior covariance blocks J(x) S J(x)ᵀ, shape (m, c, c)."""
        out = []
        for _, jac in self.lin.jacobian_chunks(Xs):
            b, c, p = jac.shape
            blocks = self.latent_cov_row_blocks(jac.reshape(b * c, p), c)
            out.append(0.5 * (blocks + blocks.transpose(1, 2)))
        return torch.cat(out)

    def latent_cov(self, Xs: torch.Tensor) -> torch.Tensor:
        """Full posterior covariance J* S J*ᵀ of the outputs at X*, shape (m·c, m·c), example-major."""
        need = Xs.shape[0] * self.c * self.lin.num_params * 8
        if need > self.memory_budget:
            raise ValueError(
                f"the full predictive covariance for {Xs.shape[0]} points needs a {need / 2**30:.1f} GiB Jacobian; "
                "predict fewer points at once or ask for per-example blocks instead"
            )
        B = self.lin.jacobian(Xs).reshape(Xs.shape[0] * self.c, -1)
        cov = self.latent_cov_rows(B)
        return 0.5 * (cov + cov.T)
