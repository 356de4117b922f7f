"""Per-layer (structured) dense NTK against the plain Jacobian contraction and an independent reference."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from models import (
    BUILDERS,
    cross_attention,
    fit_held_and_plain,
    gp_closed_form,
    inputs_for,
    reference_jacobian,
    text_encoder,
    token_ids,
)
from torch import nn

import linadapt as la
from linadapt import ConvergenceWarning, ntk_gram
from linadapt.jacobian.linearization import Linearization
from linadapt.jacobian.structured import StructuredNTK, factored_jvp


class ConvZoo(nn.Module):
    """Conv2d with stride / dilation / no bias, Conv1d, a grouped conv, LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(3, 4, (2, 3), dilation=(1, 2), bias=False)
        self.g = nn.Conv2d(4, 4, 1, groups=2)
        self.c3 = nn.Conv1d(4, 3, 2, padding=1)
        self.norm = nn.LayerNorm(3)
        self.head = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.c1(x))
        h = torch.tanh(self.g(torch.tanh(self.c2(h))))
        h = torch.tanh(self.c3(h.flatten(2)))  # (n, 3, L)
        h = self.norm(h.mean(-1))
        return self.head(h)


class Norms(nn.Module):
    """A depthwise convolution, GroupNorm, BatchNorm1d with running statistics (eval mode), LayerNorm over two
    dimensions, and a PReLU (no rule: its weight falls back)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.dw = nn.Conv2d(4, 4, 3, stride=2, groups=4, bias=False)
        self.act = nn.PReLU()
        self.bn = nn.BatchNorm1d(4)
        self.ln = nn.LayerNorm((2, 3))
        self.head = nn.Linear(6, 3)
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for m in (self.gn, self.bn, self.ln):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
            self.bn.running_mean.copy_(0.2 * torch.randn(4, generator=g))
            self.bn.running_var.copy_(0.5 + torch.rand(4, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dw(torch.tanh(self.gn(self.stem(x))))  # (n, 4, 3, 3)
        h = self.act(self.bn(h.mean(-1)))  # BatchNorm1d on (n, C, L)
        h = self.ln(h.reshape(-1, 2, 6)[..., :3])  # (n, 2, 3)
        return self.head(h.flatten(1))


class SamePadConv(nn.Conv2d):
    """A Conv2d subclass that pads asymmetrically inside ``forward`` (as TF-style "same" padding layers do):
    the module's input is not what ``F.conv2d`` sees, so no layer rule may be used for it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(nn.functional.pad(x, (0, 1, 0, 1)))


class Padded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = SamePadConv(2, 3, 3, stride=2)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(3 * 16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(torch.tanh(self.stem(x)))).flatten(1))


class Tokens(nn.Module):
    """A Linear layer applied at every position of a sequence (n, T, d): the per-example gradient sums over T."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.proj(x)).mean(1))


class Mixer(nn.Module):
    """Mixes the examples of a batch (centres by the batch mean): the per-example rules do not hold."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        return self.b(h - h.mean(0, keepdim=True))


def _zoo() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    names = ("mlp", "resnet", "shared", "embedder", "single")
    cases = {name: (BUILDERS[name](), inputs_for(name, 7)) for name in names}
    cases["conv"] = (ConvZoo().double(), torch.randn(7, 2, 7, 9, generator=g, dtype=torch.float64))
    cases["tokens"] = (Tokens().double(), torch.randn(7, 4, 3, generator=g, dtype=torch.float64))
    cases["samepad"] = (Padded().double(), torch.randn(7, 2, 8, 8, generator=g, dtype=torch.float64))
    cases["norms"] = (Norms().double().eval(), torch.randn(7, 2, 7, 7, generator=g, dtype=torch.float64))
    # transformers: batch first with a key padding mask, sequence first without (the other two combinations in
    # test_transformer_encoders_in_every_layout), and MultiheadAttention's other options
    cases["transformer"] = (text_encoder(), token_ids(7))
    cases["transformer-seq"] = (text_encoder(batch_first=False, padded=False), token_ids(7, seed=2))
    cases["attention"] = (cross_attention(), torch.randn(7, 4, 3, generator=g, dtype=torch.float64))
    return cases


