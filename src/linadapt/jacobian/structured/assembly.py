"""Kernel assembly: dense NTK blocks between two chunks of examples from their per-layer factors."""

from __future__ import annotations

import itertools

import torch

from linadapt.jacobian._common import ALGEBRA_DTYPE
from linadapt.jacobian.structured.features import Features, raw_slabs


def block(f1: Features, f2: Features, trace: bool) -> torch.Tensor:
    """Kernel block between two chunks: (b1, c, b2, c), or (b1, b2) summed over outputs with ``trace``."""
    b1, b2 = f1.b, f2.b
    out = None
    for (A1, G1, bias), (A2, G2, _) in zip(f1.outer, f2.outer):
        # weight and bias share the output-gradient Gram: Θ = (g·g) ⊙ (a·a [+ 1 with the bias])
        if trace:  # Σ_a g_ia · g_ja: G as (b, c·d_out)
            term = G1.permute(1, 0, 2).reshape(b1, -1) @ G2.permute(1, 0, 2).reshape(b2, -1).T
            if A1 is not None:
                term.mul_(A1 @ A2.T + 1.0 if bias else A1 @ A2.T)
        else:  # rows (i, a): G as (b·c, d_out)
            term = G1.permute(1, 0, 2).reshape(b1 * G1.shape[0], -1)
            term = term @ G2.permute(1, 0, 2).reshape(b2 * G2.shape[0], -1).T
            term = term.view(b1, G1.shape[0], b2, G2.shape[0])
            if A1 is not None:
                term.mul_((A1 @ A2.T + 1.0 if bias else A1 @ A2.T)[:, None, :, None])
        out = term if out is None else out.add_(term)
    for (A1, G1, bias), (A2, G2, _) in zip(f1.spatial, f2.spatial):
        term = position_gram_block(A1, G1, A2, G2, bias, trace)
        out = term if out is None else out.add_(term)
    for (ids1, G1), (ids2, G2) in zip(f1.index, f2.index):
        term = index_gram_block(ids1, G1, ids2, G2, trace)
        out = term if out is None else out.add_(term)
    for D1, D2 in zip(f1.dense, f2.dense):
        out = _gram_add(out, D1, D2, trace)
    # convolutions held as input and output gradients: their gradients expanded a slab of output channels at a
    # time (never all of a layer's), in the factors' dtype as materialised layers are formed, each slab promoted
    # for its Gram; a chunk paired with itself is expanded once
    for r1, r2 in zip(f1.raw, f2.raw):
        step = _raw_step(max(b1, b2) * r1[1].shape[0] * r1[2].k_in)
        slabs2 = None if r2 is r1 else raw_slabs(*r2, step)
        for d1 in raw_slabs(*r1, step):
            d1 = d1.to(ALGEBRA_DTYPE)
            d2 = d1 if slabs2 is None else next(slabs2).to(ALGEBRA_DTYPE)
            out = _gram_add(out, d1, d2, trace)
    assert out is not None
    return out


_RAW_SLAB_ENTRIES = 2**20  # entries of one chunk's slab of expanded gradients (8 MiB in float64)


