"""The memory budget: how many bytes linadapt's own arrays may take at once, and how to read it.

Everything that grows with weights × examples (kernel matrices, Jacobian chunks, per-layer factors, the held
training Jacobian, test-point cross kernels, dense solver matrices) is sized against one number,
``memory_budget``. Paths whose arrays would pass it chunk, or take a matrix-free route; where no route fits,
they raise a ``MemoryBudgetError`` naming the size they need and the option to change.

The default, :func:`default_memory_budget`, is the smaller of 2 GiB and a quarter of the memory available
when it is first asked for (``MemAvailable`` of ``/proc/meminfo``; 2 GiB where that cannot be read). The
process holds more than the budget: the network, the data, torch's workspace, and temporaries of about a
quarter of the budget.
"""

from __future__ import annotations

import functools
import re

__all__ = ["MemoryBudgetError", "default_memory_budget", "format_bytes", "peak_rss", "resolve_memory_budget"]

GiB = 2**30
DEFAULT_CAP = 2 * GiB
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20}
_UNITS.update({"g": GiB, "gb": 10**9, "gib": GiB, "t": 2**40, "tb": 10**12, "tib": 2**40})


class MemoryBudgetError(MemoryError, ValueError):
    """A computation that cannot be done within ``memory_budget`` by any route (subclasses MemoryError and
    ValueError, so either catches it)."""


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (``MemAvailable``), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@functools.lru_cache(maxsize=1)
def default_memory_budget() -> int:
    """min(2 GiB, ¼ of the available memory), read once per process (2 GiB where it cannot be read)."""
    available = available_memory()
    if available is None:
        return DEFAULT_CAP
    return max(64 * 2**20, min(DEFAULT_CAP, available // 4))


def resolve_memory_budget(value: int | float | str | None) -> int:
    """Bytes from ``memory_budget``: None or ``"auto"`` → :func:`default_memory_budget`; a positive number of
    bytes; or a string with a unit, e.g. ``"512MiB"``, ``"1.5GB"``, ``"4G"`` (K/M/G/T are powers of 1024).

    Raises:
        ValueError: not positive, not finite, or an unreadable string.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return default_memory_budget()
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
        if m is None or m.group(2).lower() not in _UNITS:
            raise ValueError(f"memory_budget must be bytes or a size such as '512MiB' or '2GiB', got {value!r}")
        number = float(m.group(1)) * _UNITS[m.group(2).lower()]
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"memory_budget must be bytes or a size such as '2GiB', got {value!r}")
    else:
        number = float(value)
    if not number > 0 or number == float("inf"):
        raise ValueError(f"memory_budget must be a positive, finite number of bytes, got {value!r}")
    return int(number)


def format_bytes(n: float) -> str:
    """``n`` bytes in GiB or MiB, for messages."""
    return f"{n / GiB:,.2f} GiB" if n >= GiB / 4 else f"{n / 2**20:,.1f} MiB"


def peak_rss() -> int | None:
    """The process's peak resident memory so far in bytes (``VmHWM``), or None where it cannot be read."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
