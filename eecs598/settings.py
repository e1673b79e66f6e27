"""Every setting of the detector and its training recipe, defined once.

The settings form a tree grouped like the model's own ``config``: ``Settings.model`` holds the
backbone's, the RPN's and the second-stage heads' settings, and beside it sit the data, the
training run, the evaluation, what ``predict`` keeps and how ``export`` writes. Each field is
a plain typed value with its default, its help text and its command-line flag
(``detector_cli.py`` builds its parser from these fields, so a new setting costs one field
here plus the code that uses it).

Named presets are the combinations the package uses:

- ``NOTEBOOK``: the notebook's full training run (section 4.3) on VOC 2007; ``train`` uses it
  for ``--dataset voc2007``.
- ``OWN_DATA``: data nobody tuned for (a VOC-layout folder, a COCO JSON, the generated shapes):
  whole images padded into batches, multi-scale, flips, anchors fitted to the training boxes,
  box regression with smooth-L1 box losses, and a schedule that trains from random
  initialisation without diverging (warm-up, gradient clipping).
- ``DEMO``: ``OWN_DATA`` made small enough to train in minutes on a CPU (``make demo``).

The class defaults are the notebook's constructor defaults (``RPN``, ``FasterRCNN``,
``DetectorBackboneWithFPN`` take theirs from here); a preset that differs says so and why.
Flat names (``Settings.flat``, ``Settings.replace``) are the command-line flags with
underscores: ``settings.replace(max_iters=600, rpn_batch_size=256)``.

This module is part of the bottom layer: it imports nothing from the model.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BackboneSettings",
    "RPNSettings",
    "HeadSettings",
    "ModelSettings",
    "DataSettings",
    "TrainSettings",
    "EvalSettings",
    "PredictSettings",
    "ExportSettings",
    "AuditSettings",
    "Settings",
    "NOTEBOOK",
    "OWN_DATA",
    "DEMO",
    "DATA_DEPENDENT",
    "COMMAND_OUT",
    "EVALUATE_OUT",
    "PREDICT_OUT",
    "EXPORT_NAME",
    "EXPORT_INT8_NAME",
    "AUDIT_OUT",
    "AUTO_IMAGE_SIZES",
    "AUTO_MIN_BOX_SIDE",
    "AUTO_GRID_RECALL",
    "AUTO_TRAIN_CROP",
    "AUTO_EVALUATIONS",
    "AUTO_EVAL_BUDGET",
    "HELD_OUT_FRACTION",
    "HELD_OUT_SEED",
    "PRESIZE_BUDGET",
    "VAL_BATCH_SIZE",
    "LEGACY_CONFIG",
    "preset_for",
    "complete_config",
    "setting_fields",
    "SettingsGroup",
    "FPN_LEVELS",
    "NORMS",
]

# The FPN levels a backbone can give, finest first (stride 4 to 32).
FPN_LEVELS = ("p2", "p3", "p4", "p5")
# Normalisations of the FPN and head stems (``ModelSettings.norm``).
NORMS = ("none", "gn")


# ---------------------------------------------------------------------------------- values


def image_size_value(text: str) -> int | str:
    """``--image-size``: a number of pixels (at least 32) or ``auto``."""
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 32:
        raise argparse.ArgumentTypeError(
            f"--image-size must be a number of pixels or 'auto', got {text!r} (at least 32)"
        )
    return int(text)


def train_crop_value(text: str) -> int | str:
    """``--train-crop``: a window side in pixels (0: off, else at least 32) or ``auto``."""
    if text == "auto":
        return text
    if not text.isdigit() or 0 < int(text) < 32:
        raise argparse.ArgumentTypeError(
            f"--train-crop must be 0, a number of pixels (at least 32) or 'auto', got {text!r}"
        )
    return int(text)


def eval_period_value(text: str) -> int | str:
    """``--eval-period``: iterations between evaluations (0: none while training) or ``auto``."""
    if text == "auto":
        return text
    if not text.isdigit():
        raise argparse.ArgumentTypeError(
            f"--eval-period must be a number of iterations (0: off) or 'auto', got {text!r}"
        )
    return int(text)


def count_value(flag: str) -> Callable[[str], int]:
    """A parser for ``flag``: a whole number >= 0, else an error naming the flag and value."""

    def parse(text: str) -> int:
        if not text.isdigit():
            raise argparse.ArgumentTypeError(f"{flag} must be a whole number >= 0, got {text!r}")
        return int(text)

    return parse


def unit_interval_value(flag: str) -> Callable[[str], float]:
    """A parser for ``flag``: a number in [0, 1], else an error naming the flag and value."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not 0.0 <= value <= 1.0:
            raise argparse.ArgumentTypeError(f"{flag} must be a number in [0, 1], got {text!r}")
        return value

    return parse


