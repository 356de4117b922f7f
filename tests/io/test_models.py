import os
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file, save_model

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

    class Tied(torch.nn.Module):  # a language-model head: the output layer reuses the embedding's weight
        def __init__(self, tie=True):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.mid = torch.nn.Linear(4, 4)
            self.out = torch.nn.Linear(4, 10, bias=False)
            if tie:
                self.out.weight = self.emb.weight

        def forward(self, tokens):
            return self.out(torch.tanh(self.mid(self.emb(tokens))))

    def tied():
        return Tied()

    def untied():
        return Tied(tie=False)
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


def _tied_file(tmp):
    """A tied-weights net saved with safetensors' save_model (which stores emb.weight only), and its contents."""
    import user_nets

    net = user_nets.tied().eval()
    save_model(net, str(tmp / "tied.safetensors"))
    stored = load_file(tmp / "tied.safetensors")
    assert "emb.weight" in stored and "out.weight" not in stored  # the alias is not in the file
    return net, stored


def test_tied_weights_saved_by_safetensors_save_model(workdir):
    tmp, _ = workdir
    net, stored = _tied_file(tmp)
    tokens = torch.tensor([[1, 2, 3], [9, 0, 4]])
    model = load_model("user_nets:tied", "tied.safetensors")
    assert model.out.weight is model.emb.weight  # the tie survives loading
    torch.testing.assert_close(model.emb.weight, net.emb.weight)
    torch.testing.assert_close(model(tokens), net(tokens))
    # the tied tensor stored under its other name loads as well
    save_file({"out.weight" if k == "emb.weight" else k: v for k, v in stored.items()}, tmp / "tied_out.safetensors")
    model = load_model("user_nets:tied", "tied_out.safetensors")
    assert model.out.weight is model.emb.weight
    torch.testing.assert_close(model(tokens), net(tokens))


def test_missing_weights_are_refused_even_beside_tied_ones(workdir):
    tmp, _ = workdir
    _, stored = _tied_file(tmp)
    save_file({k: v for k, v in stored.items() if k != "mid.weight"}, tmp / "no_mid.safetensors")
    with pytest.raises(ModelLoadError, match=r"do not fit .*: missing mid\.weight$"):  # out.weight is an alias
        load_model("user_nets:tied", "no_mid.safetensors")
    save_file({k: v for k, v in stored.items() if k != "emb.weight"}, tmp / "no_emb.safetensors")
    with pytest.raises(ModelLoadError, match=r"missing emb\.weight, out\.weight$"):  # the file holds neither name
        load_model("user_nets:tied", "no_emb.safetensors")
    with pytest.raises(ModelLoadError, match=r"missing out\.weight$"):  # not tied in this model: a weight of its own
        load_model("user_nets:untied", "tied.safetensors")


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


class _Evil:
    """Unpickling runs ``eval``: it creates the folder ``target`` and yields the object saved in ``payload``."""

    def __init__(self, target, payload=None):
        self.target, self.payload = str(target), str(payload)

    def __reduce__(self):
        return eval, (f"(__import__('os').mkdir({self.target!r}), __import__('torch').load({self.payload!r}))[1]",)


def _rewrite_pt2(source, target, replace, add=None):
    """Copy the .pt2 archive ``source`` to ``target`` with ``replace(relative_name, bytes) -> bytes`` and the
    records ``add`` ({relative_name: bytes})."""
    import zipfile

    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        root = src.namelist()[0].split("/", 1)[0]
        for info in src.infolist():
            dst.writestr(info, replace(info.filename.split("/", 1)[1], src.read(info)))
        for name, data in (add or {}).items():
            dst.writestr(f"{root}/{name}", data)


def _export(tmp, net):
    X = torch.randn(5, 1, 8, 8)
    torch.export.save(torch.export.export(net, (X,)), tmp / "net.pt2")
    return X


