"""Error analysis of a VOC evaluation: why the mAP is what it is.

Four views of the evaluation that :mod:`eecs598.mean_ap` scores (same matching, difficult boxes
as ignore regions), each pointing at a part of the detector:

1. **The TIDE breakdown** (Bolya et al., "TIDE: A General Toolbox for Identifying Object
   Detection Errors", ECCV 2020; :func:`analyse_errors`): for each error type, the AP@0.5 an
   oracle that fixes it would add (dAP, in AP points). ``Loc`` points at box regression,
   ``Miss`` at the RPN and its anchors, ``Cls`` at the classifier, ``Dupe`` at NMS.
2. **A confusion matrix** over the classes plus background (:func:`confusion_matrix`).
3. **Precision-recall curves and F1 against the score threshold**, per class and over all
   classes, with the threshold of best F1 (:func:`best_f1`): the value for ``predict --conf``.
4. **Per image** counts and a gallery of the worst images (:func:`per_image_counts`,
   :func:`plot_worst_images`).

:func:`write_error_report` writes them all into a run folder; ``python -m eecs598.mean_ap DIR
--errors`` prints the breakdown of a folder of the mAP tool's files.

The TIDE definitions, at foreground IoU ``fg`` (0.5) and background IoU ``bg`` (0.1). The
detections of each class that has a non-difficult GT box (the classes the VOC mAP averages)
are matched exactly as by the VOC evaluator (:func:`eecs598.matching.match_class`): true
positive, false positive, or ignored (its best box is difficult: no error). Each false positive
gets the first type that applies, its IoUs taken with the non-difficult GT boxes of its image
(0 where boxes do not overlap):

- ``Loc``: best IoU with a box of its class in ``[bg, fg]``: right class, box off.
- ``Cls``: IoU ``>= fg`` with a box of another class: right box, wrong class.
- ``Dupe``: IoU ``>= fg`` with a box of its class that a higher-scoring detection took.
- ``Bkg``: IoU ``<= bg`` with every box (and every detection in an image without boxes).
- ``Both``: anything else (IoU in ``(bg, fg)`` with a box of another class).
- ``Miss``: a non-difficult GT box that no detection took and no ``Cls`` or ``Loc`` error
  points at.

What the oracle does, each type fixed alone, starting from the same evaluation:

- ``Cls``, ``Loc``: each GT box that no detection took goes to the highest-scoring error
  pointing at it (ties: the first in input order; ``Cls`` and ``Loc`` errors compete for the
  same box), which becomes a true positive at its score (for ``Cls``, of the box's class);
  every other error of the type, a duplicate at best, is removed.
- ``Both``, ``Dupe``, ``Bkg``: the errors are removed.
- ``Miss``: the missed boxes leave the GT count.
- ``FalsePos`` (special): every true positive ranked above every false positive (perfect
  precision at the same recall).
- ``FalseNeg`` (special): every box no detection took leaves the GT count (perfect recall).

dAP is the fixed mAP minus the mAP, in AP points, for the main types never below 0. A class
that a fix leaves with neither GT boxes nor detections drops out of the mean, one with
detections but no GT box scores 0 (as in TIDE). What users see is computed with the all-point
interpolation, so it adds up against the VOC table's mAP; ``interpolation="101-point"`` gives
COCO's, the one TIDE reports (``tidecv`` 1.0.1 is the tests' reference). Where this differs from
``tidecv``: matching is the VOC evaluator's (a detection's best box, or a duplicate; ``tidecv``
takes the best box still free), difficult boxes are the evaluator's ignore regions (``tidecv``
uses COCO crowd regions), detections of classes without GT are ignored, and there is no
100-detection cap per image.

Edge cases: no detections (every box a ``Miss``), images without GT (``Bkg``), classes whose
boxes are all difficult (left out, named in ``skipped_classes``), classes with no GT box
(their detections ignored, named in ``absent_classes``), no scored class at all (every value
0). Tied scores keep input order (image order, then row order), as in the evaluator.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from .files import atomic_write
from .matching import (
    FP,
    INTERPOLATIONS,
    TP,
    FlatArrays,
    ImageDetections,
    PaddedByImage,
    check_image,
    class_map,
    interpolated_ap,
    iou_chunks,
    match_class,
)
from .settings import PredictSettings

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "DEFAULT_SCORE_THRESH",
    "ERROR_TYPES",
    "FP_TYPES",
    "PER_IMAGE_COLUMNS",
    "SPECIAL_TYPES",
    "TYPE_COLORS",
    "BestF1",
    "Confusion",
    "ErrorAnalysis",
    "ErrorBreakdown",
    "analyse_errors",
    "best_f1",
    "confusion_matrix",
    "f1_curve",
    "f1_text",
    "per_image_counts",
    "plot_confusion",
    "plot_error_breakdown",
    "plot_pr_curves",
    "plot_worst_images",
    "pr_curves",
    "worst_images",
    "write_error_report",
]

#: The false-positive types, in TIDE's order; a detection's ``kind`` is its index here.
FP_TYPES: tuple[str, ...] = ("Cls", "Loc", "Both", "Dupe", "Bkg")
#: TIDE's main error types (the false-positive types, then missed GT boxes).
ERROR_TYPES: tuple[str, ...] = (*FP_TYPES, "Miss")
#: TIDE's special error types: all false positives, all false negatives.
SPECIAL_TYPES: tuple[str, ...] = ("FalsePos", "FalseNeg")
#: ``kind`` of a true positive, of a detection matched to a difficult box, of one not scored.
KIND_TP, KIND_IGNORED, KIND_UNSCORED = len(FP_TYPES), -1, -2
CLS, LOC, BOTH, DUPE, BKG = range(len(FP_TYPES))

#: One colour per outcome, shared by every picture.
TYPE_COLORS: dict[str, str] = {
    "TP": "#2ca02c", "Cls": "#9467bd", "Loc": "#ff7f0e", "Both": "#8c564b", "Dupe": "#e377c2",
    "Bkg": "#d62728", "Miss": "#1f77b4", "FalsePos": "#7f7f7f", "FalseNeg": "#17becf",
}  # fmt: skip
#: Score threshold of the confusion matrix, the per-image counts and the gallery: the
#: detections a user keeps, ``predict``'s ``--conf`` (defined once, in the settings).
DEFAULT_SCORE_THRESH: float = PredictSettings().conf


# ----------------------------------------------------------------------------------------------
# Matching and typing
# ----------------------------------------------------------------------------------------------


def _validated(
    images: Sequence[ImageDetections], class_names: Sequence[str] | Mapping[int, str]
) -> tuple[FlatArrays, dict[int, str]]:
    """The images' rows concatenated (input order) and the class map, after the checks every
    evaluation makes (:func:`~eecs598.matching.check_image`: known class indices, unique ids)."""
    idx_to_class, seen = class_map(class_names), set()
    for image in images:
        check_image(image, idx_to_class, seen)
        seen.add(image.image_id)
    return FlatArrays.concat(list(images)), idx_to_class


def _dense(codes: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Position of each class index of ``codes (N,)`` in ``known (K,)``, ``-1`` if absent."""
    if known.size == 0:
        return np.full(codes.shape[0], -1, dtype=np.int64)
    order = np.argsort(known)
    at = np.minimum(np.searchsorted(known[order], codes), known.size - 1)
    return np.where(known[order][at] == codes, order[at], -1)


