"""Label audit: which labels are likely wrong, scored from a model's out-of-sample detections.

Each image's labels (boxes and classes, in its own pixels) are compared with detections that a
model trained *without* that image made on it (``recipe.audit`` trains the folds). Three kinds
of label error are scored, each in ``[0, 1]``, higher meaning more likely wrong:

* ``missing``: a confident detection where no label is (an overlooked object). Score: the
  detection's score times ``1 - IoU`` with the label it overlaps most (any class).
* ``class``: a label that the model calls another class (a swapped label). A detection
  supports a label by ``score * IoU``; the score is the best support of another class minus
  the best support of the label's own class, at least 0.
* ``location``: a label whose own-class detection sits clearly elsewhere (a badly placed box).
  Score: that detection's score times ``1 - IoU``, for the own-class detection of largest
  support among those overlapping the label by more than ``LOCATION_MIN_IOU``.

The rules were chosen on injected errors (``bench/bench_audit.py``): supports weighted by IoU
rank swapped classes better than a fixed match threshold, and ungated detection scores rank
overlooked objects better than scores cut at a confidence.

An image's score is the largest score of its suspects. The model's detections are the evidence,
so they must be out of sample: a model that trained on an image has learnt its labels, errors
included, and agrees with them.

Boxes are ``(x1, y1, x2, y2)`` float pixels; IoU is torchvision's (continuous coordinates).
The outputs are here too: ``audit.csv``'s rows and the corrections in the data's own format
(VOC XML files, a COCO JSON), written beside the data, never over it. This module is part of
the bottom layer: numpy, torchvision's box IoU and the standard library.
"""

from __future__ import annotations

import csv
import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_iou

from .files import atomic_write

__all__ = [
    "ISSUES",
    "LOCATION_MIN_IOU",
    "ImageScores",
    "pairwise_iou",
    "score_image",
    "Suspect",
    "rank_suspects",
    "CSV_COLUMNS",
    "suspect_rows",
    "write_csv",
    "voc_corrections",
    "coco_corrections",
]

# The kinds of label error, in the order the outputs list them.
ISSUES = ("missing", "class", "location")
# A location suspect's detection overlaps its label by more than this (the same object).
LOCATION_MIN_IOU = 0.1


@dataclass(frozen=True)
class ImageScores:
    """One image's audit (``score_image``); ``L`` labels, ``D`` detections.

    Attributes:
        missing: ``(D,)`` the missing-label score of each detection.
        label_class: ``(L,)`` the class-error score of each label; ``class_suggestion``
            ``(L,)`` the class the model gives it (its own where no other is seen).
        location: ``(L,)`` the location-error score of each label; ``location_suggestion``
            ``(L,)`` the detection that places it (-1: none).
    """

    missing: np.ndarray
    label_class: np.ndarray
    class_suggestion: np.ndarray
    location: np.ndarray
    location_suggestion: np.ndarray

    @property
    def image_score(self) -> float:
        """The largest score of the image's suspects (0 for an image without any)."""
        parts = (self.missing, self.label_class, self.location)
        return float(max((p.max() for p in parts if len(p)), default=0.0))


def pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(len(a), len(b))`` IoU of two ``(N, 4)`` box arrays (float64; empty gives zeros)."""
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    return box_iou(
        torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    ).numpy()


def score_image(
    label_boxes: np.ndarray,
    label_classes: np.ndarray,
    det_boxes: np.ndarray,
    det_classes: np.ndarray,
    det_scores: np.ndarray,
) -> ImageScores:
    """The three scores of one image's labels and detections (see the module docstring).

    Args:
        label_boxes: ``(L, 4)``; label_classes: ``(L,)`` int, 0-based.
        det_boxes: ``(D, 4)``; det_classes: ``(D,)`` int; det_scores: ``(D,)`` in [0, 1].
    """
    label_classes = np.asarray(label_classes, dtype=np.int64)
    det_classes = np.asarray(det_classes, dtype=np.int64)
    det_scores = np.asarray(det_scores, dtype=np.float64)
    iou = pairwise_iou(np.asarray(label_boxes).reshape(-1, 4), np.asarray(det_boxes).reshape(-1, 4))
    same = label_classes[:, None] == det_classes[None, :]  # (L, D)
    support = det_scores[None, :] * iou  # (L, D): how much each detection backs each label
    missing = det_scores * (1.0 - iou.max(axis=0, initial=0.0))
    label_class, suggestion = _class_scores(support, same, label_classes, det_classes)
    location, pick = _location_scores(support, same, iou, det_scores)
    return ImageScores(missing, label_class, suggestion, location, pick)


def _class_scores(
    support: np.ndarray, same: np.ndarray, label_classes: np.ndarray, det_classes: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(L,)`` class-error scores (best other-class support minus best own-class support, at
    least 0) and ``(L,)`` suggested classes (the best other-class detection's where the score
    is above 0, else the label's own), from ``(L, D)`` supports and same-class flags."""
    other = np.where(same, 0.0, support)
    own = np.where(same, support, 0.0).max(axis=1, initial=0.0)
    score = np.clip(other.max(axis=1, initial=0.0) - own, 0.0, None)
    if not other.size:
        return score, label_classes.copy()
    suggestion = np.where(score > 0, det_classes[other.argmax(axis=1)], label_classes)
    return score, suggestion.astype(np.int64)


