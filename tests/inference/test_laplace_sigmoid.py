"""The Laplace posterior under the Bernoulli and multilabel likelihoods, against a weight-space reference.

The reference: dense Jacobians of the network from ``torch.func.jacrev``, Newton's method on the linearized
model's weights δ with prior N(μ, D) (D = s² I, or one s²_g per group), the sigmoid log-likelihood and its
Hessian JᵀWJ, W = diag(p(1 − p)), written out here (no linadapt likelihood code), and the Laplace evidence
log p(y | δ*) − ½ (δ* − μ)ᵀ D⁻¹ (δ* − μ) − ½ log det(I + D^½ JᵀWJ D^½).
"""

import math

import numpy as np
import pytest
import torch
from models import inputs_for, mlp
from torch import nn
from torch.func import functional_call, jacrev

import linadapt as la
from linadapt.inference.laplace import LaplacePosterior, LaplaceProblem, optimize_prior_var
from linadapt.inference.loo import cavity
from linadapt.inference.regression import SolverOptions
from linadapt.jacobian.linearization import Linearization
from linadapt.likelihoods import Bernoulli, Multilabel

PATHS = [(s, v) for s in ("function", "parameter") for v in ("cholesky", "cg")]


class Squeezed(nn.Module):
    """A one-output network returning shape (n,)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(d_out=1, seed=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[:, 0]


class ZeroLogit(nn.Module):
    """The two-logit network (0, z) of a one-logit network z: the softmax twin of a Bernoulli model."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.inner(x).reshape(x.shape[0], 1)
        return torch.cat([torch.zeros_like(z), z], 1)


