"""The factors of J(X) one chunk of examples contributes, per layer, and how chunks are joined."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from linadapt.jacobian.structured import costs


@dataclass
class Layer:
    """A supported module and which of its parameters are selected: ``params`` maps the parameter's name in the
    module (``"weight"``, ``"in_proj_weight"``, ``"out_proj.bias"``, ...) to its name in the Linearization, for
    the selected ones only."""

    name: str
    module: nn.Module
    params: dict[str, str]

    @property
    def weight(self) -> str | None:
        """The selected ``weight``'s name in the Linearization, or None."""
        return self.params.get("weight")

    @property
    def bias(self) -> str | None:
        """The selected ``bias``'s name in the Linearization, or None."""
        return self.params.get("bias")


@dataclass
class Features:
    """What one chunk of examples contributes to kernel blocks, per layer."""

    b: int
    # structured Linear layers: (input (b, d_in) or None when the weight is not selected, output gradients
    # (c, b, d_out), whether the bias is selected)
    outer: list[tuple[torch.Tensor | None, torch.Tensor, bool]] = field(default_factory=list)
    # materialised per-example, per-output gradients of some layers' parameters, (b, c, q)
    dense: list[torch.Tensor] = field(default_factory=list)
    # layers with few positions (position-Gram form): (patches (b, P, k), output gradients (c, b, P, d_out),
    # whether the bias is selected)
    spatial: list[tuple[torch.Tensor, torch.Tensor, bool]] = field(default_factory=list)
    # the parameters behind each entry: (weight name or None, bias name or None) per outer entry; the
    # names in column order per dense entry (each parameter's columns are its flattened entries)
    outer_names: list[tuple[str | None, str | None]] = field(default_factory=list)
    dense_names: list[list[str]] = field(default_factory=list)
    spatial_names: list[tuple[str, str | None]] = field(default_factory=list)
    # convolutions kept for products by convolution (only with ``products``): (layer input (b, C_in, H, W),
    # channels-last; output gradients (c, b, C_out·H'·W'); the layer's geometry)
    conv: list[tuple[torch.Tensor, torch.Tensor, ConvGeometry]] = field(default_factory=list)
    # per conv entry: (weight name, bias name or None, whether the materialised form is wanted too: cheaper
    # for many vectors)
    conv_names: list[tuple[str, str | None, bool]] = field(default_factory=list)
    # convolutions held for kernels as their input and output gradients, smaller than their materialised
    # per-example gradients (few positions, many weights) and expanded to those when a block is formed (see
    # :func:`raw_slabs`): (layer input (b, C_in, H, W), output gradients (c, b, d_out, P), geometry, whether
    # the bias is selected); the names per entry as for ``spatial``
    raw: list[tuple[torch.Tensor, torch.Tensor, ConvGeometry, bool]] = field(default_factory=list)
    raw_names: list[tuple[str, str | None]] = field(default_factory=list)
    # embeddings (rows of a table picked by integer ids): (the ids (b, P), int64, −1 at positions whose row gets
    # no gradient; output gradients (c, b, P, d), zero at those positions); the table's name per entry
    index: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    index_names: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ConvGeometry:
    """A 2-d convolution's shape (a Conv1d as a 2-d one of height 1): weight (d_out, C_in, *kernel), output
    map ``out_hw``; and the per-example sizes the product cost model needs."""

    d_out: int
    c_in: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    out_hw: tuple[int, int]
    c: int  # network outputs
    stored: int  # output-gradient entries kept per example (d_out·P, times c unless rank one over the outputs)
    input_entries: int  # entries of the layer input per example

    @property
    def positions(self) -> int:
        """P, the output positions."""
        return self.out_hw[0] * self.out_hw[1]

    @property
    def k_in(self) -> int:
        """Inputs per patch, C_in·kh·kw."""
        return self.c_in * self.kernel[0] * self.kernel[1]

    def conv_cost(self, k: int) -> float:
        """:func:`costs.conv_cost` of this layer for k vectors."""
        return costs.conv_cost(k, self.positions * self.k_in * self.d_out, self.stored, self.input_entries)

    def dense_cost(self, k: int) -> float:
        """:func:`costs.dense_cost` of this layer's materialised gradients, c · d_out · (k_in + 1) per example."""
        return costs.dense_cost(k, self.c * self.d_out * (self.k_in + 1))


def only_output(f: Features, a: int) -> Features:
    """The features of output a alone (the kernel of J_a)."""
    return Features(
        f.b,
        [(A, G[a : a + 1], bias) for A, G, bias in f.outer],
        [D[:, a : a + 1] for D in f.dense],
        [(A, G[a : a + 1], bias) for A, G, bias in f.spatial],
        f.outer_names,
        f.dense_names,
        f.spatial_names,
        raw=[(A, G[a : a + 1], geo, bias) for A, G, geo, bias in f.raw],
        raw_names=f.raw_names,
        index=[(ids, G[a : a + 1]) for ids, G in f.index],
        index_names=f.index_names,
    )