ZOO = _zoo()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.fixture(params=["auto", "position-gram", "both"])
def route(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Layers with reused weights by the cheaper form (auto), or all of them in the position-Gram form (kernels)
    and unexpanded (for the cached-factor products: convolutions multiplied by convolution, sequence layers from
    their inputs and output gradients), or ("both") convolutions held in both product forms, each product
    taking the one that is cheaper for its number of vectors, and held for kernels as input and output
    gradients (expanded per block)."""
    from linadapt.jacobian.structured import costs

    if request.param == "position-gram":
        monkeypatch.setattr(costs, "position_gram_cheaper", lambda *_: True)
        monkeypatch.setattr(costs, "position_form_for_products", lambda *_: True)
        monkeypatch.setattr(costs, "conv_forms", lambda *_: (True, False))
    if request.param == "both":
        monkeypatch.setattr(costs, "conv_forms", lambda *_: (True, True))
        monkeypatch.setattr(costs, "held_as_raw", lambda *_: True)  # kernels: convolutions held unexpanded
    return request.param


@pytest.mark.parametrize("name", sorted(ZOO))
@pytest.mark.parametrize("params", ["all", "last", "bias"])
def test_structured_kernel_equals_reference_jacobian(name: str, params: str, route: str) -> None:
    model, X = ZOO[name]
    lin = Linearization(model, params, chunk_size=3)  # several chunks: off-diagonal blocks and their mirror
    J = reference_jacobian(model, X, lin.param_names)  # (n, c, p) by plain autograd
    n, c = J.shape[:2]
    full = torch.einsum("iap,jbp->iajb", J, J)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these models may trigger the disagreement fallback
        warnings.filterwarnings("ignore", "There is a performance drop")  # torch's vmap over attention's backward
        K = lin.ntk(X)
    assert K.shape == (n * c, n * c) and K.dtype == torch.float64
    assert _rel(K, full.reshape(n * c, n * c)) < 1e-12
    assert _rel(lin.ntk(X, output="sum"), torch.diagonal(full, dim1=1, dim2=3).sum(-1)) < 1e-12
    assert _rel(lin.ntk(X, output=c - 1), full[:, c - 1, :, c - 1]) < 1e-12
    blocks = torch.einsum("iap,ibp->iab", J, J)
    assert _rel(lin.ntk_blocks(X), blocks) < 1e-12
    # cross kernel between different inputs, against the plain contraction
    X2 = X[2:5]
    assert _rel(lin.ntk(X, X2), lin.ntk(X, X2, method="jacobian")) < 1e-12
    assert _rel(lin.ntk(X2, X, output="sum"), lin.ntk(X2, X, output="sum", method="jacobian")) < 1e-12


def test_rules_cover_supported_layers_and_fall_back_for_the_rest() -> None:
    model, X = ZOO["conv"]
    lin = Linearization(model)
    engine = lin.structured(lin.prepare_inputs(X))
    assert engine is not None
    assert {layer.name for layer in engine.layers} == {"c1", "c2", "g", "c3", "norm", "head"}
    assert engine.fallback == []
    model, X = ZOO["norms"]  # a parameter of a module without a rule falls back, the rest keep theirs
    lin = Linearization(model)
    engine = lin.structured(lin.prepare_inputs(X))
    assert {layer.name for layer in engine.layers} == {"stem", "gn", "dw", "bn", "ln", "head"}
    assert engine.fallback == ["act.weight"]
    # a layer run twice loses its rule (its weight gets contributions from both calls); the others keep theirs
    model, X = ZOO["shared"]
    lin = Linearization(model)
    engine = lin.structured(lin.prepare_inputs(X))
    assert {layer.name for layer in engine.layers} == {"inp", "out"}
    assert engine.fallback == ["mid.weight", "mid.bias"]
    # a conv subclass with its own forward (padding applied inside) goes to the fallback
    model, X = ZOO["samepad"]
    lin = Linearization(model)
    engine = lin.structured(lin.prepare_inputs(X))
    assert {layer.name for layer in engine.layers} == {"conv", "head"}
    assert engine.fallback == ["stem.weight", "stem.bias"]


def test_a_model_whose_every_layer_is_reused_falls_back_to_autodiff() -> None:
    """All rules demoted (the only layer runs twice): no structured engine, and every entry point — the
    estimators, the dense kernel, the operator — works through the plain Jacobian instead of failing."""
    from linadapt import LinearizedRegressor, NTKOperator

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.l(x) + torch.tanh(self.l(x))

    torch.manual_seed(0)
    model = Twice().double()
    X, Y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    lin = Linearization(model)
    assert lin.structured(lin.prepare_inputs(X)) is None
    J = reference_jacobian(model, X, lin.param_names).reshape(12, -1)  # (n·c, p)
    torch.testing.assert_close(ntk_gram(model, X), J @ J.T, rtol=1e-10, atol=1e-12)
    K = NTKOperator(model, X)
    torch.testing.assert_close(K.to_dense(), J @ J.T, rtol=1e-10, atol=1e-12)
    mean = LinearizedRegressor(model).fit(X, Y).predict(X)
    assert mean.shape == (6, 2) and bool(torch.isfinite(torch.as_tensor(mean)).all())


def test_layers_with_few_positions_and_many_weights_use_the_position_gram() -> None:
    """A 1 × 1 convolution (64 → 64 channels) on a 2 × 2 map: the position Gram (4² pairs) is cheaper than
    contracting its 4,160 per-example gradients per output; a 3 × 3 convolution on 8 × 8 is not."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 64, 3, padding=1),
        nn.Tanh(),
        nn.MaxPool2d(4),
        nn.Conv2d(64, 64, 1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(256, 4),
    ).double()
    X = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    lin = Linearization(model, chunk_size=4)
    engine = lin.structured(lin.prepare_inputs(X))
    f = engine._features(lin.prepare_inputs(X))
    assert f.spatial_names == [("3.weight", "3.bias")] and len(f.dense) == 1  # conv 0: per-example gradients
    J = reference_jacobian(model, X, lin.param_names)
    assert _rel(lin.ntk(X), torch.einsum("iap,jbp->iajb", J, J).reshape(24, 24)) < 1e-12


def test_resnet_batchnorm_parameters_have_a_rule_and_batchnorm_stays_in_eval_mode() -> None:
    model, X = ZOO["resnet"]
    assert model.training
    lin = Linearization(model)
    engine = lin.structured(lin.prepare_inputs(X))
    assert engine.fallback == [] and {"bn", "block.bn"} <= {layer.name for layer in engine.layers}
    K1 = lin.ntk(X[:3])
    K2 = lin.ntk(X)  # BatchNorm uses running statistics: a block does not depend on the other examples
    assert _rel(K2[:9, :9], K1) < 1e-12
    assert model.training  # the user's flags are restored


class NoMixer(Mixer):
    """The same layers without the batch mean: examples independent."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def test_a_model_that_mixes_examples_is_refused_by_every_path() -> None:
    """A model whose output for an example depends on the rest of the batch has no per-example Jacobian that
    the batched products agree with (before: the dense kernel was per-example, NTKOperator's products were not,
    by 2.6 at entries of scale 1): every entry point refuses it with one clear error."""
    torch.manual_seed(0)
    model = Mixer().double()
    X = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randn(6, 2, dtype=torch.float64)
    entry_points = {
        "ntk": lambda: Linearization(model).ntk(X),
        "ntk jacobian": lambda: ntk_gram(model, X, method="jacobian"),
        "operator": lambda: la.NTKOperator(model, X, hold=False) @ torch.ones(12, dtype=torch.float64),
        "cholesky fit": lambda: la.LinearizedRegressor(model, solver="cholesky").fit(X, y),
        "cg fit": lambda: la.LinearizedRegressor(model, solver="cg").fit(X, y),
        "classifier": lambda: la.LinearizedClassifier(model).fit(X, torch.tensor([0, 1, 0, 1, 0, 1])),
    }
    for name, call in entry_points.items():
        with pytest.raises(la.LinearizationError, match="mixes the examples of a batch"):
            call()
        assert name  # each entry point raised


def test_the_examples_check_sees_batch_statistics_nondeterminism_and_not_rounding() -> None:
    """Batch statistics that need two examples (BatchNorm without running statistics) are compared within pairs
    and refused; a forward that is not deterministic is named as such; a float16 network's own rounding (its
    batch and single-example results differ at float16 precision) is not mistaken for mixing."""
    torch.manual_seed(0)
    X = torch.randn(6, 3, dtype=torch.float64)
    stats = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 2)).double()
    with pytest.raises(la.LinearizationError, match="mixes the examples of a batch"):
        Linearization(stats).ntk(X)

    class AlwaysDropout(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.dropout(self.lin(x), 0.5, training=True)

    with pytest.raises(la.LinearizationError, match="not deterministic"):
        Linearization(AlwaysDropout().double()).prepare_inputs(X)
    layers = [m for _ in range(8) for m in (nn.Linear(16, 16), nn.Tanh())]
    half = nn.Sequential(*layers, nn.Linear(16, 2)).half()
    Xh = torch.randn(6, 16).half()
    Linearization(half).prepare_inputs(Xh)  # no error


def test_the_same_layers_without_mixing_agree_on_every_path() -> None:
    """The control: without the batch mean the dense kernel, the operator's torch.func products and the CG and
    Cholesky fits all agree with the plain-autograd reference Jacobian."""
    torch.manual_seed(0)
    model = NoMixer().double()
    X = torch.randn(6, 3, dtype=torch.float64)
    J = reference_jacobian(model, X, [n for n, _ in model.named_parameters()]).reshape(12, -1)
    K = J @ J.T
    assert _rel(Linearization(model).ntk(X), K) < 1e-12
    V = torch.randn(12, 3, dtype=torch.float64)
    assert _rel(la.NTKOperator(model, X, hold=False) @ V, K @ V) < 1e-12


def test_float32_network_kernel_is_float64_and_accurate_to_network_precision() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    X = torch.randn(9, 1, 6, 6)
    K32 = ntk_gram(net, X)
    K64 = ntk_gram(net.double(), X.double(), method="jacobian")
    assert K32.dtype == torch.float64
    assert _rel(K32, K64) < 1e-5


def test_ntk_gram_and_operator_options() -> None:
    model, X = ZOO["mlp"]
    lin = Linearization(model)
    with pytest.raises(ValueError, match="method"):
        ntk_gram(lin, X, method="fast")
    with pytest.raises(ValueError, match="output"):
        ntk_gram(lin, X, output=3)
    from linadapt import NTKOperator

    op = NTKOperator(lin, X)
    assert _rel(op.to_dense(), ntk_gram(lin, X, method="jacobian")) < 1e-12
    op_sum = NTKOperator(lin, X, X[:3], output="sum")
    assert _rel(op_sum.to_dense(), ntk_gram(lin, X, X[:3], output="sum", method="jacobian")) < 1e-12


def test_verification_can_be_switched_off_and_chunking_does_not_change_the_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, X = ZOO["conv"]
    pulls = []
    vjp = Linearization.vjp
    monkeypatch.setattr(Linearization, "vjp", lambda self, *args: pulls.append(1) or vjp(self, *args))
    lin = Linearization(model, chunk_size=2)
    engine = StructuredNTK(lin, verify=False)
    assert engine.check(lin.prepare_inputs(X)) and not pulls  # no comparison with autodiff ran
    K = engine.kernel(lin.prepare_inputs(X))
    assert not pulls
    J = reference_jacobian(model, X, lin.param_names)
    assert _rel(K, torch.einsum("iap,jbp->iajb", J, J).reshape(K.shape)) < 1e-12
    verified = StructuredNTK(Linearization(model, chunk_size=2), verify=True)
    assert verified.check(lin.prepare_inputs(X)) and len(pulls) == 1  # the check's vjp: the counter sees it


@given(
    widths=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    c=st.integers(1, 4),
    n=st.integers(1, 9),
    act=st.sampled_from(["tanh", "relu", "gelu"]),
    seed=st.integers(0, 2**16),
)
def test_structured_mlp_kernel_is_the_jacobian_kernel(widths: list[int], c: int, n: int, act: str, seed: int) -> None:
    """Random MLPs: the structured kernel equals the contraction, is symmetric and positive semi-definite."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    d = 3
    for w in widths:
        layers += [nn.Linear(d, w), {"tanh": nn.Tanh(), "relu": nn.ReLU(), "gelu": nn.GELU()}[act]]
        d = w
    net = nn.Sequential(*layers, nn.Linear(d, c)).double()
    X = torch.randn(n, 3, dtype=torch.float64)
    lin = Linearization(net, chunk_size=4)
    K = lin.ntk(X)
    assert _rel(K, lin.ntk(X, method="jacobian")) < 1e-11
    assert torch.equal(K, K.T)
    assert float(torch.linalg.eigvalsh(K).min()) > -1e-10 * max(1.0, float(K.diagonal().max()))


