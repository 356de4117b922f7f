"""benchmarks/_real_tasks.py's ResNet-18, untrained: its size, its forward pass
(training and the benchmark itself stay in benchmarks/real_networks.py)."""

import importlib.util
import sys
from pathlib import Path

import torch


def _real_tasks():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "_real_tasks.py"
    spec = importlib.util.spec_from_file_location("_real_tasks", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("_real_tasks", module)
    spec.loader.exec_module(module)
    return module


def test_resnet18_has_the_standard_size_and_runs_on_small_images():
    tasks = _real_tasks()
    net = tasks.resnet18_net(1, 10)
    # 11,173,962 for the usual 3-channel CIFAR ResNet-18; one input channel has 2·64·9 weights fewer
    assert sum(p.numel() for p in net.parameters()) == 11_172_810
    assert sum(p.numel() for p in tasks.resnet18_net(3, 10).parameters()) == 11_173_962
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == 20
    net.eval()
    with torch.no_grad():
        assert net(torch.rand(2, 1, 32, 32)).shape == (2, 10)
        assert net(torch.rand(1, 1, 28, 28)).shape == (1, 10)
