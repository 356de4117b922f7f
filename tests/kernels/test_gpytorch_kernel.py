"""NTKKernel as a GPyTorch kernel: GPyTorch's own kernel test case (batch shapes, diag, indexing, dtype, device,
pickling, active dims), broadcasting of BoTorch's shapes, and the gradient in the inputs against central
differences."""

import copy
import unittest

import pytest
import torch
from gpytorch.test.base_kernel_test_case import BaseKernelTestCase
from models import mlp
from torch import nn

import linadapt as la


class AnyWidth(nn.Module):
    """Each input feature through a small tanh layer, averaged over the features, then a linear head: a network
    that takes any number d of features, as GPyTorch's test case feeds a kernel 2, 4, 6 and 10 of them."""

    def __init__(self, width: int = 6, d_out: int = 1, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(1, width)
        self.head = nn.Linear(width, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.embed(x.unsqueeze(-1))).mean(-2)
        return self.head(h)


class TestNTKKernelGPyTorchContract(BaseKernelTestCase, unittest.TestCase):
    seed = 0

    def create_kernel_no_ard(self, **kwargs):
        return la.NTKKernel(AnyWidth(), **kwargs)

    def test_no_batch_kernel_double_batch_x_ard(self):
        self.skipTest("ARD does not apply: NTKKernel has no lengthscales")

    def test_smoke_double_batch_kernel_double_batch_x_ard(self):
        self.skipTest("ARD does not apply: NTKKernel has no lengthscales")


def test_ard_num_dims_is_refused():
    with pytest.raises(ValueError, match="ard_num_dims does not apply"):
        la.NTKKernel(AnyWidth(), ard_num_dims=3)


def _explicit(net, X1, X2, output="sum"):
    """J(X1) J(X2)ᵀ (trace or one output) from plain torch.func Jacobians, per pair of examples."""
    lin = la.Linearization(net)
    J1, J2 = lin.jacobian(X1), lin.jacobian(X2)  # (n, c, p)
    if output == "sum":
        return torch.einsum("icp,jcp->ij", J1, J2)
    return J1[:, output] @ J2[:, output].T


def test_botorch_shapes_broadcast_against_the_training_inputs():
    net = mlp(d_in=3, d_out=1)
    kernel = la.NTKKernel(net)
    g = torch.Generator().manual_seed(0)
    train = torch.randn(5, 3, generator=g, dtype=torch.float64)
    cand = torch.randn(4, 2, 3, generator=g, dtype=torch.float64)  # (b, q, d)
    K = kernel(cand, train).to_dense()
    assert K.shape == (4, 2, 5)
    for b in range(4):
        torch.testing.assert_close(K[b], _explicit(net, cand[b], train), rtol=1e-10, atol=1e-12)
    cand2 = torch.randn(3, 4, 2, 3, generator=g, dtype=torch.float64)  # (b1, b2, q, d)
    K2 = kernel(cand2, train).to_dense()
    assert K2.shape == (3, 4, 2, 5)
    torch.testing.assert_close(K2[2, 1], _explicit(net, cand2[2, 1], train), rtol=1e-10, atol=1e-12)
    # BoTorch's copies of the training inputs, one per candidate batch, are one set of Jacobians (compacted)
    K3 = kernel(cand, train.expand(4, 5, 3).clone()).to_dense()
    torch.testing.assert_close(K3, K, rtol=1e-12, atol=1e-14)
    diag = kernel(cand2, diag=True)
    assert diag.shape == (3, 4, 2)
    torch.testing.assert_close(diag[0, 3], torch.diagonal(_explicit(net, cand2[0, 3], cand2[0, 3])))
    # a kernel batch shape broadcasts with the inputs' batch shape
    batched = la.NTKKernel(net, batch_shape=torch.Size([2, 1]))
    assert batched(cand, train).to_dense().shape == (2, 4, 2, 5)


def test_unbatched_inputs_without_gradients_stay_a_lazy_operator():
    kernel = la.NTKKernel(mlp(d_in=3, d_out=1))
    X = torch.randn(6, 3, dtype=torch.float64)
    assert isinstance(kernel(X).evaluate_kernel(), la.NTKOperator)
    with pytest.raises(ValueError, match="last_dim_is_batch"):
        kernel.forward(X, X, last_dim_is_batch=True)


def test_copies_share_the_linearization_and_to_follows_dtype_and_device():
    kernel = la.NTKKernel(AnyWidth())
    assert copy.deepcopy(kernel).linearization is kernel.linearization
    assert kernel.device == torch.device("cpu")
    kernel.double()
    assert kernel.dtype == torch.float64
    kernel.to(torch.float32)
    assert kernel.dtype == torch.float32
    kernel.to("meta")  # another device: a new weight snapshot there (meta: no GPU needed to see it move)
    assert kernel.device == torch.device("meta") and kernel.linearization.theta["head.weight"].is_meta


def _central_differences(fn, x, eps=1e-6):
    grad = torch.zeros_like(x)
    flat = grad.view(-1)
    for i in range(x.numel()):
        e = torch.zeros_like(x).view(-1)
        e[i] = eps
        e = e.view_as(x)
        flat[i] = (fn(x + e) - fn(x - e)) / (2 * eps)
    return grad


@pytest.mark.parametrize("output", ["sum", 1])
def test_input_gradient_matches_central_differences(output):
    net = mlp(d_in=3, d_out=2)
    kernel = la.NTKKernel(net, output=output)
    g = torch.Generator().manual_seed(1)
    train = torch.randn(4, 3, generator=g, dtype=torch.float64)
    weights = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    cand = torch.randn(2, 3, 3, generator=g, dtype=torch.float64)  # (b, q, d)

    def objective(x):  # a weighted sum of cross-kernel, self-kernel and diagonal entries, all depending on x
        cross = (kernel(x, train).to_dense() * weights).sum()
        own = kernel(x).to_dense().pow(2).sum()
        return cross + own + kernel(x, diag=True).sum()

    x = cand.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(x), x)
    with torch.no_grad():
        expected = _central_differences(objective, cand)
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-8)
    # unbatched inputs that require grad take the same differentiable route
    x2 = cand[0].clone().requires_grad_(True)
    (g2,) = torch.autograd.grad((kernel(x2, train).to_dense() * weights[0]).sum(), x2)
    with torch.no_grad():
        e2 = _central_differences(lambda z: (kernel(z.unsqueeze(0), train).to_dense()[0] * weights[0]).sum(), cand[0])
    torch.testing.assert_close(g2, e2, rtol=1e-6, atol=1e-8)


def test_features_past_the_memory_budget_raise():
    from linadapt._memory import MemoryBudgetError

    kernel = la.NTKKernel(mlp(d_in=3, d_out=1))
    kernel.linearization.memory_budget = 1000
    with pytest.raises(MemoryBudgetError, match="NTK features"):
        kernel(torch.randn(4, 5, 3, dtype=torch.float64)).to_dense()
