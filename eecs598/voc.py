"""Datasets stored in PASCAL VOC layout: the annotation parser, the geometry, the reader.

Three parts, each usable on its own:

* :func:`parse_voc_annotation` reads one ``Annotations/<id>.xml`` into an
  :class:`ImageAnnotation` record (boxes as written, clipped to the image; degenerate boxes
  dropped with a warning naming the file and the objects).
* :class:`ResizeCrop` is the geometry of one item: short side to ``image_size``, then, for
  training items, a centre crop to a square. It applies to the image and to its boxes alike.
* :class:`AnnotatedImages` makes the items from the records: it decodes, resizes and crops
  each image when its item is read. Every reader builds on it: :class:`VOCLayoutDetection`
  parses a split once at construction, :class:`eecs598.coco.COCODetection` a COCO
  instances JSON.

Dataset item format
-------------------
Every reader item is ``(image_path, image, gt_boxes)``:

* ``image_path``: ``str``, path of the decoded image file.
* ``image``: ``(3, H, W)`` float32, ImageNet-normalised RGB.
* ``gt_boxes``: ``(max_boxes, 5)`` float32, rows ``x1, y1, x2, y2, class`` in pixels of the
  returned image; valid rows first, padding rows are all ``-1``.

Training items (``train_transform=True``) are resized so the short side is ``image_size`` and then
centre-cropped to ``image_size x image_size``, so they batch with the default collate function.
Evaluation items (``train_transform=False``) are only resized (short side ``image_size``): nothing
is cropped, so no object is lost, and sizes differ between images; use batch size 1.

Difficult objects
-----------------
Objects flagged ``<difficult>1</difficult>`` are never part of ``gt_boxes`` (neither for training
nor for evaluation items), so the model is not trained on them. They are kept for evaluation:
:meth:`VOCLayoutDetection.annotation` (by index) and
:meth:`VOCLayoutDetection.annotation_for_path` (by image path) return *all* objects of an image,
boxes transformed exactly like the returned image, with their classes and difficult flags.
``inference_with_detector`` looks this up on the loader's dataset (through any
``torch.utils.data.Subset`` wrappers) so that difficult objects count as "ignore" in the mAP;
for datasets without the lookup it falls back to the valid rows of ``gt_boxes``.

Boxes
-----
Coordinates are taken from the XML as written (no 1-based shift), clipped to the image, and
boxes with zero or negative area after clipping are dropped with a warning naming the file.
When an image has more than ``max_boxes`` usable objects, the ``max_boxes`` largest (by area)
are kept and a warning naming the file is issued once per file and process.
"""

from __future__ import annotations

import copy
import functools
import os
import random
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import VOCDetection

from .augment import apply_transform
from .images import (
    IMAGE_EXTENSIONS,
    CorruptImageError,
    image_file_size,
    normalize_uint8,
    read_rgb_image,
    short_side_size,
    to_uint8_tensor,
)

__all__ = [
    "AnnotatedImages",
    "BCCD_CLASSES",
    "ImageAnnotation",
    "ResizeCrop",
    "VOCLayoutDetection",
    "find_image",
    "held_out_split",
    "missing_files_error",
    "parse_voc_annotation",
    "read_voc_xml",
    "voc_folders",
    "voc_image_ids",
]

#: Classes of the BCCD blood-cell dataset (``../shared/datasets/bccd``).
BCCD_CLASSES: tuple[str, ...] = ("RBC", "WBC", "Platelets")


# ----------------------------------------------------------------------------------------------
# Annotation parser
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageAnnotation:
    """Every object of one image, as its annotation file gives them.

    Attributes:
        image_id: the file stem of the annotation (``Annotations/<image_id>.xml``).
        image_path: the image file.
        width, height: the image size (the XML ``<size>``, or the file header without one).
        boxes: ``(N, 4)`` float32 ``x1, y1, x2, y2``, clipped to the image, positive area.
        classes: ``(N,)`` int64 class indices.
        difficult: ``(N,)`` bool difficult flags.
    """

    image_id: str
    image_path: str
    width: int
    height: int
    boxes: np.ndarray
    classes: np.ndarray
    difficult: np.ndarray


