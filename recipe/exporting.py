"""The recipe's export stage: a checkpoint's whole detector as one ONNX graph."""

from __future__ import annotations

import os
import time
from pathlib import Path

from eecs598.deploy import OPSET, export_onnx, require_exporter
from eecs598.settings import EXPORT_NAME, Settings, preset_for
from recipe.evaluation import test_image_size
from recipe.model import load_detector

__all__ = ["export"]


def export(checkpoint: str | os.PathLike, settings: Settings | None = None) -> Path:
    """Export a checkpoint's whole detector to ONNX (``eecs598.deploy``): one graph from
    normalised images to padded detections, with the class names, the image size and the
    normalisation in its metadata.

    Args:
        checkpoint: a checkpoint written by ``train`` (any file ``load_detector`` reads).
        settings: ``out`` is the .onnx file (a folder: ``EXPORT_NAME`` in it; empty:
            ``EXPORT_NAME`` beside the checkpoint); ``eval`` gives the thresholds fixed in the
            graph (``score_thresh``, ``nms_thresh``), the image size stored
            (``test_image_size``, default the checkpoint's) and the device traced on;
            ``export.format`` must be ``onnx``. Default: ``preset_for(command="export")``.

    Returns:
        The path written.
    """
    settings = settings or preset_for(command="export")
    if settings.export.format != "onnx":
        raise ValueError(f"export format must be onnx, got {settings.export.format!r}")
    out = settings.out
    path = Path(out) if out else Path(checkpoint).with_name(EXPORT_NAME)
    if path.is_dir():
        path = path / EXPORT_NAME
    if path.suffix.lower() != ".onnx":
        raise ValueError(f"--out must name a .onnx file (or a folder), got {path}")
    require_exporter()  # before the model is loaded
    model, saved = load_detector(checkpoint, settings.eval.device, settings.data.classes)
    meta = saved["meta"]
    classes, size = list(meta["class_names"]), test_image_size(settings, meta)
    start = time.perf_counter()
    export_onnx(
        model, path, {"class_names": classes, "image_size": size},
        settings.eval.score_thresh, settings.eval.nms_thresh,
    )  # fmt: skip
    print(f"Exported {checkpoint} to {path} ({path.stat().st_size / 2**20:.1f} MiB, "
          f"{time.perf_counter() - start:.0f} s): ONNX opset {OPSET}, {len(classes)} classes, "
          f"short side {size} px. Run it with `predict {path} IMAGES`.")  # fmt: skip
    return path
