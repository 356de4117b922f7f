"""Averaging the regression predictive over the hyperparameters (``LinearizedRegressor(marginalize=True)``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from models import reference_jacobian
from torch import nn

from linadapt import LinearizedRegressor


def _problem(n: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(n, 1, generator=g, dtype=torch.float64) * 4 - 2
    y = torch.sin(2 * x[:, 0]) + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    xt = torch.linspace(-3, 3, 9, dtype=torch.float64).unsqueeze(1)
    return net, x, y, xt


def test_mixture_equals_brute_force_quadrature() -> None:
    """Weights ∝ the evidence of fixed-hyperparameter fits; moments and density of the mixture of their
    predictives, recomputed from LinearizedRegressor fits at every grid point of the mixture."""
    net, x, y, xt = _problem()
    reg = LinearizedRegressor(net, marginalize=True).fit(x, y)
    mix = reg.mixture_
    pick = torch.argsort(mix.weights, descending=True)[:60]  # the heaviest grid points carry the mass
    assert float(mix.weights[pick].sum()) > 0.5
    yt = torch.sin(2 * xt[:, 0]).numpy()
    logw, means, stds = [], [], []
    for i in pick.tolist():
        s2, sig2 = float(mix.s2[i]), float(mix.sig2[i])
        fixed = LinearizedRegressor(net, prior_var=s2, noise_var=sig2, optimize_hyperparameters=False).fit(x, y)
        logw.append(fixed.log_marginal_likelihood_value_)
        m, s = fixed.predict(xt, return_std=True)
        means.append(m)
        stds.append(s)
    logw = np.array(logw)
    w = np.exp(logw - logw.max())
    np.testing.assert_allclose(w / w.sum(), (mix.weights[pick] / mix.weights[pick].sum()).numpy(), rtol=1e-7)
    M, S = np.array(means), np.array(stds)
    comp_shift, comp_var = mix.components(reg.linearization_.ntk(xt, x), reg.linearization_.ntk_blocks(xt)[:, 0, 0])
    with torch.no_grad():
        base = net(xt)[:, 0].numpy()
    np.testing.assert_allclose(comp_shift[pick].numpy() + base, M, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(comp_var[pick].numpy() + mix.sig2[pick, None].numpy(), S**2, rtol=1e-7, atol=1e-12)
    # the mixture density of the full grid, by its definition
    shift, var = mix.components(reg.linearization_.ntk(xt, x), reg.linearization_.ntk_blocks(xt)[:, 0, 0])
    var = (var + mix.sig2[:, None]).numpy()
    dens = (
        mix.weights[:, None].numpy()
        * np.exp(-0.5 * (yt - base - shift.numpy()) ** 2 / var)
        / np.sqrt(2 * math.pi * var)
    ).sum(0)
    np.testing.assert_allclose(reg.log_predictive_density(xt, yt), np.log(dens), rtol=1e-10)
    mean, std = reg.predict(xt, return_std=True)
    wt = mix.weights[:, None].numpy()
    mu = base + (wt * shift.numpy()).sum(0)
    np.testing.assert_allclose(mean, mu, rtol=1e-10)
    np.testing.assert_allclose(std**2, (wt * (var + (base + shift.numpy()) ** 2)).sum(0) - mu**2, rtol=1e-8)


def _log_evidence(net, x, y, s2: torch.Tensor, sig2: torch.Tensor) -> torch.Tensor:
    """log p(y | s², σ²) of the one-output GP with kernel s² J Jᵀ + σ² I at each (s2[g], sig2[g]), from the
    plain-autograd Jacobian J through its singular values (stable over the whole hyperprior box)."""
    J = reference_jacobian(net, x, [name for name, _ in net.named_parameters()])[:, 0]  # (n, p)
    with torch.no_grad():
        r = y - net(x)[:, 0]
    n = r.numel()
    U, sv, _ = torch.linalg.svd(J, full_matrices=False)
    lam = torch.zeros(n, dtype=torch.float64)
    lam[: sv.numel()] = sv**2
    Uf = torch.linalg.qr(torch.cat([U, torch.eye(n, dtype=torch.float64)], 1))[0][:, :n]  # U completed to a basis
    z2 = (Uf.T @ r) ** 2
    q = s2[:, None] * lam + sig2[:, None]
    return -0.5 * (z2 / q).sum(-1) - 0.5 * torch.log(q).sum(-1) - 0.5 * n * math.log(2 * math.pi)


def test_grid_border_carries_no_weight_and_optimum_is_kept() -> None:
    net, x, y, _ = _problem(12)
    reg = LinearizedRegressor(net, marginalize=True).fit(x, y)
    iso = LinearizedRegressor(net, hyperprior=None).fit(x, y)  # the mixture is centred on the evidence optimum
    assert reg.prior_var_ == pytest.approx(iso.prior_var_) and reg.noise_var_ == pytest.approx(iso.noise_var_)
    mix = reg.mixture_
    # the weights are the posterior under the log-uniform hyperprior on a grid uniform in log: ∝ the evidence
    # (points below 1e-12 of the largest are dropped, so the normalisations differ by at most G·1e-12)
    ref = torch.softmax(_log_evidence(net, x, y, mix.s2, mix.sig2), 0)
    np.testing.assert_allclose(mix.weights.numpy(), ref.numpy(), rtol=1e-6, atol=1e-14)
    # the border: a brute-force grid over the whole hyperprior box (s² in [e⁻²⁸, e²⁸], σ² in [e⁻²⁸, e¹²] × the
    # mean squared residual) puts no posterior mass outside the rectangle the mixture's points span
    with torch.no_grad():
        msr = float(((y - net(x)[:, 0]) ** 2).mean())
    ls = torch.linspace(-28.0, 28.0, 225, dtype=torch.float64)
    ln = torch.linspace(math.log(msr) - 28.0, math.log(msr) + 12.0, 161, dtype=torch.float64)
    S, N = torch.meshgrid(ls, ln, indexing="ij")
    post = torch.softmax(_log_evidence(net, x, y, S.reshape(-1).exp(), N.reshape(-1).exp()), 0).reshape(S.shape)
    lo_s, hi_s = float(mix.s2.log().min()), float(mix.s2.log().max())
    lo_n, hi_n = float(mix.sig2.log().min()), float(mix.sig2.log().max())
    inside = (S >= lo_s - 0.25) & (S <= hi_s + 0.25) & (N >= lo_n - 0.25) & (N <= hi_n + 0.25)  # ± the box step
    assert float(post[~inside].sum()) < 1e-9
    # posterior mass spreads over several points, centred near the optimum in log space
    assert len(mix.weights) > 20
    centre = float((mix.weights * mix.sig2.log()).sum())
    assert abs(centre - math.log(reg.noise_var_)) < 3.0
    # a finer grid over the same region changes the predictive by less than the quadrature error we accept
    import linadapt.inference.hyper_averaging as marginal

    xt = torch.linspace(-3, 3, 7, dtype=torch.float64).unsqueeze(1)
    coarse = reg.predict(xt, return_std=True)
    old = marginal._GRID
    try:
        marginal._GRID = 121
        fine = LinearizedRegressor(net, marginalize=True).fit(x, y).predict(xt, return_std=True)
    finally:
        marginal._GRID = old
    np.testing.assert_allclose(coarse[0], fine[0], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(coarse[1], fine[1], rtol=1e-2)


@pytest.mark.parametrize("seed", [0, 5])
def test_marginalizing_tames_a_collapsed_noise_optimum(seed: int) -> None:
    """Sinusoid draws (10 points, a source network trained briefly on another sinusoid) where the type-II
    optimum's noise collapses and its test NLL explodes; the mixture over the hyperparameters stays sane, and so
    does the default point estimate (type-II MAP with the noise hyperprior)."""
    from linadapt.experiments.sinusoids import _points, _train, sample_task

    gen = torch.Generator().manual_seed(seed)
    src, tgt = sample_task(gen), sample_task(gen)
    net = _train(src, seed, 300)
    dg = torch.Generator().manual_seed(100 * seed + 10)
    (x, y), (xt, yt) = _points(tgt, 10, dg), _points(tgt, 100, dg)
    plain = LinearizedRegressor(net, hyperprior=None).fit(x, y[:, 0])
    mixed = LinearizedRegressor(net, marginalize=True).fit(x, y[:, 0])
    default = LinearizedRegressor(net).fit(x, y[:, 0])
    nll_plain = -plain.log_predictive_density(xt, yt[:, 0]).mean()
    nll_mixed = -mixed.log_predictive_density(xt, yt[:, 0]).mean()
    nll_default = -default.log_predictive_density(xt, yt[:, 0]).mean()
    assert nll_plain > 20 and nll_mixed < 3 and nll_default < 3
    assert default.noise_var_ > 100 * plain.noise_var_


def test_marginalize_errors() -> None:
    net, x, y, xt = _problem()
    reg = LinearizedRegressor(net, marginalize=True).fit(x, y)
    with pytest.raises(ValueError, match="return_cov"):
        reg.predict(xt, return_cov=True)
    with pytest.raises(ValueError, match="predict_blocks"):
        reg.predict_blocks(xt)
    for kw in (dict(solver="cg"), dict(prior_groups="layers"), dict(prior_mean="zero")):
        with pytest.raises(ValueError, match="marginalize=True"):
            LinearizedRegressor(net, marginalize=True, **kw).fit(x, y)
    two = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    with pytest.raises(ValueError, match="one-output"):
        LinearizedRegressor(two, marginalize=True).fit(x, torch.stack([y, y], 1))


def test_log_predictive_density_of_the_gaussian_predictive() -> None:
    net, x, y, xt = _problem()
    reg = LinearizedRegressor(net).fit(x, y)
    yt = np.sin(2 * xt[:, 0].numpy())
    m, s = reg.predict(xt, return_std=True)
    ref = -0.5 * np.log(2 * math.pi * s**2) - 0.5 * (yt - m) ** 2 / s**2
    np.testing.assert_allclose(reg.log_predictive_density(xt, yt), ref, rtol=1e-12)
    # y given as (n, 1): densities (m, 1), with and without averaging over the hyperparameters
    for kw in ({}, {"marginalize": True}):
        col = LinearizedRegressor(net, **kw).fit(x, y.unsqueeze(1))
        assert col.log_predictive_density(xt, yt[:, None]).shape == (9, 1)


def test_marginalized_estimator_saves_and_loads(tmp_path) -> None:
    net, x, y, xt = _problem()
    reg = LinearizedRegressor(net, marginalize=True).fit(x, y)
    reg.save(tmp_path / "m.linadapt")
    back = LinearizedRegressor.load(tmp_path / "m.linadapt", net)
    for a, b in zip(reg.predict(xt, return_std=True), back.predict(xt, return_std=True)):
        np.testing.assert_allclose(a, b, rtol=1e-10)
