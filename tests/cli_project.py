"""A project folder for the command-line tests: a module of two small networks (a 2-16-1 regressor and a 2-16-3
classifier), their weights as safetensors, and the regression and classification CSVs they adapt on."""

import sys
import textwrap
from pathlib import Path
from types import ModuleType

import numpy as np
from safetensors.torch import save_file

NETS = textwrap.dedent(
    """
    import torch

    def regressor():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def classifier():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    """
)


def two_network_project(
    tmp_path: Path, monkeypatch, module: str, n: int = 30, source: str = NETS
) -> tuple[ModuleType, np.ndarray, np.random.Generator]:
    """Write ``module``.py (``source``, by default :data:`NETS`), reg.safetensors, clf.safetensors, reg.csv (x1, x2,
    y = sin x1 + 0.1 x2) and clf.csv (x1, x2, label) for ``n`` points X ~ U[−2, 2]² into ``tmp_path``, made the
    working directory and importable. Returns the imported module, X and the generator that drew it (for more
    draws)."""
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(module, None)  # another test's tmp folder may hold a different module of that name
    nets = __import__(module)
    save_file(nets.regressor().state_dict(), tmp_path / "reg.safetensors")
    save_file(nets.classifier().state_dict(), tmp_path / "clf.safetensors")
    rng = np.random.default_rng(0)
    X = rng.uniform(-2, 2, (n, 2))
    with open(tmp_path / "reg.csv", "w") as fh:
        fh.write("x1,x2,y\n" + "".join(f"{a},{b},{np.sin(a) + 0.1 * b}\n" for a, b in X))
    labels = (X[:, 0] > 0).astype(int) + (X[:, 1] > 1).astype(int)
    with open(tmp_path / "clf.csv", "w") as fh:
        fh.write("x1,x2,label\n" + "".join(f"{a},{b},{k}\n" for (a, b), k in zip(X, labels)))
    return nets, X, rng