def _fp_types(
    iou: np.ndarray, same: np.ndarray, taken: np.ndarray, fg: float, bg: float
) -> tuple[np.ndarray, np.ndarray]:
    """TIDE type of false positives from their IoUs with the GT boxes of their images.

    Args:
        iou: ``(n, G)`` IoU with each (padded) non-difficult GT box, ``0`` for no overlap and
            for padding.
        same: ``(n, G)`` bool, the box is of the detection's class.
        taken: ``(n, G)`` bool, a true positive took the box.
        fg: Foreground IoU. bg: Background IoU.

    Returns:
        ``(kind, column)``: ``(n,)`` int8 index into :data:`FP_TYPES`, ``(n,)`` int64 the box
        a ``Loc`` or ``Cls`` error points at (first on ties), ``-1`` for other types.
    """
    rows = np.arange(iou.shape[0])
    same_iou = np.where(same, iou, 0.0)
    other_iou = np.where(same, 0.0, iou)
    same_col, other_col = same_iou.argmax(axis=1), other_iou.argmax(axis=1)
    same_max, other_max = same_iou[rows, same_col], other_iou[rows, other_col]
    dupe_max = np.where(same & taken, iou, 0.0).max(axis=1, initial=0.0)
    kind = np.select(
        [(bg <= same_max) & (same_max <= fg), other_max >= fg, dupe_max >= fg,
         iou.max(axis=1, initial=0.0) <= bg],
        [LOC, CLS, DUPE, BKG], BOTH,
    ).astype(np.int8)  # fmt: skip
    column = np.select([kind == LOC, kind == CLS], [same_col, other_col], -1)
    return kind, column


def _type_false_positives(
    flat: FlatArrays, gt_pos: np.ndarray, kind: np.ndarray, gt_taken: np.ndarray,
    fg: float, bg: float,
) -> np.ndarray:  # fmt: skip
    """Set the TIDE type of every false positive in ``kind (D,)`` (in place; they start as
    ``Bkg``) and return ``(D,)`` int64 the sorted-GT row each ``Loc``/``Cls`` error points at.

    Args:
        flat: Sorted rows (:meth:`FlatArrays.sorted`). gt_pos: ``(G,)`` input position of
            each GT row. kind: ``(D,)`` int8. gt_taken: ``(G,)`` bool, a true positive took it.
        fg: Foreground IoU. bg: Background IoU.
    """
    target = np.full(kind.shape[0], -1, dtype=np.int64)
    fps = np.flatnonzero(kind == BKG)
    rows = np.flatnonzero(~flat.gt_difficult)
    rows = rows[np.argsort(gt_pos[rows], kind="stable")]  # by image, row order within
    if rows.size == 0 or fps.size == 0:
        return target
    table = PaddedByImage.build(flat.gt_img[rows], flat.gt_boxes[rows])
    index = np.zeros(table.valid.shape, dtype=np.int64)
    index[table.valid] = rows  # the sorted-GT row of every table entry
    pos, with_gt = table.rows_of(flat.det_img[fps])
    for sel in iou_chunks(with_gt, table.boxes.shape[1]):
        det, gt = fps[sel], index[pos[sel]]
        valid = table.valid[pos[sel]]
        iou = np.maximum(table.iou(flat.det_boxes[det], pos[sel]), 0.0)
        same = valid & (flat.gt_classes[gt] == flat.det_classes[det][:, None])
        kinds, column = _fp_types(iou, same, valid & gt_taken[gt], fg, bg)
        kind[det] = kinds
        target[det] = np.where(column >= 0, gt[np.arange(det.size), column], -1)
    return target


