"""The NTK over every rank's examples of a data-parallel fit, as a lazy operator (see :mod:`linadapt.distributed`)."""

from __future__ import annotations

from typing import Any

import torch
from linear_operator.operators import LinearOperator

__all__ = ["ShardedNTKOperator"]


class ShardedNTKOperator(LinearOperator):
    """K = J Jᵀ over every rank's examples (N × N) as a lazy operator for linear_operator's algorithms
    (pivoted-Cholesky preconditioners): products, the diagonal and selected rows are all computed from the
    local shards — K V as in :meth:`~linadapt.inference.posterior.TrainingData.k_matmul`, the diagonal from each
    rank's per-example blocks (gathered), rows K[i, :] as K applied to one-hot columns.

    Args:
        problem: a sharded :class:`~linadapt.inference.posterior.TrainingData`.
    """

    def __init__(self, problem: Any) -> None:
        super().__init__(problem=problem)
        self.problem = problem

    @property
    def dtype(self) -> torch.dtype:
        """float64, as every product of the training data."""
        return torch.float64

    @property
    def device(self) -> torch.device:
        """The linearization's device."""
        return self.problem.lin.device

    def _size(self) -> torch.Size:
        return torch.Size((self.problem.n_obs, self.problem.n_obs))

    def _transpose_nonbatch(self) -> ShardedNTKOperator:
        return self  # symmetric

    def _matmul(self, rhs: torch.Tensor) -> torch.Tensor:
        if rhs.dim() == 1:
            return self.problem.k_matmul(rhs.unsqueeze(-1)).squeeze(-1)
        if rhs.dim() != 2:
            raise NotImplementedError("ShardedNTKOperator does not support batch dimensions")
        return self.problem.k_matmul(rhs.to(torch.float64))

    def _diagonal(self) -> torch.Tensor:
        pr = self.problem
        blocks = pr.lin.ntk_blocks(pr.X)  # (n_local, c, c)
        return pr.gather_rows(torch.diagonal(blocks, dim1=-2, dim2=-1)).reshape(-1)

    def _get_indices(self, row_index: Any, col_index: Any, *batch_indices: Any) -> torch.Tensor:
        row_index, col_index = torch.broadcast_tensors(torch.as_tensor(row_index), torch.as_tensor(col_index))
        rows, inv = torch.unique(row_index.reshape(-1), return_inverse=True)
        E = torch.zeros(self.problem.n_obs, rows.numel(), dtype=torch.float64, device=self.device)
        E[rows.to(self.device), torch.arange(rows.numel(), device=self.device)] = 1.0
        K_rows = self.problem.k_matmul(E).T  # (r, N): K is symmetric
        return K_rows[inv.to(K_rows.device), col_index.reshape(-1).to(K_rows.device)].reshape(row_index.shape)

    def _expand_batch(self, batch_shape: torch.Size) -> LinearOperator:  # pragma: no cover - no batch support
        raise NotImplementedError("ShardedNTKOperator does not support batch dimensions")
