"""``LinearizedClassifier``: scikit-learn style Laplace classification with a trained network's linearization."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import NotFittedError
from sklearn.metrics import accuracy_score
from torch import nn

from linadapt._memory import resolve_memory_budget
from linadapt._progress import check_progress
from linadapt._validation import check_choice, check_positive
from linadapt.distributed import make_sharding, prepare_fit, shard_signature
from linadapt.estimators._fit import check_n_features, linearize_shard, record_n_features
from linadapt.estimators._query import QueryMixin
from linadapt.estimators._targets import CLASSIFIER_LIKELIHOODS, CLASSIFIER_LINKS, choose_likelihood, encode_targets
from linadapt.estimators._update import UpdateMixin
from linadapt.estimators.persistence import SaveLoadMixin, register_estimator
from linadapt.inference.grouped_laplace import GroupedLaplacePosterior, GroupedLaplaceProblem, optimize_group_prior_vars
from linadapt.inference.laplace import LaplacePosterior, LaplaceProblem, optimize_prior_var
from linadapt.inference.loo import loo_nll
from linadapt.inference.prior_groups import GroupSpec, resolve_groups
from linadapt.inference.regression import SolverOptions, choose_space_and_solver
from linadapt.inference.sampling import check_sample_memory, gaussian_samples, sample_count
from linadapt.inference.scale_prior import scale_prior_from
from linadapt.jacobian.linearization import Linearization
from linadapt.jacobian.selection import ParamSpec
from linadapt.likelihoods import LIKELIHOODS

__all__ = ["LinearizedClassifier"]


@register_estimator
class LinearizedClassifier(QueryMixin, UpdateMixin, SaveLoadMixin, ClassifierMixin, BaseEstimator):
    """Classification with the linearized network and a Laplace posterior over its weights.

    Logits f(x) = f(x; θ̂) + J(x) δ, prior δ = θ − θ̂ ~ N(0, prior_var · I) (or θ ~ N(0, prior_var · I) with
    ``prior_mean="zero"``), a categorical (softmax), Bernoulli (one sigmoid logit) or multilabel (a sigmoid per
    output) likelihood. ``fit`` finds the MAP δ* by Newton's method on the linearized model (whose Hessian is
    exactly the generalized Gauss–Newton matrix JᵀΛJ + I/prior_var) and takes the Gaussian posterior
    N(δ*, (JᵀΛJ + I/prior_var)⁻¹) at it; predictions integrate the softmax or sigmoid over the resulting
    Gaussian on the logits.

    Args:
        model: a trained ``torch.nn.Module`` returning logits of shape (n, c) (or (n,): one logit). It is never
            modified.
        params: parameters to adapt: ``"all"``, ``"last"``, ``"bias"``, or names / glob patterns.
        prior_var: s² (starting value when optimising, fixed otherwise).
        optimize_hyperparameters: choose prior_var by maximising the Laplace evidence (times ``hyperprior``).
        hyperprior: ``"default"``: a boundary-avoiding prior on s² that is flat wherever the adapted logits' mean
            prior variance v = s² · tr K / N is at least 1 and a half-log-normal tail (scale 2) below, so that
            a nearly flat evidence on a few labels cannot send s² to 0 and leave a new head at its random
            initialisation; ``None``: the evidence alone (type-II maximum likelihood); a pair (loc, scale) moves
            the tail's start to v = e^loc. See :mod:`linadapt.inference.scale_prior`.
        prior_groups: one prior variance per group of weights instead of one for all — e.g. the new head and
            the backbone, whose scales an adapted network rarely shares: ``"layers"`` (a group per module owning
            adapted weights), ``"tensors"``, or a list of name / glob patterns (or lists of them), one group
            each, the unmatched weights forming a group ``"rest"``. The prior kernel of the logits is then
            Σ_g s²_g J_g Jᵀ_g, every s²_g learned by the Laplace evidence (a derivative-free search from the
            best single s², so suited to a handful of groups; ``prior_var`` is each group's value without
            optimisation). Dense function space in one process; see
            :mod:`linadapt.inference.grouped_laplace`.
        likelihood: ``"categorical"`` (softmax over c ≥ 2 logits; integer labels), ``"bernoulli"`` (one logit,
            P(y = 1) = σ(f); labels 0/1 or two distinct labels), ``"multilabel"`` (c independent binary outcomes,
            P(y_k = 1) = σ(f_k); a 0/1 target matrix (n, c)), or ``"auto"``: multilabel for a 2-D target with
            several columns, bernoulli for a one-output model, categorical otherwise (chosen at ``fit``, in
            ``likelihood_``).
        link: how probabilities are computed from the Gaussian over logits: ``"probit"``, ``"mc"``
            (Monte Carlo with ``n_samples`` draws, seeded by ``seed``), ``"bridge"`` (Laplace bridge; categorical
            only — for a sigmoid its mean is σ(μ), the map readout, so it is refused there) or ``"map"`` (softmax
            or sigmoid of the posterior mean logits, the covariance ignored), or ``"auto"``: whichever of the
            likelihood's candidates (probit, bridge, map; probit, map for the sigmoid likelihoods) has the best
            approximate leave-one-out log-likelihood on the training data (:mod:`linadapt.inference.loo`; chosen
            at ``fit``, in ``link_``) — the default (with ``distributed=True`` every rank scores all training
            points, so all make the same choice). ``"probit"`` is the plain Laplace predictive.
        n_samples: Monte Carlo draws per example for ``link="mc"``.
        prior_mean: ``"network"`` — the prior is centred at the trained weights (adaptation);
            ``"zero"`` — centred at 0, the weight-decay prior of post-hoc Laplace on the training data.
        space: ``"function"`` (n·c sized systems), ``"parameter"`` (p sized), or ``"auto"`` (the smaller).
        solver: ``"cholesky"`` (dense), ``"cg"`` (matrix-free Newton-CG with GGN-vector products; evidence
            log-determinants by stochastic Lanczos quadrature), or ``"auto"`` (dense when small).
        chunk_size: examples per chunk in Jacobian products. device: where to compute.
        cg_tol, cg_max_iter: CG settings for the posterior solves.
        newton_tol: stop Newton when half the squared Newton decrement (the predicted decrease of the
            negative log posterior) is below newton_tol · max(1, |objective|).
        newton_max_iter: Newton iterations per MAP search.
        seed: seed of Monte Carlo predictions and stochastic log-determinant probes.
        distributed: data-parallel fit inside an initialised ``torch.distributed`` process group: every rank
            calls ``fit`` with its own shard of (X, y) (uneven sizes allowed, at least one example each);
            every rank ends with the same posterior. See docs/distributed.md.
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
        likelihood_: the :class:`~linadapt.likelihoods.base.Likelihood` fitted (``likelihood``, or the choice of
            ``"auto"``).
        classes_: the label of each output: array([0, …, c − 1]) for integer labels that are output indices, else
            the c distinct labels of y in sorted order (any labels scikit-learn accepts); bernoulli: the two
            labels (array([0, 1]) for 0/1 labels); multilabel: array([0, …, c − 1]), the outputs.
            n_classes_: the number of classes (2 for bernoulli; c, the outputs, for multilabel).
        n_features_in_: the number of input features (2-D floating inputs; predictions on another width are
            refused).
        prior_var_: s² used (None with ``prior_groups``). space_, solver_: the choices made.
        prior_vars_: with ``prior_groups``, {group label: s²_g}; the groups' parameter names in ``groups_``.
        linearization_, posterior_: the linearization and the :class:`~linadapt.inference.laplace.LaplacePosterior`.
        n_iter_: Newton iterations of the final MAP search.
        log_marginal_likelihood_value_: the Laplace evidence at prior_var_.
        link_: the link used by ``predict_proba`` (``link``, or the choice made with ``link="auto"``).
        loo_nll_: with ``link="auto"``, the mean LOO negative log-likelihood of each candidate link.
    """

    def __init__(
        self,
        model: nn.Module,
        params: ParamSpec = "all",
        prior_var: float = 1.0,
        optimize_hyperparameters: bool = True,
        prior_groups: GroupSpec = None,
        hyperprior: Any = "default",
        likelihood: str = "auto",
        link: str = "auto",
        n_samples: int = 1000,
        prior_mean: str = "network",
        space: str = "auto",
        solver: str = "auto",
        chunk_size: int | None = None,
        device: str | torch.device | None = None,
        cg_tol: float = 1e-10,
        cg_max_iter: int | None = None,
        newton_tol: float = 1e-12,
        newton_max_iter: int = 100,
        seed: int = 0,
        distributed: bool = False,
        memory_budget: int | str | None = None,
        progress: bool | str = "auto",
        output_fn: Any = None,
    ) -> None:
        self.model = model
        self.params = params
        self.prior_var = prior_var
        self.optimize_hyperparameters = optimize_hyperparameters
        self.prior_groups = prior_groups
        self.hyperprior = hyperprior
        self.likelihood = likelihood
        self.link = link
        self.n_samples = n_samples
        self.prior_mean = prior_mean
        self.space = space
        self.solver = solver
        self.chunk_size = chunk_size
        self.device = device
        self.cg_tol = cg_tol
        self.cg_max_iter = cg_max_iter
        self.newton_tol = newton_tol
        self.newton_max_iter = newton_max_iter
        self.seed = seed
        self.distributed = distributed
        self.memory_budget = memory_budget
        self.progress = progress
        self.output_fn = output_fn

    # ------------------------------------------------------------------ fitting
    def _check_settings(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(self.model).__name__}")
        check_choice(self.likelihood, "likelihood", ("auto", *CLASSIFIER_LIKELIHOODS))
        check_choice(self.link, "link", (*CLASSIFIER_LINKS, "auto"))
        if self.likelihood != "auto" and self.link != "auto":
            LIKELIHOODS[self.likelihood]().check_link(self.link)
        scale_prior_from(self.hyperprior)  # a bad spec is an error before any work
        check_choice(self.prior_mean, "prior_mean", ("network", "zero"))
        check_choice(self.space, "space", ("auto", "function", "parameter"))
        check_choice(self.solver, "solver", ("auto", "cholesky", "cg"))
        check_positive(self.cg_tol, "cg_tol")
        check_positive(self.newton_tol, "newton_tol")
        for name in ("n_samples", "newton_max_iter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    def fit(self, X: Any, y: Any) -> LinearizedClassifier:
        """Find the Laplace posterior of the linearized network on (X, y) and, if asked, learn prior_var.

        Args:
            X: (n, ...) inputs the model accepts.
            y: categorical: (n,) integer labels in [0, c) where c is the number of logits of the model (or c
                distinct labels of any kind); classes absent from y are allowed: they keep their (adapted) prior
                probabilities. bernoulli: (n,) labels 0/1 or two distinct labels. multilabel: a 0/1 matrix (n, c).
        """
        return self._fit(X, y, None)

    def _fitted_state(self) -> dict[str, Any]:
        """The fitted hyperparameters a ``.linadapt`` file stores (JSON)."""
        state: dict[str, Any] = {
            "prior_var_": None if self.prior_var_ is None else float(self.prior_var_),
            "likelihood_": self.likelihood_.name,
        }
        if self.prior_vars_ is not None:
            state["prior_vars_"] = dict(self.prior_vars_)
        if not np.array_equal(self.classes_, np.arange(self.n_classes_)):
            state["classes_"] = self.classes_.tolist()  # the training labels are stored as output indices
        return state

    def _refit_from_state(self, X: Any, y: Any, fitted: dict[str, Any]) -> LinearizedClassifier:
        """The Laplace posterior on (X, y) at the stored prior variance (no search): what ``load`` rebuilds."""
        classes = np.asarray(fitted["classes_"]) if "classes_" in fitted else None
        likelihood = fitted.get("likelihood_", "categorical")  # files before the likelihood option: categorical
        return self._fit(X, y, fitted.get("prior_vars_") or fitted["prior_var_"], classes, likelihood)

    def _fit(
        self,
        X: Any,
        y: Any,
        fixed: Any,
        restored_classes: np.ndarray | None = None,
        restored_likelihood: str | None = None,
    ) -> LinearizedClassifier:
        """``fit``, or with ``fixed`` = prior_var_ (or prior_vars_ with groups) the Laplace posterior at that
        value, the saved ``restored_classes`` and ``restored_likelihood`` (used by load, whose y are encoded)."""
        self._check_settings()
        prior0 = check_positive(self.prior_var, "prior_var")
        distributed = bool(self.distributed)
        if self.prior_groups is not None:
            conflicts = [
                setting
                for setting, bad in (
                    ("distributed=True", distributed),
                    ("space='parameter'", self.space == "parameter"),
                    ("solver='cg'", self.solver == "cg"),
                )
                if bad
            ]
            if conflicts:
                raise ValueError(
                    "prior_groups uses the dense function-space path (space='function', solver='cholesky', one "
                    f"process); not with {', '.join(conflicts)}"
                )

        def local() -> tuple[Linearization, torch.Tensor, torch.Tensor, torch.Tensor]:
            lin, Xt, f0 = linearize_shard(self, X, distributed)
            c = f0.shape[1]
            lik = choose_likelihood(restored_likelihood or self.likelihood, y, c)
            if self.link != "auto":
                lik.check_link(self.link)
            labels, classes = encode_targets(lik, y, Xt.shape[0], c)
            self._classes_seen, self.likelihood_ = classes, lik
            return lin, Xt, labels.to(lin.device), f0

        lin, Xt, labels, f0 = prepare_fit(local, distributed, "LinearizedClassifier.fit (checking the data shard)")
        record_n_features(self, Xt)
        c = f0.shape[1]
        local_labels = labels
        sharding = make_sharding(Xt.shape[0], shard_signature(Xt, labels)) if distributed else None
        if sharding is not None:
            f0, labels = sharding.gather(f0), sharding.gather(labels)
        options = SolverOptions(
            cg_tol=float(self.cg_tol),
            cg_max_iter=self.cg_max_iter,
            seed=int(self.seed),
            memory_budget=resolve_memory_budget(self.memory_budget),
        )
        tol, iters = float(self.newton_tol), int(self.newton_max_iter)
        self.prior_vars_ = self.groups_ = None
        if self.prior_groups is not None:
            posterior = self._fit_groups(lin, Xt, labels, f0, options, prior0, fixed)
            problem, space = posterior.problem, "function"
        else:
            n_obs = labels.shape[0] * c
            space, solver = choose_space_and_solver(
                lin, Xt, n_obs, self.space, self.solver, options.memory_budget, sharded=sharding is not None
            )
            problem = LaplaceProblem(
                lin, Xt, labels, self.prior_mean, options, f0=f0, sharding=sharding, likelihood=self.likelihood_
            )
            if fixed is not None:
                posterior = LaplacePosterior(problem, fixed, space, solver, tol, iters)
            elif self.optimize_hyperparameters:
                posterior = optimize_prior_var(
                    problem, prior0, space, solver, tol, iters, scale_prior_from(self.hyperprior)
                )
            else:
                posterior = LaplacePosterior(problem, prior0, space, solver, tol, iters)
        self.linearization_ = lin
        self.problem_ = problem
        self.posterior_ = posterior
        self.prior_var_ = None if self.prior_groups is not None else posterior.s2
        self.space_, self.solver_ = space, posterior.system.method
        self.n_classes_ = len(self._classes_seen)
        self.classes_ = self._classes_seen if restored_classes is None else restored_classes
        self.n_iter_ = posterior.newton.iterations
        self.log_marginal_likelihood_value_ = posterior.log_evidence
        self._train_data = (Xt, local_labels)
        self._sharding = sharding
        self.link_, self.loo_nll_ = self.link, None
        if self.link == "auto":
            self._choose_link()
        return self

    def _fit_groups(
        self,
        lin: Linearization,
        Xt: torch.Tensor,
        labels: torch.Tensor,
        f0: torch.Tensor,
        options: SolverOptions,
        prior0: float,
        fixed: Any,
    ) -> GroupedLaplacePosterior:
        """The Laplace posterior with one prior variance per group (:mod:`linadapt.inference.grouped_laplace`):
        at the saved ``fixed`` {label: s²_g}, by the evidence, or at ``prior0`` for every group."""
        groups = resolve_groups(list(lin.param_names), self.prior_groups)
        names = [label for label, _ in groups]
        problem = GroupedLaplaceProblem(
            lin, Xt, labels, self.prior_mean, options, groups, f0=f0, likelihood=self.likelihood_
        )
        tol, iters = float(self.newton_tol), int(self.newton_max_iter)
        if fixed is not None:
            if not isinstance(fixed, dict) or set(fixed) != set(names):
                raise ValueError(f"saved prior groups {fixed!r} differ from this model's groups {names}")
            posterior = GroupedLaplacePosterior(problem, np.array([float(fixed[g]) for g in names]), tol, iters)
        elif self.optimize_hyperparameters:
            posterior = optimize_group_prior_vars(
                problem, prior0, tol, iters, scale_prior=scale_prior_from(self.hyperprior)
            )
        else:
            posterior = GroupedLaplacePosterior(problem, np.full(len(groups), prior0), tol, iters)
        self.prior_vars_ = {g: float(v) for g, v in zip(names, posterior.prior_vars)}
        self.groups_ = {g: list(members) for g, members in groups}
        return posterior

    def _choose_link(self) -> str:
        """The link of ``predict_proba``: ``link``, or with ``"auto"`` the one with the best LOO likelihood
        (computed once per fit, on the first call)."""
        if self.link != "auto":
            return self.link
        if self.loo_nll_ is None:
            Xt, labels = self._train_data
            if self._sharding is not None:  # every rank scores every training point: the same choice on all
                Xt, labels = self._sharding.gather(Xt), self._sharding.gather(labels)
            mean, cov = self._logits(Xt, True)
            self.loo_nll_ = loo_nll(mean, cov, labels.to(mean.device), likelihood=self.likelihood_)
            self.link_ = min(self.loo_nll_, key=self.loo_nll_.__getitem__)
        return self.link_

    def log_marginal_likelihood(self, prior_var: float | None = None) -> float:
        """The Laplace evidence log q(y | prior_var) on the training data (default: the fitted value).

        For another prior_var this finds the MAP for it first (a Newton solve)."""
        self._check_fitted()
        if prior_var is None:
            return self.log_marginal_likelihood_value_
        if self.prior_vars_ is not None:
            raise ValueError(
                "with prior_groups the evidence depends on one prior variance per group: "
                "log_marginal_likelihood() gives it at the fitted prior_vars_"
            )
        s2 = check_positive(prior_var, "prior_var")
        post = self.posterior_
        return LaplacePosterior(
            self.problem_, s2, post.space, post.solver, post.newton_tol, post.newton_max_iter
        ).log_evidence

    # ------------------------------------------------------------------ prediction
    def _check_fitted(self) -> None:
        if not hasattr(self, "posterior_"):
            raise NotFittedError("this LinearizedClassifier is not fitted yet: call fit(X, y) first")

    def _logits(self, X: Any, with_cov: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        lin, post = self.linearization_, self.posterior_
        post.progress = check_progress(self.progress)
        Xs = lin.prepare_inputs(X, "X")
        check_n_features(self, Xs)
        outputs, shift = post.outputs_and_shift(Xs)
        mean = outputs + shift
        return mean, (post.latent_blocks(Xs) if with_cov else None)

    def predict_logits(self, X: Any, return_cov: bool = True) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """The Gaussian posterior over logits at X: mean (m, c) and, with ``return_cov``, the per-example
        covariance blocks (m, c, c) — J(x) S J(x)ᵀ with S the Laplace posterior covariance (bernoulli: c = 1, the
        one logit's mean (m, 1) and variance (m, 1, 1))."""
        self._check_fitted()
        mean, cov = self._logits(X, return_cov)
        if cov is None:
            return mean.cpu().numpy()
        return mean.cpu().numpy(), cov.cpu().numpy()

    def sample(self, X: Any, n_samples: int = 1, generator: torch.Generator | None = None) -> np.ndarray:
        """Joint samples of the logits at X from their Gaussian (Laplace) posterior, for all m inputs and c
        classes together (e.g. for Thompson sampling): the mean of ``predict_logits`` and the joint covariance
        J* S J*ᵀ over the m·c logits (``predict_logits`` gives its per-example c × c blocks).

        Args:
            X: (m, ...) inputs.
            n_samples: how many draws.
            generator: a ``torch.Generator`` for the standard normal draws (torch's global one when None); the
                same generator state gives the same samples.

        Returns:
            (n_samples, m, c) logits, float64 (softmax over the last axis gives sampled class probabilities).

        Memory: the (m·c) × (m·c) joint covariance and its Cholesky factor, 16·(m·c)² bytes, on top of what the
        covariance's computation takes; a ``MemoryBudgetError`` when that passes ``memory_budget``.
        """
        self._check_fitted()
        n_samples = sample_count(n_samples)
        lin, post = self.linearization_, self.posterior_
        mean, _ = self._logits(X, with_cov=False)
        Xs = lin.prepare_inputs(X, "X")
        check_sample_memory(Xs.shape[0], mean.shape[1], n_samples, resolve_memory_budget(self.memory_budget))
        draws = gaussian_samples(mean, post.latent_cov(Xs), n_samples, generator)
        return draws.cpu().numpy()

    def predict_proba(self, X: Any) -> np.ndarray:
        """Probabilities from the Gaussian over logits by the ``link`` chosen: of each class (m, c) (bernoulli:
        (m, 2), the columns classes_[0] and classes_[1]); multilabel: P(y_k = 1) of each output (m, c)."""
        self._check_fitted()
        link = self._choose_link()
        mean, cov = self._logits(X, link != "map")
        proba = self.likelihood_.predictive(mean, cov, link, self.n_samples, self.seed)
        return proba.cpu().numpy()

    def predict(self, X: Any) -> np.ndarray:
        """The most probable class (m,) under ``predict_proba``, as a label of ``classes_``; multilabel: the 0/1
        matrix (m, c) of outcomes with P(y_k = 1) > ½."""
        self._check_fitted()
        proba = self.predict_proba(X)
        if self.likelihood_.multilabel:
            return (proba > 0.5).astype(np.int64)
        return self.classes_[proba.argmax(axis=1)]

    def score(self, X: Any, y: Any, sample_weight: Any = None) -> float:
        """Accuracy of ``predict`` on (X, y); every label of y must be one of ``classes_``, so a label the model
        cannot predict is an error rather than a silent miss. Multilabel: subset accuracy, the (weighted)
        fraction of examples whose every outcome is predicted right."""
        self._check_fitted()
        Xs = self.linearization_.prepare_inputs(X, "X")
        check_n_features(self, Xs)
        n = Xs.shape[0]
        labels, _ = encode_targets(self.likelihood_, y, n, self.posterior_.c, classes=self.classes_)
        if self.likelihood_.multilabel:
            return float(accuracy_score(labels.numpy(), self.predict(Xs), sample_weight=sample_weight))
        return super().score(Xs, self.classes_[labels.numpy()], sample_weight)
