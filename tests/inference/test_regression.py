import math
import warnings

import numpy as np
import pytest
import torch
from models import gp_closed_form, inputs_for, mlp, reference_jacobian, resnet, single_out
from sklearn.base import clone
from torch import nn

import linadapt as la

PATHS = [(s, v) for s in ("function", "parameter") for v in ("cholesky", "cg")]
RTOL = 1e-8


def closed_form(model, names, X, y, Xs, s2, sig2, mean="network"):
    """Posterior mean and joint latent covariance from an explicit Jacobian (parameter-space formula)."""
    J = reference_jacobian(model, X, names)
    Js = reference_jacobian(model, Xs, names)
    n, c, p = J.shape
    model.eval()
    with torch.no_grad():
        f0 = model(X).reshape(n, c) if mean == "network" else torch.zeros(n, c, dtype=torch.float64)
        fs = model(Xs).reshape(-1, c) if mean == "network" else torch.zeros(Xs.shape[0], c, dtype=torch.float64)
    Jm, Jsm = J.reshape(n * c, p), Js.reshape(-1, p)
    r = (y.reshape(n, c) - f0).reshape(-1)
    P = Jm.T @ Jm / sig2 + torch.eye(p, dtype=torch.float64) / s2
    delta = torch.linalg.solve(P, Jm.T @ r) / sig2
    mu = fs + (Jsm @ delta).reshape(-1, c)
    cov = Jsm @ torch.linalg.solve(P, Jsm.T)
    A = s2 * Jm @ Jm.T + sig2 * torch.eye(n * c, dtype=torch.float64)
    lml = -0.5 * r @ torch.linalg.solve(A, r) - 0.5 * torch.logdet(A) - 0.5 * n * c * math.log(2 * math.pi)
    return mu, cov, float(lml)


def rel_err(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


@pytest.mark.parametrize("space,solver", PATHS)
@pytest.mark.parametrize("case", ["mlp", "resnet-last", "resnet-chunked", "single", "mlp-zero-mean", "resnet-bias"])
def test_every_path_equals_dense_closed_form(space, solver, case):
    s2, sig2, chunk, params, mean = 0.8, 0.05, None, "all", "network"
    if case.startswith("mlp"):
        model, X, Xs = mlp(), inputs_for("mlp", 10), inputs_for("mlp", 4, seed=7)
        mean = "zero" if case.endswith("zero-mean") else "network"
    elif case == "single":
        model, X, Xs = single_out(), inputs_for("single", 12), inputs_for("single", 4, seed=7)
    else:
        model, X, Xs = resnet(), inputs_for("resnet", 10), inputs_for("resnet", 4, seed=7)
        params = {"resnet-last": "last", "resnet-chunked": "all", "resnet-bias": "bias"}[case]
        chunk = 4 if case == "resnet-chunked" else None
    lin = la.Linearization(model, params)
    c = lin.outputs(X).shape[1]
    g = torch.Generator().manual_seed(3)
    y = torch.randn(X.shape[0], c, generator=g, dtype=torch.float64)
    if case == "single":
        y = y[:, 0]
    reg = la.LinearizedRegressor(
        model,
        params=params,
        prior_var=s2,
        noise_var=sig2,
        optimize_hyperparameters=False,
        mean=mean,
        space=space,
        solver=solver,
        chunk_size=chunk,
        cg_tol=1e-12,
    ).fit(X, y)
    assert reg.space_ == space and reg.solver_ == solver
    mu_ref, cov_ref, lml_ref = closed_form(model, lin.param_names, X, y, Xs, s2, sig2, mean)
    mu, std = reg.predict(Xs, return_std=True, include_noise=False)
    _, cov = reg.predict(Xs, return_cov=True, include_noise=False)
    m = Xs.shape[0]
    if case == "single":
        mu_ref = mu_ref[:, 0]
        assert mu.shape == (m,) and std.shape == (m,) and cov.shape == (m, m)
        cov_flat = cov
    else:
        assert mu.shape == (m, c) and std.shape == (m, c) and cov.shape == (m, c, m, c)
        cov_flat = cov.reshape(m * c, m * c)
    assert rel_err(mu, mu_ref.numpy()) < RTOL
    assert rel_err(cov_flat, cov_ref.numpy()) < RTOL
    assert rel_err(std.reshape(-1) ** 2, cov_ref.diagonal().numpy()) < RTOL
    _, std_y = reg.predict(Xs, return_std=True)
    assert np.allclose(std_y**2, std**2 + sig2, rtol=1e-12)
    if solver == "cholesky":  # exact evidence; the CG path estimates its log-determinant
        assert abs(reg.log_marginal_likelihood() - lml_ref) < RTOL * abs(lml_ref)


def test_outputs_are_coupled_through_full_blocks():
    model, X = mlp(), inputs_for("mlp", 8)
    y = torch.randn(8, 3, dtype=torch.float64)
    reg = la.LinearizedRegressor(model, prior_var=1.0, noise_var=0.1, optimize_hyperparameters=False).fit(X, y)
    _, blocks = reg.predict_blocks(inputs_for("mlp", 2, seed=4), include_noise=False)
    assert blocks.shape == (2, 3, 3)
    assert np.abs(blocks[:, 0, 1]).max() > 1e-6  # off-diagonal output covariance is modelled
    # changing one output's targets moves the others' predictions
    y2 = y.clone()
    y2[:, 0] += 1.0
    reg2 = clone(reg).fit(X, y2)
    d = reg2.predict(X[:3]) - reg.predict(X[:3])
    assert np.abs(d[:, 1:]).max() > 1e-6


def _prior_sample(seed, n=300, s2=0.5, sig2=0.01):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)).double()
    X = torch.randn(n, 3, dtype=torch.float64)
    lin = la.Linearization(net)
    J = lin.jacobian(X)[:, 0, :]
    g = torch.Generator().manual_seed(seed)
    delta = math.sqrt(s2) * torch.randn(lin.num_params, generator=g, dtype=torch.float64)
    y = lin.outputs(X)[:, 0] + J @ delta + math.sqrt(sig2) * torch.randn(n, generator=g, dtype=torch.float64)
    return net, X, y