def _oracle_winners(
    kind: np.ndarray, target: np.ndarray, gt_taken: np.ndarray, scores: np.ndarray,
    det_pos: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Which ``Cls``/``Loc`` errors an oracle turns into true positives.

    Args:
        kind: ``(D,)`` int8. target: ``(D,)`` GT row each error points at (``-1``: none).
        gt_taken: ``(G,)`` bool. scores: ``(D,)``. det_pos: ``(D,)`` input positions.

    Returns:
        ``(winner, pointed)``: ``(D,)`` bool, the highest-scoring error (first in input order
        on ties) of each free GT box, and ``(G,)`` bool, the free boxes some error points at
        (not ``Miss``).
    """
    candidates = np.flatnonzero(target >= 0)
    candidates = candidates[~gt_taken[target[candidates]]]
    pointed = np.zeros(gt_taken.shape[0], dtype=bool)
    pointed[target[candidates]] = True
    order = candidates[np.lexsort((det_pos[candidates], -scores[candidates], target[candidates]))]
    first = np.ones(order.shape[0], dtype=bool)
    first[1:] = target[order][1:] != target[order][:-1]
    winner = np.zeros(kind.shape[0], dtype=bool)
    winner[order[first]] = True
    return winner, pointed


def _class_sets(
    flat: FlatArrays, names: Mapping[int, str]
) -> tuple[np.ndarray, list[str], list[str]]:
    """``(scored, skipped, absent)``: ``(K,)`` int64 indices of the classes with a non-difficult
    GT box in sorted name order (those the mAP averages), the names of the classes whose boxes
    are all difficult, and of those without any GT box."""
    with_gt = set(np.unique(flat.gt_classes).tolist())
    counted = set(np.unique(flat.gt_classes[~flat.gt_difficult]).tolist())
    scored = np.array(sorted(counted, key=lambda c: names[c]), dtype=np.int64)
    skipped = sorted(names[c] for c in with_gt - counted)
    absent = sorted(name for c, name in names.items() if c not in with_gt)
    return scored, skipped, absent


def _match_scored(
    flat: FlatArrays, scored: np.ndarray, iou_threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """The VOC evaluator's matching, class by class, of sorted rows.

    Returns:
        ``(kind, taken)``: ``(D,)`` int8 :data:`KIND_TP`, ``BKG`` for a false positive (typed
        later), :data:`KIND_IGNORED`, or :data:`KIND_UNSCORED` for detections of classes not
        in ``scored``; ``(D,)`` int64 the GT row a true positive took (``-1``: none).
    """
    kind = np.full(flat.det_img.shape[0], KIND_UNSCORED, dtype=np.int8)
    taken = np.full(flat.det_img.shape[0], -1, dtype=np.int64)
    for c in scored.tolist():
        gt_rows, det_rows = flat.class_slices(c)
        outcome, gt_index = match_class(flat.take(gt_rows, det_rows), iou_threshold)
        kind[det_rows] = np.select([outcome == TP, outcome == FP], [KIND_TP, BKG], KIND_IGNORED)
        taken[det_rows] = np.where(gt_index >= 0, gt_index + gt_rows.start, -1)
    return kind, taken


# ----------------------------------------------------------------------------------------------
# The breakdown
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ErrorBreakdown:
    """TIDE's dAP per error type (module docstring) and how many errors of each type there are.

    Attributes:
        dap: AP points (``100 x`` AP) the oracle adds, for every name of :data:`ERROR_TYPES`
            and :data:`SPECIAL_TYPES`.
        counts: Detections of each false-positive type; GT boxes for ``Miss``; every false
            positive for ``FalsePos``; every GT box no detection took for ``FalseNeg``.
        map: The mAP as is, in AP points, with ``interpolation``.
        interpolation: ``"all-point"`` (the VOC table's) or another of
            :data:`eecs598.matching.INTERPOLATIONS`.
        iou_threshold: Foreground IoU. background_threshold: Background IoU.
        classes: The scored classes (sorted names). skipped_classes: Classes whose GT boxes
            are all difficult. absent_classes: Classes without any GT box.
    """

    dap: dict[str, float]
    counts: dict[str, int]
    map: float
    interpolation: str
    iou_threshold: float
    background_threshold: float
    classes: list[str]
    skipped_classes: list[str]
    absent_classes: list[str]

    def table(self) -> str:
        """The breakdown as text: a title line, then one ``type dAP count`` row per type."""
        lines = [
            f"TIDE errors at IoU {self.iou_threshold:g} (background {self.background_threshold:g})"
            f", {self.interpolation} AP: mAP {self.map:.2f}, dAP = AP points an oracle adds",
            f"{'type':<10}{'dAP':>8}{'count':>9}",
        ]
        for name in (*ERROR_TYPES, *SPECIAL_TYPES):
            lines.append(f"{name:<10}{self.dap[name]:>8.2f}{self.counts[name]:>9d}")
        for what, names in (("all difficult", self.skipped_classes),
                            ("no GT box", self.absent_classes)):  # fmt: skip
            if names:
                lines.append(f"left out ({what}): {', '.join(names)}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (``metrics.json``, ``errors.json``)."""
        return {
            "dAP": dict(self.dap), "counts": dict(self.counts), "mAP_points": self.map,
            "interpolation": self.interpolation, "iou_threshold": self.iou_threshold,
            "background_threshold": self.background_threshold,
            "skipped_classes": list(self.skipped_classes),
            "absent_classes": list(self.absent_classes),
        }  # fmt: skip


@dataclass(frozen=True, eq=False)
class ErrorAnalysis:
    """Every detection and GT box of an evaluation, matched and typed.

    Rows are in the evaluator's sorted order (:meth:`eecs598.matching.FlatArrays.sorted`:
    detections by class then score, GT by class then image); ``D`` detections, ``G`` GT boxes,
    ``K`` scored classes.

    Attributes:
        flat: The sorted rows. image_ids: The images' ids, in input order (``flat``'s image
            positions index it). class_names: Class index -> name.
        scored: ``(K,)`` class indices of the scored classes, in sorted name order.
        det_class: ``(D,)`` int64 position of each detection's class in ``scored`` (``-1``).
        gt_class: ``(G,)`` int64 the same for GT boxes.
        det_pos: ``(D,)`` input position of each detection (ties keep this order).
        kind: ``(D,)`` int8: index into :data:`FP_TYPES`, :data:`KIND_TP`,
            :data:`KIND_IGNORED` or :data:`KIND_UNSCORED`.
        taken: ``(D,)`` int64 the GT row a true positive took, ``-1`` for the others.
        target: ``(D,)`` int64 the GT row a ``Cls``/``Loc`` error points at, ``-1``.
        winner: ``(D,)`` bool, the ``Cls``/``Loc`` errors the oracle makes true positives.
        gt_taken: ``(G,)`` bool. gt_missed: ``(G,)`` bool, the ``Miss`` errors.
        breakdown: The dAP table.
    """

    flat: FlatArrays
    image_ids: list[Hashable]
    class_names: dict[int, str]
    scored: np.ndarray
    det_class: np.ndarray
    gt_class: np.ndarray
    det_pos: np.ndarray
    kind: np.ndarray
    taken: np.ndarray
    target: np.ndarray
    winner: np.ndarray
    gt_taken: np.ndarray
    gt_missed: np.ndarray
    breakdown: ErrorBreakdown | None = None

    def n_pos(self) -> np.ndarray:
        """``(K,)`` int64 non-difficult GT boxes per scored class."""
        ok = ~self.flat.gt_difficult
        return np.bincount(self.gt_class[ok], minlength=self.scored.shape[0])


def _map_points(
    cls: np.ndarray, scores: np.ndarray, tp: np.ndarray, pos: np.ndarray, n_pos: np.ndarray,
    interpolation: str, ranked: bool,
) -> float:  # fmt: skip
    """Mean AP in AP points of scored detections.

    Args:
        cls: ``(N,)`` class positions in ``[0, K)``. scores: ``(N,)``. tp: ``(N,)`` bool.
        pos: ``(N,)`` input positions (tie order). n_pos: ``(K,)`` GT boxes per class.
        interpolation: How AP is read off each class's curve.
        ranked: The rows of each class are already in score order (ties: ``pos``), as in the
            evaluator's sorted rows: grouping them by class is then enough (a stable sort of
            one key instead of three, which matters at a million detections).

    Returns:
        The mean over the classes with GT boxes or detections (a class without GT boxes
        scores 0); ``0.0`` when there is none.
    """
    order = np.argsort(cls, kind="stable") if ranked else np.lexsort((pos, -scores, cls))
    c, t = cls[order], tp[order]
    bounds = np.searchsorted(c, np.arange(n_pos.shape[0] + 1))
    aps = []
    for k, (lo, hi) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)):
        if n_pos[k] <= 0:
            if hi > lo:
                aps.append(0.0)
            continue
        tp_cum = np.cumsum(t[lo:hi], dtype=np.float64)
        seen = np.arange(1, hi - lo + 1, dtype=np.float64)
        aps.append(interpolated_ap(tp_cum / n_pos[k], tp_cum / seen, interpolation))
    return 100.0 * float(np.mean(aps)) if aps else 0.0


