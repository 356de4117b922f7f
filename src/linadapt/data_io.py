"""Reading a user's data files: CSV, ``.npz``, a folder with ``X.npy`` / ``y.npy``, or a folder of images.

Every reader returns a :class:`Dataset` (inputs X as float32 or integer array, targets y or ``None``) and
raises :class:`DataError` (a ``ValueError``) naming the file and the problem: missing file, empty file,
missing target column, non-numeric value (with row and column), NaN or inf, mismatched lengths, images of
different sizes.

* CSV: a header row; the target column is ``target`` (default: the last column). With ``require_target=False``
  a file without that column is read as inputs only (prediction data).
* ``.npz``: arrays ``X`` and (optionally) ``y``.
* a folder holding ``X.npy`` (and optionally ``y.npy``).
* a folder of images with one sub-folder per class (sorted names → labels 0, 1, …); images are read with
  Pillow as grey-scale (``mode="L"``) or RGB and scaled to [0, 1], shape (n, channels, height, width).
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field

import numpy as np

__all__ = ["DataError", "Dataset", "read_dataset"]

_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """A data file cannot be used (the message names the file and the problem)."""


@dataclass
class Dataset:
    """X: (n, ...) inputs; y: (n,) or (n, k) targets, or None; columns: the CSV input column names;
    target: the target column name; classes: the class folder names of an image folder."""

    X: np.ndarray
    y: np.ndarray | None
    columns: list[str] = field(default_factory=list)
    target: str | None = None
    classes: list[str] = field(default_factory=list)


def _check_finite(arr: np.ndarray, what: str) -> None:
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise DataError(f"{what} contains NaN or inf (first at index {tuple(int(i) for i in bad)})")


def _read_csv(path: str, target: str | None, require_target: bool) -> Dataset:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        raise DataError(f"{path} is empty")
    header = [h.strip() for h in rows[0]]
    body = rows[1:]
    if not body:
        raise DataError(f"{path} has a header but no data rows")
    if target is None:
        target_idx = len(header) - 1 if require_target else None
    elif target in header:
        target_idx = header.index(target)
    elif require_target:
        raise DataError(f"{path} has no column {target!r} (columns: {', '.join(header)})")
    else:
        target_idx = None
    values = np.empty((len(body), len(header)), dtype=np.float64)
    for i, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise DataError(f"{path}, line {i}: {len(row)} values for {len(header)} columns")
        for j, cell in enumerate(row):
            try:
                v = float(cell)
            except ValueError:
                raise DataError(f"{path}, line {i}, column {header[j]!r}: non-numeric value {cell.strip()!r}") from None
            if not math.isfinite(v):
                raise DataError(f"{path}, line {i}, column {header[j]!r}: {cell.strip()} (NaN or inf) is not allowed")
            values[i - 2, j] = v
    inputs = [j for j in range(len(header)) if j != target_idx]
    if not inputs:
        raise DataError(f"{path} has no input columns besides the target {header[target_idx]!r}")
    X = values[:, inputs].astype(np.float32)
    y = values[:, target_idx] if target_idx is not None else None
    return Dataset(X, y, [header[j] for j in inputs], header[target_idx] if target_idx is not None else None)


def _from_arrays(X: np.ndarray, y: np.ndarray | None, where: str) -> Dataset:
    if X.dtype == object or X.dtype.kind not in "biuf":
        raise DataError(f"{where}: X must be numeric, got dtype {X.dtype}")
    if X.ndim == 0 or X.shape[0] == 0:
        raise DataError(f"{where}: X is empty")
    _check_finite(X, f"{where}: X")
    if y is not None:
        if y.dtype == object or y.dtype.kind not in "biuf":
            raise DataError(f"{where}: y must be numeric, got dtype {y.dtype}")
        if y.shape[0] != X.shape[0]:
            raise DataError(f"{where}: X has {X.shape[0]} rows but y has {y.shape[0]}")
        _check_finite(y, f"{where}: y")
    if X.dtype.kind == "f":
        X = X.astype(np.float32)
    return Dataset(X, y)


def _read_images(path: str) -> Dataset:
    from PIL import Image

    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    images, labels, shape, first = [], [], None, None
    for label, name in enumerate(classes):
        folder = os.path.join(path, name)
        for fname in sorted(os.listdir(folder)):
            if not fname.lower().endswith(_IMAGE_EXTENSIONS):
                continue
            fpath = os.path.join(folder, fname)
            try:
                with Image.open(fpath) as img:
                    mode = "L" if img.mode in ("1", "L", "I", "I;16", "F") else "RGB"
                    arr = np.asarray(img.convert(mode), dtype=np.float32) / 255.0
            except Exception as exc:
                raise DataError(f"{fpath}: not a readable image ({exc})") from exc
            arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
            if shape is None:
                shape, first = arr.shape, fpath
            elif arr.shape != shape:
                raise DataError(
                    f"{fpath} has shape {arr.shape} (channels, height, width) but {first} has {shape}: all images "
                    "must have one size and colour mode"
                )
            images.append(arr)
            labels.append(label)
    if not images:
        raise DataError(f"{path}: no images found (expected one sub-folder of images per class)")
    return Dataset(np.stack(images), np.asarray(labels, dtype=np.int64), classes=classes)


def read_dataset(path: str, target: str | None = None, require_target: bool = True) -> Dataset:
    """Read a data file or folder (see the module docstring for the formats).

    Args:
        path: a ``.csv`` or ``.npz`` file, or a folder (``X.npy``/``y.npy``, or image sub-folders per class).
        target: the CSV target column (default: the last column).
        require_target: whether targets must be present (training data) or may be absent (prediction data).
    """
    if not os.path.exists(path):
        raise DataError(f"{path} does not exist")
    if os.path.isdir(path):
        x_file = os.path.join(path, "X.npy")
        if os.path.isfile(x_file):
            y_file = os.path.join(path, "y.npy")
            y = np.load(y_file, allow_pickle=False) if os.path.isfile(y_file) else None
            if y is None and require_target:
                raise DataError(f"{path} holds X.npy but no y.npy (targets are required here)")
            return _from_arrays(np.load(x_file, allow_pickle=False), y, path)
        return _read_images(path)
    if os.path.getsize(path) == 0:
        raise DataError(f"{path} is empty")
    lower = path.lower()
    if lower.endswith(".csv"):
        return _read_csv(path, target, require_target)
    if lower.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except ValueError as exc:
            raise DataError(f"{path}: cannot read without unpickling object arrays ({exc})") from exc
        if "X" not in arrays:
            raise DataError(f"{path} has no array 'X' (arrays: {', '.join(arrays) or 'none'})")
        if "y" not in arrays and require_target:
            raise DataError(f"{path} has no array 'y' (targets are required here)")
        return _from_arrays(arrays["X"], arrays.get("y"), path)
    raise DataError(f"{path}: unknown data format (expected .csv, .npz, a folder with X.npy, or image sub-folders)")
