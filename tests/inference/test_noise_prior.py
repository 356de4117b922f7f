"""The default hyperparameter search of the regressor: type-II MAP with a log-normal hyperprior on the noise
variance relative to the residual scale (:class:`linadapt.inference.evidence.NoisePrior`)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from linadapt import LinearizedRegressor
from linadapt.inference.evidence import NoisePrior, noise_prior_from


def _problem(n: int = 10, seed: int = 0, noise: float = 0.01):
    """A 1-16-1 tanh net and n points of another function: few enough to be interpolated."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(n, 1, generator=g, dtype=torch.float64) * 4 - 2
    y = torch.sin(2 * x[:, 0] + 0.5) + noise * torch.randn(n, generator=g, dtype=torch.float64)
    return net, x, y


def _log_prior(reg: LinearizedRegressor, x, y, sig2: float, loc: float = -4.0, scale: float = 2.0) -> float:
    with torch.no_grad():
        v = float(((y - reg.model(x)[:, 0]) ** 2).mean())
    return -0.5 * ((math.log(sig2 / v) - loc) / scale) ** 2


def _log_posterior(reg, x, y, s2: float, sig2: float, **prior) -> float:
    return reg.log_marginal_likelihood(prior_var=s2, noise_var=sig2) + _log_prior(reg, x, y, sig2, **prior)


@pytest.mark.parametrize("space", ["function", "parameter"])
def test_default_is_the_maximum_of_evidence_times_noise_prior(space: str) -> None:
    """The fitted (s², σ²) beat every neighbour on log p(y | s², σ²) + log p(σ²), but not on the evidence
    alone: the ML-II optimum's noise variance lies further below the prior's centre."""
    net, x, y = _problem()
    reg = LinearizedRegressor(net, space=space, solver="cholesky").fit(x, y)
    ml2 = LinearizedRegressor(net, space=space, solver="cholesky", hyperprior=None).fit(x, y)
    s2, sig2 = reg.prior_var_, reg.noise_var_
    best = _log_posterior(reg, x, y, s2, sig2)
    for fs, fn in [(0.9, 1), (1.1, 1), (1, 0.9), (1, 1.1), (0.9, 1.1), (1.1, 0.9)]:
        assert _log_posterior(reg, x, y, s2 * fs, sig2 * fn) < best
    assert ml2.log_marginal_likelihood_value_ > reg.log_marginal_likelihood_value_  # ML-II: the evidence's max
    assert ml2.noise_var_ < 0.8 * reg.noise_var_
    # the reported value is the evidence at the chosen point, without the hyperprior
    assert reg.log_marginal_likelihood_value_ == pytest.approx(reg.log_marginal_likelihood(s2, sig2), rel=1e-10)


def test_a_custom_prior_and_none() -> None:
    net, x, y = _problem(seed=1)
    reg = LinearizedRegressor(net, solver="cholesky", hyperprior=(-8.0, 1.0)).fit(x, y)
    best = _log_posterior(reg, x, y, reg.prior_var_, reg.noise_var_, loc=-8.0, scale=1.0)
    for f in (0.9, 1.1):
        assert _log_posterior(reg, x, y, reg.prior_var_, reg.noise_var_ * f, loc=-8.0, scale=1.0) < best
    with torch.no_grad():
        v = float(((y - net(x)[:, 0]) ** 2).mean())
    assert abs(math.log(reg.noise_var_ / v) + 8.0) < 3.0  # a tight prior holds σ² near its centre
    ml2 = LinearizedRegressor(net, solver="cholesky", hyperprior=None).fit(x, y)
    for f in (0.9, 1.1):  # None: the evidence's own stationary point
        assert ml2.log_marginal_likelihood(noise_var=ml2.noise_var_ * f) < ml2.log_marginal_likelihood_value_
    for bad in ("weak", (1.0,), (0.0, -1.0), (float("nan"), 1.0)):
        with pytest.raises(ValueError, match=r"hyperprior|noise prior"):
            LinearizedRegressor(net, hyperprior=bad).fit(x, y)


def test_with_plenty_of_nearly_noiseless_data_the_evidence_wins() -> None:
    """The prior is weak: with 200 points at noise std 1e-3 the noise comes back near its true value."""
    net, x, y = _problem(n=200, noise=1e-3)
    net = nn.Sequential(nn.Linear(1, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)).double()
    reg = LinearizedRegressor(net).fit(x, y)
    ml2 = LinearizedRegressor(net, hyperprior=None).fit(x, y)
    assert abs(math.log(reg.noise_var_ / ml2.noise_var_)) < 0.2


def test_penalty_gradient_and_prior_groups() -> None:
    prior = NoisePrior(-3.0, 1.5)
    assert noise_prior_from("default") == NoisePrior() and noise_prior_from(None) is None
    assert noise_prior_from([-3, 1.5]) == prior  # a saved (JSON) pair comes back as a list

    def quadratic(x: np.ndarray) -> tuple[float, np.ndarray]:
        return float(x @ x), 2 * x

    f = prior.penalize(quadratic, r_sq=8.0, n_obs=4)
    x0 = np.array([0.3, -1.7])
    value, grad = f(x0)
    assert value == pytest.approx(float(x0 @ x0) + 0.5 * ((-1.7 - math.log(2.0) + 3.0) / 1.5) ** 2)
    for i in range(2):
        e = np.eye(2)[i] * 1e-6
        assert grad[i] == pytest.approx((f(x0 + e)[0] - f(x0 - e)[0]) / 2e-6, rel=1e-6)
    # the grouped search maximises the same posterior over (s²_g, σ²)
    net, x, y = _problem(seed=2)
    reg = LinearizedRegressor(net, prior_groups="layers").fit(x, y)
    ml2 = LinearizedRegressor(net, prior_groups="layers", hyperprior=None).fit(x, y)
    assert reg.noise_var_ > 2 * ml2.noise_var_
    with torch.no_grad():
        v = float(((y - net(x)[:, 0]) ** 2).mean())
    assert -4.0 - 2 * 3 < math.log(reg.noise_var_ / v) < -4.0 + 2 * 3
