"""Public estimator options checked against independent references: closed forms built here from an explicit
autograd Jacobian, numerical integration, a separate optimiser, and sklearn's weighted metrics."""

import json

import numpy as np
import pytest
import torch
from models import inputs_for, mlp, reference_jacobian, single_out
from sklearn.metrics import accuracy_score, r2_score

import linadapt as la
from linadapt.estimators import persistence


def _labels(n, c=3, seed=0):
    return torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(seed))


def _jac(model, X):
    """J(X) as (n·c, p), example-major, by plain autograd (tests/models.py), all parameters."""
    names = [n for n, _ in model.named_parameters()]
    J = reference_jacobian(model, X, names)
    return J.reshape(-1, J.shape[-1])


def _outputs(model, X):
    with torch.no_grad():
        return model.eval()(X).reshape(X.shape[0], -1).double()


# ---------------------------------------------------------------- link="mc"
def _gauss_hermite_softmax(mean, cov, order=40):
    """E[softmax(z)] for z ~ N(mean, cov) per example, by a tensor-product Gauss–Hermite rule over the
    eigenbasis of cov (numerical integration, no sampling)."""
    x, w = np.polynomial.hermite_e.hermegauss(order)  # weight exp(-x²/2)
    w = w / np.sqrt(2 * np.pi)
    c = mean.shape[1]
    grids = np.meshgrid(*([x] * c), indexing="ij")
    Z = np.stack([g.reshape(-1) for g in grids], 1)  # (order^c, c)
    W = np.prod(np.stack(np.meshgrid(*([w] * c), indexing="ij")).reshape(c, -1), 0)
    out = np.empty_like(mean)
    for i in range(mean.shape[0]):
        evals, evecs = np.linalg.eigh(0.5 * (cov[i] + cov[i].T))
        L = evecs * np.sqrt(np.clip(evals, 0, None))
        logits = mean[i] + Z @ L.T
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(1, keepdims=True)
        out[i] = W @ p
    return out


@pytest.fixture(scope="module")
def mc_fit():
    model, X = mlp(), inputs_for("mlp", 12)
    y = _labels(12)
    clf = la.LinearizedClassifier(model, link="mc", prior_var=2.0, optimize_hyperparameters=False, n_samples=200_000)
    clf.fit(X, y)
    Xs = inputs_for("mlp", 5, seed=7) * 2
    mean, cov = clf.predict_logits(Xs, return_cov=True)
    return clf, Xs, mean, cov


def test_mc_link_converges_to_the_integrated_softmax(mc_fit):
    clf, Xs, mean, cov = mc_fit
    reference = _gauss_hermite_softmax(mean, cov)
    # the covariance matters here: the MAP readout is far from the integral, so agreement is not a coincidence
    map_proba = torch.softmax(torch.as_tensor(mean), 1).numpy()
    assert np.abs(map_proba - reference).max() > 0.05
    big = clf.predict_proba(Xs)
    np.testing.assert_allclose(big, reference, atol=4e-3)
    try:
        small = clf.set_params(n_samples=20).predict_proba(Xs)  # n_samples is used: 20 draws are visibly noisier
    finally:
        clf.set_params(n_samples=200_000)
    assert np.abs(small - reference).max() > 3 * np.abs(big - reference).max()


def test_mc_link_seed_reproduces_and_changes_the_draws(mc_fit):
    clf, Xs, _, _ = mc_fit
    clf.set_params(n_samples=500)
    try:
        a = clf.predict_proba(Xs)
        twin = la.LinearizedClassifier(**clf.get_params()).fit(*clf._train_data)
        np.testing.assert_array_equal(twin.predict_proba(Xs), a)  # same seed, separately fitted: identical
        other = clf.set_params(seed=1).predict_proba(Xs)
        assert np.abs(other - a).max() > 1e-3  # another seed draws other logits
        np.testing.assert_allclose(other.sum(1), 1.0, rtol=1e-12)
    finally:
        clf.set_params(n_samples=200_000, seed=0)


