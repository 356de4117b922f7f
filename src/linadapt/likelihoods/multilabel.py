"""The multilabel likelihood: c independent binary outcomes per example, y_k | f_k ~ Bernoulli(σ(f_k)).

With p = σ(f) and a 0/1 target matrix Y (n, c):

    log p(y | f) = Σ_k y_k log σ(f_k) + (1 − y_k) log σ(−f_k),      ∂/∂f = y − p,
    Λ = −∂²/∂f² = diag(w),   w = p (1 − p) = σ(f) σ(−f),

so Λ is diagonal per example (the outcomes share no curvature; the NTK still couples them through J) and its
root is R = Rᵀ = diag(√w): every product is an elementwise scaling, no c × c block is formed. Λ is positive
definite but tends to 0 as |f| → ∞ (a confidently predicted outcome carries no curvature); the function-space
Laplace system B = I + s² Rᵀ K R never inverts it.

Predictions (``predictive``) are the marginals P(y_k = 1) (m, c) read off the Gaussian over the logits by a link
of :mod:`linadapt.likelihoods.sigmoid_links` (probit, mc, map; the softmax-specific Laplace bridge is refused
with its reason). :class:`~linadapt.likelihoods.bernoulli.Bernoulli` is the one-outcome case with class labels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from linadapt.likelihoods.base import Curvature, Likelihood
from linadapt.likelihoods.sigmoid_links import SIGMOID_LINKS, binary_probabilities, check_sigmoid_link

__all__ = ["Multilabel", "SigmoidCurvature", "check_binary_targets"]


class SigmoidCurvature(Curvature):
    """Λ = diag(w) per example at weights ``w`` = σ(f) σ(−f) (n, c); R = Rᵀ = diag(√w)."""

    def __init__(self, w: torch.Tensor) -> None:
        self.w = w
        self.n, self.c = w.shape

    def lam(self, V: torch.Tensor) -> torch.Tensor:
        """Λ V = w ⊙ V per example, V (n, c, k)."""
        return self.w.unsqueeze(-1) * V

    def root(self, V: torch.Tensor) -> torch.Tensor:
        """R V = √w ⊙ V, V (n, c, k)."""
        return self.w.sqrt().unsqueeze(-1) * V

    def root_t(self, V: torch.Tensor) -> torch.Tensor:
        """Rᵀ V = R V (R is diagonal)."""
        return self.root(V)

    def blocks(self) -> torch.Tensor:
        """Λᵢ = diag(wᵢ), (n, c, c)."""
        return torch.diag_embed(self.w)

    def rows(self, rows: slice) -> SigmoidCurvature:
        """The curvature of the examples ``rows``."""
        return SigmoidCurvature(self.w[rows])


def check_binary_targets(y: Any, n: int, c: int, what: str, name: str = "y") -> torch.Tensor:
    """A 0/1 target matrix (n, c) as float64 (a tensor y keeps its device): numbers or booleans, shape (n, c) (or
    (n,) when c = 1); any other value is a ValueError naming the values found outside {0, 1}."""
    device = y.device if isinstance(y, torch.Tensor) else None
    arr = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must hold 0/1 targets for the {what} likelihood, got dtype {arr.dtype}")
    if arr.ndim == 1 and c == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[0] != n or arr.shape[1] != c:
        raise ValueError(
            f"{name} has shape {arr.shape}: the {what} likelihood needs 0/1 targets of shape ({n}, {c}) — one per "
            f"example and model output"
        )
    bad = np.unique(arr[(arr != 0) & (arr != 1)])
    if bad.size:
        shown = ", ".join(f"{v:g}" for v in bad[:5].astype(np.float64)) + (" …" if bad.size > 5 else "")
        raise ValueError(f"{name} contains {shown}: the {what} likelihood takes targets 0 and 1 only")
    t = torch.from_numpy(arr.astype(np.float64))
    return t.to(device) if device is not None else t


class Multilabel(Likelihood):
    """c independent outcomes y_k ∈ {0, 1} with P(y_k = 1 | f) = σ(f_k); targets a 0/1 matrix (n, c).

    ``predictive`` returns the marginals P(y_k = 1) (m, c) (rows do not sum to 1) by ``"probit"`` (default),
    ``"mc"`` or ``"map"``; see :mod:`linadapt.likelihoods.sigmoid_links`.
    """

    name = "multilabel"
    links = SIGMOID_LINKS
    auto_links = ("probit", "map")
    classification = True
    multilabel = True

    def check_link(self, link: str | None) -> str:
        """``link`` if supported (None: probit); ``"bridge"`` is refused with the reason (see sigmoid_links)."""
        return check_sigmoid_link(link, self.name)

    def log_prob(self, F: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """Σ_k Y_ik log σ(F_ik) + (1 − Y_ik) log σ(−F_ik), (n,) (terms with a zero coefficient skipped)."""
        pos = torch.where(Y != 0, Y * torch.nn.functional.logsigmoid(F), 0.0)
        neg = torch.where(Y != 1, (1 - Y) * torch.nn.functional.logsigmoid(-F), 0.0)
        return (pos + neg).sum(1)

    def gradient(self, F: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """Y − σ(F), (n, c)."""
        return Y - torch.sigmoid(F)

    def curvature(self, F: torch.Tensor) -> SigmoidCurvature:
        """Λ = diag(σ(F) σ(−F)) per example."""
        return SigmoidCurvature(torch.sigmoid(F) * torch.sigmoid(-F))

    def mean(self, F: torch.Tensor) -> torch.Tensor:
        """σ(F), (n, c)."""
        return torch.sigmoid(F)

    def encode_targets(self, y: Any, c: int) -> torch.Tensor:
        """The 0/1 target matrix y (n, c) (booleans and 0./1. accepted) as float64; other values are a ValueError
        naming them."""
        n = len(y) if hasattr(y, "__len__") else 0
        return check_binary_targets(y, n, c, self.name)

    def predictive(
        self,
        mu: torch.Tensor,
        cov: torch.Tensor | None,
        link: str | None = None,
        n_samples: int = 1000,
        seed: int = 0,
    ) -> torch.Tensor:
        """P(y_k = 1) (m, c) from logits ~ N(mu (m, c), cov (m, c, c)) by ``link`` (default probit)."""
        return binary_probabilities(mu, cov, self.check_link(link), n_samples, seed)[0]

    def log_predictive(
        self,
        mu: torch.Tensor,
        cov: torch.Tensor | None,
        Y: torch.Tensor,
        link: str | None = None,
        n_samples: int = 1000,
        seed: int = 0,
    ) -> torch.Tensor:
        """Σ_k log P(y_k = Y_ik) under the link's marginals, (m,): the product of the marginals (the correlation of
        the outcomes' logits under ``cov`` is not used; exact for one outcome)."""
        p1, p0 = binary_probabilities(mu, cov, self.check_link(link), n_samples, seed)
        logp = torch.where(Y != 0, Y * torch.log(p1.clamp_min(1e-300)), 0.0)
        return (logp + torch.where(Y != 1, (1 - Y) * torch.log(p0.clamp_min(1e-300)), 0.0)).sum(1)