def smooth_l1_beta_value(text: str) -> float:
    """``--smooth-l1-beta``: a number >= 0, or a fraction such as ``1/9``."""
    try:
        num, _, den = text.partition("/")
        value = float(num) / float(den or 1)
    except (ValueError, ZeroDivisionError):
        value = float("nan")
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(
            f"--smooth-l1-beta must be a number >= 0 such as 0.111 or 1/9, got {text!r}"
        )
    return value


def roi_align_offset_value(text: str) -> float:
    """``--roi-align-offset``: a number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(
            f"--roi-align-offset must be a number in [0, 1) such as 0 or 0.5, got {text!r}"
        )
    return value


def anchor_scale_value(text: str) -> float | str:
    """One ``--anchor-scale`` value: a positive number or ``auto``."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"anchor scales must be positive, got {text}")
    return value


def anchor_scale_setting(values: Sequence[float | str]) -> float | str | tuple[float, ...]:
    """``--anchor-scale``'s values as a setting: one number or ``auto`` alone, else a tuple
    (several sizes per level); ``auto`` among numbers is an error."""
    words = [str(v) for v in values]
    if "auto" in words and words != ["auto"]:
        raise ValueError(f"--anchor-scale is 'auto' or numbers, got {' '.join(words)}")
    return values[0] if len(values) == 1 else tuple(values)


def optional_float_value(text: str) -> float | None:
    """A number, or ``none`` for None."""
    return None if text.lower() == "none" else float(text)


def fpn_level_value(text: str) -> str:
    """One of ``FPN_LEVELS``; the error lists them."""
    if text not in FPN_LEVELS:
        raise argparse.ArgumentTypeError(
            f"invalid FPN level {text!r}: valid levels are {', '.join(FPN_LEVELS)}"
        )
    return text


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def setting(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    flag: str | None = None,
    parse: Callable[[str], Any] | None = None,
    nargs: str | int | None = None,
    choices: Sequence[str] | None = None,
    convert: Callable[[Any], Any] | None = None,
    factory: Callable[[], Any] | None = None,
) -> Any:
    """A settings field with its command-line flag.

    Args:
        default: the value (``factory`` instead: computed when the settings are made).
        help: what it does, for ``--help`` (the default is appended by the CLI).
        flag: the flat name and flag (``--{flag with -}``); default: the field's name.
        parse: turns one command-line word into a value (default: the default's type;
            booleans become ``--name / --no-name`` switches).
        nargs, choices: as ``argparse``'s.
        convert: turns the parsed list of an ``nargs`` flag into the setting's value.
    """
    metadata = {"help": help, "flag": flag, "parse": parse, "nargs": nargs,
                "choices": choices, "convert": convert}  # fmt: skip
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# Where the entry points write when no output is named: `evaluate` and `predict` into these
# folders (`train` into the preset's `out`); `export` writes EXPORT_NAME beside the checkpoint,
# which its empty `out` stands for.
EVALUATE_OUT = "runs/evaluate"
PREDICT_OUT = "runs/predict"
EXPORT_NAME = "model.onnx"
EXPORT_INT8_NAME = "model-int8.onnx"
AUDIT_OUT = "runs/audit"
COMMAND_OUT = {"evaluate": EVALUATE_OUT, "predict": PREDICT_OUT, "export": "", "audit": AUDIT_OUT}


