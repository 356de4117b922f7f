"""Evaluation metrics shared by the estimators, the experiments and the reports (numpy in, float out)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "accuracy",
    "expected_calibration_error",
    "gaussian_nll",
    "multilabel_nll",
    "nll",
    "reliability_bins",
    "rmse",
    "subset_accuracy",
]

_EPS = 1e-12


def _proba_labels(proba: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    P = np.asarray(proba, dtype=np.float64)
    t = np.asarray(y).astype(np.int64).reshape(-1)
    if P.ndim != 2 or P.shape[0] != t.shape[0]:
        raise ValueError(f"proba must be (n, c) with n = {t.shape[0]} labels, got {P.shape}")
    if t.size and (t.min() < 0 or t.max() >= P.shape[1]):
        raise ValueError(f"labels must lie in [0, {P.shape[1]}) for {P.shape[1]} classes")
    return P, t


def accuracy(proba: Any, y: Any) -> float:
    """Fraction of examples whose most probable class is the label."""
    P, t = _proba_labels(proba, y)
    return float((P.argmax(axis=1) == t).mean())


def nll(proba: Any, y: Any) -> float:
    """Mean negative log probability of the true class, −(1/n) Σ log p_{yᵢ} (probabilities floored at 1e-12)."""
    P, t = _proba_labels(proba, y)
    return float(-np.log(np.clip(P[np.arange(t.size), t], _EPS, None)).mean())


def reliability_bins(proba: Any, y: Any, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Equal-width confidence bins on (0, 1]: per bin the count, mean confidence and accuracy of the top class."""
    P, t = _proba_labels(proba, y)
    conf = P.max(axis=1)
    correct = (P.argmax(axis=1) == t).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    safe = np.maximum(count, 1)
    return {
        "edges": edges,
        "count": count,
        "confidence": np.bincount(idx, weights=conf, minlength=n_bins) / safe,
        "accuracy": np.bincount(idx, weights=correct, minlength=n_bins) / safe,
    }


def expected_calibration_error(proba: Any, y: Any, n_bins: int = 15) -> float:
    """ECE = Σ_b (n_b / n) |acc_b − conf_b| over equal-width confidence bins of the top-class probability."""
    bins = reliability_bins(proba, y, n_bins)
    n = bins["count"].sum()
    return float((bins["count"] / n * np.abs(bins["accuracy"] - bins["confidence"])).sum())


def rmse(pred: Any, y: Any) -> float:
    """Root mean squared error over all entries."""
    a, b = np.asarray(pred, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"predictions {a.shape} and targets {b.shape} differ in shape")
    return float(np.sqrt(np.mean((a - b) ** 2)))


def gaussian_nll(mean: Any, std: Any, y: Any) -> float:
    """Mean negative log density of y under N(mean, std²), per entry."""
    m, s, t = (np.asarray(v, dtype=np.float64) for v in (mean, std, y))
    if not (m.shape == s.shape == t.shape):
        raise ValueError(f"mean {m.shape}, std {s.shape} and targets {t.shape} must have one shape")
    var = np.maximum(s, 1e-300) ** 2
    return float(np.mean(0.5 * np.log(2 * math.pi * var) + 0.5 * (t - m) ** 2 / var))


def _multilabel(proba: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    P, Y = np.asarray(proba, dtype=np.float64), np.asarray(y)
    if P.ndim != 2 or Y.shape != P.shape:
        raise ValueError(f"proba (n, c) and the 0/1 targets must have one shape, got {P.shape} and {Y.shape}")
    if Y.size and not np.isin(Y, (0, 1)).all():
        raise ValueError(f"multilabel targets must be 0 or 1, got {', '.join(str(v) for v in np.unique(Y)[:5])}")
    return P, Y.astype(np.float64)


def subset_accuracy(proba: Any, y: Any) -> float:
    """Multilabel: the fraction of examples whose every outcome is predicted right (P(y_k = 1) > ½ ⇔ y_k = 1);
    proba and y are (n, c), y 0/1."""
    P, Y = _multilabel(proba, y)
    return float(((P > 0.5) == (Y == 1)).all(axis=1).mean())


def multilabel_nll(proba: Any, y: Any) -> float:
    """Multilabel: the mean over examples of the summed Bernoulli negative log-likelihoods of the c outcomes,
    −(1/n) Σᵢ Σ_k [y_ik log p_ik + (1 − y_ik) log(1 − p_ik)] (probabilities floored at 1e-12)."""
    P, Y = _multilabel(proba, y)
    logp, log1mp = np.log(np.clip(P, _EPS, None)), np.log(np.clip(1 - P, _EPS, None))
    return float(-(Y * logp + (1 - Y) * log1mp).sum(axis=1).mean())