def read_voc_xml(xml_path: str | os.PathLike) -> dict[str, Any]:
    """The ``<annotation>`` element of a VOC XML file as nested dicts (``object`` may be a
    dict or a list); ``ValueError`` naming the file when it is not well-formed XML."""
    try:
        tree = ET.parse(xml_path)
    except ET.ParseError as exc:
        raise ValueError(f"Cannot parse annotation file {xml_path}: {exc}") from exc
    return VOCDetection.parse_voc_xml(tree.getroot()).get("annotation", {})


def voc_objects(annotation: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``<object>`` entries of :func:`read_voc_xml`'s result, always as a list."""
    objects = annotation.get("object", [])
    return [objects] if isinstance(objects, dict) else list(objects)


def find_image(image_dir: Path, image_id: str, filename: str | None, xml_path: Path) -> Path:
    """The image file of an annotation: ``<filename>`` if it exists, else ``<image_id>`` with
    any of :data:`~eecs598.images.IMAGE_EXTENSIONS` (lower or upper case)."""
    endings = [*IMAGE_EXTENSIONS, *(ext.upper() for ext in IMAGE_EXTENSIONS)]
    candidates = [image_dir / f"{image_id}{ext}" for ext in endings]
    if filename:
        candidates.insert(0, image_dir / filename)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Image for annotation {xml_path} not found: looked for "
        f"{image_dir / (filename or image_id + '.jpg')} (and other extensions)."
    )


def _xml_size(annotation: dict[str, Any], image_path: Path) -> tuple[int, int]:
    """``(width, height)`` from ``<size>``, or from the image header when missing or bogus."""
    size = annotation.get("size", {})
    try:
        width, height = int(float(size["width"])), int(float(size["height"]))
    except (KeyError, TypeError, ValueError):
        width, height = 0, 0
    if width <= 0 or height <= 0:
        width, height = image_file_size(image_path)
    return width, height


def clip_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """A copy of ``(N, 4)`` boxes clipped to a ``width x height`` image."""
    boxes = boxes.copy()
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    return boxes


def _warn_dropped(xml_path: Path, written, classes, class_names, width, height, dropped) -> None:
    detail = ", ".join(
        f"object {i} '{class_names[classes[i]]}' ({', '.join(f'{v:g}' for v in written[i])})"
        for i in dropped[:5]
    )
    warnings.warn(
        f"{xml_path}: dropped {len(dropped)} box(es) with zero or negative area after "
        f"clipping to the {width}x{height} image (x2 <= x1 or y2 <= y1): {detail}"
        + (" ..." if len(dropped) > 5 else ""),
        stacklevel=4,
    )


def voc_folders(root: str | os.PathLike) -> tuple[Path, Path]:
    """``(annotation folder, image folder)`` of a VOC-layout dataset: ``root/Annotations`` and
    ``root/JPEGImages``, or ``root`` itself for both when its XML files sit beside the images
    (Roboflow's "Pascal VOC" export).

    Raises:
        FileNotFoundError: neither layout is there; the message says what was looked for.
    """
    root = Path(root)
    if (root / "Annotations").is_dir():
        return root / "Annotations", root / "JPEGImages"
    if root.is_dir() and any(root.glob("*.xml")):
        return root, root
    raise FileNotFoundError(
        f"{root} is not a VOC-layout folder: no Annotations/ folder and no .xml files in it "
        "(expected Annotations/<id>.xml with JPEGImages/<id>.jpg, or <id>.xml beside <id>.jpg)."
    )


def voc_image_ids(root: str | os.PathLike) -> list[str]:
    """Every annotated image of a VOC-layout folder (:func:`voc_folders`): the XML file stems,
    sorted; used when the folder has no ``ImageSets`` split files."""
    annotations, _ = voc_folders(root)
    return sorted(p.stem for p in annotations.glob("*.xml"))


