"""Averaging the regression predictive over the hyperparameters instead of fixing them at the evidence optimum.

Type-II maximum likelihood picks one (s², σ²). With a handful of points the evidence surface is broad and its
maximum can sit at a tiny noise variance that interpolates the data; the predictive is then far too confident
(Gaussian NLLs of 10²–10³ on single draws of the sinusoid experiment). The Bayesian remedy stays inside the
model: put a log-uniform hyperprior on (s², σ²) over the box the evidence search uses and average,

    p(y* | y) = ∫ p(y* | y, s², σ²) p(s², σ² | y) d log s² d log σ²,   p(s², σ² | y) ∝ p(y | s², σ²),

a mixture of the Gaussian predictives, computed by quadrature on a grid in (log s², log σ²). One
eigendecomposition K = U Λ Uᵀ of the training kernel serves every grid point: with z = Uᵀ r, q = s²Λ + σ²,

    log p(y | s², σ²) = −½ Σ z²/q − ½ Σ log q − (N/2) log 2π,
    mean shift at x* = s² k*ᵀ U (z / q),   latent variance = s² k** − s⁴ Σ_j (k*ᵀ u_j)² / q_j.

The grid is centred on the evidence optimum and widened until the posterior weight on its border is
negligible (or the border reaches the prior box); points with weight below 1e-12 of the largest are dropped.
"""

from __future__ import annotations

import math

import torch

__all__ = ["HyperparameterMixture"]

_LOG_2PI = math.log(2 * math.pi)
_GRID = 41  # points per axis
_NEGLIGIBLE = 1e-12  # relative weight below which a grid point is dropped / a border is negligible


class HyperparameterMixture:
    """The posterior over (log s², log σ²) on a grid, and the mixture predictive it implies (one output).

    Args:
        K: (N, N) training kernel J Jᵀ (float64). r: (N,) residuals y − m(X).
        prior_var, noise_var: the evidence optimum (the grid's centre).
        bounds: ((lo, hi) for log s², (lo, hi) for log σ²): the support of the log-uniform hyperprior.
    """

    def __init__(
        self,
        K: torch.Tensor,
        r: torch.Tensor,
        prior_var: float,
        noise_var: float,
        bounds: tuple[tuple[float, float], tuple[float, float]],
    ) -> None:
        lam, self.U = torch.linalg.eigh(K)
        self.lam = lam.clamp_min(0.0)
        self.z = self.U.T @ r
        self.N = r.numel()
        centre = (math.log(prior_var), math.log(noise_var))
        half = 4.0
        while True:
            axes = [
                torch.linspace(max(c - half, lo), min(c + half, hi), _GRID, dtype=torch.float64)
                for c, (lo, hi) in zip(centre, bounds)
            ]
            ls, ln = torch.meshgrid(*axes, indexing="ij")
            logw = self._log_evidence(ls.exp(), ln.exp())
            w = torch.exp(logw - logw.max())
            border = torch.cat([w[0], w[-1], w[:, 0], w[:, -1]]).max()
            at_prior_edge = all((c - half <= lo) and (c + half >= hi) for c, (lo, hi) in zip(centre, bounds))
            if float(border) < _NEGLIGIBLE or at_prior_edge or half >= 64:
                break
            half *= 2
        keep = w.reshape(-1) > _NEGLIGIBLE
        self.s2 = ls.reshape(-1)[keep].exp()
        self.sig2 = ln.reshape(-1)[keep].exp()
        self.weights = w.reshape(-1)[keep] / w.reshape(-1)[keep].sum()

    def _log_evidence(self, s2: torch.Tensor, sig2: torch.Tensor) -> torch.Tensor:
        q = s2[..., None] * self.lam + sig2[..., None]
        return -0.5 * (self.z**2 / q).sum(-1) - 0.5 * torch.log(q).sum(-1) - 0.5 * self.N * _LOG_2PI

    def components(self, Ks: torch.Tensor, kss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per grid point, the latent mean shift and variance at the test points: two (G, m) tensors, for
        Ks (m, N) = K(X*, X) and kss (m,) the prior kernel diagonal at X*."""
        KsU = Ks @ self.U  # (m, N)
        q = self.s2[:, None] * self.lam + self.sig2[:, None]  # (G, N)
        shift = self.s2[:, None] * ((self.z / q) @ KsU.T)  # (G, m)
        var = self.s2[:, None] * kss - self.s2[:, None] ** 2 * ((1.0 / q) @ (KsU**2).T)
        return shift, var.clamp_min(0.0)

    def moments(self, Ks: torch.Tensor, kss: torch.Tensor, include_noise: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean shift and variance of the mixture at the test points, (m,) each."""
        shift, var = self.components(Ks, kss)
        if include_noise:
            var = var + self.sig2[:, None]
        w = self.weights[:, None]
        mean = (w * shift).sum(0)
        return mean, ((w * (var + shift**2)).sum(0) - mean**2).clamp_min(0.0)

    def log_density(self, Ks: torch.Tensor, kss: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        """log p(y* | y) of the observed test targets, per point, for resid = y* − m(X*): (m,)."""
        shift, var = self.components(Ks, kss)
        var = var + self.sig2[:, None]
        logp = -0.5 * (_LOG_2PI + torch.log(var)) - 0.5 * (resid - shift) ** 2 / var
        return torch.logsumexp(logp + torch.log(self.weights)[:, None], 0)
