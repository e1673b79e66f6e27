"""Seeding, tensor-to-numpy conversion (:func:`to_numpy`) and drawing helpers for the notebook.

``matplotlib`` and ``torch`` are imported inside the functions that need them, so importing
this module (and therefore ``eecs598``) is cheap.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["detection_visualizer", "first_line", "is_tensor", "reset_seed", "to_numpy"]

# Backends that cannot show a window; ``plt.show()`` is skipped for them.
_NON_INTERACTIVE_BACKENDS = frozenset({"agg", "cairo", "pdf", "pgf", "ps", "svg", "template"})

GT_COLOR = "#2ca02c"  # green: ground-truth boxes
PRED_COLOR = "#d62728"  # red: predicted boxes
POINT_COLOR = "#1f77b4"  # blue: optional points


def first_line(err: BaseException, limit: int) -> str:
    """An exception's message cut to its first line of at most ``limit`` characters (its type
    when it has none): the detail of a one-line error whose whole report is its cause."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:limit]


def reset_seed(number: int) -> None:
    """Seed python ``random``, numpy and torch (all CUDA devices too when CUDA is available).

    Args:
        number: The seed.
    """
    random.seed(number)
    np.random.seed(number)
    import torch

    torch.manual_seed(number)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(number)


def is_tensor(x: Any) -> bool:
    """True for a torch tensor (anything with ``detach`` and ``cpu``); torch is not imported."""
    return hasattr(x, "detach") and hasattr(x, "cpu")


def to_numpy(x: Any, dtype: Any = None) -> np.ndarray:
    """Tensor / array / number / nested list -> numpy array, of ``dtype`` when one is given.

    The package's one tensor-to-numpy conversion. Tensors are detached and moved to the CPU;
    a bfloat16 tensor, which numpy cannot hold, is first widened to float32 (exactly). Arrays
    already of ``dtype`` are returned as they are, not copied.
    """
    if is_tensor(x):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


def _image_hwc(img: Any) -> np.ndarray:
    """Image in any supported layout -> ``(H, W, 3)`` array that ``imshow`` accepts.

    Accepts ``(3, H, W)`` or ``(H, W, 3)`` tensors/arrays, either float in ``[0, 1]`` or uint8,
    and ``(H, W)`` grayscale.
    """
    arr = to_numpy(img)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = np.transpose(arr, (1, 2, 0))
    elif arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] in (1, 3):
        # Ambiguous tiny image (e.g. 3x3x3): torch tensors are CHW, numpy arrays HWC.
        if is_tensor(img):
            arr = np.transpose(arr, (1, 2, 0))
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an image of shape (3, H, W) or (H, W, 3), got {arr.shape}")
    if arr.dtype == np.uint8:
        return arr
    return np.clip(arr.astype(np.float32), 0.0, 1.0)


def _boxes_2d(boxes: Any, min_cols: int) -> np.ndarray:
    """Boxes as a tensor, array or list of per-box rows -> float ``(N, C)`` array, ``C >= 4``."""
    if isinstance(boxes, (list, tuple)):
        rows = [to_numpy(b).reshape(-1) for b in boxes]
        if not rows:
            return np.zeros((0, min_cols), dtype=np.float64)
        width = max(r.shape[0] for r in rows)
        out = np.full((len(rows), width), np.nan, dtype=np.float64)
        for i, r in enumerate(rows):
            out[i, : r.shape[0]] = r
        arr = out
    else:
        arr = to_numpy(boxes).astype(np.float64)
    if arr.ndim == 1:
        arr = arr.reshape(1, -1) if arr.size else arr.reshape(0, min_cols)
    if arr.ndim != 2 or arr.shape[1] < 4:
        raise ValueError(f"expected boxes of shape (N, >=4), got {arr.shape}")
    return arr


def _class_name(idx_to_class: Mapping[int, str] | Sequence[str] | None, cls: float) -> str:
    """Look up a class name; unknown indices fall back to the number itself."""
    k = int(cls)
    if idx_to_class is None:
        return str(k)
    if isinstance(idx_to_class, Mapping):
        return str(idx_to_class.get(k, k))
    if 0 <= k < len(idx_to_class):
        return str(idx_to_class[k])
    return str(k)


