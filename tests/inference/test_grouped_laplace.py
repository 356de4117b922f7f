"""Per-group prior variances in classification (``LinearizedClassifier(prior_groups=...)``,
linadapt.inference.grouped_laplace), against a weight-space Laplace computed here from the dense Jacobian."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from linadapt import LinearizedClassifier, MemoryBudgetError


def _net(c: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, c)).double()


def _data(n: int = 18, c: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = ((X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()) % c
    return X, y


def _jacobian(model: nn.Module, X: torch.Tensor) -> torch.Tensor:
    """(n·c, p) dense Jacobian of the logits, parameters in ``named_parameters`` order."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    jac = jacrev(lambda p: functional_call(model, p, (X,)))(params)
    n, c = X.shape[0], model(X[:1]).shape[1]
    return torch.cat([jac[k].reshape(n * c, -1) for k in params], 1)


def _weight_space_laplace(model, X, y, Xs, scales: dict[str, float]):
    """Newton on δ with prior N(0, D), D the per-weight variances; returns (log evidence, mean (m, c),
    blocks (m, c, c), δ*): log q = log p(y | f*) − ½ δ*ᵀD⁻¹δ* − ½ log det(I + D^½ JᵀΛJ D^½)."""
    J, Js = _jacobian(model, X), _jacobian(model, Xs)
    n, c = X.shape[0], model(X[:1]).shape[1]
    d = torch.cat([torch.full((p.numel(),), scales[k], dtype=torch.float64) for k, p in model.named_parameters()])
    f0, fs0 = model(X).detach().reshape(-1), model(Xs).detach()
    Y = torch.nn.functional.one_hot(y, c).double()
    delta = torch.zeros(J.shape[1], dtype=torch.float64)

    def lam(P):
        return torch.block_diag(*[torch.diag(p) - torch.outer(p, p) for p in P])

    for _ in range(60):
        P = torch.softmax((f0 + J @ delta).reshape(n, c), 1)
        grad = -J.T @ (Y - P).reshape(-1) + delta / d
        H = J.T @ lam(P) @ J + torch.diag(1 / d)
        step = torch.linalg.solve(H, grad)
        delta = delta - step
        if float(grad @ step) < 1e-26:
            break
    F = (f0 + J @ delta).reshape(n, c)
    P = torch.softmax(F, 1)
    H = J.T @ lam(P) @ J + torch.diag(1 / d)
    loglik = float((Y * torch.log_softmax(F, 1)).sum())
    root = d.sqrt()
    M = torch.eye(len(d), dtype=torch.float64) + root[:, None] * (J.T @ lam(P) @ J) * root[None, :]
    evidence = loglik - 0.5 * float(delta @ (delta / d)) - 0.5 * float(torch.linalg.slogdet(M)[1])
    mean = fs0 + (Js @ delta).reshape(-1, c)
    cov = Js @ torch.linalg.solve(H, Js.T)
    m = Xs.shape[0]
    blocks = cov.reshape(m, c, m, c).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    return evidence, mean, blocks, delta


SCALES = {"0.weight": 2.0, "0.bias": 2.0, "2.weight": 0.05, "2.bias": 0.05, "4.weight": 0.7, "4.bias": 0.7}


