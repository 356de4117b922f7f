"""The log marginal likelihood of linearized-GP regression, and its maximisation over (s², σ²).

With residuals r = y − m(X) (N = n·c entries, example-major) and K = J Jᵀ (N × N),

    log p(y | s², σ²) = −½ rᵀ A⁻¹ r − ½ log det A − (N/2) log 2π,     A = s² K + σ² I.

Both terms are spectral functions of one matrix, so one decomposition serves every (s², σ²):

* function space, eigenpairs (λ, u) of K:  rᵀA⁻¹r = Σ (uᵀr)² / (s²λ + σ²),  log det A = Σ log(s²λ + σ²);
* parameter space, eigenpairs (λ, v) of G = JᵀJ (p × p), g = Jᵀ r (Woodbury):
  rᵀA⁻¹r = (‖r‖² − s² Σ (vᵀg)² / (s²λ + σ²)) / σ²,  log det A = Σ log(s²λ + σ²) + (N − p) log σ².

Dense paths use an exact eigendecomposition (each evaluation is then O(N) or O(p)); matrix-free paths
use Lanczos quadrature for the quadratic term and stochastic Lanczos quadrature (Rademacher probes) for
the log-determinant, so (s², σ²) are learned from a fixed number of kernel products.

The search maximises the evidence alone (type-II maximum likelihood) or the evidence times a hyperprior on the
noise (:class:`NoisePrior`, type-II MAP; the estimators' default): with few points the evidence is often largest
where σ² → 0 and the data are interpolated, and the predictive is then far too confident.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from linadapt.inference.solvers import ConvergenceWarning, Matmul, lanczos_quadrature, lanczos_shift_residual

__all__ = ["NoisePrior", "Spectrum", "maximize_evidence"]

_LOG_2PI = math.log(2 * math.pi)
SHIFT_TOL = 1e-3  # Lanczos quadrature trusted at shifts τ = σ²/s² where its implied CG residual is below this
_SHIFT_PENALTY = 1e6  # weight of the squared violation of log τ ≥ log τ_min in the evidence search


def _split_range(nodes: torch.Tensor, weights: torch.Tensor, r_sq: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Parameter-space quadrature (nodes λ of JᵀJ, weights on g = Jᵀr) -> function-space form.

    rᵀA⁻¹r = Σ (w/λ) / (s²λ + σ²) + ρ²/σ² with ρ² = ‖r‖² − Σ w/λ, the part of r outside range(J). The
    cancellation in ρ² happens once here, not inside the optimiser; null-space nodes (λ ≈ 0, where g has no
    component) are dropped.
    """
    keep = nodes > nodes.max().clamp_min(0) * 1e-12 * max(nodes.numel(), 1)
    qn, qw = nodes[keep], weights[keep] / nodes[keep]
    rho_sq = max(r_sq - float(qw.sum()), 0.0)
    return qn, qw, rho_sq


