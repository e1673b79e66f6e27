"""The training recipe as functions a notebook can call: data, model, training, evaluation.

``train(settings)``, ``evaluate(checkpoint, settings)`` and ``predict(checkpoint, images,
settings)`` are what ``detector_cli.py``'s commands run; the parts they are made of are public
too, in the order ``train`` calls them:

1. ``training_datasets``: the datasets (``make_datasets``) at the short side
   ``choose_image_size`` picks for ``image_size="auto"``, and the multi-scale sizes;
2. ``fit_training_anchors``: anchors fitted to the training boxes for ``anchor_scale="auto"``;
3. ``describe_setup``: what was chosen, printed before training;
4. ``build_detector``: the model for ``ModelSettings``;
5. ``train_loader``: augmented, padded, aspect-grouped batches;
6. ``eecs598.training.train_detector``, then ``evaluate_and_report``.

Settings come from ``eecs598.settings`` (every default, and the presets ``NOTEBOOK``,
``OWN_DATA`` and ``DEMO``)::

    from eecs598.settings import preset_for
    import recipe

    settings = preset_for("data/train/_annotations.coco.json").replace(
        images="data/train", max_iters=600, batch_size=8, out="runs/mine")
    metrics = recipe.train(settings)

A checkpoint carries the model configuration, the class names and the image size, so
``evaluate`` and ``predict`` need no repeated settings. Imports point one way: this module uses
``eecs598``, ``common`` and ``two_stage_detector``; ``a4_helper`` and the CLI sit above it.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.transforms.functional import to_tensor

from common import DetectorBackboneWithFPN
from eecs598.anchor_fit import AnchorFit, fit_anchors, training_boxes
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
from eecs598.checkpoint import detector_meta, load_checkpoint, load_model_weights
from eecs598.coco import COCODetection
from eecs598.deploy import OPSET, OnnxDetector, export_onnx, require_exporter
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
from eecs598.settings import (
    DATA_DEPENDENT,
    NOTEBOOK,
    BackboneSettings,
    ModelSettings,
    Settings,
    preset_for,
)
from eecs598.shapes import SHAPES_CLASSES, make_shapes_dataset
from eecs598.training import LossHistory, train_detector
from eecs598.utils import detection_grid, detection_visualizer, reset_seed
from eecs598.validation import BEST_CHECKPOINT, RESULTS_CSV, PeriodicValidation
from eecs598.voc import (
    VOCLayoutDetection,
    held_out_split,
    read_voc_xml,
    voc_folders,
    voc_image_ids,
    voc_objects,
)
from eecs598.voc2007 import VOC_CLASSES, VOC2007DetectionTiny
from two_stage_detector import RPN, FasterRCNN, compile_detector

__all__ = [
    "SHAPES_CLASSES",
    "build_detector",
    "read_detector_checkpoint",
    "state_dict_config",
    "load_detector",
    "load_trained_detector",
    "read_weights_checkpoint",
    "with_network_of",
    "start_from_weights",
    "describe_initialisation",
    "discover_classes",
    "make_datasets",
    "room_for_every_box",
    "hold_out",
    "train_crop_size",
    "epoch_iters",
    "choose_image_size",
    "training_datasets",
    "fit_training_anchors",
    "warn_classes_without_boxes",
    "train_loader",
    "eval_loader",
    "val_loader",
    "eval_period",
    "describe_setup",
    "init_distributed",
    "evaluate_and_report",
    "train",
    "evaluate",
    "predict",
    "image_files",
    "predictions_as_coco",
    "export",
]

# What `train` records in the checkpoint's meta about how it fed the model.
SETUP_KEYS = (
    "batch_mode",
    "multiscale",
    "flip",
    "photometric",
    "iou_crop",
    "train_crop",
    "fpn_levels",
)
# The most memory `train` spends on images resized to every multi-scale size in advance.
PRESIZE_BUDGET = 2 * 2**30
# Where `evaluate` and `predict` write when no settings say (`train`: the settings' `out`).
EVALUATE_OUT, PREDICT_OUT = "runs/evaluate", "runs/predict"
# What `export` writes beside the checkpoint when no file is named.
EXPORT_NAME = "model.onnx"
# Candidate short sides of `image_size="auto"`, smallest first.
AUTO_IMAGE_SIZES = (224, 256, 288, 320, 384, 448, 512, 576, 640)
# `image_size="auto"`, the box rule: every class's median box at least this many pixels on
# its short side: two cells of the finest default level (stride 8) plus a margin.
AUTO_MIN_BOX_SIDE = 20
# `image_size="auto"`, the grid rule: at least this share of the training boxes reach the
# RPN's foreground IoU with an anchor where the RPN places anchors (`AnchorFit.grid_recall`,
# anchors fitted at that size). Below it the RPN has too few positives to learn from.
AUTO_GRID_RECALL = 0.8
# `train_crop="auto"`: images trained at a larger short side are trained in random windows of
# this many pixels a side, so a step costs what it costs at this size.
AUTO_TRAIN_CROP = 320
# Data without a val split: the share of its images held out for validation, and the seed
# that picks them (fixed, so that `train` and `evaluate` hold out the same images).
HELD_OUT_FRACTION = 0.1
HELD_OUT_SEED = 0
# `eval_period="auto"`: evaluations on the val split in a run (and one after the last
# iteration); images per validation batch.
AUTO_EVALUATIONS = 10
VAL_BATCH_SIZE = 8
# `eval_period="auto"`: the most the evaluations may cost, as a share of the training time
# (the period grows when they would cost more: large val images, a fast training step).
AUTO_EVAL_BUDGET = 0.1


# ---------------------------------------------------------------------------------- model


def build_detector(
    num_classes: int,
    settings: ModelSettings | None = None,
    fit: AnchorFit | None = None,
    **overrides: Any,
) -> FasterRCNN:
    """Faster R-CNN for ``num_classes`` classes as ``settings`` say (default: the notebook's
    section 4.3 model, ``NOTEBOOK.model``), with ``overrides`` by flat name
    (``build_detector(3, fpn_channels=32, pretrained=False)``).

    ``fit`` (an ``eecs598.anchor_fit`` result) gives the anchor sizes per level and the aspect
    ratios; it is required when ``anchor_scale`` is ``"auto"``. Both stems are two 3x3 convs of
    ``fpn_channels``.
    """
    model = (settings or NOTEBOOK.model).replace(**overrides)
    channels = model.backbone.out_channels
    backbone = DetectorBackboneWithFPN(
        out_channels=channels, pretrained=model.backbone.pretrained,
        fpn_levels=model.backbone.fpn_levels, norm=model.norm,
    )  # fmt: skip
    rpn = RPN(fpn_channels=channels, stem_channels=[channels, channels],
              smooth_l1_beta=model.smooth_l1_beta, norm=model.norm,
              **_rpn_arguments(model, fit))  # fmt: skip
    heads = model.heads
    return FasterRCNN(
        backbone, rpn, num_classes=num_classes, roi_size=heads.roi_size,
        stem_channels=[channels, channels], batch_size_per_image=heads.batch_size_per_image,
        box_regression=heads.box_regression, detections_per_image=heads.detections_per_image,
        smooth_l1_beta=model.smooth_l1_beta, roi_align_offset=heads.roi_align_offset,
        norm=model.norm,
    )  # fmt: skip


def _rpn_arguments(model: ModelSettings, fit: AnchorFit | None) -> dict[str, Any]:
    """``RPN``'s keyword arguments from the settings, the anchors from ``fit`` when given."""
    arguments = {
        name: getattr(model.rpn, name)
        for name in ("batch_size_per_image", "anchor_stride_scale", "anchor_aspect_ratios",
                     "anchor_iou_thresholds", "nms_thresh", "pre_nms_topk", "post_nms_topk",
                     "allow_low_quality_matches", "min_proposal_size", "anchor_offset")
    }  # fmt: skip
    if fit is not None:
        arguments.update(anchor_stride_scale=8.0, anchor_sizes=fit.sizes,
                         anchor_aspect_ratios=fit.aspect_ratios)  # fmt: skip
    elif arguments["anchor_stride_scale"] == "auto":
        raise ValueError(
            "anchor_scale 'auto' needs anchors fitted to the training boxes: pass "
            "fit=recipe.fit_training_anchors(...), or give anchor_scale numbers"
        )
    return arguments


