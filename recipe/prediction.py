"""The recipe's prediction stage: detections for image files and folders.

``predict`` runs a checkpoint, or an ONNX file through onnxruntime, on every image named and
every image in the folders named, and writes an annotated copy of each and detections.json
(``predictions_as_coco``: the same in COCO's format).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torchvision.transforms.functional import to_tensor

from eecs598.deploy import OnnxDetector
from eecs598.files import write_json
from eecs598.images import IMAGE_EXTENSIONS, CorruptImageError, preprocess_image, read_rgb_image
from eecs598.settings import Settings, preset_for
from eecs598.utils import detection_visualizer
from recipe.evaluation import detect_image, output_dir, pyplot, test_image_size
from recipe.model import load_detector

__all__ = ["predict", "image_files", "predictions_as_coco"]


def image_files(inputs: Sequence[str | os.PathLike]) -> list[tuple[Path, Path]]:
    """The image files named in ``inputs``, and those in the folders named there and in their
    subfolders (sorted; hidden files and folders skipped), each as ``(path, name)``: ``name``
    is the path relative to the folder it was found in (a file's own name when named)."""
    files: list[tuple[Path, Path]] = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*")
                if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )  # fmt: skip
            files += [(p, p.relative_to(path)) for p in found]
        elif path.is_file():
            files.append((path, Path(path.name)))
        else:
            raise FileNotFoundError(f"No image or folder at {path}")
    if not files:
        raise FileNotFoundError(
            f"No {'/'.join(IMAGE_EXTENSIONS)} images in {', '.join(map(str, inputs))}"
        )
    return files


def predict(
    checkpoint: str | os.PathLike,
    images: Sequence[str | os.PathLike],
    settings: Settings | None = None,
) -> list[dict]:
    """Detections scored at least ``conf`` for each image file of ``images`` and every image
    in the folders there (subfolders included): in ``settings.out``, an annotated copy each
    (``<name>_pred.png``, in the image's subfolder), all of them in detections.json and, with
    ``coco``, in detections.coco.json.

    ``settings``: ``predict``, ``eval`` (the NMS threshold, the device, a short side other
    than the checkpoint's) and ``out``; default: ``preset_for(command="predict")``, writing
    into ``PREDICT_OUT``.

    Returns:
        One ``{"image": path, "detections": [{"class", "score", "box"}]}`` per image, boxes
        ``(x1, y1, x2, y2)`` in the original image's pixels.
    """
    settings = settings or preset_for(command="predict")
    conf = settings.predict.conf
    if not 0.0 <= conf <= 1.0:
        raise ValueError(f"conf must be in [0, 1], got {conf}")
    plt = pyplot()
    detect, classes, size = _predictor(checkpoint, settings)
    out = output_dir(settings.out)
    records, sizes = [], []
    for path, name in image_files(images):
        try:
            image = read_rgb_image(path)
        except CorruptImageError as err:
            raise ValueError(f"Cannot read image {path}: {err.__cause__}") from err
        tensor, (sx, sy) = preprocess_image(image, size)
        boxes, labels, scores = detect(tensor)
        keep = scores >= conf  # at or above (the models keep scores above their threshold)
        boxes, labels, scores = boxes[keep], labels[keep], scores[keep]
        boxes = boxes.cpu() / torch.tensor([sx, sy, sx, sy])  # back to original pixels
        pred = torch.cat([boxes, labels.cpu()[:, None].float(), scores.cpu()[:, None]], dim=1)
        fig = detection_visualizer(to_tensor(image), classes, pred=pred, show=False)
        drawn = out / name.parent / f"{name.stem}_pred.png"
        drawn.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(drawn, dpi=100)
        plt.close(fig)
        records.append({"image": str(path), "detections": [
            {"class": classes[int(c)], "score": round(float(s), 4),
             "box": [round(float(v), 2) for v in b]}
            for b, c, s in zip(boxes, labels, scores, strict=True)
        ]})  # fmt: skip
        sizes.append((str(name), image.width, image.height))
    written = ["detections.json"]
    write_json(out / "detections.json", records)
    if settings.predict.coco:
        write_json(out / "detections.coco.json", predictions_as_coco(records, classes, sizes))
        written.append("detections.coco.json")
    count = sum(len(r["detections"]) for r in records)
    print(f"{len(records)} images, {count} detections at score >= {conf:g}: {', '.join(written)} "
          f"and an annotated copy of each image (<name>_pred.png) in {out}/")  # fmt: skip
    return records


def _predictor(
    model_file: str | os.PathLike, settings: Settings
) -> tuple[Callable[[torch.Tensor], tuple[torch.Tensor, ...]], list[str], int]:
    """``predict``'s model: a checkpoint, or an ONNX file run by onnxruntime (``.onnx``).

    Returns:
        ``(detect, class_names, short_side)``: ``detect`` maps a preprocessed (3, H, W) image
        to ``(boxes, classes, scores)`` with every detection scored above ``conf`` (and a few
        just below it), at the evaluation NMS threshold.

    Raises:
        ValueError: an ONNX model exported with a score threshold above ``conf``, or another
            NMS threshold than the settings' (fixed in its graph).
    """
    conf, nms_thresh = settings.predict.conf, settings.eval.nms_thresh
    if Path(model_file).suffix.lower() != ".onnx":
        model, saved = load_detector(model_file, settings.eval.device, settings.data.classes)

        def detect(image: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return detect_image(model, image, settings, settings.eval.device, conf - 1e-6)

        return detect, list(saved["meta"]["class_names"]), test_image_size(settings, saved["meta"])
    onnx_model = OnnxDetector(model_file)
    if conf < onnx_model.score_thresh or nms_thresh != onnx_model.nms_thresh:
        raise ValueError(
            f"{model_file} was exported with --score-thresh {onnx_model.score_thresh:g} and "
            f"--nms-thresh {onnx_model.nms_thresh:g}, fixed in its graph: predict with "
            f"--conf {onnx_model.score_thresh:g} or more and --nms-thresh "
            f"{onnx_model.nms_thresh:g}, or export again with the thresholds you want"
        )
    size = settings.eval.test_image_size or onnx_model.image_size
    return onnx_model.detect, onnx_model.class_names, size


def predictions_as_coco(
    records: Sequence[Mapping[str, Any]], classes: Sequence[str],
    sizes: Sequence[tuple[str, int, int]],
) -> dict[str, Any]:  # fmt: skip
    """``predict``'s records in COCO's instances format: ``images`` (ids 1.. in order,
    ``file_name`` relative to the folder given, ``width``, ``height``), ``categories`` (ids
    1.. in the checkpoint's class order) and ``annotations`` with ``bbox [x, y, w, h]``,
    ``area``, ``iscrowd`` 0 and the detection's ``score`` (pycocotools' ``loadRes`` takes
    the annotations list as results)."""
    category = {name: k for k, name in enumerate(classes, start=1)}
    images, annotations = [], []
    for number, (record, (name, width, height)) in enumerate(zip(records, sizes, strict=True), 1):
        images.append({"id": number, "file_name": name, "width": width, "height": height})
        for det in record["detections"]:
            x1, y1, x2, y2 = det["box"]
            w, h = round(x2 - x1, 2), round(y2 - y1, 2)
            annotations.append({
                "id": len(annotations) + 1, "image_id": number,
                "category_id": category[det["class"]], "bbox": [x1, y1, w, h],
                "area": round(w * h, 2), "iscrowd": 0, "score": det["score"],
            })  # fmt: skip
    categories = [{"id": k, "name": name} for name, k in category.items()]
    return {"images": images, "annotations": annotations, "categories": categories}
