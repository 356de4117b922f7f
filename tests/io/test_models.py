import os
import textwrap

import pytest
import torch
from safetensors.torch import save_file

import linadapt as la
from linadapt.io.models import ModelLoadError, load_model

FACTORY = textwrap.dedent(
    """
    import torch

    def build():
        return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                   torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))

    def not_a_module():
        return 42

    def lazy():
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(3))
    """
)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "user_nets.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import user_nets

    torch.manual_seed(0)
    net = user_nets.build().eval()
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
    return tmp_path, net


def test_factory_with_safetensors_and_state_dict(workdir):
    tmp, net = workdir
    X = torch.randn(5, 1, 8, 8)
    save_file(net.state_dict(), tmp / "w.safetensors")
    torch.save(net.state_dict(), tmp / "w.pt")
    for weights in ("w.safetensors", "w.pt"):
        model = load_model("user_nets:build", weights)
        assert not model.training
        torch.testing.assert_close(model(X), net(X))


def test_exported_program_is_loaded_and_linearizable(workdir):
    tmp, net = workdir
    X = torch.randn(5, 1, 8, 8)
    program = torch.export.export(net, (X,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(program, tmp / "net.pt2")
    model = load_model(str(tmp / "net.pt2"))
    torch.testing.assert_close(model(X), net(X))
    J = la.Linearization(model).jacobian(X)
    torch.testing.assert_close(J, la.Linearization(net).jacobian(X))


def test_lazy_modules_take_their_shapes_from_the_weights(workdir):
    tmp, _ = workdir
    import user_nets

    net = user_nets.lazy()
    X = torch.randn(2, 1, 4, 4)
    net(X)  # materialise the lazy layer: (3, 16)
    save_file(net.state_dict(), tmp / "lazy.safetensors")
    model = load_model("user_nets:lazy", "lazy.safetensors")
    torch.testing.assert_close(model(X), net(X))


def test_pickled_objects_need_trust(workdir):
    tmp, net = workdir
    torch.save(net, tmp / "whole_model.pt")  # a pickled nn.Module, not a state dict
    with pytest.raises(ModelLoadError, match="weights_only=True; --trust-pickle") as info:
        load_model("user_nets:build", "whole_model.pt")
    assert "WeightsUnpickler error" in str(info.value) and "\x1b" not in str(info.value)
    model = load_model("user_nets:build", "whole_model.pt", trust_pickle=True)
    X = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(model(X), net(X))


def test_load_errors(workdir):
    tmp, net = workdir
    save_file(net.state_dict(), tmp / "w.safetensors")
    small = {k: v for k, v in net.state_dict().items() if not k.startswith("4.")}
    save_file(small, tmp / "partial.safetensors")
    other_head = dict(net.state_dict(), **{"4.weight": torch.zeros(1, 144), "4.bias": torch.zeros(1)})
    save_file(other_head, tmp / "other_head.safetensors")
    cases = [
        (("nope.pt2",), "does not exist"),
        (("user_nets:build",), "name its trained weights"),
        (("user_nets:build", "missing.safetensors"), "does not exist"),
        (("user_nets:build", "partial.safetensors"), "missing 4.weight"),
        (
            ("user_nets:build", "other_head.safetensors"),
            r"wrong shape for .*4\.weight \(1, 144\) \(the model's is \(3, 144\)\)",
        ),
        (("no_such_module:build", "w.safetensors"), "cannot import 'no_such_module'"),
        (("user_nets:nothing", "w.safetensors"), "has no attribute 'nothing'"),
        (("user_nets:not_a_module", "w.safetensors"), "returned int, not a torch.nn.Module"),
        (("just_a_name",), "expected a .pt2 file"),
    ]
    for args, message in cases:
        with pytest.raises(ModelLoadError, match=message):
            load_model(*args)
    (tmp / "script.py").write_text("print(1)\n")
    with pytest.raises(ModelLoadError, match=r"could not read weights script\.py") as info:
        load_model("user_nets:build", "script.py")
    assert "\n" not in str(info.value)  # one line: torch's multi-line explanation is cut to its first line
    (tmp / "junk.pt2").write_bytes(b"junk")
    with pytest.raises(ModelLoadError, match="could not read the exported program"):
        load_model(str(tmp / "junk.pt2"))
    assert os.getcwd() == str(tmp)
