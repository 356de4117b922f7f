"""The cost model that picks each layer's form: budgets, and multiply-add counts of the kernel and product forms.

Callers look these up through the module (``costs.conv_forms(...)``), so a test can force a form by
replacing one function here."""

from __future__ import annotations

FACTOR_MAX_OUTPUTS = 32  # cached factors: building them costs a backward pass per output
PRODUCT_BUDGET = 2**24  # entries of the per-block temporaries of a product with the cached factors

_READ_COST = 16  # multiply-adds per entry read from memory (≈ 60 GMAC/s of matrix products against ≈ 15 GB/s)
_BOTH_FORMS_AT = 16  # a convolution's materialised gradients are also kept if they win at this many vectors


def conv_cost(k: int, macs: int, stored: int, input_entries: int) -> float:
    """Multiply-add equivalents per example of J(Jᵀ·) for k vectors through a convolution by convolution
    (``macs`` per vector and direction): two convolutions per vector, and one pass per direction over the
    stored output gradients (k multiply-adds per entry) and the layer input."""
    return 2 * k * macs + 2 * (_READ_COST + k) * stored + 2 * _READ_COST * input_entries


def dense_cost(k: int, entries: int) -> float:
    """The same through materialised per-example gradients (``entries`` per example): one pass over them and
    k multiply-adds per entry, per direction."""
    return 2 * (_READ_COST + k) * entries


def conv_forms(P: int, k_in: int, d_out: int, c: int, stored: int, input_entries: int) -> tuple[bool, bool]:
    """(by convolution, materialised): how a convolution (P output positions, k_in = C_in·kh·kw inputs per
    patch, d_out channels, c network outputs, ``stored`` output-gradient entries per example) is kept for
    products. By convolution when that is cheaper for one vector (the conjugate-gradient case: a materialised
    block is then a memory-bound pass for little arithmetic); materialised as well when that is cheaper for
    :data:`_BOTH_FORMS_AT` vectors (the probes of the evidence's stochastic estimates)."""
    macs, entries = P * k_in * d_out, c * d_out * (k_in + 1)
    by_conv = conv_cost(1, macs, stored, input_entries) < dense_cost(1, entries)
    at = _BOTH_FORMS_AT
    materialised = not by_conv or dense_cost(at, entries) < conv_cost(at, macs, stored, input_entries)
    return by_conv, materialised


_MAX_POSITION_PAIRS = 256  # the position-Gram form loops over P² position pairs


def position_gram_cheaper(P: int, k: int, d_out: int, c: int) -> bool:
    """Whether a reused-weight layer (P positions, k inputs per position, d_out outputs, c network outputs)
    is cheaper in the position-Gram form — O(P² (k + c² d_out)) per pair of examples — than by contracting its
    materialised per-example gradients, O(c² d_out k); with a factor 2 in favour of the latter."""
    return P * P <= _MAX_POSITION_PAIRS and 2 * P * P * (k + c * c * (d_out + 1)) < c * c * d_out * k


def position_form_for_products(P: int, k: int, d_out: int, c: int, rank_one: bool = False) -> bool:
    """Whether Jacobian-vector products through a reused-weight layer are cheaper from its patches (P, k) and
    output gradients (c, P, d_out) per example — a matrix product with P·k·d_out multiply-adds per vector plus a
    pass over those factors — than from its materialised per-example gradients (c, d_out·(k + 1)). The latter
    are one pass per product, memory-bound for one vector but shared by many (solvers multiply 17 vectors at
    once for the evidence), so the unexpanded form must win on arithmetic alone. Output gradients of rank one
    over the outputs are stored once, not c times."""
    stored = (1 if rank_one else c) * P * d_out + P * k
    return P * k * d_out + stored < c * d_out * (k + 1)


def hold_positions(materialised: float, position_grams: float, forming: float, group: int) -> bool:
    """Whether kernels whose factors do not fit the budget materialised (groups of ``group`` examples held, the
    other examples' factors formed again for each group: about ``forming`` / ``group`` more multiply-adds per
    pair of examples) are cheaper with the reused-weight layers held as position Grams, which fit: those cost
    ``position_grams`` per pair instead of ``materialised``."""
    return position_grams - materialised < forming / max(1, group)


def held_as_raw(input_entries: int, c: int, d_out: int, P: int, k_in: int) -> bool:
    """Whether a convolution's factors held for kernels take less memory as its input and output gradients
    (input_entries + c·d_out·P per example) than as its materialised gradients (c·d_out·k_in): late layers with
    few positions and many weights."""
    return input_entries + c * d_out * P < c * d_out * k_in
