"""Numeric helpers used when checking hand-written gradients against numeric ones."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["rel_error"]


def _is_tensor(x: Any) -> bool:
    """True for a ``torch.Tensor`` without importing torch when it is not loaded."""
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


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
    if _is_tensor(x) and _is_tensor(y) and x.device == y.device:
        xd = x.detach().double()
        yd = y.detach().double()
        if xd.numel() == 0 and yd.numel() == 0:
            return 0.0
        top = (xd - yd).abs().max().item()
        bot = (xd.abs() + yd.abs()).max().item()
        return float(top / max(bot, eps))
    xa = _to_numpy(x)
    ya = _to_numpy(y)
    if xa.size == 0 and ya.size == 0:
        return 0.0
    top = float(np.max(np.abs(xa - ya)))
    bot = float(np.max(np.abs(xa) + np.abs(ya)))
    return top / max(bot, eps)


def _to_numpy(x: Any) -> np.ndarray:
    """Tensor / array / number -> float64 numpy array (tensors are moved to the CPU)."""
    if _is_tensor(x):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)