def test_malicious_pickles_are_refused_without_trust(workdir, monkeypatch):
    import io
    import logging

    # torch 2.13 logs its weights_only=False fallback with a bad format string; pytest's log capture raises on it
    monkeypatch.setattr(logging.getLogger("torch._export.serde.serialize"), "disabled", True)

    tmp, net = workdir
    torch.save([1], tmp / "list.pt")
    torch.save(_Evil(tmp / "pwned_weights", tmp / "list.pt"), tmp / "evil.pt")
    with pytest.raises(ModelLoadError, match="weights_only=True; --trust-pickle"):
        load_model("user_nets:build", "evil.pt")
    assert not (tmp / "pwned_weights").exists()
    with pytest.raises(ModelLoadError, match="do not hold a state dict"):
        load_model("user_nets:build", "evil.pt", trust_pickle=True)
    assert (tmp / "pwned_weights").exists()  # trusted: the pickle ran (the test's own harmless payload)

    X = _export(tmp, net)
    buffer = io.BytesIO()
    torch.save(_Evil(tmp / "pwned_program", tmp / "inputs.pt"), buffer)  # torch retries failed sample inputs unsafely

    def replace(name, data):
        if not name.startswith("data/sample_inputs/"):
            return data
        (tmp / "inputs.pt").write_bytes(data)  # the genuine sample inputs, which the payload then returns
        return buffer.getvalue()

    _rewrite_pt2(tmp / "net.pt2", tmp / "evil.pt2", replace)
    with pytest.raises(ModelLoadError, match=r"needs full unpickling .*data/sample_inputs/.*--trust-pickle"):
        load_model(str(tmp / "evil.pt2"))
    assert not (tmp / "pwned_program").exists()
    model = load_model(str(tmp / "evil.pt2"), trust_pickle=True)
    assert (tmp / "pwned_program").exists()
    torch.testing.assert_close(model(X), net(X))


def test_pickled_payloads_in_a_program_need_trust(workdir):
    import json
    import pickle

    tmp, net = workdir
    _export(tmp, net)
    torch.save([1], tmp / "list.pt")

    def pickled_weight(name, data):  # torch.export.load would read it with torch.load(weights_only=False)
        if not name.endswith("model_weights_config.json"):
            return data
        config = json.loads(data)
        next(iter(config["config"].values()))["use_pickle"] = True
        return json.dumps(config).encode()

    _rewrite_pt2(tmp / "net.pt2", tmp / "pickled.pt2", pickled_weight)
    with pytest.raises(ModelLoadError, match="needs full unpickling"):
        load_model(str(tmp / "pickled.pt2"))

    def opaque_constant(name, data):  # torch.export.load would read it with pickle.loads
        if not name.endswith("model_constants_config.json"):
            return data
        entry = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}
        return json.dumps({"config": {"evil": entry}}).encode()

    evil = pickle.dumps(_Evil(tmp / "pwned_constant", tmp / "list.pt"))
    _rewrite_pt2(tmp / "net.pt2", tmp / "opaque.pt2", opaque_constant, {"data/constants/opaque_obj_0": evil})
    with pytest.raises(ModelLoadError, match="stores pickled constants"):
        load_model(str(tmp / "opaque.pt2"))
    assert not (tmp / "pwned_constant").exists()


def test_loading_leaves_torch_load_alone(workdir, monkeypatch):
    import pickle

    import torch.export.pt2_archive._package as package

    tmp, net = workdir
    X = _export(tmp, net)
    torch.save(net.state_dict(), tmp / "w.pt")
    real_load, real_export_load, seen = torch.load, torch.export.load, []

    def spy(*args, **kwargs):  # runs inside load_model: nothing global may be swapped out meanwhile
        seen.append((torch.load is real_load, torch.serialization.load is real_load, package.pickle is pickle))
        return real_export_load(*args, **kwargs)

    monkeypatch.setattr(torch.export, "load", spy)
    for trust in (False, True):
        torch.testing.assert_close(load_model(str(tmp / "net.pt2"), trust_pickle=trust)(X), net(X))
        torch.testing.assert_close(load_model("user_nets:build", "w.pt", trust_pickle=trust)(X), net(X))
    assert seen == [(True, True, True)] * 2
    assert torch.load is real_load and package.pickle is pickle