@dataclass
class Spectrum:
    """Spectral summary sufficient to evaluate log p(y | s², σ²) for any hyperparameters.

        rᵀA⁻¹r = Σ quad_weights / (s² quad_nodes + σ²) + rho_sq / σ²,
        log det A = Σ ld_weights · log(s² ld_nodes + σ²) + (n_obs − dim) log σ².

    Attributes:
        kind: ``"function"`` (spectrum of K, dim = N) or ``"parameter"`` (spectrum of JᵀJ, dim = p).
        quad_nodes, quad_weights: quadrature for the quadratic term in r.
        rho_sq: squared norm of the part of r outside the range of J (0 in function space).
        ld_nodes, ld_weights: quadrature for tr log(s² M + σ² I) over the ``dim`` eigenvalues of M.
        dim: the size of the decomposed matrix. n_obs: N = n·c.
        exact: True for an eigendecomposition, False for (stochastic) Lanczos estimates.
        min_shift: for Lanczos estimates, the smallest ratio τ = σ²/s² from which on (every larger τ) all the
            quadratures have converged (:func:`lanczos_shift_residual` ≤ ``SHIFT_TOL``); below it the estimates
            are unreliable (with too few iterations they miss the small eigenvalues, and the evidence can
            seem to grow as σ² → 0), so :func:`maximize_evidence` searches τ ≥ min_shift only. 0: no limit.
    """

    kind: str
    quad_nodes: torch.Tensor
    quad_weights: torch.Tensor
    rho_sq: float
    ld_nodes: torch.Tensor
    ld_weights: torch.Tensor
    dim: int
    n_obs: int
    exact: bool
    min_shift: float = 0.0

    def terms(self, log_s2: torch.Tensor, log_sig2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rᵀ A⁻¹ r, log det A) at s² = exp(log_s2), σ² = exp(log_sig2); differentiable."""
        s2, sig2 = log_s2.exp(), log_sig2.exp()
        quad = (self.quad_weights / (s2 * self.quad_nodes + sig2)).sum() + self.rho_sq / sig2
        logdet = (self.ld_weights * torch.log(s2 * self.ld_nodes + sig2)).sum() + (self.n_obs - self.dim) * log_sig2
        return quad, logdet

    def log_ml(self, log_s2: torch.Tensor, log_sig2: torch.Tensor) -> torch.Tensor:
        """log p(y | s², σ²); differentiable in both log-hyperparameters."""
        quad, logdet = self.terms(log_s2, log_sig2)
        return -0.5 * quad - 0.5 * logdet - 0.5 * self.n_obs * _LOG_2PI

    def negative_log_ml_and_grad(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        """−log p(y | s², σ²) and its gradient in x = (log s², log σ²), in closed form with numpy (the
        optimiser's objective: ~20 µs per call instead of ~0.5 ms through autograd).

        With q_i = s² λ_i + σ²: ∂/∂log s² of Σ w_i / q_i is −Σ w_i s² λ_i / q_i², of Σ v_j log q_j is
        Σ v_j s² μ_j / q_j; ∂/∂log σ² likewise with σ² in place of s² λ (and −ρ²/σ², + (N − dim) outside)."""
        if not hasattr(self, "_np"):
            self._np = tuple(
                t.detach().cpu().numpy() for t in (self.quad_nodes, self.quad_weights, self.ld_nodes, self.ld_weights)
            )
        qn, qw, ln, lw = self._np
        s2, sig2 = math.exp(x[0]), math.exp(x[1])
        qq = s2 * qn + sig2
        ql = s2 * ln + sig2
        quad = float((qw / qq).sum()) + self.rho_sq / sig2
        logdet = float((lw * np.log(ql)).sum()) + (self.n_obs - self.dim) * x[1]
        d_quad = np.array([-(qw * s2 * qn / qq**2).sum(), -(qw * sig2 / qq**2).sum() - self.rho_sq / sig2])
        d_logdet = np.array([(lw * s2 * ln / ql).sum(), (lw * sig2 / ql).sum() + (self.n_obs - self.dim)])
        value = 0.5 * quad + 0.5 * logdet + 0.5 * self.n_obs * _LOG_2PI
        return value, 0.5 * d_quad + 0.5 * d_logdet

    @staticmethod
    def _logs(prior_var: float, noise_var: float) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.tensor(math.log(prior_var), dtype=torch.float64),
            torch.tensor(math.log(noise_var), dtype=torch.float64),
        )

    def logdet(self, prior_var: float, noise_var: float) -> float:
        """log det(s² M + σ² I) at the given variances."""
        return self.terms(*self._logs(prior_var, noise_var))[1].item()

    def __call__(self, prior_var: float, noise_var: float) -> float:
        """log p(y | prior_var, noise_var)."""
        return self.log_ml(*self._logs(prior_var, noise_var)).item()

    # -- constructors ----------------------------------------------------------------------------
    @classmethod
    def from_kernel(cls, K: torch.Tensor, r: torch.Tensor) -> Spectrum:
        """Exact, from the dense N × N kernel K and residuals r (N,)."""
        lam, U = torch.linalg.eigh(K)
        lam = lam.clamp_min(0.0)
        z2 = (U.T @ r) ** 2
        return cls("function", lam, z2, 0.0, lam, torch.ones_like(lam), K.shape[0], K.shape[0], True)

    @classmethod
    def from_jacobian(cls, J: torch.Tensor, r: torch.Tensor) -> Spectrum:
        """Exact, from the dense N × p Jacobian by a thin SVD J = U S Vᵀ (never forms JᵀJ, whose
        condition number is the square of J's): nodes S², weights (Uᵀr)², ρ² = ‖r‖² − ‖Uᵀr‖²."""
        U, S, _ = torch.linalg.svd(J, full_matrices=False)
        lam = S**2
        z2 = (U.T @ r) ** 2
        rho_sq = max(float(r @ r) - float(z2.sum()), 0.0)
        return cls("parameter", lam, z2, rho_sq, lam, torch.ones_like(lam), lam.numel(), J.shape[0], True)

    @classmethod
    def from_lanczos(
        cls,
        kind: str,
        matmul: Matmul,
        quad_vector: torch.Tensor,
        dim: int,
        n_obs: int,
        r_sq: float,
        num_probes: int = 16,
        max_iter: int = 100,
        seed: int = 0,
        rank_bound: int | None = None,
    ) -> Spectrum:
        """Estimated from products with M (K for ``"function"``, JᵀJ for ``"parameter"``).

        One batched Lanczos run: column 0 starts at ``quad_vector`` (r or g = Jᵀr), the others at
        Rademacher probes z (seeded), giving tr f(M) ≈ (1/P) Σ_z zᵀ f(M) z. When dim ≤ max(num_probes, 64)
        the probes are the standard basis vectors, so the trace (and, with enough iterations, the
        evidence) is exact.
        """
        if dim <= max(num_probes, 64):
            # Small enough to take the trace exactly: probe with every standard basis vector.
            probes = torch.eye(dim, dtype=quad_vector.dtype, device=quad_vector.device)
            trace_scale = 1.0  # tr f(M) = Σ_i e_iᵀ f(M) e_i
        else:
            gen = torch.Generator(device="cpu").manual_seed(seed)
            probes = (torch.randint(0, 2, (dim, num_probes), generator=gen) * 2 - 1).to(quad_vector)
            trace_scale = 1.0 / num_probes  # Hutchinson: tr f(M) ≈ mean over z of zᵀ f(M) z
        iters = min(max_iter, dim, rank_bound + 1 if rank_bound is not None else dim)
        zero = float(quad_vector.norm()) == 0.0  # the residual (or its projection) is 0: no quadratic term
        start = probes if zero else torch.cat([quad_vector.unsqueeze(-1), probes], 1)
        nodes, weights, beta, tail = lanczos_quadrature(matmul, start, iters, tails=True)
        min_shift = _min_shift(beta, tail, nodes)
        if zero:
            qn, qw = nodes.new_zeros(1), nodes.new_zeros(1)
            rho_sq = float(r_sq)
        else:
            qn, qw, rho_sq = nodes[0], weights[0], 0.0
            if kind == "parameter":
                qn, qw, rho_sq = _split_range(qn, qw, r_sq)
            nodes, weights = nodes[1:], weights[1:]
        ld_nodes = nodes.reshape(-1)
        ld_weights = (weights * trace_scale).reshape(-1)
        return cls(kind, qn, qw, rho_sq, ld_nodes, ld_weights, dim, n_obs, False, min_shift)


def _min_shift(beta: torch.Tensor, tail: torch.Tensor, nodes: torch.Tensor) -> float:
    """The smallest τ on a grid (quarter decades from 100 λ_max down to 10⁻¹⁶ λ_max, λ_max the largest node)
    such that at it and at every larger τ of the grid all Lanczos quadratures have converged
    (:func:`lanczos_shift_residual` ≤ ``SHIFT_TOL``); 0 when they have at every τ of the grid."""
    top = float(nodes.max()) if nodes.numel() else 0.0
    if top <= 0.0 or not bool((beta > 0).any()):
        return 0.0
    shift = 0.0
    for e in range(8, -65, -1):  # τ = top · 10^(e/4)
        tau = top * 10.0 ** (e / 4)
        if lanczos_shift_residual(beta, tail, nodes, tau) > SHIFT_TOL:
            return shift if shift > 0.0 else tau
        shift = tau
    return 0.0


def single_threaded_blas() -> threadpool_limits:
    """Context: numpy/scipy's BLAS on one thread. Around scipy's optimisers of cheap objectives that call
    torch: their BLAS threads and torch's OpenMP threads otherwise spin against each other — on 2 cores
    this made a 200-point regression fit 17× slower (1.7 s against 0.10 s). torch's own BLAS is not
    affected."""
    return threadpool_limits(limits=1, user_api="blas")


@dataclass(frozen=True)
class NoisePrior:
    """A weakly informative log-normal hyperprior on the noise variance, relative to the residual scale.

        log(σ² / v̄) ~ N(loc, scale²),   v̄ = ‖r‖² / N (the mean squared residual of the prior mean).

    The default (loc −4, scale 2) centres the noise standard deviation at e⁻² ≈ 14 % of the residual scale; a
    noise variance of 10⁻⁴ v̄ lies 2.6 prior standard deviations below the centre (3.4 nats against it), so
    evidence for nearly noiseless data from a few dozen points still wins, that from ten points rarely. It is
    relative to v̄ so that it does not depend on the units of y, as BoTorch's noise prior is set on
    standardised outputs. The prior variance s² keeps a flat (log-uniform) prior on the search's box.
    """

    loc: float = -4.0
    scale: float = 2.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.loc) and math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"a noise prior needs a finite loc and a positive scale, got ({self.loc}, {self.scale})")

    def penalize(
        self, objective: Callable[[np.ndarray], tuple[float, np.ndarray]], r_sq: float, n_obs: int
    ) -> Callable[[np.ndarray], tuple[float, np.ndarray]]:
        """``objective`` (a negative log evidence and its gradient in x, whose last entry is log σ²) plus the
        negative log hyperprior ½ z², z = (log σ² − log v̄ − loc) / scale (constants dropped)."""
        return self.penalize_each(objective, np.array([math.log(max(r_sq / max(n_obs, 1), 1e-12))]))

    def penalize_each(
        self, objective: Callable[[np.ndarray], tuple[float, np.ndarray]], log_scales: np.ndarray
    ) -> Callable[[np.ndarray], tuple[float, np.ndarray]]:
        """``objective`` plus the negative log hyperprior of several noise variances, each relative to its own
        scale: x's last k entries are log σ²_1..k, ``log_scales`` (k,) their log v̄_a; ½ Σ_a z_a²,
        z_a = (log σ²_a − log v̄_a − loc) / scale (constants dropped)."""
        k = len(log_scales)

        def penalized(x: np.ndarray) -> tuple[float, np.ndarray]:
            value, grad = objective(x)
            z = (x[-k:] - log_scales - self.loc) / self.scale
            grad = np.array(grad, dtype=np.float64)
            grad[-k:] += z / self.scale
            return value + 0.5 * float(z @ z), grad

        return penalized


