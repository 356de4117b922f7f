"""Data parallelism over ``torch.distributed``: each process (rank) holds a shard of the training data.

The training data of a fit are the rows of the Jacobian J (N × p, N = n·c), split by example across the
ranks of a process group that the user (or ``torchrun``) initialised. Every product the solvers need is
built from the local shard plus one collective:

* Jᵀ u = Σ_r J_rᵀ u_r — a local vjp and one all-reduce of a p-vector (per right-hand side);
* J v — a local jvp on the shard; its n_r·c outputs are placed at the shard's rows of an N-vector that is
  all-reduced, so every rank holds the whole vector (N floats);
* K v = J (Jᵀ v) — both of the above: p + N floats per right-hand side, never O(N·p).

Output-space vectors (N) and parameter-space vectors (p) are therefore *replicated*: every rank holds the
same values, and the solvers (CG, Lanczos, Newton, the hyperparameter searches) run unchanged and
identically on every rank — only their products communicate. The dense paths gather what they must: the
inputs (for the dense kernel K, computed on each rank) or the rows of J (for the dense parameter-space
matrices), both only chosen when those fit in memory.

Failure on one rank (bad shard, wrong shapes, NaN) is agreed on before any product: :func:`agree` makes
every rank raise :class:`DistributedError` naming the rank and its message, instead of leaving the others
blocked in a collective.

Shutting down: :func:`shutdown` (a barrier, then ``destroy_process_group``). A distributed fit first makes
sure that ``destroy_process_group`` really frees the process group — see :func:`release_captured_group`.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import FunctionType
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from linadapt._inputs import KeywordInputs

__all__ = [
    "CommStats",
    "DistributedError",
    "Sharding",
    "agree",
    "release_captured_group",
    "require_process_group",
    "shutdown",
]

T = TypeVar("T")


class DistributedError(RuntimeError):
    """A distributed fit failed on at least one rank; raised on every rank with the failing ranks' messages."""


def require_process_group() -> None:
    """Raise a clear error unless ``torch.distributed`` is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "distributed=True needs an initialised torch.distributed process group: launch with torchrun (or "
            "another launcher) and call torch.distributed.init_process_group('gloo' or 'nccl') before fit"
        )
    release_captured_group()


def release_captured_group() -> int:
    """Drop the references to the live default process group that torch's own modules took at import.

    ``torch.distributed.nn.functional`` declares ``group=group.WORLD`` as a default argument of ten
    functions; imported *after* ``init_process_group`` those defaults hold the default process group
    itself. torch.func imports it on first use (a vjp enters ``torch._dynamo.compiled_autograd``, whose
    import chain reaches that module), i.e. during the first fit. ``destroy_process_group`` cannot drop
    those references, so the gloo backend — its worker threads, TCP pairs and store — stayed alive until
    interpreter teardown, where freeing it raced the peers' exit (an occasional abort at exit,
    "terminate called without an active exception"). This imports that chain now and puts back the
    defaults ``None`` (the default group, looked up at call time) that an import before
    ``init_process_group`` would have given. Returns how many defaults were replaced.
    """
    import torch._dynamo.compiled_autograd  # noqa: F401  (what torch.func imports on its first vjp)

    module = sys.modules.get("torch.distributed.nn.functional")
    world = dist.GroupMember.WORLD
    if module is None or world is None:
        return 0
    replaced = 0
    for fn in vars(module).values():
        if isinstance(fn, FunctionType) and fn.__defaults__ and any(d is world for d in fn.__defaults__):
            fn.__defaults__ = tuple(None if d is world else d for d in fn.__defaults__)
            replaced += 1
    return replaced


def shutdown() -> None:
    """End a distributed run: a barrier (no rank leaves while another is still in a collective), then
    ``torch.distributed.destroy_process_group()``. Every rank calls it, once, after its last collective."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    release_captured_group()
    dist.barrier()
    dist.destroy_process_group()


def agree(fn: Callable[[], T], what: str) -> T:
    """Run ``fn`` on every rank; if it raised on any rank, raise :class:`DistributedError` on all of them.

    One all-gather of a short message per call (every rank must call ``agree`` at the same point).
    """
    result: Any = None
    error: str | None = None
    try:
        result = fn()
    except Exception as exc:  # reported to every rank below
        error = f"{type(exc).__name__}: {exc}"
        original = exc
    messages: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, error)
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        detail = "; ".join(f"rank {r}: {m}" for r, m in failed)
        err = DistributedError(f"{what} failed on {len(failed)} of {len(messages)} ranks — {detail}")
        if error is not None:
            raise err from original
        raise err
    return result


@dataclass
class CommStats:
    """What the collectives of one fit moved: calls and float64 elements all-reduced (per rank)."""

    all_reduce_calls: int = 0
    all_reduce_elements: int = 0

    @property
    def all_reduce_bytes(self) -> int:
        """Bytes all-reduced so far (float64 elements × 8)."""
        return 8 * self.all_reduce_elements

    def reset(self) -> None:
        """Start counting again from zero."""
        self.all_reduce_calls = self.all_reduce_elements = 0


