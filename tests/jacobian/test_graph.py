"""Products with J(X) through the retained autograd graph, against torch.func's products and the dense form."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from models import BUILDERS, fit_held_and_plain, gp_closed_form, inputs_for, reference_jacobian
from torch import nn

import linadapt as la
from linadapt.jacobian.graph import GraphJacobian, graph_jacobian
from linadapt.jacobian.linearization import Linearization, LinearizationError


def _graph(
    name: str, params: str = "all", n: int = 7, chunk_size: int = 3
) -> tuple[Linearization, torch.Tensor, GraphJacobian]:
    model = BUILDERS[name]()
    lin = Linearization(model, params=params, chunk_size=chunk_size)
    X = lin.prepare_inputs(inputs_for(name, n))
    graph = graph_jacobian(lin, X, budget=2**30)
    assert graph is not None and len(graph.chunks) == -(-n // chunk_size)
    return lin, X, graph


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("params", ["all", "last", "bias"])
def test_graph_products_match_torch_func_and_the_explicit_jacobian(name: str, params: str) -> None:
    lin, X, graph = _graph(name, params)
    n, c, p = X.shape[0], graph.c, lin.num_params
    gen = torch.Generator().manual_seed(3)
    for k in (1, 3):
        V = torch.randn(k, p, generator=gen, dtype=torch.float64)
        U = torch.randn(k, n, c, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(graph.jvp(V), lin.jvp(X, V), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(graph.vjp(U), lin.vjp(X, U), rtol=1e-12, atol=1e-12)
    J = reference_jacobian(lin.model, X, lin.param_names).reshape(n * c, p)
    V = torch.randn(2, p, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(graph.jvp(V).reshape(2, -1), V @ J.T, rtol=1e-10, atol=1e-12)
    # repeated products reuse the kept graphs: no forward pass through the network (counted by a hook)
    forwards = []
    handle = lin.model.register_forward_hook(lambda *args: forwards.append(1))
    try:
        for _ in range(2):
            graph.jvp(V)
            graph.vjp(U)
        assert not forwards
        lin.jvp(X, V)  # the hook does see torch.func's forward passes
        assert forwards
    finally:
        handle.remove()


def test_float32_network_products_agree_to_its_precision() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 4))
    lin = Linearization(model, chunk_size=16)
    X = lin.prepare_inputs(torch.randn(40, 5))
    graph = graph_jacobian(lin, X, budget=2**30)
    assert graph is not None
    V = torch.randn(2, lin.num_params, dtype=torch.float64)
    torch.testing.assert_close(graph.jvp(V), lin.jvp(X, V), rtol=1e-5, atol=1e-5)
    U = torch.randn(2, 40, 4, dtype=torch.float64)
    torch.testing.assert_close(graph.vjp(U), lin.vjp(X, U), rtol=1e-5, atol=1e-5)


def test_declines_when_over_budget_or_empty() -> None:
    model = BUILDERS["mlp"]()
    lin = Linearization(model)
    X = lin.prepare_inputs(inputs_for("mlp", 20))
    assert graph_jacobian(lin, X, budget=100) is None
    assert graph_jacobian(lin, X[:0], budget=2**30) is None
    graph = graph_jacobian(lin, X, budget=2**30)
    assert graph is not None and 0 < graph.nbytes() < 2**20


class _InPlace(nn.Module):
    """exp saves its result for the backward pass; the in-place add then changes that saved tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x).exp()
        h.add_(1.0)
        return h


