"""Class probabilities from a Gaussian over logits: probit, Monte Carlo, the Laplace bridge, or its mean alone.

Input: for m examples the logits' mean μ (m, c) and covariance blocks Σ (m, c, c). Output: probabilities
(m, c), rows summing to 1.

* ``"probit"``: softmax over a of μ_a / √(1 + (π/8) Σ_aa) — the multi-class extension of MacKay's probit
  approximation of the sigmoid-Gaussian integral.
* ``"mc"``: the average of softmax(μ + L z) over draws z ~ N(0, I), L Lᵀ = Σ (seeded, exact as draws → ∞).
* ``"bridge"``: the mean of the Dirichlet that the Laplace bridge (Hobbhahn et al., 2022) maps the
  Gaussian to. Softmax ignores a common shift of the logits, so (μ, Σ) are first projected onto the
  sum-zero subspace (C = I − 11ᵀ/c: μ ← Cμ, Σ ← CΣC); then with v_a = Σ_aa,
  α_a = (1 − 2/c + e^{μ_a} Σ_b e^{−μ_b} / c²) / v_a, and p = α / Σ_b α_b.
* ``"map"``: softmax(μ), the covariance ignored — the adapted point prediction (on the rotated-digits
  shift of docs/results.md it is the best calibrated readout: the Laplace covariance is too wide there).
"""

from __future__ import annotations

import math

import torch

__all__ = ["LINKS", "class_probabilities"]

LINKS = ("probit", "mc", "bridge", "map")
_MC_CHUNK = 2**22  # logits sampled at once (m_chunk · n_samples · c)


def _probit(mu: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    var = torch.diagonal(cov, dim1=-2, dim2=-1).clamp_min(0.0)
    return torch.softmax(mu / torch.sqrt(1.0 + (math.pi / 8.0) * var), dim=-1)


def _psd_factor(cov: torch.Tensor) -> torch.Tensor:
    """L with L Lᵀ = Σ for symmetric PSD blocks (eigendecomposition; tiny negative eigenvalues clamped)."""
    evals, evecs = torch.linalg.eigh(0.5 * (cov + cov.transpose(-1, -2)))
    return evecs * evals.clamp_min(0.0).sqrt().unsqueeze(-2)


def _monte_carlo(mu: torch.Tensor, cov: torch.Tensor, n_samples: int, seed: int) -> torch.Tensor:
    m, c = mu.shape
    L = _psd_factor(cov)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = torch.empty_like(mu)
    step = max(1, _MC_CHUNK // max(1, n_samples * c))
    for i in range(0, m, step):
        z = torch.randn(min(step, m - i), n_samples, c, generator=gen, dtype=mu.dtype).to(mu.device)
        logits = mu[i : i + step, None, :] + torch.einsum("mab,msb->msa", L[i : i + step], z)
        out[i : i + step] = torch.softmax(logits, dim=-1).mean(dim=1)
    return out


def _bridge(mu: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    c = mu.shape[-1]
    mu = mu - mu.mean(dim=-1, keepdim=True)
    C = torch.eye(c, dtype=cov.dtype, device=cov.device) - 1.0 / c
    var = torch.diagonal(C @ cov @ C, dim1=-2, dim2=-1)
    # A direction with no variance: the Dirichlet is infinitely concentrated there; keep it finite.
    var = var.clamp_min(1e-12 * max(float(var.abs().max()) if var.numel() else 0.0, 1e-300))
    # α_a = (1 − 2/c + e^{μ_a} Σ_b e^{−μ_b} / c²) / v_a, computed in log space for large |μ|
    log_cross = mu + torch.logsumexp(-mu, dim=-1, keepdim=True) - 2.0 * math.log(c)
    alpha = ((1.0 - 2.0 / c) + log_cross.exp()) / var
    return alpha / alpha.sum(dim=-1, keepdim=True)


def class_probabilities(
    mu: torch.Tensor, cov: torch.Tensor | None, link: str = "probit", n_samples: int = 1000, seed: int = 0
) -> torch.Tensor:
    """Probabilities (m, c) from logits' mean μ (m, c) and covariance blocks Σ (m, c, c) by ``link``
    (``cov`` may be None for ``"map"``)."""
    if link == "map":
        return torch.softmax(mu, dim=-1)
    if cov is None:
        raise ValueError(f"link {link!r} needs the covariance blocks of the logits")
    if link == "probit":
        return _probit(mu, cov)
    if link == "mc":
        return _monte_carlo(mu, cov, int(n_samples), int(seed))
    if link == "bridge":
        return _bridge(mu, cov)
    raise ValueError(f"link must be one of {', '.join(repr(x) for x in LINKS)}; got {link!r}")
