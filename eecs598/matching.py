"""The matching core of the evaluators: AP from a precision/recall curve, one image's checked
record, and the devkit's greedy matching of detections to GT boxes on flat arrays.

:mod:`eecs598.mean_ap` (the mAP) and :mod:`eecs598.errors` (the error analysis) both build on
it, so a detection is a true positive in one exactly when it is in the other. The protocol
(stable score order, +1-pixel IoU, the first best GT box on ties, difficult boxes ignored) is
:mod:`eecs598.mean_ap`'s docstring's.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Any

import numpy as np

from .utils import to_numpy

__all__ = [
    "FP",
    "IGNORED",
    "INTERPOLATIONS",
    "TP",
    "FlatArrays",
    "ImageDetections",
    "PaddedByImage",
    "average_precision",
    "check_image",
    "class_map",
    "image_detections",
    "interpolated_ap",
    "iou_chunks",
    "match_class",
]

#: The AP interpolations :func:`interpolated_ap` knows: VOC2010+ all-point (the VOC
#: evaluator's default), VOC2007 11-point, COCO 101-point.
INTERPOLATIONS: tuple[str, ...] = ("all-point", "11-point", "101-point")

# Largest number of (detection, GT) IoU values computed in one batch; bounds peak memory.
_IOU_CHUNK = 1 << 22


# ----------------------------------------------------------------------------------------------
# AP from a precision/recall curve
# ----------------------------------------------------------------------------------------------


def average_precision(
    recall: np.ndarray, precision: np.ndarray, use_11_point: bool = False
) -> float:
    """AP of one class from its cumulative recall/precision curve.

    All-point mode (default): recall gets a leading ``0`` and a trailing ``1``, precision a
    leading and trailing ``0``; precision is made non-increasing from the right, and AP is the
    sum of ``(r[i] - r[i-1]) * p[i]`` over the points ``i`` where recall changes.

    11-point mode (VOC2007): the mean over ``t`` in ``np.arange(0.0, 1.1, 0.1)`` of the largest
    precision at recall ``>= t`` (``0`` where no point reaches ``t``). The thresholds are the
    devkit's ``np.arange`` values, so e.g. the third from last is ``0.7000000000000001``.

    Args:
        recall: ``(D,)`` non-decreasing recall after each detection in score order.
        precision: ``(D,)`` precision at the same points.
        use_11_point: Select the VOC2007 11-point average.

    Returns:
        AP as a python float in ``[0, 1]``. An empty curve gives ``0.0``.
    """
    rec = np.asarray(recall, dtype=np.float64).reshape(-1)
    prec = np.asarray(precision, dtype=np.float64).reshape(-1)
    if rec.shape != prec.shape:
        raise ValueError(f"recall {rec.shape} and precision {prec.shape} differ in shape")
    if use_11_point:
        return _sampled_ap(rec, prec, np.arange(0.0, 1.1, 0.1))
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    idx = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
    return float(np.sum((mrec[idx] - mrec[idx - 1]) * mpre[idx]))


def _sampled_ap(rec: np.ndarray, prec: np.ndarray, thresholds: np.ndarray) -> float:
    """Mean over the recall ``thresholds (T,)`` of the largest precision at recall ``>= t``
    (``0`` where no point reaches ``t``): the N-point interpolations (VOC2007, COCO).

    Args:
        rec: ``(D,)`` non-decreasing recall.
        prec: ``(D,)`` precision at the same points.
        thresholds: ``(T,)`` recall values at which precision is sampled.
    """
    if rec.size == 0:
        return 0.0
    # Largest precision from position i to the end; recall is sorted, so the points with
    # recall >= t are exactly a suffix starting at searchsorted(rec, t).
    suffix_max = np.maximum.accumulate(prec[::-1])[::-1]
    start = np.searchsorted(rec, thresholds, side="left")
    padded = np.append(suffix_max, 0.0)
    return float(np.sum(padded[start]) / thresholds.shape[0])


def interpolated_ap(recall: np.ndarray, precision: np.ndarray, interpolation: str) -> float:
    """AP of one class by the named interpolation (:data:`INTERPOLATIONS`).

    ``"all-point"`` and ``"11-point"`` are :func:`average_precision`'s two modes (VOC2010+ and
    VOC2007). ``"101-point"`` is COCO's: the mean over the recall thresholds ``0, 0.01, ...,
    1`` (each ``k / 100``) of the largest precision at recall ``>= t``; it is what TIDE and
    pycocotools report, so an error analysis can be compared with theirs.

    Args:
        recall: ``(D,)`` non-decreasing recall after each detection in score order.
        precision: ``(D,)`` precision at the same points.
        interpolation: One of :data:`INTERPOLATIONS`.

    Raises:
        ValueError: An unknown interpolation (the message lists the known ones).
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if interpolation != "101-point":
        return average_precision(recall, precision, use_11_point=interpolation == "11-point")
    rec = np.asarray(recall, dtype=np.float64).reshape(-1)
    prec = np.asarray(precision, dtype=np.float64).reshape(-1)
    if rec.shape != prec.shape:
        raise ValueError(f"recall {rec.shape} and precision {prec.shape} differ in shape")
    return _sampled_ap(rec, prec, np.arange(101) / 100.0)


