"""What ``linadapt adapt`` / ``predict`` / ``suggest`` do with the data they read: the task (regression,
classification, binary, multilabel) chosen for the targets and checked against the network, the option values
that name columns or arrays, and inputs that are one array or named arrays (keyword inputs, ``model(**X)``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from linadapt._inputs import KeywordInputs
from linadapt.jacobian.inputs import forward_outputs

__all__ = [
    "TASKS",
    "choose_task",
    "describe_inputs",
    "n_examples",
    "network_outputs",
    "split_names",
    "take",
    "target_summary",
    "task_of",
    "task_targets",
]

TASKS = ("auto", "regression", "classification", "binary", "multilabel")


def split_names(values: list[str] | None) -> list[str] | None:
    """Names given by a repeated option, each value possibly comma-separated; None when not given."""
    if not values:
        return None
    return [p.strip() for v in values for p in v.split(",") if p.strip()] or None


def n_examples(X: np.ndarray | dict[str, np.ndarray]) -> int:
    """The number of examples of one input array or of named input arrays."""
    return int(next(iter(X.values())).shape[0] if isinstance(X, dict) else X.shape[0])


def take(X: np.ndarray | dict[str, np.ndarray], rows: Any) -> np.ndarray | dict[str, np.ndarray]:
    """Rows of the inputs (of every named array alike)."""
    return {k: v[rows] for k, v in X.items()} if isinstance(X, dict) else X[rows]


def describe_inputs(X: np.ndarray | dict[str, np.ndarray]) -> str:
    """The shape of one example: ``(2,)``, or ``input_ids (5,), attention_mask (5,)`` for named arrays."""
    if isinstance(X, dict):
        return ", ".join(f"{k} {tuple(v.shape[1:])}" for k, v in X.items())
    return str(tuple(X.shape[1:]))


def network_outputs(net: torch.nn.Module, X: torch.Tensor | KeywordInputs) -> torch.Tensor:
    """The network's outputs at X (``net(X)``, or ``net(**X)`` for keyword inputs) as linadapt reads them: a
    tensor, a dict's ``"logits"``, an object's ``.logits``. No gradient."""
    with torch.no_grad():
        return forward_outputs(net, X)


def task_of(est: Any) -> str:
    """The CLI task of a fitted estimator: regression, classification (categorical), binary or multilabel."""
    lik = getattr(est, "likelihood_", None)
    if lik is None:
        return "regression"
    return {"categorical": "classification", "bernoulli": "binary"}.get(lik.name, lik.name)


def _zero_one(y: np.ndarray) -> bool:
    return bool(np.isin(y, (0, 1)).all())


def _values(y: np.ndarray) -> str:
    distinct = np.unique(y)
    shown = ", ".join(f"{v:g}" for v in distinct[:6].tolist())
    return shown + (f", … ({len(distinct)} distinct values)" if len(distinct) > 6 else "")


def choose_task(task: str, y: np.ndarray, n_outputs: int) -> str:
    """``task``, or for ``auto``: multilabel for a 0/1 target with several columns; classification for integer
    labels (n,) in [0, c) of a network with c ≥ 2 outputs; binary for 0/1 labels of a one-output network;
    regression otherwise (as the classifier's ``likelihood="auto"``, with regression for any other target)."""
    if task != "auto":
        return task
    if y.ndim == 2 and y.shape[1] > 1:
        return "multilabel" if _zero_one(y) else "regression"
    labels = y.reshape(-1) if y.ndim == 2 else y
    if labels.ndim != 1 or not np.all(np.mod(labels, 1) == 0):
        return "regression"
    if y.ndim == 1 and n_outputs >= 2 and labels.min() >= 0 and labels.max() < n_outputs:
        return "classification"
    if n_outputs == 1 and _zero_one(labels):
        return "binary"
    return "regression"


def task_targets(task: str, y: np.ndarray, n_outputs: int, where: str) -> np.ndarray:
    """The targets for ``task`` (float64 for regression, int64 labels otherwise), checked against the network's
    ``n_outputs``: a ValueError naming the values or sizes that do not fit."""
    if task == "regression":
        return y.astype(np.float64)
    if task == "classification":  # (a one-output network is refused by the estimator, with its remedy)
        if n_outputs > 1 and not np.all(np.mod(y, 1) == 0):  # not truncated to integers in silence
            raise ValueError(f"--task classification takes integer class labels; {where} has {_values(y)}")
        return y.astype(np.int64)
    if task == "binary":
        if y.ndim == 2 and y.shape[1] != 1:
            raise ValueError(
                f"--task binary takes one label column; {where} has {y.shape[1]} (several 0/1 labels per example: "
                "--task multilabel)"
            )
        if n_outputs != 1:
            raise ValueError(
                f"--task binary needs a network with one output (the logit of P(y = 1)); this one has {n_outputs} "
                "outputs (softmax classes: --task classification)"
            )
        if not _zero_one(y):
            raise ValueError(f"--task binary takes labels 0 and 1; {where} has {_values(y)}")
        return y.reshape(-1).astype(np.int64)
    Y = y.reshape(-1, 1) if y.ndim == 1 else y  # multilabel
    if Y.shape[1] != n_outputs:
        raise ValueError(
            f"--task multilabel needs one network output (logit) per label column: {where} has {Y.shape[1]} label "
            f"column{'s' * (Y.shape[1] != 1)} but the network has {n_outputs} output{'s' * (n_outputs != 1)}"
        )
    if not _zero_one(Y):
        raise ValueError(f"--task multilabel takes 0/1 labels; {where} has {_values(Y)}")
    return Y.astype(np.int64)


def target_summary(task: str, y: np.ndarray, n_outputs: int) -> tuple[str, str]:
    """A row of the adapt table describing the training targets as fitted."""
    if task in ("classification", "binary"):
        counts = np.bincount(y, minlength=max(n_outputs, 2))
        return ("labels per class", " ".join(str(int(k)) for k in counts))
    if task == "multilabel":
        return ("positives per label", " ".join(str(int(k)) for k in y.sum(0)))
    return ("targets (mean ± std)", f"{float(np.mean(y)):.4g} ± {float(np.std(y)):.4g}")
