"""The Bernoulli and multilabel likelihoods and their links (sigmoid_links), beyond the generic contract."""

import math

import numpy as np
import pytest
import torch

from linadapt.likelihoods import Bernoulli, Categorical, Multilabel
from linadapt.likelihoods.sigmoid_links import binary_probabilities
from linadapt.likelihoods.softmax_links import class_probabilities


def gauss_hermite_sigmoid(mu: float, var: float, order: int = 120) -> float:
    """E[σ(f)], f ~ N(mu, var), by Gauss–Hermite quadrature (exact to ~1e-12 for these moments)."""
    x, w = np.polynomial.hermite.hermgauss(order)
    f = mu + math.sqrt(2.0 * var) * x
    return float((w / (1.0 + np.exp(-f))).sum() / math.sqrt(math.pi))


def test_bernoulli_is_the_two_class_softmax_with_a_zero_logit():
    # p(y | f) = σ(f)^y σ(−f)^(1−y) = softmax([0, f])_y: the log-likelihoods and gradients agree
    g = torch.Generator().manual_seed(0)
    f = 3 * torch.randn(7, 1, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (7,), generator=g)
    ber, cat = Bernoulli(), Categorical()
    Yb, Yc = ber.encode_targets(y, 1), cat.encode_targets(y, 2)
    F2 = torch.cat([torch.zeros_like(f), f], 1)
    torch.testing.assert_close(ber.log_prob(f, Yb), cat.log_prob(F2, Yc), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(ber.gradient(f, Yb)[:, 0], cat.gradient(F2, Yc)[:, 1], rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(ber.curvature(f).blocks()[:, 0, 0], cat.curvature(F2).blocks()[:, 1, 1])


def test_multilabel_is_a_sum_of_independent_bernoullis():
    g = torch.Generator().manual_seed(1)
    F = 2 * torch.randn(6, 3, generator=g, dtype=torch.float64)
    Y = torch.randint(0, 2, (6, 3), generator=g)
    ml, ber = Multilabel(), Bernoulli()
    per_output = sum(ber.log_prob(F[:, k : k + 1], ber.encode_targets(Y[:, k], 1)) for k in range(3))
    torch.testing.assert_close(ml.log_prob(F, ml.encode_targets(Y, 3)), per_output, rtol=1e-14, atol=1e-14)
    curv = ml.curvature(F)
    blocks = curv.blocks()
    off = blocks - torch.diag_embed(torch.diagonal(blocks, dim1=1, dim2=2))
    assert float(off.abs().max()) == 0.0  # W = diag(p (1 − p)): no coupling between outcomes
    p = torch.sigmoid(F)
    torch.testing.assert_close(torch.diagonal(blocks, dim1=1, dim2=2), p * (1 - p), rtol=1e-14, atol=1e-15)


def test_extreme_logits_stay_finite_and_keep_small_probabilities():
    F = torch.tensor([[800.0], [-800.0], [40.0]], dtype=torch.float64)
    ber = Bernoulli()
    Y = ber.encode_targets(torch.tensor([0, 1, 0]), 1)
    logp = ber.log_prob(F, Y)
    torch.testing.assert_close(logp, torch.tensor([-800.0, -800.0, -40.0], dtype=torch.float64), rtol=1e-12, atol=0)
    proba = ber.predictive(F, None, "map")
    assert float(proba[2, 0]) == pytest.approx(math.exp(-40.0), rel=1e-12)  # P(y = 0) not lost to 1 − p


def test_probit_link_is_the_kappa_formula():
    g = torch.Generator().manual_seed(2)
    mu = 2 * torch.randn(5, 3, generator=g, dtype=torch.float64)
    A = torch.randn(5, 3, 3, generator=g, dtype=torch.float64)
    cov = A @ A.transpose(1, 2)
    var = torch.diagonal(cov, dim1=1, dim2=2)
    kappa = 1.0 / torch.sqrt(1.0 + math.pi * var / 8.0)
    p1, p0 = binary_probabilities(mu, cov, "probit")
    torch.testing.assert_close(p1, torch.sigmoid(kappa * mu), rtol=0, atol=1e-15)
    torch.testing.assert_close(p0, torch.sigmoid(-kappa * mu), rtol=0, atol=1e-15)
    torch.testing.assert_close(Multilabel().predictive(mu, cov), p1, rtol=0, atol=0)
    proba = Bernoulli().predictive(mu[:, :1], cov[:, :1, :1], "probit")
    torch.testing.assert_close(proba, torch.stack([p0[:, 0], p1[:, 0]], 1), rtol=0, atol=0)


def test_monte_carlo_link_matches_quadrature_and_probit_approximates_it():
    cases = [(0.0, 1.0), (1.5, 0.3), (-2.0, 4.0), (3.0, 9.0), (0.7, 0.0)]
    mu = torch.tensor([[m] for m, _ in cases], dtype=torch.float64)
    cov = torch.tensor([[[v]] for _, v in cases], dtype=torch.float64)
    exact = torch.tensor([gauss_hermite_sigmoid(m, v) for m, v in cases], dtype=torch.float64)
    mc = Bernoulli().predictive(mu, cov, "mc", n_samples=200_000, seed=3)[:, 1]
    torch.testing.assert_close(mc, exact, rtol=0, atol=3e-3)  # ≈ 5 standard errors of 200k draws
    probit = Bernoulli().predictive(mu, cov, "probit")[:, 1]
    torch.testing.assert_close(probit, exact, rtol=0, atol=2e-2)  # MacKay's approximation: ~1e-2 at worst
    assert float(probit[0]) == 0.5 and float(mc[4]) == pytest.approx(1 / (1 + math.exp(-0.7)), abs=1e-15)


def test_monte_carlo_is_seeded():
    mu = torch.tensor([[0.3, -1.0]], dtype=torch.float64)
    cov = torch.diag_embed(torch.tensor([[2.0, 0.5]], dtype=torch.float64))
    a, b, c = (Multilabel().predictive(mu, cov, "mc", n_samples=50, seed=s) for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bridge_is_refused_because_its_two_class_mean_ignores_the_variance():
    # the fact the refusal rests on: the Laplace bridge of two softmax logits returns σ(μ₁ − μ₀) for any Σ
    g = torch.Generator().manual_seed(4)
    mu = 2 * torch.randn(6, 2, generator=g, dtype=torch.float64)
    A = torch.randn(6, 2, 2, generator=g, dtype=torch.float64)
    cov = A @ A.transpose(1, 2) + 0.1 * torch.eye(2, dtype=torch.float64)
    torch.testing.assert_close(class_probabilities(mu, cov, "bridge")[:, 1], torch.sigmoid(mu[:, 1] - mu[:, 0]))
    for lik in (Bernoulli(), Multilabel()):
        with pytest.raises(ValueError, match=r"'bridge' has no meaning for the .* likelihood.*link='map'"):
            lik.predictive(mu[:, :1], cov[:, :1, :1], "bridge")
        with pytest.raises(ValueError, match="link must be one of 'probit', 'mc', 'map'"):
            lik.predictive(mu[:, :1], cov[:, :1, :1], "softmax")
        with pytest.raises(ValueError, match="needs the covariance"):
            lik.predictive(mu[:, :1], None, "probit")


def test_targets_outside_the_support_are_named():
    with pytest.raises(ValueError, match=r"y contains 2: the bernoulli likelihood takes targets 0 and 1 only"):
        Bernoulli().encode_targets(torch.tensor([0, 1, 2]), 1)
    with pytest.raises(ValueError, match=r"y contains -1, 0\.5: the multilabel likelihood takes targets 0 and 1"):
        Multilabel().encode_targets(np.array([[0, 0.5], [1, -1]]), 2)
    with pytest.raises(ValueError, match=r"shape \(2, 3\).*\(2, 2\)"):
        Multilabel().encode_targets(np.zeros((2, 3)), 2)
    with pytest.raises(ValueError, match="dtype"):
        Multilabel().encode_targets(np.array([["a", "b"]]), 2)
    Y = Multilabel().encode_targets(np.array([[True, False], [False, True]]), 2)  # booleans are 0/1
    assert Y.dtype == torch.float64 and Y.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert Bernoulli().encode_targets(np.array([[1], [0]]), 1).tolist() == [[1.0], [0.0]]


def test_output_counts_are_checked():
    with pytest.raises(ValueError, match=r"bernoulli likelihood needs a model with one output.*this model has 3"):
        Bernoulli().check_outputs(3)
    with pytest.raises(ValueError, match=r"categorical likelihood needs logits .* c ≥ 2.*likelihood=.bernoulli."):
        Categorical().check_outputs(1)
    Multilabel().check_outputs(1)
    Multilabel().check_outputs(5)
