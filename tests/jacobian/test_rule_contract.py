"""The contract every registered layer rule keeps: it is exercised by the model zoo, its kernel equals the
plain-autograd one there, and it declines a subclass whose ``forward`` it cannot see.

A new rule (one file in ``linadapt/jacobian/structured/rules/`` and its import line) must add a zoo model in
``test_structured.py`` that uses its module type, or this test fails.
"""

from __future__ import annotations

import pytest
import torch
from models import reference_jacobian
from test_structured import ZOO
from torch import nn

from linadapt.jacobian.linearization import Linearization
from linadapt.jacobian.structured.registry import RULES, rule_for

ARGS = {
    nn.Linear: (3, 2),
    nn.Conv1d: (2, 2, 3),
    nn.Conv2d: (2, 2, 3),
    nn.BatchNorm1d: (3,),
    nn.BatchNorm2d: (3,),
    nn.LayerNorm: (3,),
    nn.GroupNorm: (1, 3),
    nn.Embedding: (5, 3),
    nn.MultiheadAttention: (4, 2),
}  # a small instance of each rule's type


def _handled(name: str) -> set[type]:
    """The module types whose rule the structured engine used on zoo model ``name``."""
    model, X = ZOO[name]
    lin = Linearization(model)
    engine = lin.structured(lin.prepare_inputs(X))
    return set() if engine is None else {type(layer.module) for layer in engine.layers}


@pytest.mark.parametrize("module_type", sorted(RULES, key=lambda t: t.__name__), ids=lambda t: t.__name__)
def test_every_rule_is_exercised_by_the_zoo_and_matches_autograd(module_type: type) -> None:
    users = [name for name in sorted(ZOO) if any(issubclass(t, module_type) for t in _handled(name))]
    assert users, f"no zoo model exercises the rule for {module_type.__name__}"
    for name in users:
        model, X = ZOO[name]
        lin = Linearization(model)
        J = reference_jacobian(model, X, lin.param_names).flatten(0, 1)
        K = J @ J.T
        assert float((lin.ntk(X) - K).abs().max()) <= 1e-12 * float(K.abs().max())


@pytest.mark.parametrize("module_type", sorted(RULES, key=lambda t: t.__name__), ids=lambda t: t.__name__)
def test_a_rule_declines_a_subclass_with_its_own_forward(module_type: type) -> None:
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # something the layer's input alone does not show
        return module_type.forward(self, x) * 2.0

    custom = type(f"Custom{module_type.__name__}", (module_type,), {"forward": forward})
    assert module_type in ARGS, f"give {module_type.__name__}'s constructor arguments in ARGS"
    args = ARGS[module_type]
    assert rule_for(module_type(*args)) is not None
    assert rule_for(custom(*args)) is None
