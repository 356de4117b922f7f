"""Predictive variances of matrix-free regression from a certified Lanczos basis (inference/lanczos_variance.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import linadapt as la
from linadapt.inference.lanczos_variance import LanczosBasis


def _spd(n: int, seed: int, decay: float) -> torch.Tensor:
    """s²K + σ²I with K = U diag(λ) Uᵀ, λ_i = decay^i (a fast-decaying spectrum, as NTKs have), σ² = 1e-3."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = decay ** torch.arange(n, dtype=torch.float64)
    A = (U * lam) @ U.T
    A.diagonal().add_(1e-3)
    return 0.5 * (A + A.T)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(8, 60), seed=st.integers(0, 10_000), decay=st.floats(0.5, 0.95), frac=st.floats(0.1, 1.0))
def test_galerkin_is_a_lower_bound_with_a_certified_gap(n, seed, decay, frac):
    """For every column b: bᵀx̃ ≤ bᵀA⁻¹b ≤ bᵀx̃ + gap (the law the certified variances rest on)."""
    A = _spd(n, seed, decay)
    g = torch.Generator().manual_seed(seed + 1)
    B = A @ torch.randn(n, 5, generator=g, dtype=torch.float64)  # columns in A's range, like cross-kernel columns
    basis = LanczosBasis(lambda V: A @ V, torch.randn(n, generator=g, dtype=torch.float64), 1e-3, n)
    basis.extend(max(1, int(frac * n)))
    Xt, gap = basis.galerkin(B)
    exact = (B * torch.linalg.solve(A, B)).sum(0)
    approx = (B * Xt).sum(0)
    scale = exact.abs().max()
    assert bool((approx <= exact + 1e-9 * scale).all())
    assert bool((exact <= approx + gap + 1e-9 * scale).all())


def test_full_basis_is_exact():
    A = _spd(40, 0, 0.8)
    B = torch.randn(40, 7, dtype=torch.float64)
    basis = LanczosBasis(lambda V: A @ V, torch.ones(40, dtype=torch.float64), 1e-3, 40)
    basis.extend(40)
    Xt, gap = basis.galerkin(B)
    torch.testing.assert_close(Xt, torch.linalg.solve(A, B), rtol=1e-9, atol=1e-9)
    assert float(gap.max()) < 1e-12 * float((B * B).sum(0).max()) / 1e-3


def test_growing_basis_reuses_its_projections():
    """quadratic(B, C) with C from a smaller basis equals a fresh call: the basis only appends vectors, so the
    rows of QᵀB computed before stay valid (the predictive loop checks after every small step this way)."""
    A = _spd(50, 3, 0.85)
    B = A @ torch.randn(50, 6, dtype=torch.float64)
    basis = LanczosBasis(lambda V: A @ V, torch.ones(50, dtype=torch.float64), 1e-3, 50)
    basis.extend(12)
    _, _, C, _ = basis.quadratic(B)
    basis.extend(30)
    reused = basis.quadratic(B, C)
    fresh = basis.quadratic(B)
    assert reused[2].shape == (30, 6)
    for a, b in zip(reused, fresh):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    altered = C.clone()
    altered[0] += 1.0  # the known rows are taken as given, not computed again: only the 18 new rows are
    assert torch.equal(basis.project(B, altered)[:12], altered)
    torch.testing.assert_close(basis.project(B, altered)[12:], fresh[2][12:], rtol=0, atol=0)
    Xt, gap = basis.galerkin(B)  # the same quadratic form as the solution's
    torch.testing.assert_close((B * Xt).sum(0), fresh[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gap, fresh[1])
    with pytest.raises(ValueError, match="more than the basis"):
        LanczosBasis(lambda V: A @ V, torch.ones(50, dtype=torch.float64), 1e-3, 50).project(B, C)


def _net(c: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, c)).double()


