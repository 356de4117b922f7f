import gpytorch
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from linear_operator.functions import pivoted_cholesky
from models import BUILDERS, inputs_for, mlp, reference_jacobian, resnet

import linadapt as la

TOL = 1e-10


def dense_reference(model, X1, X2, names):
    J1 = reference_jacobian(model, X1, names)
    J2 = reference_jacobian(model, X2, names)
    n1, c, p = J1.shape
    return J1.reshape(n1 * c, p) @ J2.reshape(-1, p).T, J1, J2


@pytest.mark.parametrize("name", list(BUILDERS))
def test_operator_and_gram_match_explicit_jacobian(name):
    model = BUILDERS[name]()
    X1, X2 = inputs_for(name, 5, seed=1), inputs_for(name, 4, seed=2)
    lin = la.Linearization(model, chunk_size=2)
    K12, J1, _J2 = dense_reference(model, X1, X2, lin.param_names)
    op = la.NTKOperator(lin, X1, X2)
    c = J1.shape[1]
    assert op.shape == (5 * c, 4 * c)
    V = torch.randn(4 * c, 3, dtype=torch.float64)
    # matmul = J1 (J2ᵀ V), vectors and matrices
    assert torch.allclose(op @ V, K12 @ V, atol=TOL)
    assert torch.allclose(op.matmul(V[:, 0]), K12 @ V[:, 0], atol=TOL)
    assert torch.allclose(
        op.mT @ torch.ones(5 * c, dtype=torch.float64), K12.T @ torch.ones(5 * c, dtype=torch.float64), atol=TOL
    )
    assert torch.allclose(la.ntk_gram(model, X1, X2), K12, atol=TOL)
    assert torch.allclose(la.ntk_gram(lin, X1), dense_reference(model, X1, X1, lin.param_names)[0], atol=TOL)


def test_example_major_ordering():
    model, X = mlp(), inputs_for("mlp", 3)
    lin = la.Linearization(model)
    K = la.ntk_gram(lin, X)
    J = lin.jacobian(X)
    for i, a, j, b in [(0, 0, 1, 2), (2, 1, 0, 0), (1, 2, 1, 1)]:
        assert torch.isclose(K[i * 3 + a, j * 3 + b], J[i, a] @ J[j, b])


def test_output_selection_and_trace_kernel():
    model, X = resnet(), inputs_for("resnet", 5)
    lin = la.Linearization(model)
    J = lin.jacobian(X)
    for out in (0, 2):
        op = la.NTKOperator(lin, X, output=out)
        ref = J[:, out] @ J[:, out].T
        assert torch.allclose(op.to_dense(), ref, atol=TOL)
        assert torch.allclose(op.diagonal(), ref.diagonal(), atol=TOL)
    op = la.NTKOperator(lin, X, output="sum")
    ref = torch.einsum("icp,jcp->ij", J, J)
    assert torch.allclose(op.to_dense(), ref, atol=TOL)
    with pytest.raises(ValueError, match="out of range"):
        la.NTKOperator(lin, X, output=3)


def test_linear_operator_algorithms_apply():
    model, X = resnet(), inputs_for("resnet", 6)
    lin = la.Linearization(model)
    op = la.NTKOperator(lin, X)
    K = la.ntk_gram(lin, X)
    assert torch.allclose(op.diagonal(), K.diagonal(), atol=TOL)
    assert torch.allclose(op[4, 7], K[4, 7], atol=TOL)
    A = op.add_diagonal(torch.tensor(0.3, dtype=torch.float64))
    b = torch.randn(18, 2, dtype=torch.float64)
    Ad = K + 0.3 * torch.eye(18, dtype=torch.float64)
    assert torch.allclose(A.solve(b), torch.linalg.solve(Ad, b), atol=1e-8)
    quad, logdet = A.inv_quad_logdet(b[:, :1], logdet=True)
    assert torch.isclose(quad, b[:, 0] @ torch.linalg.solve(Ad, b[:, 0]), rtol=1e-8)
    assert torch.isclose(logdet, torch.logdet(Ad), atol=1e-8)
    L = pivoted_cholesky(op, 18)
    assert torch.allclose(L @ L.T, K, atol=1e-8)


