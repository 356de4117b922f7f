"""The Gaussian likelihood: y | f ~ N(f, σ² I_c), real targets y (n, c), known noise variance σ².

    log p(y | f) = −½ ‖y − f‖² / σ² − ½ c log(2π σ²),      ∂/∂f = (y − f) / σ²,      Λ = I / σ²,   R = I / σ.

Λ does not depend on f, so the log posterior of the linearized model is quadratic in δ and the Laplace
approximation of :mod:`linadapt.inference.laplace` is exact: one Newton step reaches the posterior mean, the
Laplace covariance is the exact posterior covariance, and the Laplace evidence is the exact log marginal
likelihood log N(y; f(X; θ̂) + J μ, s² J Jᵀ + σ² I) — the closed form of :mod:`linadapt.inference.regression`
(which remains the solver of choice for regression; this likelihood exists so the generic machinery has an
exactly solvable case and a second implementation of the interface).

Predictive: for f ~ N(mu, cov) the predictive of y is Gaussian with mean mu and per-output variance
diag(cov) + σ² (its off-diagonal covariance is cov's). The ``link`` names which covariance is used:
``"gaussian"`` (the posterior's, diag(cov) + σ²) or ``"map"`` (the plug-in N(mu, σ²), cov ignored). The
classification links (probit, mc, bridge) have no meaning here and raise ValueError.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from linadapt._validation import as_target_tensor
from linadapt.likelihoods.base import Curvature, Likelihood

__all__ = ["Gaussian", "GaussianCurvature"]


class GaussianCurvature(Curvature):
    """Λ = I / σ² for every example (n examples, c outputs), R = Rᵀ = I / σ."""

    def __init__(self, n: int, c: int, noise_var: float, dtype: torch.dtype, device: torch.device) -> None:
        self.n, self.c, self.noise_var = n, c, noise_var
        self.dtype, self.device = dtype, device

    def lam(self, V: torch.Tensor) -> torch.Tensor:
        """Λ V = V / σ², V (n, c, k)."""
        return V / self.noise_var

    def root(self, V: torch.Tensor) -> torch.Tensor:
        """R V = V / σ."""
        return V / math.sqrt(self.noise_var)

    def root_t(self, V: torch.Tensor) -> torch.Tensor:
        """Rᵀ V = V / σ."""
        return V / math.sqrt(self.noise_var)

    def blocks(self) -> torch.Tensor:
        """Λᵢ = I / σ², (n, c, c)."""
        eye = torch.eye(self.c, dtype=self.dtype, device=self.device) / self.noise_var
        return eye.expand(self.n, self.c, self.c).clone()

    def rows(self, rows: slice) -> GaussianCurvature:
        """The curvature of the examples ``rows``."""
        n = len(range(*rows.indices(self.n)))
        return GaussianCurvature(n, self.c, self.noise_var, self.dtype, self.device)


class Gaussian(Likelihood):
    """y | f ~ N(f, noise_var · I) with a fixed noise variance σ² = ``noise_var`` > 0 (see the module docstring).

    ``predictive`` returns the pair (mean (m, c), variance (m, c)) of the Gaussian predictive of y.
    """

    name = "gaussian"
    links = ("gaussian", "map")
    auto_links = ("gaussian", "map")
    classification = False

    def __init__(self, noise_var: float = 1.0) -> None:
        noise_var = float(noise_var)
        if not (math.isfinite(noise_var) and noise_var > 0):
            raise ValueError(f"noise_var must be a positive finite number, got {noise_var!r}")
        self.noise_var = noise_var

    def __repr__(self) -> str:
        return f"Gaussian(noise_var={self.noise_var!r})"

    def log_prob(self, F: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """log N(yᵢ; fᵢ, σ² I) = −½ ‖yᵢ − fᵢ‖² / σ² − ½ c log(2π σ²), (n,)."""
        return -0.5 * ((Y - F) ** 2).sum(1) / self.noise_var - 0.5 * F.shape[1] * math.log(2 * math.pi * self.noise_var)

    def gradient(self, F: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """(Y − F) / σ², (n, c)."""
        return (Y - F) / self.noise_var

    def curvature(self, F: torch.Tensor) -> GaussianCurvature:
        """Λ = I / σ² (independent of F)."""
        n, c = F.shape
        return GaussianCurvature(n, c, self.noise_var, F.dtype, F.device)

    def mean(self, F: torch.Tensor) -> torch.Tensor:
        """E[y | f] = f."""
        return F

    def encode_targets(self, y: Any, c: int) -> torch.Tensor:
        """Real targets (n,) (for c = 1) or (n, c), finite, as float64 (n, c); the device of a tensor y is kept."""
        device = y.device if isinstance(y, torch.Tensor) else None
        n = len(y) if hasattr(y, "__len__") else 0
        t = as_target_tensor(y, n, "y")
        t = t.reshape(n, 1) if t.dim() == 1 else t
        if t.shape[1] != c:
            raise ValueError(f"y has {t.shape[1]} outputs per example but the model has {c}")
        return t.to(device) if device is not None else t

    def predictive(
        self,
        mu: torch.Tensor,
        cov: torch.Tensor | None,
        link: str | None = None,
        n_samples: int = 1000,
        seed: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, variance) of y, each (m, c): (mu, diag(cov) + σ²) for ``"gaussian"`` (default),
        (mu, σ²) for ``"map"``. ``n_samples`` and ``seed`` are unused (the predictive is exact)."""
        link = self.check_link(link)
        if link == "map":
            return mu, torch.full_like(mu, self.noise_var)
        if cov is None:
            raise ValueError(f"link {link!r} needs the covariance blocks of the logits")
        return mu, torch.diagonal(cov, dim1=-2, dim2=-1) + self.noise_var

    def log_predictive(
        self,
        mu: torch.Tensor,
        cov: torch.Tensor | None,
        Y: torch.Tensor,
        link: str | None = None,
        n_samples: int = 1000,
        seed: int = 0,
    ) -> torch.Tensor:
        """Σ_a log N(Y_ia; mean_ia, var_ia) under ``predictive`` (outputs treated as independent), (m,)."""
        mean, var = self.predictive(mu, cov, link, n_samples, seed)
        return (-0.5 * (torch.log(2 * math.pi * var) + (Y - mean) ** 2 / var)).sum(1)