def parse_voc_annotation(
    root: str | os.PathLike, image_id: str, class_names: Sequence[str], split: str = "?",
    folders: tuple[Path, Path] | None = None,
) -> ImageAnnotation:  # fmt: skip
    """Parse ``<image_id>.xml`` and find its image: in ``root/Annotations`` and
    ``root/JPEGImages``, or the ``(annotation, image)`` ``folders`` given
    (:func:`voc_folders`).

    Boxes are taken as written, clipped to the image, and those with zero or negative area
    after clipping (NaN coordinates too) are dropped with one warning naming the file and each
    dropped object.

    Raises:
        FileNotFoundError: the annotation or its image is missing (``split`` is named).
        ValueError: malformed XML or ``<bndbox>``, or a class not in ``class_names``; the
            message names the file (and the object or class).
    """
    root = Path(root)
    annotation_dir, image_dir = folders or (root / "Annotations", root / "JPEGImages")
    xml_path = annotation_dir / f"{image_id}.xml"
    if not xml_path.is_file():
        raise FileNotFoundError(
            f"Annotation file {xml_path} (listed in split '{split}') not found."
        )
    annotation = read_voc_xml(xml_path)
    filename = annotation.get("filename")
    filename = filename if isinstance(filename, str) else None
    image_path = find_image(image_dir, image_id, filename, xml_path)
    width, height = _xml_size(annotation, image_path)
    class_to_idx = {name: i for i, name in enumerate(class_names)}
    objects = voc_objects(annotation)
    boxes = np.zeros((len(objects), 4), dtype=np.float32)
    classes = np.zeros(len(objects), dtype=np.int64)
    difficult = np.zeros(len(objects), dtype=bool)
    for i, obj in enumerate(objects):
        name = str(obj.get("name", "")).strip()
        if name not in class_to_idx:
            raise ValueError(
                f"Class '{name}' in {xml_path} is not in the class list {tuple(class_names)}."
            )
        try:
            bndbox = obj["bndbox"]
            boxes[i] = [float(bndbox[k]) for k in ("xmin", "ymin", "xmax", "ymax")]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"Malformed <bndbox> for object {i} in {xml_path}") from exc
        classes[i] = class_to_idx[name]
        difficult[i] = str(obj.get("difficult", "0")).strip() not in ("0", "", "false")
    clipped = clip_boxes(boxes, width, height)  # NaN coordinates fail both tests below
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    if not keep.all():
        dropped = np.flatnonzero(~keep)
        _warn_dropped(xml_path, boxes, classes, class_names, width, height, dropped)
    return ImageAnnotation(
        image_id, str(image_path), width, height, clipped[keep], classes[keep], difficult[keep]
    )


