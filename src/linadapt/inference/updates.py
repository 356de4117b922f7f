"""Conditioning a fitted posterior on more data without recomputing what it holds (the estimators' ``update``).

The old examples keep their rows, the new ones are appended (N = n·c old rows, k new ones):

* function space, Cholesky: A = s²K + Σ grows by the cross kernel K(X_old, X_new) and K(X_new, X_new). With the
  old factor L (A₁₁ = L Lᵀ) the new one is the block factor

      [[L, 0], [Bᵀ, L₂₂]],   B = L⁻¹ A₁₂ (a triangular solve, O(N²k)),   L₂₂ Lᵀ₂₂ = A₂₂ − BᵀB (O(Nk² + k³)),

  so nothing of size N³ (or N²p) is recomputed; α = A⁻¹r then costs two triangular solves, O(N²).
* parameter space, Cholesky: the dense J gains the new rows, JᵀJ (per output with per-output noise) and Jᵀr
  gain J_newᵀJ_new and J_newᵀr_new (O(kp²)); P = JᵀJ/σ² + I/s² is factorised again (p³/3, independent of N) —
  the old Jacobian is never formed again.
* CG (either space): the new system is solved starting from the old solution (function space: α padded with
  zeros for the new rows; parameter space: the old P⁻¹g): one product gives the residual, and CG solves for the
  correction to the same relative tolerance as a cold start.

Classification: the Laplace MAP on all data is found by Newton started at the current one — the old latent
values and, for the new points, f(x; θ̂) + J(x) δ* (in function space with a = 0 on the new rows, which keeps
f − m = s² K a) — with the dense kernel or Jacobian extended as above. Newton's objective is convex, so the
result is the MAP of a fit on all data; the start only saves iterations.

Not here: prior groups, hyperparameter averaging and sharded (distributed) training data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from linear_operator.utils.cholesky import psd_safe_cholesky

from linadapt.inference.laplace import LaplacePosterior, LaplaceProblem
from linadapt.inference.per_output_noise import PerOutputPosterior
from linadapt.inference.regression import RegressionPosterior, RegressionProblem
from linadapt.jacobian.linearization import ALGEBRA_DTYPE

__all__ = [
    "LaplaceStart",
    "UpdatedPerOutputPosterior",
    "UpdatedRegressionPosterior",
    "extend_cholesky",
    "extend_kernel",
    "extend_laplace_problem",
    "extend_regression_problem",
    "laplace_start",
    "updated_regression_posterior",
]


def extend_kernel(K: torch.Tensor, K_on: torch.Tensor, K_nn: torch.Tensor) -> torch.Tensor:
    """[[K, K_on], [K_onᵀ, K_nn]] for K (N × N), K_on (N × M), K_nn (M × M)."""
    top = torch.cat([K, K_on], dim=1)
    bottom = torch.cat([K_on.T, K_nn], dim=1)
    return torch.cat([top, bottom])


def extend_cholesky(L: torch.Tensor, A12: torch.Tensor, A22: torch.Tensor) -> torch.Tensor:
    """The lower Cholesky factor of [[A₁₁, A₁₂], [A₁₂ᵀ, A₂₂]] from that of A₁₁ (L, N × N): the block factor
    [[L, 0], [Bᵀ, L₂₂]] with B = L⁻¹A₁₂ and L₂₂ the factor of the Schur complement A₂₂ − BᵀB. O(N²M) for M new
    rows; the Schur complement is factorised as :class:`~linadapt.inference.solvers.SPDSystem` factorises (jitter
    only if round-off breaks it)."""
    B = torch.linalg.solve_triangular(L, A12, upper=False)
    S = A22 - B.T @ B
    S = 0.5 * (S + S.T)
    L22 = psd_safe_cholesky(S, jitter=1e-10 * float(A22.diagonal().mean()))
    N, M = L.shape[0], A22.shape[0]
    out = torch.zeros(N + M, N + M, dtype=L.dtype, device=L.device)
    out[:N, :N] = L
    out[N:, :N] = B.T
    out[N:, N:] = L22
    return out


def _new_jacobian(problem: RegressionProblem | LaplaceProblem, X_new: torch.Tensor) -> torch.Tensor:
    """J(X_new) as (M, p), M = k·c rows, example-major."""
    return problem.lin.jacobian(X_new).reshape(-1, problem.p)


def _check_local(problem: Any) -> None:
    if problem.sharding is not None:
        raise ValueError("updating a posterior needs the training data of one process (not a sharded fit)")


def extend_regression_problem(old: RegressionProblem, X_new: torch.Tensor, r_new: torch.Tensor) -> RegressionProblem:
    """The :class:`~linadapt.inference.regression.RegressionProblem` of the old and the new examples, with the dense
    pieces the old one holds extended rather than recomputed: K (by the cross kernel), J (by the new rows), JᵀJ,
    the per-output Grams and Jᵀr (by the new rows' contributions).

    Args:
        old: the fitted problem (one process).
        X_new: (k, ...) prepared inputs.
        r_new: their residuals, (k·c,) or (k, c), float64.
    """
    _check_local(old)
    lin, c = old.lin, old.c
    X_all = torch.cat([old.X, X_new])
    r_new = r_new.reshape(-1).to(old.r)
    problem = RegressionProblem(lin, X_all, torch.cat([old.r, r_new]), old.options)
    cache = old.cache
    if "K" in cache:
        problem.cache["K"] = extend_kernel(cache["K"], lin.ntk(old.X, X_new), lin.ntk(X_new))
    held = {key for key in ("J", "G", "g", "G_outputs") if key in cache}
    if held & {"J", "G", "G_outputs"}:
        J_new = _new_jacobian(old, X_new)
        if "J" in cache:
            problem.cache["J"] = torch.cat([cache["J"], J_new])
        if "G" in cache:
            problem.cache["G"] = cache["G"] + J_new.T @ J_new
        if "G_outputs" in cache:
            Jc = J_new.reshape(-1, c, old.p)
            problem.cache["G_outputs"] = cache["G_outputs"] + torch.einsum("iap,iaq->apq", Jc, Jc)
        if "g" in cache:
            problem.cache["g"] = cache["g"] + J_new.T @ r_new
    elif "g" in cache:
        problem.cache["g"] = cache["g"] + lin.vjp(X_new, r_new.reshape(1, -1, c))[0]
    return problem


class _Seeded:
    """A regression posterior whose first solve (the fit's) starts from what the previous posterior held: the
    extended Cholesky factor (``chol``) or, for CG, a starting guess ``x0`` of the fit's right-hand side."""

    system: Any
    options: Any

    def __init__(self, *args: Any, chol: torch.Tensor | None = None, x0: torch.Tensor | None = None, **kw: Any):
        self._chol0, self._x0 = chol, x0
        super().__init__(*args, **kw)  # type: ignore[call-arg]

    def solve(self, B: torch.Tensor) -> torch.Tensor:
        """As the posterior's ``solve``; the first call uses the seed (the factor, or ``x0`` as CG's start)."""
        chol, self._chol0 = self._chol0, None
        x0, self._x0 = self._x0, None
        if chol is not None and self.system.method == "cholesky":
            self.system._chol = chol
        if x0 is None or self.system.method != "cg":
            return super().solve(B)  # type: ignore[misc]
        x0 = x0.reshape(B.shape)
        resid = B - self.system.matmul(x0)
        scale, gap = float(B.norm()), float(resid.norm())
        if gap == 0.0:
            return x0
        # CG on the correction to ‖A x − B‖ ≤ tol ‖B‖: a tolerance relative to the (smaller) residual
        tol = min(0.5, self.options.cg_tol * scale / gap)
        return x0 + self.system.solve(resid, tol=tol)


class UpdatedRegressionPosterior(_Seeded, RegressionPosterior):
    """:class:`~linadapt.inference.regression.RegressionPosterior` started from a previous one's factor or solution
    (keyword arguments ``chol`` and ``x0``); otherwise the same."""


class UpdatedPerOutputPosterior(_Seeded, PerOutputPosterior):
    """:class:`~linadapt.inference.per_output_noise.PerOutputPosterior` started from a previous one's factor."""


def updated_regression_posterior(post: RegressionPosterior, problem: RegressionProblem) -> RegressionPosterior:
    """The posterior at ``post``'s hyperparameters, space and solver on ``problem`` (the old examples and new ones
    appended, from :func:`extend_regression_problem`), started from what ``post`` holds: its Cholesky factor
    extended (function space), or its solution as CG's start."""
    old = post.problem
    n_old, M = old.n_obs, problem.n_obs - old.n_obs
    per_output = isinstance(post, PerOutputPosterior)
    chol = x0 = None
    if post.solver == "cholesky" and post.space == "function":
        X_new = problem.X[old.n :]
        K = problem.cache.get("K")
        K_on = K[:n_old, n_old:] if K is not None else problem.lin.ntk(old.X, X_new)
        A22 = post.s2 * (K[n_old:, n_old:] if K is not None else problem.lin.ntk(X_new))
        if per_output:
            A22.diagonal().add_(post.noise_vars.repeat(M // post.c).to(A22))
        else:
            A22.diagonal().add_(post.sig2)
        chol = extend_cholesky(post.system.chol(), post.s2 * K_on, A22)
    elif post.solver == "cg":
        if post.space == "function":
            x0 = torch.cat([post.alpha, torch.zeros(M, dtype=post.alpha.dtype, device=post.alpha.device)])
        else:
            x0 = post.centred * post.sig2  # the solution of P x = Jᵀr
        x0 = x0.unsqueeze(-1)
    if per_output:
        return UpdatedPerOutputPosterior(
            problem, post.s2, post.noise_vars.cpu().numpy(), post.space, post.prior_offset, chol=chol
        )
    return UpdatedRegressionPosterior(
        problem, post.s2, post.sig2, post.space, post.solver, prior_offset=post.prior_offset, chol=chol, x0=x0
    )


# ---------------------------------------------------------------------------------------------- classification
def extend_laplace_problem(
    old: LaplaceProblem, X_new: torch.Tensor, labels_new: torch.Tensor, f0_new: torch.Tensor
) -> LaplaceProblem:
    """The :class:`~linadapt.inference.laplace.LaplaceProblem` of the old and the new examples (same likelihood and
    prior mean), with the dense kernel or Jacobian the old one holds extended by the new examples' rows.

    Args:
        old: the fitted problem (one process).
        X_new: (k, ...) prepared inputs.
        labels_new: their labels, encoded as the old ones.
        f0_new: f(X_new; θ̂), (k, c).
    """
    _check_local(old)
    lin = old.lin
    labels = torch.cat([old.labels, labels_new.to(old.labels)])
    f0 = torch.cat([old.f0, f0_new.to(old.f0)])
    problem = LaplaceProblem(
        lin, torch.cat([old.X, X_new]), labels, "network", old.options, f0=f0, likelihood=old.likelihood
    )
    problem.mu = old.mu
    if "K" in old.cache:
        problem.cache["K"] = extend_kernel(old.cache["K"], lin.ntk(old.X, X_new), lin.ntk(X_new))
    if "J" in old.cache:
        problem.cache["J"] = torch.cat([old.cache["J"], _new_jacobian(old, X_new)])
    return problem


@dataclass
class LaplaceStart:
    """Where Newton starts on the extended problem: the space, s², the function-space coefficients a (f − m =
    s² K a), the logits at every training input (n, c) and δ (parameter space); what
    :class:`~linadapt.inference.laplace.LaplacePosterior` reads of its ``start``."""

    space: str
    s2: float
    logits: torch.Tensor
    a: torch.Tensor | None = None
    delta: torch.Tensor | None = None


def laplace_start(post: LaplacePosterior, X_new: torch.Tensor, f0_new: torch.Tensor) -> LaplaceStart:
    """The current MAP as a start on the data with X_new appended: the old logits, f(x; θ̂) + J(x) δ* at the new
    inputs, and a = 0 on the new rows (function space) — consistent, since s² K [a; 0] = [f_old − m_old;
    J_new (δ* − μ)]."""
    delta = post.delta
    f_new = f0_new.to(ALGEBRA_DTYPE) + post.lin.jvp(X_new, delta).reshape(f0_new.shape)
    logits = torch.cat([post.logits, f_new])
    if post.space == "function":
        a = torch.cat([post.a, torch.zeros(f_new.numel(), dtype=post.a.dtype, device=post.a.device)])
        return LaplaceStart("function", post.s2, logits, a=a)
    return LaplaceStart("parameter", post.s2, logits, delta=delta.clone())
