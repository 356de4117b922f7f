"""A layer's output gradients g_ia (c, n, m) in their most compact exact form, and products with them."""

from __future__ import annotations

import torch

from linadapt.jacobian.structured import costs
from linadapt.jacobian.structured.features import ConvGeometry

_CACHE_ENTRIES = 2**19  # entries of a product's temporary that stay in the CPU caches
_FEW = 4  # up to this many vectors, per-example contractions over outputs run as broadcast products


def contract_outputs(G: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """W[k, b, o] = Σ_a U[k, b, a] G[a, b, o] for G (c, n, o), U (k, n, c)."""
    if U.shape[0] <= _FEW:  # accumulate over the outputs in place: one pass over G, no (c, n, o) temporary
        out = []
        for u in U.transpose(1, 2):  # (c, n)
            w = G[0] * u[0].unsqueeze(1)
            for a in range(1, G.shape[0]):
                w.addcmul_(G[a], u[a].unsqueeze(1))
            out.append(w)
        return out[0].unsqueeze(0) if len(out) == 1 else torch.stack(out)  # one vector: a view, not a copy
    return torch.einsum("kba,abo->kbo", U, G)


def expand_outputs(G: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """out[k, b, a] = Σ_o G[a, b, o] M[k, b, o] for G (c, n, o), M (k, n, o)."""
    c, n, o = G.shape
    rows = max(1, _CACHE_ENTRIES // (c * o))  # row blocks whose temporaries stay in cache
    if M.shape[0] > _FEW:  # per example (c × o)(o × k), on a copy of the block's G laid out per example
        per_example = torch.empty(n, c, M.shape[0], dtype=G.dtype, device=G.device)
        for s in range(0, n, rows):
            blk = G[:, s : s + rows].transpose(0, 1).contiguous()
            torch.bmm(blk, M[:, s : s + rows].permute(1, 2, 0), out=per_example[s : s + rows])
        return per_example.permute(2, 0, 1)
    out = torch.empty(M.shape[0], n, c, dtype=G.dtype, device=G.device)
    for m, res in zip(M, out):  # multiply and sum
        for s in range(0, n, rows):
            res[s : s + rows] = (G[:, s : s + rows] * m[s : s + rows]).sum(-1).t()
    return out


OutputGradients = torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None


def compact(G: torch.Tensor) -> OutputGradients:
    """Output gradients G (c, n, m) in their most compact exact form: None for the identity, (R, D) when of
    rank one over the outputs, else G."""
    if is_identity(G):
        return None
    factors = rank_one_outputs(G)
    return G if factors is None else factors


def position_major(
    G: torch.Tensor | tuple[torch.Tensor, torch.Tensor], geo: ConvGeometry
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """A convolution's output gradients over (channel, position) reordered to (position, channel); for the
    rank-one form only the two factors are reordered."""

    def reorder(T: torch.Tensor) -> torch.Tensor:  # (..., d_out·P) → (..., P·d_out)
        return T.unflatten(-1, (geo.d_out, -1)).transpose(-1, -2).flatten(-2).contiguous()

    return (reorder(G[0]), reorder(G[1])) if isinstance(G, tuple) else reorder(G)


def width(G: OutputGradients, c: int) -> int:
    """The per-example width m of output gradients in any of their forms (c for the identity)."""
    return c if G is None else G[1].shape[-1] if isinstance(G, tuple) else G.shape[-1]


def contract_any(G: OutputGradients, U: torch.Tensor, sl: slice, examples_first: bool = False) -> torch.Tensor:
    """Σ_a U[k, b, a] g_ba for the examples ``sl`` (U already restricted to them): (k, b, m); with
    ``examples_first`` contiguous in that layout (else, for the rank-one form and several vectors, a view of
    a (k, m, b) tensor)."""
    if G is None:
        return U
    if isinstance(G, tuple):  # D ⊙ (U R)
        R, D = G
        if examples_first or U.shape[0] == 1:  # contiguous operands; its transpose is still a view for k = 1
            return (U @ R) * D[sl]
        # laid out (k, m, b), so that Σ_b w_b a_bᵀ for all k needs no copy
        return ((R.T @ U.transpose(1, 2)) * D[sl].T).transpose(1, 2)
    return contract_outputs(G[:, sl], U)


def expand_any(G: OutputGradients, M: torch.Tensor, sl: slice, examples_first: bool = False) -> torch.Tensor:
    """out[k, b, a] = g_ba · M[k, b] for the examples ``sl``: (k, b, c); M is (k, b, m), or (b, k, m) with
    ``examples_first`` (the layout a matrix product for all k vectors at once gives)."""
    if G is None:
        return M.transpose(0, 1) if examples_first else M
    if isinstance(G, tuple):
        R, D = G
        if examples_first:
            return ((M * D[sl].unsqueeze(1)) @ R.T).transpose(0, 1)
        return (D[sl] * M) @ R.T
    return expand_outputs(G[:, sl], M.transpose(0, 1) if examples_first else M)


def rank_one_outputs(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(R (c, m), D (n, m)) with G[a, i, j] = R[a, j] D[i, j] to rounding, for output gradients G (c, n, m);
    else None. This holds for a layer followed by an elementwise map and the output layer (g_ia = W_a ⊙ σ'(z_i)):
    products then cost a small matrix product instead of a pass over c·n·m entries. Checked entry by entry
    (within 32 ulps of the largest entry of each output in each column); one output gains nothing (None)."""
    c, n, m = G.shape
    if c < 2 or n == 0:
        return None
    col_max = torch.linalg.vector_norm(G, float("inf"), dim=1)  # (c, m), max |entry| without a |G| temporary
    a_star = col_max.argmax(0)  # per column, the output with the largest entry
    D = G.gather(0, a_star.view(1, 1, m).expand(1, n, m))[0]  # (n, m)
    i_star = D.abs().argmax(0)  # per column, the example with the largest entry
    pivot = D.gather(0, i_star.view(1, m))[0]
    G_pivot = G.gather(1, i_star.view(1, 1, m).expand(c, 1, m))[:, 0]  # (c, m)
    nonzero = pivot != 0
    R = torch.where(nonzero, G_pivot / torch.where(nonzero, pivot, torch.ones_like(pivot)), torch.zeros_like(pivot))
    tol = 32 * torch.finfo(G.dtype).eps * col_max  # (c, m): each output's own scale in each column
    rows = max(1, costs.PRODUCT_BUDGET // max(1, c * m))
    for s in range(0, n, rows):
        residual = torch.addcmul(G[:, s : s + rows], R[:, None], D[None, s : s + rows], value=-1).abs_()
        if bool((residual > tol[:, None]).any()):
            return None
    return R, D


def is_identity(G: torch.Tensor) -> bool:
    """Whether the output gradients G (c, n, o) are g_ia = e_a for every example (a layer whose outputs are the
    network's outputs)."""
    c, n, o = G.shape
    eye = torch.eye(c, dtype=G.dtype, device=G.device).unsqueeze(1)
    return c == o and torch.equal(G, eye.expand(c, n, c))
