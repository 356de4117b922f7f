"""LinearizedRegressor.sample and LinearizedClassifier.sample: joint function samples against the predictive
mean and joint covariance (statistical tolerances, fixed seeds), shapes, determinism, the memory budget."""

import numpy as np
import pytest
import torch
from models import inputs_for, mlp

import linadapt as la
from linadapt._memory import MemoryBudgetError

N = 20000


def _check_moments(draws, mean, cov):
    """draws (N, D) against mean (D,) and cov (D, D): a few standard errors for the mean, 5 % of the largest
    variance for the covariance."""
    scale = float(np.diag(cov).max())
    np.testing.assert_allclose(draws.mean(0), mean, rtol=0, atol=5 * np.sqrt(scale / len(draws)))
    np.testing.assert_allclose(np.cov(draws.T), cov, rtol=0, atol=0.05 * scale)


@pytest.fixture(scope="module")
def regressors():
    X = inputs_for("mlp", 12)
    net = mlp(d_out=2)
    with torch.no_grad():
        Y = net(X) + 0.3 * torch.sin(X[:, :2])
    multi = la.LinearizedRegressor(net).fit(X, Y)
    single = la.LinearizedRegressor(mlp(d_out=1)).fit(X, Y[:, 0])
    return multi, single


def test_regressor_samples_match_the_joint_predictive(regressors):
    multi, single = regressors
    Xs = inputs_for("mlp", 3, seed=7)
    draws = multi.sample(Xs, N, generator=torch.Generator().manual_seed(0))
    assert draws.shape == (N, 3, 2) and draws.dtype == np.float64
    mean, cov = multi.predict(Xs, return_cov=True, include_noise=False)
    _check_moments(draws.reshape(N, 6), mean.reshape(6), cov.reshape(6, 6))
    # one output (1-D y in fit): (n_samples, m); with include_noise the covariance of y
    draws = single.sample(Xs, N, generator=torch.Generator().manual_seed(1), include_noise=True)
    assert draws.shape == (N, 3)
    mean, cov = single.predict(Xs, return_cov=True, include_noise=True)
    _check_moments(draws, mean, cov)


def test_samples_of_y_with_per_output_noise_add_each_outputs_variance():
    X = inputs_for("mlp", 12)
    net = mlp(d_out=2)
    with torch.no_grad():
        Y = net(X) + 0.3 * torch.sin(X[:, :2])
    reg = la.LinearizedRegressor(net, noise_var=[0.01, 0.5], optimize_hyperparameters=False).fit(X, Y)
    Xs = inputs_for("mlp", 3, seed=7)
    draws = reg.sample(Xs, N, generator=torch.Generator().manual_seed(2), include_noise=True)
    mean, cov = reg.predict(Xs, return_cov=True, include_noise=True)
    _check_moments(draws.reshape(N, 6), mean.reshape(6), cov.reshape(6, 6))
    latent = reg.predict(Xs, return_cov=True, include_noise=False)[1].reshape(6, 6)
    np.testing.assert_allclose(np.diag(cov.reshape(6, 6)) - np.diag(latent), [0.01, 0.5] * 3, rtol=1e-10)


def test_regressor_samples_are_deterministic_with_a_generator_and_bounded_in_memory(regressors):
    multi, _ = regressors
    Xs = inputs_for("mlp", 4, seed=8)
    a = multi.sample(Xs, 3, generator=torch.Generator().manual_seed(5))
    b = multi.sample(Xs, 3, generator=torch.Generator().manual_seed(5))
    np.testing.assert_array_equal(a, b)
    assert multi.sample(Xs).shape == (1, 4, 2)
    budget = multi.memory_budget
    multi.memory_budget = 1000
    try:
        with pytest.raises(MemoryBudgetError, match="joint samples over 4 inputs"):
            multi.sample(Xs, 3)
    finally:
        multi.memory_budget = budget
    with pytest.raises(ValueError, match="n_samples"):
        multi.sample(Xs, 0)


def test_classifier_samples_match_the_logit_posterior():
    X = inputs_for("mlp", 15)
    y = torch.randint(0, 3, (15,), generator=torch.Generator().manual_seed(0))
    clf = la.LinearizedClassifier(mlp(d_out=3)).fit(X, y)
    Xs = inputs_for("mlp", 2, seed=9)
    draws = clf.sample(Xs, N, generator=torch.Generator().manual_seed(2))
    assert draws.shape == (N, 2, 3)
    mean, blocks = clf.predict_logits(Xs, return_cov=True)
    joint = clf.posterior_.latent_cov(clf.linearization_.prepare_inputs(Xs)).cpu().numpy()
    for i in range(2):  # the joint covariance's diagonal blocks are predict_logits' per-example blocks
        np.testing.assert_allclose(joint[3 * i : 3 * i + 3, 3 * i : 3 * i + 3], blocks[i], rtol=1e-8, atol=1e-10)
    _check_moments(draws.reshape(N, 6), mean.reshape(6), joint)
    a = clf.sample(Xs, 2, generator=torch.Generator().manual_seed(3))
    np.testing.assert_array_equal(a, clf.sample(Xs, 2, generator=torch.Generator().manual_seed(3)))
    clf.memory_budget = 100
    with pytest.raises(MemoryBudgetError):
        clf.sample(Xs, 2)
