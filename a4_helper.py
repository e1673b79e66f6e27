"""Data loading, training and inference helpers for the two-stage detector notebook.

This is the top layer of the package: it may import ``eecs598``, ``common`` and
``two_stage_detector``; nothing imports it except the notebook and the tests.

Contents
--------
* :class:`VOCLayoutDetection` - a reader for any dataset stored in PASCAL VOC layout
  (``Annotations/*.xml``, ``JPEGImages/*``, ``ImageSets/Main/<split>.txt``).
* :class:`VOC2007DetectionTiny` - the notebook's PASCAL VOC 2007 dataset (20 classes), with an
  optional checksummed download of the official trainval archive.
* :func:`make_shapes_dataset` / :class:`ShapesDetection` - a small generated dataset in the same
  layout, used offline and by the tests.
* :data:`BCCD_CLASSES` - the class list of the BCCD blood-cell dataset, which loads through the
  same reader: ``VOCLayoutDetection(bccd_root, "train", BCCD_CLASSES)``.
* :func:`train_detector` - the training loop (SGD, warmup + step schedule, checkpoints, resume).
* :func:`inference_with_detector` - visualisation of detections or mAP evaluation.

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
:func:`inference_with_detector` looks this up on the loader's dataset (through any
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

import colorsys
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
import urllib.parse
import urllib.request
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn
from torchvision.datasets import VOCDetection
from torchvision.datasets.utils import check_integrity, download_url, extract_archive

from common import box_iou

__all__ = [
    "BCCD_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SHAPES_CLASSES",
    "VOC2007_ARCHIVE",
    "VOC2007_MD5",
    "VOC2007_URLS",
    "VOC_CLASSES",
    "LossHistory",
    "ShapesDetection",
    "VOC2007DetectionTiny",
    "VOCLayoutDetection",
    "CorruptImageError",
    "compile_detector",
    "config_differences",
    "download_voc2007",
    "hello_helper",
    "inference_with_detector",
    "load_checkpoint",
    "load_model_weights",
    "make_shapes_dataset",
    "train_detector",
    "preprocess_image",
    "read_rgb_image",
    "to_rgb",
    "unnormalize_image",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: The 20 PASCAL VOC classes in alphabetical order (class index = position).
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)

#: Classes of the BCCD blood-cell dataset (``../shared/datasets/bccd``).
BCCD_CLASSES: tuple[str, ...] = ("RBC", "WBC", "Platelets")

#: File name of the official VOC2007 trainval archive and its MD5 checksum.
VOC2007_ARCHIVE = "VOCtrainval_06-Nov-2007.tar"
VOC2007_MD5 = "c52e279531787c972589f7e41ab4ae64"
#: Mirrors tried in order by :func:`download_voc2007`.
VOC2007_URLS: tuple[str, ...] = (
    "http://host.robots.ox.ac.uk/pascal/VOC/voc2007/VOCtrainval_06-Nov-2007.tar",
    "https://pjreddie.com/media/files/VOCtrainval_06-Nov-2007.tar",
)

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".JPG", ".JPEG", ".PNG")


def hello_helper() -> None:
    """Print a greeting, used by the notebook to check that the module imports."""
    print("Hello from a4_helper.py!")


# ----------------------------------------------------------------------------------------------
# VOC-layout reader
# ----------------------------------------------------------------------------------------------


def _to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a ``(3, H, W)`` uint8 tensor."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def normalize_uint8(image: torch.Tensor) -> torch.Tensor:
    """``(..., 3, H, W)`` uint8 RGB to the float32 ImageNet-normalised images the model takes."""
    tensor = image.float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device).view(3, 1, 1)
    return tensor.sub_(mean).div_(std)


def _to_tensor_normalized(image: Image.Image) -> torch.Tensor:
    """Convert an RGB PIL image to a ``(3, H, W)`` float32 ImageNet-normalised tensor."""
    return normalize_uint8(_to_uint8_tensor(image))


def _short_side_size(width: int, height: int, image_size: int) -> tuple[int, int]:
    """``(new_w, new_h)`` with the short side ``image_size`` and the long side rounded."""
    if width <= height:
        return image_size, max(1, int(round(height * image_size / width)))
    return max(1, int(round(width * image_size / height))), image_size


class CorruptImageError(ValueError):
    """An image file exists but cannot be decoded (truncated, corrupt or not an image)."""


# 16-bit integer modes: PIL's own conversion to RGB clips them at 255 (an all-white image).
_WIDE_INT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a decoded PIL image of any mode to 8-bit RGB.

    Grayscale, palette (with or without transparency), CMYK, RGBA/LA (alpha dropped) and 1-bit
    images use PIL's conversion. 16-bit grayscale (modes ``I;16*`` and ``I``, e.g. from 16-bit
    PNG files) is scaled from ``0..65535`` to ``0..255`` first, since PIL's own conversion clips
    it at 255 and gives an almost white image.
    """
    if image.mode in _WIDE_INT_MODES:
        wide = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


