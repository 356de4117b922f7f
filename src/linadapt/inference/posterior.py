"""What every Gaussian posterior over the linearized weights shares: predictions through the Jacobian.

With δ = θ − θ̂ ~ N(δ̄, S) a posterior (regression: exact; classification: Laplace), the latent outputs at
test inputs X* are Gaussian with mean f(X*; θ̂) + J* δ̄ and covariance J* S J*ᵀ. Subclasses provide δ̄
and B S Bᵀ for rows B of a Jacobian as a short sum of products (``_cov_terms``), without ever forming
S (p × p); only the per-example blocks are computed when only those are wanted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

from linadapt._memory import MemoryBudgetError
from linadapt._progress import with_progress
from linadapt.jacobian.held import inputs_key
from linadapt.jacobian.linearization import ALGEBRA_DTYPE, Linearization
from linadapt.kernels.operator import NTKOperator
from linadapt.kernels.sharded import ShardedNTKOperator

__all__ = ["LinearizedPosterior", "TrainingData"]


class TrainingData:
    """Training inputs of a linearized model and the kernel / Jacobian pieces every problem needs.

    Every product with the training Jacobian J = J(X) (N × p, N = n·c, example-major) goes through this
    class, so a sharded fit (``sharding`` given: X holds only this rank's examples, see
    :mod:`linadapt.distributed`) changes nothing above it: output-space vectors are over all N rows and
    parameter-space vectors are replicated on every rank.

    Attributes: lin, X (prepared inputs of this process), options (solver settings), c (outputs per example),
    n (examples, all ranks), n_obs = n·c, p (parameters), sharding (None for a single process), cache (dense
    pieces, computed on first use).
    """

    def __init__(self, lin: Linearization, X: torch.Tensor, options: Any, c: int, sharding: Any = None) -> None:
        self.lin, self.X, self.options, self.c = lin, X, options, c
        self.sharding = sharding
        self.n = sharding.n if sharding is not None else X.shape[0]
        self.n_obs = self.n * c
        self.p = lin.num_params
        self.cache: dict[str, Any] = {}

    # -- rows of this process -> rows of all processes ---------------------------------------------------
    def gather_rows(self, local: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Rows of all examples along ``dim`` from this process's rows (identity without sharding)."""
        return local if self.sharding is None else self.sharding.gather(local, dim)

    def local_rows(self, full: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """This process's rows of a tensor over all examples along ``dim``."""
        return full if self.sharding is None else self.sharding.scatter_view(full, dim)

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.sharding is None else self.sharding.all_reduce(t)

    # -- products ----------------------------------------------------------------------------------------
    def factored(self) -> Any:
        """This process's J(X) held for repeated products, built on first use: as cached per-layer factors
        (:class:`~linadapt.jacobian.structured.FactoredJacobian`) when the model's layers have rules, it has ≤ 32
        outputs and the factors fit in half the memory budget; else as the network's retained autograd graph
        (:class:`~linadapt.jacobian.graph.GraphJacobian`) when that fits in half the budget; else None (torch.func
        products). Products with either need no forward pass through the network."""
        if "factored" not in self.cache:
            held = self.lin.held.get(
                self.X,
                int(self.options.memory_budget) // 2,
                factorize=getattr(self.options, "factorize", True),
                graph=getattr(self.options, "graph_products", True),
            )
            self.cache["factored"] = held if held is not None else False
        return self.cache["factored"] or None

    def exact_products(self) -> bool:
        """Make later products exact to float64 rounding where they were not (cached factors of a float32
        network, see :meth:`~linadapt.jacobian.structured.FactoredJacobian.promote`); whether anything changed. Not for
        a sharded fit (every process would have to agree)."""
        fj = self.factored()
        return self.sharding is None and hasattr(fj, "promote") and bool(fj.promote())

    def jvp(self, V: torch.Tensor) -> torch.Tensor:
        """J V for parameter-space rows V (k, p): (k, n, c)."""
        fj = self.factored()
        local = fj.jvp(V) if fj is not None else self.lin.jvp(self.X, V)
        return self.gather_rows(local, dim=1)

    def vjp(self, U: torch.Tensor) -> torch.Tensor:
        """Jᵀ U for output-space rows U (k, n, c): (k, p) — a local vjp plus one all-reduce when sharded."""
        fj = self.factored()
        U_local = self.local_rows(U, dim=1)
        return self._all_reduce(fj.vjp(U_local) if fj is not None else self.lin.vjp(self.X, U_local))

    def k_matmul(self, V: torch.Tensor) -> torch.Tensor:
        """K V = J (Jᵀ V) for V (N, k), matrix-free."""
        k = V.shape[1]
        W = self.vjp(V.T.reshape(k, self.n, self.c))
        return self.jvp(W).reshape(k, self.n_obs).T

    def chunk_sum(self, fn: Callable[[slice, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Σ over Jacobian chunks of ``fn(rows, J_chunk)`` (rows: the chunk's slice of all examples,
        J_chunk (b, c, p)); all-reduced when sharded."""
        # (local start, global start, count) of each run of consecutive examples: one without sharding, one per
        # segment when sharded (a rank's old and updated examples sit in different places of the global order)
        segments = [(0, 0, self.X.shape[0])] if self.sharding is None else self.sharding.local_segments()
        total: torch.Tensor | None = None
        for start, first, count in segments:
            X = self.X if count == self.X.shape[0] else self.X[start : start + count]
            for sl, jac in self.lin.jacobian_chunks(X):
                part = fn(slice(sl.start + first, sl.stop + first), jac)
                total = part if total is None else total + part
        if total is None:  # a rank without examples contributes zeros of the right shape
            total = fn(slice(0, 0), torch.zeros(0, self.c, self.p, dtype=ALGEBRA_DTYPE, device=self.lin.device))
        return self._all_reduce(total)

    @property
    def operator(self) -> Any:
        """K = J(X) J(X)ᵀ over all examples as a lazy operator (used for pivoted-Cholesky preconditioners)."""
        if "operator" not in self.cache:
            if self.sharding is None:
                self.factored()  # held on the linearization, so the operator's products share it
                self.cache["operator"] = NTKOperator(self.lin, self.X)
            else:
                self.cache["operator"] = ShardedNTKOperator(self)
        return self.cache["operator"]

    def all_inputs(self) -> torch.Tensor:
        """The inputs of all examples (gathered from every rank when sharded), cached."""
        if self.sharding is None:
            return self.X
        if "X_all" not in self.cache:
            self.cache["X_all"] = self.gather_rows(self.X)
        return self.cache["X_all"]

    # -- dense pieces ------------------------------------------------------------------------------------
    def kernel(self) -> torch.Tensor:
        """Dense K = J(X) J(X)ᵀ (N × N, example-major), cached. Sharded: computed on every rank from the
        gathered inputs (the dense path is only chosen when K fits in memory)."""
        if "K" not in self.cache:
            self.cache["K"] = self.lin.ntk(self.all_inputs())
        return self.cache["K"]

    def mean_kernel_diagonal(self) -> float:
        """k̄ = tr K / N, the mean of K's diagonal over all N training outputs, cached: from the dense K or J when
        held, else from the per-example c × c blocks (one pass, nothing N × N; summed over ranks when sharded)."""
        if "kbar" not in self.cache:
            if "K" in self.cache:
                total = float(self.cache["K"].diagonal().sum())
            elif "J" in self.cache:
                total = float(self.cache["J"].pow(2).sum())
            else:
                X = self.X
                local = (
                    self.lin.ntk_blocks(X).diagonal(dim1=1, dim2=2).sum()
                    if X.shape[0]
                    else torch.zeros((), device=self.lin.device)
                )
                total = float(self._all_reduce(local.to(ALGEBRA_DTYPE).reshape(1)))
            self.cache["kbar"] = total / max(self.n_obs, 1)
        return self.cache["kbar"]

    def jacobian_fits(self) -> bool:
        """Whether the dense J (N × p, float64) is held already or fits in half the memory budget."""
        return "J" in self.cache or self.n_obs * self.p * 8 <= int(self.options.memory_budget) // 2

    def jacobian_matrix(self) -> torch.Tensor:
        """Dense J(X) as (N × p), cached. Sharded: the rows of every rank, gathered."""
        if "J" not in self.cache:
            self.cache["J"] = self.gather_rows(self.lin.jacobian(self.X)).reshape(self.n_obs, self.p)
        return self.cache["J"]


class LinearizedPosterior:
    """Base class: ``lin`` (the linearization), ``delta`` (δ̄, shape (p,)), ``c`` (outputs per example),
    ``memory_budget`` (bytes the test-point pieces may take), ``space``, ``problem`` (the
    :class:`TrainingData`). Subclasses give ``_cov_terms`` and, for function space, ``_data_terms``.

    In function space the predictive covariance needs no p-sized object per test output:
    J* S J*ᵀ = s² K** + Σ coef · L R from the cross kernel K(X, X*) alone (:meth:`_data_terms`), computed in
    bounded chunks of test points by per-layer rules (:meth:`~linadapt.jacobian.linearization.Linearization.
    cross_kernel_chunks`).
    """

    lin: Linearization
    delta: torch.Tensor
    c: int
    memory_budget: int
    space: str
    problem: TrainingData
    s2: float
    progress: bool | str = "auto"  # a progress bar over test chunks (linadapt._progress); set by the estimators

    def _cov_terms(self, B: torch.Tensor) -> list[tuple[float, torch.Tensor, torch.Tensor]]:
        """Terms (coef, L, R) with B S Bᵀ = Σ coef · L R, L (k, D), R (D, k), for rows B (k, p)."""
        raise NotImplementedError

    def _data_terms(self, Kx: torch.Tensor) -> list[tuple[float, torch.Tensor, torch.Tensor]]:
        """Function space: terms (coef, L, R) with B S Bᵀ = s² B Bᵀ + Σ coef · L R, given only
        Kx = J(X) Bᵀ (N, k), the training rows' kernel with the test rows."""
        raise NotImplementedError

    def _by_kernels(self) -> bool:
        """Whether test covariances go through kernels (function space, one process)."""
        return self.space == "function" and getattr(self.problem, "sharding", None) is None

    def _test_chunk(self, m: int) -> int:
        """Test examples per chunk: the cross kernel (N × b·c) and its solve within a quarter of the budget."""
        per_example = 8 * 3 * self.problem.n_obs * self.c
        return max(1, min(m, int(self.memory_budget) // 4 // max(1, per_example)))

    def latent_cov_rows(self, B: torch.Tensor) -> torch.Tensor:
        """Posterior covariance of B δ for rows B (k, p) of a Jacobian: B S Bᵀ, shape (k, k)."""
        return sum(coef * (L @ R) for coef, L, R in self._cov_terms(B))  # type: ignore[return-value]

    def latent_cov_row_blocks(self, B: torch.Tensor, c: int) -> torch.Tensor:
        """Only the diagonal c × c blocks of B S Bᵀ for B = (b·c, p) rows grouped by example: (b, c, c).

        Costs O(D·b·c²) after the solves instead of O(D·(b·c)²) for the full matrix."""
        return _diagonal_blocks(self._cov_terms(B), B.shape[0] // c, c, B.dtype, B.device)

    def mean_shift(self, Xs: torch.Tensor) -> torch.Tensor:
        """J(X*) δ̄, shape (m, c): one Jacobian-vector product per chunk of test points."""
        return self.lin.jvp(Xs, self.delta)

    def outputs_and_shift(self, Xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f(X*; θ̂), J(X*) δ̄), (m, c) each: in forward mode the network's outputs are the primal of the same
        Jacobian-vector product, so the MAP logits cost one pass."""
        return self.lin.jvp(Xs, self.delta, with_outputs=True)

    def latent_blocks(self, Xs: torch.Tensor, added_variance: torch.Tensor | None = None) -> torch.Tensor:
        """Per-example c × c posterior covariance blocks J(x) S J(x)ᵀ, shape (m, c, c).

        ``added_variance`` (c,): what the caller adds to each output's variance before returning it (the noise,
        for the predictive of y). Exact paths ignore it; a matrix-free regression certifies each variance plus
        it, the quantity the caller returns, rather than the latent variance alone (see
        :meth:`~linadapt.inference.regression.RegressionPosterior._blocks_from_kernels`)."""
        out = []
        if self._by_kernels():
            X = self.problem.all_inputs()
            if "K" in self.problem.cache and inputs_key(Xs) == inputs_key(X):
                return self._training_blocks()
            size = self._test_chunk(Xs.shape[0])
            chunks = self._cross_kernel_chunks(X, Xs, size)
            steps = self._cross_kernel_steps(X, Xs.shape[0], size)
            out = [
                self._blocks_from_kernels(Kx, Kss, added_variance)
                for _, Kx, Kss in with_progress(chunks, steps, self._progress_label(Xs), self.progress)
            ]
            return torch.cat(out) if out else torch.zeros(0, self.c, self.c, dtype=ALGEBRA_DTYPE)
        steps = math.ceil(Xs.shape[0] / self.lin._jacobian_chunk_size(self.c))
        for _, jac in with_progress(self.lin.jacobian_chunks(Xs), steps, self._progress_label(Xs), self.progress):
            b, c, p = jac.shape
            blocks = self.latent_cov_row_blocks(jac.reshape(b * c, p), c)
            out.append(0.5 * (blocks + blocks.transpose(1, 2)))
        return torch.cat(out)

    def _cross_kernel_chunks(
        self, X: torch.Tensor, Xs: torch.Tensor, size: int
    ) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
        """Chunks of ``size`` test points: (sl, K(X, Xs[sl]) (N, b·c), prior blocks (b, c, c)) of the kernel whose
        s² multiple is the prior covariance of the outputs (here J Jᵀ; a grouped prior sums scaled kernels)."""
        return self.lin.cross_kernel_chunks(X, Xs, size)

    def _cross_kernel_steps(self, X: torch.Tensor, m: int, size: int) -> int:
        """How many chunks :meth:`_cross_kernel_chunks` yields for m test points."""
        return self.lin.cross_kernel_steps(X, m, size)

    def _dense_kernels(self, X: torch.Tensor, Xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(K(X, X*) (N, m·c), K(X*, X*) (m·c, m·c)) of that kernel, dense."""
        return self.lin.ntk(X, Xs), self.lin.ntk(Xs)

    def _progress_label(self, Xs: torch.Tensor) -> str:
        return f"predictive covariance of {Xs.shape[0]:,} points"

    def _training_blocks(self) -> torch.Tensor:
        """:meth:`latent_blocks` at the training inputs themselves (e.g. for leave-one-out readouts) from the
        training kernel K already held: no kernel is formed again. (n, c, c)."""
        K, n, c = self.problem.kernel(), self.problem.n, self.c
        out = []
        size = self._test_chunk(n)
        for start in range(0, n, size):
            b = min(n, start + size) - start
            cols = slice(start * c, (start + b) * c)
            Kss = K[cols, cols].reshape(b, c, b, c).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
            out.append(self._blocks_from_kernels(K[:, cols], Kss))
        return torch.cat(out)

    def _blocks_from_kernels(
        self, Kx: torch.Tensor, Kss: torch.Tensor, added_variance: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Function space: the symmetrised blocks s² Kss + (diagonal blocks of the data terms) for b points,
        from Kx = K(X, x*) (N, b·c) and their prior blocks Kss (b, c, c). Exact, so ``added_variance`` (see
        :meth:`latent_blocks`) is unused."""
        b = Kss.shape[0]
        blocks = self.s2 * Kss + _diagonal_blocks(self._data_terms(Kx), b, self.c, Kx.dtype, Kx.device)
        return 0.5 * (blocks + blocks.transpose(1, 2))

    def latent_cov(self, Xs: torch.Tensor) -> torch.Tensor:
        """Full posterior covariance J* S J*ᵀ of the outputs at X*, shape (m·c, m·c), example-major."""
        mc = Xs.shape[0] * self.c
        if self._by_kernels():
            need = 8 * (2 * mc * mc + 2 * self.problem.n_obs * mc)
            what = "the test kernel and its cross kernel with the training points"
        else:
            need = mc * self.lin.num_params * 8
            what = "a Jacobian of the test points"
        if need > self.memory_budget:
            raise MemoryBudgetError(
                f"the full predictive covariance for {Xs.shape[0]} points needs {need / 2**30:.1f} GiB for {what}, "
                f"above memory_budget ({self.memory_budget / 2**30:.1f} GiB); predict fewer points at once, ask for "
                "per-example blocks instead, or raise memory_budget"
            )
        if self._by_kernels():
            Kx, Kss = self._dense_kernels(self.problem.all_inputs(), Xs)
            cov = self.s2 * Kss + sum(coef * (L @ R) for coef, L, R in self._data_terms(Kx))
        else:
            B = self.lin.jacobian(Xs).reshape(mc, -1)
            cov = self.latent_cov_rows(B)
        return 0.5 * (cov + cov.T)


def _diagonal_blocks(
    terms: list[tuple[float, torch.Tensor, torch.Tensor]], b: int, c: int, dtype: torch.dtype, device: Any
) -> torch.Tensor:
    """The diagonal c × c blocks (b, c, c) of Σ coef · L R for terms with L (b·c, D), R (D, b·c)."""
    out = torch.zeros(b, c, c, dtype=dtype, device=device)
    for coef, L, R in terms:
        out += coef * torch.einsum("iad,dib->iab", L.reshape(b, c, -1), R.reshape(-1, b, c))
    return out
