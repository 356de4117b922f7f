"""``update(X_new, y_new)``: the posterior on all data seen so far equals ``fit`` on the concatenated data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from models import inputs_for, mlp, resnet, single_out

import linadapt as la
from linadapt.inference import updates
from linadapt.inference.updates import extend_cholesky

PATHS = [(s, v) for s in ("function", "parameter") for v in ("cholesky", "cg")]


def rel_err(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def regression_data(n=24, seed=0, c=3):
    X = inputs_for("mlp", n, seed=seed + 1)
    y = torch.randn(n, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return X, y


def batches(X, y, sizes):
    out, start = [], 0
    for size in sizes:
        out.append((X[start : start + size], y[start : start + size]))
        start += size
    return out


def regression_predictions(reg, Xs):
    mean, cov = reg.predict(Xs, return_cov=True)
    return mean, cov


def assert_same_regression(a, b, Xs, rtol):
    for got, want in zip(regression_predictions(a, Xs), regression_predictions(b, Xs)):
        assert rel_err(got, want) < rtol
    assert rel_err(a.posterior_.delta.numpy(), b.posterior_.delta.numpy()) < rtol


@pytest.mark.parametrize("space,solver", PATHS)
@pytest.mark.parametrize("order", [(0, 1, 2), (2, 0, 1)])
def test_regression_updates_equal_fit_on_all_data(space, solver, order):
    X, y = regression_data(30)
    Xs = inputs_for("mlp", 5, seed=9)
    parts = batches(X, y, (14, 9, 7))
    parts = [parts[i] for i in order]
    kw = {"space": space, "solver": solver, "prior_var": 0.7, "noise_var": 0.05, "optimize_hyperparameters": False}
    reg = la.LinearizedRegressor(mlp(), **kw).fit(*parts[0])
    for Xb, yb in parts[1:]:
        assert reg.update(Xb, yb) is reg
    full = la.LinearizedRegressor(mlp(), **kw).fit(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    assert reg.space_ == full.space_ == space and reg.solver_ == solver
    assert_same_regression(reg, full, Xs, 1e-8)
    assert abs(reg.log_marginal_likelihood_value_ - full.log_marginal_likelihood_value_) < 1e-8 * abs(
        full.log_marginal_likelihood_value_
    )
    assert reg._train_data[0].shape[0] == 30


@pytest.mark.parametrize("case", ["prior-mean-zero", "mean-zero", "single-output", "per-output", "resnet"])
@pytest.mark.parametrize("space", ["function", "parameter"])
def test_regression_update_options(case, space):
    kw = {"space": space, "solver": "cholesky", "prior_var": 0.5, "noise_var": 0.1, "optimize_hyperparameters": False}
    X, y = regression_data(20)
    build = mlp
    if case == "prior-mean-zero":
        kw["prior_mean"] = "zero"
    elif case == "mean-zero":
        kw["mean"] = "zero"
    elif case == "single-output":
        build, X = single_out, inputs_for("single", 20)
        y = y[:, 0]
    elif case == "per-output":
        kw["noise_var"] = [0.05, 0.1, 0.2]
    else:
        build, X, kw["params"] = resnet, inputs_for("resnet", 20), "last"
    Xs = X[:4] + 0.3
    reg = la.LinearizedRegressor(build(), **kw).fit(X[:13], y[:13]).update(X[13:], y[13:])
    full = la.LinearizedRegressor(build(), **kw).fit(X, y)
    assert_same_regression(reg, full, Xs, 1e-8)
    assert np.asarray(reg.predict(Xs)).shape == np.asarray(full.predict(Xs)).shape
    if case == "per-output":
        np.testing.assert_array_equal(reg.noise_var_, [0.05, 0.1, 0.2])


@pytest.mark.parametrize("noise", ["shared", "per_output"])
@pytest.mark.parametrize("space", ["function", "parameter"])
def test_regression_update_can_search_hyperparameters_again(space, noise):
    X, y = regression_data(26)
    kw = {"space": space, "solver": "cholesky", "noise": noise}
    reg = la.LinearizedRegressor(mlp(), **kw).fit(X[:15], y[:15])
    before = (reg.prior_var_, reg.noise_var_)
    reg.update(X[15:], y[15:])
    assert reg.prior_var_ == before[0] and np.array_equal(reg.noise_var_, before[1])  # kept unless asked
    reg2 = la.LinearizedRegressor(mlp(), **kw).fit(X[:15], y[:15]).update(X[15:], y[15:], optimize_hyperparameters=True)
    full = la.LinearizedRegressor(mlp(), **kw).fit(X, y)
    assert reg2.prior_var_ == pytest.approx(full.prior_var_, rel=1e-6)
    np.testing.assert_allclose(reg2.noise_var_, full.noise_var_, rtol=1e-6)
    assert_same_regression(reg2, full, X[:3] + 0.1, 1e-6)


def test_extended_cholesky_factor_is_the_factor():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(12, 12, generator=g, dtype=torch.float64)
    A = M @ M.T + 12 * torch.eye(12, dtype=torch.float64)
    L = extend_cholesky(torch.linalg.cholesky(A[:8, :8]), A[:8, 8:], A[8:, 8:])
    torch.testing.assert_close(L, torch.linalg.cholesky(A), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("max_depth", [16, 2])
def test_block_factor_chain_solves_and_writes_out(monkeypatch, max_depth):
    monkeypatch.setattr(updates, "_MAX_DEPTH", max_depth)
    g = torch.Generator().manual_seed(1)
    M = torch.randn(20, 20, generator=g, dtype=torch.float64)
    A = M @ M.T + 20 * torch.eye(20, dtype=torch.float64)
    F = torch.linalg.cholesky(A[:8, :8])
    for lo, hi in [(8, 11), (11, 12), (12, 17), (17, 20)]:
        F = updates.extend_factor(F, A[:lo, lo:hi], A[lo:hi, lo:hi])
    assert F.depth <= max_depth
    B = torch.randn(20, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(updates.factor_solve(F, B), torch.linalg.solve(A, B), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(F.dense(), torch.linalg.cholesky(A), rtol=1e-12, atol=1e-12)


def test_cholesky_update_does_not_refactorise_the_old_kernel(monkeypatch):
    """The function-space Cholesky update forms only the new kernel blocks: the training kernel K(X, X) is never
    formed again, nor the (N + k)-sized system factorised from scratch."""
    X, y = regression_data(40)
    reg = la.LinearizedRegressor(
        mlp(), space="function", solver="cholesky", optimize_hyperparameters=False, noise_var=0.1
    ).fit(X[:35], y[:35])
    lin = reg.linearization_
    sizes = []
    ntk = type(lin).ntk

    def counting(self, X1, X2=None, **kw):
        sizes.append((X1.shape[0], X1.shape[0] if X2 is None else X2.shape[0]))
        return ntk(self, X1, X2, **kw)

    monkeypatch.setattr(type(lin), "ntk", counting)
    factorised = []
    chol = torch.linalg.cholesky_ex

    def counting_chol(A, *args, **kw):
        factorised.append(A.shape[-1])
        return chol(A, *args, **kw)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", counting_chol)
    reg.update(X[35:], y[35:])
    assert sizes and all(n2 == 5 for _, n2 in sizes)  # only the new columns K(·, X_new)
    assert max(factorised, default=0) <= 5 * 3  # only the Schur complement of the new rows


# ---------------------------------------------------------------------------------------------- classification
def classification_data(n=30, seed=0, c=3):
    X = inputs_for("mlp", n, seed=seed + 1)
    y = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(seed))
    return X, y


@pytest.mark.parametrize("space,solver", PATHS)
def test_classification_updates_equal_fit_on_all_data(space, solver):
    X, y = classification_data(30)
    Xs = inputs_for("mlp", 5, seed=9)
    kw = {"space": space, "solver": solver, "prior_var": 0.8, "optimize_hyperparameters": False, "link": "probit"}
    clf = la.LinearizedClassifier(mlp(), **kw).fit(X[:12], y[:12])
    clf.update(X[20:], y[20:]).update(X[12:20], y[12:20])
    full = la.LinearizedClassifier(mlp(), **kw).fit(X, y)
    for got, want in zip(clf.predict_logits(Xs), full.predict_logits(Xs)):
        assert rel_err(got, want) < 1e-6
    assert rel_err(clf.predict_proba(Xs), full.predict_proba(Xs)) < 1e-6
    if solver == "cholesky":  # (CG's log-determinant is a stochastic estimate whose probes see the rows' order)
        assert clf.log_marginal_likelihood_value_ == pytest.approx(full.log_marginal_likelihood_value_, rel=1e-6)


@pytest.mark.parametrize("likelihood", ["bernoulli", "multilabel"])
def test_classification_update_other_likelihoods_and_auto_link(likelihood):
    X = inputs_for("mlp", 24, seed=3)
    g = torch.Generator().manual_seed(1)
    if likelihood == "bernoulli":
        model_fn, y = (lambda: mlp(d_out=1)), np.where(torch.rand(24, generator=g).numpy() > 0.5, "yes", "no")
    else:
        model_fn, y = mlp, (torch.rand(24, 3, generator=g) > 0.5).long()
    kw = {"likelihood": likelihood, "prior_var": 0.6, "optimize_hyperparameters": False, "prior_mean": "zero"}
    clf = la.LinearizedClassifier(model_fn(), **kw).fit(X[:16], y[:16]).update(X[16:], y[16:])
    full = la.LinearizedClassifier(model_fn(), **kw).fit(X, y)
    assert clf.link_ == full.link_ and clf.loo_nll_ == pytest.approx(full.loo_nll_, rel=1e-6)
    assert rel_err(clf.predict_proba(X[:5]), full.predict_proba(X[:5])) < 1e-6
    np.testing.assert_array_equal(clf.classes_, full.classes_)


def test_classification_update_can_search_prior_var_again():
    X, y = classification_data(30)
    kw = {"space": "function", "solver": "cholesky", "link": "probit"}
    clf = la.LinearizedClassifier(mlp(), **kw).fit(X[:18], y[:18])
    s2 = clf.prior_var_
    clf.update(X[18:24], y[18:24])
    assert clf.prior_var_ == s2
    clf.update(X[24:], y[24:], optimize_hyperparameters=True)
    full = la.LinearizedClassifier(mlp(), **kw).fit(X, y)
    assert clf.prior_var_ == pytest.approx(full.prior_var_, rel=1e-6)
    assert rel_err(clf.predict_proba(X[:5]), full.predict_proba(X[:5])) < 1e-6


# ---------------------------------------------------------------------------------------------- persistence
def test_save_after_update_and_update_after_load(tmp_path):
    X, y = regression_data(26)
    kw = {"space": "function", "solver": "cholesky", "prior_var": 0.5, "noise_var": 0.1}
    reg = la.LinearizedRegressor(mlp(), **kw).fit(X[:10], y[:10]).update(X[10:18], y[10:18])
    reg.save(tmp_path / "r.linadapt")
    back = la.load(tmp_path / "r.linadapt", mlp())
    assert back._train_data[0].shape[0] == 18
    back.update(X[18:], y[18:])
    reg.update(X[18:], y[18:])
    assert_same_regression(back, reg, X[:4] + 0.2, 1e-8)

    Xc, yc = classification_data(26)
    labels = np.array(["a", "b", "c"])[yc.numpy()]
    clf = la.LinearizedClassifier(mlp(), prior_var=0.7, optimize_hyperparameters=False).fit(Xc[:14], labels[:14])
    clf.update(Xc[14:20], labels[14:20]).save(tmp_path / "c.linadapt")
    cback = la.load(tmp_path / "c.linadapt", mlp())
    cback.update(Xc[20:], labels[20:])
    clf.update(Xc[20:], labels[20:])
    assert rel_err(cback.predict_proba(Xc[:5]), clf.predict_proba(Xc[:5])) < 1e-8
    np.testing.assert_array_equal(cback.predict(Xc[:5]), clf.predict(Xc[:5]))


# ---------------------------------------------------------------------------------------------- validation
def test_update_validates_new_data():
    X, y = regression_data(20)
    reg = la.LinearizedRegressor(mlp(), optimize_hyperparameters=False)
    with pytest.raises(Exception, match="not fitted"):
        reg.update(X, y)
    reg.fit(X[:10], y[:10])
    bad = X[10:].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        reg.update(bad, y[10:])
    with pytest.raises(ValueError, match="features"):
        reg.update(torch.randn(3, 5, dtype=torch.float64), y[:3])
    with pytest.raises(ValueError, match="NaN"):
        reg.update(X[10:], torch.where(y[10:] > 0, float("inf"), y[10:]))
    with pytest.raises(ValueError, match="rows"):
        reg.update(X[10:], y[10:15])
    with pytest.raises(ValueError, match="columns"):
        reg.update(X[10:], y[10:, :2])
    with pytest.raises(ValueError, match="empty"):
        reg.update(X[:0], y[:0])
    assert reg._train_data[0].shape[0] == 10  # nothing changed by the refusals

    Xc, yc = classification_data(20)
    labels = np.array(["a", "b", "c"])[yc.numpy()]
    clf = la.LinearizedClassifier(mlp(), optimize_hyperparameters=False).fit(Xc[:10], labels[:10])
    with pytest.raises(ValueError, match="'d'"):
        clf.update(Xc[10:12], ["a", "d"])


@pytest.mark.parametrize(
    "kw",
    [{"prior_groups": "layers"}, {"marginalize": True}],
)
def test_update_refuses_options_it_does_not_support(kw):
    _, y = regression_data(12, c=1)
    reg = la.LinearizedRegressor(single_out(), optimize_hyperparameters=False, **kw).fit(
        inputs_for("single", 12), y[:, 0]
    )
    with pytest.raises(ValueError, match="update is not available with"):
        reg.update(inputs_for("single", 3, seed=5), y[:3, 0])


def test_update_refuses_grouped_classification():
    X, y = classification_data(16)
    clf = la.LinearizedClassifier(mlp(), optimize_hyperparameters=False, prior_groups="layers").fit(X[:10], y[:10])
    with pytest.raises(ValueError, match="update is not available with prior_groups"):
        clf.update(X[10:], y[10:])
    # (updates after distributed=True fits: tests/test_distributed.py)


def test_query_and_sample_after_update_equal_those_after_a_fit_on_all_data():
    """The workflow methods read the updated posterior: query's picks and scores, and samples with a fixed
    generator, equal those of a fit on the concatenated data at the same hyperparameters."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()
    g = torch.Generator().manual_seed(3)
    X = torch.randn(40, 2, generator=g, dtype=torch.float64)
    y = torch.sin(X[:, 0]) + 0.1 * torch.randn(40, generator=g, dtype=torch.float64)
    pool = torch.randn(30, 2, generator=g, dtype=torch.float64)
    kw = {"prior_var": 0.5, "noise_var": 0.05, "optimize_hyperparameters": False}
    upd = la.LinearizedRegressor(net, **kw).fit(X[:25], y[:25]).update(X[25:], y[25:])
    full = la.LinearizedRegressor(net, **kw).fit(X, y)
    picks_u, scores_u = upd.query(pool, 5, return_scores=True)
    picks_f, scores_f = full.query(pool, 5, return_scores=True)
    np.testing.assert_array_equal(picks_u, picks_f)
    np.testing.assert_allclose(scores_u, scores_f, rtol=1e-8)
    a = upd.sample(pool[:6], 4, generator=torch.Generator().manual_seed(0))
    b = full.sample(pool[:6], 4, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
