"""``linadapt adapt --task binary | multilabel``, ``--noise per-output``, ``--inputs`` (an .npz file's arrays as
the network's keyword inputs) and the predictions.csv of each, checked against the estimators fitted here."""

import csv
import importlib.util
import json

import numpy as np
import pytest
from cli_project import two_network_project
from safetensors.torch import save_file
from typer.testing import CliRunner

import linadapt as la
from linadapt.app.cli import app
from linadapt.estimators.persistence import read_header

runner = CliRunner()
needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib")

NEW = np.array([[0.5, 0.5], [-1, 1.5], [1.5, -1]], np.float32)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """bin.csv (x1, x2, label 0/1) for the one-output network; ml.csv (x1, x2, a, b, c: three 0/1 labels) for
    the three-output one; new.csv (inputs only)."""
    nets, X, _ = two_network_project(tmp_path, monkeypatch, "tnets")
    binary = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(int)
    with open(tmp_path / "bin.csv", "w") as fh:
        fh.write("x1,x2,label\n" + "".join(f"{a},{b},{k}\n" for (a, b), k in zip(X, binary)))
    Y = np.column_stack([X[:, 0] > 0, X[:, 1] > 0, X[:, 0] + X[:, 1] > 1]).astype(int)
    with open(tmp_path / "ml.csv", "w") as fh:
        fh.write("x1,a,x2,b,c\n" + "".join(f"{r[0]},{y[0]},{r[1]},{y[1]},{y[2]}\n" for r, y in zip(X, Y)))
    with open(tmp_path / "new.csv", "w") as fh:
        fh.write("x1,x2\n" + "".join(f"{a},{b}\n" for a, b in NEW))
    return tmp_path, nets, X.astype(np.float32), binary, Y


def read(path):
    with open(path) as fh:
        rows = list(csv.reader(fh))
    return rows[0], np.array(rows[1:], dtype=float)


def invoke(*args):
    res = runner.invoke(app, list(args))
    assert res.exit_code == 0, res.output
    return res


@needs_matplotlib
def test_binary_adapt_and_predict(project):
    """--task binary: the Bernoulli classifier of the one-output network; predictions.csv proba_0, proba_1, label;
    the report compares with fine-tuning by binary cross-entropy; predict writes the same columns."""
    tmp, nets, X, labels, _ = project
    base = ["adapt", "--model", "tnets:regressor", "--weights", "reg.safetensors", "--train", "bin.csv"]
    res = invoke(*base, "--task", "binary", "--test", "bin.csv", "--out", "run")
    assert "linadapt binary" in res.output and "test accuracy" in res.output and "test ece" in res.output
    ref = la.LinearizedClassifier(nets.regressor(), likelihood="bernoulli").fit(X, labels)
    cols, values = read(tmp / "run" / "predictions.csv")
    assert cols == ["proba_0", "proba_1", "label"]
    np.testing.assert_allclose(values[:, :2], ref.predict_proba(X), rtol=1e-8)
    np.testing.assert_array_equal(values[:, 2], ref.predict(X))
    proba = ref.predict_proba(X)
    assert f"{la.metrics.nll(proba, labels):.4f}" in res.output
    page = (tmp / "run" / "report.html").read_text()
    assert "fine-tune all" in page and "ECE" in page and page.count("data:image/png;base64,") == 1
    header = read_header(tmp / "run" / "adapted.linadapt")
    assert header["fitted"]["likelihood_"] == "bernoulli"
    res = invoke("predict", "--adapted", "run/adapted.linadapt", "--data", "new.csv", "--out", "p.csv")
    cols, values = read(tmp / "p.csv")
    assert cols == ["proba_0", "proba_1", "label"]
    np.testing.assert_allclose(values[:, :2], ref.predict_proba(NEW), rtol=1e-8)
    # with the labels present, predict scores them
    res = invoke("predict", "--adapted", "run/adapted.linadapt", "--data", "bin.csv", "--out", "q.csv")
    assert f"accuracy: {la.metrics.accuracy(proba, labels):.4f}" in res.output