# ---------------------------------------------------------------- newton_tol
def _map_by_lbfgs(model, X, y, s2):
    """MAP of the linearized classifier, argmin −log p(y | f0 + Jδ) + ½‖δ‖²/s², by scipy's L-BFGS on an
    explicit Jacobian (no Newton, no library code)."""
    from scipy.optimize import minimize

    J = _jac(model, X).numpy().reshape(X.shape[0], -1, sum(p.numel() for p in model.parameters()))
    f0 = _outputs(model, X).numpy()
    yy = y.numpy()

    def fun(d):
        f = f0 + J @ d
        m = f.max(1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(f - m).sum(1))
        p = np.exp(f - lse[:, None])
        g_f = p.copy()
        g_f[np.arange(len(yy)), yy] -= 1
        val = float((lse - f[np.arange(len(yy)), yy]).sum() + 0.5 * d @ d / s2)
        return val, np.einsum("nc,ncp->p", g_f, J) + d / s2

    res = minimize(
        fun, np.zeros(J.shape[-1]), jac=True, method="L-BFGS-B", options={"gtol": 1e-13, "ftol": 0, "maxiter": 20000}
    )
    return res.x


def test_newton_tol_stops_earlier_and_further_from_the_map():
    model, X = mlp(), inputs_for("mlp", 30)
    y = _labels(30, seed=3)
    s2 = 5.0
    reference = _map_by_lbfgs(model, X, y, s2)
    kw = {"prior_var": s2, "optimize_hyperparameters": False, "solver": "cholesky"}
    tight = la.LinearizedClassifier(model, newton_tol=1e-12, **kw).fit(X, y)
    loose = la.LinearizedClassifier(model, newton_tol=1e-2, **kw).fit(X, y)
    assert loose.n_iter_ == loose.posterior_.newton.iterations
    assert loose.n_iter_ < tight.n_iter_
    err_tight = np.abs(tight.posterior_.delta.numpy() - reference).max()
    err_loose = np.abs(loose.posterior_.delta.numpy() - reference).max()
    assert err_tight < 1e-5 * max(1.0, np.abs(reference).max())
    assert err_loose > 100 * err_tight


# ---------------------------------------------------------------- seed (stochastic Lanczos) and device
def _small_problem():
    """A 2-4-4-3 tanh MLP (p = 47) and 36 inputs: N = 108 outputs, above the exact-evidence threshold (100)."""
    return mlp(d_in=2, width=4, d_out=3), torch.randn(
        36, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )


