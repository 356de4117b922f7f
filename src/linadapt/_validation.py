"""Input checks shared by the public entry points. Every failure is a ValueError naming the problem."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import scipy.sparse
import torch
from sklearn.exceptions import DataConversionWarning


class NonNumericError(ValueError, TypeError):
    """An array of objects that are not numbers (a ValueError, and a TypeError as numpy's own conversion)."""


def _check_not_sparse(X: Any, name: str) -> None:
    if scipy.sparse.issparse(X) or (isinstance(X, torch.Tensor) and X.layout != torch.strided):
        raise ValueError(
            f"{name} is a sparse matrix: sparse input is not supported, the network takes dense tensors "
            f"(pass {name}.toarray() or {name}.to_dense())"
        )


def as_input_tensor(X: Any, name: str = "X") -> torch.Tensor:
    """Convert array-like inputs to a tensor and check them: dense, numeric (an object array of numbers is
    converted), non-empty in every dimension, at least 1-D, real, finite if floating."""
    _check_not_sparse(X, name)
    if isinstance(X, torch.Tensor):
        t = X.detach()
    else:
        try:
            arr = np.asarray(X)
        except Exception as exc:  # pragma: no cover - exotic inputs
            raise ValueError(f"{name} could not be converted to an array: {exc}") from exc
        if arr.dtype == object:
            try:
                arr = arr.astype(np.float64)
            except (TypeError, ValueError) as exc:
                raise NonNumericError(
                    f"{name} has dtype object with entries that are not numbers ({exc}); pass a numeric array"
                ) from exc
        if arr.dtype.kind == "c":
            raise ValueError(f"Complex data not supported: {name} is complex; only real inputs are supported")
        if arr.dtype.kind not in "biuf":
            raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.dim() == 0:
        raise ValueError(f"{name} must have a leading example dimension, got a scalar")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 examples, 0 sample(s) of shape {tuple(t.shape)})")
    if t.dim() > 1 and 0 in t.shape[1:]:
        raise ValueError(
            f"{name} has 0 feature(s) (shape={tuple(t.shape)}) while a minimum of 1 is required: every example is empty"
        )
    if t.is_complex():
        raise ValueError(f"Complex data not supported: {name} is complex; only real inputs are supported")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).reshape(t.shape[0], -1).any(dim=1).sum())
        raise ValueError(f"{name} contains NaN or inf values (in {bad} of {t.shape[0]} examples)")
    return t


def as_target_tensor(y: Any, n: int, name: str = "y") -> torch.Tensor:
    """Check regression targets: real numbers (integers and booleans are taken as floats, as scikit-learn does),
    finite, first dimension n, shape (n,) or (n, c). Returns float64."""
    if y is None:
        raise ValueError(f"this estimator requires y to be passed, but the target {name} is None")
    _check_not_sparse(y, name)
    if isinstance(y, torch.Tensor):
        t = y.detach()
    else:
        arr = np.asarray(y)
        if arr.dtype == object or arr.dtype.kind not in "biuf":
            raise ValueError(
                f"Unknown label type: {name} must be a numeric array of regression targets, got dtype {arr.dtype}"
            )
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.is_complex():
        raise ValueError(f"{name} has complex dtype {t.dtype}: regression targets must be real numbers")
    if not t.is_floating_point():  # integer or boolean targets are numbers too (scikit-learn's convention)
        t = t.to(torch.float64)
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


def encode_labels(
    y: Any, n: int, n_classes: int, name: str = "y", classes: np.ndarray | None = None
) -> tuple[torch.Tensor, np.ndarray]:
    """Class labels → the model's output indices (n,) int64, and the classes (one label per output).

    Without ``classes`` (at fit): integer labels (integral floats accepted) all in [0, n_classes) are the output
    indices themselves (classes 0 … n_classes − 1; absent classes allowed); any other labels — strings, or
    integers outside that range — with exactly n_classes distinct values are mapped in sorted order to outputs
    0 … n_classes − 1 (scikit-learn's ``classes_`` convention). With ``classes`` (after fit): each label must be
    one of them. A column vector (n, 1) is taken as (n,) with a ``DataConversionWarning``.

    Raises:
        ValueError: None, sparse, NaN/inf, continuous values ("Unknown label type"), a wrong shape or length,
            no labels, labels that fit neither rule, or a label not among ``classes``.
    """
    if y is None:
        raise ValueError(f"this estimator requires y to be passed, but the target {name} is None")
    _check_not_sparse(y, name)
    arr = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if arr.ndim == 2 and arr.shape[1] == 1:
        warnings.warn(
            f"A column-vector {name} was passed when a 1d array was expected: taken as shape (n,)",
            DataConversionWarning,
            stacklevel=3,
        )
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of class labels, got shape {arr.shape}")
    if arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} labels but X has {n} examples: lengths must match")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty: at least one labelled example is needed")
    if arr.dtype.kind == "c":
        raise ValueError(f"{name} must hold class labels, got complex values")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} contains NaN or inf values")
        fractional = arr[arr != np.round(arr)]
        if fractional.size:
            raise ValueError(
                f"Unknown label type: continuous. {name} must hold class labels; got non-integral values such as "
                f"{fractional[0]} (for real-valued targets use LinearizedRegressor)"
            )
    if classes is not None:
        index = {label: k for k, label in enumerate(classes.tolist())}
        values = arr.tolist()
        missing = [v for v in values if v not in index]
        if missing:
            raise ValueError(f"{name} contains label {missing[0]!r}, not among the fitted classes {classes.tolist()}")
        return torch.tensor([index[v] for v in values], dtype=torch.int64), classes
    numeric = arr.dtype.kind in "biuf"
    if numeric and arr.min() >= 0 and arr.max() < n_classes:
        return torch.from_numpy(arr.astype(np.int64)), np.arange(n_classes)
    try:
        distinct = np.unique(arr)
    except TypeError as exc:
        raise ValueError(f"{name} mixes label types that cannot be sorted: {exc}") from exc
    if len(distinct) != n_classes:
        shown = f"{distinct[:5].tolist()}{' …' if len(distinct) > 5 else ''}"
        rule = (
            f"labels must be the model's output indices 0 … {n_classes - 1}, or exactly {n_classes} distinct "
            "values (mapped in sorted order to the outputs)"
        )
        if numeric:
            bad = arr.min() if arr.min() < 0 else arr.max()
            raise ValueError(
                f"{name} contains label {bad:g}, outside [0, {n_classes}), and has {len(distinct)} distinct labels "
                f"({shown}): the model has {n_classes} outputs, so {rule}"
            )
        raise ValueError(
            f"{name} has {len(distinct)} distinct labels ({shown}) and the model has {n_classes} outputs: {rule}"
        )
    codes = np.searchsorted(distinct, arr)
    return torch.from_numpy(codes.astype(np.int64)), distinct