def read_detector_checkpoint(
    path: str | os.PathLike, class_names: Sequence[str] | str | None = None
) -> dict[str, Any]:
    """A checkpoint or weights file (``eecs598.checkpoint.load_checkpoint``) with its model
    configuration and ``meta`` (class names, image sizes) complete, however old it is:

    * no configuration (a bare ``state_dict``, as the notebook's ``rcnn_detector.pt`` was
      before it carried one): the notebook's section 4.3 model (``NOTEBOOK.model``) with the
      FPN channels, class count and box regression its weights show (``state_dict_config``);
    * no class names: ``class_names`` (a list, or comma-separated), else VOC's 20 classes
      for a 20-class model (the notebook's data), else a ValueError saying to pass
      ``--classes``; a checkpoint's own names are kept;
    * no image size: the notebook's (``NOTEBOOK.data.image_size``).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: a truncated or foreign file; class names unknown, or not as many as the
            model's classes.
    """
    checkpoint = load_checkpoint(path, map_location="cpu")  # clear errors for bad files
    config = checkpoint.get("config") or state_dict_config(checkpoint["model"], path)
    meta = dict(checkpoint.get("meta") or {})
    names = meta.get("class_names") or _class_names(class_names, config["num_classes"], path)
    image_size = int(meta.get("image_size") or NOTEBOOK.data.image_size)
    described = detector_meta(names, image_size, meta.get("test_image_size"))
    return {**checkpoint, "config": config, "meta": {**meta, **described}}


def _class_names(given: Sequence[str] | str | None, num_classes: int, path: Any) -> list[str]:
    """The class names of a checkpoint that records none (see ``read_detector_checkpoint``)."""
    if isinstance(given, str):
        given = [name.strip() for name in given.split(",") if name.strip()]
    if given:
        if len(given) != num_classes:
            raise ValueError(
                f"--classes names {len(given)} classes but {path} has {num_classes}: give its "
                "class names in the classifier's order"
            )
        return list(given)
    if num_classes == len(VOC_CLASSES):
        return list(VOC_CLASSES)
    raise ValueError(
        f"{path} does not record its class names (written before checkpoints carried them) and "
        f"has {num_classes} classes, not VOC's 20: pass them, --classes name1,name2,... in "
        "the classifier's order"
    )