def detection_visualizer(
    img: Any,
    idx_to_class: Mapping[int, str] | Sequence[str] | None,
    bbox: Any = None,
    pred: Any = None,
    points: Any = None,
    show: bool = True,
) -> Figure:
    """Draw an image with ground-truth boxes, predicted boxes and optional points.

    Ground-truth boxes are drawn in green with their class name; predictions in red with a
    ``"class, score"`` label. The figure is built with pyplot; ``plt.show()`` is called only
    when ``show`` is true and the backend can display figures, so headless runs (Agg) never
    block. In a notebook end the call with ``;`` (or assign the result) so that the returned
    figure is not displayed a second time.

    Args:
        img: ``(3, H, W)`` float tensor in ``[0, 1]``, a uint8 tensor, or an ``(H, W, 3)``
            numpy array (float in ``[0, 1]`` or uint8).
        idx_to_class: Maps a class index to its name (dict or list). ``None`` shows indices.
        bbox: Ground-truth boxes ``(N, 4)`` as ``x1, y1, x2, y2`` or ``(N, 5)`` with the class
            index in column 4, or a python list of such rows (e.g. a list of 4-element
            tensors). Rows whose class index is negative (padding) are skipped.
        pred: Predicted boxes ``(M, 6)`` as ``x1, y1, x2, y2, class, score``; ``(M, 4)`` and
            ``(M, 5)`` are accepted too and drawn without the missing parts of the label.
        points: Optional ``(P, 2)`` ``x, y`` points drawn as dots.
        show: Call ``plt.show()`` after drawing (ignored for non-interactive backends).

    Returns:
        The matplotlib ``Figure``.
    """
    import matplotlib
    import matplotlib.pyplot as plt

    image = _image_hwc(img)
    height, width = image.shape[:2]
    scale = 8.0 / max(height, width)
    fig, ax = plt.subplots(figsize=(max(width * scale, 2.0), max(height * scale, 2.0)))
    draw_detections(ax, image, idx_to_class, bbox, pred, points)
    fig.tight_layout(pad=0.1)
    if show and matplotlib.get_backend().lower() not in _NON_INTERACTIVE_BACKENDS:
        plt.show()
    return fig


def draw_detections(
    ax: Any,
    img: Any,
    idx_to_class: Mapping[int, str] | Sequence[str] | None,
    bbox: Any = None,
    pred: Any = None,
    points: Any = None,
) -> None:
    """Draw an image with its boxes into an existing matplotlib ``ax``.

    Arguments as for :func:`detection_visualizer`, which calls this for its single axes.
    """
    from matplotlib.patches import Rectangle

    image = _image_hwc(img)
    height, width = image.shape[:2]
    ax.imshow(image)
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    ax.axis("off")

    groups = ((bbox, GT_COLOR, False), (pred, PRED_COLOR, True))
    for boxes, color, is_pred in groups:
        if boxes is None:
            continue
        arr = _boxes_2d(boxes, 6 if is_pred else 4)
        for row in arr:
            x1, y1, x2, y2 = (float(v) for v in row[:4])
            has_cls = row.shape[0] > 4 and not np.isnan(row[4])
            if has_cls and row[4] < 0:
                continue
            ax.add_patch(
                Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=2)
            )
            parts = []
            if has_cls:
                parts.append(_class_name(idx_to_class, row[4]))
            if is_pred and row.shape[0] > 5 and not np.isnan(row[5]):
                parts.append(f"{float(row[5]):.2f}")
            if parts:
                ax.text(
                    x1,
                    y1,
                    ", ".join(parts),
                    color="white",
                    fontsize=9,
                    va="bottom",
                    bbox={"facecolor": color, "alpha": 0.8, "pad": 1, "edgecolor": "none"},
                )

    if points is not None:
        pts = to_numpy(points).astype(np.float64).reshape(-1, 2)
        ax.scatter(pts[:, 0], pts[:, 1], s=12, c=POINT_COLOR)


def detection_grid(
    samples: Sequence[tuple[Any, Any, Any]],
    idx_to_class: Mapping[int, str] | Sequence[str] | None,
    ncols: int = 4,
    path: str | os.PathLike | None = None,
) -> Figure:
    """A grid of images with GT (green) and predicted (red) boxes, e.g. for a run's report.

    Args:
        samples: ``(img, bbox, pred)`` triples as for :func:`detection_visualizer`.
        idx_to_class: class index to name.
        ncols: images per row.
        path: also save the figure there (PNG).

    Returns:
        The matplotlib ``Figure`` (not shown; close it when done).
    """
    import matplotlib.pyplot as plt

    nrows = max(1, -(-len(samples) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (img, bbox, pred) in zip(axes.flat, samples, strict=False):
        draw_detections(ax, img, idx_to_class, bbox, pred)
    fig.tight_layout(pad=0.2)
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig
