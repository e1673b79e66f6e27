"""Running a detector over a loader: showing its detections, or scoring them (VOC mAP and
COCO-style AP) and writing them in the mAP tool's and COCO's formats (``inference_with_detector``,
one image per batch, the notebook's); or only scoring them, quietly, on padded batches
(``score_detector``, validation while training)."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .images import unnormalize_image
from .mean_ap import (
    CocoImageInfo,
    ImageDetections,
    MeanAPAccumulator,
    MeanAPResult,
    coco_evaluate,
    image_detections,
    to_coco,
    write_coco_files,
    write_tool_files,
)

__all__ = ["annotation_lookup", "inference_with_detector", "score_detector"]

GroundTruth = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def annotation_lookup(dataset: Any) -> Callable[[str], dict[str, Any]] | None:
    """Find ``annotation_for_path`` on a dataset, looking through ``Subset`` wrappers."""
    while dataset is not None:
        lookup = getattr(dataset, "annotation_for_path", None)
        if callable(lookup):
            return lookup
        dataset = getattr(dataset, "dataset", None)
    return None


def _ground_truth(lookup: Callable | None, path: str, gt_boxes: torch.Tensor) -> GroundTruth:
    """``(boxes (N, 4), classes (N,), difficult (N,))`` of one image: every object from the
    dataset's annotation when it has the lookup, else the valid rows of ``gt_boxes (M, 5)``."""
    if lookup is not None:
        ann = lookup(path)
        return ann["boxes"], ann["classes"], ann["difficult"]
    valid = gt_boxes[gt_boxes[:, 4] >= 0]
    return valid[:, :4], valid[:, 4].long(), torch.zeros(len(valid), dtype=torch.bool)


def _original_pixels(
    lookup: Callable | None, path: str, image: torch.Tensor
) -> tuple[CocoImageInfo, torch.Tensor, torch.Tensor]:
    """How to map one evaluated image's boxes back to its file: ``(info, scale (4,), offset
    (4,))`` with original pixels ``= (boxes + offset) / scale``. From the dataset's annotation
    where it has the lookup; else the evaluated ``(3, H, W)`` image is taken as the original."""
    if lookup is None:
        info = CocoImageInfo(Path(path).name, int(image.shape[-1]), int(image.shape[-2]))
        return info, torch.ones(4), torch.zeros(4)
    ann = lookup(path)
    (sx, sy), (left, top) = ann["scale"], ann["offset"]
    info = CocoImageInfo(ann["file_name"], ann["width"], ann["height"])
    return info, torch.tensor([sx, sy, sx, sy]), torch.tensor([left, top, left, top]).float()


def _predict(detector: nn.Module, images: torch.Tensor, **options: Any) -> GroundTruth:
    """``(boxes (N, 4), classes (N,) int64, scores (N,))`` on the CPU for a batch of one."""
    if images.shape[0] != 1:
        raise ValueError(
            f"inference_with_detector needs a loader with batch_size=1, got a batch "
            f"of {images.shape[0]}"
        )
    prediction = detector(images, **options)
    if isinstance(prediction, list):
        prediction = prediction[0]
    boxes, classes, scores = (t.detach().float().cpu() for t in prediction)
    return boxes, classes.long(), scores


def _show_detections(
    image: torch.Tensor,
    idx_to_class: Mapping[int, str],
    gt: GroundTruth,
    prediction: GroundTruth,
) -> None:
    """Show one ``(3, H, W)`` normalised image with its GT and detections."""
    import matplotlib.pyplot as plt

    from .utils import detection_visualizer

    (gt_boxes, gt_classes, _), (boxes, classes, scores) = gt, prediction
    gt_rows = torch.cat([gt_boxes, gt_classes[:, None].float()], dim=1)
    pred = torch.cat([boxes, classes[:, None].float(), scores[:, None]], dim=1)
    fig = detection_visualizer(
        unnormalize_image(image.cpu()), idx_to_class, gt_rows, pred, show=True
    )
    plt.close(fig)  # already shown (or headless); avoid piling up open figures