@pytest.mark.parametrize("name", sorted(ZOO))
@pytest.mark.parametrize("k", [1, 6])  # one vector (broadcast products) and several (batched matmuls)
def test_factored_jacobian_products_equal_autodiff(name: str, k: int, route: str) -> None:
    from linadapt.jacobian.structured import factored_jacobian

    model, X = ZOO[name]
    for params in ("all", "bias"):
        lin = Linearization(model, params, chunk_size=3)  # factors built over chunks, then joined
        Xp = lin.prepare_inputs(X)
        fj = factored_jacobian(lin, Xp, budget=2**30)
        assert fj is not None  # (its factors may be empty: biases of an output layer need none)
        g = torch.Generator().manual_seed(k)
        U = torch.randn(k, X.shape[0], lin.output_dim(Xp), generator=g, dtype=torch.float64)
        V = torch.randn(k, lin.num_params, generator=g, dtype=torch.float64)
        assert _rel(fj.vjp(U), lin.vjp(Xp, U)) < 1e-13
        assert _rel(fj.jvp(V), lin.jvp(Xp, V)) < 1e-13


def test_factored_jacobian_products_in_small_example_blocks(monkeypatch: pytest.MonkeyPatch, route: str) -> None:
    import linadapt.jacobian.structured as structured
    from linadapt.jacobian.structured import costs

    monkeypatch.setattr(costs, "PRODUCT_BUDGET", 7)  # blocks of one example: temporaries stay bounded
    model, X = ZOO["conv"]
    lin = Linearization(model)
    Xp = lin.prepare_inputs(X)
    fj = structured.factored_jacobian(lin, Xp, budget=2**30)
    assert [sl.stop - sl.start for sl in fj._blocks(6)] == [1] * X.shape[0]
    g = torch.Generator().manual_seed(0)
    U = torch.randn(6, X.shape[0], 3, generator=g, dtype=torch.float64)
    V = torch.randn(2, lin.num_params, generator=g, dtype=torch.float64)
    assert _rel(fj.vjp(U), lin.vjp(Xp, U)) < 1e-13
    assert _rel(fj.jvp(V), lin.jvp(Xp, V)) < 1e-13


def test_factored_jacobian_compact_output_gradients() -> None:
    """The output layer's gradients are g_ia = e_a: not stored (None). A layer followed by an elementwise map
    and a linear output layer has g_ia = R_a ⊙ D_i: stored as the two factors. Deeper layers, and layers
    followed by a fixed mixing of the outputs where that breaks neither form, keep what they need."""
    from linadapt.jacobian.structured import factored_jacobian

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    deep = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    mixed = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), _Mix()).double()
    X = torch.randn(7, 4, dtype=torch.float64)

    def form(G) -> str:
        return "identity" if G is None else "rank-one" if isinstance(G, tuple) else "full"

    for model, forms in (
        (plain, ["rank-one", "identity"]),
        (deep, ["full", "rank-one", "identity"]),
        (mixed, ["rank-one", "rank-one"]),  # the mixing is the same for every example: rank one, not identity
    ):
        lin = Linearization(model)
        fj = factored_jacobian(lin, X, budget=2**30)
        assert [form(G) for _, G, _, _ in fj.outer] == forms
        for k in (1, 6):
            U = torch.randn(k, 7, 3, dtype=torch.float64)
            V = torch.randn(k, lin.num_params, dtype=torch.float64)
            assert _rel(fj.vjp(U), lin.vjp(X, U)) < 1e-13
            assert _rel(fj.jvp(V), lin.jvp(X, V)) < 1e-13


