"""Choosing what to label next: greedy joint selection of k pool points under a linearized posterior.

The latent outputs at a pool X_pool (m points, c outputs each) are jointly Gaussian with covariance Σ (m·c × m·c)
under the posterior (regression: exact; classification: Laplace). Labelling a point j adds a Gaussian-curvature
term to the posterior precision of the weights, Jⱼᵀ Λⱼ Jⱼ (regression: Λⱼ = diag(1/σ²_a), the noise of the label to
come; classification: the likelihood's curvature at the predicted mean logits of j, e.g. diag(π) − ππᵀ), and in
function space the pool covariance becomes the Schur complement

    Σ' = Σ − Σ_{·j} Rⱼ (I + Rⱼᵀ Σⱼⱼ Rⱼ)⁻¹ Rⱼᵀ Σ_{j·},      Rⱼ Rⱼᵀ = Λⱼ,

which needs no label (a singular Λ, as softmax's, is fine: I + RᵀΣR ⪰ I). After t picks P the same holds with
R_P = blockdiag(R_j) and Σ_{·P}: the conditioning is a rank-(t·c) update through the picks' cross covariances.
:func:`greedy_select` picks one point at a time, each the best under the covariance conditioned on the earlier
picks, so a near-duplicate of a picked point loses what it shared with it.

Two paths give the same picks: ``dense`` forms Σ once (when 3 (m·c)² floats fit half the memory budget) and
applies the rank-c updates in place; the chunked path never forms it — it keeps the unconditioned per-point
c × c blocks and, for every pick, passes over the pool in chunks computing only the chunk's cross covariance
with the picks (the cross kernel with the training points, as a predictive-variance pass does), so memory is
O(m·c² + chunk) and the cost about k predictive-variance passes over the pool.

Scores: :func:`variance_score` (the latent variance summed over outputs) and :func:`bald_score` (the expected
information gain about the weights, H[E_f p(y | f)] − E_f H[p(y | f)], by Monte Carlo over the logits with
fixed common random numbers).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from linadapt._inputs import input_tensors
from linadapt._memory import MemoryBudgetError, format_bytes
from linadapt.jacobian.linearization import ALGEBRA_DTYPE

__all__ = [
    "PoolCovariance",
    "Selection",
    "bald_score",
    "duplicate_groups",
    "greedy_select",
    "noise_roots",
    "variance_score",
]

Score = Callable[[torch.Tensor], torch.Tensor]  # conditioned blocks (m, c, c) -> scores (m,)


# ---------------------------------------------------------------------------------------------- scores
def variance_score(blocks: torch.Tensor) -> torch.Tensor:
    """The latent variance summed over outputs, tr Σᵢᵢ, for per-point blocks (m, c, c): (m,)."""
    return torch.diagonal(blocks, dim1=-2, dim2=-1).sum(-1)


def _block_roots(blocks: torch.Tensor) -> torch.Tensor:
    """L with L Lᵀ = B for PSD blocks (m, c, c), by eigendecomposition (negative round-off clipped)."""
    sym = 0.5 * (blocks + blocks.transpose(-1, -2))
    vals, vecs = torch.linalg.eigh(sym)
    return vecs * vals.clamp_min(0.0).sqrt().unsqueeze(-2)


def _entropy_categorical(logp: torch.Tensor) -> torch.Tensor:
    return -(logp.exp() * logp).sum(-1)


def _entropy_binary(p: torch.Tensor) -> torch.Tensor:
    q = p.clamp(1e-300, 1.0)
    r = (1.0 - p).clamp(1e-300, 1.0)
    return -(p * q.log() + (1.0 - p) * r.log())


def bald_score(
    mean: torch.Tensor,
    blocks: torch.Tensor,
    categorical: bool,
    n_samples: int = 256,
    seed: int = 0,
    chunk: int = 2048,
) -> torch.Tensor:
    """BALD, the mutual information between a point's label and the weights, I(y; θ) = H[E_f p(y | f)] −
    E_f H[p(y | f)], with f ~ N(mean, blocks) per point: (m,).

    Monte Carlo with ``n_samples`` draws f = μᵢ + Lᵢ ε of the same ε for every point (standard normal, seeded by
    ``seed``): the scores are deterministic and differences between points carry no independent sampling noise.
    ``categorical``: softmax over the c logits; otherwise each output is a separate binary outcome with
    P(y_k = 1) = σ(f_k) (bernoulli, multilabel) and the score is the sum of the outputs' information gains (the
    dependence of the outcomes through the weights is ignored)."""
    m, c = mean.shape
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    eps = torch.randn(n_samples, c, generator=gen, dtype=ALGEBRA_DTYPE).to(mean.device)
    out = torch.empty(m, dtype=ALGEBRA_DTYPE, device=mean.device)
    for start in range(0, m, chunk):
        sl = slice(start, min(m, start + chunk))
        L = _block_roots(blocks[sl].to(ALGEBRA_DTYPE))
        F = mean[sl].to(ALGEBRA_DTYPE).unsqueeze(1) + torch.einsum("sc,idc->isd", eps, L)  # (b, S, c)
        if categorical:
            logp = torch.log_softmax(F, dim=-1)
            pbar = logp.exp().mean(1)
            marginal = -(pbar * pbar.clamp_min(1e-300).log()).sum(-1)
            out[sl] = marginal - _entropy_categorical(logp).mean(1)
        else:
            p = torch.sigmoid(F)
            out[sl] = (_entropy_binary(p.mean(1)) - _entropy_binary(p).mean(1)).sum(-1)
    return out.clamp_min(0.0)


def noise_roots(noise_var: Any, m: int, c: int, device: Any = None) -> torch.Tensor:
    """Roots Rⱼ = diag(1/σ_a) of the Gaussian curvature Λ = diag(1/σ²_a) of a noisy label, for m points: (m, c, c)
    (``noise_var`` one value or c values)."""
    sig2 = torch.as_tensor(np.asarray(noise_var, dtype=np.float64).reshape(-1), device=device)
    if sig2.numel() not in (1, c) or bool((sig2 <= 0).any()):
        raise ValueError(f"noise_var must be one positive value or {c}, got {noise_var!r}")
    diag = (1.0 / sig2.sqrt()).expand(c)
    return torch.diag_embed(diag).expand(m, c, c)


def duplicate_groups(Xs: Any) -> torch.Tensor:
    """An id per pool point, equal for exactly equal inputs (all keyword inputs equal, for a mapping): (m,) int64."""
    m = Xs.shape[0]
    flat = torch.cat([t.reshape(m, -1).to(torch.float64) for t in input_tensors(Xs)], 1)
    if flat.shape[1] == 0:
        return torch.zeros(Xs.shape[0], dtype=torch.int64)
    _, inverse = torch.unique(flat.cpu(), dim=0, return_inverse=True)
    return inverse


# ------------------------------------------------------------------------------------ pool covariance
class PoolCovariance:
    """Posterior covariances of the latent outputs at a pool, by the routes the posterior offers.

    Args:
        post: a fitted posterior (``latent_blocks`` and ``latent_cov``; the kernel or Jacobian-row terms of
            :class:`~linadapt.inference.posterior.LinearizedPosterior` where it has them).
        Xs: (m, ...) prepared pool inputs. c: outputs per point. memory_budget: bytes.
    """

    def __init__(self, post: Any, Xs: torch.Tensor, c: int, memory_budget: int) -> None:
        self.post, self.Xs, self.c, self.budget = post, Xs, c, int(memory_budget)
        self.m = Xs.shape[0]
        if hasattr(post, "_data_terms") and post._by_kernels():
            self.route = "kernels"
        elif hasattr(post, "_cov_terms"):
            self.route = "rows"
        else:
            self.route = "joint"
        problem = getattr(post, "problem", None)
        self.n_obs = int(getattr(problem, "n_obs", 0) or 0)
        self.p = int(post.lin.num_params) if hasattr(post, "lin") else 0
        self._kx: dict[tuple[int, int], torch.Tensor] = {}  # cached cross kernels with the training inputs

    def _activate(self) -> None:
        activate = getattr(self.post, "_activate", None)  # grouped Laplace: its scales into the shared kernels
        if activate is not None:
            activate()

    # -- sizes ---------------------------------------------------------------------------------------
    def dense_bytes(self) -> int:
        """Bytes the dense path takes: Σ, one update and what ``latent_cov`` forms on the way."""
        mc = self.m * self.c
        extra = 2 * self.n_obs * mc if self.route == "kernels" else (mc * self.p if self.route == "rows" else 0)
        return 8 * (3 * mc * mc + extra)

    def dense_fits(self) -> bool:
        """Whether the dense path fits half the memory budget."""
        return self.dense_bytes() <= self.budget // 2

    def chunk_size(self, k: int) -> int:
        """Pool points per chunk of the chunked path with k picks (a quarter of the budget)."""
        kc, c = k * self.c, self.c
        if self.route == "kernels":
            per = 8 * 3 * c * (self.n_obs + kc)
        elif self.route == "rows":
            per = 8 * 2 * c * (self.p + kc)
        else:  # the joint covariance of the chunk and the picks: (b + k)² c² floats, three times
            per = 8 * 3 * c * c * (2 * k + 1)
        size = self.budget // 4 // max(1, per)
        if self.route == "joint":
            size = math.isqrt(max(0, self.budget // 4 // (24 * c * c))) - k
        fixed = 8 * 4 * self.m * c * c + 8 * 3 * (kc * kc + kc * max(self.n_obs, self.p))
        if size < 1 or fixed > self.budget:
            raise MemoryBudgetError(
                f"choosing {k} of {self.m:,} pool points needs more than memory_budget "
                f"({format_bytes(self.budget)}) for the pool's covariance blocks and one chunk of cross covariances "
                f"(about {format_bytes(fixed + 3 * per)}); query a smaller pool or raise memory_budget"
            )
        return max(1, min(self.m, size))

    def _training_cross(self, X: torch.Tensor, sl: slice, size: int) -> torch.Tensor:
        """K(X_train, pool[sl]) (N, b·c): kept from the first pass when the whole pool's (N × m·c) fits an eighth
        of the budget, so later passes compute only the picks' kernels."""
        key = (sl.start, sl.stop)
        if key in self._kx:
            return self._kx[key]
        self._activate()
        KXa = torch.cat([Kx for _, Kx, _ in self.post._cross_kernel_chunks(X, self.Xs[sl], size)], 1)
        if 8 * self.n_obs * self.m * self.c <= self.budget // 8:
            self._kx[key] = KXa
        return KXa

    # -- covariances ---------------------------------------------------------------------------------
    def blocks(self) -> torch.Tensor:
        """The per-point c × c posterior blocks (m, c, c), symmetrised."""
        blocks = self.post.latent_blocks(self.Xs).to(ALGEBRA_DTYPE)
        return 0.5 * (blocks + blocks.transpose(1, 2))

    def dense(self) -> torch.Tensor:
        """The joint posterior covariance (m·c, m·c), example-major."""
        return self.post.latent_cov(self.Xs).to(ALGEBRA_DTYPE)

    def cross(self, picks: torch.Tensor, size: int) -> tuple[torch.Tensor, Iterator[tuple[slice, torch.Tensor]]]:
        """Σ_PP (k·c, k·c) of the pool points ``picks`` and, chunk by chunk, (sl, Σ_{sl,P} (b·c, k·c))."""
        Xp = self.Xs[picks]
        self._activate()
        post = self.post
        if self.route == "kernels":
            X = post.problem.all_inputs()
            KXp, Kpp = post._dense_kernels(X, Xp)
            terms_p = post._data_terms(KXp)
            Spp = post.s2 * Kpp + sum(coef * (L @ R) for coef, L, R in terms_p)

            def chunks() -> Iterator[tuple[slice, torch.Tensor]]:
                for start in range(0, self.m, size):
                    sl = slice(start, min(self.m, start + size))
                    Xa = self.Xs[sl]
                    KXa = self._training_cross(X, sl, size)
                    Kpa = torch.cat([Kx for _, Kx, _ in post._cross_kernel_chunks(Xp, Xa, size)], 1)
                    C = post.s2 * Kpa.T + sum(
                        coef * (La @ Rp) for (coef, La, _), (_, _, Rp) in zip(post._data_terms(KXa), terms_p)
                    )
                    yield sl, C

        elif self.route == "rows":
            Bp = post.lin.jacobian(Xp).reshape(Xp.shape[0] * self.c, -1).to(ALGEBRA_DTYPE)
            terms_p = post._cov_terms(Bp)
            Spp = sum(coef * (L @ R) for coef, L, R in terms_p)

            def chunks() -> Iterator[tuple[slice, torch.Tensor]]:
                for start in range(0, self.m, size):
                    sl = slice(start, min(self.m, start + size))
                    Ba = post.lin.jacobian(self.Xs[sl]).reshape((sl.stop - sl.start) * self.c, -1).to(ALGEBRA_DTYPE)
                    yield sl, sum(coef * (La @ Rp) for (coef, La, _), (_, _, Rp) in zip(post._cov_terms(Ba), terms_p))

        else:
            Spp = post.latent_cov(Xp).to(ALGEBRA_DTYPE)

            def chunks() -> Iterator[tuple[slice, torch.Tensor]]:
                for start in range(0, self.m, size):
                    sl = slice(start, min(self.m, start + size))
                    b = (sl.stop - sl.start) * self.c
                    joint = post.latent_cov(torch.cat([self.Xs[sl], Xp])).to(ALGEBRA_DTYPE)
                    yield sl, joint[:b, b:]

        return 0.5 * (Spp + Spp.T), chunks()


