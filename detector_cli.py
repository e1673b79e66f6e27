"""Command line for the two-stage detector: ``demo``, ``train``, ``evaluate`` and ``predict``.

    python detector_cli.py demo                      # offline: generate, train, evaluate
    python detector_cli.py train --dataset ../shared/datasets/bccd --out runs/bccd
    python detector_cli.py evaluate runs/bccd/checkpoint.pt --dataset ../shared/datasets/bccd
    python detector_cli.py predict runs/bccd/checkpoint.pt images/ --out predictions/

A checkpoint carries the model configuration, the class names and the image size, so
``evaluate`` and ``predict`` need no repeated flags. This module sits on top of the package: it
imports ``two_stage_detector``, ``common`` and ``eecs598``, never the reverse.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torchvision.transforms.functional import to_tensor

from common import FPN_LEVELS, DetectorBackboneWithFPN
from eecs598.anchor_fit import AnchorFit, fit_anchors, training_box_sizes
from eecs598.augment import (
    AspectRatioBatchSampler,
    AugmentedDetection,
    PadCollate,
    aspect_ratios_of,
    build_train_transform,
    multiscale_sizes,
    presized_bytes,
)
from eecs598.cache import CachedDetection
from eecs598.checkpoint import load_checkpoint, load_model_weights
from eecs598.coco import COCODetection
from eecs598.files import atomic_write
from eecs598.images import (
    IMAGE_EXTENSIONS,
    CorruptImageError,
    preprocess_image,
    read_rgb_image,
    unnormalize_image,
)
from eecs598.inference import inference_with_detector
from eecs598.mean_ap import plot_ap
from eecs598.shapes import SHAPES_CLASSES, make_shapes_dataset
from eecs598.training import train_detector
from eecs598.utils import detection_grid, detection_visualizer, reset_seed
from eecs598.voc import VOCLayoutDetection, read_voc_xml, voc_objects
from eecs598.voc2007 import VOC2007DetectionTiny
from two_stage_detector import RPN, FasterRCNN, compile_detector

# The notebook's full-training model (section 4.3): build_detector's and `train`'s defaults.
NOTEBOOK_MODEL = {
    "fpn_channels": 128,
    "pre_nms_topk": 500,
    "post_nms_topk": 200,
    "box_regression": False,
    "rpn_batch_size": 16,
    "roi_batch_size": 32,
    "anchor_scale": 8,
    "anchor_offset": 0.0,
    "smooth_l1_beta": 0.0,
    "roi_align_offset": 0.5,
}
# `train` on voc2007 (the notebook's data): the notebook's choices, square crops, flips.
NOTEBOOK_TRAINING = {
    **NOTEBOOK_MODEL,
    "image_size": 224,
    "batch_mode": "crop",
    "multiscale": False,
    "lr": 0.01,
    "warmup_iters": 100,
    "grad_clip": None,
}
# `train` on data nobody tuned for (a VOC-layout folder, a COCO JSON, the shapes data): no crop,
# padded batches, flips and multi-scale, anchors fitted to the boxes, box regression with
# torchvision's smooth-L1 box losses (beta 1/9: tighter boxes than L1, bench/README.md),
# and settings that train from random init without diverging (warmup, clipping). Flags win.
DATA_TRAINING = {
    **NOTEBOOK_MODEL,
    "image_size": "auto",
    "batch_mode": "pad",
    "multiscale": True,
    "anchor_scale": ["auto"],
    "box_regression": True,
    "smooth_l1_beta": 1 / 9,
    "rpn_batch_size": 256,
    "roi_batch_size": 128,
    "lr": 0.02,
    "warmup_iters": 200,
    "grad_clip": 10.0,
}
# The demo's smaller, faster run: `demo` is `train` with these defaults (keys are flag dests).
DEMO = {
    "out": "outputs/demo",
    "num_train": 480,
    "num_val": 96,
    "image_size": 128,
    "fpn_channels": 64,
    "max_iters": 540,
    "batch_size": 16,
    "lr": 0.02,
    "warmup_iters": 30,
    "grad_clip": 10.0,
    "box_regression": True,
    "rpn_batch_size": 64,
    "roi_batch_size": 64,
    "anchor_scale": 4,
    "multiscale": False,
    "no_pretrained": True,
    "test_image_size": 160,
}


# ---------------------------------------------------------------------------------- model


def build_detector(
    num_classes: int,
    fpn_channels: int = NOTEBOOK_MODEL["fpn_channels"],
    pre_nms_topk: int = NOTEBOOK_MODEL["pre_nms_topk"],
    post_nms_topk: int = NOTEBOOK_MODEL["post_nms_topk"],
    box_regression: bool = NOTEBOOK_MODEL["box_regression"],
    pretrained: bool = True,
    rpn_batch_size: int = NOTEBOOK_MODEL["rpn_batch_size"],
    roi_batch_size: int = NOTEBOOK_MODEL["roi_batch_size"],
    anchor_scale: float | Sequence[float] = NOTEBOOK_MODEL["anchor_scale"],
    anchor_offset: float = NOTEBOOK_MODEL["anchor_offset"],
    *,
    anchor_sizes: dict[str, Sequence[float]] | None = None,
    anchor_aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    fpn_levels: Sequence[str] = ("p3", "p4", "p5"),
    smooth_l1_beta: float = NOTEBOOK_MODEL["smooth_l1_beta"],
    roi_align_offset: float = NOTEBOOK_MODEL["roi_align_offset"],
) -> FasterRCNN:
    """The notebook's Faster R-CNN (section 4.3) for ``num_classes`` classes.

    ``rpn_batch_size`` / ``roi_batch_size`` are the anchors and RoIs sampled per image for the
    losses (the notebook's 16 and 32; torchvision uses 256 and 512). ``anchor_scale`` is the
    anchor side in strides: the notebook's 8 gives 64-256 px anchors on p3-p5; 4 (RetinaNet's
    base size) gives 32-128 px, for small images and objects. ``anchor_offset`` is
    ``RPN``'s (0: anchors centred on each feature cell's top-left pixel). ``anchor_sizes``
    (pixels per level, e.g. an ``eecs598.anchor_fit`` fit) replaces ``anchor_scale``;
    ``fpn_levels`` adds the stride-4 ``p2`` level when it starts at ``"p2"``.
    ``smooth_l1_beta`` is both stages' box loss (0: the notebook's L1; torchvision uses 1/9).
    ``roi_align_offset`` is ``FasterRCNN``'s (0.5: the notebook's half-pixel aligned RoI Align;
    0: where torchvision's unaligned RoI Align samples).
    """
    backbone = DetectorBackboneWithFPN(
        out_channels=fpn_channels, pretrained=pretrained, fpn_levels=fpn_levels
    )
    rpn = RPN(
        fpn_channels=fpn_channels,
        stem_channels=[fpn_channels, fpn_channels],
        batch_size_per_image=rpn_batch_size,
        anchor_stride_scale=anchor_scale[0] if _single(anchor_scale) else anchor_scale,
        pre_nms_topk=pre_nms_topk,
        post_nms_topk=post_nms_topk,
        anchor_offset=anchor_offset,
        anchor_sizes=anchor_sizes,
        anchor_aspect_ratios=anchor_aspect_ratios,
        smooth_l1_beta=smooth_l1_beta,
    )
    return FasterRCNN(
        backbone, rpn, num_classes=num_classes, roi_size=(7, 7),
        stem_channels=[fpn_channels, fpn_channels], batch_size_per_image=roi_batch_size,
        box_regression=box_regression, smooth_l1_beta=smooth_l1_beta,
        roi_align_offset=roi_align_offset,
    )  # fmt: skip


def _single(values: float | Sequence[float]) -> bool:
    """One number, or a one-element sequence (argparse ``nargs="+"``)."""
    return not isinstance(values, (int, float)) and len(values) == 1


def load_weights(model: FasterRCNN, checkpoint: dict, path: str | os.PathLike) -> None:
    """Load a checkpoint's weights; a mismatch raises a ValueError naming the settings that
    differ (``eecs598.checkpoint.config_differences``), not the state_dict keys."""
    load_model_weights(model, checkpoint, path)


def load_detector(path: str | os.PathLike, device: str = "cpu") -> tuple[FasterRCNN, dict]:
    """A model rebuilt from a checkpoint's own configuration, with its weights and metadata."""
    path = Path(path)
    checkpoint = load_checkpoint(path, map_location="cpu")  # clear errors for bad files
    if not checkpoint.get("config") or not checkpoint.get("meta"):
        raise ValueError(
            f"{path} has no model configuration or class names: it was not written by "
            "`detector_cli.py train` (or train_detector with a model that has .config/.meta)"
        )
    model = FasterRCNN.from_config(checkpoint["config"], pretrained=False)
    load_weights(model, checkpoint, path)
    model.meta = checkpoint["meta"]
    return model.to(device).eval(), checkpoint


