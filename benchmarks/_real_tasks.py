"""The networks and tasks of ``real_networks.py``: one loader per network, each returning the same fields.

A loader ``task(seed, shots, size, n_test)`` returns a dict with

* ``net``: the trained network with a new head for the target task, in eval mode;
* ``xa, ya``: the adaptation labels (``shots`` per class), ``xt, yt``: the test points;
* ``head``: the parameter patterns of the head block (the ``linadapt-head`` variant);
* ``finetune``: keyword arguments for :func:`linadapt.experiments.baselines.finetune` (learning rate, batch size).

Every loader works offline: the weights come from a package or are trained here and cached.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


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


TASKS: dict[str, Callable[..., dict]] = {"efficientnet": efficientnet}