def test_convolutions_held_by_convolution_and_materialised_each_where_cheaper() -> None:
    """The benchmark CNN's second convolution (followed by ReLU and the output layer: output gradients of rank
    one) is kept as its input and output gradients for products by convolution — cheaper for one vector than a
    memory-bound pass over its materialised per-example gradients; those are cheaper for many vectors and are
    formed from the held factors on the first product with many vectors. The first convolution (general
    output gradients, few weights) is materialised at build. Products through either route equal autodiff;
    a materialised form that would not fit the budget is not formed (and the convolution serves)."""
    from linadapt.app.bench import cnn
    from linadapt.jacobian.structured import costs, factored_jacobian

    torch.manual_seed(0)
    model = cnn().double()
    X = torch.randn(12, 1, 8, 8, dtype=torch.float64)
    lin = Linearization(model, chunk_size=5)
    fj = factored_jacobian(lin, X, budget=2**30)
    assert [w for *_, w, _ in fj.conv] == ["2.weight"] and fj._wants_dense == [True]
    assert [names for _, names in fj.dense] == [["0.weight", "0.bias"]]
    lean_bytes = fj.nbytes()
    g = torch.Generator().manual_seed(1)
    for k in (1, 2, 16, 1):
        U = torch.randn(k, 12, 10, generator=g, dtype=torch.float64)
        V = torch.randn(k, lin.num_params, generator=g, dtype=torch.float64)
        assert _rel(fj.vjp(U), lin.vjp(X, U)) < 1e-13
        assert _rel(fj.jvp(V), lin.jvp(X, V)) < 1e-13
        if k == 2:  # still by convolution
            assert len(fj.dense) == 1 and fj._conv_routes(2) == ([0], set())
    assert [names for _, names in fj.dense] == [["0.weight", "0.bias"], ["2.weight", "2.bias"]]
    assert fj._conv_routes(1) == ([0], {1}) and fj._conv_routes(16) == ([], set())
    # the block formed from the held factors equals the one the network's backward pass gives
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(costs, "conv_forms", lambda *_: (False, True))
        plain = factored_jacobian(Linearization(model, chunk_size=5), X, budget=2**30)
    assert _rel(fj.dense[1][0], plain.dense[1][0]) < 1e-14
    # within a budget that has no room for it, the materialised form is never formed
    tight = factored_jacobian(Linearization(model), X, budget=2**30)
    tight.budget = lean_bytes + 1  # (the build's own check counts the output gradients before compaction)
    U = torch.randn(16, 12, 10, generator=g, dtype=torch.float64)
    assert _rel(tight.jvp(tight.vjp(U)), fj.jvp(fj.vjp(U))) < 1e-13
    assert len(tight.dense) == 1 and tight._wants_dense == [False] and tight._conv_routes(16) == ([0], set())


@pytest.mark.parametrize("forms", [(True, False), (True, True), (False, True)])
def test_convolution_whose_outputs_are_the_networks_outputs(monkeypatch: pytest.MonkeyPatch, forms) -> None:
    """A fully convolutional network (outputs = the last convolution's map, flattened): its output gradients
    are the identity, which the position-major layout of the products by convolution reorders."""
    import linadapt.jacobian.structured as structured
    from linadapt.jacobian.structured import costs

    monkeypatch.setattr(costs, "conv_forms", lambda *_: forms)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 2, stride=2), nn.Flatten()).double()
    X = torch.randn(5, 2, 4, 4, dtype=torch.float64)  # 2 channels × 2 × 2 = 8 outputs
    lin = Linearization(model)
    fj = structured.factored_jacobian(lin, X, budget=2**30)
    assert len(fj.conv) == (2 if forms[0] else 0)
    assert len(fj.dense) == (0 if forms[0] else 2)  # (with both forms: materialised on first use)
    g = torch.Generator().manual_seed(0)
    for k in (1, 3, 20):
        U = torch.randn(k, 5, 8, generator=g, dtype=torch.float64)
        V = torch.randn(k, lin.num_params, generator=g, dtype=torch.float64)
        assert _rel(fj.vjp(U), lin.vjp(X, U)) < 1e-13
        assert _rel(fj.jvp(V), lin.jvp(X, V)) < 1e-13


@pytest.mark.parametrize("forms", [(True, False), (True, True)])
def test_channels_last_model_and_inputs(monkeypatch: pytest.MonkeyPatch, forms) -> None:
    """A model and inputs already in channels-last memory (as users convert them for speed): the layer inputs and
    output gradients the hooks see are channels-last too; kernels and products are unchanged."""
    import linadapt.jacobian.structured as structured
    from linadapt.jacobian.structured import costs

    monkeypatch.setattr(costs, "conv_forms", lambda *_: forms)
    model, X = ZOO["conv"]
    ref = Linearization(model)
    K_ref = ref.ntk(X)
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    X_cl = X.contiguous(memory_format=torch.channels_last)
    lin = Linearization(model_cl)
    assert _rel(lin.ntk(X_cl), K_ref) < 1e-12
    fj = structured.factored_jacobian(lin, lin.prepare_inputs(X_cl), budget=2**30)
    assert [w for *_, w, _ in fj.conv] == ["c1.weight", "c2.weight", "c3.weight"]  # (the grouped conv: no rule)
    g = torch.Generator().manual_seed(0)
    for k in (1, 5):
        U = torch.randn(k, X.shape[0], 3, generator=g, dtype=torch.float64)
        V = torch.randn(k, lin.num_params, generator=g, dtype=torch.float64)
        assert _rel(fj.vjp(U), ref.vjp(X, U)) < 1e-13
        assert _rel(fj.jvp(V), ref.jvp(X, V)) < 1e-13


def test_convolution_product_cost_model() -> None:
    from linadapt.jacobian.structured.costs import conv_forms

    # 3×3 conv 16 → 32 on 8 × 8 before the output layer (rank-one output gradients: 2,048 stored entries)
    assert conv_forms(64, 144, 32, 10, 2048, 1024) == (True, True)
    # the same layer with general output gradients (c× more stored): still both, with 3 outputs (as many
    # stored entries, fewer materialised) materialised only
    assert conv_forms(64, 144, 32, 10, 20480, 1024) == (True, True)
    assert conv_forms(64, 144, 32, 3, 6144, 1024) == (False, True)
    # the first conv of that network (1 → 16 channels): few weights per output, materialised only
    assert conv_forms(64, 9, 16, 10, 10240, 64) == (False, True)
    # a 1 × 1 conv 320 → 1280 on 2 × 2 (an image network's head): by convolution only, at any number of vectors
    assert conv_forms(4, 320, 1280, 10, 5120, 1280) == (True, False)


def test_rank_one_detection_rejects_near_rank_one() -> None:
    from linadapt.jacobian.structured.output_gradients import rank_one_outputs

    g = torch.Generator().manual_seed(0)
    R, D = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    G = R[:, None] * D[None]
    R2, D2 = rank_one_outputs(G)
    assert torch.allclose(R2[:, None] * D2[None], G, rtol=0, atol=1e-15)
    G[1, 2, 3] += 1e-9  # one entry off: not rank one
    assert rank_one_outputs(G) is None
    D[:, 1] = 0.0  # a column of zeros (a dead unit) is fine
    R3, D3 = rank_one_outputs(R[:, None] * D[None])
    assert torch.allclose(R3[:, None] * D3[None], R[:, None] * D[None], rtol=0, atol=1e-15)


class _Mix(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 0.0], [0.2, 0.0, 1.0]], dtype=x.dtype)