def test_hyperparameter_learning_recovers_prior_sample():
    """Data drawn from the linearized GP prior with s² = 0.5, σ² = 0.01.

    The noise is identified by n = 300 residual directions, so σ² comes back within 25%. The prior
    variance is identified only by the ~tens of directions in which J has large singular values (the
    kernel of a small tanh net is strongly low-rank), so its estimate is far noisier: we ask for a factor
    of 2 on each seed and a factor of 1.5 on the geometric mean of three seeds.
    """
    logs = []
    for seed in range(3):
        net, X, y = _prior_sample(seed)
        reg = la.LinearizedRegressor(net, solver="cholesky").fit(X, y)
        assert 0.5 / 2 < reg.prior_var_ < 0.5 * 2
        assert 0.01 / 1.25 < reg.noise_var_ < 0.01 * 1.25
        logs.append(math.log(reg.prior_var_))
        # the optimum is a stationary point of the exact evidence, and beats nearby values
        best = reg.log_marginal_likelihood()
        for f in (0.8, 1.25):
            assert reg.log_marginal_likelihood(prior_var=reg.prior_var_ * f) < best
            assert reg.log_marginal_likelihood(noise_var=reg.noise_var_ * f) < best
    assert 0.5 / 1.5 < math.exp(sum(logs) / 3) < 0.5 * 1.5