def test_regressor_seed_drives_the_lanczos_log_determinant():
    """With solver='cg' and more than 100 outputs the evidence's log-determinant is a stochastic Lanczos estimate
    with seeded probes: the same seed gives the same value, another seed another one, both near the exact
    (Cholesky) evidence."""
    model, X = _small_problem()  # N = 108 > lanczos_iter = 100 outputs: Lanczos with 16 random probes
    Y = torch.randn(36, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    kw = {"prior_var": 0.5, "noise_var": 0.1, "optimize_hyperparameters": False, "space": "function"}
    exact = la.LinearizedRegressor(model, solver="cholesky", **kw).fit(X, Y).log_marginal_likelihood_value_
    est = [la.LinearizedRegressor(model, solver="cg", seed=s, **kw).fit(X, Y) for s in (0, 0, 1)]
    vals = [e.log_marginal_likelihood_value_ for e in est]
    assert vals[0] == vals[1]
    assert abs(vals[0] - vals[2]) > 1e-6 * abs(exact)
    for v in vals:
        assert abs(v - exact) < 0.05 * abs(exact)
    # the posterior itself is a converged CG solve: the seed does not change it
    np.testing.assert_allclose(est[0].predict(X[:5]), est[2].predict(X[:5]), rtol=1e-7, atol=1e-9)


def test_classifier_seed_drives_the_lanczos_evidence():
    model, X = _small_problem()  # N = 108 outputs: stochastic log-determinant on the CG path
    y = _labels(36, seed=2)
    kw = {"prior_var": 1.0, "optimize_hyperparameters": False, "space": "function", "solver": "cg"}
    a, b, c = (la.LinearizedClassifier(model, seed=s, **kw).fit(X, y) for s in (3, 3, 4))
    exact = (
        la.LinearizedClassifier(
            model, prior_var=1.0, optimize_hyperparameters=False, space="function", solver="cholesky"
        )
        .fit(X, y)
        .log_marginal_likelihood_value_
    )
    assert a.log_marginal_likelihood_value_ == b.log_marginal_likelihood_value_
    assert a.log_marginal_likelihood_value_ != c.log_marginal_likelihood_value_
    for est in (a, c):
        assert abs(est.log_marginal_likelihood_value_ - exact) < 0.05 * abs(exact)


def test_explicit_cpu_device_is_used_and_saved_as_text(tmp_path):
    model, X = single_out(), inputs_for("single", 8)
    y = torch.sin(X[:, 0])
    reg = la.LinearizedRegressor(model, device=torch.device("cpu")).fit(X, y)
    assert reg.linearization_.device == torch.device("cpu")
    assert all(t.device.type == "cpu" for t in reg.linearization_.theta.values())
    reg.save(tmp_path / "a.linadapt")  # a torch.device is not JSON: stored as its name
    assert persistence.read_header(tmp_path / "a.linadapt")["settings"]["device"] == "cpu"
    back = la.load(tmp_path / "a.linadapt", model)
    assert back.device == "cpu"
    np.testing.assert_allclose(back.predict(X), reg.predict(X), rtol=1e-10)
    clf = la.LinearizedClassifier(mlp(), device="cpu", optimize_hyperparameters=False)
    clf.fit(inputs_for("mlp", 6), _labels(6))
    assert clf.linearization_.device == torch.device("cpu")


# ---------------------------------------------------------------- predictive covariance against the closed form
def _closed_form(model, X, Y, Xs, s2, sig2, include_noise):
    """Mean (m·c,) and covariance (m·c, m·c) of the GP with kernel s² J Jᵀ, mean f(x; θ̂), noise σ²."""
    Jn, Js = _jac(model, X), _jac(model, Xs)
    Knn, Ksn, Kss = s2 * Jn @ Jn.T, s2 * Js @ Jn.T, s2 * Js @ Js.T
    A = Knn + sig2 * torch.eye(Knn.shape[0], dtype=torch.float64)
    r = (Y.reshape(X.shape[0], -1) - _outputs(model, X)).reshape(-1)
    mean = _outputs(model, Xs).reshape(-1) + Ksn @ torch.linalg.solve(A, r)
    cov = Kss - Ksn @ torch.linalg.solve(A, Ksn.T)
    if include_noise:
        cov = cov + sig2 * torch.eye(cov.shape[0], dtype=torch.float64)
    return mean.numpy(), cov.numpy()


@pytest.mark.parametrize("space", ["function", "parameter"])
def test_predict_cov_and_blocks_match_the_dense_closed_form(space):
    model, X, Xs = mlp(), inputs_for("mlp", 7), inputs_for("mlp", 4, seed=9)
    Y = torch.randn(7, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reg = la.LinearizedRegressor(model, space=space).fit(X, Y)  # s², σ² learned; read back below
    s2, sig2 = reg.prior_var_, reg.noise_var_
    m, c = 4, 3
    for include_noise in (True, False):
        ref_mean, ref_cov = _closed_form(model, X, Y, Xs, s2, sig2, include_noise)
        kwargs = {} if include_noise else {"include_noise": False}  # the default is include_noise=True
        mean, cov = reg.predict(Xs, return_cov=True, **kwargs)
        assert mean.shape == (m, c) and cov.shape == (m, c, m, c)
        np.testing.assert_allclose(mean.reshape(-1), ref_mean, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(cov.reshape(m * c, m * c), ref_cov, rtol=1e-7, atol=1e-10)
        bmean, blocks = reg.predict_blocks(Xs, **kwargs)
        ref_blocks = np.stack([ref_cov[i * c : (i + 1) * c, i * c : (i + 1) * c] for i in range(m)])
        np.testing.assert_allclose(bmean.reshape(-1), ref_mean, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(blocks, ref_blocks, rtol=1e-7, atol=1e-10)
        _, std = reg.predict(Xs, return_std=True, **kwargs)
        np.testing.assert_allclose(std, np.sqrt(np.diagonal(ref_cov)).reshape(m, c), rtol=1e-7)


def test_predict_cov_one_output_matches_the_dense_closed_form():
    model, X, Xs = single_out(), inputs_for("single", 6), inputs_for("single", 5, seed=4)
    y = torch.cos(2 * X[:, 0]) + 0.1 * X[:, 1]
    reg = la.LinearizedRegressor(model).fit(X, y)
    ref_mean, ref_cov = _closed_form(model, X, y, Xs, reg.prior_var_, reg.noise_var_, True)
    mean, cov = reg.predict(Xs, return_cov=True)
    assert mean.shape == (5,) and cov.shape == (5, 5)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(cov, ref_cov, rtol=1e-7, atol=1e-10)
    _, blocks = reg.predict_blocks(Xs)
    np.testing.assert_allclose(blocks[:, 0, 0], np.diagonal(ref_cov), rtol=1e-7)


# ---------------------------------------------------------------- score(sample_weight)
def test_regressor_score_with_sample_weight():
    model, X = mlp(), inputs_for("mlp", 10)
    Y = torch.randn(10, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    reg = la.LinearizedRegressor(model, prior_var=0.01, noise_var=1.0, optimize_hyperparameters=False).fit(X, Y)
    Xt = inputs_for("mlp", 9, seed=11)
    Yt = torch.randn(9, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64).numpy()
    w = np.array([5.0, 0.0, 1.0, 2.0, 0.5, 3.0, 0.0, 1.0, 4.0])
    pred = reg.predict(Xt)
    # by hand: weighted R² per output (weighted mean), averaged uniformly over outputs
    ybar = (w[:, None] * Yt).sum(0) / w.sum()
    r2 = 1 - (w[:, None] * (Yt - pred) ** 2).sum(0) / (w[:, None] * (Yt - ybar) ** 2).sum(0)
    got = reg.score(Xt, Yt, sample_weight=w)
    assert got == pytest.approx(r2.mean(), rel=1e-10)
    assert got == pytest.approx(r2_score(Yt, pred, sample_weight=w), rel=1e-10)
    assert abs(got - reg.score(Xt, Yt)) > 1e-3  # the weights change the score


def test_classifier_score_with_sample_weight():
    model, X = mlp(), inputs_for("mlp", 15)
    clf = la.LinearizedClassifier(model, prior_var=0.05, optimize_hyperparameters=False).fit(X, _labels(15))
    Xt, yt = inputs_for("mlp", 12, seed=13), _labels(12, seed=14).numpy()
    pred = clf.predict_proba(Xt).argmax(1)
    right = pred == yt
    assert 0 < right.sum() < len(yt)  # both outcomes present, so the weights matter
    w = np.where(right, 1.0, 3.0) * np.linspace(0.5, 2.0, len(yt))
    got = clf.score(Xt, yt, sample_weight=w)
    assert got == pytest.approx((w * right).sum() / w.sum(), rel=1e-12)
    assert got == pytest.approx(accuracy_score(yt, pred, sample_weight=w), rel=1e-12)
    assert got != pytest.approx(right.mean())


# ---------------------------------------------------------------- load refuses an inconsistent file
def _rewrite(src, dst, edit_header=None, edit_tensors=None):
    """Copy a .linadapt file with edited header / tensors and *valid* checksums (recomputed with the module's
    own helpers), so only the semantic checks of ``load`` can catch the edit."""
    from safetensors.torch import load_file, save_file

    header = persistence.read_header(src)
    tensors = load_file(str(src))
    if edit_tensors:
        edit_tensors(tensors)
    if edit_header:
        edit_header(header)
    header["payload_sha256"] = persistence._payload_checksum(tensors)
    header["header_sha256"] = persistence._header_checksum(header)
    save_file(tensors, str(dst), metadata={"linadapt": json.dumps(header)})


@pytest.mark.parametrize("kind", ["regressor", "classifier"])
def test_load_refuses_a_stored_posterior_that_is_not_rebuilt(tmp_path, kind):
    model, X = mlp(), inputs_for("mlp", 8)
    if kind == "regressor":
        Y = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        est = la.LinearizedRegressor(model).fit(X, Y)
    else:
        est = la.LinearizedClassifier(model).fit(X, _labels(8))
    est.save(tmp_path / "a.linadapt")
    _rewrite(tmp_path / "a.linadapt", tmp_path / "same.linadapt")  # the rewrite itself is accepted
    la.load(tmp_path / "same.linadapt", model)

    def perturb(t):
        t["delta"] = t["delta"] * (1 + 1e-3)

    _rewrite(tmp_path / "a.linadapt", tmp_path / "b.linadapt", edit_tensors=perturb)
    with pytest.raises(ValueError, match="rebuilt posterior differs"):
        la.load(tmp_path / "b.linadapt", model)


def test_load_refuses_a_different_parameter_selection(tmp_path):
    model, X = mlp(), inputs_for("mlp", 8)
    est = la.LinearizedClassifier(model, params="last", optimize_hyperparameters=False).fit(X, _labels(8))
    est.save(tmp_path / "a.linadapt")

    def rename(h):
        h["model"]["selected"] = list(reversed(h["model"]["selected"]))  # ['4.bias', '4.weight']

    _rewrite(tmp_path / "a.linadapt", tmp_path / "b.linadapt", edit_header=rename)
    with pytest.raises(ValueError, match="parameters selected by 'last' differ"):
        la.load(tmp_path / "b.linadapt", model)