def test_grouped_laplace_equals_weight_space_closed_form() -> None:
    net, (X, y) = _net(), _data()
    Xs = torch.randn(5, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    clf = LinearizedClassifier(net, prior_groups=[["0.*"], ["2.*"]], prior_var=0.7, optimize_hyperparameters=False).fit(
        X, y
    )
    assert clf.prior_vars_ == {"0.*": 0.7, "2.*": 0.7, "rest": 0.7}
    clf = LinearizedClassifier(net, prior_groups="layers", optimize_hyperparameters=False)
    clf.fit(X, y)  # at equal scales first, then the posterior at the chosen scales via load's fixed path
    clf._fit(X, y, {"0": 2.0, "2": 0.05, "4": 0.7})
    evidence, mean, blocks, delta = _weight_space_laplace(net, X, y, Xs, SCALES)
    m, cov = clf.predict_logits(Xs)
    assert clf.prior_vars_ == {"0": 2.0, "2": 0.05, "4": 0.7}
    assert clf.prior_var_ is None
    np.testing.assert_allclose(clf.log_marginal_likelihood_value_, evidence, rtol=1e-9)
    np.testing.assert_allclose(m, mean.numpy(), atol=1e-8)
    np.testing.assert_allclose(cov, blocks.numpy(), atol=1e-8)
    np.testing.assert_allclose(clf.posterior_.delta.numpy(), delta.numpy(), atol=1e-8)
    # 70 test points: the groups' cross kernels go in several chunks (each group's engine may split them further)
    many = torch.randn(70, 3, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    _, mean70, blocks70, _ = _weight_space_laplace(net, X, y, many, SCALES)
    for budget in (None, "2MiB"):
        clf.set_params(memory_budget=budget)._fit(X, y, {"0": 2.0, "2": 0.05, "4": 0.7})
        m70, cov70 = clf.predict_logits(many)
        np.testing.assert_allclose(m70, mean70.numpy(), atol=1e-8)
        np.testing.assert_allclose(cov70, blocks70.numpy(), atol=1e-8)
    full = clf.posterior_.latent_cov(Xs)  # the joint covariance through the dense grouped kernels
    diag_blocks = full.reshape(5, 3, 5, 3).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    np.testing.assert_allclose(diag_blocks.numpy(), blocks.numpy(), atol=1e-8)


def test_equal_scales_are_the_isotropic_classifier() -> None:
    net, (X, y) = _net(), _data()
    Xs = torch.randn(6, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    iso = LinearizedClassifier(net, prior_var=0.4, optimize_hyperparameters=False, space="function").fit(X, y)
    grp = LinearizedClassifier(net, prior_var=0.4, optimize_hyperparameters=False, prior_groups="tensors").fit(X, y)
    for a, b in zip(iso.predict_logits(Xs), grp.predict_logits(Xs)):
        np.testing.assert_allclose(a, b, atol=1e-10)
    np.testing.assert_allclose(iso.log_marginal_likelihood_value_, grp.log_marginal_likelihood_value_, rtol=1e-10)


def test_learned_scales_raise_the_evidence_above_the_isotropic_optimum() -> None:
    net, (X, y) = _net(), _data(n=24)
    iso = LinearizedClassifier(net).fit(X, y)
    grp = LinearizedClassifier(net, prior_groups=["4.*"]).fit(X, y)
    assert set(grp.prior_vars_) == {"4.*", "rest"}
    assert grp.log_marginal_likelihood_value_ > iso.log_marginal_likelihood_value_ + 1e-3
    # the optimum is a stationary point: a step in either group's log s² does not raise the evidence
    best = grp.log_marginal_likelihood_value_
    for label in grp.prior_vars_:
        for factor in (math.exp(0.1), math.exp(-0.1)):
            moved = dict(grp.prior_vars_, **{label: grp.prior_vars_[label] * factor})
            other = LinearizedClassifier(net, prior_groups=["4.*"])
            other._fit(X, y, moved)
            assert other.log_marginal_likelihood_value_ <= best + 1e-3
    # link="auto" reads the training blocks from the grouped kernel
    auto = LinearizedClassifier(net, prior_groups=["4.*"], link="auto").fit(X, y)
    assert auto.link_ in ("probit", "bridge", "map")
    proba = auto.predict_proba(X)
    assert proba.shape == (24, 3) and np.allclose(proba.sum(1), 1)


def test_grouped_classifier_errors_and_save_load(tmp_path) -> None:
    net, (X, y) = _net(), _data()
    with pytest.raises(ValueError, match="not with space='parameter'"):
        LinearizedClassifier(net, prior_groups="layers", space="parameter").fit(X, y)
    with pytest.raises(ValueError, match="matches none"):
        LinearizedClassifier(net, prior_groups=["9.*"]).fit(X, y)
    with pytest.raises(MemoryBudgetError, match="prior_groups holds 3 dense"):
        LinearizedClassifier(net, prior_groups="layers", memory_budget=10_000).fit(X, y)
    clf = LinearizedClassifier(net, prior_groups=["4.*"]).fit(X, y)
    with pytest.raises(ValueError, match="one prior variance per group"):
        clf.log_marginal_likelihood(0.3)
    path = tmp_path / "grouped.linadapt"
    clf.save(path)
    loaded = LinearizedClassifier.load(path, model=_net())
    assert loaded.prior_vars_ == pytest.approx(clf.prior_vars_)
    np.testing.assert_allclose(loaded.predict_proba(X), clf.predict_proba(X), atol=1e-10)
