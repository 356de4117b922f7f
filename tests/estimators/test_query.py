"""``query``: greedy joint choice of the pool points to label next (regressor and classifier)."""

import numpy as np
import pytest
import torch

import linadapt as la
from linadapt._memory import MemoryBudgetError
from linadapt.inference.acquisition import PoolCovariance, bald_score


def _net(c: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, c)).double()


def _data(n: int = 25, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _regressor(c: int = 1, space: str = "function", noise=0.05, **kw) -> la.LinearizedRegressor:
    X = _data()
    y = torch.sin(X[:, :c] * 2) if c > 1 else torch.sin(2 * X[:, 0])
    return la.LinearizedRegressor(
        _net(c), prior_var=0.5, noise_var=noise, optimize_hyperparameters=False, space=space, **kw
    ).fit(X, y)


def _clustered_pool() -> torch.Tensor:
    """Five tight clusters of 12 near-duplicates each, plus 20 scattered points."""
    g = torch.Generator().manual_seed(3)
    centres = 3.0 * torch.randn(5, 2, generator=g, dtype=torch.float64)
    tight = centres.repeat_interleave(12, 0) + 1e-3 * torch.randn(60, 2, generator=g, dtype=torch.float64)
    return torch.cat([tight, 2.0 * torch.randn(20, 2, generator=g, dtype=torch.float64)])


def _left_over(reg: la.LinearizedRegressor, pool: torch.Tensor, picks: np.ndarray) -> float:
    """tr(Σ − Σ_{·P} (Σ_PP + σ² I)⁻¹ Σ_{P·}) on the pool, from the dense predictive covariance (one output)."""
    _, S = reg.predict(pool.numpy(), return_cov=True, include_noise=False)
    S = torch.as_tensor(S)
    P = torch.as_tensor(picks)
    A = S[P][:, P] + reg.noise_var_ * torch.eye(len(P), dtype=S.dtype)
    return float(torch.trace(S - S[:, P] @ torch.linalg.solve(A, S[P])))


@pytest.mark.parametrize(("c", "noise", "space"), [(1, 0.05, "function"), (2, [0.05, 0.2], "parameter")])
def test_conditioning_equals_refit_with_the_picks(c, noise, space):
    reg = _regressor(c, space, noise)
    pool = _data(30, seed=7)
    sel = reg._query(pool, 6, dense=True)
    assert len(set(sel.indices.tolist())) == 6
    X, y = reg._train_data
    Xa = torch.cat([X, pool[sel.indices]])
    ya = torch.cat([y, torch.zeros(6, *y.shape[1:], dtype=y.dtype)])  # the labels do not matter
    refit = la.LinearizedRegressor(
        reg.model, prior_var=0.5, noise_var=noise, optimize_hyperparameters=False, space=space
    ).fit(Xa, ya)
    _, cov = refit.predict(pool, return_cov=True, include_noise=False)
    expected = torch.as_tensor(cov).reshape(30 * c, 30 * c)
    torch.testing.assert_close(sel.cov, expected, atol=1e-8, rtol=0)


def test_first_pick_is_the_most_uncertain_and_scores_decrease():
    reg = _regressor(2, noise=[0.05, 0.2])
    pool = _data(40, seed=5)
    idx, scores = reg.query(pool, 5, return_scores=True)
    _, std = reg.predict(pool, return_std=True)
    assert idx[0] == int(np.argmax((std**2).sum(1)))
    assert np.all(np.diff(scores) <= 1e-12)


def test_greedy_leaves_less_variance_than_independent_or_random_picks():
    reg = _regressor()
    pool = _clustered_pool()
    k = 5
    picks = reg.query(pool, k)
    _, std = reg.predict(pool.numpy(), return_std=True, include_noise=False)
    top = np.argsort(-std)[:k]
    greedy = _left_over(reg, pool, picks)
    assert greedy < _left_over(reg, pool, top)
    rng = np.random.default_rng(0)
    for _ in range(10):
        assert greedy < _left_over(reg, pool, rng.choice(pool.shape[0], k, replace=False))
    # the picks spread over the clusters: at most one per cluster of near-duplicates
    clusters = [int(i) // 12 for i in picks if i < 60]
    assert len(clusters) == len(set(clusters))


@pytest.mark.parametrize("kind", ["regressor", "classifier"])
def test_exact_duplicates_are_never_picked_twice(kind):
    base = _data(6, seed=9)
    pool = base.repeat(4, 1)  # every input four times
    if kind == "regressor":
        est = _regressor(noise=5.0)  # a noisy label leaves much variance at the point itself
    else:
        est = la.LinearizedClassifier(_net(3), prior_var=1.0, optimize_hyperparameters=False, link="probit")
        est.fit(_data(), torch.arange(25) % 3)
    picks = est.query(pool, 6)
    assert len(set(picks.tolist())) == 6
    assert len({tuple(pool[i].tolist()) for i in picks}) == 6
    with pytest.raises(ValueError, match="distinct inputs"):
        est.query(pool, 7)


@pytest.mark.parametrize("k", [0, -1, 31, 2.5, True])
def test_k_must_be_within_the_pool(k):
    with pytest.raises(ValueError):
        _regressor().query(_data(30, seed=4), k)


def _classifier(likelihood: str, **kw) -> la.LinearizedClassifier:
    X = _data(30)
    c, y = {
        "categorical": (3, torch.arange(30) % 3),
        "bernoulli": (1, torch.arange(30) % 2),
        "multilabel": (2, torch.stack([torch.arange(30) % 2, (torch.arange(30) // 3) % 2], 1)),
    }[likelihood]
    return la.LinearizedClassifier(
        _net(c), likelihood=likelihood, link="probit", prior_var=2.0, optimize_hyperparameters=False, **kw
    ).fit(X, y)


@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli", "multilabel"])
def test_classifier_first_pick_is_the_max_bald(likelihood):
    clf = _classifier(likelihood)
    pool = _data(50, seed=11)
    idx, scores = clf.query(pool, 4, return_scores=True)
    mean, cov = clf.predict_logits(pool)
    bald = bald_score(torch.as_tensor(mean), torch.as_tensor(cov), likelihood == "categorical", 256, clf.seed)
    assert idx[0] == int(torch.argmax(bald))
    assert scores[0] == pytest.approx(float(bald.max()), rel=1e-10)
    assert len(set(idx.tolist())) == 4


def _small_chunks(monkeypatch):
    monkeypatch.setattr(PoolCovariance, "chunk_size", lambda self, k: 7)


@pytest.mark.parametrize(
    "make",
    [
        lambda: _regressor(1, "function"),
        lambda: _regressor(2, "parameter", [0.05, 0.2]),
        lambda: _regressor(2, "function", [0.05, 0.2]),
        lambda: _regressor(1, "function", prior_groups="layers"),
        lambda: _classifier("categorical", space="function"),
        lambda: _classifier("categorical", space="parameter"),
        lambda: _classifier("bernoulli"),
        lambda: _classifier("multilabel"),
        lambda: _classifier("categorical", prior_groups="layers"),
    ],
    ids=["reg", "reg-param-2out", "reg-per-output", "reg-groups", "cat-fn", "cat-param", "bern", "multi", "cat-groups"],
)
def test_chunked_path_equals_dense_path(make, monkeypatch):
    est = make()
    pool = _data(40, seed=13)
    dense = est._query(pool, 5, dense=True)
    _small_chunks(monkeypatch)
    chunked = est._query(pool, 5, dense=False, return_blocks=True)
    np.testing.assert_array_equal(dense.indices, chunked.indices)
    np.testing.assert_allclose(dense.scores, chunked.scores, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(chunked.blocks, dense.blocks, atol=1e-10, rtol=1e-8)


def test_auto_path_and_memory_budget(monkeypatch):
    reg = _regressor()
    pool = _data(30, seed=2)
    assert reg._query(pool, 3).dense  # a small pool: dense
    reg.memory_budget = 40_000  # too small for the dense covariance, enough for chunks
    sel = reg._query(pool, 3)
    assert not sel.dense
    reg.memory_budget = "2GiB"
    np.testing.assert_array_equal(sel.indices, reg.query(pool, 3))
    reg.memory_budget = 500
    with pytest.raises(MemoryBudgetError):
        reg.query(pool, 3)
