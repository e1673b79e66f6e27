"""Decoding images and turning them into the tensors the model takes.

Every image the package reads goes through :func:`read_rgb_image` (any mode to 8-bit RGB,
unreadable files raise :class:`CorruptImageError` naming the file), and every image the model
sees is ``normalize_uint8`` of a ``(3, H, W)`` uint8 tensor: float32, ImageNet mean and std.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "CorruptImageError",
    "image_file_size",
    "normalize_uint8",
    "preprocess_image",
    "read_rgb_image",
    "short_side_size",
    "to_rgb",
    "to_uint8_tensor",
    "unnormalize_image",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Image file endings the readers and the command line look for (compared in lower case).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp")

# 16-bit integer modes: PIL's own conversion to RGB clips them at 255 (an all-white image).
_WIDE_INT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class CorruptImageError(ValueError):
    """An image file exists but cannot be decoded (truncated, corrupt or not an image)."""


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
    except _DECODE_ERRORS as err:
        raise CorruptImageError(f"Cannot decode image {path}: {err}") from err


def image_file_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` from the image header; :class:`CorruptImageError` if unreadable."""
    try:
        with Image.open(path) as img:
            return img.size
    except FileNotFoundError:
        raise
    except _DECODE_ERRORS as err:
        raise CorruptImageError(f"Cannot decode image {path}: {err}") from err


def short_side_size(width: int, height: int, image_size: int) -> tuple[int, int]:
    """``(new_w, new_h)`` with the short side ``image_size`` and the long side rounded."""
    if width <= height:
        return image_size, max(1, int(round(height * image_size / width)))
    return max(1, int(round(width * image_size / height))), image_size


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a ``(3, H, W)`` uint8 tensor."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std as ``(3, 1, 1)`` float32 tensors on ``device``."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1)
    return mean, torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1)


def normalize_uint8(image: torch.Tensor) -> torch.Tensor:
    """``(..., 3, H, W)`` uint8 RGB to the float32 ImageNet-normalised images the model takes."""
    mean, std = _mean_std(image.device)
    return image.float().div_(255.0).sub_(mean).div_(std)


def unnormalize_image(image: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalisation of a ``(3, H, W)`` image; returns values in ``[0, 1]``."""
    mean, std = _mean_std(image.device)
    return (image.float() * std + mean).clamp(0.0, 1.0)


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
    new_w, new_h = short_side_size(width, height, image_size)
    resized = to_rgb(image).resize((new_w, new_h), Image.BILINEAR)
    return normalize_uint8(to_uint8_tensor(resized)), (new_w / width, new_h / height)
