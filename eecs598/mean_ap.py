"""PASCAL VOC mean Average Precision, evaluated in-process.

This module is the project's own evaluator. It follows the VOC devkit protocol in the form used
by the widely used ``mAP`` command-line tool that reads ``ground-truth/`` and
``detection-results/`` text folders (called "the folder tool" below), and reports the same
per-class APs on the same files.

Protocol, per class:

1. All detections of the class, over the whole dataset, are sorted by confidence, highest first.
   The sort is **stable**: detections with equal scores keep their input order (the order of
   :meth:`MeanAPAccumulator.add` calls and, within one image, row order; for folders, files in
   sorted file-name order and lines in file order, which is what the folder tool does).
2. Each detection is compared with the ground-truth (GT) boxes of the same class in the same
   image by IoU with the devkit's +1-pixel convention (``w = x2 - x1 + 1``, ``h = y2 - y1 + 1``,
   boxes that do not overlap by at least one "pixel" in each direction are no candidates). Its
   match is the GT box with the largest IoU (the first one on ties).
3. If that IoU is ``>= iou_threshold``: when the GT box is marked *difficult* the detection is
   ignored (neither TP nor FP); otherwise it is a true positive if that GT box is still unmatched
   (the box then becomes matched) and a false positive if it was already matched (duplicate).
   Below the threshold, or with no candidate GT box, the detection is a false positive.
4. Precision ``tp / (tp + fp)`` and recall ``tp / n_pos`` are accumulated in score order, where
   ``n_pos`` counts non-difficult GT boxes. Precision is ``0`` while ``tp + fp == 0`` (only
   ignored detections so far), as in the devkit.
5. AP is the all-point interpolated area (VOC2010 and later, the default) or the VOC2007
   11-point average (``use_11_point=True``).

Which classes count, and edge cases:

- mAP is the mean AP over the classes that have at least one non-difficult GT box, listed in
  sorted name order. A class whose GT boxes are **all** difficult has ``n_pos == 0``; like the
  folder tool (which only registers a class when it counts a non-difficult box) it is left out
  of ``ap`` and of the mean, so there is never a division by zero. Its name is listed in
  :attr:`MeanAPResult.skipped_classes`.
- A class with GT but no detections scores ``0.0``.
- Detections of a class that has no GT box anywhere are ignored (the folder tool ignores them
  too).
- With no evaluated class at all, ``map`` is ``0.0``.

In memory (:class:`MeanAPAccumulator`, :func:`evaluate_detections`):

- Each image's GT boxes and detections (tensors, arrays or lists) are converted and checked
  once, by :func:`image_detections`, into an :class:`ImageDetections` record; that record is
  what :meth:`MeanAPAccumulator.add` and :func:`write_tool_files` take. GT rows with a negative
  class index are padding and dropped; detection scores must be finite; a class index that is
  not in ``class_names`` is an error (:class:`ValueError` naming the image).

Folder format (:func:`evaluate_folder`, :func:`write_tool_files`):

- ``INPUT_DIR/ground-truth/<id>.txt``: one line per box, ``class x1 y1 x2 y2`` with the literal
  word ``difficult`` as an optional sixth token.
- ``INPUT_DIR/detection-results/<id>.txt``: one line per detection, ``class score x1 y1 x2 y2``.
- Class names contain no whitespace. Coordinates and scores are read as finite floats. Blank
  lines are skipped. A malformed line (wrong token count, a non-number, NaN or infinity) raises
  :class:`ValueError` naming the file and the 1-based line; so does a file that is not UTF-8.
- Detections of a class that appears in no GT file are ignored (see above); boxes are taken as
  written, so an inverted or empty detection box simply matches nothing (a false positive).
- A detection file without a matching GT file is an error (:class:`FileNotFoundError`), as in
  the folder tool. A GT file without a detection file means "no detections for that image"
  (the folder tool stops with an error there instead). A missing ``detection-results/`` folder
  is an error: every writer here creates it, with an empty file per image without detections.

COCO-style metrics (:func:`to_coco`, :func:`coco_evaluate`, :meth:`MeanAPAccumulator.to_coco`):

The same images are also scored by ``pycocotools``' ``COCOeval`` itself (AP@[.5:.95], AP50,
AP75, AP for small / medium / large objects, AR@1/10/100 and AR per size: the 12 numbers of
:data:`COCO_STATS`, with pycocotools' own 12-line summary). Our records become a COCO
instances dict (the ground truth) and a COCO results list (the detections) by this mapping:

- box ``(x1, y1, x2, y2)`` -> ``bbox [x1, y1, x2 - x1, y2 - y1]``; GT ``area = w * h``;
- GT rows marked difficult -> ``iscrowd = 1`` (COCO's ignore regions), others ``0``;
- categories are the sorted class names -> ids ``1..K`` (``{"id", "name"}``, every class of
  ``class_names`` / of the folder);
- images are the sorted ids (file stems, as strings) -> ids ``1..N``; ``file_name``, ``width``
  and ``height`` come from ``image_info`` where given (:func:`inference_with_detector
  <eecs598.inference.inference_with_detector>` passes the image files' own), else
  ``file_name`` is the id and the size is left out (the folder format does not record it);
- GT annotations are numbered ``1..`` in image order, then row order;
- detections of a class without any GT box are left out (ignored, as above); detections
  become ``{"image_id", "category_id", "bbox", "score"}``.

Boxes must be finite (``ValueError`` naming the image and the row). pycocotools is needed only
here, imported on first use; without it these functions raise ``ModuleNotFoundError`` saying
``pip install pycocotools`` and everything else in this module works. pycocotools gives
``-1`` for a statistic without any GT box (e.g. ``AP_small`` with no small object); COCO's
size ranges (small < 32², medium < 96² px) are in the boxes' own pixels.

Command line::

    python -m eecs598.mean_ap INPUT_DIR [--11-point] [--iou 0.5] [--plot out.png] [--coco]
                              [--errors] [--plot-dir DIR] [--score-thresh 0.25]

prints ``xx.xx% = <class> AP`` for every evaluated class in sorted order, then
``mAP = xx.xx%``; with ``--coco``, then pycocotools' 12-line summary of the same files. With
``--errors``, then the error analysis of :mod:`eecs598.errors` (always at IoU 0.5, all-point):
TIDE's table, one row per error type (``Cls``, ``Loc``, ``Both``, ``Dupe``, ``Bkg``, ``Miss``,
``FalsePos``, ``FalseNeg``) with its dAP, and the best-F1 score thresholds; ``--plot-dir`` (which
implies ``--errors``) also writes its files there (``errors.png``, ``confusion.png``,
``pr_curves.png``, ``per_image.csv``, ``errors.json``; no gallery: the files hold no pixels).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import sys
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .files import atomic_write
from .utils import to_numpy

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "COCO_STATS",
    "INTERPOLATIONS",
    "CocoImageInfo",
    "CocoResult",
    "ImageDetections",
    "MeanAPAccumulator",
    "MeanAPResult",
    "average_precision",
    "coco_evaluate",
    "evaluate_detections",
    "evaluate_folder",
    "image_detections",
    "interpolated_ap",
    "main",
    "plot_ap",
    "read_folder",
    "to_coco",
    "write_coco_files",
    "write_tool_files",
]

GT_DIR = "ground-truth"
DET_DIR = "detection-results"
GT_JSON = "ground_truth.json"
DET_JSON = "detections.json"

#: Names of pycocotools' 12 ``COCOeval.stats``, in its order (AR1/10/100: at most 1/10/100
#: detections per image; the others at 100).
COCO_STATS: tuple[str, ...] = (
    "AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
    "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large",
)  # fmt: skip
PYCOCOTOOLS_MISSING = "COCO-style metrics need pycocotools: pip install pycocotools"

#: The AP interpolations :func:`interpolated_ap` knows: VOC2010+ all-point (this evaluator's
#: default), VOC2007 11-point, COCO 101-point.
INTERPOLATIONS: tuple[str, ...] = ("all-point", "11-point", "101-point")

# Largest number of (detection, GT) IoU values computed in one batch; bounds peak memory.
_IOU_CHUNK = 1 << 22


@dataclass
class MeanAPResult:
    """Outcome of an evaluation. Every dict is keyed by class name, in sorted name order.

    Attributes:
        ap: AP of each evaluated class, in ``[0, 1]``.
        map: Mean of ``ap`` over the evaluated classes (``0.0`` when there are none).
        precision: Per class, a float64 array of shape ``(D_c,)``: precision after each of the
            class's ``D_c`` detections in score order (ignored detections included).
        recall: Per class, a float64 array of shape ``(D_c,)``: recall at the same points.
        num_gt: Per class, the number of non-difficult GT boxes (``n_pos``).
        num_tp: Per class, the number of true positives.
        num_fp: Per class, the number of false positives.
        num_ignored: Per class, detections matched to a difficult GT box (neither TP nor FP).
        iou_threshold: The IoU threshold used.
        use_11_point: ``True`` for VOC2007 11-point AP, ``False`` for all-point AP.
        skipped_classes: Classes with GT boxes that are all difficult (left out of the mean).
        coco: COCO-style metrics of the same images, where they were computed
            (:func:`~eecs598.inference.inference_with_detector` with pycocotools installed).
        images: The evaluated images' records, in the order they were added (what
            :meth:`MeanAPAccumulator.compute` saw), so that an error analysis
            (:mod:`eecs598.errors`) can look at each detection again; empty when the result
            was built otherwise.
    """

    ap: dict[str, float]
    map: float
    precision: dict[str, np.ndarray]
    recall: dict[str, np.ndarray]
    num_gt: dict[str, int]
    num_tp: dict[str, int]
    num_fp: dict[str, int]
    num_ignored: dict[str, int]
    iou_threshold: float
    use_11_point: bool
    skipped_classes: list[str] = field(default_factory=list)
    coco: CocoResult | None = None
    images: tuple[ImageDetections, ...] = field(default=(), repr=False)

    def summary(self) -> str:
        """Text in the folder tool's form: ``xx.xx% = <class> AP`` lines, then ``mAP = xx.xx%``."""
        lines = [f"{100.0 * ap:.2f}% = {name} AP" for name, ap in self.ap.items()]
        lines.append(f"mAP = {100.0 * self.map:.2f}%")
        return "\n".join(lines)


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


