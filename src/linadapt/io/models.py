"""Loading a user's trained network without running untrusted pickles.

Two ways to name a model (the CLI's ``--model`` / ``--weights``):

* ``path/to/model.pt2`` — a program saved with ``torch.export.save``. Its weights are read with
  ``torch.load(weights_only=True)``; anything that would need full unpickling (custom objects, pickled
  constants) is refused unless ``trust_pickle=True``.
* ``package.module:factory`` — an importable function (the current directory is on the path) that builds the
  architecture, called with no arguments; ``weights`` then names the trained weights: a ``.safetensors``
  file, or a state dict read with ``torch.load(weights_only=True)`` (full unpickling only with
  ``trust_pickle=True``).

Why the care: a pickle can execute arbitrary code when it is loaded. Only pass ``trust_pickle=True`` for files
you made yourself or fully trust.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import re
import sys
import zipfile

import torch
from torch import nn
from torch.nn.parameter import is_lazy

__all__ = ["ModelLoadError", "load_model"]


class ModelLoadError(ValueError):
    """The model or its weights could not be loaded (the message says which and why)."""


_FULL_UNPICKLING = (
    "the program needs full unpickling (custom objects) to load{where}; pass trust_pickle=True "
    "(CLI: --trust-pickle) only if you trust the file"
)
_PICKLED_CONSTANTS = (
    "the program stores pickled constants{where}; pass trust_pickle=True (CLI: --trust-pickle) only if you "
    "trust the file"
)
# records torch.export.load reads as text (archive metadata; the older format's program), never unpickles
_TEXT_RECORDS = {
    "archive_format",
    "archive_version",
    "byteorder",
    ".data/version",
    ".data/serialization_id",
    "version",
    "serialized_exported_program.json",
}


def _refuse_unpickling(data: bytes) -> None:
    """Raise ModelLoadError unless ``torch.export.load`` can read the ``.pt2`` archive ``data`` without full
    unpickling.

    torch.export.load (torch 2.13) has no ``weights_only`` option: it unpickles pickled weights/constants with
    ``torch.load(weights_only=False)``, opaque constants with ``pickle.loads``, and falls back to
    ``weights_only=False`` when sample inputs (or a legacy ``.pt`` record) fail the weights-only unpickler. So
    every record is checked before it is handed over:

    * payloads that the weights/constants configs list as raw tensor bytes are read as storage, never unpickled;
    * payloads marked ``use_pickle`` are refused (opaque Python objects with their own message), except
      TorchScript objects (``torch._C._pickle_load_obj`` rebuilds only registered torchbind classes);
    * JSON, extra files and archive metadata are read as text;
    * anything else (sample inputs, legacy or older-format ``.pt`` records, and records this check does not know,
      such as compiled AOTInductor code) must load with ``torch.load(weights_only=True)`` — the same unpickler,
      and the same allowed globals (``torch.serialization.add_safe_globals``), that torch tries first.

    The check fails closed: a record it cannot classify is refused rather than passed through.
    """
    from torch.export.pt2_archive.constants import (
        CONSTANTS_DIR,
        CUSTOM_OBJ_FILENAME_PREFIX,
        EXTRA_DIR,
        MODELS_DIR,
        OPAQUE_OBJ_FILENAME_PREFIX,
        WEIGHTS_DIR,
    )

    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = [name for name in archive.namelist() if not name.endswith("/")]
        if len(set(names)) < len(names):  # zipfile reads the last of equal names, torch's reader may not
            raise ModelLoadError(_FULL_UNPICKLING.format(where=" (records with equal names)"))
        # torch.save-style archives keep every record under one root folder (its name is free)
        root = names[0].split("/", 1)[0] + "/" if names and all("/" in name for name in names) else ""
        if root and not all(name.startswith(root) for name in names):
            root = ""
        relative = {name: name[len(root) :] for name in names}
        configs = [
            name
            for name, rel in relative.items()
            if rel.startswith((WEIGHTS_DIR, CONSTANTS_DIR)) and rel.endswith("_config.json")
        ]
        raw: set[str] = set()  # tensor payloads, read as bytes
        for config_name in configs:
            folder = config_name.rsplit("/", 1)[0]
            entries = json.loads(archive.read(config_name)).get("config", {})
            for key, entry in entries.items():
                path_name = entry.get("path_name", "")
                if path_name.startswith(OPAQUE_OBJ_FILENAME_PREFIX):
                    raise ModelLoadError(_PICKLED_CONSTANTS.format(where=f" ({key})"))
                if entry.get("use_pickle") and not path_name.startswith(CUSTOM_OBJ_FILENAME_PREFIX):
                    raise ModelLoadError(_FULL_UNPICKLING.format(where=f" ({key})"))
                raw.add(f"{folder}/{path_name}")
        for name, rel in relative.items():
            if name in raw or name in configs or rel in _TEXT_RECORDS:
                continue
            if rel.startswith((EXTRA_DIR, "extra_files/")) or (rel.startswith(MODELS_DIR) and rel.endswith(".json")):
                continue  # extra files and programs: read as text / JSON
            try:
                torch.load(io.BytesIO(archive.read(name)), map_location="cpu", weights_only=True)
            except Exception as exc:
                raise ModelLoadError(_FULL_UNPICKLING.format(where=f" ({rel})")) from exc


def _load_exported(path: str, trust_pickle: bool) -> nn.Module:
    try:
        with open(path, "rb") as file:  # read once: the bytes checked are the bytes loaded
            data = file.read()
        if not trust_pickle:
            _refuse_unpickling(data)
        program = torch.export.load(io.BytesIO(data))
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"could not read the exported program {path}: {type(exc).__name__}: {exc}") from exc
    return program.module()


def _build_from_factory(spec: str) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelLoadError(f"model {spec!r}: expected a .pt2 file or 'package.module:factory'")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(
            f"model {spec!r}: cannot import {module_name!r} ({exc}); run from the directory that holds it "
            "or put it on PYTHONPATH"
        ) from exc
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ModelLoadError(f"model {spec!r}: {module_name!r} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ModelLoadError(f"model {spec!r}: {attr!r} is not callable")
    try:
        model = factory()
    except Exception as exc:
        raise ModelLoadError(f"model {spec!r}: calling {attr}() failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"model {spec!r}: {attr}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _read_weights(path: str, trust_pickle: bool) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise ModelLoadError(f"weights file {path} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as exc:
        hint = "" if trust_pickle else " (read with weights_only=True; --trust-pickle allows full unpickling)"
        # torch's own explanation runs over many lines (with terminal escape codes): the line naming the cause
        # (weights-only unpickler), else the first; the rest stays on the chained exception
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines()]
        lines = [line for line in lines if line]
        first = next((line for line in lines if "WeightsUnpickler error" in line), lines[0] if lines else "")
        raise ModelLoadError(f"could not read weights {path}{hint}: {type(exc).__name__}: {first}") from exc
    if isinstance(state, nn.Module):
        state = state.state_dict()
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"weights {path} do not hold a state dict (name → tensor)")
    return state


def _storage(tensor: torch.Tensor) -> tuple[torch.device, int, int] | None:
    """The tensor's storage as (device, address, bytes), or None when it has no memory of its own (lazy/meta)."""
    if is_lazy(tensor) or tensor.device.type == "meta":
        return None
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse and other layouts without one storage: never an alias
        return None
    if storage.data_ptr() == 0 or storage.nbytes() == 0:
        return None
    return tensor.device, storage.data_ptr(), storage.nbytes()


