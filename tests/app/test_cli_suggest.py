"""``linadapt suggest``: the picks of an adapted model's ``query`` as a CSV."""

import csv

import numpy as np
import pytest
import torch
from cli_project import two_network_project
from typer.testing import CliRunner

import linadapt as la
from linadapt.app.cli import app

runner = CliRunner()


@pytest.fixture
def project(tmp_path, monkeypatch):
    qnets, _, rng = two_network_project(tmp_path, monkeypatch, "qnets")
    pool = np.vstack([rng.uniform(-4, 4, (25, 2)), np.repeat([[3.0, 3.0]], 5, 0)])  # five copies of one input
    with open(tmp_path / "pool.csv", "w") as fh:
        fh.write("x1,x2\n" + "".join(f"{a},{b}\n" for a, b in pool))
    return tmp_path, qnets, pool.astype(np.float32)


def _picks(path):
    with open(path) as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


@pytest.mark.parametrize(("kind", "train"), [("regressor", "reg"), ("classifier", "clf")])
def test_suggest_writes_the_query_picks(project, kind, train):
    tmp, qnets, pool = project
    args = ["adapt", "--model", f"qnets:{kind}", "--weights", f"{train}.safetensors", "--train", f"{train}.csv"]
    res = runner.invoke(app, [*args, "--out", "run", "--no-baselines"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(
        app, ["suggest", "--adapted", "run/adapted.linadapt", "--pool", "pool.csv", "--k", "6", "--out", "picks.csv"]
    )
    assert res.exit_code == 0, res.output
    assert "wrote picks.csv" in res.output
    header, rows = _picks(tmp / "picks.csv")
    assert header == ["rank", "index", "score"]
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4, 5, 6]
    index = np.array([int(r[1]) for r in rows])
    assert len(set(index.tolist())) == 6 and sum(i >= 25 for i in index) <= 1  # one copy of the repeated input
    est = la.estimators.persistence.load(tmp / "run" / "adapted.linadapt", getattr(qnets, kind)())
    expected, scores = est.query(torch.as_tensor(pool), 6, return_scores=True)
    np.testing.assert_array_equal(index, expected)
    np.testing.assert_allclose([float(r[2]) for r in rows], scores, rtol=1e-8)


def test_suggest_refuses_bad_k_and_missing_files(project):
    args = ["adapt", "--model", "qnets:regressor", "--weights", "reg.safetensors", "--train", "reg.csv"]
    assert runner.invoke(app, [*args, "--out", "run", "--no-baselines"]).exit_code == 0
    res = runner.invoke(app, ["suggest", "--adapted", "run/adapted.linadapt", "--pool", "pool.csv", "--k", "31"])
    assert res.exit_code == 2 and "pool size" in res.output
    res = runner.invoke(app, ["suggest", "--adapted", "nothing.linadapt", "--pool", "pool.csv"])
    assert res.exit_code == 2 and "does not exist" in res.output
    res = runner.invoke(app, ["suggest", "--adapted", "run/adapted.linadapt", "--pool", "nopool.csv"])
    assert res.exit_code == 2 and "does not exist" in res.output
