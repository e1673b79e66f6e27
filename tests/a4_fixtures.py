"""Small hand-made VOC-layout datasets for the ``a4_helper`` tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# Repository's sibling folder with shared data; absent on some machines (tests then skip).
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def write_xml(path: Path, filename: str, size: tuple[int, int] | None, objects: list) -> None:
    """Write one annotation; ``objects`` rows are ``(name, (x1, y1, x2, y2), difficult)``."""
    parts = ["<annotation>", f"<filename>{filename}</filename>"]
    if size is not None:
        parts.append(f"<size><width>{size[0]}</width><height>{size[1]}</height></size>")
    for name, box, difficult in objects:
        coords = "".join(
            f"<{tag}>{value}</{tag}>"
            for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True)
        )
        parts.append(
            f"<object><name>{name}</name><difficult>{int(difficult)}</difficult>"
            f"<bndbox>{coords}</bndbox></object>"
        )
    parts.append("</annotation>")
    path.write_text("\n".join(parts))


def write_dataset(root: Path, images: dict, splits: dict[str, list[str]]) -> Path:
    """Write a VOC-layout dataset.

    Args:
        images: ``{image_id: (pil_image, file_ext, objects)}``; ``objects`` as in
            :func:`write_xml`.
        splits: ``{split: [image_id, ...]}``.
    """
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for image_id, (image, ext, objects) in images.items():
        filename = f"{image_id}{ext}"
        image.save(root / "JPEGImages" / filename)
        write_xml(root / "Annotations" / f"{image_id}.xml", filename, image.size, objects)
    for split, ids in splits.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def noise_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Random RGB image converted to ``mode``."""
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(array).convert(mode)
