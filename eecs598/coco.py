"""Datasets in COCO format: an instances JSON plus an image folder, read like the VOC layout.

:class:`COCODetection` reads the ``images``, ``annotations`` and ``categories`` of a COCO
instances file (as written by COCO itself, Roboflow, CVAT, Label Studio or FiftyOne) into one
:class:`~eecs598.voc.ImageAnnotation` per image, and hands them to
:class:`~eecs598.voc.AnnotatedImages`, the part it shares with the VOC-layout reader: the
items, their geometry and targets, ``skip_empty`` / ``skip_corrupt`` and the evaluation lookups
are exactly :class:`~eecs598.voc.VOCLayoutDetection`'s (see :mod:`eecs598.voc`).

Mapping from the file:

- ``bbox [x, y, w, h]`` -> box ``(x, y, x + w, y + h)``, clipped to the image. Zero-area,
  inverted (negative ``w`` or ``h``) or NaN boxes are dropped with one warning per image naming
  the file, the image and each annotation id with its ``bbox``.
- ``iscrowd: 1`` -> the object's *difficult* flag: kept for evaluation as an ignore region
  (``iscrowd = 1`` again in the COCO export of :mod:`eecs598.mean_ap`), never a training target.
- Classes: ``class_names`` when given (class index = position; an annotation whose category's
  name is not in it is a ``ValueError`` naming the class, the annotation id and the file), else
  the sorted category names.
- Image ids of the records (:attr:`ImageAnnotation.image_id`) are the stems of ``file_name``,
  as for VOC data, so output files are named after the image; two images with the same stem are
  a ``ValueError``. Items come in the order of the file's ``images`` list. ``width`` /
  ``height`` come from the file, or from the image header when missing or not positive.

Faulty files: text that is not JSON, a missing top-level list, a record without a required key
(``id``, ``file_name``; ``id``, ``image_id``, ``category_id``, ``bbox``) or with a malformed
``bbox``, an annotation of an image or category the file does not list, and duplicate ids are
``ValueError`` naming the file, the key and the record (``annotations[3] (id 17)``). Image
files that are missing raise one ``FileNotFoundError`` counting them and naming the first five.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .images import image_file_size
from .voc import AnnotatedImages, ImageAnnotation, clip_boxes, missing_files_error

__all__ = ["COCODetection", "read_coco_instances"]

_LISTS = ("images", "annotations", "categories")


def _where(path: Path, key: str, index: int, record: Any) -> str:
    """``FILE: annotations[3] (id 17)``: how messages name one record of the file."""
    rid = record.get("id") if isinstance(record, Mapping) else None
    return f"{path}: {key}[{index}]" + (f" (id {rid})" if rid is not None else "")


def _field(path: Path, key: str, index: int, record: Any, name: str) -> Any:
    """``record[name]``; ``ValueError`` naming the file, the record and the key if absent."""
    if not isinstance(record, Mapping):
        raise ValueError(f"{_where(path, key, index, record)} is not a JSON object")
    if name not in record:
        raise ValueError(f"{_where(path, key, index, record)} has no '{name}' key")
    return record[name]


def read_coco_instances(path: str | os.PathLike) -> dict[str, list[Any]]:
    """The ``images``, ``annotations`` and ``categories`` lists of a COCO instances file.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not JSON (the message gives the line and column), not an object, or a
            top-level key missing or not a list; the message names the file and the key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file {path} not found.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a valid JSON file ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with {', '.join(_LISTS)}")
    for key in _LISTS:
        if not isinstance(data.get(key), list):
            found = "missing" if key not in data else f"a {type(data[key]).__name__}"
            raise ValueError(f"{path}: key '{key}' must be a list of records ({found})")
    return {key: data[key] for key in _LISTS}


def _unique_ids(path: Path, key: str, records: list[Any]) -> dict[Any, int]:
    """``{id: position}`` of a list of records; a missing or repeated id names the record."""
    positions: dict[Any, int] = {}
    for i, record in enumerate(records):
        rid = _field(path, key, i, record, "id")
        if not isinstance(rid, (int, str)) or isinstance(rid, bool):
            raise ValueError(f"{_where(path, key, i, record)}: 'id' must be an int or a string")
        if rid in positions:
            raise ValueError(f"{_where(path, key, i, record)}: id repeats {key}[{positions[rid]}]")
        positions[rid] = i
    return positions