def promoted(f: Features, dtype: torch.dtype) -> Features:
    """The same factors in ``dtype`` (``f`` itself when they already are), except the convolutions held as input
    and output gradients (``raw``): they stay in their dtype, are expanded in it (as materialised layers are
    formed from factors in the stored dtype) and the expanded gradients are promoted (:func:`assembly.block`);
    integer ids are kept as they are."""
    if all(t.dtype == dtype for t in _tensors(f, raw=False) if t.is_floating_point()):
        return f

    def to(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(dtype)

    return Features(
        f.b,
        outer=[(to(A), to(G), bias) for A, G, bias in f.outer],
        dense=[to(D) for D in f.dense],
        spatial=[(to(A), to(G), bias) for A, G, bias in f.spatial],
        outer_names=f.outer_names,
        dense_names=f.dense_names,
        spatial_names=f.spatial_names,
        conv=[(to(A), to(G), geo) for A, G, geo in f.conv],
        conv_names=f.conv_names,
        raw=list(f.raw),
        raw_names=f.raw_names,
        index=[(ids, to(G)) for ids, G in f.index],
        index_names=f.index_names,
    )


def raw_slabs(A: torch.Tensor, G: torch.Tensor, geo: ConvGeometry, bias: bool, step: int) -> Iterator[torch.Tensor]:
    """A convolution's per-example gradients from its input A (b, C_in, H, W) and output gradients G (c, b, d_out,
    P), a slab of columns at a time: (b, c, s·k_in) for each ``step`` output channels s (Σ_p G[a, i, o, p] ·
    patches[i, k, p]), then (b, c, d_out) for the bias (Σ_p G) if selected; in the factors' dtype. The slabs of
    two chunks with the same ``step`` are the same columns, so a kernel block is the sum of their Grams and the
    gradients of all columns are never held at once."""
    patches = torch.nn.functional.unfold(A, geo.kernel, dilation=geo.dilation, padding=geo.padding, stride=geo.stride)
    c, b = G.shape[:2]
    for o in range(0, G.shape[2], step):
        yield torch.einsum("cbop,bkp->bcok", G[:, :, o : o + step], patches).reshape(b, c, -1)
    if bias:
        yield G.sum(-1).permute(1, 0, 2)


def join(parts: Iterable[Features], n: int) -> Features:
    """The factors of consecutive chunks (n examples in all) as one, concatenated along the examples: each
    chunk is copied into tensors allocated for all n examples as it comes, so the peak memory is the joined
    factors plus one chunk's (a concatenation at the end would hold every chunk twice)."""
    joined, start = None, 0
    for f in parts:
        if joined is None:
            if f.b == n:
                return f
            joined = Features(
                n,
                outer=[(allocate(A, 0, n), allocate(G, 1, n), bias) for A, G, bias in f.outer],
                dense=[allocate(D, 0, n) for D in f.dense],
                spatial=[(allocate(A, 0, n), allocate(G, 1, n), bias) for A, G, bias in f.spatial],
                outer_names=f.outer_names,
                dense_names=f.dense_names,
                spatial_names=f.spatial_names,
                conv=[(allocate(A, 0, n), allocate(G, 1, n), geo) for A, G, geo in f.conv],
                conv_names=f.conv_names,
                raw=[(allocate(A, 0, n), allocate(G, 1, n), geo, bias) for A, G, geo, bias in f.raw],
                raw_names=f.raw_names,
                index=[(allocate(ids, 0, n), allocate(G, 1, n)) for ids, G in f.index],
                index_names=f.index_names,
            )
        pairs = [(t, jt, 0) for t, jt in zip(f.dense, joined.dense)]
        for mine, theirs in ((f.outer, joined.outer), (f.spatial, joined.spatial), (f.conv, joined.conv)):
            for (A, G, _), (jA, jG, _) in zip(mine, theirs):
                pairs += [(A, jA, 0), (G, jG, 1)]
        for (A, G, *_), (jA, jG, *_) in zip(f.raw + f.index, joined.raw + joined.index):
            pairs += [(A, jA, 0), (G, jG, 1)]
        for t, jt, dim in pairs:
            if t is not None:
                jt.narrow(dim, start, t.shape[dim]).copy_(t)
        start += f.b
        del f, pairs  # this chunk's factors are freed before the next one is computed
    assert joined is not None and start == n
    return joined


def allocate(t: torch.Tensor | None, dim: int, n: int) -> torch.Tensor | None:
    """An empty tensor like ``t`` (channels-last if ``t`` is) with n entries along ``dim``."""
    if t is None:
        return None
    shape = list(t.shape)
    shape[dim] = n
    last = t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    layout = torch.channels_last if last else torch.contiguous_format
    return torch.empty(shape, dtype=t.dtype, device=t.device, memory_format=layout)


class RuleError(RuntimeError):
    """Layer rules that do not apply to how the model uses the layers; args[0]: the module names, args[1] (when
    given): why."""

    def __str__(self) -> str:
        names = ", ".join(self.args[0])
        return f"layer rules do not apply to {names}" + (f": {self.args[1]}" if len(self.args) > 1 else "")


def _tensors(f: Features, raw: bool = True) -> list[torch.Tensor]:
    tensors = [t for A, G, _ in f.outer for t in (A, G) if t is not None] + list(f.dense)
    tensors += [t for A, G, _ in f.spatial for t in (A, G)]
    tensors += [t for A, G, _ in f.conv for t in (A, G)]
    if raw:
        tensors += [t for A, G, *_ in f.raw for t in (A, G)]
    tensors += [t for ids, G in f.index for t in (ids, G)]
    return tensors


def feature_bytes(f: Features) -> int:
    """Bytes held by the factors of one chunk."""
    return sum(t.numel() * t.element_size() for t in _tensors(f))
