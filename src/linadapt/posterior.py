"""What every Gaussian posterior over the linearized weights shares: predictions through the Jacobian.

With δ = θ − θ̂ ~ N(δ̄, S) a posterior (regression: exact; classification: Laplace), the latent outputs at
test inputs X* are Gaussian with mean f(X*; θ̂) + J* δ̄ and covariance J* S J*ᵀ. Subclasses provide δ̄
and ``latent_cov_rows`` (B S Bᵀ for rows B of a Jacobian) without ever forming S (p × p).
"""

from __future__ import annotations

import torch

from .linearize import Linearization

__all__ = ["LinearizedPosterior"]


class LinearizedPosterior:
    """Base class: ``lin`` (the linearization), ``delta`` (δ̄, shape (p,)), ``c`` (outputs per example),
    ``memory_budget`` (bytes a dense Jacobian of test points may take)."""

    lin: Linearization
    delta: torch.Tensor
    c: int
    memory_budget: int

    def latent_cov_rows(self, B: torch.Tensor) -> torch.Tensor:
        """Posterior covariance of B δ for rows B (k, p) of a Jacobian: B S Bᵀ, shape (k, k)."""
        raise NotImplementedError

    def mean_shift(self, Xs: torch.Tensor) -> torch.Tensor:
        """J(X*) δ̄, shape (m, c)."""
        return self.lin.jvp(Xs, self.delta)

    def latent_blocks(self, Xs: torch.Tensor) -> torch.Tensor:
        """Per-example c × c posterior covariance blocks J(x) S J(x)ᵀ, shape (m, c, c)."""
        out = []
        for _, jac in self.lin.jacobian_chunks(Xs):
            b, c, p = jac.shape
            cov = self.latent_cov_rows(jac.reshape(b * c, p)).reshape(b, c, b, c)
            blocks = torch.diagonal(cov, dim1=0, dim2=2).permute(2, 0, 1)
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