class Sharding:
    """Where this rank's examples sit among all ranks' examples.

    A fit's shards are contiguous blocks in rank order. An ``update`` appends every rank's new examples after all
    the old ones (again in rank order, :meth:`extended`), so a rank's examples then sit in several *segments* of
    the global order: its old block, then its block of the new examples. Locally they are stored in the same
    order (old rows, then new rows).

    Args:
        n_local: the number of examples on this rank (may differ between ranks; may be 0 on none of them).
        group: the process group (default: the world).

    Attributes: rank, world, counts (examples per rank, all segments), offsets (where each rank's first block
    starts), n (all examples), segments (this rank's (global start, count) pairs, in local order), stats (a
    :class:`CommStats`).
    """

    def __init__(self, n_local: int, group: Any = None) -> None:
        require_process_group()
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        counts = [None] * self.world
        dist.all_gather_object(counts, int(n_local), group=group)
        self.counts = [int(c) for c in counts]  # type: ignore[arg-type]
        self.offsets = [sum(self.counts[:r]) for r in range(self.world)]
        self.n = sum(self.counts)
        self.segments = [(self.offsets[self.rank], self.counts[self.rank])]
        self.stats = CommStats()

    def __repr__(self) -> str:
        return f"Sharding(rank {self.rank} of {self.world}, examples per rank {self.counts})"

    def extended(self, n_new_local: int) -> tuple[Sharding, Sharding]:
        """The sharding after every rank appends ``n_new_local`` examples (a collective: every rank calls it),
        and the sharding of the new examples alone. The new examples follow all the old ones in the global order,
        in rank order; each rank stores its new rows after its old ones."""
        new = Sharding(n_new_local, self.group)
        out = copy.copy(self)
        out.counts = [a + b for a, b in zip(self.counts, new.counts)]
        out.n = self.n + new.n
        out.segments = [*self.segments, (self.n + new.offsets[self.rank], new.counts[self.rank])]
        out.stats = self.stats
        return out, new

    def local_segments(self) -> list[tuple[int, int, int]]:
        """(local start, global start, count) of each of this rank's segments."""
        out, start = [], 0
        for first, count in self.segments:
            out.append((start, first, count))
            start += count
        return out

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Σ over ranks of ``t`` (a new tensor; every rank gets the same values)."""
        out = t.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        self.stats.all_reduce_calls += 1
        self.stats.all_reduce_elements += out.numel()
        return out

    def gather(self, local: Any, dim: int = 0) -> Any:
        """The rows of all ranks in global order along ``dim``: ``local`` has this rank's count there (keyword
        inputs: each of their tensors, along dimension 0).

        Implemented as an all-reduce of a zero tensor holding this rank's rows at their offset (exact: the
        other ranks add zeros), which handles uneven shard sizes without padding.
        """
        if isinstance(local, KeywordInputs):
            return KeywordInputs({k: self.gather(v, dim) for k, v in local.items()})
        if local.dtype == torch.bool:  # (summed as bytes: not every backend reduces booleans)
            return self.gather(local.to(torch.uint8), dim).bool()
        if local.shape[dim] != self.counts[self.rank]:
            raise ValueError(f"expected {self.counts[self.rank]} rows along dim {dim}, got {local.shape[dim]}")
        shape = list(local.shape)
        shape[dim] = self.n
        full = torch.zeros(shape, dtype=local.dtype, device=local.device)
        for start, first, count in self.local_segments():
            full.narrow(dim, first, count).copy_(local.narrow(dim, start, count))
        return self.all_reduce(full)

    def scatter_view(self, full: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """This rank's rows of a replicated tensor along ``dim`` (a view when they form one segment)."""
        parts = [full.narrow(dim, first, count) for first, count in self.segments]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def shard_signature(X: Any, y: torch.Tensor) -> tuple:
    """What must agree between ranks' shards: trailing input shape and dtype (of each keyword input, by name),
    trailing target shape and dtype."""
    if isinstance(X, KeywordInputs):
        inputs: Any = {k: tuple(v.shape[1:]) for k, v in X.items()}
        dtypes = str({k: str(v.dtype) for k, v in X.items()})
    else:
        inputs, dtypes = tuple(X.shape[1:]), str(X.dtype)
    return (inputs, dtypes, tuple(y.shape[1:]), str(y.dtype))


def make_sharding(n_local: int, signature: tuple, group: Any = None) -> Sharding:
    """A :class:`Sharding` after checking (on every rank) that all shards have the same ``signature``."""
    sigs: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(sigs, signature, group=group)
    if any(s != sigs[0] for s in sigs):
        detail = "; ".join(f"rank {r}: inputs {s[0]} {s[1]}, targets {s[2]} {s[3]}" for r, s in enumerate(sigs))
        raise DistributedError(f"the ranks' data shards do not match in shape or dtype — {detail}")
    return Sharding(n_local, group)


def prepare_fit(local: Callable[[], T], distributed: bool, what: str) -> T:
    """Run the local input checks of a fit; with ``distributed``, agree on failure across ranks."""
    if not distributed:
        return local()
    require_process_group()
    return agree(local, what)


def check_shard_size(n_local: int) -> None:
    """Every rank must hold at least one example."""
    if n_local < 1:
        raise ValueError("this rank's data shard is empty: with distributed=True every rank needs at least one example")
