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

COCO-style metrics (AP@[.5:.95] and the rest, by pycocotools itself) of the same records:
:mod:`eecs598.coco_metrics` (:func:`to_coco`, :func:`coco_evaluate`,
:meth:`MeanAPAccumulator.compute_coco`).

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
import os
import sys
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .coco_metrics import (
    COCO_STATS,
    PYCOCOTOOLS_MISSING,
    CocoImageInfo,
    CocoResult,
    coco_evaluate,
    to_coco,
    write_coco_files,
)
from .matching import (
    FP,
    IGNORED,
    INTERPOLATIONS,
    TP,
    FlatArrays,
    ImageDetections,
    average_precision,
    check_image,
    class_map,
    image_detections,
    interpolated_ap,
    match_class,
)
from .utils import to_numpy

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "COCO_STATS",
    "INTERPOLATIONS",
    "PYCOCOTOOLS_MISSING",
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


def _match_class(rows: FlatArrays, iou_threshold: float) -> tuple[np.ndarray, np.ndarray, int]:
    """TP/FP flags of one class's detections (:func:`match_class`).

    Returns:
        ``(tp, fp, n_ignored)``: ``(D,)`` bool flags and the count of ignored detections.
    """
    outcome, _ = match_class(rows, iou_threshold)
    return outcome == TP, outcome == FP, int(np.count_nonzero(outcome == IGNORED))


def _evaluate(
    flat: FlatArrays,
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
        self.idx_to_class = class_map(class_names)
        self._images: list[ImageDetections] = []
        self._ids: set[Hashable] = set()

    def __len__(self) -> int:
        """Number of images added so far."""
        return len(self._images)

    def add(self, image: ImageDetections) -> None:
        """Add one image's GT boxes and detections (made by :func:`image_detections`).

        Raises:
            ValueError: The id was added before, or a class index is not a key of
                ``class_names``; nothing is added then.
        """
        check_image(image, self.idx_to_class, self._ids)
        self._ids.add(image.image_id)
        self._images.append(image)

    def compute(self, iou_threshold: float = 0.5, use_11_point: bool = False) -> MeanAPResult:
        """Evaluate everything added so far (see the module docstring for the protocol).

        Args:
            iou_threshold: Minimum IoU (+1-pixel convention) for a match, in ``[0, 1]``.
            use_11_point: VOC2007 11-point AP instead of all-point AP.
        """
        flat = FlatArrays.concat(self._images)
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
    names = class_map(idx_to_class)
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
    """Print (and with ``--plot-dir`` write) the error analysis; the exit code. Imported here,
    so that the evaluation alone does not load it (it builds on :mod:`eecs598.matching`, not on
    this module)."""
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
