"""gaussian_samples: moments, singular covariances (the jitter and eigendecomposition routes), determinism, and
the memory check."""

import pytest
import torch

from linadapt._memory import MemoryBudgetError
from linadapt.inference.sampling import _root, check_sample_memory, gaussian_samples, sample_count


def test_samples_have_the_given_mean_and_covariance():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 6, generator=g, dtype=torch.float64)
    cov = A @ A.T + 0.1 * torch.eye(6, dtype=torch.float64)
    mean = torch.randn(3, 2, generator=g, dtype=torch.float64)
    draws = gaussian_samples(mean, cov, 40000, torch.Generator().manual_seed(1))
    assert draws.shape == (40000, 3, 2) and draws.dtype == torch.float64
    flat = draws.reshape(40000, 6)
    scale = cov.diagonal().max()
    torch.testing.assert_close(flat.mean(0), mean.reshape(6), rtol=0, atol=float(5 * scale.sqrt() / 200))
    torch.testing.assert_close(torch.cov(flat.T), cov, rtol=0, atol=float(0.05 * scale))


@pytest.mark.parametrize("rank", [1, 3])
def test_a_singular_covariance_still_gives_a_root(rank):
    g = torch.Generator().manual_seed(2)
    B = torch.randn(5, rank, generator=g, dtype=torch.float64)
    cov = B @ B.T  # rank-deficient: plain Cholesky fails, jitter (or the eigendecomposition) succeeds
    L = _root(cov)
    torch.testing.assert_close(L @ L.T, cov, rtol=0, atol=1e-5 * float(cov.diagonal().mean()))
    negative = cov - 1e-3 * torch.eye(5, dtype=torch.float64)  # indefinite past every jitter: eigenvalues clamped
    L = _root(negative)
    assert bool(torch.isfinite(L).all())


def test_the_same_generator_state_gives_the_same_samples():
    mean, cov = torch.zeros(2, 1, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    a = gaussian_samples(mean, cov, 5, torch.Generator().manual_seed(3))
    b = gaussian_samples(mean, cov, 5, torch.Generator().manual_seed(3))
    c = gaussian_samples(mean, cov, 5, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_memory_check_and_sample_count():
    check_sample_memory(10, 2, 5, 10**6)
    with pytest.raises(MemoryBudgetError, match="Cholesky factor"):
        check_sample_memory(1000, 10, 5, 10**6)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="n_samples"):
            sample_count(bad)