def _bbox(path: Path, index: int, annotation: Mapping[str, Any]) -> list[float]:
    """``[x1, y1, x2, y2]`` of an annotation's ``bbox [x, y, w, h]`` (NaN kept for the filter)."""
    bbox = _field(path, "annotations", index, annotation, "bbox")
    try:
        if len(bbox) != 4 or any(isinstance(v, (bool, str)) for v in bbox):
            raise TypeError
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        where = _where(path, "annotations", index, annotation)
        raise ValueError(f"{where}: 'bbox' must be 4 numbers [x, y, w, h], got {bbox!r}") from None
    return [x, y, x + w, y + h]


def _annotated_class_names(
    path: Path, categories: list[Any], names: list[str], annotations: list[Any]
) -> list[str]:
    """The sorted names of the categories that have at least one annotation. Those without
    any (a Roboflow export's supercategory, say) are left out, named in one warning: a class
    no box teaches cannot be learned, and its AP would pull the mean down. All names when no
    category has an annotation."""
    used = {a.get("category_id") for a in annotations if isinstance(a, Mapping)}
    empty = sorted({n for c, n in zip(categories, names, strict=True) if c.get("id") not in used})
    kept = sorted(set(names) - set(empty))
    if empty and kept:
        listed = ", ".join(repr(n) for n in empty)
        warnings.warn(
            f"{path}: left out the categor{'y' if len(empty) == 1 else 'ies'} without any "
            f"annotation, {listed} (pass class_names to keep them)", stacklevel=3,
        )  # fmt: skip
        return kept
    return sorted(set(names))


