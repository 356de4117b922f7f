"""The layer rules, one module per family; importing this package registers them (one line each)."""

from linadapt.jacobian.structured.rules import attention, conv, embedding, linear, norm

__all__ = ["attention", "conv", "embedding", "linear", "norm"]
