"""Numeric helpers used when checking hand-written gradients against numeric ones."""

from __future__ import annotations

from typing import Any

import numpy as np

from .utils import is_tensor, to_numpy

__all__ = ["rel_error"]


def rel_error(x: Any, y: Any, eps: float = 1e-10) -> float:
    """Relative error between two arrays of the same shape.

    Computes ``max|x - y| / max(max(|x| + |y|), eps)`` over all elements.

    Args:
        x: Tensor, numpy array or python number, any shape ``S``.
        y: Same kind of value as ``x`` with a shape broadcastable to ``S``. Tensors and numpy
            arrays may be mixed; the comparison then happens in float64 on the CPU.
        eps: Lower bound for the denominator, so two all-zero inputs give ``0.0``.

    Returns:
        The relative error as a python float. Empty inputs give ``0.0``.
    """
    if is_tensor(x) and is_tensor(y) and x.device == y.device:
        xd = x.detach().double()
        yd = y.detach().double()
        if xd.numel() == 0 and yd.numel() == 0:
            return 0.0
        top = (xd - yd).abs().max().item()
        bot = (xd.abs() + yd.abs()).max().item()
        return float(top / max(bot, eps))
    xa = to_numpy(x, np.float64)
    ya = to_numpy(y, np.float64)
    if xa.size == 0 and ya.size == 0:
        return 0.0
    top = float(np.max(np.abs(xa - ya)))
    bot = float(np.max(np.abs(xa) + np.abs(ya)))
    return top / max(bot, eps)
