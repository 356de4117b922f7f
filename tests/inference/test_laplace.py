import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from models import inputs_for, mlp, reference_jacobian, resnet, single_out
from scipy.optimize import minimize
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

import linadapt as la
from linadapt.likelihoods.categorical import _lam, _r, _rt, softmax_curvature_blocks
from linadapt.likelihoods.softmax_links import class_probabilities

PATHS = [(s, v) for s in ("function", "parameter") for v in ("cholesky", "cg")]


def labels_for(n, c, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, c, (n,), generator=g)


def dense_laplace(model, names, X, y, Xs, s2, prior_mean="network"):
    """MAP by scipy's trust-region Newton on an explicit Jacobian, then the dense Laplace formulas."""
    J = reference_jacobian(model, X, names)
    Js = reference_jacobian(model, Xs, names)
    n, c, p = J.shape
    model.eval()
    with torch.no_grad():
        f0, fs = model(X).reshape(n, c), model(Xs).reshape(-1, c)
    Jm, Jsm = J.reshape(n * c, p), Js.reshape(-1, p)
    params = dict(model.named_parameters())
    mu = torch.zeros(p, dtype=torch.float64)
    if prior_mean == "zero":
        mu = -torch.cat([params[k].detach().reshape(-1) for k in names])
    Y = torch.nn.functional.one_hot(y, c).double()

    def parts(d):
        F = f0 + (Jm @ d).reshape(n, c)
        pi = torch.softmax(F, 1)
        loss = -(Y * torch.log_softmax(F, 1)).sum() + 0.5 * ((d - mu) ** 2).sum() / s2
        grad = -Jm.T @ (Y - pi).reshape(-1) + (d - mu) / s2
        lam = torch.diag_embed(pi) - pi[:, :, None] * pi[:, None, :]
        H = torch.einsum("iap,iab,ibq->pq", J, lam, J) + torch.eye(p, dtype=torch.float64) / s2
        return loss, grad, H

    res = minimize(
        lambda d: parts(torch.from_numpy(d))[0].item(),
        np.zeros(p),
        jac=lambda d: parts(torch.from_numpy(d))[1].numpy(),
        hess=lambda d: parts(torch.from_numpy(d))[2].numpy(),
        method="trust-exact",
        options={"gtol": 1e-13},
    )
    d = torch.from_numpy(res.x)
    loss, grad, H = parts(d)
    for _ in range(3):  # polish with plain Newton steps where trust-exact stopped short of the gradient target
        if float(grad.norm()) < 1e-10:
            break
        d = d - torch.linalg.solve(H, grad)
        loss, grad, H = parts(d)
    assert float(grad.norm()) < 1e-9
    mean = fs + (Jsm @ d).reshape(-1, c)
    cov = (Jsm @ torch.linalg.solve(H, Jsm.T)).reshape(-1, c, Xs.shape[0], c)
    blocks = torch.stack([cov[i, :, i, :] for i in range(Xs.shape[0])])
    # log q = log p(y | δ*) − ½‖δ* − μ‖²/s² − ½ log det(I + s² JᵀΛJ) = −loss − ½ log det(s² H)
    evidence = -float(loss) - 0.5 * float(torch.logdet(s2 * H))
    return d, mean, blocks, evidence


