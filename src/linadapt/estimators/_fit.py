"""The start every estimator's fit shares: linearize the model and prepare this process's inputs."""

from __future__ import annotations

from typing import Any

import torch

from linadapt.distributed import check_shard_size
from linadapt.jacobian.linearization import Linearization

__all__ = ["check_dense_only", "linearize_shard"]


def linearize_shard(
    model: Any, params: Any, chunk_size: int | None, device: Any, X: Any, distributed: bool, memory_budget: Any
) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """The start of every fit: the :class:`~linadapt.jacobian.linearization.Linearization` of ``model``, the prepared
    inputs X (this rank's shard when ``distributed``; it must not be empty) and f(X; θ̂), (n, c)."""
    lin = Linearization(model, params, chunk_size, device, memory_budget)
    Xt = lin.prepare_inputs(X, "X")
    lin.fitted_input_shape = tuple(Xt.shape[1:])
    if distributed:
        check_shard_size(Xt.shape[0])
    return lin, Xt, lin.outputs(Xt)


def record_n_features(estimator: Any, Xt: torch.Tensor) -> None:
    """Set ``n_features_in_`` (scikit-learn's attribute) for 2-D floating inputs — feature vectors; other inputs
    (images, token ids of any length) have none."""
    if Xt.dim() == 2 and Xt.is_floating_point():
        estimator.n_features_in_ = int(Xt.shape[1])
    elif hasattr(estimator, "n_features_in_"):
        del estimator.n_features_in_


def check_n_features(estimator: Any, Xs: torch.Tensor) -> None:
    """Refuse feature vectors of another width than those fitted on (a model that would run on them anyway
    would compute something unrelated): a ValueError in scikit-learn's words."""
    expected = getattr(estimator, "n_features_in_", None)
    if expected is None:
        return
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
