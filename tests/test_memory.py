"""The memory budget: parsing, where it reaches, the errors past it, and peak memory measured on models whose
dense Jacobian is far larger than the budget (each in a fresh process, under an address-space limit so that a
regression is a MemoryError rather than a kill by the operating system)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import linadapt as la
from linadapt._memory import default_memory_budget, format_bytes, resolve_memory_budget


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1000, 1000), (2.5e9, 2_500_000_000), ("512MiB", 512 * 2**20), ("1.5 GB", 1_500_000_000), ("4G", 4 * 2**30)],
)
def test_sizes_are_read_in_bytes(value, expected) -> None:
    assert resolve_memory_budget(value) == expected


def test_the_default_is_at_most_2_gib_and_a_quarter_of_available_memory() -> None:
    from linadapt._memory import available_memory

    budget = default_memory_budget()
    assert resolve_memory_budget(None) == resolve_memory_budget("auto") == budget
    assert 64 * 2**20 <= budget <= 2 * 2**30
    available = available_memory()
    if available is not None and available // 4 >= 64 * 2**20:
        assert budget <= available // 4 + 1


@pytest.mark.parametrize("bad", [0, -1, float("inf"), float("nan"), "lots", "3 parsecs", True, [1]])
def test_bad_budgets_are_named(bad) -> None:
    with pytest.raises(ValueError, match="memory_budget"):
        resolve_memory_budget(bad)


def test_estimators_and_operators_carry_the_budget() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    X = torch.randn(12, 3, dtype=torch.float64)
    y = torch.randn(12, 2, dtype=torch.float64)
    reg = la.LinearizedRegressor(net, memory_budget="8MiB").fit(X, y)
    assert reg.get_params()["memory_budget"] == "8MiB"
    assert reg.linearization_.memory_budget == reg.problem_.options.memory_budget == 8 * 2**20
    clf = la.LinearizedClassifier(net, memory_budget=2**22).fit(X, torch.arange(12) % 2)
    assert clf.linearization_.memory_budget == 2**22
    assert la.NTKOperator(net, X, memory_budget="1MiB").linearization.memory_budget == 2**20
    with pytest.raises(ValueError, match="memory_budget"):
        la.LinearizedRegressor(net, memory_budget="much").fit(X, y)


def test_a_dense_kernel_past_the_budget_is_an_error_naming_its_size() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X = torch.randn(300, 3, dtype=torch.float64)
    need = 8 * (300 * 2) ** 2
    with pytest.raises(la.MemoryBudgetError, match=f"needs {format_bytes(need)}.*memory_budget"):
        la.ntk_gram(net, X, memory_budget=need - 1)
    assert la.ntk_gram(net, X, memory_budget=need).shape == (600, 600)
    # an estimator whose dense function-space path would not fit takes the matrix-free one instead of failing
    wide = nn.Sequential(nn.Linear(3, 256), nn.Tanh(), nn.Linear(256, 2)).double()  # p > N: function space
    reg = la.LinearizedRegressor(wide, memory_budget=need // 2, optimize_hyperparameters=False, noise_var=0.1)
    reg.fit(X, torch.randn(300, 2, dtype=torch.float64))
    assert (reg.space_, reg.solver_) == ("function", "cg")


_PEAK = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from torch import nn
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT_BYTES, AS_LIMIT_BYTES))
    torch.set_num_threads(1)
    import linadapt as la
    from linadapt._memory import peak_rss
    torch.manual_seed(0)
    WHAT
    before = peak_rss()
    est = est.fit(X, y)
    out = est.predict_proba(Xs) if hasattr(est, "predict_proba") else est.predict(Xs, return_std=True)[1]
    print(json.dumps({"before": before, "peak": peak_rss()}))
    """
)


def _peak(what: str, limit: int) -> dict:
    code = _PEAK.replace("AS_LIMIT_BYTES", str(limit)).replace("WHAT", textwrap.dedent(what))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_peak_memory_of_a_classifier_whose_jacobian_is_25_times_its_budget() -> None:
    """A convolutional classifier (BatchNorm, depthwise convolution) with p ≈ 0.4M weights, n = 60, c = 10:
    the dense J of the training points is 60·10·p·8 B ≈ 1.9 GB, which the function-space Laplace fit formed
    before (and the test points' Jacobians in prediction); with a 64 MiB budget the fit and the predictive
    on 60 test points stay within 0.5 GB of the memory held before the fit."""
    what = """
    net = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1, groups=64), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(256, 1500), nn.Tanh(), nn.Linear(1500, 10),
    ).eval()
    p = sum(q.numel() for q in net.parameters())
    assert 60 * 10 * p * 8 > 25 * 2**26, p
    X, Xs = torch.randn(60, 3, 8, 8), torch.randn(60, 3, 8, 8)
    y = torch.arange(60) % 10
    est = la.LinearizedClassifier(net, memory_budget="64MiB")
    """
    r = _peak(what, 3 * 2**30)
    assert r["peak"] - r["before"] < 2**29, format_bytes(r["peak"] - r["before"])


def test_peak_memory_of_a_regression_predictive_on_many_test_points() -> None:
    """n = 3,000 points of a one-output MLP (p = 68,353) and the predictive std at 3,000 test points with a
    256 MiB budget: the dense kernel (72 MB), A and its factor fit, and the test points go through cross-kernel
    chunks (before, through test Jacobian chunks of up to 1 GiB whatever the budget); the process grows by less
    than 0.5 GB."""
    what = """
    net = nn.Sequential(nn.Linear(8, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 1)).double()
    X, Xs = torch.randn(3000, 8, dtype=torch.float64), torch.randn(3000, 8, dtype=torch.float64)
    y = torch.sin(X.sum(1))
    est = la.LinearizedRegressor(net, memory_budget="256MiB", optimize_hyperparameters=False, noise_var=0.1)
    """
    r = _peak(what, 3 * 2**30)
    assert r["peak"] - r["before"] < 2**29, format_bytes(r["peak"] - r["before"])
