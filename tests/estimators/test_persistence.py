import json
import os

import numpy as np
import pytest
import torch
from models import embedder, inputs_for, mlp, resnet

import linadapt as la
from linadapt.estimators.persistence import FORMAT_VERSION, read_header
from linadapt.inference.evidence import NoisePrior


def regression_fit(**kw):
    model, X = resnet(), inputs_for("resnet", 10)
    y = torch.randn(10, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return model, la.LinearizedRegressor(model, **kw).fit(X, y)


@pytest.mark.parametrize("space", ["function", "parameter"])
def test_regressor_round_trip(tmp_path, space):
    model, reg = regression_fit(space=space, params="last")
    path = tmp_path / "adapted.linadapt"
    reg.save(path, model_reference="tests.models:resnet")
    back = la.load(path, resnet())  # a fresh network with the same weights
    Xs = inputs_for("resnet", 4, seed=9)
    for a, b in zip(reg.predict(Xs, return_std=True), back.predict(Xs, return_std=True)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    assert back.prior_var_ == reg.prior_var_ and back.noise_var_ == reg.noise_var_
    assert back.get_params()["space"] == space and back.model_reference_ == "tests.models:resnet"
    assert isinstance(la.LinearizedRegressor.load(path, model), la.LinearizedRegressor)


@pytest.mark.parametrize(
    ("estimator", "hyperprior"),
    [("regressor", NoisePrior(-3.0, 1.5)), ("regressor", (-3.0, 1.5)), ("regressor", None), ("classifier", None),
     ("classifier", (0.5, 1.0))],
)  # fmt: skip
def test_hyperprior_settings_round_trip(tmp_path, estimator, hyperprior):
    """Each accepted form of ``hyperprior`` saves (a NoisePrior object as its (loc, scale) pair) and loads with the
    same fit and the same setting."""
    model, X = mlp(), inputs_for("mlp", 12)
    if estimator == "regressor":
        est = la.LinearizedRegressor(model, hyperprior=hyperprior).fit(X, torch.randn(12, 3, dtype=torch.float64))
    else:
        est = la.LinearizedClassifier(model, hyperprior=hyperprior).fit(X, torch.arange(12) % 3)
    path = tmp_path / "h.linadapt"
    est.save(path)
    stored = read_header(path)["settings"]["hyperprior"]
    want = None if hyperprior is None else list(getattr(hyperprior, "__dict__", {}).values()) or list(hyperprior)
    assert stored == want
    back = la.load(path, mlp())
    assert back.prior_var_ == est.prior_var_
    assert back.hyperprior == want  # the loaded estimator searches again under the same prior


@pytest.mark.parametrize("link", ["probit", "bridge"])
def test_classifier_round_trip_with_integer_inputs(tmp_path, link):
    model, X = embedder(), inputs_for("embedder", 12)
    y = torch.arange(12) % 2
    clf = la.LinearizedClassifier(model, link=link).fit(X, y)
    path = os.fspath(tmp_path / "clf.linadapt")
    la.save(clf, path)
    back = la.LinearizedClassifier.load(path, embedder())
    Xs = inputs_for("embedder", 5, seed=3)
    np.testing.assert_allclose(back.predict_proba(Xs), clf.predict_proba(Xs), rtol=1e-10, atol=1e-12)
    assert back.link == link and back.prior_var_ == clf.prior_var_
    header = read_header(path)
    assert header["version"] == FORMAT_VERSION and header["estimator"] == "LinearizedClassifier"
    assert header["model"]["selected"] == list(clf.linearization_.param_names)


def test_mismatched_model_is_refused(tmp_path):
    model, reg = regression_fit()
    path = tmp_path / "a.linadapt"
    reg.save(path, model_reference="my_nets:build")
    other = resnet(seed=1)
    with pytest.raises(ValueError, match=r"adapted from a different network.*my_nets:build"):
        la.load(path, other)
    with pytest.raises(ValueError, match="holds a LinearizedRegressor"):
        la.LinearizedClassifier.load(path, model)


def test_corrupted_or_foreign_files_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model, reg = regression_fit()
    path = tmp_path / "a.linadapt"
    reg.save(path)
    tensors = load_file(path)
    header = read_header(path)
    tensors["y"] = tensors["y"] + 1.0  # tampered data, header unchanged
    save_file(tensors, tmp_path / "tampered.linadapt", metadata={"linadapt": json.dumps(header)})
    with pytest.raises(ValueError, match="checksum mismatch"):
        la.load(tmp_path / "tampered.linadapt", model)
    edited = json.loads(json.dumps(header))
    edited["fitted"]["noise_var_"] *= 2  # an edited hyperparameter, data unchanged
    save_file(load_file(path), tmp_path / "edited.linadapt", metadata={"linadapt": json.dumps(edited)})
    with pytest.raises(ValueError, match="header checksum mismatch"):
        la.load(tmp_path / "edited.linadapt", model)
    downgraded = dict(edited, version=1)  # editing the version does not skip the check
    save_file(load_file(path), tmp_path / "down.linadapt", metadata={"linadapt": json.dumps(downgraded)})
    with pytest.raises(ValueError, match="header checksum mismatch"):
        la.load(tmp_path / "down.linadapt", model)
    # a version-1 file (no header checksum) still loads
    old = {k: v for k, v in header.items() if k != "header_sha256"} | {"version": 1}
    save_file(load_file(path), tmp_path / "v1.linadapt", metadata={"linadapt": json.dumps(old)})
    mean = la.load(tmp_path / "v1.linadapt", model).predict(inputs_for("resnet", 3, seed=4))
    np.testing.assert_allclose(mean, reg.predict(inputs_for("resnet", 3, seed=4)), rtol=1e-10, atol=1e-12)
    newer = dict(header, version=FORMAT_VERSION + 1)
    save_file(load_file(path), tmp_path / "newer.linadapt", metadata={"linadapt": json.dumps(newer)})
    with pytest.raises(ValueError, match="not supported by this linadapt"):
        la.load(tmp_path / "newer.linadapt", model)
    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match=r"not a \.linadapt file"):
        la.load(tmp_path / "plain.safetensors", model)
    (tmp_path / "junk.linadapt").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match=r"not a \.linadapt file"):
        la.load(tmp_path / "junk.linadapt", model)
    with pytest.raises(ValueError, match="not fitted"):
        la.save(la.LinearizedRegressor(model), tmp_path / "x.linadapt")


