"""The examples run (with fewer iterations and training steps than their defaults)."""

import importlib.util
import itertools
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_bayesopt_example_runs(capsys):
    pytest.importorskip("botorch")
    bayesopt = _load("bayesopt")
    (results,) = bayesopt.main(iterations=2, seeds=1, steps=200)
    for name in ("ntk", "matern"):
        best = results[name]
        assert len(best) == 3 and all(b >= a for a, b in itertools.pairwise(best))  # best values never decrease
    assert "best NTK" in capsys.readouterr().out
