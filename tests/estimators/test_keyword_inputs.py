"""The estimators on keyword inputs (a tokenizer-style mapping, ``model(**X)``) and with ``output_fn``: fits and
predictions equal those through a positional wrapper; saving and loading; a tiny HuggingFace BERT."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from keyword_models import Positional, TinyEncoder, tokens
from sklearn.base import clone

from linadapt import LinearizedClassifier, LinearizedRegressor


@pytest.fixture
def net() -> TinyEncoder:
    torch.manual_seed(0)
    return TinyEncoder().double()


def _targets(n: int = 12) -> torch.Tensor:
    return torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("options", [{}, {"space": "parameter"}, {"solver": "cg"}])
def test_regressor_equals_positional_wrapper(net: TinyEncoder, options: dict) -> None:
    X, Xp = tokens(12)
    Xs, Xps = tokens(5, seed=3)
    y = _targets()
    est = LinearizedRegressor(net, chunk_size=5, **options).fit(X, y)
    ref = LinearizedRegressor(Positional(net), chunk_size=5, **options).fit(Xp, y)
    assert est.prior_var_ == pytest.approx(ref.prior_var_, rel=1e-10)
    assert est.noise_var_ == pytest.approx(ref.noise_var_, rel=1e-10)
    for a, b in zip(est.predict(Xs, return_std=True), ref.predict(Xps, return_std=True)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)
    assert not hasattr(est, "n_features_in_")


def test_classifier_equals_positional_wrapper(net: TinyEncoder) -> None:
    X, Xp = tokens(12)
    Xs, Xps = tokens(5, seed=3)
    labels = torch.arange(12) % 3
    est = LinearizedClassifier(net, chunk_size=5).fit(X, labels)
    ref = LinearizedClassifier(Positional(net), chunk_size=5).fit(Xp, labels)
    assert est.link_ == ref.link_
    np.testing.assert_allclose(est.predict_proba(Xs), ref.predict_proba(Xps), rtol=0, atol=1e-10)
    np.testing.assert_array_equal(est.predict(Xs), ref.predict(Xps))
    gen = torch.Generator().manual_seed(0)
    draws = est.sample(Xs, n_samples=2, generator=gen)
    torch.testing.assert_close(
        torch.as_tensor(draws), torch.as_tensor(ref.sample(Xps, 2, generator=torch.Generator().manual_seed(0)))
    )
    # numpy values, as a tokenizer with return_tensors="np" gives
    numpy_inputs = {k: v.numpy() for k, v in Xs.items()}
    np.testing.assert_allclose(est.predict_proba(numpy_inputs), ref.predict_proba(Xps), rtol=0, atol=1e-10)


def test_output_fn_in_estimators(net: TinyEncoder) -> None:
    X, Xp = tokens(12)
    y = _targets()[:, 0]
    pick = lambda out: out["pooled"][:, 2]  # noqa: E731
    est = LinearizedRegressor(net, output_fn=pick).fit(X, y)
    ref = LinearizedRegressor(Positional(net, "pooled"), output_fn=lambda out: out[:, 2]).fit(Xp, y)
    np.testing.assert_allclose(est.predict(X), ref.predict(Xp), rtol=0, atol=1e-10)
    assert clone(est).output_fn is pick
    labels = torch.arange(12) % 2
    clf = LinearizedClassifier(net, output_fn=lambda out: out["logits"][:, :2]).fit(X, labels)
    assert clf.predict_proba(X).shape == (12, 2)


def test_inputs_other_than_those_fitted_are_refused(net: TinyEncoder) -> None:
    X, Xp = tokens(12)
    est = LinearizedRegressor(net).fit(X, _targets())
    with pytest.raises(ValueError, match="fitted on keyword inputs"):
        est.predict(Xp)
    with pytest.raises(ValueError, match="fitted on keyword inputs"):
        est.predict({"input_ids": X["input_ids"]})
    positional = LinearizedRegressor(Positional(net)).fit(Xp, _targets())
    with pytest.raises(ValueError, match=r"fitted on one tensor of inputs of shape \(2, 5\)"):
        positional.predict(X)
    with pytest.raises(ValueError, match="disagree on the number of examples"):
        est.predict({"input_ids": X["input_ids"], "attention_mask": X["attention_mask"][:3]})


def test_save_and_load(net: TinyEncoder, tmp_path: Path) -> None:
    X, _ = tokens(12)
    labels = torch.arange(12) % 3
    clf = LinearizedClassifier(net).fit(X, labels)
    clf.save(tmp_path / "clf.linadapt")
    back = LinearizedClassifier.load(tmp_path / "clf.linadapt", net)
    np.testing.assert_allclose(back.predict_proba(X), clf.predict_proba(X), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="fitted without output_fn"):
        LinearizedClassifier.load(tmp_path / "clf.linadapt", net, output_fn=lambda out: out["logits"])

    def first_pooled(out: dict) -> torch.Tensor:
        return out["pooled"][:, :2]

    reg = LinearizedRegressor(net, output_fn=first_pooled).fit(X, _targets()[:, :2])
    reg.save(tmp_path / "reg.linadapt")
    with pytest.raises(ValueError, match=r"fitted with output_fn \(.*first_pooled\).*output_fn=\.\.\."):
        LinearizedRegressor.load(tmp_path / "reg.linadapt", net)
    back = LinearizedRegressor.load(tmp_path / "reg.linadapt", net, output_fn=first_pooled)
    np.testing.assert_allclose(back.predict(X), reg.predict(X), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="rebuilt posterior differs"):  # another function: detected
        LinearizedRegressor.load(tmp_path / "reg.linadapt", net, output_fn=lambda out: out["pooled"][:, 2:4])


def test_prior_groups_on_keyword_inputs(net: TinyEncoder) -> None:
    X, Xp = tokens(12)
    y = _targets()
    est = LinearizedRegressor(net, prior_groups=["head.*"]).fit(X, y)
    ref = LinearizedRegressor(Positional(net), prior_groups=["inner.head.*"]).fit(Xp, y)
    np.testing.assert_allclose(est.predict(X), ref.predict(Xp), rtol=0, atol=1e-8)


def test_distributed_fit_on_keyword_inputs(net: TinyEncoder, tmp_path: Path) -> None:
    """One gloo process: the sharded path (signature, gathers, a saved file) with keyword inputs."""
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        X, _ = tokens(12)
        X["attention_mask"] = X["attention_mask"].bool()  # (gathered as bytes)
        labels = torch.arange(12) % 3
        est = LinearizedClassifier(net, distributed=True).fit(X, labels)
        ref = LinearizedClassifier(net).fit(X, labels)
        np.testing.assert_allclose(est.predict_proba(X), ref.predict_proba(X), rtol=0, atol=1e-10)
        est.save(tmp_path / "d.linadapt")
    finally:
        dist.destroy_process_group()
    back = LinearizedClassifier.load(tmp_path / "d.linadapt", net)
    assert back._train_data[0]["attention_mask"].dtype == torch.bool
    np.testing.assert_allclose(back.predict_proba(X), ref.predict_proba(X), rtol=0, atol=1e-10)


def test_tiny_bert_from_a_tokenizer_style_dict() -> None:
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        num_labels=3,
    )
    bert = transformers.BertForSequenceClassification(config).eval()
    n, length = 12, 8
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 40, (n, length), generator=g)
    ids[:, 0] = 2  # a [CLS]-like first token
    mask = torch.ones(n, length, dtype=torch.long)
    mask[::3, 5:] = 0
    ids[mask == 0] = 0
    X = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros(n, length, dtype=torch.long)}
    labels = torch.arange(n) % 3
    clf = LinearizedClassifier(bert, chunk_size=5).fit(X, labels)  # the default reads the output's .logits
    probs = clf.predict_proba(X)
    assert probs.shape == (n, 3) and np.allclose(probs.sum(1), 1.0)
    assert clf.linearization_.structured(clf._train_data[0]) is not None  # the per-layer rules apply
    # the kernel by the per-layer rules equals the per-example Jacobian contraction
    lin = clf.linearization_
    Xt = lin.prepare_inputs(X)
    torch.testing.assert_close(lin.ntk(Xt[:6]), lin.ntk(Xt[:6], method="jacobian"), rtol=1e-5, atol=1e-6)


def test_update_and_query_on_keyword_inputs(net: TinyEncoder) -> None:
    """update joins keyword inputs key by key; query takes a keyword pool: both equal the positional wrapper."""
    X, Xp = tokens(12)
    pool, pool_p = tokens(9, seed=4)
    y = _targets()
    kw = {"prior_var": 0.5, "noise_var": 0.1, "optimize_hyperparameters": False, "chunk_size": 5}
    first = {k: v[:8] for k, v in X.items()}
    est = LinearizedRegressor(net, **kw).fit(first, y[:8]).update({k: v[8:] for k, v in X.items()}, y[8:])
    ref = LinearizedRegressor(Positional(net), **kw).fit(Xp, y)
    for a, b in zip(est.predict(pool, return_std=True), ref.predict(pool_p, return_std=True)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)
    np.testing.assert_array_equal(est.query(pool, 3), ref.query(pool_p, 3))
    labels = torch.arange(12) % 3
    clf = LinearizedClassifier(net, prior_var=1.0, optimize_hyperparameters=False, chunk_size=5)
    clf.fit(first, labels[:8]).update({k: v[8:] for k, v in X.items()}, labels[8:])
    cref = LinearizedClassifier(Positional(net), prior_var=1.0, optimize_hyperparameters=False, chunk_size=5)
    cref.fit(Xp, labels)
    np.testing.assert_allclose(clf.predict_proba(pool), cref.predict_proba(pool_p), rtol=0, atol=1e-6)
