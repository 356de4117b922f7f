"""Command-line flags without a test elsewhere, each checked against an estimator fitted here with the settings
the flag should produce, or against the exact files and tables the command claims to write."""

import csv
import importlib.util
import json

import numpy as np
import pytest
import torch
from cli_project import two_network_project
from typer.testing import CliRunner

import linadapt as la
from linadapt.app.cli import app
from linadapt.estimators.persistence import read_header

runner = CliRunner()
# adapt --test and experiment --plot draw figures (report.html, the PNG) with matplotlib, which comes with the
# [data] extra (through mlxtend), not with linadapt itself
needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib")


@pytest.fixture
def project(tmp_path, monkeypatch):
    nets, X, rng = two_network_project(tmp_path, monkeypatch, "nets")
    t = np.sin(X[:, 0]) + 0.1 * X[:, 1]
    # the target t in the middle; the last column (the default target) is an input, unrelated to t
    z = rng.uniform(-1, 1, 30)
    with open(tmp_path / "mid.csv", "w") as fh:
        fh.write("x1,t,z\n" + "".join(f"{a},{np.sin(a)},{c}\n" for a, c in zip(X[:, 0], z)))
    labels = (X[:, 0] > 0).astype(int) + (X[:, 1] > 1).astype(int)
    with open(tmp_path / "new.csv", "w") as fh:
        fh.write("x1,x2\n0.5,0.5\n-1,1.5\n")
    return tmp_path, nets, X.astype(np.float32), t, labels


NEW = np.array([[0.5, 0.5], [-1, 1.5]], np.float32)


def read(path):
    with open(path) as fh:
        rows = list(csv.reader(fh))
    return rows[0], np.array(rows[1:], dtype=float)


def adapt(*args):
    res = runner.invoke(app, ["adapt", *args])
    assert res.exit_code == 0, res.output
    return res


@needs_matplotlib
def test_adapt_target_column_picks_the_named_column(project):
    tmp, nets, _, _, _ = project
    data = np.loadtxt(tmp / "mid.csv", delimiter=",", skiprows=1)  # columns x1, t, z
    base = ["--model", "nets:regressor", "--weights", "reg.safetensors", "--train", "mid.csv", "--no-baselines"]
    adapt(*base, "--target", "t", "--test", "mid.csv", "--out", "run")
    Xt = data[:, [0, 2]].astype(np.float32)
    ref = la.LinearizedRegressor(nets.regressor()).fit(Xt, data[:, 1])  # inputs x1, z; target t
    cols, values = read(tmp / "run" / "predictions.csv")
    assert cols == ["mean", "std"]
    # the test file is read with the same target column: inputs x1, z
    np.testing.assert_allclose(values[:, 0], ref.predict(Xt), rtol=1e-8)
    assert json.loads(read_header(tmp / "run" / "adapted.linadapt")["model"]["reference"])["target"] == "t"
    # predict reuses the recorded target column: t is dropped from the inputs and scored against
    res = runner.invoke(app, ["predict", "--adapted", "run/adapted.linadapt", "--data", "mid.csv", "--out", "p.csv"])
    assert res.exit_code == 0, res.output
    rmse = float(np.sqrt(np.mean((ref.predict(Xt) - data[:, 1]) ** 2)))
    assert f"rmse: {rmse:.4f}" in res.output
    # without --target the last column (z) is the target and (x1, t) are the inputs: another fit altogether
    adapt(*base, "--test", "mid.csv", "--out", "last")
    assert json.loads(read_header(tmp / "last" / "adapted.linadapt")["model"]["reference"])["target"] == "z"
    Xz = data[:, :2].astype(np.float32)
    other = la.LinearizedRegressor(nets.regressor()).fit(Xz, data[:, 2])
    _, values = read(tmp / "last" / "predictions.csv")
    np.testing.assert_allclose(values[:, 0], other.predict(Xz), rtol=1e-8)


