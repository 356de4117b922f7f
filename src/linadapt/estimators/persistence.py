"""Saving and loading adapted models: the ``.linadapt`` format (safetensors + a JSON header, no pickle).

A ``.linadapt`` file is one safetensors file. Its tensors are what prediction needs besides the source
network:

* ``X`` — the training inputs (as the network consumes them; keyword inputs as one tensor ``X.<name>`` per
  name), ``y`` — the targets or labels;
* ``delta`` — the posterior mean δ̄ (regression) or MAP δ* (classification) over the selected parameters,
  kept to verify the reconstruction.

Its metadata entry ``linadapt`` is a JSON document::

    {"format": "linadapt-adapted", "version": 2,
     "estimator": "LinearizedRegressor" | "LinearizedClassifier",
     "settings": {constructor arguments except the model},
     "fitted": {"prior_var_": …, "noise_var_": … (regression)},
     "model": {"sha256": checksum of the source network's weights and buffers, "parameters": p,
               "selected": [names of the adapted parameters], "reference": free text (e.g. the CLI's MODEL)},
     "payload_sha256": checksum of the tensors above,
     "linadapt_version": "…",
     "header_sha256": checksum of this document without this entry (version 2 on)}

An ``output_fn`` (any Python callable) is not stored: the settings record only its name
(``"output_fn": "given: module.function"``), and ``load`` must be given the function again (it refuses to load
without one, or with one the file was made without); the check of the rebuilt posterior against ``delta``
then also checks that it computes what the saved one did.

Loading rebuilds the posterior from the training data at the stored hyperparameters (no hyperparameter
search) with the network the caller supplies, after checking the format version, the two checksums (the
tensors; the header's settings and hyperparameters) and that the network's weights are the ones the file was
made with. The checksums detect corruption and edits, not forgery (anyone can recompute them): load files
you trust. Saving writes a temporary file in the
target directory and renames it over the destination, so an interrupted save never damages an existing file.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch
from torch import nn

from linadapt._files import atomic_write
from linadapt._inputs import KeywordInputs
from linadapt._version import __version__
from linadapt.inference.evidence import NoisePrior

__all__ = [
    "ESTIMATORS",
    "FORMAT_VERSION",
    "SaveLoadMixin",
    "load",
    "model_checksum",
    "read_header",
    "register_estimator",
    "save",
]

FORMAT = "linadapt-adapted"
FORMAT_VERSION = 2  # 2: the header carries its own checksum (version 1 files are still read)
_META_KEY = "linadapt"

# the estimators a file can hold, by class name (the header's "estimator"): each registers itself with
# :func:`register_estimator` and provides ``_fitted_state()`` (the header's "fitted" entry, JSON) and
# ``_refit_from_state(X, y, fitted)`` (the posterior at those hyperparameters, no search)
ESTIMATORS: dict[str, type] = {}


def register_estimator(cls: type) -> type:
    """Class decorator: make ``cls`` saveable and loadable under its class name."""
    ESTIMATORS[cls.__name__] = cls
    return cls


def _tensor_digest(h: Any, name: str, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def model_checksum(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer of ``model`` (names, dtypes, shapes and values)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict(keep_vars=False).items()):
        _tensor_digest(h, name, t)
    return h.hexdigest()


def _payload_checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        _tensor_digest(h, name, tensors[name])
    return h.hexdigest()


def _header_checksum(header: dict[str, Any]) -> str:
    """sha256 of the header's canonical JSON (sorted keys, no spaces) without its ``header_sha256`` entry."""
    rest = {k: v for k, v in header.items() if k != "header_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _settings(estimator: Any) -> dict[str, Any]:
    settings = {k: v for k, v in estimator.get_params(deep=False).items() if k != "model"}
    fn = settings.get("output_fn")
    if fn is not None:  # code is not stored: its name, so that load can ask for it again
        name = getattr(fn, "__qualname__", type(fn).__name__)
        settings["output_fn"] = f"given: {getattr(fn, '__module__', None) or '?'}.{name}"
    if settings.get("device") is not None:
        settings["device"] = str(settings["device"])
    prior = settings.get("hyperprior")
    if isinstance(prior, NoisePrior):  # the regressor's hyperprior given as an object: stored as its (loc, scale)
        settings["hyperprior"] = [prior.loc, prior.scale]
    for key, value in settings.items():  # numpy / torch arrays (e.g. one noise_var per output) as JSON lists
        if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
            settings[key] = value.tolist()
    try:
        json.dumps(settings)
    except TypeError as exc:
        raise ValueError(f"estimator settings cannot be stored as JSON: {exc}") from exc
    return settings


def save(estimator: Any, path: str | os.PathLike, model_reference: str | None = None) -> None:
    """Write a fitted :class:`~linadapt.LinearizedRegressor` or :class:`~linadapt.LinearizedClassifier`.

    Args:
        estimator: the fitted estimator.
        path: destination file (conventionally ``*.linadapt``); replaced atomically.
        model_reference: optional text stored with the file to say where the source network comes from.

    After a ``distributed=True`` fit, every rank must call ``save`` (the shards are gathered); rank 0 writes
    the file, which then loads as a single-process estimator.
    """
    from safetensors.torch import save_file

    if type(estimator).__name__ not in ESTIMATORS:
        kinds = " or ".join(ESTIMATORS)
        raise ValueError(f"can only save a {kinds}, got {type(estimator).__name__}")
    if not hasattr(estimator, "posterior_"):
        raise ValueError(f"this {type(estimator).__name__} is not fitted: nothing to save")
    X, y = estimator._train_data
    sharding = getattr(estimator, "_sharding", None)
    settings = _settings(estimator)
    if sharding is not None:
        # A data-parallel fit: gather every rank's shard (a collective — all ranks call save) and let rank 0
        # write a file that loads as an ordinary single-process estimator.
        X, y = sharding.gather(X), sharding.gather(y)
        settings["distributed"] = False
        if sharding.rank != 0:
            return
    tensors = {
        **_input_entries(X),
        "y": y.detach().cpu().contiguous(),
        "delta": estimator.posterior_.delta.detach().cpu().contiguous(),
    }
    fitted = estimator._fitted_state()
    lin = estimator.linearization_
    header = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "estimator": type(estimator).__name__,
        "settings": settings,
        "fitted": fitted,
        "model": {
            "sha256": model_checksum(estimator.model),
            "parameters": lin.num_params,
            "selected": list(lin.param_names),
            "reference": model_reference,
        },
        "payload_sha256": _payload_checksum(tensors),
        "linadapt_version": __version__,
    }
    header["header_sha256"] = _header_checksum(header)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={_META_KEY: json.dumps(header)}))


