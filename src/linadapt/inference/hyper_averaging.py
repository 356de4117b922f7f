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

The grid is centred on the evidence optimum and each axis widened until the posterior weight on its borders
inside the prior box is negligible (a border on the box's edge stays: the prior ends there), then laid with
about 4 points per unit of log (41–161 per axis); points with weight below 1e-12 of the largest are dropped.

The log-uniform prior is proper only because of the box, and where the evidence is flat towards s² → 0 or
σ² → 0 (few points: the data can be explained as all noise, or interpolated) the weight of that plateau
grows with its length inside the box. The box is the one the type-II search uses: s² ∈ [e⁻²⁸, e²⁸] and
σ² ∈ [e⁻²⁸, e¹²] × the mean squared residual.
"""

from __future__ import annotations

import math

import torch

from linadapt._blocks import budget_blocks

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
        # the grid's centre (the optimum, inside the box) and its half-widths: widened until the posterior
        # weight on every border that is not the prior box's own edge is negligible
        centre = [min(max(c, lo), hi) for c, (lo, hi) in zip((math.log(prior_var), math.log(noise_var)), bounds)]
        half = [4.0, 4.0]
        while True:
            axes = self._axes(centre, half, bounds, _GRID)
            logw = self._log_evidence(*[a.exp() for a in torch.meshgrid(*axes, indexing="ij")])
            w = torch.exp(logw - logw.max())
            grown = False
            for d in range(2):
                lo_open, hi_open = float(axes[d][0]) > bounds[d][0], float(axes[d][-1]) < bounds[d][1]
                edge = w.movedim(d, 0)
                heavy_lo, heavy_hi = float(edge[0].max()) > _NEGLIGIBLE, float(edge[-1].max()) > _NEGLIGIBLE
                if (lo_open and heavy_lo) or (hi_open and heavy_hi):
                    half[d] *= 2
                    grown = True
            if not grown or max(half) > 64:
                break
        # then resolve the posterior: about 4 points per unit of log (at least 41, at most 161 per axis)
        sizes = [min(161, max(_GRID, math.ceil(4 * float(a[-1] - a[0])) + 1)) for a in axes]
        axes = [self._axes(centre, half, bounds, m)[d] for d, m in enumerate(sizes)]
        ls, ln = torch.meshgrid(*axes, indexing="ij")
        logw = self._log_evidence(ls.exp(), ln.exp())
        w = torch.exp(logw - logw.max()).reshape(-1)
        keep = w > _NEGLIGIBLE
        self.s2 = ls.reshape(-1)[keep].exp()
        self.sig2 = ln.reshape(-1)[keep].exp()
        self.weights = w[keep] / w[keep].sum()

    def _axes(
        self, centre: list[float], half: list[float], bounds: tuple[tuple[float, float], ...], m: int
    ) -> list[torch.Tensor]:
        return [
            torch.linspace(max(c - h, lo), min(c + h, hi), m, dtype=torch.float64, device=self.lam.device)
            for c, h, (lo, hi) in zip(centre, half, bounds)
        ]

    def _grid_blocks(self, G: int) -> list[slice]:
        """Blocks of grid points keeping their (block × N) temporaries under 2^24 entries."""
        return budget_blocks(G, self.N, 2**24)

    def _log_evidence(self, s2: torch.Tensor, sig2: torch.Tensor) -> torch.Tensor:
        shape, s2, sig2 = s2.shape, s2.reshape(-1), sig2.reshape(-1)
        out = []
        for sl in self._grid_blocks(s2.numel()):
            q = s2[sl, None] * self.lam + sig2[sl, None]
            out.append(-0.5 * (self.z**2 / q).sum(-1) - 0.5 * torch.log(q).sum(-1) - 0.5 * self.N * _LOG_2PI)
        return torch.cat(out).reshape(shape)

    def components(self, Ks: torch.Tensor, kss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per grid point, the latent mean shift and variance at the test points: two (G, m) tensors, for
        Ks (m, N) = K(X*, X) and kss (m,) the prior kernel diagonal at X*."""
        KsU = Ks @ self.U  # (m, N)
        shifts, variances = [], []
        for sl in self._grid_blocks(self.s2.numel()):
            s2 = self.s2[sl, None]
            q = s2 * self.lam + self.sig2[sl, None]  # (block, N)
            shifts.append(s2 * ((self.z / q) @ KsU.T))  # (block, m)
            variances.append(s2 * kss - s2**2 * ((1.0 / q) @ (KsU**2).T))
        return torch.cat(shifts), torch.cat(variances).clamp_min(0.0)

    def _blocks(self, m: int) -> list[slice]:
        """Test-point blocks keeping the (grid points × block) temporaries under 2^24 entries."""
        return budget_blocks(m, self.weights.numel(), 2**24)

    def moments(self, Ks: torch.Tensor, kss: torch.Tensor, include_noise: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean shift and variance of the mixture at the test points, (m,) each."""
        parts = [self._moments(Ks[sl], kss[sl], include_noise) for sl in self._blocks(Ks.shape[0])]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _moments(self, Ks: torch.Tensor, kss: torch.Tensor, include_noise: bool) -> tuple[torch.Tensor, torch.Tensor]:
        shift, var = self.components(Ks, kss)
        if include_noise:
            var = var + self.sig2[:, None]
        w = self.weights[:, None]
        mean = (w * shift).sum(0)
        return mean, ((w * (var + shift**2)).sum(0) - mean**2).clamp_min(0.0)

    def log_density(self, Ks: torch.Tensor, kss: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        """log p(y* | y) of the observed test targets, per point, for resid = y* − m(X*): (m,)."""
        return torch.cat([self._log_density(Ks[sl], kss[sl], resid[sl]) for sl in self._blocks(Ks.shape[0])])

    def _log_density(self, Ks: torch.Tensor, kss: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        shift, var = self.components(Ks, kss)
        var = var + self.sig2[:, None]
        logp = -0.5 * (_LOG_2PI + torch.log(var)) - 0.5 * (resid - shift) ** 2 / var
        return torch.logsumexp(logp + torch.log(self.weights)[:, None], 0)