@needs_matplotlib
def test_task_regression_overrides_the_automatic_choice(project):
    tmp, nets, X, _, labels = project
    base = ["--model", "nets:classifier", "--weights", "clf.safetensors", "--train", "clf.csv", "--no-baselines"]
    adapt(*base, "--out", "auto")
    assert read_header(tmp / "auto" / "adapted.linadapt")["estimator"] == "LinearizedClassifier"
    # forced regression of integer labels on a 3-output model: the regressor's own check of y's width
    res = runner.invoke(app, ["adapt", *base, "--task", "regression"])
    assert res.exit_code == 2 and "y has shape (n,) but the model has 3 outputs" in res.output
    # forced regression on a one-output model with integer targets: a regressor, equal to one fitted here
    with open(tmp / "ints.csv", "w") as fh:
        fh.write("x1,x2,y\n" + "".join(f"{a},{b},{k}\n" for (a, b), k in zip(X, labels)))
    reg_base = ["--model", "nets:regressor", "--weights", "reg.safetensors", "--train", "ints.csv"]
    adapt(*reg_base, "--task", "regression", "--test", "new.csv", "--out", "r", "--no-baselines")
    assert read_header(tmp / "r" / "adapted.linadapt")["estimator"] == "LinearizedRegressor"
    ref = la.LinearizedRegressor(nets.regressor()).fit(X, labels.astype(np.float64))
    cols, values = read(tmp / "r" / "predictions.csv")
    assert cols == ["mean", "std"]
    np.testing.assert_allclose(values, np.column_stack(ref.predict(NEW, return_std=True)), rtol=1e-8)


@needs_matplotlib
def test_repeated_and_glob_params(project):
    tmp, nets, X, t, _ = project
    base = ["--model", "nets:regressor", "--weights", "reg.safetensors", "--train", "reg.csv", "--no-baselines"]
    adapt(*base, "--params", "0.*", "--params", "2.bias", "--test", "new.csv", "--out", "two")
    header = read_header(tmp / "two" / "adapted.linadapt")
    assert header["model"]["selected"] == ["0.weight", "0.bias", "2.bias"]
    assert header["settings"]["params"] == ["0.*", "2.bias"]
    ref = la.LinearizedRegressor(nets.regressor(), params=["0.*", "2.bias"]).fit(X, t)
    assert ref.linearization_.num_params == 2 * 16 + 16 + 1
    _, values = read(tmp / "two" / "predictions.csv")
    np.testing.assert_allclose(values, np.column_stack(ref.predict(NEW, return_std=True)), rtol=1e-8)
    adapt(*base, "--params", "*.bias", "--out", "one")  # a single glob (not all/last/bias) is a pattern list
    header = read_header(tmp / "one" / "adapted.linadapt")
    assert header["model"]["selected"] == ["0.bias", "2.bias"] and header["settings"]["params"] == ["*.bias"]
    res = runner.invoke(app, ["adapt", *base, "--params", "nothing.*"])
    assert res.exit_code == 2 and "nothing.*" in res.output


@needs_matplotlib
def test_trust_pickle_for_adapt_and_predict(project):
    tmp, nets, X, t, _ = project
    torch.save(nets.regressor(), tmp / "whole.pt")  # a pickled nn.Module: needs full unpickling
    base = ["--model", "nets:regressor", "--weights", "whole.pt", "--train", "reg.csv", "--no-baselines"]
    res = runner.invoke(app, ["adapt", *base])
    assert res.exit_code == 2 and "--trust-pickle" in res.output and "Traceback" not in res.output
    assert not (tmp / "linadapt-out").exists()
    adapt(*base, "--trust-pickle", "--test", "new.csv", "--out", "run")
    ref = la.LinearizedRegressor(nets.regressor()).fit(X, t)  # the pickled module's weights are the factory's
    _, values = read(tmp / "run" / "predictions.csv")
    np.testing.assert_allclose(values[:, 0], ref.predict(NEW), rtol=1e-8)
    # predict reloads the recorded weights file, the pickle: refused without the flag, read with it
    args = ["predict", "--adapted", "run/adapted.linadapt", "--data", "new.csv", "--out", "p.csv"]
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "--trust-pickle" in res.output and not (tmp / "p.csv").exists()
    res = runner.invoke(app, [*args, "--trust-pickle"])
    assert res.exit_code == 0, res.output
    _, values = read(tmp / "p.csv")
    np.testing.assert_allclose(values[:, 0], ref.predict(NEW), rtol=1e-8)


