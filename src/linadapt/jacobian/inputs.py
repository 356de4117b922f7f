"""Calling the network on a batch of inputs and reading the outputs that are linearized.

Inputs are one tensor (``model(X)``) or a :class:`~linadapt._inputs.KeywordInputs` (``model(**X)``: a
tokenizer's ``input_ids``, ``attention_mask``, …). The network's return value becomes the (n, c) outputs f by
``output_fn`` when one is given (any differentiable function of the return value: ``lambda out:
out["logits"][:, 0]``, a pooled hidden state), else by :func:`default_output`: a tensor as it is, a mapping's
``"logits"`` entry, an object's ``.logits`` attribute (HuggingFace's ``ModelOutput``). ``output_fn`` runs inside
every forward pass that is differentiated — torch.func's products, the per-example Jacobians, the structured
engine's batched backward pass from the outputs to its layer hooks, the retained graphs — so all of them see
the same f.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.func import functional_call

from linadapt._inputs import KeywordInputs
from linadapt.jacobian._common import LinearizationError, eval_mode

if TYPE_CHECKING:
    from linadapt.jacobian.linearization import Linearization

__all__ = [
    "OutputFn",
    "as_batch_of_one",
    "as_float64",
    "default_output",
    "forward_outputs",
    "network_outputs",
    "vmappable",
]

OutputFn = Callable[[Any], torch.Tensor]


def default_output(out: Any) -> torch.Tensor:
    """The outputs to linearize from a network's return value when no ``output_fn`` is given: a tensor itself,
    a mapping's ``"logits"`` entry, or an object's ``.logits`` attribute; anything else is a
    :class:`~linadapt.jacobian._common.LinearizationError` asking for ``output_fn``."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    if not isinstance(out, Mapping) and isinstance(getattr(out, "logits", None), torch.Tensor):
        return out.logits
    if isinstance(out, Mapping):
        what = f"a {type(out).__name__} with keys {list(out.keys())} and no tensor 'logits'"
    elif isinstance(out, tuple | list):
        what = f"a {type(out).__name__} of {len(out)} items"
    else:
        what = f"a {type(out).__name__}"
    raise LinearizationError(
        f"the model returned {what}: without output_fn linadapt reads a tensor, a mapping's 'logits' entry or an "
        "object's .logits attribute. Pass output_fn= to map the model's return value to the (n, c) or (n,) outputs "
        "to linearize, e.g. output_fn=lambda out: out[0] or output_fn=lambda out: out['pooled']"
    )


def forward_outputs(model: nn.Module, x: Any) -> torch.Tensor:
    """The module's outputs at x as linadapt reads them (:func:`default_output`), called as ``model(x)`` or, for
    keyword inputs, ``model(**x)`` — with its own weights (the fine-tuning baselines, the command line's checks)."""
    return default_output(model(**x.as_dict()) if isinstance(x, KeywordInputs) else model(x))


def network_outputs(
    model: nn.Module, state: dict[str, torch.Tensor], x: Any, output_fn: OutputFn | None
) -> torch.Tensor:
    """f on a batch x (a tensor or keyword inputs) with the weights and buffers ``state``, as (b, c)."""
    if isinstance(x, KeywordInputs):
        out = functional_call(model, state, (), x.as_dict(), tie_weights=True, strict=False)
    else:
        out = functional_call(model, state, (x,), tie_weights=True, strict=False)
    b = x.shape[0]
    if output_fn is None:
        out = default_output(out)
    else:
        out = output_fn(out)
        if not isinstance(out, torch.Tensor):
            raise LinearizationError(
                f"output_fn must return a tensor of shape (n, c) or (n,), got {type(out).__name__}"
            )
    if out.dim() == 1:
        out = out.unsqueeze(-1)
    if out.dim() != 2 or out.shape[0] != b:
        via = " (returned by output_fn)" if output_fn is not None else ""
        raise LinearizationError(
            f"model output must have shape (n, c) or (n,) for n = {b} inputs, got {tuple(out.shape)}{via}"
        )
    return out


def vmappable(x: Any) -> Any:
    """Inputs in a form ``torch.func.vmap`` maps over example by example (a dict of tensors for keyword inputs)."""
    return x.as_dict() if isinstance(x, KeywordInputs) else x


def as_batch_of_one(x: Any) -> Any:
    """One example as vmap hands it over (a tensor, or a dict of tensors) made a batch of one again."""
    if isinstance(x, dict):
        return KeywordInputs({k: v.unsqueeze(0) for k, v in x.items()})
    return x.unsqueeze(0)


def as_float64(x: Any) -> Any:
    """Inputs with floating tensors in float64 (integer ids and masks kept)."""
    if isinstance(x, KeywordInputs):
        return x.to(dtype=torch.float64)
    return x.to(torch.float64) if x.is_floating_point() else x


def check_examples_independent(lin: Linearization, X: Any) -> None:
    """Refuse a network whose output for one example depends on the other examples of its batch (batch
    statistics, attention across the batch): the linearized model's kernel J(x) J(x')ᵀ is defined per
    example, and the batched products (jvp / vjp), the per-example Jacobians and f(X; θ̂) would each
    mean something else. Checked once, on the first (up to) four examples, in float64 (so the network's
    own rounding — float16, TF32 — is not mistaken for mixing): f of them as one batch against f of each
    alone, or, when the network refuses a single example, of each with one other example; a relative
    difference above 1e-9 is mixing. A forward that is not deterministic (two runs of the same batch
    differ) is refused as such; non-finite outputs are left to ``outputs`` to report."""
    lin._examples_checked = True
    xb = X[:4]
    k = xb.shape[0]
    state = {n: v.to(torch.float64) if v.is_floating_point() else v for n, v in {**lin.frozen, **lin.theta}.items()}

    def f(x: Any) -> torch.Tensor:
        return network_outputs(lin.model, state, as_float64(x), lin.output_fn)

    try:
        with torch.no_grad(), eval_mode(lin.model):
            together, again = f(xb), f(xb)
            try:
                alone = torch.cat([f(xb[i : i + 1]) for i in range(k)])
            except Exception:  # e.g. batch statistics that need two examples: compare within pairs
                if k < 3:
                    return
                alone = torch.cat([f(xb[[i, (i + 1) % k]])[:1] for i in range(k)])
    except Exception:  # the network fails on these inputs: its own error is reported where it is used
        return
    if not together.shape == alone.shape == again.shape:
        return
    if not bool(torch.isfinite(together).all() and torch.isfinite(alone).all()):
        return
    name = type(lin.model).__name__
    scale = max(float(together.abs().max()), 1e-300)
    if float((together - again).abs().max()) > 1e-9 * scale:
        raise LinearizationError(
            f"{name} is not deterministic in eval mode (two forward passes of the same "
            "inputs differ): the linearization needs f(x; θ̂) to be a function (is dropout forced on with "
            "F.dropout(..., training=True)?)"
        )
    err = float((together - alone).abs().max())
    if err > 1e-9 * scale:
        raise LinearizationError(
            f"{name} mixes the examples of a batch: its output for an example changes "
            f"with the other examples given with it (max difference {err:.3g} at output scale {scale:.3g}, "
            "in eval mode, float64). The linearization needs f(x) per example; compute batch statistics "
            "outside the model (or use BatchNorm with running statistics, which eval mode uses)."
        )
