"""One comparison harness per task type: every method on the same draw of target data.

Which methods run can be narrowed with :func:`selected_methods` (``linadapt experiment --methods``): the same
seeds give the same data draws, so records of a later run of one method can be merged with an earlier run.
"""

from __future__ import annotations

import importlib.util
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from linadapt import metrics
from linadapt.estimators.classifier import LinearizedClassifier
from linadapt.estimators.regressor import LinearizedRegressor
from linadapt.experiments.baselines import ablr, finetune, laplace_torch, ntk_plus_rbf_gp, rbf_gp
from linadapt.experiments.source import Step
from linadapt.jacobian.selection import ParamSpec
from linadapt.likelihoods.softmax_links import class_probabilities

__all__ = ["METHODS", "ClassificationComparison", "compare_classification", "compare_regression", "selected_methods"]


#: method names that can be selected (a linadapt variant's name also selects its -bridge / -map readouts)
METHODS = (
    "source",
    "finetune-all",
    "finetune-last",
    "finetune-bias",
    "rbf-gp",
    "ablr",
    "laplace-torch",
    "linadapt",
    "linadapt-last",
    "linadapt-head",
    "linadapt-all",
    "linadapt-rbf",
    "linadapt-layers",
    "linadapt-marginal",
)
_SELECTED: ContextVar[frozenset[str] | None] = ContextVar("linadapt_selected_methods", default=None)


@contextmanager
def selected_methods(methods: Iterable[str] | None) -> Iterator[None]:
    """Run only ``methods`` (names from :data:`METHODS`) in the comparisons inside the block; None: all.

    Raises:
        ValueError: an unknown method name.
    """
    chosen = None if methods is None else frozenset(methods)
    if chosen is not None:
        unknown = sorted(chosen - set(METHODS))
        if unknown or not chosen:
            raise ValueError(f"unknown method(s) {unknown or '(none given)'}; choose from: {', '.join(METHODS)}")
    token = _SELECTED.set(chosen)
    try:
        yield
    finally:
        _SELECTED.reset(token)


def _wanted(method: str) -> bool:
    chosen = _SELECTED.get()
    if method == "laplace-torch" and importlib.util.find_spec("laplace") is None:
        return False  # optional dependency
    return chosen is None or method in chosen


