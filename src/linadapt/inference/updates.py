"""Conditioning a fitted posterior on more data without recomputing what it holds (the estimators' ``update``).

The old examples keep their rows, the new ones are appended (N = n·c old rows, k new ones):

* function space, Cholesky: A = s²K + Σ grows by the cross kernel K(X_old, X_new) and K(X_new, X_new). With the
  old factor L (A₁₁ = L Lᵀ) the new one is the block factor

      [[L, 0], [Bᵀ, L₂₂]],   B = L⁻¹ A₁₂ (a triangular solve, O(N²k)),   L₂₂ Lᵀ₂₂ = A₂₂ − BᵀB (O(Nk² + k³)),

  so nothing of size N³ (or N²p) is recomputed; α = A⁻¹r then costs two triangular solves, O(N²). The factor is
  kept in these blocks (:class:`BlockFactor`, solves walk them), so the old factor is not even copied.
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

Sharded (distributed) training data: every rank appends its own new examples. The new examples of all ranks
follow all the old ones in the global order (:meth:`~linadapt.distributed.Sharding.extended`), so every replicated
piece — residuals, labels, the dense kernel and its factor, CG's start, Newton's start — is extended exactly as for
one process; each rank's held J gains its own new rows.

Not here: prior groups and hyperparameter averaging.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from linear_operator.utils.cholesky import psd_safe_cholesky

from linadapt._inputs import cat_examples
from linadapt.inference.laplace import LaplacePosterior, LaplaceProblem
from linadapt.inference.per_output_noise import PerOutputPosterior
from linadapt.inference.regression import RegressionPosterior, RegressionProblem
from linadapt.jacobian.held import cached_jacobian
from linadapt.jacobian.linearization import ALGEBRA_DTYPE

__all__ = [
    "BlockFactor",
    "ExtendedRegressionProblem",
    "LaplaceStart",
    "NewRows",
    "NewShard",
    "StackedJacobian",
    "UpdatedPerOutputPosterior",
    "UpdatedRegressionPosterior",
    "extend_cholesky",
    "extend_factor",
    "extend_kernel",
    "extend_laplace_problem",
    "extend_regression_problem",
    "factor_solve",
    "laplace_start",
    "updated_regression_posterior",
]


def extend_kernel(K: torch.Tensor, K_on: torch.Tensor, K_nn: torch.Tensor) -> torch.Tensor:
    """[[K, K_on], [K_onᵀ, K_nn]] for K (N × N), K_on (N × M), K_nn (M × M), written once."""
    N, M = K.shape[0], K_nn.shape[0]
    out = torch.empty(N + M, N + M, dtype=K.dtype, device=K.device)
    out[:N, :N] = K
    out[:N, N:] = K_on
    out[N:, :N] = K_on.T
    out[N:, N:] = K_nn
    return out


_MAX_DEPTH = 16  # a factor extended more often than this is written out as one matrix again


class BlockFactor:
    """A lower-triangular factor [[F, 0], [Bᵀ, L₂₂]] kept in its blocks — F the previous factor (a matrix or a
    BlockFactor), Bᵀ (M × N), L₂₂ (M × M) — so that extending a factor never copies the old one: triangular solves
    walk the blocks (the same work as with the whole matrix)."""

    def __init__(self, first: Any, Bt: torch.Tensor, L22: torch.Tensor) -> None:
        self.first, self.Bt, self.L22 = first, Bt, L22
        self.n_first = _dim(first)
        self.depth = 1 + (first.depth if isinstance(first, BlockFactor) else 0)

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        """F⁻¹ b for b (N + M, k): forward substitution."""
        y1 = _forward(self.first, b[: self.n_first])
        y2 = torch.linalg.solve_triangular(self.L22, b[self.n_first :] - self.Bt @ y1, upper=False)
        return torch.cat([y1, y2])

    def backward(self, y: torch.Tensor) -> torch.Tensor:
        """F⁻ᵀ y for y (N + M, k): back substitution."""
        x2 = torch.linalg.solve_triangular(self.L22.T, y[self.n_first :], upper=True)
        x1 = _backward(self.first, y[: self.n_first] - self.Bt.T @ x2)
        return torch.cat([x1, x2])

    def dense(self) -> torch.Tensor:
        """The whole factor as one (column-major) matrix."""
        first = self.first.dense() if isinstance(self.first, BlockFactor) else self.first
        N, M = self.n_first, self.L22.shape[0]
        out = torch.empty(N + M, N + M, dtype=first.dtype, device=first.device).T
        out[:N, :N] = first
        out[:N, N:] = 0.0
        out[N:, :N] = self.Bt
        out[N:, N:] = self.L22
        return out


def _dim(F: Any) -> int:
    return F.n_first + F.L22.shape[0] if isinstance(F, BlockFactor) else F.shape[0]


def _forward(F: Any, b: torch.Tensor) -> torch.Tensor:
    return F.forward(b) if isinstance(F, BlockFactor) else torch.linalg.solve_triangular(F, b, upper=False)


def _backward(F: Any, y: torch.Tensor) -> torch.Tensor:
    return F.backward(y) if isinstance(F, BlockFactor) else torch.linalg.solve_triangular(F.T, y, upper=True)


def factor_solve(F: Any, B: torch.Tensor) -> torch.Tensor:
    """A⁻¹ B for A = F Fᵀ (F a lower-triangular matrix or a :class:`BlockFactor`): two triangular solves (faster
    than ``cholesky_solve``, which copies the factor, at few right-hand sides)."""
    return _backward(F, _forward(F, B))


def extend_factor(F: Any, A12: torch.Tensor, A22: torch.Tensor) -> BlockFactor:
    """The lower Cholesky factor of [[A₁₁, A₁₂], [A₁₂ᵀ, A₂₂]] from that of A₁₁ (F, N × N, a matrix or a
    :class:`BlockFactor`): the block factor [[F, 0], [Bᵀ, L₂₂]] with B = F⁻¹A₁₂ and L₂₂ the factor of the Schur
    complement A₂₂ − BᵀB. O(N²M) for M new rows, nothing of the old factor copied; the Schur complement is factorised
    as :class:`~linadapt.inference.solvers.SPDSystem` factorises (jitter only if round-off breaks it)."""
    if isinstance(F, BlockFactor) and F.depth >= _MAX_DEPTH:
        F = F.dense()
    B = _forward(F, A12)
    S = A22 - B.T @ B
    S = 0.5 * (S + S.T)
    L22 = psd_safe_cholesky(S, jitter=1e-10 * float(A22.diagonal().mean()))
    return BlockFactor(F, B.T.contiguous(), L22)


def extend_cholesky(L: torch.Tensor, A12: torch.Tensor, A22: torch.Tensor) -> torch.Tensor:
    """:func:`extend_factor` written out as one lower-triangular matrix."""
    return extend_factor(L, A12, A22).dense()


class NewRows:
    """J of the appended examples with the products of a held Jacobian: from their dense rows (n, c, p) when given,
    else from their own held J (cached factors or retained graph, built in a pass over them on the second product,
    within ``budget`` bytes), else by torch.func."""

    def __init__(self, lin: Any, X: torch.Tensor, J: torch.Tensor | None = None, budget: int = 0) -> None:
        self.lin, self.X, self.J, self.budget = lin, X, J, budget
        self.held: Any = None
        self.uses = 0

    def _held(self) -> Any:
        """The held J, built on the second product (a single product is cheaper by torch.func)."""
        self.uses += 1
        if self.held is None and self.uses == 2:
            self.held = cached_jacobian(self.lin, self.X, self.budget) or False
        return self.held or None

    def jvp(self, V: torch.Tensor) -> torch.Tensor:
        """J V for rows V (k, p): (k, n, c)."""
        if self.J is not None:
            return torch.einsum("ncp,kp->knc", self.J, V.to(self.J))
        held = self._held()
        return held.jvp(V) if held is not None else self.lin.jvp(self.X, V)

    def vjp(self, U: torch.Tensor) -> torch.Tensor:
        """Jᵀ U for U (k, n, c): (k, p)."""
        if self.J is not None:
            return torch.einsum("knc,ncp->kp", U.to(self.J), self.J)
        held = self._held()
        return held.vjp(U) if held is not None else self.lin.vjp(self.X, U)

    def promote(self) -> bool:
        """As ``FactoredJacobian.promote`` for the held J (dense rows are float64 already)."""
        return bool(self.held) and hasattr(self.held, "promote") and bool(self.held.promote())


class StackedJacobian:
    """J of consecutive groups of examples, each held in its own form — the old examples' cached factors or
    retained graph, then the appended ones (:class:`NewRows`) — as
    :meth:`~linadapt.inference.posterior.TrainingData.factored` returns it: products over all the examples need
    no pass through the network for the old ones."""

    def __init__(self, parts: list[tuple[Any, int]]) -> None:
        self.parts = parts  # (held J of a group, its number of examples)

    @classmethod
    def stacked(
        cls, first: Any, n_first: int, lin: Any, X_new: torch.Tensor, J_new: torch.Tensor | None, budget: int
    ) -> StackedJacobian:
        """``first`` (a held J of ``n_first`` examples, possibly stacked itself) followed by the appended examples
        X_new (with their dense rows J_new (k, c, p), or None) as one :class:`NewRows` group with those appended
        before."""
        parts = list(first.parts) if isinstance(first, StackedJacobian) else [(first, n_first)]
        last = parts[-1][0]
        if isinstance(last, NewRows) and (last.J is None) == (J_new is None):  # one group of appended rows
            parts.pop()
            X_new = cat_examples([last.X, X_new])
            J_new = None if J_new is None else torch.cat([last.J, J_new])
        return cls([*parts, (NewRows(lin, X_new, J_new, budget), X_new.shape[0])])

    def jvp(self, V: torch.Tensor) -> torch.Tensor:
        """J V for rows V (k, p): (k, n, c), the groups' rows in order."""
        return torch.cat([part.jvp(V) for part, _ in self.parts], dim=1)

    def vjp(self, U: torch.Tensor) -> torch.Tensor:
        """Jᵀ U for U (k, n, c): the sum of every group's Jᵀ U on its rows, (k, p)."""
        out, start = None, 0
        for part, n in self.parts:
            term = part.vjp(U[:, start : start + n])
            out, start = term if out is None else out + term, start + n
        return out

    def promote(self) -> bool:
        """Make every group's products exact to float64 rounding where it can (see ``FactoredJacobian.promote``)."""
        return any([bool(part.promote()) for part, _ in self.parts if hasattr(part, "promote")])