class _OnceDifferentiable(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.tanh()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return g * (1 - x.tanh() ** 2)


class _DetachedBackward(torch.autograd.Function):
    """A backward pass computed off the graph (not marked once-differentiable): differentiating it gives 0."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return 2 * x

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        return 2 * g.detach()


class _NoDoubleBackward(nn.Module):
    def __init__(self, fn: type[torch.autograd.Function]) -> None:
        super().__init__()
        self.fn = fn
        self.a, self.b = nn.Linear(3, 4).double(), nn.Linear(4, 2).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.fn.apply(self.a(x)))


@pytest.mark.parametrize(
    "model",
    [_InPlace(), _NoDoubleBackward(_OnceDifferentiable), _NoDoubleBackward(_DetachedBackward)],
    ids=["in-place", "once-differentiable", "detached-backward"],
)
def test_models_the_graph_cannot_serve_fall_back_to_none(model: nn.Module) -> None:
    lin = Linearization(model)
    X = lin.prepare_inputs(torch.randn(6, 3, dtype=torch.float64))
    assert graph_jacobian(lin, X, budget=2**30) is None


def test_solvers_use_the_graph_when_no_factors_apply_and_agree_with_torch_func(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import linadapt.jacobian.structured

    # as when the per-layer factors do not fit in memory (or the model has more than 32 outputs)
    monkeypatch.setattr(linadapt.jacobian.structured, "factored_jacobian", lambda *args, **kwargs: None)
    model = BUILDERS["resnet"]()  # BatchNorm, dropout, a residual block
    X = inputs_for("resnet", 12)
    Y = torch.randn(12, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    Xs = inputs_for("resnet", 4, seed=5)
    settings = {"prior_var": 0.7, "noise_var": 0.1, "optimize_hyperparameters": False, "solver": "cg"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", la.ConvergenceWarning)  # CG, not a Cholesky fallback
        reg, got, expected, served = fit_held_and_plain(monkeypatch, model, X, Y, Xs, settings)
    assert reg.solver_ == "cg" and reg.solve_info_.converged
    # what the CG iterations' products with J(X) ran: the retained graph, never torch.func
    assert served["GraphJacobian.jvp"] >= reg.solve_info_.iterations
    assert served["GraphJacobian.vjp"] >= reg.solve_info_.iterations
    assert served["Linearization.jvp"] == served["Linearization.vjp"] == 0
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-9, atol=1e-10)
    dense = la.LinearizedRegressor(model, space="function", **{**settings, "solver": "cholesky"})
    want = dense.fit(X, Y).predict(Xs, return_std=True)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-7, atol=1e-8)
    ref = gp_closed_form(model, reg.linearization_.param_names, X, Y, Xs, 0.7, 0.1)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-7, atol=1e-8)


class _Convs(nn.Module):
    """Strided, dilated, bias-free, grouped 2-d convolutions, a 1-d convolution and a "same"-padded one
    (the last goes through PyTorch's own convolution)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(4, 4, (2, 3), dilation=(1, 2), bias=False)
        self.g = nn.Conv2d(4, 4, 1, groups=2)
        self.same = nn.Conv2d(4, 3, 3, padding="same")
        self.c3 = nn.Conv1d(3, 3, 2, padding=1, stride=2)
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.c1(x))
        h = torch.tanh(self.g(torch.tanh(self.c2(h))))
        h = torch.tanh(self.same(h))
        h = torch.tanh(self.c3(h.flatten(2)))
        return self.head(h.mean(-1))


def _node_names(t: torch.Tensor) -> set[str]:
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(nxt for nxt, _ in node.next_functions)
    return names


@pytest.mark.parametrize("params", ["all", "bias", "c2.weight"])
def test_convolutions_take_the_lean_backward_and_stay_exact(params: str) -> None:
    torch.manual_seed(0)
    model = _Convs().double()
    lin = Linearization(model, params=params, chunk_size=4)
    X = lin.prepare_inputs(torch.randn(9, 2, 9, 9, dtype=torch.float64))
    graph = graph_jacobian(lin, X, budget=2**30)
    assert graph is not None
    names = _node_names(graph.chunks[0].out)
    assert "_LeanConvBackward" in names and "ConvolutionBackward0" in names  # the "same" conv stays native
    gen = torch.Generator().manual_seed(1)
    V = torch.randn(2, lin.num_params, generator=gen, dtype=torch.float64)
    U = torch.randn(2, 9, 2, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(graph.jvp(V), lin.jvp(X, V), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(graph.vjp(U), lin.vjp(X, U), rtol=1e-12, atol=1e-12)


def test_square_operator_holds_the_jacobian_from_its_second_product() -> None:
    model = BUILDERS["resnet"]()
    X = inputs_for("resnet", 10)
    op = la.NTKOperator(model, X)
    cold = la.NTKOperator(model, X, hold=False)
    V = torch.randn(3, op.shape[0], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    first = op.apply_rows(V)
    assert op.held() is None  # a single product does not pay for holding J(X)
    second = op.apply_rows(V)
    assert op.held() is not None
    torch.testing.assert_close(second, first, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cold.apply_rows(V), first, rtol=1e-12, atol=1e-12)
    cold.apply_rows(V)
    assert cold.held() is None
    torch.testing.assert_close(op.to_dense() @ V.T, second.T, rtol=1e-10, atol=1e-10)
    for output in ("sum", 1):  # the single-output and trace kernels use the held J(X) too
        sub = la.NTKOperator(model, X, output=output)
        v = V[:, : sub.shape[0]]
        once, twice = sub.apply_rows(v), sub.apply_rows(v)
        assert sub.held() is not None
        torch.testing.assert_close(twice, once, rtol=1e-12, atol=1e-12)
    rect = la.NTKOperator(model, X, inputs_for("resnet", 4, seed=3))
    rect.apply_rows(V[:, : rect.shape[1]])
    rect.apply_rows(V[:, : rect.shape[1]])
    assert rect.held() is None


@pytest.mark.parametrize("name", ["mlp", "convs"])
def test_many_vectors_go_through_the_batched_backward_exactly(name: str) -> None:
    torch.manual_seed(0)
    if name == "convs":
        model, X = _Convs().double(), torch.randn(9, 2, 9, 9, dtype=torch.float64)
    else:
        model, X = BUILDERS["mlp"](), inputs_for("mlp", 9)
    lin = Linearization(model, chunk_size=5)
    X = lin.prepare_inputs(X)
    graph = graph_jacobian(lin, X, budget=2**30)
    c = graph.c
    gen = torch.Generator().manual_seed(4)
    V = torch.randn(70, lin.num_params, generator=gen, dtype=torch.float64)  # two groups: 64 + 6
    U = torch.randn(70, 9, c, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(graph.jvp(V), lin.jvp(X, V), rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(graph.vjp(U), lin.vjp(X, U), rtol=1e-11, atol=1e-12)
    # linear layers: batched backward; convolutions: one vector at a time (faster there, measured)
    assert graph._batched == (name == "mlp")


def test_a_backward_without_batching_rule_falls_back_to_one_vector_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lin = Linearization(BUILDERS["mlp"]())
    X = lin.prepare_inputs(inputs_for("mlp", 5))
    graph = graph_jacobian(lin, X, budget=2**30)
    assert graph._batched
    real = torch.autograd.grad

    def no_batching(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("Batching rule not implemented")  # as for an op without one
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_batching)
    gen = torch.Generator().manual_seed(5)
    V = torch.randn(3, lin.num_params, generator=gen, dtype=torch.float64)
    U = torch.randn(3, 5, graph.c, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(graph.jvp(V), lin.jvp(X, V), rtol=1e-12, atol=1e-12)
    assert not graph._batched
    torch.testing.assert_close(graph.vjp(U), lin.vjp(X, U), rtol=1e-12, atol=1e-12)


def test_eval_mode_batch_norm_enters_the_graph_as_its_affine_map() -> None:
    lin, X, graph = _graph("resnet")
    names = _node_names(graph.chunks[0].out)
    assert not any("BatchNorm" in name for name in names)
    model = BUILDERS["resnet"]()
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():  # the model itself is untouched: still eval-mode batch norm when called
        torch.testing.assert_close(lin.outputs(X), model.eval()(X), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_cold_kernel_product_in_one_forward_pass_is_exact(name: str) -> None:
    from linadapt.jacobian.graph import kernel_product

    model = BUILDERS[name]()
    lin = Linearization(model)
    X = lin.prepare_inputs(inputs_for(name, 9))
    c = lin.output_dim(X)
    u = torch.randn(9, c, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    got = kernel_product(lin, X, u)
    assert got is not None and lin.held.graph_ok
    torch.testing.assert_close(got, lin.jvp(X, lin.vjp(X, u)), rtol=1e-12, atol=1e-12)
    # the operator's first single-vector product takes this route; the same numbers as torch.func's
    op = la.NTKOperator(model, X)
    cold = la.NTKOperator(model, X, hold=False)
    torch.testing.assert_close(
        op.apply_rows(u.reshape(1, -1)), cold.apply_rows(u.reshape(1, -1)), rtol=1e-12, atol=1e-12
    )


def test_cold_kernel_product_declines_many_chunks_and_broken_models() -> None:
    from linadapt.jacobian.graph import kernel_product

    lin = Linearization(BUILDERS["mlp"](), chunk_size=4)
    X = lin.prepare_inputs(inputs_for("mlp", 9))
    assert kernel_product(lin, X, torch.ones(9, 3, dtype=torch.float64)) is None  # 3 chunks
    lin = Linearization(_NoDoubleBackward(_DetachedBackward))
    X = lin.prepare_inputs(torch.randn(6, 3, dtype=torch.float64))
    assert kernel_product(lin, X, torch.ones(6, 2, dtype=torch.float64)) is None
    assert lin.held.graph_ok is False
    op = la.NTKOperator(lin, X)  # falls back to torch.func, which names the problem (no setup_context)
    with pytest.raises(LinearizationError, match="setup_context"):
        op.apply_rows(torch.randn(1, 12, dtype=torch.float64))


def test_held_jacobian_survives_linear_operator_rebuilds_and_is_shared() -> None:
    model = BUILDERS["mlp"]()
    lin = Linearization(model)
    X = lin.prepare_inputs(inputs_for("mlp", 12))
    op = la.NTKOperator(lin, X)
    v = torch.randn(op.shape[0], 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    results = [op.matmul(v) for _ in range(3)]  # linear_operator rebuilds the operator for each matmul
    held = lin.held.value
    assert held not in (None, False)
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], rtol=1e-12, atol=1e-12)
    again = la.NTKOperator(lin, X[:])  # another view of the same inputs: the same held J(X)
    again.apply_rows(v.T)
    assert again.held() is held
    cold = la.NTKOperator(lin, X, hold=False)
    rebuilt = cold.representation_tree()(*cold.representation())
    assert rebuilt.hold is False and rebuilt.held() is None
    other = lin.prepare_inputs(inputs_for("mlp", 12, seed=9))
    la.NTKOperator(lin, other).apply_rows(v.T)  # different inputs replace the remembered ones
    assert lin.held.value is None and lin.held.uses == 1


def test_graph_memory_estimate_does_not_charge_the_inputs_per_chunk() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    lin = Linearization(model, chunk_size=256)
    X = lin.prepare_inputs(torch.randn(8192, 64, dtype=torch.float64))  # 4 MiB of inputs
    graph = graph_jacobian(lin, X, budget=2**30)
    assert graph is not None
    # ~170 bytes per example (activations of width 8, outputs, cotangents; g(u) per chunk) — charging each
    # chunk for the whole input storage, as a first version did, made it 136 MB
    assert graph.nbytes() < 8192 * 64 * 8 / 2