def noise_prior_from(spec: object) -> NoisePrior | None:
    """The estimators' ``hyperprior`` argument as a :class:`NoisePrior`: "default" → NoisePrior(), None → none
    (type-II maximum likelihood), a pair (loc, scale) → NoisePrior(loc, scale)."""
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec != "default":
            raise ValueError(f"hyperprior must be 'default', None or a pair (loc, scale); got {spec!r}")
        return NoisePrior()
    if isinstance(spec, NoisePrior):
        return spec
    try:
        loc, scale = (float(v) for v in spec)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"hyperprior must be 'default', None or a pair (loc, scale); got {spec!r}") from None
    return NoisePrior(loc, scale)


def maximize_evidence(
    spectrum: Spectrum, prior_var: float, noise_var: float, noise_prior: NoisePrior | None = None
) -> tuple[float, float, float]:
    """Type-II maximum likelihood: argmax over (s², σ²) of log p(y | s², σ²); with ``noise_prior``, type-II MAP:
    argmax of log p(y | s², σ²) + log p(σ²) (:class:`NoisePrior`).

    L-BFGS-B on (log s², log σ²) with exact gradients (autograd through the spectral formula), started
    from the given values and a 3 × 3 grid around them (factors e^±4.6 ≈ 100; the objective is cheap, so
    a multi-start guards against poor local optima). Bounds: s² in [e⁻²⁸, e²⁸]; σ² in [e⁻²⁸, e¹²] times the
    mean squared residual.

    Returns:
        (prior_var, noise_var, log marginal likelihood at the optimum (the evidence, without the hyperprior)).
    """
    r_sq = float(spectrum.quad_weights.sum()) + spectrum.rho_sq
    bounds = list(evidence_bounds(r_sq, spectrum.n_obs))
    lower, upper = zip(*bounds)
    x0 = np.clip([math.log(prior_var), math.log(noise_var)], lower, upper)  # the grid is around the clipped start
    starts = [x0 + np.array([ds, dn]) for ds in (0.0, -4.6, 4.6) for dn in (0.0, -4.6, 4.6)]
    objective = spectrum.negative_log_ml_and_grad
    if noise_prior is not None:
        objective = noise_prior.penalize(objective, r_sq, spectrum.n_obs)
    if spectrum.min_shift > 0.0:  # only where the Lanczos estimates are converged: log σ² − log s² ≥ log τ_min
        log_tau = math.log(spectrum.min_shift)
        unlimited = objective

        def objective(x: np.ndarray) -> tuple[float, np.ndarray]:
            value, grad = unlimited(x)
            short = log_tau - (x[1] - x[0])
            if short > 0.0:  # quadratic penalty, exact gradient; the result is projected below
                value += _SHIFT_PENALTY * short**2
                grad = grad + 2.0 * _SHIFT_PENALTY * short * np.array([1.0, -1.0])
            return value, grad

    x, value = minimize_from(objective, starts, bounds)
    if spectrum.min_shift > 0.0:
        if x[1] - x[0] < log_tau + 1e-3:
            warnings.warn(
                f"the matrix-free evidence keeps growing towards σ²/s² below {spectrum.min_shift:.3g}, where its "
                "Lanczos quadrature has not converged: σ²/s² is held at that limit (more Lanczos iterations, or "
                "the dense solver, would resolve smaller noise)",
                ConvergenceWarning,
                stacklevel=2,
            )
        x = np.array([x[0], min(max(x[1], x[0] + log_tau), upper[1])])
    if noise_prior is not None or spectrum.min_shift > 0.0:
        value = spectrum.negative_log_ml_and_grad(x)[0]
    return float(math.exp(x[0])), float(math.exp(x[1])), -value


