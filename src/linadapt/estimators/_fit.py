"""The start every estimator's fit shares: linearize the model and prepare this process's inputs."""

from __future__ import annotations

from typing import Any

import torch

from linadapt._inputs import KeywordInputs
from linadapt.distributed import check_shard_size
from linadapt.jacobian.linearization import Linearization

__all__ = ["check_dense_only", "linearize_shard"]


def linearize_shard(est: Any, X: Any, distributed: bool) -> tuple[Any, Any, torch.Tensor]:
    """The start of every fit: the :class:`~linadapt.jacobian.linearization.Linearization` of the estimator's
    ``model`` (with its ``params``, ``chunk_size``, ``device``, ``memory_budget`` and ``output_fn``), the prepared
    inputs X (a tensor, or keyword inputs; this rank's shard when ``distributed``; it must not be empty) and
    f(X; θ̂), (n, c)."""
    lin = Linearization(est.model, est.params, est.chunk_size, est.device, est.memory_budget, est.output_fn)
    Xt = lin.prepare_inputs(X, "X")
    keyword = isinstance(Xt, KeywordInputs)
    lin.fitted_input_shape = None if keyword else tuple(Xt.shape[1:])
    lin.fitted_input_keys = sorted(Xt.keys()) if keyword else None
    if distributed:
        check_shard_size(Xt.shape[0])
    return lin, Xt, lin.outputs(Xt)


def record_n_features(estimator: Any, Xt: Any) -> None:
    """Set ``n_features_in_`` (scikit-learn's attribute) for 2-D floating inputs — feature vectors; other inputs
    (images, token ids of any length, keyword inputs) have none."""
    if not isinstance(Xt, KeywordInputs) and Xt.dim() == 2 and Xt.is_floating_point():
        estimator.n_features_in_ = int(Xt.shape[1])
    elif hasattr(estimator, "n_features_in_"):
        del estimator.n_features_in_


def check_n_features(estimator: Any, Xs: torch.Tensor) -> None:
    """Refuse feature vectors of another width than those fitted on (a model that would run on them anyway
    would compute something unrelated): a ValueError in scikit-learn's words."""
    lin = getattr(estimator, "linearization_", None)
    keys = getattr(lin, "fitted_input_keys", None)
    given = sorted(Xs.keys()) if isinstance(Xs, KeywordInputs) else None
    if keys is not None and given != keys:
        what = f"keyword inputs {given}" if given is not None else f"one tensor of shape {tuple(Xs.shape)}"
        raise ValueError(f"X is {what}, but {type(estimator).__name__} was fitted on keyword inputs {keys}")
    if keys is None and given is not None and getattr(lin, "fitted_input_shape", None) is not None:
        raise ValueError(
            f"X is keyword inputs {given}, but {type(estimator).__name__} was fitted on one tensor of inputs of "
            f"shape {lin.fitted_input_shape} per example"
        )
    expected = getattr(estimator, "n_features_in_", None)
    if expected is None:
        return
    if isinstance(Xs, KeywordInputs):
        raise ValueError(
            f"X is a mapping of keyword inputs ({', '.join(Xs.keys())}), but {type(estimator).__name__} was fitted "
            f"on 2-D feature vectors (n, {expected})"
        )
    if Xs.dim() != 2:
        raise ValueError(
            f"X has shape {tuple(Xs.shape)}, but {type(estimator).__name__} was fitted on 2-D feature vectors "
            f"(n, {expected}). Reshape your data to (n, {expected})"
        )
    if Xs.shape[1] != expected:
        raise ValueError(
            f"X has {Xs.shape[1]} features, but {type(estimator).__name__} is expecting {expected} features as input"
        )


def check_dense_only(est: Any, option: str, *more: tuple[str, bool]) -> None:
    """For the regressor ``est``: ``option`` works on the dense function-space path with the prior at θ̂, in one
    process: a ValueError naming the settings that conflict with it (those below and ``more``: (setting,
    conflicts))."""
    conflicts = (
        ("distributed=True", bool(est.distributed)),
        ("prior_mean='zero'", est.prior_mean != "network"),
        ("space='parameter'", est.space == "parameter"),
        ("solver='cg'", est.solver == "cg"),
        *more,
    )
    bad = [setting for setting, conflict in conflicts if conflict]
    if bad:
        raise ValueError(
            f"{option} uses the dense function-space path (space='function', solver='cholesky', "
            f"prior_mean='network', one process); not with {', '.join(bad)}"
        )
