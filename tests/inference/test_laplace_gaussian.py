"""The Laplace machinery is generic over the likelihood: with the Gaussian likelihood, where the Laplace
approximation is exact, it must reproduce the closed-form GP regression posterior of the linearized model —
computed here from an explicit autograd Jacobian, independently of the library's Jacobian code and solvers."""

import math

import pytest
import torch
from models import inputs_for, mlp, reference_jacobian

import linadapt as la
from linadapt.inference.laplace import LaplacePosterior, LaplaceProblem, optimize_prior_var
from linadapt.inference.loo import cavity
from linadapt.inference.regression import SolverOptions
from linadapt.likelihoods import Gaussian


def closed_form(model, names, X, Y, Xs, s2, noise, prior_mean):
    """δ̄, the latent covariance at Xs and log N(y; m, s²K + σ²I) for y = f(X; θ̂) + J δ + ε."""
    J = reference_jacobian(model, X, names)
    Js = reference_jacobian(model, Xs, names)
    n, c, p = J.shape
    Jm, Jsm = J.reshape(n * c, p), Js.reshape(-1, p)
    with torch.no_grad():
        f0 = model(X).double().reshape(-1)
    mu = torch.zeros(p, dtype=torch.float64)
    if prior_mean == "zero":
        params = dict(model.named_parameters())
        mu = -torch.cat([params[k].detach().reshape(-1) for k in names]).double()
    A = s2 * Jm @ Jm.T + noise * torch.eye(n * c, dtype=torch.float64)
    r = Y.reshape(-1) - f0 - Jm @ mu
    delta = mu + s2 * Jm.T @ torch.linalg.solve(A, r)
    Ksx = Jsm @ Jm.T
    cov = s2 * Jsm @ Jsm.T - s2**2 * Ksx @ torch.linalg.solve(A, Ksx.T)
    lml = -0.5 * r @ torch.linalg.solve(A, r) - 0.5 * torch.logdet(A) - 0.5 * n * c * math.log(2 * math.pi)
    return delta, cov, float(lml)


def problem_for(model, X, Y, noise, prior_mean):
    lin = la.Linearization(model, "all")
    Xt = lin.prepare_inputs(X, "X")
    return lin, LaplaceProblem(lin, Xt, Y, prior_mean, SolverOptions(), likelihood=Gaussian(noise))


@pytest.mark.parametrize("prior_mean", ["network", "zero"])
@pytest.mark.parametrize("space", ["function", "parameter"])
def test_gaussian_laplace_equals_the_closed_form_regression_posterior(space, prior_mean):
    model = mlp()  # 4 -> 8 -> 8 -> 3, p = 139
    X, Xs = inputs_for("mlp", 10), inputs_for("mlp", 4, seed=7)
    Y = torch.randn(10, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    s2, noise = 0.8, 0.3
    names = la.select_parameters(model, "all")
    d_ref, cov_ref, lml_ref = closed_form(model, names, X, Y, Xs, s2, noise, prior_mean)
    lin, problem = problem_for(model, X, Y, noise, prior_mean)
    post = LaplacePosterior(problem, s2, space, "cholesky")
    assert post.newton.converged and post.newton.iterations <= 2  # quadratic objective: one Newton step
    cov = post.latent_cov(lin.prepare_inputs(Xs, "X"))
    err_d = float((post.delta - d_ref).abs().max() / d_ref.abs().max())
    err_cov = float((cov - cov_ref).abs().max() / cov_ref.abs().max())
    print(
        f"{space}/{prior_mean}: rel err delta {err_d:.2e}, latent cov {err_cov:.2e}, "
        f"evidence {post.log_evidence:.12f} vs {lml_ref:.12f}"
    )
    assert err_d < 1e-9
    assert err_cov < 1e-9
    assert post.log_evidence == pytest.approx(lml_ref, rel=1e-10)  # the Laplace evidence is exact here


def test_gaussian_laplace_evidence_search_and_exact_leave_one_out():
    model = mlp()
    X = inputs_for("mlp", 10)
    Y = torch.randn(10, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    lin, problem = problem_for(model, X, Y, 0.3, "network")
    best = optimize_prior_var(problem, 1.0, "function", "cholesky")
    for factor in (0.5, 2.0):
        assert LaplacePosterior(problem, best.s2 * factor, "function", "cholesky").log_evidence <= best.log_evidence
    # Gaussian sites are exact, so the cavity of example i is the exact posterior of f_i without example i
    Xt = lin.prepare_inputs(X, "X")
    mean = lin.outputs(Xt) + best.mean_shift(Xt)
    mu_loo, cav = cavity(mean, best.latent_blocks(Xt), Y, Gaussian(0.3))
    J = reference_jacobian(model, X, la.select_parameters(model, "all"))
    with torch.no_grad():
        f0 = model(X).double()
    s2, noise = best.s2, 0.3
    for i in range(10):
        keep = [j for j in range(10) if j != i]
        Jk, Ji = J[keep].reshape(27, -1), J[i]
        A = s2 * Jk @ Jk.T + noise * torch.eye(27, dtype=torch.float64)
        m_i = f0[i] + s2 * Ji @ Jk.T @ torch.linalg.solve(A, (Y[keep] - f0[keep]).reshape(-1))
        C_i = s2 * Ji @ Ji.T - s2**2 * Ji @ Jk.T @ torch.linalg.solve(A, Jk @ Ji.T)
        torch.testing.assert_close(mu_loo[i], m_i, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(cav[i], C_i, rtol=1e-8, atol=1e-10)