# ---------------------------------------------------------------------------------- groups


class SettingsGroup:
    """What every settings dataclass can do: list, change and compare its settings by their
    flat names (the command-line flags with underscores), nested groups included."""

    def flat(self) -> dict[str, Any]:
        """Every setting by its flat name, in tree order."""
        return {name: value for name, value in _walk(self)}

    def replace(self, **overrides: Any) -> Any:
        """A copy with the settings named by their flat names changed (frozen: the original
        stays as it was).

        Raises:
            ValueError: for a name that is no setting here (with the closest names).
        """
        known = self.flat()
        for name in overrides:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=3)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise ValueError(f"No setting named {name!r}{hint}")
        return _replace(self, overrides)

    def differences(self, other: Any) -> dict[str, tuple[Any, Any]]:
        """``{flat name: (self's value, other's value)}`` where the two differ."""
        theirs = other.flat()
        return {k: (v, theirs[k]) for k, v in self.flat().items() if theirs[k] != v}


def _flat_name(f: dataclasses.Field) -> str:
    """A field's flat name: its ``flag`` when it has one, else its own name."""
    return f.metadata.get("flag") or f.name


def _walk(node: Any) -> Iterator[tuple[str, Any]]:
    """``(flat name, value)`` of every leaf under a settings object."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield from _walk(value)
        else:
            yield _flat_name(f), value


def _replace(node: Any, overrides: Mapping[str, Any]) -> Any:
    """``node`` with its leaves named in ``overrides`` (flat names) changed, recursively."""
    changes = {}
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            changed = _replace(value, overrides)
            if changed is not value:
                changes[f.name] = changed
        elif _flat_name(f) in overrides:
            changes[f.name] = overrides[_flat_name(f)]
    return dataclasses.replace(node, **changes) if changes else node


# ---------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class BackboneSettings(SettingsGroup):
    """``DetectorBackboneWithFPN``'s settings (``common``)."""

    out_channels: int = setting(
        128, "channels of the FPN levels and the heads' stems", flag="fpn_channels"
    )
    fpn_levels: tuple[str, ...] = setting(
        ("p3", "p4", "p5"),
        "FPN levels: p3 p4 p5 (the notebook's), or p2 p3 p4 p5 to add the stride-4 level for "
        "small objects (costlier)",
        parse=fpn_level_value, nargs="+", convert=tuple,
    )  # fmt: skip
    pretrained: bool = setting(
        True, "load ImageNet weights for the backbone (--no-pretrained: random init)"
    )


@dataclass(frozen=True)
class RPNSettings(SettingsGroup):
    """``RPN``'s settings (``two_stage_detector``): anchors, matching, sampling, proposals."""

    batch_size_per_image: int = setting(
        16, "anchors sampled per image for the RPN losses", flag="rpn_batch_size"
    )
    anchor_stride_scale: float | str | tuple[float, ...] = setting(
        8.0,
        "anchor side(s) in units of the FPN level's stride (8: 64-256 px on p3-p5; several "
        "values give several sizes per level), or 'auto': sizes per level and aspect ratios "
        "fitted to the training boxes (eecs598.anchor_fit; the fit report is printed)",
        flag="anchor_scale", parse=anchor_scale_value, nargs="+", convert=anchor_scale_setting,
    )  # fmt: skip
    anchor_aspect_ratios: tuple[float, ...] = setting(
        (0.5, 1.0, 2.0), "anchor h / w ratios (replaced by fitted ones with --anchor-scale auto)",
        parse=float, nargs="+", convert=tuple,
    )  # fmt: skip
    anchor_iou_thresholds: tuple[float, float] = setting(
        (0.3, 0.6), "RPN matching: IoU below the first is background, from the second foreground",
        parse=float, nargs=2, convert=tuple,
    )  # fmt: skip
    nms_thresh: float = setting(0.7, "IoU of the RPN's per-level NMS", flag="rpn_nms_thresh")
    pre_nms_topk: int = setting(400, "RPN: best anchors per level and image that go into NMS")
    post_nms_topk: int = setting(100, "RPN: proposals kept per image after NMS")
    allow_low_quality_matches: bool = setting(
        True, "each GT box's best anchors are foreground too (the Faster R-CNN paper's rule)"
    )
    min_proposal_size: float = setting(1e-3, "proposals smaller than this (pixels) are dropped")
    anchor_offset: float = setting(
        0.0,
        "anchor centres within each feature cell, in strides: 0 on the cell's top-left pixel "
        "(where this backbone's receptive fields are centred), 0.5 in its middle (the notebook's "
        "section 3.6.1)",
    )