def _input_entries(X: Any) -> dict[str, torch.Tensor]:
    """The training inputs as file entries: ``X``, or ``X.<name>`` per keyword input."""
    if isinstance(X, KeywordInputs):
        return {f"X.{k}": v.detach().cpu().contiguous() for k, v in X.items()}
    return {"X": X.detach().cpu().contiguous()}


def _output_fn_setting(path: Any, stored: Any, output_fn: Any) -> Any:
    """The ``output_fn`` to rebuild with: the one given, which the file must have been made with (and only then)."""
    if stored is not None and output_fn is None:
        raise ValueError(
            f"{path} was fitted with output_fn ({stored.removeprefix('given: ')}), which a .linadapt file does not "
            "store: pass the same function again, load(path, model, output_fn=...)"
        )
    if stored is None and output_fn is not None:
        raise ValueError(f"{path} was fitted without output_fn: load it without one")
    return output_fn


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a ``.linadapt`` file (checked to be one)."""
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise ValueError(f"{path} is not a .linadapt file (not readable as safetensors: {exc})") from exc
    if _META_KEY not in meta:
        raise ValueError(f"{path} is a safetensors file but not a .linadapt file (no '{_META_KEY}' header)")
    try:
        header = json.loads(meta[_META_KEY])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: the linadapt header is not valid JSON ({exc})") from exc
    if header.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown format {header.get('format')!r}, expected {FORMAT!r}")
    version = header.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise ValueError(
            f"{path}: format version {version!r} is not supported by this linadapt (reads versions 1 to "
            f"{FORMAT_VERSION}); upgrade linadapt to read it"
        )
    return header


def load(path: str | os.PathLike, model: nn.Module, output_fn: Any = None) -> Any:
    """Read a ``.linadapt`` file and rebuild the fitted estimator around ``model``.

    Args:
        path: the file written by :func:`save`.
        model: the source network, with the weights the adaptation was made from (verified by checksum).
        output_fn: the ``output_fn`` the estimator was fitted with, if any (it is not stored in the file).

    Returns:
        A fitted LinearizedRegressor or LinearizedClassifier, equal in its predictions to the one saved.
    """
    from safetensors.torch import load_file

    header = read_header(path)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    tensors = load_file(os.fspath(path))
    inputs = ["X"] if "X" in tensors else sorted(k for k in tensors if k.startswith("X."))
    missing = {"y", "delta"} - set(tensors) | (set() if inputs else {"X"})
    if missing:
        raise ValueError(f"{path}: the file lacks tensors {sorted(missing)}")
    payload = {k: tensors[k] for k in (*inputs, "y", "delta")}
    if _payload_checksum(payload) != header.get("payload_sha256"):
        raise ValueError(f"{path}: checksum mismatch — the stored data are corrupted or were modified")
    if (header["version"] >= 2 or "header_sha256" in header) and header.get("header_sha256") != _header_checksum(
        header
    ):
        raise ValueError(
            f"{path}: header checksum mismatch — the stored settings or hyperparameters are corrupted or were modified"
        )
    expected = header["model"]["sha256"]
    actual = model_checksum(model)
    if actual != expected:
        ref = header["model"].get("reference")
        where = f" (saved with source model {ref})" if ref else ""
        raise ValueError(
            f"{path} was adapted from a different network{where}: the weights of the model given do not match "
            f"(sha256 {actual[:12]}… vs {expected[:12]}… recorded). Load it with the exact source network."
        )
    cls = ESTIMATORS.get(header["estimator"])
    if cls is None:
        raise ValueError(f"{path}: unknown estimator {header['estimator']!r}")
    settings = dict(header["settings"])
    settings["output_fn"] = _output_fn_setting(path, settings.get("output_fn"), output_fn)
    X = payload["X"] if "X" in payload else {k.removeprefix("X."): payload[k] for k in inputs}
    estimator = cls(model, **settings)
    estimator._refit_from_state(X, payload["y"], header["fitted"])
    if list(estimator.linearization_.param_names) != header["model"]["selected"]:
        spec = header["settings"].get("params")
        raise ValueError(f"{path}: the parameters selected by {spec!r} differ from the saved ones")
    delta = estimator.posterior_.delta.cpu()
    scale = max(float(payload["delta"].abs().max()), 1e-300)
    if float((delta - payload["delta"]).abs().max()) > 1e-6 * scale + 1e-12:
        raise ValueError(
            f"{path}: the rebuilt posterior differs from the saved one (max |Δδ| = "
            f"{float((delta - payload['delta']).abs().max()):.3e}); the model or the numerics differ"
        )
    estimator.model_reference_ = header["model"].get("reference")
    return estimator


class SaveLoadMixin:
    """``save`` / ``load`` methods for the estimators (the ``.linadapt`` format of this module)."""

    def save(self, path: str | os.PathLike, model_reference: str | None = None) -> None:
        """Write this fitted estimator to ``path`` atomically; ``model_reference`` is stored as a note on
        where the source network comes from."""
        save(self, path, model_reference)

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module, output_fn: Any = None) -> Any:
        """Read a ``.linadapt`` file written by ``save``, with the same source ``model`` (checked by checksum) and
        the same ``output_fn``, if it was fitted with one (functions are not stored)."""
        est = load(path, model, output_fn)
        if not isinstance(est, cls):
            raise ValueError(f"{path} holds a {type(est).__name__}, not a {cls.__name__}")
        return est
