"""Approximate leave-one-out predictive of the Laplace posterior, and choosing the link by it.

The Laplace posterior replaces each likelihood term p(y_i | f_i) by a Gaussian site in f_i with precision
Λ_i (the likelihood's curvature −∇² log p at the MAP logits f̂_i; softmax: diag(π_i) − π_i π_iᵀ,
π_i = softmax f̂_i) whose log-density has gradient g_i = ∇ log p(y_i | f̂_i) at f̂_i (softmax: e_{y_i} − π_i).
Removing site i from the Gaussian marginal N(f_i; μ_i, Σ_i) of the posterior (μ_i = f̂_i, Σ_i = J_i S J_iᵀ)
leaves the cavity

    Σ_{−i} = (Σ_i⁻¹ − Λ_i)⁻¹ = Σ_i (I − Λ_i Σ_i)⁻¹,      μ_{−i} = μ_i − Σ_{−i} g_i,

the approximate posterior over f_i without example i (the other sites unchanged — no refit). The LOO
predictive p(y_i | D_{−i}) ≈ the likelihood's predictive under N(μ_{−i}, Σ_{−i}) (softmax: E[softmax(f)_{y_i}])
then scores each way of reading the predictive off a Gaussian over logits on the training data alone;
``link="auto"`` in :class:`~linadapt.LinearizedClassifier` takes the one with the smallest LOO negative
log-likelihood.
"""

from __future__ import annotations

import torch

from linadapt.likelihoods import Categorical, Likelihood

__all__ = ["AUTO_LINKS", "cavity", "loo_nll"]

AUTO_LINKS = Categorical.auto_links  # ("probit", "bridge", "map")


def cavity(
    mean: torch.Tensor, cov: torch.Tensor, labels: torch.Tensor, likelihood: Likelihood | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Leave-one-out moments (μ_{−i} (n, c), Σ_{−i} (n, c, c)) from the posterior marginals at the training
    points (mean (n, c) = the MAP logits, cov (n, c, c)) and their targets (categorical: labels (n,)), under
    ``likelihood`` (default categorical); see the module docstring."""
    lik = Categorical() if likelihood is None else likelihood
    mean, cov = mean.double(), cov.double()
    Y = lik.encode_targets(labels, mean.shape[1]).to(mean.device)
    lam = lik.curvature(mean).blocks()
    g = lik.gradient(mean, Y)
    eye = torch.eye(mean.shape[1], dtype=mean.dtype, device=mean.device)
    # (Σ⁻¹ − Λ)⁻¹ = (I − ΣΛ)⁻¹ Σ: solve (I − ΣΛ) X = Σ (X symmetric up to rounding)
    cav = torch.linalg.solve(eye - cov @ lam, cov)
    cav = 0.5 * (cav + cav.transpose(1, 2))
    return mean - (cav @ g.unsqueeze(2)).squeeze(2), cav


def loo_nll(
    mean: torch.Tensor,
    cov: torch.Tensor,
    labels: torch.Tensor,
    links: tuple[str, ...] | None = None,
    likelihood: Likelihood | None = None,
) -> dict[str, float]:
    """Mean negative log LOO predictive density of the targets for each link (default: the likelihood's
    ``auto_links``; categorical: :data:`AUTO_LINKS`)."""
    lik = Categorical() if likelihood is None else likelihood
    mu, cav = cavity(mean, cov, labels, lik)
    Y = lik.encode_targets(labels, mean.shape[1]).to(mu.device)
    out = {}
    for link in lik.auto_links if links is None else links:
        out[link] = float(-lik.log_predictive(mu, cav, Y, link).mean())
    return out