@given(seed=st.integers(0, 10_000), a=st.floats(-3, 3), b=st.floats(-3, 3))
def test_operator_laws(seed, a, b):
    """Symmetry, positive semi-definiteness and linearity of K = J Jᵀ, on random probes."""
    model, X = mlp(), inputs_for("mlp", 4)
    op = la.NTKOperator(model, X)
    g = torch.Generator().manual_seed(seed)
    u, v = torch.randn(12, generator=g, dtype=torch.float64), torch.randn(12, generator=g, dtype=torch.float64)
    Ku, Kv = op.matmul(u), op.matmul(v)
    scale = 1 + Ku.abs().max() + Kv.abs().max()
    assert torch.isclose(u @ Kv, v @ Ku, atol=1e-10 * scale)  # symmetric
    assert u @ Ku >= -1e-10 * scale  # PSD
    assert torch.allclose(op.matmul(a * u + b * v), a * Ku + b * Kv, atol=1e-10 * scale)  # linear


def test_ntk_kernel_in_exact_gp_matches_dense_gp():
    model, X = resnet(d_out=2), inputs_for("resnet", 8)
    Xflat = X.reshape(8, -1)
    y = torch.sin(Xflat.sum(1))
    lin = la.Linearization(model)
    J = lin.jacobian(X)

    class GP(gpytorch.models.ExactGP):
        def __init__(self, kernel):
            lik = gpytorch.likelihoods.GaussianLikelihood()
            super().__init__(Xflat, y, lik)
            self.mean_module = gpytorch.means.ZeroMean()
            self.covar_module = kernel

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))

    for output, Jo in ((1, J[:, 1]), ("sum", None)):
        kernel = la.NTKKernel(model, input_shape=(1, 6, 6), output=output)
        assert not list(kernel.parameters())  # the network's weights are not GP parameters
        gp = GP(kernel).double()
        gp.likelihood.noise = 0.1
        gp.eval()
        Xs = inputs_for("resnet", 3, seed=5)
        with torch.no_grad():
            pred = gp(Xs.reshape(3, -1))
        Js = lin.jacobian(Xs)
        if output == "sum":
            K = torch.einsum("icp,jcp->ij", J, J)
            Ks = torch.einsum("icp,jcp->ij", Js, J)
            Kss = torch.einsum("icp,jcp->ij", Js, Js)
        else:
            K, Ks, Kss = Jo @ Jo.T, Js[:, 1] @ Jo.T, Js[:, 1] @ Js[:, 1].T
        A = K + 0.1 * torch.eye(8, dtype=torch.float64)
        assert torch.allclose(pred.mean, Ks @ torch.linalg.solve(A, y), atol=1e-6)
        assert torch.allclose(pred.covariance_matrix, Kss - Ks @ torch.linalg.solve(A, Ks.T), atol=1e-6)
    with pytest.raises(ValueError, match="input_shape"):
        la.NTKKernel(model, input_shape=(1, 5, 5))(Xflat).to_dense()


