"""Input checks shared by the public entry points. Every failure is a ValueError naming the problem."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def as_input_tensor(X: Any, name: str = "X") -> torch.Tensor:
    """Convert array-like inputs to a tensor and check them: non-empty, at least 1-D, finite if floating."""
    if isinstance(X, torch.Tensor):
        t = X.detach()
    else:
        try:
            arr = np.asarray(X)
        except Exception as exc:  # pragma: no cover - exotic inputs
            raise ValueError(f"{name} could not be converted to an array: {exc}") from exc
        if arr.dtype == object:
            raise ValueError(f"{name} has dtype object (ragged or non-numeric entries); pass a numeric array")
        if arr.dtype.kind not in "biuf":
            raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.dim() == 0:
        raise ValueError(f"{name} must have a leading example dimension, got a scalar")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 examples)")
    if t.is_complex():
        raise ValueError(f"{name} is complex; only real inputs are supported")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).reshape(t.shape[0], -1).any(dim=1).sum())
        raise ValueError(f"{name} contains NaN or inf values (in {bad} of {t.shape[0]} examples)")
    return t


def as_target_tensor(y: Any, n: int, name: str = "y") -> torch.Tensor:
    """Check regression targets: floating, finite, first dimension n, shape (n,) or (n, c). Returns float64."""
    if isinstance(y, torch.Tensor):
        t = y.detach()
    else:
        arr = np.asarray(y)
        if arr.dtype == object or arr.dtype.kind not in "biuf":
            raise ValueError(f"{name} must be a numeric array of regression targets, got dtype {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if not t.is_floating_point():
        raise ValueError(
            f"{name} has non-floating dtype {t.dtype}; regression targets must be floating point "
            "(for class labels use a classifier, or cast explicitly with y.astype(float))"
        )
    if t.dim() not in (1, 2):
        raise ValueError(f"{name} must have shape (n,) or (n, c), got {tuple(t.shape)}")
    if t.shape[0] != n:
        raise ValueError(f"{name} has {t.shape[0]} rows but X has {n} examples: lengths must match")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 examples)")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf values")
    return t.to(torch.float64)


def check_positive(value: Any, name: str, allow_none: bool = False) -> float | None:
    """A strictly positive finite float (or None when allowed)."""
    if value is None and allow_none:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a positive number, got {value!r}") from exc
    if not np.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return v


def check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")
    return value


def as_label_tensor(y: Any, n: int, n_classes: int, name: str = "y") -> torch.Tensor:
    """Check class labels: shape (n,), integers (integral floats accepted) in [0, n_classes). Returns int64."""
    if isinstance(y, torch.Tensor):
        t = y.detach().cpu()
    else:
        arr = np.asarray(y)
        if arr.dtype == object or arr.dtype.kind not in "biuf":
            raise ValueError(
                f"{name} must hold integer class labels 0 … {n_classes - 1} (the model's output indices), "
                f"got dtype {arr.dtype}"
            )
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.dim() == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.dim() != 1:
        raise ValueError(f"{name} must be a 1-D array of class labels, got shape {tuple(t.shape)}")
    if t.shape[0] != n:
        raise ValueError(f"{name} has {t.shape[0]} labels but X has {n} examples: lengths must match")
    if t.is_complex():
        raise ValueError(f"{name} must hold integer class labels, got complex values")
    if t.is_floating_point():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or inf values")
        fractional = t[t != t.round()]
        if fractional.numel():
            raise ValueError(f"{name} must hold integer class labels; got non-integral values such as {fractional[0]}")
    t = t.to(torch.int64)
    if t.numel() == 0:
        raise ValueError(f"{name} is empty: at least one labelled example is needed")
    if int(t.min()) < 0 or int(t.max()) >= n_classes:
        bad = int(t.min()) if int(t.min()) < 0 else int(t.max())
        raise ValueError(
            f"{name} contains label {bad}, outside [0, {n_classes}): the model has {n_classes} outputs, so labels "
            f"must be integers 0 … {n_classes - 1}"
        )
    return t
