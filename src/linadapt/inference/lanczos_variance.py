"""Predictive variances of a matrix-free (CG) function-space regression from one Lanczos basis, certified per point.

The predictive variance at a test point needs kᵀA⁻¹k for its cross-kernel column k = K(X, x*) (A = s²K + σ²I,
N × N). By CG that is one solve per column: predicting the std of m points would cost m times the fit's solve.
Instead, Lanczos on A (started at the training residual, full reorthogonalisation) builds an orthonormal Q (N × r)
with A Q = Q T + β q' e_rᵀ (T tridiagonal, q' ⟂ Q). For every column the Galerkin solution x̃ = Q T⁻¹ Qᵀ k satisfies

    kᵀA⁻¹k − kᵀx̃ = (A x̃ − k)ᵀ A⁻¹ (A x̃ − k)  ≤  ‖A x̃ − k‖² / σ²          (A ⪰ σ² I),
    A x̃ − k = −(I − Q Qᵀ) k + β (e_rᵀ T⁻¹ Qᵀ k) q',

so its residual, and with it a bound on the error, costs no product with A: ‖A x̃ − k‖² = ‖k‖² − ‖Qᵀk‖² + (β η)² −
2 β η q'ᵀk with η = e_rᵀ T⁻¹ Qᵀ k. The variance s² k** − s⁴ kᵀx̃ is then an upper bound of the exact one, at most
s⁴ ‖A x̃ − k‖² / σ² above it. The basis grows until that gap is within ``rtol`` of the variance for every
column, up to a cap set by the memory budget; columns still outside are solved by CG. The basis is built once per
posterior and serves every later prediction. It grows in small steps (a sixteenth of its size, at least 64 vectors),
each check reusing the projections Qᵀk of the last: a check costs N·(new vectors)·k for the new rows plus a Cholesky
of the r × r tridiagonal T and its solve (r³/3 + 2r²k), far less than the products with A it can save (growing by
half, the last step overshot the size the variances needed by up to a third).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["LanczosBasis"]

Matmul = Callable[[torch.Tensor], torch.Tensor]


class LanczosBasis:
    """A Lanczos basis of an SPD matrix A (N × N, given by its product) for many Galerkin solves with a certified
    error (see the module docstring).

    Args:
        matmul: V (N, k) -> A V.
        start: (N,) the first direction (any non-zero vector; normalised here).
        lower: a lower bound of A's smallest eigenvalue (σ² for s²K + σ²I).
        cap: the most basis vectors to hold (N at most).
    """

    def __init__(self, matmul: Matmul, start: torch.Tensor, lower: float, cap: int) -> None:
        n = start.shape[0]
        self.matmul, self.lower = matmul, float(lower)
        self.cap = max(1, min(int(cap), n))
        self.Q = torch.zeros(n, self.cap + 1, dtype=start.dtype, device=start.device)
        norm = float(start.norm())
        if norm == 0.0:
            start = torch.ones_like(start)
            norm = float(start.norm())
        self.Q[:, 0] = start / norm
        self.alpha: list[float] = []
        self.beta: list[float] = []
        self.size = 0  # basis vectors in use
        self.products = 0
        self.exhausted = False  # the Krylov space stopped growing (β = 0): Q spans an invariant subspace

    def extend(self, size: int) -> None:
        """Run Lanczos until the basis has ``size`` vectors (at most ``cap``), or the Krylov space is exhausted.

        The recurrence is written here rather than taken from linear_operator's ``lanczos_tridiag``, which cannot
        resume a run: the basis grows only as far as the variances need.
        """
        size = min(int(size), self.cap)
        Q = self.Q
        while self.size < size and not self.exhausted:
            j = self.size
            w = self.matmul(Q[:, j : j + 1]).squeeze(-1)
            self.products += 1
            if j:
                w = w - self.beta[-1] * Q[:, j - 1]
            a = float(Q[:, j] @ w)
            w = w - a * Q[:, j]
            for _ in range(2):  # full reorthogonalisation, twice (Kahan's rule)
                w = w - Q[:, : j + 1] @ (Q[:, : j + 1].T @ w)
            b = float(w.norm())
            self.alpha.append(a)
            self.beta.append(b)
            self.size = j + 1
            if b <= 1e-13 * max(abs(a), 1e-300):
                self.exhausted = True
                self.beta[-1] = 0.0
            else:
                Q[:, j + 1] = w / b

    def _tridiagonal(self) -> torch.Tensor:
        r = self.size
        T = torch.zeros(r, r, dtype=self.Q.dtype, device=self.Q.device)
        idx = torch.arange(r, device=self.Q.device)
        T[idx, idx] = torch.tensor(self.alpha, dtype=self.Q.dtype, device=self.Q.device)
        if r > 1:
            off = torch.tensor(self.beta[: r - 1], dtype=self.Q.dtype, device=self.Q.device)
            T[idx[:-1], idx[1:]] = off
            T[idx[1:], idx[:-1]] = off
        return T

    def project(self, B: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
        """Qᵀ B (r, k) for the r basis vectors in use; ``known`` is Qᵀ B from an earlier, smaller basis (the basis
        only grows, so its rows stay valid and only the new ones are computed)."""
        r = self.size
        done = 0 if known is None else known.shape[0]
        if done > r:
            raise ValueError(f"the known projection has {done} rows, more than the basis' {r} vectors")
        fresh = self.Q[:, done:r].T @ B
        return fresh if known is None else torch.cat([known, fresh])

    def quadratic(
        self, B: torch.Tensor, C: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per column b of B (N, k): (bᵀx̃ (k,), gap (k,), C, Y) with x̃ = Q Y the Galerkin solution, Y = T⁻¹ Qᵀ B
        (r, k), C = Qᵀ B (r, k; pass the C of an earlier call on the same B to reuse its rows) and gap an upper
        bound of bᵀA⁻¹b − bᵀx̃ ≥ 0, ‖A x̃ − b‖² / lower. No N-sized product with Y: bᵀx̃ = Σ C ⊙ Y."""
        r = self.size
        C = self.project(B, C)
        if r == 0:  # no basis yet: x̃ = 0, the residual is b
            return torch.zeros_like(B[0]), (B * B).sum(0) / self.lower, C, C
        L = torch.linalg.cholesky(self._tridiagonal())
        Y = torch.cholesky_solve(C, L)  # T⁻¹ Qᵀ B
        beta = self.beta[r - 1]
        eta = Y[-1]
        res2 = (B * B).sum(0) - (C * C).sum(0) + (beta * eta) ** 2
        if beta:
            res2 = res2 - 2.0 * beta * eta * (self.Q[:, r] @ B)
        return (C * Y).sum(0), res2.clamp_min(0.0) / self.lower, C, Y

    def galerkin(self, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(X̃, gap) for B (N, k): X̃ = Q T⁻¹ Qᵀ B (N, k) and, per column b, an upper bound of bᵀA⁻¹b − bᵀx̃ ≥ 0,
        ‖A x̃ − b‖² / lower (k,)."""
        _, gap, _, Y = self.quadratic(B)
        return self.Q[:, : self.size] @ Y, gap
