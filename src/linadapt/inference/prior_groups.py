"""Per-group prior variances: one s²_g for each group of weights (e.g. each layer), learned by the evidence.

With groups g of the adapted weights and δ_g = θ_g − θ̂_g ~ N(0, s²_g I), the linearized network is a GP with
kernel Σ_g s²_g J_g(x) J_g(x')ᵀ — a sum of the per-group tangent kernels, each with its own scale. With
residuals r = y − f(X; θ̂) (N = n·c entries, example-major) and A = Σ_g s²_g K_g + σ² I:

    log p(y | s², σ²) = −½ rᵀ A⁻¹ r − ½ log det A − (N/2) log 2π,
    ∂/∂log s²_g = ½ s²_g (αᵀ K_g α − tr(A⁻¹ K_g)),   ∂/∂log σ² = ½ σ² (αᵀ α − tr A⁻¹),   α = A⁻¹ r.

The G kernels have no common eigenbasis, so every evaluation factorises A (O(N³)): this is the dense
function-space path, for the few-shot sizes where per-layer scales matter (N up to a few thousand). The
isotropic model is the special case s²_g = s² for all g, and the search starts from its optimum, so the
learned evidence is never below the isotropic one.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any

import numpy as np
import scipy.linalg
import torch
from torch import nn

from linadapt._blocks import budget_blocks
from linadapt.inference.evidence import NoisePrior, Spectrum, evidence_bounds, maximize_evidence, minimize_from
from linadapt.jacobian.linearization import Linearization

__all__ = ["GroupSpec", "resolve_groups"]

GroupSpec = str | list[Any] | None
_LOG_2PI = math.log(2 * math.pi)
_BLOCK_ENTRIES = 2**24  # bound on the entries of the per-group cross kernels held at once in predictions


def resolve_groups(param_names: list[str], spec: GroupSpec) -> list[tuple[str, list[str]]]:
    """The prior groups of the selected parameters, as (label, names) pairs in parameter order.

    Args:
        param_names: the adapted parameters (``Linearization.param_names``).
        spec: ``"layers"`` — one group per module owning parameters (``"0.weight"`` and ``"0.bias"`` form
            group ``"0"``); ``"tensors"`` — one group per parameter tensor; or a list whose entries are a
            name / glob pattern or a list of them, one group each (labelled by the entry) — parameters
            matched by no entry form a last group ``"rest"``.

    Raises:
        ValueError: an unknown string, an entry matching no selected parameter, a parameter matched by two
            entries, or fewer than one group.
    """
    if isinstance(spec, str):
        if spec == "tensors":
            return [(name, [name]) for name in param_names]
        if spec == "layers":
            groups: dict[str, list[str]] = {}
            for name in param_names:
                groups.setdefault(name.rsplit(".", 1)[0] if "." in name else "(top level)", []).append(name)
            return list(groups.items())
        raise ValueError(f"prior_groups must be 'layers', 'tensors' or a list of name patterns, got {spec!r}")
    if not isinstance(spec, (list, tuple)) or not spec:
        raise ValueError(f"prior_groups must be 'layers', 'tensors' or a non-empty list of patterns, got {spec!r}")
    owner: dict[str, str] = {}
    out: list[tuple[str, list[str]]] = []
    for entry in spec:
        patterns = [entry] if isinstance(entry, str) else list(entry)
        if not patterns or not all(isinstance(p, str) for p in patterns):
            raise ValueError(f"each prior group is a name pattern or a list of them, got {entry!r}")
        label = ",".join(patterns)
        names = [n for n in param_names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        if not names:
            raise ValueError(f"prior group {label!r} matches none of the adapted parameters {param_names}")
        for n in names:
            if n in owner:
                raise ValueError(f"parameter {n!r} is in two prior groups: {owner[n]!r} and {label!r}")
            owner[n] = label
        out.append((label, names))
    rest = [n for n in param_names if n not in owner]
    if rest:
        out.append(("rest", rest))
    labels = [label for label, _ in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"prior group labels must be distinct (the unmatched parameters form 'rest'): {labels}")
    return out


class GroupedKernels:
    """The per-group tangent kernels K_g = J_g J_gᵀ of one network (a :class:`Linearization` per group)."""

    def __init__(
        self,
        model: nn.Module,
        groups: list[tuple[str, list[str]]],
        chunk_size: int | None,
        device: Any,
        memory_budget: int | str | None = None,
        output_fn: Any = None,
    ) -> None:
        self.groups = groups
        self.lins = [Linearization(model, names, chunk_size, device, memory_budget, output_fn) for _, names in groups]

    def gram(self, X1: torch.Tensor, X2: torch.Tensor | None = None) -> torch.Tensor:
        """(G, n1·c, n2·c): J_g(X1) J_g(X2)ᵀ per group, float64."""
        return torch.stack([lin.ntk(X1, X2) for lin in self.lins])

    def blocks(self, X: torch.Tensor) -> torch.Tensor:
        """(G, m, c, c): the per-example c × c blocks J_g(x_i) J_g(x_i)ᵀ."""
        return torch.stack([lin.ntk_blocks(X) for lin in self.lins])


def _scaled(Ks: torch.Tensor, s2: np.ndarray) -> torch.Tensor:
    return torch.einsum("g,g...->...", torch.as_tensor(s2, dtype=Ks.dtype, device=Ks.device), Ks)


class GroupEvidence:
    """log p(y | s²_1..G, σ²) of the grouped GP and its gradient, in closed form (numpy, one Cholesky per call)."""

    def __init__(self, Ks: torch.Tensor, r: torch.Tensor) -> None:
        self.Ks = Ks.detach().cpu().numpy()
        self.r = r.detach().cpu().numpy().astype(np.float64)
        self.G, self.N = self.Ks.shape[0], self.Ks.shape[1]

    def negative_log_ml_and_grad(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        """−log p(y) and its gradient in x = (log s²_1, …, log s²_G, log σ²)."""
        s2, sig2 = np.exp(x[: self.G]), math.exp(x[self.G])
        A = np.tensordot(s2, self.Ks, axes=1)
        A[np.diag_indices(self.N)] += sig2
        try:
            factor = scipy.linalg.cho_factor(A, lower=True, check_finite=False)
        except np.linalg.LinAlgError:
            return math.inf, np.zeros_like(x)
        alpha = scipy.linalg.cho_solve(factor, self.r, check_finite=False)
        A_inv = scipy.linalg.cho_solve(factor, np.eye(self.N), check_finite=False)
        logdet = 2.0 * np.log(np.diag(factor[0])).sum()
        value = 0.5 * float(self.r @ alpha) + 0.5 * logdet + 0.5 * self.N * _LOG_2PI
        grad = np.empty_like(x)
        for g in range(self.G):
            Kg = self.Ks[g]
            grad[g] = -0.5 * s2[g] * (alpha @ Kg @ alpha - np.einsum("ij,ji->", A_inv, Kg))
        grad[self.G] = -0.5 * sig2 * (alpha @ alpha - np.trace(A_inv))
        return value, grad

    def __call__(self, s2: np.ndarray, sig2: float) -> float:
        """log p(y | s², σ²)."""
        return -self.negative_log_ml_and_grad(np.append(np.log(s2), math.log(sig2)))[0]


def maximize_group_evidence(
    Ks: torch.Tensor, r: torch.Tensor, prior_var: float, noise_var: float, noise_prior: NoisePrior | None = None
) -> tuple[np.ndarray, float, float]:
    """argmax over (s²_1..G, σ²) of log p(y | s², σ²) (times ``noise_prior``, when given), by L-BFGS-B in log space
    from the isotropic optimum (found first on the summed kernel, exactly, by
    :func:`~linadapt.inference.evidence.maximize_evidence`) and from the isotropic starting values. Bounds as in the
    isotropic search. Returns (s² (G,), σ², log p(y))."""
    iso_s2, iso_sig2, _ = maximize_evidence(Spectrum.from_kernel(Ks.sum(0), r), prior_var, noise_var, noise_prior)
    evidence = GroupEvidence(Ks, r)
    G = evidence.G
    log_s2_bounds, log_sig2_bounds = evidence_bounds(float(r @ r), r.numel())
    starts = [
        np.append(np.full(G, math.log(iso_s2)), math.log(iso_sig2)),
        np.append(np.full(G, math.log(prior_var)), math.log(noise_var)),
    ]
    objective = evidence.negative_log_ml_and_grad
    if noise_prior is not None:
        objective = noise_prior.penalize(objective, float(r @ r), r.numel())
    x, _ = minimize_from(objective, starts, [log_s2_bounds] * G + [log_sig2_bounds])
    return np.exp(x[:G]), float(math.exp(x[G])), -evidence.negative_log_ml_and_grad(x)[0]


class GroupedPosterior:
    """The posterior of the grouped linearized GP (dense, function space), with the interface of
    :class:`~linadapt.inference.regression.RegressionPosterior` that :class:`~linadapt.LinearizedRegressor` predicts
    through: ``mean_shift``, ``latent_blocks``, ``latent_cov``.

    Args:
        kernels: the per-group kernels. X: (n, ...) prepared training inputs. r: (N,) residuals.
        Ks: (G, N, N) training kernels. s2: (G,) prior variances. sig2: the noise variance.
    """

    space, solver, solve_info = "function", "cholesky", None

    def __init__(
        self,
        kernels: GroupedKernels,
        lin: Linearization,
        X: torch.Tensor,
        r: torch.Tensor,
        Ks: torch.Tensor,
        s2: np.ndarray,
        sig2: float,
    ) -> None:
        self.kernels, self.X, self.s2, self.sig2 = kernels, X, np.asarray(s2, dtype=np.float64), float(sig2)
        self.c = r.numel() // X.shape[0]
        A = _scaled(Ks, self.s2)
        A.diagonal().add_(self.sig2)
        L, status = torch.linalg.cholesky_ex(A)
        if int(status) != 0:  # round-off at a tiny noise variance: a relative jitter, as the solvers do
            A.diagonal().add_(1e-10 * float(A.diagonal().mean()))
            L = torch.linalg.cholesky(A)
        self.L = L
        self.alpha = torch.cholesky_solve(r.unsqueeze(1), self.L)[:, 0]
        self.evidence = GroupEvidence(Ks, r)
        self.log_ml = self.evidence(self.s2, self.sig2)
        # the posterior mean of the weights, δ̄_g = s²_g J_gᵀ α (in lin.param_names order)
        scale = {name: s for (_, names), s in zip(kernels.groups, self.s2) for name in names}
        per_weight = torch.cat(
            [torch.full((k,), scale[name], dtype=torch.float64) for name, k in zip(lin.param_names, lin.numels)]
        ).to(self.alpha.device)
        self.delta = per_weight * lin.vjp(X, self.alpha.reshape(1, X.shape[0], self.c))[0]

    def _cross(self, Xs: torch.Tensor) -> torch.Tensor:
        """(m·c, N): Σ_g s²_g J_g(X*) J_g(X)ᵀ."""
        return _scaled(self.kernels.gram(Xs, self.X), self.s2)

    def _blocks(self, m: int) -> list[slice]:
        """Test-point blocks keeping the G per-group cross kernels (G, block·c, N) under _BLOCK_ENTRIES."""
        return budget_blocks(m, len(self.s2) * self.c * self.alpha.numel(), _BLOCK_ENTRIES)

    def mean_shift(self, Xs: torch.Tensor) -> torch.Tensor:
        """(m, c): K*ᵀ α, the posterior mean of f(X*) minus its prior mean."""
        parts = [(self._cross(Xs[sl]) @ self.alpha).reshape(-1, self.c) for sl in self._blocks(Xs.shape[0])]
        return torch.cat(parts)

    def latent_blocks(self, Xs: torch.Tensor, added_variance: torch.Tensor | None = None) -> torch.Tensor:
        """(m, c, c): per-example blocks of Σ_g s²_g K_g(X*, X*) − K* A⁻¹ K*ᵀ (exact: ``added_variance`` unused)."""
        out = []
        for sl in self._blocks(Xs.shape[0]):
            xb = Xs[sl]
            V = torch.linalg.solve_triangular(self.L, self._cross(xb).T, upper=False).reshape(-1, xb.shape[0], self.c)
            out.append(_scaled(self.kernels.blocks(xb), self.s2) - torch.einsum("nia,nib->iab", V, V))
        return torch.cat(out)

    def latent_cov(self, Xs: torch.Tensor) -> torch.Tensor:
        """(m·c, m·c): the joint posterior covariance of f(X*)."""
        V = torch.linalg.solve_triangular(self.L, self._cross(Xs).T, upper=False)
        return _scaled(self.kernels.gram(Xs), self.s2) - V.T @ V