def _training_model(
    args: argparse.Namespace, classes: list[str], fit: AnchorFit | None = None
) -> FasterRCNN:
    """``build_detector`` with the model flags (and the anchors ``fit`` chose for
    ``--anchor-scale auto``), its ``meta`` naming the classes, sizes and transforms."""
    anchors = {"anchor_scale": 8.0} if fit else {"anchor_scale": args.anchor_scale}
    if fit:
        anchors.update(anchor_sizes=fit.sizes, anchor_aspect_ratios=fit.aspect_ratios)
    model = build_detector(
        len(classes), args.fpn_channels, args.pre_nms_topk, args.post_nms_topk,
        box_regression=args.box_regression, pretrained=not args.no_pretrained,
        rpn_batch_size=args.rpn_batch_size, roi_batch_size=args.roi_batch_size,
        anchor_offset=args.anchor_offset, fpn_levels=args.fpn_levels,
        smooth_l1_beta=args.smooth_l1_beta, roi_align_offset=args.roi_align_offset, **anchors,
    )  # fmt: skip
    model.meta = {
        "class_names": classes,
        "image_size": args.image_size,
        "test_image_size": args.test_image_size or args.image_size,
        "training": {key: getattr(args, key) for key in _SETUP_KEYS},
    }
    return model


def _detect(
    model: FasterRCNN, image: torch.Tensor, args: argparse.Namespace, device: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Boxes, labels and scores for one preprocessed image, at --score-thresh / --nms-thresh."""
    with torch.no_grad():
        return model(
            image[None].to(device), test_score_thresh=args.score_thresh,
            test_nms_thresh=args.nms_thresh,
        )  # fmt: skip


# ---------------------------------------------------------------------------------- data


def discover_classes(root: Path) -> list[str]:
    """Sorted object class names found in a VOC-layout folder's annotations."""
    names = set()
    for xml_path in sorted((root / "Annotations").glob("*.xml")):
        for obj in voc_objects(read_voc_xml(xml_path)):  # ValueError naming a malformed file
            name = str(obj.get("name", "")).strip()  # as the reader reads it
            if name:
                names.add(name)
    if not names:
        raise FileNotFoundError(f"No annotated objects under {root / 'Annotations'}")
    return sorted(names)


def make_datasets(
    args: argparse.Namespace, *, dataset: str | None = None, data_dir: str | None = None,
    image_size: int | None = None, test_image_size: int | None = None,
    classes: Sequence[str] | None = None, train_image_size: int | None = None,
    train_transform: bool | None = None,
) -> tuple[Any, Any, list[str]]:  # fmt: skip
    """Train and val datasets plus class names for the data flags in ``args``.

    A keyword that is given replaces its flag: the demo's dataset and data folder, or a
    checkpoint's sizes and classes (a VOC-layout folder's; voc2007 and shapes have their own).
    ``--data-dir`` defaults to ``data``. ``train_image_size`` is the training reader's short
    side when it differs from ``image_size`` (the largest multi-scale size: batches are only
    ever scaled down), ``train_transform`` its centre crop (default: the reader's).
    """
    dataset = dataset or args.dataset
    data_dir = data_dir or args.data_dir or "data"
    size = image_size or getattr(args, "image_size", None) or 224
    test_size = test_image_size or getattr(args, "test_image_size", None) or size
    train_size = train_image_size or size
    skip = getattr(args, "skip_corrupt", False)
    if dataset == "voc2007":
        train = VOC2007DetectionTiny(
            data_dir, "train", args.download, image_size=train_size, skip_corrupt=skip,
            **({} if train_transform is None else {"train_transform": train_transform}),
        )  # fmt: skip
        val = VOC2007DetectionTiny(data_dir, "val", image_size=test_size, skip_corrupt=skip)
        return train, val, [train.idx_to_class[i] for i in range(len(train.idx_to_class))]
    if dataset.lower().endswith(".json"):
        return _coco_datasets(args, dataset, train_size, test_size, classes, train_transform)
    if dataset == "shapes":
        root = Path(data_dir) / "shapes"
        make_shapes_dataset(
            root, num_train=args.num_train, num_val=args.num_val, image_size=size, seed=args.seed
        )
        classes = list(SHAPES_CLASSES)
    else:
        root = Path(dataset)
        if not classes:
            classes = args.classes.split(",") if args.classes else discover_classes(root)
    train = VOCLayoutDetection(
        root, args.train_split, classes, image_size=train_size, skip_corrupt=skip,
        train_transform=train_transform,
    )  # fmt: skip
    val = VOCLayoutDetection(root, args.val_split, classes, image_size=test_size, skip_corrupt=skip)
    return train, val, list(classes)


def _coco_datasets(
    args: argparse.Namespace, dataset: str, size: int, test_size: int,
    classes: Sequence[str] | None, train_transform: bool | None = None,
) -> tuple[Any, Any, list[str]]:  # fmt: skip
    """Train and val ``COCODetection`` for a COCO instances JSON: train on ``dataset`` with
    ``--images``; validate on ``--val-dataset`` with ``--val-images`` (default: its folder), or,
    without it, on ``dataset`` too. Classes: ``classes``, ``--classes``, else the JSON's."""
    names = classes or (args.classes.split(",") if args.classes else None)
    skip = getattr(args, "skip_corrupt", False)
    images = getattr(args, "images", None)
    crop = True if train_transform is None else train_transform
    train = COCODetection(dataset, images, names, size, train_transform=crop, skip_corrupt=skip)
    val_dataset = getattr(args, "val_dataset", None)
    val_images = getattr(args, "val_images", None) if val_dataset else images
    val = COCODetection(
        val_dataset or dataset, val_images, train.class_names, test_size, skip_corrupt=skip
    )
    return train, val, list(train.class_names)


def _datasets_rank_zero_first(
    args: argparse.Namespace, world: int, rank: int, **options: Any
) -> tuple[Any, Any, list[str]]:
    """``make_datasets(args, **options)`` on every process, rank 0 first: it generates or
    downloads the data once, while the other processes wait and then read it."""
    if rank == 0:
        datasets = make_datasets(args, **options)
    if world > 1:
        torch.distributed.barrier()
    if rank != 0:
        datasets = make_datasets(args, **options)
    return datasets


def _eval_loader(dataset: Any, workers: int) -> torch.utils.data.DataLoader:
    """Evaluation batches: one image each, in order (training: ``_train_loader``)."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=1, num_workers=workers, pin_memory=torch.cuda.is_available()
    )


# ---------------------------------------------------------------------------------- training setup

# What `train` records in the checkpoint's meta about how it fed the model.
_SETUP_KEYS = ("batch_mode", "multiscale", "flip", "photometric", "iou_crop", "fpn_levels")
# The most memory `train` spends on images resized to every multi-scale size in advance.
_PRESIZE_BUDGET = 2 * 2**30
# Candidate short sides of `--image-size auto`, smallest first.
_AUTO_IMAGE_SIZES = (224, 256, 288, 320)
# `--image-size auto` wants every class's median box at least this many pixels on its short
# side: two cells of the finest default level (stride 8) plus a margin.
_AUTO_MIN_BOX_SIDE = 20


def choose_training_defaults(args: argparse.Namespace, dataset: str) -> list[str]:
    """Fill in the settings not given on the command line (``argparse.SUPPRESS`` leaves them
    out of ``args``): the notebook's for ``voc2007`` (``NOTEBOOK_TRAINING``), otherwise those
    for data nobody tuned for (``DATA_TRAINING``). Returns the names of those filled in."""
    profile = NOTEBOOK_TRAINING if dataset == "voc2007" else DATA_TRAINING
    filled = [key for key in profile if not hasattr(args, key)]
    for key in filled:
        setattr(args, key, profile[key])
    return filled


def choose_image_size(records: Sequence[Any], class_names: Sequence[str]) -> int:
    """``--image-size auto``: the smallest of ``_AUTO_IMAGE_SIZES`` at which every class's
    median box has a short side of at least ``_AUTO_MIN_BOX_SIDE`` px after the resize, and
    never more than the images' median short side (no upsampling). Images without boxes, and
    classes without boxes, do not vote; no boxes at all gives the smallest size."""
    import numpy as np

    sides, classes, image_sides = [], [], []
    for record in records:
        scale = 1.0 / min(record.width, record.height)  # box side per pixel of short side
        wh = record.boxes[:, 2:] - record.boxes[:, :2]
        sides.append(wh.min(axis=1) * scale)
        classes.append(record.classes)
        image_sides.append(min(record.width, record.height))
    if not records or not sum(len(s) for s in sides):
        return _AUTO_IMAGE_SIZES[0]
    sides, classes = np.concatenate(sides), np.concatenate(classes)
    medians = [
        np.median(sides[classes == c]) for c in range(len(class_names)) if (classes == c).any()
    ]
    needed = _AUTO_MIN_BOX_SIDE / min(medians)  # short side that makes the smallest median fit
    cap = max(_AUTO_IMAGE_SIZES[0], int(np.median(image_sides)))
    fitting = [size for size in _AUTO_IMAGE_SIZES if size >= needed and size <= cap]
    return fitting[0] if fitting else min(cap, _AUTO_IMAGE_SIZES[-1])


def fit_training_anchors(
    args: argparse.Namespace, train: Any, classes: Sequence[str], fpn_strides: dict[str, int],
    report: bool = True,
) -> AnchorFit | None:  # fmt: skip
    """``--anchor-scale auto``: anchors fitted to the training boxes at ``--image-size``
    (``eecs598.anchor_fit``); None when numbers were given. Prints the fit report."""
    if not _auto_anchors(args.anchor_scale):
        return None
    box_wh, box_classes = training_box_sizes(
        train.records, args.image_size, crop=args.batch_mode == "crop"
    )
    fit = fit_anchors(box_wh, fpn_strides, classes=box_classes, class_names=classes)
    if report:
        print(fit.report())
    return fit


def _values(scale: Any) -> list:
    """``--anchor-scale`` as a list (a number set by ``DEMO`` or a list from the parser)."""
    return list(scale) if isinstance(scale, (list, tuple)) else [scale]


def _auto_anchors(scale: Any) -> bool:
    """Whether ``--anchor-scale`` asks for fitted anchors; 'auto' among numbers is an error."""
    values = [str(v) for v in _values(scale)]
    if "auto" in values and values != ["auto"]:
        raise ValueError(f"--anchor-scale is 'auto' or numbers, got {' '.join(values)}")
    return values == ["auto"]


def warn_classes_without_boxes(train: Any, classes: Sequence[str]) -> None:
    """Warn, naming them, about classes that no training box has: they cannot be learned."""
    records = getattr(train, "records", None)
    if records is None:  # a dataset without records: nothing to count
        return
    seen = {int(c) for record in records for c in record.classes[~record.difficult]}
    missing = [name for i, name in enumerate(classes) if i not in seen]
    if missing:
        warnings.warn(
            f"No training boxes for class(es) {', '.join(missing)}: the detector cannot learn "
            "them (their AP will be 0).",
            stacklevel=2,
        )


def _train_loader(
    args: argparse.Namespace, train: Any, scales: Sequence[int] | None, world: int, rank: int
) -> torch.utils.data.DataLoader:
    """The training batches: ``AugmentedDetection`` items (flip, photometric, IoU crop),
    drawn by a ``DistributedSampler`` (seeded, reshuffled per epoch; one process and N
    processes of ``batch_size / N`` see the same global batches), in batches of similar aspect
    ratio with one short side per batch from ``scales``, padded by ``PadCollate``. With the
    image cache on, the images are resized to every scale once, in advance, when that takes
    at most ``_PRESIZE_BUDGET`` bytes (``AugmentedDetection``'s ``presized``); otherwise per
    batch."""
    transform = build_train_transform(args.flip, args.photometric, args.iou_crop)
    presized: Sequence[int] = ()
    if scales and args.cache != "off":
        needed = presized_bytes(train, scales)
        presized = scales if needed <= _PRESIZE_BUDGET else ()
        if rank == 0:
            how = "once, in advance" if presized else "per batch (over the memory budget)"
            print(f"Multi-scale: images resized to each short side {how}: {needed / 2**20:.0f} "
                  f"MiB for all scales, budget {_PRESIZE_BUDGET / 2**20:.0f} MiB")  # fmt: skip
    items = AugmentedDetection(train, transform, presized)
    sampler = torch.utils.data.DistributedSampler(
        items, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True
    )
    ratios = aspect_ratios_of(train) if args.batch_mode == "pad" else [1.0] * len(items)
    batches = AspectRatioBatchSampler(
        sampler, ratios, args.batch_size // world, scales=scales, seed=args.seed
    )
    return torch.utils.data.DataLoader(
        items, batch_sampler=batches, collate_fn=PadCollate(size_divisible=32),
        num_workers=args.workers, pin_memory=torch.cuda.is_available(),
        persistent_workers=args.workers > 0,
    )  # fmt: skip


def describe_setup(
    args: argparse.Namespace, scales: Sequence[int] | None, filled: Sequence[str]
) -> str:
    """What ``train`` chose, in a few lines: sizes, batches, transforms, anchors, schedule.
    Settings taken from the defaults for this data are marked with ``*``."""

    def mark(key: str) -> str:
        return "*" if key in filled else ""

    transforms = [name for name, on in (("horizontal flip", args.flip),
                  ("photometric distortion", args.photometric), ("IoU crop", args.iou_crop))
                  if on] or ["none"]  # fmt: skip
    if args.batch_mode == "pad":
        batching = "whole images, padded to a multiple of 32, grouped by aspect ratio"
    else:
        batching = "centre-cropped squares"
    anchors = (
        "fitted to the training boxes (report above)"
        if _auto_anchors(args.anchor_scale)
        else f"{' '.join(f'{v:g}' for v in _values(args.anchor_scale))} x stride"
    )
    lines = [
        "Training setup (* = default for this data; flags override):",
        f"  image size{mark('image_size')}: short side {args.image_size}"
        + (
            f", multi-scale{mark('multiscale')} {'/'.join(map(str, scales))} per batch"
            if scales
            else f", multi-scale{mark('multiscale')} off"
        )  # fmt: skip
        + f"; evaluation at {args.test_image_size or args.image_size}",
        f"  batches{mark('batch_mode')}: {batching}",
        f"  transforms: {', '.join(transforms)}",
        f"  anchors{mark('anchor_scale')}: {anchors}; FPN levels {'-'.join(args.fpn_levels)}",
        f"  model: FPN {args.fpn_channels} channels, box regression"
        f"{mark('box_regression')} {'on' if args.box_regression else 'off'}, RPN / RoI "
        f"samples{mark('rpn_batch_size')} {args.rpn_batch_size} / {args.roi_batch_size} per image, "
        f"box loss{mark('smooth_l1_beta')} "
        + (f"smooth-L1 (beta {args.smooth_l1_beta:.4g})" if args.smooth_l1_beta else "L1")
        + f", RoI Align offset{mark('roi_align_offset')} {args.roi_align_offset:g}",
        f"  schedule: lr{mark('lr')} {args.lr:g}, warm-up{mark('warmup_iters')} "
        f"{args.warmup_iters} it, gradient clip{mark('grad_clip')} "
        f"{args.grad_clip if args.grad_clip else 'off'}, {args.max_iters} iterations, "
        f"batch {args.batch_size}",
    ]
    return "\n".join(lines)


def init_distributed(device: str, batch_size: int) -> tuple[int, int, str]:
    """Join the ``torchrun`` process group when there is one; returns ``(world, rank, device)``.

    NCCL on CUDA (one GPU per process: the device becomes ``cuda:LOCAL_RANK``), gloo on CPU.
    ``batch_size`` (the global batch) must split evenly over the processes.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 1, 0, device
    import torch.distributed as dist

    cuda = str(device).startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        device = f"cuda:{local_rank}"
    if batch_size % world:
        raise ValueError(f"--batch-size {batch_size} is not divisible by {world} processes")
    return world, dist.get_rank(), device


def _image_files(inputs: Sequence[str]) -> list[Path]:
    """The image files named in ``inputs``, and those in the folders named there (sorted)."""
    files: list[Path] = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"No image or folder at {path}")
    if not files:
        raise FileNotFoundError(f"No {'/'.join(IMAGE_EXTENSIONS)} images in {', '.join(inputs)}")
    return files


def _test_image_size(args: argparse.Namespace, meta: dict) -> int:
    """Short side for evaluation and prediction: --test-image-size, else the checkpoint's test
    size (older checkpoints: its training size)."""
    return args.test_image_size or int(meta.get("test_image_size") or meta["image_size"])


# ---------------------------------------------------------------------------------- outputs


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (``eecs598.files.atomic_write``)."""
    with atomic_write(path, mode="w", encoding="utf-8") as handle:
        handle.write(json.dumps(data, indent=2) + "\n")


def _pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _output_dir(out: str) -> Path:
    """The ``--out`` folder, created if needed."""
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    return path


def evaluate_and_report(
    model: FasterRCNN, val: Any, classes: list[str], out: Path, args: argparse.Namespace,
    device: str,
) -> dict:  # fmt: skip
    """mAP on ``val``: tool-format files, AP chart, detections grid, metrics JSON, table."""
    plt = _pyplot()
    idx_to_class = dict(enumerate(classes))
    start = time.time()
    result = inference_with_detector(
        model, _eval_loader(val, args.workers), idx_to_class,
        score_thresh=args.score_thresh, nms_thresh=args.nms_thresh,
        output_dir=str(out / "mAP"), device=device, progress=False,
    )  # fmt: skip
    seconds = time.time() - start
    plt.close(plot_ap(result, out / "ap_per_class.png"))
    samples = _confident_samples(model, val, args, device)
    plt.close(detection_grid(samples, idx_to_class, ncols=4, path=out / "detections.png"))
    metrics = {
        "mAP": result.map,
        "ap": result.ap,
        "iou_threshold": result.iou_threshold,
        "coco": result.coco.stats if result.coco is not None else None,
        "num_val_images": len(val),
        "eval_seconds": round(seconds, 2),
    }
    write_json(out / "metrics.json", metrics)  # inference_with_detector printed the table
    return metrics


def _confident_samples(
    model: FasterRCNN, val: Any, args: argparse.Namespace, device: str
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Up to 8 evenly spaced val images with their ground truth and confident detections."""
    samples = []
    model.eval()
    for index in torch.linspace(0, len(val) - 1, steps=min(8, len(val))).long().tolist():
        _, image, gt = val[index]
        boxes, labels, scores = _detect(model, image, args, device)
        pred = torch.cat([boxes, labels[:, None].to(boxes), scores[:, None]], dim=1).cpu()
        keep = pred[:, 5] >= 0.5  # readable: confident detections only
        samples.append((unnormalize_image(image), gt[gt[:, 4] >= 0], pred[keep]))
    return samples


# ---------------------------------------------------------------------------------- commands


def cmd_train(
    args: argparse.Namespace, dataset: str | None = None, data_dir: str | None = None
) -> dict | None:
    """Train, then (on rank 0) evaluate and write the report. Runs under ``torchrun`` too:
    ``--batch-size`` is the global batch, split evenly over the processes. ``dataset`` and
    ``data_dir`` replace --dataset and --data-dir (``make_datasets``). Settings not given are
    chosen for the data (``choose_training_defaults``) and printed before training."""
    world, rank, device = init_distributed(args.device, args.batch_size)
    out = _output_dir(args.out)
    checkpoint = out / "checkpoint.pt"
    if rank == 0 and checkpoint.is_file() and not args.resume:  # never destroy the old one
        os.replace(checkpoint, out / "checkpoint.prev.pt")
        print(f"Moved the existing {checkpoint} to checkpoint.prev.pt (use --resume to continue).")
    reset_seed(args.seed)
    filled = choose_training_defaults(args, dataset or args.dataset)
    train, val, classes, scales = _training_datasets(args, world, rank, dataset, data_dir)
    if rank == 0:
        print(f"Dataset: {len(train)} train / {len(val)} val images, classes: {', '.join(classes)}")
        warn_classes_without_boxes(train, classes)
    strides = {level: 2 ** int(level[1:]) for level in args.fpn_levels}
    fit = fit_training_anchors(args, train, classes, strides, report=rank == 0)
    if rank == 0:
        print(describe_setup(args, scales, filled))
    model = _training_model(args, classes, fit)
    if args.cache != "off":
        cache_dir = Path(args.cache_dir or out / "cache") if args.cache == "disk" else None
        train = CachedDetection(train, cache_dir, progress=args.progress, normalize=False)
    if args.sync_bn and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.compile:
        compile_detector(model)
    loader = _train_loader(args, train, scales, world, rank)
    start = time.time()
    history = train_detector(
        model, loader, learning_rate=args.lr, weight_decay=args.weight_decay,
        max_iters=args.max_iters, log_period=args.log_period, device=device,
        warmup_iters=args.warmup_iters, amp=args.amp, grad_clip=args.grad_clip,
        checkpoint_path=checkpoint, checkpoint_period=args.checkpoint_period,
        resume=args.resume, show_plot=False, plot_path=out / "loss.png", progress=args.progress,
    )  # fmt: skip
    train_seconds = time.time() - start
    if world > 1:
        torch.distributed.destroy_process_group()
        if rank != 0:
            return None
    metrics = evaluate_and_report(model, val, classes, out, args, device)
    metrics.update(
        train_seconds=round(train_seconds, 1),
        iterations=args.max_iters,
        final_loss=history[-1] if history else None,
    )
    write_json(out / "metrics.json", metrics)
    print(f"Outputs in {out}/: checkpoint.pt, loss.png, ap_per_class.png, detections.png, ...")
    return metrics


def _training_datasets(
    args: argparse.Namespace, world: int, rank: int, dataset: str | None, data_dir: str | None
) -> tuple[Any, Any, list[str], tuple[int, ...] | None]:
    """Train and val datasets, class names and multi-scale sizes, after settling
    ``--image-size auto`` from the training boxes (``choose_image_size``; 224 for the
    generated shapes, whose images are made at that size). The training reader reads at the
    largest multi-scale size, uncropped in ``pad`` mode."""
    data = {"dataset": dataset, "data_dir": data_dir}
    name = dataset or args.dataset
    if args.image_size == "auto" and name in ("shapes", "voc2007"):
        args.image_size = 224
    elif args.image_size == "auto":
        probe, _, names = _datasets_rank_zero_first(args, world, rank, image_size=224, **data)
        args.image_size = choose_image_size(probe.records, names)
    scales = multiscale_sizes(args.image_size) if args.multiscale else None
    train, val, classes = _datasets_rank_zero_first(
        args, world, rank, image_size=args.image_size,
        train_image_size=max(scales) if scales else None,
        train_transform=args.batch_mode == "crop", **data,
    )  # fmt: skip
    return train, val, classes, scales


def cmd_demo(args: argparse.Namespace) -> dict:
    """``train`` with the demo's defaults (``DEMO``, set on its parser), always on the shapes
    data, which goes to OUT/data unless --data-dir says otherwise."""
    return cmd_train(args, dataset="shapes", data_dir=args.data_dir or str(Path(args.out) / "data"))


def cmd_evaluate(args: argparse.Namespace) -> dict:
    """mAP of a checkpoint on the val split, at the checkpoint's sizes and with its classes."""
    model, checkpoint = load_detector(args.checkpoint, args.device)
    meta = checkpoint["meta"]
    classes = list(meta["class_names"])
    _, val, _ = make_datasets(
        args, image_size=meta["image_size"], test_image_size=_test_image_size(args, meta),
        classes=classes,
    )  # fmt: skip
    out = _output_dir(args.out)
    return evaluate_and_report(model, val, classes, out, args, args.device)


def cmd_predict(args: argparse.Namespace) -> list[dict]:
    """Detections for each image: an annotated copy each, and all of them in detections.json."""
    plt = _pyplot()
    model, checkpoint = load_detector(args.checkpoint, args.device)
    classes = list(checkpoint["meta"]["class_names"])
    size = _test_image_size(args, checkpoint["meta"])
    out = _output_dir(args.out)
    records = []
    for path in _image_files(args.images):
        try:
            image = read_rgb_image(path)
        except CorruptImageError as err:
            raise ValueError(f"Cannot read image {path}: {err.__cause__}") from err
        tensor, (sx, sy) = preprocess_image(image, size)
        boxes, labels, scores = _detect(model, tensor, args, args.device)
        boxes = boxes.cpu() / torch.tensor([sx, sy, sx, sy])  # back to original pixels
        pred = torch.cat([boxes, labels.cpu()[:, None].float(), scores.cpu()[:, None]], dim=1)
        fig = detection_visualizer(to_tensor(image), classes, pred=pred, show=False)
        fig.savefig(out / f"{path.stem}_pred.png", dpi=100)
        plt.close(fig)
        records.append(
            {
                "image": str(path),
                "detections": [
                    {"class": classes[int(c)], "score": round(float(s), 4),
                     "box": [round(float(v), 2) for v in b]}
                    for b, c, s in zip(boxes, labels, scores, strict=True)
                ],
            }
        )  # fmt: skip
    write_json(out / "detections.json", records)
    print(f"{len(records)} images: annotated copies and detections.json in {out}/")
    return records


# ---------------------------------------------------------------------------------- parser


def _add_data_args(p: argparse.ArgumentParser) -> None:
    """Which data, where, and at what size (train, demo and evaluate)."""
    p.add_argument(
        "--dataset",
        default="shapes",
        help="voc2007, shapes, a folder in PASCAL VOC layout, or a COCO instances .json "
        "(images in --images)",
    )
    p.add_argument(
        "--images",
        default=None,
        help="COCO --dataset: the folder its file_name entries are relative to (when not "
        "given: the JSON's folder)",
    )
    p.add_argument(
        "--val-dataset",
        default=None,
        help="COCO --dataset: instances .json to validate on (when not given: --dataset)",
    )
    p.add_argument(
        "--val-images",
        default=None,
        help="image folder of --val-dataset (when not given: that JSON's folder)",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="where VOC2007 lives / is downloaded, or the shapes data is written",
    )
    p.add_argument("--download", action="store_true", help="download VOC2007 if missing")
    p.add_argument(
        "--skip-corrupt",
        action="store_true",
        help="decode every image first and leave out unreadable ones (with a warning) instead "
        "of stopping at the first one",
    )
    p.add_argument(
        "--classes",
        default=None,
        help="comma-separated class list for a VOC-layout folder (when not given: the "
        "sorted names found in its annotations)",
    )
    p.add_argument("--train-split", default="train", help="ImageSets/Main list to train on")
    p.add_argument("--val-split", default="val", help="ImageSets/Main list to evaluate on")
    p.add_argument(
        "--image-size",
        type=_image_size_value,
        default=argparse.SUPPRESS,
        help="short image side, or 'auto' (VOC-layout folders and COCO files): the smallest of "
        f"{'/'.join(map(str, _AUTO_IMAGE_SIZES))} at which every class's median box is at "
        f"least {_AUTO_MIN_BOX_SIDE} px on its short side. Default: auto for such data, 224 "
        "for voc2007 and shapes",
    )
    p.add_argument("--num-train", type=int, default=DEMO["num_train"], help="shapes: images")
    p.add_argument("--num-val", type=int, default=DEMO["num_val"], help="shapes: images")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="DataLoader worker processes")  # fmt: skip


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    """How detections are made and kept (every command)."""
    p.add_argument(
        "--test-image-size",
        type=int,
        default=None,
        help="short side of evaluation and prediction images (when not given: the "
        "checkpoint's, else --image-size); larger than the training size finds more small "
        "objects",
    )
    p.add_argument("--score-thresh", type=float, default=0.05,
                   help="drop detections scored below this")  # fmt: skip
    p.add_argument("--nms-thresh", type=float, default=0.5,
                   help="IoU above which a detection hides a lower one of its class")  # fmt: skip
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N")  # fmt: skip