# ----------------------------------------------------------------------------------------------
# One image's data
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ImageDetections:
    """One image's GT boxes and detections as checked numpy arrays.

    Build it with :func:`image_detections`, which converts and checks the inputs; every entry
    point (:meth:`MeanAPAccumulator.add`, :func:`write_tool_files`, :func:`read_folder`,
    :func:`evaluate_detections`) takes or makes this record.

    Attributes:
        image_id: Any hashable id, unique per image (a file stem for :func:`write_tool_files`).
        gt_boxes: ``(N, 4)`` float64 ``x1, y1, x2, y2`` pixel coordinates.
        gt_classes: ``(N,)`` int64 class indices, all ``>= 0`` (padding rows are dropped).
        gt_difficult: ``(N,)`` bool difficult flags.
        det_boxes: ``(M, 4)`` float64.
        det_classes: ``(M,)`` int64 class indices.
        det_scores: ``(M,)`` float64 finite confidences.
    """

    image_id: Hashable
    gt_boxes: np.ndarray
    gt_classes: np.ndarray
    gt_difficult: np.ndarray
    det_boxes: np.ndarray
    det_classes: np.ndarray
    det_scores: np.ndarray


def image_detections(
    image_id: Hashable,
    gt_boxes: Any,
    gt_classes: Any,
    gt_difficult: Any | None,
    det_boxes: Any,
    det_classes: Any,
    det_scores: Any,
) -> ImageDetections:
    """One image's GT and detections -> :class:`ImageDetections` (the one place that checks them).

    Inputs may be torch tensors, numpy arrays or lists.

    Args:
        image_id: Any hashable id, unique per image.
        gt_boxes: ``(N, 4)`` ``x1, y1, x2, y2`` pixel coordinates.
        gt_classes: ``(N,)`` int class indices. Rows with a negative index (padding) are
            dropped.
        gt_difficult: ``(N,)`` bool, or ``None`` for "none are difficult".
        det_boxes: ``(M, 4)``.
        det_classes: ``(M,)`` int class indices.
        det_scores: ``(M,)`` confidences (finite).

    Raises:
        ValueError: Sizes differ, or a score is not finite.
    """
    gb = to_numpy(gt_boxes, np.float64).reshape(-1, 4)
    gl = to_numpy(gt_classes, np.int64).reshape(-1)
    if gt_difficult is None:
        gd = np.zeros(gl.shape[0], dtype=bool)
    else:
        gd = to_numpy(gt_difficult, bool).reshape(-1)
    if not gb.shape[0] == gl.shape[0] == gd.shape[0]:
        raise ValueError(
            f"image {image_id!r}: GT sizes differ: boxes {gb.shape[0]}, "
            f"classes {gl.shape[0]}, difficult {gd.shape[0]}"
        )
    keep = gl >= 0
    db = to_numpy(det_boxes, np.float64).reshape(-1, 4)
    dl = to_numpy(det_classes, np.int64).reshape(-1)
    ds = to_numpy(det_scores, np.float64).reshape(-1)
    if not db.shape[0] == dl.shape[0] == ds.shape[0]:
        raise ValueError(
            f"image {image_id!r}: detection sizes differ: boxes {db.shape[0]}, "
            f"classes {dl.shape[0]}, scores {ds.shape[0]}"
        )
    if not np.all(np.isfinite(ds)):
        raise ValueError(f"image {image_id!r}: detection scores must be finite")
    return ImageDetections(image_id, gb[keep], gl[keep], gd[keep], db, dl, ds)


