"""The classifier's boundary-avoiding hyperprior on s² (linadapt.inference.scale_prior): its density, what it
changes (a search the evidence alone sends to s² → 0) and what it leaves exactly as it was (every search whose
optimum has a mean logit prior variance above e^loc)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import linadapt as la
from linadapt.inference.scale_prior import ScalePrior, scale_prior_from


@given(log_v=st.floats(-30, 30), loc=st.floats(-5, 5), scale=st.floats(0.1, 5))
def test_penalty_is_flat_above_loc_half_normal_below_and_its_slope_is_the_derivative(log_v, loc, scale):
    prior = ScalePrior(loc, scale)
    value, slope = prior.penalty(log_v)
    z = (log_v - loc) / scale
    assert value == pytest.approx(0.5 * min(z, 0.0) ** 2, rel=1e-12, abs=1e-12)
    h = 1e-6
    numeric = (prior.penalty(log_v + h)[0] - prior.penalty(log_v - h)[0]) / (2 * h)
    assert slope == pytest.approx(numeric, rel=1e-4, abs=1e-5 + h / scale**2)  # C¹ at the kink
    assert value >= 0.0 and (slope <= 0.0)  # never rewards a smaller v


def test_hyperprior_argument():
    assert scale_prior_from("default") == ScalePrior()
    assert scale_prior_from(None) is None
    assert scale_prior_from((1.0, 0.5)) == ScalePrior(1.0, 0.5)
    assert scale_prior_from([1, 3]) == ScalePrior(1.0, 3.0)  # as a saved file's JSON gives it back
    for bad in ("flat", (1.0,), (0.0, -1.0), (math.nan, 1.0), ScalePrior()):  # an object would not save as JSON
        with pytest.raises(ValueError):
            scale_prior_from(bad)
    with pytest.raises(ValueError, match="hyperprior"):
        la.LinearizedClassifier(nn.Linear(2, 3), hyperprior="flat").fit(torch.randn(4, 2), torch.arange(4) % 3)


def _head_net(seed: int) -> nn.Module:
    """A small network whose last layer is a new head: tiny weights, zero bias (logits ≈ 0)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    with torch.no_grad():
        net[2].weight.mul_(0.01)
        net[2].bias.zero_()
    return net


def _collapse_draw() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Labels unrelated to the inputs, on which the evidence alone keeps improving as s² → 0 (seed 1)."""
    net = _head_net(1)
    return net, torch.randn(30, 5, dtype=torch.float64), torch.randint(0, 3, (30,))


def _fit(net, X, y, **kw) -> tuple[la.LinearizedClassifier, list]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clf = la.LinearizedClassifier(net, params="2.*", **kw).fit(X, y)
    return clf, [w for w in caught if issubclass(w.category, la.ConvergenceWarning)]


@pytest.mark.parametrize("space", ["function", "parameter"])
def test_default_stops_in_the_tail_where_the_evidence_alone_goes_to_zero(space):
    net, X, y = _collapse_draw()
    plain, caught = _fit(net, X, y, hyperprior=None, space=space)
    assert plain.prior_var_ == pytest.approx(1e-8, rel=1e-6) and caught  # the evidence alone: s² → 0, warned
    clf, caught = _fit(net, X, y, space=space)
    assert not caught
    kbar = clf.problem_.mean_kernel_diagonal()
    v = clf.prior_var_ * kbar
    assert 1e-2 < v < 1.0, v  # a mean logit prior variance in the tail: adapted, but little
    # the search's point maximises evidence + log prior (to its 0.05 tolerance in log s²), and the reported
    # evidence is the evidence alone
    prior = ScalePrior()

    def objective(s2: float) -> float:
        return clf.log_marginal_likelihood(s2) - prior.penalty(math.log(s2 * kbar))[0]

    best = objective(clf.prior_var_)
    for factor in (0.8, 1.25, 0.1, 10.0):
        assert objective(clf.prior_var_ * factor) <= best + 1e-6
    assert clf.log_marginal_likelihood_value_ == pytest.approx(clf.log_marginal_likelihood(clf.prior_var_))
    # the head moved off its initialisation (logits ≈ 0): the adapted mean logits differ from it
    moved = clf.predict_logits(X, return_cov=False) - net(X).detach().numpy()
    unmoved = plain.predict_logits(X, return_cov=False) - net(X).detach().numpy()
    assert float(np.abs(moved).max()) > 1e-2 > 1e-6 > float(np.abs(unmoved).max())


def test_the_default_changes_nothing_where_the_evidence_optimum_has_v_above_one():
    """Informative labels: the evidence's own optimum has v ≫ 1, where the prior is flat, so the default's
    search takes the very same steps — the same s², evidence and probabilities to the last bit."""
    net = _head_net(0)
    g = torch.Generator().manual_seed(4)
    X = torch.randn(40, 5, generator=g, dtype=torch.float64)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()
    plain, _ = _fit(net, X, y, hyperprior=None, link="probit")
    clf, _ = _fit(net, X, y, link="probit")
    assert plain.prior_var_ * plain.problem_.mean_kernel_diagonal() > 10.0
    assert clf.prior_var_ == plain.prior_var_
    np.testing.assert_array_equal(clf.predict_proba(X), plain.predict_proba(X))


def test_grouped_prior_variances_keep_the_total_logit_variance_out_of_the_tail():
    """With prior groups the prior acts on v = Σ_g s²_g k̄_g: on the collapse draw the evidence alone sends every
    group to its lower end; the default keeps v in the tail's range, as with one prior variance."""
    net, X, y = _collapse_draw()
    groups = ["2.weight"]  # and "rest": the head's bias
    plain = la.LinearizedClassifier(net, params="2.*", prior_groups=groups, hyperprior=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", la.ConvergenceWarning)
        plain.fit(X, y)
    clf = la.LinearizedClassifier(net, params="2.*", prior_groups=groups).fit(X, y)

    def v(est) -> float:
        kbars = est.problem_.group_kernel_diagonals()
        return float(np.array(list(est.prior_vars_.values())) @ kbars)

    assert v(plain) < 1e-4
    assert 1e-2 < v(clf) < 1.0


def test_mean_kernel_diagonal_is_the_same_from_the_kernel_the_jacobian_and_the_blocks():
    net, X, y = _collapse_draw()
    lin_clf = la.LinearizedClassifier(net, params="2.*", prior_var=1.0, optimize_hyperparameters=False).fit(X, y)
    problem = lin_clf.problem_
    want = float(problem.lin.ntk(X).diagonal().mean())
    for held in ("K", "J", None):
        problem.cache.pop("kbar", None)
        problem.cache.pop("K", None)
        problem.cache.pop("J", None)
        if held == "K":
            problem.kernel()
        elif held == "J":
            problem.jacobian_matrix()
        assert problem.mean_kernel_diagonal() == pytest.approx(want, rel=1e-12)