def _class_map(class_names: Sequence[str] | Mapping[int, str]) -> dict[int, str]:
    """Class names as a list (index -> name) or dict -> ``{index: name}``; names must be unique."""
    if isinstance(class_names, Mapping):
        mapping = {int(k): str(v) for k, v in class_names.items()}
    else:
        mapping = {i: str(v) for i, v in enumerate(class_names)}
    names = list(mapping.values())
    if len(set(names)) != len(names):
        raise ValueError("class names must be unique")
    return mapping


# ----------------------------------------------------------------------------------------------
# Core evaluation on flat arrays (shared by every entry point, and by eecs598.errors, which
# matches with the same _FlatArrays, PaddedByImage, iou_chunks and match_class)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _FlatArrays:
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
    def concat(cls, images: Sequence[ImageDetections]) -> _FlatArrays:
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

    def sorted(self) -> _FlatArrays:
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

    def of_class(self, c: int) -> _FlatArrays:
        """The rows of class ``c`` (views); the arrays must be :meth:`sorted`."""
        return self.take(*self.class_slices(c))

    def take(self, g: np.ndarray | slice, d: np.ndarray | slice) -> _FlatArrays:
        """GT rows ``g`` and detection rows ``d`` (an index array or a slice each)."""
        return _FlatArrays(
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


def _best_gt(rows: _FlatArrays) -> tuple[np.ndarray, np.ndarray]:
    """Best-IoU GT box of each detection of one class among the GT boxes of its image.

    Args:
        rows: One class's rows (:meth:`_FlatArrays.of_class`): GT boxes sorted by image (row
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


def match_class(rows: _FlatArrays, iou_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The devkit's greedy matching of one class's detections (module docstring, step 3).

    Args:
        rows: One class's rows (:meth:`_FlatArrays.of_class`), detections in score order.
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


def _match_class(rows: _FlatArrays, iou_threshold: float) -> tuple[np.ndarray, np.ndarray, int]:
    """TP/FP flags of one class's detections (:func:`match_class`).

    Returns:
        ``(tp, fp, n_ignored)``: ``(D,)`` bool flags and the count of ignored detections.
    """
    outcome, _ = match_class(rows, iou_threshold)
    return outcome == TP, outcome == FP, int(np.count_nonzero(outcome == IGNORED))


def _evaluate(
    flat: _FlatArrays,
    idx_to_class: Mapping[int, str],
    iou_threshold: float,
    use_11_point: bool,
) -> MeanAPResult:
    """Evaluate flat arrays; the one implementation behind every public entry point.

    Args:
        flat: Every image's GT boxes and detections.
        idx_to_class: Class index -> name.
        iou_threshold: Minimum IoU for a match.
        use_11_point: VOC2007 11-point AP instead of all-point AP.
    """
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
    flat = flat.sorted()
    result = MeanAPResult(
        ap={},
        map=0.0,
        precision={},
        recall={},
        num_gt={},
        num_tp={},
        num_fp={},
        num_ignored={},
        iou_threshold=float(iou_threshold),
        use_11_point=bool(use_11_point),
    )
    for name, c in sorted((idx_to_class[int(c)], int(c)) for c in np.unique(flat.gt_classes)):
        rows = flat.of_class(c)
        n_pos = int(np.count_nonzero(~rows.gt_difficult))
        if n_pos == 0:
            result.skipped_classes.append(name)
            continue
        tp, fp, n_ignored = _match_class(rows, iou_threshold)
        tp_cum = np.cumsum(tp, dtype=np.float64)
        fp_cum = np.cumsum(fp, dtype=np.float64)
        rec = tp_cum / n_pos
        prec = tp_cum / np.maximum(tp_cum + fp_cum, np.finfo(np.float64).eps)
        result.ap[name] = average_precision(rec, prec, use_11_point)
        result.precision[name] = prec
        result.recall[name] = rec
        result.num_gt[name] = n_pos
        result.num_tp[name] = int(tp.sum())
        result.num_fp[name] = int(fp.sum())
        result.num_ignored[name] = n_ignored
    if result.ap:
        result.map = float(sum(result.ap.values()) / len(result.ap))
    return result


# ----------------------------------------------------------------------------------------------
# In-memory API
# ----------------------------------------------------------------------------------------------


class MeanAPAccumulator:
    """Collects GT and detections image by image, then evaluates them in one vectorised pass.

    Example::

        acc = MeanAPAccumulator(class_names)
        for image_id, gt, det in loader:
            acc.add(image_detections(image_id, gt_boxes, gt_classes, gt_difficult,
                                     det_boxes, det_classes, scores))
        result = acc.compute()

    Ties in detection scores keep the order in which images were added (and row order within
    an image).
    """

    def __init__(self, class_names: Sequence[str] | Mapping[int, str]) -> None:
        """
        Args:
            class_names: Class index -> name, as a list or a dict (e.g. ``idx_to_class``).
        """
        self.idx_to_class = _class_map(class_names)
        self._images: list[ImageDetections] = []
        self._ids: set[Hashable] = set()

    def __len__(self) -> int:
        """Number of images added so far."""
        return len(self._images)

    def _check_labels(self, labels: np.ndarray, what: str, image_id: Hashable) -> None:
        """Raise ValueError when a ``(K,)`` array of class indices has one not in the mapping."""
        unknown = set(np.unique(labels).tolist()) - set(self.idx_to_class)
        if unknown:
            raise ValueError(f"image {image_id!r}: unknown {what} class index {sorted(unknown)}")

    def add(self, image: ImageDetections) -> None:
        """Add one image's GT boxes and detections (made by :func:`image_detections`).

        Raises:
            ValueError: The id was added before, or a class index is not a key of
                ``class_names``; nothing is added then.
        """
        if image.image_id in self._ids:
            raise ValueError(f"image {image.image_id!r} was already added")
        self._check_labels(image.gt_classes, "GT", image.image_id)
        self._check_labels(image.det_classes, "detection", image.image_id)
        self._ids.add(image.image_id)
        self._images.append(image)

    def compute(self, iou_threshold: float = 0.5, use_11_point: bool = False) -> MeanAPResult:
        """Evaluate everything added so far (see the module docstring for the protocol).

        Args:
            iou_threshold: Minimum IoU (+1-pixel convention) for a match, in ``[0, 1]``.
            use_11_point: VOC2007 11-point AP instead of all-point AP.
        """
        flat = _FlatArrays.concat(self._images)
        result = _evaluate(flat, self.idx_to_class, iou_threshold, use_11_point)
        result.images = tuple(self._images)
        return result

    def to_coco(
        self, image_info: Mapping[Hashable, CocoImageInfo] | None = None
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Everything added so far as ``(COCO instances dict, COCO results list)``
        (:func:`to_coco`)."""
        return to_coco(self._images, self.idx_to_class, image_info)

    def compute_coco(
        self, image_info: Mapping[Hashable, CocoImageInfo] | None = None
    ) -> CocoResult:
        """COCO-style metrics of everything added so far, by pycocotools (module docstring)."""
        return coco_evaluate(*self.to_coco(image_info))


def _split_gt(item: Any) -> tuple[Any, Any, Any]:
    """One image's GT as a dict or an ``(N, 5)`` ``x1, y1, x2, y2, class`` array."""
    if isinstance(item, Mapping):
        return item["boxes"], item["classes"], item.get("difficult")
    arr = to_numpy(item, np.float64).reshape(-1, 5)
    return arr[:, :4], arr[:, 4], None


def _split_det(item: Any) -> tuple[Any, Any, Any]:
    """One image's detections as a dict or an ``(M, 6)`` ``x1, y1, x2, y2, class, score`` array."""
    if isinstance(item, Mapping):
        return item["boxes"], item["classes"], item["scores"]
    arr = to_numpy(item, np.float64).reshape(-1, 6)
    return arr[:, :4], arr[:, 4], arr[:, 5]


def evaluate_detections(
    gt: Sequence[Any],
    detections: Sequence[Any],
    class_names: Sequence[str] | Mapping[int, str],
    iou_threshold: float = 0.5,
    use_11_point: bool = False,
    image_ids: Sequence[Hashable] | None = None,
) -> MeanAPResult:
    """Evaluate detections for a list of images held in memory.

    Args:
        gt: One entry per image, either a dict ``{"boxes": (N, 4), "classes": (N,) int,
            "difficult": (N,) bool (optional)}`` or an ``(N, 5)`` array/tensor
            ``x1, y1, x2, y2, class`` (rows with a negative class are padding and dropped).
        detections: One entry per image, parallel to ``gt``: a dict ``{"boxes": (M, 4),
            "classes": (M,) int, "scores": (M,)}`` or an ``(M, 6)`` array/tensor
            ``x1, y1, x2, y2, class, score`` (the detector's output layout).
        class_names: Class index -> name, as a list or a dict.
        iou_threshold: Minimum IoU (+1-pixel convention) for a match.
        use_11_point: VOC2007 11-point AP instead of all-point AP.
        image_ids: Optional ids (default ``0..len(gt)-1``); only used in error messages.

    Returns:
        A :class:`MeanAPResult`.
    """
    if len(gt) != len(detections):
        raise ValueError(f"{len(gt)} GT entries but {len(detections)} detection entries")
    ids = list(range(len(gt))) if image_ids is None else list(image_ids)
    if len(ids) != len(gt):
        raise ValueError(f"{len(ids)} image ids for {len(gt)} images")
    acc = MeanAPAccumulator(class_names)
    for image_id, g, d in zip(ids, gt, detections, strict=True):
        acc.add(image_detections(image_id, *_split_gt(g), *_split_det(d)))
    return acc.compute(iou_threshold=iou_threshold, use_11_point=use_11_point)


# ----------------------------------------------------------------------------------------------
# Folder format
# ----------------------------------------------------------------------------------------------


def _read_lines(path: str) -> list[tuple[int, list[str]]]:
    """Non-blank lines of a text file as ``(1-based line number, tokens)``."""
    try:
        with open(path, encoding="utf-8") as handle:
            return [(n, line.split()) for n, line in enumerate(handle, start=1) if line.strip()]
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a UTF-8 text file ({err})") from err


def _floats(tokens: list[str], path: str, lineno: int) -> list[float]:
    try:
        values = [float(t) for t in tokens]
    except ValueError:
        raise ValueError(f"{path}, line {lineno}: expected numbers, got {tokens}") from None
    if not all(np.isfinite(values)):
        raise ValueError(f"{path}, line {lineno}: values must be finite, got {tokens}")
    return values


def _txt_ids(folder: str) -> list[str]:
    """Ids (file names without ``.txt``) of the ``.txt`` files in ``folder``, sorted."""
    return sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".txt"))