def class_map(class_names: Sequence[str] | Mapping[int, str]) -> dict[int, str]:
    """Class names as a list (index -> name) or dict -> ``{index: name}``; names must be unique."""
    if isinstance(class_names, Mapping):
        mapping = {int(k): str(v) for k, v in class_names.items()}
    else:
        mapping = {i: str(v) for i, v in enumerate(class_names)}
    names = list(mapping.values())
    if len(set(names)) != len(names):
        raise ValueError("class names must be unique")
    return mapping


def check_image(
    image: ImageDetections, idx_to_class: Mapping[int, str], seen: Set[Hashable]
) -> None:
    """Raise ValueError when ``image``'s id is in ``seen`` or one of its class indices is not a
    key of ``idx_to_class``: the checks every evaluation of records makes before it starts."""
    if image.image_id in seen:
        raise ValueError(f"image {image.image_id!r} was already added")
    for labels, what in ((image.gt_classes, "GT"), (image.det_classes, "detection")):
        unknown = set(np.unique(labels).tolist()) - set(idx_to_class)
        if unknown:
            raise ValueError(
                f"image {image.image_id!r}: unknown {what} class index {sorted(unknown)}"
            )


# ----------------------------------------------------------------------------------------------
# Flat arrays and the devkit's matching
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class FlatArrays:
    """Every image's GT boxes and detections, concatenated in the order the images came.

    ``gt_img`` / ``det_img`` hold the position of each row's image in that order; the other
    fields are those of :class:`ImageDetections`: ``(G,)`` / ``(G, 4)`` for GT, ``(D,)`` /
    ``(D, 4)`` for detections.
    """

    gt_img: np.ndarray
    gt_boxes: np.ndarray
    gt_classes: np.ndarray
    gt_difficult: np.ndarray
    det_img: np.ndarray
    det_boxes: np.ndarray
    det_classes: np.ndarray
    det_scores: np.ndarray

    @classmethod
    def concat(cls, images: Sequence[ImageDetections]) -> FlatArrays:
        """Concatenate the images' arrays (empty arrays of the right shape for no images)."""

        def cat(parts: list[np.ndarray], empty: np.ndarray) -> np.ndarray:
            return np.concatenate(parts) if parts else empty

        def img(counts: list[int]) -> np.ndarray:
            return np.repeat(np.arange(len(images), dtype=np.int64), np.array(counts, np.int64))

        no_ids, no_boxes = np.zeros(0, np.int64), np.zeros((0, 4), np.float64)
        return cls(
            gt_img=img([im.gt_classes.shape[0] for im in images]),
            gt_boxes=cat([im.gt_boxes for im in images], no_boxes),
            gt_classes=cat([im.gt_classes for im in images], no_ids),
            gt_difficult=cat([im.gt_difficult for im in images], np.zeros(0, bool)),
            det_img=img([im.det_classes.shape[0] for im in images]),
            det_boxes=cat([im.det_boxes for im in images], no_boxes),
            det_classes=cat([im.det_classes for im in images], no_ids),
            det_scores=cat([im.det_scores for im in images], np.zeros(0, np.float64)),
        )

    def sort_orders(self) -> tuple[np.ndarray, np.ndarray]:
        """The permutations :meth:`sorted` applies: ``(G,)`` for GT, ``(D,)`` for detections."""
        return (
            np.lexsort((self.gt_img, self.gt_classes)),
            np.lexsort((-self.det_scores, self.det_classes)),
        )

    def sorted(self) -> FlatArrays:
        """GT by class, then image; detections by class, then score descending. Both sorts are
        stable (``lexsort``), so GT boxes keep row order and tied scores keep input order."""
        return self.take(*self.sort_orders())

    def class_slices(self, c: int) -> tuple[slice, slice]:
        """Where the rows of class ``c`` are: a GT slice and a detection slice (the arrays must
        be :meth:`sorted`)."""
        return (
            slice(*np.searchsorted(self.gt_classes, [c, c + 1])),
            slice(*np.searchsorted(self.det_classes, [c, c + 1])),
        )

    def of_class(self, c: int) -> FlatArrays:
        """The rows of class ``c`` (views); the arrays must be :meth:`sorted`."""
        return self.take(*self.class_slices(c))

    def take(self, g: np.ndarray | slice, d: np.ndarray | slice) -> FlatArrays:
        """GT rows ``g`` and detection rows ``d`` (an index array or a slice each)."""
        return FlatArrays(
            self.gt_img[g], self.gt_boxes[g], self.gt_classes[g], self.gt_difficult[g],
            self.det_img[d], self.det_boxes[d], self.det_classes[d], self.det_scores[d],
        )  # fmt: skip


