"""What the command modules of :mod:`linadapt.app.cli` share: the error console, the error exit, the
``--trust-pickle`` help and the loading of an adapted model with its source network."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from linadapt.estimators.persistence import load, read_header
from linadapt.io.models import load_model

__all__ = ["TRUST_HELP", "console", "fail", "load_adapted"]

console = Console(stderr=True)

TRUST_HELP = (
    "Allow full unpickling of model/weights files. A pickle can run arbitrary code when loaded: use only for "
    "files you made or fully trust. Without it, weights are read as safetensors or with weights_only=True."
)


def fail(message: str) -> None:
    """Print ``message`` as an error and exit with status 2. The message is text, not markup (a hint like
    `torch.cat([a, b], 1)` must survive), and is not wrapped mid-word at the console width."""
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code=2)


def load_adapted(adapted: str, model: str | None, weights: str | None, trust_pickle: bool) -> tuple[Any, dict]:
    """The estimator of a ``.linadapt`` file written by ``linadapt adapt`` with its source network (the one it
    records, or ``model`` / ``weights``), and what the file records of the command (model, weights, target,
    classes)."""
    header = read_header(adapted)
    try:
        recorded = json.loads(header["model"].get("reference") or "{}")
    except json.JSONDecodeError:
        recorded = {}  # saved from Python with a free-text reference
    if not isinstance(recorded, dict):
        recorded = {}
    if not (model or recorded.get("model")):
        raise ValueError(
            f"{adapted} does not record its source model (saved from Python?): pass --model (and --weights)"
        )
    net = load_model(model or recorded["model"], weights or recorded.get("weights"), trust_pickle)
    return load(adapted, net), recorded