def test_factored_jacobian_declines_when_too_big_or_too_many_outputs() -> None:
    from linadapt.jacobian.structured import factored_jacobian

    model, X = ZOO["mlp"]
    lin = Linearization(model)
    Xp = lin.prepare_inputs(X)
    assert factored_jacobian(lin, Xp, budget=100) is None  # factors would not fit
    assert factored_jacobian(lin, Xp, budget=2**30, max_outputs=2) is None  # 3 outputs: building costs 3 passes
    assert factored_jacobian(lin, Xp[:0], budget=2**30) is None


def test_solvers_use_the_factors_and_agree_with_torch_func_products(monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    model, X = ZOO["conv"]
    Y = torch.randn(X.shape[0], 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    settings = {"prior_var": 0.7, "noise_var": 0.1, "optimize_hyperparameters": False, "solver": "cg"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # CG, not a Cholesky fallback
        reg, got, expected, served = fit_held_and_plain(monkeypatch, model, X, Y, X[:3] * 0.5, settings)
    assert reg.solver_ == "cg" and reg.solve_info_.converged
    # what the CG iterations' products with J(X) ran: the cached factors, never torch.func
    assert served["FactoredJacobian.jvp"] >= reg.solve_info_.iterations
    assert served["FactoredJacobian.vjp"] >= reg.solve_info_.iterations
    assert served["Linearization.jvp"] == served["Linearization.vjp"] == 0
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-9, atol=1e-10)
    ref = gp_closed_form(model, reg.linearization_.param_names, X, Y, X[:3] * 0.5, 0.7, 0.1)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-8, atol=1e-9)


def test_dense_kernel_cost_model_and_the_solver_choice_it_informs() -> None:
    from linadapt.inference.regression import choose_solver, dense_kernel_flops

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    lin = Linearization(net)
    X = lin.prepare_inputs(torch.randn(5, 3, dtype=torch.float64))
    # per pair of examples: (3 + 2²·8) + (8 + 2²·2) multiply-adds
    assert lin.structured(X).pair_flops(X) == 35 + 16
    assert dense_kernel_flops(lin, X) == 25 * 51
    # 1,000 examples, 1M weights: N² p = 1e12 says CG; per-layer rules (~4,000 per pair) make it cheap
    assert choose_solver("function", 1000, 1_000_000) == "cg"
    assert choose_solver("function", 1000, 1_000_000, kernel_flops=4e9) == "cholesky"
    # N = 10,000 (measured, docs/performance.md, with a budget its 2.4 GB dense path fits): CG wins at p = 10k,
    # the dense path at p = 1M
    big = 4 * 2**30
    assert choose_solver("function", 10_000, 10_201, big, kernel_flops=3.73e10) == "cg"
    assert choose_solver("function", 10_000, 1_000_695, big, kernel_flops=3.97e11) == "cholesky"
    # the dense path holds K, A and its Cholesky factor: 3 N² float64, 2.4 GB at N = 10,000, past 2 GiB
    assert choose_solver("function", 10_000, 1_000_695, 2 * 2**30, kernel_flops=3.97e11) == "cg"
    assert choose_solver("function", 20_000, 1_000_000, big, kernel_flops=1.0) == "cg"  # 9.6 GB: does not fit


def test_profile_products_counts_the_mlp_multiply_adds():
    """benchmarks/profile_products.py's count, which docs/performance.md's floor argument rests on: the pass is
    3 products per layer (2 for the first), the cached K·v 2 per layer plus 2·c·d_out per example for each
    layer whose output gradients are not the identity."""
    import importlib.util
    from pathlib import Path

    from linadapt.app.bench import mlp
    from linadapt.jacobian.structured import factored_jacobian

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "profile_products.py"
    spec = importlib.util.spec_from_file_location("profile_products", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    n, model = 32, mlp()
    f = factored_jacobian(Linearization(model), torch.randn(n, 64), budget=2**31)
    pass_macs, product = module._macs(model, f, n)
    assert pass_macs == n * (64 * 256 * 2 + 256 * 256 * 3 + 256 * 10 * 3)
    # first layer: general output gradients; second: rank one; third: the identity (no contraction)
    assert product == n * (2 * 64 * 256 + 2 * 10 * 256 + 2 * 256 * 256 + 2 * 10 * 256 + 2 * 256 * 10)


def test_promoted_factors_give_exact_symmetric_products():
    """FactoredJacobian.promote(): a float32 network's factors held in float64 from then on — products equal
    the float32 ones to float32 rounding and are symmetric to float64 rounding (what CG needs); the budget
    can refuse it."""
    from linadapt.app.bench import cnn, mlp
    from linadapt.jacobian.structured import factored_jacobian

    torch.manual_seed(0)
    for model, X in ((mlp(), torch.randn(40, 64)), (cnn(), torch.randn(24, 1, 8, 8))):
        lin = Linearization(model)
        f = factored_jacobian(lin, X, budget=2**31)
        g = torch.Generator().manual_seed(1)
        u, v = (torch.randn(1, X.shape[0], 10, generator=g, dtype=torch.float64) for _ in range(2))
        before = f.jvp(f.vjp(v))
        assert f.promote() and f.dtype == torch.float64 and not f.promote()
        Kv, Ku = f.jvp(f.vjp(v)), f.jvp(f.vjp(u))
        torch.testing.assert_close(Kv, before, rtol=1e-4, atol=1e-5 * float(before.abs().max()))
        asym = float((u * Kv).sum() - (v * Ku).sum())
        assert abs(asym) <= 1e-12 * float((u * Kv).sum().abs())
    f = factored_jacobian(Linearization(mlp()), torch.randn(40, 64), budget=2**31)
    f.budget = int(1.5 * f.nbytes())
    assert not f.promote() and f.dtype == torch.float32


@pytest.mark.parametrize("name", sorted(ZOO))
@pytest.mark.parametrize("held", [0.5, 10])  # the budget in examples' held factors: none held, or groups of two
def test_kernels_within_a_small_budget_stream_factors_and_stay_exact(name: str, held: float) -> None:
    """When the factors of all examples do not fit the budget, the square kernel holds groups of row chunks and
    streams the column chunks past them, and the predictive's cross kernels recompute the training factors per
    test chunk: both exact."""
    model, X = ZOO[name]
    probe = Linearization(model, chunk_size=1)
    engine = probe.structured(probe.prepare_inputs(X))
    if engine is None:
        pytest.skip("no layer rule applies")
    engine._size(probe.prepare_inputs(X), probe.output_dim(probe.prepare_inputs(X)))
    budget = int(held * engine._held_bytes())
    lin = Linearization(model, chunk_size=1, memory_budget=max(budget, 1))
    J = reference_jacobian(model, X, lin.param_names)
    n, c = J.shape[:2]
    full = torch.einsum("iap,jbp->iajb", J, J)
    Xp = lin.prepare_inputs(X)
    small = lin.structured(Xp)  # its kernel directly: the dense result itself is above such budgets
    assert _rel(small.kernel(Xp), full.reshape(n * c, n * c)) < 1e-12
    assert _rel(small.kernel(Xp, output="sum"), torch.diagonal(full, dim1=1, dim2=3).sum(-1)) < 1e-12
    Xs = X[:5].flip(0)
    Js = J[:5].flip(0)
    for sl, Kx, Kss in lin.cross_kernel_chunks(X, Xs, size=2):
        b = sl.stop - sl.start
        assert _rel(Kx, torch.einsum("iap,jbp->iajb", J, Js[sl]).reshape(n * c, b * c)) < 1e-12
        assert _rel(Kss, torch.einsum("iap,ibp->iab", Js[sl], Js[sl])) < 1e-12


def test_layer_forms_list_every_selected_weight_and_the_form_the_cost_model_chose(monkeypatch) -> None:
    from linadapt.jacobian.structured import costs

    model, X = ZOO["norms"]
    lin = Linearization(model)
    rows = lin.layer_forms(X)
    assert sum(r["weights"] for r in rows) == lin.num_params
    by_layer = {r["layer"]: r for r in rows}
    assert by_layer["head"]["kernel"] == by_layer["head"]["products"] == "outer"
    assert by_layer["bn"]["type"] == "BatchNorm1d" and by_layer["bn"]["kernel"] == "materialised"
    assert by_layer["act.weight"]["kernel"] == "per-example Jacobian"
    model, X = ZOO["conv"]
    monkeypatch.setattr(costs, "position_gram_cheaper", lambda *_: True)
    monkeypatch.setattr(costs, "conv_forms", lambda *_: (True, False))
    forms = {r["layer"]: (r["kernel"], r["products"]) for r in Linearization(model).layer_forms(X)}
    assert forms["c1"] == forms["c2"] == ("position Gram", "by convolution")
    assert forms["g"] == ("materialised", "materialised")  # grouped: one form


def test_held_convolutions_expand_a_slab_at_a_time_and_once_per_chunk_pair(monkeypatch) -> None:
    """Kernels from convolutions held as input and output gradients: a block expands them a slab of output
    channels at a time (never a layer's whole gradients), a diagonal block once (k² expansions per layer for k
    chunks, not k(k+1)), and kernel chunks count them by their input and output gradients; a float32 network's
    are expanded in float32, as materialised layers are formed: its kernel is the all-materialised one to
    float64 rounding."""
    from linadapt.jacobian.structured import assembly, costs

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(4, 2, 3, stride=2),
        nn.Flatten(),
        nn.Linear(8, 3),
    )
    X = torch.randn(10, 1, 6, 6)
    materialised = Linearization(net, chunk_size=3).ntk(X)
    monkeypatch.setattr(costs, "held_as_raw", lambda *_: True)
    assert _rel(Linearization(net, chunk_size=3).ntk(X), materialised) < 1e-12  # float32: same expansion
    net, X = net.double(), X.double()
    lin = Linearization(net, chunk_size=3)
    Xp = lin.prepare_inputs(X)
    engine = lin.structured(Xp)
    expansions, columns = [], []
    slabs = assembly.raw_slabs

    def counted(*raw):
        expansions.append(raw[2])
        for d in slabs(*raw):
            columns.append(d.shape[-1])
            yield d

    monkeypatch.setattr(assembly, "raw_slabs", counted)
    monkeypatch.setattr(assembly, "_RAW_SLAB_ENTRIES", 1)  # one output channel per slab
    K = engine.kernel(Xp)
    assert len(expansions) == 3 * 4**2  # 3 convolutions, 4 chunks (3, 3, 3, 1)
    assert max(columns) == 4 * 9  # the widest slab: one channel of the last convolution (4 inputs, 3 × 3)
    J = reference_jacobian(net, X, lin.param_names)
    assert _rel(K, torch.einsum("iap,jbp->iajb", J, J).reshape(30, 30)) < 1e-12
    for sl, Kx, Kss in engine.cross_kernel_chunks(Xp, Xp[:4], 2):  # cross kernels and their diagonal blocks
        assert _rel(Kx, torch.einsum("iap,jbp->iajb", J, J[sl]).reshape(30, 6)) < 1e-12
        assert _rel(Kss, torch.einsum("iap,ibp->iab", J[sl], J[sl])) < 1e-12
    # a chunk: the convolutions' inputs and output gradients per example (1·36 + 3·3·36, 3·36 + 3·4·36, 4·36 +
    # 3·2·4), not their materialised gradients (3 outputs × (30 + 112 + 74) columns)
    entries = 3 * 1068
    small = Linearization(net, memory_budget=32 * entries).structured(Xp)
    assert small.feature_entries == entries
    assert small._size(Xp, 3, True) == 3
    assert small._size(Xp, 3) == entries // (3 * (30 + 112 + 74)) == 4


@pytest.mark.parametrize("batch_first, padded", [(True, False), (False, True)])
def test_transformer_encoders_in_every_layout(batch_first: bool, padded: bool) -> None:
    """The zoo's transformers are batch first with a key padding mask and sequence first without; the other two
    combinations: every weight by a rule (none by the per-example Jacobian), kernel and products exact."""
    from linadapt.jacobian.structured import factored_jacobian

    model, X = text_encoder(batch_first=batch_first, padded=padded), token_ids(6, seed=4)
    lin = Linearization(model, chunk_size=4)
    Xp = lin.prepare_inputs(X)
    assert lin.structured(Xp).fallback == []
    J = reference_jacobian(model, X, lin.param_names)
    assert _rel(lin.ntk(X), torch.einsum("iap,jbp->iajb", J, J).reshape(18, 18)) < 1e-12
    fj = factored_jacobian(lin, Xp, budget=2**30)
    g = torch.Generator().manual_seed(0)
    U = torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
    V = torch.randn(2, lin.num_params, generator=g, dtype=torch.float64)
    assert _rel(fj.vjp(U), torch.einsum("iap,kia->kp", J, U)) < 1e-12
    assert _rel(fj.jvp(V), lin.jvp(Xp, V)) < 1e-12


def test_layer_forms_list_the_embedding_and_attention_forms(monkeypatch) -> None:
    from linadapt.jacobian.structured import costs

    model, X = ZOO["transformer"]
    lin = Linearization(model)
    rows = {r["layer"]: r for r in lin.layer_forms(X)}
    assert sum(r["weights"] for r in rows.values()) == lin.num_params
    assert all(r["type"] != "(no rule)" for r in rows.values())
    assert rows["tokens"]["type"] == "Embedding"
    assert rows["tokens"]["kernel"] == rows["tokens"]["products"] == "index Gram"
    assert rows["positions"]["kernel"] == "index Gram"  # a (1, T) id buffer broadcast over the batch
    attn = rows["encoder.layers.0.self_attn"]
    assert attn["type"] == "MultiheadAttention" and attn["weights"] == 4 * 8 * 8 + 4 * 8
    assert attn["kernel"] in ("position Gram", "materialised")
    monkeypatch.setattr(costs, "position_gram_cheaper", lambda *_: True)
    rows = {r["layer"]: r for r in Linearization(model).layer_forms(X)}
    assert rows["encoder.layers.0.self_attn"]["kernel"] == "position Gram"
    # few table rows (no more than positions): materialised
    model = nn.Sequential(nn.Embedding(3, 4), nn.Flatten(), nn.Linear(20, 2)).double()
    rows = Linearization(model).layer_forms(torch.randint(0, 3, (4, 5)))
    assert rows[0]["kernel"] == rows[0]["products"] == "materialised"


def test_index_gram_visits_the_matching_pairs_only_and_equals_the_one_hot_position_gram() -> None:
    from linadapt.jacobian.structured.assembly import (
        index_diagonal_blocks,
        index_gram_block,
        matching_pairs,
        position_gram_block,
    )

    g = torch.Generator().manual_seed(0)
    keys1, keys2 = torch.randint(-1, 6, (40,), generator=g), torch.randint(-1, 6, (30,), generator=g)
    r1, r2 = matching_pairs(keys1, keys2)
    brute = {(i, j) for i in range(40) for j in range(30) if keys1[i] == keys2[j] >= 0}
    assert set(zip(r1.tolist(), r2.tolist())) == brute and len(r1) == len(brute)
    ids1, ids2 = torch.randint(-1, 9, (4, 5), generator=g), torch.randint(-1, 9, (3, 5), generator=g)
    G1 = torch.randn(2, 4, 5, 3, generator=g, dtype=torch.float64)
    G2 = torch.randn(2, 3, 5, 3, generator=g, dtype=torch.float64)

    def one_hot(ids: torch.Tensor) -> torch.Tensor:  # (b, P, 9); no row where the id is -1
        return nn.functional.one_hot(ids.clamp_min(0), 9).double() * (ids >= 0).unsqueeze(-1)

    for trace in (False, True):
        ref = position_gram_block(one_hot(ids1), G1, one_hot(ids2), G2, False, trace)
        assert _rel(index_gram_block(ids1, G1, ids2, G2, trace), ref) < 1e-14
    ref = position_gram_block(one_hot(ids1), G1, one_hot(ids1), G1, False, False)
    assert _rel(index_diagonal_blocks(ids1, G1), torch.einsum("iaib->iab", ref)) < 1e-14


def test_embedding_options_the_rule_cannot_see_fall_back_exactly() -> None:
    """max_norm (rows renormalised in the forward), scale_grad_by_freq (a backward that is not the forward's
    derivative) and sparse gradients are refused by the rule; padding rows get no gradient, and J v is the adjoint
    of Jᵀ u (forward mode would differentiate through the padding row autograd keeps fixed)."""
    from linadapt.jacobian.structured.registry import rule_for

    assert rule_for(nn.Embedding(5, 3)) is not None and rule_for(nn.Embedding(5, 3, padding_idx=0)) is not None
    for kwargs in ({"max_norm": 1.0}, {"scale_grad_by_freq": True}, {"sparse": True}):
        assert rule_for(nn.Embedding(5, 3, **kwargs)) is None
    torch.manual_seed(0)
    model, X = ZOO["transformer"]
    lin = Linearization(model)
    Xp = lin.prepare_inputs(X)
    g = torch.Generator().manual_seed(1)
    U = torch.randn(7, 3, generator=g, dtype=torch.float64)
    V = torch.randn(lin.num_params, generator=g, dtype=torch.float64)
    Ju, Jv = lin.vjp(Xp, U), lin.jvp(Xp, V)
    assert abs(float(Ju @ V - (U * Jv).sum())) < 1e-12 * float(Ju.abs().sum() * V.abs().max())
    assert float(lin.unflatten(Ju)["tokens.weight"][0].abs().max()) == 0.0  # the padding row


def test_attention_the_rule_cannot_recompute_falls_back_exactly(monkeypatch) -> None:
    """If the rule's recomputed attention differs from the module's output (here: masks ignored, as for a call
    the rule did not model), the module's parameters go to the Jacobian contraction at the engine's first check;
    the kernel stays exact. A subclass with its own forward, or unbatched inputs, are refused the same way."""
    from linadapt.jacobian.structured.rules import attention

    monkeypatch.setattr(attention, "_additive", lambda mask, dtype: torch.zeros_like(mask, dtype=dtype))
    model, X = ZOO["transformer"]
    lin = Linearization(model)
    engine = lin.structured(lin.prepare_inputs(X))
    assert {"encoder.layers.0.self_attn.in_proj_weight", "encoder.layers.1.self_attn.out_proj.bias"} <= set(
        engine.fallback
    )
    assert not any(n.startswith("encoder.layers.0.linear") for n in engine.fallback)
    J = reference_jacobian(model, X, lin.param_names)
    assert _rel(lin.ntk(X), torch.einsum("iap,jbp->iajb", J, J).reshape(21, 21)) < 1e-12

    class Unbatched(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2)
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n, T, 4): each example's (T, 4) on its own
            return self.head(torch.stack([self.attn(e, e, e)[0].mean(0) for e in x]))

    model = Unbatched().double()
    lin = Linearization(model)
    X = torch.randn(3, 5, 4, dtype=torch.float64)
    engine = lin.structured(lin.prepare_inputs(X))
    assert engine.fallback == [n for n in lin.param_names if n.startswith("attn.")]
    J = reference_jacobian(model, X, lin.param_names)
    assert _rel(lin.ntk(X), torch.einsum("iap,jbp->iajb", J, J).reshape(6, 6)) < 1e-12


