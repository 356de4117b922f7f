"""``LinearizedRegressor``: scikit-learn style GP regression with a trained network's tangent kernel."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.exceptions import NotFittedError
from torch import nn

from linadapt._memory import resolve_memory_budget
from linadapt._progress import check_progress
from linadapt._validation import as_target_tensor, check_choice, check_positive
from linadapt.distributed import make_sharding, prepare_fit, shard_signature
from linadapt.estimators._fit import check_dense_only, check_n_features, linearize_shard, record_n_features
from linadapt.estimators._query import QueryMixin
from linadapt.estimators._update import UpdateMixin
from linadapt.estimators.persistence import SaveLoadMixin, register_estimator
from linadapt.inference.evidence import NoisePrior, evidence_bounds, noise_prior_from
from linadapt.inference.hyper_averaging import HyperparameterMixture
from linadapt.inference.per_output_noise import (
    PerOutputEvidence,
    PerOutputPosterior,
    fit_per_output,
    noise_diagonal,
    noise_values,
    parse_noise_var,
    refuse_per_output,
    resolve_noise,
)
from linadapt.inference.prior_groups import (
    GroupedKernels,
    GroupedPosterior,
    GroupSpec,
    maximize_group_evidence,
    resolve_groups,
)
from linadapt.inference.regression import (
    RegressionProblem,
    SolverOptions,
    choose_space_and_solver,
    fit_shared_noise,
    shared_noise_guess,
)
from linadapt.inference.sampling import check_sample_memory, gaussian_samples, sample_count
from linadapt.jacobian.linearization import Linearization
from linadapt.jacobian.selection import ParamSpec

__all__ = ["LinearizedRegressor"]


@register_estimator
class LinearizedRegressor(QueryMixin, UpdateMixin, SaveLoadMixin, RegressorMixin, BaseEstimator):
    """Gaussian-process regression with the finite-width NTK of a trained network.

    The network f(x; θ̂) is replaced by its linearization f(x; θ̂) + J(x)(θ − θ̂) with prior
    θ − θ̂ ~ N(0, prior_var · I) and Gaussian noise of variance noise_var on every output (or σ²_a on output a,
    ``noise="per_output"``), i.e. a GP with mean m(x) and kernel prior_var · J(x) J(x')ᵀ whose c × c output blocks
    couple the outputs.

    Args:
        model: a trained ``torch.nn.Module`` returning (n, c) or (n,) outputs. It is never modified.
        params: parameters to adapt: ``"all"``, ``"last"``, ``"bias"``, or names / glob patterns.
        prior_var: s², the prior variance of θ − θ̂ (starting value when optimising, fixed otherwise).
        prior_groups: one prior variance per group of weights instead of one for all: ``"layers"`` (a group
            per module owning adapted weights), ``"tensors"`` (per parameter tensor), or a list of name /
            glob patterns (or lists of them), one group each, the unmatched weights forming a group
            ``"rest"``. The kernel is then Σ_g s²_g J_g Jᵀ_g, every s²_g learned by the evidence (starting
            from the best single s²; ``prior_var`` is each group's value without optimisation). Uses the dense
            function-space path (space ``"function"``, solver ``"cholesky"``); see
            :mod:`linadapt.inference.prior_groups`.
        noise_var: σ², the observation-noise variance, or c values σ²_1..c, one per output; ``None`` starts from
            0.1 × the variance of the residuals y − m(X) (per output with per-output noise; without optimisation,
            that guess is used).
        noise: ``"shared"`` — one σ² for every output; ``"per_output"`` — σ²_a for output a, each learned by the
            evidence (with ``hyperprior``, each relative to its own output's mean squared residual v̄_a);
            ``"auto"`` — per output exactly when ``noise_var`` gives c values. ``"shared"`` with c different values
            is an error (c equal values are that one σ²). Per-output noise uses the dense (Cholesky) solves in
            either space, in one process, without ``marginalize`` or ``prior_groups``; on a one-output model it
            is the shared model. See :mod:`linadapt.inference.per_output_noise`.
        optimize_hyperparameters: learn prior_var and noise_var by maximising the log marginal
            likelihood times ``hyperprior`` (type-II MAP; type-II maximum likelihood with ``hyperprior=None``).
        hyperprior: ``"default"`` — a weakly informative log-normal prior on the noise variance relative to the
            mean squared residual v̄ of the prior mean, log(σ²/v̄) ~ N(−4, 2²), and a flat one on prior_var
            (:class:`~linadapt.inference.evidence.NoisePrior`): with a handful of points the evidence alone is
            often largest where σ² → 0 and the points are interpolated, and the predictive is then far too
            confident; ``None`` — the evidence alone; a pair (loc, scale) — log(σ²/v̄) ~ N(loc, scale²). Applies to
            the point estimate (also with ``prior_groups``); ``marginalize=True`` keeps its log-uniform prior.
        marginalize: average the predictive over (prior_var, noise_var) instead of fixing them: a
            log-uniform hyperprior over the evidence search's box, the posterior on a grid, the predictive a
            mixture of Gaussians (see :mod:`linadapt.inference.hyper_averaging`). Guards against the over-confident
            tiny-noise
            optimum few points can produce. ``predict`` then gives the mixture's mean and std, and
            ``log_predictive_density`` its exact density. One-output models, dense function space,
            ``prior_mean="network"``, no prior groups; ``prior_var_`` / ``noise_var_`` stay the optimum.
        mean: ``"network"`` — the prior mean is f(x; θ̂); ``"zero"`` — a zero-mean GP with the NTK.
        prior_mean: where the weight prior is centred: ``"network"`` — θ − θ̂ ~ N(0, prior_var · I)
            (adaptation: the trained weights are the prior guess); ``"zero"`` — θ ~ N(0, prior_var · I), the
            weight-decay prior of post-hoc Laplace (a GP with mean f(x; θ̂) − J(x) θ̂); at a network trained
            to the MAP of that prior this is the GLM Laplace posterior (equal to laplace-torch's).
        space: ``"function"`` (n·c sized solves), ``"parameter"`` (p sized solves), or ``"auto"`` (the smaller).
        solver: ``"cholesky"`` (dense), ``"cg"`` (matrix-free preconditioned CG; hyperparameters by Lanczos
            quadrature), or ``"auto"`` (dense when the matrix is small).
        chunk_size: examples per chunk in Jacobian products (bounds peak memory).
        device: where to compute (default: the model's device).
        cg_tol: relative residual target of CG solves.
        cg_max_iter: CG iterations per round (default min(dimension, 1000)).
        seed: seed of the stochastic log-determinant probes (matrix-free evidence).
        distributed: data-parallel fit inside an initialised ``torch.distributed`` process group: every rank
            calls ``fit`` with its own shard of (X, y) (uneven sizes allowed, at least one example each);
            products all-reduce over the ranks, and every rank ends with the same posterior, so ``predict``
            gives the same answer on every rank. See docs/distributed.md.
        memory_budget: bytes (or a size such as ``"512MiB"``, ``"4GiB"``) linadapt's own arrays may take at
            once — kernel matrices, Jacobian chunks, per-layer factors, the held training Jacobian, test-point
            cross kernels; ``None``: min(2 GiB, ¼ of the available memory). Past it a path chunks or goes
            matrix-free; where nothing fits, a ``MemoryBudgetError`` names the size needed (docs/usage.md).

        progress: a progress bar on stderr while the predictive covariance of many test points is computed:
            ``"auto"`` (on an interactive terminal, when the prediction runs in several chunks), True, False.
        output_fn: maps the network's return value to the (n, c) or (n,) outputs that are linearized (e.g.
            ``lambda out: out["logits"][:, 0]``); default: a tensor, a dict's ``"logits"``, an object's ``.logits``
            (HuggingFace). X may be a mapping of tensors (``model(**X)``). Not saved: pass it to ``load`` again.

    Attributes (after ``fit``):
        n_features_in_: the number of input features (2-D floating inputs; predictions on another width are
            refused).
        prior_var_, noise_var_: the hyperparameters used (``prior_var_`` is None with ``prior_groups``;
            ``noise_var_`` a (c,) numpy array with per-output noise, else a float).
        prior_vars_: with ``prior_groups``, {group label: s²_g}; the groups' parameter names in ``groups_``.
        space_, solver_: the choices made (``solver_`` becomes ``"cholesky"`` after a CG fallback).
        n_outputs_: c. linearization_: the :class:`~linadapt.jacobian.linearization.Linearization`.
        log_marginal_likelihood_value_: log p(y | prior_var_, noise_var_).
        solve_info_: the last CG report (iterations, relative residual) or ``None`` for Cholesky.
    """

    def __init__(
        self,
        model: nn.Module,
        params: ParamSpec = "all",
        prior_var: float = 1.0,
        prior_groups: GroupSpec = None,
        noise_var: float | Any = None,
        noise: str = "auto",
        optimize_hyperparameters: bool = True,
        hyperprior: str | tuple[float, float] | None = "default",
        marginalize: bool = False,
        mean: str = "network",
        prior_mean: str = "network",
        space: str = "auto",
        solver: str = "auto",
        chunk_size: int | None = None,
        device: str | torch.device | None = None,
        cg_tol: float = 1e-10,
        cg_max_iter: int | None = None,
        seed: int = 0,
        distributed: bool = False,
        memory_budget: int | str | None = None,
        progress: bool | str = "auto",
        output_fn: Any = None,
    ) -> None:
        self.model = model
        self.params = params
        self.prior_var = prior_var
        self.prior_groups = prior_groups
        self.noise_var = noise_var
        self.noise = noise
        self.optimize_hyperparameters = optimize_hyperparameters
        self.hyperprior = hyperprior
        self.marginalize = marginalize
        self.mean = mean
        self.prior_mean = prior_mean
        self.space = space
        self.solver = solver
        self.chunk_size = chunk_size
        self.device = device
        self.cg_tol = cg_tol
        self.cg_max_iter = cg_max_iter
        self.seed = seed
        self.distributed = distributed
        self.memory_budget = memory_budget
        self.progress = progress
        self.output_fn = output_fn

    def __sklearn_tags__(self) -> Any:
        """scikit-learn's tags: y may have several outputs (one column per network output)."""
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    # ------------------------------------------------------------------ fitting
    def _options(self) -> SolverOptions:
        check_positive(self.cg_tol, "cg_tol")
        return SolverOptions(
            cg_tol=float(self.cg_tol),
            cg_max_iter=self.cg_max_iter,
            seed=int(self.seed),
            memory_budget=resolve_memory_budget(self.memory_budget),
        )

    def fit(self, X: Any, y: Any) -> LinearizedRegressor:
        """Condition the linearized GP on (X, y) and, if asked, learn prior_var and noise_var.

        Args:
            X: (n, ...) inputs the model accepts (array-like or tensor).
            y: (n,) targets for a one-output model, or (n, c) for c outputs (floating point).
        """
        return self._fit(X, y, None)

    def _fitted_state(self) -> dict[str, Any]:
        """The fitted hyperparameters a ``.linadapt`` file stores (JSON)."""
        fitted: dict[str, Any] = {"prior_var_": None if self.prior_var_ is None else float(self.prior_var_)}
        noise = self.noise_var_
        fitted["noise_var_"] = noise.tolist() if isinstance(noise, np.ndarray) else float(noise)
        if self.prior_vars_ is not None:
            fitted["prior_vars_"] = dict(self.prior_vars_)
        return fitted

    def _refit_from_state(self, X: Any, y: Any, fitted: dict[str, Any]) -> LinearizedRegressor:
        """The posterior on (X, y) at the stored hyperparameters (no search): what ``load`` rebuilds."""
        prior = fitted["prior_vars_"] if fitted.get("prior_vars_") is not None else fitted["prior_var_"]
        return self._fit(X, y, (prior, fitted["noise_var_"]))

    def _fit(self, X: Any, y: Any, fixed: tuple[Any, float] | None) -> LinearizedRegressor:
        """``fit``, or with ``fixed`` = (prior_var_, noise_var_) the posterior at those values (used by load;
        with prior groups, prior_var_ is the {label: s²_g} dict)."""
        if not isinstance(self.model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(self.model).__name__}")
        check_choice(self.mean, "mean", ("network", "zero"))
        check_choice(self.prior_mean, "prior_mean", ("network", "zero"))
        if self.mean == "zero" and self.prior_mean == "zero":
            raise ValueError(
                "mean='zero' (drop the network's outputs from the GP mean) and prior_mean='zero' (centre the "
                "weight prior at 0) are alternatives: choose one"
            )
        check_choice(self.space, "space", ("auto", "function", "parameter"))
        check_choice(self.solver, "solver", ("auto", "cholesky", "cg"))
        prior0 = check_positive(self.prior_var, "prior_var")
        noise_prior = None if self.marginalize else noise_prior_from(self.hyperprior)
        noise_given = parse_noise_var(self.noise_var)
        resolve_noise(self.noise, None, 1)  # checks the choice before the linearization
        distributed = bool(self.distributed)
        if self.prior_groups is not None:
            check_dense_only(self, "prior_groups")
        if self.marginalize:
            check_dense_only(self, "marginalize=True", ("prior_groups", self.prior_groups is not None))

        def local() -> tuple[Linearization, torch.Tensor, torch.Tensor, torch.Tensor]:
            lin, Xt, f0 = linearize_shard(self, X, distributed)
            yt = as_target_tensor(y, Xt.shape[0], "y").to(lin.device)
            c = f0.shape[1]
            if yt.dim() == 1 and c != 1:
                raise ValueError(f"y has shape (n,) but the model has {c} outputs: pass y of shape (n, {c})")
            if yt.dim() == 2 and yt.shape[1] != c:
                raise ValueError(f"y has {yt.shape[1]} columns but the model has {c} outputs: y must be (n, {c})")
            return lin, Xt, yt, f0

        lin, Xt, yt, f0 = prepare_fit(local, distributed, "LinearizedRegressor.fit (checking the data shard)")
        record_n_features(self, Xt)
        sharding = make_sharding(Xt.shape[0], shard_signature(Xt, yt)) if distributed else None
        if sharding is not None:
            f0, yt_all = sharding.gather(f0), sharding.gather(yt)
        else:
            yt_all = yt
        c = f0.shape[1]
        per_output, noise0 = resolve_noise(self.noise, noise_given, c)
        if per_output:
            refuse_per_output(bool(self.marginalize), self.prior_groups is not None, distributed, self.solver == "cg")
        self._y_ndim = yt.dim()
        Y = yt_all.reshape(-1, c)
        m = f0 if self.mean == "network" else torch.zeros_like(f0)
        options = self._options()
        problem = RegressionProblem(lin, Xt, (Y - m).reshape(-1), options, sharding)
        offset = None
        if self.prior_mean == "zero":  # δ = θ − θ̂ ~ N(−θ̂, s² I): prior mean of the outputs f(X; θ̂) − J θ̂
            offset = -lin.theta_vector()
            problem.r = problem.r - problem.jvp(offset.unsqueeze(0))[0].reshape(-1)
        r = problem.r
        n_obs = r.numel()
        if noise0 is None and not per_output:
            noise0 = shared_noise_guess(r, Y)
        self.prior_vars_ = self.groups_ = None
        if self.prior_groups is not None:
            return self._fit_groups(lin, Xt, yt, r, prior0, noise0, fixed, noise_prior)
        if per_output:
            optimize = self.optimize_hyperparameters and fixed is None
            posterior, prior, noise = fit_per_output(
                problem, self.space, prior0, noise0, fixed, optimize, noise_prior, offset
            )
            space = posterior.space
        else:
            space, solver = choose_space_and_solver(
                lin, Xt, n_obs, self.space, self.solver, options.memory_budget, sharded=sharding is not None
            )
            optimize = fixed is None and bool(self.optimize_hyperparameters)
            posterior, prior, noise = fit_shared_noise(
                problem, space, solver, fixed or (prior0, noise0), optimize, noise_prior, offset
            )
        self.mixture_ = None
        if self.marginalize:
            self.mixture_ = self._mixture(lin, Xt, r, prior, noise, c)
        self.linearization_ = lin
        self.problem_ = problem
        self.posterior_ = posterior
        self.prior_var_, self.noise_var_ = prior, noise
        self.space_, self.solver_ = space, posterior.solver
        self.n_outputs_ = c
        self.solve_info_ = posterior.solve_info
        self._train_data = (Xt, yt)
        self._sharding = sharding
        return self

    def _mixture(
        self, lin: Linearization, Xt: torch.Tensor, r: torch.Tensor, prior: float, noise: float, c: int
    ) -> HyperparameterMixture:
        if c != 1:
            raise ValueError(f"marginalize=True supports one-output models; this one has {c} outputs")
        n_obs = r.numel()
        budget = self._options().memory_budget
        if 3 * 8 * n_obs * n_obs > budget:
            raise ValueError(
                f"marginalize=True needs the dense {n_obs} × {n_obs} kernel and its eigenvectors, more than the "
                f"memory budget ({budget / 2**30:.1f} GiB)"
            )
        bounds = evidence_bounds(float(r @ r), n_obs)  # the hyperprior's support: the evidence search's box
        return HyperparameterMixture(lin.ntk(Xt), r, prior, noise, bounds)

    def log_predictive_density(self, X: Any, y: Any) -> np.ndarray:
        """log p(y* | training data) of observed targets y* at X, per example (one output) or per
        (example, output): the Gaussian predictive at the fitted hyperparameters, or the mixture over them
        with ``marginalize=True``. Its negative mean is the test NLL."""
        self._check_fitted()
        lin = self.linearization_
        Xs = lin.prepare_inputs(X, "X")
        check_n_features(self, Xs)
        yt = as_target_tensor(y, Xs.shape[0], "y").reshape(Xs.shape[0], -1).to(lin.device)
        if yt.shape[1] != self.n_outputs_:
            raise ValueError(f"y has {yt.shape[1]} outputs per example, the model {self.n_outputs_}")
        if self.mixture_ is not None:
            prior_mean, Ks, kss = self._mixture_inputs(Xs)
            out = self.mixture_.log_density(Ks, kss, yt[:, 0] - prior_mean)
        else:
            mean, std = self.predict(X, return_std=True)
            mean_t = torch.as_tensor(mean, dtype=torch.float64).reshape(yt.shape)
            var = torch.as_tensor(std, dtype=torch.float64).reshape(yt.shape) ** 2
            out = -0.5 * (math.log(2 * math.pi) + torch.log(var)) - 0.5 * (yt.cpu() - mean_t) ** 2 / var
        out = out.cpu().numpy()
        return out.reshape(-1) if self._y_ndim == 1 else out.reshape(Xs.shape[0], -1)

    def _fit_groups(
        self,
        lin: Linearization,
        Xt: torch.Tensor,
        yt: torch.Tensor,
        r: torch.Tensor,
        prior0: float,
        noise0: float,
        fixed: tuple[Any, float] | None,
        noise_prior: NoisePrior | None = None,
    ) -> LinearizedRegressor:
        """The fit with one prior variance per group (dense function space, :mod:`linadapt.inference.prior_groups`)."""
        groups = resolve_groups(list(lin.param_names), self.prior_groups)
        n_obs = r.numel()
        need = 8 * (len(groups) + 2) * n_obs * n_obs
        budget = self._options().memory_budget
        if need > budget:
            raise ValueError(
                f"prior_groups needs {len(groups)} dense {n_obs} × {n_obs} kernels ({need / 2**30:.1f} GiB), more "
                f"than the memory budget ({budget / 2**30:.1f} GiB): use fewer groups or fewer training points"
            )
        kernels = GroupedKernels(self.model, groups, self.chunk_size, self.device, lin.memory_budget, lin.output_fn)
        Ks = kernels.gram(Xt)
        labels = [label for label, _ in groups]
        if fixed is not None:
            given, noise = fixed
            if set(given) != set(labels):
                raise ValueError(f"saved prior groups {sorted(given)} differ from this model's {sorted(labels)}")
            s2 = np.array([float(given[label]) for label in labels])
        elif self.optimize_hyperparameters:
            s2, noise, _ = maximize_group_evidence(Ks, r, prior0, noise0, noise_prior)
        else:
            s2, noise = np.full(len(groups), prior0), noise0
        posterior = GroupedPosterior(kernels, lin, Xt, r, Ks, s2, noise)
        c = r.numel() // Xt.shape[0]
        self.linearization_, self.problem_, self.posterior_ = lin, None, posterior
        self.prior_var_, self.noise_var_ = None, float(noise)
        self.prior_vars_ = {label: float(v) for label, v in zip(labels, s2)}
        self.mixture_ = None
        self.groups_ = {label: list(names) for label, names in groups}
        self.space_, self.solver_, self.n_outputs_, self.solve_info_ = "function", "cholesky", c, None
        self._train_data = (Xt, yt)
        self._sharding = None
        return self

    @property
    def log_marginal_likelihood_value_(self) -> float:
        """log p(y) at the fitted hyperparameters (computed on first access, then cached).

        Exact on the Cholesky path; on the CG path the quadratic term comes from the converged solve and the
        log-determinant from stochastic Lanczos quadrature. Not computed during ``fit`` unless the
        hyperparameters were optimised (the spectrum is then already there).
        """
        self._check_fitted()
        post = self.posterior_
        if isinstance(post, (GroupedPosterior, PerOutputPosterior)):
            return post.log_ml
        if "lml" not in self.problem_.cache:
            spec = self.problem_.spectrum(post.space, post.solver)
            if spec.exact:
                value = spec(post.s2, post.sig2)
            else:
                logdet = spec.logdet(post.s2, post.sig2)
                value = -0.5 * post.quad_term() - 0.5 * logdet - 0.5 * post.n_obs * math.log(2 * math.pi)
            self.problem_.cache["lml"] = value
        return self.problem_.cache["lml"]  # type: ignore[return-value]

    def log_marginal_likelihood(self, prior_var: float | None = None, noise_var: Any = None) -> float:
        """log p(y | prior_var, noise_var) on the training data (defaults: the fitted values; with per-output
        noise, ``noise_var`` is one value for every output or c values).

        Exact on the Cholesky path; on the CG path the log-determinant is a stochastic Lanczos estimate.
        """
        self._check_fitted()
        if prior_var is None and noise_var is None:
            return self.log_marginal_likelihood_value_
        post = self.posterior_
        if isinstance(post, GroupedPosterior):  # prior_var: one value for every group, or {label: s²_g}
            given = prior_var if prior_var is not None else self.prior_vars_
            if not isinstance(given, dict):
                given = dict.fromkeys(self.prior_vars_, given)
            if set(given) != set(self.prior_vars_):
                raise ValueError(f"prior_var must give every group {sorted(self.prior_vars_)}, got {sorted(given)}")
            s2 = np.array([check_positive(given[label], f"prior_var[{label!r}]") for label in self.prior_vars_])
            sig2 = check_positive(noise_var if noise_var is not None else self.noise_var_, "noise_var")
            return post.evidence(s2, sig2)
        s2 = check_positive(prior_var if prior_var is not None else self.prior_var_, "prior_var")
        if isinstance(post, PerOutputPosterior):
            sig2s = noise_values(noise_var if noise_var is not None else self.noise_var_, self.n_outputs_)
            return PerOutputEvidence.from_problem(self.problem_, post.space)(s2, sig2s)
        sig2 = check_positive(noise_var if noise_var is not None else self.noise_var_, "noise_var")
        return self.problem_.spectrum(self.posterior_.space, self.posterior_.solver)(s2, sig2)

    # ------------------------------------------------------------------ prediction
    def _check_fitted(self) -> None:
        if not hasattr(self, "posterior_"):
            raise NotFittedError("this LinearizedRegressor is not fitted yet: call fit(X, y) first")

    def _prior_mean(self, Xs: torch.Tensor) -> torch.Tensor:
        """m(X*) for prepared inputs, (m, c): the network's outputs, or zeros with ``mean="zero"``."""
        lin = self.linearization_
        if self.mean == "network":
            return lin.outputs(Xs)
        return torch.zeros(Xs.shape[0], self.n_outputs_, dtype=torch.float64, device=lin.device)

    def _latent_mean(self, X: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepared inputs and the posterior mean of f there, m(X*) + J(X*) δ̄, shape (m, c)."""
        Xs = self.linearization_.prepare_inputs(X, "X")
        check_n_features(self, Xs)
        fused = getattr(self.posterior_, "outputs_and_shift", None)  # f(X*) and J(X*) δ̄ from one forward-mode pass
        if self.mean == "network" and fused is not None:
            outputs, shift = fused(Xs)
            return Xs, outputs + shift
        return Xs, self._prior_mean(Xs) + self.posterior_.mean_shift(Xs)

    def _mixture_inputs(self, Xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For the hyperparameter mixture (one output) at prepared inputs: the prior mean (m,), the cross
        kernel K(X*, X) (m, N) and the prior variances k(x*, x*) (m,)."""
        lin = self.linearization_
        return self._prior_mean(Xs)[:, 0], lin.ntk(Xs, self._train_data[0]), lin.ntk_blocks(Xs)[:, 0, 0]

    def predict(
        self,
        X: Any,
        return_std: bool = False,
        return_cov: bool = False,
        include_noise: bool = True,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Predictive mean, and optionally its standard deviation or covariance.

        Args:
            X: (m, ...) inputs.
            return_std: also return the predictive standard deviation, same shape as the mean.
            return_cov: also return the joint predictive covariance: (m, m) for one output, (m, c, m, c)
                for c outputs (entry [i, a, j, b] = Cov(f_a(x_i), f_b(x_j))).
            include_noise: the std / covariance of y (adds noise_var_) rather than of the latent f.

        Returns:
            mean of shape (m,) or (m, c) (as y in ``fit``), as float64 numpy arrays; with ``return_std`` or
            ``return_cov`` a tuple (mean, std) or (mean, cov).
        """
        self._check_fitted()
        if return_std and return_cov:
            raise ValueError("at most one of return_std and return_cov can be requested")
        post, c = self.posterior_, self.n_outputs_
        post.progress = check_progress(self.progress)
        if getattr(self, "mixture_", None) is not None:
            return self._predict_mixture(X, return_std, return_cov, include_noise)
        Xs, mean = self._latent_mean(X)
        vector = self._y_ndim == 1
        out_mean = (mean[:, 0] if vector else mean).cpu().numpy()
        if not (return_std or return_cov):
            return out_mean
        noise = noise_diagonal(self.noise_var_ if include_noise else 0.0, c, mean.device)
        if return_std:
            blocks = post.latent_blocks(Xs, noise)  # noise is zero without include_noise
            var = torch.diagonal(blocks, dim1=-2, dim2=-1).clamp_min(0.0) + noise
            std = var.sqrt()
            return out_mean, (std[:, 0] if vector else std).cpu().numpy()
        cov = post.latent_cov(Xs)
        m = Xs.shape[0]
        cov.diagonal().add_(noise.repeat(m))
        cov = cov.reshape(m, c, m, c)
        return out_mean, (cov[:, 0, :, 0] if vector else cov).cpu().numpy()

    def _predict_mixture(
        self, X: Any, return_std: bool, return_cov: bool, include_noise: bool
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Mean (and std) of the predictive averaged over the hyperparameters (``marginalize=True``)."""
        if return_cov:
            raise ValueError("return_cov is not available with marginalize=True (the predictive is a mixture)")
        Xs = self.linearization_.prepare_inputs(X, "X")
        check_n_features(self, Xs)
        prior_mean, Ks, kss = self._mixture_inputs(Xs)
        shift, var = self.mixture_.moments(Ks, kss, include_noise)
        mean = (prior_mean + shift).cpu().numpy()
        shape = (-1,) if self._y_ndim == 1 else (-1, 1)
        if not return_std:
            return mean.reshape(shape)
        return mean.reshape(shape), var.sqrt().cpu().numpy().reshape(shape)

    def sample(
        self, X: Any, n_samples: int = 1, generator: torch.Generator | None = None, include_noise: bool = False
    ) -> np.ndarray:
        """Joint samples of the posterior function at X (e.g. for Thompson sampling): draws of f(X) for all m
        inputs and c outputs together, from the mean and joint covariance of ``predict(X, return_cov=True)``.

        Args:
            X: (m, ...) inputs.
            n_samples: how many functions to draw.
            generator: a ``torch.Generator`` for the standard normal draws (torch's global one when None); the
                same generator state gives the same samples.
            include_noise: samples of y (adding independent noise of variance ``noise_var_``) rather than of f.

        Returns:
            (n_samples, m) for a 1-D y in ``fit``, else (n_samples, m, c); float64.

        Memory: the (m·c) × (m·c) joint covariance and its Cholesky factor, 16·(m·c)² bytes, on top of what the
        covariance's computation takes; a ``MemoryBudgetError`` when that passes ``memory_budget``.
        """
        self._check_fitted()
        n_samples = sample_count(n_samples)
        if getattr(self, "mixture_", None) is not None:
            raise ValueError("sample is not available with marginalize=True (the predictive is a mixture)")
        post, c = self.posterior_, self.n_outputs_
        post.progress = check_progress(self.progress)
        Xs, mean = self._latent_mean(X)
        check_sample_memory(Xs.shape[0], c, n_samples, self._options().memory_budget)
        cov = post.latent_cov(Xs)
        if include_noise:  # the diagonal is example-major: each output's own variance, repeated over the inputs
            noise = torch.as_tensor(self.noise_var_, dtype=cov.dtype, device=cov.device).reshape(-1)
            cov.diagonal().add_(noise.repeat(Xs.shape[0] * c // noise.numel()))
        draws = gaussian_samples(mean, cov, n_samples, generator)
        return (draws[..., 0] if self._y_ndim == 1 else draws).cpu().numpy()

    def predict_blocks(self, X: Any, include_noise: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Predictive mean (m, c) and per-example c × c covariance blocks (m, c, c)."""
        self._check_fitted()
        if getattr(self, "mixture_", None) is not None:
            raise ValueError("predict_blocks is not available with marginalize=True; use predict(return_std=True)")
        post, c = self.posterior_, self.n_outputs_
        post.progress = check_progress(self.progress)
        Xs, mean = self._latent_mean(X)
        noise = noise_diagonal(self.noise_var_, c, mean.device)
        blocks = post.latent_blocks(Xs, noise if include_noise else None)
        if include_noise:
            blocks = blocks + torch.diag(noise.to(blocks.device))
        return mean.cpu().numpy(), blocks.cpu().numpy()
