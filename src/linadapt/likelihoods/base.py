"""The likelihood interface of the Laplace machinery: what a likelihood p(y | f) over c outputs must provide.

The linearized model has latent outputs ("logits") f(x) = f(x; θ̂) + J(x) δ, c per example. Everything the
Laplace approximation (:mod:`linadapt.inference.laplace`) and its leave-one-out predictive
(:mod:`linadapt.inference.loo`) need from the likelihood is, for logits F (n, c) and encoded targets Y (n, c):

* ``log_prob(F, Y)``: the terms log p(yᵢ | fᵢ), a differentiable tensor (n,); ``log_likelihood(F, Y)``:
  their sum Σᵢ log p(yᵢ | fᵢ), a float;
* ``gradient(F, Y)``: ∂ log p(yᵢ | fᵢ) / ∂fᵢ, shape (n, c);
* ``curvature(F)``: Λᵢ = −∂² log p(yᵢ | fᵢ) / ∂fᵢ², one PSD c × c block per example (assumed independent of
  yᵢ, as for every canonical-link exponential family), as a :class:`Curvature` that applies Λ, a root R with
  R Rᵀ = Λ and Rᵀ to stacks of output-space vectors without forming N × N matrices;
* ``mean(F)``: E[y | f] (the softmax for the categorical likelihood, f itself for the Gaussian one);
* ``encode_targets(y, c)``: checked targets as a float64 tensor (n, c) (one-hot labels for categorical);
* ``predictive(mu, cov, link, n_samples, seed)``: the predictive of y from a Gaussian N(mu, cov) over the
  logits, read out by one of ``links``; and ``log_predictive`` (the log predictive density of targets);
* ``check_outputs(c)``: whether a network with c outputs suits the likelihood (default: any c).

A new likelihood is one subclass of :class:`Likelihood` (and of :class:`Curvature`) in its own module plus one
line in :data:`linadapt.likelihoods.LIKELIHOODS`; ``tests/likelihoods/test_likelihood_contract.py`` checks
every registered one against autograd.

This layer imports nothing from :mod:`linadapt.inference` or :mod:`linadapt.estimators`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

__all__ = ["Curvature", "Likelihood"]


class Curvature(ABC):
    """Λ = −∇²_f log p(y | f) at fixed logits F (n, c): n PSD c × c blocks Λᵢ and a root R (Rᵢ Rᵢᵀ = Λᵢ).

    Output-space vectors are stacked as V (n, c, k): k columns, each an (n, c) vector; every product acts
    block by block, (Λ V)ᵢ = Λᵢ Vᵢ, so Λ is the block-diagonal N × N matrix (N = n·c, example-major).
    """

    n: int  # examples
    c: int  # outputs per example

    @abstractmethod
    def lam(self, V: torch.Tensor) -> torch.Tensor:
        """Λ V for V (n, c, k): (n, c, k)."""

    @abstractmethod
    def root(self, V: torch.Tensor) -> torch.Tensor:
        """R V for V (n, c, k): (n, c, k), with R Rᵀ = Λ."""

    @abstractmethod
    def root_t(self, V: torch.Tensor) -> torch.Tensor:
        """Rᵀ V for V (n, c, k): (n, c, k)."""

    @abstractmethod
    def blocks(self) -> torch.Tensor:
        """The blocks Λᵢ as a dense tensor (n, c, c)."""

    @abstractmethod
    def rows(self, rows: slice) -> Curvature:
        """The curvature of the examples ``rows`` only (for products with a chunk of the Jacobian)."""


class Likelihood(ABC):
    """A likelihood p(y | f) over c latent outputs per example, factorizing over examples.

    Class attributes: ``name`` (registry key), ``links`` (the readouts ``predictive`` accepts, the first
    the default), ``auto_links`` (the readouts a leave-one-out choice compares), ``classification`` (whether
    ``predictive`` returns probabilities: of the classes, rows summing to 1, or with ``multilabel`` the marginal
    P(y_k = 1) of each of c independent binary outcomes), ``multilabel`` (targets are a 0/1 matrix (n, c)).
    """

    name: str = ""
    links: tuple[str, ...] = ()
    auto_links: tuple[str, ...] = ()
    classification: bool = False
    multilabel: bool = False

    def check_outputs(self, c: int) -> None:
        """Raise ValueError when a network with c outputs per example does not suit this likelihood (default:
        any c ≥ 1 does)."""
        if c < 1:
            raise ValueError(f"the model returns {c} outputs per example; at least one is needed")

    @abstractmethod
    def log_prob(self, F: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """log p(yᵢ | fᵢ) for logits F (n, c) and encoded targets Y (n, c): shape (n,), differentiable in F."""

    def log_likelihood(self, F: torch.Tensor, Y: torch.Tensor) -> float:
        """Σᵢ log p(yᵢ | fᵢ) for logits F (n, c) and encoded targets Y (n, c)."""
        return float(self.log_prob(F, Y).sum())

    @abstractmethod
    def gradient(self, F: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """∂ log p(yᵢ | fᵢ) / ∂fᵢ for logits F (n, c) and encoded targets Y (n, c): (n, c)."""

    @abstractmethod
    def curvature(self, F: torch.Tensor) -> Curvature:
        """Λ = −∂² log p(y | f) / ∂f² at logits F (n, c), per example (see :class:`Curvature`)."""

    @abstractmethod
    def mean(self, F: torch.Tensor) -> torch.Tensor:
        """E[y | f] at logits F (n, c): (n, c)."""

    @abstractmethod
    def encode_targets(self, y: Any, c: int) -> torch.Tensor:
        """Checked targets for c outputs as a float64 tensor (n, c); raises ValueError on bad targets."""

    @abstractmethod
    def predictive(
        self,
        mu: torch.Tensor,
        cov: torch.Tensor | None,
        link: str | None = None,
        n_samples: int = 1000,
        seed: int = 0,
    ) -> Any:
        """The predictive of y from logits f ~ N(mu, cov): mu (m, c), cov (m, c, c) per-example blocks
        (None allowed for links that ignore it), read out by ``link`` (one of ``links``; None: the first).
        Classification likelihoods return probabilities (m, c); see the subclass for others."""

    @abstractmethod
    def log_predictive(
        self,
        mu: torch.Tensor,
        cov: torch.Tensor | None,
        Y: torch.Tensor,
        link: str | None = None,
        n_samples: int = 1000,
        seed: int = 0,
    ) -> torch.Tensor:
        """log p(yᵢ) under ``predictive(mu, cov, link, ...)`` for encoded targets Y (m, c): shape (m,)."""

    def check_link(self, link: str | None) -> str:
        """``link`` if this likelihood supports it (None: the default, ``links[0]``); else a ValueError."""
        if link is None:
            return self.links[0]
        if link not in self.links:
            raise ValueError(f"link must be one of {', '.join(repr(x) for x in self.links)}; got {link!r}")
        return link

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