def _view(tensor: torch.Tensor) -> tuple:
    return tensor.data_ptr(), tensor.dtype, tensor.shape, tensor.stride()


def _writes_all_of(source: torch.Tensor, alias: torch.Tensor) -> bool:
    """Whether copying into ``source`` writes every byte of ``alias`` (both in the model, storage shared)."""
    where = _storage(source)
    if where is None or where != _storage(alias):
        return False
    same_view = _view(source) == _view(alias)
    whole_storage = (
        source.storage_offset() == 0 and source.is_contiguous() and source.numel() * source.element_size() == where[2]
    )
    return same_view or whole_storage


def _unloaded(missing: list[str], loaded: list[str], tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names in ``missing`` that loading ``loaded`` (names read from the file) left unset.

    ``safetensors.torch.save_model`` stores a tensor shared by several names (tied weights: an output layer
    that reuses the embedding's Parameter) once, under one of them. A name missing from the file is set all
    the same when, in the model loaded into, it is the same tensor as a loaded name or a view into the storage
    that a loaded name covers entirely (``load_state_dict`` copies in place, so the tie is kept). Any other
    missing name is reported.
    """
    by_storage: dict[tuple[torch.device, int, int], list[torch.Tensor]] = {}
    by_id: set[int] = set()
    for name in loaded:
        by_id.add(id(tensors[name]))
        where = _storage(tensors[name])
        if where is not None:
            by_storage.setdefault(where, []).append(tensors[name])
    return [
        name
        for name in missing
        if id(tensors[name]) not in by_id
        and not any(_writes_all_of(source, tensors[name]) for source in by_storage.get(_storage(tensors[name]), ()))
    ]


def load_model(spec: str, weights: str | None = None, trust_pickle: bool = False) -> nn.Module:
    """Load a trained network from a ``.pt2`` program or a ``module:factory`` plus a weights file.

    Tied weights: a file written by ``safetensors.torch.save_model`` holds a tensor shared by several names
    once; a name the file lacks is accepted only when it shares that tensor in the model built (``_unloaded``).

    Args:
        spec: ``path.pt2`` or ``package.module:factory``.
        weights: the weights file for a factory (``.safetensors`` or a torch state dict); not used with .pt2.
        trust_pickle: allow full unpickling (arbitrary code execution if the file is malicious).

    Returns:
        The network (a factory-built one is put in eval mode; an exported program was traced in the mode it
        was exported in and cannot be switched).
    """
    if spec.endswith(".pt2"):
        if not os.path.isfile(spec):
            raise ModelLoadError(f"exported program {spec} does not exist")
        if weights is not None:
            raise ModelLoadError("an exported .pt2 program carries its weights: do not pass weights as well")
        return _load_exported(spec, trust_pickle)  # an exported program is traced in eval mode already
    model = _build_from_factory(spec)
    if weights is None:
        raise ModelLoadError(f"model {spec!r} is built by a factory: name its trained weights (--weights FILE)")
    state = _read_weights(weights, trust_pickle)
    own = model.state_dict()
    wrong = [
        f"{name} {tuple(tensor.shape)} (the model's is {tuple(own[name].shape)})"
        for name, tensor in state.items()
        if name in own and not is_lazy(own[name]) and tensor.shape != own[name].shape  # lazy: shaped on load
    ]
    if wrong:  # load_state_dict would raise a RuntimeError listing every mismatch after a traceback
        more = " …" if len(wrong) > 5 else ""
        raise ModelLoadError(
            f"weights {weights} do not fit the architecture from {spec!r}: wrong shape for {', '.join(wrong[:5])}{more}"
        )
    tensors = model.state_dict(keep_vars=True)  # the Parameters themselves: a tie is one object under two names
    result = model.load_state_dict(state, strict=False)
    missing = _unloaded(result.missing_keys, [name for name in state if name in tensors], tensors)
    if missing or result.unexpected_keys:
        parts = [
            f"{what} {', '.join(keys[:5])}" + (" …" if len(keys) > 5 else "")
            for what, keys in (("missing", missing), ("unexpected", result.unexpected_keys))
            if keys
        ]
        raise ModelLoadError(f"weights {weights} do not fit the architecture from {spec!r}: {'; '.join(parts)}")
    return model.eval()