def _read_gt_file(path: str) -> list[tuple[str, list[float], bool]]:
    """``(class, [x1, y1, x2, y2], difficult)`` for each box of a ground-truth file."""
    boxes = []
    for n, tok in _read_lines(path):
        if len(tok) == 6 and tok[5] == "difficult":
            boxes.append((tok[0], _floats(tok[1:5], path, n), True))
        elif len(tok) == 5:
            boxes.append((tok[0], _floats(tok[1:5], path, n), False))
        else:
            raise ValueError(
                f"{path}, line {n}: expected 'class x1 y1 x2 y2 [difficult]', got {tok}"
            )
    return boxes


def _read_det_file(path: str) -> list[tuple[str, float, list[float]]]:
    """``(class, score, [x1, y1, x2, y2])`` for each line of a detection file (none if absent)."""
    if not os.path.isfile(path):
        return []
    dets = []
    for n, tok in _read_lines(path):
        if len(tok) != 6:
            raise ValueError(f"{path}, line {n}: expected 'class score x1 y1 x2 y2', got {tok}")
        values = _floats(tok[1:6], path, n)
        dets.append((tok[0], values[0], values[1:]))
    return dets


def _image_ids_of_folder(root: str) -> list[str]:
    """Sorted ids of the GT files under ``root``, after checking the folder's layout."""
    gt_dir, det_dir = os.path.join(root, GT_DIR), os.path.join(root, DET_DIR)
    if not os.path.isdir(gt_dir):
        raise FileNotFoundError(f"ground-truth folder not found: {gt_dir}")
    if not os.path.isdir(det_dir):
        raise FileNotFoundError(
            f"detection-results folder not found: {det_dir} (images without detections need "
            "an empty file there, not a missing folder)"
        )
    gt_ids = _txt_ids(gt_dir)
    orphans = sorted(set(_txt_ids(det_dir)) - set(gt_ids))
    if orphans:
        missing = os.path.join(gt_dir, orphans[0] + ".txt")
        raise FileNotFoundError(f"detection file without ground truth, missing: {missing}")
    return gt_ids


