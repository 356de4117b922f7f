"""The categorical (softmax) likelihood: y ∈ {0, …, c − 1}, p(y | f) = softmax(f)_y.

With π = softmax(f) and targets encoded one-hot (more generally, any rows y with Σ_a y_a = 1):

    log p(y | f) = Σ_a y_a log π_a,      ∂/∂f = y − π,      Λ = −∂²/∂f² = diag(π) − π πᵀ,

and a root of Λ is R = diag(√π)(I − √π √πᵀ) (R Rᵀ = diag(√π)(I − √π√πᵀ)² diag(√π) = Λ, the middle factor a
projection since ‖√π‖ = 1). Λ is singular along 1 (softmax ignores a common shift of the logits).
Predictions read class probabilities off a Gaussian over the logits by the links of
:mod:`linadapt.likelihoods.softmax_links`.
"""

from __future__ import annotations

from typing import Any

import torch

from linadapt._validation import as_label_tensor
from linadapt.likelihoods.base import Curvature, Likelihood
from linadapt.likelihoods.softmax_links import LINKS, class_probabilities

__all__ = ["Categorical", "CategoricalCurvature", "softmax_curvature_blocks"]


# Vectors over outputs are (n, c, k): k columns, each an (n, c) output-space vector. With π (n, c) and
# s = √π:  Λ v = π ⊙ v − π (πᵀ v),  R v = s ⊙ v − π (sᵀ v),  Rᵀ v = s ⊙ v − s (πᵀ v);  R Rᵀ = Λ.


def _lam(pi: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    p = pi.unsqueeze(-1)
    return p * V - p * (p * V).sum(1, keepdim=True)


def _r(pi: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    p = pi.unsqueeze(-1)
    s = p.sqrt()
    return s * V - p * (s * V).sum(1, keepdim=True)


def _rt(pi: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    p = pi.unsqueeze(-1)
    s = p.sqrt()
    return s * V - s * (p * V).sum(1, keepdim=True)


def softmax_curvature_blocks(pi: torch.Tensor) -> torch.Tensor:
    """Λᵢ = diag(πᵢ) − πᵢ πᵢᵀ for probabilities π (n, c): shape (n, c, c)."""
    return torch.diag_embed(pi) - pi.unsqueeze(-1) * pi.unsqueeze(-2)


class CategoricalCurvature(Curvature):
    """Λ = diag(π) − π πᵀ per example at probabilities ``pi`` (n, c), R = diag(√π)(I − √π √πᵀ)."""

    def __init__(self, pi: torch.Tensor) -> None:
        self.pi = pi
        self.n, self.c = pi.shape

    def lam(self, V: torch.Tensor) -> torch.Tensor:
        """Λ V = π ⊙ V − π (πᵀ V) per example, V (n, c, k)."""
        return _lam(self.pi, V)

    def root(self, V: torch.Tensor) -> torch.Tensor:
        """R V = √π ⊙ V − π (√πᵀ V) per example, V (n, c, k)."""
        return _r(self.pi, V)

    def root_t(self, V: torch.Tensor) -> torch.Tensor:
        """Rᵀ V = √π ⊙ V − √π (πᵀ V) per example, V (n, c, k)."""
        return _rt(self.pi, V)

    def blocks(self) -> torch.Tensor:
        """Λᵢ = diag(πᵢ) − πᵢ πᵢᵀ, (n, c, c)."""
        return softmax_curvature_blocks(self.pi)

    def rows(self, rows: slice) -> CategoricalCurvature:
        """The curvature of the examples ``rows``."""
        return CategoricalCurvature(self.pi[rows])


class Categorical(Likelihood):
    """y | f ~ Categorical(softmax f) over c ≥ 2 classes; targets are integer labels, encoded one-hot.

    ``predictive`` returns class probabilities (m, c) by a link of
    :func:`~linadapt.likelihoods.softmax_links.class_probabilities`: ``"probit"``, ``"mc"``, ``"bridge"`` or
    ``"map"`` (softmax of the mean, the covariance ignored).
    """

    name = "categorical"
    links = LINKS
    auto_links = ("probit", "bridge", "map")
    classification = True

    def check_outputs(self, c: int) -> None:
        """c ≥ 2 logits per example; a one-output model is a ValueError pointing to the Bernoulli likelihood."""
        if c < 2:
            raise ValueError(
                f"the categorical likelihood needs logits of shape (n, c) with c ≥ 2; the model returns {c} per "
                "example — for a binary model with one logit z use likelihood='bernoulli' (what 'auto' picks), or "
                "return two softmax logits torch.cat([torch.zeros_like(z), z], 1)"
            )

    def log_prob(self, F: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """Σ_a Y_ia log softmax(Fᵢ)_a, (n,) (terms with Y_ia = 0 skipped, so a −inf log-probability there is
        harmless); for one-hot Y exactly log softmax(Fᵢ)_{yᵢ}."""
        logp = torch.log_softmax(F, dim=1)
        return torch.where(Y != 0, Y * logp, 0.0).sum(1)

    def gradient(self, F: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """Y − softmax(F), (n, c)."""
        return Y - torch.softmax(F, dim=1)

    def curvature(self, F: torch.Tensor) -> CategoricalCurvature:
        """Λ = diag(π) − π πᵀ at π = softmax(F)."""
        return CategoricalCurvature(torch.softmax(F, dim=1))

    def mean(self, F: torch.Tensor) -> torch.Tensor:
        """softmax(F), (n, c)."""
        return torch.softmax(F, dim=1)

    def encode_targets(self, y: Any, c: int) -> torch.Tensor:
        """One-hot float64 (n, c) of integer labels y (n,) in [0, c) (integral floats accepted); the device of a
        tensor y is kept."""
        device = y.device if isinstance(y, torch.Tensor) else None
        n = len(y) if hasattr(y, "__len__") else 0
        labels = as_label_tensor(y, n, c, "y")
        if device is not None:
            labels = labels.to(device)
        return torch.nn.functional.one_hot(labels, c).to(torch.float64)

    def predictive(
        self,
        mu: torch.Tensor,
        cov: torch.Tensor | None,
        link: str | None = None,
        n_samples: int = 1000,
        seed: int = 0,
    ) -> torch.Tensor:
        """Class probabilities (m, c) from logits ~ N(mu (m, c), cov (m, c, c)) by ``link`` (default probit)."""
        return class_probabilities(mu, cov, self.links[0] if link is None else link, n_samples, seed)

    def log_predictive(
        self,
        mu: torch.Tensor,
        cov: torch.Tensor | None,
        Y: torch.Tensor,
        link: str | None = None,
        n_samples: int = 1000,
        seed: int = 0,
    ) -> torch.Tensor:
        """Σ_a Y_ia log p_ia with p = ``predictive(...)`` (clamped at 1e-300): log p(yᵢ) for one-hot Y, (m,)."""
        logp = torch.log(self.predictive(mu, cov, link, n_samples, seed).clamp_min(1e-300))
        return torch.where(Y != 0, Y * logp, 0.0).sum(1)
