"""Data-parallel fits on torch.distributed (gloo, loopback): 2 and 3 CPU processes against one process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
import dist_worker

WORKER = Path(__file__).parent / "dist_worker.py"
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, out: Path, mode: str = "fit", timeout: float = 240.0) -> list[subprocess.CompletedProcess]:
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONHASHSEED": "0"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(r), str(world), str(port), str(out), mode],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    done = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return done


@pytest.fixture(scope="module")
def single_process() -> dict[str, dict[str, torch.Tensor]]:
    """The reference: each case fitted in this process on the concatenated data."""
    out = {}
    cases = [(*case, True) for case in dist_worker.CASES]
    cases += [("classification", space, "cg", False) for space in ("function", "parameter")]
    for kind, space, solver, optimize in cases:
        X, y, Xs = dist_worker.make_data(kind)
        est = dist_worker.estimator(kind, space, solver, distributed=False, optimize=optimize).fit(X, y)
        out[dist_worker.case_key(kind, space, solver, optimize)] = dist_worker.predictions(est, Xs)
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_fit_equals_single_process(world, tmp_path, single_process):
    """Every case on 2 processes; the matrix-free (CG) cases on 3 (the dense ones only gather)."""
    runs = _launch(world, tmp_path, mode="fit" if world == 2 else "fit-cg")
    for r, run in enumerate(runs):
        assert run.returncode == 0, f"rank {r} failed:\n{run.stderr[-3000:]}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    bounds = dist_worker.shard_bounds(29, world)
    assert bounds[-1][1] - bounds[-1][0] == 2 and len({b - a for a, b in bounds}) > 1  # uneven, one tiny shard
    assert len(ranks[0]) == (8 if world == 2 else 4)
    for key in ranks[0]:
        ref = single_process[key]
        for r, res in enumerate(ranks):
            for name, value in ref.items():
                got = res[key][name]
                scale = max(float(value.abs().max()), 1.0)
                err = float((got - value).abs().max())
                assert err <= 1e-8 * scale, f"{key} rank {r}: {name} differs by {err:.3e}"
            # every rank holds bit-identical replicated results
            for name in ref:
                assert torch.equal(res[key][name], ranks[0][key][name]), f"{key}: {name} differs between ranks"
        # Communication: one matrix-free product moves one p-vector (the vjp all-reduce) and one N-vector (the
        # jvp rows), never the Jacobian (N·p).
        kind = key.split("-")[0]
        p = sum(q.numel() for q in dist_worker.make_model(kind).parameters())
        n_obs = 29 * (2 if kind == "regression" else 3)
        assert int(ranks[0][key]["product_elements"]) == p + n_obs


def _close(got: torch.Tensor, want: torch.Tensor, rel: float, what: str) -> None:
    scale = max(float(want.abs().max()), 1.0)
    err = float((got - want).abs().max())
    assert err <= rel * scale, f"{what} differs by {err:.3e}"


def test_distributed_updates_equal_single_process_fit_on_all_data(tmp_path):
    """Every case fitted on 2 processes, then updated twice with each rank's share of new examples: the same
    predictions as one process fitting all the data at the same hyperparameters (1e-8 regression, 1e-6
    classification), bit-identical on both ranks; an update searching the hyperparameters again equals a fit with
    the search; the saved updated model loads as the single-process fit; an empty update on one rank is refused
    on every rank."""
    runs = _launch(2, tmp_path, mode="update")
    for r, run in enumerate(runs):
        assert run.returncode == 0, f"rank {r} failed:\n{run.stderr[-3000:]}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    refs = {}
    for kind, space, solver in dist_worker.CASES:
        X, y, Xs = dist_worker.make_data(kind)
        Xn, yn = dist_worker.new_data(kind)
        est = dist_worker.estimator(kind, space, solver, False, False, **dist_worker.FIXED[kind])
        est.fit(torch.cat([X, Xn]), torch.cat([y, yn]))
        key = dist_worker.update_key(kind, space, solver)
        refs[key] = est
        ref = dist_worker.predictions(est, Xs)
        for r, res in enumerate(ranks):
            for name, value in ref.items():
                _close(res[key][name], value, 1e-8 if kind == "regression" else 1e-6, f"{key} rank {r}: {name}")
                assert torch.equal(res[key][name], ranks[0][key][name]), f"{key}: {name} differs between ranks"
    X, y, Xs = dist_worker.make_data("regression")
    Xn, yn = dist_worker.new_data("regression")
    full = dist_worker.estimator("regression", "function", "cholesky", False).fit(
        torch.cat([X, Xn]), torch.cat([y, yn])
    )
    for name, value in dist_worker.predictions(full, Xs).items():
        _close(ranks[0]["search"][name], value, 1e-6, f"update with the search: {name}")
    from linadapt import LinearizedRegressor

    loaded = LinearizedRegressor.load(tmp_path / "updated.linadapt", dist_worker.make_model("regression"))
    ref = dist_worker.predictions(refs[dist_worker.update_key("regression", "function", "cholesky")], Xs)
    for name, value in dist_worker.predictions(loaded, Xs).items():
        _close(value, ref[name], 1e-8, f"the saved updated model: {name}")
    for res in ranks:
        message = bytes(res["empty"]["message"].tolist()).decode()
        assert "rank 1" in message and "empty" in message, message


@pytest.mark.parametrize("mode", ["bad-shard", "empty-shard"])
def test_one_bad_rank_fails_every_rank_fast(mode, tmp_path):
    runs = _launch(3, tmp_path, mode=mode, timeout=120.0)
    for r, run in enumerate(runs):
        assert run.returncode == 3, f"rank {r} exited {run.returncode}:\n{run.stderr[-2000:]}"
        assert "DistributedError" in run.stderr and "rank 2" in run.stderr, run.stderr[-2000:]
    expected = "NaN" if mode == "bad-shard" else "empty"
    assert expected in runs[0].stderr


def test_fits_then_destroy_exit_cleanly_every_time(tmp_path):
    """Regressor and classifier, both spaces, fixed and learned hyperparameters, then destroy_process_group:
    launched repeatedly, every rank exits 0 and no thread of the backend outlives destroy_process_group.

    (torch.func's first vjp imports torch.distributed.nn.functional, whose default arguments captured the live
    process group; destroy_process_group then left gloo's threads and sockets to interpreter teardown, which
    aborted now and then at exit. ``release_captured_group`` drops those references; exit code 5 = leaked.)"""
    for i, world in enumerate([2, 2, 3]):
        runs = _launch(world, tmp_path, mode="exit", timeout=120.0)
        for r, run in enumerate(runs):
            assert run.returncode == 0, (
                f"launch {i} ({world} processes): rank {r} exited {run.returncode}:\n{run.stderr[-2000:]}"
            )


def test_distributed_without_process_group_is_a_clear_error():
    X, y, _ = dist_worker.make_data("regression")
    est = dist_worker.estimator("regression", "function", "cholesky", distributed=True)
    with pytest.raises(RuntimeError, match="init_process_group"):
        est.fit(X, y)


def test_cli_under_torchrun_matches_single_process(tmp_path):
    """`torchrun --nproc-per-node 2 -m linadapt adapt` shards the data file and writes what one process writes."""
    import numpy as np
    from safetensors.torch import save_file

    (tmp_path / "nets.py").write_text(
        "import torch\n\n"
        "def net():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))\n"
    )
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    save_file(model.state_dict(), tmp_path / "net.safetensors")
    rng = np.random.default_rng(0)
    X = rng.normal(size=(41, 2)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64) + (X[:, 1] > 0.7)
    np.savez(tmp_path / "train.npz", X=X, y=y)
    np.savez(tmp_path / "test.npz", X=X[:9], y=y[:9])
    args = ["adapt", "--model", "nets:net", "--weights", "net.safetensors", "--train", "train.npz"]
    args += ["--test", "test.npz", "--no-baselines"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(tmp_path)}
    one = subprocess.run(
        [sys.executable, "-m", "linadapt", *args, "--out", "one"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert one.returncode == 0, one.stderr
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(_free_port()),
    ]
    two = subprocess.run(
        [*launcher, "-m", "linadapt", *args, "--out", "two"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a = np.loadtxt(tmp_path / "one" / "predictions.csv", delimiter=",", skiprows=1)
    b = np.loadtxt(tmp_path / "two" / "predictions.csv", delimiter=",", skiprows=1)
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-8)
    assert "2 (torch.distributed" in (tmp_path / "two" / "report.html").read_text()
    # the saved model is an ordinary single-process estimator over all 41 examples
    import linadapt as la

    est = la.load(tmp_path / "two" / "adapted.linadapt", model)
    assert est.distributed is False and est._train_data[0].shape[0] == 41
