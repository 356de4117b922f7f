"""Probabilities of independent binary outcomes from a Gaussian over their logits: probit, Monte Carlo, or the mean.

Input: for m examples the logits' mean μ (m, c) and covariance blocks Σ (m, c, c), one logit per binary outcome
with P(y_k = 1 | f) = σ(f_k). Every readout here is a marginal, P(y_k = 1) = E[σ(f_k)] with f_k ~ N(μ_k, Σ_kk), so
only the variances v = diag Σ enter. Output: the pair (P(y = 1), P(y = 0)) (m, c) each, both computed directly
(1 − p loses the small probabilities of confident predictions).

* ``"probit"``: σ(κ(v) μ) with κ(v) = 1 / √(1 + π v / 8) — MacKay's approximation, which replaces σ by the
  probit Φ(λ f) of equal slope at 0 (λ² = π / 8) and integrates that in closed form.
* ``"mc"``: the average of σ(μ_k + √v_k z) over draws z ~ N(0, 1) (seeded; exact as draws → ∞).
* ``"map"``: σ(μ), the covariance ignored.

The Laplace bridge (``"bridge"`` of :mod:`linadapt.likelihoods.softmax_links`) is not offered: it maps a Gaussian
over softmax logits to a Dirichlet, and in the two-class case that a sigmoid is, its mean is σ(μ₁ − μ₀) whatever
the covariance (with c = 2 the variance-dependent term 1 − 2/c of the bridge vanishes and the common 1/v cancels),
which is the ``"map"`` readout under another name. :func:`check_sigmoid_link` says so.
"""

from __future__ import annotations

import math

import torch

__all__ = ["SIGMOID_LINKS", "binary_probabilities", "check_sigmoid_link"]

SIGMOID_LINKS = ("probit", "mc", "map")
_MC_CHUNK = 2**22  # logits sampled at once (m_chunk · n_samples · c)


def check_sigmoid_link(link: str | None, likelihood: str) -> str:
    """``link`` (None: ``"probit"``) if a sigmoid likelihood named ``likelihood`` supports it, else a ValueError;
    ``"bridge"`` gets the reason it has no meaning here."""
    if link is None:
        return SIGMOID_LINKS[0]
    if link == "bridge":
        raise ValueError(
            f"link 'bridge' has no meaning for the {likelihood} likelihood: the Laplace bridge is a softmax "
            "readout, and for one sigmoid logit (two classes) its mean is σ(μ) whatever the variance, which is "
            "link='map'; use 'probit', 'mc' or 'map'"
        )
    if link not in SIGMOID_LINKS:
        raise ValueError(f"link must be one of {', '.join(repr(x) for x in SIGMOID_LINKS)}; got {link!r}")
    return link


def _variances(cov: torch.Tensor | None, link: str) -> torch.Tensor:
    if cov is None:
        raise ValueError(f"link {link!r} needs the covariance blocks of the logits")
    return torch.diagonal(cov, dim1=-2, dim2=-1).clamp_min(0.0)


def _monte_carlo(mu: torch.Tensor, var: torch.Tensor, n_samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    m, c = mu.shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    p1, p0 = torch.empty_like(mu), torch.empty_like(mu)
    step = max(1, _MC_CHUNK // max(1, n_samples * c))
    for i in range(0, m, step):
        sl = slice(i, min(i + step, m))
        z = torch.randn(sl.stop - i, n_samples, c, generator=gen, dtype=mu.dtype).to(mu.device)
        f = mu[sl, None, :] + var[sl, None, :].sqrt() * z
        p1[sl], p0[sl] = torch.sigmoid(f).mean(1), torch.sigmoid(-f).mean(1)
    return p1, p0


def binary_probabilities(
    mu: torch.Tensor, cov: torch.Tensor | None, link: str = "probit", n_samples: int = 1000, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(P(y = 1), P(y = 0)), each (m, c), for independent sigmoid outcomes with logits ~ N(μ (m, c), Σ (m, c, c))
    by ``link`` (``cov`` may be None for ``"map"``); see the module docstring."""
    if link == "map":
        return torch.sigmoid(mu), torch.sigmoid(-mu)
    if link == "probit":
        t = mu / torch.sqrt(1.0 + (math.pi / 8.0) * _variances(cov, link))
        return torch.sigmoid(t), torch.sigmoid(-t)
    if link == "mc":
        return _monte_carlo(mu, _variances(cov, link), int(n_samples), int(seed))
    raise ValueError(f"link must be one of {', '.join(repr(x) for x in SIGMOID_LINKS)}; got {link!r}")