@needs_matplotlib
def test_multilabel_adapt_and_predict(project):
    """--task multilabel with three label columns (comma-separated or the option repeated): one sigmoid output
    per label; predictions.csv proba_k = P(y_k = 1) and label_k; subset accuracy and the summed NLL."""
    tmp, nets, X, _, Y = project
    base = ["adapt", "--model", "tnets:classifier", "--weights", "clf.safetensors", "--train", "ml.csv"]
    res = invoke(*base, "--task", "multilabel", "--target", "a,b,c", "--test", "ml.csv", "--out", "run")
    assert "linadapt multilabel" in res.output and "positives per label" in res.output
    ref = la.LinearizedClassifier(nets.classifier(), likelihood="multilabel").fit(X, Y)
    proba = ref.predict_proba(X)
    cols, values = read(tmp / "run" / "predictions.csv")
    assert cols == ["proba_0", "proba_1", "proba_2", "label_0", "label_1", "label_2"]
    np.testing.assert_allclose(values[:, :3], proba, rtol=1e-8)
    np.testing.assert_array_equal(values[:, 3:], ref.predict(X))
    assert f"{la.metrics.subset_accuracy(proba, Y):.4f}" in res.output
    assert f"{la.metrics.multilabel_nll(proba, Y):.4f}" in res.output
    page = (tmp / "run" / "report.html").read_text()
    assert "subset accuracy" in page and "fine-tune last" in page and "ECE" not in page
    reference = json.loads(read_header(tmp / "run" / "adapted.linadapt")["model"]["reference"])
    assert reference["target"] == ["a", "b", "c"]
    # predict reads the recorded label columns: scores them, and leaves them out of the inputs
    res = invoke("predict", "--adapted", "run/adapted.linadapt", "--data", "ml.csv", "--out", "p.csv")
    assert f"subset accuracy: {la.metrics.subset_accuracy(proba, Y):.4f}" in res.output
    np.testing.assert_allclose(read(tmp / "p.csv")[1], values, rtol=1e-8)
    invoke("predict", "--adapted", "run/adapted.linadapt", "--data", "new.csv", "--out", "n.csv")
    np.testing.assert_allclose(read(tmp / "n.csv")[1][:, :3], ref.predict_proba(NEW), rtol=1e-8)
    # the option repeated, and --task auto: a 0/1 target with several columns is multilabel
    invoke(*base, "--target", "a", "--target", "b", "--target", "c", "--out", "auto", "--no-baselines")
    assert read_header(tmp / "auto" / "adapted.linadapt")["fitted"]["likelihood_"] == "multilabel"


def test_auto_picks_binary_for_a_one_output_network_with_0_1_labels(project):
    tmp, _, X, labels, _ = project
    base = ["adapt", "--model", "tnets:regressor", "--weights", "reg.safetensors", "--no-baselines"]
    res = invoke(*base, "--train", "bin.csv", "--out", "b")
    assert "linadapt binary" in res.output and "labels per class" in res.output
    header = read_header(tmp / "b" / "adapted.linadapt")
    assert header["estimator"] == "LinearizedClassifier" and header["fitted"]["likelihood_"] == "bernoulli"
    # other integer targets of a one-output network stay regression
    with open(tmp / "ints.csv", "w") as fh:
        fh.write("x1,x2,y\n" + "".join(f"{a},{b},{k + 2 * (a > 1)}\n" for (a, b), k in zip(X, labels)))
    assert "linadapt regression" in invoke(*base, "--train", "ints.csv", "--out", "r").output


def test_binary_and_multilabel_refuse_targets_that_do_not_fit(project):
    tmp, _, X, labels, _ = project
    with open(tmp / "three.csv", "w") as fh:
        fh.write("x1,x2,y\n" + "".join(f"{a},{b},{k + (a > 1)}\n" for (a, b), k in zip(X, labels)))
    reg = ["adapt", "--model", "tnets:regressor", "--weights", "reg.safetensors", "--no-baselines"]
    clf = ["adapt", "--model", "tnets:classifier", "--weights", "clf.safetensors", "--no-baselines"]
    cases = [
        (
            [*reg, "--train", "three.csv", "--task", "binary"],
            "--task binary takes labels 0 and 1; three.csv has 0, 1, 2",
        ),
        ([*clf, "--train", "bin.csv", "--task", "binary"], "needs a network with one output"),
        (
            [*reg, "--train", "ml.csv", "--task", "multilabel", "--target", "a,b,c"],
            "ml.csv has 3 label columns but the network has 1 output",
        ),
        ([*clf, "--train", "three.csv", "--task", "multilabel"], "three.csv has 1 label column but the network has 3"),
        ([*clf, "--train", "ml.csv", "--target", "a,nope,c"], "no column 'nope'"),
        ([*clf, "--train", "reg.csv", "--task", "classification"], "takes integer class labels; reg.csv has"),
        ([*reg, "--train", "bin.csv", "--task", "ranking"], "--task must be auto, regression, classification, binary"),
        ([*reg, "--train", "bin.csv", "--noise", "per-output"], "--noise applies to regression; this is a binary task"),
    ]
    for args, message in cases:
        res = runner.invoke(app, args)
        assert res.exit_code == 2, res.output
        assert message in res.output and "Traceback" not in res.output
    with open(tmp / "ml2.csv", "w") as fh:
        fh.write("x1,x2,a,b,c\n" + "".join(f"{a},{b},0,2,1\n" for a, b in X))
    res = runner.invoke(app, [*clf, "--train", "ml2.csv", "--task", "multilabel", "--target", "a,b,c"])
    assert res.exit_code == 2 and "--task multilabel takes 0/1 labels; ml2.csv has 0, 1, 2" in res.output


