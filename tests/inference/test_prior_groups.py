"""Per-group prior variances (``LinearizedRegressor(prior_groups=...)``, linadapt.inference.prior_groups)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.base import clone
from torch import nn

from linadapt import LinearizedRegressor
from linadapt.inference.prior_groups import GroupEvidence, resolve_groups


def _net(c: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, c)).double()


def _data(n: int = 14, c: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=g, dtype=torch.float64)
    Y = torch.stack([torch.sin(X[:, 0] + a) + 0.3 * X[:, 1] for a in range(c)], 1)
    return X, Y + 0.05 * torch.randn(n, c, generator=g, dtype=torch.float64)


NAMES = ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]


def test_resolve_groups() -> None:
    assert resolve_groups(NAMES, "layers") == [
        ("0", ["0.weight", "0.bias"]),
        ("2", ["2.weight", "2.bias"]),
        ("4", ["4.weight", "4.bias"]),
    ]
    assert resolve_groups(NAMES, "tensors") == [(n, [n]) for n in NAMES]
    assert resolve_groups(NAMES, ["4.*", ["0.bias", "2.b*"]]) == [
        ("4.*", ["4.weight", "4.bias"]),
        ("0.bias,2.b*", ["0.bias", "2.bias"]),
        ("rest", ["0.weight", "2.weight"]),
    ]
    with pytest.raises(ValueError, match="matches none"):
        resolve_groups(NAMES, ["9.*"])
    with pytest.raises(ValueError, match="two prior groups"):
        resolve_groups(NAMES, ["4.*", "4.bias"])
    with pytest.raises(ValueError, match="'layers', 'tensors'"):
        resolve_groups(NAMES, "per-layer")
    with pytest.raises(ValueError, match="non-empty list"):
        resolve_groups(NAMES, [])
    with pytest.raises(ValueError, match="distinct"):
        resolve_groups(["rest", "0.weight"], ["rest"])  # a parameter named rest, and the unmatched group


def _dense_reference(model: nn.Module, X, Y, Xs, s2_by_name: dict[str, float], sig2: float):
    """Weight-space closed form: precision H = JᵀJ/σ² + D⁻¹, mean δ̄ = H⁻¹Jᵀr/σ², predictive J*δ̄ and
    J* H⁻¹ J*ᵀ (+ σ²), with D the per-weight prior variances."""
    params = dict(model.named_parameters())
    names = list(params)

    def f(flat: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
        out, i = {}, 0
        for name in names:
            k = params[name].numel()
            out[name] = flat[i : i + k].reshape(params[name].shape)
            i += k
        return torch.func.functional_call(model, out, (inp,))

    theta = torch.cat([params[n].detach().reshape(-1) for n in names])
    J = torch.autograd.functional.jacobian(lambda t: f(t, X).reshape(-1), theta)
    Js = torch.autograd.functional.jacobian(lambda t: f(t, Xs).reshape(-1), theta)
    D = torch.cat([torch.full((params[n].numel(),), s2_by_name[n], dtype=torch.float64) for n in names])
    r = (Y - f(theta, X).detach()).reshape(-1)
    H = J.T @ J / sig2 + torch.diag(1 / D)
    delta = torch.linalg.solve(H, J.T @ r / sig2)
    mean = f(theta, Xs).detach() + (Js @ delta).reshape(Xs.shape[0], -1)
    cov = Js @ torch.linalg.solve(H, Js.T)
    A = J @ torch.diag(D) @ J.T + sig2 * torch.eye(J.shape[0], dtype=torch.float64)
    lml = torch.distributions.MultivariateNormal(torch.zeros_like(r), A).log_prob(r)
    return mean, cov, delta, float(lml)


def test_grouped_posterior_equals_weight_space_closed_form() -> None:
    model, (X, Y) = _net(), _data()
    Xs = _data(5, seed=7)[0]
    s2 = {"0": 0.3, "2": 0.05, "4": 2.0}
    reg = LinearizedRegressor(model, prior_groups="layers", optimize_hyperparameters=False, noise_var=0.01)
    reg.set_params(prior_var=1.0).fit(X, Y)
    assert reg.prior_vars_ == {"0": 1.0, "2": 1.0, "4": 1.0}
    reg._fit(X, Y, (s2, 0.01))
    by_name = {n: s2[n.split(".")[0]] for n in NAMES}
    mean, cov, delta, lml = _dense_reference(model, X, Y, Xs, by_name, 0.01)
    m, C = reg.predict(Xs, return_cov=True, include_noise=False)
    np.testing.assert_allclose(m, mean.numpy(), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(C.reshape(10, 10), cov.numpy(), rtol=1e-8, atol=1e-10)
    _, std = reg.predict(Xs, return_std=True)
    np.testing.assert_allclose(std**2, np.diagonal(cov.numpy()).reshape(5, 2) + 0.01, rtol=1e-8)
    mb, blocks = reg.predict_blocks(Xs, include_noise=False)
    np.testing.assert_allclose(mb, mean.numpy(), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(blocks, cov.reshape(5, 2, 5, 2).numpy()[np.arange(5), :, np.arange(5), :], atol=1e-10)
    np.testing.assert_allclose(reg.posterior_.delta.numpy(), delta.numpy(), rtol=1e-8, atol=1e-10)
    import linadapt.inference.prior_groups as groups  # predictions in blocks of test points give the same numbers

    old, groups._BLOCK_ENTRIES = groups._BLOCK_ENTRIES, 1
    try:
        mb2, blocks2 = reg.predict_blocks(Xs, include_noise=False)
    finally:
        groups._BLOCK_ENTRIES = old
    np.testing.assert_allclose(mb2, mb, rtol=1e-12)
    np.testing.assert_allclose(blocks2, blocks, rtol=1e-10, atol=1e-14)
    assert reg.log_marginal_likelihood_value_ == pytest.approx(lml, abs=1e-8)
    assert reg.log_marginal_likelihood({"0": 1.0, "2": 1.0, "4": 1.0}, 0.02) == pytest.approx(
        _dense_reference(model, X, Y, Xs, dict.fromkeys(NAMES, 1.0), 0.02)[3], abs=1e-8
    )


def test_equal_group_variances_are_the_isotropic_model() -> None:
    model, (X, Y) = _net(), _data()
    Xs = _data(4, seed=3)[0]
    kw = dict(prior_var=0.4, noise_var=0.02, optimize_hyperparameters=False, solver="cholesky", space="function")
    iso = LinearizedRegressor(model, **kw).fit(X, Y)
    grouped = LinearizedRegressor(model, prior_groups="tensors", **kw).fit(X, Y)
    for a, b in zip(iso.predict(Xs, return_std=True), grouped.predict(Xs, return_std=True)):
        np.testing.assert_allclose(a, b, rtol=1e-9)
    assert grouped.log_marginal_likelihood_value_ == pytest.approx(iso.log_marginal_likelihood_value_, abs=1e-8)


def test_group_evidence_gradient_matches_finite_differences() -> None:
    g = torch.Generator().manual_seed(0)
    B = torch.randn(3, 8, 4, generator=g, dtype=torch.float64)
    Ks = B @ B.transpose(1, 2)
    r = torch.randn(8, generator=g, dtype=torch.float64)
    ev = GroupEvidence(Ks, r)
    x = np.array([0.2, -1.0, 0.7, -2.0])
    _, grad = ev.negative_log_ml_and_grad(x)
    eps = 1e-6
    fd = [
        (ev.negative_log_ml_and_grad(x + eps * e)[0] - ev.negative_log_ml_and_grad(x - eps * e)[0]) / (2 * eps)
        for e in np.eye(4)
    ]
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8)


def test_learned_group_variances_raise_the_evidence_and_find_the_relevant_layer() -> None:
    """Targets made by moving only the last layer: its variance is learned large, the others small, and
    the evidence is at least the isotropic optimum's."""
    model = _net(1)
    X = _data(40, c=1)[0]
    with torch.no_grad():
        feats = model[:4](X)
        w = torch.randn(1, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        y = model(X)[:, 0] + 3.0 * (feats @ w.T)[:, 0] + 0.01 * torch.randn(40, dtype=torch.float64)
    iso = LinearizedRegressor(model).fit(X, y)
    grouped = LinearizedRegressor(model, prior_groups="layers").fit(X, y)
    assert grouped.log_marginal_likelihood_value_ >= iso.log_marginal_likelihood_value_ - 1e-6
    v = grouped.prior_vars_
    assert v["4"] > 10 * max(v["0"], v["2"])
    assert grouped.groups_["4"] == ["4.weight", "4.bias"]


def test_prior_groups_errors_clone_and_save_load(tmp_path) -> None:
    model, (X, Y) = _net(), _data()
    for kw, match in (
        (dict(solver="cg"), "dense function-space"),
        (dict(space="parameter"), "dense function-space"),
        (dict(prior_mean="zero"), "prior_mean='network'"),
    ):
        with pytest.raises(ValueError, match=match):
            LinearizedRegressor(model, prior_groups="layers", **kw).fit(X, Y)
    reg = LinearizedRegressor(model, prior_groups=["4.*"]).fit(X, Y)
    assert set(reg.prior_vars_) == {"4.*", "rest"} and reg.prior_var_ is None
    assert clone(reg).get_params()["prior_groups"] == ["4.*"]
    path = tmp_path / "g.linadapt"
    reg.save(path)
    back = LinearizedRegressor.load(path, model)
    assert back.prior_vars_ == pytest.approx(reg.prior_vars_)
    Xs = _data(3, seed=9)[0]
    for a, b in zip(reg.predict(Xs, return_std=True), back.predict(Xs, return_std=True)):
        np.testing.assert_allclose(a, b, rtol=1e-10)