# ----------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResizeCrop:
    """Resize so the short side is ``image_size``, then optionally centre-crop to a square.

    Attributes:
        width, height: the original image size.
        new_w, new_h: the size after resizing (long side rounded).
        left, top: the crop offset in resized pixels (0 without a crop).
        out_w, out_h: the output size.
    """

    width: int
    height: int
    new_w: int
    new_h: int
    left: int
    top: int
    out_w: int
    out_h: int

    @classmethod
    def for_image(cls, width: int, height: int, image_size: int, crop: bool) -> ResizeCrop:
        """The geometry for a ``width x height`` image; the crop is centred with
        ``left = (new_w - image_size) // 2`` (same for ``top``)."""
        new_w, new_h = short_side_size(width, height, image_size)
        if crop:
            s = image_size
            return cls(width, height, new_w, new_h, (new_w - s) // 2, (new_h - s) // 2, s, s)
        return cls(width, height, new_w, new_h, 0, 0, new_w, new_h)

    def apply_image(self, image: Image.Image) -> Image.Image:
        """Resize (bilinear) and crop a PIL image of the original size."""
        image = image.resize((self.new_w, self.new_h), Image.BILINEAR)
        if (self.left, self.top, self.out_w, self.out_h) != (0, 0, self.new_w, self.new_h):
            box = (self.left, self.top, self.left + self.out_w, self.top + self.out_h)
            image = image.crop(box)
        return image

    def apply_boxes(self, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Map ``(N, 4)`` boxes of the original image into the output image.

        Returns:
            The boxes ``(N, 4)`` float32, clipped to the output, and a ``(N,)`` bool mask of
            those that keep at least 1 px of width and height in it.
        """
        scale = np.array([self.new_w / self.width, self.new_h / self.height] * 2, np.float32)
        offset = np.array([self.left, self.top, self.left, self.top], dtype=np.float32)
        out = boxes * scale - offset
        out[:, 0::2] = out[:, 0::2].clip(0, self.out_w)
        out[:, 1::2] = out[:, 1::2].clip(0, self.out_h)
        valid = ((out[:, 2] - out[:, 0]) >= 1.0) & ((out[:, 3] - out[:, 1]) >= 1.0)
        return out, valid


# ----------------------------------------------------------------------------------------------
# Reader
# ----------------------------------------------------------------------------------------------


def read_split_ids(root: Path, split: str, hint: str = "") -> tuple[Path, list[str]]:
    """``(split file, image ids)`` of ``root/ImageSets/Main/<split>.txt`` (first word of each
    non-empty line); ``FileNotFoundError`` naming the folder or the splits present."""
    if not root.is_dir():
        raise FileNotFoundError(f"Dataset folder {root} does not exist.{hint}")
    split_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        main_dir = split_file.parent
        found = sorted(p.stem for p in main_dir.glob("*.txt")) if main_dir.is_dir() else []
        raise FileNotFoundError(
            f"Split file {split_file} not found (splits present: {found or 'none'}).{hint}"
        )
    lines = split_file.read_text().splitlines()
    return split_file, [line.split()[0] for line in lines if line.strip()]


def missing_files_error(missing: list[str], total: int, split_file: Path) -> FileNotFoundError:
    """The error for ids of ``split_file`` (a split list or a COCO JSON) whose annotation or
    image is missing: it counts them and names the first five (the VOC and COCO readers)."""
    shown = "\n  ".join(missing[:5])
    more = f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else ""
    return FileNotFoundError(
        f"{len(missing)} of {total} image ids listed in {split_file} have a missing "
        f"annotation or image file:\n  {shown}{more}"
    )


class AnnotatedImages(torch.utils.data.Dataset):
    """The items of any reader, made from one :class:`ImageAnnotation` per image.

    Every reader (:class:`VOCLayoutDetection`, :class:`eecs598.coco.COCODetection`) parses
    its annotations into records and hands them to :meth:`_set_records`; everything after
    that is here, once: leaving out empty and unreadable images, decoding, the
    :class:`ResizeCrop` geometry, the ``(max_boxes, 5)`` targets without difficult (ignore)
    objects, and the evaluation lookups :meth:`annotation` / :meth:`annotation_for_path`.

    Args:
        root: Where the data lives (a folder, or an annotation file); kept as :attr:`root`.
        image_dir: The folder image file names are relative to (``file_name`` in
            :meth:`annotation`).
        class_names: Class list; class index = position in this list (names unique).
        image_size: Target length of the short image side (and the crop size for training).
        max_boxes: Rows of ``gt_boxes`` (padded with ``-1``).
        train_transform: ``True`` resizes and centre-crops to a square, ``False`` resizes only.
        split: Name used in messages (and in :class:`~eecs598.cache.CachedDetection`'s key).
        transform: a box-aware augmentation run by :meth:`__getitem__` on the uint8 image and
            its boxes before normalising (e.g. ``eecs598.augment.build_train_transform()``:
            random flips); ``None`` (default) for none. :meth:`load_uint8` (what
            :class:`~eecs598.cache.CachedDetection` stores) is never augmented.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        image_dir: str | os.PathLike,
        class_names: Sequence[str],
        image_size: int,
        max_boxes: int,
        train_transform: bool,
        split: str,
        transform: Any = None,
    ) -> None:
        super().__init__()
        self.transform = transform
        self.root = Path(root)
        self.image_dir = Path(image_dir)
        self.split = split
        self.class_names = tuple(class_names)
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"Duplicate names in class list {self.class_names}")
        self.class_to_idx = {name: i for i, name in enumerate(self.class_names)}
        self.idx_to_class = dict(enumerate(self.class_names))
        if image_size < 1 or max_boxes < 1:
            raise ValueError("image_size and max_boxes must be positive")
        self.image_size = int(image_size)
        self.max_boxes = int(max_boxes)
        self.train_transform = bool(train_transform)
        self._warned: set[str] = set()
        self.skipped_ids: list[str] = []
        self.records: list[ImageAnnotation] = []
        self.image_ids: list[str] = []
        self._path_to_index: dict[str, int] = {}

    def _set_records(
        self,
        keys: Sequence[Any],
        parse: Callable[[Any], ImageAnnotation],
        skip_empty: bool,
        skip_corrupt: bool,
    ) -> list[str]:
        """Parse every key into the items (:attr:`records`, in key order).

        ``parse(key)`` gives one image's record; keys are also the ids named in warnings.
        Images without a non-difficult object are left out with ``skip_empty``; with
        ``skip_corrupt`` each image is decoded once and unreadable ones (also those whose
        header the parser had to read) are left out with a warning naming the file and the
        key. Missing files do not stop the loop: their messages are returned, so the reader
        can raise one error for all of them.
        """
        kept: list[ImageAnnotation] = []
        missing: list[str] = []
        for key in keys:
            try:
                record = parse(key)
                if skip_empty and not (~record.difficult).any():
                    continue
                if skip_corrupt:
                    read_rgb_image(record.image_path, reduced=True)
            except FileNotFoundError as err:
                missing.append(str(err))
                continue
            except CorruptImageError as err:
                if not skip_corrupt:
                    raise
                self.skipped_ids.append(str(key))
                warnings.warn(f"{err}; image id '{key}' left out (skip_corrupt=True).",
                              stacklevel=4)  # fmt: skip
                continue
            kept.append(record)
        self.records = kept
        self.image_ids = [record.image_id for record in kept]
        self._path_to_index = {r.image_path: i for i, r in enumerate(kept)}
        return missing

    def subset(self, image_ids: Sequence[str], split: str) -> AnnotatedImages:
        """A copy holding only the items of ``image_ids`` (in this reader's order), named
        ``split``: e.g. a held-out part (:func:`held_out_split`). Nothing is parsed again.

        Raises:
            KeyError: an id that is not an item of this reader.
        """
        wanted = set(image_ids)
        unknown = sorted(wanted - set(self.image_ids))
        if unknown:
            raise KeyError(f"not images of {self.split!r}: {', '.join(unknown[:5])}")
        part = copy.copy(self)
        part.records = [r for r in self.records if r.image_id in wanted]
        part.image_ids = [r.image_id for r in part.records]
        part._path_to_index = {r.image_path: i for i, r in enumerate(part.records)}
        part._warned = set()
        part.split = split
        return part

    def geometry(self, width: int, height: int) -> ResizeCrop:
        """The resize (and, for training items, centre crop) of a ``width x height`` image."""
        return ResizeCrop.for_image(width, height, self.image_size, self.train_transform)

    @property
    def image_paths(self) -> list[str]:
        """The image file of each item."""
        return [record.image_path for record in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor, torch.Tensor]:
        """Return ``(image_path, image (3, H, W), gt_boxes (max_boxes, 5))``; see module doc."""
        path, image, gt_boxes = self.load_uint8(index)
        if self.transform is not None:
            image, gt_boxes = apply_transform(self.transform, image, gt_boxes)
        return path, normalize_uint8(image), gt_boxes

    def _decode(self, index: int) -> Image.Image:
        """Item ``index``'s image as RGB; a decoding error names the item and the split."""
        try:
            return read_rgb_image(self.records[index].image_path)
        except CorruptImageError as err:
            raise CorruptImageError(
                f"{err} (item {index}, image id '{self.image_ids[index]}' of split "
                f"'{self.split}'). Pass skip_corrupt=True to leave unreadable images out."
            ) from err

    def load_uint8(self, index: int) -> tuple[str, torch.Tensor, torch.Tensor]:
        """Item ``index`` before normalisation: ``image`` is ``(3, H, W)`` uint8 RGB.

        ``normalize_uint8`` of it gives exactly ``self[index]``'s image; this is what
        :class:`~eecs598.cache.CachedDetection` stores.
        """
        record = self.records[index]
        image = self._decode(index)
        width, height = image.size  # trust the pixels when the header disagrees with <size>
        geometry = self.geometry(width, height)
        out, valid = geometry.apply_boxes(clip_boxes(record.boxes, width, height))
        valid &= ~record.difficult
        rows = np.concatenate([out, record.classes[:, None].astype(np.float32)], axis=1)[valid]
        gt_boxes = torch.full((self.max_boxes, 5), -1.0)
        rows = self._largest_rows(rows, record.image_path)
        gt_boxes[: len(rows)] = torch.from_numpy(rows)
        return record.image_path, to_uint8_tensor(geometry.apply_image(image)), gt_boxes

    def _largest_rows(self, rows: np.ndarray, path: str) -> np.ndarray:
        """At most ``max_boxes`` rows: the largest by area, in their order; warns once per file."""
        if len(rows) <= self.max_boxes:
            return rows
        if path not in self._warned:
            self._warned.add(path)
            warnings.warn(
                f"{path}: {len(rows)} objects but max_boxes={self.max_boxes}; keeping the "
                f"{self.max_boxes} largest.",
                stacklevel=3,
            )
        area = (rows[:, 2] - rows[:, 0]) * (rows[:, 3] - rows[:, 1])
        return rows[np.sort(np.argsort(-area, kind="stable")[: self.max_boxes])]

    def annotation(self, index: int) -> dict[str, Any]:
        """All objects of item ``index`` (difficult ones included) in output-image pixels.

        Returns:
            dict with ``image_path`` (str), ``image_id`` (str), ``boxes`` ``(N, 4)`` float32,
            ``classes`` ``(N,)`` int64 and ``difficult`` ``(N,)`` bool tensors; and, to map
            boxes back to the image file, its ``file_name`` (relative to :attr:`image_dir`),
            ``width`` and ``height`` (int), ``scale`` ``(sx, sy)`` (output pixels per original
            pixel) and ``offset`` ``(left, top)`` (the crop, in output pixels; ``(0, 0)`` for
            evaluation items): original pixels are ``(boxes + (left, top, left, top)) /
            (sx, sy, sx, sy)``. Objects cropped away by the training transform are left out.
        """
        record = self.records[index]
        width, height = image_file_size(record.image_path)  # header only: cheap
        geometry = self.geometry(width, height)
        out, valid = geometry.apply_boxes(clip_boxes(record.boxes, width, height))
        return {
            "image_path": record.image_path,
            "image_id": record.image_id,
            "boxes": torch.from_numpy(out[valid]),
            "classes": torch.from_numpy(record.classes[valid]),
            "difficult": torch.from_numpy(record.difficult[valid]),
            "file_name": os.path.relpath(record.image_path, self.image_dir),
            "width": width,
            "height": height,
            "scale": (geometry.new_w / width, geometry.new_h / height),
            "offset": (geometry.left, geometry.top),
        }

    def annotation_for_path(self, image_path: str) -> dict[str, Any]:
        """Same as :meth:`annotation`, looked up by the ``image_path`` of an item."""
        try:
            index = self._path_to_index[str(image_path)]
        except KeyError:
            raise KeyError(f"{image_path} is not an image of this dataset") from None
        return self.annotation(index)

    def __repr__(self) -> str:
        mode = "train (resize + centre crop)" if self.train_transform else "eval (resize only)"
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, "
            f"images={len(self)}, classes={len(self.class_names)}, image_size={self.image_size},"
            f" {mode})"
        )


