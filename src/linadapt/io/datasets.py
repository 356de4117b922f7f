"""Reading a user's data files: CSV, ``.npz``, a folder with ``X.npy`` / ``y.npy``, or a folder of images.

Every reader returns a :class:`Dataset` (inputs X as float32 or integer array, targets y or ``None``) and
raises :class:`DataError` (a ``ValueError``) naming the file and the problem: missing file, empty file,
missing target column, non-numeric value (with row and column), NaN or inf, mismatched lengths, images of
different sizes.

* CSV: a header row; the target column is ``target`` (default: the last column), or several target columns
  (a list of names, or one string of comma-separated names) read as y (n, k). With ``require_target=False``
  a file without those columns is read as inputs only (prediction data).
* ``.npz``: arrays ``X`` and (optionally) ``y``; with ``inputs`` (names of arrays), those arrays instead of
  ``X``, as keyword inputs: X is then a dict {name: array} whose arrays share the leading example dimension.
* a folder holding ``X.npy`` (and optionally ``y.npy``).
* a folder of images with one sub-folder per class (sorted names → labels 0, 1, …; for test or prediction
  data, the training class names → their labels, by name); for prediction data also a flat folder of
  unlabelled images. Images are read with Pillow as grey-scale or RGB and scaled to [0, 1] (8-bit by 255,
  16-bit by 65535; 32-bit float images as stored), shape (n, channels, height, width).
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from dataclasses import dataclass, field

import numpy as np

__all__ = ["DataError", "Dataset", "read_dataset"]

_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """A data file cannot be used (the message names the file and the problem)."""


@dataclass
class Dataset:
    """X: (n, ...) inputs, or a dict of named input arrays (n, ...) each; y: (n,) or (n, k) targets, or None;
    columns: the CSV input column names; target: the target column name (a list of names for several target
    columns); classes: the class folder names of an image folder."""

    X: np.ndarray | dict[str, np.ndarray]
    y: np.ndarray | None
    columns: list[str] = field(default_factory=list)
    target: str | list[str] | None = None
    classes: list[str] = field(default_factory=list)


def _check_finite(arr: np.ndarray, what: str) -> None:
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise DataError(f"{what} contains NaN or inf (first at index {tuple(int(i) for i in bad)})")


def _csv_header(path: str) -> tuple[list[str], int] | None:
    """The header (first row with a non-blank cell, cells stripped) and how many physical lines it ends at,
    or None for a file without one."""
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        for row in reader:
            if any(cell.strip() for cell in row):
                return [h.strip() for h in row], reader.line_num
    return None


def _parse_csv_fast(path: str, header_lines: int, n_cols: int) -> np.ndarray | None:
    """The data rows as float64 (rows, n_cols) by numpy's C reader (skipping the ``header_lines`` physical
    lines of the header), or None — for the per-cell reader to settle — whenever it does not read them
    cleanly: a cell numpy refuses, a row of another length, NaN or inf, no rows. Every cell numpy accepts
    holds the value ``float`` gives it (after the csv module's unquoting); the per-cell reader names a bad
    cell, or reads what ``float`` accepts beyond numpy (``1_000``, non-ASCII digits)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "input contained no data": handled below
            values = np.loadtxt(
                path,
                delimiter=",",
                comments=None,
                quotechar='"',
                skiprows=header_lines,
                dtype=np.float64,
                ndmin=2,
                encoding=None,
            )
    except (ValueError, UnicodeDecodeError):
        return None
    if values.shape[0] == 0 or values.shape[1] != n_cols or not np.isfinite(values).all():
        return None
    return values


def _csv_body(path: str) -> list[list[str]]:
    """The data rows (non-blank rows after the header) as csv cells."""
    with open(path, newline="") as fh:
        return [r for r in csv.reader(fh) if any(cell.strip() for cell in r)][1:]


def _parse_csv_cells(path: str, header: list[str], body: list[list[str]]) -> np.ndarray:
    """The data rows as float64 (len(body), len(header)), cell by cell with ``float`` (slow): raises DataError
    naming the line (counted among the non-blank rows, the header being line 1) and column of the first bad
    cell."""
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
    return values


def _target_columns(path: str, header: list[str], target: str | list[str], require_target: bool) -> list[int]:
    """The header indices of the target columns named by ``target`` (a name, names, or comma-separated names
    where a name with commas is not itself a column); [] when none is in the file and targets are optional."""
    names: list[str] = []
    for name in [target] if isinstance(target, str) else list(target):
        parts = [p.strip() for p in name.split(",")]
        names.extend([name] if name in header or len(parts) < 2 else parts)
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DataError(f"{path}: target column(s) {', '.join(repr(n) for n in twice)} named more than once")
    missing = [n for n in names if n not in header]
    if missing and (require_target or len(missing) < len(names)):
        listed = ", ".join(repr(n) for n in missing)
        raise DataError(f"{path} has no column{'s' * (len(missing) > 1)} {listed} (columns: {', '.join(header)})")
    return [header.index(n) for n in names if n in header]


def _read_csv(path: str, target: str | list[str] | None, require_target: bool) -> Dataset:
    """A CSV file: numpy parses it; only when numpy does not read all of it cleanly is it read cell by cell
    (to find and name the bad cell). The checks run in one order either way: empty file, no data rows, the
    target column(s), the cells, no input columns."""
    found = _csv_header(path)
    if found is None:
        raise DataError(f"{path} is empty")
    header, header_lines = found
    values = _parse_csv_fast(path, header_lines, len(header))
    body = _csv_body(path) if values is None else []
    if values is None and not body:
        raise DataError(f"{path} has a header but no data rows")
    if target is None:
        targets = [len(header) - 1] if require_target else []
    else:
        targets = _target_columns(path, header, target, require_target)
    if values is None:
        values = _parse_csv_cells(path, header, body)
    inputs = [j for j in range(len(header)) if j not in targets]
    if not inputs:
        named = ", ".join(repr(header[j]) for j in targets)
        raise DataError(f"{path} has no input columns besides the target{'s' * (len(targets) > 1)} {named}")
    X = values[:, inputs].astype(np.float32)
    if not targets:
        return Dataset(X, None, [header[j] for j in inputs], None)
    if len(targets) == 1:
        return Dataset(X, values[:, targets[0]], [header[j] for j in inputs], header[targets[0]])
    return Dataset(X, values[:, targets], [header[j] for j in inputs], [header[j] for j in targets])


def _checked_input(X: np.ndarray, where: str) -> np.ndarray:
    if X.dtype == object or X.dtype.kind not in "biuf":
        raise DataError(f"{where} must be numeric, got dtype {X.dtype}")
    if X.ndim == 0 or X.shape[0] == 0:
        raise DataError(f"{where} is empty")
    _check_finite(X, where)
    return X.astype(np.float32) if X.dtype.kind == "f" else X


def _from_arrays(X: np.ndarray | dict[str, np.ndarray], y: np.ndarray | None, where: str) -> Dataset:
    """A Dataset of checked arrays: X one array, or named arrays (keyword inputs) with one row per example."""
    if isinstance(X, dict):
        X = {k: _checked_input(v, f"{where}: {k}") for k, v in X.items()}
        rows = {k: v.shape[0] for k, v in X.items()}
        if len(set(rows.values())) > 1:
            listed = ", ".join(f"{k} {n}" for k, n in rows.items())
            raise DataError(f"{where}: the input arrays differ in their number of rows ({listed})")
        n, what = next(iter(rows.values())), ", ".join(X) + (" have" if len(X) > 1 else " has")
    else:
        X = _checked_input(X, f"{where}: X")
        n, what = X.shape[0], "X has"
    if y is not None:
        if y.dtype == object or y.dtype.kind not in "biuf":
            raise DataError(f"{where}: y must be numeric, got dtype {y.dtype}")
        if y.shape[0] != n:
            raise DataError(f"{where}: {what} {n} rows but y has {y.shape[0]}")
        _check_finite(y, f"{where}: y")
    return Dataset(X, y)


def _image_array(fpath: str) -> np.ndarray:
    """One image as float32 (channels, height, width) in [0, 1]: 8-bit modes divided by 255, 16-bit ones by
    65535 (PIL's ``convert("L")`` would clip them to two levels), 32-bit float images as stored."""
    from PIL import Image

    try:
        with Image.open(fpath) as img:
            if img.mode.startswith("I;16"):
                arr = np.asarray(img, dtype=np.float32) / 65535.0
            elif img.mode == "I":  # 32-bit integers: 16-bit data (the usual case) by 65535, wider by its maximum
                arr = np.asarray(img, dtype=np.float32)
                arr = arr / max(65535.0, float(arr.max()))
            elif img.mode == "F":
                arr = np.asarray(img, dtype=np.float32)
            else:
                mode = "L" if img.mode in ("1", "L", "LA") else "RGB"
                arr = np.asarray(img.convert(mode), dtype=np.float32) / 255.0
    except Exception as exc:
        raise DataError(f"{fpath}: not a readable image ({exc})") from exc
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _read_images(path: str, classes: list[str] | None = None, require_target: bool = True) -> Dataset:
    """An image folder: one sub-folder per class (labels by folder name: with ``classes`` — the training
    classes — each sub-folder must be one of them and takes its index there, else the sorted folder names are
    the classes), or, where targets are not required, a flat folder of unlabelled images."""
    # hidden and tool folders (.ipynb_checkpoints, __pycache__, .git) are not classes
    entries = os.listdir(path)
    folders = sorted(d for d in entries if os.path.isdir(os.path.join(path, d)) and not d.startswith((".", "__")))
    loose = [f for f in entries if f.lower().endswith(_IMAGE_EXTENSIONS)]
    if folders and loose:
        raise DataError(
            f"{path} holds both images ({loose[0]}, …) and class folders ({', '.join(folders[:3])}): put every "
            "image in its class folder, or, for unlabelled data, the images alone in the folder"
        )
    if classes is not None:
        unknown = [d for d in folders if d not in classes]
        if unknown:
            raise DataError(
                f"{path}: class folder(s) {', '.join(repr(d) for d in unknown)} not among the training classes "
                f"({', '.join(classes)}); labels are matched by folder name"
            )
    names = list(classes) if classes is not None else folders
    groups = [(names.index(d), os.path.join(path, d)) for d in folders]
    if not folders and not require_target:
        groups = [(None, path)]  # unlabelled images directly in the folder
    images, labels, shape, first = [], [], None, None
    for label, folder in groups:
        for fname in sorted(os.listdir(folder)):
            if not fname.lower().endswith(_IMAGE_EXTENSIONS):
                continue
            fpath = os.path.join(folder, fname)
            arr = _image_array(fpath)
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
        expected = "one sub-folder of images per class" + ("" if require_target else ", or images directly")
        raise DataError(f"{path}: no images found (expected {expected})")
    y = None if groups[0][0] is None else np.asarray(labels, dtype=np.int64)
    return Dataset(np.stack(images), y, classes=names if y is not None else list(classes or []))


def read_dataset(
    path: str,
    target: str | list[str] | None = None,
    require_target: bool = True,
    classes: list[str] | None = None,
    inputs: list[str] | None = None,
) -> Dataset:
    """Read a data file or folder (see the module docstring for the formats).

    Args:
        path: a ``.csv`` or ``.npz`` file, or a folder (``X.npy``/``y.npy``, or image sub-folders per class).
        target: the CSV target column (default: the last column), or several (a list of names, or names
            separated by commas): y is then (n, k), the columns in the order named.
        require_target: whether targets must be present (training data) or may be absent (prediction data;
            an image folder may then hold the images directly, unlabelled).
        classes: for an image folder, the training class names: sub-folders are labelled by their index in
            this list (an unknown name is an error); None: the sorted sub-folder names are the classes.
        inputs: for an ``.npz`` file, the names of the arrays that are the inputs (keyword inputs: X is the dict
            {name: array}); None: the array ``X``. Other formats refuse it.
    """
    if not os.path.exists(path):
        raise DataError(f"{path} does not exist")
    if inputs is not None and not path.lower().endswith(".npz"):
        raise DataError(f"{path}: named input arrays ({', '.join(inputs)}) are read from an .npz file only")
    if os.path.isdir(path):
        x_file = os.path.join(path, "X.npy")
        if os.path.isfile(x_file):
            y_file = os.path.join(path, "y.npy")
            y = np.load(y_file, allow_pickle=False) if os.path.isfile(y_file) else None
            if y is None and require_target:
                raise DataError(f"{path} holds X.npy but no y.npy (targets are required here)")
            return _from_arrays(np.load(x_file, allow_pickle=False), y, path)
        return _read_images(path, classes, require_target)
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
        missing = [k for k in inputs or ["X"] if k not in arrays]
        if missing:
            listed = ", ".join(repr(k) for k in missing)
            raise DataError(f"{path} has no array {listed} (arrays: {', '.join(arrays) or 'none'})")
        if "y" not in arrays and require_target:
            raise DataError(f"{path} has no array 'y' (targets are required here)")
        X = {k: arrays[k] for k in inputs} if inputs is not None else arrays["X"]
        return _from_arrays(X, arrays.get("y"), path)
    raise DataError(f"{path}: unknown data format (expected .csv, .npz, a folder with X.npy, or image sub-folders)")
