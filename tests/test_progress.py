"""Progress bars over prediction chunks (linadapt._progress and the estimators' ``progress`` setting)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from rich.console import Console
from torch import nn

from linadapt import LinearizedClassifier, LinearizedRegressor
from linadapt._progress import check_progress, with_progress


def test_check_progress() -> None:
    assert check_progress("auto") == "auto" and check_progress(True) is True and check_progress(False) is False
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="progress must be True, False or 'auto'"):
            check_progress(bad)


def test_with_progress_yields_everything_and_draws_only_when_asked(capsys) -> None:
    assert list(with_progress(iter(range(5)), 5, "counting", False)) == list(range(5))
    assert capsys.readouterr().err == ""
    assert list(with_progress(iter(range(5)), 5, "counting", "auto")) == list(range(5))  # stderr is not a terminal
    assert capsys.readouterr().err == ""
    assert list(with_progress(iter(range(5)), 5, "counting", True)) == list(range(5))
    err = capsys.readouterr().err
    assert "counting" in err and "5/5" in err


def test_with_progress_inside_another_live_display(capsys) -> None:
    """A bar requested while a spinner runs (the CLI's) yields the items without a second live display."""
    with Console(stderr=True).status("spinning"):
        assert list(with_progress(iter(range(3)), 3, "inner", True)) == [0, 1, 2]


def _net(c: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, c)).double()


@pytest.mark.parametrize("kind", ["classifier", "regressor"])
def test_estimators_show_progress_over_chunks_with_unchanged_results(kind, capsys) -> None:
    g = torch.Generator().manual_seed(1)
    X = torch.randn(20, 4, generator=g, dtype=torch.float64)
    Xs = torch.randn(200, 4, generator=g, dtype=torch.float64)  # > 32 points: several cross-kernel chunks
    if kind == "classifier":
        est = LinearizedClassifier(_net(3), progress=True).fit(X, torch.randint(0, 3, (20,), generator=g))
        _, cov = est.predict_logits(Xs)
        pieces = [est.set_params(progress=False).predict_logits(Xs[i : i + 20])[1] for i in range(0, 200, 20)]
    else:
        est = LinearizedRegressor(_net(2), progress=True).fit(X, torch.randn(20, 2, generator=g, dtype=torch.float64))
        _, cov = est.predict_blocks(Xs)
        pieces = [est.set_params(progress=False).predict_blocks(Xs[i : i + 20])[1] for i in range(0, 200, 20)]
    err = capsys.readouterr().err
    assert "predictive covariance of 200 points" in err and "7/7" in err
    np.testing.assert_allclose(cov, np.concatenate(pieces), atol=1e-12)
    est.set_params(progress="sometimes")
    with pytest.raises(ValueError, match="progress must be"):
        est.predict_proba(Xs) if kind == "classifier" else est.predict(Xs, return_std=True)
