"""The recipe's audit stage: the labels most likely wrong, from out-of-sample detections.

``out_of_sample_detections`` splits the training images into ``folds`` seeded parts, trains one
model per part on the other parts (as ``train`` would: the same plan, schedule and iterations)
and detects on the part it did not see. ``eecs598.audit`` scores the labels against those
detections. Each fold's checkpoint is kept in ``OUT/fold<k>/`` and, with ``resume``, a
finished fold is not trained again. ``audit`` writes what was found (``audit.csv``,
``audit.png``, the corrections in the data's own format) and never writes the data.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from eecs598.audit import (
    ISSUES,
    Suspect,
    coco_corrections,
    rank_suspects,
    suspect_rows,
    voc_corrections,
    write_csv,
)
from eecs598.checkpoint import load_checkpoint, load_model_weights
from eecs598.images import preprocess_image, read_rgb_image
from eecs598.settings import Settings
from eecs598.utils import reset_seed
from eecs598.voc import voc_folders
from recipe.data import make_datasets, scored_as_named
from recipe.evaluation import detect_image, output_dir, pyplot, test_image_size
from recipe.model import load_detector
from recipe.plan import Plan, plan_training
from recipe.training import run_training, training_model
from two_stage_detector import FasterRCNN

__all__ = ["audit", "fold_of_images", "out_of_sample_detections", "detect_file"]

Detections = tuple[np.ndarray, np.ndarray, np.ndarray]


def fold_of_images(count: int, folds: int, seed: int) -> np.ndarray:
    """``(count,)`` fold of each image, ``0..folds-1``: a seeded permutation dealt in turn, so
    fold sizes differ by one at most.

    Raises:
        ValueError: fewer than 2 folds, or fewer images than folds.
    """
    if folds < 2:
        raise ValueError(f"--folds must be at least 2 (one to train on, one to audit), got {folds}")
    if count < folds:
        raise ValueError(f"{count} image(s) cannot be split into {folds} folds")
    order = np.random.default_rng(seed).permutation(count)
    fold = np.empty(count, np.int64)
    fold[order] = np.arange(count) % folds
    return fold


def detect_file(
    model: FasterRCNN, path: str, image_size: int, settings: Settings, score_thresh: float
) -> Detections:
    """``(boxes (D, 4) in the image's own pixels, classes (D,), scores (D,))`` of one file, at
    ``score_thresh`` and the settings' NMS threshold and device (``detect_image``)."""
    tensor, (sx, sy) = preprocess_image(read_rgb_image(path), image_size)
    boxes, classes, scores = detect_image(model, tensor, settings, settings.eval.device,
                                          score_thresh)  # fmt: skip
    scale = torch.tensor([sx, sy, sx, sy])
    return (boxes.cpu() / scale).numpy(), classes.cpu().numpy(), scores.cpu().numpy()


def out_of_sample_detections(
    settings: Settings, folds: int = 2, resume: bool = False, score_thresh: float = 0.05
) -> tuple[Plan, Any, list[str], list[Detections]]:
    """Detections of every training image by a model that did not train on it.

    Args:
        settings: ``train``'s settings (``out`` holds the folds' checkpoints).
        folds: the number of parts (and models).
        resume: reuse a fold's finished checkpoint in ``OUT/fold<k>/checkpoint.pt``.
        score_thresh: the lowest score kept (the evidence for every kind of error).

    Data without a val split is audited whole (``train`` would hold a part out for
    validation).

    Returns:
        ``(plan, training images (a reader), class names, detections per image)``.
    """
    settings = scored_as_named(settings)  # data without a val split: audit every image
    reset_seed(settings.train.seed)
    plan, train_data, _, classes = plan_training(settings)
    if plan.anchors is not None:
        print(plan.anchors.report())
    print(plan.describe(f"random for each fold's model; {folds} folds"))
    records = train_data.records
    fold = fold_of_images(len(records), folds, settings.train.seed)
    detections: list[Detections | None] = [None] * len(records)
    size = plan.settings.eval.test_image_size or plan.settings.data.image_size
    device = plan.settings.eval.device
    progress = tqdm(range(folds), desc="audit folds", disable=not settings.train.progress)
    for k in progress:
        kept = [r.image_id for r, f in zip(records, fold, strict=True) if f != k]
        print(f"Fold {k + 1} of {folds}: training on {len(kept)} images, detecting on "
              f"{len(records) - len(kept)}")  # fmt: skip
        fold_plan = _fold_plan(plan, k, resume)
        start = time.perf_counter()
        model = _fold_model(fold_plan, train_data.subset(kept, f"fold {k} out"), classes, device)
        trained = time.perf_counter()
        for index in np.flatnonzero(fold == k):
            detections[index] = detect_file(
                model, records[index].image_path, size, plan.settings, score_thresh
            )  # fmt: skip
        print(f"Fold {k + 1}: model in {trained - start:.0f} s, detections in "
              f"{time.perf_counter() - trained:.0f} s")  # fmt: skip
    return plan, train_data, classes, detections  # type: ignore[return-value]


def _fold_plan(plan: Plan, k: int, resume: bool) -> Plan:
    """``plan`` writing into ``OUT/fold<k>/``, resuming there when asked, without validation."""
    out = Path(plan.settings.out) / f"fold{k}"
    settings = plan.settings.replace(out=str(out), resume=resume, eval_period=0, patience=0)
    return dataclasses.replace(plan, settings=settings)


def _fold_model(plan: Plan, train_part: Any, classes: Sequence[str], device: str) -> FasterRCNN:
    """The model of one fold: trained on ``train_part`` (continuing or reusing its checkpoint
    with ``resume``), in eval mode on ``device``."""
    reset_seed(plan.settings.train.seed)
    model = training_model(plan, list(classes))
    checkpoint = Path(plan.settings.out) / "checkpoint.pt"
    done = False
    if plan.settings.train.resume and checkpoint.is_file():
        saved = load_checkpoint(checkpoint, map_location="cpu")
        done = saved.get("iteration", 0) >= plan.settings.train.max_iters
        if done:
            load_model_weights(model, saved, checkpoint)
    if not done:
        Path(plan.settings.out).mkdir(parents=True, exist_ok=True)
        run_training(plan, model, train_part, 1, 0, device, None)
    return model.to(device).eval()


def audit(settings: Settings) -> list[dict]:
    """Find the labels most likely wrong in ``settings``' training data and write, in
    ``settings.out``: ``audit.csv`` (one row per suspect scored at least
    ``audit.min_score``, most likely wrong first; ``eecs598.audit.CSV_COLUMNS``),
    ``audit.png`` (the worst drawn: the label in red, the model's box in green) and the
    corrections of the suspects scored at least ``audit.fix_score`` in the data's own format
    (``corrections.json`` for a COCO JSON, ``corrections/Annotations/`` for a VOC folder).
    Prints the counts per issue and the ten worst images. The data is never written.

    The detections are out of sample: ``out_of_sample_detections`` (``audit.folds`` models;
    ``train.resume`` reuses finished folds), or, with ``audit.checkpoint``, that
    checkpoint's on every image of the data named (a split it did not train on).

    Returns:
        ``audit.csv``'s rows.

    Raises:
        ValueError: the checkpoint's classes differ from the data's (naming both lists).
    """
    options, out = settings.audit, output_dir(settings.out)
    if options.checkpoint:
        records, classes, detections = _checkpoint_detections(settings)
    else:
        _, train_data, classes, detections = out_of_sample_detections(
            settings, options.folds, settings.train.resume
        )  # fmt: skip
        records = train_data.records
    labels = [(r.boxes, r.classes) for r in records]
    suspects, per_image = rank_suspects(labels, detections, options.min_score)
    names = [Path(r.image_path).name for r in records]
    rows = suspect_rows(suspects, names, classes)
    write_csv(out / "audit.csv", rows)
    fixes = [s for s in suspects if s.score >= options.fix_score]
    written = _write_corrections(settings, records, fixes, classes, out)
    _draw(suspects, records, classes, out / "audit.png")
    _summary(suspects, per_image, names, out, written)
    return rows


def _checkpoint_detections(settings: Settings) -> tuple[list, list[str], list[Detections]]:
    """Every image of the data named, and a checkpoint's detections of it."""
    device = settings.eval.device
    model, saved = load_detector(settings.audit.checkpoint, device)
    classes = list(saved["meta"]["class_names"])
    data = scored_as_named(settings)
    _, images, data_classes = make_datasets(data, image_size=saved["meta"]["image_size"])
    if list(data_classes) != classes:
        raise ValueError(
            f"{settings.audit.checkpoint} detects the classes {', '.join(classes)}, but "
            f"{settings.data.dataset} has {', '.join(data_classes)}: audit with a checkpoint of "
            "this data, or give --classes in the checkpoint's order"
        )
    size = test_image_size(settings, saved["meta"])
    thresh = settings.eval.score_thresh
    detections = [detect_file(model, r.image_path, size, settings, thresh)
                  for r in images.records]  # fmt: skip
    return images.records, classes, detections


def _write_corrections(
    settings: Settings, records: Sequence[Any], fixes: Sequence[Suspect],
    classes: Sequence[str], out: Path,
) -> str:  # fmt: skip
    """The corrections file(s) of ``fixes``, in the data's format; says what was written."""
    by_image: dict[str, list[Suspect]] = {}
    for s in fixes:
        by_image.setdefault(records[s.image].image_id, []).append(s)
    dataset = settings.data.dataset
    if dataset.lower().endswith(".json"):
        path = coco_corrections(Path(dataset), out / "corrections.json", by_image, classes)
        return f"{path.name} ({len(fixes)} changes)"
    if dataset in ("shapes", "voc2007"):
        root = Path(settings.data.data_dir or "data") / dataset
        root = root if dataset == "shapes" else root / "VOCdevkit" / "VOC2007"
    else:
        root = Path(dataset)
    annotations, _ = voc_folders(root)
    files = voc_corrections(annotations, out / "corrections" / "Annotations", by_image, classes)
    return f"corrections/Annotations/ ({len(files)} files, {len(fixes)} changes)"


def _draw(suspects: Sequence[Suspect], records: Sequence[Any], classes: Sequence[str],
          path: Path, count: int = 8) -> None:  # fmt: skip
    """``audit.png``: the ``count`` worst suspects, each on its image: the suspect label in
    red, the model's box in green, the image's other labels thin and dashed."""
    plt = pyplot()
    shown = suspects[:count]
    cols = min(4, max(1, len(shown)))
    rows = max(1, -(-len(shown) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, s in zip(axes.flat, shown, strict=False):
        ax.imshow(read_rgb_image(records[s.image].image_path))
        for x1, y1, x2, y2 in records[s.image].boxes:  # the image's other labels, thin
            ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, linewidth=0.6,
                                       edgecolor="red", linestyle="--"))  # fmt: skip
        label = None if s.issue == "missing" else s.box
        model_box = s.box if s.issue == "missing" else s.suggested_box
        for box, colour in ((label, "red"), (model_box, "lime")):
            if box is not None:
                x1, y1, x2, y2 = box
                ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False,
                                           edgecolor=colour, linewidth=2))  # fmt: skip
        said = "" if s.label_class < 0 else f"{classes[s.label_class]} -> "
        ax.set_title(f"{s.issue} {s.score:.2f}: {said}{classes[s.suggested_class]}\n"
                     f"{Path(records[s.image].image_path).name}", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _summary(suspects: Sequence[Suspect], per_image: Sequence[Any], names: Sequence[str],
             out: Path, corrections: str) -> None:  # fmt: skip
    """Print the counts per issue and the ten worst images."""
    counts = {issue: sum(s.issue == issue for s in suspects) for issue in ISSUES}
    print(f"Audit of {len(names)} images: " + ", ".join(f"{n} {k}" for k, n in counts.items())
          + f" suspects; in {out}/: audit.csv, audit.png, {corrections}")  # fmt: skip
    worst = sorted(range(len(names)), key=lambda i: -per_image[i].image_score)[:10]
    for i in worst:
        if per_image[i].image_score > 0:
            print(f"  {per_image[i].image_score:.3f}  {names[i]}")
