"""A small transformer-like network taking keyword inputs (``input_ids``, ``attention_mask``) and returning a dict,
the same network behind one positional tensor, and token batches for both (tests of keyword inputs)."""

from __future__ import annotations

import torch
from torch import nn


class TinyEncoder(nn.Module):
    """A transformer-like classifier over token ids with a padding mask, returning a dict."""

    def __init__(self, vocab: int = 20, d: int = 8, c: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, c)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.emb(input_ids)
        a, _ = self.attn(h, h, h, key_padding_mask=attention_mask == 0, need_weights=False)
        h = self.norm(h + a)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1)
        return {"logits": self.head(pooled), "pooled": pooled}


class Positional(nn.Module):
    """The same network taking one tensor (n, 2, L): ids and mask stacked; returns ``key`` of its outputs."""

    def __init__(self, inner: nn.Module, key: str = "logits") -> None:
        super().__init__()
        self.inner, self.key = inner, key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x[:, 0], x[:, 1])[self.key]


def tokens(n: int = 7, length: int = 5, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 20, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[::2, 3:] = 0  # padded examples
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}, torch.stack([ids, mask], 1)
