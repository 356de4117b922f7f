"""The Bernoulli likelihood: one logit f per example, y ∈ {0, 1}, P(y = 1 | f) = σ(f).

It is the one-outcome case of :class:`~linadapt.likelihoods.multilabel.Multilabel` (log p, gradient y − σ(f),
curvature Λ = σ(f) σ(−f), a 1 × 1 block, all inherited) with class labels for targets and scikit-learn's
binary convention for predictions: ``predictive`` returns the probabilities of both classes, columns
(P(y = 0), P(y = 1)) (m, 2), each computed directly. With the probit link P(y = 1) = σ(κ(v) μ),
κ(v) = 1 / √(1 + π v / 8) for the logit's posterior mean μ and variance v.
"""

from __future__ import annotations

from typing import Any

import torch

from linadapt.likelihoods.multilabel import Multilabel, check_binary_targets
from linadapt.likelihoods.sigmoid_links import binary_probabilities

__all__ = ["Bernoulli"]


class Bernoulli(Multilabel):
    """y | f ~ Bernoulli(σ(f)) for a network with one output; targets are labels 0/1 (n,), encoded (n, 1).

    ``predictive`` returns (P(y = 0), P(y = 1)) as columns (m, 2) by ``"probit"`` (default), ``"mc"`` or ``"map"``.
    """

    name = "bernoulli"
    multilabel = False

    def check_outputs(self, c: int) -> None:
        """One logit per example: a model with c ≠ 1 outputs is a ValueError."""
        if c != 1:
            raise ValueError(
                f"the bernoulli likelihood needs a model with one output per example (a logit, shape (n,) or "
                f"(n, 1)); this model has {c} — use likelihood='categorical' for {c} classes or 'multilabel' for "
                f"{c} independent binary outcomes"
            )

    def encode_targets(self, y: Any, c: int) -> torch.Tensor:
        """Labels 0/1, shape (n,) or (n, 1), as float64 (n, 1); any other value is a ValueError naming it."""
        self.check_outputs(c)
        n = len(y) if hasattr(y, "__len__") else 0
        return check_binary_targets(y, n, 1, self.name)

    def predictive(
        self,
        mu: torch.Tensor,
        cov: torch.Tensor | None,
        link: str | None = None,
        n_samples: int = 1000,
        seed: int = 0,
    ) -> torch.Tensor:
        """Columns (P(y = 0), P(y = 1)) (m, 2) from the logit ~ N(mu (m, 1), cov (m, 1, 1)) by ``link``."""
        p1, p0 = binary_probabilities(mu, cov, self.check_link(link), n_samples, seed)
        return torch.cat([p0, p1], dim=1)