def read_folder(input_dir: str | os.PathLike[str]) -> MeanAPAccumulator:
    """Load a ``ground-truth/`` + ``detection-results/`` folder into an accumulator.

    Images are added in sorted id order; class indices are assigned in sorted name order over
    every class seen in either folder.

    Args:
        input_dir: Folder holding ``ground-truth/`` and ``detection-results/``.

    Raises:
        FileNotFoundError: A folder is missing, or a detection file has no GT file.
        ValueError: A malformed line (the message names the file and the 1-based line).
    """
    root = os.fspath(input_dir)
    parsed = [
        (
            image_id,
            _read_gt_file(os.path.join(root, GT_DIR, image_id + ".txt")),
            _read_det_file(os.path.join(root, DET_DIR, image_id + ".txt")),
        )
        for image_id in _image_ids_of_folder(root)
    ]
    names = sorted(
        {g[0] for _, gts, _ in parsed for g in gts} | {d[0] for *_, ds in parsed for d in ds}
    )
    index = {name: i for i, name in enumerate(names)}
    acc = MeanAPAccumulator(names)
    for image_id, gts, dets in parsed:
        image = image_detections(
            image_id,
            [g[1] for g in gts],
            [index[g[0]] for g in gts],
            [g[2] for g in gts],
            [d[2] for d in dets],
            [index[d[0]] for d in dets],
            [d[1] for d in dets],
        )
        acc.add(image)
    return acc