def rel_err(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


CASES = {
    "mlp": lambda: (mlp(), "all", inputs_for("mlp", 12), inputs_for("mlp", 4, seed=7), None, "network"),
    "mlp-zero-prior": lambda: (mlp(), "all", inputs_for("mlp", 12), inputs_for("mlp", 4, seed=7), None, "zero"),
    "resnet-last": lambda: (resnet(), "last", inputs_for("resnet", 10), inputs_for("resnet", 3, 7), None, "network"),
    "resnet-chunked": lambda: (resnet(), "all", inputs_for("resnet", 10), inputs_for("resnet", 3, 7), 4, "network"),
}


@pytest.mark.parametrize("space,solver", PATHS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_path_equals_dense_laplace(space, solver, case):
    model, params, X, Xs, chunk, prior_mean = CASES[case]()
    s2 = 0.9
    names = la.select_parameters(model, params)
    c = model.eval()(X[:1]).shape[1]
    y = labels_for(X.shape[0], c)
    d_ref, mean_ref, cov_ref, ev_ref = dense_laplace(model, names, X, y, Xs, s2, prior_mean)
    clf = la.LinearizedClassifier(
        model,
        params=params,
        prior_var=s2,
        optimize_hyperparameters=False,
        prior_mean=prior_mean,
        space=space,
        solver=solver,
        chunk_size=chunk,
    ).fit(X, y)
    assert clf.space_ == space and clf.solver_ == solver
    assert clf.posterior_.newton.converged
    mean, cov = clf.predict_logits(Xs)
    assert rel_err(clf.posterior_.delta, d_ref) < 1e-8
    assert rel_err(mean, mean_ref) < 1e-8
    assert rel_err(cov, cov_ref) < 1e-7
    if solver == "cholesky" or clf.posterior_.system.dim <= 64:
        assert clf.log_marginal_likelihood_value_ == pytest.approx(ev_ref, rel=1e-9, abs=1e-9)
    else:  # stochastic Lanczos log-determinant: an estimate
        assert clf.log_marginal_likelihood_value_ == pytest.approx(ev_ref, rel=0.1)


def test_function_and_parameter_space_agree_on_evidence_and_probabilities():
    model, X, Xs = resnet(), inputs_for("resnet", 12), inputs_for("resnet", 5, seed=9)
    y = labels_for(12, 3, seed=5)
    fits = [
        la.LinearizedClassifier(model, prior_var=0.5, optimize_hyperparameters=False, space=s, solver="cholesky").fit(
            X, y
        )
        for s in ("function", "parameter")
    ]
    assert fits[0].log_marginal_likelihood_value_ == pytest.approx(fits[1].log_marginal_likelihood_value_, rel=1e-10)
    np.testing.assert_allclose(fits[0].predict_proba(Xs), fits[1].predict_proba(Xs), rtol=0, atol=1e-10)


def test_matrix_free_evidence_is_exact_for_small_systems():
    # p = 27 (last layer) ≤ 64: the log-determinant is probed with every basis vector, hence exact.
    model, X = mlp(), inputs_for("mlp", 30)
    y = labels_for(30, 3)
    values = [
        la.LinearizedClassifier(model, params="last", prior_var=2.0, optimize_hyperparameters=False, solver=s)
        .fit(X, y)
        .log_marginal_likelihood_value_
        for s in ("cholesky", "cg")
    ]
    assert values[0] == pytest.approx(values[1], rel=1e-8)


def test_prior_var_maximises_the_laplace_evidence():
    model, X = mlp(), inputs_for("mlp", 40)
    with torch.no_grad():
        y = model(X).argmax(1)  # labels the network mostly agrees with, plus some flips
    y[::4] = (y[::4] + 1) % 3
    clf = la.LinearizedClassifier(model, prior_var=1.0).fit(X, y)
    best = clf.log_marginal_likelihood_value_
    # the Laplace evidence at the optimum, recomputed from an explicit Jacobian (MAP by scipy's Newton)
    names = clf.linearization_.param_names
    assert best == pytest.approx(dense_laplace(model, names, X, y, X[:1], clf.prior_var_)[3], rel=1e-9)
    assert best == pytest.approx(clf.log_marginal_likelihood(clf.prior_var_), rel=1e-10)
    for factor in (0.5, 0.8, 1.25, 2.0, 1e-3, 1e3):
        assert clf.log_marginal_likelihood(clf.prior_var_ * factor) <= best + 1e-9


def test_prior_var_search_leaves_the_initial_grid_when_needed():
    # Random labels a tiny net cannot explain: the evidence prefers (almost) no adaptation, far below 10⁻⁴
    # (the evidence alone; the default boundary-avoiding hyperprior stops where the logits' prior variance is ≈ 1).
    model, X = mlp(), inputs_for("mlp", 30)
    y = labels_for(30, 3, seed=11)
    clf = la.LinearizedClassifier(model, prior_var=100.0, hyperprior=None).fit(X, y)
    assert clf.prior_var_ < 100.0 * 1e-4
    assert clf.log_marginal_likelihood(clf.prior_var_) >= clf.log_marginal_likelihood(clf.prior_var_ * 10) - 1e-9
    kbar = clf.problem_.mean_kernel_diagonal()
    default = la.LinearizedClassifier(model, prior_var=100.0).fit(X, y)
    assert 0.05 < default.prior_var_ * kbar < 1.0  # in the prior's tail, above the evidence alone


def test_newton_reaches_the_map_with_a_huge_prior_on_separable_data():
    # Separable labels and s² = 10⁶: the objective is nearly flat along the separating direction and
    # full Newton steps overshoot; the line search keeps every step a descent step.
    model, X = mlp(), inputs_for("mlp", 30)
    y = (X[:, 0] > 0).long()
    names = la.select_parameters(model, "last")
    _, mean_ref, _, _ = dense_laplace(model, names, X, y, X[:5], 1e6)
    for space in ("function", "parameter"):
        clf = la.LinearizedClassifier(model, "last", prior_var=1e6, optimize_hyperparameters=False, space=space)
        clf.fit(X, y)
        assert clf.posterior_.newton.converged
        np.testing.assert_allclose(clf.predict_logits(X[:5], return_cov=False), mean_ref.numpy(), rtol=1e-6, atol=1e-6)


def test_newton_that_runs_out_of_iterations_warns():
    model, X = mlp(), inputs_for("mlp", 20)
    clf = la.LinearizedClassifier(model, prior_var=100.0, optimize_hyperparameters=False, newton_max_iter=1)
    with pytest.warns(la.ConvergenceWarning, match="Newton"):
        clf.fit(X, labels_for(20, 3))


# ---------------------------------------------------------------------------- links
def test_probit_link_formula():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(6, 4, generator=g, dtype=torch.float64)
    A = torch.randn(6, 4, 4, generator=g, dtype=torch.float64)
    cov = A @ A.transpose(1, 2)
    expected = torch.softmax(mu / torch.sqrt(1 + math.pi / 8 * torch.diagonal(cov, dim1=1, dim2=2)), 1)
    torch.testing.assert_close(class_probabilities(mu, cov, "probit"), expected, rtol=0, atol=1e-15)


def test_monte_carlo_link_matches_quadrature_for_two_classes():
    # With c = 2, p₁ = E[σ(f₁ − f₀)], f₁ − f₀ ~ N(μ₁ − μ₀, Σ₁₁ + Σ₀₀ − 2Σ₀₁): a 1-D Gauss–Hermite integral.
    mu = torch.tensor([[0.3, 1.1], [-0.5, 0.2]], dtype=torch.float64)
    cov = torch.tensor([[[1.0, 0.3], [0.3, 2.0]], [[0.5, -0.2], [-0.2, 0.4]]], dtype=torch.float64)
    proba = class_probabilities(mu, cov, "mc", n_samples=200_000, seed=1)
    x, w = np.polynomial.hermite_e.hermegauss(80)
    for i in range(2):
        m = float(mu[i, 1] - mu[i, 0])
        v = float(cov[i, 0, 0] + cov[i, 1, 1] - 2 * cov[i, 0, 1])
        p1 = float((w * (1 / (1 + np.exp(-(m + math.sqrt(v) * x))))).sum() / w.sum())
        assert abs(float(proba[i, 1]) - p1) < 3e-3
    again = class_probabilities(mu, cov, "mc", n_samples=200_000, seed=1)
    torch.testing.assert_close(proba, again, rtol=0, atol=0)


def test_links_reduce_to_softmax_without_uncertainty():
    mu = torch.tensor([[0.3, 1.1, -2.0]], dtype=torch.float64)
    zero = torch.zeros(1, 3, 3, dtype=torch.float64)
    for link in ("probit", "mc"):
        torch.testing.assert_close(class_probabilities(mu, zero, link, n_samples=10), torch.softmax(mu, 1))


def test_bridge_link_formula():
    mu = torch.tensor([[0.5, -0.2, 1.0]], dtype=torch.float64)
    cov = torch.tensor([[[0.6, 0.1, 0.0], [0.1, 0.4, 0.05], [0.0, 0.05, 0.9]]], dtype=torch.float64)
    c = 3
    C = np.eye(c) - 1.0 / c
    m = C @ mu.numpy()[0]
    v = np.diag(C @ cov.numpy()[0] @ C)
    alpha = (1 - 2 / c + np.exp(m) * np.exp(-m).sum() / c**2) / v
    np.testing.assert_allclose(class_probabilities(mu, cov, "bridge").numpy()[0], alpha / alpha.sum(), rtol=1e-12)


@given(
    st.integers(0, 10_000),
    st.floats(-5.0, 5.0),
    st.floats(0.0, 3.0),
    st.sampled_from(["probit", "mc", "bridge"]),
)
def test_links_give_distributions_and_bridge_ignores_common_shifts(seed, shift, shift_var, link):
    g = torch.Generator().manual_seed(seed)
    mu = 2 * torch.randn(5, 4, generator=g, dtype=torch.float64)
    A = torch.randn(5, 4, 4, generator=g, dtype=torch.float64)
    cov = A @ A.transpose(1, 2) + 1e-3 * torch.eye(4, dtype=torch.float64)
    proba = class_probabilities(mu, cov, link, n_samples=50, seed=seed)
    assert bool((proba >= 0).all())
    torch.testing.assert_close(proba.sum(1), torch.ones(5, dtype=torch.float64))
    if link == "bridge":  # softmax is invariant to adding the same Gaussian to all logits; so is the bridge
        ones = torch.ones(4, 4, dtype=torch.float64)
        shifted = class_probabilities(mu + shift, cov + shift_var * ones, link)
        torch.testing.assert_close(shifted, proba, rtol=1e-10, atol=1e-12)


@given(st.integers(0, 10_000), st.integers(2, 6))
def test_softmax_curvature_factor_laws(seed, c):
    g = torch.Generator().manual_seed(seed)
    pi = torch.softmax(3 * torch.randn(4, c, generator=g, dtype=torch.float64), 1)
    V = torch.randn(4, c, 3, generator=g, dtype=torch.float64)
    blocks = softmax_curvature_blocks(pi)
    torch.testing.assert_close(_lam(pi, V), blocks @ V)
    eye = torch.eye(c, dtype=torch.float64).expand(4, c, c)
    R = _r(pi, eye)
    torch.testing.assert_close(R @ R.transpose(1, 2), blocks)  # Λ = R Rᵀ
    torch.testing.assert_close(_rt(pi, V), R.transpose(1, 2) @ V)
    assert float(torch.linalg.eigvalsh(blocks).min()) > -1e-12  # Λ is PSD


def test_predictive_blocks_are_symmetric_positive_semidefinite():
    model, X = resnet(), inputs_for("resnet", 10)
    clf = la.LinearizedClassifier(model, prior_var=3.0, optimize_hyperparameters=False).fit(X, labels_for(10, 3))
    _, cov = clf.predict_logits(inputs_for("resnet", 6, seed=4))
    np.testing.assert_allclose(cov, cov.transpose(0, 2, 1), atol=1e-14)
    assert np.linalg.eigvalsh(cov).min() > -1e-10


def test_map_link_is_the_softmax_of_the_posterior_mean_logits():
    model, X = mlp(), inputs_for("mlp", 12)
    clf = la.LinearizedClassifier(model, prior_var=3.0, optimize_hyperparameters=False, link="map")
    clf.fit(X, labels_for(12, 3))
    Xt = inputs_for("mlp", 5, seed=7)
    mean = clf.predict_logits(Xt, return_cov=False)
    np.testing.assert_allclose(clf.predict_proba(Xt), torch.softmax(torch.from_numpy(mean), 1).numpy(), rtol=1e-14)
    probit = clf.set_params(link="probit").predict_proba(Xt)
    assert np.abs(probit - clf.set_params(link="map").predict_proba(Xt)).max() > 1e-3  # the covariance matters
    with pytest.raises(ValueError, match="needs the covariance"):
        class_probabilities(torch.from_numpy(mean), None, "probit")


# ---------------------------------------------------------------------------- conventions and errors
def test_sklearn_conventions_and_unseen_classes():
    model, X = mlp(d_out=4), inputs_for("mlp", 20)
    y = labels_for(20, 2)  # classes 2 and 3 never appear
    clf = la.LinearizedClassifier(model, params="last", prior_var=0.5)
    assert clf.fit(X, y) is clf
    assert list(clf.classes_) == [0, 1, 2, 3] and clf.n_classes_ == 4
    proba = clf.predict_proba(X)
    assert proba.shape == (20, 4) and bool((proba[:, 2:] > 0).all())
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(clf.predict(X), proba.argmax(1))
    assert clf.score(X, y) == pytest.approx((clf.predict(X) == y.numpy()).mean())
    assert clf.predict_logits(X, return_cov=False).shape == (20, 4)
    twin = clone(clf)
    assert twin.get_params()["prior_var"] == 0.5 and not hasattr(twin, "posterior_")
    np.testing.assert_allclose(twin.fit(X.numpy(), y.numpy()).predict_proba(X), proba, rtol=1e-12)
    # labels given as integral floats (e.g. read from a CSV) are accepted
    np.testing.assert_allclose(clone(clf).fit(X, y.double()).predict_proba(X), proba, rtol=1e-12)


def test_model_is_not_modified():
    model = resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    la.LinearizedClassifier(model, prior_var=1.0, optimize_hyperparameters=False).fit(
        inputs_for("resnet", 8), labels_for(8, 3)
    )
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bad_input_errors():
    model, X = mlp(), inputs_for("mlp", 10)
    y = labels_for(10, 3)
    clf = la.LinearizedClassifier(model, optimize_hyperparameters=False)
    with pytest.raises(ValueError, match="label 3, outside"):
        clf.fit(X, torch.full((10,), 3))
    with pytest.raises(ValueError, match="label -1, outside"):
        clf.fit(X, -torch.ones(10, dtype=torch.long))
    with pytest.raises(ValueError, match="non-integral"):
        clf.fit(X, y.double() + 0.5)
    with pytest.raises(ValueError, match="NaN"):
        bad = X.clone()
        bad[2, 1] = float("nan")
        clf.fit(bad, y)
    with pytest.raises(ValueError, match="9 labels but X has 10"):
        clf.fit(X, y[:9])
    with pytest.raises(ValueError, match=r"1 distinct labels \(\['a'\]\) and the model has 3 outputs"):
        clf.fit(X, np.array(["a"] * 10))
    # labels that are not output indices: c distinct values map to the outputs in sorted order (classes_)
    names = np.array(["cat", "dog", "emu"])[y.numpy()]
    named = clone(clf).fit(X, names)
    assert list(named.classes_) == ["cat", "dog", "emu"]
    np.testing.assert_allclose(named.predict_proba(X), clone(clf).fit(X, y).predict_proba(X), rtol=1e-12)
    assert set(named.predict(X)) <= {"cat", "dog", "emu"} and 0 <= named.score(X, names) <= 1
    with pytest.raises(ValueError, match="not among the fitted classes"):
        named.score(X, np.array(["cat"] * 9 + ["yak"]))
    with pytest.raises(ValueError, match="c ≥ 2"):  # a one-output model: 'auto' takes it as Bernoulli
        one = la.LinearizedClassifier(single_out(), likelihood="categorical")
        one.fit(inputs_for("single", 5), np.zeros(5, dtype=int))
    with pytest.raises(ValueError, match="link must be one of"):
        la.LinearizedClassifier(model, link="logit").fit(X, y)
    with pytest.raises(ValueError, match="n_samples"):
        la.LinearizedClassifier(model, n_samples=0).fit(X, y)
    with pytest.raises(ValueError, match="prior_var"):
        la.LinearizedClassifier(model, prior_var=-1.0).fit(X, y)
    with pytest.raises(ValueError, match=r"model must be a torch\.nn\.Module"):
        la.LinearizedClassifier("net").fit(X, y)
    with pytest.raises(NotFittedError, match="not fitted"):
        la.LinearizedClassifier(model).predict_proba(X)
    fitted = la.LinearizedClassifier(model, optimize_hyperparameters=False).fit(X, y)
    # score is the accuracy of the probit predictive of the dense Laplace posterior (explicit Jacobian)
    _, mean, blocks, _ = dense_laplace(model, fitted.linearization_.param_names, X, y, X, 1.0)
    ref = class_probabilities(mean, blocks, "probit").argmax(1)
    assert 0 < int((ref == y).sum()) < 10  # a score that can tell right from wrong answers here
    assert fitted.score(X, y) == pytest.approx(float((ref == y).double().mean()), abs=1e-12)
    with pytest.raises(ValueError, match="label 7, not among the fitted classes"):  # score checks labels
        fitted.score(X, torch.full((10,), 7))
    with pytest.raises(ValueError, match="9 labels but X has 10"):
        fitted.score(X, y[:9])
    # feature vectors of another width than at fit: refused in scikit-learn's words, before the network runs
    with pytest.raises(ValueError, match="X has 5 features, but LinearizedClassifier is expecting 4 features"):
        fitted.predict(torch.randn(4, 5, dtype=X.dtype))
    assert fitted.n_features_in_ == 4


def test_float32_network_float64_algebra():
    model64, X = mlp(), inputs_for("mlp", 16)
    y = labels_for(16, 3)
    model32 = mlp().float()
    kw = {"prior_var": 0.7, "optimize_hyperparameters": False}
    p64 = la.LinearizedClassifier(model64, **kw).fit(X, y).predict_proba(X)
    fit32 = la.LinearizedClassifier(model32, **kw).fit(X.float(), y)
    assert fit32.posterior_.delta.dtype == torch.float64
    np.testing.assert_allclose(fit32.predict_proba(X.float()), p64, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_in_distribution_calibration_not_worse_than_the_map_network(seed):
    # A network trained on real digits (sklearn's 8×8 set), adapted on fresh labelled data from the same
    # distribution (last layer, prior variance from the evidence), evaluated on a held-out split.
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    tr, ad, te = perm[:500], perm[500:800], perm[800:]
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(X[tr]), y[tr]).backward()
        opt.step()
    with torch.no_grad():
        map_proba = torch.softmax(net(X[te]), 1).numpy()
    M = la.metrics
    for link in ("probit", "mc", "bridge"):  # the links docs/usage.md says are tested for this
        proba = la.LinearizedClassifier(net, params="last", link=link).fit(X[ad], y[ad]).predict_proba(X[te])
        # ECE on ~1000 points has a sampling error of about ±0.005; NLL (a proper score) must improve.
        assert M.expected_calibration_error(proba, y[te]) <= M.expected_calibration_error(map_proba, y[te]) + 0.006
        assert M.nll(proba, y[te]) < M.nll(map_proba, y[te])
        assert M.accuracy(proba, y[te]) >= M.accuracy(map_proba, y[te])


def test_convergence_warning_is_not_raised_on_a_normal_fit():
    # labels the inputs explain (random labels may send the evidence to s² → 0, which warns: see below)
    model, X = mlp(), inputs_for("mlp", 20)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()
    with warnings.catch_warnings():
        warnings.simplefilter("error", la.ConvergenceWarning)
        clf = la.LinearizedClassifier(model).fit(X, y)
    assert 1e-7 < clf.prior_var_ < 1e7


# ---------------------------------------------------------------------------- leave-one-out link choice
def test_loo_cavity_equals_removing_the_site_in_weight_space():
    """The cavity from the c × c marginals equals dropping example i's Gaussian site from the weight-space
    posterior (precision H − J_iᵀΛ_iJ_i, linear term Hδ* − J_iᵀ(Λ_i f̂_i + g_i − Λ_i f0_i))."""
    from linadapt.inference.loo import cavity

    model, X = mlp(), inputs_for("mlp", 10)
    y, s2 = labels_for(10, 3), 2.0
    clf = la.LinearizedClassifier(model, prior_var=s2, optimize_hyperparameters=False, solver="cholesky").fit(X, y)
    mean, cov = (torch.from_numpy(a) for a in clf.predict_logits(X))
    mu_loo, cav = cavity(mean, cov, y)
    J = reference_jacobian(model, X, clf.linearization_.param_names)  # (n, c, p)
    with torch.no_grad():
        f0 = model(X).double()
    delta = clf.posterior_.delta.double()
    assert rel_err(f0 + torch.einsum("iap,p->ia", J, delta), mean) < 1e-10
    pi = torch.softmax(mean, 1)
    lam = torch.diag_embed(pi) - pi[:, :, None] * pi[:, None, :]
    g = torch.nn.functional.one_hot(y, 3).double() - pi
    H = torch.einsum("iap,iab,ibq->pq", J, lam, J) + torch.eye(J.shape[2], dtype=torch.float64) / s2
    for i in range(10):
        Ji = J[i]
        P = H - Ji.T @ lam[i] @ Ji
        eta = H @ delta - Ji.T @ (lam[i] @ mean[i] + g[i] - lam[i] @ f0[i])
        assert rel_err(f0[i] + Ji @ torch.linalg.solve(P, eta), mu_loo[i]) < 1e-7
        assert rel_err(Ji @ torch.linalg.solve(P, Ji.T), cav[i]) < 1e-7


def test_auto_link_takes_the_best_leave_one_out_likelihood(tmp_path):
    from linadapt.inference.loo import AUTO_LINKS

    model, X = mlp(), inputs_for("mlp", 30)
    y = labels_for(30, 3)
    # a fixed, broad prior: the evidence optimum here is so narrow that leaving a site out changes ~1e-8
    clf = la.LinearizedClassifier(model, link="auto", prior_var=2.0, optimize_hyperparameters=False).fit(X, y)
    assert set(clf.loo_nll_) == set(AUTO_LINKS) and all(math.isfinite(v) for v in clf.loo_nll_.values())
    # the LOO scores from an independent cavity: MAP on the explicit Jacobian (scipy), then for each i the
    # posterior with site i's Gaussian (precision Λ_i, gradient g_i at the MAP) removed, in parameter space
    names, s2 = clf.linearization_.param_names, clf.prior_var_
    delta = dense_laplace(model, names, X, y, X[:1], s2)[0]
    J = reference_jacobian(model, X, names)
    with torch.no_grad():
        f0 = model(X).double()
    fhat = f0 + torch.einsum("iap,p->ia", J, delta)
    pi = torch.softmax(fhat, 1)
    lam = torch.diag_embed(pi) - pi[:, :, None] * pi[:, None, :]
    g = torch.nn.functional.one_hot(y, 3).double() - pi
    H = torch.einsum("iap,iab,ibq->pq", J, lam, J) + torch.eye(J.shape[2], dtype=torch.float64) / s2
    mu_loo, cav = torch.empty_like(fhat), torch.empty(30, 3, 3, dtype=torch.float64)
    for i in range(30):
        P = H - J[i].T @ lam[i] @ J[i]
        eta = H @ delta - J[i].T @ (lam[i] @ fhat[i] + g[i] - lam[i] @ f0[i])
        mu_loo[i], cav[i] = f0[i] + J[i] @ torch.linalg.solve(P, eta), J[i] @ torch.linalg.solve(P, J[i].T)
    for link in AUTO_LINKS:
        proba = class_probabilities(mu_loo, None if link == "map" else cav, link)
        want = float(-torch.log(proba[torch.arange(30), y]).mean())
        assert clf.loo_nll_[link] == pytest.approx(want, rel=1e-6)
    assert clf.link_ == min(clf.loo_nll_, key=clf.loo_nll_.get)
    Xt = inputs_for("mlp", 6, seed=9)
    chosen = la.LinearizedClassifier(model, link=clf.link_, prior_var=clf.prior_var_, optimize_hyperparameters=False)
    np.testing.assert_allclose(clf.predict_proba(Xt), chosen.fit(X, y).predict_proba(Xt), rtol=1e-12)
    # set_params after fit switches the readout, as for any link
    np.testing.assert_allclose(
        clf.set_params(link="probit").predict_proba(Xt), chosen.set_params(link="probit").predict_proba(Xt), rtol=1e-12
    )
    clf.set_params(link="auto")
    clf.save(tmp_path / "a.linadapt")
    again = la.LinearizedClassifier.load(tmp_path / "a.linadapt", model)
    assert again.link_ == clf.link_
    np.testing.assert_allclose(again.predict_proba(Xt), clf.predict_proba(Xt), rtol=1e-10)
    # the default is "auto" (with distributed=True: tests/test_distributed.py)
    default = la.LinearizedClassifier(model, prior_var=2.0, optimize_hyperparameters=False).fit(X, y)
    assert default.link == "auto" and default.link_ == clf.link_


def test_cg_with_a_float32_network_needs_no_dense_fallback():
    """The Laplace system's CG on a float32 network's cached factors: on a miss the factors are promoted to
    float64 and CG runs again (without it, the predictive solves missed — relative residual 8e-7 — and fell
    back to a dense Cholesky with a warning); the probabilities match the dense fit's."""
    import warnings

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    X = torch.randn(80, 4)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()
    kw = {"prior_var": 1.0, "optimize_hyperparameters": False}
    with warnings.catch_warnings():
        warnings.simplefilter("error", la.ConvergenceWarning)
        proba = la.LinearizedClassifier(net, solver="cg", **kw).fit(X, y).predict_proba(X[:5])
    dense = la.LinearizedClassifier(net, solver="cholesky", **kw).fit(X, y).predict_proba(X[:5])
    np.testing.assert_allclose(proba, dense, atol=1e-4)


@pytest.mark.parametrize("estimator", ["classifier", "regressor"])
def test_blocks_at_the_training_inputs_come_from_the_held_kernel(estimator, monkeypatch):
    """The leave-one-out readout asks for the posterior blocks at the training inputs: they are read from the
    training kernel the dense fit holds (no cross kernel is formed again) and equal the generic path's."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    X = torch.randn(20, 3, dtype=torch.float64)
    if estimator == "classifier":
        est = la.LinearizedClassifier(net).fit(X, torch.arange(20) % 3)
    else:
        est = la.LinearizedRegressor(net).fit(X, torch.randn(20, 3, dtype=torch.float64))
    post, lin = est.posterior_, est.linearization_
    assert (est.space_, est.solver_) == ("function", "cholesky")
    Xt = est._train_data[0]
    generic = post.latent_blocks(Xt.clone())  # other memory: the cross-kernel path
    calls = []
    monkeypatch.setattr(lin, "cross_kernel_chunks", lambda *a, **k: calls.append(1) or iter(()))
    held = post.latent_blocks(Xt)
    assert not calls
    assert float((held - generic).abs().max()) <= 1e-10 * float(generic.abs().max())


def test_prior_variance_search_warns_when_the_evidence_has_no_interior_optimum():
    """Labels unrelated to the features: on this draw the Laplace evidence keeps improving as s² → 0 and the
    search ends 8 decades below prior_var, leaving the head at its initialisation — said in a warning; another
    draw has an interior optimum and no warning."""
    import warnings

    import linadapt as la
    from linadapt.inference.solvers import ConvergenceWarning

    def fit(seed: int) -> tuple[float, list]:
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
        with torch.no_grad():
            net[2].weight.mul_(0.01)
            net[2].bias.zero_()
        X, y = torch.randn(30, 5, dtype=torch.float64), torch.randint(0, 3, (30,))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            clf = la.LinearizedClassifier(net, params="2.*", hyperprior=None).fit(X, y)
        return clf.prior_var_, [w for w in caught if issubclass(w.category, ConvergenceWarning)]

    s2, caught = fit(1)
    assert s2 == pytest.approx(1e-8, rel=1e-6)
    assert len(caught) == 1 and "stay at their trained values" in str(caught[0].message)
    s2, caught = fit(0)
    assert 1e-7 < s2 < 1e7 and not caught
