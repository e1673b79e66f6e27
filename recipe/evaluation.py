"""The recipe's evaluation stage: the mAP of a model on a val split, and its report.

``evaluate_and_report`` scores a model (``eecs598.inference``), writes the tool-format files,
the AP chart, a detections grid, the error analysis (``eecs598.errors``) and metrics.json;
``evaluate`` does it for a checkpoint. ``train`` calls ``evaluate_and_report`` after training.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from eecs598.files import write_json
from eecs598.images import unnormalize_image
from eecs598.inference import inference_with_detector
from eecs598.mean_ap import plot_ap
from eecs598.settings import Settings, preset_for
from eecs598.utils import detection_grid
from recipe.data import eval_loader, make_datasets, scored_as_named
from recipe.model import load_detector
from two_stage_detector import FasterRCNN

__all__ = ["evaluate", "evaluate_and_report", "detect_image", "test_image_size", "pyplot"]


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def output_dir(out: str) -> Path:
    """The output folder, created if needed."""
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    return path


def detect_image(
    model: FasterRCNN, image: torch.Tensor, settings: Settings, device: str,
    score_thresh: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Boxes, labels and scores for one preprocessed (3, H, W) image, at ``score_thresh``
    (default: the evaluation settings') and the evaluation NMS threshold."""
    with torch.no_grad():
        return model(
            image[None].to(device),
            test_score_thresh=settings.eval.score_thresh if score_thresh is None else score_thresh,
            test_nms_thresh=settings.eval.nms_thresh,
        )  # fmt: skip


def test_image_size(settings: Settings, meta: dict) -> int:
    """Short side for evaluation and prediction: ``test_image_size``, else the checkpoint's
    test size (older checkpoints: its training size)."""
    return settings.eval.test_image_size or int(meta.get("test_image_size") or meta["image_size"])


def evaluate_and_report(
    model: FasterRCNN, val: Any, classes: list[str], out: Path, settings: Settings, device: str
) -> dict:
    """mAP on ``val``: tool-format files, AP chart, detections grid, metrics JSON, table; and
    the error analysis (``eecs598.errors``): the TIDE breakdown printed and kept in the metrics
    under ``errors``, with errors.json, errors.png, confusion.png, pr_curves.png, per_image.csv
    and worst.png."""
    from eecs598.errors import write_error_report

    plt = pyplot()
    idx_to_class = dict(enumerate(classes))
    start = time.time()
    result = inference_with_detector(
        model, eval_loader(val, settings.data.workers), idx_to_class,
        score_thresh=settings.eval.score_thresh, nms_thresh=settings.eval.nms_thresh,
        output_dir=str(out / "mAP"), device=device, progress=False,
    )  # fmt: skip
    seconds = time.time() - start
    plt.close(plot_ap(result, out / "ap_per_class.png"))
    samples = _confident_samples(model, val, settings, device)
    plt.close(detection_grid(samples, idx_to_class, ncols=4, path=out / "detections.png"))
    errors = write_error_report(
        result.images, classes, out, image_pixels=lambda i: unnormalize_image(val[i][1])
    )
    metrics = {
        "mAP": result.map,
        "ap": result.ap,
        "iou_threshold": result.iou_threshold,
        "coco": result.coco.stats if result.coco is not None else None,
        "errors": errors,
        "num_val_images": len(val),
        "eval_seconds": round(seconds, 2),
    }
    write_json(out / "metrics.json", metrics)  # inference_with_detector printed the table
    return metrics


def _confident_samples(
    model: FasterRCNN, val: Any, settings: Settings, device: str
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Up to 8 evenly spaced val images with their ground truth and confident detections."""
    samples = []
    model.eval()
    for index in torch.linspace(0, len(val) - 1, steps=min(8, len(val))).long().tolist():
        _, image, gt = val[index]
        boxes, labels, scores = detect_image(model, image, settings, device)
        pred = torch.cat([boxes, labels[:, None].to(boxes), scores[:, None]], dim=1).cpu()
        keep = pred[:, 5] >= 0.5  # readable: confident detections only
        samples.append((unnormalize_image(image), gt[gt[:, 4] >= 0], pred[keep]))
    return samples


def evaluate(
    checkpoint: str | os.PathLike, data: str | None = None, settings: Settings | None = None
) -> dict:
    """mAP of a checkpoint on a dataset's val split, at the checkpoint's sizes and with its
    classes; writes the report into ``settings.out``.

    Args:
        checkpoint: a checkpoint.pt written by ``train`` (any file ``load_detector`` reads).
        data: the dataset (a VOC-layout folder, a COCO .json, voc2007 or shapes); default:
            ``settings``' dataset. What is scored: the ``val_dataset`` when given, else the
            dataset named (a COCO JSON whole, a folder's ``val_split`` list, or every image of
            a folder without lists).
        settings: ``data`` and ``eval`` are used; default: the preset for the data
            (``preset_for(data, "evaluate")``, writing into ``EVALUATE_OUT``). Settings
            given in place of ``data`` (the form before ``settings`` existed) work too.

    Returns:
        The metrics (``mAP``, ``ap`` per class, COCO-style ``coco`` stats, ...).
    """
    if isinstance(data, Settings):
        data, settings = None, data
    if settings is None:
        settings = preset_for(data, "evaluate")
    elif data is not None:
        settings = settings.replace(dataset=data)
    settings = scored_as_named(settings)
    model, saved = load_detector(checkpoint, settings.eval.device, settings.data.classes)
    meta = saved["meta"]
    classes = list(meta["class_names"])
    _, val, _ = make_datasets(settings, image_size=meta["image_size"], classes=classes,
                              test_image_size=test_image_size(settings, meta))  # fmt: skip
    out = output_dir(settings.out)
    return evaluate_and_report(model, val, classes, out, settings, settings.eval.device)
