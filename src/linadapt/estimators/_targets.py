"""The classifier's likelihood choice (``likelihood="auto"``) and the encoding of its targets for that likelihood.

* categorical: integer labels (n,) for a network with c ≥ 2 outputs (or c distinct labels of any kind);
* bernoulli: a network with one output ((n,) or (n, 1)) and labels 0/1, or two distinct labels;
* multilabel: a 0/1 target matrix (n, c), one binary outcome per output.

``"auto"`` picks multilabel for a 2-D target with more than one column, else bernoulli for a one-output network,
else categorical. Targets outside the chosen likelihood's support are a ValueError naming the values.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from linadapt._validation import check_choice, encode_labels
from linadapt.likelihoods import LIKELIHOODS, Likelihood
from linadapt.likelihoods.multilabel import check_binary_targets

__all__ = ["CLASSIFIER_LIKELIHOODS", "CLASSIFIER_LINKS", "choose_likelihood", "encode_targets"]

CLASSIFIER_LIKELIHOODS = tuple(sorted(name for name, cls in LIKELIHOODS.items() if cls.classification))
CLASSIFIER_LINKS = tuple(dict.fromkeys(link for name in CLASSIFIER_LIKELIHOODS for link in LIKELIHOODS[name].links))


def _shape(y: Any) -> tuple[int, ...]:
    if isinstance(y, (torch.Tensor, np.ndarray)):
        return tuple(y.shape)
    try:
        return np.asarray(y).shape  # array-likes through __array__ (not every one implements numpy's functions)
    except (TypeError, ValueError):  # ragged nested lists: let the encoding say what is wrong
        return ()


def choose_likelihood(spec: str, y: Any, c: int) -> Likelihood:
    """The likelihood named ``spec`` (one of :data:`CLASSIFIER_LIKELIHOODS`, or ``"auto"``: by the shape of the
    targets y and the number c of network outputs, see the module docstring), checked against c."""
    check_choice(spec, "likelihood", ("auto", *CLASSIFIER_LIKELIHOODS))
    if spec == "auto":
        shape = _shape(y)
        spec = "multilabel" if len(shape) == 2 and shape[1] > 1 else "bernoulli" if c == 1 else "categorical"
    lik = LIKELIHOODS[spec]()
    lik.check_outputs(c)
    return lik


def _binary_labels(y: Any, n: int, name: str, classes: np.ndarray | None) -> tuple[torch.Tensor, np.ndarray]:
    """Labels for the Bernoulli likelihood: 0/1, or two distinct values (sorted: the first is class 0)."""
    if classes is None and y is not None:
        arr = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
        arr = arr[:, 0] if arr.ndim == 2 and arr.shape[1] == 1 else arr
        finite = arr.dtype.kind not in "fc" or bool(np.isfinite(arr).all())
        if arr.ndim == 1 and arr.size and finite and arr.dtype.kind in "biufUS":
            distinct = np.unique(arr)
            zero_one = arr.dtype.kind in "biuf" and bool(np.isin(distinct, (0, 1)).all())
            if not zero_one and len(distinct) != 2:
                shown = ", ".join(str(v) for v in distinct[:5].tolist()) + (" …" if len(distinct) > 5 else "")
                raise ValueError(
                    f"{name} has {len(distinct)} distinct labels ({shown}): the bernoulli likelihood (a one-output "
                    "model) takes labels 0 and 1, or two distinct labels (mapped in sorted order to 0 and 1)"
                )
    return encode_labels(y, n, 2, name, classes)


def encode_targets(
    lik: Likelihood, y: Any, n: int, c: int, classes: np.ndarray | None = None, name: str = "y"
) -> tuple[torch.Tensor, np.ndarray]:
    """Targets y of n examples for ``lik`` on a network with c outputs: (labels, classes).

    categorical: output indices (n,) int64 and one label per output; bernoulli: 0/1 (n,) int64 and the two
    labels; multilabel: the 0/1 matrix (n, c) int64 and ``arange(c)``. With ``classes`` (after fit), labels are
    mapped to them.
    """
    if lik.multilabel:
        if y is None:
            raise ValueError(f"this estimator requires y to be passed, but the target {name} is None")
        Y = check_binary_targets(y.detach().cpu() if isinstance(y, torch.Tensor) else y, n, c, lik.name, name)
        return Y.to(torch.int64), np.arange(c)
    if lik.name == "bernoulli":
        return _binary_labels(y, n, name, classes)
    return encode_labels(y, n, c, name, classes)