def _add_checkpoint_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a checkpoint.pt written by train or demo")


def _add_images_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", help="image files and/or folders")


def _add_out_arg(p: argparse.ArgumentParser) -> None:
    """``--out``; its default is each command's own (``build_parser``)."""
    p.add_argument("--out", help="output folder")


def _add_schedule_args(p: argparse.ArgumentParser) -> None:
    """The optimisation: iterations, batch, learning rate and its schedule, regularisation."""
    p.add_argument("--max-iters", type=int, default=9000, help="SGD iterations")
    p.add_argument("--batch-size", type=int, default=16,
                   help="images per iteration (over all processes under torchrun)")  # fmt: skip
    data, notebook = DATA_TRAINING, NOTEBOOK_TRAINING
    p.add_argument("--lr", type=float, default=argparse.SUPPRESS,
                   help="learning rate; x0.1 at 60%% and 90%% of --max-iters. Default: "
                   f"{notebook['lr']} for voc2007, else {data['lr']}")  # fmt: skip
    p.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay")
    p.add_argument("--warmup-iters", type=int, default=argparse.SUPPRESS,
                   help="linear learning-rate warm-up from 0.1%% of --lr. Default: "
                   f"{notebook['warmup_iters']} for voc2007, "
                   f"else {data['warmup_iters']}")  # fmt: skip
    p.add_argument("--grad-clip", type=_optional_float, default=argparse.SUPPRESS,
                   help="clip the gradient norm at this value ('none': no clipping). Default: "
                   f"none for voc2007, else {data['grad_clip']} (keeps random-init training "
                   "from diverging)")  # fmt: skip


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """``build_detector``'s settings; defaults: ``NOTEBOOK_MODEL``."""
    model = NOTEBOOK_MODEL
    p.add_argument("--fpn-channels", type=int, default=model["fpn_channels"],
                   help="channels of the FPN levels and the heads' stems")  # fmt: skip
    p.add_argument("--pre-nms-topk", type=int, default=model["pre_nms_topk"],
                   help="RPN: best anchors per level and image that go into NMS")  # fmt: skip
    p.add_argument("--post-nms-topk", type=int, default=model["post_nms_topk"],
                   help="RPN: proposals kept per image after NMS")  # fmt: skip
    data = DATA_TRAINING
    p.add_argument(
        "--box-regression",
        action=argparse.BooleanOptionalAction,
        default=argparse.SUPPRESS,
        help="second-stage class-specific box regression. Default: off for voc2007 (the "
        "notebook's model), else on",
    )
    p.add_argument(
        "--rpn-batch-size",
        type=int,
        default=argparse.SUPPRESS,
        help="anchors sampled per image for the RPN losses. Default: "
        f"{model['rpn_batch_size']} for voc2007, else {data['rpn_batch_size']}",
    )
    p.add_argument(
        "--roi-batch-size",
        type=int,
        default=argparse.SUPPRESS,
        help="RoIs sampled per image for the second-stage losses. Default: "
        f"{model['roi_batch_size']} for voc2007, else {data['roi_batch_size']}",
    )
    p.add_argument(
        "--anchor-scale",
        type=_anchor_scale_value,
        nargs="+",
        default=argparse.SUPPRESS,
        help="anchor side(s) in units of the FPN level's stride (8: 64-256 px on p3-p5; "
        "several values give several sizes per level), or 'auto': sizes per level and aspect "
        "ratios fitted to the training boxes (eecs598.anchor_fit; the fit report is printed). "
        f"Default: {model['anchor_scale']} for voc2007, else auto",
    )
    p.add_argument(
        "--fpn-levels",
        nargs="+",
        type=_fpn_level,
        default=["p3", "p4", "p5"],
        help="FPN levels: p3 p4 p5 (the notebook's), or p2 p3 p4 p5 to add the stride-4 "
        "level for small objects (costlier)",
    )
    p.add_argument(
        "--anchor-offset",
        type=float,
        default=model["anchor_offset"],
        help="anchor centres within each feature cell, in strides: 0 on the cell's top-left "
        "pixel (where this backbone's receptive fields are centred), 0.5 in its middle (the "
        "notebook's section 3.6.1)",
    )
    p.add_argument(
        "--smooth-l1-beta",
        type=_smooth_l1_beta,
        default=argparse.SUPPRESS,
        help="box losses of both stages: 0 is L1 (the notebook's), above 0 smooth-L1, "
        "quadratic below beta (torchvision's 1/9). Default: 0 for voc2007, else 1/9",
    )
    p.add_argument(
        "--roi-align-offset",
        type=_roi_align_offset,
        default=argparse.SUPPRESS,
        help="where RoI Align places feature (i, j) of stride s: at ((j + offset) s, "
        "(i + offset) s). 0.5 is the cell centre (aligned=True, the notebook's); 0 the cell's "
        "top-left pixel, where this backbone's receptive fields and the anchors are centred "
        "(torchvision's aligned=False; bench/README.md compares them). Default: 0.5",
    )
    p.add_argument(
        "--no-pretrained",
        action="store_true",
        help="skip loading ImageNet weights for the backbone",
    )


