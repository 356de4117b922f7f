"""The contract every registered likelihood must meet, checked against autograd (parametrized over the registry).

A new likelihood in :data:`linadapt.likelihoods.LIKELIHOODS` runs these tests once it has an entry in ``TARGETS``
(its number of outputs and how to draw its raw targets; a registered likelihood without one fails
``test_every_registered_likelihood_has_targets``); its class must be constructible with default arguments.
"""

import pytest
import torch

from linadapt.likelihoods import LIKELIHOODS, Curvature, Gaussian, Likelihood

N, C, K = 5, 4, 3

INSTANCES = {name: cls() for name, cls in LIKELIHOODS.items()}
INSTANCES["gaussian-noise-0.3"] = Gaussian(0.3)

# name -> (outputs c, raw targets for n examples from a generator g)
TARGETS = {
    "categorical": (C, lambda n, c, g: torch.randint(0, c, (n,), generator=g)),
    "bernoulli": (1, lambda n, c, g: torch.randint(0, 2, (n,), generator=g)),
    "multilabel": (C, lambda n, c, g: torch.randint(0, 2, (n, c), generator=g)),
    "gaussian": (C, lambda n, c, g: torch.randn(n, c, generator=g, dtype=torch.float64)),
}


@pytest.fixture(params=sorted(INSTANCES))
def lik(request) -> Likelihood:
    return INSTANCES[request.param]


def outputs(lik):
    return TARGETS[lik.name][0]


def raw_targets(lik, n, c, seed=0):
    return TARGETS[lik.name][1](n, c, torch.Generator().manual_seed(seed))


def logits(n=N, c=C, seed=1, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, c, generator=g, dtype=torch.float64)


def test_every_registered_likelihood_has_targets():
    assert set(LIKELIHOODS) <= set(TARGETS)


def test_registry_holds_likelihoods():
    assert {"bernoulli", "categorical", "gaussian", "multilabel"} <= set(LIKELIHOODS)
    for name, cls in LIKELIHOODS.items():
        lik = cls()
        assert isinstance(lik, Likelihood) and lik.name == name
        assert lik.links and set(lik.auto_links) <= set(lik.links)


def test_encode_targets_shape_and_dtype(lik):
    C = outputs(lik)
    lik.check_outputs(C)
    Y = lik.encode_targets(raw_targets(lik, N, C), C)
    assert Y.shape == (N, C) and Y.dtype == torch.float64
    if lik.classification and not lik.multilabel and C > 1:  # one-hot rows
        torch.testing.assert_close(Y.sum(1), torch.ones(N, dtype=torch.float64), rtol=0, atol=0)
    if lik.classification:
        assert set(Y.unique().tolist()) <= {0.0, 1.0}


def test_gradient_is_the_autograd_gradient_of_the_log_likelihood(lik):
    C = outputs(lik)
    Y = lik.encode_targets(raw_targets(lik, N, C), C)
    F = logits(c=C).requires_grad_(True)
    terms = lik.log_prob(F, Y)
    assert terms.shape == (N,)
    assert lik.log_likelihood(F.detach(), Y) == pytest.approx(float(terms.detach().sum()), rel=1e-14, abs=1e-14)
    (auto,) = torch.autograd.grad(terms.sum(), F)
    grad = lik.gradient(F.detach(), Y)
    assert grad.shape == (N, C)
    torch.testing.assert_close(grad, auto, rtol=1e-12, atol=1e-12)


def test_curvature_blocks_are_the_negative_autograd_hessian(lik):
    C = outputs(lik)
    Y = lik.encode_targets(raw_targets(lik, N, C), C)
    F = logits(c=C)
    H = torch.autograd.functional.hessian(lambda f: lik.log_prob(f, Y).sum(), F)  # (n, c, n, c)
    curv = lik.curvature(F)
    assert isinstance(curv, Curvature) and (curv.n, curv.c) == (N, C)
    blocks = curv.blocks()
    assert blocks.shape == (N, C, C)
    for i in range(N):
        torch.testing.assert_close(blocks[i], -H[i, :, i, :], rtol=1e-12, atol=1e-12)
        for j in range(N):  # the log-likelihood factorizes over examples: no cross-example curvature
            if j != i:
                assert float(H[i, :, j, :].abs().max()) == 0.0
    assert float(torch.linalg.eigvalsh(blocks).min()) > -1e-12  # PSD