def _iou_padded(det_boxes: np.ndarray, gt_padded: np.ndarray, gt_valid: np.ndarray) -> np.ndarray:
    """IoU of each detection with each padded GT box of its image, +1-pixel convention.

    Args:
        det_boxes: ``(D, 4)`` float64 ``x1, y1, x2, y2``.
        gt_padded: ``(D, G, 4)`` float64, the padded GT boxes of each detection's image.
        gt_valid: ``(D, G)`` bool, which padded entries are real boxes.

    Returns:
        ``(D, G)`` float64: the IoU; ``-1`` for a real box that does not overlap by at least
        one "pixel" in each direction (no candidate), ``-inf`` for padding.
    """
    d = det_boxes[:, None, :]
    iw = np.minimum(d[..., 2], gt_padded[..., 2]) - np.maximum(d[..., 0], gt_padded[..., 0]) + 1.0
    ih = np.minimum(d[..., 3], gt_padded[..., 3]) - np.maximum(d[..., 1], gt_padded[..., 1]) + 1.0
    candidate = (iw > 0) & (ih > 0) & gt_valid
    inter = iw * ih
    area_d = (d[..., 2] - d[..., 0] + 1.0) * (d[..., 3] - d[..., 1] + 1.0)
    area_g = (gt_padded[..., 2] - gt_padded[..., 0] + 1.0) * (
        gt_padded[..., 3] - gt_padded[..., 1] + 1.0
    )
    union = np.where(candidate, area_d + area_g - inter, 1.0)
    iou = np.where(candidate, inter / union, -1.0)
    iou[~gt_valid] = -np.inf
    return iou