def test_transformer_kernel_within_a_small_memory_budget(monkeypatch) -> None:
    """With a budget that holds the factors of about two examples, the kernel of the transformer is formed from
    groups of row chunks with the column chunks streamed past (features recomputed), never from all examples'
    factors at once, and equals the kernel with the default budget."""
    from linadapt.jacobian.structured import engine as engine_module

    model, X = ZOO["transformer"]
    full = Linearization(model).ntk(X)
    probe = Linearization(model, chunk_size=1)
    Xp = probe.prepare_inputs(X)
    eng = probe.structured(Xp)
    eng._size(Xp, 3)
    budget = 2 * eng._held_bytes()
    lin = Linearization(model, chunk_size=1, memory_budget=budget)
    small = lin.structured(lin.prepare_inputs(X))
    held, peak = [], [0]
    features = engine_module.StructuredNTK._features

    def counted(self, *args, **kwargs):
        f = features(self, *args, **kwargs)
        held.append(engine_module.feature_bytes(f))
        return f

    monkeypatch.setattr(engine_module.StructuredNTK, "_features", counted)
    K = small.kernel(lin.prepare_inputs(X))
    assert len(held) > X.shape[0]  # features recomputed: the budget does not hold all of them
    peak[0] = max(held)
    assert peak[0] <= budget and _rel(K, full) < 1e-12