def state_dict_config(state: Mapping[str, torch.Tensor], path: Any = "weights") -> dict:
    """The configuration of a bare ``state_dict`` from the notebook: ``NOTEBOOK.model`` (its
    section 4.3 model) with the FPN channels, the class count and box regression read from
    the weights' shapes. A model of other settings fails to load, naming what differs."""
    try:
        channels = int(state["backbone.fpn_params.output_p3.weight"].shape[0])
        logits = [k for k in state if k.startswith("cls_pred.") and k.endswith(".bias")]
        num_classes = int(state[max(logits, key=lambda k: int(k.split(".")[1]))].shape[0]) - 1
    except (KeyError, ValueError, IndexError) as err:
        raise ValueError(
            f"{path} holds weights without a model configuration, and not those of the "
            f"notebook's FasterRCNN (no {err}): it cannot be rebuilt"
        ) from err
    box_regression = any(k.startswith("box_pred.") for k in state)
    model = build_detector(num_classes, NOTEBOOK.model, fpn_channels=channels,
                           box_regression=box_regression, pretrained=False)  # fmt: skip
    return model.config


def load_detector(
    path: str | os.PathLike, device: str = "cpu", class_names: Sequence[str] | str | None = None
) -> tuple[FasterRCNN, dict]:
    """A model rebuilt from a checkpoint's own configuration, with its weights and metadata
    (``model.meta``: class names, image sizes, how it was trained), in eval mode. Any
    checkpoint or weights file of ``read_detector_checkpoint`` (``class_names``: see there).

    Raises:
        ValueError: for a file that is no checkpoint, class names unknown, or weights that do
            not fit (naming the settings that differ).
    """
    checkpoint = read_detector_checkpoint(path, class_names)
    model = FasterRCNN.from_config(checkpoint["config"], pretrained=False)
    load_model_weights(model, checkpoint, path)
    model.meta = checkpoint["meta"]
    return model.to(device).eval(), checkpoint