@needs_matplotlib
def test_prior_groups_tensors(project):
    tmp, nets, X, t, labels = project
    base = ["--model", "nets:regressor", "--weights", "reg.safetensors", "--train", "reg.csv", "--no-baselines"]
    res = adapt(*base, "--prior-groups", "tensors", "--test", "new.csv", "--out", "g")
    assert "prior variances" in res.output
    ref = la.LinearizedRegressor(nets.regressor(), prior_groups="tensors").fit(X, t)
    fitted = read_header(tmp / "g" / "adapted.linadapt")["fitted"]["prior_vars_"]
    assert set(fitted) == {"0.weight", "0.bias", "2.weight", "2.bias"} == set(ref.prior_vars_)
    for k, v in ref.prior_vars_.items():
        assert fitted[k] == pytest.approx(v, rel=1e-8)
    _, values = read(tmp / "g" / "predictions.csv")
    np.testing.assert_allclose(values, np.column_stack(ref.predict(NEW, return_std=True)), rtol=1e-8)
    # classification: a group per name pattern, the rest in "rest"; the same fit as the estimator's
    base = ["--model", "nets:classifier", "--weights", "clf.safetensors", "--train", "clf.csv", "--no-baselines"]
    res = adapt(*base, "--prior-groups", "2.*", "--test", "new.csv", "--out", "cg")
    assert "prior variances" in res.output and "rest:" in res.output
    ref = la.LinearizedClassifier(nets.classifier(), prior_groups=["2.*"]).fit(X, labels)
    fitted = read_header(tmp / "cg" / "adapted.linadapt")["fitted"]["prior_vars_"]
    assert set(fitted) == {"2.*", "rest"}
    for k, v in ref.prior_vars_.items():
        assert fitted[k] == pytest.approx(v, rel=1e-8)
    _, values = read(tmp / "cg" / "predictions.csv")
    np.testing.assert_allclose(values[:, :3], ref.predict_proba(NEW), rtol=1e-8)
    res = runner.invoke(app, ["adapt", *base, "--prior-groups", "per-layer"])
    assert res.exit_code == 2 and "--prior-groups must be layers, tensors or comma-separated" in res.output


def test_noise_per_output(project):
    """--noise per_output: one learned noise variance per output, as the estimator with noise='per_output'."""
    tmp, nets, X, t, _ = project
    Y = np.column_stack([t, np.cos(X[:, 1]), 0.5 * X[:, 0]]) + 0.05 * np.random.default_rng(1).normal(size=(30, 3))
    np.savez(tmp / "multi.npz", X=X, y=Y)
    base = ["--model", "nets:classifier", "--weights", "clf.safetensors", "--train", "multi.npz", "--no-baselines"]
    res = adapt(*base, "--task", "regression", "--noise", "per_output", "--out", "po")
    assert "noise variances (per output)" in res.output
    ref = la.LinearizedRegressor(nets.classifier(), noise="per_output").fit(X, Y)
    header = read_header(tmp / "po" / "adapted.linadapt")
    assert header["settings"]["noise"] == "per_output"
    np.testing.assert_allclose(header["fitted"]["noise_var_"], ref.noise_var_, rtol=1e-8)
    res = runner.invoke(app, ["adapt", *base, "--task", "regression", "--noise", "diagonal"])
    assert res.exit_code == 2 and "--noise must be shared or per-output" in res.output
    clf = ["--model", "nets:classifier", "--weights", "clf.safetensors", "--train", "clf.csv", "--no-baselines"]
    res = runner.invoke(app, ["adapt", *clf, "--noise", "per_output"])
    assert res.exit_code == 2 and "--noise applies to regression" in res.output