def read_rgb_image(path: str | os.PathLike, *, reduced: bool = False) -> Image.Image:
    """Decode the whole image file at ``path`` and return it as 8-bit RGB (see :func:`to_rgb`).

    Args:
        path: Image file.
        reduced: Decode JPEG files at 1/8 scale (all compressed data is still read, so
            truncation is still found, but about 10x faster); used to check files.

    Raises:
        FileNotFoundError: No file at ``path``.
        CorruptImageError: The file is truncated, corrupt or not an image; the message names
            the file and PIL's reason.
    """
    try:
        with Image.open(path) as raw:
            if reduced:
                raw.draft("RGB", (max(1, raw.width // 8), max(1, raw.height // 8)))
            raw.load()
            return to_rgb(raw)
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise CorruptImageError(f"Cannot decode image {path}: {err}") from err


def preprocess_image(
    image: Image.Image, image_size: int
) -> tuple[torch.Tensor, tuple[float, float]]:
    """The reader's val transform for any image: short side to ``image_size``, no crop.

    Args:
        image: a PIL image of any mode (converted to RGB by :func:`to_rgb`).
        image_size: the short side after resizing.

    Returns:
        ``(image (3, H, W) ImageNet-normalised, (sx, sy))``: the tensor and the scales from
        original to resized pixels (divide predicted x by ``sx``, y by ``sy`` to map back).
    """
    width, height = image.size
    new_w, new_h = _short_side_size(width, height, image_size)
    resized = to_rgb(image).resize((new_w, new_h), Image.BILINEAR)
    return _to_tensor_normalized(resized), (new_w / width, new_h / height)


def unnormalize_image(image: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalisation of a ``(3, H, W)`` image; returns values in ``[0, 1]``."""
    mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device).view(3, 1, 1)
    return (image.float() * std + mean).clamp(0.0, 1.0)


def _image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` from the image header; :class:`CorruptImageError` if unreadable."""
    try:
        with Image.open(path) as img:
            return img.size
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise CorruptImageError(f"Cannot decode image {path}: {err}") from err


class VOCLayoutDetection(torch.utils.data.Dataset):
    """Detection dataset stored in PASCAL VOC layout.

    Expected layout under ``root``::

        Annotations/<id>.xml
        JPEGImages/<id>.jpg        (any PIL-readable image; .jpeg/.png/.bmp also found)
        ImageSets/Main/<split>.txt (one image id per line)

    All annotations of the split are parsed once, at construction; images are decoded in
    :meth:`__getitem__` (converted to RGB by :func:`to_rgb`, so grayscale, 16-bit grayscale,
    CMYK, palette and PNG files work). The object is picklable, so it can be used with
    DataLoader worker processes.

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

    Attributes:
        class_names: Tuple of class names.
        class_to_idx: ``dict[str, int]``.
        idx_to_class: ``dict[int, str]``.
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
    ) -> None:
        super().__init__()
        self.root = Path(root)
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
        self.train_transform = (
            split.startswith("train") if train_transform is None else bool(train_transform)
        )
        self._warned: set[str] = set()

        hint = f" {how_to_get}" if how_to_get else ""
        if not self.root.is_dir():
            raise FileNotFoundError(f"Dataset folder {self.root} does not exist.{hint}")
        split_file = self.root / "ImageSets" / "Main" / f"{split}.txt"
        if not split_file.is_file():
            main_dir = split_file.parent
            found = sorted(p.stem for p in main_dir.glob("*.txt")) if main_dir.is_dir() else []
            raise FileNotFoundError(
                f"Split file {split_file} not found (splits present: {found or 'none'}).{hint}"
            )
        ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]

        self.image_ids: list[str] = []
        self._image_paths: list[str] = []
        self._sizes: list[tuple[int, int]] = []
        self._boxes: list[np.ndarray] = []
        self._classes: list[np.ndarray] = []
        self._difficult: list[np.ndarray] = []
        self.skipped_ids: list[str] = []
        missing: list[str] = []
        for image_id in ids:
            try:
                path, size, boxes, classes, difficult = self._parse_annotation(image_id)
                if skip_empty and not (~difficult).any():
                    continue
                if skip_corrupt:
                    read_rgb_image(path, reduced=True)
            except FileNotFoundError as err:
                missing.append(str(err))
                continue
            except CorruptImageError as err:
                if not skip_corrupt:
                    raise
                self.skipped_ids.append(image_id)
                warnings.warn(f"{err}; image id '{image_id}' left out (skip_corrupt=True).",
                              stacklevel=2)  # fmt: skip
                continue
            self.image_ids.append(image_id)
            self._image_paths.append(path)
            self._sizes.append(size)
            self._boxes.append(boxes)
            self._classes.append(classes)
            self._difficult.append(difficult)
        if missing:
            shown = "\n  ".join(missing[:5])
            more = f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise FileNotFoundError(
                f"{len(missing)} of {len(ids)} image ids listed in {split_file} have a missing "
                f"annotation or image file:\n  {shown}{more}"
            )
        self._path_to_index = {p: i for i, p in enumerate(self._image_paths)}

    # -- parsing --------------------------------------------------------------------------------

    def _find_image(self, image_id: str, filename: str | None, xml_path: Path) -> Path:
        image_dir = self.root / "JPEGImages"
        candidates = [image_dir / f"{image_id}{ext}" for ext in _IMAGE_EXTENSIONS]
        if filename:
            candidates.insert(0, image_dir / filename)
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(
            f"Image for annotation {xml_path} not found: looked for "
            f"{image_dir / (filename or image_id + '.jpg')} (and other extensions)."
        )

    def _parse_annotation(
        self, image_id: str
    ) -> tuple[str, tuple[int, int], np.ndarray, np.ndarray, np.ndarray]:
        """Parse one XML file.

        Returns:
            image path, ``(width, height)``, boxes ``(N, 4)`` float32 clipped to the image,
            classes ``(N,)`` int64, difficult flags ``(N,)`` bool.
        """
        xml_path = self.root / "Annotations" / f"{image_id}.xml"
        if not xml_path.is_file():
            raise FileNotFoundError(
                f"Annotation file {xml_path} (listed in split '{self.split}') not found."
            )
        try:
            tree = ET.parse(xml_path)
        except ET.ParseError as exc:
            raise ValueError(f"Cannot parse annotation file {xml_path}: {exc}") from exc
        annotation = VOCDetection.parse_voc_xml(tree.getroot()).get("annotation", {})
        filename = annotation.get("filename")
        image_path = self._find_image(
            image_id, filename if isinstance(filename, str) else None, xml_path
        )

        size = annotation.get("size", {})
        try:
            width, height = int(float(size["width"])), int(float(size["height"]))
        except (KeyError, TypeError, ValueError):
            width, height = 0, 0
        if width <= 0 or height <= 0:  # size missing or bogus: read the image header
            width, height = _image_size(image_path)

        objects = annotation.get("object", [])
        if isinstance(objects, dict):
            objects = [objects]
        boxes = np.zeros((len(objects), 4), dtype=np.float32)
        classes = np.zeros(len(objects), dtype=np.int64)
        difficult = np.zeros(len(objects), dtype=bool)
        for i, obj in enumerate(objects):
            name = str(obj.get("name", "")).strip()
            if name not in self.class_to_idx:
                raise ValueError(
                    f"Class '{name}' in {xml_path} is not in the class list {self.class_names}."
                )
            try:
                bndbox = obj["bndbox"]
                boxes[i] = [float(bndbox[k]) for k in ("xmin", "ymin", "xmax", "ymax")]
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"Malformed <bndbox> for object {i} in {xml_path}") from exc
            classes[i] = self.class_to_idx[name]
            difficult[i] = str(obj.get("difficult", "0")).strip() not in ("0", "", "false")

        # Clip to the image and drop degenerate boxes (NaN coordinates fail both tests).
        written = boxes.copy()
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if not keep.all():
            dropped = np.flatnonzero(~keep)
            detail = ", ".join(
                f"object {i} '{self.class_names[classes[i]]}' "
                f"({', '.join(f'{v:g}' for v in written[i])})"
                for i in dropped[:5]
            )
            warnings.warn(
                f"{xml_path}: dropped {len(dropped)} box(es) with zero or negative area after "
                f"clipping to the {width}x{height} image (x2 <= x1 or y2 <= y1): {detail}"
                + (" ..." if len(dropped) > 5 else ""),
                stacklevel=3,
            )
        return str(image_path), (width, height), boxes[keep], classes[keep], difficult[keep]

    # -- geometry -------------------------------------------------------------------------------

    def _geometry(self, width: int, height: int) -> tuple[int, int, int, int, int, int]:
        """Resize/crop geometry for an image of ``width x height``.

        Returns:
            ``(new_w, new_h, left, top, out_w, out_h)``: resized size, crop offset and output
            size. The short side becomes ``image_size`` (long side rounded); for training the
            crop is centred with ``left = (new_w - image_size) // 2`` (same for ``top``).
        """
        s = self.image_size
        new_w, new_h = _short_side_size(width, height, s)
        if self.train_transform:
            return new_w, new_h, (new_w - s) // 2, (new_h - s) // 2, s, s
        return new_w, new_h, 0, 0, new_w, new_h

    def _transform_boxes(
        self, boxes: np.ndarray, width: int, height: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Map ``(N, 4)`` boxes of the original image into the output image.

        Returns:
            Transformed boxes ``(N, 4)`` float32 and a ``(N,)`` bool mask of boxes that keep at
            least 1 px of width and height inside the output image.
        """
        new_w, new_h, left, top, out_w, out_h = self._geometry(width, height)
        scale = np.array([new_w / width, new_h / height] * 2, dtype=np.float32)
        offset = np.array([left, top, left, top], dtype=np.float32)
        out = boxes * scale - offset
        out[:, 0::2] = out[:, 0::2].clip(0, out_w)
        out[:, 1::2] = out[:, 1::2].clip(0, out_h)
        valid = ((out[:, 2] - out[:, 0]) >= 1.0) & ((out[:, 3] - out[:, 1]) >= 1.0)
        return out, valid

    # -- public API -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor, torch.Tensor]:
        """Return ``(image_path, image (3, H, W), gt_boxes (max_boxes, 5))``; see module doc."""
        path, image, gt_boxes = self.load_uint8(index)
        return path, normalize_uint8(image), gt_boxes

    def load_uint8(self, index: int) -> tuple[str, torch.Tensor, torch.Tensor]:
        """Item ``index`` before normalisation: ``image`` is ``(3, H, W)`` uint8 RGB.

        ``normalize_uint8`` of it gives exactly ``self[index]``'s image; this is what
        :class:`CachedDetection` stores.
        """
        path = self._image_paths[index]
        try:
            image = read_rgb_image(path)
        except CorruptImageError as err:
            raise CorruptImageError(
                f"{err} (item {index}, image id '{self.image_ids[index]}' of split "
                f"'{self.split}'). Pass skip_corrupt=True to leave unreadable images out."
            ) from err
        width, height = image.size
        boxes, classes = self._boxes[index], self._classes[index]
        if (width, height) != self._sizes[index]:
            # Header disagrees with the XML <size>: trust the pixels, re-clip the boxes.
            boxes = boxes.copy()
            boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
            boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
        new_w, new_h, left, top, out_w, out_h = self._geometry(width, height)
        image = image.resize((new_w, new_h), Image.BILINEAR)
        if (left, top, out_w, out_h) != (0, 0, new_w, new_h):
            image = image.crop((left, top, left + out_w, top + out_h))

        out, valid = self._transform_boxes(boxes, width, height)
        valid &= ~self._difficult[index]
        rows = np.concatenate([out, classes[:, None].astype(np.float32)], axis=1)[valid]
        if len(rows) > self.max_boxes:
            if path not in self._warned:
                self._warned.add(path)
                warnings.warn(
                    f"{path}: {len(rows)} objects but max_boxes={self.max_boxes}; keeping the "
                    f"{self.max_boxes} largest.",
                    stacklevel=2,
                )
            area = (rows[:, 2] - rows[:, 0]) * (rows[:, 3] - rows[:, 1])
            kept = np.sort(np.argsort(-area, kind="stable")[: self.max_boxes])
            rows = rows[kept]
        gt_boxes = torch.full((self.max_boxes, 5), -1.0)
        gt_boxes[: len(rows)] = torch.from_numpy(rows)
        return path, _to_uint8_tensor(image), gt_boxes

    def annotation(self, index: int) -> dict[str, Any]:
        """All objects of item ``index`` (difficult ones included) in output-image pixels.

        Returns:
            dict with ``image_path`` (str), ``image_id`` (str), ``boxes`` ``(N, 4)`` float32,
            ``classes`` ``(N,)`` int64 and ``difficult`` ``(N,)`` bool tensors. Objects cropped
            away by the training transform are left out.
        """
        path = self._image_paths[index]
        width, height = _image_size(path)  # header only: cheap
        boxes = self._boxes[index].copy()
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
        out, valid = self._transform_boxes(boxes, width, height)
        return {
            "image_path": path,
            "image_id": self.image_ids[index],
            "boxes": torch.from_numpy(out[valid]),
            "classes": torch.from_numpy(self._classes[index][valid]),
            "difficult": torch.from_numpy(self._difficult[index][valid]),
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


class CachedDetection(torch.utils.data.Dataset):
    """A reader's items decoded and resized once, kept as uint8 tensors.

    Decoding a JPEG and resizing it costs milliseconds per image, every epoch; normalising a
    cached uint8 tensor costs microseconds. Items are exactly the wrapped dataset's
    (``torch.equal`` images and boxes): the wrapped reader's transform is deterministic, so
    it is applied once, and only the float conversion and normalisation run per access.

    With ``cache_dir`` the tensors are also written to one file there (atomically: a temp file,
    then a rename), named after the split, image size and transform, and reused by later runs
    while the dataset's settings and its files' sizes and modification times are unchanged;
    otherwise the file is rebuilt. Without ``cache_dir`` the cache lives in memory only. About
    ``3 * image_size**2 * 4/3`` bytes per image: 1 GB for VOC 2007 trainval at 224 px.

    Attribute lookups the cache does not answer (``class_names``, ``annotation``,
    ``annotation_for_path``, ...) go to the wrapped dataset.

    Args:
        dataset: a :class:`VOCLayoutDetection` (or anything with ``load_uint8(index)``
            returning ``(path, image (3, H, W) uint8, gt_boxes)`` and ``__len__``).
        cache_dir: folder for the cache file, e.g. ``<dataset root>/.cache``; ``None`` keeps
            the cache in memory only.
        progress: show a progress bar while building.
        normalize: ``True`` gives the reader's float32 normalised images. ``False`` gives the
            cached uint8 images as they are: a quarter of the bytes to send from DataLoader
            workers; :func:`train_detector` normalises uint8 batches on its device.
    """

    def __init__(
        self,
        dataset: Any,
        cache_dir: str | os.PathLike | None = None,
        progress: bool = False,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        self.dataset = dataset
        self.normalize = normalize
        self.cache_file: Path | None = None
        key = json.loads(json.dumps(self._key(dataset)))  # plain lists, as it is stored
        if cache_dir is not None:
            digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
            name = f"{getattr(dataset, 'split', 'data')}-{digest}.pt"
            self.cache_file = Path(cache_dir) / name
            cached = self._read(self.cache_file, key)
            if cached is not None:
                self._paths, self._images, self._boxes = cached
                return
        self._paths, self._images, self._boxes = self._build(dataset, progress)
        if self.cache_file is not None:
            self._write(self.cache_file, key)

    @staticmethod
    def _key(dataset: Any) -> dict[str, Any]:
        """What the cached items depend on: reader settings and every file's size and mtime."""
        paths = [str(p) for p in getattr(dataset, "_image_paths", [])]
        files = [os.stat(p) for p in paths]
        return {
            "format": 1,
            "type": type(dataset).__name__,
            "root": str(getattr(dataset, "root", "")),
            "split": getattr(dataset, "split", None),
            "image_size": getattr(dataset, "image_size", None),
            "max_boxes": getattr(dataset, "max_boxes", None),
            "train_transform": getattr(dataset, "train_transform", None),
            "class_names": list(getattr(dataset, "class_names", [])),
            "image_ids": list(getattr(dataset, "image_ids", [])),
            "files": [(f.st_size, f.st_mtime_ns) for f in files],
        }

    @staticmethod
    def _build(dataset: Any, progress: bool) -> tuple[list, list, torch.Tensor]:
        from tqdm.auto import tqdm

        paths, images, boxes = [], [], []
        for index in tqdm(range(len(dataset)), desc="cache", disable=not progress):
            path, image, gt_boxes = dataset.load_uint8(index)
            paths.append(path)
            images.append(image.contiguous())
            boxes.append(gt_boxes)
        stacked = torch.stack(boxes) if boxes else torch.zeros(0, 0, 5)
        return paths, images, stacked

    def _read(self, path: Path, key: dict[str, Any]) -> tuple[list, list, torch.Tensor] | None:
        if not path.is_file():
            return None
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated or foreign file: rebuild it
            warnings.warn(f"Unreadable dataset cache {path} ({exc}); rebuilding.", stacklevel=3)
            return None
        if not isinstance(payload, dict) or payload.get("key") != key:
            return None
        return payload["paths"], payload["images"], payload["boxes"]

    def _write(self, path: Path, key: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"key": key, "paths": self._paths, "images": self._images, "boxes": self._boxes}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
        try:
            torch.save(payload, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor, torch.Tensor]:
        """``(image_path, image (3, H, W), gt_boxes (max_boxes, 5))``; see ``normalize``."""
        image = self._images[index]
        image = normalize_uint8(image) if self.normalize else image
        return self._paths[index], image, self._boxes[index].clone()

    def load_uint8(self, index: int) -> tuple[str, torch.Tensor, torch.Tensor]:
        return self._paths[index], self._images[index], self._boxes[index].clone()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("dataset", "normalize"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __repr__(self) -> str:
        where = self.cache_file or "memory"
        return f"CachedDetection({self.dataset!r}, cache={where})"


# ----------------------------------------------------------------------------------------------
# PASCAL VOC 2007
# ----------------------------------------------------------------------------------------------


def _manual_instructions(dataset_dir: Path, archive_name: str) -> str:
    return (
        f"To install by hand, download {archive_name} and extract it into {dataset_dir} so that "
        f"{dataset_dir / 'VOCdevkit' / 'VOC2007' / 'Annotations'}, .../JPEGImages and "
        ".../ImageSets/Main/{train,val}.txt exist."
    )


def _fetch(url: str, destination: Path) -> None:
    """Copy ``url`` to ``destination``: ``file://`` URLs directly, others with torchvision's
    ``download_url`` (redirects followed, tqdm progress bar)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        source = Path(urllib.request.url2pathname(parsed.path))
        shutil.copyfile(source, destination)
        return
    download_url(url, str(destination.parent), filename=destination.name, md5=None)


def download_voc2007(
    dataset_dir: str | os.PathLike,
    urls: Sequence[str] | None = None,
    archive_name: str | None = None,
    md5: str | None = None,
) -> Path:
    """Download, verify and extract the VOC2007 trainval archive into ``dataset_dir``.

    Mirrors are tried in order. Each download goes to ``<archive_name>.part``; it is renamed to
    ``<archive_name>`` only once its MD5 matches, so a partial or corrupt file is never taken as
    done. Extraction happens in a temporary folder that is moved to ``VOCdevkit/VOC2007`` when
    complete. Nothing is downloaded when the data or a verified archive is already present.

    Args:
        dataset_dir: Folder that receives the archive and ``VOCdevkit/VOC2007``.
        urls: Mirrors to try; default :data:`VOC2007_URLS` (read at call time).
        archive_name: Archive file name; default :data:`VOC2007_ARCHIVE`.
        md5: Expected checksum; default :data:`VOC2007_MD5`.

    Returns:
        Path of ``<dataset_dir>/VOCdevkit/VOC2007``.

    Raises:
        RuntimeError: When no mirror delivers a file with the right checksum; the message lists
            every URL tried with its error and explains how to place the files by hand.
    """
    dataset_dir = Path(dataset_dir).expanduser()
    urls = list(VOC2007_URLS if urls is None else urls)
    archive_name = archive_name or VOC2007_ARCHIVE
    md5 = md5 or VOC2007_MD5
    target = dataset_dir / "VOCdevkit" / "VOC2007"
    if (target / "ImageSets" / "Main").is_dir():
        return target
    dataset_dir.mkdir(parents=True, exist_ok=True)
    archive = dataset_dir / archive_name

    if not check_integrity(archive, md5):
        part = dataset_dir / f"{archive_name}.part"
        errors: list[str] = []
        for url in urls:
            part.unlink(missing_ok=True)
            print(f"Downloading {url} ...")
            try:
                _fetch(url, part)
            except Exception as exc:  # noqa: BLE001 - any failure means: try the next mirror
                errors.append(f"  {url}: {type(exc).__name__}: {exc}")
                part.unlink(missing_ok=True)
                continue
            if check_integrity(part, md5):
                os.replace(part, archive)
                break
            errors.append(f"  {url}: MD5 mismatch (expected {md5}); file discarded")
            part.unlink(missing_ok=True)
        else:
            raise RuntimeError(
                f"Could not download {archive_name} from any mirror:\n"
                + "\n".join(errors)
                + "\n"
                + _manual_instructions(dataset_dir, archive_name)
            )

    staging = Path(tempfile.mkdtemp(prefix=".voc-extract-", dir=dataset_dir))
    try:
        print(f"Extracting {archive} ...")
        extract_archive(str(archive), str(staging))
        extracted = staging / "VOCdevkit" / "VOC2007"
        if not (extracted / "ImageSets" / "Main").is_dir():
            raise RuntimeError(
                f"{archive} does not contain VOCdevkit/VOC2007/ImageSets/Main. "
                + _manual_instructions(dataset_dir, archive_name)
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(extracted, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


class VOC2007DetectionTiny(VOCLayoutDetection):
    """PASCAL VOC 2007 detection data as used by the notebook.

    Reads ``<dataset_dir>/VOCdevkit/VOC2007`` with the 20 VOC classes in alphabetical order
    (:data:`VOC_CLASSES`). Splits are the VOC2007 ``ImageSets/Main`` files, e.g. ``"train"`` and
    ``"val"``; only images with at least one non-difficult object are kept. ``"train"`` items are
    resized and centre-cropped, other splits are resized only (see the module docstring).

    Args:
        dataset_dir: Folder holding (or receiving) ``VOCdevkit/VOC2007``.
        split: ``"train"`` or ``"val"`` (any split file present works).
        download: Fetch and extract the official trainval archive if the data is missing.
        image_size: Short side after resizing (and crop size for training).
        max_boxes: Rows of ``gt_boxes``.
        skip_corrupt: Leave out unreadable images (see :class:`VOCLayoutDetection`).
        urls / archive_name / md5: Overrides for the download (defaults: module constants).
    """

    def __init__(
        self,
        dataset_dir: str | os.PathLike,
        split: str = "train",
        download: bool = False,
        image_size: int = 224,
        *,
        max_boxes: int = 40,
        skip_corrupt: bool = False,
        urls: Sequence[str] | None = None,
        archive_name: str | None = None,
        md5: str | None = None,
    ) -> None:
        dataset_dir = Path(dataset_dir).expanduser()
        if download:
            download_voc2007(dataset_dir, urls=urls, archive_name=archive_name, md5=md5)
        super().__init__(
            dataset_dir / "VOCdevkit" / "VOC2007",
            split,
            VOC_CLASSES,
            image_size=image_size,
            max_boxes=max_boxes,
            train_transform=split == "train",
            skip_empty=True,
            skip_corrupt=skip_corrupt,
            how_to_get="Pass download=True, or "
            + _manual_instructions(dataset_dir, archive_name or VOC2007_ARCHIVE),
        )


# ----------------------------------------------------------------------------------------------
# Generated shapes dataset
# ----------------------------------------------------------------------------------------------

#: Classes of the generated dataset: one shape per class, each drawn in its own colour family.
SHAPES_CLASSES: tuple[str, ...] = (
    "red_circle",
    "green_square",
    "blue_triangle",
    "yellow_diamond",
    "purple_cross",
)
_SHAPE_HUES = (0.0, 1 / 3, 0.62, 0.15, 0.8)  # hue centre of each class' colour family
_SHAPES_VERSION = 1


def _shapes_background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Textured, noisy, muted background: ``(height, width, 3)`` uint8."""
    grid = rng.uniform(60, 200, size=(int(rng.integers(3, 8)), int(rng.integers(3, 8)), 3))
    grey = grid.mean(axis=2, keepdims=True)
    grid = (0.4 * grid + 0.6 * grey).astype(np.uint8)  # desaturate so objects stand out
    base = np.asarray(Image.fromarray(grid).resize((width, height), Image.BICUBIC), np.float32)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    freq = rng.uniform(0.05, 0.4, size=2)
    stripes = np.sin(freq[0] * xx + freq[1] * yy + rng.uniform(0, 2 * np.pi))
    base += rng.uniform(5, 20) * stripes[..., None]
    base += rng.normal(0.0, rng.uniform(4, 12), size=base.shape)
    return base.clip(0, 255).astype(np.uint8)


def _shape_polygon(cls: int, x1: float, y1: float, x2: float, y2: float) -> list[tuple]:
    cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
    if cls == 2:  # triangle
        return [(cx, y1), (x2, y2), (x1, y2)]
    if cls == 3:  # diamond
        return [(cx, y1), (x2, cy), (cx, y2), (x1, cy)]
    t, u = w / 6, h / 6  # cross: plus sign with arms one third thick
    return [
        (cx - t, y1), (cx + t, y1), (cx + t, cy - u), (x2, cy - u), (x2, cy + u), (cx + t, cy + u),
        (cx + t, y2), (cx - t, y2), (cx - t, cy + u), (x1, cy + u), (x1, cy - u), (cx - t, cy - u),
    ]  # fmt: skip


def _overlap(box: np.ndarray, boxes: np.ndarray) -> float:
    """Largest IoU of one ``(4,)`` box with ``(N, 4)`` boxes (``common.box_iou``)."""
    return box_iou(torch.from_numpy(box[None]), torch.from_numpy(np.asarray(boxes))).max().item()


def _make_shapes_image(
    rng: np.random.Generator, width: int, height: int, max_objects: int
) -> tuple[Image.Image, list[dict[str, Any]]]:
    """Draw one image; returns it with its objects (class, box, truncated, difficult)."""
    image = Image.fromarray(_shapes_background(rng, width, height))
    draw = ImageDraw.Draw(image)
    short = min(width, height)
    placed = np.zeros((0, 4), dtype=np.float64)
    objects: list[dict[str, Any]] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(30):
            side = short * math.exp(rng.uniform(math.log(0.08), math.log(0.8)))
            aspect = rng.uniform(0.75, 1.33)
            w, h = side * math.sqrt(aspect), side / math.sqrt(aspect)
            cx, cy = rng.uniform(0, width), rng.uniform(0, height)
            full = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
            clipped = np.array(
                [max(full[0], 0), max(full[1], 0), min(full[2], width), min(full[3], height)]
            )
            visible = np.prod(clipped[2:] - clipped[:2]) / (w * h)
            if visible < 0.5 or min(clipped[2:] - clipped[:2]) < 4:
                continue
            if len(placed) and _overlap(clipped, placed) > 0.35:
                continue
            cls = int(rng.integers(len(SHAPES_CLASSES)))
            placed = np.vstack([placed, clipped])
            small = min(clipped[2:] - clipped[:2]) < 0.1 * short
            difficult = (small and rng.uniform() < 0.15) or visible < 0.6
            objects.append(
                {
                    "cls": cls,
                    "full": full,
                    "box": clipped,
                    "difficult": difficult,
                    "truncated": visible < 0.999,
                }
            )
            break
    if objects and all(o["difficult"] for o in objects):
        objects[0]["difficult"] = False
    # Large shapes first so that small ones stay visible on top.
    for obj in sorted(objects, key=lambda o: -np.prod(o["box"][2:] - o["box"][:2])):
        hue = (_SHAPE_HUES[obj["cls"]] + rng.uniform(-0.03, 0.03)) % 1.0
        rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.65, 1.0), rng.uniform(0.7, 1.0))
        fill = tuple(int(255 * c) for c in rgb)
        edge = tuple(int(0.5 * c) for c in fill)
        x1, y1, x2, y2 = (float(v) for v in obj["full"])
        if obj["cls"] == 0:
            draw.ellipse((x1, y1, x2, y2), fill=fill, outline=edge, width=2)
        elif obj["cls"] == 1:
            draw.rectangle((x1, y1, x2, y2), fill=fill, outline=edge, width=2)
        else:
            draw.polygon(_shape_polygon(obj["cls"], x1, y1, x2, y2), fill=fill, outline=edge)
    return image, objects


def _voc_xml(filename: str, width: int, height: int, objects: list[dict[str, Any]]) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "JPEGImages"
    ET.SubElement(root, "filename").text = filename
    size = ET.SubElement(root, "size")
    for tag, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    for obj in objects:
        node = ET.SubElement(root, "object")
        ET.SubElement(node, "name").text = SHAPES_CLASSES[obj["cls"]]
        ET.SubElement(node, "truncated").text = str(int(obj["truncated"]))
        ET.SubElement(node, "difficult").text = str(int(obj["difficult"]))
        bndbox = ET.SubElement(node, "bndbox")
        x1, y1, x2, y2 = obj["box"]
        coords = (math.floor(x1), math.floor(y1), math.ceil(x2), math.ceil(y2))
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), coords, strict=True):
            ET.SubElement(bndbox, tag).text = str(value)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8")


def make_shapes_dataset(
    root: str | os.PathLike,
    num_train: int = 160,
    num_val: int = 40,
    image_size: int = 128,
    seed: int = 0,
    max_objects: int = 6,
) -> Path:
    """Write a generated detection dataset in PASCAL VOC layout and return its root.

    Each image shows 1..``max_objects`` shapes (:data:`SHAPES_CLASSES`: shape and colour family
    define the class) on a textured, noisy background. Objects range from about 8% to 80% of the
    short image side, may overlap a little (IoU <= 0.35) and may be cut by the border (at least
    half visible). Small or strongly truncated objects are sometimes flagged difficult; every
    image keeps at least one non-difficult object. Image sizes vary between
    ``image_size x image_size``, ``image_size x 3/4 image_size`` and the transpose.

    The output is deterministic for a given seed. When ``root`` already holds a dataset written
    with the same settings (``shapes_settings.json``) nothing is regenerated; a folder with other
    settings written by this function is replaced; any other existing folder raises.

    Writes ``JPEGImages/<id>.jpg``, ``Annotations/<id>.xml`` and
    ``ImageSets/Main/{train,val,trainval}.txt``. Read it back with :class:`ShapesDetection` or
    ``VOCLayoutDetection(root, split, SHAPES_CLASSES)``.
    """
    root = Path(root)
    settings = {
        "version": _SHAPES_VERSION,
        "num_train": int(num_train),
        "num_val": int(num_val),
        "image_size": int(image_size),
        "seed": int(seed),
        "max_objects": int(max_objects),
        "classes": list(SHAPES_CLASSES),
    }
    stamp_name = "shapes_settings.json"
    if root.exists():
        stamp = root / stamp_name
        if stamp.is_file():
            try:
                if json.loads(stamp.read_text()) == settings:
                    return root
            except json.JSONDecodeError:
                pass
            shutil.rmtree(root)
        elif any(root.iterdir()):
            raise FileExistsError(f"{root} exists and was not written by make_shapes_dataset")
        else:
            root.rmdir()

    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
            (staging / sub).mkdir(parents=True)
        s = int(image_size)
        sizes = [(s, s), (s, (3 * s) // 4), ((3 * s) // 4, s)]
        ids = [f"{i:06d}" for i in range(num_train + num_val)]
        for i, image_id in enumerate(ids):
            rng = np.random.default_rng([seed, i])
            width, height = sizes[int(rng.integers(len(sizes)))]
            image, objects = _make_shapes_image(rng, width, height, max_objects)
            image.save(staging / "JPEGImages" / f"{image_id}.jpg", quality=92)
            xml = _voc_xml(f"{image_id}.jpg", width, height, objects)
            (staging / "Annotations" / f"{image_id}.xml").write_bytes(xml)
        main = staging / "ImageSets" / "Main"
        (main / "train.txt").write_text("".join(f"{i}\n" for i in ids[:num_train]))
        (main / "val.txt").write_text("".join(f"{i}\n" for i in ids[num_train:]))
        (main / "trainval.txt").write_text("".join(f"{i}\n" for i in ids))
        (staging / stamp_name).write_text(json.dumps(settings, indent=1))
        os.replace(staging, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


class ShapesDetection(VOCLayoutDetection):
    """The generated shapes dataset read through the VOC reader with :data:`SHAPES_CLASSES`.

    Args:
        root: Dataset folder.
        split: ``"train"``, ``"val"`` or ``"trainval"``.
        image_size: Short side after resizing (reader setting, not the generated size).
        max_boxes: Rows of ``gt_boxes``.
        train_transform: As for :class:`VOCLayoutDetection`.
        generate: Keyword arguments for :func:`make_shapes_dataset` (``num_train``, ``seed``,
            ``image_size``...). When given, the data is (re)generated unless ``root`` already
            holds exactly these settings. When ``None``, an existing dataset is read as it is
            and a missing one is generated with the defaults.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        image_size: int = 128,
        max_boxes: int = 40,
        train_transform: bool | None = None,
        generate: Mapping[str, Any] | None = None,
    ) -> None:
        if generate is not None or not Path(root).exists():
            make_shapes_dataset(root, **dict(generate or {}))
        super().__init__(root, split, SHAPES_CLASSES, image_size, max_boxes, train_transform)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


class LossHistory(list):
    """List of total losses per iteration; ``terms`` maps each loss name to its own history."""

    def __init__(self, values: Iterable[float] = (), terms: Mapping[str, list] | None = None):
        super().__init__(values)
        self.terms: dict[str, list[float]] = {k: list(v) for k, v in (terms or {}).items()}


class _LRFactor:
    """Learning-rate multiplier: linear warmup, then x``gamma`` at each milestone.

    A callable object (not a lambda) so that ``LambdaLR.state_dict`` stores it.
    """

    def __init__(
        self, milestones: Sequence[int], gamma: float, warmup_iters: int, warmup_factor: float
    ) -> None:
        self.milestones = list(milestones)
        self.gamma = gamma
        self.warmup_iters = warmup_iters
        self.warmup_factor = warmup_factor

    def __call__(self, iteration: int) -> float:
        factor = self.gamma ** sum(iteration >= m for m in self.milestones)
        if iteration < self.warmup_iters:
            alpha = iteration / self.warmup_iters
            factor *= self.warmup_factor * (1 - alpha) + alpha
        return factor


class _BatchStream:
    """Endless iterator over a loader whose position can be saved and restored.

    At the start of each pass over the loader the global torch RNG state (and the state of any
    ``torch.Generator`` owned by the loader or its sampler) is recorded, because the shuffling
    order and worker seeds of that pass are drawn from it. Restoring means: put those states
    back, start a new pass and skip the batches already consumed. Skipped batches are loaded
    and discarded, which costs some data-loading time on resume.
    """

    def __init__(self, loader: Iterable) -> None:
        self.loader = loader
        self.epoch = 0
        self.consumed = 0
        self._iterator: Iterator | None = None
        self._epoch_state: dict[str, Any] | None = None

    def _generators(self) -> list[torch.Generator]:
        found: list[torch.Generator] = []
        candidates = [
            getattr(self.loader, "generator", None),
            getattr(getattr(self.loader, "sampler", None), "generator", None),
            getattr(
                getattr(getattr(self.loader, "batch_sampler", None), "sampler", None),
                "generator",
                None,
            ),
        ]
        for gen in candidates:
            if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
                found.append(gen)
        return found

    def _set_sampler_epoch(self) -> None:
        """A ``DistributedSampler`` reshuffles per epoch only when told the epoch."""
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)

    def _start_pass(self) -> None:
        self._set_sampler_epoch()
        self._epoch_state = {
            "torch": torch.get_rng_state(),
            "generators": [g.get_state() for g in self._generators()],
        }
        self._iterator = iter(self.loader)
        self.consumed = 0

    def next(self) -> Any:
        if self._iterator is None:
            self._start_pass()
        try:
            batch = next(self._iterator)
        except StopIteration:
            self.epoch += 1
            self._start_pass()
            try:
                batch = next(self._iterator)
            except StopIteration:
                raise ValueError("train_loader yields no batches") from None
        self.consumed += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": self.consumed, "epoch_state": self._epoch_state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Fast-forward to the saved position. Changes the global torch RNG state."""
        if state.get("epoch_state") is None:
            return
        torch.set_rng_state(state["epoch_state"]["torch"])
        generators = self._generators()
        saved = state["epoch_state"]["generators"]
        if len(saved) != len(generators):
            warnings.warn(
                "Loader generators differ from the checkpoint; data order may differ.", stacklevel=2
            )
        for gen, gen_state in zip(generators, saved, strict=False):
            gen.set_state(gen_state)
        self._epoch_state = state["epoch_state"]
        self.epoch = int(state["epoch"])
        self._set_sampler_epoch()
        self._iterator = iter(self.loader)
        for _ in range(int(state["consumed"])):
            next(self._iterator)
        self.consumed = int(state["consumed"])


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "kind": np_state[0],
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["kind"],
            npst["key"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain_config(config: Any) -> Any:
    """Keep only plain data (numbers, strings, lists, tuples, dicts) so checkpoints load with
    ``torch.load(weights_only=True)``; other values are replaced by their ``repr``."""
    if config is None or isinstance(config, bool | int | float | str):
        return config
    if isinstance(config, list | tuple):
        return type(config)(_plain_config(v) for v in config)
    if isinstance(config, Mapping):
        return {str(k): _plain_config(v) for k, v in config.items()}
    if isinstance(config, torch.Tensor):
        return config.detach().cpu()
    return repr(config)


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically: temp file in the same folder, flushed to disk (``fsync``),
    then ``os.replace``. A process killed at any point leaves either the previous complete
    checkpoint or the new one at ``path``, plus at worst a stale ``.<name>.*.tmp`` file, which
    :func:`_remove_stale_temp_files` clears on resume."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_stale_temp_files(path: Path, report: bool = False) -> list[Path]:
    """Delete temp files that :func:`_save_checkpoint` left next to ``path`` when a process was
    killed mid-write (printing each one if ``report``); returns the deleted paths."""
    stale = sorted(path.parent.glob(f".{path.name}.*.tmp"))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
        if report:
            print(f"Removed {tmp}: left by a run killed while writing a checkpoint.")
    return stale


def config_differences(
    saved: Any, current: Any, prefix: str = "", names: tuple[str, str] = ("checkpoint", "model")
) -> list[str]:
    """Settings that differ between two nested config dicts, one readable line each.

    Example: ``["  backbone.out_channels: checkpoint 16, model 32"]``; ``names`` labels the two
    sides. Lists and tuples with equal items count as equal.
    """
    if isinstance(saved, Mapping) and isinstance(current, Mapping):
        lines = []
        for key in sorted(set(saved) | set(current), key=str):
            lines += config_differences(saved.get(key), current.get(key), f"{prefix}{key}.", names)
        return lines
    if isinstance(saved, list | tuple) and isinstance(current, list | tuple):
        saved, current = list(saved), list(current)
    if saved != current:
        return [f"  {prefix.rstrip('.')}: {names[0]} {saved!r}, {names[1]} {current!r}"]
    return []


def load_model_weights(
    detector: nn.Module, checkpoint: Mapping[str, Any], path: str | os.PathLike
) -> None:
    """``detector.load_state_dict(checkpoint["model"])``; a mismatch raises a ValueError that
    names the differing configuration settings instead of listing state_dict keys. When neither
    side records a differing setting, it summarises the weights that do not fit instead."""
    try:
        detector.load_state_dict(checkpoint["model"])
    except RuntimeError as err:
        saved = checkpoint.get("config")
        current = _plain_config(getattr(detector, "config", None))
        lines = config_differences(saved, current) if saved and current else []
        if not lines:
            note = "no recorded setting differs" if saved and current else "no configuration"
            lines = [f"  ({note}; {_weights_mismatch(checkpoint['model'], detector)})"]
        detail = "\n".join(lines)
        raise ValueError(
            f"Checkpoint {path} does not match this model. Settings that differ:\n{detail}"
        ) from err


def _weights_mismatch(saved: Mapping[str, torch.Tensor], detector: nn.Module) -> str:
    """One line: how many weights are missing or unexpected, and the first shape mismatches."""
    current = detector.state_dict()
    missing = [k for k in current if k not in saved]
    unexpected = [k for k in saved if k not in current]
    shapes = [
        f"{k} {tuple(saved[k].shape)} vs {tuple(v.shape)}"
        for k, v in current.items()
        if k in saved and tuple(saved[k].shape) != tuple(v.shape)
    ]
    parts = [f"{len(missing)} weights missing", f"{len(unexpected)} unexpected"]
    if shapes:
        parts.append(f"{len(shapes)} of another shape, e.g. " + "; ".join(shapes[:3]))
    return ", ".join(parts)


def _load_resume_checkpoint(
    path: Path, detector: nn.Module, train_args: Mapping[str, Any]
) -> dict[str, Any]:
    """Load a checkpoint for ``train_detector(resume=True)`` and restore the model weights.

    Raises a ValueError when the file is not a resumable train_detector checkpoint or its
    weights do not fit (naming the differing settings); warns when model settings outside the
    weights, or training arguments, differ.
    """
    checkpoint = load_checkpoint(path, map_location="cpu")  # RNG states must be CPU tensors
    needed = ("optimizer", "scheduler", "iteration", "max_iters", "rng", "data", "loss_history")
    absent = [key for key in needed if key not in checkpoint]
    if absent:
        raise ValueError(
            f"{path} cannot be resumed: it has no {', '.join(absent)} (not written by "
            "train_detector). Load its weights with load_checkpoint(path, detector) and train "
            "without resume, or use another checkpoint_path."
        )
    load_model_weights(detector, checkpoint, path)
    current = _plain_config(getattr(detector, "config", None))
    if checkpoint.get("config") is not None and current is not None:
        lines = config_differences(checkpoint["config"], current)
        if lines:
            warnings.warn(
                f"Resuming {path} with a model whose settings differ from the checkpoint's "
                "(the weights fit; the run will not equal an uninterrupted one):\n"
                + "\n".join(lines),
                stacklevel=3,
            )
    saved_args = {k: v for k, v in checkpoint.get("train_args", {}).items() if k != "max_iters"}
    args = {k: v for k, v in train_args.items() if k != "max_iters"}
    lines = config_differences(saved_args, args, names=("checkpoint", "now"))
    if lines:
        warnings.warn(
            f"Resuming {path} with other training arguments; the checkpoint's optimizer and "
            "schedule settings are kept:\n" + "\n".join(lines),
            stacklevel=3,
        )
    return checkpoint


def _check_finite_weights(detector: nn.Module, iteration: int) -> None:
    """Raise a FloatingPointError naming the first non-finite weight or buffer before the
    checkpoint of ``iteration`` completed iterations is written."""
    broken = _first_non_finite_tensor(detector)
    if broken is not None:
        raise FloatingPointError(
            f"{broken} is NaN or infinite after iteration {iteration - 1} (a non-finite "
            "gradient from a finite loss); checkpoint not written, so the one on disk is the "
            "last good state."
        )


def _first_non_finite_tensor(detector: nn.Module) -> str | None:
    """Name of the first parameter or floating-point buffer holding a NaN or infinity, or
    ``None``. One host-device sync when everything is finite."""
    named = [
        (name, t)
        for name, t in (*detector.named_parameters(), *detector.named_buffers())
        if t.is_floating_point()
    ]
    if not named:
        return None
    finite = torch.stack([torch.isfinite(t).all() for _, t in named])
    if bool(finite.all()):
        return None
    return named[int((~finite).nonzero()[0, 0])][0]


def load_checkpoint(
    path: str | os.PathLike, detector: nn.Module | None = None, map_location: Any = "cpu"
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`train_detector` (``weights_only=True``).

    If ``detector`` is given its weights are restored. Returns the whole checkpoint dict (see
    :func:`train_detector` for its keys).

    Raises:
        FileNotFoundError: No file at ``path``.
        ValueError: The file is truncated or not a checkpoint, or (with ``detector``) its
            weights do not fit the model; the latter names the configuration settings that
            differ (e.g. ``backbone.out_channels: checkpoint 16, model 32``).
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"No checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - a damaged pickle fails in many ways (KeyError...)
        raise ValueError(
            f"Cannot read checkpoint {path} (truncated, corrupt or not a torch checkpoint): {err}"
        ) from err
    if not isinstance(checkpoint, Mapping) or "model" not in checkpoint:
        raise ValueError(f"{path} is not a train_detector checkpoint (no 'model' entry)")
    if detector is not None:
        load_model_weights(detector, checkpoint, path)
    return checkpoint


def _interactive_backend() -> bool:
    import matplotlib

    backend = matplotlib.get_backend().lower()
    return backend not in {"agg", "pdf", "ps", "svg", "cairo", "template", "pgf"}


def _plot_losses(history: Sequence[float], plot_path: str | os.PathLike | None, show: bool):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(np.arange(len(history)), np.asarray(history, dtype=np.float64), linewidth=1)
    ax.set_xlabel("Iteration")
    ax.set_ylabel("Total loss")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    if plot_path is not None:
        fig.savefig(plot_path, bbox_inches="tight")
    if show and _interactive_backend():
        plt.show()
    else:
        plt.close(fig)


def _flush_denormal_enabled() -> bool:
    """Whether CPU float math currently flushes subnormals to zero (torch has no getter)."""
    return (torch.tensor([1e-30], dtype=torch.float32) * 1e-10).item() == 0.0


def _distributed_world() -> tuple[int, int]:
    """``(world_size, rank)`` of the initialised process group, ``(1, 0)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def compile_detector(detector: nn.Module, **options: Any) -> nn.Module:
    """Compile the fixed-shape parts of a Faster R-CNN with ``torch.compile``, in place.

    Compiled: the backbone with its FPN, the RPN's prediction network and the second stage's
    conv stem (``cls_pred[0]``), which do nearly all the arithmetic. Anchor matching, sampling
    and NMS have data-dependent shapes and stay eager, as torchvision's detection models do.
    ``nn.Module.compile`` is used, so ``state_dict`` keys, checkpoints and ``train_detector``
    are unchanged. The first steps are slow while the graphs compile, and new input shapes
    (e.g. evaluation images of another size) compile again.

    Args:
        detector: ``FasterRCNN`` (anything with ``backbone``, ``rpn.pred_net`` and
            ``cls_pred``).
        **options: passed to ``torch.compile`` (``mode``, ``backend``, ``dynamic``, ...).

    Returns:
        ``detector`` itself.
    """
    for part in (detector.backbone, detector.rpn.pred_net, detector.cls_pred[0]):
        part.compile(**options)
    return detector


def train_detector(
    detector: nn.Module,
    train_loader: Iterable,
    learning_rate: float = 5e-3,
    weight_decay: float = 1e-4,
    max_iters: int = 5000,
    log_period: int = 20,
    device: str | torch.device = "cpu",
    *,
    momentum: float = 0.9,
    lr_milestones: Sequence[float] = (0.6, 0.9),
    lr_gamma: float = 0.1,
    warmup_iters: int = 100,
    warmup_factor: float = 0.001,
    amp: bool = False,
    grad_clip: float | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_period: int = 500,
    resume: bool = False,
    show_plot: bool = True,
    plot_path: str | os.PathLike | None = None,
    progress: bool = True,
    sync_period: int = 20,
) -> LossHistory:
    """Train ``detector`` with SGD for ``max_iters`` iterations.

    Each batch of ``train_loader`` is ``(image_paths, images (B, 3, H, W), gt_boxes (B, N, 5))``.
    The detector is called in training mode as ``detector(images, gt_boxes)`` and must return
    a dict; every entry whose key contains ``"loss"`` is a scalar loss and they are summed
    (other entries, e.g. proposals, are ignored). The loader is cycled until ``max_iters``.

    Distributed training: when ``torch.distributed`` is initialised with more than one process
    (e.g. under ``torchrun``), the detector is wrapped in ``DistributedDataParallel`` (gradients
    averaged over processes), each process trains on its own batches (give its loader a
    ``DistributedSampler``; its epoch is set at every pass), the logged losses are averaged over
    processes, and only rank 0 prints, plots and writes checkpoints. All processes should be
    seeded alike: their RNG states then stay equal, and rank 0's checkpoint resumes all of them.

    Host-device syncs: loss values stay on the device and are read (one transfer) every
    ``sync_period`` iterations, at log lines and before checkpoints, not every iteration.

    On CPU, subnormal floats are flushed to zero (``torch.set_flush_denormal``) while training,
    and the previous setting is restored afterwards: a freshly initialised backbone otherwise
    makes convolutions about 100x slower.

    Schedule: SGD (momentum, weight decay) over parameters with ``requires_grad``; learning rate
    warmed up linearly from ``warmup_factor * learning_rate`` over ``warmup_iters`` iterations
    and multiplied by ``lr_gamma`` at each fraction of ``max_iters`` in ``lr_milestones``
    (default: at 60% and 90%).

    Args:
        detector: Model returning a loss dict in training mode.
        train_loader: Iterable of batches, usually a DataLoader.
        learning_rate, weight_decay, momentum: SGD settings.
        max_iters: Total number of iterations (also when resuming).
        log_period: Print a log line every ``log_period`` iterations.
        device: Device for the model and batches.
        lr_milestones, lr_gamma, warmup_iters, warmup_factor: Schedule (see above).
        amp: Mixed precision (``torch.autocast`` float16 + ``GradScaler``) on CUDA; ignored with
            a note on other devices.
        grad_clip: Clip the global gradient norm to this value (``None``: no clipping).
        checkpoint_path: Where to write checkpoints (``None``: none). Written atomically every
            ``checkpoint_period`` iterations and after the last one.
        resume: Continue from ``checkpoint_path`` if it exists: weights, optimizer, schedule,
            iteration count, loss history, RNG states and the loader position are restored, so
            on CPU the remaining losses equal those of an uninterrupted run. Data order is
            reproduced by replaying the loader's shuffling from the recorded RNG state and
            skipping the batches already used (they are loaded again, not trained on). Temp
            files left by a run killed while writing a checkpoint are deleted first.
        show_plot: Plot the loss history at the end (shown only on interactive backends).
        plot_path: Also save the plot there.
        progress: Show a tqdm progress bar with the current loss.
        sync_period: Read the loss values from the device at least this often (iterations).
            A non-finite loss is detected when they are read.

    Returns:
        :class:`LossHistory`: total loss per iteration (a list of floats) with ``.terms``
        holding each loss term's history. When resuming it includes the restored iterations.

    Raises:
        FloatingPointError: A loss is NaN or infinite. The message names the iteration and each
            loss term's value. Losses are checked before every checkpoint is written, so the
            last checkpoint on disk stays the last good one. Also raised, naming the parameter,
            when a checkpoint is due but a weight or buffer is not finite (a non-finite gradient
            from a finite loss); that checkpoint is not written.
        ValueError: ``resume`` finds a file that is not a resumable checkpoint, or whose
            weights do not fit ``detector``; the message names the settings that differ.
            Settings that differ without changing the weights, and training arguments that
            differ, only warn (the checkpoint's optimizer and schedule are kept).

    Checkpoint format (a dict saved with ``torch.save``; load with :func:`load_checkpoint`):
        ``format`` (str), ``iteration`` (completed iterations), ``max_iters``, ``model``,
        ``optimizer``, ``scheduler`` and ``scaler`` state dicts, ``loss_history`` (list),
        ``loss_terms`` (dict of lists), ``rng`` (python / numpy / torch / cuda states),
        ``data`` (loader position), ``config`` (``detector.config`` if present, else ``None``),
        ``meta`` (``detector.meta`` if present: e.g. class names and image size, for tools that
        load the checkpoint later) and ``train_args`` (the learning-rate settings).
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    use_amp = bool(amp) and device.type == "cuda"
    if amp and not use_amp:
        print(f"Note: amp=True is ignored on device '{device}' (mixed precision is CUDA-only).")
    # A random-init trunk makes subnormal floats early on, which slow CPU convs ~100x.
    flush_was_on = _flush_denormal_enabled()
    detector.to(device)
    detector.train()
    params = [p for p in detector.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params, lr=learning_rate, momentum=momentum, weight_decay=weight_decay
    )
    milestones = [int(f * max_iters) for f in lr_milestones]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _LRFactor(milestones, lr_gamma, warmup_iters, warmup_factor)
    )
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    stream = _BatchStream(train_loader)
    history = LossHistory()
    start_iter = 0
    checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
    train_args = {
        "learning_rate": learning_rate,
        "weight_decay": weight_decay,
        "momentum": momentum,
        "max_iters": max_iters,
        "lr_milestones": milestones,
        "lr_gamma": lr_gamma,
        "warmup_iters": warmup_iters,
        "warmup_factor": warmup_factor,
    }

    if resume:
        if checkpoint_path is None:
            raise ValueError("resume=True needs checkpoint_path")
        _remove_stale_temp_files(checkpoint_path, report=True)
        if checkpoint_path.is_file():
            # CPU first: RNG states must stay CPU tensors; load_state_dict moves the rest.
            ckpt = _load_resume_checkpoint(checkpoint_path, detector, train_args)
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            if ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            if ckpt["max_iters"] != max_iters:
                warnings.warn(
                    f"Resuming a run planned for {ckpt['max_iters']} iterations with "
                    f"max_iters={max_iters}; the schedule of the checkpoint is kept.",
                    stacklevel=2,
                )
            history = LossHistory(ckpt["loss_history"], ckpt.get("loss_terms"))
            start_iter = int(ckpt["iteration"])
            stream.load_state_dict(ckpt["data"])
            _set_rng_state(ckpt["rng"])
            print(f"Resumed from {checkpoint_path} at iteration {start_iter}.")
        else:
            print(f"No checkpoint at {checkpoint_path}; starting from scratch.")

    def save(iteration: int) -> None:
        config = getattr(detector, "config", None)
        _save_checkpoint(
            checkpoint_path,
            {
                "format": "a4_helper.train_detector/1",
                "iteration": iteration,
                "max_iters": max_iters,
                "model": detector.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if use_amp else None,
                "loss_history": list(history),
                "loss_terms": {k: list(v) for k, v in history.terms.items()},
                "rng": _rng_state(),
                "data": stream.state_dict(),
                "config": _plain_config(config),
                "meta": _plain_config(getattr(detector, "meta", None)),
                "train_args": train_args,
            },
        )

    world, rank = _distributed_world()
    model = detector
    if world > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(detector, device_ids=device_ids)
    main = rank == 0
    bar = tqdm(
        total=max_iters, initial=start_iter, disable=not (progress and main), desc="train",
        dynamic_ncols=True,
    )  # fmt: skip
    pending: list[tuple[int, torch.Tensor, float]] = []  # (iteration, loss values, lr)
    names: list[str] = []

    def read_losses() -> None:
        """Move the pending loss values to ``history`` (one sync); stop on a non-finite one."""
        if not pending:
            return
        values = torch.stack([v for _, v, _ in pending]).tolist()
        for (iteration, _, lr), row in zip(pending, values, strict=True):
            total_value, terms = row[0], dict(zip(names, row[1:], strict=True))
            if not math.isfinite(total_value):
                detail = ", ".join(f"{k}={v:.6g}" for k, v in terms.items())
                hint = (
                    " Earlier losses were finite, so the weights probably diverged: lower the "
                    "learning rate, set grad_clip, or use larger batches or images."
                    if history
                    else ""
                )
                raise FloatingPointError(
                    f"Non-finite loss at iteration {iteration}: total={total_value}, {detail}. "
                    "Training stopped; the last checkpoint (if any) is the last good state." + hint
                )
            history.append(total_value)
            for k, v in terms.items():
                history.terms.setdefault(k, []).append(v)
            if main and log_period and (iteration % log_period == 0 or iteration == max_iters - 1):
                parts = "".join(f"[{k}: {v:.3f}]" for k, v in terms.items())
                tqdm.write(f"[Iter {iteration}][loss: {total_value:.3f}]{parts}[lr: {lr:.2e}]")
        bar.set_postfix(loss=f"{history[-1]:.3f}", lr=f"{pending[-1][2]:.2e}")
        pending.clear()

    # Off the CPU, forward skips the class-id check (a sync); check batches on the host instead.
    host_check = getattr(detector, "check_inputs", None) if device.type != "cpu" else None
    start_time = time.time()
    if device.type == "cpu":  # set here: any error above must not leave it on (restored below)
        torch.set_flush_denormal(True)
    try:
        for iteration in range(start_iter, max_iters):
            _, images, gt_boxes = stream.next()
            if host_check is not None:
                host_check(gt_boxes=gt_boxes)  # still on the host: no device sync
            images = images.to(device, non_blocking=True)
            if images.dtype == torch.uint8:  # CachedDetection(normalize=False)
                images = normalize_uint8(images)
            gt_boxes = gt_boxes.to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                outputs = model(images, gt_boxes)
            terms = {k: v for k, v in outputs.items() if "loss" in k}
            if not terms:
                raise ValueError(f"detector returned no loss terms (keys: {list(outputs)})")
            names = list(terms)
            total = sum(v.float() for v in terms.values())
            values = torch.stack(
                [total.detach().reshape(())]
                + [v.detach().float().reshape(()) for v in terms.values()]
            )
            if world > 1:
                torch.distributed.all_reduce(values)
                values /= world

            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            if grad_clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            scaler.step(optimizer)
            scaler.update()
            pending.append((iteration, values, optimizer.param_groups[0]["lr"]))
            scheduler.step()
            bar.update(1)

            done = iteration + 1
            checkpoint_due = checkpoint_path is not None and (
                done % max(1, checkpoint_period) == 0 or done == max_iters
            )
            logging_due = log_period and iteration % log_period == 0
            if checkpoint_due or logging_due or len(pending) >= sync_period or done == max_iters:
                read_losses()
            if checkpoint_due:  # every rank: DDP keeps weights equal, so all stop together
                _check_finite_weights(detector, done)
            if checkpoint_due and main:
                save(done)
    finally:
        bar.close()
        torch.set_flush_denormal(flush_was_on)
    if progress and main and max_iters > start_iter:
        elapsed = time.time() - start_time
        print(f"Trained {max_iters - start_iter} iterations in {elapsed:.1f} s.")
    if main and (show_plot or plot_path is not None):
        _plot_losses(history, plot_path, show_plot)
    return history


# ----------------------------------------------------------------------------------------------
# Inference
# ----------------------------------------------------------------------------------------------


def _annotation_lookup(dataset: Any) -> Callable[[str], dict[str, Any]] | None:
    """Find ``annotation_for_path`` on a dataset, looking through ``Subset`` wrappers."""
    while dataset is not None:
        lookup = getattr(dataset, "annotation_for_path", None)
        if callable(lookup):
            return lookup
        dataset = getattr(dataset, "dataset", None)
    return None


def inference_with_detector(
    detector: nn.Module,
    test_loader: Iterable,
    idx_to_class: Mapping[int, str],
    score_thresh: float,
    nms_thresh: float,
    output_dir: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    max_show: int | None = None,
    progress: bool = True,
) -> Any:
    """Run the detector on every image of ``test_loader`` (batch size 1).

    The detector is put in eval mode and called under ``torch.no_grad()`` as
    ``detector(images, test_score_thresh=score_thresh, test_nms_thresh=nms_thresh)``, returning
    ``(boxes (N, 4), classes (N,), scores (N,))`` (or a one-element list of such tuples).

    Without ``output_dir``: each image is un-normalised and shown with its ground truth and
    detections by ``eecs598.utils.detection_visualizer`` (at most ``max_show`` images).

    With ``output_dir``: writes ``output_dir/ground-truth/<id>.txt`` and
    ``output_dir/detection-results/<id>.txt`` for every image (``<id>`` = image file stem; an
    empty detection file when nothing is detected), evaluates VOC mAP at IoU 0.5 with
    ``eecs598.mean_ap.MeanAPAccumulator``, prints the per-class table and returns the
    ``MeanAPResult``. Ground truth comes from the dataset's ``annotation_for_path`` when the
    loader's dataset (or the dataset under its ``Subset`` wrappers) has it, so difficult objects
    are marked as such; otherwise from the valid rows of ``gt_boxes`` (none difficult).

    Returns:
        ``MeanAPResult`` with ``output_dir``, else ``None``.
    """
    from tqdm.auto import tqdm

    from eecs598.mean_ap import MeanAPAccumulator, write_tool_files

    device = torch.device(device)
    detector.to(device=device, dtype=dtype)
    was_training = detector.training
    detector.eval()
    lookup = _annotation_lookup(getattr(test_loader, "dataset", None))
    accumulator = MeanAPAccumulator(dict(idx_to_class)) if output_dir is not None else None
    if output_dir is not None:
        output_dir = Path(output_dir)
        for sub in ("ground-truth", "detection-results"):
            (output_dir / sub).mkdir(parents=True, exist_ok=True)

    start_time = time.time()
    shown = 0
    try:
        with torch.no_grad():
            for image_paths, images, gt_boxes in tqdm(
                test_loader, disable=not progress or output_dir is None, desc="inference"
            ):
                if images.shape[0] != 1:
                    raise ValueError(
                        f"inference_with_detector needs a loader with batch_size=1, got a batch "
                        f"of {images.shape[0]}"
                    )
                path = image_paths[0]
                prediction = detector(
                    images.to(device=device, dtype=dtype),
                    test_score_thresh=score_thresh,
                    test_nms_thresh=nms_thresh,
                )
                if isinstance(prediction, list):
                    prediction = prediction[0]
                boxes, classes, scores = (t.detach().float().cpu() for t in prediction)
                classes = classes.long()

                if lookup is not None:
                    ann = lookup(path)
                    gt_xyxy, gt_cls, gt_diff = ann["boxes"], ann["classes"], ann["difficult"]
                else:
                    valid = gt_boxes[0][gt_boxes[0][:, 4] >= 0]
                    gt_xyxy, gt_cls = valid[:, :4], valid[:, 4].long()
                    gt_diff = torch.zeros(len(valid), dtype=torch.bool)

                if output_dir is None:
                    if max_show is not None and shown >= max_show:
                        break
                    _show_detections(
                        images[0], idx_to_class, gt_xyxy, gt_cls, boxes, classes, scores
                    )
                    shown += 1
                    continue
                image_id = Path(path).stem
                write_tool_files(
                    output_dir,
                    image_id,
                    gt_xyxy,
                    gt_cls,
                    gt_diff,
                    boxes,
                    classes,
                    scores,
                    idx_to_class,
                )
                accumulator.add(image_id, gt_xyxy, gt_cls, gt_diff, boxes, classes, scores)
    finally:
        detector.train(was_training)
    print(f"Total inference time: {time.time() - start_time:.1f} s")
    if accumulator is None:
        return None
    result = accumulator.compute(iou_threshold=0.5)
    print(result.summary())
    return result


def _show_detections(
    image: torch.Tensor,
    idx_to_class: Mapping[int, str],
    gt_boxes: torch.Tensor,
    gt_classes: torch.Tensor,
    boxes: torch.Tensor,
    classes: torch.Tensor,
    scores: torch.Tensor,
) -> None:
    """Show one ``(3, H, W)`` normalised image with GT ``(N, 4)`` and detections ``(M, 4)``."""
    import matplotlib.pyplot as plt

    from eecs598.utils import detection_visualizer

    gt = torch.cat([gt_boxes, gt_classes[:, None].float()], dim=1)
    pred = torch.cat([boxes, classes[:, None].float(), scores[:, None]], dim=1)
    fig = detection_visualizer(unnormalize_image(image.cpu()), idx_to_class, gt, pred, show=True)
    plt.close(fig)  # already shown (or headless); avoid piling up open figures
