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
    slabs = (d.to(ALGEBRA_DTYPE) for r in f.raw for d in raw_slabs(*r, _raw_step(f.b * r[1].shape[0] * r[2].k_in)))
    for D in itertools.chain(f.dense, slabs):
        term = D @ D.transpose(1, 2)
        out = term if out is None else out.add_(term)
    assert out is not None
    return out


def position_gram_block(
    A1: torch.Tensor, G1: torch.Tensor, A2: torch.Tensor, G2: torch.Tensor, bias: bool, trace: bool
) -> torch.Tensor:
    """Σ_{s,t} (a_is · a_jt [+ 1]) (g_ias · g_jbt) for patches A (b, P, k) and output gradients G (c, b, P, o):
    (b1, c, b2, c), or (b1, b2) summed over a = b with ``trace``. The output-gradient products of all position
    pairs come from one matrix product per slab of positions s (slabs bounding its result to
    :data:`_SLAB_ENTRIES`), then are weighted by the patch Grams."""
    AA = torch.einsum("isk,jtk->ijst", A1, A2)
    if bias:
        AA = AA + 1.0
    c, b1, P, _ = G1.shape
    b2 = G2.shape[1]
    w = 1 if trace else c  # rows per example and position: (example, output) pairs, or examples with c·o columns
    rows1 = G1.permute(2, 1, 0, 3).reshape(P * b1 * w, -1)  # rows (s, i[, a])
    rows2 = G2.permute(2, 1, 0, 3).reshape(P * b2 * w, -1)  # rows (t, j[, b])
    out = torch.zeros((b1, b2) if trace else (b1, c, b2, c), dtype=G1.dtype, device=G1.device)
    slab = max(1, _SLAB_ENTRIES // max(1, b1 * w * P * b2 * w))
    for s0 in range(0, P, slab):
        s1 = min(P, s0 + slab)
        M = rows1[s0 * b1 * w : s1 * b1 * w] @ rows2.T
        if trace:
            out += torch.einsum("ijst,sitj->ij", AA[:, :, s0:s1], M.view(s1 - s0, b1, P, b2))
        else:
            out += torch.einsum("ijst,siatjb->iajb", AA[:, :, s0:s1], M.view(s1 - s0, b1, c, P, b2, c))
    return out


_SLAB_ENTRIES = 2**22  # entries of one slab's output-gradient products in position_gram_block
