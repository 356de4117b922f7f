"""One noise variance per output (``noise="per_output"``): the posterior, the evidence and the hyperparameter
search against the dense closed form with the block-diagonal noise Σ = I_n ⊗ diag(σ²_1..c), built here from an
explicit autograd Jacobian (tests/models.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from models import reference_jacobian
from sklearn.base import clone
from torch import nn

import linadapt as la
from linadapt.estimators.persistence import read_header
from linadapt.inference.per_output_noise import PerOutputEvidence, refuse_per_output, resolve_noise
from linadapt.inference.regression import RegressionProblem, SolverOptions

SIG2 = np.array([0.02, 0.3, 1.5])
S2 = 0.7


def _net(c: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, c)).double()


def _data(n: int, c: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return X, torch.randn(n, c, generator=g, dtype=torch.float64)


def _names(net: nn.Module) -> list[str]:
    return [name for name, _ in net.named_parameters()]


def _outputs(net: nn.Module, X: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net.eval()(X).double()


def closed_form(net, X, Y, Xs, s2, sig2, prior_mean="network"):
    """Posterior mean (m, c), latent covariance (m·c, m·c) and log N(r; 0, A), A = s² J Jᵀ + I ⊗ diag(σ²),
    in function space from the explicit Jacobian (a prior centred at θ = 0 with ``prior_mean="zero"``)."""
    names = _names(net)
    J = reference_jacobian(net, X, names)
    n, c, p = J.shape
    Jm, Js = J.reshape(n * c, p), reference_jacobian(net, Xs, names).reshape(-1, p)
    mu0 = torch.zeros(p, dtype=torch.float64)
    if prior_mean == "zero":
        mu0 = -torch.cat([dict(net.named_parameters())[k].detach().reshape(-1) for k in names])
    r = (Y - _outputs(net, X)).reshape(-1) - Jm @ mu0
    A = s2 * Jm @ Jm.T + torch.diag(torch.as_tensor(sig2).repeat(n))
    alpha = torch.linalg.solve(A, r)
    mean = _outputs(net, Xs) + (Js @ (mu0 + s2 * Jm.T @ alpha)).reshape(-1, c)
    cov = s2 * Js @ Js.T - s2**2 * Js @ Jm.T @ torch.linalg.solve(A, Jm @ Js.T)
    lml = -0.5 * r @ alpha - 0.5 * torch.logdet(A) - 0.5 * n * c * math.log(2 * math.pi)
    return mean.numpy(), cov.numpy(), float(lml)


def rel_err(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


@pytest.mark.parametrize("prior_mean", ["network", "zero"])
@pytest.mark.parametrize("space", ["function", "parameter"])
def test_posterior_and_evidence_equal_the_block_diagonal_closed_form(space, prior_mean):
    net = _net()
    X, Y = _data(12)
    Xs = _data(5, seed=7)[0]
    reg = la.LinearizedRegressor(
        net, prior_var=S2, noise_var=SIG2, optimize_hyperparameters=False, space=space, prior_mean=prior_mean
    ).fit(X, Y)
    assert reg.space_ == space and reg.solver_ == "cholesky"
    assert isinstance(reg.noise_var_, np.ndarray) and reg.noise_var_.shape == (3,)
    np.testing.assert_array_equal(reg.noise_var_, SIG2)
    mean_ref, cov_ref, lml_ref = closed_form(net, X, Y, Xs, S2, SIG2, prior_mean)
    m, c = Xs.shape[0], 3
    noise_cov = np.diag(np.tile(SIG2, m))
    mean, cov = reg.predict(Xs, return_cov=True, include_noise=False)
    assert rel_err(mean, mean_ref) < 1e-8
    assert rel_err(cov.reshape(m * c, m * c), cov_ref) < 1e-8
    _, cov_y = reg.predict(Xs, return_cov=True)
    assert rel_err(cov_y.reshape(m * c, m * c), cov_ref + noise_cov) < 1e-8
    for include_noise in (False, True):
        _, std = reg.predict(Xs, return_std=True, include_noise=include_noise)
        var_ref = np.diag(cov_ref) + (np.tile(SIG2, m) if include_noise else 0)
        assert rel_err(std.reshape(-1) ** 2, var_ref) < 1e-8
        _, blocks = reg.predict_blocks(Xs, include_noise=include_noise)
        ref = cov_ref + (noise_cov if include_noise else 0)
        ref_blocks = np.stack([ref[i * c : (i + 1) * c, i * c : (i + 1) * c] for i in range(m)])
        assert rel_err(blocks, ref_blocks) < 1e-8
    # the evidence: fitted value and at other hyperparameters (a float noise is every output's)
    assert reg.log_marginal_likelihood_value_ == pytest.approx(lml_ref, rel=1e-8)
    other = np.array([0.5, 0.05, 0.2])
    lml_other = closed_form(net, X, Y, Xs, 1.3, other, prior_mean)[2]
    assert reg.log_marginal_likelihood(1.3, other) == pytest.approx(lml_other, rel=1e-8)
    same = closed_form(net, X, Y, Xs, S2, np.full(3, 0.1), prior_mean)[2]
    assert reg.log_marginal_likelihood(noise_var=0.1) == pytest.approx(same, rel=1e-8)
    # the test-point density uses each output's variance
    Ys = _data(5, seed=8)[1].numpy()
    _, std = reg.predict(Xs, return_std=True)
    expected = -0.5 * np.log(2 * np.pi * std**2) - 0.5 * (Ys - mean) ** 2 / std**2
    np.testing.assert_allclose(reg.log_predictive_density(Xs, Ys), expected, rtol=1e-10)


@pytest.mark.parametrize("space", ["function", "parameter"])
def test_evidence_gradient_by_finite_differences(space):
    net = _net()
    X, Y = _data(10)
    lin = la.Linearization(net)
    r = (Y - _outputs(net, X)).reshape(-1)
    problem = RegressionProblem(lin, X, r, SolverOptions(), None)
    evidence = PerOutputEvidence.from_problem(problem, space)
    x0 = np.array([math.log(0.8), math.log(0.05), math.log(0.4), math.log(2.0)])
    value, grad = evidence.negative_log_ml_and_grad(x0)
    assert -value == pytest.approx(closed_form(net, X, Y, X, 0.8, np.exp(x0[1:]))[2], rel=1e-10)
    for i in range(4):
        e = np.eye(4)[i] * 1e-5
        fd = (evidence.negative_log_ml_and_grad(x0 + e)[0] - evidence.negative_log_ml_and_grad(x0 - e)[0]) / 2e-5
        assert grad[i] == pytest.approx(fd, rel=1e-5, abs=1e-7)


def _log_prior(scales: np.ndarray, sig2: np.ndarray, loc: float = -4.0, scale: float = 2.0) -> float:
    return float(-0.5 * (((np.log(sig2 / scales) - loc) / scale) ** 2).sum())


def test_learned_noise_recovers_levels_100x_apart():
    """200 points drawn from the linearized GP prior with output noise variances 100× apart: the type-II MAP
    noise of each output is within a factor 1.3 of the truth, both spaces find the same point, it beats every
    neighbour on evidence × hyperprior, and it has a larger evidence than the best shared noise."""
    net, n, true = _net(seed=3), 200, np.array([0.01, 0.1, 1.0])
    g = torch.Generator().manual_seed(5)
    X = torch.randn(n, 2, generator=g, dtype=torch.float64)
    J = reference_jacobian(net, X, _names(net))
    delta = torch.randn(J.shape[2], generator=g, dtype=torch.float64)  # s² = 1
    eps = torch.randn(n, 3, generator=g, dtype=torch.float64) * torch.as_tensor(np.sqrt(true))
    Y = _outputs(net, X) + torch.einsum("icp,p->ic", J, delta) + eps
    reg = la.LinearizedRegressor(net, noise="per_output", space="parameter").fit(X, Y)
    assert reg.space_ == "parameter" and reg.noise_var_.shape == (3,)
    ratio = reg.noise_var_ / true
    assert np.all(ratio < 1.3) and np.all(ratio > 1 / 1.3), ratio
    fun = la.LinearizedRegressor(net, noise="per_output", space="function").fit(X, Y)
    np.testing.assert_allclose(fun.noise_var_, reg.noise_var_, rtol=1e-3)
    assert fun.prior_var_ == pytest.approx(reg.prior_var_, rel=1e-3)
    # a stationary point of log p(y | s², σ²) + Σ_a log p(σ²_a), each prior relative to its output's v̄_a
    scales = ((Y - _outputs(net, X)) ** 2).mean(0).numpy()
    s2, sig2 = reg.prior_var_, reg.noise_var_

    def objective(s2_, sig2_):
        return reg.log_marginal_likelihood(s2_, sig2_) + _log_prior(scales, sig2_)

    best = objective(s2, sig2)
    for k in range(4):
        for f in (0.97, 1.03):
            step = np.ones(4)
            step[k] = f
            assert objective(s2 * step[0], sig2 * step[1:]) < best
    shared = la.LinearizedRegressor(net, noise="shared").fit(X, Y)
    assert isinstance(shared.noise_var_, float)
    assert reg.log_marginal_likelihood_value_ > shared.log_marginal_likelihood_value_ + 50
    # with hyperprior=None the search is the evidence's own stationary point
    ml2 = la.LinearizedRegressor(net, noise="per_output", hyperprior=None).fit(X, Y)
    for k in range(3):
        for f in (0.97, 1.03):
            sig2_ = ml2.noise_var_.copy()
            sig2_[k] *= f
            assert ml2.log_marginal_likelihood(noise_var=sig2_) < ml2.log_marginal_likelihood_value_


@pytest.mark.parametrize("optimize", [False, True])
def test_one_output_is_the_shared_model(optimize):
    net = _net(c=1)
    X, Y = _data(15, c=1)
    y = Y[:, 0]
    fits = [
        la.LinearizedRegressor(net, noise=noise, noise_var=nv, optimize_hyperparameters=optimize).fit(X, y)
        for noise, nv in [("shared", 0.2), ("per_output", 0.2), ("auto", [0.2]), ("per_output", np.array([0.2]))]
    ]
    Xs = _data(4, c=1, seed=9)[0]
    ref_mean, ref_std = fits[0].predict(Xs, return_std=True)
    for reg in fits:
        assert isinstance(reg.noise_var_, float) and reg.noise_var_ == fits[0].noise_var_
        assert reg.prior_var_ == fits[0].prior_var_
        mean, std = reg.predict(Xs, return_std=True)
        np.testing.assert_array_equal(mean, ref_mean)
        np.testing.assert_array_equal(std, ref_std)


def test_equal_values_with_shared_noise_and_auto_choice():
    net = _net()
    X, Y = _data(10)
    reg = la.LinearizedRegressor(net, noise="shared", noise_var=[0.1, 0.1, 0.1], optimize_hyperparameters=False)
    assert isinstance(reg.fit(X, Y).noise_var_, float) and reg.noise_var_ == 0.1
    auto = la.LinearizedRegressor(net, noise_var=(0.1, 0.2, 0.3), optimize_hyperparameters=False).fit(X, Y)
    np.testing.assert_array_equal(auto.noise_var_, [0.1, 0.2, 0.3])
    assert isinstance(la.LinearizedRegressor(net, noise_var=0.1).fit(X, Y).noise_var_, float)  # auto: shared
    per = la.LinearizedRegressor(net, noise="per_output", noise_var=0.1, optimize_hyperparameters=False).fit(X, Y)
    np.testing.assert_array_equal(per.noise_var_, [0.1, 0.1, 0.1])
    # without noise_var and without search: 0.1 × each output's residual variance
    guess = la.LinearizedRegressor(net, noise="per_output", optimize_hyperparameters=False).fit(X, Y)
    expected = 0.1 * (Y - _outputs(net, X)).var(0).numpy()
    np.testing.assert_allclose(guess.noise_var_, expected, rtol=1e-12)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"noise_var": [0.1, 0.2]}, "2 values but the model has 3 outputs"),
        ({"noise_var": [0.1, 0.2, 0.3, 0.4]}, "4 values"),
        ({"noise_var": [0.1, -0.2, 0.3]}, "positive"),
        ({"noise_var": [0.1, 0.0, 0.3]}, "positive"),
        ({"noise_var": [0.1, float("nan"), 0.3]}, "positive"),
        ({"noise_var": [[0.1, 0.2, 0.3]]}, "1-D"),
        ({"noise_var": "0.1"}, "noise_var"),
        ({"noise_var": -1.0}, "positive"),
        ({"noise": "diagonal"}, "noise must be one of"),
        ({"noise": "shared", "noise_var": [0.1, 0.2, 0.3]}, "noise='shared' takes one noise variance"),
        ({"noise": "per_output", "marginalize": True}, "not supported with marginalize=True"),
        ({"noise": "per_output", "prior_groups": "layers"}, "not supported with prior_groups"),
        ({"noise": "per_output", "solver": "cg"}, "not supported with solver='cg'"),
        ({"noise_var": [0.1, 0.2, 0.3], "solver": "cg"}, "per-output noise"),
        ({"noise": "per_output", "memory_budget": 1000}, "above the memory budget"),
    ],
)
def test_errors(kwargs, match):
    net = _net()
    X, Y = _data(10)
    with pytest.raises(ValueError, match=match):
        la.LinearizedRegressor(net, **kwargs).fit(X, Y)


def test_refusals_and_evidence_arguments():
    with pytest.raises(ValueError, match="distributed=True"):
        refuse_per_output(False, False, True, False)
    refuse_per_output(False, False, False, False)  # nothing to refuse
    assert resolve_noise("per_output", None, 1) == (False, None)
    net = _net()
    X, Y = _data(10)
    reg = la.LinearizedRegressor(net, noise="per_output").fit(X, Y)
    with pytest.raises(ValueError, match="2 values"):
        reg.log_marginal_likelihood(noise_var=[0.1, 0.2])
    with pytest.raises(ValueError, match="positive"):
        reg.log_marginal_likelihood(noise_var=[0.1, 0.2, -0.3])
    assert reg.log_marginal_likelihood() == reg.log_marginal_likelihood_value_


def test_clone_get_params_and_round_trip(tmp_path):
    net = _net()
    X, Y = _data(14)
    Xs = _data(5, seed=7)[0]
    for kw in ({"noise": "per_output"}, {"noise_var": np.array([0.05, 0.1, 0.2]), "space": "parameter"}):
        reg = la.LinearizedRegressor(net, **kw)
        twin = clone(reg)
        assert twin.get_params()["noise"] == reg.get_params()["noise"]
        reg.fit(X, Y)
        twin.fit(X, Y)
        np.testing.assert_array_equal(twin.noise_var_, reg.noise_var_)
        path = tmp_path / "per_output.linadapt"
        reg.save(path)
        header = read_header(path)
        assert len(header["fitted"]["noise_var_"]) == 3
        json.dumps(header["settings"])
        back = la.load(path, _net())
        assert isinstance(back.noise_var_, np.ndarray)
        np.testing.assert_array_equal(back.noise_var_, reg.noise_var_)
        assert back.prior_var_ == reg.prior_var_ and back.space_ == reg.space_
        for a, b in zip(reg.predict(Xs, return_std=True), back.predict(Xs, return_std=True)):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
        assert back.log_marginal_likelihood_value_ == pytest.approx(reg.log_marginal_likelihood_value_, rel=1e-10)
