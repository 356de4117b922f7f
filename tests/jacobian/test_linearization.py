import numpy as np
import pytest
import torch
from models import BUILDERS, gp_closed_form, inputs_for, mlp, reference_jacobian, resnet
from torch import nn

import linadapt as la
from linadapt.jacobian.selection import select_parameters

TOL = 1e-10


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_products_match_autograd_reference(name, chunk_size):
    model = BUILDERS[name]()
    X = inputs_for(name, 7)
    lin = la.Linearization(model, chunk_size=chunk_size)
    J = reference_jacobian(model, X, lin.param_names)  # (n, c, p)
    assert torch.allclose(lin.jacobian(X), J, atol=TOL, rtol=0)
    g = torch.Generator().manual_seed(0)
    V = torch.randn(5, lin.num_params, generator=g, dtype=torch.float64)
    U = torch.randn(5, 7, J.shape[1], generator=g, dtype=torch.float64)
    assert torch.allclose(lin.jvp(X, V), torch.einsum("ncp,kp->knc", J, V), atol=TOL, rtol=0)
    assert torch.allclose(lin.vjp(X, U), torch.einsum("ncp,knc->kp", J, U), atol=TOL, rtol=0)
    # single vectors keep their shapes
    assert lin.jvp(X, V[0]).shape == (7, J.shape[1])
    assert lin.vjp(X, U[0]).shape == (lin.num_params,)
    assert torch.allclose(lin.outputs(X), model.eval()(X).reshape(7, -1).detach(), atol=TOL)


def test_many_right_hand_sides_beyond_one_group():
    model, X = mlp(), inputs_for("mlp", 4)
    lin = la.Linearization(model)
    J = reference_jacobian(model, X, lin.param_names)
    V = torch.randn(150, lin.num_params, dtype=torch.float64)  # > one vmap group of 64
    assert torch.allclose(lin.jvp(X, V), torch.einsum("ncp,kp->knc", J, V), atol=TOL)


def test_batchnorm_model_in_train_mode_is_linearized_in_eval_mode_and_left_untouched():
    model = resnet()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    X = inputs_for("resnet", 6)
    lin = la.Linearization(model, chunk_size=4)
    out = lin.outputs(X)
    lin.jvp(X, torch.randn(lin.num_params, dtype=torch.float64))
    lin.vjp(X, torch.randn(6, 3, dtype=torch.float64))
    lin.jacobian(X)
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    model.eval()
    assert torch.allclose(out, model(X).detach(), atol=TOL)  # eval-mode outputs, not batch statistics
    model.train()
    assert not torch.allclose(out, model(X).detach(), atol=1e-3)


def test_weights_are_snapshotted():
    model, X = mlp(), inputs_for("mlp", 3)
    lin = la.Linearization(model)
    f0 = lin.outputs(X)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert torch.equal(lin.outputs(X), f0)


def test_parameter_selection():
    model = resnet()
    assert select_parameters(model, "last") == ["head.weight", "head.bias"]
    bias = select_parameters(model, "bias")
    assert bias and all(n.endswith("bias") for n in bias)
    assert select_parameters(model, ["block.*"]) == [
        "block.conv.weight",
        "block.conv.bias",
        "block.bn.weight",
        "block.bn.bias",
    ]
    assert select_parameters(model, "head.weight") == ["head.weight"]
    with pytest.raises(ValueError, match="matches no parameter"):
        select_parameters(model, ["nothing.*"])
    with pytest.raises(ValueError, match="empty"):
        select_parameters(model, [])


def test_subset_jacobian_is_column_subset():
    model, X = resnet(), inputs_for("resnet", 4)
    full = la.Linearization(model)
    sub = la.Linearization(model, params=["block.*", "head.bias"])
    Jf = full.jacobian(X)
    cols = []
    offset = 0
    for n, k in zip(full.param_names, full.numels, strict=True):
        if n in sub.param_names:
            cols.extend(range(offset, offset + k))
        offset += k
    assert torch.allclose(sub.jacobian(X), Jf[:, :, cols], atol=TOL)


def test_shared_weights_appear_once_and_sum_both_uses():
    from models import shared

    model = shared()
    lin = la.Linearization(model)
    assert lin.param_names.count("mid.weight") == 1
    X = inputs_for("shared", 3)
    assert torch.allclose(lin.jacobian(X), reference_jacobian(model, X, lin.param_names), atol=TOL)


def test_no_trainable_parameters_is_an_error():
    model = mlp()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        la.Linearization(model)
    with pytest.raises(ValueError, match="no parameters"):
        la.Linearization(nn.ReLU())
    # naming frozen parameters explicitly is allowed
    assert la.Linearization(model, params=["4.*"]).num_params == 8 * 3 + 3


