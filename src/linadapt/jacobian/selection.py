"""Choosing which parameters of a network the linearization differentiates with respect to.

Restricting the parameters restricts the columns of the Jacobian J(x) = ∂f(x; θ)/∂θ: the kernel
J(x) J(x')ᵀ then only sums over the chosen parameters, and everything else is held at θ̂.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import nn

ParamSpec = str | Sequence[str]

__all__ = ["ParamSpec", "select_parameters"]


def _named_unique_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    # named_parameters() already drops a second name for the same tensor (shared weights).
    return list(model.named_parameters(remove_duplicate=True))


def _last_module_parameters(model: nn.Module) -> list[str]:
    """Names of the trainable parameters owned directly by the last module (in registration order) that has any."""
    owner_of: dict[int, str] = {}
    for name, p in _named_unique_parameters(model):
        owner_of[id(p)] = name
    last: list[str] = []
    for _, module in model.named_modules(remove_duplicate=True):
        own = [owner_of[id(p)] for p in module.parameters(recurse=False) if p.requires_grad and id(p) in owner_of]
        if own:
            last = own
    return last


def select_parameters(model: nn.Module, params: ParamSpec = "all") -> list[str]:
    """Resolve a parameter selection to an ordered list of parameter names.

    Args:
        model: the network.
        params: ``"all"`` — every parameter with ``requires_grad=True``; ``"last"`` — the trainable
            parameters owned by the last module (in registration order, ``model.modules()``) that owns any;
            ``"bias"`` — every trainable parameter whose name ends in ``bias``; or a list of parameter
            names / glob patterns (``fnmatch`` syntax, e.g. ``["head.*", "*.bias"]``), which may also
            pick parameters with ``requires_grad=False``.

    Returns:
        The selected names, in ``model.named_parameters()`` order. A parameter shared by several modules
        appears once, under its first name.

    Raises:
        ValueError: the model has no trainable parameters, a pattern matches nothing, or the selection is empty.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = _named_unique_parameters(model)
    if not named:
        raise ValueError(f"model {type(model).__name__} has no parameters: there is nothing to linearize")
    trainable = [n for n, p in named if p.requires_grad]
    if isinstance(params, str):
        if params == "all":
            chosen = trainable
            if not chosen:
                raise ValueError(
                    "model has no trainable parameters (every parameter has requires_grad=False); "
                    "name the parameters to linearize explicitly, e.g. params=['fc.*']"
                )
        elif params == "last":
            chosen = _last_module_parameters(model)
            if not chosen:
                raise ValueError("params='last': no module owns a trainable parameter")
        elif params == "bias":
            chosen = [n for n in trainable if n.split(".")[-1].endswith("bias")]
            if not chosen:
                raise ValueError("params='bias': the model has no trainable parameter whose name ends in 'bias'")
        else:
            # A single name or pattern.
            return select_parameters(model, [params])
        return chosen
    patterns = list(params)
    if not patterns:
        raise ValueError("params is an empty list: select at least one parameter name or pattern")
    names = [n for n, _ in named]
    chosen_set: set[str] = set()
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ValueError(f"params entries must be strings (names or glob patterns), got {pattern!r}")
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            preview = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ValueError(f"params pattern {pattern!r} matches no parameter; the model's parameters are: {preview}")
        chosen_set.update(hits)
    return [n for n in names if n in chosen_set]