def test_root_products_and_factorization(lik):
    C = outputs(lik)
    curv = lik.curvature(logits(c=C, seed=4))
    blocks = curv.blocks()
    g = torch.Generator().manual_seed(5)
    V = torch.randn(N, C, K, generator=g, dtype=torch.float64)
    eye = torch.eye(C, dtype=torch.float64).expand(N, C, C).contiguous()
    R = curv.root(eye)  # the blocks Rᵢ
    assert R.shape == (N, C, C)
    torch.testing.assert_close(R @ R.transpose(1, 2), blocks, rtol=1e-12, atol=1e-12)  # R Rᵀ = Λ
    for out, ref in ((curv.lam(V), blocks @ V), (curv.root(V), R @ V), (curv.root_t(V), R.transpose(1, 2) @ V)):
        assert out.shape == (N, C, K)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    sub = curv.rows(slice(1, 4))
    assert (sub.n, sub.c) == (3, C)
    torch.testing.assert_close(sub.blocks(), blocks[1:4], rtol=0, atol=0)
    torch.testing.assert_close(sub.root_t(V[1:4]), curv.root_t(V)[1:4], rtol=0, atol=0)


def test_mean_and_predictive(lik):
    C = outputs(lik)
    F = logits(c=C, seed=6)
    mean = lik.mean(F)
    assert mean.shape == (N, C)
    g = torch.Generator().manual_seed(7)
    A = torch.randn(N, C, C, generator=g, dtype=torch.float64)
    cov = A @ A.transpose(1, 2) + 1e-3 * torch.eye(C, dtype=torch.float64)
    Y = lik.encode_targets(raw_targets(lik, N, C, seed=8), C)
    for link in lik.links:
        pred = lik.predictive(F, cov, link, n_samples=64, seed=0)
        if lik.classification:  # class probabilities (bernoulli: both classes), or multilabel marginals
            assert pred.shape == (N, C + 1 if lik.name == "bernoulli" else C)
            assert bool((pred >= 0).all()) and bool((pred <= 1).all())
            if not lik.multilabel:
                torch.testing.assert_close(pred.sum(1), torch.ones(N, dtype=torch.float64))
        logp = lik.log_predictive(F, cov, Y, link, n_samples=64, seed=0)
        assert logp.shape == (N,) and bool(torch.isfinite(logp).all())
    if lik.classification:  # the mean-only readout is E[y | f] at the mean
        zero = torch.zeros(N, C, C, dtype=torch.float64)
        torch.testing.assert_close(lik.predictive(F, zero, lik.links[0])[:, -C:], mean)  # bernoulli: P(y = 1)
    with pytest.raises(ValueError, match="link"):
        lik.predictive(F, cov, "no-such-link")


def test_gaussian_predictive_is_the_latent_variance_plus_noise():
    lik = Gaussian(0.3)
    F = logits()
    cov = torch.diag_embed(torch.rand(N, C, dtype=torch.float64))
    mean, var = lik.predictive(F, cov, "gaussian")
    torch.testing.assert_close(mean, F)
    torch.testing.assert_close(var, torch.diagonal(cov, dim1=1, dim2=2) + 0.3)
    torch.testing.assert_close(lik.predictive(F, None, "map")[1], torch.full((N, C), 0.3, dtype=torch.float64))
    with pytest.raises(ValueError, match="link must be one of"):
        lik.predictive(F, cov, "probit")
    with pytest.raises(ValueError, match="noise_var"):
        Gaussian(0.0)
    with pytest.raises(ValueError, match="outputs per example"):
        lik.encode_targets(torch.zeros(N, 2, dtype=torch.float64), C)


def test_likelihoods_layer_imports_no_upper_layer():
    import ast
    import pathlib

    import linadapt.likelihoods as pkg

    for path in pathlib.Path(pkg.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert not name.startswith(("linadapt.inference", "linadapt.estimators")), (path.name, name)
