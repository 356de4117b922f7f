"""Regression with one noise variance per output: ε_(i,a) ~ N(0, σ²_a) for output a of example i.

With residuals r = y − m(X) flattened example-major (N = n·c) and Σ = I_n ⊗ diag(σ²_1, …, σ²_c):

* function space:  A = s² K + Σ,  δ̄ = s² Jᵀ A⁻¹ r,  J* S J*ᵀ = s² K** − s⁴ K*ₙ A⁻¹ Kₙ*;
* parameter space: P = Jᵀ Σ⁻¹ J + I / s² = Σ_a J_aᵀ J_a / σ²_a + I / s² (J_a: the n rows of output a),
  δ̄ = P⁻¹ Jᵀ Σ⁻¹ r,  J* S J*ᵀ = J* P⁻¹ J*ᵀ;
* log p(y) = −½ rᵀ A⁻¹ r − ½ log det A − (N/2) log 2π, where (Woodbury, with β = δ̄ − μ, e = r − J β)
  rᵀ A⁻¹ r = Σ_a ‖e_a‖² / σ²_a + ‖β‖² / s² and log det A = n Σ_a log σ²_a + p log s² + log det P.

Σ is no longer a multiple of the identity, so K (or JᵀJ) and A share no eigenbasis and every evaluation of the
evidence factorises A (N × N) or P (p × p) once. The gradients in (log s², log σ²_a) come from that factor:

* function space, α = A⁻¹ r, d_a = Σ_i (A⁻¹)_(i,a),(i,a):
  ∂(−log p)/∂log σ²_a = −½ σ²_a (‖α_a‖² − d_a),
  ∂(−log p)/∂log s² = −½ (rᵀα − Σ_a σ²_a ‖α_a‖² − N + Σ_a σ²_a d_a)   (s² K = A − Σ);
* parameter space:  ∂(−log p)/∂log σ²_a = ½ (n − ‖e_a‖² / σ²_a − tr(P⁻¹ J_aᵀ J_a) / σ²_a),
  ∂(−log p)/∂log s² = ½ (p − tr(P⁻¹) / s² − ‖β‖² / s²).

These are the dense paths only (the matrix-free ones would need a log-determinant estimate per σ²); the searches
are for the sizes where the Cholesky path is chosen anyway. With one output this is the shared-noise model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.linalg
import torch

from linadapt.inference.evidence import NoisePrior, evidence_bounds, maximize_evidence, minimize_from
from linadapt.inference.regression import RegressionPosterior, RegressionProblem, choose_space

__all__ = [
    "NOISE_CHOICES",
    "PerOutputEvidence",
    "PerOutputPosterior",
    "fit_per_output",
    "maximize_per_output_evidence",
    "noise_diagonal",
    "noise_values",
    "parse_noise_var",
    "refuse_per_output",
    "resolve_noise",
]

NOISE_CHOICES = ("auto", "shared", "per_output")
_LOG_2PI = math.log(2 * math.pi)


def parse_noise_var(noise_var: Any) -> float | np.ndarray | None:
    """The estimator's ``noise_var`` checked: None, a positive float, or a 1-D array of positive floats (from
    a sequence or array of them).

    Raises:
        ValueError: a non-positive, non-finite or non-numeric value, or an array that is not 1-D / is empty.
    """
    if noise_var is None:
        return None
    if isinstance(noise_var, (str, bytes)):
        raise ValueError(f"noise_var must be a positive number or one per output, got {noise_var!r}")
    if isinstance(noise_var, (Sequence, np.ndarray, torch.Tensor)):
        try:
            values = np.asarray(
                noise_var.detach().cpu() if isinstance(noise_var, torch.Tensor) else noise_var, dtype=np.float64
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"noise_var must be a positive number or one per output, got {noise_var!r}") from exc
        if values.ndim == 0:
            values = values.reshape(1)[0]
        elif values.ndim != 1 or values.size == 0:
            raise ValueError(f"noise_var must be a number or a 1-D sequence of c numbers, got shape {values.shape}")
        if not np.all(np.isfinite(values)) or np.any(values <= 0):
            raise ValueError(f"noise_var must hold positive finite numbers, got {noise_var!r}")
        return values if values.ndim == 1 else float(values)
    try:
        value = float(noise_var)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"noise_var must be a positive number or one per output, got {noise_var!r}") from exc
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"noise_var must be a positive finite number, got {noise_var!r}")
    return value


def resolve_noise(noise: str, noise_var: float | np.ndarray | None, c: int) -> tuple[bool, float | np.ndarray | None]:
    """Whether a model with c outputs gets one noise variance per output, and the starting (or fixed) value(s).

    ``noise="auto"``: per output exactly when ``noise_var`` gives c values; ``"per_output"``: per output (the
    start, when ``noise_var`` is one number, is that number for every output); ``"shared"``: one variance — c
    values are accepted only when they are all equal. With c = 1 every choice is the shared model.

    Returns:
        (per_output, start): ``start`` is a float or None for the shared model, a (c,) array or None per output.

    Raises:
        ValueError: an unknown ``noise``, a ``noise_var`` whose length is not c, or ``noise="shared"`` with
            differing values.
    """
    if noise not in NOISE_CHOICES:
        raise ValueError(f"noise must be one of {', '.join(map(repr, NOISE_CHOICES))}; got {noise!r}")
    if isinstance(noise_var, np.ndarray):
        if noise_var.size != c:
            raise ValueError(
                f"noise_var has {noise_var.size} values but the model has {c} output{'s' * (c != 1)}: give one "
                "number, or one per output"
            )
        if noise == "shared" and np.ptp(noise_var) > 0:
            raise ValueError(
                f"noise='shared' takes one noise variance, but noise_var gives {c} different values "
                f"{noise_var.tolist()}: use noise='per_output' (or 'auto') to give each output its own"
            )
        if c == 1 or noise == "shared":
            return False, float(noise_var[0])
        return True, noise_var.copy()
    if noise == "per_output" and c > 1:
        return True, None if noise_var is None else np.full(c, float(noise_var))
    return False, noise_var


def noise_values(noise_var: Any, c: int) -> np.ndarray:
    """c per-output noise variances from one positive number (every output) or c of them, as a (c,) array."""
    parsed = parse_noise_var(noise_var)
    if parsed is None:
        raise ValueError("noise_var must be given: a positive number or one per output")
    if isinstance(parsed, np.ndarray) and parsed.size != c:
        raise ValueError(f"noise_var has {parsed.size} values but the model has {c} outputs")
    return np.broadcast_to(np.asarray(parsed, dtype=np.float64), (c,)).copy()


def refuse_per_output(marginalize: bool, prior_groups: bool, distributed: bool, cg: bool) -> None:
    """A ValueError naming the estimator settings per-output noise does not support (those that are True)."""
    names = ("marginalize=True", "prior_groups", "distributed=True", "solver='cg'")
    bad = [name for name, on in zip(names, (marginalize, prior_groups, distributed, cg)) if on]
    if bad:
        raise ValueError(
            f"per-output noise (noise='per_output', or one noise_var per output) is not supported with "
            f"{', '.join(bad)}: it uses the dense Cholesky solves in one process, with one prior variance and a "
            "point estimate of the hyperparameters; use noise='shared' there"
        )


def default_noise(r: torch.Tensor, c: int) -> np.ndarray:
    """The per-output starting guess without ``noise_var``: 0.1 × each output's residual variance (floored)."""
    R = r.reshape(-1, c)
    var = R.var(0) if R.shape[0] > 1 else (R**2).sum(0)
    floor = 1e-8 * max(float(r.var()) if r.numel() > 1 else 1.0, 1e-12)
    return np.maximum(0.1 * var.detach().cpu().numpy(), max(floor, 1e-12))