def _new_columns(lin: Any, X_old: Any, X_new: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """K(X_old, X_new) (N × M) and K(X_new, X_new) (M × M) from one kernel evaluation."""
    cols = lin.ntk(cat_examples([X_old, X_new]), X_new)
    N = cols.shape[0] - cols.shape[1]
    return cols[:N], cols[N:]


class NewShard:
    """What a sharded update needs to place every rank's new examples: ``sharding`` (all examples after the
    update) and ``new`` (the new examples alone), as :meth:`~linadapt.distributed.Sharding.extended` returns them."""

    def __init__(self, sharding: Any, new: Any) -> None:
        self.sharding, self.new = sharding, new

    def gather(self, local: Any) -> Any:
        """The new rows of every rank (along dimension 0), in their global order."""
        return self.new.gather(local)


def _gather_new(shard: NewShard | None, local: Any) -> Any:
    return local if shard is None else shard.gather(local)


def _extend_products(
    old: Any, new: Any, X_new: Any, needs_rows: bool, lazy: bool, shard: NewShard | None = None
) -> torch.Tensor | None:
    """Give the new problem the old one's held J followed by the new rows for its products, and extend the dense
    kernel K (held, or pending, by the old problem) by K(X_old, X_new) and K(X_new, X_new) — at once, or
    (``lazy``) as blocks assembled on the first use of the whole kernel. Returns the new rows of all ranks (k·c, p)
    when ``needs_rows``, else None. ``X_new``: this rank's new inputs; ``shard``: see :class:`NewShard`."""
    lin, p = old.lin, old.p
    J3 = lin.jacobian(X_new) if needs_rows else None
    held = old.cache.get("factored") or None
    if held is not None:
        budget = int(old.options.memory_budget) // 8  # (the old examples' held J takes up to half the budget)
        new.cache["factored"] = StackedJacobian.stacked(held, old.X.shape[0], lin, X_new, J3, budget)  # (this rank's)
    if shard is not None:
        new.cache["X_all"] = cat_examples([old.all_inputs(), shard.gather(X_new)])
    if "K" in old.cache or "K_base" in old.cache:
        # the cross kernel by the layer rules where they apply (one pass over the old examples: far cheaper than
        # products with their held J, O(N p k)), else by Jacobian contraction
        X_all = new.all_inputs()
        K_on, K_nn = _new_columns(lin, X_all[: old.n], X_all[old.n :])
        base = old.cache["K"] if "K" in old.cache else old  # (an old problem whose kernel is pending itself)
        if lazy:
            new.cache["K_base"], new.cache["K_new"] = base, (K_on, K_nn)
        else:
            new.cache["K"] = extend_kernel(base if torch.is_tensor(base) else base.kernel(), K_on, K_nn)
    return None if J3 is None else _gather_new(shard, J3).reshape(-1, p)


def _check_shard(problem: Any, shard: NewShard | None) -> None:
    if (problem.sharding is None) != (shard is None):
        raise ValueError("a sharded posterior is updated with the placement of the new examples (and only then)")


class ExtendedRegressionProblem(RegressionProblem):
    """A :class:`~linadapt.inference.regression.RegressionProblem` whose dense kernel, when the problem it extends
    held one, is assembled from that and the new blocks on first use (the Cholesky update needs only the new
    blocks; the exact evidence and the training-point covariances need the whole kernel)."""

    def kernel(self) -> torch.Tensor:
        """Dense K over all the examples (see :meth:`~linadapt.inference.posterior.TrainingData.kernel`)."""
        if "K" not in self.cache and "K_base" in self.cache:
            base = self.cache.pop("K_base")
            K_on, K_nn = self.cache["K_new"]
            self.cache["K"] = extend_kernel(base if torch.is_tensor(base) else base.kernel(), K_on, K_nn)
        return super().kernel()


def extend_regression_problem(
    old: RegressionProblem, X_new: Any, r_new: torch.Tensor, shard: NewShard | None = None
) -> RegressionProblem:
    """The :class:`~linadapt.inference.regression.RegressionProblem` of the old and the new examples, with the dense
    pieces the old one holds extended rather than recomputed: K (by the cross kernel), J (by the new rows), JᵀJ,
    the per-output Grams and Jᵀr (by the new rows' contributions); products with J reuse the old examples' held J.

    Args:
        old: the fitted problem.
        X_new: (k, ...) prepared inputs (this rank's, when sharded).
        r_new: their residuals, (k·c,) or (k, c), float64.
        shard: for a sharded problem, where every rank's new examples go (:class:`NewShard`); else None.
    """
    _check_shard(old, shard)
    lin, c = old.lin, old.c
    r_new_local = r_new.reshape(-1, c).to(old.r)
    r_new = _gather_new(shard, r_new_local).reshape(-1)
    X_all, r_all = cat_examples([old.X, X_new]), torch.cat([old.r, r_new])
    problem = ExtendedRegressionProblem(lin, X_all, r_all, old.options, None if shard is None else shard.sharding)
    cache = old.cache
    J_new = _extend_products(old, problem, X_new, bool({"J", "G", "G_outputs"} & set(cache)), lazy=True, shard=shard)
    if "J" in cache:
        problem.cache["J"] = torch.cat([cache["J"], J_new])
    if "G" in cache:
        problem.cache["G"] = cache["G"] + J_new.T @ J_new
    if "G_outputs" in cache:
        Jc = J_new.reshape(-1, c, old.p)
        problem.cache["G_outputs"] = cache["G_outputs"] + torch.einsum("iap,iaq->apq", Jc, Jc)
    if "g" in cache:
        if J_new is not None:
            g_new = J_new.T @ r_new
        else:  # this rank's new rows, summed over the ranks
            g_new = problem._all_reduce(lin.vjp(X_new, r_new_local.reshape(1, -1, c))[0])
        problem.cache["g"] = cache["g"] + g_new
    return problem


class _Seeded:
    """A regression posterior that starts from what the previous posterior held: the extended Cholesky factor
    (``factor``, a :class:`BlockFactor`, used for every solve) or, for CG, a starting guess ``x0`` of the fit's
    right-hand side (used by the first solve)."""

    system: Any
    options: Any

    def __init__(self, *args: Any, factor: Any = None, x0: torch.Tensor | None = None, **kw: Any) -> None:
        self.factor, self._x0 = factor, x0
        super().__init__(*args, **kw)  # type: ignore[call-arg]

    def solve(self, B: torch.Tensor) -> torch.Tensor:
        """As the posterior's ``solve``, by the extended factor, or (the first CG solve) from ``x0``."""
        if self.factor is not None and self.system.method == "cholesky":
            return factor_solve(self.factor, B)
        x0, self._x0 = self._x0, None
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
    (keyword arguments ``factor`` and ``x0``); otherwise the same."""


class UpdatedPerOutputPosterior(_Seeded, PerOutputPosterior):
    """:class:`~linadapt.inference.per_output_noise.PerOutputPosterior` started from a previous one's factor."""


def updated_regression_posterior(post: RegressionPosterior, problem: RegressionProblem) -> RegressionPosterior:
    """The posterior at ``post``'s hyperparameters, space and solver on ``problem`` (the old examples and new ones
    appended, from :func:`extend_regression_problem`), started from what ``post`` holds: its Cholesky factor
    extended (function space), or its solution as CG's start."""
    old = post.problem
    n_old, M = old.n_obs, problem.n_obs - old.n_obs
    per_output = isinstance(post, PerOutputPosterior)
    factor = x0 = None
    if post.solver == "cholesky" and post.space == "function":
        K = problem.cache.get("K")
        if K is not None:
            K_on, K_nn = K[:n_old, n_old:], K[n_old:, n_old:]
        else:
            X_all = problem.all_inputs()  # (gathered when sharded: the old examples of all ranks, then the new)
            K_on, K_nn = problem.cache.get("K_new") or _new_columns(problem.lin, X_all[: old.n], X_all[old.n :])
        A22 = post.s2 * K_nn
        if per_output:
            A22.diagonal().add_(post.noise_vars.repeat(M // post.c).to(A22))
        else:
            A22.diagonal().add_(post.sig2)
        factor = getattr(post, "factor", None)
        factor = extend_factor(factor if factor is not None else post.system.chol(), post.s2 * K_on, A22)
    elif post.solver == "cg":
        if post.space == "function":
            x0 = torch.cat([post.alpha, torch.zeros(M, dtype=post.alpha.dtype, device=post.alpha.device)])
        else:
            x0 = post.centred * post.sig2  # the solution of P x = Jᵀr
        x0 = x0.unsqueeze(-1)
    if per_output:
        return UpdatedPerOutputPosterior(
            problem, post.s2, post.noise_vars.cpu().numpy(), post.space, post.prior_offset, factor=factor
        )
    return UpdatedRegressionPosterior(
        problem, post.s2, post.sig2, post.space, post.solver, prior_offset=post.prior_offset, factor=factor, x0=x0
    )


# ---------------------------------------------------------------------------------------------- classification
def extend_laplace_problem(
    old: LaplaceProblem, X_new: Any, labels_new: torch.Tensor, f0_new: torch.Tensor, shard: NewShard | None = None
) -> LaplaceProblem:
    """The :class:`~linadapt.inference.laplace.LaplaceProblem` of the old and the new examples (same likelihood and
    prior mean), with the dense kernel or Jacobian the old one holds extended by the new examples' rows; products
    with J reuse the old examples' held J.

    Args:
        old: the fitted problem.
        X_new: (k, ...) prepared inputs (this rank's, when sharded).
        labels_new: the labels of the new examples, encoded as the old ones (of every rank, in their global order,
            when sharded).
        f0_new: f(X_new; θ̂), (k, c) (of every rank, as ``labels_new``).
        shard: for a sharded problem, where every rank's new examples go (:class:`NewShard`); else None.
    """
    _check_shard(old, shard)
    lin = old.lin
    labels = torch.cat([old.labels, labels_new.to(old.labels)])
    f0 = torch.cat([old.f0, f0_new.to(old.f0)])
    problem = LaplaceProblem(
        lin,
        cat_examples([old.X, X_new]),
        labels,
        "network",
        old.options,
        f0=f0,
        sharding=None if shard is None else shard.sharding,
        likelihood=old.likelihood,
    )
    problem.mu = old.mu
    J_new = _extend_products(old, problem, X_new, "J" in old.cache, lazy=False, shard=shard)
    if "J" in old.cache:
        problem.cache["J"] = torch.cat([old.cache["J"], J_new])
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


def laplace_start(
    post: LaplacePosterior, X_new: Any, f0_new: torch.Tensor, shard: NewShard | None = None
) -> LaplaceStart:
    """The current MAP as a start on the data with X_new appended: the old logits, f(x; θ̂) + J(x) δ* at the new
    inputs, and a = 0 on the new rows (function space) — consistent, since s² K [a; 0] = [f_old − m_old;
    J_new (δ* − μ)]. Sharded: ``X_new`` is this rank's, ``f0_new`` every rank's (see :func:`extend_laplace_problem`)."""
    delta = post.delta
    shift = _gather_new(shard, post.lin.jvp(X_new, delta).reshape(-1, f0_new.shape[1]))
    f_new = f0_new.to(ALGEBRA_DTYPE) + shift.reshape(f0_new.shape)
    logits = torch.cat([post.logits, f_new])
    if post.space == "function":
        a = torch.cat([post.a, torch.zeros(f_new.numel(), dtype=post.a.dtype, device=post.a.device)])
        return LaplaceStart("function", post.s2, logits, a=a)
    return LaplaceStart("parameter", post.s2, logits, delta=delta.clone())
