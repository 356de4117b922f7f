"""The registry of layer rules: module type → the rule that forms that layer's factors of J(X).

A rule is an object with two methods:

* ``applies(module) -> bool``: whether the rule can see everything the module computes from its input and
  output (e.g. the stock ``forward``; no grouped convolution). A module it does not apply to falls back to the
  Jacobian contraction restricted to its parameters.
* ``features(engine, layer, A, G, feats, products)``: append the layer's factors, from its input A (b, ...)
  and output gradients G (c, b, *out_shape), to ``feats`` (a
  :class:`~linadapt.jacobian.structured.features.Features`) in one of its forms: ``outer`` (input ×
  output-gradient Grams, a layer applied once per example), ``spatial`` (patches and output gradients per
  position), ``conv`` (input and output gradients multiplied by convolution in products) or ``dense``
  (materialised per-example gradients — always possible).

Rules register with :func:`register` when their module is imported: :mod:`.rules` imports each rule module
(one line per rule), and the engine imports :mod:`.rules`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

__all__ = ["RULES", "LayerRule", "register", "rule_for"]


class LayerRule(Protocol):
    """What a layer rule provides (see the module docstring)."""

    def applies(self, module: nn.Module) -> bool:
        """Whether the rule sees everything ``module`` computes from its input."""
        ...

    def features(self, engine: Any, layer: Any, A: torch.Tensor, G: torch.Tensor, feats: Any, products: bool) -> None:
        """Append the layer's factors to ``feats``."""
        ...


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


def rule_for(module: nn.Module) -> LayerRule | None:
    """The rule registered for ``module``'s type (or a base type) that applies to it, else None."""
    for module_type, rule in RULES.items():
        if isinstance(module, module_type) and rule.applies(module):
            return rule
    return None
