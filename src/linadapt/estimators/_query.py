"""``query``: which pool points to label next, shared by both estimators (:mod:`linadapt.inference.acquisition`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from linadapt._memory import resolve_memory_budget
from linadapt._progress import check_progress
from linadapt.estimators._fit import check_n_features
from linadapt.inference.acquisition import (
    PoolCovariance,
    Selection,
    bald_score,
    duplicate_groups,
    greedy_select,
    noise_roots,
    variance_score,
)

__all__ = ["QueryMixin"]

BALD_SAMPLES = 256  # Monte Carlo draws of the logits per point for the BALD score


class QueryMixin:
    """``query(X_pool, k)`` for :class:`~linadapt.LinearizedRegressor` and :class:`~linadapt.LinearizedClassifier`."""

    def query(self, X_pool: Any, k: int, return_scores: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """The k points of ``X_pool`` worth labelling next, chosen jointly and greedily.

        Each pick maximises a score of the posterior at a pool point given the training data *and the earlier
        picks as if they were labelled* — labels are not needed for that, the posterior covariance does not depend
        on them (classification: the Laplace curvature taken at the predicted mean logits) — so a point whose
        uncertainty an earlier pick already resolves (a near-duplicate) is not chosen again, and an exact duplicate
        of a picked input never is.

        * Regression: the posterior variance of the latent outputs, summed over outputs; each pick conditions on
          a noisy label (``noise_var_``, per output where there are several).
        * Classification: BALD, the expected information gain about the weights, H[E_f p(y | f)] − E_f H[p(y | f)]
          under the Gaussian over the logits (Monte Carlo, 256 draws with the estimator's ``seed``; multilabel and
          bernoulli: summed over outputs); each pick adds the likelihood's curvature at its predicted mean logits.

        The first pick is the most uncertain point. For a pool whose joint covariance (3 (m·c)² floats) fits half
        of ``memory_budget`` it is formed once; otherwise the pool is processed in chunks, the conditioning kept
        as a rank-(t·c) update through the picks' cross covariances (memory O(m·c²) plus a chunk, about k
        predictive-variance passes over the pool); a ``MemoryBudgetError`` when even that does not fit. With
        ``marginalize=True`` the covariance is that at the fitted hyperparameters.

        Args:
            X_pool: (m, ...) unlabelled inputs.
            k: how many to choose, 1 ≤ k ≤ m (and at most the number of distinct inputs).
            return_scores: also return each pick's score at the time it was chosen.

        Returns:
            the indices into ``X_pool`` (k,) int64, distinct, in the order chosen; with ``return_scores`` also
            the scores (k,) (non-increasing up to Monte Carlo noise).
        """
        selection = self._query(X_pool, k)
        if return_scores:
            return selection.indices, selection.scores
        return selection.indices

    def _query(self, X_pool: Any, k: int, dense: bool | None = None, return_blocks: bool = False) -> Selection:
        """The :class:`~linadapt.inference.acquisition.Selection` behind :meth:`query` (``dense``: force a path)."""
        self._check_fitted()  # type: ignore[attr-defined]
        lin, post = self.linearization_, self.posterior_  # type: ignore[attr-defined]
        post.progress = check_progress(self.progress)  # type: ignore[attr-defined]
        Xs = lin.prepare_inputs(X_pool, "X_pool")
        check_n_features(self, Xs)
        m, c = Xs.shape[0], int(post.c)
        budget = resolve_memory_budget(self.memory_budget)  # type: ignore[attr-defined]
        pool = PoolCovariance(post, Xs, c, budget)
        likelihood = getattr(self, "likelihood_", None)
        if likelihood is None:
            roots = noise_roots(self.noise_var_, m, c, lin.device)  # type: ignore[attr-defined]
            score = variance_score
        else:
            mean = torch.zeros(0, c)
            if m:  # the MAP logits, f(X*) from the same forward-mode pass as J(X*) δ
                outputs, shift = post.outputs_and_shift(Xs)
                mean = (outputs + shift).to(torch.float64)
            eye = torch.eye(c, dtype=mean.dtype, device=mean.device).expand(m, c, c)
            roots = likelihood.curvature(mean).root(eye.contiguous())
            categorical = likelihood.name == "categorical"
            seed = int(self.seed)  # type: ignore[attr-defined]

            def score(blocks: torch.Tensor) -> torch.Tensor:
                return bald_score(mean, blocks, categorical, BALD_SAMPLES, seed)

        return greedy_select(pool, k, score, roots, duplicate_groups(Xs), dense, return_blocks)