def test_hyperprior_none_is_the_evidence_alone(project):
    """--hyperprior none: the estimators' hyperprior=None (regression: no noise prior; classification: no prior on
    s²), recorded in the file; the default keeps each estimator's default."""
    tmp, nets, X, t, _ = project
    reg = ["--model", "nets:regressor", "--weights", "reg.safetensors", "--train", "reg.csv", "--no-baselines"]
    adapt(*reg, "--hyperprior", "none", "--out", "rn")
    header = read_header(tmp / "rn" / "adapted.linadapt")
    assert header["settings"]["hyperprior"] is None
    ref = la.LinearizedRegressor(nets.regressor(), hyperprior=None).fit(X, t)
    assert header["fitted"]["noise_var_"] == pytest.approx(ref.noise_var_, rel=1e-8)
    default = la.LinearizedRegressor(nets.regressor()).fit(X, t)
    assert abs(default.noise_var_ - ref.noise_var_) > 1e-6 * ref.noise_var_  # the flag changed the fit
    clf = ["--model", "nets:classifier", "--weights", "clf.safetensors", "--train", "clf.csv", "--no-baselines"]
    adapt(*clf, "--out", "cd")
    assert read_header(tmp / "cd" / "adapted.linadapt")["settings"]["hyperprior"] == "default"
    adapt(*clf, "--hyperprior", "none", "--out", "cn")
    assert read_header(tmp / "cn" / "adapted.linadapt")["settings"]["hyperprior"] is None
    res = runner.invoke(app, ["adapt", *clf, "--hyperprior", "flat"])
    assert res.exit_code == 2 and "--hyperprior must be default or none" in res.output


# ---------------------------------------------------------------- experiment --plot
def _fake_records(name):
    """Records shaped like the registry's (two methods, two seeds, two shot counts)."""
    out = []
    for method in ("source", "linadapt"):
        for seed in (0, 1):
            for shots in (5, 10):
                err = 1.0 / shots + (0.2 if method == "source" else 0.0) + 0.01 * seed
                out.append(
                    {
                        "experiment": name,
                        "method": method,
                        "seed": seed,
                        "shots": shots,
                        "metrics": {"rmse": err, "nll": 2 * err},
                        "fit_seconds": 0.1,
                    }
                )
    return out


@needs_matplotlib
def test_experiment_plot_writes_a_png(tmp_path, monkeypatch):
    """A real ``experiment sinusoids --quick --seeds 1 --methods source,linadapt`` took over two minutes on this
    2-core machine (it trains the source network), so the experiment itself is replaced by records of its shape;
    what --plot does with them (the figure, the PNG, its path) runs for real."""
    Image = pytest.importorskip("PIL.Image")
    import linadapt.app.cli as cli  # the command's own reference to run_experiment

    calls = []

    def fake(name, seeds, shots, quick, step=None, methods=None):
        calls.append((name, seeds, shots, quick, methods))
        return _fake_records(name)

    monkeypatch.setattr(cli, "run_experiment", fake)
    monkeypatch.chdir(tmp_path)
    args = ["experiment", "sinusoids", "--seeds", "2", "--quick", "--methods", "source,linadapt"]
    res = runner.invoke(app, [*args, "--plot", "fig.png"])
    assert res.exit_code == 0, res.output
    assert calls == [("sinusoids", 2, None, True, ["source", "linadapt"])]
    with Image.open(tmp_path / "fig.png") as img:
        img.verify()  # a complete, valid PNG
    with Image.open(tmp_path / "fig.png") as img:
        assert img.format == "PNG" and img.size[0] > 200 and img.size[1] > 200
        assert len(np.unique(np.asarray(img.convert("L")))) > 2  # something is drawn
    assert [p.name for p in tmp_path.iterdir()] == ["fig.png"]  # no records file without --output
    # --output alone: the plot goes next to it; --plot wins over that default
    res = runner.invoke(app, [*args, "--output", "rec.json"])
    assert res.exit_code == 0 and (tmp_path / "rec.png").exists()
    assert json.loads((tmp_path / "rec.json").read_text()) == _fake_records("sinusoids")
    res = runner.invoke(app, [*args, "--output", "rec2.json", "--plot", "other.png"])
    assert res.exit_code == 0 and (tmp_path / "other.png").exists() and not (tmp_path / "rec2.png").exists()