def _fixed_map(a: ErrorAnalysis, fix: str | None, interpolation: str) -> float:
    """The mAP in AP points after the oracle fixes the errors of type ``fix`` (``None``: as
    is); what each fix does is in the module docstring."""
    cls, tp, keep = a.det_class, a.kind == KIND_TP, a.kind >= 0
    scores, n_pos = a.flat.det_scores, a.n_pos()
    if fix in ("Cls", "Loc"):
        mine = a.kind == FP_TYPES.index(fix)
        fixed = mine & a.winner
        keep, tp = keep & (~mine | fixed), tp | fixed
        if fix == "Cls" and fixed.any():
            cls = np.where(fixed, a.gt_class[np.maximum(a.target, 0)], cls)
    elif fix in ("Both", "Dupe", "Bkg"):
        keep = keep & (a.kind != FP_TYPES.index(fix))
    elif fix == "Miss":
        n_pos = n_pos - np.bincount(a.gt_class[a.gt_missed], minlength=n_pos.shape[0])
    elif fix == "FalsePos":
        scores = tp.astype(np.float64)
    elif fix == "FalseNeg":
        n_pos = np.bincount(cls[tp], minlength=n_pos.shape[0])
    elif fix is not None:
        raise ValueError(f"unknown error type {fix!r}")
    ranked = fix not in ("Cls", "FalsePos")  # the others keep each class's score order
    return _map_points(
        cls[keep], scores[keep], tp[keep], a.det_pos[keep], n_pos, interpolation, ranked
    )


def _breakdown(
    a: ErrorAnalysis, interpolation: str, fg: float, bg: float, left_out: tuple[list, list]
) -> ErrorBreakdown:
    """dAP and counts of every type; main types clipped at 0 (a fix never costs AP in TIDE's
    reading: a negative value is an interpolation artefact)."""
    base = _fixed_map(a, None, interpolation)
    dap = {t: max(_fixed_map(a, t, interpolation) - base, 0.0) for t in ERROR_TYPES}
    dap.update({t: _fixed_map(a, t, interpolation) - base for t in SPECIAL_TYPES})
    counts = {t: int(np.count_nonzero(a.kind == k)) for k, t in enumerate(FP_TYPES)}
    counts["Miss"] = int(np.count_nonzero(a.gt_missed))
    counts["FalsePos"] = int(np.count_nonzero((a.kind >= 0) & (a.kind < KIND_TP)))
    counts["FalseNeg"] = int(np.count_nonzero(~a.flat.gt_difficult & ~a.gt_taken))
    return ErrorBreakdown(
        dap=dap, counts=counts, map=base, interpolation=interpolation,
        iou_threshold=float(fg), background_threshold=float(bg),
        classes=[a.class_names[c] for c in a.scored.tolist()],
        skipped_classes=left_out[0], absent_classes=left_out[1],
    )  # fmt: skip


def _check_settings(fg: float, bg: float, interpolation: str) -> None:
    """``ValueError`` naming a threshold outside ``0 <= bg <= fg <= 1`` or an unknown
    interpolation."""
    if not 0.0 <= bg <= fg <= 1.0:
        raise ValueError(f"need 0 <= background_threshold <= iou_threshold <= 1, got {bg} and {fg}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")