# ------------------------------------------------------------------------------------ the greedy loop
@dataclass
class Selection:
    """What :func:`greedy_select` chose: ``indices`` (k,) in order of choice, ``scores`` (k,) — each pick's score
    when it was chosen (conditioned on the picks before it) — ``dense`` (which path ran), and, when asked for,
    ``blocks`` (m, c, c): the per-point covariance blocks conditioned on all k picks, and ``cov`` (dense path
    only): the whole conditioned pool covariance (m·c, m·c)."""

    indices: np.ndarray
    scores: np.ndarray
    dense: bool
    blocks: torch.Tensor | None = None
    cov: torch.Tensor | None = None


def _check_k(k: Any, m: int, distinct: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be a positive integer, got {k!r}")
    k = int(k)
    if k < 1 or k > m:
        raise ValueError(f"k must be between 1 and the pool size {m}, got {k}")
    if k > distinct:
        raise ValueError(
            f"k = {k} but the pool holds only {distinct} distinct inputs (exact duplicates are never picked twice)"
        )
    return k


def _pick(scores: torch.Tensor, taken: torch.Tensor) -> int:
    masked = torch.where(taken, torch.full_like(scores, -math.inf), torch.nan_to_num(scores, nan=-math.inf))
    return int(torch.argmax(masked))


def greedy_select(
    pool: PoolCovariance,
    k: int,
    score: Score,
    roots: torch.Tensor,
    groups: torch.Tensor | None = None,
    dense: bool | None = None,
    return_blocks: bool = False,
) -> Selection:
    """The k pool points chosen one at a time, each maximising ``score`` of the per-point covariance blocks
    conditioned on the earlier picks as if they were labelled.

    Args:
        pool: the pool's covariances.
        k: how many to choose (1 ≤ k ≤ the distinct inputs).
        score: conditioned blocks (m, c, c) → scores (m,); the point with the highest is picked.
        roots: Rⱼ (m, c, c) with Rⱼ Rⱼᵀ = Λⱼ, the curvature a label at point j would add.
        groups: an id per point (:func:`duplicate_groups`): a point equal to a picked one is not picked.
        dense: the dense path (True), the chunked one (False) or whichever fits (None: dense when it fits half
            the memory budget).
        return_blocks: also give the blocks conditioned on all k picks (the chunked path passes over the pool once
            more for them).
    """
    m, c = pool.m, pool.c
    groups = torch.arange(m) if groups is None else groups.cpu()
    k = _check_k(k, m, int(groups.unique().numel()))
    roots = roots.to(ALGEBRA_DTYPE)
    use_dense = pool.dense_fits() if dense is None else bool(dense)
    eye = torch.eye(c, dtype=ALGEBRA_DTYPE)
    taken = torch.zeros(m, dtype=torch.bool)
    picks: list[int] = []
    scores: list[float] = []

    def choose(blocks: torch.Tensor) -> None:
        s = score(blocks).cpu()
        j = _pick(s, taken)
        picks.append(j)
        scores.append(float(s[j]))
        taken[groups == groups[j]] = True

    if use_dense:
        if pool.dense_bytes() > pool.budget:
            raise MemoryBudgetError(
                f"the dense pool covariance of {m:,} points × {c} outputs needs {format_bytes(pool.dense_bytes())}, "
                f"above memory_budget ({format_bytes(pool.budget)}): use the chunked path"
            )
        S = pool.dense()
        S = 0.5 * (S + S.T)
        eye = eye.to(S.device)
        for _ in range(k):
            blocks = torch.diagonal(S.reshape(m, c, m, c), dim1=0, dim2=2).permute(2, 0, 1)
            choose(blocks)
            j = picks[-1]
            R = roots[j].to(S.device)
            cols = S[:, j * c : (j + 1) * c] @ R  # Σ_{·j} Rⱼ (m·c, c)
            A = eye + R.T @ S[j * c : (j + 1) * c, j * c : (j + 1) * c] @ R
            W = torch.linalg.solve_triangular(torch.linalg.cholesky(0.5 * (A + A.T)), cols.T, upper=False)
            S.addmm_(W.T, W, alpha=-1.0)  # in place: Σ is the largest array here
        S = 0.5 * (S + S.T)
        final = torch.diagonal(S.reshape(m, c, m, c), dim1=0, dim2=2).permute(2, 0, 1)
        return Selection(np.asarray(picks, dtype=np.int64), np.asarray(scores), True, final, S)

    size = pool.chunk_size(k)
    base = pool.blocks()
    choose(base)
    final = None
    for t in range(1, k + 1):
        if t == k and not return_blocks:
            break
        P = torch.as_tensor(picks, dtype=torch.int64)
        Spp, chunks = pool.cross(P, size)
        RP = torch.block_diag(*roots[P].to(Spp.device))
        A = torch.eye(t * c, dtype=ALGEBRA_DTYPE, device=Spp.device) + RP.T @ Spp @ RP
        Lc = torch.linalg.cholesky(0.5 * (A + A.T))
        blocks = base.clone()
        for sl, C in chunks:
            b = sl.stop - sl.start
            Z = torch.linalg.solve_triangular(Lc, (C @ RP).T, upper=False).reshape(t * c, b, c)
            blocks[sl] -= torch.einsum("dia,dib->iab", Z, Z).to(blocks.device)
        if t == k:
            final = blocks
        else:
            choose(blocks)
    return Selection(np.asarray(picks, dtype=np.int64), np.asarray(scores), False, final if return_blocks else None)