def test_ntk_kernel_in_a_float32_gp_trains_and_predicts():
    """A float32 network in an ordinary float32 ExactGP (ScaleKernel, the marginal likelihood, then eval-mode
    prediction): the kernel's operator takes the inputs' dtype, so GPyTorch's float32 solves accept it, and the
    prediction equals the same GP in float64 to float32 rounding."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    X = torch.randn(12, 2)
    y = torch.sin(X.sum(1))
    Xs = torch.randn(5, 2)

    class GP(gpytorch.models.ExactGP):
        def __init__(self, X, y):
            super().__init__(X, y, gpytorch.likelihoods.GaussianLikelihood())
            self.mean_module = gpytorch.means.ZeroMean()
            self.covar_module = gpytorch.kernels.ScaleKernel(la.NTKKernel(net))

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))

    gp = GP(X, y)
    assert gp.covar_module(X).evaluate_kernel().dtype == torch.float32
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(gp.likelihood, gp)
    opt = torch.optim.Adam(gp.parameters(), lr=0.1)
    gp.train()
    for _ in range(3):
        opt.zero_grad()
        loss = -mll(gp(X), y)
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    gp.eval()
    with torch.no_grad():
        pred = gp.likelihood(gp(Xs))
    assert pred.mean.dtype == torch.float32 and pred.mean.shape == (5,)
    # the same trained GP in float64
    gp64 = GP(X.double(), y.double()).double()
    gp64.load_state_dict({k: v.double() for k, v in gp.state_dict().items()})
    gp64.eval()
    with torch.no_grad():
        pred64 = gp64.likelihood(gp64(Xs.double()))
    torch.testing.assert_close(pred.mean.double(), pred64.mean, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(pred.variance.double(), pred64.variance, rtol=1e-3, atol=1e-4)
    # the matrix-free route in float32: CG and Lanczos (fast predictive variances) on the operator's products,
    # its diagonal and selected entries
    with gpytorch.settings.max_cholesky_size(0), gpytorch.settings.fast_pred_var(), torch.no_grad():
        gp.train()
        gp.eval()
        pred_cg = gp.likelihood(gp(Xs))
    assert pred_cg.mean.dtype == torch.float32
    torch.testing.assert_close(pred_cg.mean.double(), pred64.mean, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(pred_cg.variance.double(), pred64.variance, rtol=5e-2, atol=1e-2)
    with pytest.raises(ValueError, match="dtype"):
        la.NTKOperator(net, X, dtype=torch.float16)


def test_operator_casts_change_the_results_dtype_not_the_inputs():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    X = torch.randn(5, 2, dtype=torch.float64)
    op = la.NTKOperator(net, X)
    for cast in (op.float(), op.to(torch.float32), op.type(torch.float32)):
        assert cast.dtype == torch.float32 and cast.X1.dtype == torch.float64  # the inputs are not rounded
        assert cast.to_dense().dtype == torch.float32 and cast.diagonal().dtype == torch.float32
        torch.testing.assert_close(cast.to_dense(), op.to_dense().float())
    assert op.float().double().dtype == torch.float64 and op.to("cpu") is op
    with pytest.raises(ValueError, match="float16"):
        op.half()
    with pytest.raises(ValueError, match="network's device"):
        op.to("meta")


def test_operator_casts_and_checks_raw_tensors():
    model = mlp()  # float64 network
    X = inputs_for("mlp", 4)
    names = la.Linearization(model).param_names
    cast = X.float().double()  # the float32 inputs as the float64 network sees them
    op = la.NTKOperator(model, X.float())
    assert torch.allclose(op.to_dense(), dense_reference(model, cast, cast, names)[0], atol=TOL)
    assert torch.allclose(op.to_dense(), dense_reference(model, X, X, names)[0], atol=1e-5)  # inputs rounded
    Xn = X.clone()
    Xn[2, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        la.NTKOperator(model, Xn)  # checked when the operator is made, not at its first product


@pytest.mark.parametrize("name", ["mlp", "resnet"])
def test_selected_rows_go_through_the_held_jacobian_without_a_pass_over_x(name, monkeypatch) -> None:
    """Pivoted Cholesky asks a square operator for selected rows: once J(X) is held (factors for the MLP, the
    retained graph for the ResNet) they cost a vjp over the few examples touched and a product with the held
    J(X) — no torch.func jvp over all of X — and equal the plain-autograd kernel's entries."""
    from linadapt.jacobian.linearization import Linearization

    model = BUILDERS[name]()
    X = inputs_for(name, 12)
    lin = Linearization(model)
    op = la.NTKOperator(lin, X)
    v = torch.randn(op.shape[0], dtype=torch.float64)
    op @ v
    op @ v  # held from the second product on
    assert op.held() is not None
    J = reference_jacobian(model, X, lin.param_names).flatten(0, 1)
    K = J @ J.T
    calls = {"jvp": 0}
    real = Linearization.jvp

    def counting(self, *args, **kwargs):
        calls["jvp"] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Linearization, "jvp", counting)
    rows = torch.tensor([0, 5, 17, 30])
    cols = torch.tensor([3, 5, 2, 35])
    got = op._get_indices(rows, cols)
    L = pivoted_cholesky(op, 6)
    assert calls["jvp"] == 0
    torch.testing.assert_close(got, K[rows, cols], rtol=1e-10, atol=1e-12 * float(K.abs().max()))
    # the low-rank factor reproduces the pivoted rows of the exact kernel: its first column is K's best pivot
    pivot = int(torch.argmax(torch.diagonal(K)))
    torch.testing.assert_close(L[:, 0] * L[pivot, 0], K[:, pivot], rtol=1e-8, atol=1e-10 * float(K.abs().max()))