def inference_with_detector(
    detector: nn.Module, test_loader: Iterable, idx_to_class: Mapping[int, str],
    score_thresh: float, nms_thresh: float, output_dir: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", *,
    max_show: int | None = None, progress: bool = True,
) -> Any:  # fmt: skip
    """Run the detector on every image of ``test_loader`` (batch size 1).

    The detector is put in eval mode and called under ``torch.no_grad()`` as
    ``detector(images, test_score_thresh=score_thresh, test_nms_thresh=nms_thresh)``, returning
    ``(boxes (N, 4), classes (N,), scores (N,))`` (or a one-element list of such tuples).

    Without ``output_dir``: each image is un-normalised and shown with its ground truth and
    detections by ``eecs598.utils.detection_visualizer`` (at most ``max_show`` images).

    With ``output_dir``: writes the mAP tool's ``ground-truth/<id>.txt`` and
    ``detection-results/<id>.txt`` for every image (``<id>`` = image file stem; an empty
    detection file when nothing is detected), evaluates VOC mAP at IoU 0.5
    (``eecs598.mean_ap.MeanAPAccumulator``), prints the per-class table and returns the
    ``MeanAPResult``. Ground truth comes from the dataset's ``annotation_for_path`` when the
    loader's dataset (or one under its ``Subset`` wrappers) has it, so difficult objects are
    marked; otherwise from the valid rows of ``gt_boxes`` (none difficult). It also writes
    ``ground_truth.json`` and ``detections.json`` (COCO, by ``eecs598.mean_ap``'s mapping) in
    the pixels, names and sizes of the image files, and scores them with pycocotools'
    ``COCOeval``: its summary is printed and kept in the result's ``coco`` (without
    pycocotools: one line saying so, and ``coco`` is ``None``). ``python -m eecs598.mean_ap
    OUTPUT_DIR --coco`` gives the same AP and AR from the text files, which keep the evaluated
    image's pixels, so its small/medium/large split is at the evaluated size.

    Returns:
        ``MeanAPResult`` with ``output_dir``, else ``None``.
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    detector.to(device=device, dtype=dtype)
    was_training = detector.training
    detector.eval()
    lookup = annotation_lookup(getattr(test_loader, "dataset", None))
    scoring = None if output_dir is None else _Scoring(idx_to_class, lookup, Path(output_dir))
    options = {"test_score_thresh": score_thresh, "test_nms_thresh": nms_thresh}
    batches = tqdm(test_loader, disable=not progress or output_dir is None, desc="inference")
    start_time = time.time()
    try:
        with torch.no_grad():
            for shown, (image_paths, images, gt_boxes) in enumerate(batches):
                prediction = _predict(detector, images.to(device=device, dtype=dtype), **options)
                gt = _ground_truth(lookup, image_paths[0], gt_boxes[0])
                if scoring is not None:
                    scoring.add(image_paths[0], images[0], gt, prediction)
                elif max_show is not None and shown >= max_show:
                    break
                else:
                    _show_detections(images[0], idx_to_class, gt, prediction)
    finally:
        detector.train(was_training)
    print(f"Total inference time: {time.time() - start_time:.1f} s")
    return None if scoring is None else scoring.result()


def score_detector(
    detector: nn.Module, loader: Iterable, idx_to_class: Mapping[int, str], score_thresh: float,
    nms_thresh: float, device: str | torch.device = "cpu",
) -> MeanAPResult:  # fmt: skip
    """VOC mAP@0.5 and, with pycocotools, COCO AP of ``detector`` on ``loader``, quietly.

    The same scoring as :func:`inference_with_detector` (ground truth from the dataset's
    annotations where it has them, COCO boxes in the image files' pixels), without files or
    printing, and on batches of any size: ``(paths, images (B, 3, Hp, Wp), gt_boxes (B, M, 5))``
    plus ``image_sizes (B, 2)`` when padded (``eecs598.augment.PadCollate``), each image
    scored on its true ``(h, w)`` part. The detector's train/eval mode is restored afterwards.
    """
    device = torch.device(device)
    lookup = annotation_lookup(getattr(loader, "dataset", None))
    scoring = _Scoring(idx_to_class, lookup)
    options = {"test_score_thresh": score_thresh, "test_nms_thresh": nms_thresh}
    was_training = detector.training
    detector.eval()
    try:
        with torch.no_grad():
            for paths, images, gt_boxes, *rest in loader:
                sizes = rest[0] if rest else None
                extra = {} if sizes is None else {"image_sizes": sizes.to(device)}
                output = detector(images.to(device), **options, **extra)
                output = [output] if len(paths) == 1 else output
                hw = sizes.tolist() if sizes is not None else [images.shape[-2:]] * len(paths)
                for i, (boxes, classes, scores) in enumerate(output):
                    prediction = (boxes.float().cpu(), classes.long().cpu(), scores.float().cpu())
                    gt = _ground_truth(lookup, paths[i], gt_boxes[i])
                    image = images[i, :, : hw[i][0], : hw[i][1]]
                    scoring.add(paths[i], image, gt, prediction)
    finally:
        detector.train(was_training)
    return scoring.result(verbose=False)


@dataclasses.dataclass
class _Scoring:
    """Scores a run image by image and, given an ``output_dir``, writes its files there.

    Each image's GT and detections, in the evaluated image's pixels, go to the VOC mAP
    accumulator (and the mAP tool's text files). For COCO the same boxes are mapped back to the
    pixels of the image file, ``(boxes + offset) / scale`` from the dataset's annotation
    (without the lookup the evaluated image counts as the original), and kept with the files'
    real names and sizes, so COCO's size ranges are those of the image files.
    """

    idx_to_class: Mapping[int, str]
    lookup: Callable[[str], dict[str, Any]] | None
    output_dir: Path | None = None
    accumulator: MeanAPAccumulator = dataclasses.field(init=False)
    originals: list[ImageDetections] = dataclasses.field(default_factory=list)
    coco_info: dict[str, CocoImageInfo] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        """An empty accumulator; ``ground-truth/`` and ``detection-results/`` created."""
        self.accumulator = MeanAPAccumulator(dict(self.idx_to_class))
        for sub in ("ground-truth", "detection-results") if self.output_dir else ():
            (self.output_dir / sub).mkdir(parents=True, exist_ok=True)

    def add(self, path: str, image: torch.Tensor, gt: GroundTruth, prediction: GroundTruth) -> None:
        """Accumulate (and write) one ``(3, H, W)`` image's GT and ``(boxes, classes,
        scores)``."""
        image_id = Path(path).stem
        record = image_detections(image_id, *gt, *prediction)
        if self.output_dir is not None:
            write_tool_files(self.output_dir, record, self.idx_to_class)
        self.accumulator.add(record)
        info, scale, offset = _original_pixels(self.lookup, path, image)
        self.coco_info[image_id] = info
        self.originals.append(image_detections(
            image_id, (gt[0] + offset) / scale, gt[1], gt[2],
            (prediction[0] + offset) / scale, prediction[1], prediction[2],
        ))  # fmt: skip

    def result(self, verbose: bool = True) -> MeanAPResult:
        """VOC mAP at IoU 0.5 (table printed when ``verbose``); the COCO files written (given
        an ``output_dir``) and, with pycocotools, scored (summary printed when ``verbose``,
        kept in ``coco``)."""
        result = self.accumulator.compute(iou_threshold=0.5)
        say = print if verbose else lambda *_: None
        say(result.summary())
        coco_gt, coco_dets = to_coco(self.originals, dict(self.idx_to_class), self.coco_info)
        if self.output_dir is not None:
            write_coco_files(self.output_dir, coco_gt, coco_dets)
        try:
            result = dataclasses.replace(result, coco=coco_evaluate(coco_gt, coco_dets))
        except ModuleNotFoundError as err:
            say(f"COCO-style metrics skipped: {err}")
            return result
        say(result.coco.summary)
        return result