def noise_diagonal(noise_var: float | np.ndarray, c: int, device: Any = None) -> torch.Tensor:
    """The noise variance of each of c outputs as a (c,) float64 tensor (a shared float repeated)."""
    values = np.broadcast_to(np.asarray(noise_var, dtype=np.float64), (c,))
    return torch.as_tensor(values.copy(), dtype=torch.float64, device=device)


class PerOutputEvidence:
    """log p(y | s², σ²_1..c) with per-output noise and its gradient in closed form (numpy, one Cholesky of the
    N × N matrix A (function space) or of the p × p matrix P (parameter space) per evaluation).

    Args:
        space: ``"function"`` or ``"parameter"``.
        r: (N,) residuals, example-major. c: outputs per example.
        K: (N, N) kernel J Jᵀ (function space). J: (N, p) Jacobian (parameter space).
    """

    def __init__(
        self, space: str, r: torch.Tensor, c: int, K: torch.Tensor | None = None, J: torch.Tensor | None = None
    ) -> None:
        self.space, self.c = space, c
        self.r = r.detach().cpu().numpy().astype(np.float64)
        self.N = self.r.size
        self.n = self.N // c
        self.R = self.r.reshape(self.n, c)
        if space == "function":
            assert K is not None
            self.K = K.detach().cpu().numpy()
        else:
            assert J is not None
            self.J = J.detach().cpu().numpy().reshape(self.n, c, -1)
            self.p = self.J.shape[2]
            self.grams = np.einsum("iap,iaq->apq", self.J, self.J)  # J_aᵀ J_a, (c, p, p)
            self.gs = np.einsum("iap,ia->ap", self.J, self.R)  # J_aᵀ r_a, (c, p)

    @classmethod
    def from_problem(cls, problem: RegressionProblem, space: str) -> PerOutputEvidence:
        """The evidence of a regression problem's residuals in one space (cached on the problem)."""
        key = f"per-output-evidence-{space}"
        if key not in problem.cache:
            if space == "function":
                problem.cache[key] = cls(space, problem.r, problem.c, K=problem.kernel())
            else:
                problem.cache[key] = cls(space, problem.r, problem.c, J=problem.jacobian_matrix())
        return problem.cache[key]  # type: ignore[return-value]

    def residual_scales(self) -> np.ndarray:
        """v̄_a = ‖r_a‖² / n, each output's mean squared residual, (c,)."""
        return (self.R**2).sum(0) / max(self.n, 1)

    def negative_log_ml_and_grad(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        """−log p(y) and its gradient in x = (log s², log σ²_1, …, log σ²_c); (inf, 0) where A or P is not
        numerically positive definite."""
        s2, sig2 = math.exp(x[0]), np.exp(x[1:])
        try:
            if self.space == "function":
                value, grad = self._function(s2, sig2)
            else:
                value, grad = self._parameter(s2, sig2)
        except np.linalg.LinAlgError:
            return math.inf, np.zeros_like(x)
        return value + 0.5 * self.N * _LOG_2PI, grad

    def _function(self, s2: float, sig2: np.ndarray) -> tuple[float, np.ndarray]:
        A = s2 * self.K
        A[np.diag_indices(self.N)] += np.tile(sig2, self.n)
        L = scipy.linalg.cholesky(A, lower=True, overwrite_a=True, check_finite=False)
        alpha = scipy.linalg.cho_solve((L, True), self.r, check_finite=False)
        L_inv = scipy.linalg.solve_triangular(L, np.eye(self.N), lower=True, overwrite_b=True, check_finite=False)
        d = (L_inv**2).sum(0).reshape(self.n, self.c).sum(0)  # Σ_i (A⁻¹)_(i,a),(i,a)
        a2 = (alpha.reshape(self.n, self.c) ** 2).sum(0)
        quad = float(self.r @ alpha)
        value = 0.5 * quad + float(np.log(np.diag(L)).sum())
        grad = np.empty(self.c + 1)
        grad[0] = -0.5 * (quad - float(sig2 @ a2) - self.N + float(sig2 @ d))
        grad[1:] = -0.5 * sig2 * (a2 - d)
        return value, grad

    def _parameter(self, s2: float, sig2: np.ndarray) -> tuple[float, np.ndarray]:
        inv = 1.0 / sig2
        P = np.tensordot(inv, self.grams, axes=1)
        P[np.diag_indices(self.p)] += 1.0 / s2
        L = scipy.linalg.cholesky(P, lower=True, check_finite=False)
        beta = scipy.linalg.cho_solve((L, True), inv @ self.gs, check_finite=False)
        P_inv = scipy.linalg.cho_solve((L, True), np.eye(self.p), check_finite=False)
        e2 = ((self.R - np.einsum("iap,p->ia", self.J, beta)) ** 2).sum(0)  # ‖r_a − J_a β‖²
        b2 = float(beta @ beta)
        quad = float(inv @ e2) + b2 / s2
        logdet = self.n * float(np.log(sig2).sum()) + self.p * math.log(s2) + 2.0 * float(np.log(np.diag(L)).sum())
        traces = np.einsum("pq,aqp->a", P_inv, self.grams)  # tr(P⁻¹ J_aᵀ J_a)
        grad = np.empty(self.c + 1)
        grad[0] = 0.5 * (self.p - float(np.trace(P_inv)) / s2 - b2 / s2)
        grad[1:] = 0.5 * (self.n - inv * e2 - inv * traces)
        return 0.5 * quad + 0.5 * logdet, grad

    def __call__(self, prior_var: float, noise_vars: np.ndarray) -> float:
        """log p(y | prior_var, noise_vars (c,))."""
        x = np.concatenate([[math.log(prior_var)], np.log(np.asarray(noise_vars, dtype=np.float64))])
        return -self.negative_log_ml_and_grad(x)[0]


def maximize_per_output_evidence(
    problem: RegressionProblem,
    space: str,
    prior_var: float,
    noise_vars: np.ndarray,
    noise_prior: NoisePrior | None = None,
) -> tuple[float, np.ndarray, float]:
    """argmax over (s², σ²_1..c) of log p(y | s², σ²) (+ Σ_a log p(σ²_a) with ``noise_prior``: type-II MAP, each
    output's noise relative to its own residual scale), by L-BFGS-B on the logs with exact gradients.

    Starts: the shared-noise optimum (exact, :func:`~linadapt.inference.evidence.maximize_evidence`), that optimum
    with each output's noise scaled by its share of the residual scale (v̄_a / v̄), and the given values. Bounds:
    s² in [e⁻²⁸, e²⁸], σ²_a in [e⁻²⁸, e¹²] × v̄_a.

    Returns:
        (prior_var, noise_vars (c,), log p(y) at the optimum — the evidence, without the hyperprior).
    """
    evidence = PerOutputEvidence.from_problem(problem, space)
    scales = np.maximum(evidence.residual_scales(), 1e-12)
    iso_s2, iso_sig2, _ = maximize_evidence(
        problem.spectrum(space, "cholesky"), prior_var, float(np.mean(noise_vars)), noise_prior
    )
    mean_scale = float(scales.mean())
    starts = [
        np.concatenate([[math.log(iso_s2)], np.full(problem.c, math.log(iso_sig2))]),
        np.concatenate([[math.log(iso_s2)], np.log(iso_sig2 * scales / mean_scale)]),
        np.concatenate([[math.log(prior_var)], np.log(noise_vars)]),
    ]
    bounds = [evidence_bounds(1.0, 1)[0]] + [evidence_bounds(float(v), 1)[1] for v in scales]
    objective = evidence.negative_log_ml_and_grad
    if noise_prior is not None:  # each σ²_a relative to its own output's mean squared residual v̄_a
        log_scales = np.log(np.maximum(evidence.residual_scales(), 1e-12))
        objective = noise_prior.penalize_each(objective, log_scales)
    x, _ = minimize_from(objective, starts, bounds)
    return float(math.exp(x[0])), np.exp(x[1:]), -evidence.negative_log_ml_and_grad(x)[0]


class PerOutputPosterior(RegressionPosterior):
    """The posterior of the linearized GP with noise variance σ²_a on output a (dense Cholesky, either space):
    the interface of :class:`~linadapt.inference.regression.RegressionPosterior` (``sig2`` is NaN: the noise is
    ``noise_vars``, (c,)).

    Args:
        problem: the training data and its products. prior_var: s². noise_vars: (c,) σ²_a.
        space: ``"function"`` or ``"parameter"``. prior_offset: as for the shared-noise posterior.
    """

    def __init__(
        self,
        problem: RegressionProblem,
        prior_var: float,
        noise_vars: np.ndarray,
        space: str,
        prior_offset: torch.Tensor | None = None,
    ) -> None:
        self.noise_vars = noise_diagonal(noise_vars, problem.c, problem.lin.device)
        super().__init__(problem, prior_var, math.nan, space, "cholesky", prior_offset)

    def _noise_rows(self) -> torch.Tensor:
        """σ² of every training row, (N,), example-major."""
        return self.noise_vars.repeat(self.problem.n)

    def _a_matmul(self, V: torch.Tensor) -> torch.Tensor:
        """A V = s² K V + Σ V (function space)."""
        return self.s2 * self.problem.k_matmul(V) + self._noise_rows().unsqueeze(-1) * V

    def _p_matmul(self, V: torch.Tensor) -> torch.Tensor:
        """P V = Jᵀ Σ⁻¹ J V + V / s² (parameter space)."""
        p = self.problem
        JV = p.jvp(V.T) / self.noise_vars  # (k, n, c)
        return p.vjp(JV).T + V / self.s2

    def _output_grams(self) -> torch.Tensor:
        """(c, p, p): J_aᵀ J_a per output, cached on the problem."""
        if "G_outputs" not in self.cache:
            p = self.problem
            J = p.jacobian_matrix().reshape(p.n, p.c, p.p)
            self.cache["G_outputs"] = torch.einsum("iap,iaq->apq", J, J)
        return self.cache["G_outputs"]  # type: ignore[return-value]

    def _matrix(self) -> torch.Tensor:
        """The dense A = s²K + Σ (function space) or P = Σ_a J_aᵀJ_a / σ²_a + I/s² (parameter space)."""
        if self.space == "function":
            M = self.s2 * self.problem.kernel()
            M.diagonal().add_(self._noise_rows())
        else:
            M = torch.einsum("a,apq->pq", 1.0 / self.noise_vars, self._output_grams())
            M.diagonal().add_(1.0 / self.s2)
        return M

    def _preconditioner(self):
        raise ValueError("per-output noise uses the dense (Cholesky) solves only")

    def _fit(self) -> None:
        """δ̄ = μ + s² Jᵀ A⁻¹ r (function space) or μ + P⁻¹ Jᵀ Σ⁻¹ r (parameter space)."""
        if self.space == "function":
            super()._fit()
            return
        weighted = (self.r.reshape(self.problem.n, self.c) / self.noise_vars).reshape(1, self.problem.n, self.c)
        self.g = self.problem.vjp(weighted)[0]  # Jᵀ Σ⁻¹ r
        self.centred = self.solve(self.g.unsqueeze(-1)).squeeze(-1)
        self.delta = self.centred if self.prior_offset is None else self.centred + self.prior_offset

    def quad_term(self) -> float:
        """rᵀ A⁻¹ r (function space: rᵀα; parameter space: rᵀΣ⁻¹r − (JᵀΣ⁻¹r)ᵀ δ̄')."""
        if self.space == "function":
            return float(self.r @ self.alpha)
        weighted = (self.r.reshape(self.problem.n, self.c) ** 2 / self.noise_vars).sum()
        return float(weighted - self.g @ self.centred)

    @property
    def log_ml(self) -> float:
        """log p(y | s², σ²_1..c) of the training data, exact."""
        if not hasattr(self, "_log_ml"):
            evidence = PerOutputEvidence.from_problem(self.problem, self.space)
            self._log_ml = evidence(self.s2, self.noise_vars.cpu().numpy())
        return self._log_ml


def fit_per_output(
    problem: RegressionProblem,
    space: str,
    prior_var: float,
    noise_vars: np.ndarray | None,
    fixed: tuple[Any, Any] | None,
    optimize: bool,
    noise_prior: NoisePrior | None,
    prior_offset: torch.Tensor | None = None,
) -> tuple[PerOutputPosterior, float, np.ndarray]:
    """The regressor's fit with per-output noise: (posterior, s², σ² (c,)).

    Args:
        problem: the training data and residuals (one process).
        space: ``"auto"`` (the smaller system), ``"function"`` or ``"parameter"``.
        prior_var: the starting (or, without search, the used) s².
        noise_vars: the starting σ²_a, (c,), or None for :func:`default_noise`.
        fixed: (s², σ²) to use as they are (a saved fit), or None.
        optimize: search the hyperparameters (:func:`maximize_per_output_evidence`) rather than keep the start.
        noise_prior: the hyperprior on each σ²_a (None: the evidence alone).
        prior_offset: the prior mean of δ (``prior_mean="zero"``), or None.

    Raises:
        ValueError: the dense matrices of the space do not fit the memory budget.
    """
    n_obs, p, c = problem.n_obs, problem.p, problem.c
    space = choose_space(n_obs, p) if space == "auto" else space
    # the dense matrices of the space, and the evidence's: K, A (then its factor) and A⁻¹'s factor (function
    # space); J, the c Grams J_aᵀJ_a, P (then its factor) and P⁻¹ (parameter space)
    need = 8 * (4 * n_obs * n_obs if space == "function" else n_obs * p + (c + 3) * p * p)
    budget = int(problem.options.memory_budget)
    if need > budget:
        raise ValueError(
            f"per-output noise needs the dense {space}-space matrices ({need / 2**30:,.1f} GiB for N = {n_obs:,} "
            f"outputs, p = {p:,} parameters), above the memory budget ({budget / 2**30:.1f} GiB): use fewer points "
            "or parameters, raise memory_budget, or use noise='shared' (which has matrix-free solvers)"
        )
    if fixed is not None:
        prior, noise = float(fixed[0]), noise_values(fixed[1], c)
    else:
        noise = default_noise(problem.r, c) if noise_vars is None else np.asarray(noise_vars, dtype=np.float64)
        prior = prior_var
        if optimize:
            prior, noise, _ = maximize_per_output_evidence(problem, space, prior_var, noise, noise_prior)
    return PerOutputPosterior(problem, prior, noise, space, prior_offset), prior, noise
