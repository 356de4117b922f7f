"""What ``linadapt adapt`` and ``predict`` write and report: predictions, predictions.csv, test metrics and the
comparison with the source network and fine-tuning, for each task (regression, classification, binary,
multilabel)."""

from __future__ import annotations

import csv
import io
import time
from typing import Any

import numpy as np
import torch

from linadapt import metrics
from linadapt._files import atomic_write_text
from linadapt._inputs import as_inputs
from linadapt.app import report
from linadapt.app._cli_data import network_outputs
from linadapt.experiments.baselines import finetune
from linadapt.io.datasets import Dataset

__all__ = ["columns", "comparison", "predict", "scores", "write_csv"]


def predict(est: Any, X: Any) -> tuple[np.ndarray, ...]:
    """Predictions at X, computed once: (proba,) for a classifier, (mean, std) for a regressor."""
    if getattr(est, "likelihood_", None) is not None:
        return (est.predict_proba(X),)
    return est.predict(X, return_std=True)


def columns(pred: tuple[np.ndarray, ...], task: str) -> tuple[list[str], np.ndarray]:
    """Column names and values for predictions.csv: mean, std (one output) or mean_k, std_k (regression);
    proba_k and label (classification, binary: proba_0, proba_1); proba_k = P(y_k = 1) and label_k (multilabel)."""
    if len(pred) == 1:
        proba = pred[0]
        c = proba.shape[1]
        if task == "multilabel":
            labels = (proba > 0.5).astype(np.float64)
            return [f"proba_{k}" for k in range(c)] + [f"label_{k}" for k in range(c)], np.hstack([proba, labels])
        return [f"proba_{k}" for k in range(c)] + ["label"], np.column_stack([proba, proba.argmax(1)])
    mean, std = pred
    if mean.ndim == 1:
        return ["mean", "std"], np.column_stack([mean, std])
    c = mean.shape[1]
    return [f"mean_{k}" for k in range(c)] + [f"std_{k}" for k in range(c)], np.hstack([mean, std])


def write_csv(path: str, names: list[str], values: np.ndarray, classes: list[str] | None = None) -> None:
    """predictions.csv; with the training classes' names (image folders), a ``class`` column after ``label``."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    named = bool(classes) and "label" in names
    writer.writerow(names + (["class"] if named else []))
    integral = [col == "label" or col.startswith("label_") for col in names]
    for row in values:
        cells = [int(v) if whole else f"{v:.10g}" for whole, v in zip(integral, row)]
        if named:  # a model with more outputs than training class folders can predict a class without one
            label = int(row[names.index("label")])
            cells.append(classes[label] if label < len(classes) else "")
        writer.writerow(cells)
    atomic_write_text(path, buf.getvalue())


def scores(pred: tuple[np.ndarray, ...], y: np.ndarray | None, task: str) -> dict[str, float]:
    """Test metrics of predictions (as from :func:`predict`): accuracy / nll / ece (classification, binary),
    subset accuracy / nll summed over the labels (multilabel), rmse / nll (regression)."""
    if y is None:
        return {}
    if len(pred) == 1:
        proba = pred[0]
        if task == "multilabel":
            Y = y.reshape(-1, 1) if y.ndim == 1 else y
            return {"subset accuracy": metrics.subset_accuracy(proba, Y), "nll": metrics.multilabel_nll(proba, Y)}
        return {
            "accuracy": metrics.accuracy(proba, y),
            "nll": metrics.nll(proba, y),
            "ece": metrics.expected_calibration_error(proba, y),
        }
    mean, std = pred
    target = y.reshape(mean.shape)
    return {"rmse": metrics.rmse(mean, target), "nll": metrics.gaussian_nll(mean, std, target)}


def _probabilities(logits: torch.Tensor, task: str) -> np.ndarray:
    """A point network's probabilities: softmax (classification), [1 − σ(f), σ(f)] (binary), σ(f_k)
    (multilabel)."""
    f = logits.double()
    if task == "classification":
        return torch.softmax(f, 1).numpy()
    p = torch.sigmoid(f.reshape(f.shape[0], -1)).numpy()
    return np.column_stack([1 - p[:, 0], p[:, 0]]) if task == "binary" else p


def comparison(
    pred: tuple[np.ndarray, ...],
    fit_seconds: float,
    net: torch.nn.Module,
    data: Dataset,
    y: np.ndarray,
    test_data: Dataset,
    baselines: bool,
    task: str,
):
    """Metrics of the source network, linadapt (predictions ``pred``) and, optionally, fine-tuning on the test
    data, as an HTML table, and a figure (reliability diagram, linadapt's predictive band, or None: multilabel,
    keyword inputs). ``y``: the training targets as fitted."""
    classifier = len(pred) == 1
    Xtr, Xte, yte = as_inputs(data.X), as_inputs(test_data.X), test_data.y
    rows, probas = [], {}

    def add(name: str, p: tuple[np.ndarray, ...], seconds: float) -> None:
        if classifier:
            probas[name] = p[0]
        rows.append([name, *scores(p, yte, task).values(), seconds])

    def outputs(module) -> tuple[np.ndarray, ...]:
        """A point network's predictions: probabilities, or the outputs with the training RMS residual as std."""
        if classifier:
            return (_probabilities(network_outputs(module, Xte), task),)
        fit = network_outputs(module, Xtr).double().numpy().reshape(y.shape)
        mean = network_outputs(module, Xte).double().numpy().reshape(yte.shape)
        resid = max(float(np.sqrt(np.mean((fit - y) ** 2))), 1e-6)
        return mean, np.full_like(mean, resid)

    suffix = "" if classifier else " (std: training RMS residual)"
    add(f"source network{suffix}", outputs(net), 0.0)
    add("linadapt", pred, fit_seconds)
    if baselines:
        ytr = torch.as_tensor(y).long() if task == "classification" else torch.as_tensor(y, dtype=torch.float32)
        for params in ("last", "all"):
            t = time.perf_counter()
            tuned = finetune(net, Xtr, ytr, task=task, params=params, epochs=300, lr=1e-3)
            seconds = time.perf_counter() - t
            add(f"fine-tune {params}{suffix}", outputs(tuned.model), seconds)
    if task == "multilabel":
        header, figure = ["method", "subset accuracy", "NLL (sum over labels)"], None
    elif classifier:
        header, figure = ["method", "accuracy", "NLL", "ECE"], report.reliability_figure(probas, yte)
    else:
        header = ["method", "RMSE", "NLL"]
        keyword = isinstance(test_data.X, dict)  # no input axis to draw the band along
        figure = None if keyword else report.prediction_figure(test_data.X, yte, *pred, "linadapt on the test data")
    return report.table_html([*header, "fit seconds"], rows), figure