def _best_match(
    det_boxes: np.ndarray, gt_padded: np.ndarray, gt_valid: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Best-IoU GT box of each detection, with the +1-pixel convention.

    Args:
        det_boxes: ``(D, 4)`` float64 ``x1, y1, x2, y2``.
        gt_padded: ``(D, G, 4)`` float64, the padded GT boxes of each detection's image.
        gt_valid: ``(D, G)`` bool, which padded entries are real boxes.

    Returns:
        ``(ovmax, argmax)``: ``(D,)`` float64 best IoU (``-1`` when no GT box overlaps) and
        ``(D,)`` int64 index of that GT box within the image (first one on ties).
    """
    iou = _iou_padded(det_boxes, gt_padded, gt_valid)
    arg = np.argmax(iou, axis=1)
    ovmax = np.take_along_axis(iou, arg[:, None], axis=1)[:, 0]
    return np.maximum(ovmax, -1.0), arg


@dataclass(frozen=True, eq=False)
class PaddedByImage:
    """GT boxes grouped by image, each group padded to the largest: the table every IoU pass
    reads, so that a detection meets only the boxes of its own image.

    Attributes:
        images: ``(U,)`` int64 the images that have boxes, ascending.
        start: ``(U,)`` int64 position of each image's first box in the input rows.
        boxes: ``(U, Gmax, 4)`` float64 the boxes, zeros in padding.
        valid: ``(U, Gmax)`` bool, which entries are real boxes.
    """

    images: np.ndarray
    start: np.ndarray
    boxes: np.ndarray
    valid: np.ndarray

    @classmethod
    def build(cls, gt_img: np.ndarray, gt_boxes: np.ndarray) -> PaddedByImage:
        """The table of ``(G,)`` image positions, sorted ascending, and ``(G, 4)`` boxes
        (at least one)."""
        uniq_img, start, counts = np.unique(gt_img, return_index=True, return_counts=True)
        group = np.repeat(np.arange(uniq_img.shape[0]), counts)
        rank = np.arange(gt_img.shape[0]) - start[group]
        padded = np.zeros((uniq_img.shape[0], int(counts.max()), 4), dtype=np.float64)
        padded[group, rank] = gt_boxes
        valid = np.zeros(padded.shape[:2], dtype=bool)
        valid[group, rank] = True
        return cls(uniq_img, start, padded, valid)

    def rows_of(self, det_img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(pos, with_gt)``: ``(D,)`` row of each detection's image in the table (clipped;
        meaningful where the image has boxes) and the detections whose image has boxes."""
        pos = np.minimum(np.searchsorted(self.images, det_img), self.images.shape[0] - 1)
        return pos, np.flatnonzero(self.images[pos] == det_img)

    def iou(self, det_boxes: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """``(D, Gmax)`` IoU of ``(D, 4)`` detections with the boxes of table rows ``(D,)``
        (:func:`_iou_padded`: ``-1`` for no overlap, ``-inf`` for padding)."""
        return _iou_padded(det_boxes, self.boxes[rows], self.valid[rows])


def _best_gt(rows: FlatArrays) -> tuple[np.ndarray, np.ndarray]:
    """Best-IoU GT box of each detection of one class among the GT boxes of its image.

    Args:
        rows: One class's rows (:meth:`FlatArrays.of_class`): GT boxes sorted by image (row
            order kept within an image), detections in score order; at least one GT box.

    Returns:
        ``(ovmax, gt_index)``: ``(D,)`` float64 best IoU (``-1`` when the image has no GT box of
        the class or none overlaps) and ``(D,)`` int64 position of that GT box in ``rows``.
    """
    det_img = rows.det_img
    table = PaddedByImage.build(rows.gt_img, rows.gt_boxes)
    # Row of each detection's image in the padded table; only detections whose image has GT
    # boxes of this class are compared at all.
    pos, with_gt = table.rows_of(det_img)
    ovmax = np.full(det_img.shape[0], -1.0)
    gt_index = np.zeros(det_img.shape[0], dtype=np.int64)
    for sel in iou_chunks(with_gt, table.boxes.shape[1]):
        img_row = pos[sel]
        ov, arg = _best_match(rows.det_boxes[sel], table.boxes[img_row], table.valid[img_row])
        ovmax[sel] = ov
        gt_index[sel] = table.start[img_row] + arg
    return ovmax, gt_index


def iou_chunks(indices: np.ndarray, gmax: int) -> Iterator[np.ndarray]:
    """``indices (D,)`` in consecutive pieces small enough that a piece's ``(n, gmax)`` IoU
    table stays within ``_IOU_CHUNK`` values (bounds peak memory)."""
    chunk = max(1, _IOU_CHUNK // max(gmax, 1))
    for lo in range(0, indices.shape[0], chunk):
        yield indices[lo : lo + chunk]


#: :func:`match_class` outcomes of a detection.
TP, FP, IGNORED = 1, 0, -1


def match_class(rows: FlatArrays, iou_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The devkit's greedy matching of one class's detections (module docstring, step 3).

    Args:
        rows: One class's rows (:meth:`FlatArrays.of_class`), detections in score order.
        iou_threshold: Minimum IoU for a match.

    Returns:
        ``(outcome, gt_index)``: ``(D,)`` int8 :data:`TP`, :data:`FP` or :data:`IGNORED`
        (matched to a difficult box), and ``(D,)`` int64 the position in ``rows`` of the GT
        box a true positive took (``-1`` for the others).
    """
    n_det = rows.det_img.shape[0]
    outcome = np.full(n_det, FP, dtype=np.int8)
    taken = np.full(n_det, -1, dtype=np.int64)
    if n_det == 0 or rows.gt_img.shape[0] == 0:
        return outcome, taken
    ovmax, gt_index = _best_gt(rows)
    # Greedy matching in score order. A detection only ever looks at its best-IoU GT box, so two
    # detections interact only when they share that box: the first such detection (in score
    # order) takes the box, every later one is a duplicate. np.unique(return_index=True) gives
    # the first occurrence of each GT index among the matched detections.
    matched = np.flatnonzero(ovmax >= iou_threshold)
    keys = gt_index[matched]
    first = np.zeros(matched.shape[0], dtype=bool)
    first[np.unique(keys, return_index=True)[1]] = True
    difficult = rows.gt_difficult[keys]
    outcome[matched[difficult]] = IGNORED
    won = matched[first & ~difficult]
    outcome[won] = TP
    taken[won] = gt_index[won]
    return outcome, taken
