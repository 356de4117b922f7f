import warnings

import pytest
import torch
from linear_operator.utils.errors import NotPSDError
from linear_operator.utils.warnings import NumericalWarning

from linadapt.inference.solvers import SPDSystem


def _system(A):
    return SPDSystem(A.shape[0], matrix=lambda: A)


def test_chol_of_a_positive_definite_matrix_adds_nothing():
    B = torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    A = B @ B.T + torch.eye(6, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        L = _system(A).chol()
    torch.testing.assert_close(L, torch.linalg.cholesky(A), rtol=0, atol=0)


def test_chol_jitter_is_relative_to_the_diagonal_and_grows_only_if_needed():
    A = 3.0 * torch.ones(4, 4, dtype=torch.float64)  # rank one: the plain factorisation breaks down
    with pytest.warns(NumericalWarning, match="jitter of 3.0e-10"):
        L = _system(A).chol()
    torch.testing.assert_close(L, torch.linalg.cholesky(A + 3e-10 * torch.eye(4, dtype=torch.float64)), rtol=0, atol=0)
    A = A - 1.5e-9 * torch.eye(4, dtype=torch.float64)  # slightly indefinite: needs the second, tenfold jitter
    with pytest.warns(NumericalWarning) as record:
        L = _system(A).chol()
    assert [str(w.message) for w in record] == [
        f"A not p.d., added jitter of {jitter} to the diagonal" for jitter in ("3.0e-10", "3.0e-09")
    ]
    torch.testing.assert_close(L @ L.T, A, rtol=0, atol=1e-8)
    with pytest.raises(NotPSDError), warnings.catch_warnings():
        warnings.simplefilter("ignore", NumericalWarning)
        _system(-A).chol()


def test_low_rank_plus_diagonal_preconditioner_is_the_exact_inverse():
    from linear_operator.operators import (
        DiagLinearOperator,
        LowRankRootAddedDiagLinearOperator,
        LowRankRootLinearOperator,
    )

    from linadapt.inference.solvers import low_rank_plus_diagonal_preconditioner

    g = torch.Generator().manual_seed(0)
    L = torch.randn(300, 7, dtype=torch.float64, generator=g)
    V = torch.randn(300, 3, dtype=torch.float64, generator=g)
    scale, noise = 2.5, 0.3
    P = scale * L @ L.T + noise * torch.eye(300, dtype=torch.float64)
    got = low_rank_plus_diagonal_preconditioner(L, scale, noise)(V)
    torch.testing.assert_close(got, torch.linalg.solve(P, V), rtol=1e-9, atol=1e-12)
    # the same Woodbury solve as linear_operator's low-rank-root-plus-diagonal operator (kept for speed)
    noise_diag = DiagLinearOperator(torch.full((300,), noise, dtype=torch.float64))
    op = LowRankRootAddedDiagLinearOperator(LowRankRootLinearOperator(L * scale**0.5), noise_diag)
    torch.testing.assert_close(got, op.solve(V), rtol=1e-9, atol=1e-12)
