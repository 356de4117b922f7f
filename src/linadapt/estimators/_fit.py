"""The start every estimator's fit shares: linearize the model and prepare this process's inputs."""

from __future__ import annotations

from typing import Any

import torch

from linadapt.distributed import check_shard_size
from linadapt.jacobian.linearization import Linearization

__all__ = ["linearize_shard"]


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