@dataclass(frozen=True)
class HeadSettings(SettingsGroup):
    """``FasterRCNN``'s second-stage settings (``two_stage_detector``)."""

    batch_size_per_image: int = setting(
        32, "RoIs sampled per image for the second-stage losses", flag="roi_batch_size"
    )
    roi_size: tuple[int, int] = setting(
        (7, 7), "RoI Align output size (height width)", parse=int, nargs=2, convert=tuple
    )
    box_regression: bool = setting(False, "second-stage class-specific box regression")
    detections_per_image: int = setting(100, "the most detections kept per image")
    roi_align_offset: float = setting(
        0.5,
        "where RoI Align places feature (i, j) of stride s: at ((j + offset) s, (i + offset) s). "
        "0.5 is the cell centre (aligned=True, the notebook's); 0 the cell's top-left pixel, "
        "where this backbone's receptive fields and the anchors are centred (torchvision's "
        "aligned=False; bench/README.md compares them)",
        parse=roi_align_offset_value,
    )


@dataclass(frozen=True)
class ModelSettings(SettingsGroup):
    """The detector: backbone, RPN and second stage, and the box loss both stages share."""

    backbone: BackboneSettings = field(default_factory=BackboneSettings)
    rpn: RPNSettings = field(default_factory=RPNSettings)
    heads: HeadSettings = field(default_factory=HeadSettings)
    smooth_l1_beta: float = setting(
        0.0,
        "box losses of both stages: 0 is L1 (the notebook's), above 0 smooth-L1, quadratic "
        "below beta (torchvision's 1/9)",
        parse=smooth_l1_beta_value,
    )
    norm: str = setting(
        "none",
        "normalisation after each conv of the FPN and of both heads' stems: none (the "
        "notebook's) or gn (GroupNorm, as detectron2 trains detectors from random "
        "initialisation: the heads then pass the backbone a gradient whatever their weights' "
        "scale)",
        choices=NORMS,
    )


# ---------------------------------------------------------------------------------- data, run

# The rules that settle ``image_size="auto"`` (``recipe.plan.choose_image_size``): the
# candidate short sides, smallest first; the box rule: every class's median box at least
# this many pixels on its short side (two cells of the finest default level, stride 8, plus a
# margin); the grid rule: at least this share of the training boxes reach the RPN's
# foreground IoU with an anchor where the RPN places anchors (``AnchorFit.grid_recall``).
# Below it the RPN has too few positives to learn from.
AUTO_IMAGE_SIZES = (224, 256, 288, 320, 384, 448, 512, 576, 640)
AUTO_MIN_BOX_SIDE = 20
AUTO_GRID_RECALL = 0.8
# Data without a val split: the share of its images held out for validation, and the seed
# that picks them (fixed, so that `train` and `evaluate` hold out the same images).
HELD_OUT_FRACTION = 0.1
HELD_OUT_SEED = 0