def test_noise_per_output_spelled_with_a_hyphen(project):
    """--noise per-output (documented) and per_output (as the estimator spells it) fit the same model; several
    --target columns of a CSV are a multi-output regression target."""
    tmp, nets, X, _, _ = project
    Y = np.column_stack([np.sin(X[:, 0]), np.cos(X[:, 1]), 0.5 * X[:, 0]]) + 0.05 * np.random.default_rng(1).normal(
        size=(30, 3)
    )
    with open(tmp / "multi.csv", "w") as fh:
        fh.write("x1,x2,u,v,w\n" + "".join(f"{a},{b},{u},{v},{w}\n" for (a, b), (u, v, w) in zip(X, Y)))
    base = ["adapt", "--model", "tnets:classifier", "--weights", "clf.safetensors", "--train", "multi.csv"]
    res = invoke(*base, "--target", "u,v,w", "--noise", "per-output", "--test", "new.csv", "--out", "po")
    assert "linadapt regression" in res.output and "noise variances (per output)" in res.output
    ref = la.LinearizedRegressor(nets.classifier(), noise="per_output").fit(X, Y)
    header = read_header(tmp / "po" / "adapted.linadapt")
    assert header["settings"]["noise"] == "per_output"
    np.testing.assert_allclose(header["fitted"]["noise_var_"], ref.noise_var_, rtol=1e-8)
    cols, values = read(tmp / "po" / "predictions.csv")
    assert cols == ["mean_0", "mean_1", "mean_2", "std_0", "std_1", "std_2"]
    np.testing.assert_allclose(values, np.hstack(ref.predict(NEW, return_std=True)), rtol=1e-8)
    invoke(*base, "--target", "u,v,w", "--noise", "per_output", "--out", "po2")
    assert read_header(tmp / "po2" / "adapted.linadapt")["fitted"] == header["fitted"]


TOKEN_NETS = """
import torch
from keyword_models import TinyEncoder

def encoder():
    torch.manual_seed(0)
    return TinyEncoder()
"""


@pytest.fixture
def tokens(tmp_path, monkeypatch):
    """toknets.py (the keyword-input TinyEncoder of tests/keyword_models.py), its weights, and train.npz /
    test.npz / pool.npz holding input_ids, attention_mask (and labels y)."""
    from keyword_models import tokens as make_tokens

    (tmp_path / "toknets.py").write_text(TOKEN_NETS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    toknets = __import__("toknets")
    save_file(toknets.encoder().state_dict(), tmp_path / "tok.safetensors")
    train, _ = make_tokens(16, 6, seed=0)
    test, _ = make_tokens(6, 6, seed=1)
    y = (train["input_ids"][:, 0] % 3).numpy()
    np.savez(tmp_path / "train.npz", **{k: v.numpy() for k, v in train.items()}, y=y)
    np.savez(tmp_path / "test.npz", **{k: v.numpy() for k, v in test.items()}, y=(test["input_ids"][:, 0] % 3).numpy())
    np.savez(tmp_path / "pool.npz", **{k: v.numpy() for k, v in test.items()})
    return tmp_path, toknets, train, test, y


@needs_matplotlib
def test_npz_keyword_inputs_match_the_python_api(tokens):
    """--inputs input_ids,attention_mask: the network is called as model(input_ids=…, attention_mask=…); adapt,
    predict and suggest give what the estimator gives on the same mapping."""
    tmp, toknets, train, test, y = tokens
    base = ["adapt", "--model", "toknets:encoder", "--weights", "tok.safetensors", "--train", "train.npz"]
    res = invoke(*base, "--inputs", "input_ids,attention_mask", "--test", "test.npz", "--params", "head.*")
    assert "linadapt classification" in res.output and "input_ids (6,), attention_mask (6,)" in res.output
    ref = la.LinearizedClassifier(toknets.encoder(), params=["head.*"], likelihood="categorical").fit(train, y)
    proba = ref.predict_proba(test)
    cols, values = read(tmp / "linadapt-out" / "predictions.csv")
    assert cols == ["proba_0", "proba_1", "proba_2", "label"]
    np.testing.assert_allclose(values[:, :3], proba, rtol=1e-8)
    page = (tmp / "linadapt-out" / "report.html").read_text()
    assert "fine-tune all" in page  # the baselines call the network with keyword inputs too
    # predict and suggest reuse the recorded input names
    invoke("predict", "--adapted", "linadapt-out/adapted.linadapt", "--data", "pool.npz", "--out", "p.csv")
    np.testing.assert_allclose(read(tmp / "p.csv")[1][:, :3], proba, rtol=1e-8)
    invoke("suggest", "--adapted", "linadapt-out/adapted.linadapt", "--pool", "pool.npz", "--k", "2")
    picks = read(tmp / "picks.csv")[1][:, 1].astype(int)
    np.testing.assert_array_equal(picks, ref.query(test, 2))
    # a name the file does not hold, and --inputs for a CSV
    res = runner.invoke(app, [*base, "--inputs", "input_ids,mask"])
    assert res.exit_code == 2 and "train.npz has no array 'mask'" in res.output
    res = runner.invoke(app, [*base[:-1], "x.csv", "--inputs", "input_ids"])
    assert res.exit_code == 2 and "x.csv does not exist" in res.output
    (tmp / "x.csv").write_text("a,y\n1,2\n")
    res = runner.invoke(app, [*base[:-1], "x.csv", "--inputs", "input_ids"])
    assert res.exit_code == 2 and "are read from an .npz file only" in res.output
