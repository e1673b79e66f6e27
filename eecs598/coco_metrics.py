"""COCO-style metrics of the evaluators' records, by pycocotools, and the COCO JSON export.

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
- detections of a class without any GT box are left out (ignored, as the VOC evaluator does);
  detections
  become ``{"image_id", "category_id", "bbox", "score"}``.

Boxes must be finite (``ValueError`` naming the image and the row). pycocotools is needed only
here, imported on first use; without it these functions raise ``ModuleNotFoundError`` saying
``pip install pycocotools`` and everything else works. pycocotools gives
``-1`` for a statistic without any GT box (e.g. ``AP_small`` with no small object); COCO's
size ranges (small < 32², medium < 96² px) are in the boxes' own pixels.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .files import atomic_write
from .matching import ImageDetections, class_map

__all__ = [
    "COCO_STATS",
    "DET_JSON",
    "GT_JSON",
    "PYCOCOTOOLS_MISSING",
    "CocoImageInfo",
    "CocoResult",
    "coco_evaluate",
    "to_coco",
    "write_coco_files",
]

GT_JSON = "ground_truth.json"
DET_JSON = "detections.json"

#: Names of pycocotools' 12 ``COCOeval.stats``, in its order (AR1/10/100: at most 1/10/100
#: detections per image; the others at 100).
COCO_STATS: tuple[str, ...] = (
    "AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
    "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large",
)  # fmt: skip
PYCOCOTOOLS_MISSING = "COCO-style metrics need pycocotools: pip install pycocotools"


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
    names = class_map(class_names)
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