def compare_regression(
    net: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    tag: dict,
    seed: int,
    quick: bool,
    step: Step,
    unit: float = 1.0,
    composite: bool = True,
) -> list[dict]:
    """Every regression method on one draw of target points (x (n, ...), y (n, 1)); test (xt, yt) likewise.

    Records are ``tag`` plus method, metrics (RMSE and Gaussian NLL of ``unit`` × the targets, so a scaled
    target is scored in its natural unit), fit seconds. Methods: the source network, fine-tuning (all, last,
    bias), RBF-GP on the raw inputs, ABLR, linadapt (all weights, last layer) and, with ``composite``,
    linadapt-rbf. Point predictors get their RMS residual on (x, y) as a constant std.
    """
    (x, y), (xt, yt) = train, test
    target = unit * yt[:, 0].numpy()
    n_shots = x.shape[0]
    ft_epochs = 100 if quick else 1000
    records: list[dict] = []

    def record(
        method: str, mean: np.ndarray, std: np.ndarray, seconds: float, nll: float | None = None, **extra
    ) -> None:
        """``nll``: the method's own test NLL (for a non-Gaussian predictive) in the scaled targets' unit,
        converted here to ``unit``; else the Gaussian NLL of (mean, std)."""
        mean, std = unit * mean, unit * std
        gaussian = metrics.gaussian_nll(mean, std, target)
        scores = {"rmse": metrics.rmse(mean, target), "nll": gaussian if nll is None else nll + math.log(unit)}
        records.append({**tag, "method": method, "metrics": scores, "fit_seconds": seconds, **extra})

    def point(module: nn.Module) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            resid = float(((module(x) - y) ** 2).mean().sqrt())
            mean = module(xt)[:, 0].numpy()
        return mean, np.full_like(mean, max(resid, 1e-3))

    if _wanted("source"):
        record("source", *point(net), 0.0)
    for params in ("all", "last", "bias"):
        if not _wanted(f"finetune-{params}"):
            continue
        step(f"fine-tuning ({params})")
        t = time.perf_counter()
        tuned = finetune(
            net,
            x,
            y,
            task="regression",
            params=params,
            epochs=ft_epochs,
            lr=1e-3,
            batch_size=n_shots,
            patience=max(ft_epochs // 5, 20),
            seed=seed,
        )
        record(f"finetune-{params}", *point(tuned.model), time.perf_counter() - t, best_epoch=tuned.best_epoch)
    if _wanted("rbf-gp"):
        step("RBF-GP")
        t = time.perf_counter()
        gp = rbf_gp(x, y, iters=100 if quick else 300, seed=seed)
        record("rbf-gp", *gp.predict(xt), time.perf_counter() - t)
    if _wanted("ablr"):
        step("ABLR")
        t = time.perf_counter()
        bl = ablr(net, x, y)
        record("ablr", *bl.predict(xt), time.perf_counter() - t)
    if _wanted("laplace-torch"):
        step("laplace-torch (fine-tuned with weight decay, then K-FAC Laplace, GLM predictive)")
        t = time.perf_counter()
        lt = laplace_torch(
            net,
            x,
            y,
            task="regression",
            epochs=ft_epochs,
            batch_size=n_shots,
            patience=max(ft_epochs // 5, 20),
            seed=seed,
        )
        record("laplace-torch", *lt.predict(xt), time.perf_counter() - t, **lt.hyperparameters)
    variants = (  # (method, what the progress line adds, LinearizedRegressor options)
        ("linadapt", "", {}),
        ("linadapt-last", "", {"params": "last"}),
        ("linadapt-marginal", " (predictive averaged over the hyperparameters)", {"marginalize": True}),
        ("linadapt-layers", " (one prior variance per layer, by the evidence)", {"prior_groups": "layers"}),
    )
    for name, note, options in variants:
        if not _wanted(name):
            continue
        step(name + note)
        t = time.perf_counter()
        reg = LinearizedRegressor(net, **options).fit(x, y[:, 0])
        seconds = time.perf_counter() - t
        mean, std = reg.predict(xt, return_std=True)
        # the mixture's NLL is its exact density, not the Gaussian of its mean and std
        nll = -float(reg.log_predictive_density(xt, yt[:, 0]).mean()) if reg.marginalize else None
        prior = {"prior_var": reg.prior_var_} if reg.prior_vars_ is None else {"prior_vars": reg.prior_vars_}
        record(name, mean, std, seconds, nll=nll, **prior, noise_var=reg.noise_var_)
    if not composite or not _wanted("linadapt-rbf"):
        return records
    step("linadapt-rbf (NTK + RBF kernel, both scales by marginal likelihood)")
    t = time.perf_counter()
    both = ntk_plus_rbf_gp(net, x, y, iters=100 if quick else 300, seed=seed)
    record("linadapt-rbf", *both.predict(xt), time.perf_counter() - t, **both.hyperparameters)
    return records


@dataclass
class ClassificationComparison:
    """Records of :func:`compare_classification`, each method's test probabilities (m, c), the test labels,
    and the all-weights :class:`~linadapt.estimators.classifier.LinearizedClassifier`."""

    records: list[dict]
    probas: dict[str, np.ndarray] = field(default_factory=dict)
    labels: np.ndarray | None = None
    classifier: LinearizedClassifier | None = None


def compare_classification(
    net: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    tag: dict,
    seed: int,
    quick: bool,
    step: Step,
    last_layer: bool = True,
    variants: Sequence[tuple[ParamSpec, str]] | None = None,
    finetune_epochs: int | None = None,
    laplace_subset: str = "all",
) -> ClassificationComparison:
    """Every classification method on one draw of labelled target examples (x (n, ...), integer y (n,)).

    Records are ``tag`` plus method, metrics (accuracy, NLL, ECE on the test set), fit seconds. Methods: the
    source network, fine-tuning (last layer, all weights, biases; Adam, early stopping on 20 % of the
    labels; ``finetune_epochs`` epochs, default 300, 60 with ``quick``), linadapt with all weights (probit, the
    Laplace bridge, the MAP logits alone, and ``-auto``: the one of those three chosen by leave-one-out
    likelihood on the labelled examples) and, with ``last_layer``, the same for the last layer. ``variants``
    replaces those linadapt runs by (params, method name) pairs. Where laplace-torch is installed, also its
    Laplace (``laplace_subset`` weights, K-FAC) on a copy fine-tuned with weight decay (probit GLM predictive).
    """
    if variants is None:
        variants = (("all", "linadapt"), ("last", "linadapt-last"))[: 2 if last_layer else 1]
    epochs = finetune_epochs or (60 if quick else 300)
    (xa, ya), (xt, yt) = train, test
    out = ClassificationComparison([], labels=yt.numpy())

    def record(method: str, proba: np.ndarray, seconds: float, **extra) -> None:
        out.probas[method] = proba
        scores = {
            "accuracy": metrics.accuracy(proba, yt),
            "nll": metrics.nll(proba, yt),
            "ece": metrics.expected_calibration_error(proba, yt),
        }
        out.records.append({**tag, "method": method, "metrics": scores, "fit_seconds": seconds, **extra})

    if _wanted("source"):
        with torch.no_grad():
            record("source", torch.softmax(net(xt).double(), 1).numpy(), 0.0)
    for params in ("last", "all", "bias"):
        if not _wanted(f"finetune-{params}"):
            continue
        step(f"fine-tuning ({params})")
        t = time.perf_counter()
        tuned = finetune(net, xa, ya, params=params, epochs=epochs, lr=1e-3, seed=seed)
        record(f"finetune-{params}", tuned.predict_proba(xt), time.perf_counter() - t, best_epoch=tuned.best_epoch)
    if _wanted("laplace-torch"):
        step("laplace-torch (fine-tuned with weight decay, then K-FAC Laplace, probit GLM predictive)")
        t = time.perf_counter()
        lt = laplace_torch(net, xa, ya, subset=laplace_subset, epochs=epochs, seed=seed)
        seconds = time.perf_counter() - t
        record("laplace-torch", lt.predict_proba(xt), seconds, **lt.hyperparameters)
    for params, name in variants:
        if not _wanted(name):
            continue
        step(f"linadapt ({params})")
        t = time.perf_counter()
        clf = LinearizedClassifier(net, params=params, link="probit").fit(xa, ya)  # the readouts: below
        seconds = time.perf_counter() - t
        info = {"prior_var": clf.prior_var_, "space": clf.space_}
        mean, cov = (torch.from_numpy(a) for a in clf.predict_logits(xt))
        record(name, class_probabilities(mean, cov, "probit").numpy(), seconds, **info)
        # The same posterior read out two other ways: the Laplace bridge, and the MAP logits alone.
        record(f"{name}-bridge", class_probabilities(mean, cov, "bridge").numpy(), seconds, **info)
        record(f"{name}-map", class_probabilities(mean, None, "map").numpy(), seconds, **info)
        # link="auto": the readout with the best approximate leave-one-out likelihood on the training labels
        t = time.perf_counter()
        chosen = clf.set_params(link="auto")._choose_link()
        loo_seconds = time.perf_counter() - t
        record(
            f"{name}-auto",
            out.probas[name if chosen == "probit" else f"{name}-{chosen}"],
            seconds + loo_seconds,
            **info,
            link=chosen,
            loo_nll=clf.loo_nll_,
        )
        clf.set_params(link="probit")
        if out.classifier is None:
            out.classifier = clf
    return out
