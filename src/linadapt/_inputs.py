"""Network inputs: one tensor, or a batch of keyword inputs (the mapping a HuggingFace tokenizer returns).

A network that takes several inputs per example — ``model(input_ids=..., attention_mask=...)`` — is given
``X`` as a mapping {name: tensor} whose tensors share the leading example dimension. It is kept as a
:class:`KeywordInputs`, which slices like a tensor along that dimension (``X[sl]``, ``X[:2]``, ``X[index]``)
and reports the number of examples as ``X.shape[0]``, so the code that chunks, shards and gathers examples
treats both kinds alike; the network is called as ``model(**X.as_dict())``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from linadapt._validation import _check_not_sparse, as_input_tensor

__all__ = ["KeywordInputs", "as_inputs", "cat_examples", "input_tensors", "layout"]


class KeywordInputs:
    """A batch of n examples given as named tensors, each of shape (n, ...).

    Indexing with a name returns that tensor; any other index (a slice, an integer tensor, a list) selects
    examples in every tensor and returns a :class:`KeywordInputs`. ``shape`` is ``(n,)``: the example count
    (each tensor keeps its own trailing shape, see :attr:`example_shapes`). Construct it with
    :func:`as_inputs`, which checks the tensors; the constructor itself checks nothing (it also runs inside
    ``torch.func`` transforms, on one example at a time).
    """

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, torch.Tensor]) -> None:
        self._data = dict(data)

    @property
    def shape(self) -> torch.Size:
        """(n,): the number of examples, as the leading dimension of a tensor's shape."""
        first = next(iter(self._data.values()))
        return torch.Size(first.shape[:1])

    @property
    def example_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of one example in each tensor, by name."""
        return {k: tuple(v.shape[1:]) for k, v in self._data.items()}

    @property
    def device(self) -> torch.device:
        """The device of the tensors (that of the first)."""
        return next(iter(self._data.values())).device

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, str):
            return self._data[index]
        if isinstance(index, int):  # one example keeps its leading dimension, as a batch of one
            index = slice(index, index + 1 if index != -1 else None)
        return KeywordInputs({k: v[index] for k, v in self._data.items()})

    def keys(self) -> Any:
        """The input names, in the order given."""
        return self._data.keys()

    def items(self) -> Any:
        """(name, tensor) pairs."""
        return self._data.items()

    def values(self) -> Any:
        """The tensors."""
        return self._data.values()

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def as_dict(self) -> dict[str, torch.Tensor]:
        """The tensors as a plain dict, the keyword arguments of the network."""
        return dict(self._data)

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> KeywordInputs:
        """The tensors on ``device``; floating ones in ``dtype`` (integer ids and masks keep theirs)."""
        return KeywordInputs(
            {
                k: v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else None)
                for k, v in self._data.items()
            }
        )

    def detach(self) -> KeywordInputs:
        """The tensors detached from any graph."""
        return KeywordInputs({k: v.detach() for k, v in self._data.items()})

    def cpu(self) -> KeywordInputs:
        """The tensors on the CPU."""
        return self.to("cpu")

    def contiguous(self) -> KeywordInputs:
        """The tensors in contiguous memory."""
        return KeywordInputs({k: v.contiguous() for k, v in self._data.items()})

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}: {tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}" for k, v in self.items())
        return f"KeywordInputs({parts})"


def as_inputs(X: Any, name: str = "X") -> torch.Tensor | KeywordInputs:
    """Checked inputs: a tensor (see :func:`~linadapt._validation.as_input_tensor`), or for a mapping of
    tensors (or numpy arrays) a :class:`KeywordInputs`, every entry checked in the same way (NaN / inf only in
    floating entries; integer ids and masks are kept as they are) and all with the same number of examples.

    Raises:
        ValueError: an empty mapping, a name that is not a string, a value that is not a tensor or array, an
            entry that fails the tensor checks, or entries with different numbers of examples (named, with
            their sizes).
    """
    if isinstance(X, KeywordInputs):
        X = X.as_dict()
    _check_not_sparse(X, name)  # (a scipy dok matrix is a dict)
    if not isinstance(X, Mapping):
        return as_input_tensor(X, name)
    if len(X) == 0:
        raise ValueError(f"{name} is an empty mapping: give the network's keyword inputs, e.g. {{'input_ids': ...}}")
    data = {}
    for key, value in X.items():
        if not isinstance(key, str):
            raise ValueError(f"{name} has a key {key!r} of type {type(key).__name__}: keyword inputs need string names")
        if not isinstance(value, torch.Tensor | np.ndarray):
            raise ValueError(
                f"{name}[{key!r}] is a {type(value).__name__}, not a tensor: every keyword input must be a tensor "
                "(or numpy array) with one row per example (a tokenizer's return_tensors='pt' gives these)"
            )
        data[key] = as_input_tensor(value, f"{name}[{key!r}]")
    sizes = {k: int(v.shape[0]) for k, v in data.items()}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{k!r}: {n}" for k, n in sizes.items())
        raise ValueError(
            f"the keyword inputs of {name} disagree on the number of examples ({listed}): every tensor must have "
            "one row per example"
        )
    return KeywordInputs(data)


def input_tensors(X: Any) -> list[torch.Tensor]:
    """The tensors of inputs: [X] for a tensor, the values of a :class:`KeywordInputs`."""
    return list(X.values()) if isinstance(X, KeywordInputs) else [X]


def cat_examples(parts: list[Any]) -> Any:
    """Inputs joined along the example dimension: ``torch.cat`` of tensors, or key by key of
    :class:`KeywordInputs` with the same keys (a ValueError when the keys differ)."""
    if not any(isinstance(p, KeywordInputs) for p in parts):
        return torch.cat(parts)
    keys = [sorted(p.keys()) if isinstance(p, KeywordInputs) else None for p in parts]
    if any(k != keys[0] for k in keys):
        raise ValueError(f"cannot join keyword inputs with different keys: {keys}")
    return KeywordInputs({k: torch.cat([p[k] for p in parts]) for k in parts[0].keys()})


def layout(X: Any) -> str:
    """What examples look like, for messages and comparisons: a tensor's example shape and dtype, or those of each
    keyword input."""
    if isinstance(X, KeywordInputs):
        return ", ".join(f"{k}: {tuple(v.shape[1:])} {v.dtype}" for k, v in sorted(X.items()))
    return f"{tuple(X.shape[1:])} {X.dtype}"
