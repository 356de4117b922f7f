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

import contextlib
import importlib
import os
import re
import sys
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.parameter import is_lazy

__all__ = ["ModelLoadError", "load_model"]


class ModelLoadError(ValueError):
    """The model or its weights could not be loaded (the message says which and why)."""


@contextlib.contextmanager
def _no_full_unpickling() -> Iterator[None]:
    """Within the block, every ``torch.load`` is weights-only and plain ``pickle.loads`` in torch.export's
    archive reader is refused."""
    import torch.export.pt2_archive._package as package

    real_load = torch.load

    def safe_load(*args, **kwargs):
        if kwargs.get("weights_only") is False:
            raise ModelLoadError(
                "the program needs full unpickling (custom objects) to load; pass trust_pickle=True "
                "(CLI: --trust-pickle) only if you trust the file"
            )
        kwargs["weights_only"] = True
        return real_load(*args, **kwargs)

    class _RefusePickle:
        @staticmethod
        def loads(*_args, **_kwargs):
            raise ModelLoadError(
                "the program stores pickled constants; pass trust_pickle=True (CLI: --trust-pickle) only if you "
                "trust the file"
            )

    real_pickle = getattr(package, "pickle", None)
    torch.load = safe_load  # type: ignore[assignment]
    if real_pickle is not None:
        package.pickle = _RefusePickle  # type: ignore[attr-defined]
    try:
        yield
    finally:
        torch.load = real_load  # type: ignore[assignment]
        if real_pickle is not None:
            package.pickle = real_pickle  # type: ignore[attr-defined]


def _load_exported(path: str, trust_pickle: bool) -> nn.Module:
    try:
        if trust_pickle:
            program = torch.export.load(path)
        else:
            with _no_full_unpickling():
                program = torch.export.load(path)
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


def load_model(spec: str, weights: str | None = None, trust_pickle: bool = False) -> nn.Module:
    """Load a trained network from a ``.pt2`` program or a ``module:factory`` plus a weights file.

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
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        parts = [
            f"{what} {', '.join(keys[:5])}" + (" …" if len(keys) > 5 else "")
            for what, keys in (("missing", result.missing_keys), ("unexpected", result.unexpected_keys))
            if keys
        ]
        raise ModelLoadError(f"weights {weights} do not fit the architecture from {spec!r}: {'; '.join(parts)}")
    return model.eval()
