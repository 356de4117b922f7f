"""Laplace approximation of the linearized network under a likelihood p(y | f) (default: categorical / softmax).

Model: logits f(x) = f(x; θ̂) + J(x) δ with prior δ ~ N(μ, s² I_p) (μ = 0: centred at the trained weights;
μ = −θ̂: the weight-decay prior θ ~ N(0, s² I)) and y | f ~ p(y | f), a
:class:`~linadapt.likelihoods.base.Likelihood` (log-concave in f: :class:`~linadapt.likelihoods.Categorical`,
y | f ~ Categorical(softmax f); :class:`~linadapt.likelihoods.Bernoulli` and
:class:`~linadapt.likelihoods.Multilabel`, independent sigmoids with diagonal Λ; or
:class:`~linadapt.likelihoods.Gaussian`, for which everything below is exact). The negative log posterior of δ,

    L(δ) = −Σᵢ log p(yᵢ | fᵢ) + ½ ‖δ − μ‖² / s²,

is convex; its Hessian is exactly the generalized Gauss–Newton matrix H = Jᵀ Λ J + I / s² with the
per-example c × c blocks Λᵢ = −∇²_f log p(yᵢ | fᵢ) (softmax: diag(πᵢ) − πᵢ πᵢᵀ, πᵢ = softmax(fᵢ)). Newton's
method (with a backtracking line search) finds the MAP δ*; the Laplace posterior is N(δ*, H(δ*)⁻¹). Only the
likelihood's log_likelihood, gradient and curvature (Λ, a root R with R Rᵀ = Λ, Rᵀ) are used here.

Two equivalent spaces:

* parameter space (p-sized systems): Newton steps H d = −∇L, by Cholesky of the dense H or by CG on
  GGN-vector products H v = Jᵀ Λ (J v) + v / s² (one jvp, the closed-form Λ product, one vjp);
* function space (N = n·c sized systems, the multi-class GP Laplace of Rasmussen & Williams §3.5 with full
  c × c blocks): with prior mean m = f(X; θ̂) + J μ and prior covariance s² K, K = J Jᵀ, and Λ = R Rᵀ
  (block-diagonal; softmax: R = diag(√π)(I − √π √πᵀ)), each step solves with B = I + s² Rᵀ K R.

The Laplace evidence (the issue's objective for s²) is the same number in both spaces,

    log q(y | s²) = log p(y | f*) − ½ ‖δ* − μ‖² / s² − ½ log det(I_p + s² Jᵀ Λ J),

since det(I_p + s² Jᵀ R Rᵀ J) = det(I_N + s² Rᵀ K R) = det B (Sylvester) and log det(I_p + s² JᵀΛJ) =
log det H + p log s².
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from linear_operator.functions import pivoted_cholesky
from scipy.optimize import minimize_scalar

from linadapt.inference.posterior import LinearizedPosterior, TrainingData
from linadapt.inference.regression import SolverOptions
from linadapt.inference.scale_prior import ScalePrior
from linadapt.inference.solvers import (
    ConvergenceWarning,
    SPDSystem,
    diagonal_preconditioner,
    low_rank_plus_diagonal_preconditioner,
)
from linadapt.jacobian.linearization import ALGEBRA_DTYPE, Linearization
from linadapt.likelihoods import Categorical, Curvature, Likelihood

__all__ = ["LaplacePosterior", "LaplaceProblem", "NewtonInfo", "optimize_prior_var"]

_MAX_DECADES = 8  # the prior-variance search stays within prior_var · 10^{±8}


@dataclass
class NewtonInfo:
    """How the MAP search went: iterations, the final Newton decrement² (predicted objective decrease × 2),
    and whether it met its tolerance."""

    iterations: int
    decrement: float
    converged: bool


class LaplaceProblem(TrainingData):
    """Training data of a linearized model under a likelihood, and the products on it.

    Args:
        lin: the linearization. X: (n, ...) prepared training inputs. labels: the targets of all n examples,
            as ``likelihood.encode_targets`` accepts them (categorical: (n,) int64 in [0, c)).
        prior_mean: ``"network"`` (μ = 0) or ``"zero"`` (μ = −θ̂ over the selected parameters).
        options: solver settings. f0: f(X; θ̂) (n, c) if already computed. sharding: see
            :class:`~linadapt.inference.posterior.TrainingData`.
        likelihood: a :class:`~linadapt.likelihoods.base.Likelihood` (default: categorical).

    Attributes: labels (as given), Y (the encoded targets, (n, c) float64), mu (μ, (p,)), likelihood.
    """

    def __init__(
        self,
        lin: Linearization,
        X: torch.Tensor,
        labels: torch.Tensor,
        prior_mean: str,
        options: SolverOptions,
        f0: torch.Tensor | None = None,
        sharding: Any = None,
        likelihood: Likelihood | None = None,
    ) -> None:
        self.likelihood = Categorical() if likelihood is None else likelihood
        self.f0 = lin.outputs(X) if f0 is None else f0
        super().__init__(lin, X, options, self.f0.shape[1], sharding)
        if self.f0.shape[0] != self.n or labels.shape[0] != self.n:
            raise ValueError(f"f0 and labels must cover all {self.n} training examples")
        self.labels = labels
        self.Y = self.likelihood.encode_targets(labels, self.c).to(ALGEBRA_DTYPE)
        if prior_mean == "network":
            self.mu = torch.zeros(self.p, dtype=ALGEBRA_DTYPE, device=lin.device)
        else:
            self.mu = -lin.theta_vector()

    # -- products: columns are (N, k) in output space, (p, k) in parameter space ---------------------
    def j_mv(self, V: torch.Tensor, dense: bool) -> torch.Tensor:
        """J V: (p, k) -> (N, k); through the dense J only when ``dense`` and J fits the memory budget."""
        if dense and self.jacobian_fits():
            return self.jacobian_matrix() @ V
        return self.jvp(V.T).reshape(V.shape[1], -1).T

    def jt_mv(self, U: torch.Tensor, dense: bool) -> torch.Tensor:
        """Jᵀ U: (N, k) -> (p, k); through the dense J only when ``dense`` and J fits the memory budget."""
        if dense and self.jacobian_fits():
            return self.jacobian_matrix().T @ U
        return self.vjp(U.T.reshape(U.shape[1], self.n, self.c)).T

    def k_mv(self, V: torch.Tensor, dense: bool) -> torch.Tensor:
        """K V: (N, k) -> (N, k)."""
        if dense:
            return self.kernel() @ V
        return self.k_matmul(V)

    def prior_mean_outputs(self, dense: bool) -> torch.Tensor:
        """m = f(X; θ̂) + J μ, (n, c): the prior mean of the training logits."""
        if not bool(self.mu.any()):
            return self.f0
        return self.f0 + self.j_mv(self.mu.unsqueeze(-1), dense).reshape(self.n, self.c)

    def ggn_diagonal(self, curv: Curvature) -> torch.Tensor:
        """diag(Jᵀ Λ J) = Σᵢ Σ_a (Rᵢᵀ Jᵢ)²_a for the curvature Λ = R Rᵀ, shape (p,), by Jacobian chunks."""
        return self.chunk_sum(lambda rows, jac: (curv.rows(rows).root_t(jac) ** 2).sum(dim=(0, 1)))

    def log_lik(self, F: torch.Tensor) -> float:
        """log p(Y | F) = Σᵢ log p(yᵢ | fᵢ) at logits F (n, c)."""
        return self.likelihood.log_likelihood(F, self.Y)


class LaplacePosterior(LinearizedPosterior):
    """MAP and Laplace posterior of the linearized model for a fixed prior variance s².

    Args:
        problem: the training data and its likelihood. prior_var: s². space, solver: as in the classifier.
        newton_tol, newton_max_iter: Newton stopping rule (see the classifier).
        start: a posterior of the same problem at another s² whose MAP logits seed Newton (warm start).

    Attributes:
        delta: δ* (p,). logits: f* = f(X; θ̂) + J δ* at the training inputs (n, c). pi: the likelihood's mean
        E[y | f*] (softmax(f*) for categorical). curvature: Λ at f*. log_lik: log p(y | f*).
        log_evidence: the Laplace evidence log q(y | s²). newton: a :class:`NewtonInfo`.
        system: the final system (B in function space, H in parameter space) at Λ(f*).
    """

    def __init__(
        self,
        problem: LaplaceProblem,
        prior_var: float,
        space: str,
        solver: str,
        newton_tol: float = 1e-12,
        newton_max_iter: int = 100,
        start: LaplacePosterior | None = None,
    ) -> None:
        self.problem, self.lin, self.c = problem, problem.lin, problem.c
        self.s2 = float(prior_var)
        self.space, self.solver = space, solver
        self.dense = solver == "cholesky"
        self.memory_budget = problem.options.memory_budget
        self.newton_tol, self.newton_max_iter = newton_tol, newton_max_iter
        if start is not None and start.space != space:
            start = None
        if space == "function":
            self._newton_function(start)
        else:
            self._newton_parameter(start)
        logdet = self.system.logdet() + (self.problem.p * math.log(self.s2) if space == "parameter" else 0.0)
        if space == "function":  # ‖δ − μ‖² / s² = s² aᵀ K a with δ − μ = s² Jᵀ a: no p-sized product
            prior_quad = self.s2 * float(self.a @ problem.k_mv(self.a.unsqueeze(-1), self.dense).squeeze(-1))
        else:
            prior_quad = float(((self.delta - problem.mu) ** 2).sum()) / self.s2
        self.log_lik = problem.log_lik(self.logits)
        self.log_evidence = self.log_lik - 0.5 * prior_quad - 0.5 * logdet

    # ------------------------------------------------------------------ systems
    def _options_kwargs(self) -> dict:
        o = self.problem.options
        return {
            "tol": o.cg_tol,
            "max_iter": o.cg_max_iter,
            "num_probes": o.lanczos_probes,
            "lanczos_iter": o.lanczos_iter,
            "seed": o.seed,
            "device": self.lin.device,
        }

    def _dense_fits(self) -> bool:
        pr = self.problem
        if self.space == "function":
            return pr.n_obs * pr.n_obs * 8 * 3 <= self.memory_budget  # K, B and its Cholesky factor
        return (pr.n_obs * pr.p + 2 * pr.p * pr.p) * 8 <= self.memory_budget

    def _function_system(self, curv: Curvature) -> SPDSystem:
        """B = I + s² Rᵀ K R for the curvature Λ = R Rᵀ; its pieces are bound methods, not closures, so that a
        fitted posterior pickles."""
        return self._system(
            partial(self._function_matrix, curv),
            partial(self._function_matmul, curv),
            partial(self._function_preconditioner, curv),
            "function-space Laplace system I + s²RᵀKR",
        )

    def _function_matrix(self, curv: Curvature) -> torch.Tensor:
        pr, s2 = self.problem, self.s2
        n, c = pr.n, pr.c
        RtK = curv.root_t(pr.kernel().reshape(n, c, n * c)).reshape(n * c, n * c)
        # (Rᵀ K)ᵀ = K R since K is symmetric, so Rᵀ K R = Rᵀ (Rᵀ K)ᵀ
        B = s2 * curv.root_t(RtK.T.reshape(n, c, n * c)).reshape(n * c, n * c)
        B.diagonal().add_(1.0)
        return 0.5 * (B + B.T)

    def _function_matmul(self, curv: Curvature, V: torch.Tensor) -> torch.Tensor:
        pr, s2 = self.problem, self.s2
        n, c, k = pr.n, pr.c, V.shape[1]
        RV = curv.root(V.reshape(n, c, k)).reshape(n * c, k)
        KRV = pr.k_mv(RV, dense=False)
        return V + s2 * curv.root_t(KRV.reshape(n, c, k)).reshape(n * c, k)

    def _function_preconditioner(self, curv: Curvature) -> Any:
        pr = self.problem
        n, c = pr.n, pr.c
        if "L" not in pr.cache:
            rank = min(pr.options.preconditioner_rank, pr.n_obs)
            pr.cache["L"] = pivoted_cholesky(pr.operator, rank).detach()
        RtL = curv.root_t(pr.cache["L"].reshape(n, c, -1)).reshape(n * c, -1)
        return low_rank_plus_diagonal_preconditioner(RtL, self.s2, 1.0)

    def _parameter_system(self, curv: Curvature, precond_diag: torch.Tensor | None = None) -> SPDSystem:
        """H = Jᵀ Λ J + I / s² for the curvature Λ."""
        return self._system(
            partial(self._parameter_matrix, curv),
            partial(self._parameter_matmul, curv),
            partial(self._parameter_preconditioner, curv, precond_diag),
            "parameter-space Laplace system JᵀΛJ + I/s²",
        )

    def _parameter_matrix(self, curv: Curvature) -> torch.Tensor:
        pr = self.problem
        J = pr.jacobian_matrix().reshape(pr.n, pr.c, pr.p)
        M = curv.root_t(J).reshape(pr.n * pr.c, pr.p)
        H = M.T @ M
        H.diagonal().add_(1.0 / self.s2)
        return H

    def _parameter_matmul(self, curv: Curvature, V: torch.Tensor) -> torch.Tensor:
        pr = self.problem
        k = V.shape[1]
        JV = pr.j_mv(V, dense=False).reshape(pr.n, pr.c, k)
        return pr.jt_mv(curv.lam(JV).reshape(pr.n * pr.c, k), dense=False) + V / self.s2

    def _parameter_preconditioner(self, curv: Curvature, precond_diag: torch.Tensor | None) -> Any:
        d = precond_diag if precond_diag is not None else self.problem.ggn_diagonal(curv)
        return diagonal_preconditioner(d + 1.0 / self.s2)

    def _system(self, matrix, matmul, preconditioner, what: str) -> SPDSystem:
        if self.dense:
            return SPDSystem(self._dim(), matrix=matrix, what=what, **self._options_kwargs())
        return SPDSystem(
            self._dim(),
            matrix=matrix if self._dense_fits() else None,
            matmul=matmul,
            preconditioner=preconditioner,
            what=what,
            refine=self.problem.exact_products,  # float32 cached factors → float64 on the first CG miss
            **self._options_kwargs(),
        )

    def _dim(self) -> int:
        return self.problem.n_obs if self.space == "function" else self.problem.p

    def _inner_tol(self, grad_norm: float, grad0: float) -> float:
        """Forcing term of inexact Newton-CG: loose far from the optimum, tight near it."""
        return max(self.problem.options.cg_tol, min(0.1, grad_norm / max(grad0, 1e-300)))

    def _converged(self, dec2: float, objective: float) -> bool:
        return 0.5 * dec2 <= self.newton_tol * max(1.0, abs(objective))

    def _damped_step(self, objective, f, z, df, dz, loss: float, dec2: float):
        """One Newton update minimising objective(f, z) along (df, dz), whose decrement² is dec2.

        Converged (½dec2 small): take the full step if it does not increase the objective (quadratic
        convergence squares the error) and stop. Otherwise backtrack (Armijo, factor ½) from the full step;
        if no step decreases the objective at working precision, stop there.

        Returns (f, z, loss, done, converged).
        """
        if self._converged(dec2, loss):
            cand = objective(f + df, z + dz)
            if cand <= loss:
                f, z, loss = f + df, z + dz, cand
            return f, z, loss, True, True
        t = 1.0
        while t > 1e-10:
            cand = objective(f + t * df, z + t * dz)
            if cand <= loss - 1e-4 * t * dec2:
                return f + t * df, z + t * dz, cand, False, False
            t *= 0.5
        return f, z, loss, True, dec2 <= 1e-6 * max(1.0, abs(loss))

    def _finish(self, it: int, dec2: float, converged: bool, f: torch.Tensor) -> None:
        """Record the Newton outcome (warn on a miss), the MAP logits f* (N,), the likelihood's mean and Λ there."""
        self.logits = f.reshape(self.problem.n, self.problem.c)
        lik = self.problem.likelihood
        self.pi = lik.mean(self.logits)
        self.curvature = lik.curvature(self.logits)
        self.newton = NewtonInfo(it, dec2, converged)
        if not converged:
            warnings.warn(
                f"Newton's method for the Laplace MAP did not converge in {it} iterations (s² = {self.s2:.3g}, "
                f"decrement² {dec2:.3e}); raise newton_max_iter",
                ConvergenceWarning,
                stacklevel=4,
            )

    # ------------------------------------------------------------------ Newton, function space
    def _newton_function(self, start: LaplacePosterior | None) -> None:
        pr, s2, dense, lik = self.problem, self.s2, self.dense, self.problem.likelihood
        n, c, N = pr.n, pr.c, pr.n_obs
        m = pr.prior_mean_outputs(dense).reshape(N)
        if start is None:
            a = torch.zeros(N, dtype=ALGEBRA_DTYPE, device=self.lin.device)
            f = m.clone()
        else:
            a, f = self._warm_start(start, m)

        def objective(f_: torch.Tensor, a_: torch.Tensor) -> float:
            # −Ψ = −log p(y | f) + ½ aᵀ (f − m)   (f − m = s² K a)
            return -pr.log_lik(f_.reshape(n, c)) + 0.5 * float(a_ @ (f_ - m))

        loss = objective(f, a)
        dec2, converged, it = float("inf"), False, 0
        for it in range(1, self.newton_max_iter + 1):  # noqa: B007
            F = f.reshape(n, c)
            curv = lik.curvature(F)
            g = lik.gradient(F, pr.Y).reshape(N)
            b = curv.lam((f - m).reshape(n, c, 1)).reshape(N) + g
            Kb = s2 * pr.k_mv(b.unsqueeze(-1), dense)  # (N, 1)
            system = self._function_system(curv)
            x = system.solve(curv.root_t(Kb.reshape(n, c, 1)).reshape(N, 1), warn=False)
            Rx = curv.root(x.reshape(n, c, 1)).reshape(N, 1)
            a_new = b - Rx.squeeze(-1)
            f_new = m + (Kb - s2 * pr.k_mv(Rx, dense)).squeeze(-1)
            da, df = a_new - a, f_new - f
            dec2 = float((g - a) @ df)  # ∇Ψ = g − a; Newton step df = (W + (s²K)⁻¹)⁻¹ ∇Ψ
            f, a, loss, done, converged = self._damped_step(objective, f, a, df, da, loss, dec2)
            if done:
                break
        self._finish(it, dec2, converged, f)
        self.a = a
        self._delta: torch.Tensor | None = None  # δ = μ + s² Jᵀ a, formed on first use (see delta)
        self.system = self._function_system(self.curvature)

    def _warm_start(self, start: LaplacePosterior, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, f) to start Newton from another posterior of the same kernel: the same logits, with
        f − m = s² K a = s²_start K a_start."""
        return start.a * (start.s2 / self.s2), start.logits.reshape(-1).clone()

    # ------------------------------------------------------------------ Newton, parameter space
    def _newton_parameter(self, start: LaplacePosterior | None) -> None:
        pr, s2, dense, lik = self.problem, self.s2, self.dense, self.problem.likelihood
        n, c, N = pr.n, pr.c, pr.n_obs
        if start is None:
            delta = torch.zeros(pr.p, dtype=ALGEBRA_DTYPE, device=self.lin.device)
            f = pr.f0.reshape(N).clone()
        else:
            delta, f = start.delta.clone(), start.logits.reshape(N).clone()  # start: parameter space too

        def objective(f_: torch.Tensor, d_: torch.Tensor) -> float:
            return -pr.log_lik(f_.reshape(n, c)) + 0.5 * float(((d_ - pr.mu) ** 2).sum()) / s2

        loss = objective(f, delta)
        # The Jacobi preconditioner of Newton-CG is built once at the start (it only needs to be roughly right).
        precond_diag = None if dense else pr.ggn_diagonal(lik.curvature(f.reshape(n, c)))
        dec2, converged, it, grad0 = float("inf"), False, 0, None
        for it in range(1, self.newton_max_iter + 1):  # noqa: B007
            F = f.reshape(n, c)
            grad = -pr.jt_mv(lik.gradient(F, pr.Y).reshape(N, 1), dense).squeeze(-1) + (delta - pr.mu) / s2
            gnorm = float(grad.norm())
            grad0 = grad0 or max(gnorm, 1e-300)
            system = self._parameter_system(lik.curvature(F), precond_diag)
            d = -system.solve(grad.unsqueeze(-1), tol=self._inner_tol(gnorm, grad0), warn=False).squeeze(-1)
            dec2 = float(-(grad @ d))
            Jd = pr.j_mv(d.unsqueeze(-1), dense).squeeze(-1)
            f, delta, loss, done, converged = self._damped_step(objective, f, delta, Jd, d, loss, dec2)
            if done:
                break
        self._finish(it, dec2, converged, f)
        self._delta = delta
        self.system = self._parameter_system(self.curvature)

    @property
    def delta(self) -> torch.Tensor:
        """δ* (p,), the MAP weight offset; in function space μ + s² Jᵀ a, one vector-Jacobian product formed on
        first use (the evidence search evaluates many s² and needs it only at the chosen one)."""
        if self._delta is None:
            pr = self.problem
            self._delta = pr.mu + self.s2 * pr.jt_mv(self.a.unsqueeze(-1), self.dense).squeeze(-1)
        return self._delta

    # ------------------------------------------------------------------ predictions
    def _cov_terms(self, B: torch.Tensor) -> list[tuple[float, torch.Tensor, torch.Tensor]]:
        """B S Bᵀ for rows B (k, p), S = H⁻¹ = (JᵀΛJ + I/s²)⁻¹.

        Parameter space: B H⁻¹ Bᵀ. Function space (Woodbury): S = s² I − s⁴ Jᵀ R B⁻¹ Rᵀ J, so
        B S Bᵀ = s² BBᵀ − s⁴ Vᵀ B⁻¹ V with V = Rᵀ J(X) Bᵀ (N, k).
        """
        if self.space == "parameter":
            return [(1.0, B, self.system.solve(B.T.contiguous()))]
        JB = self.problem.j_mv(B.T.contiguous(), self.dense)  # (N, k)
        return [(self.s2, B, B.T), *self._data_terms(JB)]

    def _data_terms(self, Kx: torch.Tensor) -> list[tuple[float, torch.Tensor, torch.Tensor]]:
        """Function space: −s⁴ Vᵀ B⁻¹ V with V = Rᵀ Kx for Kx = J(X) Bᵀ (N, k)."""
        pr = self.problem
        V = self.curvature.root_t(Kx.reshape(pr.n, pr.c, -1)).reshape(pr.n_obs, -1)
        return [(-(self.s2**2), V.T, self.system.solve(V))]


def optimize_prior_var(
    problem: LaplaceProblem,
    prior_var: float,
    space: str,
    solver: str,
    newton_tol: float = 1e-12,
    newton_max_iter: int = 100,
    scale_prior: ScalePrior | None = None,
) -> LaplacePosterior:
    """Type-II maximum likelihood for s²: argmax of the Laplace evidence log q(y | s²) — or, with ``scale_prior``,
    type-II MAP: argmax of log q(y | s²) + log p(s²) (:mod:`~linadapt.inference.scale_prior`; the posterior's
    ``log_evidence`` stays the evidence alone).

    Each evaluation finds the MAP for that s² (Newton, warm-started from the nearest evaluated s²) and
    the log-determinant at it. Decades s² = prior_var · 10^k, k = 0, ±1, then onwards in the improving
    direction while the evidence improves (|k| ≤ 8), bracket the best value; bounded Brent search on
    log s² refines it (to 0.05 in log s²). Returns the posterior at the best s² found. (The evidence of
    this model is unimodal in log s² in every case we have seen; the walk assumes so.)
    """
    best: dict[str, Any] = {}
    last: list[LaplacePosterior] = []
    center, step = math.log(prior_var), math.log(10.0)

    def evaluate(log_s2: float) -> float:
        # Warm start from the evaluated point nearest in log s² (the last one or the best one): Newton then
        # needs few steps, and the MAP it converges to does not depend on the start (the objective is convex).
        seeds = [p for p in (*last, best.get("post")) if p is not None]
        start = min(seeds, key=lambda p: abs(math.log(p.s2) - log_s2)) if seeds else None
        post = LaplacePosterior(problem, math.exp(log_s2), space, solver, newton_tol, newton_max_iter, start=start)
        last[:] = [post]
        if not math.isfinite(post.log_evidence):
            return math.inf
        value = -post.log_evidence
        if scale_prior is not None:  # k̄ after the first posterior: the dense K or J it formed is then held
            value += scale_prior.penalty(log_s2 + math.log(max(problem.mean_kernel_diagonal(), 1e-300)))[0]
        if "post" not in best or value < best["value"]:
            best["post"], best["value"] = post, value
        return value

    # Bracket: one decade either side of prior_var, then walk a decade at a time in the improving direction.
    values = {k: evaluate(center + k * step) for k in (0, -1, 1)}
    direction = -1 if values[-1] < values[0] else 1 if values[1] < values[0] else 0
    k = direction
    while direction and abs(k) < _MAX_DECADES and values[k] < values[k - direction]:
        k += direction
        values[k] = evaluate(center + k * step)
    k_best = min(values, key=values.__getitem__)
    if k_best - 1 in values and k_best + 1 in values:
        lo, hi = center + (k_best - 1) * step, center + (k_best + 1) * step
        minimize_scalar(evaluate, bounds=(lo, hi), method="bounded", options={"xatol": 0.05})
    if "post" not in best:
        raise FloatingPointError("the Laplace evidence is not finite for any prior variance tried")
    if abs(k_best) == _MAX_DECADES:  # still improving at the end of the walk: no interior optimum
        s2 = best["post"].s2
        why = (
            "the adapted weights stay at their trained values (the evidence finds the labels no better explained by "
            "moving them); to adapt anyway, keep the default hyperprior (it bounds s² away from 0) or pass "
            "prior_var with optimize_hyperparameters=False"
            if k_best < 0
            else "the labels are separable by the linearized model; predictions may be overconfident"
        )
        warnings.warn(
            f"the Laplace evidence kept improving to the end of the prior-variance search (s² = {s2:.3g}, "
            f"{_MAX_DECADES} decades from prior_var = {prior_var:.3g}): {why}",
            ConvergenceWarning,
            stacklevel=3,
        )
    return best["post"]