@dataclass(frozen=True)
class DataSettings(SettingsGroup):
    """Which data, where, and at what size."""

    dataset: str = setting(
        "shapes",
        "voc2007, shapes, a folder in PASCAL VOC layout, or a COCO instances .json such as a "
        "Roboflow export (images in --images)",
    )
    images: str | None = setting(
        None, "COCO --dataset: the folder its file_name entries are relative to (default: the "
        "JSON's folder)", parse=str,
    )  # fmt: skip
    val_dataset: str | None = setting(
        None, "what to validate on: a COCO instances .json or a VOC-layout folder (default: "
        "the data's val split; without one, a held-out 10% of the training images, saved in "
        "OUT/split.json)",
        parse=str,
    )  # fmt: skip
    val_images: str | None = setting(
        None, "image folder of --val-dataset (default: that JSON's folder)", parse=str
    )
    data_dir: str | None = setting(
        None, "where VOC2007 lives / is downloaded, or the shapes data is written (default: "
        "data; the demo: OUT/data)", parse=str,
    )  # fmt: skip
    download: bool = setting(False, "download VOC2007 if missing")
    skip_corrupt: bool = setting(
        False, "decode every image first and leave out unreadable ones (with a warning) instead "
        "of stopping at the first one",
    )  # fmt: skip
    classes: str | None = setting(
        None, "comma-separated class list for a VOC-layout folder (default: the sorted names "
        "found in its annotations); evaluate, predict, export: the class names, in the "
        "classifier's order, of a checkpoint that does not record them (the notebook's from "
        "before it saved them; a 20-class one gets VOC's)", parse=str,
    )  # fmt: skip
    train_split: str = setting("train", "ImageSets/Main list to train on")
    val_split: str = setting("val", "ImageSets/Main list to evaluate on")
    image_size: int | str = setting(
        224,
        "short image side, or 'auto' (VOC-layout folders and COCO files): the smallest of "
        f"{AUTO_IMAGE_SIZES[0]}-{AUTO_IMAGE_SIZES[-1]} at which every class's median box is at "
        f"least {AUTO_MIN_BOX_SIDE} px on its short side and anchors on the stride grid reach "
        f"{AUTO_GRID_RECALL:.0%} of the boxes, never above the images' median short side "
        f"({AUTO_IMAGE_SIZES[0]} for voc2007 and shapes)",
        parse=image_size_value,
    )
    num_train: int = setting(480, "shapes: training images generated")
    num_val: int = setting(96, "shapes: val images generated")
    workers: int = setting(min(2, os.cpu_count() or 1), "DataLoader worker processes")


# `train_crop="auto"`: images trained at a larger short side are trained in random windows of
# this many pixels a side, so a step costs what it costs at this size.
AUTO_TRAIN_CROP = 320
# The most memory `train` spends on images resized to every multi-scale size in advance.
PRESIZE_BUDGET = 2 * 2**30
# `eval_period="auto"`: evaluations on the val split in a run (and one after the last
# iteration), and the most they may cost, as a share of the training time (the period grows
# when they would cost more: large val images, a fast training step); images per validation
# batch (any period).
AUTO_EVALUATIONS = 10
AUTO_EVAL_BUDGET = 0.1
VAL_BATCH_SIZE = 8


