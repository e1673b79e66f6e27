"""The recipe's plan: every "auto" of a training run settled once.

``plan_training`` reads the data and settles, in this order, the image size
(``choose_image_size``), the train crop (``train_crop_size``), the multi-scale sizes, the
held-out split (``recipe.data.hold_out``), epochs as iterations (``epoch_iters``), the anchors
(``fit_training_anchors``) and the validation period (``eval_period``). The ``Plan`` it returns
is frozen: the rest of the run reads it, the setup printout prints it (``Plan.describe``) and
the checkpoint records it (``Plan.record``). The rules' constants are in ``eecs598.settings``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eecs598.anchor_fit import AnchorFit, fit_anchors, training_boxes
from eecs598.augment import multiscale_sizes
from eecs598.settings import (
    AUTO_EVAL_BUDGET,
    AUTO_EVALUATIONS,
    AUTO_GRID_RECALL,
    AUTO_IMAGE_SIZES,
    AUTO_MIN_BOX_SIDE,
    AUTO_TRAIN_CROP,
    DATA_DEPENDENT,
    BackboneSettings,
    Settings,
    preset_for,
)
from recipe.data import datasets_rank_zero_first

__all__ = [
    "Plan",
    "plan_training",
    "level_strides",
    "choose_image_size",
    "grid_recall",
    "training_datasets",
    "epoch_iters",
    "train_crop_size",
    "fit_training_anchors",
    "eval_period",
    "describe_setup",
]


@dataclass(frozen=True)
class Plan:
    """A training run with every "auto" settled (``plan_training``), read by the rest of it.

    Attributes:
        requested: the settings as given, "auto" values and all (the printout marks the
            settings that still have their preset's value).
        settings: the same with ``image_size``, ``train_crop``, ``eval_period`` and, with
            ``epochs``, ``max_iters`` settled to numbers.
        scales: the multi-scale short sides, one drawn per batch; None without multi-scale.
        anchors: anchors fitted to the training boxes for ``anchor_scale="auto"``, else None
            (the numbers given in the settings).
        iterations_per_epoch: one pass over the training images at the batch size.
        eval_budget: the most the validations may cost as a share of the training time
            (``AUTO_EVAL_BUDGET`` for ``eval_period="auto"``, else 0: no limit).
    """

    requested: Settings
    settings: Settings
    scales: tuple[int, ...] | None
    anchors: AnchorFit | None
    iterations_per_epoch: int
    eval_budget: float

    def record(self) -> dict[str, Any]:
        """What the checkpoint records of the plan (``meta["plan"]``): plain numbers and lists."""
        data, run = self.settings.data, self.settings.train
        anchors = self.anchors
        return {
            "image_size": int(data.image_size),
            "train_crop": int(run.train_crop),
            "scales": list(self.scales) if self.scales else None,
            "max_iters": int(run.max_iters),
            "iterations_per_epoch": int(self.iterations_per_epoch),
            "eval_period": int(run.eval_period),
            "eval_budget": float(self.eval_budget),
            "anchor_sizes": None if anchors is None else {
                level: [float(s) for s in sizes] for level, sizes in anchors.sizes.items()
            },
            "anchor_aspect_ratios": None if anchors is None else [
                float(r) for r in anchors.aspect_ratios
            ],
            "data": {  # what it trained on (export --int8 calibrates on it): absolute paths
                "dataset": _absolute(data.dataset, named=("voc2007", "shapes")),
                "images": _absolute(data.images), "data_dir": _absolute(data.data_dir),
                "train_split": data.train_split,
            },
        }  # fmt: skip

    def describe(self, initialisation: str | None = None) -> str:
        """The setup printout (``describe_setup``) of this plan."""
        return describe_setup(self.settings, self.scales, self.requested,
                              self.iterations_per_epoch, initialisation)  # fmt: skip


def _absolute(path: str | None, named: Sequence[str] = ()) -> str | None:
    """``path`` made absolute (a recorded path must not depend on the working folder); a
    built-in data set's name, or None, as it is."""
    if path is None or path in named:
        return path
    return str(Path(path).resolve())


def plan_training(
    settings: Settings, world: int = 1, rank: int = 0
) -> tuple[Plan, Any, Any, list[str]]:
    """Settle every "auto" of ``settings`` once, reading the data: the image size, the train
    crop, the multi-scale sizes, the held-out split and epochs as iterations
    (``training_datasets``), the anchors (``fit_training_anchors``; its report is
    ``plan.anchors.report()``) and the validation period (``eval_period``).

    Returns:
        ``(plan, train, val, class names)``: the datasets are those the plan was made from.

    Raises:
        ValueError: a setting no rule can settle (a negative period, zero epochs, ...).
    """
    settled, train, val, classes, scales = training_datasets(settings, world, rank)
    anchors = fit_training_anchors(settled, train, classes, report=False)
    settled = settled.replace(eval_period=eval_period(settled))
    plan = Plan(
        requested=settings, settings=settled, scales=tuple(scales) if scales else None,
        anchors=anchors, iterations_per_epoch=epoch_iters(settled, train),
        eval_budget=AUTO_EVAL_BUDGET if settings.train.eval_period == "auto" else 0.0,
    )  # fmt: skip
    return plan, train, val, classes


def level_strides(levels: Sequence[str]) -> dict[str, int]:
    """``{level: stride}`` of FPN level names: ``p<l>`` has stride ``2 ** l``."""
    return {level: 2 ** int(level[1:]) for level in levels}


def choose_image_size(
    records: Sequence[Any], class_names: Sequence[str],
    strides: Mapping[str, int] | None = None, anchor_offset: float = 0.0,
) -> int:  # fmt: skip
    """``image_size="auto"``: the smallest of ``AUTO_IMAGE_SIZES`` that meets two rules, and
    never more than the images' median short side (no upsampling):

    - the box rule: every class's median box has a short side of at least
      ``AUTO_MIN_BOX_SIDE`` px after the resize (classes and images without boxes do not
      vote);
    - the grid rule: anchors fitted to the boxes at that size reach the RPN's foreground IoU
      for at least ``AUTO_GRID_RECALL`` of the boxes *on the stride grid* of ``strides``
      (default p3-p5) with ``anchor_offset`` (``AnchorFit.grid_recall``). Objects about a
      stride across lose most of their IoU to the grid's spacing, whatever the anchor shapes.

    Where no candidate meets both, the largest allowed one. No boxes at all gives the
    smallest size.
    """
    if not records or not sum(len(r.boxes) for r in records):
        return AUTO_IMAGE_SIZES[0]
    cap = max(AUTO_IMAGE_SIZES[0], int(np.median([min(r.width, r.height) for r in records])))
    needed = _short_side_for_boxes(records, class_names)
    allowed = [size for size in AUTO_IMAGE_SIZES if size <= cap] or [AUTO_IMAGE_SIZES[0]]
    strides = strides or level_strides(BackboneSettings().fpn_levels)  # p3-p5
    for size in allowed:
        if size >= needed and grid_recall(records, size, strides, anchor_offset) >= (
            AUTO_GRID_RECALL
        ):
            return size
    return allowed[-1]


def _short_side_for_boxes(records: Sequence[Any], class_names: Sequence[str]) -> float:
    """The short image side at which the smallest per-class median box side is
    ``AUTO_MIN_BOX_SIDE`` px (the box rule of ``choose_image_size``)."""
    sides, classes = [], []
    for record in records:
        wh = record.boxes[:, 2:] - record.boxes[:, :2]
        sides.append(wh.min(axis=1) / min(record.width, record.height))
        classes.append(record.classes)
    sides, classes = np.concatenate(sides), np.concatenate(classes)
    medians = [np.median(sides[classes == c]) for c in range(len(class_names))
               if (classes == c).any()]  # fmt: skip
    return AUTO_MIN_BOX_SIDE / max(min(medians), 1e-9)


def grid_recall(
    records: Sequence[Any], size: int, strides: Mapping[str, int], anchor_offset: float
) -> float:
    """``AnchorFit.grid_recall`` of anchors fitted to ``records``' boxes at short side ``size``."""
    boxes, _, image_wh = training_boxes(records, size)
    if not len(boxes):
        return 1.0
    fit = fit_anchors(boxes[:, 2:] - boxes[:, :2], strides)
    return float(fit.on_grid(boxes, image_wh, anchor_offset).grid_recall)


def training_datasets(
    settings: Settings, world: int = 1, rank: int = 0
) -> tuple[Settings, Any, Any, list[str], tuple[int, ...] | None]:
    """Settle ``image_size="auto"`` from the training boxes (``choose_image_size``; 224 for the
    generated shapes, whose images are made at that size, and voc2007), then build the
    datasets. The training reader reads at the largest multi-scale size, uncropped in ``pad``
    mode. With ``epochs`` set, ``max_iters`` becomes ``epochs * epoch_iters``.

    Returns:
        ``(settings with the image size (and the iteration count) settled, train, val, class
        names, multi-scale sizes or None)``.
    """
    data = settings.data
    if data.image_size == "auto" and data.dataset in ("shapes", "voc2007"):
        settings = settings.replace(image_size=224)
    elif data.image_size == "auto":
        probe, _, names = datasets_rank_zero_first(settings, world, rank, image_size=224)
        strides = level_strides(settings.model.backbone.fpn_levels)
        offset = settings.model.rpn.anchor_offset
        settings = settings.replace(image_size=choose_image_size(probe.records, names, strides,
                                                                 offset))  # fmt: skip
    size = settings.data.image_size
    settings = settings.replace(train_crop=train_crop_size(settings))
    scales = multiscale_sizes(size) if settings.train.multiscale else None
    train, val, classes = datasets_rank_zero_first(
        settings, world, rank, image_size=size, train_image_size=max(scales) if scales else None,
        train_transform=settings.train.batch_mode == "crop",
    )  # fmt: skip
    if settings.train.epochs is not None:
        settings = settings.replace(max_iters=settings.train.epochs * epoch_iters(settings, train))
    return settings, train, val, classes, scales


def epoch_iters(settings: Settings, train: Any) -> int:
    """Iterations in one epoch: one pass over the training images at the batch size (the
    last, partial batch of a pass is dropped); at least 1."""
    if settings.train.epochs is not None and settings.train.epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {settings.train.epochs}")
    return max(1, len(train) // settings.train.batch_size)


def train_crop_size(settings: Settings) -> int:
    """The settled ``train_crop``: ``"auto"`` gives ``AUTO_TRAIN_CROP`` when the (settled)
    image size is larger, else 0 (whole images)."""
    crop, size = settings.train.train_crop, settings.data.image_size
    if crop != "auto":
        return int(crop)
    return AUTO_TRAIN_CROP if isinstance(size, int) and size > AUTO_TRAIN_CROP else 0


def fit_training_anchors(
    settings: Settings, train: Any, classes: Sequence[str], report: bool = True
) -> AnchorFit | None:
    """``anchor_scale="auto"``: anchors fitted to the training boxes at the (settled) image
    size (``eecs598.anchor_fit``); None when numbers were given. Prints the fit report."""
    if settings.model.rpn.anchor_stride_scale != "auto":
        return None
    strides = level_strides(settings.model.backbone.fpn_levels)
    boxes, box_classes, image_wh = training_boxes(
        train.records, settings.data.image_size, crop=settings.train.batch_mode == "crop"
    )
    fit = fit_anchors(boxes[:, 2:] - boxes[:, :2], strides, classes=box_classes,
                      class_names=classes)  # fmt: skip
    fit = fit.on_grid(boxes, image_wh, settings.model.rpn.anchor_offset)
    if report:
        print(fit.report())
    return fit


def eval_period(settings: Settings) -> int:
    """The settled ``eval_period``: ``"auto"`` gives ``AUTO_EVALUATIONS`` evaluations a run
    (every ``ceil(max_iters / AUTO_EVALUATIONS)`` iterations), else the number given.

    Raises:
        ValueError: a negative period or patience, or a patience without validation."""
    period, patience = settings.train.eval_period, settings.train.patience
    if (period != "auto" and int(period) < 0) or patience < 0:
        raise ValueError(f"eval_period and patience must be >= 0, got {period} and {patience}")
    if period != "auto":
        period = int(period)
    else:
        period = math.ceil(settings.train.max_iters / AUTO_EVALUATIONS)
    if patience and not period:
        raise ValueError(
            f"--patience {patience} stops on the val mAP, but --eval-period is 0 (no validation "
            "while training): give --eval-period N or leave it at auto"
        )
    return period


def describe_setup(
    settings: Settings, scales: Sequence[int] | None, requested: Settings | None = None,
    iterations_per_epoch: int | None = None, initialisation: str | None = None,
) -> str:  # fmt: skip
    """What ``train`` chose, in a few lines: sizes, batches, transforms, anchors, schedule (in
    iterations, and in epochs given ``iterations_per_epoch``), validation, and where the
    weights start (``initialisation``, when given).
    Settings whose default depends on the data and that still have the value of the preset
    for this data (``preset_for``) in ``requested`` (the settings before ``auto`` values were
    settled; default ``settings``) are marked with ``*``."""
    flat, preset = (requested or settings).flat(), preset_for(settings.data.dataset).flat()
    chosen = {k for k in DATA_DEPENDENT if flat[k] == preset[k]}

    def mark(key: str) -> str:
        return "*" if key in chosen else ""

    data, rpn, train = settings.data, settings.model.rpn, settings.train
    transforms = [name for name, on in (("horizontal flip", train.flip),
                  ("photometric distortion", train.photometric), ("IoU crop", train.iou_crop),
                  (f"random windows of at most {train_crop_size(settings)} px"
                   f"{mark('train_crop')}", train_crop_size(settings)))
                  if on] or ["none"]  # fmt: skip
    batching = ("whole images, padded to a multiple of 32, grouped by aspect ratio"
                if train.batch_mode == "pad" else "centre-cropped squares")  # fmt: skip
    scale = rpn.anchor_stride_scale
    anchors = ("fitted to the training boxes (report above)" if scale == "auto"
               else f"{' '.join(f'{v:g}' for v in _values(scale))} x stride")  # fmt: skip
    sizes = (f", multi-scale{mark('multiscale')} {'/'.join(map(str, scales))} per batch"
             if scales else f", multi-scale{mark('multiscale')} off")  # fmt: skip
    beta = settings.model.smooth_l1_beta
    return "\n".join([
        "Training setup (* = default for this data; flags override):",
        f"  image size{mark('image_size')}: short side {data.image_size}{sizes}; evaluation at "
        f"{settings.eval.test_image_size or data.image_size}",
        f"  batches{mark('batch_mode')}: {batching}",
        f"  transforms: {', '.join(transforms)}",
        f"  anchors{mark('anchor_scale')}: {anchors}; FPN levels "
        f"{'-'.join(settings.model.backbone.fpn_levels)}",
        f"  model: FPN {settings.model.backbone.out_channels} channels, box regression"
        f"{mark('box_regression')} {'on' if settings.model.heads.box_regression else 'off'}, "
        f"RPN / RoI samples{mark('rpn_batch_size')} {rpn.batch_size_per_image} / "
        f"{settings.model.heads.batch_size_per_image} per image, box loss{mark('smooth_l1_beta')} "
        + (f"smooth-L1 (beta {beta:.4g})" if beta else "L1")
        + f", RoI Align offset {settings.model.heads.roi_align_offset:g}, FPN and head "
        f"norm{mark('norm')} {'GroupNorm' if settings.model.norm == 'gn' else 'none'}",
        f"  schedule: lr{mark('lr')} {train.lr:g}, warm-up{mark('warmup_iters')} "
        f"{train.warmup_iters} it, gradient clip{mark('grad_clip')} "
        f"{train.grad_clip if train.grad_clip else 'off'}, {train.max_iters} iterations"
        f"{_epochs_text(train.max_iters, iterations_per_epoch)}, batch {train.batch_size}",
        f"  validation{mark('eval_period')}: " + _describe_validation(settings),
        *([f"  initialisation: {initialisation}"] if initialisation else []),
    ])  # fmt: skip


def _epochs_text(max_iters: int, iterations_per_epoch: int | None) -> str:
    """`` (10.7 epochs of 56 iterations)``, or nothing when the epoch is not known."""
    if not iterations_per_epoch:
        return ""
    epochs = max_iters / iterations_per_epoch
    return f" ({epochs:.3g} epochs of {iterations_per_epoch} iterations)"


def _describe_validation(settings: Settings) -> str:
    """When the val split is scored while training, and what is kept."""
    period, patience = eval_period(settings), settings.train.patience
    if not period:
        return "after training only"
    stop = f", stop after {patience} without a better one" if patience else ""
    return (f"mAP@0.5 every {period} iterations and at the end (results.csv, results.png, "
            f"best.pt: the best){stop}")  # fmt: skip


def _values(scale: Any) -> list:
    """An anchor scale setting as a list of numbers."""
    return list(scale) if isinstance(scale, (list, tuple)) else [scale]
