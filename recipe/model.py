"""The recipe's model stage: build a detector, open a checkpoint, start from weights.

Three names open a checkpoint, each saying what it returns:

* ``read_checkpoint``: the checkpoint as a dict, its configuration and class names complete
  however old the file is;
* ``load_detector``: the model rebuilt from it, with its weights, in eval mode (and the dict);
* ``load_trained_detector``: the notebook's loader (sections 4.3.1 and 4.4): the training
  checkpoint, else the final weights, with a line saying which.

It imports ``eecs598``, ``common`` and ``two_stage_detector`` only, so the notebook's
``a4_helper`` loads this stage without the data, deploy, COCO or anchor-fitting code.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from common import DetectorBackboneWithFPN
from eecs598.checkpoint import detector_meta, load_checkpoint, load_model_weights
from eecs598.settings import NOTEBOOK, ModelSettings, Settings, preset_for
from eecs598.voc2007 import VOC_CLASSES
from two_stage_detector import RPN, FasterRCNN

if TYPE_CHECKING:
    from eecs598.anchor_fit import AnchorFit

__all__ = [
    "build_detector",
    "read_checkpoint",
    "load_detector",
    "load_trained_detector",
    "state_dict_config",
    "NETWORK_SETTINGS",
    "with_network_of",
    "start_from_weights",
    "describe_initialisation",
]


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


def read_checkpoint(
    path: str | os.PathLike, class_names: Sequence[str] | str | None = None, flag: str = ""
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

    ``flag`` (e.g. ``"--weights"``) begins the message of a ValueError, naming where the
    path came from.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: a truncated or foreign file; class names unknown, or not as many as the
            model's classes.
    """
    try:
        checkpoint = load_checkpoint(path, map_location="cpu")  # clear errors for bad files
        config = checkpoint.get("config") or state_dict_config(checkpoint["model"], path)
        meta = dict(checkpoint.get("meta") or {})
        names = meta.get("class_names") or _class_names(class_names, config["num_classes"], path)
    except ValueError as err:
        if not flag:
            raise
        raise ValueError(f"{flag} {path}: {err}") from err
    image_size = int(meta.get("image_size") or NOTEBOOK.data.image_size)
    described = detector_meta(names, image_size, meta.get("test_image_size"))
    return {**checkpoint, "config": config, "meta": {**meta, **described}}


def _class_names(given: Sequence[str] | str | None, num_classes: int, path: Any) -> list[str]:
    """The class names of a checkpoint that records none (see ``read_checkpoint``)."""
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
    checkpoint or weights file of ``read_checkpoint`` (``class_names``: see there).

    Raises:
        ValueError: for a file that is no checkpoint, class names unknown, or weights that do
            not fit (naming the settings that differ).
    """
    checkpoint = read_checkpoint(path, class_names)
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
    iteration. Files of any age load (``read_checkpoint``): ``class_names``, the
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