# ---------------------------------------------------------------- bench flags
def test_bench_no_dense_prints_only_the_product_table():
    res = runner.invoke(app, ["bench", "--reps", "1", "--n", "8", "--threads", "1", "--no-dense", "--no-memory"])
    assert res.exit_code == 0, res.output
    assert "n = 8, 1 threads, medians of 1 interleaved repetitions" in res.output
    assert "| MLP 64-256-256-10 |" in res.output and "| CNN 1x8x8 (16,32 ch) |" in res.output
    assert "dense NTK" not in res.output and "peak resident memory" not in res.output
    assert "neural-tangents" not in res.output  # it belongs to the dense table


def test_bench_flags_reach_each_benchmark(monkeypatch, tmp_path):
    """Every flag reaches the benchmark it configures and each table is printed with the rows it returned. The
    benchmarks are replaced by recorders: the dense and memory benchmarks take tens of seconds (subprocesses per
    case), and their own functions are tested in test_cli.py."""
    import linadapt.app.bench as bench
    import linadapt.app.cli as cli

    calls = {}
    keys = ("p", "unit_ms", "kv", "cold", "kv16_per_vec", "epoch")
    product_row = dict.fromkeys(keys, 1.0)
    product_row["model"] = "tiny"

    def run_bench(reps, n, threads):
        calls["products"] = (reps, n, threads)
        return [dict(product_row)]

    def run_dense_bench(reps, threads, plain):
        calls["dense"] = (reps, threads, plain)
        row = {"model": "tiny", "p": 50, "full": 3.0, "trace": 4.0}
        if plain:
            row.update(full_plain=30.0, max_rel_diff=1e-9)
        return [row]

    def run_neural_tangents(python, reps, threads):
        calls["nt"] = (python, reps, threads)
        return True, "NT TABLE"

    def run_memory_bench(n, threads):
        calls["memory"] = (n, threads)
        return [{"model": "tiny", "base_mib": 300.0, "kv": 1.0, "kv16": 2.0, "cached": 3.0, "graph": 5.0, "full": 4.0}]

    for name, fn in [
        ("run_bench", run_bench),
        ("run_dense_bench", run_dense_bench),
        ("run_neural_tangents", run_neural_tangents),
        ("run_memory_bench", run_memory_bench),
    ]:
        monkeypatch.setattr(cli, name, fn)  # the names the command calls
    try:
        bench.format_table([dict(product_row)], 1, 1, 1)
    except KeyError as exc:  # pragma: no cover - keeps the fake row in step with the real table
        pytest.fail(f"the fake product row lacks {exc}")

    jax = str(tmp_path / "jax-python")
    res = runner.invoke(app, ["bench", "--reps", "7", "--n", "12", "--threads", "3", "--jax-python", jax])
    assert res.exit_code == 0, res.output
    # dense and neural-tangents use at most 5 repetitions; memory uses --n and --threads
    assert calls == {"products": (7, 12, 3), "dense": (5, 3, True), "nt": (jax, 5, 3), "memory": (12, 3)}
    assert "n = 12, 3 threads, medians of 7" in res.output and "| tiny |" in res.output
    assert "dense NTK, 3 threads, medians of 5" in res.output and "| tiny | 50 | 3× | 30× | 10× |" in res.output
    assert "NT TABLE" in res.output
    assert "peak resident memory" in res.output and "| tiny | 300 | 1 | 2 | 3 | 5 | 4 |" in res.output

    calls.clear()
    res = runner.invoke(app, ["bench", "--reps", "2", "--no-plain", "--no-neural-tangents", "--no-memory"])
    assert res.exit_code == 0, res.output
    assert calls == {"products": (2, 1024, 2), "dense": (2, 2, False)}  # the defaults n = 1024, 2 threads
    assert "Jacobian contraction |" not in res.output and "NT TABLE" not in res.output

    calls.clear()
    res = runner.invoke(app, ["bench", "--reps", "1", "--no-dense"])
    assert res.exit_code == 0 and set(calls) == {"products", "memory"}  # no neural-tangents without dense