def _raw_step(per_channel: int) -> int:
    """Output channels per slab of a held convolution's expanded gradients, ``per_channel`` entries each (examples
    × outputs × inputs per patch)."""
    return max(1, _RAW_SLAB_ENTRIES // max(1, per_channel))


def _gram_add(out: torch.Tensor | None, D1: torch.Tensor, D2: torch.Tensor, trace: bool) -> torch.Tensor:
    """``out`` plus the block of materialised gradients D1 (b1, c, q), D2 (b2, c, q)."""
    b1, b2 = D1.shape[0], D2.shape[0]
    if trace:
        term = torch.einsum("iaq,jaq->ij", D1, D2)
    else:
        term = (D1.reshape(b1 * D1.shape[1], -1) @ D2.reshape(b2 * D2.shape[1], -1).T).view(
            b1, D1.shape[1], b2, D2.shape[1]
        )
    return term if out is None else out.add_(term)


def diagonal_blocks(f: Features) -> torch.Tensor:
    """Per-example c × c blocks J(x_i) J(x_i)ᵀ, (b, c, c), float64."""
    out = None
    for A, G, bias in f.outer:
        Gi = G.permute(1, 0, 2)  # (b, c, d_out)
        term = Gi @ Gi.transpose(1, 2)
        if A is not None:
            sq = (A * A).sum(1)
            term.mul_((sq + 1.0 if bias else sq)[:, None, None])
        out = term if out is None else out.add_(term)
    for A, G, bias in f.spatial:
        AA = A @ A.transpose(1, 2)  # (b, P, P)
        if bias:
            AA = AA + 1.0
        Gi = G.permute(1, 0, 2, 3)  # (b, c, P, d_out)
        term = torch.einsum("bst,bcso,bdto->bcd", AA, Gi, Gi)
        out = term if out is None else out.add_(term)
    for ids, G in f.index:
        term = index_diagonal_blocks(ids, G)
        out = term if out is None else out.add_(term)
    slabs = (d.to(ALGEBRA_DTYPE) for r in f.raw for d in raw_slabs(*r, _raw_step(f.b * r[1].shape[0] * r[2].k_in)))
    for D in itertools.chain(f.dense, slabs):
        term = D @ D.transpose(1, 2)
        out = term if out is None else out.add_(term)
    assert out is not None
    return out


def position_gram_block(
    A1: torch.Tensor, G1: torch.Tensor, A2: torch.Tensor, G2: torch.Tensor, bias: bool, trace: bool
) -> torch.Tensor:
    """Σ_{s,t} (a_is · a_jt [+ 1]) (g_ias · g_jbt) for patches A (b, P, k) and output gradients G (c, b, P, o) (P1
    positions in the first chunk, P2 in the second): (b1, c, b2, c), or (b1, b2) summed over a = b with ``trace``.
    The output-gradient products of all position pairs come from one matrix product per slab of positions s
    (slabs bounding its result to :data:`_SLAB_ENTRIES`), then are weighted by the patch Grams."""
    AA = torch.einsum("isk,jtk->ijst", A1, A2)
    if bias:
        AA = AA + 1.0
    c, b1, P1, _ = G1.shape
    b2, P2 = G2.shape[1], G2.shape[2]
    w = 1 if trace else c  # rows per example and position: (example, output) pairs, or examples with c·o columns
    rows1 = G1.permute(2, 1, 0, 3).reshape(P1 * b1 * w, -1)  # rows (s, i[, a])
    rows2 = G2.permute(2, 1, 0, 3).reshape(P2 * b2 * w, -1)  # rows (t, j[, b])
    out = torch.zeros((b1, b2) if trace else (b1, c, b2, c), dtype=G1.dtype, device=G1.device)
    slab = max(1, _SLAB_ENTRIES // max(1, b1 * w * P2 * b2 * w))
    for s0 in range(0, P1, slab):
        s1 = min(P1, s0 + slab)
        M = rows1[s0 * b1 * w : s1 * b1 * w] @ rows2.T
        if trace:
            out += torch.einsum("ijst,sitj->ij", AA[:, :, s0:s1], M.view(s1 - s0, b1, P2, b2))
        else:
            out += torch.einsum("ijst,siatjb->iajb", AA[:, :, s0:s1], M.view(s1 - s0, b1, c, P2, b2, c))
    return out


_SLAB_ENTRIES = 2**22  # entries of one slab's output-gradient products in position_gram_block


def index_gram_block(
    ids1: torch.Tensor, G1: torch.Tensor, ids2: torch.Tensor, G2: torch.Tensor, trace: bool
) -> torch.Tensor:
    """An embedding's kernel block Σ_{s,t} [id_is = id_jt] (g_ias · g_jbt) for ids (b, P) (−1: no row) and output
    gradients G (c, b, P, d): (b1, c, b2, c), or (b1, b2) summed over a = b with ``trace``.

    This is the position Gram of a Linear layer applied to one-hot rows, whose input Gram is the id-equality mask:
    only the matching position pairs are visited (found by sorting, never forming anything of the table's size),
    so the work is (matching pairs) · c² · d rather than P² · c² · d."""
    b1, P1 = ids1.shape
    b2, P2 = ids2.shape
    c, d = G1.shape[0], G1.shape[-1]
    r1, r2 = matching_pairs(ids1.reshape(-1), ids2.reshape(-1))
    rows1 = G1.permute(1, 2, 0, 3).reshape(b1 * P1, c, d)  # (position of an example, output, d)
    rows2 = G2.permute(1, 2, 0, 3).reshape(b2 * P2, c, d)
    target = (r1 // P1) * b2 + r2 // P2  # the example pair (i, j) of each matching position pair
    sums = _pair_sums(rows1, rows2, r1, r2, target, b1 * b2, trace)
    return sums.view(b1, b2) if trace else sums.view(b1, b2, c, c).permute(0, 2, 1, 3).contiguous()


def index_diagonal_blocks(ids: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """An embedding's per-example blocks Σ_{s,t} [id_is = id_it] g_ias · g_ibt, (b, c, c), for ids (b, P) (−1: no
    row) and output gradients G (c, b, P, d): the matching pairs within each example (ids offset per example)."""
    b, P = ids.shape
    c, d = G.shape[0], G.shape[-1]
    span = int(ids.max()) + 1 if ids.numel() else 1
    offsets = torch.arange(b, device=ids.device).unsqueeze(1) * span
    keys = torch.where(ids >= 0, ids + offsets, ids).reshape(-1)
    r1, r2 = matching_pairs(keys, keys)
    rows = G.permute(1, 2, 0, 3).reshape(b * P, c, d)
    return _pair_sums(rows, rows, r1, r2, r1 // P, b, False)


def matching_pairs(keys1: torch.Tensor, keys2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All index pairs (r1, r2) with keys1[r1] = keys2[r2] ≥ 0 (negative keys match nothing), for int64 keys: by
    sorting keys2 and locating each key of keys1 in it."""
    where2 = (keys2 >= 0).nonzero().squeeze(1)
    sorted2, order = keys2[where2].sort()
    where2 = where2[order]
    where1 = (keys1 >= 0).nonzero().squeeze(1)
    k1 = keys1[where1]
    lo = torch.searchsorted(sorted2, k1)
    counts = torch.searchsorted(sorted2, k1, right=True) - lo
    r1 = where1.repeat_interleave(counts)
    first = (counts.cumsum(0) - counts).repeat_interleave(counts)  # where each key's run starts in the output
    r2 = where2[lo.repeat_interleave(counts) + torch.arange(r1.shape[0], device=keys1.device) - first]
    return r1, r2


def _pair_sums(
    rows1: torch.Tensor,
    rows2: torch.Tensor,
    r1: torch.Tensor,
    r2: torch.Tensor,
    target: torch.Tensor,
    size: int,
    trace: bool,
) -> torch.Tensor:
    """Σ over the pairs m with target[m] = q of rows1[r1[m]] rows2[r2[m]]ᵀ (c × c; its trace with ``trace``), for
    rows (·, c, d): (size, c, c) or (size,); in slabs of pairs bounding the gathered rows to :data:`_SLAB_ENTRIES`."""
    c, d = rows1.shape[1:]
    out = rows1.new_zeros((size,) if trace else (size, c, c))
    step = max(1, _SLAB_ENTRIES // max(1, c * d))
    for s in range(0, r1.shape[0], step):
        g1, g2 = rows1[r1[s : s + step]], rows2[r2[s : s + step]]
        val = (g1 * g2).sum((1, 2)) if trace else g1 @ g2.transpose(1, 2)
        out.index_add_(0, target[s : s + step], val)
    return out
