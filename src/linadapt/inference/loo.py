"""Approximate leave-one-out predictive of the Laplace classifier, and choosing the link by it.

The Laplace posterior replaces each likelihood term p(y_i | f_i) by a Gaussian site in f_i with precision
Λ_i = diag(π_i) − π_i π_iᵀ (the softmax Hessian at the MAP logits f̂_i, π_i = softmax f̂_i) whose
log-density has gradient g_i = e_{y_i} − π_i at f̂_i. Removing site i from the Gaussian marginal
N(f_i; μ_i, Σ_i) of the posterior (μ_i = f̂_i, Σ_i = J_i S J_iᵀ) leaves the cavity

    Σ_{−i} = (Σ_i⁻¹ − Λ_i)⁻¹ = Σ_i (I − Λ_i Σ_i)⁻¹,      μ_{−i} = μ_i − Σ_{−i} g_i,

the approximate posterior over f_i without example i (the other sites unchanged — no refit). The LOO
predictive p(y_i | D_{−i}) ≈ E_{N(μ_{−i}, Σ_{−i})}[softmax(f)_{y_i}] then scores each way of reading
probabilities off a Gaussian over logits on the training data alone; ``link="auto"`` in
:class:`~linadapt.LinearizedClassifier` takes the one with the smallest LOO negative log-likelihood.
"""

from __future__ import annotations

import torch

from linadapt.likelihoods.softmax_links import class_probabilities

__all__ = ["AUTO_LINKS", "cavity", "loo_nll"]

AUTO_LINKS = ("probit", "bridge", "map")


def cavity(mean: torch.Tensor, cov: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Leave-one-out moments (μ_{−i} (n, c), Σ_{−i} (n, c, c)) from the posterior marginals at the training
    points (mean (n, c) = the MAP logits, cov (n, c, c)) and their labels (n,); see the module docstring."""
    mean, cov = mean.double(), cov.double()
    pi = torch.softmax(mean, dim=1)
    lam = torch.diag_embed(pi) - pi.unsqueeze(2) * pi.unsqueeze(1)
    g = torch.nn.functional.one_hot(labels.long(), mean.shape[1]).double() - pi
    eye = torch.eye(mean.shape[1], dtype=mean.dtype, device=mean.device)
    # (Σ⁻¹ − Λ)⁻¹ = (I − ΣΛ)⁻¹ Σ: solve (I − ΣΛ) X = Σ (X symmetric up to rounding)
    cav = torch.linalg.solve(eye - cov @ lam, cov)
    cav = 0.5 * (cav + cav.transpose(1, 2))
    return mean - (cav @ g.unsqueeze(2)).squeeze(2), cav


def loo_nll(
    mean: torch.Tensor, cov: torch.Tensor, labels: torch.Tensor, links: tuple[str, ...] = AUTO_LINKS
) -> dict[str, float]:
    """Mean negative log LOO predictive probability of the labels for each link."""
    mu, cav = cavity(mean, cov, labels)
    idx = torch.arange(labels.shape[0], device=labels.device)
    out = {}
    for link in links:
        proba = class_probabilities(mu, None if link == "map" else cav, link)
        out[link] = float(-torch.log(proba[idx, labels.long()].clamp_min(1e-300)).mean())
    return out
