"""``update(X_new, y_new)``: the estimators' posterior on all data seen so far, from the one they hold.

The maths is in :mod:`linadapt.inference.updates`; this module validates the new data as ``fit`` does, builds the
extended problem, and, with ``optimize_hyperparameters=True``, re-runs the fit's hyperparameter search on all the
data (from the fit's starting values). The stored training data grow by the new examples, so a saved estimator
holds them all and ``load`` rebuilds the updated posterior.

After a ``distributed=True`` fit every rank calls ``update`` with its own new examples (at least one each, as in
``fit``); the checks of the new data are agreed on by all ranks before any collective, as in ``fit``.
"""

from __future__ import annotations

from typing import Any

import torch
from sklearn.base import ClassifierMixin

from linadapt._inputs import cat_examples, layout
from linadapt._validation import as_target_tensor, check_positive
from linadapt.distributed import prepare_fit
from linadapt.estimators._fit import check_n_features
from linadapt.estimators._targets import encode_targets
from linadapt.inference.evidence import maximize_evidence, noise_prior_from
from linadapt.inference.laplace import LaplacePosterior, optimize_prior_var
from linadapt.inference.per_output_noise import PerOutputPosterior, fit_per_output, parse_noise_var, resolve_noise
from linadapt.inference.regression import RegressionPosterior, dense_fits, shared_noise_guess
from linadapt.inference.scale_prior import scale_prior_from
from linadapt.inference.updates import (
    NewShard,
    extend_laplace_problem,
    extend_regression_problem,
    laplace_start,
    updated_regression_posterior,
)

__all__ = ["UpdateMixin"]


