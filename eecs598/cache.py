"""Decode and resize a dataset's images once, and keep them as uint8 tensors."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from .files import atomic_write
from .images import normalize_uint8

__all__ = ["CachedDetection"]


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
        paths = [str(p) for p in getattr(dataset, "image_paths", [])]
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
        payload = {"key": key, "paths": self._paths, "images": self._images, "boxes": self._boxes}
        with atomic_write(path) as handle:
            torch.save(payload, handle)

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor, torch.Tensor]:
        """``(image_path, image (3, H, W), gt_boxes (max_boxes, 5))``; see ``normalize``."""
        image = self._images[index]
        image = normalize_uint8(image) if self.normalize else image
        return self._paths[index], image, self._boxes[index].clone()

    def load_uint8(self, index: int) -> tuple[str, torch.Tensor, torch.Tensor]:
        """The cached ``(image_path, image (3, H, W) uint8, gt_boxes)`` of item ``index``."""
        return self._paths[index], self._images[index], self._boxes[index].clone()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("dataset", "normalize"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __repr__(self) -> str:
        where = self.cache_file or "memory"
        return f"CachedDetection({self.dataset!r}, cache={where})"
