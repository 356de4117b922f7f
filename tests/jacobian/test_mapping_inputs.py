"""Keyword inputs (a mapping of tensors, ``model(**X)``) and ``output_fn``: the tangent kernel and the products
through them equal those of an equivalent network taking one positional tensor, in every engine."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from keyword_models import Positional, TinyEncoder, tokens
from torch import nn

from linadapt import NTKOperator, ntk_gram
from linadapt._inputs import KeywordInputs, as_inputs
from linadapt.jacobian.linearization import Linearization, LinearizationError


@dataclass
class Output:
    logits: torch.Tensor


class AttributeOutput(nn.Module):
    """Returns an object with a ``.logits`` attribute (as HuggingFace's ModelOutput)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Output:
        return Output(self.inner(input_ids, attention_mask)["logits"])


@pytest.fixture
def net() -> nn.Module:
    torch.manual_seed(0)
    return TinyEncoder().double()


@pytest.mark.parametrize("method", ["auto", "jacobian"])
def test_kernel_equals_positional_wrapper(net: nn.Module, method: str) -> None:
    X, Xp = tokens()
    lin, ref = Linearization(net, chunk_size=3), Linearization(Positional(net), chunk_size=3)
    if method == "auto":
        assert lin.structured(lin.prepare_inputs(X)) is not None  # the per-layer engine runs on keyword inputs
    torch.testing.assert_close(lin.ntk(X, method=method), ref.ntk(Xp, method=method), rtol=0, atol=0)
    X2, Xp2 = tokens(4, seed=1)
    torch.testing.assert_close(lin.ntk(X, X2, method=method), ref.ntk(Xp, Xp2, method=method), rtol=0, atol=0)
    torch.testing.assert_close(lin.ntk_blocks(X, method=method), ref.ntk_blocks(Xp, method=method), rtol=0, atol=0)


def test_products_and_jacobian_equal_positional_wrapper(net: nn.Module) -> None:
    X, Xp = tokens()
    lin, ref = Linearization(net, chunk_size=3), Linearization(Positional(net), chunk_size=3)
    V = torch.randn(3, lin.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    U = torch.randn(2, 7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(lin.outputs(X), ref.outputs(Xp), rtol=0, atol=0)
    torch.testing.assert_close(lin.jvp(X, V), ref.jvp(Xp, V), rtol=0, atol=1e-13)
    torch.testing.assert_close(lin.vjp(X, U), ref.vjp(Xp, U), rtol=0, atol=1e-13)
    torch.testing.assert_close(lin.jacobian(X), ref.jacobian(Xp), rtol=0, atol=0)  # per-example Jacobians (vmap)


def test_operator_on_keyword_inputs(net: nn.Module) -> None:
    X, Xp = tokens()
    op = NTKOperator(net, X, chunk_size=3)
    K = ntk_gram(Positional(net), Xp)
    v = torch.randn(op.shape[1], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for _ in range(3):  # the first product, then through J(X) held for these inputs
        torch.testing.assert_close(op @ v, K @ v, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(op.to_dense(), K, rtol=0, atol=1e-12)
    torch.testing.assert_close(op.diagonal(), K.diagonal(), rtol=0, atol=1e-12)
    entries = op[torch.tensor([0, 5]), torch.tensor([4, 1])]
    torch.testing.assert_close(entries, K[[0, 5], [4, 1]], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["auto", "jacobian"])
def test_output_fn_selects_a_pooled_output(net: nn.Module, method: str) -> None:
    X, Xp = tokens()
    K = ntk_gram(net, X, output_fn=lambda out: out["pooled"], chunk_size=3, method=method)
    ref = ntk_gram(Positional(net, "pooled"), Xp, chunk_size=3, method=method)
    assert K.shape == (7 * 8, 7 * 8)
    torch.testing.assert_close(K, ref, rtol=0, atol=0)
    # one output as (n,): c = 1
    K1 = ntk_gram(net, X, output_fn=lambda out: out["logits"][:, 1], method=method)
    torch.testing.assert_close(K1, ntk_gram(net, X, output=1, method=method), rtol=0, atol=1e-12)


def test_default_reads_logits_attribute(net: nn.Module) -> None:
    X, _ = tokens()
    torch.testing.assert_close(ntk_gram(AttributeOutput(net), X), ntk_gram(net, X), rtol=0, atol=0)


def test_keyword_inputs_are_checked() -> None:
    X, _ = tokens()
    with pytest.raises(ValueError, match=r"'input_ids': 7, 'attention_mask': 6"):
        as_inputs({"input_ids": X["input_ids"], "attention_mask": X["attention_mask"][:6]})
    with pytest.raises(ValueError, match=r"X\['attention_mask'\] is a list, not a tensor"):
        as_inputs({"input_ids": X["input_ids"], "attention_mask": X["attention_mask"].tolist()})
    with pytest.raises(ValueError, match="empty mapping"):
        as_inputs({})
    bad = {"input_ids": X["input_ids"], "weights": torch.ones(7, 5)}
    bad["weights"][2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"X\['weights'\] contains NaN or inf"):
        as_inputs(bad)
    # numpy arrays are accepted; integer entries keep their dtype, floating ones take the network's
    lin = Linearization(nn.Linear(3, 2).double())
    got = lin.prepare_inputs({"ids": np.arange(6).reshape(3, 2), "x": np.ones((3, 3), dtype=np.float32)})
    assert isinstance(got, KeywordInputs) and got.shape == (3,)
    assert got["ids"].dtype == torch.int64 and got["x"].dtype == torch.float64
    assert got[1:3].shape[0] == 2 and got[torch.tensor([0, 2])]["ids"].tolist() == [[0, 1], [4, 5]]


def test_outputs_the_default_cannot_read(net: nn.Module) -> None:
    X, _ = tokens()

    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = net

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
            return {"pooled": self.inner(input_ids, attention_mask)["pooled"]}

    with pytest.raises(LinearizationError, match=r"keys \[.pooled.\].*Pass output_fn="):
        Linearization(Pair()).outputs(X)
    with pytest.raises(LinearizationError, match="output_fn must return a tensor"):
        Linearization(net, output_fn=lambda out: out).outputs(X)
    with pytest.raises(LinearizationError, match=r"shape \(n, c\) or \(n,\).*returned by output_fn"):
        Linearization(net, output_fn=lambda out: out["logits"][:1]).outputs(X)
    with pytest.raises(ValueError, match="output_fn must be a callable"):
        Linearization(net, output_fn="logits")


def test_mixing_examples_is_refused_for_keyword_inputs() -> None:
    class Mixer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            h = self.lin(x) * scale
            return h - h.mean(0)

    X = {"x": torch.randn(5, 3), "scale": torch.rand(5, 1) + 0.5}
    with pytest.raises(LinearizationError, match="mixes the examples"):
        Linearization(Mixer()).prepare_inputs(X)


def test_gpytorch_kernel_with_output_fn() -> None:
    pytest.importorskip("gpytorch")
    from linadapt import NTKKernel

    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.a, self.b = nn.Linear(3, 6), nn.Linear(6, 2), nn.Linear(6, 1)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            h = torch.tanh(self.body(x))
            return {"first": self.a(h), "second": self.b(h)}

    torch.manual_seed(0)
    net = TwoHeads().double()
    x = torch.randn(6, 3, dtype=torch.float64)
    kernel = NTKKernel(net, output_fn=lambda out: out["first"], output="sum")
    ref = ntk_gram(net, x, output="sum", output_fn=lambda out: out["first"])
    torch.testing.assert_close(kernel(x, x).to_dense(), ref, rtol=1e-10, atol=1e-12)
    with pytest.raises(LinearizationError, match="Pass output_fn="):
        NTKKernel(net)(x, x).to_dense()