def _location_scores(
    support: np.ndarray, same: np.ndarray, iou: np.ndarray, det_scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(L,)`` location-error scores and ``(L,)`` the detection each is measured against
    (-1: none): the own-class detection of largest support among those overlapping the label
    by more than ``LOCATION_MIN_IOU``, its score times ``1 - IoU``."""
    candidates = np.where(same & (iou > LOCATION_MIN_IOU), support, -1.0)
    if not candidates.size:
        return np.zeros(len(iou)), np.full(len(iou), -1, np.int64)
    pick = candidates.argmax(axis=1)
    found = candidates.max(axis=1) >= 0
    rows = np.arange(len(iou))
    score = np.where(found, det_scores[pick] * (1.0 - iou[rows, pick]), 0.0)
    return score, np.where(found, pick, -1).astype(np.int64)


@dataclass(frozen=True)
class Suspect:
    """One suspected label error: ``image`` (index), ``issue`` (one of ``ISSUES``), the label's
    row in its image (``label``, -1 for ``missing``), its class (-1 for ``missing``), the
    suggested class, the box (the label's; the detection's for ``missing``), the suggested box
    (the detection's, for ``location``) and the score."""

    image: int
    issue: str
    label: int
    label_class: int
    suggested_class: int
    box: tuple[float, float, float, float]
    suggested_box: tuple[float, float, float, float] | None
    score: float


def rank_suspects(
    labels: Sequence[tuple[np.ndarray, np.ndarray]],
    detections: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    min_score: float = 0.0,
) -> tuple[list[Suspect], list[ImageScores]]:
    """Every image's suspects scored above ``min_score``, most likely wrong first.

    Args:
        labels: per image ``(boxes (L, 4), classes (L,))``.
        detections: per image ``(boxes (D, 4), classes (D,), scores (D,))``, out of sample.

    Returns:
        ``(suspects, per-image scores)``; ties keep image order.
    """
    if len(labels) != len(detections):
        raise ValueError(f"{len(labels)} images of labels but {len(detections)} of detections")
    suspects, per_image = [], []
    for image, ((lb, lc), (db, dc, ds)) in enumerate(zip(labels, detections, strict=True)):
        scores = score_image(lb, lc, db, dc, ds)
        per_image.append(scores)
        lb, db = np.asarray(lb).reshape(-1, 4), np.asarray(db).reshape(-1, 4)
        for d in np.flatnonzero(scores.missing > min_score):
            suspects.append(Suspect(image, "missing", -1, -1, int(dc[d]), _box(db[d]), None,
                                    float(scores.missing[d])))  # fmt: skip
        for row in range(len(lb)):
            if scores.label_class[row] > min_score:
                suspects.append(Suspect(
                    image, "class", row, int(lc[row]), int(scores.class_suggestion[row]),
                    _box(lb[row]), None, float(scores.label_class[row]),
                ))  # fmt: skip
            if scores.location[row] > min_score:
                pick = scores.location_suggestion[row]
                suspects.append(Suspect(
                    image, "location", row, int(lc[row]), int(lc[row]), _box(lb[row]),
                    _box(db[pick]), float(scores.location[row]),
                ))  # fmt: skip
    suspects.sort(key=lambda s: -s.score)
    return suspects, per_image


def _box(row: np.ndarray) -> tuple[float, float, float, float]:
    """A box row as four plain floats."""
    x1, y1, x2, y2 = (float(v) for v in row)
    return x1, y1, x2, y2


# ---------------------------------------------------------------------------------- outputs

# audit.csv's columns, in order.
CSV_COLUMNS = (
    "image", "issue", "label_class", "suggested_class", "x1", "y1", "x2", "y2",
    "suggested_x1", "suggested_y1", "suggested_x2", "suggested_y2", "score",
)  # fmt: skip


def suspect_rows(
    suspects: Sequence[Suspect], image_names: Sequence[str], class_names: Sequence[str]
) -> list[dict[str, Any]]:
    """``audit.csv``'s rows (``CSV_COLUMNS``): names for images and classes, boxes rounded to
    0.1 px, the class empty for ``missing`` and the suggested box empty but for ``location``."""
    rows = []
    for s in suspects:
        box = [round(v, 1) for v in s.box]
        suggested = [round(v, 1) for v in s.suggested_box] if s.suggested_box else [""] * 4
        rows.append(dict(zip(CSV_COLUMNS, [
            image_names[s.image], s.issue,
            class_names[s.label_class] if s.label_class >= 0 else "",
            class_names[s.suggested_class], *box, *suggested, round(s.score, 4),
        ], strict=True)))  # fmt: skip
    return rows


def write_csv(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> None:
    """``rows`` as ``audit.csv``, written atomically."""
    with atomic_write(path, mode="w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def _closest(boxes: np.ndarray, box: Sequence[float]) -> int:
    """Index of the row of ``boxes`` (K, 4) of largest IoU with ``box`` (-1: none overlaps)."""
    if not len(boxes):
        return -1
    overlap = pairwise_iou(np.asarray(boxes, np.float64), np.asarray([box], np.float64))[:, 0]
    return int(overlap.argmax()) if overlap.max() > 0 else -1


def voc_corrections(
    annotations: Path, out: Path, fixes: dict[str, list[Suspect]], class_names: Sequence[str]
) -> list[Path]:
    """Copies of the VOC XML files of ``fixes``' images (``{image id: suspects}``) in
    ``out`` with each suggestion applied: a ``missing`` box added as a new object, a ``class``
    renamed, a ``location`` box moved. Objects are found by their box (largest IoU); the
    originals are not touched. Returns the files written."""
    written = []
    for image_id, suspects in fixes.items():
        tree = ET.parse(annotations / f"{image_id}.xml")
        root = tree.getroot()
        objects = root.findall("object")
        boxes = np.array([[float(o.find("bndbox").findtext(k)) for k in _VOC_KEYS]
                          for o in objects], np.float64).reshape(-1, 4)  # fmt: skip
        for s in suspects:
            if s.issue == "missing":
                obj = ET.SubElement(root, "object")
                ET.SubElement(obj, "name").text = class_names[s.suggested_class]
                ET.SubElement(obj, "difficult").text = "0"
                _set_voc_box(ET.SubElement(obj, "bndbox"), s.box)
                continue
            index = _closest(boxes, s.box)
            if index < 0:
                continue
            if s.issue == "class":
                objects[index].find("name").text = class_names[s.suggested_class]
            elif s.suggested_box is not None:
                _set_voc_box(objects[index].find("bndbox"), s.suggested_box)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{image_id}.xml"
        with atomic_write(path) as handle:
            tree.write(handle)
        written.append(path)
    return written


_VOC_KEYS = ("xmin", "ymin", "xmax", "ymax")


def _set_voc_box(bndbox: ET.Element, box: Sequence[float]) -> None:
    """Write ``box`` into a ``<bndbox>`` (VOC's whole pixels)."""
    for key, value in zip(_VOC_KEYS, box, strict=True):
        element = bndbox.find(key)
        if element is None:
            element = ET.SubElement(bndbox, key)
        element.text = str(int(round(value)))


def coco_corrections(
    source: Path, out: Path, fixes: dict[str, list[Suspect]], class_names: Sequence[str]
) -> Path:
    """A copy of the COCO JSON ``source`` with ``fixes`` (``{file stem: suspects}``) applied,
    written to ``out``: a ``missing`` box a new annotation, a ``class`` a new
    ``category_id``, a ``location`` a new ``bbox`` (annotations found by their box)."""
    data = json.loads(Path(source).read_text(encoding="utf-8"))
    category = {c["name"]: c["id"] for c in data.get("categories", [])}
    image_of = {Path(str(im["file_name"])).stem: im["id"] for im in data.get("images", [])}
    annotations = data.setdefault("annotations", [])
    next_id = max((a.get("id", 0) for a in annotations), default=0) + 1
    for stem, suspects in fixes.items():
        image_id = image_of[stem]
        own = [a for a in annotations if a.get("image_id") == image_id]
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in own)],
                         np.float64).reshape(-1, 4)  # fmt: skip
        for s in suspects:
            if s.issue == "missing":
                annotations.append({
                    "id": next_id, "image_id": image_id, "iscrowd": 0,
                    "category_id": category[class_names[s.suggested_class]],
                    **_coco_box(s.box),
                })  # fmt: skip
                next_id += 1
                continue
            index = _closest(boxes, s.box)
            if index < 0:
                continue
            if s.issue == "class":
                own[index]["category_id"] = category[class_names[s.suggested_class]]
            elif s.suggested_box is not None:
                own[index].update(_coco_box(s.suggested_box))
    with atomic_write(out, mode="w", encoding="utf-8") as handle:
        json.dump(data, handle)
    return out


def _coco_box(box: Sequence[float]) -> dict[str, Any]:
    """COCO's ``bbox`` ``[x, y, w, h]`` and ``area`` of an ``(x1, y1, x2, y2)`` box."""
    x1, y1, x2, y2 = (round(float(v), 2) for v in box)
    return {"bbox": [x1, y1, round(x2 - x1, 2), round(y2 - y1, 2)],
            "area": round((x2 - x1) * (y2 - y1), 2)}  # fmt: skip