@dataclass(frozen=True)
class TrainSettings(SettingsGroup):
    """The optimisation, how training images become batches, and how the run executes."""

    weights: str | None = setting(
        None, "start from this checkpoint's weights (fine-tuning, on the same or other classes): "
        "its network settings (FPN channels and levels, norm, RoI size, box regression) are "
        "used where you keep the default; layers whose shape differs start fresh",
        parse=str,
    )  # fmt: skip
    max_iters: int = setting(9000, "SGD iterations")
    epochs: int | None = setting(
        None, "train for N epochs instead of --max-iters: an epoch is one pass over the "
        "training images, (training images // --batch-size) iterations; when set, it decides "
        "the iteration count",
        parse=int,
    )  # fmt: skip
    batch_size: int = setting(16, "images per iteration (over all processes under torchrun)")
    lr: float = setting(0.01, "learning rate; x0.1 at 60% and 90% of --max-iters")
    weight_decay: float = setting(1e-4, "SGD weight decay")
    warmup_iters: int = setting(100, "linear learning-rate warm-up from 0.1% of --lr")
    grad_clip: float | None = setting(
        None, "clip the gradient norm at this value ('none': no clipping)",
        parse=optional_float_value,
    )  # fmt: skip
    batch_mode: str = setting(
        "crop",
        "pad: whole images (short side --image-size), padded to a multiple of 32 and grouped by "
        "aspect ratio; crop: centre-cropped squares (the notebook's)",
        choices=("pad", "crop"),
    )
    multiscale: bool = setting(
        False, "one random short side per batch from about 0.75-1.25 x --image-size "
        "(eecs598.augment.multiscale_sizes)",
    )  # fmt: skip
    flip: bool = setting(True, "random horizontal flips")
    photometric: bool = setting(False, "random brightness/contrast/saturation/hue")
    iou_crop: bool = setting(False, "SSD-style random IoU crops")
    train_crop: int | str = setting(
        0, "train on a random window of at most N x N px of each resized image, so that a step "
        "costs what N px images cost while objects keep the size --image-size gives them (0: "
        f"whole images; auto: {AUTO_TRAIN_CROP} when --image-size is larger, else 0)",
        parse=train_crop_value,
    )  # fmt: skip
    cache: str = setting(
        "memory",
        "decode and resize the training images once (CachedDetection); 'disk' also keeps them "
        "in a file under --cache-dir for later runs",
        choices=("memory", "disk", "off"),
    )
    cache_dir: str | None = setting(None, "cache folder (default: OUT/cache)", parse=str)
    amp: bool = setting(False, "mixed precision (CUDA only)")
    compile: bool = setting(
        False, "torch.compile the backbone and heads (compile_detector); pays off on long GPU runs"
    )
    log_period: int = setting(50, "print the losses every N iterations")
    eval_period: int | str = setting(
        0, "evaluate mAP@0.5 on the val split every N iterations and at the end, keeping "
        f"OUT/results.csv, OUT/best.pt and OUT/results.png (auto: {AUTO_EVALUATIONS} times a "
        f"run, fewer where that would cost over {AUTO_EVAL_BUDGET:.0%} of the training time; 0: "
        "only once, after training)",
        parse=eval_period_value,
    )  # fmt: skip
    patience: int = setting(
        0, "with --eval-period: stop after N evaluations in a row without a higher val "
        "mAP@0.5 (0: never)",
        parse=count_value("--patience"),
    )  # fmt: skip
    checkpoint_period: int = setting(
        500, "write OUT/checkpoint.pt every N iterations (and at the end)"
    )
    resume: bool = setting(
        False, "continue from OUT/checkpoint.pt (without it, an existing checkpoint.pt, best.pt "
        "and results.csv are first moved to OUT/*.prev.*)",
    )  # fmt: skip
    sync_bn: bool = setting(
        False, "under torchrun on GPUs: batch-norm statistics over all processes' batches"
    )
    seed: int = setting(0, "initial weights, data order and sampling (and the shapes data)")
    progress: bool = setting(True, "a progress bar (--no-progress: log lines only)")


@dataclass(frozen=True)
class EvalSettings(SettingsGroup):
    """How detections are made and kept (evaluation, prediction, the end of training)."""

    test_image_size: int | None = setting(
        None, "short side of evaluation and prediction images (default: the checkpoint's, else "
        "--image-size); larger than the training size finds more small objects", parse=int,
    )  # fmt: skip
    score_thresh: float = setting(0.05, "drop detections scored below this")
    nms_thresh: float = setting(0.5, "IoU above which a detection hides a lower one of its class")
    device: str = setting(help="cpu, cuda or cuda:N", factory=default_device)


@dataclass(frozen=True)
class PredictSettings(SettingsGroup):
    """What ``predict`` keeps and writes (evaluation keeps every detection from
    ``score_thresh`` up, as mAP needs)."""

    conf: float = setting(
        0.25, "predict: keep and draw the detections scored at least this (evaluation keeps "
        "all from --score-thresh, for the mAP)",
        parse=unit_interval_value("--conf"),
    )  # fmt: skip
    coco: bool = setting(
        False, "predict: also write detections.coco.json (COCO instances format, a score on "
        "each annotation: FiftyOne and CVAT import it)",
    )  # fmt: skip


