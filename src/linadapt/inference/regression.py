"""Exact Gaussian-process regression with the linearized network, in function or parameter space.

Model: y = m(x) + J(x) δ + ε, δ ~ N(0, s² I_p), ε ~ N(0, σ² I), with m(x) = f(x; θ̂) or 0. Both spaces
describe one posterior over δ — mean δ̄, covariance S — and predictions f* = m(X*) + J* δ̄ with latent
covariance J* S J*ᵀ:

* function space (N = n·c sized solves, A = s² K + σ² I):  δ̄ = s² Jᵀ A⁻¹ r,
  J* S J*ᵀ = s² K** − s⁴ K*ₙ A⁻¹ Kₙ*;
* parameter space (p sized solves, P = JᵀJ / σ² + I / s²):  δ̄ = P⁻¹ Jᵀ r / σ²,  J* S J*ᵀ = J* P⁻¹ J*ᵀ.

Each space has a dense solver (Cholesky of A or P) and a matrix-free one (preconditioned CG on kernel or
Gauss–Newton products), both behind one :class:`~linadapt.inference.solvers.SPDSystem`: a CG solve that misses its
tolerance warns and, when the dense matrix fits in the memory budget, is redone by Cholesky.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from linear_operator.functions import pivoted_cholesky

from linadapt._memory import default_memory_budget, resolve_memory_budget
from linadapt.inference.evidence import NoisePrior, Spectrum, maximize_evidence
from linadapt.inference.lanczos_variance import LanczosBasis
from linadapt.inference.posterior import LinearizedPosterior, TrainingData, _diagonal_blocks
from linadapt.inference.solvers import (
    ConvergenceWarning,
    SolveInfo,
    SPDSystem,
    diagonal_preconditioner,
    low_rank_plus_diagonal_preconditioner,
)
from linadapt.jacobian.linearization import Linearization

__all__ = [
    "RegressionPosterior",
    "RegressionProblem",
    "SolverOptions",
    "choose_solver",
    "choose_space",
    "choose_space_and_solver",
    "dense_kernel_flops",
    "exact_evidence_fits",
    "fit_shared_noise",
    "shared_noise_guess",
]

_DENSE_FLOP_BUDGET = 2e11  # above this, forming and factorising a dense matrix is slower than CG in practice
_DENSE_MAX_DIM = 6000
_CG_WORK = 450.0  # matrix-free fit ≈ this × N·p operations (function space; see choose_solver)


@dataclass
class SolverOptions:
    """Tuning knobs of the matrix-free path."""

    cg_tol: float = 1e-10
    cg_max_iter: int | None = None
    preconditioner_rank: int = 20
    lanczos_iter: int = 100
    lanczos_probes: int = 16
    seed: int = 0
    memory_budget: int = field(default_factory=default_memory_budget)
    variance_basis: bool = True  # matrix-free predictive variances from a certified Lanczos basis
    variance_basis_min: int = 16  # ... when a chunk has at least this many output columns
    variance_rtol: float = 1e-2  # each such variance (+ the noise, when returned with it) within this relative gap
    factorize: bool = True  # cache J(X_train) as per-layer factors for the solvers' products
    graph_products: bool = True  # else keep the network's autograd graph of X_train for them


def choose_space(n_obs: int, p: int) -> str:
    """``"function"`` when N = n·c ≤ p (smaller solves), else ``"parameter"``."""
    return "function" if n_obs <= p else "parameter"


def dense_bytes(space: str, n_obs: int, p: int) -> int:
    """Bytes the dense path of this space holds at its peak, float64: function space K, A = s²K + σ²I and its
    Cholesky factor (or K, its eigenvectors and the eigensolver's workspace for the exact evidence), 3 N²;
    parameter space the explicit J and JᵀJ, N p + p²."""
    return (3 * n_obs * n_obs if space == "function" else n_obs * p + p * p) * 8


def dense_fits(space: str, n_obs: int, p: int, memory_budget: int | None = None) -> bool:
    """Whether the dense matrix of this space (and, for parameter space, the explicit J) fits the budget."""
    return dense_bytes(space, n_obs, p) <= resolve_memory_budget(memory_budget)


def choose_solver(
    space: str, n_obs: int, p: int, memory_budget: int | None = None, kernel_flops: float | None = None
) -> str:
    """``"cholesky"`` when the dense matrix fits in memory and is cheap to form and factorise, else ``"cg"``.

    Forming the dense matrix costs N² p (function space, contracting Jacobians) or N p² (parameter space);
    ``kernel_flops``: the cost of the function-space kernel when per-layer rules form it for less (see
    :func:`dense_kernel_flops`); the factorisation's N³/3 is added to it. Dense is taken when that is
    small (≤ 2·10¹¹ operations and dimension ≤ 6,000) or, in function space, when it is below the cost of
    the matrix-free path, ≈ ``_CG_WORK`` · N · p (the products of CG and of the Lanczos log-determinants
    with hyperparameter learning; calibrated on the auto-choice grid at N = 10,000, where CG won at
    p = 10k, tied at 100k and lost at 1M — docs/performance.md)."""
    if not dense_fits(space, n_obs, p, memory_budget):
        return "cg"
    dim = n_obs if space == "function" else p
    flops = n_obs * n_obs * p if space == "function" else n_obs * p * p
    if space == "function" and kernel_flops is not None:
        flops = min(flops, kernel_flops + n_obs**3 / 3)
    if dim <= _DENSE_MAX_DIM and flops <= _DENSE_FLOP_BUDGET:
        return "cholesky"
    if space == "function" and flops <= _CG_WORK * n_obs * p:
        return "cholesky"
    return "cg"


def choose_space_and_solver(
    lin: Linearization,
    X: torch.Tensor,
    n_obs: int,
    space: str,
    solver: str,
    memory_budget: int | None = None,
    sharded: bool = False,
) -> tuple[str, str]:
    """The estimators' ``space`` / ``solver`` settings resolved for N = n_obs outputs on inputs X.

    ``"auto"`` space: :func:`choose_space`; ``"auto"`` solver: :func:`choose_solver`, costing the dense
    function-space kernel by the per-layer rules when they apply (not for a ``sharded`` fit, whose X is one
    shard).

    Raises:
        ValueError: ``solver="cholesky"`` given where the dense matrices exceed ``memory_budget``.
    """
    p = lin.num_params
    memory_budget = resolve_memory_budget(memory_budget)
    space = choose_space(n_obs, p) if space == "auto" else space
    if solver == "auto":
        flops = dense_kernel_flops(lin, X) if space == "function" and not sharded else None
        solver = choose_solver(space, n_obs, p, memory_budget, flops)
    if solver == "cholesky" and not dense_fits(space, n_obs, p, memory_budget):
        raise ValueError(
            f"solver='cholesky' in {space} space needs dense matrices of "
            f"{dense_bytes(space, n_obs, p) / 2**30:,.1f} GiB (N = {n_obs:,} outputs, p = {p:,} parameters), "
            f"above the memory budget of {memory_budget / 2**30:.1f} GiB; use solver='cg' or 'auto'"
        )
    return space, solver


def dense_kernel_flops(lin: Linearization, X: torch.Tensor) -> float | None:
    """Multiply-adds of the dense function-space kernel of X (n examples) by per-layer rules, n² × the cost
    per pair of examples (:meth:`~linadapt.jacobian.structured.StructuredNTK.pair_flops`); None without rules."""
    engine = lin.structured(X) if X.shape[0] else None
    if engine is None:
        return None
    return float(X.shape[0]) ** 2 * engine.pair_flops(X)


class RegressionProblem(TrainingData):
    """Training data of a regression with the linearized network, and the products and dense pieces on it.

    Args:
        lin: the linearization.
        X: (n, ...) training inputs (prepared by ``lin``).
        r: residuals y − m(X), flattened example-major, shape (N,) with N = n·c, float64.
        options: solver settings.

    Dense pieces (K, J, JᵀJ, their spectra, preconditioner factors) are computed on first use and cached,
    so refits at new hyperparameters reuse them.
    """

    def __init__(
        self, lin: Linearization, X: torch.Tensor, r: torch.Tensor, options: SolverOptions, sharding: Any = None
    ) -> None:
        super().__init__(lin, X, options, lin.output_dim(X), sharding)
        self.r = r

    def gram(self) -> torch.Tensor:
        """Dense G = JᵀJ (p × p)."""
        if "G" not in self.cache:
            J = self.jacobian_matrix()
            self.cache["G"] = J.T @ J
        return self.cache["G"]  # type: ignore[return-value]

    def g(self) -> torch.Tensor:
        """g = Jᵀ r (p,)."""
        if "g" not in self.cache:
            self.cache["g"] = self.vjp(self.r.reshape(1, self.n, self.c))[0]
        return self.cache["g"]  # type: ignore[return-value]

    def g_matmul(self, V: torch.Tensor) -> torch.Tensor:
        """G V = Jᵀ (J V) for V (p, k), matrix-free."""
        return self.vjp(self.jvp(V.T)).T

    def spectrum(self, space: str, solver: str) -> Spectrum:
        """Exact (``solver="cholesky"``) or Lanczos (``"cg"``) spectral summary for the evidence. With at most
        ``options.lanczos_iter`` (100) outputs N the exact one either way: the N × N kernel then costs fewer
        products than the probes' Lanczos runs, and the stochastic log-determinant's variance is avoided."""
        key = f"spectrum-{space}-{solver}"
        if key not in self.cache:
            o, r = self.options, self.r
            if solver == "cg" and self.n_obs <= o.lanczos_iter:
                spec = Spectrum.from_kernel(self.kernel(), r)
            elif solver == "cholesky":
                if space == "function":
                    spec = Spectrum.from_kernel(self.kernel(), r)
                else:
                    spec = Spectrum.from_jacobian(self.jacobian_matrix(), r)
            elif space == "function":
                spec = Spectrum.from_lanczos(
                    "function",
                    self.k_matmul,
                    r,
                    self.n_obs,
                    self.n_obs,
                    float(r @ r),
                    o.lanczos_probes,
                    o.lanczos_iter,
                    o.seed,
                    rank_bound=self.p,
                )
            else:
                spec = Spectrum.from_lanczos(
                    "parameter",
                    self.g_matmul,
                    self.g(),
                    self.p,
                    self.n_obs,
                    float(r @ r),
                    o.lanczos_probes,
                    o.lanczos_iter,
                    o.seed,
                    rank_bound=self.n_obs,
                )
            self.cache[key] = spec
        return self.cache[key]  # type: ignore[return-value]


class RegressionPosterior(LinearizedPosterior):
    """The posterior of the linearized GP for fixed (s², σ²).

    Args:
        problem: the training data and its products.
        prior_var: s². noise_var: σ².
        space: ``"function"`` or ``"parameter"``. solver: ``"cholesky"`` or ``"cg"``.
    """

    def __init__(
        self,
        problem: RegressionProblem,
        prior_var: float,
        noise_var: float,
        space: str,
        solver: str,
        prior_offset: torch.Tensor | None = None,
    ) -> None:
        self.problem = problem
        self.prior_offset = prior_offset
        self.lin, self.X, self.r, self.c, self.n_obs = problem.lin, problem.X, problem.r, problem.c, problem.n_obs
        self.s2, self.sig2 = float(prior_var), float(noise_var)
        self.space = space
        self.options = problem.options
        self.memory_budget = problem.options.memory_budget
        self.cache = problem.cache
        o = self.options
        dense_ok = solver == "cholesky" or dense_fits(space, self.n_obs, self.lin.num_params, o.memory_budget)
        what = "function-space system s²K + σ²I" if space == "function" else "parameter-space system JᵀJ/σ² + I/s²"
        self.system = SPDSystem(
            self.n_obs if space == "function" else self.lin.num_params,
            matrix=self._matrix if dense_ok else None,
            matmul=None if solver == "cholesky" else (self._a_matmul if space == "function" else self._p_matmul),
            preconditioner=self._preconditioner,
            what=what,
            refine=problem.exact_products,
            tol=o.cg_tol,
            max_iter=o.cg_max_iter,
            num_probes=o.lanczos_probes,
            lanczos_iter=o.lanczos_iter,
            seed=o.seed,
            device=self.lin.device,
        )
        self._fit()

    @property
    def solver(self) -> str:
        """``"cholesky"`` or ``"cg"`` — ``"cholesky"`` after a CG miss fell back to the dense solve."""
        return self.system.method

    @property
    def solve_info(self) -> SolveInfo | None:
        """The last CG report, or None when only Cholesky was used."""
        return self.system.info

    # ------------------------------------------------------------------ operators
    def _a_matmul(self, V: torch.Tensor) -> torch.Tensor:
        """A V = s² K V + σ² V (function space)."""
        return self.s2 * self.problem.k_matmul(V) + self.sig2 * V

    def _p_matmul(self, V: torch.Tensor) -> torch.Tensor:
        """P V = G V / σ² + V / s² (parameter space)."""
        return self.problem.g_matmul(V) / self.sig2 + V / self.s2

    def _matrix(self) -> torch.Tensor:
        """The dense A = s²K + σ²I (function space) or P = JᵀJ/σ² + I/s² (parameter space)."""
        if self.space == "function":
            M = self.s2 * self.problem.kernel()
            M.diagonal().add_(self.sig2)
        else:
            M = self.problem.gram() / self.sig2
            M.diagonal().add_(1.0 / self.s2)
        return M

    def _preconditioner(self):
        """Low-rank (pivoted Cholesky of K) + diagonal for A; Jacobi for P. Factors are cached on the problem."""
        if self.space == "function":
            if "L" not in self.cache:
                rank = min(self.options.preconditioner_rank, self.n_obs)
                self.cache["L"] = pivoted_cholesky(self.problem.operator, rank).detach()
            return low_rank_plus_diagonal_preconditioner(self.cache["L"], self.s2, self.sig2)
        if "G_diag" not in self.cache:
            self.cache["G_diag"] = self.problem.chunk_sum(lambda _rows, jac: (jac**2).sum(dim=(0, 1)))
        return diagonal_preconditioner(self.cache["G_diag"] / self.sig2 + 1.0 / self.s2)

    # ------------------------------------------------------------------ solves
    def solve(self, B: torch.Tensor) -> torch.Tensor:
        """A⁻¹ B (function space, B: N × k) or P⁻¹ B (parameter space, B: p × k); a CG miss warns and, when the
        dense matrix fits the memory budget, falls back to Cholesky
        (see :class:`~linadapt.inference.solvers.SPDSystem`)."""
        return self.system.solve(B)

    def _fit(self) -> None:
        """δ̄ = μ + (posterior mean of δ − μ), μ the prior offset (0 unless the prior is centred elsewhere)."""
        r = self.r.unsqueeze(-1)
        if self.space == "function":
            alpha = self.solve(r).squeeze(-1)
            self.alpha = alpha
            self.centred = self.s2 * self.problem.vjp(alpha.reshape(1, -1, self.c))[0]
        else:
            self.g = self.problem.g()
            self.centred = self.solve(self.g.unsqueeze(-1)).squeeze(-1) / self.sig2
        self.delta = self.centred if self.prior_offset is None else self.centred + self.prior_offset

    def quad_term(self) -> float:
        """rᵀ A⁻¹ r from the fitted solve (function space: rᵀα; parameter space by Woodbury)."""
        if self.space == "function":
            return float(self.r @ self.alpha)
        # δ̄' = (G + σ²/s² I)⁻¹ g (the centred mean), so rᵀA⁻¹r = (‖r‖² − gᵀδ̄') / σ².
        return float((self.r @ self.r - self.g @ self.centred) / self.sig2)

    # ------------------------------------------------------------------ predictions
    def _cov_terms(self, B: torch.Tensor) -> list[tuple[float, torch.Tensor, torch.Tensor]]:
        """B S Bᵀ: parameter space B P⁻¹ Bᵀ; function space s² BBᵀ − s⁴ (J(X)Bᵀ)ᵀ A⁻¹ (J(X)Bᵀ)."""
        if self.space == "parameter":
            return [(1.0, B, self.solve(B.T.contiguous()))]
        KnS = self.problem.jvp(B).reshape(B.shape[0], -1).T  # (N, k) = J(X) Bᵀ
        return [(self.s2, B, B.T), *self._data_terms(KnS)]

    def _data_terms(self, Kx: torch.Tensor) -> list[tuple[float, torch.Tensor, torch.Tensor]]:
        """Function space: −s⁴ Kxᵀ A⁻¹ Kx for Kx = J(X) Bᵀ (N, k)."""
        return [(-(self.s2**2), Kx.T, self.solve(Kx))]

    def _blocks_from_kernels(
        self, Kx: torch.Tensor, Kss: torch.Tensor, added_variance: torch.Tensor | None = None
    ) -> torch.Tensor:
        """As the base class; a matrix-free (CG) posterior with many columns solves them with its Lanczos basis,
        each variance certified within ``variance_rtol`` (:mod:`~linadapt.inference.lanczos_variance`) — of the
        variance the caller returns: the latent one plus ``added_variance`` (c,) when given (the noise, for the
        predictive of y: ``predict(return_std=True)`` by default), else the latent one alone."""
        if not self._by_basis(Kx.shape[1]):
            return super()._blocks_from_kernels(Kx, Kss)
        prior = self.s2 * Kss.diagonal(dim1=1, dim2=2).reshape(-1)  # (b·c,) prior variances
        rtol = self.options.variance_rtol
        floor = 0.0 if added_variance is None else added_variance.to(prior).repeat(Kss.shape[0])  # (b·c,)
        basis = self.lanczos_basis
        C = None
        while True:
            quad, gap, C, Y = basis.quadratic(Kx, C)
            var = prior - self.s2**2 * quad  # ≥ the exact variance, by at most s⁴ · gap
            bad = self.s2**2 * gap > rtol * (var + floor).clamp_min(1e-300)
            if not bool(bad.any()) or basis.size >= basis.cap or basis.exhausted:
                break
            basis.extend(basis.size + max(basis.size // 16, 64))
        Xt = basis.Q[:, : basis.size] @ Y
        if bool(bad.any()):  # past the basis' cap: those columns by CG
            Xt[:, bad] = self.solve(Kx[:, bad])
        blocks = self.s2 * Kss + _diagonal_blocks(
            [(-(self.s2**2), Kx.T, Xt)], Kss.shape[0], self.c, Kx.dtype, Kx.device
        )
        return 0.5 * (blocks + blocks.transpose(1, 2))

    def _by_basis(self, columns: int) -> bool:
        """Whether predictive blocks use the Lanczos basis: function space, matrix-free (CG), at least
        ``options.variance_basis_min`` columns, and the basis enabled."""
        return (
            self.space == "function"
            and self.system.method == "cg"
            and self.options.variance_basis
            and columns >= self.options.variance_basis_min
        )

    @property
    def lanczos_basis(self) -> LanczosBasis:
        """The Lanczos basis of A = s²K + σ²I for predictive variances, built on first use (128 vectors, then
        grown by a sixteenth, at least 64 vectors at a time, as the variances need), at most a quarter of the
        memory budget."""
        if getattr(self, "_basis", None) is None:
            cap = int(self.memory_budget) // 4 // (8 * self.n_obs) - 1
            self._basis = LanczosBasis(self._a_matmul, self.r.detach().clone(), self.sig2, max(cap, 1))
            self._basis.extend(128)
        return self._basis


def shared_noise_guess(r: torch.Tensor, Y: torch.Tensor) -> float:
    """The starting σ² of the evidence search without ``noise_var``: a tenth of the residual variance of r (all
    N outputs), floored at 1e-8 × the targets' variance (Y) and at 1e-12."""
    n_obs = r.numel()
    resid_var = float(r.var()) if n_obs > 1 else float(r @ r)
    return max(0.1 * resid_var, 1e-8 * max(float(Y.var()) if n_obs > 1 else 1.0, 1e-12), 1e-12)


def exact_evidence_fits(space: str, n_obs: int, p: int, memory_budget: int) -> bool:
    """Whether the exact evidence of this space fits ``memory_budget``: function space K, its eigenvectors and
    eigh's workspace (3 N² float64); parameter space the dense J and its SVD (:func:`dense_fits`)."""
    if space == "function":
        return 3 * 8 * n_obs * n_obs <= memory_budget
    return dense_fits(space, n_obs, p, memory_budget)


def fit_shared_noise(
    problem: RegressionProblem,
    space: str,
    solver: str,
    start: tuple[float, float],
    optimize: bool,
    noise_prior: NoisePrior | None,
    prior_offset: torch.Tensor | None,
) -> tuple[RegressionPosterior, float, float]:
    """The regressor's posterior with one noise variance: at ``start`` = (s², σ²), or (``optimize``) at the
    hyperparameters that maximise the evidence (× ``noise_prior``) from there. Returns (posterior, s², σ²).

    A matrix-free search (``solver="cg"``, Lanczos estimates of the evidence) is trusted only where its quadrature
    has converged (:attr:`~linadapt.inference.evidence.Spectrum.min_shift`). When it stopped on that limit, or CG
    then missed at the chosen hyperparameters (the dense solve took over), the hyperparameters are searched again
    with the exact evidence — only when its dense matrices fit the memory budget — with a ``ConvergenceWarning``.
    """
    prior, noise = start
    if not optimize:
        return RegressionPosterior(problem, prior, noise, space, solver, prior_offset=prior_offset), prior, noise
    spectrum = problem.spectrum(space, solver)
    prior, noise, _ = maximize_evidence(spectrum, *start, noise_prior)
    exact_fits = (
        solver == "cg"
        and not spectrum.exact
        and exact_evidence_fits(space, problem.n_obs, problem.p, int(problem.options.memory_budget))
    )
    limited = exact_fits and spectrum.min_shift > 0.0 and noise / prior <= spectrum.min_shift * 1.01
    posterior = (
        None if limited else RegressionPosterior(problem, prior, noise, space, solver, prior_offset=prior_offset)
    )
    missed = posterior is not None and exact_fits and posterior.solver == "cholesky"
    if posterior is not None and not missed:
        return posterior, prior, noise
    # nearly noiseless targets drive σ² towards 0, where the Lanczos estimates are unreliable
    what = "CG does not converge" if missed else "the Lanczos quadrature has not converged"
    warnings.warn(
        f"the matrix-free evidence search chose σ² = {noise:.3g}, s² = {prior:.3g}, where {what}: its estimates "
        "are unreliable there; searching again with the exact (dense) evidence",
        ConvergenceWarning,
        stacklevel=4,
    )
    prior, noise, _ = maximize_evidence(problem.spectrum(space, "cholesky"), *start, noise_prior)
    return RegressionPosterior(problem, prior, noise, space, "cholesky", prior_offset=prior_offset), prior, noise