def _add_augment_args(p: argparse.ArgumentParser) -> None:
    """How training images become batches (``eecs598.augment``)."""
    p.add_argument(
        "--batch-mode",
        choices=("pad", "crop"),
        default=argparse.SUPPRESS,
        help="pad: whole images (short side --image-size), padded to a multiple of 32 and "
        "grouped by aspect ratio; crop: centre-cropped squares (the notebook's). Default: crop "
        "for voc2007, else pad",
    )
    p.add_argument(
        "--multiscale",
        action=argparse.BooleanOptionalAction,
        default=argparse.SUPPRESS,
        help="one random short side per batch from about 0.75-1.25 x --image-size "
        "(eecs598.augment.multiscale_sizes). Default: off for voc2007, else on",
    )
    p.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="random horizontal flips",
    )
    p.add_argument(
        "--photometric", action="store_true", help="random brightness/contrast/saturation/hue"
    )
    p.add_argument("--iou-crop", action="store_true", help="SSD-style random IoU crops")


def _image_size_value(text: str) -> int | str:
    """``--image-size``: a positive int or ``auto``."""
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 32:
        raise argparse.ArgumentTypeError(
            f"--image-size must be a number of pixels or 'auto', got {text!r} (at least 32)"
        )
    return int(text)


def _smooth_l1_beta(text: str) -> float:
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