@dataclass(frozen=True)
class ExportSettings(SettingsGroup):
    """How ``export`` writes a checkpoint for deployment (the thresholds it fixes in the
    graph are ``EvalSettings``')."""

    format: str = setting(
        "onnx", "export: the file format (ONNX: one graph from normalised images to padded "
        "detections, run by onnxruntime)", choices=("onnx",),
    )  # fmt: skip
    int8: bool = setting(
        False, "export: quantize the graph to int8 for CPUs (onnxruntime static quantization: "
        "convolutions and matrix products in 8 bits, NMS and box decoding in float; "
        f"written as {EXPORT_INT8_NAME!r}); needs onnxruntime",
    )  # fmt: skip
    calibration: str | None = setting(
        None, "export --int8: the images that set the int8 ranges: a data set (its training "
        "images) or a folder of images (default: the data the checkpoint trained on)",
        parse=str,
    )  # fmt: skip
    calibration_images: int = setting(
        200, "export --int8: calibrate on at most this many images, spread over the data",
        parse=count_value("--calibration-images"),
    )  # fmt: skip
    weight_bits: int = setting(
        7, "export --int8: bits of each int8 weight. 7 runs as calibrated on every x86 CPU; 8 "
        "is slightly finer but only for CPUs with VNNI (AVX-512 VNNI, AVX-VNNI): without it "
        "(AVX2) onnxruntime's int8 kernels saturate their 16-bit sums and detections drift",
        choices=(7, 8),
    )  # fmt: skip


@dataclass(frozen=True)
class AuditSettings(SettingsGroup):
    """How ``audit`` finds label errors (``recipe.audit``; the scores: ``eecs598.audit``)."""

    folds: int = setting(
        2, "audit: train this many models, each on all but one part of the training images, "
        "and detect on the part it did not see (out-of-sample detections)",
        parse=count_value("--folds"),
    )  # fmt: skip
    checkpoint: str | None = setting(
        None, "audit: take the detections of this checkpoint instead of training folds (for "
        "data it never trained on: a val or test split)", parse=str,
    )  # fmt: skip
    min_score: float = setting(
        0.1, "audit: list suspects scored at least this in audit.csv",
        parse=unit_interval_value("--min-score"),
    )  # fmt: skip
    fix_score: float = setting(
        0.5, "audit: suggest a correction (in the corrections file) for suspects scored at "
        "least this", parse=unit_interval_value("--fix-score"),
    )  # fmt: skip


# ---------------------------------------------------------------------------------- the tree