class COCODetection(AnnotatedImages):
    """Detection dataset stored as a COCO instances JSON plus an image folder.

    Items, geometry, difficult (here: ``iscrowd``) handling, ``max_boxes``, ``skip_empty``,
    ``skip_corrupt`` and the lookups ``annotation`` / ``annotation_for_path`` are those of
    :class:`~eecs598.voc.VOCLayoutDetection` (both are :class:`~eecs598.voc.AnnotatedImages`);
    the mapping from the file is in the module docstring.

    Args:
        annotation_file: The instances JSON.
        image_dir: Folder that ``file_name`` is relative to (default: the JSON's folder).
        class_names: Class list (class index = position), or ``None`` for the sorted names of
            the file's categories that have annotations (those without are left out, with a
            warning naming them).
        image_size: Target length of the short image side (and the crop size for training).
        max_boxes: Rows of ``gt_boxes``.
        train_transform: ``True`` resizes and centre-crops (training items), ``False`` (the
            default) resizes only (evaluation items).
        skip_empty: Leave out images without any non-crowd object.
        skip_corrupt: Decode every image at construction, leaving out unreadable ones.

    Attributes:
        split: The JSON file's stem (in messages and the cache key).
        category_ids: ``{category id: class index}`` of the categories in the class list.
        records, image_ids, class_names, class_to_idx, idx_to_class, skipped_ids: As for
            :class:`~eecs598.voc.VOCLayoutDetection`.
    """

    def __init__(
        self,
        annotation_file: str | os.PathLike,
        image_dir: str | os.PathLike | None = None,
        class_names: Sequence[str] | None = None,
        image_size: int = 224,
        max_boxes: int = 40,
        train_transform: bool = False,
        *,
        skip_empty: bool = False,
        skip_corrupt: bool = False,
    ) -> None:
        path = Path(annotation_file)
        data = read_coco_instances(path)
        categories = data["categories"]
        positions = _unique_ids(path, "categories", categories)
        names = [str(_field(path, "categories", i, c, "name")) for i, c in enumerate(categories)]
        if class_names is None:
            class_names = _annotated_class_names(path, categories, names, data["annotations"])
        image_dir = Path(image_dir) if image_dir is not None else path.parent
        super().__init__(
            path, image_dir, class_names, image_size, max_boxes, train_transform, path.stem
        )
        self._category_names = {cid: names[i] for cid, i in positions.items()}
        self.category_ids = {
            cid: self.class_to_idx[name]
            for cid, name in self._category_names.items()
            if name in self.class_to_idx
        }
        images = data["images"]
        self._images = {rid: images[i] for rid, i in _unique_ids(path, "images", images).items()}
        self._image_index = {rid: i for i, rid in enumerate(self._images)}
        self._objects = self._group_annotations(data["annotations"])
        self._check_stems()
        missing = self._set_records(list(self._images), self._parse_image, skip_empty, skip_corrupt)
        if missing:
            raise missing_files_error(missing, len(self._images), path)

    def _group_annotations(self, annotations: list[Any]) -> dict[Any, list[tuple[int, Any]]]:
        """``{image id: [(position in 'annotations', annotation), ...]}``, every reference
        checked: the image and the category must be listed in the file."""
        path = self.root
        _unique_ids(path, "annotations", annotations)
        grouped: dict[Any, list[tuple[int, Any]]] = {rid: [] for rid in self._images}
        for i, ann in enumerate(annotations):
            image_id = _field(path, "annotations", i, ann, "image_id")
            if image_id not in grouped:
                raise ValueError(
                    f"{_where(path, 'annotations', i, ann)}: image_id {image_id!r} is not in "
                    "'images'"
                )
            category = _field(path, "annotations", i, ann, "category_id")
            if category not in self._category_names:
                raise ValueError(
                    f"{_where(path, 'annotations', i, ann)}: category_id {category!r} is not "
                    "in 'categories'"
                )
            if category not in self.category_ids:
                raise ValueError(
                    f"Class '{self._category_names[category]}' of "
                    f"{_where(path, 'annotations', i, ann)} is not in the class list "
                    f"{self.class_names}."
                )
            grouped[image_id].append((i, ann))
        return grouped

    def _check_stems(self) -> None:
        """Records are named by file stem (as output files are): stems must be unique."""
        seen: dict[str, Any] = {}
        for rid, entry in self._images.items():
            index = self._image_index[rid]
            name = _field(self.root, "images", index, entry, "file_name")
            stem = Path(str(name)).stem
            if stem in seen:
                raise ValueError(
                    f"{_where(self.root, 'images', index, entry)}: file name stem '{stem}' "
                    f"repeats image id {seen[stem]!r}; output files are named by stem"
                )
            seen[stem] = rid

    def _size(self, entry: Mapping[str, Any], image_path: Path) -> tuple[int, int]:
        """``(width, height)`` from the record, or the image header when missing or bogus."""
        try:
            width, height = int(entry["width"]), int(entry["height"])
        except (KeyError, TypeError, ValueError):
            width, height = 0, 0
        if width <= 0 or height <= 0:
            width, height = image_file_size(image_path)
        return width, height

    def _parse_image(self, rid: Any) -> ImageAnnotation:
        """The record of image ``rid``; ``FileNotFoundError`` when its file is missing."""
        entry = self._images[rid]
        image_path = self.image_dir / str(entry["file_name"])
        if not image_path.is_file():
            raise FileNotFoundError(f"Image {image_path} (image id {rid!r}) not found.")
        width, height = self._size(entry, image_path)
        objects = self._objects[rid]
        boxes = np.array(
            [_bbox(self.root, i, ann) for i, ann in objects], dtype=np.float32
        ).reshape(-1, 4)
        classes = np.array([self.category_ids[ann["category_id"]] for _, ann in objects], np.int64)
        crowd = np.array([bool(ann.get("iscrowd", 0)) for _, ann in objects], dtype=bool)
        clipped = clip_boxes(boxes, width, height)  # NaN coordinates fail both tests below
        keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
        if not keep.all():
            self._warn_dropped(rid, [objects[i] for i in np.flatnonzero(~keep)], width, height)
        return ImageAnnotation(
            Path(str(entry["file_name"])).stem, str(image_path), width, height,
            clipped[keep], classes[keep], crowd[keep],
        )  # fmt: skip

    def _warn_dropped(self, rid: Any, dropped: list[tuple[int, Any]], width: int, height: int):
        """One warning for an image's unusable boxes, naming each annotation id and bbox."""
        detail = ", ".join(
            f"annotation id {ann.get('id')!r} bbox {ann.get('bbox')!r}" for _, ann in dropped[:5]
        )
        more = " ..." if len(dropped) > 5 else ""
        warnings.warn(
            f"{self.root}: image id {rid!r}: dropped {len(dropped)} box(es) with zero, negative "
            f"or NaN size after clipping to the {width}x{height} image: {detail}{more}",
            stacklevel=5,
        )
