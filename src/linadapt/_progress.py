"""Progress bars for long loops over chunks (predictions over many test points).

``progress`` settings: ``True`` (always show a bar on stderr), ``False`` (never), ``"auto"`` (show it on an
interactive terminal when the loop has at least ``AUTO_MIN_STEPS`` chunks — a prediction that is split into
several chunks is one that takes a while). The bar is rich's; on a terminal it disappears when the loop ends,
elsewhere (``progress=True`` writing to a log) its final state is written once.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["AUTO_MIN_STEPS", "check_progress", "with_progress"]

AUTO_MIN_STEPS = 2
T = TypeVar("T")


def check_progress(value: object, name: str = "progress") -> bool | str:
    """``value`` if it is True, False or ``"auto"``; else a ValueError naming the setting."""
    if value is True or value is False or value == "auto":
        return value  # type: ignore[return-value]
    raise ValueError(f"{name} must be True, False or 'auto', got {value!r}")


def _shown(setting: bool | str, steps: int) -> bool:
    if setting == "auto":
        return steps >= AUTO_MIN_STEPS and sys.stderr.isatty()
    return bool(setting)


def with_progress(items: Iterable[T], steps: int, description: str, setting: bool | str = "auto") -> Iterator[T]:
    """Yield ``items`` (``steps`` of them expected), advancing a progress bar labelled ``description`` when
    ``setting`` asks for one (see the module docstring)."""
    if not _shown(check_progress(setting), steps):
        yield from items
        return
    from rich.console import Console
    from rich.errors import LiveError
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    console = Console(stderr=True)
    # on a terminal the bar disappears when done; elsewhere (a log file) its final state is written once
    bar = Progress(*columns, console=console, transient=console.is_terminal)
    try:
        bar.start()
    except LiveError:  # another live display (e.g. a CLI spinner) is active: no bar rather than an error
        yield from items
        return
    try:
        task = bar.add_task(description, total=steps)
        for item in items:
            yield item
            bar.advance(task)
    finally:
        bar.stop()