class UpdateMixin:
    """``update`` for :class:`~linadapt.LinearizedRegressor` and :class:`~linadapt.LinearizedClassifier`."""

    def update(self, X_new: Any, y_new: Any, optimize_hyperparameters: bool = False) -> Any:
        """Condition the fitted posterior on more examples as well: afterwards the estimator is the one ``fit``
        would give on all data seen so far (the old examples and these) at the same hyperparameters.

        The kernel or Jacobian pieces already computed are extended rather than recomputed: the Cholesky path in
        function space grows its factor by the new rows (O(N²k) for N old and k new outputs, against N²p + N³/3
        for a refit), in parameter space adds the new rows' J_newᵀJ_new and refactorises the p × p system; the CG
        paths start from the previous solution; classification runs Newton from the current MAP. The space and
        solver of the fit are kept.

        Args:
            X_new: (k, ...) new inputs, shaped as those of ``fit`` (k ≥ 1: empty inputs are an error, as in
                ``fit``).
            y_new: their targets as in ``fit`` (labels must be among ``classes_``).
            optimize_hyperparameters: also search the hyperparameters again on all data, as ``fit`` does (the
                regressor: type-II MAP under ``hyperprior``; the classifier: the Laplace evidence times its
                ``hyperprior``), from ``fit``'s
                starting values; by default ``prior_var_`` and ``noise_var_`` stay as they are.

        Returns:
            self.

        Raises:
            ValueError: invalid new data (shape, NaN / inf, a label outside ``classes_``), or a setting ``update``
                does not support: ``prior_groups``, ``marginalize=True`` (refit instead), or a dense path whose
                matrices would no longer fit ``memory_budget``.
            DistributedError: after a ``distributed=True`` fit, the new data were invalid on some rank (every rank
                raises it, naming the ranks and their messages; an empty shard is invalid too).
        """
        self._check_fitted()  # type: ignore[attr-defined]
        unsupported = [
            name
            for name, bad in (
                ("prior_groups", getattr(self, "prior_groups", None) is not None),
                ("marginalize=True", bool(getattr(self, "marginalize", False))),
            )
            if bad
        ]
        if unsupported:
            raise ValueError(
                f"update is not available with {', '.join(unsupported)}: fit again on all the data instead"
            )
        lin = self.linearization_
        X_old = self._train_data[0]
        sharding = getattr(self, "_sharding", None)
        post = self.posterior_

        def check() -> Any:
            Xn = lin.prepare_inputs(X_new, "X_new")
            check_n_features(self, Xn)
            if layout(Xn) != layout(X_old):
                raise ValueError(f"X_new has examples of {layout(Xn)}, but the estimator was fitted on {layout(X_old)}")
            if sharding is not None and Xn.shape[0] < 1:
                raise ValueError(
                    "this rank's X_new is empty: after a distributed fit every rank updates with at least one example"
                )
            return Xn

        Xn = prepare_fit(check, sharding is not None, f"{type(self).__name__}.update (checking the new data)")
        shard = None
        if sharding is not None:
            shard = NewShard(*sharding.extended(Xn.shape[0]))
        n_obs = (post.problem.n + (Xn.shape[0] if shard is None else shard.new.n)) * post.c
        if post.solver == "cholesky" and not dense_fits(post.space, n_obs, lin.num_params, post.memory_budget):
            raise ValueError(
                f"after the update the dense {post.space}-space matrices of N = {n_obs:,} outputs would exceed the "
                "memory budget: fit again on all the data (fit chooses a matrix-free solver) or raise memory_budget"
            )
        if isinstance(self, ClassifierMixin):
            return self._update_classifier(Xn, y_new, bool(optimize_hyperparameters), shard)
        return self._update_regressor(Xn, y_new, bool(optimize_hyperparameters), shard)

    # ------------------------------------------------------------------ regression
    def _update_regressor(self, Xn: Any, y_new: Any, optimize: bool, shard: NewShard | None) -> Any:
        lin, post, c = self.linearization_, self.posterior_, self.n_outputs_

        def targets() -> torch.Tensor:
            yt = as_target_tensor(y_new, Xn.shape[0], "y_new").to(lin.device)
            if yt.dim() == 1 and c != 1:
                raise ValueError(f"y_new has shape (k,) but the model has {c} outputs: pass y_new of shape (k, {c})")
            if yt.dim() == 2 and yt.shape[1] != c:
                raise ValueError(f"y_new has {yt.shape[1]} columns but the model has {c} outputs: it must be (k, {c})")
            return yt

        yt = prepare_fit(targets, shard is not None, "LinearizedRegressor.update (checking the new targets)")
        Y = yt.reshape(-1, c)
        r = Y - lin.outputs(Xn) if self.mean == "network" else Y.clone()
        if post.prior_offset is not None:
            r = r - lin.jvp(Xn, post.prior_offset).reshape(r.shape)
        problem = extend_regression_problem(post.problem, Xn, r, shard)
        X_old, y_old = self._train_data
        y_all = torch.cat([y_old, yt.reshape((-1,) if y_old.dim() == 1 else (-1, c)).to(y_old)])
        if optimize:
            Y_all = y_all if shard is None else shard.sharding.gather(y_all)  # every rank's, as in fit
            post = self._search_regression(problem, post, Y_all.reshape(-1, c))
        else:
            post = updated_regression_posterior(post, problem)
        self.problem_, self.posterior_ = problem, post
        if isinstance(post, PerOutputPosterior):
            self.prior_var_, self.noise_var_ = post.s2, post.noise_vars.cpu().numpy()
        else:
            self.prior_var_, self.noise_var_ = post.s2, post.sig2
        self.solver_, self.solve_info_ = post.solver, post.solve_info
        self._train_data = (cat_examples([X_old, Xn]), y_all)
        if shard is not None:
            self._sharding = shard.sharding
        return self

    def _search_regression(self, problem: Any, post: RegressionPosterior, Y: torch.Tensor) -> RegressionPosterior:
        """The fit's hyperparameter search on the extended problem, from the fit's starting values."""
        prior0 = check_positive(self.prior_var, "prior_var")
        noise_prior = noise_prior_from(self.hyperprior)
        _, noise0 = resolve_noise(self.noise, parse_noise_var(self.noise_var), post.c)
        if isinstance(post, PerOutputPosterior):
            posterior, _, _ = fit_per_output(
                problem, post.space, prior0, noise0, None, True, noise_prior, post.prior_offset
            )
            return posterior
        if noise0 is None:  # the fit's guess
            noise0 = shared_noise_guess(problem.r, Y)
        prior, noise, _ = maximize_evidence(problem.spectrum(post.space, post.solver), prior0, noise0, noise_prior)
        return RegressionPosterior(problem, prior, noise, post.space, post.solver, prior_offset=post.prior_offset)

    # ------------------------------------------------------------------ classification
    def _update_classifier(self, Xn: Any, y_new: Any, optimize: bool, shard: NewShard | None) -> Any:
        lin, post = self.linearization_, self.posterior_
        lik = self.likelihood_

        def targets() -> torch.Tensor:
            return encode_targets(lik, y_new, Xn.shape[0], post.c, classes=self.classes_, name="y_new")[0]

        labels = prepare_fit(targets, shard is not None, "LinearizedClassifier.update (checking the new labels)")
        labels = labels.to(lin.device)
        f0 = lin.outputs(Xn)
        if shard is not None:  # every rank's new labels and outputs, in their global order
            f0_all, labels_all = shard.gather(f0), shard.gather(labels)
        else:
            f0_all, labels_all = f0, labels
        problem = extend_laplace_problem(post.problem, Xn, labels_all, f0_all, shard)
        tol, iters = float(self.newton_tol), int(self.newton_max_iter)
        if optimize:
            prior0 = check_positive(self.prior_var, "prior_var")
            prior = scale_prior_from(self.hyperprior)
            new = optimize_prior_var(problem, prior0, post.space, post.solver, tol, iters, prior)
        else:
            start = laplace_start(post, Xn, f0_all, shard)
            new = LaplacePosterior(problem, post.s2, post.space, post.solver, tol, iters, start=start)  # type: ignore[arg-type]
        X_old, labels_old = self._train_data
        self.problem_, self.posterior_ = problem, new
        self.prior_var_ = new.s2
        self.solver_ = new.system.method
        self.n_iter_ = new.newton.iterations
        self.log_marginal_likelihood_value_ = new.log_evidence
        self._train_data = (cat_examples([X_old, Xn]), torch.cat([labels_old, labels.to(labels_old)]))
        if shard is not None:
            self._sharding = shard.sharding
        self.link_, self.loo_nll_ = self.link, None
        if self.link == "auto":
            self._choose_link()  # the leave-one-out choice again, on all the data
        return self
