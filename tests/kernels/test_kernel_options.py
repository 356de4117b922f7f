"""NTKKernel(diag=True), NTKOperator(symmetric=...) and the refused-hold path, against kernels built here from an
explicit autograd Jacobian (tests/models.py's reference_jacobian: plain torch.autograd, one output at a time)."""

import pytest
import torch
from models import inputs_for, mlp, reference_jacobian, resnet

import linadapt as la
import linadapt.kernels.operator as operator_module


def _jac(model, X):
    return reference_jacobian(model, X, [n for n, _ in model.named_parameters()])  # (n, c, p)


@pytest.mark.parametrize("output", ["sum", 0, 2])
def test_ntk_kernel_diag_is_the_diagonal_of_the_explicit_kernel(output):
    model = mlp()
    X = inputs_for("mlp", 6)
    J = _jac(model, X)
    if output == "sum":
        expected = (J**2).sum(dim=(1, 2))  # Σ_a ‖J_a(x_i)‖²
    else:
        expected = (J[:, output] ** 2).sum(-1)
    kernel = la.NTKKernel(model, output=output)
    diag = kernel(X, diag=True)
    diag = diag.to_dense() if hasattr(diag, "to_dense") else diag
    assert diag.shape == (6,)
    torch.testing.assert_close(diag.double(), expected, rtol=1e-10, atol=1e-12)
    full = kernel(X).to_dense()  # and it is the diagonal of the full kernel the same object returns
    torch.testing.assert_close(torch.diagonal(full), diag, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="diag=True needs x1 and x2 to be the same inputs"):
        kernel(X, X + 1, diag=True)


def test_ntk_kernel_diag_with_input_shape_and_float32_inputs():
    model = resnet()
    X = inputs_for("resnet", 5)
    expected = (_jac(model, X) ** 2).sum(dim=(1, 2))
    kernel = la.NTKKernel(model, input_shape=(1, 6, 6))
    diag = kernel(X.reshape(5, -1).float(), diag=True)
    assert diag.dtype == torch.float32  # the GP's dtype
    torch.testing.assert_close(diag.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("symmetric", [None, True, False])
def test_operator_products_for_every_symmetry_setting(symmetric):
    model, X = mlp(), inputs_for("mlp", 5)
    J = _jac(model, X).reshape(15, -1)
    K = J @ J.T
    op = la.NTKOperator(model, X, symmetric=symmetric)
    V = torch.randn(15, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for _ in range(3):  # first product (one forward pass), then through the held J when symmetric
        torch.testing.assert_close(op @ V[:, 0], K @ V[:, 0], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(op @ V, K @ V, rtol=1e-9, atol=1e-12)
    if symmetric is False:
        # declared non-symmetric: never held, and no diagonal (defined for the square J(X) J(X)ᵀ only)
        assert op.held() is None
        with pytest.raises(RuntimeError, match="diagonal is defined for the square operator"):
            op._diagonal()
    else:
        assert op.held() is not None  # held from the second product on
        torch.testing.assert_close(op.diagonal(), torch.diagonal(K), rtol=1e-10, atol=1e-12)


def test_rectangular_operator_declared_symmetric_or_not_multiplies_by_j1_j2t():
    model = mlp()
    X1, X2 = inputs_for("mlp", 4), inputs_for("mlp", 3, seed=5)
    K = _jac(model, X1).reshape(12, -1) @ _jac(model, X2).reshape(9, -1).T
    V = torch.randn(9, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for symmetric in (None, False):
        op = la.NTKOperator(model, X1, X2, symmetric=symmetric)
        assert op.shape == (12, 9) and op.held() is None
        torch.testing.assert_close(op @ V, K @ V, rtol=1e-9, atol=1e-12)
    # the same inputs given twice (another tensor, equal values) and declared symmetric: still J(X)J(X)ᵀ
    Xc = X1.clone()
    op = la.NTKOperator(model, X1, Xc, symmetric=True)
    K11 = _jac(model, X1).reshape(12, -1)
    W = torch.randn(12, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(op @ W, K11 @ K11.T @ W, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(op.diagonal(), (K11**2).sum(1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("builder", ["mlp", "resnet"])
@pytest.mark.parametrize("output", [None, "sum", 1])
def test_products_when_holding_j_is_refused(monkeypatch, builder, output):
    """With a memory budget of 1 byte nothing can be held (neither per-layer factors nor the retained graph):
    the refusal is remembered and every product, single vectors included, runs through torch.func — with the
    same result as the explicit kernel."""
    monkeypatch.setattr(operator_module, "HELD_BYTES", 1)
    model = mlp() if builder == "mlp" else resnet()
    X = inputs_for(builder, 5)
    J = _jac(model, X)  # (n, c, p)
    if output is None:
        K = J.reshape(15, -1) @ J.reshape(15, -1).T
    elif output == "sum":
        K = torch.einsum("iap,jap->ij", J, J)
    else:
        K = J[:, output] @ J[:, output].T
    op = la.NTKOperator(model, X, output=output)
    n = K.shape[0]
    V = torch.randn(n, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for _ in range(3):
        torch.testing.assert_close(op @ V[:, 0], K @ V[:, 0], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(op @ V, K @ V, rtol=1e-9, atol=1e-12)
    assert op.held() is None
    assert op.linearization.held.refused(op.X1)  # tried, nothing fitted, remembered
    # linear_operator's algorithms on top of the refused path still solve with the right matrix
    b = V[:, 0]
    x = op.add_diagonal(torch.tensor(0.5, dtype=torch.float64)).solve(b)
    torch.testing.assert_close(
        x, torch.linalg.solve(K + 0.5 * torch.eye(n, dtype=torch.float64), b), rtol=1e-6, atol=1e-8
    )