def test_interrupted_save_keeps_the_previous_file(tmp_path, monkeypatch):
    _, reg = regression_fit()
    path = tmp_path / "a.linadapt"
    reg.save(path)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("interrupted while writing")

    monkeypatch.setattr("safetensors.torch.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        reg.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.linadapt"]  # no temporary file left behind


def test_model_checksum_sees_buffers():
    a, b = resnet(), resnet()
    assert la.estimators.persistence.model_checksum(a) == la.estimators.persistence.model_checksum(b)
    b.bn.running_mean.add_(1e-3)  # BatchNorm statistics change predictions, so they are part of the identity
    assert la.estimators.persistence.model_checksum(a) != la.estimators.persistence.model_checksum(b)
    assert la.estimators.persistence.model_checksum(mlp()) != la.estimators.persistence.model_checksum(a)


def test_atomic_writes_get_normal_file_modes(tmp_path):
    """Files written atomically get 0o666 minus the umask (not mkstemp's private 0o600); a replaced file
    keeps its mode."""
    import os

    from linadapt._files import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        assert (os.stat(tmp_path / "a.txt").st_mode & 0o777) == 0o644
        os.chmod(tmp_path / "a.txt", 0o640)
        atomic_write_text(tmp_path / "a.txt", "y")
        assert (os.stat(tmp_path / "a.txt").st_mode & 0o777) == 0o640
        assert (tmp_path / "a.txt").read_text() == "y"
    finally:
        os.umask(old)


def test_writing_into_a_missing_folder_names_the_destination(tmp_path):
    from linadapt._files import atomic_write_text

    target = tmp_path / "no_such_folder" / "model.linadapt"
    with pytest.raises(FileNotFoundError, match=r"cannot write .*model\.linadapt: the folder .*no_such_folder"):
        atomic_write_text(target, "x")
