"""NTKKernel inside BoTorch: a SingleTaskGP fits with fit_gpytorch_mll, its posterior over (b, q, d) candidates
matches GPyTorch's exact formulas, and optimize_acqf moves candidates by the kernel's input gradients."""

import warnings

import pytest
import torch

pytest.importorskip("botorch")

from botorch.acquisition import LogExpectedImprovement
from botorch.fit import fit_gpytorch_mll
from botorch.models import SingleTaskGP
from botorch.optim import optimize_acqf
from gpytorch.kernels import ScaleKernel
from gpytorch.mlls import ExactMarginalLogLikelihood
from models import mlp

import linadapt as la


def _model():
    g = torch.Generator().manual_seed(0)
    X = torch.rand(8, 3, generator=g, dtype=torch.float64)
    Y = torch.sin(3 * X).sum(-1, keepdim=True)
    net = mlp(d_in=3, d_out=2)
    model = SingleTaskGP(X, Y, train_Yvar=torch.full_like(Y, 1e-4), covar_module=ScaleKernel(la.NTKKernel(net)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
    return model, X, Y, net


def test_single_task_gp_posterior_over_candidate_batches():
    model, X, _, net = _model()
    cand = torch.rand(5, 2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    post = model.posterior(cand)
    assert post.mean.shape == (5, 2, 1) and post.variance.shape == (5, 2, 1)
    # the exact GP formulas on the standardized targets, from a dense kernel built here
    lin = la.Linearization(net)
    s2 = float(model.covar_module.outputscale)
    train_Y = model.train_targets  # standardized
    noise = model.likelihood.noise.detach()
    Knn = s2 * lin.ntk(X, output="sum") + torch.diag(noise)
    mean0 = float(model.mean_module.constant)
    for b in range(5):
        Ksn = s2 * lin.ntk(cand[b], X, output="sum")
        Kss = s2 * lin.ntk(cand[b], output="sum")
        m = mean0 + Ksn @ torch.linalg.solve(Knn, train_Y - mean0)
        cov = Kss - Ksn @ torch.linalg.solve(Knn, Ksn.T)
        std, mu = model.outcome_transform.stdvs.squeeze(), model.outcome_transform.means.squeeze()
        torch.testing.assert_close(post.mean[b, :, 0].detach(), mu + std * m, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(post.variance[b, :, 0].detach(), std**2 * torch.diagonal(cov), rtol=1e-4, atol=1e-7)


def test_optimize_acqf_uses_the_input_gradient():
    model, _, Y, _ = _model()
    acqf = LogExpectedImprovement(model, best_f=model.outcome_transform(Y)[0].max())
    x = torch.rand(3, 1, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64).requires_grad_(True)
    acqf(x).sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all()) and float(x.grad.abs().max()) > 0
    bounds = torch.stack([torch.zeros(3), torch.ones(3)]).double()
    cand, value = optimize_acqf(acqf, bounds=bounds, q=1, num_restarts=2, raw_samples=16, options={"maxiter": 20})
    assert cand.shape == (1, 3) and bool(((cand >= 0) & (cand <= 1)).all())
    with torch.no_grad():
        start = acqf(torch.rand(16, 1, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    assert float(value) >= float(start.max()) - 1e-6  # the optimiser improved on random candidates