def load_trained_detector(
    checkpoint_path: str | os.PathLike,
    weights_path: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    class_names: Sequence[str] | None = None,
) -> FasterRCNN:
    """The notebook's trained model (sections 4.3.1 and 4.4) from ``checkpoint_path`` (the
    training checkpoint of ``train_detector``), or, when there is none, from ``weights_path``
    (the final weights, e.g. ``rcnn_detector.pt``), in eval mode on ``device``.

    Prints which file it loaded, and says so when the training stopped before its last
    iteration. Files of any age load (``read_detector_checkpoint``): ``class_names``, the
    data's, name the classes of a file that does not; a file naming other classes than
    ``class_names`` is loaded with a warning (a model trained on other data).

    Raises:
        FileNotFoundError: neither file exists; the message says to train first.
    """
    paths = [Path(p) for p in (checkpoint_path, weights_path) if p is not None]
    path = next((p for p in paths if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(
            f"No checkpoint at {paths[0]}" + (f" and no weights at {paths[1]}" if paths[1:] else "")
            + ": train the model first (in the notebook: run sections 3.2 (data) and 4.3 (full "
            "training), which write them), then this again."
        )  # fmt: skip
    model, checkpoint = load_detector(path, "cpu", class_names)
    trained_on = checkpoint["meta"]["class_names"]
    if class_names is not None and list(class_names) != list(trained_on):
        warnings.warn(
            f"{path} was trained on the classes {', '.join(trained_on)}, not on the data's "
            f"{', '.join(class_names)}: its class indices mean other things here",
            stacklevel=2,
        )
    done, planned = checkpoint.get("iteration"), checkpoint.get("max_iters")
    if done is None:
        instead = f" (no training checkpoint at {paths[0]})" if path != paths[0] else ""
        print(f"Loaded the weights in {path}{instead}.")
    elif done < planned:
        print(f"Note: training stopped at iteration {done} of {planned} (a disconnect?); run it "
              f"again to finish. Using the weights of iteration {done} from {path}.")  # fmt: skip
    else:
        print(f"Loaded the model trained for {done} iterations from {path}")
    return model.to(device)


# The model settings that shape a network's weights: what ``weights`` takes from its
# checkpoint (where the settings keep the preset's value), as flat names and config paths.
NETWORK_SETTINGS = {
    "fpn_channels": ("backbone", "out_channels"),
    "fpn_levels": ("backbone", "fpn_levels"),
    "norm": ("norm",),
    "roi_size": ("roi_size",),
    "box_regression": ("box_regression",),
}


def read_weights_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint that ``weights`` names, checked before anything is written: any file
    ``read_detector_checkpoint`` reads, so a ``train`` checkpoint or the notebook's.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: a truncated or foreign file, or one whose class names are unknown.
    """
    try:
        return read_detector_checkpoint(path)
    except ValueError as err:
        raise ValueError(f"--weights {path}: {err}") from err


def with_network_of(settings: Settings, checkpoint: Mapping[str, Any]) -> Settings:
    """``settings`` with each ``NETWORK_SETTINGS`` entry still at its preset value (for this
    data) replaced by the checkpoint's, so that its weights fit; values you set win."""
    config = FasterRCNN.complete_config(checkpoint["config"])
    preset, flat = preset_for(settings.data.dataset).flat(), settings.flat()
    taken = {}
    for name, path in NETWORK_SETTINGS.items():
        value: Any = config
        for key in path:
            value = value.get(key) if isinstance(value, Mapping) else None
        if value is not None and flat[name] == preset[name]:
            taken[name] = tuple(value) if isinstance(value, list) else value
    return settings.replace(**taken)


def start_from_weights(
    model: FasterRCNN, checkpoint: Mapping[str, Any], classes: Sequence[str], path: str
) -> str:
    """Copy a checkpoint's weights into ``model`` where they fit; returns a line for the
    setup printout.

    Weights of the same name and shape are copied. The class-specific rows (the classifier's
    ``C + 1`` rows, background first, and the box regressor's ``4 C``) are copied by class
    name: a class the checkpoint knows keeps its rows, a new one starts fresh. Any other
    weight whose shape differs (e.g. the RPN predictors, for another number of anchors per
    location) starts fresh; one warning names them and the new classes.
    """
    saved, state = checkpoint["model"], model.state_dict()
    old = list(checkpoint["meta"]["class_names"])
    rows = {f"cls_pred.{len(model.cls_pred) - 1}.{p}": (1, 1) for p in ("weight", "bias")}
    if model.box_regression:
        rows |= {f"box_pred.{p}": (0, 4) for p in ("weight", "bias")}
    fresh, copied = [], 0
    for name, tensor in state.items():
        source = saved.get(name)
        if name in rows and source is not None and source.shape[1:] == tensor.shape[1:]:
            lead, per = rows[name]
            target = tensor.clone()
            target[:lead] = source[:lead]
            for i, cls in enumerate(classes):
                if cls in old:
                    j = old.index(cls)
                    target[lead + i * per : lead + (i + 1) * per] = source[
                        lead + j * per : lead + (j + 1) * per
                    ]
            state[name], copied = target, copied + 1
        elif source is not None and source.shape == tensor.shape:
            state[name], copied = source, copied + 1
        else:
            fresh.append(name)
    model.load_state_dict(state)
    new = [c for c in classes if c not in old]
    if fresh or new:
        layers = sorted({name.rsplit(".", 1)[0] for name in fresh})
        warnings.warn(
            f"--weights {path}: "
            + (f"layers whose shape differs start fresh: {', '.join(layers)}" if layers else "")
            + ("; " if layers and new else "")
            + (f"classes it was not trained on start fresh: {', '.join(new)}" if new else ""),
            stacklevel=3,
        )
    kept = len(classes) - len(new)
    return (f"the weights of {path} ({copied} of {len(state)} tensors; {kept} of "
            f"{len(classes)} classes known to it)")  # fmt: skip


def describe_initialisation(model: FasterRCNN, settings: Settings) -> str:
    """Where a new model's weights come from, in words (without ``weights``)."""
    if model.backbone.imagenet_weights:
        return "ImageNet weights for the RegNet-X-400MF trunk; FPN and heads random"
    if settings.model.backbone.pretrained:
        return "random: the ImageNet weights could not be loaded (offline? see the warning)"
    return "random (--no-pretrained)"


def _training_model(settings: Settings, classes: list[str], fit: AnchorFit | None) -> FasterRCNN:
    """``build_detector`` for a training run, its ``meta`` naming the classes, the sizes and
    how the images were fed (``SETUP_KEYS``)."""
    model = build_detector(len(classes), settings.model, fit)
    flat = settings.flat()
    model.meta = detector_meta(
        classes, settings.data.image_size, settings.eval.test_image_size,
        training={key: _plain(flat[key]) for key in SETUP_KEYS},
    )  # fmt: skip
    return model


def _plain(value: Any) -> Any:
    """Tuples as lists, as checkpoints have always stored them."""
    return list(value) if isinstance(value, tuple) else value


# ---------------------------------------------------------------------------------- data


def discover_classes(root: Path) -> list[str]:
    """Sorted object class names found in a VOC-layout folder's annotations."""
    names = set()
    annotations, _ = voc_folders(root)
    for xml_path in sorted(annotations.glob("*.xml")):
        for obj in voc_objects(read_voc_xml(xml_path)):  # ValueError naming a malformed file
            name = str(obj.get("name", "")).strip()  # as the reader reads it
            if name:
                names.add(name)
    if not names:
        raise FileNotFoundError(f"No annotated objects under {annotations}")
    return sorted(names)


def make_datasets(
    settings: Settings, *, image_size: int | None = None, test_image_size: int | None = None,
    classes: Sequence[str] | None = None, train_image_size: int | None = None,
    train_transform: bool | None = None,
) -> tuple[Any, Any, list[str]]:  # fmt: skip
    """Train and val datasets plus class names for ``settings.data``.

    A keyword that is given replaces its setting: a checkpoint's sizes and classes (a
    VOC-layout folder's; voc2007 and shapes have their own). ``data_dir`` defaults to
    ``data``. ``train_image_size`` is the training reader's short side when it differs from
    ``image_size`` (the largest multi-scale size: batches are only ever scaled down),
    ``train_transform`` its centre crop (default: the reader's).
    """
    data = settings.data
    data_dir = data.data_dir or "data"
    size = image_size or (data.image_size if data.image_size != "auto" else None) or 224
    test_size = test_image_size or settings.eval.test_image_size or size
    train_size = train_image_size or size
    crop = {} if train_transform is None else {"train_transform": train_transform}
    if data.dataset == "voc2007":
        train = VOC2007DetectionTiny(data_dir, "train", data.download, image_size=train_size,
                                     skip_corrupt=data.skip_corrupt, **crop)  # fmt: skip
        val = VOC2007DetectionTiny(data_dir, "val", image_size=test_size,
                                   skip_corrupt=data.skip_corrupt)  # fmt: skip
        return train, val, [train.idx_to_class[i] for i in range(len(train.idx_to_class))]
    if data.dataset.lower().endswith(".json"):
        return _coco_datasets(settings, train_size, test_size, classes, train_transform)
    if data.dataset == "shapes":
        root = Path(data_dir) / "shapes"
        make_shapes_dataset(root, num_train=data.num_train, num_val=data.num_val,
                            image_size=size, seed=settings.train.seed)  # fmt: skip
        classes = list(SHAPES_CLASSES)
    else:
        root = Path(data.dataset)
        if not classes:
            classes = data.classes.split(",") if data.classes else discover_classes(root)
    train, val = _voc_folder_datasets(settings, root, classes, train_size, test_size, crop)
    return room_for_every_box(train), room_for_every_box(val), list(classes)


def _voc_folder_datasets(
    settings: Settings, root: Path, classes: Sequence[str], size: int, test_size: int,
    crop: dict[str, bool],
) -> tuple[Any, Any]:  # fmt: skip
    """Train and val ``VOCLayoutDetection`` of a VOC-layout folder (``Annotations`` and
    ``JPEGImages``, or XML files beside the images). Train: the ``train_split`` list, else
    every annotated image. Val: ``val_dataset`` (its ``val_split`` list, else all of it), else
    the ``val_split`` list, else a held-out part of the training images (``hold_out``)."""
    data = settings.data

    def reader(folder: Path, split: str, image_size: int, **options: Any) -> VOCLayoutDetection:
        listed = (folder / "ImageSets").is_dir()  # then a missing list is an error
        return VOCLayoutDetection(
            folder, split, classes, image_size=image_size, skip_corrupt=data.skip_corrupt,
            image_ids=None if listed else voc_image_ids(folder), **options,
        )  # fmt: skip

    train = reader(root, data.train_split, size, **crop)
    if data.val_dataset:
        return train, reader(Path(data.val_dataset), data.val_split, test_size)
    if (root / "ImageSets").is_dir():
        return train, reader(root, data.val_split, test_size)
    return hold_out(train, reader(root, data.val_split, test_size), str(root))


def hold_out(train: Any, val: Any, source: str, warn: str = "") -> tuple[Any, Any]:
    """Data without a val split: the same images read for training (``train``) and for
    evaluation (``val``) are split into a deterministic held-out part, ``HELD_OUT_FRACTION``
    of them (``eecs598.voc.held_out_split``: seeded, one image for each class where
    possible), and the rest. The val part is marked ``held_out_from = source``; ``train``
    prints the split and writes it to ``OUT/split.json``. With ``warn`` (why there is no
    split) it also warns. A single image cannot be split: it is validated on itself, with a
    warning saying so."""
    if len(train.records) < 2:
        warnings.warn(
            f"{source} has {len(train.records)} image(s) and no val split: validating on the "
            "training images themselves, which says how well the model fits them, not how "
            "well it detects on new images.",
            stacklevel=3,
        )
        return train, val
    train_ids, val_ids = held_out_split(train.records, HELD_OUT_FRACTION, HELD_OUT_SEED)
    if warn:
        warnings.warn(
            f"{warn}: validating on {len(val_ids)} held-out images of {source} (a seeded "
            f"{HELD_OUT_FRACTION:.0%}), training on the other {len(train_ids)}; give the "
            "export's valid split as --val-dataset to validate on it instead.",
            stacklevel=3,
        )
    val = val.subset(val_ids, f"{val.split} (held out)")
    val.held_out_from = source
    return train.subset(train_ids, train.split), val


def _coco_datasets(
    settings: Settings, size: int, test_size: int, classes: Sequence[str] | None,
    train_transform: bool | None = None,
) -> tuple[Any, Any, list[str]]:  # fmt: skip
    """Train and val ``COCODetection`` for a COCO instances JSON: train on ``dataset`` with
    ``images``; validate on ``val_dataset`` with ``val_images`` (default: its folder), or,
    without it, on a held-out part of ``dataset`` (``hold_out``, with a warning: never on the
    training images). Classes: ``classes``, the ``classes`` setting, else the JSON's."""
    data = settings.data
    names = classes or (data.classes.split(",") if data.classes else None)
    crop = True if train_transform is None else train_transform
    train = COCODetection(data.dataset, data.images, names, size, train_transform=crop,
                          skip_corrupt=data.skip_corrupt)  # fmt: skip
    val_images = data.val_images if data.val_dataset else data.images
    val = COCODetection(data.val_dataset or data.dataset, val_images, train.class_names,
                        test_size, skip_corrupt=data.skip_corrupt)  # fmt: skip
    if not data.val_dataset:
        train, val = hold_out(train, val, str(data.dataset), warn="No --val-dataset")
    return room_for_every_box(train), room_for_every_box(val), list(train.class_names)


def room_for_every_box(dataset: Any) -> Any:
    """Give a reader a ``gt_boxes`` row for every usable box of its most crowded image.

    Readers keep the ``max_boxes`` (40) largest objects of an image; crowded photos (a
    shoal of fish) have more, and the left-out ones, the smallest, would train as
    background (and, for a val reader, go missing from the drawn ground truth; the mAP
    reads every box from the annotations either way). Returns ``dataset`` with
    ``max_boxes`` raised where needed."""
    counts = [int((~record.difficult).sum()) for record in getattr(dataset, "records", [])]
    dataset.max_boxes = max([dataset.max_boxes, *counts])
    return dataset


def _datasets_rank_zero_first(
    settings: Settings, world: int, rank: int, **options: Any
) -> tuple[Any, Any, list[str]]:
    """``make_datasets(settings, **options)`` on every process, rank 0 first: it generates or
    downloads the data once, while the other processes wait and then read it."""
    if rank == 0:
        datasets = make_datasets(settings, **options)
    if world > 1:
        torch.distributed.barrier()
    if rank != 0:
        datasets = make_datasets(settings, **options)
    return datasets


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
        if size >= needed and _grid_recall(records, size, strides, anchor_offset) >= (
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


def _grid_recall(
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
        probe, _, names = _datasets_rank_zero_first(settings, world, rank, image_size=224)
        strides = level_strides(settings.model.backbone.fpn_levels)
        offset = settings.model.rpn.anchor_offset
        settings = settings.replace(image_size=choose_image_size(probe.records, names, strides,
                                                                 offset))  # fmt: skip
    size = settings.data.image_size
    settings = settings.replace(train_crop=train_crop_size(settings))
    scales = multiscale_sizes(size) if settings.train.multiscale else None
    train, val, classes = _datasets_rank_zero_first(
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


def train_loader(
    settings: Settings, train: Any, scales: Sequence[int] | None, world: int = 1, rank: int = 0
) -> torch.utils.data.DataLoader:
    """The training batches: ``AugmentedDetection`` items (flip, photometric, IoU crop),
    drawn by a ``DistributedSampler`` (seeded, reshuffled per epoch; one process and N
    processes of ``batch_size / N`` see the same global batches), in batches of similar aspect
    ratio with one short side per batch from ``scales``, padded by ``PadCollate``. With the
    image cache on, the images are resized to every scale once, in advance, when that takes
    at most ``PRESIZE_BUDGET`` bytes (``AugmentedDetection``'s ``presized``); otherwise per
    batch."""
    run, seed = settings.train, settings.train.seed
    crop = train_crop_size(settings)
    transform = build_train_transform(run.flip, run.photometric, run.iou_crop, crop)
    presized: Sequence[int] = ()
    if scales and run.cache != "off":
        needed = presized_bytes(train, scales)
        presized = scales if needed <= PRESIZE_BUDGET else ()
        if rank == 0:
            how = "once, in advance" if presized else "per batch (over the memory budget)"
            print(f"Multi-scale: images resized to each short side {how}: {needed / 2**20:.0f} "
                  f"MiB for all scales, budget {PRESIZE_BUDGET / 2**20:.0f} MiB")  # fmt: skip
    items = AugmentedDetection(train, transform, presized)
    sampler = torch.utils.data.DistributedSampler(
        items, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
    )
    ratios = aspect_ratios_of(train) if run.batch_mode == "pad" else [1.0] * len(items)
    batches = AspectRatioBatchSampler(
        sampler, ratios, settings.train.batch_size // world, scales=scales, seed=seed
    )
    return torch.utils.data.DataLoader(
        items, batch_sampler=batches, collate_fn=PadCollate(size_divisible=32),
        num_workers=settings.data.workers, pin_memory=torch.cuda.is_available(),
        persistent_workers=settings.data.workers > 0,
    )  # fmt: skip


def eval_loader(dataset: Any, workers: int) -> torch.utils.data.DataLoader:
    """Evaluation batches: one image each, in order (training: ``train_loader``)."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=1, num_workers=workers, pin_memory=torch.cuda.is_available()
    )


def val_loader(dataset: Any, batch_size: int, workers: int) -> torch.utils.data.DataLoader:
    """Validation batches while training: ``batch_size`` images of similar aspect ratio
    (sorted by it, so little is padded), padded by ``PadCollate``, in a fixed order. The loader
    draws its worker seeds from its own generator, not the global one, so validating does not
    change the training batches that follow."""
    ratios = aspect_ratios_of(dataset)
    order = sorted(range(len(dataset)), key=ratios.__getitem__)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, collate_fn=PadCollate(size_divisible=32),
        num_workers=workers, pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip


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


# ---------------------------------------------------------------------------------- setup


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
    """The output folder, created if needed."""
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _detect(
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


def evaluate_and_report(
    model: FasterRCNN, val: Any, classes: list[str], out: Path, settings: Settings, device: str
) -> dict:
    """mAP on ``val``: tool-format files, AP chart, detections grid, metrics JSON, table; and
    the error analysis (``eecs598.errors``): the TIDE breakdown printed and kept in the metrics
    under ``errors``, with errors.json, errors.png, confusion.png, pr_curves.png, per_image.csv
    and worst.png."""
    from eecs598.errors import write_error_report

    plt = _pyplot()
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
        boxes, labels, scores = _detect(model, image, settings, device)
        pred = torch.cat([boxes, labels[:, None].to(boxes), scores[:, None]], dim=1).cpu()
        keep = pred[:, 5] >= 0.5  # readable: confident detections only
        samples.append((unnormalize_image(image), gt[gt[:, 4] >= 0], pred[keep]))
    return samples


# ---------------------------------------------------------------------------------- entry points


def train(settings: Settings) -> dict | None:
    """Train as ``settings`` say, then (on rank 0) evaluate on the val split and write the
    report into ``settings.out``: checkpoint.pt, loss.png, ap_per_class.png, detections.png,
    metrics.json (and, validating while training, best.pt, results.csv, results.png). With
    ``weights``, the model starts from that checkpoint (``start_from_weights``). Runs under
    ``torchrun`` too (``batch_size`` is the global batch).

    Returns:
        The metrics (``evaluate``'s, plus ``train_seconds``, ``iterations`` and
        ``final_loss``); None on the other ranks of a distributed run.
    """
    eval_period(settings)  # a bad period, patience or weights file stops before any writing
    weights = settings.train.weights
    init_checkpoint = read_weights_checkpoint(weights) if weights else None
    if init_checkpoint is not None:  # its network; no ImageNet download to overwrite
        settings = with_network_of(settings, init_checkpoint).replace(pretrained=False)
    world, rank, device = init_distributed(settings.eval.device, settings.train.batch_size)
    out = _output_dir(settings.out)
    if rank == 0 and not settings.train.resume:
        _keep_previous_run(out)
    reset_seed(settings.train.seed)
    requested = settings
    settings, train_data, val, classes, scales = training_datasets(settings, world, rank)
    if rank == 0:
        _describe_data(train_data, val, classes, out)
    fit = fit_training_anchors(settings, train_data, classes, report=rank == 0)
    model = _training_model(settings, classes, fit)
    initialisation = (
        describe_initialisation(model, settings) if init_checkpoint is None
        else start_from_weights(model, init_checkpoint, classes, str(weights))
    )  # fmt: skip
    if rank == 0:
        print(describe_setup(settings, scales, requested, epoch_iters(settings, train_data),
                             initialisation))  # fmt: skip
    validation = _validation(settings, val, classes, device)
    start = time.time()
    history = _run_training(settings, model, train_data, scales, world, rank, device, validation)
    train_seconds = time.time() - start
    if world > 1:
        torch.distributed.destroy_process_group()
        if rank != 0:
            return None
    metrics = evaluate_and_report(model, val, classes, out, settings, device)
    metrics.update(train_seconds=round(train_seconds, 1), iterations=len(history),
                   final_loss=history[-1] if history else None)  # fmt: skip
    return _finish_report(metrics, validation, out)


def _describe_data(train: Any, val: Any, classes: Sequence[str], out: Path) -> None:
    """The printout's data lines: sizes and classes, classes without boxes, a held-out split."""
    print(f"Dataset: {len(train)} train / {len(val)} val images, classes: {', '.join(classes)}")
    warn_classes_without_boxes(train, classes)
    _record_held_out_split(train, val, out)


def _finish_report(metrics: dict, validation: PeriodicValidation | None, out: Path) -> dict:
    """Add the best validation to ``metrics``, write metrics.json, say where everything is."""
    kept = ["checkpoint.pt (the last)"]
    if validation is not None and validation.rows:
        best = validation.best
        metrics["best"] = {"iteration": int(best["iteration"]), "mAP": best["val_map50"]}
        kept += [f"{BEST_CHECKPOINT} (iteration {int(best['iteration'])}, val mAP@0.5 "
                 f"{100 * best['val_map50']:.2f}%)", f"{RESULTS_CSV}, results.png"]  # fmt: skip
    write_json(out / "metrics.json", metrics)
    print(f"Outputs in {out}/: {', '.join(kept)}, loss.png, metrics.json, ap_per_class.png, "
          "detections.png, errors.png, ...")  # fmt: skip
    return metrics


def _record_held_out_split(train: Any, val: Any, out: Path) -> None:
    """When ``val`` was held out of the training data (``hold_out``): say so, naming a few
    of its images, and write both id lists to ``OUT/split.json``."""
    source = getattr(val, "held_out_from", None)
    if source is None:
        return
    write_json(out / "split.json", {
        "source": source, "fraction": HELD_OUT_FRACTION, "seed": HELD_OUT_SEED,
        "train": list(train.image_ids), "val": list(val.image_ids),
    })  # fmt: skip
    shown = ", ".join(val.image_ids[:5]) + (", ..." if len(val) > 5 else "")
    print(f"No val split in {source}: validating on {len(val)} held-out images ({shown}); "
          f"the split is in {out / 'split.json'}.")  # fmt: skip


# What a new run in a folder moves aside (to NAME.prev.EXT) rather than overwrite.
PREVIOUS_RUN_FILES = ("checkpoint.pt", BEST_CHECKPOINT, RESULTS_CSV)


def _keep_previous_run(out: Path) -> None:
    """A new run (not ``--resume``) in a folder that holds one: its checkpoints and results
    table are moved to ``*.prev.*`` (replacing older ones), so nothing trained is lost."""
    moved = []
    for name in PREVIOUS_RUN_FILES:
        path = out / name
        if path.is_file():
            os.replace(path, path.with_name(f"{path.stem}.prev{path.suffix}"))
            moved.append(name)
    if moved:
        print(f"Moved the existing {', '.join(moved)} in {out} to *.prev.* (use --resume to "
              "continue that run instead).")  # fmt: skip


def _validation(
    settings: Settings, val: Any, classes: Sequence[str], device: str
) -> PeriodicValidation | None:
    """The ``eval_period`` hook: scores ``val`` in ``VAL_BATCH_SIZE`` batches (see
    ``eecs598.validation.PeriodicValidation``); None without validation while training."""
    if not eval_period(settings):
        return None
    budget = AUTO_EVAL_BUDGET if settings.train.eval_period == "auto" else 0.0
    return PeriodicValidation(
        val_loader(val, VAL_BATCH_SIZE, settings.data.workers), list(classes),
        Path(settings.out), eval_period(settings), settings.train.patience,
        settings.eval.score_thresh, settings.eval.nms_thresh, device, budget,
    )  # fmt: skip


def _run_training(
    settings: Settings, model: FasterRCNN, train_data: Any, scales: Sequence[int] | None,
    world: int, rank: int, device: str, validation: PeriodicValidation | None = None,
) -> LossHistory:  # fmt: skip
    """Cache the images, prepare the model (SyncBatchNorm, compilation) and the loader, and
    run ``train_detector`` with checkpoints in ``settings.out`` and ``validation``."""
    run, out = settings.train, Path(settings.out)
    if run.cache != "off":
        cache_dir = Path(run.cache_dir or out / "cache") if run.cache == "disk" else None
        train_data = CachedDetection(train_data, cache_dir, progress=run.progress, normalize=False)
    if run.sync_bn and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if run.compile:
        compile_detector(model)
    loader = train_loader(settings, train_data, scales, world, rank)
    return train_detector(
        model, loader, learning_rate=run.lr, weight_decay=run.weight_decay,
        max_iters=run.max_iters, log_period=run.log_period, device=device,
        warmup_iters=run.warmup_iters, amp=run.amp, grad_clip=run.grad_clip,
        checkpoint_path=out / "checkpoint.pt", checkpoint_period=run.checkpoint_period,
        resume=run.resume, show_plot=False, plot_path=out / "loss.png", progress=run.progress,
        validation=validation,
    )  # fmt: skip


def _test_image_size(settings: Settings, meta: dict) -> int:
    """Short side for evaluation and prediction: ``test_image_size``, else the checkpoint's
    test size (older checkpoints: its training size)."""
    return settings.eval.test_image_size or int(meta.get("test_image_size") or meta["image_size"])


def evaluate(checkpoint: str | os.PathLike, data: Settings | str | None = None) -> dict:
    """mAP of a checkpoint on a dataset's val split, at the checkpoint's sizes and with its
    classes; writes the report into the settings' ``out``.

    Args:
        checkpoint: a checkpoint.pt written by ``train``.
        data: settings (``data`` and ``eval`` are used), or just the dataset (a VOC-layout
            folder, a COCO .json, voc2007 or shapes) with the preset's settings and the
            output folder ``EVALUATE_OUT``; default: the shapes data. What is scored: the
            ``val_dataset`` when given, else the dataset named (a COCO JSON whole, a folder's
            ``val_split`` list, or every image of a folder without lists).

    Returns:
        The metrics (``mAP``, ``ap`` per class, COCO-style ``coco`` stats, ...).
    """
    if data is None or isinstance(data, str):
        data = preset_for(data or "shapes").replace(out=EVALUATE_OUT)
    settings = data
    named = settings.data
    if not named.val_dataset and named.dataset not in ("voc2007", "shapes"):
        # The data named is the data scored: a whole COCO JSON, a folder's val list, or all
        # of a folder without lists (nothing is held out, as for training).
        settings = settings.replace(val_dataset=named.dataset, val_images=named.images)
    model, saved = load_detector(checkpoint, settings.eval.device, settings.data.classes)
    meta = saved["meta"]
    classes = list(meta["class_names"])
    _, val, _ = make_datasets(settings, image_size=meta["image_size"], classes=classes,
                              test_image_size=_test_image_size(settings, meta))  # fmt: skip
    out = _output_dir(settings.out)
    return evaluate_and_report(model, val, classes, out, settings, settings.eval.device)


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

    Returns:
        One ``{"image": path, "detections": [{"class", "score", "box"}]}`` per image, boxes
        ``(x1, y1, x2, y2)`` in the original image's pixels.
    """
    settings = settings or preset_for("shapes").replace(out=PREDICT_OUT)
    conf = settings.predict.conf
    if not 0.0 <= conf <= 1.0:
        raise ValueError(f"conf must be in [0, 1], got {conf}")
    plt = _pyplot()
    detect, classes, size = _predictor(checkpoint, settings)
    out = _output_dir(settings.out)
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
            return _detect(model, image, settings, settings.eval.device, conf - 1e-6)

        return detect, list(saved["meta"]["class_names"]), _test_image_size(settings, saved["meta"])
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


def export(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike | None = None,
    settings: Settings | None = None,
) -> Path:
    """Export a checkpoint's whole detector to ONNX (``eecs598.deploy``): one graph from
    normalised images to padded detections, with the class names, the image size and the
    normalisation in its metadata.

    Args:
        checkpoint: a checkpoint written by ``train`` (any format ``load_detector`` reads).
        out: the .onnx file (a folder: ``EXPORT_NAME`` in it); default: ``EXPORT_NAME``
            beside the checkpoint.
        settings: ``eval`` gives the thresholds fixed in the graph (``score_thresh``,
            ``nms_thresh``), the image size stored (``test_image_size``, default the
            checkpoint's) and the device traced on; ``export.format`` must be ``onnx``.

    Returns:
        The path written.
    """
    settings = settings or preset_for("shapes")
    if settings.export.format != "onnx":
        raise ValueError(f"export format must be onnx, got {settings.export.format!r}")
    path = Path(out) if out is not None else Path(checkpoint).with_name(EXPORT_NAME)
    if path.is_dir():
        path = path / EXPORT_NAME
    if path.suffix.lower() != ".onnx":
        raise ValueError(f"--out must name a .onnx file (or a folder), got {path}")
    require_exporter()  # before the model is loaded
    model, saved = load_detector(checkpoint, settings.eval.device, settings.data.classes)
    meta = saved["meta"]
    classes, size = list(meta["class_names"]), _test_image_size(settings, meta)
    start = time.perf_counter()
    export_onnx(
        model, path, {"class_names": classes, "image_size": size},
        settings.eval.score_thresh, settings.eval.nms_thresh,
    )  # fmt: skip
    print(f"Exported {checkpoint} to {path} ({path.stat().st_size / 2**20:.1f} MiB, "
          f"{time.perf_counter() - start:.0f} s): ONNX opset {OPSET}, {len(classes)} classes, "
          f"short side {size} px. Run it with `predict {path} IMAGES`.")  # fmt: skip
    return path


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