def held_out_split(
    records: Sequence[ImageAnnotation], fraction: float = 0.1, seed: int = 0
) -> tuple[list[str], list[str]]:
    """``(train ids, val ids)``: a deterministic held-out ``fraction`` of the images.

    The images are shuffled by ``random.Random(seed)`` (the same split for the same images,
    whatever the training seed). First, for each class from the rarest, one image showing it
    is held out unless the val part already shows it or the class is in a single image (it
    must stay in training); then the shuffled rest fills the val part up to ``round(fraction
    * N)`` images (at least 1, and at least one image stays for training). Both lists keep
    the records' order.
    """
    order = [r.image_id for r in records]
    if len(order) < 2:
        raise ValueError(f"cannot hold out a val part from {len(order)} image(s)")
    shuffled = order[:]
    random.Random(seed).shuffle(shuffled)
    shows = {r.image_id: {int(c) for c in r.classes[~r.difficult]} for r in records}
    images_of: dict[int, list[str]] = {}
    for image_id in shuffled:
        for c in shows[image_id]:
            images_of.setdefault(c, []).append(image_id)
    val: list[str] = []
    for c in sorted(images_of, key=lambda k: (len(images_of[k]), k)):
        if len(images_of[c]) > 1 and not any(c in shows[i] for i in val):
            val.append(images_of[c][0])
    size = min(max(1, round(fraction * len(order))), len(order) - 1)
    val += [i for i in shuffled if i not in val][: max(0, size - len(val))]
    held = set(val[: len(order) - 1])
    return [i for i in order if i not in held], [i for i in order if i in held]