def test_bad_models_and_inputs_raise_clear_errors():
    class ThreeD(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 4)

        def forward(self, x):
            return self.fc(x).reshape(x.shape[0], 2, 2)

    with pytest.raises(ValueError, match=r"shape \(n, c\) or \(n,\)"):
        la.Linearization(ThreeD()).outputs(torch.randn(3, 2))
    lin = la.Linearization(mlp())
    with pytest.raises(ValueError, match="forward pass failed"):
        lin.outputs(torch.randn(3, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN or inf"):
        lin.outputs(torch.tensor([[float("nan"), 0, 0, 0]]))
    with pytest.raises(ValueError, match="empty"):
        lin.outputs(torch.zeros(0, 4))
    with pytest.raises(ValueError, match="chunk_size"):
        la.Linearization(mlp(), chunk_size=0)


def test_explicit_device_and_numpy_inputs():
    model = mlp()
    X = inputs_for("mlp", 4)
    lin = la.Linearization(model, device="cpu")
    assert lin.device == torch.device("cpu")
    assert torch.allclose(lin.outputs(X.numpy()), lin.outputs(X))


def test_inplace_activations_work():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(64, 2)
    ).double()
    X = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    lin = la.Linearization(net)
    assert torch.allclose(lin.jacobian(X), reference_jacobian(net, X, lin.param_names), atol=TOL)
    V = torch.randn(3, lin.num_params, dtype=torch.float64)
    J = lin.jacobian(X)
    assert torch.allclose(lin.jvp(X, V), torch.einsum("ncp,kp->knc", J, V), atol=TOL)


def _fallback_checks(monkeypatch, model, X, n_out):
    """For a model with a module that has no forward-mode AD: J(X) and J(X) V (the reverse-mode fallback of
    jvp) against the plain-autograd reference Jacobian, and LinearizedRegressor's predictions (Cholesky; CG
    through the held Jacobian; CG through torch.func products, i.e. the fallback) against the dense GP closed
    form on that reference Jacobian."""
    import warnings

    from linadapt.inference.posterior import TrainingData

    lin = la.Linearization(model)
    J = reference_jacobian(model, X, lin.param_names)
    V = torch.randn(3, lin.num_params, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(lin.jvp(X, V), torch.einsum("icp,kp->kic", J, V), rtol=1e-10, atol=1e-12)
    assert not lin._forward_ad  # the jvp above went through the fallback
    torch.testing.assert_close(lin.jvp(X, V[0]), J @ V[0], rtol=1e-10, atol=1e-12)  # and stays on it
    torch.testing.assert_close(lin.jacobian(X), J, rtol=1e-10, atol=1e-12)
    n = X.shape[0]
    Y = torch.randn(n, n_out, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s2, sig2 = 0.7, 0.05
    want = gp_closed_form(model, lin.param_names, X, Y, X[:4], s2, sig2)
    calls = []
    original = la.Linearization._jvp_by_jacobian

    def counted(self, *args):
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(la.Linearization, "_jvp_by_jacobian", counted)
    for solver, products in (("cholesky", "held"), ("cg", "held"), ("cg", "torch.func")):
        calls.clear()
        with monkeypatch.context() as m, warnings.catch_warnings():
            warnings.simplefilter("error", la.ConvergenceWarning)  # a silent Cholesky fallback would fail here
            if products == "torch.func":
                m.setattr(TrainingData, "factored", lambda self: None)
            reg = la.LinearizedRegressor(
                model, prior_var=s2, noise_var=sig2, optimize_hyperparameters=False, space="function", solver=solver
            ).fit(X, Y)
        assert reg.solver_ == solver and (solver == "cholesky" or reg.solve_info_.converged)
        if products == "torch.func":
            assert calls  # the CG products took the reverse-mode fallback
        mean, std = reg.predict(X[:4], return_std=True)
        np.testing.assert_allclose(mean, want[0], rtol=1e-8, atol=1e-9)
        np.testing.assert_allclose(std, want[1], rtol=1e-8, atol=1e-9)


def test_modules_without_forward_mode_fall_back_to_reverse_mode(monkeypatch):
    """nn.EmbeddingBag has no forward-mode AD in torch: J v comes from reverse-mode Jacobian chunks instead,
    equal to the plain-autograd Jacobian's product, and both estimators fit and predict through it."""
    import warnings

    class Bag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bag = nn.EmbeddingBag(10, 4, mode="mean")
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.bag(x)))

    torch.manual_seed(0)
    model = Bag().double()
    X = torch.randint(0, 10, (12, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: no batching rule for embedding_bag (slow path)
        _fallback_checks(monkeypatch, model, X, 2)
        proba = la.LinearizedClassifier(model).fit(X, torch.randint(0, 2, (12,))).predict_proba(X[:4])
        np.testing.assert_allclose(proba.sum(1), 1.0)


def test_sparse_embeddings_are_linearized_like_dense_ones():
    """nn.Embedding(sparse=True): sparse gradients are an autograd storage choice; the linearization gives the
    same predictions as the dense embedding with the same weights, and the flag is restored."""
    torch.manual_seed(0)
    sparse = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(12, 1)).double()
    dense = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 1)).double()
    dense.load_state_dict(sparse.state_dict())
    X, y = torch.randint(0, 10, (20, 3)), torch.randn(20, dtype=torch.float64)
    got = la.LinearizedRegressor(sparse).fit(X, y).predict(X[:4], return_std=True)
    want = la.LinearizedRegressor(dense).fit(X, y).predict(X[:4], return_std=True)
    np.testing.assert_allclose(got, want, rtol=1e-10)
    assert sparse[0].sparse


