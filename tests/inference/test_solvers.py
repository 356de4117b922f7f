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


def test_lanczos_shift_residual_is_the_residual_of_the_shifted_cg_iterate():
    """The m-point quadrature of vᵀ(A + τI)⁻¹v is vᵀx_m for x_m the m-th CG iterate of (A + τI)x = v (the Galerkin
    solution in the Krylov space): lanczos_shift_residual gives its relative residual for every τ without
    another product."""
    from linadapt.inference.solvers import lanczos_quadrature, lanczos_shift_residual

    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(80, 80, generator=g, dtype=torch.float64))
    A = (U * 0.8 ** torch.arange(80, dtype=torch.float64)) @ U.T
    A = 0.5 * (A + A.T)
    v = torch.randn(80, 1, generator=g, dtype=torch.float64)
    m = 12
    nodes, weights, beta, tail = lanczos_quadrature(lambda V: A @ V, v, m, tails=True)
    # the Krylov basis of v, for the Galerkin iterate
    K = torch.cat([torch.linalg.matrix_power(A, j) @ v for j in range(m)], 1)
    Q, _ = torch.linalg.qr(K)
    for tau in (1e-6, 1e-3, 1e-1, 10.0):
        As = A + tau * torch.eye(80, dtype=torch.float64)
        x = Q @ torch.linalg.solve(Q.T @ As @ Q, Q.T @ v)
        want = float((As @ x - v).norm() / v.norm())
        got = lanczos_shift_residual(beta, tail, nodes, tau)
        assert got == pytest.approx(want, rel=1e-5, abs=1e-12)
        # and the quadrature is vᵀx
        assert float((weights[0] / (nodes[0] + tau)).sum()) == pytest.approx(float(v[:, 0] @ x[:, 0]), rel=1e-8)


def test_matrix_free_evidence_search_stays_where_its_quadrature_converged():
    """Nearly noiseless targets: the Lanczos evidence (few iterations) keeps growing as σ² → 0 where it has not
    converged; the search holds σ²/s² at Spectrum.min_shift and warns."""
    from linadapt.inference.evidence import Spectrum, maximize_evidence
    from linadapt.inference.solvers import ConvergenceWarning

    g = torch.Generator().manual_seed(1)
    U, _ = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=torch.float64))
    K = (U * 0.93 ** torch.arange(300, dtype=torch.float64)) @ U.T
    K = 0.5 * (K + K.T)
    r = K @ torch.randn(300, generator=g, dtype=torch.float64)  # in K's range: noiseless
    spec = Spectrum.from_lanczos("function", lambda V: K @ V, r, 300, 300, float(r @ r), num_probes=4, max_iter=20)
    assert spec.min_shift > 0.0
    with pytest.warns(ConvergenceWarning, match="Lanczos quadrature has not converged"):
        s2, sig2, _ = maximize_evidence(spec, 1.0, 0.1)
    assert sig2 / s2 >= spec.min_shift * (1 - 1e-9)
    s2_exact, sig2_exact, _ = maximize_evidence(Spectrum.from_kernel(K, r), 1.0, 0.1)
    assert sig2_exact / s2_exact < 1e-6 * spec.min_shift  # where the exact evidence would take it
