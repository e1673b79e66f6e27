"""A small generated detection dataset in PASCAL VOC layout, for offline runs and the tests."""

from __future__ import annotations

import colorsys
import json
import math
import os
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.ops import box_iou

from .files import atomic_directory
from .voc import VOCLayoutDetection

__all__ = ["SHAPES_CLASSES", "ShapesDetection", "make_shapes_dataset"]

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
    """Largest IoU of one ``(4,)`` box with ``(N, 4)`` boxes."""
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


_STAMP_NAME = "shapes_settings.json"


def _reuse_or_clear(root: Path, settings: dict[str, Any]) -> bool:
    """``True`` when ``root`` holds a dataset written with ``settings``. Otherwise clear a
    folder this module wrote (or an empty one) and return ``False``; any other folder raises."""
    if not root.exists():
        return False
    stamp = root / _STAMP_NAME
    if stamp.is_file():
        try:
            if json.loads(stamp.read_text()) == settings:
                return True
        except json.JSONDecodeError:
            pass
        shutil.rmtree(root)
    elif any(root.iterdir()):
        raise FileExistsError(f"{root} exists and was not written by make_shapes_dataset")
    else:
        root.rmdir()
    return False


def _write_shapes(folder: Path, settings: dict[str, Any]) -> None:
    """Draw every image of ``settings`` into ``folder`` with its XML and split files."""
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (folder / sub).mkdir(parents=True)
    s, seed, num_train = settings["image_size"], settings["seed"], settings["num_train"]
    sizes = [(s, s), (s, (3 * s) // 4), ((3 * s) // 4, s)]
    ids = [f"{i:06d}" for i in range(num_train + settings["num_val"])]
    for i, image_id in enumerate(ids):
        rng = np.random.default_rng([seed, i])
        width, height = sizes[int(rng.integers(len(sizes)))]
        image, objects = _make_shapes_image(rng, width, height, settings["max_objects"])
        image.save(folder / "JPEGImages" / f"{image_id}.jpg", quality=92)
        xml = _voc_xml(f"{image_id}.jpg", width, height, objects)
        (folder / "Annotations" / f"{image_id}.xml").write_bytes(xml)
    main = folder / "ImageSets" / "Main"
    (main / "train.txt").write_text("".join(f"{i}\n" for i in ids[:num_train]))
    (main / "val.txt").write_text("".join(f"{i}\n" for i in ids[num_train:]))
    (main / "trainval.txt").write_text("".join(f"{i}\n" for i in ids))
    (folder / _STAMP_NAME).write_text(json.dumps(settings, indent=1))


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
    settings written by this function is replaced; any other existing folder raises. The data
    is written to a staging folder that becomes ``root`` only when complete.

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
    if not _reuse_or_clear(root, settings):
        with atomic_directory(root) as staging:
            _write_shapes(staging, settings)
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