class VOCLayoutDetection(AnnotatedImages):
    """Detection dataset stored in PASCAL VOC layout.

    Expected layout under ``root``::

        Annotations/<id>.xml
        JPEGImages/<id>.jpg        (any PIL-readable image; .jpeg/.png/.bmp also found)
        ImageSets/Main/<split>.txt (one image id per line)

    or, as Roboflow's "Pascal VOC" export has it, ``<id>.xml`` beside ``<id>.jpg`` in ``root``
    (:func:`voc_folders`). ``image_ids`` given instead of a split file (e.g.
    :func:`voc_image_ids`, every annotated image) are read without one.

    All annotations of the split are parsed once, at construction, into one
    :class:`ImageAnnotation` per image (:attr:`records`); images are decoded in
    :meth:`__getitem__` (converted to RGB by :func:`~eecs598.images.to_rgb`, so grayscale,
    16-bit grayscale, CMYK, palette and PNG files work) and transformed by
    :meth:`geometry`. The items, the geometry and the lookups are :class:`AnnotatedImages`'s,
    shared with the COCO-format reader. The object is picklable, so it can be used with
    DataLoader workers.

    Faulty data. A split file listing ids whose annotation or image file is missing raises one
    ``FileNotFoundError`` that counts them and names the first few paths. An image that cannot
    be decoded (truncated or corrupt file) raises :class:`CorruptImageError` naming the file,
    the item index and the image id when the item is read; with ``skip_corrupt=True`` every
    image is instead decoded once at construction (JPEGs at 1/8 scale, which still reads all
    their data) and unreadable ones are left out of :attr:`image_ids`, with a warning naming
    each file. Skipping therefore changes ``len(dataset)`` and the indices, never what an index
    returns, and no image is ever replaced by another one.

    Args:
        root: Dataset folder containing ``Annotations``, ``JPEGImages`` and ``ImageSets``.
        split: Name of the split file ``ImageSets/Main/<split>.txt``.
        class_names: Class list; class index = position in this list. An object whose name is
            not in the list raises a ``ValueError`` naming the class and the file.
        image_size: Target length of the short image side (and the crop size for training).
        max_boxes: Number of rows of ``gt_boxes`` (padded with ``-1``). Images with more usable
            objects keep the ``max_boxes`` largest, with a warning naming the file.
        train_transform: ``True`` resizes and centre-crops to a square, ``False`` resizes only.
            ``None`` picks ``True`` for split names starting with ``"train"``.
        skip_empty: Leave out images without any non-difficult object. When kept (the
            default), such images give all-padding ``gt_boxes`` and train as all background.
        skip_corrupt: Decode every image at construction and leave out unreadable ones with a
            warning (see "Faulty data" above). Off by default: construction then reads no
            pixels and an unreadable image raises when its item is read.
        how_to_get: Extra sentence for the "not found" error explaining how to obtain the data.
        transform: box-aware augmentation of :meth:`__getitem__`'s items (see
            :class:`AnnotatedImages`); ``None`` for none.
        image_ids: the images to read instead of the split file's (``split`` then only names
            them).

    Attributes:
        class_names: Tuple of class names.
        class_to_idx: ``dict[str, int]``.
        idx_to_class: ``dict[int, str]``.
        records: One :class:`ImageAnnotation` per item.
        image_ids: List of image ids in this split (after ``skip_empty`` and ``skip_corrupt``).
        skipped_ids: Ids left out because their image could not be decoded
            (``skip_corrupt=True``).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        class_names: Sequence[str],
        image_size: int = 224,
        max_boxes: int = 40,
        train_transform: bool | None = None,
        *,
        skip_empty: bool = False,
        skip_corrupt: bool = False,
        how_to_get: str = "",
        transform: Any = None,
        image_ids: Sequence[str] | None = None,
    ) -> None:
        train = split.startswith("train") if train_transform is None else bool(train_transform)
        root = Path(root)
        hint = f" {how_to_get}" if how_to_get else ""
        if image_ids is None:
            split_file, ids = read_split_ids(root, split, hint)
            folders = (root / "Annotations", root / "JPEGImages")
        else:
            folders = voc_folders(root)
            split_file, ids = folders[0], list(image_ids)
        super().__init__(
            root, folders[1], class_names, image_size, max_boxes, train, split, transform
        )
        parse = functools.partial(parse_voc_annotation, self.root, class_names=self.class_names,
                                  split=split, folders=folders)  # fmt: skip
        missing = self._set_records(ids, parse, skip_empty, skip_corrupt)
        if missing:
            raise missing_files_error(missing, len(ids), split_file)