def evaluate_folder(
    input_dir: str | os.PathLike[str], iou_threshold: float = 0.5, use_11_point: bool = False
) -> MeanAPResult:
    """Evaluate a ``ground-truth/`` + ``detection-results/`` folder (format in the module doc).

    Args:
        input_dir: Folder holding ``ground-truth/`` and ``detection-results/``.
        iou_threshold: Minimum IoU (+1-pixel convention) for a match.
        use_11_point: VOC2007 11-point AP instead of all-point AP.
    """
    return read_folder(input_dir).compute(iou_threshold=iou_threshold, use_11_point=use_11_point)


def _fmt(value: float) -> str:
    """Shortest text that reads back as the same float64 (so files round-trip exactly)."""
    return repr(float(value))


def write_tool_files(
    output_dir: str | os.PathLike[str],
    image: ImageDetections,
    idx_to_class: Sequence[str] | Mapping[int, str],
) -> tuple[str, str]:
    """Write one image's ``ground-truth/<id>.txt`` and ``detection-results/<id>.txt``.

    Numbers are written with full float64 precision, so evaluating the folder gives exactly the
    result of evaluating the same arrays in memory. The detection file is always written, empty
    when there are no detections. (GT padding rows were already dropped by
    :func:`image_detections`.)

    Args:
        output_dir: Folder in which ``ground-truth/`` and ``detection-results/`` are created.
        image: The image's data; ``str(image.image_id)`` is the file stem and must not contain
            path separators or whitespace.
        idx_to_class: Class index -> name (names without whitespace).

    Returns:
        Paths of the GT file and the detection file.
    """
    image_id = str(image.image_id)
    if not image_id or image_id in {".", ".."} or any(c in image_id for c in "/\\ \t\n"):
        raise ValueError(f"image id not usable as a file name: {image_id!r}")
    names = _class_map(idx_to_class)
    for name in names.values():
        if not name or any(c.isspace() for c in name):
            raise ValueError(f"class names must be non-empty without whitespace: {name!r}")

    gt = zip(
        image.gt_boxes.tolist(), image.gt_classes.tolist(), image.gt_difficult.tolist(), strict=True
    )
    gt_lines = [
        " ".join([names[c], *map(_fmt, box)]) + (" difficult" if diff else "")
        for box, c, diff in gt
    ]
    det = zip(
        image.det_boxes.tolist(), image.det_classes.tolist(), image.det_scores.tolist(), strict=True
    )
    det_lines = [" ".join([names[c], _fmt(s), *map(_fmt, box)]) for box, c, s in det]

    paths = []
    for sub, lines in ((GT_DIR, gt_lines), (DET_DIR, det_lines)):
        folder = os.path.join(os.fspath(output_dir), sub)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, image_id + ".txt")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("".join(line + "\n" for line in lines))
        paths.append(path)
    return paths[0], paths[1]