def evidence_bounds(r_sq: float, n_obs: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """The box of the evidence searches, in (log s², log σ²).

    s² in [e⁻²⁸, e²⁸]; σ² in [e⁻²⁸, e¹²] times the mean squared residual r_sq / n_obs. (Also the support of the
    hyperprior in :mod:`linadapt.inference.hyper_averaging`.)
    """
    log_scale = math.log(max(r_sq / max(n_obs, 1), 1e-12))
    return (-28.0, 28.0), (log_scale - 28.0, log_scale + 12.0)


def minimize_from(
    objective: Callable[[np.ndarray], tuple[float, np.ndarray]],
    starts: list[np.ndarray],
    bounds: list[tuple[float, float]],
) -> tuple[np.ndarray, float]:
    """The best L-BFGS-B minimum of ``objective`` (value and gradient) over the starting points (each clipped
    into ``bounds``), with numpy's BLAS on one thread (see :func:`single_threaded_blas`): (x, value).

    Raises:
        FloatingPointError: the objective is not finite at the end of any start.
    """
    lower, upper = np.array([b[0] for b in bounds]), np.array([b[1] for b in bounds])
    best: tuple[float, np.ndarray] | None = None
    with single_threaded_blas():
        for x0 in starts:
            res = minimize(objective, np.clip(x0, lower, upper), jac=True, method="L-BFGS-B", bounds=bounds)
            if np.isfinite(res.fun) and (best is None or res.fun < best[0]):
                best = (float(res.fun), res.x)
    if best is None:
        raise FloatingPointError("the log marginal likelihood is not finite at any starting point")
    return best[1], best[0]