def _data(n: int, m: int, c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    X = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.stack([torch.sin(X.sum(1) + k) for k in range(c)], 1) + 0.1 * torch.randn(n, c, generator=g).double()
    return X, (y[:, 0] if c == 1 else y), torch.randn(m, 4, generator=g, dtype=torch.float64)


@pytest.mark.parametrize(
    ("c", "prior_var", "noise_var"),
    [(1, 0.5, 0.05), (2, 0.5, 0.05), (1, 20.0, 1e-2)],  # the last: ill-conditioned, the basis grows to all N
)
def test_cg_predictive_std_by_the_basis_matches_the_dense_posterior(c, prior_var, noise_var):
    X, y, Xs = _data(150, 40, c)
    kw = {"space": "function", "prior_var": prior_var, "noise_var": noise_var, "optimize_hyperparameters": False}
    dense = la.LinearizedRegressor(_net(c), solver="cholesky", **kw).fit(X, y)
    cg = la.LinearizedRegressor(_net(c), solver="cg", **kw).fit(X, y)
    mean_d, std_d = dense.predict(Xs, return_std=True)
    mean_c, std_c = cg.predict(Xs, return_std=True)
    assert cg.solver_ == "cg"
    basis = cg.posterior_._basis
    assert basis is not None and basis.products >= 128  # the basis was used (40·c columns ≥ 16)
    np.testing.assert_allclose(mean_c, mean_d, rtol=1e-7, atol=1e-9)
    var_d, var_c = std_d**2, std_c**2
    # certified: never below the exact variance, at most rtol = 1e-2 above it
    assert np.all(var_c >= var_d * (1 - 1e-8))
    assert np.all(var_c <= var_d * (1 + 1.001e-2))
    if c == 2:  # the within-example covariance blocks too
        torch.testing.assert_close(
            cg.posterior_.latent_blocks(Xs), dense.posterior_.latent_blocks(Xs), rtol=2e-2, atol=1e-10
        )


def test_the_basis_stops_one_small_step_after_the_variances_are_certified():
    """The basis grows 128, then by max(size/16, 64): one step fewer would leave a variance uncertified (no
    overshoot of more than one step: products are the whole cost of the std at large N)."""
    X, y, Xs = _data(600, 60, 1)
    kw = {"space": "function", "prior_var": 5.0, "noise_var": 3e-3, "optimize_hyperparameters": False}
    cg = la.LinearizedRegressor(_net(1), solver="cg", **kw).fit(X, y)
    cg.predict(Xs, return_std=True, include_noise=False)  # certifies the latent variances
    post = cg.posterior_
    sizes = [128]
    while sizes[-1] < post._basis.size:
        sizes.append(sizes[-1] + max(sizes[-1] // 16, 64))
    assert sizes[-1] == post._basis.size > 128, sizes  # it grew, along the documented steps
    smaller = LanczosBasis(post._a_matmul, post.r.clone(), post.sig2, sizes[-2])
    smaller.extend(sizes[-2])
    Kx = post.problem.lin.ntk(X, Xs)  # (N, m) cross-kernel columns
    dense = la.LinearizedRegressor(_net(1), solver="cholesky", **kw).fit(X, y)
    var = dense.predict(Xs, return_std=True, include_noise=False)[1] ** 2  # the latent variance, as certified
    _, gap, _, _ = smaller.quadratic(Kx)
    assert bool((post.s2**2 * gap.numpy() > 1e-2 * var).any())


@pytest.mark.parametrize(("c", "prior_var", "noise_var"), [(1, 5.0, 3e-3), (2, 5.0, 3e-3)])
def test_the_std_of_y_is_certified_with_the_noise_and_needs_a_smaller_basis(c, prior_var, noise_var):
    """predict(return_std=True) returns the std of y: each returned variance (latent + σ²) is certified within
    1 % — which needs fewer basis vectors than the latent variance alone; include_noise=False then grows the
    same basis until the latent variances are certified too."""
    X, y, Xs = _data(600, 60, c)
    kw = {"space": "function", "prior_var": prior_var, "noise_var": noise_var, "optimize_hyperparameters": False}
    dense = la.LinearizedRegressor(_net(c), solver="cholesky", **kw).fit(X, y)
    cg = la.LinearizedRegressor(_net(c), solver="cg", **kw).fit(X, y)
    noisy_d, noisy_c = dense.predict(Xs, return_std=True)[1] ** 2, cg.predict(Xs, return_std=True)[1] ** 2
    with_noise = cg.posterior_._basis.size
    assert np.all(noisy_c >= noisy_d * (1 - 1e-8)) and np.all(noisy_c <= noisy_d * (1 + 1.001e-2))
    latent_d = dense.predict(Xs, return_std=True, include_noise=False)[1] ** 2
    latent_c = cg.predict(Xs, return_std=True, include_noise=False)[1] ** 2
    if c == 1:  # here the latent variances need a third more vectors (192 → 256); with c = 2 the same 384
        assert cg.posterior_._basis.size > with_noise  # the same basis, grown further
    assert np.all(latent_c >= latent_d * (1 - 1e-8)) and np.all(latent_c <= latent_d * (1 + 1.001e-2))
    # predict_blocks follows its include_noise the same way
    _, blocks = cg.predict_blocks(Xs)
    _, blocks_d = dense.predict_blocks(Xs)
    diag, diag_d = np.diagonal(blocks, axis1=1, axis2=2), np.diagonal(blocks_d, axis1=1, axis2=2)
    assert np.all(diag <= diag_d * (1 + 1.001e-2)) and np.all(diag >= diag_d * (1 - 1e-8))


def test_columns_the_capped_basis_cannot_certify_are_solved_by_cg():
    X, y, Xs = _data(150, 40, 1)
    kw = {"space": "function", "prior_var": 20.0, "noise_var": 1e-2, "optimize_hyperparameters": False}
    cg = la.LinearizedRegressor(_net(1), solver="cg", **kw).fit(X, y)
    dense = la.LinearizedRegressor(_net(1), solver="cholesky", **kw).fit(X, y)
    post = cg.posterior_
    post._basis = LanczosBasis(post._a_matmul, post.r.clone(), post.sig2, 40)  # a cap of 40 < N = 150
    post._basis.extend(20)
    solved = []
    solve = post.solve
    post.solve = lambda B: solved.append(B.shape[1]) or solve(B)
    var_c, var_d = cg.predict(Xs, return_std=True)[1] ** 2, dense.predict(Xs, return_std=True)[1] ** 2
    assert post._basis.size == 40 and solved and 0 < solved[0] <= 40
    np.testing.assert_allclose(var_c, var_d, rtol=1.001e-2)


def test_few_columns_keep_the_cg_solve():
    """Under ``variance_basis_min`` columns the variance is solved by CG (no basis is built)."""
    X, y, Xs = _data(100, 3, 1)
    kw = {"space": "function", "prior_var": 0.5, "noise_var": 0.05, "optimize_hyperparameters": False}
    cg = la.LinearizedRegressor(_net(1), solver="cg", **kw).fit(X, y)
    dense = la.LinearizedRegressor(_net(1), solver="cholesky", **kw).fit(X, y)
    np.testing.assert_allclose(cg.predict(Xs, return_std=True)[1], dense.predict(Xs, return_std=True)[1], rtol=1e-6)
    assert getattr(cg.posterior_, "_basis", None) is None


def test_a_tighter_certificate_gives_the_dense_variances_to_that_tolerance():
    X, y, Xs = _data(150, 40, 1)
    kw = {"space": "function", "prior_var": 0.5, "noise_var": 0.05, "optimize_hyperparameters": False}
    cg = la.LinearizedRegressor(_net(1), solver="cg", **kw).fit(X, y)
    dense = la.LinearizedRegressor(_net(1), solver="cholesky", **kw).fit(X, y)
    cg.posterior_.options.variance_rtol = 1e-9
    var_c, var_d = cg.predict(Xs, return_std=True)[1] ** 2, dense.predict(Xs, return_std=True)[1] ** 2
    assert cg.posterior_._basis is not None
    np.testing.assert_allclose(var_c, var_d, rtol=1.001e-9)
