"""Anchors fitted to the training boxes: sizes per FPN level and aspect ratios.

The RPN places, on every FPN level of stride ``s``, one anchor per size ``S`` (pixels) and
aspect ratio ``r = h / w``: area ``S ** 2``, ``w = sqrt(S ** 2 / r)``, ``h = r * w`` (the
convention of ``two_stage_detector.generate_fpn_anchors``). The notebook uses one size per
level, ``8 * stride`` (64 / 128 / 256 px on p3-p5), and ratios ``(0.5, 1, 2)``. Those sizes
suit VOC-like photographs; on data whose objects are all about 10 px no anchor reaches the
foreground IoU with any box, and the RPN has nothing to learn from. :func:`fit_anchors`
chooses sizes and ratios for a dataset instead, from the ``(w, h)`` of its training boxes
(:func:`training_box_sizes`), and :meth:`AnchorFit.report` tells the user what changed.

The measure: best-possible recall
---------------------------------
The best-possible recall (BPR) is the share of GT boxes for which some anchor reaches
``IoU >= threshold`` (the RPN's foreground threshold). It is computed with the *shape* IoU
(:func:`shape_iou`): each anchor is centred on the box, so only widths and heights count.
Where the grid puts anchor centres is deliberately ignored: the grid offset of a box from the
nearest anchor centre is a property of the level's stride, not of the anchor's shape, so no
choice of sizes or ratios can change it; and the RPN's low-quality matching makes every GT's
best anchor foreground anyway, so what decides whether a box gets a *good* foreground anchor
is whether an anchor of the right shape exists. The BPR is an upper bound of the recall the
anchor set allows, not a prediction of the detector's recall.

The search
----------
:func:`fit_anchors` is deterministic:

1. Candidate sizes of a level with stride ``s``: ``s * 2 ** (k / 4)``, ``k = 0..16``
   (``[1, 16] x s``, a quarter octave apart: neighbouring squares overlap with IoU 0.71),
   rounded to 2 decimals, plus the default ``default_scale * s`` when in that range.
   A configuration has ``K`` sizes per level, strictly ascending within a level and
   non-decreasing across levels (levels in stride order: larger levels hold larger
   anchors).
2. Ratio candidates: ``default_ratios``, ``(1,)``, and the 10/50/90% quantiles of the
   boxes' ``h / w`` (2 decimals, clipped to ``[0.1, 10]``). For each ratio set a table of
   each box's best shape IoU over the ratios, for every candidate size, is computed once.
3. For each ``K`` in 1, 2, 3 (or ``sizes_per_level``) and each ratio set, a coordinate
   ascent over the ``L * K`` sizes, from two starts: the defaults (with neighbouring grid
   sizes when ``K > 1``) and evenly spaced quantiles of ``sqrt(w * h)``, snapped to the
   grid under the ordering constraints. Each slot in turn moves to its best size between
   its neighbours, scored by matched boxes, then the sum of best IoU, then closeness to
   the level default (so levels no box needs keep their default), then the smaller
   size; rounds repeat until nothing moves (at most 6). The better start is kept.
4. ``K`` is the smallest whose BPR is within 0.005 of the best over all ``K`` (fewer
   anchors: a cheaper head and fewer easy negatives); among its ratio sets the same score
   decides, earlier sets (the defaults first) winning exact ties.

More than 20000 boxes are subsampled (fixed seed) for the search; the recalls reported
are measured on all boxes. Because the default start contains the default anchors, the
fit's recall is never below the defaults' on the searched boxes; should a subsampled fit
score below them on all boxes, the defaults are kept.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from .voc import ImageAnnotation, ResizeCrop

__all__ = [
    "AnchorFit",
    "anchor_shapes",
    "best_possible_recall",
    "fit_anchors",
    "grid_best_iou",
    "shape_iou",
    "training_box_sizes",
    "training_boxes",
]

#: Grid of candidate sizes of a level: ``stride * 2 ** (k / GRID_STEPS_PER_OCTAVE)``.
GRID_STEPS_PER_OCTAVE = 4
#: A level's sizes stay within ``[1, MAX_STRIDE_MULTIPLE] x stride``.
MAX_STRIDE_MULTIPLE = 16
#: The fewest sizes per level whose BPR is within this of the best is chosen.
RECALL_TOLERANCE = 0.005
#: Sizes per level tried when ``sizes_per_level`` is not given.
SIZE_COUNTS = (1, 2, 3)
#: Quantiles of the boxes' ``h / w`` making the data-driven ratio candidate.
RATIO_QUANTILES = (0.1, 0.5, 0.9)
#: Data-driven ratios are clipped to this range (thinner anchors match almost nothing).
RATIO_RANGE = (0.1, 10.0)
#: More boxes than this are subsampled (deterministically) for the search.
MAX_FIT_BOXES = 20000
#: Rounds of the coordinate ascent (it stops earlier when a round changes nothing).
ASCENT_ROUNDS = 6


# ----------------------------------------------------------------------------------------------
# The measure
# ----------------------------------------------------------------------------------------------


def shape_iou(box_wh: np.ndarray, anchor_wh: np.ndarray) -> np.ndarray:
    """IoU of boxes and anchors with the same centre, from their widths and heights only.

    ``inter = min(w, aw) * min(h, ah)``, ``IoU = inter / (w * h + aw * ah - inter)``.

    Args:
        box_wh: ``(N, 2)`` box ``(w, h)``.
        anchor_wh: ``(A, 2)`` anchor ``(w, h)``.

    Returns:
        ``(N, A)`` float64 IoU; 0 where both areas are 0.
    """
    box_wh = np.asarray(box_wh, dtype=np.float64).reshape(-1, 2)
    anchor_wh = np.asarray(anchor_wh, dtype=np.float64).reshape(-1, 2)
    inter = np.minimum(box_wh[:, None, 0], anchor_wh[None, :, 0]) * np.minimum(
        box_wh[:, None, 1], anchor_wh[None, :, 1]
    )
    union = box_wh.prod(1)[:, None] + anchor_wh.prod(1)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def best_possible_recall(box_wh: np.ndarray, anchor_wh: np.ndarray, threshold: float) -> float:
    """Share of boxes whose best anchor reaches ``shape_iou >= threshold`` (0 without boxes).

    Args:
        box_wh: ``(N, 2)`` box ``(w, h)``.
        anchor_wh: ``(A, 2)`` anchor ``(w, h)`` (:func:`anchor_shapes`).
        threshold: the foreground IoU.
    """
    best = _best_iou(box_wh, anchor_wh)
    return float((best >= threshold).mean()) if len(best) else 0.0


def anchor_shapes(
    sizes: Mapping[str, Sequence[float]], aspect_ratios: Sequence[float]
) -> np.ndarray:
    """``(w, h)`` of every anchor of every level: ``w = sqrt(S ** 2 / r)``, ``h = r * w``.

    Args:
        sizes: ``{level: [S, ...]}`` anchor sizes in pixels.
        aspect_ratios: ``h / w`` of the anchors of each size.

    Returns:
        ``(A_total, 2)`` float64, level by level (in ``sizes``' order), then size, with the
        ratio varying fastest (the order of ``generate_fpn_anchors``).
    """
    flat = [float(s) for level_sizes in sizes.values() for s in level_sizes]
    size = np.asarray(flat, dtype=np.float64)[:, None]  # (S, 1)
    ratio = np.asarray(aspect_ratios, dtype=np.float64)[None, :]  # (1, R)
    width = np.sqrt(size**2 / ratio)
    return np.stack([width, ratio * width], axis=2).reshape(-1, 2)


def _best_iou(box_wh: np.ndarray, anchor_wh: np.ndarray) -> np.ndarray:
    """``(N,)`` best shape IoU of each box over the anchors (0 without anchors)."""
    iou = shape_iou(box_wh, anchor_wh)
    return iou.max(1) if iou.shape[1] else np.zeros(len(iou))


def grid_best_iou(
    boxes: np.ndarray,
    sizes: Mapping[str, Sequence[float]],
    aspect_ratios: Sequence[float],
    strides: Mapping[str, int],
    offset: float = 0.0,
    image_wh: np.ndarray | None = None,
) -> np.ndarray:
    """Best IoU of each box over the anchors *where the RPN places them*: on level ``l``
    every anchor shape sits at the centres ``(i + offset) * stride_l``.

    For a fixed anchor shape the overlap along each axis only shrinks as the centres move
    apart, so the best anchor of each shape is the one at the grid centre nearest to the
    box's centre; only that one is scored. Unlike :func:`best_possible_recall`, this counts
    what the grid costs: a box about one stride across, off the grid by half a stride, keeps
    less than a third of its IoU with an anchor of its own shape.

    Args:
        boxes: ``(N, 4)`` ``(x1, y1, x2, y2)`` in pixels of the images the model sees
            (:func:`training_boxes`).
        sizes: ``{level: [S, ...]}`` anchor sizes in pixels.
        aspect_ratios: anchor ``h / w`` ratios.
        strides: ``{level: stride}`` for every level in ``sizes``.
        offset: the anchor centre within its cell, in strides (``RPNSettings.anchor_offset``).
        image_wh: ``(N, 2)`` width and height of the image each box is in; a level then has
            ``ceil(side / stride)`` locations per axis (the last ones do not reach the far
            edge). Without it the grid is unbounded.

    Returns:
        ``(N,)`` float64 best IoU (0 without anchors).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    centre, box_wh = (boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]
    best = np.zeros(len(boxes))
    for level, level_sizes in sizes.items():
        stride = float(strides[level])
        cell = np.maximum(np.round(centre / stride - offset), 0)  # nearest location, (N, 2)
        if image_wh is not None:
            cell = np.minimum(cell, np.ceil(np.asarray(image_wh, np.float64) / stride) - 1)
        gap = np.abs(centre - (cell + offset) * stride)[:, None, :]  # (N, 1, 2)
        anchor_wh = anchor_shapes({level: level_sizes}, aspect_ratios)[None]  # (1, A, 2)
        # Overlap per axis of two centred intervals of lengths a and b, centres ``gap`` apart.
        reach = (box_wh[:, None, :] + anchor_wh) / 2 - gap
        overlap = np.clip(reach, 0, np.minimum(box_wh[:, None, :], anchor_wh))
        inter = overlap.prod(2)  # (N, A)
        union = box_wh.prod(1)[:, None] + anchor_wh.prod(2) - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        best = np.maximum(best, iou.max(1, initial=0.0))
    return best


# ----------------------------------------------------------------------------------------------
# The result
# ----------------------------------------------------------------------------------------------


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _sizes_text(sizes: Sequence[float], stride: int) -> str:
    return ", ".join(f"{s:g} px ({s / stride:.3g} x stride)" for s in sizes)


@dataclass(frozen=True)
class AnchorFit:
    """Anchor sizes and ratios fitted by :func:`fit_anchors`, with their recall.

    Attributes:
        sizes: ``{level: [S, ...]}`` pixels, the same count per level, ascending within a
            level and non-decreasing across levels (levels in stride order).
        aspect_ratios: anchor ``h / w`` ratios, ascending.
        recall_before: BPR of the default anchors (``default_sizes``, ``default_ratios``).
        recall_after: BPR of the fitted anchors.
        unmatched: boxes no fitted anchor reaches ``threshold`` with.
        num_boxes: boxes measured.
        threshold: the foreground IoU of the BPR.
        default_sizes: ``{level: [default_scale * stride]}``.
        default_ratios: the default ratios.
        strides: ``{level: stride}``.
        mean_iou_before, mean_iou_after: mean over the boxes of their best shape IoU.
        unmatched_size_range: ``(min, max)`` of ``sqrt(w * h)`` of the unmatched boxes.
        unmatched_ratio_range: ``(min, max)`` of their ``h / w``.
        recall_per_class_before, recall_per_class_after: ``{class name: BPR}`` for the classes
            present, when classes were given.
    """

    sizes: dict[str, list[float]]
    aspect_ratios: list[float]
    recall_before: float
    recall_after: float
    unmatched: int
    num_boxes: int
    threshold: float
    default_sizes: dict[str, list[float]]
    default_ratios: list[float]
    strides: dict[str, int]
    mean_iou_before: float = 0.0
    mean_iou_after: float = 0.0
    unmatched_size_range: tuple[float, float] | None = None
    unmatched_ratio_range: tuple[float, float] | None = None
    recall_per_class_before: dict[str, float] = field(default_factory=dict)
    recall_per_class_after: dict[str, float] = field(default_factory=dict)
    grid_recall: float | None = None

    def on_grid(
        self, boxes: np.ndarray, image_wh: np.ndarray | None = None, offset: float = 0.0
    ) -> AnchorFit:
        """This fit with ``grid_recall`` measured: the share of ``boxes`` (``(N, 4)``, as the
        model sees them, :func:`training_boxes`) that an anchor *on the stride grid* reaches
        with ``IoU >= threshold`` (:func:`grid_best_iou`)."""
        best = grid_best_iou(boxes, self.sizes, self.aspect_ratios, self.strides, offset, image_wh)
        recall = float((best >= self.threshold).mean()) if len(best) else 0.0
        return dataclasses.replace(self, grid_recall=recall)

    def config(self) -> dict[str, object]:
        """Plain-JSON settings for a checkpoint's config: ``anchor_sizes`` (``{level: [px]}``)
        and ``anchor_aspect_ratios``."""
        return {
            "anchor_sizes": {
                level: [float(s) for s in sizes] for level, sizes in self.sizes.items()
            },
            "anchor_aspect_ratios": [float(r) for r in self.aspect_ratios],
        }

    def report(self) -> str:
        """A short multi-line report: BPR before and after, unmatched boxes, per-class
        recall, the sizes per level (px and strides) and the ratios."""
        lines = [f"Anchor fit (shape IoU >= {self.threshold:g}, anchor centred on each box):"]
        if self.num_boxes == 0:
            lines.append("  no boxes: the default anchors are kept.")
        else:
            lines.append(
                f"  best possible recall on {self.num_boxes} boxes: "
                f"{_percent(self.recall_before)} with the default anchors -> "
                f"{_percent(self.recall_after)} fitted (mean best IoU "
                f"{self.mean_iou_before:.2f} -> {self.mean_iou_after:.2f})"
            )
            lines.append(self._unmatched_line())
        if self.grid_recall is not None and self.num_boxes:
            lines.append(
                f"  on the stride grid (anchors where the RPN places them): "
                f"{_percent(self.grid_recall)} of the boxes have an anchor at IoU >= "
                f"{self.threshold:g}"
            )
        if self.recall_per_class_after:
            per_class = ", ".join(
                f"{name} {_percent(self.recall_per_class_before[name])} -> {_percent(after)}"
                for name, after in self.recall_per_class_after.items()
            )
            lines.append(f"  recall per class (default -> fitted): {per_class}")
        for level, sizes in self.sizes.items():
            stride = self.strides[level]
            default = _sizes_text(self.default_sizes[level], stride)
            lines.append(
                f"  {level} (stride {stride}): {_sizes_text(sizes, stride)}  [default {default}]"
            )
        ratios = ", ".join(f"{r:g}" for r in self.aspect_ratios)
        defaults = ", ".join(f"{r:g}" for r in self.default_ratios)
        lines.append(f"  aspect ratios (h / w): {ratios}  [default {defaults}]")
        return "\n".join(lines)

    def _unmatched_line(self) -> str:
        share = self.unmatched / self.num_boxes
        line = (
            f"  unmatched (no anchor reaches the IoU): {self.unmatched} boxes ({_percent(share)})"
        )
        if self.unmatched_size_range and self.unmatched_ratio_range:
            (s0, s1), (r0, r1) = self.unmatched_size_range, self.unmatched_ratio_range
            line += f", sqrt(w*h) {s0:.3g}-{s1:.3g} px, h/w {r0:.3g}-{r1:.3g}"
        return line


# ----------------------------------------------------------------------------------------------
# The search
# ----------------------------------------------------------------------------------------------


class _SizeGrid(NamedTuple):
    """Candidate sizes of all levels, as one ascending array.

    ``sizes (U,)`` the union of every level's candidates; ``allowed (L, U)`` which of them each
    level may use; ``default_log (L,)`` ``log2`` of each level's default size. Slots hold
    indices into ``sizes``, so the ordering constraints are constraints on indices.
    """

    sizes: np.ndarray
    allowed: np.ndarray
    default_log: np.ndarray


def _size_grid(strides: Sequence[int], default_scale: float) -> _SizeGrid:
    """``stride * 2 ** (k / 4)`` for ``k = 0..16`` per level (2 decimals), plus the default
    size when it lies within ``[1, 16] x stride``."""
    steps = GRID_STEPS_PER_OCTAVE * int(math.log2(MAX_STRIDE_MULTIPLE))
    multiples = 2.0 ** (np.arange(steps + 1) / GRID_STEPS_PER_OCTAVE)
    per_level = []
    for stride in strides:
        candidates = stride * multiples
        if 1 <= default_scale <= MAX_STRIDE_MULTIPLE:
            candidates = np.append(candidates, default_scale * stride)
        per_level.append(np.unique(np.round(candidates, 2)))
    sizes = np.unique(np.concatenate(per_level))
    allowed = np.stack([np.isin(sizes, level) for level in per_level])
    default_log = np.log2(default_scale * np.asarray(strides, dtype=np.float64))
    return _SizeGrid(sizes, allowed, default_log)


class _Search(NamedTuple):
    """One configuration: slot indices into the grid (level-major) and its score."""

    slots: tuple[int, ...]
    matched: int
    iou_sum: float
    distance: float  # sum over slots of |log2(size / level default)|

    def key(self) -> tuple[int, float, float]:
        """Larger is better: recall, then mean best IoU, then closeness to the defaults."""
        return (self.matched, self.iou_sum, -self.distance)


def _iou_table(box_wh: np.ndarray, sizes: np.ndarray, ratios: Sequence[float]) -> np.ndarray:
    """``(N, U)`` float64: each box's best shape IoU over the ratios, for each grid size
    (bit-identical to :func:`shape_iou` of the same anchors, so counts agree exactly)."""
    anchors = anchor_shapes({"all": sizes}, ratios)
    iou = shape_iou(box_wh, anchors).reshape(len(box_wh), len(sizes), len(ratios))
    return iou.max(2)


def _score(table: np.ndarray, grid: _SizeGrid, slots: Sequence[int], k: int, t: float) -> _Search:
    best = table[:, list(slots)].max(1)
    level = np.arange(len(slots)) // k
    distance = np.abs(np.log2(grid.sizes[list(slots)]) - grid.default_log[level]).sum()
    return _Search(tuple(slots), int((best >= t).sum()), float(best.sum()), float(distance))


def _start(grid: _SizeGrid, k: int, targets: np.ndarray) -> list[int]:
    """Feasible slots nearest (in log size) to ``targets`` (``(L * k,)`` pixels).

    A backward pass finds each slot's largest index that still leaves room for the slots after
    it (strictly ascending within a level, non-decreasing across levels); a forward pass then
    snaps each slot to its allowed size nearest its target within ``[previous, that bound]``.
    """
    count = len(targets)
    upper = [0] * count
    for i in reversed(range(count)):
        index = np.flatnonzero(grid.allowed[i // k])
        if i + 1 < count:
            index = index[index <= upper[i + 1] - ((i + 1) // k == i // k)]
        if not len(index):
            raise ValueError(
                f"Cannot place {k} ascending anchor sizes per level within "
                f"[1, {MAX_STRIDE_MULTIPLE}] x stride on these levels."
            )
        upper[i] = int(index[-1])
    slots: list[int] = []
    for i in range(count):
        lower = slots[-1] + ((i - 1) // k == i // k) if slots else 0
        index = np.flatnonzero(grid.allowed[i // k])
        index = index[(index >= lower) & (index <= upper[i])]
        gap = np.abs(np.log2(grid.sizes[index]) - math.log2(targets[i]))
        slots.append(int(index[np.argmin(gap)]))
    return slots


def _slot_range(slots: Sequence[int], i: int, k: int, size_count: int) -> tuple[int, int]:
    """Inclusive index bounds of slot ``i`` given its neighbours."""
    low = slots[i - 1] + ((i - 1) // k == i // k) if i > 0 else 0
    high = slots[i + 1] - ((i + 1) // k == i // k) if i + 1 < len(slots) else size_count - 1
    return low, high


def _ascend(table: np.ndarray, grid: _SizeGrid, slots: list[int], k: int, t: float) -> _Search:
    """Coordinate ascent: each slot in turn moves to its best feasible size, until a round
    changes nothing (or :data:`ASCENT_ROUNDS`). Every move keeps or improves the score."""
    slots = list(slots)
    for _ in range(ASCENT_ROUNDS):
        changed = False
        for i in range(len(slots)):
            low, high = _slot_range(slots, i, k, len(grid.sizes))
            candidates = np.flatnonzero(grid.allowed[i // k, low : high + 1]) + low
            others = slots[:i] + slots[i + 1 :]
            other = table[:, others].max(1) if others else np.zeros(len(table))
            best = np.maximum(other[:, None], table[:, candidates])  # (N, C)
            matched = (best >= t).sum(0)
            iou_sum = best.sum(0)
            distance = np.abs(np.log2(grid.sizes[candidates]) - grid.default_log[i // k])
            choice = int(candidates[np.lexsort((candidates, distance, -iou_sum, -matched))[0]])
            changed |= choice != slots[i]
            slots[i] = choice
        if not changed:
            break
    return _score(table, grid, slots, k, t)


def _default_targets(grid: _SizeGrid, k: int) -> np.ndarray:
    """Per slot, the level default times ``2 ** ((j - (k - 1) // 2) / 4)``: a start whose
    anchors include the defaults (when they lie on the grid)."""
    offsets = (np.arange(k) - (k - 1) // 2) / GRID_STEPS_PER_OCTAVE
    return (2.0 ** (grid.default_log[:, None] + offsets[None, :])).reshape(-1)


def _quantile_targets(box_wh: np.ndarray, count: int) -> np.ndarray:
    """``count`` evenly spaced quantiles of ``sqrt(w * h)``, ascending."""
    return np.quantile(np.sqrt(box_wh.prod(1)), (np.arange(count) + 0.5) / count)


def _ratio_candidates(box_wh: np.ndarray, default_ratios: Sequence[float]) -> list[tuple]:
    """The defaults, ``(1,)``, and the 10/50/90% quantiles of ``h / w`` (2 decimals, clipped
    to :data:`RATIO_RANGE`), without duplicates."""
    quantiles = np.quantile(box_wh[:, 1] / box_wh[:, 0], RATIO_QUANTILES)
    data = tuple(sorted({float(r) for r in np.round(np.clip(quantiles, *RATIO_RANGE), 2)}))
    found: list[tuple] = []
    for ratios in (tuple(sorted(default_ratios)), (1.0,), data):
        if ratios not in found:
            found.append(ratios)
    return found


def _subsample(box_wh: np.ndarray, limit: int) -> np.ndarray:
    """At most ``limit`` boxes, a fixed-seed random subset in their order."""
    if len(box_wh) <= limit:
        return box_wh
    keep = np.sort(np.random.default_rng(0).choice(len(box_wh), limit, replace=False))
    return box_wh[keep]


def _search(
    box_wh: np.ndarray, grid: _SizeGrid, k: int, ratio_sets: Sequence[tuple], t: float
) -> tuple[_Search, int]:
    """Best configuration with ``k`` sizes per level over the ratio sets and both starts;
    returns it and the index of its ratio set (earlier sets win exact ties)."""
    best, best_ratio = None, 0
    for index, ratios in enumerate(ratio_sets):
        table = _iou_table(box_wh, grid.sizes, ratios)
        for targets in (
            _default_targets(grid, k),
            _quantile_targets(box_wh, len(grid.default_log) * k),
        ):
            found = _ascend(table, grid, _start(grid, k, targets), k, t)
            if best is None or found.key() > best.key():
                best, best_ratio = found, index
    return best, best_ratio


def _fewest_sizes(found: Mapping[int, tuple[_Search, int]], slack: float) -> int:
    """The smallest size count whose matched boxes are within ``slack`` of the best."""
    best = max(search.matched for search, _ in found.values())
    return min(k for k, (search, _) in found.items() if search.matched >= best - slack)


def _check_box_wh(box_wh: np.ndarray) -> np.ndarray:
    """``box_wh`` as ``(N, 2)`` float64; ``ValueError`` for another shape or a size <= 0."""
    box_wh = np.asarray(box_wh, dtype=np.float64)
    if box_wh.size == 0:
        return box_wh.reshape(0, 2)
    if box_wh.ndim != 2 or box_wh.shape[1] != 2:
        raise ValueError(f"box_wh must have shape (N, 2), got {box_wh.shape}")
    if not (np.isfinite(box_wh).all() and (box_wh > 0).all()):
        raise ValueError("box_wh must hold finite, positive widths and heights")
    return box_wh


def _per_class(
    matched: np.ndarray, classes: np.ndarray | None, class_names: Sequence[str] | None
) -> dict[str, float]:
    """``{name: share matched}`` for every class present (ascending class index)."""
    if classes is None:
        return {}
    classes = np.asarray(classes).reshape(-1)
    names = {}
    for c in np.unique(classes):
        name = str(class_names[int(c)]) if class_names is not None else f"class {int(c)}"
        names[name] = float(matched[classes == c].mean())
    return names


def fit_anchors(
    box_wh: np.ndarray,
    strides: Mapping[str, int],
    *,
    threshold: float = 0.6,
    default_scale: float = 8.0,
    default_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    sizes_per_level: int | None = None,
    classes: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
) -> AnchorFit:
    """Anchor sizes per level and aspect ratios that maximise the best-possible recall.

    The search (deterministic; more than 20000 boxes are subsampled for it) is described in
    the module docstring. The recalls reported are measured on all boxes; should a subsampled
    fit score below the default anchors on them, the defaults are kept.

    Args:
        box_wh: ``(N, 2)`` box ``(w, h)`` in pixels of the images the model sees
            (:func:`training_box_sizes`).
        strides: ``{level: stride}``, e.g. ``{"p3": 8, "p4": 16, "p5": 32}``.
        threshold: the RPN's foreground IoU.
        default_scale: the default anchor size in strides (the notebook's 8).
        default_ratios: the default ratios.
        sizes_per_level: fix ``K`` instead of choosing it.
        classes: ``(N,)`` class index of each box, for the per-class recall.
        class_names: names of the class indices (otherwise ``"class <i>"``).

    Returns:
        The :class:`AnchorFit`. Without boxes, the defaults, with a warning.
    """
    box_wh = _check_fit_args(box_wh, strides, threshold, sizes_per_level, classes)
    levels = sorted(strides, key=lambda name: strides[name])
    level_strides = {name: int(strides[name]) for name in levels}
    defaults = {name: [float(default_scale * s)] for name, s in level_strides.items()}
    default_ratios = sorted(float(r) for r in default_ratios)
    common = dict(
        threshold=float(threshold),
        default_sizes=defaults,
        default_ratios=default_ratios,
        strides=level_strides,
    )
    if len(box_wh) == 0:
        warnings.warn(
            "fit_anchors: the dataset has no boxes; the default anchors are kept.", stacklevel=2
        )
        sizes = {name: list(v) for name, v in defaults.items()}
        return AnchorFit(sizes, list(default_ratios), 0.0, 0.0, 0, 0, **common)

    sizes, ratios = _searched_anchors(
        box_wh, level_strides, default_scale, default_ratios, threshold, sizes_per_level
    )
    before = _best_iou(box_wh, anchor_shapes(defaults, default_ratios))
    after = _best_iou(box_wh, anchor_shapes(sizes, ratios))
    if (after >= threshold).sum() < (before >= threshold).sum():  # only after subsampling
        sizes = {name: list(v) for name, v in defaults.items()}
        ratios, after = list(default_ratios), before
    return _make_fit(box_wh, sizes, ratios, before, after, classes, class_names, common)


def _check_fit_args(
    box_wh: np.ndarray,
    strides: Mapping[str, int],
    threshold: float,
    sizes_per_level: int | None,
    classes: np.ndarray | None,
) -> np.ndarray:
    """``box_wh`` as ``(N, 2)`` float64 (:func:`_check_box_wh`); ``ValueError`` naming the
    first argument of :func:`fit_anchors` that is out of range."""
    box_wh = _check_box_wh(box_wh)
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if not strides or min(strides.values()) <= 0:
        raise ValueError(f"strides must be positive, got {dict(strides)}")
    if sizes_per_level is not None and sizes_per_level < 1:
        raise ValueError(f"sizes_per_level must be positive, got {sizes_per_level}")
    if classes is not None and len(np.asarray(classes).reshape(-1)) != len(box_wh):
        raise ValueError("classes must give one class per box")
    return box_wh


def _searched_anchors(
    box_wh: np.ndarray,
    level_strides: Mapping[str, int],
    default_scale: float,
    default_ratios: Sequence[float],
    threshold: float,
    sizes_per_level: int | None,
) -> tuple[dict[str, list[float]], list[float]]:
    """The search of the module docstring on ``(N, 2)`` ``box_wh`` (subsampled to
    :data:`MAX_FIT_BOXES`): ``({level: [S, ...]}, ratios)`` with the fewest sizes per level
    whose recall is within :data:`RECALL_TOLERANCE` of the best. Levels are in stride order."""
    grid = _size_grid(list(level_strides.values()), default_scale)
    fit_wh = _subsample(box_wh, MAX_FIT_BOXES)
    ratio_sets = _ratio_candidates(fit_wh, default_ratios)
    counts = (sizes_per_level,) if sizes_per_level is not None else SIZE_COUNTS
    found = {k: _search(fit_wh, grid, k, ratio_sets, threshold) for k in counts}
    k = _fewest_sizes(found, RECALL_TOLERANCE * len(fit_wh))
    search, ratio_index = found[k]
    values = grid.sizes[list(search.slots)].reshape(len(level_strides), k)
    sizes = {name: [float(v) for v in row] for name, row in zip(level_strides, values, strict=True)}
    return sizes, list(ratio_sets[ratio_index])


def _make_fit(box_wh, sizes, ratios, before, after, classes, class_names, common) -> AnchorFit:
    """The :class:`AnchorFit` of the chosen anchors from each box's best IoU before/after."""
    t = common["threshold"]
    matched_before, matched_after = before >= t, after >= t
    missed = box_wh[~matched_after]
    size_range = ratio_range = None
    if len(missed):
        side, ratio = np.sqrt(missed.prod(1)), missed[:, 1] / missed[:, 0]
        size_range = (float(side.min()), float(side.max()))
        ratio_range = (float(ratio.min()), float(ratio.max()))
    return AnchorFit(
        sizes=sizes,
        aspect_ratios=ratios,
        recall_before=float(matched_before.mean()),
        recall_after=float(matched_after.mean()),
        unmatched=int(len(missed)),
        num_boxes=int(len(box_wh)),
        mean_iou_before=float(before.mean()),
        mean_iou_after=float(after.mean()),
        unmatched_size_range=size_range,
        unmatched_ratio_range=ratio_range,
        recall_per_class_before=_per_class(matched_before, classes, class_names),
        recall_per_class_after=_per_class(matched_after, classes, class_names),
        **common,
    )


# ----------------------------------------------------------------------------------------------
# The data
# ----------------------------------------------------------------------------------------------


def training_box_sizes(
    records: Sequence[ImageAnnotation], image_size: int, crop: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """``(w, h)`` and class of every non-difficult box as the model sees it in training
    (:func:`training_boxes`, as widths and heights)."""
    boxes, classes, _ = training_boxes(records, image_size, crop)
    return boxes[:, 2:] - boxes[:, :2], classes


def training_boxes(
    records: Sequence[ImageAnnotation], image_size: int, crop: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """``(x1, y1, x2, y2)`` and class of every non-difficult box as the model sees it.

    Each record's boxes go through the reader's geometry (:class:`~eecs598.voc.ResizeCrop`:
    short side to ``image_size``, then with ``crop`` the square centre crop); boxes left with
    under 1 px of width or height (cut by the crop, or tiny after the resize) are dropped, as
    the reader drops them. The reader's ``max_boxes`` limit is not applied.

    Args:
        records: :class:`~eecs598.voc.ImageAnnotation` records (a reader's ``records``).
        image_size: the reader's ``image_size``.
        crop: apply the training centre crop.

    Returns:
        ``(N, 4)`` float64 boxes in the resized image's pixels, ``(N,)`` int64 classes, and
        ``(N, 2)`` the width and height of each box's image as the model sees it.
    """
    kept, classes, sides = [np.zeros((0, 4))], [np.zeros(0, dtype=np.int64)], [np.zeros((0, 2))]
    for record in records:
        geometry = ResizeCrop.for_image(record.width, record.height, image_size, crop)
        keep = ~np.asarray(record.difficult, dtype=bool)
        boxes, valid = geometry.apply_boxes(np.asarray(record.boxes, np.float32)[keep])
        kept.append(boxes[valid].astype(np.float64))
        classes.append(np.asarray(record.classes, dtype=np.int64)[keep][valid])
        side = np.array([[geometry.out_w, geometry.out_h]], dtype=np.float64)
        sides.append(np.repeat(side, int(valid.sum()), axis=0))
    return np.concatenate(kept), np.concatenate(classes), np.concatenate(sides)
