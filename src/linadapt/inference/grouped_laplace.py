"""Laplace classification with one prior variance per group of weights, learned by the Laplace evidence.

With groups g of the adapted weights and δ_g − μ_g ~ N(0, s²_g I), the prior covariance of the training logits is

    K_s = Σ_g s²_g K_g,   K_g = J_g(X) J_g(X)ᵀ   (N × N, N = n·c, example-major),

the isotropic model's s² K with each group's tangent kernel scaled by its own s²_g. Everything of
:class:`~linadapt.inference.laplace.LaplacePosterior` in function space holds with s² K replaced by K_s: the MAP
logits f* = m + K_s a, the system B = I + Rᵀ K_s R, the evidence

    log q(y | s²_1..G) = log p(y | f*) − ½ aᵀ K_s a − ½ log det B,

the weights' MAP δ* = μ + D Jᵀ a (D = diag(s²_g of each weight)) and the predictive J* S J*ᵀ = K_s(X*, X*) −
K_s(X*, X) R B⁻¹ Rᵀ K_s(X, X*). So the posterior here is a LaplacePosterior at s² = 1 on the kernel K_s.

The search: the isotropic optimum first (all s²_g equal, the kernel Σ_g K_g = K), then Nelder–Mead over
log s²_g from it, each evaluation one Newton run warm-started at the best point so far, so the learned evidence
is never below the isotropic one. It is derivative-free (the evidence's gradient needs the likelihood's third
derivatives through the MAP), so it suits a handful of groups — e.g. the new head against the backbone.
Dense function space only: the G training kernels are held (G + 3 N × N matrices within the memory budget).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize

from linadapt._memory import MemoryBudgetError, format_bytes
from linadapt.inference.laplace import LaplacePosterior, LaplaceProblem, optimize_prior_var
from linadapt.inference.prior_groups import GroupedKernels
from linadapt.inference.regression import SolverOptions
from linadapt.inference.scale_prior import ScalePrior
from linadapt.jacobian.linearization import ALGEBRA_DTYPE, Linearization
from linadapt.likelihoods import Likelihood

__all__ = ["GroupedLaplacePosterior", "GroupedLaplaceProblem", "optimize_group_prior_vars"]

_MAX_DECADES = 8  # each s²_g stays within the isotropic optimum · 10^{±8}


class GroupedLaplaceProblem(LaplaceProblem):
    """A :class:`~linadapt.inference.laplace.LaplaceProblem` whose prior kernel is K_s = Σ_g s²_g K_g.

    Args:
        lin: the linearization over all adapted weights (its parameter order is the weights' order).
        X, labels, prior_mean, options, f0, likelihood: as for LaplaceProblem (one process).
        groups: (label, parameter names) pairs covering ``lin.param_names`` (from
            :func:`~linadapt.inference.prior_groups.resolve_groups`); one
            :class:`~linadapt.jacobian.linearization.Linearization` of ``lin.model`` per group.

    Attributes: Ks (G, N, N) the per-group training kernels, scales (G,) the s²_g the kernel now holds.

    Raises:
        MemoryBudgetError: the G + 3 dense N × N matrices exceed ``options.memory_budget``.
    """

    def __init__(
        self,
        lin: Linearization,
        X: torch.Tensor,
        labels: torch.Tensor,
        prior_mean: str,
        options: SolverOptions,
        groups: list[tuple[str, list[str]]],
        f0: torch.Tensor | None = None,
        likelihood: Likelihood | None = None,
    ) -> None:
        super().__init__(lin, X, labels, prior_mean, options, f0=f0, likelihood=likelihood)
        need = 8 * (len(groups) + 3) * self.n_obs * self.n_obs
        if need > options.memory_budget:
            raise MemoryBudgetError(
                f"prior_groups holds {len(groups)} dense {self.n_obs} × {self.n_obs} kernels and the Laplace system "
                f"({format_bytes(need)}), more than memory_budget ({format_bytes(options.memory_budget)}): use fewer "
                "groups or fewer training points, or raise memory_budget"
            )
        self.groups = groups
        self.kernels = GroupedKernels(lin.model, groups, lin.chunk_size, lin.device, lin.memory_budget, lin.output_fn)
        self.Ks = self.kernels.gram(X)
        index = {name: g for g, (_, names) in enumerate(groups) for name in names}
        self._weight_group = torch.cat(
            [torch.full((k,), index[name], dtype=torch.long) for name, k in zip(lin.param_names, lin.numels)]
        ).to(lin.device)
        self.scales = np.zeros(len(groups))
        self.set_scales(np.ones(len(groups)))

    def group_kernel_diagonals(self) -> np.ndarray:
        """(G,): k̄_g = tr K_g / N, the mean diagonal of each group's kernel."""
        return (self.Ks.diagonal(dim1=1, dim2=2).sum(-1) / max(self.n_obs, 1)).cpu().numpy()

    def mean_kernel_diagonal(self) -> float:
        """k̄ of the isotropic kernel Σ_g K_g (all s²_g = 1), whatever scales the held kernel has now."""
        return float(self.group_kernel_diagonals().sum())

    def set_scales(self, s2: np.ndarray) -> None:
        """Make the held kernel K_s = Σ_g s²_g K_g (a no-op when it already is)."""
        s2 = np.asarray(s2, dtype=np.float64)
        if np.array_equal(s2, self.scales):
            return
        self.scales = s2.copy()
        weights = torch.as_tensor(s2, dtype=self.Ks.dtype, device=self.Ks.device)
        self.cache["K"] = torch.einsum("g,gij->ij", weights, self.Ks)

    def weight_scales(self) -> torch.Tensor:
        """(p,): s²_g of each adapted weight, in ``lin.param_names`` order."""
        return torch.as_tensor(self.scales, dtype=ALGEBRA_DTYPE, device=self.lin.device)[self._weight_group]


class GroupedLaplacePosterior(LaplacePosterior):
    """The Laplace posterior at prior variances s²_1..G (dense function space): a LaplacePosterior at s² = 1 on
    the kernel K_s (see the module docstring), with the group scales applied to δ* and to the test kernels.

    Args:
        problem: the grouped problem. prior_vars: (G,) s²_g. newton_tol, newton_max_iter: Newton's stopping rule.
        start: a posterior of the same problem (grouped or isotropic) whose a seeds Newton.

    Attributes: prior_vars (G,), and those of LaplacePosterior (``s2`` is 1: the scales live in the kernel).
    """

    def __init__(
        self,
        problem: GroupedLaplaceProblem,
        prior_vars: np.ndarray,
        newton_tol: float = 1e-12,
        newton_max_iter: int = 100,
        start: LaplacePosterior | None = None,
    ) -> None:
        self.prior_vars = np.asarray(prior_vars, dtype=np.float64)
        problem.set_scales(self.prior_vars)
        super().__init__(problem, 1.0, "function", "cholesky", newton_tol, newton_max_iter, start=start)

    def _activate(self) -> GroupedLaplaceProblem:
        """The problem, its held kernel set to this posterior's scales (the search moves them)."""
        pr: GroupedLaplaceProblem = self.problem  # type: ignore[assignment]
        pr.set_scales(self.prior_vars)
        return pr

    def _warm_start(self, start: LaplacePosterior, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """a from ``start`` (an isotropic posterior at s² has f − m = s² K a = K_s a at equal scales s²; a grouped
        one has f − m = K_s a), and the logits f = m + K_s a consistent with it under this posterior's scales."""
        a = start.a.clone()
        return a, m + self.problem.k_mv(a.unsqueeze(-1), True).squeeze(-1)

    @property
    def delta(self) -> torch.Tensor:
        """δ* = μ + D Jᵀ a (p,), D the per-weight s²_g: one vector-Jacobian product, formed on first use."""
        if self._delta is None:
            pr = self._activate()
            self._delta = pr.mu + pr.weight_scales() * pr.jt_mv(self.a.unsqueeze(-1), self.dense).squeeze(-1)
        return self._delta

    def latent_blocks(self, Xs: torch.Tensor, added_variance: torch.Tensor | None = None) -> torch.Tensor:
        """Per-example c × c blocks of J(x) S J(x)ᵀ (m, c, c), through the groups' scaled cross kernels."""
        self._activate()
        return super().latent_blocks(Xs, added_variance)

    def latent_cov(self, Xs: torch.Tensor) -> torch.Tensor:
        """The joint posterior covariance of the logits at X* (m·c, m·c)."""
        self._activate()
        return super().latent_cov(Xs)

    def _scaled_sum(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return sum(float(s) * part for s, part in zip(self.prior_vars, parts))  # type: ignore[return-value]

    def _group_chunk(self, m: int, size: int) -> int:
        """Test points per chunk: at most ``size``, about 16 chunks for a long prediction (at least 32 points)."""
        return max(1, min(size, max(32, math.ceil(m / 16))))

    def _cross_kernel_chunks(
        self, X: torch.Tensor, Xs: torch.Tensor, size: int
    ) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
        """Chunks (sl, Σ_g s²_g K_g(X, Xs[sl]), Σ_g s²_g blocks_g) of fixed slices of Xs: each group's engine
        may split a slice further (its own memory plan), and its pieces are joined before the groups are summed."""
        lins = self.problem.kernels.lins  # type: ignore[attr-defined]
        step = self._group_chunk(Xs.shape[0], size)
        for start in range(0, Xs.shape[0], step):
            sl = slice(start, min(start + step, Xs.shape[0]))
            cross, blocks = [], []
            for lin in lins:
                pieces = list(lin.cross_kernel_chunks(X, Xs[sl], step))
                cross.append(torch.cat([Kx for _, Kx, _ in pieces], 1))
                blocks.append(torch.cat([Kss for _, _, Kss in pieces], 0))
            yield sl, self._scaled_sum(cross), self._scaled_sum(blocks)

    def _cross_kernel_steps(self, X: torch.Tensor, m: int, size: int) -> int:
        return math.ceil(m / self._group_chunk(m, size)) if m else 0

    def _dense_kernels(self, X: torch.Tensor, Xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lins = self.problem.kernels.lins  # type: ignore[attr-defined]
        return self._scaled_sum([lin.ntk(X, Xs) for lin in lins]), self._scaled_sum([lin.ntk(Xs) for lin in lins])


def optimize_group_prior_vars(
    problem: GroupedLaplaceProblem,
    prior_var: float,
    newton_tol: float = 1e-12,
    newton_max_iter: int = 100,
    max_evaluations: int | None = None,
    scale_prior: ScalePrior | None = None,
) -> GroupedLaplacePosterior:
    """argmax over (s²_1..G) of the Laplace evidence log q(y | s²): the isotropic optimum (by
    :func:`~linadapt.inference.laplace.optimize_prior_var` on K = Σ_g K_g, from ``prior_var``), then Nelder–Mead
    on log s²_g (to 0.02 in log s², each within 10^{±8} of the isotropic optimum; at most ``max_evaluations``
    Newton runs, default 40·G), warm-started at the best point so far. Returns the posterior at the best point.
    With ``scale_prior``, both stages maximise the evidence plus log p(s²) at v = Σ_g s²_g k̄_g
    (:mod:`~linadapt.inference.scale_prior`)."""
    G = len(problem.groups)
    problem.set_scales(np.ones(G))
    iso = optimize_prior_var(problem, prior_var, "function", "cholesky", newton_tol, newton_max_iter, scale_prior)
    kbars = problem.group_kernel_diagonals()

    def penalty(x: np.ndarray) -> float:
        if scale_prior is None:
            return 0.0
        return scale_prior.penalty(math.log(max(float(np.exp(x) @ kbars), 1e-300)))[0]

    x0 = np.full(G, math.log(iso.s2))
    first = GroupedLaplacePosterior(problem, np.exp(x0), newton_tol, newton_max_iter, start=iso)
    best: dict[str, Any] = {"post": first, "value": -first.log_evidence + penalty(x0)}
    if G == 1:
        return best["post"]

    def negative_evidence(x: np.ndarray) -> float:
        post = GroupedLaplacePosterior(problem, np.exp(x), newton_tol, newton_max_iter, start=best["post"])
        if not math.isfinite(post.log_evidence):
            return math.inf
        value = -post.log_evidence + penalty(x)
        if value < best["value"]:
            best["post"], best["value"] = post, value
        return value

    span = _MAX_DECADES * math.log(10.0)
    simplex = np.vstack([x0, x0 + math.log(10.0) * np.eye(G)])  # one decade along each group to start
    minimize(
        negative_evidence,
        x0,
        method="Nelder-Mead",
        bounds=[(x - span, x + span) for x in x0],
        options={
            "initial_simplex": simplex,
            "xatol": 0.02,
            "fatol": 1e-6 * max(1.0, abs(iso.log_evidence)),
            "maxfev": max_evaluations or 40 * G,
        },
    )
    post = best["post"]
    post._activate()
    return post