def test_custom_functions_without_forward_mode_fall_back_too(monkeypatch):
    """A custom autograd.Function with a backward but no jvp ("... forward mode AD"): reverse mode as well."""

    class Square(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x * x

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

        @staticmethod
        def vmap(info, in_dims, x):
            return x * x, in_dims[0]

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 2 * x * g

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(Square.apply(self.a(x)))

    torch.manual_seed(0)
    model = Net().double()
    _fallback_checks(monkeypatch, model, torch.randn(10, 3, dtype=torch.float64), 2)


class _Attend(nn.Module):
    """Self-attention by scaled_dot_product_attention (as HuggingFace encoders call it), two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(6, 18)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n, T, 6)
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 3).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(a.transpose(1, 2).reshape(x.shape[0], x.shape[1], 6).mean(1))


def test_vjp_of_several_vectors_through_attention_is_batched(monkeypatch):
    """Several vectors are pulled back by vmap, which has no batching rule for the fused attention kernels'
    backward (it loops, warning "no batching rule"); vjp records attention in its math form instead."""
    import contextlib
    import warnings

    from linadapt.jacobian import linearization

    torch.manual_seed(0)
    model = _Attend()
    X = torch.randn(5, 4, 6)
    J = reference_jacobian(model.double(), X.double(), [n for n, _ in model.named_parameters()])
    model.float()
    U = torch.randn(3, 5, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = torch.einsum("kic,icp->kp", U, J)
    for context, batched in ((linearization.math_attention, True), (contextlib.nullcontext, False)):
        monkeypatch.setattr(linearization, "math_attention", context)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = la.Linearization(model).vjp(X, U)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        looped = any("batching rule" in str(w.message) for w in caught)
        assert looped != batched


def test_jvp_through_scaled_dot_product_attention_stays_in_forward_mode(monkeypatch):
    """torch's fused (float32) attention kernels have no forward-mode derivative; Linearization.jvp runs the network
    with scaled_dot_product_attention in its math form, so J v of a model calling it (as HuggingFace encoders do)
    is one forward-mode pass, not the reverse-mode fallback; against the reference Jacobian."""
    import contextlib

    from linadapt.jacobian import linearization

    torch.manual_seed(0)
    model = _Attend()  # float32: the fused CPU kernel
    X = torch.randn(5, 4, 6)
    J = reference_jacobian(model.double(), X.double(), [n for n, _ in model.named_parameters()])
    model.float()
    V = torch.randn(3, J.shape[-1], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = torch.einsum("icp,kp->kic", J, V)
    lin = la.Linearization(model)
    torch.testing.assert_close(lin.jvp(X, V), want, rtol=1e-4, atol=1e-5)
    assert lin._forward_ad  # no fallback was needed
    monkeypatch.setattr(linearization, "math_attention", contextlib.nullcontext)  # the fused kernel
    lin = la.Linearization(model)
    torch.testing.assert_close(lin.jvp(X, V), want, rtol=1e-4, atol=1e-5)
    assert not lin._forward_ad  # ... has no forward mode: the fallback


def test_jvp_with_outputs_takes_the_outputs_from_the_same_forward_mode_pass(monkeypatch):
    """The classifier's MAP logits f(X*) + J(X*) δ: in forward mode f(X*) is the primal of the Jacobian-vector
    product (no separate forward pass); on the reverse-mode fallback it is a forward pass. Equal either way."""
    model, X = mlp(), inputs_for("mlp", 9)
    lin = la.Linearization(model, chunk_size=4)
    v = torch.randn(lin.num_params, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    want_f, want_jv = lin.outputs(X), lin.jvp(X, v)
    monkeypatch.setattr(la.Linearization, "outputs", lambda *a: pytest.fail("a separate forward pass"))
    f, jv = lin.jvp(X, v, with_outputs=True)
    torch.testing.assert_close(f, want_f, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jv, want_jv, rtol=1e-12, atol=1e-12)
    monkeypatch.undo()
    lin._forward_ad = False  # the fallback: outputs by their own pass
    f, jv = lin.jvp(X, v, with_outputs=True)
    torch.testing.assert_close(f, want_f, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jv, want_jv, rtol=1e-10, atol=1e-12)