def analyse_errors(
    images: Sequence[ImageDetections],
    class_names: Sequence[str] | Mapping[int, str],
    *,
    iou_threshold: float = 0.5,
    background_threshold: float = 0.1,
    interpolation: str = "all-point",
) -> ErrorAnalysis:
    """Match, type and fix every error of an evaluation: TIDE's breakdown (module docstring).

    Args:
        images: The evaluated images (``MeanAPResult.images``, or :func:`image_detections
            <eecs598.matching.image_detections>` records), ids unique.
        class_names: Class index -> name, as a list or a dict.
        iou_threshold: Foreground IoU (TIDE's ``pos_threshold``).
        background_threshold: IoU at or below which a detection is on background.
        interpolation: AP interpolation of the dAP (all-point: the VOC table's).

    Returns:
        An :class:`ErrorAnalysis`; its ``breakdown`` holds the dAP table.

    Raises:
        ValueError: A threshold outside ``0 <= background <= foreground <= 1``, an unknown
            interpolation, an unknown class index or a repeated image id.
    """
    _check_settings(iou_threshold, background_threshold, interpolation)
    flat, names = _validated(images, class_names)
    gt_order, det_order = flat.sort_orders()
    flat = flat.take(gt_order, det_order)
    scored, skipped, absent = _class_sets(flat, names)
    kind, taken = _match_scored(flat, scored, iou_threshold)
    gt_taken = np.zeros(flat.gt_img.shape[0], dtype=bool)
    gt_taken[taken[taken >= 0]] = True
    target = _type_false_positives(
        flat, gt_order, kind, gt_taken, iou_threshold, background_threshold
    )
    winner, pointed = _oracle_winners(kind, target, gt_taken, flat.det_scores, det_order)
    analysis = ErrorAnalysis(
        flat=flat, image_ids=[im.image_id for im in images], class_names=names, scored=scored,
        det_class=_dense(flat.det_classes, scored), gt_class=_dense(flat.gt_classes, scored),
        det_pos=det_order, kind=kind, taken=taken, target=target, winner=winner,
        gt_taken=gt_taken, gt_missed=~flat.gt_difficult & ~gt_taken & ~pointed,
    )  # fmt: skip
    breakdown = _breakdown(
        analysis, interpolation, iou_threshold, background_threshold, (skipped, absent)
    )
    return replace(analysis, breakdown=breakdown)


# ----------------------------------------------------------------------------------------------
# Confusion matrix, F1 and per-image counts
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Confusion:
    """Confusion matrix over the classes plus background, at one IoU and score threshold.

    Detections scored at least ``score_thresh`` are matched to GT boxes of any class by the
    VOC evaluator's greedy matching run class-agnostically (in score order, each takes its
    best-IoU box if that reaches ``iou_threshold`` and is still free). A pair counts in the
    box's row and the detection's column; an unmatched detection in the background row; a GT
    box no detection took in the background column. Detections whose best box is difficult,
    and difficult boxes, are not counted.

    Attributes:
        labels: The class names in index order, then ``"background"``.
        counts: ``(K + 1, K + 1)`` int64, rows the truth, columns the prediction.
        iou_threshold: Match IoU. score_thresh: Lowest score counted.
    """

    labels: list[str]
    counts: np.ndarray
    iou_threshold: float
    score_thresh: float

    def normalised(self) -> np.ndarray:
        """``(K + 1, K + 1)`` float64 rows divided by their sums (a row without any count
        stays 0)."""
        totals = self.counts.sum(axis=1, keepdims=True)
        return self.counts / np.maximum(totals, 1)


def confusion_matrix(
    images: Sequence[ImageDetections],
    class_names: Sequence[str] | Mapping[int, str],
    *,
    iou_threshold: float = 0.5,
    score_thresh: float = DEFAULT_SCORE_THRESH,
) -> Confusion:
    """The :class:`Confusion` of an evaluation's images (rules in its docstring).

    Raises:
        ValueError: ``iou_threshold`` outside ``[0, 1]``, a non-finite ``score_thresh``, an
            unknown class index or a repeated image id.
    """
    if not 0.0 <= iou_threshold <= 1.0 or not np.isfinite(score_thresh):
        raise ValueError(f"need iou_threshold in [0, 1] and a finite score_thresh, got "
                         f"{iou_threshold} and {score_thresh}")  # fmt: skip
    flat, names = _validated(images, class_names)
    keep = flat.det_scores >= score_thresh
    agnostic = FlatArrays(
        flat.gt_img, flat.gt_boxes, np.zeros_like(flat.gt_classes), flat.gt_difficult,
        flat.det_img[keep], flat.det_boxes[keep], np.zeros(int(keep.sum()), np.int64),
        flat.det_scores[keep],
    )  # fmt: skip
    gt_order, det_order = agnostic.sort_orders()
    outcome, taken = match_class(agnostic.take(gt_order, det_order), iou_threshold)
    codes = np.array(sorted(names), dtype=np.int64)
    bg = codes.shape[0]
    truth = _dense(flat.gt_classes[gt_order], codes)
    predicted = _dense(flat.det_classes[keep][det_order], codes)
    free = ~flat.gt_difficult[gt_order]
    free[taken[outcome == TP]] = False
    rows = np.concatenate(
        [truth[taken[outcome == TP]], np.full(int(np.sum(outcome == FP)), bg), truth[free]]
    )
    cols = np.concatenate(
        [predicted[outcome == TP], predicted[outcome == FP], np.full(int(free.sum()), bg)]
    )
    counts = np.bincount(rows * (bg + 1) + cols, minlength=(bg + 1) ** 2).reshape(bg + 1, -1)
    labels = [names[c] for c in codes.tolist()] + ["background"]
    return Confusion(labels, counts.astype(np.int64), float(iou_threshold), float(score_thresh))


@dataclass(frozen=True)
class BestF1:
    """The score threshold of best F1 and the precision and recall there.

    ``threshold`` is ``None`` (and every value 0) where no threshold gives a true positive.
    """

    threshold: float | None
    f1: float
    precision: float
    recall: float


