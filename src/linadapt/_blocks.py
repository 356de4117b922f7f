"""Splitting n items into consecutive blocks (examples, grid points, test points) to bound temporaries."""

from __future__ import annotations

__all__ = ["blocks", "budget_blocks"]


def blocks(n: int, size: int) -> list[slice]:
    """Consecutive slices of at most ``size`` of range(n)."""
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def budget_blocks(n: int, entries_per_item: int, budget: int) -> list[slice]:
    """Blocks of range(n) whose temporaries, ``entries_per_item`` entries per item, hold at most ``budget``
    entries (at least one item per block)."""
    return blocks(n, max(1, budget // max(1, entries_per_item)))