# ---------------------------------------------------------------- demo without --quick
def test_demo_without_quick_runs_the_full_sizes(tmp_path, monkeypatch):
    """The full demo takes a minute or more on 2 cores, so its two expensive parts (the sinusoid regression and
    the rotated-MNIST comparison) are replaced by recorders; run_demo's own logic (the labels per class it asks
    for, quick or not, the files it writes) and the CLI's tables run for real."""
    import linadapt.app.demo as demo

    seen = {}

    def regression(shots, quick, step):
        seen["regression"] = (shots, quick)
        rec = {
            "experiment": "sinusoid",
            "method": "linadapt",
            "seed": 0,
            "shots": shots,
            "fit_seconds": 0.5,
            "metrics": {"rmse": 0.123, "nll": 0.456},
        }
        return [rec], "<p>regression body</p>"

    def classification(shots, quick, step):
        seen["classification"] = (shots, quick)
        rec = {
            "experiment": "rotated-mnist",
            "method": "linadapt",
            "seed": 0,
            "shots": shots,
            "fit_seconds": 1.5,
            "metrics": {"accuracy": 0.789, "nll": 0.6, "ece": 0.05},
        }
        return [rec], "<p>classification body</p>"

    monkeypatch.setattr(demo, "_regression", regression)
    monkeypatch.setattr(demo, "_classification", classification)
    res = runner.invoke(app, ["demo", "--out", str(tmp_path / "d")])
    assert res.exit_code == 0, res.output
    assert seen == {"regression": (10, False), "classification": (10, False)}  # quick would give 5 labels per class
    records = json.loads((tmp_path / "d" / "results.json").read_text())
    assert [r["shots"] for r in records] == [10, 10]
    page = (tmp_path / "d" / "report.html").read_text()
    assert "Full run" in page and "regression body" in page and "classification body" in page
    assert "0.789" in res.output and "0.123" in res.output  # the CLI's tables
    seen.clear()
    res = runner.invoke(app, ["demo", "--quick", "--out", str(tmp_path / "q")])
    assert res.exit_code == 0 and seen == {"regression": (10, True), "classification": (5, True)}
    assert "Quick run" in (tmp_path / "q" / "report.html").read_text()


# ---------------------------------------------------------------- adapt --memory-budget


def test_memory_budget_reaches_the_estimator_and_bad_sizes_are_named(project):
    tmp = project[0]
    base = ["--model", "nets:regressor", "--weights", "reg.safetensors", "--train", "reg.csv", "--no-baselines"]
    res = adapt(*base, "--memory-budget", "64MiB", "--out", "mb")
    assert res.exit_code == 0, res.output
    assert read_header(tmp / "mb" / "adapted.linadapt")["settings"]["memory_budget"] == 64 * 2**20
    res = runner.invoke(app, ["adapt", *base, "--memory-budget", "lots"])
    assert res.exit_code == 2 and "--memory-budget" in res.output and "memory_budget must be" in res.output
