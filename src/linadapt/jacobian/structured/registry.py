"""The registry of layer rules: module type → the rule that forms that layer's factors of J(X).

A rule is an object with two methods:

* ``applies(module) -> bool``: whether the rule can see everything the module computes from its input and
  output (e.g. the stock ``forward``; no grouped convolution). A module it does not apply to falls back to the
  Jacobian contraction restricted to its parameters.
* ``features(engine, layer, A, G, feats, products)``: append the layer's factors, from its input A (b, ...)
  and output gradients G (c, b, *out_shape), to ``feats`` (a
  :class:`~linadapt.jacobian.structured.features.Features`) in one of its forms: ``outer`` (input ×
  output-gradient Grams, a layer applied once per example), ``spatial`` (patches and output gradients per
  position), ``conv`` (input and output gradients multiplied by convolution in products), ``index`` (rows of a
  table picked by integer ids, with their output gradients: an embedding) or ``dense`` (materialised
  per-example gradients — always possible).

and two optional ones, for modules that are not "one input, one output, a ``weight`` and a ``bias``":

* ``parameters(module) -> tuple[str, ...]``: the names (in the module) of the parameters the rule covers
  (default ``("weight", "bias")``); a rule may cover its submodules' parameters (``"out_proj.weight"``), which
  then get no rule of their own;
* ``capture(module, args, kwargs, output, b, memo) -> Capture | None``: what the forward hook keeps for the rule
  (see :class:`Capture`; default :func:`default_capture`: the first positional argument and the output, both with
  the batch of b examples first; :func:`positionwise_capture` for layers applied per position, which also accept
  the batch in another leading dimension); None when the call is not one the rule can handle (the layer's
  parameters then fall back). ``memo``: a dict kept per layer across calls, for what the first call decides.

Rules register with :func:`register` when their module is imported: :mod:`.rules` imports each rule module
(one line per rule), and the engine imports :mod:`.rules`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

__all__ = [
    "RULES",
    "Capture",
    "LayerRule",
    "capture_for",
    "default_capture",
    "parameters_for",
    "positionwise_capture",
    "register",
    "rule_for",
]


class LayerRule(Protocol):
    """What a layer rule provides (see the module docstring)."""

    def applies(self, module: nn.Module) -> bool:
        """Whether the rule sees everything ``module`` computes from its input."""
        ...

    def features(self, engine: Any, layer: Any, A: torch.Tensor, G: torch.Tensor, feats: Any, products: bool) -> None:
        """Append the layer's factors to ``feats``."""
        ...


@dataclass
class Capture:
    """What a layer's forward hook keeps for its rule.

    Attributes:
        inputs: what the rule's ``features`` receives as A: a tensor, or a tuple / dict of tensors and other
            values (tensors are detached; floating ones take the dtype the factors are formed in).
        outputs: the tensors whose output gradients the rule needs, each with the batch of b examples first: the
            rule receives G (c, b, ...) for a single one, else a tuple of them in this order. A tensor the rest of
            the network does not use gets zero gradients.
        replacement: a module output with the same values to return from the hook in place of the module's (None:
            keep it), e.g. views that put the batch first, or a batch-of-one output expanded to b examples so that
            its output gradients are per example; the rest of the network then runs on it.
    """

    inputs: Any
    outputs: tuple[torch.Tensor, ...]
    replacement: Any = None


def default_capture(
    module: nn.Module, args: tuple, kwargs: dict, output: Any, b: int, memo: dict | None = None
) -> Capture | None:
    """The first positional argument and the output, when both are tensors with the batch of b examples first."""
    x = args[0] if args else None
    if not (isinstance(x, torch.Tensor) and isinstance(output, torch.Tensor)):
        return None
    if x.dim() == 0 or output.dim() == 0 or x.shape[0] != b or output.shape[0] != b:
        return None
    return Capture(x, (output,))


def positionwise_capture(
    module: nn.Module, args: tuple, kwargs: dict, output: Any, b: int, memo: dict | None = None
) -> Capture | None:
    """For a layer applied independently at every position of its leading dimensions (a Linear layer or a
    LayerNorm on (…, d) inputs): the batch may be any leading dimension, e.g. (T, b, d) in sequence-first
    transformers. The first call picks it — the first leading dimension of size b in both input and output — and
    ``memo`` keeps it for the later calls (whose sizes may be ambiguous, T = b); input and output are then moved
    batch first (the output replaced by a view of that)."""
    x = args[0] if args else None
    if not (isinstance(x, torch.Tensor) and isinstance(output, torch.Tensor)) or x.dim() < 3:
        return default_capture(module, args, kwargs, output, b)
    memo = {} if memo is None else memo
    if "batch_dim" not in memo:
        found = [d for d in range(x.dim() - 1) if x.shape[d] == b and output.dim() == x.dim() and output.shape[d] == b]
        if not found:
            return None
        memo["batch_dim"] = found[0]
    dim = memo["batch_dim"]
    if output.dim() != x.dim() or x.shape[dim] != b or output.shape[dim] != b:
        return None
    if dim == 0:
        return Capture(x, (output,))
    first = output.movedim(dim, 0)
    return Capture(x.movedim(dim, 0), (first,), replacement=first.movedim(0, dim))


RULES: dict[type[nn.Module], LayerRule] = {}


def register(*module_types: type[nn.Module]) -> Callable[[Any], Any]:
    """Class decorator: register an instance of the rule class for each of ``module_types`` (subclasses
    included, as far as the rule's ``applies`` accepts them)."""

    def add(rule_cls: Any) -> Any:
        rule = rule_cls()
        for module_type in module_types:
            RULES[module_type] = rule
        return rule_cls

    return add


def parameters_for(rule: Any, module: nn.Module) -> tuple[str, ...]:
    """The names (in ``module``) of the parameters ``rule`` covers."""
    names = getattr(rule, "parameters", None)
    return ("weight", "bias") if names is None else tuple(names(module))


def capture_for(rule: Any) -> Callable[..., Capture | None]:
    """The rule's ``capture`` method, or :func:`default_capture`."""
    return getattr(rule, "capture", default_capture)


def rule_for(module: nn.Module) -> LayerRule | None:
    """The rule registered for ``module``'s type (or a base type) that applies to it, else None."""
    for module_type, rule in RULES.items():
        if isinstance(module, module_type) and rule.applies(module):
            return rule
    return None