def func_jacobian(model: nn.Module, X: torch.Tensor, names: list[str]) -> torch.Tensor:
    """J(X) (n, c, p) by torch.func.jacrev over the flattened selected weights, in eval mode."""
    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    sizes = [params[k].numel() for k in names]

    def f(flat: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(flat, sizes)
        new = dict(params, **{k: c.reshape(params[k].shape) for k, c in zip(names, chunks)})
        return functional_call(model, new, (X,)).reshape(X.shape[0], -1)

    return jacrev(f)(torch.cat([params[k].reshape(-1) for k in names]))


def weight_space_laplace(model, names, X, Y, Xs, d, mu=None):
    """MAP δ*, test logits' mean (m, c) and blocks (m, c, c), evidence; prior δ ~ N(μ, diag d), Y (n, c) 0/1."""
    J, Js = func_jacobian(model, X, names), func_jacobian(model, Xs, names)
    n, c, p = J.shape
    with torch.no_grad():
        f0, fs0 = model(X).reshape(n, c).double(), model(Xs).reshape(-1, c).double()
    mu = torch.zeros(p, dtype=torch.float64) if mu is None else mu
    assert d.dtype == torch.float64  # (a float32 0.8 is another prior variance)
    Jm, Jsm = J.reshape(n * c, p), Js.reshape(-1, p)

    def parts(delta):
        F = f0 + (Jm @ delta).reshape(n, c)
        loglik = float((Y * F - torch.log1p(torch.exp(-F.abs())) - F.clamp_min(0)).sum())  # y f − log(1 + e^f)
        p1 = torch.sigmoid(F)
        grad = -Jm.T @ (Y - p1).reshape(-1) + (delta - mu) / d
        H = Jm.T @ ((p1 * (1 - p1)).reshape(-1, 1) * Jm) + torch.diag(1 / d)
        return loglik - 0.5 * float(((delta - mu) ** 2 / d).sum()), grad, H, loglik

    delta = mu.clone()
    for _ in range(100):
        obj, grad, H, _ = parts(delta)
        if float(grad.norm()) < 1e-12:
            break
        step, t = torch.linalg.solve(H, grad), 1.0
        while parts(delta - t * step)[0] < obj - 1e-12 and t > 1e-8:
            t /= 2
        delta = delta - t * step
    obj, grad, H, loglik = parts(delta)
    assert float(grad.norm()) < 1e-10
    root = d.sqrt()
    M = root[:, None] * (H - torch.diag(1 / d)) * root[None, :] + torch.eye(p, dtype=torch.float64)
    evidence = obj - 0.5 * float(torch.linalg.slogdet(M)[1])
    m = Xs.shape[0]
    mean = fs0 + (Jsm @ delta).reshape(m, c)
    cov = (Jsm @ torch.linalg.solve(H, Jsm.T)).reshape(m, c, m, c).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    return delta, mean, cov, evidence, loglik


def rel_err(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def binary_data(kind: str, n: int = 14, seed: int = 5):
    """(model, X, raw targets, the 0/1 matrix Y (n, c)) for ``kind`` bernoulli (a (n,)-output network) or
    multilabel (three outputs); the targets disagree with the network in places so the MAP moves."""
    X = inputs_for("mlp", n, seed=seed)
    g = torch.Generator().manual_seed(seed)
    if kind == "bernoulli":
        model = Squeezed().double()
        y = (X[:, 0] + 0.5 * torch.randn(n, generator=g, dtype=torch.float64) > 0).long()
        return model, X, y, y.reshape(n, 1).double()
    model = mlp(d_out=3, seed=3)
    Y = (X[:, :3] + 0.5 * torch.randn(n, 3, generator=g, dtype=torch.float64) > 0).long()
    return model, X, Y, Y.double()


@pytest.mark.parametrize("space,solver", PATHS)
@pytest.mark.parametrize("kind", ["bernoulli", "multilabel"])
def test_every_path_equals_the_weight_space_reference(kind, space, solver):
    model, X, y, Y = binary_data(kind)
    Xs = inputs_for("mlp", 4, seed=8)
    s2 = 0.8
    clf = la.LinearizedClassifier(model, prior_var=s2, optimize_hyperparameters=False, space=space, solver=solver)
    clf.fit(X, y)
    assert clf.likelihood_.name == kind and (clf.space_, clf.solver_) == (space, solver)
    names = list(clf.linearization_.param_names)
    p = clf.linearization_.num_params
    delta, mean, cov, evidence, _ = weight_space_laplace(
        model, names, X, Y, Xs, torch.full((p,), s2, dtype=torch.float64)
    )
    assert clf.posterior_.newton.converged
    m, C = clf.predict_logits(Xs)
    c = Y.shape[1]
    assert m.shape == (4, c) and C.shape == (4, c, c)
    assert rel_err(clf.posterior_.delta, delta) < 1e-8
    assert rel_err(m, mean) < 1e-8 and rel_err(C, cov) < 1e-8
    if solver == "cholesky" or clf.posterior_.system.dim <= 64:
        assert clf.log_marginal_likelihood_value_ == pytest.approx(evidence, rel=1e-9, abs=1e-9)
    else:  # stochastic Lanczos log-determinant: an estimate
        assert clf.log_marginal_likelihood_value_ == pytest.approx(evidence, rel=0.1)


@pytest.mark.parametrize("kind", ["bernoulli", "multilabel"])
def test_zero_prior_mean_and_function_parameter_agreement(kind):
    model, X, y, Y = binary_data(kind, seed=6)
    Xs = inputs_for("mlp", 3, seed=9)
    fits = [
        la.LinearizedClassifier(
            model, prior_var=2.0, optimize_hyperparameters=False, prior_mean="zero", space=s, solver="cholesky"
        ).fit(X, y)
        for s in ("function", "parameter")
    ]
    lin = fits[0].linearization_
    names = list(lin.param_names)
    ref = weight_space_laplace(
        model, names, X, Y, Xs, torch.full((lin.num_params,), 2.0, dtype=torch.float64), -lin.theta_vector()
    )
    for clf in fits:
        assert rel_err(clf.posterior_.delta, ref[0]) < 1e-8
        assert clf.log_marginal_likelihood_value_ == pytest.approx(ref[3], rel=1e-9)
    np.testing.assert_allclose(fits[0].predict_proba(Xs), fits[1].predict_proba(Xs), rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["bernoulli", "multilabel"])
def test_prior_var_maximises_the_evidence(kind):
    model, X, y, Y = binary_data(kind, n=20, seed=7)
    clf = la.LinearizedClassifier(model, params="last", prior_var=1.0).fit(X, y)
    best = clf.log_marginal_likelihood_value_
    names, p = list(clf.linearization_.param_names), clf.linearization_.num_params
    assert best == pytest.approx(
        weight_space_laplace(model, names, X, Y, X[:1], torch.full((p,), clf.prior_var_, dtype=torch.float64))[3]
    )
    for factor in (0.5, 0.8, 1.25, 2.0, 1e-3, 1e3):
        assert clf.log_marginal_likelihood(clf.prior_var_ * factor) <= best + 1e-9


def test_laplace_problem_takes_the_likelihood_directly_and_warm_starts():
    model, X, y, Y = binary_data("multilabel")
    lin = Linearization(model, "all")
    pr = LaplaceProblem(lin, X, y, "network", SolverOptions(), likelihood=Multilabel())
    torch.testing.assert_close(pr.Y, Y)
    post = optimize_prior_var(pr, 1.0, "function", "cholesky")
    again = LaplacePosterior(pr, post.s2, "parameter", "cholesky")
    assert post.log_evidence == pytest.approx(again.log_evidence, rel=1e-10)
    with pytest.raises(ValueError, match="contains 2"):
        LaplaceProblem(lin, X, 2 * y, "network", SolverOptions(), likelihood=Multilabel())


def test_bernoulli_equals_the_softmax_twin_with_a_zero_logit():
    # log p(y | f) = log softmax([0, f])_y and the zero logit has no Jacobian: MAP, covariance, evidence and the
    # probit / map probabilities of the Bernoulli fit are those of the categorical fit of the twin network
    model, X, y, _ = binary_data("bernoulli", n=16, seed=11)
    Xs = inputs_for("mlp", 5, seed=12)
    ber = la.LinearizedClassifier(model).fit(X, y)
    cat = la.LinearizedClassifier(ZeroLogit(model)).fit(X, y)
    assert ber.likelihood_.name == "bernoulli" and cat.likelihood_.name == "categorical"
    assert ber.prior_var_ == pytest.approx(cat.prior_var_, rel=1e-8)
    assert ber.log_marginal_likelihood_value_ == pytest.approx(cat.log_marginal_likelihood_value_, rel=1e-9)
    np.testing.assert_allclose(ber.posterior_.delta, cat.posterior_.delta, rtol=1e-7, atol=1e-9)
    m, C = ber.predict_logits(Xs)
    m2, C2 = cat.predict_logits(Xs)
    np.testing.assert_allclose(m[:, 0], m2[:, 1], atol=1e-8)
    np.testing.assert_allclose(C[:, 0, 0], C2[:, 1, 1], atol=1e-8)
    for link in ("probit", "map"):
        a = ber.set_params(link=link).predict_proba(Xs)
        np.testing.assert_allclose(a, cat.set_params(link=link).predict_proba(Xs), atol=1e-8)
    # and the probit readout is σ(κ μ), κ = 1/√(1 + π v / 8), close to the exact E[σ(f)] (Monte Carlo)
    kappa = 1 / np.sqrt(1 + math.pi * C[:, 0, 0] / 8)
    np.testing.assert_allclose(
        ber.set_params(link="probit").predict_proba(Xs)[:, 1], 1 / (1 + np.exp(-kappa * m[:, 0]))
    )
    mc = ber.set_params(link="mc", n_samples=100_000).predict_proba(Xs)
    np.testing.assert_allclose(mc, ber.set_params(link="probit").predict_proba(Xs), atol=2e-2)


@pytest.mark.parametrize("kind", ["bernoulli", "multilabel"])
def test_leave_one_out_choice_against_an_explicit_cavity(kind):
    model, X, y, Y = binary_data(kind, n=16, seed=13)
    clf = la.LinearizedClassifier(model, link="auto", prior_var=2.0, optimize_hyperparameters=False).fit(X, y)
    assert set(clf.loo_nll_) == {"probit", "map"} and clf.link_ == min(clf.loo_nll_, key=clf.loo_nll_.get)
    names = list(clf.linearization_.param_names)
    J = func_jacobian(model, X, names)
    n, c, p = J.shape
    delta = weight_space_laplace(model, names, X, Y, X[:1], torch.full((p,), 2.0, dtype=torch.float64))[0]
    with torch.no_grad():
        f0 = model(X).reshape(n, c).double()
    fhat = f0 + torch.einsum("iap,p->ia", J, delta)
    w, g = torch.sigmoid(fhat) * torch.sigmoid(-fhat), Y - torch.sigmoid(fhat)
    H = torch.einsum("iap,ia,iaq->pq", J, w, J) + torch.eye(p, dtype=torch.float64) / 2.0
    mu_loo, cav = torch.empty_like(fhat), torch.empty(n, c, c, dtype=torch.float64)
    for i in range(n):  # remove site i (precision diag wᵢ, gradient gᵢ at the MAP) from the weight posterior
        P = H - J[i].T @ (w[i, :, None] * J[i])
        eta = H @ delta - J[i].T @ (w[i] * fhat[i] + g[i] - w[i] * f0[i])
        mu_loo[i], cav[i] = f0[i] + J[i] @ torch.linalg.solve(P, eta), J[i] @ torch.linalg.solve(P, J[i].T)
    mean, cov = clf.predict_logits(X)
    mu_c, cav_c = cavity(torch.as_tensor(mean), torch.as_tensor(cov), clf._train_data[1], clf.likelihood_)
    assert rel_err(mu_c, mu_loo) < 1e-7 and rel_err(cav_c, cav) < 1e-7
    var = torch.diagonal(cav, dim1=1, dim2=2)
    for link, t in (("probit", mu_loo / torch.sqrt(1 + math.pi * var / 8)), ("map", mu_loo)):
        want = -float(
            (Y * torch.nn.functional.logsigmoid(t) + (1 - Y) * torch.nn.functional.logsigmoid(-t)).sum(1).mean()
        )
        assert clf.loo_nll_[link] == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("kind", ["bernoulli", "multilabel"])
def test_grouped_prior_equals_the_weight_space_reference(kind):
    model, X, y, Y = binary_data(kind, n=12, seed=14)
    scales = {"0": 2.0, "2": 0.05, "4": 0.7}
    clf = la.LinearizedClassifier(model, prior_groups="layers", optimize_hyperparameters=False).fit(X, y)
    clf._fit(X, y, {f"net.{k}" if kind == "bernoulli" else k: v for k, v in scales.items()})
    lin = clf.linearization_
    d = torch.cat(
        [
            torch.full((k,), scales[name.split(".")[-2]], dtype=torch.float64)
            for name, k in zip(lin.param_names, lin.numels)
        ]
    ).double()
    Xs = inputs_for("mlp", 4, seed=15)
    delta, mean, cov, evidence, _ = weight_space_laplace(model, list(lin.param_names), X, Y, Xs, d)
    m, C = clf.predict_logits(Xs)
    # 1e-7: Newton stops on the function-space decrement (here ~1e-16), and with prior precisions up to 1/0.05 the
    # weights δ* = μ + D Jᵀa it implies carry a weight-space gradient of ~1e-8 (the same as for the categorical)
    assert rel_err(clf.posterior_.delta, delta) < 1e-7 and rel_err(m, mean) < 1e-7 and rel_err(C, cov) < 1e-8
    assert clf.log_marginal_likelihood_value_ == pytest.approx(evidence, rel=1e-9)
    learned = la.LinearizedClassifier(model, prior_groups=["*4.*"]).fit(X, y)
    iso = la.LinearizedClassifier(model).fit(X, y)
    assert learned.log_marginal_likelihood_value_ >= iso.log_marginal_likelihood_value_ - 1e-6
    assert learned.predict_proba(Xs).shape == ((4, 2) if kind == "bernoulli" else (4, 3))


def test_cavity_of_a_scalar_site_is_the_precision_difference():
    # one output: 1/v₋ᵢ = 1/vᵢ − wᵢ and μ₋ᵢ = μᵢ − v₋ᵢ gᵢ
    mean = torch.tensor([[0.4], [-1.2], [2.0]], dtype=torch.float64)
    var = torch.tensor([0.3, 0.05, 1.5], dtype=torch.float64)
    y = torch.tensor([1, 0, 0])
    mu, cav = cavity(mean, var.reshape(3, 1, 1), y, Bernoulli())
    p = torch.sigmoid(mean[:, 0])
    v = 1 / (1 / var - p * (1 - p))
    torch.testing.assert_close(cav[:, 0, 0], v)
    torch.testing.assert_close(mu[:, 0], mean[:, 0] - v * (y - p))