# ----------------------------------------------------------------------------------------------
# COCO-style metrics and COCO JSON (through pycocotools)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CocoImageInfo:
    """An image's COCO ``images`` entry besides its id: file name relative to the image folder
    and size in pixels (the pixels its boxes are in)."""

    file_name: str
    width: int
    height: int


@dataclass(frozen=True)
class CocoResult:
    """pycocotools' evaluation of one COCO ground truth and results list.

    Attributes:
        stats: The 12 ``COCOeval.stats`` by name (:data:`COCO_STATS`), in ``[0, 1]``, or ``-1``
            where pycocotools has no GT box to score (e.g. no small object).
        summary: pycocotools' own 12-line summary (``Average Precision (AP) @[ IoU=0.50:0.95
            | area= all | maxDets=100 ] = 0.xxx`` and the rest).
    """

    stats: dict[str, float]
    summary: str


def _coco_bbox(box: Sequence[float], what: str, image_id: Hashable, row: int) -> list[float]:
    """``(x1, y1, x2, y2)`` -> ``[x1, y1, w, h]``; ``ValueError`` naming a non-finite box."""
    if not all(math.isfinite(v) for v in box):
        raise ValueError(f"image {image_id!r}: {what} box {row} is not finite: {list(box)}")
    x1, y1, x2, y2 = box
    return [x1, y1, x2 - x1, y2 - y1]