def f1_curve(
    scores: np.ndarray, tp: np.ndarray, n_pos: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 of keeping the detections scored ``>= t``, for each distinct
    score ``t``.

    Args:
        scores: ``(N,)`` in descending order. tp: ``(N,)`` bool. n_pos: GT boxes.

    Returns:
        ``(thresholds, precision, recall, f1)``, each ``(T,)`` float64, thresholds descending.
        F1 is ``2 TP / (TP + FP + n_pos)`` (0 without any true positive).
    """
    last = np.ones(scores.shape[0], dtype=bool)
    last[:-1] = scores[1:] != scores[:-1]  # the end of each run of tied scores
    tp_cum = np.cumsum(tp, dtype=np.float64)[last]
    seen = np.arange(1, scores.shape[0] + 1, dtype=np.float64)[last]
    recall = tp_cum / n_pos if n_pos > 0 else np.zeros_like(tp_cum)
    return scores[last].astype(np.float64), tp_cum / seen, recall, 2 * tp_cum / (n_pos + seen)


def _best(curve: tuple[np.ndarray, ...]) -> BestF1:
    """The highest threshold of largest F1 on an :func:`f1_curve`."""
    thresholds, precision, recall, f1 = curve
    if f1.size == 0 or f1.max() <= 0.0:
        return BestF1(None, 0.0, 0.0, 0.0)
    i = int(np.argmax(f1))
    return BestF1(float(thresholds[i]), float(f1[i]), float(precision[i]), float(recall[i]))


def pr_curves(a: ErrorAnalysis) -> dict[str, tuple[np.ndarray, ...]]:
    """:func:`f1_curve` of each scored class (by name), and of all of them pooled under the
    key ``""`` (every detection of a scored class against every non-difficult box)."""
    scored = np.flatnonzero(a.kind >= 0)
    n_pos = a.n_pos()
    curves = {}
    for k, c in enumerate(a.scored.tolist()):
        rows = scored[a.det_class[scored] == k]  # already in score order
        tp = a.kind[rows] == KIND_TP
        curves[a.class_names[c]] = f1_curve(a.flat.det_scores[rows], tp, int(n_pos[k]))
    pooled = scored[np.lexsort((a.det_pos[scored], -a.flat.det_scores[scored]))]
    tp = a.kind[pooled] == KIND_TP
    curves[""] = f1_curve(a.flat.det_scores[pooled], tp, int(n_pos.sum()))
    return curves


def best_f1(a: ErrorAnalysis) -> tuple[BestF1, dict[str, BestF1]]:
    """``(overall, per class)``: the threshold of best F1 over all scored classes pooled (the
    one value for ``predict --conf``) and for each class."""
    curves = pr_curves(a)
    overall = _best(curves.pop(""))
    return overall, {name: _best(curve) for name, curve in curves.items()}


#: Columns of :func:`per_image_counts` rows and of ``per_image.csv``.
PER_IMAGE_COLUMNS: tuple[str, ...] = ("image_id", "gt", "tp", *FP_TYPES, "missed", "errors")


def per_image_counts(
    a: ErrorAnalysis, score_thresh: float = DEFAULT_SCORE_THRESH
) -> list[dict[str, Any]]:
    """Each image's counts, at a score threshold so that they describe what a user keeps.

    Detections of scored classes scored at least ``score_thresh`` count as true positives or
    by their TIDE type (which does not depend on the threshold); ``missed`` counts the
    non-difficult GT boxes without a true positive at that threshold; ``errors`` is the false
    positives plus ``missed``.

    Returns:
        One dict per image, in input order, with the keys :data:`PER_IMAGE_COLUMNS`.
    """
    n = len(a.image_ids)
    kinds = KIND_TP + 1
    shown = (a.kind >= 0) & (a.flat.det_scores >= score_thresh)
    by_kind = np.bincount(
        a.flat.det_img[shown] * kinds + a.kind[shown], minlength=n * kinds
    ).reshape(n, kinds)
    boxes = np.bincount(a.flat.gt_img[~a.flat.gt_difficult], minlength=n)
    found = np.bincount(a.flat.gt_img[a.taken[shown & (a.kind == KIND_TP)]], minlength=n)
    missed = boxes - found
    errors = by_kind[:, :KIND_TP].sum(axis=1) + missed
    rows = []
    for i, image_id in enumerate(a.image_ids):
        row = {"image_id": image_id, "gt": int(boxes[i]), "tp": int(by_kind[i, KIND_TP])}
        row.update({t: int(by_kind[i, k]) for k, t in enumerate(FP_TYPES)})
        row.update(missed=int(missed[i]), errors=int(errors[i]))
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Figure:
    """A bare matplotlib ``Figure`` (no pyplot state: works headless, shows in a notebook)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def plot_error_breakdown(breakdown: ErrorBreakdown) -> Figure:
    """Horizontal bars of the dAP of each type (main types, then the two special ones)."""
    names = [*ERROR_TYPES, *SPECIAL_TYPES]
    values = np.array([breakdown.dap[t] for t in names])
    y = np.arange(len(names)) + np.array([0] * len(ERROR_TYPES) + [0.6] * len(SPECIAL_TYPES))
    fig = _figure(7.0, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    ax.barh(y, values, color=[TYPE_COLORS[t] for t in names])
    ax.set_yticks(y, labels=[f"{t} ({breakdown.counts[t]})" for t in names])
    ax.invert_yaxis()
    top = max(float(values.max(initial=0.0)), 1.0)
    for yi, v in zip(y, values, strict=True):
        ax.text(v + 0.01 * top, yi, f"{v:.2f}", va="center", fontsize=8)
    ax.set_xlim(0.0, 1.15 * top)
    ax.set_xlabel("dAP: AP points an oracle fixing the type adds (count in brackets)")
    ax.set_title(f"TIDE errors at IoU {breakdown.iou_threshold:g}: mAP {breakdown.map:.2f} "
                 f"({breakdown.interpolation})")  # fmt: skip
    fig.tight_layout()
    return fig


def plot_confusion(confusion: Confusion) -> Figure:
    """The confusion matrix as counts and row-normalised, side by side."""
    n = len(confusion.labels)
    side = min(3.5 + 0.3 * n, 12.0)
    fig = _figure(2 * side, side)
    tables = ((confusion.counts, "counts", "{:d}"), (confusion.normalised(), "row-normalised",
                                                    "{:.2f}"))  # fmt: skip
    for i, (values, what, fmt) in enumerate(tables):
        ax = fig.add_subplot(1, 2, i + 1)
        image = ax.imshow(values, cmap="Blues", vmin=0)
        ax.set_xticks(np.arange(n), labels=confusion.labels, rotation=45, ha="right")
        ax.set_yticks(np.arange(n), labels=confusion.labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{what} (IoU >= {confusion.iou_threshold:g}, "
                     f"score >= {confusion.score_thresh:g})")  # fmt: skip
        if n <= 25:
            high = values.max(initial=0) / 2
            for (r, c), v in np.ndenumerate(values):
                ax.text(c, r, fmt.format(v), ha="center", va="center", fontsize=7,
                        color="white" if v > high else "black")  # fmt: skip
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def plot_pr_curves(a: ErrorAnalysis) -> Figure:
    """Per class: precision against recall (left) and F1 against the score threshold (right),
    with all classes pooled in black and its best threshold marked."""
    curves = pr_curves(a)
    pooled = curves.pop("")
    fig = _figure(12.0, 5.0)
    pr, f1 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for name, (thresholds, precision, recall, f) in curves.items():
        pr.plot(recall, precision, drawstyle="steps-post", label=name)
        f1.plot(thresholds, f, linewidth=1, label=name)
    f1.plot(pooled[0], pooled[3], color="black", linewidth=2.5, label="all classes")
    best = _best(pooled)
    if best.threshold is not None:
        f1.axvline(best.threshold, color="black", linestyle="--", linewidth=1)
        f1.set_title(f"F1: best {best.f1:.2f} over all classes at score >= {best.threshold:.3f}")
    else:
        f1.set_title("F1: no true positive at any threshold")
    pr.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
           title="precision-recall per class (all detections)")  # fmt: skip
    f1.set(xlabel="score threshold", ylabel="F1", ylim=(0, 1.02))
    f1.legend(fontsize=7, loc="upper left", ncol=1 + len(curves) // 12)
    fig.tight_layout()
    return fig


def _draw_image(ax: Any, a: ErrorAnalysis, i: int, pixels: Any, score_thresh: float) -> None:
    """One gallery panel: image ``i`` with its shown detections in their outcome's colour and
    its boxes missed at ``score_thresh`` dashed."""
    from matplotlib.patches import Rectangle

    from .utils import _image_hwc

    try:
        hwc = _image_hwc(pixels)
    except ValueError as err:
        raise ValueError(f"image {a.image_ids[i]!r}: {err}") from None
    ax.imshow(hwc)
    flat = a.flat
    dets = np.flatnonzero((flat.det_img == i) & (a.kind >= 0) & (flat.det_scores >= score_thresh))
    found = a.taken[dets[a.kind[dets] == KIND_TP]]
    missed = np.flatnonzero((flat.gt_img == i) & ~flat.gt_difficult)
    missed = missed[~np.isin(missed, found)]
    boxes = [(flat.det_boxes[d], "TP" if a.kind[d] == KIND_TP else FP_TYPES[a.kind[d]], "-")
             for d in dets] + [(flat.gt_boxes[g], "Miss", "--") for g in missed]  # fmt: skip
    for (x1, y1, x2, y2), kind, style in boxes:
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, linewidth=2,
                               linestyle=style, edgecolor=TYPE_COLORS[kind]))  # fmt: skip
    ax.set(xlim=(0, hwc.shape[1]), ylim=(hwc.shape[0], 0))  # boxes beyond the image: clipped
    ax.set_axis_off()


def worst_images(rows: Sequence[Mapping[str, Any]], count: int = 8) -> list[int]:
    """Positions of the ``count`` images with the most errors (ties: input order), only
    images with at least one error."""
    order = sorted(range(len(rows)), key=lambda i: (-rows[i]["errors"], i))
    return [i for i in order[:count] if rows[i]["errors"] > 0]


def plot_worst_images(
    a: ErrorAnalysis,
    rows: Sequence[Mapping[str, Any]],
    image_pixels: Callable[[int], Any],
    score_thresh: float = DEFAULT_SCORE_THRESH,
    count: int = 8,
) -> Figure | None:
    """A gallery of the images with most errors (:func:`per_image_counts` ``rows`` at the same
    ``score_thresh``), each box in its outcome's colour, with a legend.

    Args:
        a: The analysis. rows: Its per-image counts.
        image_pixels: Image position (in input order) -> its pixels, ``(H, W, 3)`` or
            ``(3, H, W)``, float in ``[0, 1]`` or uint8, in the pixels the boxes are in.
        score_thresh: Lowest score drawn. count: Most images shown.

    Returns:
        The figure, or ``None`` when no image has an error.
    """
    from matplotlib.lines import Line2D

    chosen = worst_images(rows, count)
    if not chosen:
        return None
    cols = min(4, len(chosen))
    n_rows = -(-len(chosen) // cols)
    fig = _figure(4.0 * cols, 4.4 * n_rows + 0.8)
    for panel, i in enumerate(chosen):
        ax = fig.add_subplot(n_rows, cols, panel + 1)
        _draw_image(ax, a, i, image_pixels(i), score_thresh)
        ax.set_title(f"{a.image_ids[i]}: {rows[i]['errors']} errors", fontsize=9)
    handles = [
        Line2D([], [], color=TYPE_COLORS[k], linewidth=2, linestyle=s, label=k)
        for k, s in [("TP", "-")] + [(t, "-") for t in FP_TYPES] + [("Miss", "--")]
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9)
    fig.suptitle(f"Images with most errors (detections scored >= {score_thresh:g})")
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    return fig


# ----------------------------------------------------------------------------------------------
# Text and the report folder
# ----------------------------------------------------------------------------------------------


def _thresh_text(threshold: float) -> str:
    """The largest multiple of 0.001 below a best-F1 threshold (never below 0), so that the
    detection the threshold was read at stays whatever the rounding."""
    return f"{max(np.ceil(threshold * 1000.0) - 1.0, 0.0) / 1000.0:.3f}"


def f1_text(overall: BestF1, per_class: Mapping[str, BestF1]) -> str:
    """The best-F1 thresholds as text, the overall one as a ``predict --conf`` value."""
    if overall.threshold is None:
        lines = ["Best F1: no threshold gives a true positive, so none to suggest."]
    else:
        lines = [
            f"Best F1 over all classes: {overall.f1:.3f} (precision {overall.precision:.3f}, "
            f"recall {overall.recall:.3f}) at score >= {overall.threshold:.4g}: "
            f"use predict --conf {_thresh_text(overall.threshold)}"
        ]
    for name, best in per_class.items():
        at = "no true positive" if best.threshold is None else (
            f"at score >= {best.threshold:.4g}")  # fmt: skip
        lines.append(f"  {name:<20} F1 {best.f1:.3f} {at}")
    return "\n".join(lines)


def _save_figure(fig: Figure, path: str | os.PathLike[str]) -> None:
    """Write a figure as PNG atomically (:func:`eecs598.files.atomic_write`)."""
    with atomic_write(path, mode="wb") as handle:
        fig.savefig(handle, format="png", dpi=100)


def _write_text(path: str | os.PathLike[str], write: Callable[[Any], None]) -> None:
    """Write a UTF-8 text file atomically through ``write(handle)``."""
    with atomic_write(path, mode="w", encoding="utf-8", newline="") as handle:
        write(handle)


def _write_csv(path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]]) -> None:
    """``per_image.csv``: a header of :data:`PER_IMAGE_COLUMNS`, then one line per image."""

    def write(handle: Any) -> None:
        writer = csv.DictWriter(handle, fieldnames=list(PER_IMAGE_COLUMNS), lineterminator="\n")
        writer.writeheader()
        writer.writerows({**row, "image_id": str(row["image_id"])} for row in rows)

    _write_text(path, write)