@dataclass(frozen=True)
class Settings(SettingsGroup):
    """Everything one run needs: ``model``, ``data``, ``train``, ``eval``, ``predict``,
    ``export``, ``audit`` and the output folder.

    Frozen: ``replace`` returns a changed copy, so a preset is never modified by a run.
    """

    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    predict: PredictSettings = field(default_factory=PredictSettings)
    export: ExportSettings = field(default_factory=ExportSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    out: str = setting("runs/train", "output folder")


def setting_fields(group: type) -> Iterator[tuple[str, dataclasses.Field]]:
    """``(flat name, field)`` of every setting in a settings class, nested groups included."""
    for f in dataclasses.fields(group):
        if f.name in _GROUP_TYPES:
            yield from setting_fields(_GROUP_TYPES[f.name])
        else:
            yield _flat_name(f), f


# The classes of the fields that hold a nested group (annotations are strings here).
_GROUP_TYPES = {
    "model": ModelSettings,
    "backbone": BackboneSettings,
    "rpn": RPNSettings,
    "heads": HeadSettings,
    "data": DataSettings,
    "train": TrainSettings,
    "eval": EvalSettings,
    "predict": PredictSettings,
    "export": ExportSettings,
    "audit": AuditSettings,
}


# ---------------------------------------------------------------------------------- presets

# The notebook's full run (section 4.3): its RPN passes 500 / 200 proposals where the RPN
# constructor's defaults (its section 4.1 overfit cell) are 400 / 100.
NOTEBOOK = Settings().replace(pre_nms_topk=500, post_nms_topk=200, dataset="voc2007")

# Data nobody tuned for. Differs from the notebook where its choices fail on new data:
# whole images (no crop) padded into aspect-grouped batches with multi-scale short sides; an
# image size at which anchors on the stride grid reach the boxes, trained in 320 px windows
# when larger; anchors fitted to the training boxes; box regression with torchvision's
# smooth-L1 box loss (beta 1/9); torchvision's larger RPN / RoI samples; GroupNorm in the FPN
# and heads (how detectron2 trains detectors from random initialisation: without it, the
# heads' N(0, 0.01) stems pass the backbone almost no gradient); and a schedule that trains
# from random initialisation without diverging (lr 0.02, a longer warm-up, clipping at 10).
OWN_DATA = NOTEBOOK.replace(
    dataset="shapes",
    image_size="auto",
    train_crop="auto",
    norm="gn",
    batch_mode="pad",
    multiscale=True,
    anchor_scale="auto",
    box_regression=True,
    smooth_l1_beta=1 / 9,
    rpn_batch_size=256,
    roi_batch_size=128,
    lr=0.02,
    warmup_iters=200,
    grad_clip=10.0,
    eval_period="auto",
)

# `make demo`: OWN_DATA on the generated shapes, small enough for a newcomer's first five minutes
# on a 2-core CPU: 128 px images of one scale, a 64-channel FPN from random init, 4 x stride
# anchors (the shapes are small), fewer samples, a short schedule (360 iterations, 12 epochs:
# val mAP@0.5 is above 90% by then; 540 add about 2 points for half as long again),
# and evaluation at 160 px.
DEMO = OWN_DATA.replace(
    out="outputs/demo",
    image_size=128,
    fpn_channels=64,
    max_iters=360,
    warmup_iters=30,
    rpn_batch_size=64,
    roi_batch_size=64,
    anchor_scale=4.0,
    multiscale=False,
    pretrained=False,
    test_image_size=160,
)

# The settings whose default depends on the data (``NOTEBOOK`` for voc2007, else ``OWN_DATA``).
DATA_DEPENDENT = tuple(
    name for name, (mine, theirs) in NOTEBOOK.differences(OWN_DATA).items() if name != "dataset"
)


def preset_for(dataset: str | None = None, command: str = "train") -> Settings:
    """The settings an entry point starts from for ``dataset`` (default: ``OWN_DATA``'s):
    ``NOTEBOOK`` for ``voc2007``, else ``OWN_DATA``, with ``dataset`` set and, for
    ``command`` ``evaluate``, ``predict`` or ``export``, its output (``COMMAND_OUT``)."""
    dataset = dataset or OWN_DATA.data.dataset
    preset = (NOTEBOOK if dataset == "voc2007" else OWN_DATA).replace(dataset=dataset)
    if command in COMMAND_OUT:
        return preset.replace(out=COMMAND_OUT[command])
    if command != "train":
        raise ValueError(f"no preset for the command {command!r}: train, {', '.join(COMMAND_OUT)}")
    return preset


# ---------------------------------------------------------------------------------- checkpoints

# What models saved before a setting existed trained with: cell-centre anchors, L1 box losses
# and the half-pixel aligned RoI Align (``FasterRCNN.config`` layout).
LEGACY_CONFIG = {
    "smooth_l1_beta": 0.0,
    "roi_align_offset": 0.5,
    "norm": "none",
    "rpn": {"anchor_offset": 0.5, "smooth_l1_beta": 0.0, "norm": "none"},
}


def complete_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's ``FasterRCNN.config`` with the settings added after it was written filled
    in from ``LEGACY_CONFIG``. A new dict; ``config`` is not changed. Resuming compares the
    completed config, so an old checkpoint warns only about settings that really differ."""
    top = {k: v for k, v in LEGACY_CONFIG.items() if k != "rpn"}
    return {**top, **config, "rpn": {**LEGACY_CONFIG["rpn"], **config.get("rpn", {})}}
