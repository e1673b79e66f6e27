"""The recipe's export stage: a checkpoint's whole detector as one ONNX graph, in float32 or,
with ``export.int8``, quantized to int8 on calibration images."""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from eecs598.deploy import OPSET, export_onnx, quantize_onnx, require_exporter, require_quantizer
from eecs598.images import CorruptImageError, preprocess_image, read_rgb_image
from eecs598.settings import EXPORT_INT8_NAME, EXPORT_NAME, Settings, preset_for
from recipe.data import make_datasets
from recipe.evaluation import test_image_size
from recipe.model import load_detector
from recipe.prediction import image_files

__all__ = ["CalibrationImages", "calibration_batches", "calibration_files", "export"]

# Data sets the package builds itself rather than reads from a path.
_NAMED = ("voc2007", "shapes")


def export(checkpoint: str | os.PathLike, settings: Settings | None = None) -> Path:
    """Export a checkpoint's whole detector to ONNX (``eecs598.deploy``): one graph from
    normalised images to padded detections, with the class names, the image size and the
    normalisation in its metadata.

    Args:
        checkpoint: a checkpoint written by ``train`` (any file ``load_detector`` reads).
        settings: ``out`` is the .onnx file (a folder: ``EXPORT_NAME`` in it, or
            ``EXPORT_INT8_NAME`` with ``export.int8``; empty: that name beside the
            checkpoint); ``eval`` gives the thresholds fixed in the graph (``score_thresh``,
            ``nms_thresh``), the image size stored (``test_image_size``, default the
            checkpoint's) and the device traced on; ``export.format`` must be ``onnx``;
            ``export.int8`` quantizes the graph (``quantize_onnx``), calibrated on
            ``calibration_batches``. Default: ``preset_for(command="export")``.

    Returns:
        The path written. Nothing is written when a step fails (the previous file stays).
    """
    settings = settings or preset_for(command="export")
    options = settings.export
    if options.format != "onnx":
        raise ValueError(f"export format must be onnx, got {options.format!r}")
    name = EXPORT_INT8_NAME if options.int8 else EXPORT_NAME
    path = Path(settings.out) if settings.out else Path(checkpoint).with_name(name)
    if path.is_dir():
        path = path / name
    if path.suffix.lower() != ".onnx":
        raise ValueError(f"--out must name a .onnx file (or a folder), got {path}")
    require_exporter()  # before the model is loaded
    if options.int8:
        require_quantizer()
    model, saved = load_detector(checkpoint, settings.eval.device, settings.data.classes)
    meta = saved["meta"]
    classes, size = list(meta["class_names"]), test_image_size(settings, meta)
    batches = calibration_batches(settings, meta, size) if options.int8 else None
    start = time.perf_counter()
    metadata = {"class_names": classes, "image_size": size}
    thresholds = settings.eval.score_thresh, settings.eval.nms_thresh
    if batches is None:
        export_onnx(model, path, metadata, *thresholds)
    else:
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as work:
            source = export_onnx(model, Path(work) / EXPORT_NAME, metadata, *thresholds)
            quantize_onnx(source, path, batches, options.weight_bits)
    precision = (
        f"int8 ({options.weight_bits}-bit weights, calibrated on {len(batches)} images), "
        if batches
        else ""
    )
    print(f"Exported {checkpoint} to {path} ({path.stat().st_size / 2**20:.1f} MiB, "
          f"{time.perf_counter() - start:.0f} s): ONNX opset {OPSET}, {precision}"
          f"{len(classes)} classes, short side {size} px. Run it with "
          f"`predict {path} IMAGES`.")  # fmt: skip
    return path


def calibration_batches(
    settings: Settings, meta: Mapping[str, Any], size: int
) -> CalibrationImages:
    """The int8 calibration's inputs: up to ``export.calibration_images`` images of
    ``export.calibration`` (default: the data the checkpoint's ``meta`` records it trained
    on), spread evenly over ``calibration_files``, each preprocessed as ``predict`` does at
    short side ``size``: ``(images (1, 3, H, W) float32, image_sizes (1, 2) int64)`` each.

    Raises:
        ValueError: no calibration data named or recorded (an image that cannot be read is
            named when it is read, by ``quantize_onnx``).
        FileNotFoundError: calibration data that does not exist or holds no image.
    """
    options = settings.export
    recorded = dict((meta.get("plan") or {}).get("data") or {})
    if options.calibration:
        recorded = {"dataset": options.calibration}
    if not recorded.get("dataset"):
        raise ValueError(
            "This checkpoint does not record the data it trained on (it predates that "
            "record): name the calibration images with --calibration DATA (a data set or a "
            "folder of images)"
        )
    files = calibration_files(
        recorded["dataset"], recorded.get("images"), recorded.get("data_dir"),
        recorded.get("train_split") or "train", meta.get("class_names"),
    )  # fmt: skip
    count = min(len(files), options.calibration_images)
    picked = np.linspace(0, len(files) - 1, count).round().astype(int)
    return CalibrationImages([files[i] for i in picked], size)


class CalibrationImages(Sequence):
    """``calibration_batches``' images, read and preprocessed when used (a few hundred
    preprocessed photos would take hundreds of MiB at once)."""

    def __init__(self, files: Sequence[str], size: int):
        self.files, self.size = list(files), size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(images (1, 3, H, W) float32, image_sizes (1, 2) int64)`` of file ``index``;
        ValueError naming a file that cannot be read."""
        path = self.files[index]
        try:
            tensor, _ = preprocess_image(read_rgb_image(path), self.size)
        except CorruptImageError as err:
            raise ValueError(f"Cannot read calibration image {path}: {err}") from err
        return tensor[None].numpy(), np.array([tensor.shape[-2:]], dtype=np.int64)


def calibration_files(
    data: str,
    images: str | None = None,
    data_dir: str | None = None,
    split: str = "train",
    classes: Sequence[str] | None = None,
) -> list[str]:
    """The image files of ``data``: the training images of a data set the package reads (a
    VOC-layout folder's ``split``, a COCO JSON's images in ``images``, ``voc2007``, the
    ``shapes`` folder in ``data_dir``; the part ``train`` trained on), or every image of a
    folder without annotations (subfolders included) or of one image file.

    Raises:
        FileNotFoundError: ``data`` does not exist, or holds no images.
    """
    if data == "shapes":  # read as generated for training, not generated again
        data = str(Path(data_dir or "data") / "shapes")
    path = Path(data)
    if data not in _NAMED and not path.exists():
        raise FileNotFoundError(f"Calibration data {data} does not exist")
    annotated = data in _NAMED or path.suffix.lower() == ".json" or (
        path.is_dir() and ((path / "Annotations").is_dir() or any(path.glob("*.xml")))
    )  # fmt: skip
    if not annotated:
        return [str(p) for p, _ in image_files([path])]
    settings = preset_for(data).replace(
        images=images, data_dir=data_dir, train_split=split, progress=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the readers' notes on the labels do not matter here
        train, _, _ = make_datasets(settings, classes=classes, train_transform=False)
    files = list(train.image_paths)
    if not files:
        raise FileNotFoundError(f"Calibration data {data} has no images")
    return files