def _best_dict(best: BestF1) -> dict[str, Any]:
    """A :class:`BestF1` as JSON-able values."""
    return {"threshold": best.threshold, "f1": best.f1, "precision": best.precision,
            "recall": best.recall}  # fmt: skip


def _gallery(
    a: ErrorAnalysis, rows: Sequence[Mapping[str, Any]],
    image_pixels: Callable[[int], Any] | None, score_thresh: float, path: os.PathLike[str],
) -> list[str]:  # fmt: skip
    """Write ``worst.png`` when image pixels are at hand (else say why not); returns the ids
    of the images shown."""
    if image_pixels is None:
        print("worst.png skipped: no image pixels (an evaluation of tool files has none).")
        return []
    fig = plot_worst_images(a, rows, image_pixels, score_thresh)
    if fig is None:
        print(f"worst.png skipped: no image has an error at score >= {score_thresh:g}.")
        return []
    _save_figure(fig, path)
    return [str(a.image_ids[i]) for i in worst_images(rows)]


def write_error_report(
    images: Sequence[ImageDetections],
    class_names: Sequence[str] | Mapping[int, str],
    out_dir: str | os.PathLike[str],
    *,
    score_thresh: float = DEFAULT_SCORE_THRESH,
    image_pixels: Callable[[int], Any] | None = None,
) -> dict[str, Any]:
    """Analyse an evaluation's errors, print them and write the report into ``out_dir``.

    Prints the TIDE breakdown (IoU 0.5, background 0.1, all-point AP) and the best-F1
    thresholds, and writes, each atomically: ``errors.json`` (everything below as numbers),
    ``errors.png`` (:func:`plot_error_breakdown`), ``confusion.png`` (:func:`plot_confusion`),
    ``pr_curves.png`` (:func:`plot_pr_curves`), ``per_image.csv`` (:func:`per_image_counts`)
    and, with ``image_pixels``, ``worst.png`` (:func:`plot_worst_images`; without, a note).

    Args:
        images: The evaluated images (``MeanAPResult.images``).
        class_names: Class index -> name, as a list or a dict.
        out_dir: Folder for the files (created if needed).
        score_thresh: Score threshold of the confusion matrix, the counts and the gallery.
        image_pixels: Image position -> pixels (:func:`plot_worst_images`), or ``None``.

    Returns:
        The breakdown for ``metrics.json``: :meth:`ErrorBreakdown.to_dict` plus
        ``best_score_thresh``, ``best_f1`` and ``score_thresh``.
    """
    analysis = analyse_errors(images, class_names)
    breakdown = analysis.breakdown
    assert breakdown is not None
    confusion = confusion_matrix(images, class_names, score_thresh=score_thresh)
    overall, per_class = best_f1(analysis)
    rows = per_image_counts(analysis, score_thresh)
    print(breakdown.table())
    print(f1_text(overall, per_class))
    out = os.fspath(out_dir)
    _save_figure(plot_error_breakdown(breakdown), os.path.join(out, "errors.png"))
    _save_figure(plot_confusion(confusion), os.path.join(out, "confusion.png"))
    _save_figure(plot_pr_curves(analysis), os.path.join(out, "pr_curves.png"))
    _write_csv(os.path.join(out, "per_image.csv"), rows)
    shown = _gallery(analysis, rows, image_pixels, score_thresh, os.path.join(out, "worst.png"))
    summary = {**breakdown.to_dict(), "best_score_thresh": overall.threshold,
               "best_f1": overall.f1, "score_thresh": float(score_thresh)}  # fmt: skip
    report = {**summary, "best_f1_per_class": {k: _best_dict(v) for k, v in per_class.items()},
              "best_f1_overall": _best_dict(overall), "confusion_labels": confusion.labels,
              "confusion_counts": confusion.counts.tolist(), "worst_images": shown}  # fmt: skip
    text = json.dumps(report, indent=2, allow_nan=False) + "\n"
    _write_text(os.path.join(out, "errors.json"), lambda handle: handle.write(text))
    return summary