def _roi_align_offset(text: str) -> float:
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


def _anchor_scale_value(text: str) -> float | str:
    """``--anchor-scale``: a positive number or ``auto``."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"anchor scales must be positive, got {text}")
    return value


def _optional_float(text: str) -> float | None:
    """A number, or ``none`` for None."""
    return None if text.lower() == "none" else float(text)


def _fpn_level(text: str) -> str:
    """One of ``common.FPN_LEVELS``; the error lists them."""
    if text not in FPN_LEVELS:
        raise argparse.ArgumentTypeError(
            f"invalid FPN level {text!r}: valid levels are {', '.join(FPN_LEVELS)}"
        )
    return text


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """How the run executes: precision, compilation, logs, checkpoints, data cache, seed."""
    p.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the backbone and heads (compile_detector); pays off on long GPU runs",
    )
    p.add_argument("--log-period", type=int, default=50, help="print the losses every N iterations")
    p.add_argument("--checkpoint-period", type=int, default=500,
                   help="write OUT/checkpoint.pt every N iterations (and at the end)")  # fmt: skip
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/checkpoint.pt (without it, an existing one is first moved to "
        "OUT/checkpoint.prev.pt)",
    )
    p.add_argument(
        "--cache",
        choices=("memory", "disk", "off"),
        default="memory",
        help="decode and resize the training images once (CachedDetection); 'disk' also "
        "keeps them in a file under --cache-dir for later runs",
    )
    p.add_argument("--cache-dir", default=None, help="cache folder (when not given: OUT/cache)")
    p.add_argument(
        "--sync-bn",
        action="store_true",
        help="under torchrun on GPUs: batch-norm statistics over all processes' batches",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="initial weights, data order and sampling (and the shapes data)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (log lines only)")  # fmt: skip


# The options of `train` and `demo`, in --help order.
TRAINING_ARGS = (_add_data_args, _add_out_arg, _add_schedule_args, _add_model_args,
                 _add_augment_args, _add_run_args, _add_eval_args)  # fmt: skip


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except for switches and options without one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        switch = (argparse._StoreTrueAction, argparse._StoreFalseAction)
        chosen = action.default is argparse.SUPPRESS  # the help says how it is chosen
        if action.default is None or chosen or isinstance(action, switch):
            return action.help or ""
        return super()._get_help_string(action)


def _add_command(
    sub: argparse._SubParsersAction,
    name: str,
    func: Callable,
    adders: Sequence[Callable],
    defaults: dict,
    **texts: str,
) -> None:
    """Subcommand ``name``: ``adders`` add its arguments in --help order, ``defaults`` (its
    own --out and the like) replace theirs, ``func`` runs it; ``texts``: help, description."""
    p = sub.add_parser(name, formatter_class=_HelpFormatter, **texts)
    for add in adders:
        add(p)
    p.set_defaults(func=func, **defaults)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detector_cli.py", description=__doc__.split("\n\n")[0],
        formatter_class=_HelpFormatter,
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command")
    _add_command(
        sub, "demo", cmd_demo, TRAINING_ARGS, DEMO,
        help="offline demo: generate the shapes dataset, train, evaluate, write a report",
        description="Generates a VOC-layout shapes dataset, trains a small Faster R-CNN from "
        "scratch, evaluates mAP@0.5 on its val split, and writes loss.png, ap_per_class.png, "
        "detections.png, checkpoint.pt and metrics.json into --out.",
    )  # fmt: skip
    _add_command(
        sub, "train", cmd_train, TRAINING_ARGS, {"out": "runs/train"},
        help="train on voc2007, shapes or a VOC-layout folder",
        description="Train the notebook's Faster R-CNN (defaults: section 4.3's full run) and "
        "evaluate it on the val split. OUT/checkpoint.pt is written atomically every "
        "--checkpoint-period iterations; --resume continues from it.",
    )  # fmt: skip
    _add_command(
        sub, "evaluate", cmd_evaluate,
        (_add_checkpoint_arg, _add_out_arg, _add_data_args, _add_eval_args),
        {"out": "runs/evaluate", "seed": 0},  # seed: the shapes data's
        help="mAP of a checkpoint on a dataset's val split",
        description="Prints the mAP table and pycocotools' COCO-style summary; writes "
        "ap_per_class.png, detections.png, metrics.json, and under --out/mAP the mAP tool's "
        "ground-truth/ and detection-results/ files and COCO's ground_truth.json and "
        "detections.json.",
    )  # fmt: skip
    _add_command(
        sub, "predict", cmd_predict,
        (_add_checkpoint_arg, _add_images_arg, _add_out_arg, _add_eval_args),
        {"out": "runs/predict"},
        help="detect objects in image files or folders",
        description="Writes <name>_pred.png with the detections drawn, and detections.json "
        "(boxes in the original image's pixels).",
    )  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # `demo` is the default job
        args = parser.parse_args(["demo", *(argv or [])])
    try:
        args.func(args)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