def test_jvp_without_forward_mode_comes_from_the_layer_factors(monkeypatch) -> None:
    """torch has no forward-mode derivative for the fused encoder layer (nor for scaled_dot_product_attention):
    Linearization.jvp then takes J v from per-chunk layer factors (reused-weight layers unexpanded, one matrix
    product per vector) instead of per-example Jacobians of all weights; exact."""
    from linadapt.jacobian import linearization

    calls = []
    monkeypatch.setattr(linearization, "factored_jvp", lambda *a: calls.append(1) or factored_jvp(*a))
    monkeypatch.setattr(Linearization, "_basis_jacobian", lambda *a: pytest.fail("per-example Jacobian"))
    model, X = ZOO["transformer"]
    lin = Linearization(model, chunk_size=3)
    J = reference_jacobian(model, X, lin.param_names)
    V = torch.randn(2, lin.num_params, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = lin.jvp(X, V)
    assert not lin._forward_ad and calls
    V[:, lin._fixed_entries] = 0.0  # the padding row: no gradient in reverse mode, so none here either
    assert _rel(got, torch.einsum("iap,kp->kia", J, V)) < 1e-12


def test_factors_held_per_position_when_only_those_fit(monkeypatch) -> None:
    """Sequence layers' materialised factors (c · d_out · d_in per example) that do not fit the budget while their
    inputs and output gradients per position (P · (d_in + c · d_out)) do: the kernel and the predictive's cross
    kernels hold those (position Grams) rather than recomputing factors for every group of examples, when the
    cost model says the position pairs cost less than the recomputation; exact either way."""
    from models import TextEncoder

    from linadapt.jacobian.structured import costs

    torch.manual_seed(0)
    model, X = TextEncoder(d=32).double().eval(), token_ids(9, seed=5)
    lin = Linearization(model)
    J = reference_jacobian(model, X, lin.param_names)
    full = torch.einsum("iap,jbp->iajb", J, J)
    probe = Linearization(model).structured(lin.prepare_inputs(X))
    probe._size(lin.prepare_inputs(X), 3)
    assert probe._held_bytes("positions") < probe._held_bytes() / 2
    budget = 2 * 9 * (probe._held_bytes("positions") + probe._held_bytes()) // 2  # between the two
    calls = []
    monkeypatch.setattr(costs, "hold_positions", lambda *a: calls.append(a) or True)
    small = Linearization(model, memory_budget=budget)
    Xp = small.prepare_inputs(X)
    engine = small.structured(Xp)
    assert _rel(engine.kernel(Xp), full.reshape(27, 27)) < 1e-12 and calls
    assert engine._held_mode(9, budget // 2, budget // 4) == "positions"
    held = engine._features(Xp, compact="positions")  # the padding positions (no gradient) are left out
    assert max(A.shape[1] for A, _, _ in held.spatial) == int((X != 0).sum(1).max()) < X.shape[1]
    Xs = X[:4].flip(0)
    for sl, Kx, Kss in small.cross_kernel_chunks(X, Xs, size=3):
        Js = J[:4].flip(0)[sl]
        assert _rel(Kx, torch.einsum("iap,jbp->iajb", J, Js).reshape(27, -1)) < 1e-12
        assert _rel(Kss, torch.einsum("iap,ibp->iab", Js, Js)) < 1e-12
    # the cost model: position pairs cheaper than recomputing the factors for every group of two examples
    materialised, positions, forming = engine._position_costs
    assert costs.hold_positions(materialised, positions, forming, 2) == (positions - materialised < forming / 2)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_factored_jvp_equals_the_reference_jacobian(name: str) -> None:
    model, X = ZOO[name]
    lin = Linearization(model, chunk_size=3)
    Xp = lin.prepare_inputs(X)
    engine = lin.structured(Xp)
    if engine is None:
        pytest.skip("no layer rule applies")
    J = reference_jacobian(model, X, lin.param_names)
    V = torch.randn(2, lin.num_params, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    V[:, lin._fixed_entries] = 0.0
    assert _rel(factored_jvp(engine, Xp, V), torch.einsum("iap,kp->kia", J, V)) < 1e-12


class _AttentionOptions(nn.Module):
    """One nn.MultiheadAttention call with the options the zoo does not use: per-head weights returned and used,
    no biases, a boolean per-example-and-head attention mask with a key padding mask (sequence first), or
    separate key / value widths without bias_kv."""

    def __init__(self, case: str) -> None:
        super().__init__()
        self.case = case
        kdim = 5 if case == "separate" else None
        self.attn = nn.MultiheadAttention(6, 2, bias=case != "no-bias", kdim=kdim, vdim=kdim)
        self.proj = nn.Linear(3, 6)
        self.mem = nn.Linear(3, kdim or 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n, T, 3)
        n, T, _ = x.shape
        q = torch.tanh(self.proj(x)).transpose(0, 1)
        kv = torch.tanh(self.mem(x)).transpose(0, 1)
        kwargs: dict = {}
        if self.case == "masks":
            kwargs["key_padding_mask"] = x[:, :, 0] > 1.0  # data-dependent padding
            kwargs["key_padding_mask"][:, 0] = False
            kwargs["attn_mask"] = (torch.arange(T)[None, :] > torch.arange(T)[:, None]).repeat(n * 2, 1, 1)
        per_head = self.case == "per-head"
        o, w = self.attn(q, kv, kv, average_attn_weights=not per_head, **kwargs)
        out = self.head(o.mean(0))
        return out + w.reshape(n, -1)[:, :2] if per_head else out


@pytest.mark.parametrize("case", ["per-head", "no-bias", "masks", "separate"])
def test_attention_options_are_exact(case: str) -> None:
    torch.manual_seed(0)
    model = _AttentionOptions(case).double().eval()
    X = torch.randn(5, 4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for params in ("all", "bias") if case != "no-bias" else ("all",):
        lin = Linearization(model, params, chunk_size=2)
        Xp = lin.prepare_inputs(X)
        assert lin.structured(Xp).fallback == []
        J = reference_jacobian(model, X, lin.param_names)
        assert _rel(lin.ntk(X), torch.einsum("iap,jbp->iajb", J, J).reshape(10, 10)) < 1e-12


def test_a_network_that_cannot_run_on_an_expanded_embedding_output_falls_back() -> None:
    """Position embeddings of a (1, T) id buffer are expanded to the batch so that their output gradients are per
    example; a network that reshapes that output by ``view`` (impossible on the expanded view) hands that table to
    the Jacobian contraction at the first check, and keeps the rules of the other layers; exact."""

    class Viewed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tokens = nn.Embedding(9, 4)
            self.positions = nn.Embedding(6, 4)
            self.register_buffer("ids", torch.arange(6).unsqueeze(0), persistent=False)
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            T = x.shape[1]
            h = torch.tanh(self.tokens(x) + self.positions(self.ids[:, :T]).view(T, 4))
            return self.head(h.mean(1))

    torch.manual_seed(0)
    model = Viewed().double()
    X = torch.randint(0, 9, (5, 6), generator=torch.Generator().manual_seed(0))
    lin = Linearization(model)
    engine = lin.structured(lin.prepare_inputs(X))
    assert engine.fallback == ["positions.weight"] and {layer.name for layer in engine.layers} == {"tokens", "head"}
    J = reference_jacobian(model, X, lin.param_names)
    assert _rel(lin.ntk(X), torch.einsum("iap,jbp->iajb", J, J).reshape(10, 10)) < 1e-12