def test_matrix_free_hyperparameters_close_to_dense():
    net, X, y = _prior_sample(0, n=200)
    dense = la.LinearizedRegressor(net, solver="cholesky").fit(X, y)
    for space in ("function", "parameter"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", la.ConvergenceWarning)  # CG ran to the end, no Cholesky fallback
            mf = la.LinearizedRegressor(net, solver="cg", space=space).fit(X, y)
        assert mf.solver_ == "cg" and mf.solve_info_.converged
        assert abs(math.log(mf.noise_var_ / dense.noise_var_)) < 0.1
        assert abs(math.log(mf.prior_var_ / dense.prior_var_)) < 0.5
        # The log-determinant is a 16-probe Hutchinson estimate: its error is tens of nats on this
        # strongly ill-conditioned kernel, so the value is only checked loosely.
        assert abs(mf.log_marginal_likelihood() - dense.log_marginal_likelihood()) < 0.15 * abs(
            dense.log_marginal_likelihood()
        )


def test_small_matrix_free_evidence_is_exact():
    """With dim ≤ 64 the log-det probes are the standard basis: the Lanczos evidence equals the dense one."""
    model, X = resnet(), inputs_for("resnet", 12)
    y = torch.randn(12, 3, dtype=torch.float64)
    dense = la.LinearizedRegressor(model, params="last", solver="cholesky", space="function").fit(X, y)
    mf = la.LinearizedRegressor(model, params="last", solver="cg", space="function").fit(X, y)
    assert abs(mf.prior_var_ / dense.prior_var_ - 1) < 1e-4
    assert abs(mf.noise_var_ / dense.noise_var_ - 1) < 1e-4
    assert abs(mf.log_marginal_likelihood() - dense.log_marginal_likelihood()) < 1e-6 * abs(
        dense.log_marginal_likelihood()
    )


@pytest.mark.parametrize("space", ["function", "parameter"])
def test_evidence_gradient_matches_finite_differences(space):
    from linadapt.inference.evidence import Spectrum

    model, X = mlp(), inputs_for("mlp", 9)
    lin = la.Linearization(model)
    J = lin.jacobian(X).reshape(27, -1)
    r = torch.randn(27, dtype=torch.float64)
    spec = Spectrum.from_kernel(J @ J.T, r) if space == "function" else Spectrum.from_jacobian(J, r)

    def direct(ls2, lsig2):
        A = math.exp(ls2) * J @ J.T + math.exp(lsig2) * torch.eye(27, dtype=torch.float64)
        return float(-0.5 * r @ torch.linalg.solve(A, r) - 0.5 * torch.logdet(A) - 13.5 * math.log(2 * math.pi))

    x = torch.tensor([math.log(0.7), math.log(0.2)], dtype=torch.float64, requires_grad=True)
    val = spec.log_ml(x[0], x[1])
    (grad,) = torch.autograd.grad(val, x)
    assert abs(val.item() - direct(*x.tolist())) < 1e-9 * abs(val.item())
    h = 1e-5
    for i in range(2):
        e = [0.0, 0.0]
        e[i] = h
        fd = (direct(x[0].item() + e[0], x[1].item() + e[1]) - direct(x[0].item() - e[0], x[1].item() - e[1])) / (2 * h)
        assert abs(fd - grad[i].item()) < 1e-6 * max(1.0, abs(fd))
    # the optimiser's closed-form numpy objective: the same value and gradient (negated)
    value, g_np = spec.negative_log_ml_and_grad(np.array(x.tolist()))
    assert abs(value + val.item()) < 1e-12 * abs(val.item())
    np.testing.assert_allclose(g_np, -grad.numpy(), rtol=1e-10, atol=1e-12)


def test_cg_nonconvergence_warns_and_falls_back_to_cholesky():
    model, X = mlp(), inputs_for("mlp", 10)
    y = torch.randn(10, 3, dtype=torch.float64)
    ref = la.LinearizedRegressor(
        model, noise_var=1e-6, optimize_hyperparameters=False, solver="cholesky", space="parameter"
    ).fit(X, y)
    with pytest.warns(la.ConvergenceWarning, match=r"relative residual .* after \d+ products.*Cholesky"):
        reg = la.LinearizedRegressor(
            model, noise_var=1e-6, optimize_hyperparameters=False, solver="cg", space="parameter", cg_max_iter=2
        ).fit(X, y)
    assert reg.solver_ == "cholesky"
    assert rel_err(reg.predict(X), ref.predict(X)) < 1e-8


def test_auto_choices():
    model = resnet()
    X = inputs_for("resnet", 10)
    y = torch.randn(10, 3, dtype=torch.float64)
    reg = la.LinearizedRegressor(model, optimize_hyperparameters=False).fit(X, y)
    assert reg.space_ == "function" and reg.solver_ == "cholesky"  # 30 observations < 219 parameters
    reg = la.LinearizedRegressor(model, params="last", optimize_hyperparameters=False).fit(
        inputs_for("resnet", 40), torch.randn(40, 3, dtype=torch.float64)
    )
    assert reg.space_ == "parameter"  # 120 observations > 15 parameters


def test_sklearn_conventions():
    model, X = single_out(), inputs_for("single", 20)
    y = torch.sin(X[:, 0]).numpy()
    reg = la.LinearizedRegressor(model, prior_var=2.0)
    assert reg.get_params()["prior_var"] == 2.0
    c = clone(reg)
    assert c.prior_var == 2.0 and c.model is not model
    assert reg.fit(X.numpy(), y) is reg
    assert hasattr(reg, "prior_var_") and hasattr(reg, "noise_var_")
    # R² of the posterior mean, from the dense GP closed form at the fitted hyperparameters
    names = reg.linearization_.param_names
    mean = gp_closed_form(model, names, X, torch.from_numpy(y), X, reg.prior_var_, reg.noise_var_)[0][:, 0]
    r2 = 1 - ((y - mean) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    assert 0 < r2 < 1 and reg.score(X.numpy(), y) == pytest.approx(r2, rel=1e-8)
    with pytest.raises(Exception, match="not fitted"):
        la.LinearizedRegressor(model).predict(X)


def test_bad_input_errors():
    model, X = mlp(), inputs_for("mlp", 6)
    y = torch.randn(6, 3, dtype=torch.float64)
    reg = la.LinearizedRegressor(model, optimize_hyperparameters=False, noise_var=0.1)
    Xn = X.clone()
    Xn[2, 1] = float("nan")
    cases = [
        ((Xn, y), "X contains NaN"),
        ((X, y.clone().fill_(float("inf"))), "y contains NaN or inf"),
        ((X, y[:5]), "lengths must match"),
        ((X, y[:, :2]), "model has 3 outputs"),
        ((X, y[:, 0]), r"pass y of shape \(n, 3\)"),
        ((X[:0], y[:0]), "empty"),
        ((X, torch.complex(y, y)), "complex"),
        ((X, np.array([["a"] * 3] * 6)), "numeric"),
    ]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            clone(reg).fit(*args)
    # integer targets are numbers (scikit-learn accepts them): the same fit as with their float values
    yi = torch.arange(18).reshape(6, 3) % 4
    np.testing.assert_allclose(
        clone(reg).fit(X, yi).predict(X), clone(reg).fit(X, yi.double()).predict(X), rtol=1e-12, atol=1e-12
    )
    with pytest.raises(ValueError, match="matches no parameter"):
        la.LinearizedRegressor(model, params=["encoder.*"]).fit(X, y)
    with pytest.raises(ValueError, match="prior_var"):
        la.LinearizedRegressor(model, prior_var=-1).fit(X, y)
    with pytest.raises(ValueError, match="space"):
        la.LinearizedRegressor(model, space="both").fit(X, y)
    frozen = mlp()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        la.LinearizedRegressor(frozen).fit(X, y)
    reg.fit(X, y)
    with pytest.raises(ValueError, match="at most one"):
        reg.predict(X, return_std=True, return_cov=True)
    shape = tuple(X.shape[1:])
    wider = torch.randn(3, shape[0] + 2, *shape[1:], dtype=X.dtype)
    if X.dim() == 2:  # feature vectors: scikit-learn's message, before the network runs
        match = rf"X has {shape[0] + 2} features, but LinearizedRegressor is expecting {shape[0]} features"
    else:
        match = rf"fitted on inputs of shape \({shape[0]},"
    with pytest.raises(ValueError, match=match):
        reg.predict(wider)


def test_inputs_of_another_shape_than_at_fit_still_work_where_the_model_takes_them():
    """The fitted input shape only names the likely cause when the network fails; a network that takes several
    shapes (here sequences of any length, with data-dependent control flow that vmap refuses, so the Jacobian
    falls back to reverse mode over a basis) predicts on another length, with its uncertainty."""

    class MeanOverSequence(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 2))  # no layer rule: the Jacobian goes through torch.func

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 1e9:  # data-dependent control flow
                x = x * 0
            return torch.tanh(x @ self.w).mean(1)

    torch.manual_seed(0)
    model = MeanOverSequence().double()
    X, y = torch.randn(8, 5, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    X7 = torch.randn(4, 7, 3, dtype=torch.float64)
    want = gp_closed_form(model, ["w"], X, y, X7, 0.7, 0.05)  # plain autograd, example by example
    for solver in ("cholesky", "cg"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", la.ConvergenceWarning)  # CG must not fall back to Cholesky silently
            reg = la.LinearizedRegressor(
                model, prior_var=0.7, noise_var=0.05, optimize_hyperparameters=False, space="function", solver=solver
            ).fit(X, y)
        assert reg.solver_ == solver and not reg.linearization_._per_example_jacobian  # the basis pull ran
        mean, std = reg.predict(X7, return_std=True)
        np.testing.assert_allclose(mean, want[0], rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(std, want[1], rtol=1e-9, atol=1e-10)
    # a fresh linearization that knows the fitted shape: per-example vmap fails on the branch, and the Jacobian
    # falls back to reverse mode over a basis (the shape hint must not turn that failure into an error)
    lin = la.Linearization(model)
    lin.fitted_input_shape = (5, 3)
    J = lin.jacobian(X7)
    assert not lin._per_example_jacobian
    torch.testing.assert_close(J, reference_jacobian(model, X7, ["w"]), rtol=1e-12, atol=1e-13)


def test_float32_network_float64_algebra():
    """A float32 network gives float64 results that agree with the float64 network to float32 accuracy."""
    model64, X = mlp(), inputs_for("mlp", 10)
    model32 = mlp().float()
    y = torch.randn(10, 3, dtype=torch.float64)
    kw = dict(prior_var=0.5, noise_var=0.1, optimize_hyperparameters=False)
    r64 = la.LinearizedRegressor(model64, **kw).fit(X, y)
    r32 = la.LinearizedRegressor(model32, **kw).fit(X.float(), y)
    m64, s64 = r64.predict(X, return_std=True)
    m32, s32 = r32.predict(X.float(), return_std=True)
    assert m32.dtype == np.float64 and s32.dtype == np.float64
    assert rel_err(m32, m64) < 1e-5 and rel_err(s32, s64) < 1e-5
    assert next(model32.parameters()).dtype == torch.float32  # the model is not converted


@pytest.mark.parametrize("space,solver", [("function", "cholesky"), ("parameter", "cholesky"), ("function", "cg")])
def test_weight_decay_prior_is_the_gp_with_shifted_mean(space, solver):
    """prior_mean='zero': θ ~ N(0, s² I) is the GP with mean f(x; θ̂) − J(x) θ̂ and kernel s² K, in every path."""
    model, X = mlp(d_out=2), inputs_for("mlp", 12)
    Xs = inputs_for("mlp", 5, seed=3)
    Y = torch.randn(12, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    s2, sig2 = 0.3, 0.05
    lin = la.Linearization(model)
    J, Js = lin.jacobian(X).reshape(24, -1), lin.jacobian(Xs).reshape(10, -1)
    theta = lin.theta_vector()
    m, ms = lin.outputs(X).reshape(-1) - J @ theta, lin.outputs(Xs).reshape(-1) - Js @ theta
    A = s2 * J @ J.T + sig2 * torch.eye(24, dtype=torch.float64)
    mean = ms + s2 * Js @ J.T @ torch.linalg.solve(A, Y.reshape(-1) - m)
    cov = s2 * Js @ Js.T - s2**2 * Js @ J.T @ torch.linalg.solve(A, J @ Js.T)
    settings = {"optimize_hyperparameters": False, "prior_mean": "zero", "space": space, "solver": solver}
    reg = la.LinearizedRegressor(model, prior_var=s2, noise_var=sig2, **settings).fit(X, Y)
    got_mean, got_cov = reg.predict(Xs, return_cov=True, include_noise=False)
    np.testing.assert_allclose(got_mean.reshape(-1), mean.numpy(), rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(got_cov.reshape(10, 10), cov.numpy(), rtol=1e-7, atol=1e-9)
    lml = -0.5 * (Y.reshape(-1) - m) @ torch.linalg.solve(A, Y.reshape(-1) - m) - 0.5 * torch.logdet(A)
    assert reg.log_marginal_likelihood() == pytest.approx(float(lml) - 12 * math.log(2 * math.pi), rel=1e-8)
    with pytest.raises(ValueError, match="alternatives"):
        la.LinearizedRegressor(model, mean="zero", prior_mean="zero").fit(X, Y)


def test_forced_cholesky_that_cannot_fit_says_so():
    """solver='cholesky' in parameter space with p = 100k would need a 75 GiB matrix: a clear ValueError, not an
    allocation failure deep inside torch."""
    import torch
    from torch import nn

    import linadapt as la

    net = nn.Sequential(nn.Linear(3, 300), nn.Tanh(), nn.Linear(300, 300), nn.Tanh(), nn.Linear(300, 1))
    X, y = torch.randn(20, 3), torch.randn(20)
    for est in (la.LinearizedRegressor(net, space="parameter", solver="cholesky"),):
        with pytest.raises(ValueError, match="solver='cholesky' in parameter space needs dense matrices"):
            est.fit(X, y)
    clf = la.LinearizedClassifier(
        nn.Sequential(nn.Linear(3, 300), nn.Tanh(), nn.Linear(300, 300), nn.Tanh(), nn.Linear(300, 2)),
        space="parameter",
        solver="cholesky",
    )
    with pytest.raises(ValueError, match="use solver='cg' or 'auto'"):
        clf.fit(X, (y > 0).long())


def test_cg_evidence_search_that_ends_where_cg_fails_is_redone_exactly():
    """Nearly noiseless targets: the matrix-free (Lanczos) evidence drives σ² towards 0, where CG does not
    converge; the fit then searches again with the exact evidence, and says so, instead of keeping
    hyperparameters chosen from unreliable estimates (which had given 8× the test error)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 1))
    X = torch.randn(200, 3)
    y = torch.sin(X.sum(1))
    exact = la.LinearizedRegressor(net, solver="cholesky", space="function").fit(X, y)
    with pytest.warns(la.ConvergenceWarning, match="searching again with the exact"):
        cg = la.LinearizedRegressor(net, solver="cg", space="function").fit(X, y)
    assert cg.solver_ == "cholesky"
    assert cg.noise_var_ == pytest.approx(exact.noise_var_, rel=1e-6)
    assert cg.prior_var_ == pytest.approx(exact.prior_var_, rel=1e-6)


def test_cg_with_a_float32_network_converges_on_exact_products():
    """Float32 products are neither exactly linear nor symmetric, and CG on them stalled (relative residual 3e-4); on
    the first miss the cached factors are promoted to float64 and CG converges, without a warning or a
    dense fallback, to the dense fit's predictions."""
    import warnings

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 1))
    X, Xt = torch.randn(300, 3), torch.randn(50, 3)
    y = torch.sin(X.sum(1)) + 0.1 * torch.randn(300)
    with warnings.catch_warnings():
        warnings.simplefilter("error", la.ConvergenceWarning)
        cg = la.LinearizedRegressor(net, solver="cg", space="function").fit(X, y)
    assert cg.solver_ == "cg" and cg.solve_info_.converged
    dense = la.LinearizedRegressor(net, solver="cholesky", space="function").fit(X, y)
    # the CG fit's hyperparameters come from a stochastic (Lanczos) evidence: close to the exact ones
    assert cg.noise_var_ == pytest.approx(dense.noise_var_, rel=0.05)
    m_cg, s_cg = cg.predict(Xt, return_std=True)
    m_d, s_d = dense.predict(Xt, return_std=True)
    np.testing.assert_allclose(m_cg, m_d, atol=0.02)
    np.testing.assert_allclose(s_cg, s_d, atol=0.01)


@pytest.mark.parametrize("space", ["parameter", "function"])
def test_small_cg_fits_learn_hyperparameters_from_the_exact_evidence(space):
    """N ≤ lanczos_iter: the evidence search of a CG fit uses the exact kernel spectrum, not the stochastic
    Lanczos log-determinant (which was off by up to 2.8 nats here, s² 3.7–6.4 against 4.5 over seeds)."""
    import warnings

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 10), nn.Tanh(), nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 1)).double()
    X = torch.randn(25, 2, dtype=torch.float64)
    y = torch.sin(X.sum(1)) + 0.1 * torch.randn(25, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", la.ConvergenceWarning)  # CG ran to the end, no Cholesky fallback
        cg = la.LinearizedRegressor(net, solver="cg", space=space).fit(X, y)
    assert cg.solver_ == "cg" and cg.solve_info_.converged
    exact = la.LinearizedRegressor(net, solver="cholesky", space=space).fit(X, y)
    assert cg.prior_var_ == pytest.approx(exact.prior_var_, rel=1e-6)
    assert cg.noise_var_ == pytest.approx(exact.noise_var_, rel=1e-6)
    assert cg.log_marginal_likelihood() == pytest.approx(exact.log_marginal_likelihood(), abs=1e-6)