def to_coco(
    images: Sequence[ImageDetections],
    class_names: Sequence[str] | Mapping[int, str],
    image_info: Mapping[Hashable, CocoImageInfo] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Images as a COCO instances dict (GT) and a COCO results list (detections).

    The mapping is the module docstring's. Both are plain JSON-able Python values, exactly
    what :func:`write_coco_files` writes and :func:`coco_evaluate` scores.

    Args:
        images: One record per image (:func:`image_detections`); ``str(image_id)`` unique.
        class_names: Class index -> name, as a list or a dict.
        image_info: Optional ``{image_id: CocoImageInfo}``; images without an entry get their
            id as ``file_name`` and no size.

    Returns:
        ``(ground_truth, detections)``: ``{"images", "annotations", "categories"}`` and a list
        of ``{"image_id", "category_id", "bbox", "score"}``.

    Raises:
        ValueError: Two images with the same ``str(image_id)``, or a non-finite box.
    """
    names = _class_map(class_names)
    category = {name: k for k, name in enumerate(sorted(names.values()), start=1)}
    cat_of = {index: category[name] for index, name in names.items()}
    ordered = sorted(images, key=lambda im: str(im.image_id))
    stems = [str(im.image_id) for im in ordered]
    if len(set(stems)) != len(stems):
        repeated = next(s for s, t in zip(stems, stems[1:], strict=False) if s == t)
        raise ValueError(f"two images have the id {repeated!r}")
    info = image_info or {}
    gt_classes = {int(c) for im in ordered for c in im.gt_classes.tolist()}
    coco_images, annotations, results = [], [], []
    for number, im in enumerate(ordered, start=1):
        entry: dict[str, Any] = {"id": number, "file_name": str(im.image_id)}
        if im.image_id in info:
            meta = info[im.image_id]
            entry.update(file_name=meta.file_name, width=int(meta.width), height=int(meta.height))
        coco_images.append(entry)
        gt = zip(
            im.gt_boxes.tolist(), im.gt_classes.tolist(), im.gt_difficult.tolist(), strict=True
        )
        for row, (box, c, difficult) in enumerate(gt):
            bbox = _coco_bbox(box, "GT", im.image_id, row)
            annotations.append({
                "id": len(annotations) + 1, "image_id": number, "category_id": cat_of[c],
                "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": int(difficult),
            })  # fmt: skip
        det = zip(
            im.det_boxes.tolist(), im.det_classes.tolist(), im.det_scores.tolist(), strict=True
        )
        for row, (box, c, score) in enumerate(det):
            bbox = _coco_bbox(box, "detection", im.image_id, row)
            if c in gt_classes:
                results.append({"image_id": number, "category_id": cat_of[c], "bbox": bbox,
                                "score": score})  # fmt: skip
    categories = [{"id": k, "name": name} for name, k in category.items()]
    return {"images": coco_images, "annotations": annotations, "categories": categories}, results


def _pycocotools() -> tuple[type, type]:
    """``(COCO, COCOeval)``; ``ModuleNotFoundError`` saying ``pip install pycocotools``."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise ModuleNotFoundError(PYCOCOTOOLS_MISSING) from None
    return COCO, COCOeval


def coco_evaluate(ground_truth: Mapping[str, Any], detections: Sequence[Any]) -> CocoResult:
    """Score COCO results against a COCO instances dict with pycocotools' ``COCOeval`` (bbox).

    The inputs are copied (pycocotools annotates them in place). Detections are loaded with
    ``COCO.loadRes``; an empty list, which ``loadRes`` cannot take, is an empty results set, so
    every class with GT scores 0. pycocotools' progress messages are silenced.

    Args:
        ground_truth: ``{"images", "annotations", "categories"}`` (e.g. from :func:`to_coco`).
        detections: ``[{"image_id", "category_id", "bbox", "score"}, ...]``.

    Raises:
        ModuleNotFoundError: pycocotools is not installed (the message says how to install it).
    """
    coco_cls, coco_eval_cls = _pycocotools()
    with contextlib.redirect_stdout(io.StringIO()):
        gt = coco_cls()
        gt.dataset = copy.deepcopy(dict(ground_truth))
        gt.createIndex()
        if detections:
            dt = gt.loadRes(copy.deepcopy(list(detections)))
        else:
            dt = coco_cls()
            dt.dataset = {key: copy.deepcopy(gt.dataset[key]) for key in ("images", "categories")}
            dt.dataset["annotations"] = []
            dt.createIndex()
        evaluator = coco_eval_cls(gt, dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        evaluator.summarize()
    stats = {name: float(v) for name, v in zip(COCO_STATS, evaluator.stats, strict=True)}
    return CocoResult(stats=stats, summary=text.getvalue().rstrip("\n"))


def write_coco_files(
    output_dir: str | os.PathLike[str],
    ground_truth: Mapping[str, Any],
    detections: Sequence[Any],
) -> tuple[str, str]:
    """Write ``ground_truth.json`` (COCO instances) and ``detections.json`` (COCO results).

    Each file is written atomically (:func:`eecs598.files.atomic_write`); both load unchanged
    with ``pycocotools.coco.COCO(path)`` and ``COCO.loadRes(path)`` (``loadRes`` needs at
    least one detection) and in FiftyOne.

    Returns:
        Paths of the two files.
    """
    paths = []
    for name, data in ((GT_JSON, ground_truth), (DET_JSON, list(detections))):
        path = os.path.join(os.fspath(output_dir), name)
        with atomic_write(path, mode="w", encoding="utf-8") as handle:
            json.dump(data, handle, allow_nan=False)
        paths.append(path)
    return paths[0], paths[1]


# ----------------------------------------------------------------------------------------------
# Plot and command line
# ----------------------------------------------------------------------------------------------


def plot_ap(result: MeanAPResult, path: str | os.PathLike[str] | None = None) -> Figure:
    """Horizontal bar chart of the per-class APs (lowest at the bottom), titled with the mAP.

    Built on a bare ``Figure`` (no pyplot state), so it works headless; in a notebook the
    returned figure displays itself.

    Args:
        result: An evaluation result.
        path: When given, the chart is also saved there (PNG by extension).

    Returns:
        The matplotlib ``Figure``.
    """
    from matplotlib.figure import Figure

    items = sorted(result.ap.items(), key=lambda kv: (kv[1], kv[0]))
    names = [k for k, _ in items]
    values = np.array([v for _, v in items], dtype=np.float64)
    fig = Figure(figsize=(8.0, max(2.5, 0.3 * len(items) + 1.2)))
    ax = fig.add_subplot(1, 1, 1)
    ax.barh(np.arange(len(items)), values, color="royalblue")
    ax.set_yticks(np.arange(len(items)), labels=names)
    for y, v in enumerate(values):
        ax.text(min(v + 0.01, 0.9), y, f"{100.0 * v:.2f}%", va="center", fontsize=8)
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("Average Precision")
    mode = "11-point" if result.use_11_point else "all-point"
    ax.set_title(f"mAP = {100.0 * result.map:.2f}% ({mode}, IoU >= {result.iou_threshold:g})")
    fig.tight_layout()
    if path is not None:
        fig.savefig(os.fspath(path), dpi=100)
    return fig


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; prints the per-class APs and the mAP (and, with ``--coco``,
    pycocotools' summary). Returns the exit code: 1 with one ``error:`` line on stderr."""
    parser = argparse.ArgumentParser(
        prog="python -m eecs598.mean_ap",
        description="PASCAL VOC mAP of a ground-truth/ + detection-results/ folder.",
    )
    parser.add_argument("input_dir", help="folder holding ground-truth/ and detection-results/")
    parser.add_argument(
        "--11-point", dest="use_11_point", action="store_true", help="VOC2007 11-point AP"
    )
    parser.add_argument("--iou", type=float, default=0.5, help="IoU threshold (default 0.5)")
    parser.add_argument("--plot", default=None, help="write a per-class AP bar chart (PNG)")
    parser.add_argument(
        "--coco",
        action="store_true",
        help="also print COCO-style AP/AR of the same files (needs pycocotools)",
    )
    _add_error_arguments(parser)
    args = parser.parse_args(argv)
    try:
        accumulator = read_folder(args.input_dir)
        result = accumulator.compute(iou_threshold=args.iou, use_11_point=args.use_11_point)
        coco = accumulator.compute_coco() if args.coco else None
    except (FileNotFoundError, ValueError, ModuleNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(result.summary())
    if coco is not None:
        print(coco.summary)
    if args.plot:
        plot_ap(result, args.plot)
    return _report_errors(args, result, accumulator.idx_to_class)


def _add_error_arguments(parser: argparse.ArgumentParser) -> None:
    """The error-analysis flags of :func:`main`."""
    parser.add_argument(
        "--errors", action="store_true", help="also print the TIDE error breakdown at IoU 0.5"
    )
    parser.add_argument(
        "--plot-dir", default=None, help="write the error analysis' pictures and files here"
    )
    parser.add_argument(
        "--score-thresh", type=float, default=None,
        help="score threshold of the confusion matrix and per-image counts (default: "
        "eecs598.errors.DEFAULT_SCORE_THRESH, 0.25)",
    )  # fmt: skip


def _report_errors(
    args: argparse.Namespace, result: MeanAPResult, class_names: Mapping[int, str]
) -> int:
    """Print (and with ``--plot-dir`` write) the error analysis; the exit code. Imported here:
    :mod:`eecs598.errors` builds on this module."""
    if not (args.errors or args.plot_dir):
        return 0
    from .errors import analyse_errors, best_f1, f1_text, write_error_report

    print()
    try:
        if args.plot_dir:
            given = {} if args.score_thresh is None else {"score_thresh": args.score_thresh}
            write_error_report(result.images, class_names, args.plot_dir, **given)
            print(f"Error analysis written to {args.plot_dir}")
        else:
            analysis = analyse_errors(result.images, class_names)
            print(analysis.breakdown.table())
            print(f1_text(*best_f1(analysis)))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
