"""The maths of :mod:`linadapt.inference.acquisition` on explicit covariance matrices."""

import math

import numpy as np
import pytest
import torch

from linadapt.inference.acquisition import (
    bald_score,
    duplicate_groups,
    greedy_select,
    noise_roots,
    variance_score,
)
from linadapt.likelihoods.categorical import Categorical


class DensePool:
    """A pool given by its joint covariance (m·c, m·c): the interface greedy_select uses."""

    def __init__(self, S: torch.Tensor, c: int, chunk: int = 3) -> None:
        self.S, self.c, self.m, self.budget, self.chunk = S, c, S.shape[0] // c, 2**30, chunk

    def dense_bytes(self) -> int:
        return 8 * self.S.numel()

    def dense_fits(self) -> bool:
        return True

    def dense(self) -> torch.Tensor:
        return self.S.clone()

    def blocks(self) -> torch.Tensor:
        m, c = self.m, self.c
        return torch.diagonal(self.S.reshape(m, c, m, c), dim1=0, dim2=2).permute(2, 0, 1).clone()

    def chunk_size(self, k: int) -> int:
        return self.chunk

    def cross(self, picks, size):
        c = self.c
        cols = torch.cat([torch.arange(j * c, (j + 1) * c) for j in picks.tolist()])

        def chunks():
            for start in range(0, self.m, size):
                sl = slice(start, min(self.m, start + size))
                yield sl, self.S[sl.start * c : sl.stop * c][:, cols]

        return self.S[cols][:, cols], chunks()


def _spd(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n // 2, generator=g, dtype=torch.float64)
    return A @ A.T + 0.01 * torch.eye(n, dtype=torch.float64)


def test_sequential_updates_equal_the_joint_schur_complement():
    m, c, k = 12, 3, 4
    S = _spd(m * c)
    logits = torch.randn(m, c, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    roots = Categorical().curvature(logits).root(torch.eye(c, dtype=torch.float64).expand(m, c, c).contiguous())
    sel = greedy_select(DensePool(S, c), k, variance_score, roots, dense=True)
    cols = torch.cat([torch.arange(j * c, (j + 1) * c) for j in sel.indices.tolist()])
    RP = torch.block_diag(*roots[torch.as_tensor(sel.indices)])
    lam = RP @ RP.T  # singular (softmax ignores a common shift): the root form needs no inverse of it
    expected = S - S[:, cols] @ RP @ torch.linalg.solve(torch.eye(k * c) + RP.T @ S[cols][:, cols] @ RP, RP.T @ S[cols])
    torch.testing.assert_close(sel.cov, expected, atol=1e-10, rtol=0)
    assert torch.linalg.matrix_rank(lam) < k * c


def test_chunked_equals_dense_on_an_explicit_covariance():
    m, c = 20, 2
    S = _spd(m * c, seed=2)
    roots = noise_roots([0.1, 0.4], m, c)
    dense = greedy_select(DensePool(S, c), 6, variance_score, roots, dense=True)
    chunked = greedy_select(DensePool(S, c, chunk=3), 6, variance_score, roots, dense=False, return_blocks=True)
    np.testing.assert_array_equal(dense.indices, chunked.indices)
    np.testing.assert_allclose(dense.scores, chunked.scores, rtol=1e-10)
    torch.testing.assert_close(dense.blocks, chunked.blocks, atol=1e-12, rtol=1e-10)


def test_regression_conditioning_is_gaussian_process_conditioning_on_noisy_labels():
    m = 10
    S = _spd(m, seed=3)
    sel = greedy_select(DensePool(S, 1), 3, variance_score, noise_roots(0.2, m, 1), dense=True)
    P = torch.as_tensor(sel.indices)
    expected = S - S[:, P] @ torch.linalg.solve(S[P][:, P] + 0.2 * torch.eye(3, dtype=S.dtype), S[P])
    torch.testing.assert_close(sel.cov, expected, atol=1e-12, rtol=0)
    assert sel.indices[0] == int(torch.argmax(torch.diagonal(S)))


def test_duplicates_share_a_group_and_are_skipped():
    X = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    groups = duplicate_groups(X)
    assert groups[0] == groups[2] and len(set(groups.tolist())) == 3
    S = torch.diag(torch.tensor([5.0, 1.0, 5.0, 2.0], dtype=torch.float64))  # 0 and 2: the same input
    sel = greedy_select(DensePool(S, 1), 3, variance_score, noise_roots(100.0, 4, 1), groups, dense=True)
    assert sel.indices.tolist() == [0, 3, 1]
    with pytest.raises(ValueError, match="distinct inputs"):
        greedy_select(DensePool(S, 1), 4, variance_score, noise_roots(1.0, 4, 1), groups, dense=True)


def _bernoulli_bald_quadrature(mu: float, var: float) -> float:
    x, w = np.polynomial.hermite_e.hermegauss(80)
    f = mu + math.sqrt(var) * x
    p = 1 / (1 + np.exp(-f))
    w = w / w.sum()

    def h(q):
        return -(q * np.log(q) + (1 - q) * np.log(1 - q))

    return float(h((w * p).sum()) - (w * h(p)).sum())


def test_bald_is_zero_without_uncertainty_and_matches_quadrature():
    mean = torch.tensor([[0.3], [-1.0], [2.0]], dtype=torch.float64)
    var = torch.tensor([0.0, 1.0, 4.0], dtype=torch.float64)
    score = bald_score(mean, var.reshape(3, 1, 1), categorical=False, n_samples=20000, seed=0)
    assert score[0] == pytest.approx(0.0, abs=1e-12)
    for i in (1, 2):
        assert float(score[i]) == pytest.approx(_bernoulli_bald_quadrature(float(mean[i, 0]), float(var[i])), rel=0.03)
    # categorical with two logits, one of them fixed, is the bernoulli of their difference
    two = torch.cat([mean, torch.zeros(3, 1, dtype=torch.float64)], 1)
    cov2 = torch.zeros(3, 2, 2, dtype=torch.float64)
    cov2[:, 0, 0] = var
    cat = bald_score(two, cov2, categorical=True, n_samples=20000, seed=0)
    for i in (1, 2):
        assert float(cat[i]) == pytest.approx(_bernoulli_bald_quadrature(float(mean[i, 0]), float(var[i])), rel=0.03)


def test_bald_is_seeded_and_non_negative():
    g = torch.Generator().manual_seed(4)
    mean = torch.randn(7, 4, generator=g, dtype=torch.float64)
    A = torch.randn(7, 4, 4, generator=g, dtype=torch.float64)
    cov = A @ A.transpose(1, 2)
    a = bald_score(mean, cov, True, 128, seed=3, chunk=3)
    torch.testing.assert_close(a, bald_score(mean, cov, True, 128, seed=3))
    assert bool((a >= 0).all())


def test_noise_roots_checks_its_values():
    R = noise_roots([0.25, 4.0], 3, 2)
    torch.testing.assert_close(R[1], torch.diag(torch.tensor([2.0, 0.5], dtype=torch.float64)))
    with pytest.raises(ValueError):
        noise_roots([1.0, 2.0, 3.0], 3, 2)
    with pytest.raises(ValueError):
        noise_roots(0.0, 3, 1)
