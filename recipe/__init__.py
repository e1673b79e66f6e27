"""The training recipe as functions a notebook can call, one module per stage.

``train(settings)``, ``evaluate(checkpoint, data, settings)``, ``predict(checkpoint, images,
settings)``, ``export(checkpoint, settings)`` and ``audit(settings)`` are what
``detector_cli.py``'s commands run.
The stages, bottom up (each imports only those above it in this list):

1. ``recipe.data``: datasets, splits and loaders (``make_datasets``, ``hold_out``,
   ``train_loader``, ``val_loader``);
2. ``recipe.model``: build a detector, open a checkpoint (``read_checkpoint``,
   ``load_detector``, the notebook's ``load_trained_detector``), start from weights;
3. ``recipe.plan``: every "auto" settled once into a frozen ``Plan`` (``plan_training``);
4. ``recipe.evaluation``: ``evaluate`` and ``evaluate_and_report``;
5. ``recipe.prediction``: ``predict``;
6. ``recipe.exporting``: ``export`` (ONNX);
7. ``recipe.training``: ``train``;
8. ``recipe.auditing``: ``audit``, the labels most likely wrong, from detections of every
   training image by a model that did not train on it (``out_of_sample_detections``).

Settings come from ``eecs598.settings`` (every default and tuning constant, and the presets
``NOTEBOOK``, ``OWN_DATA`` and ``DEMO``)::

    from eecs598.settings import preset_for
    import recipe

    settings = preset_for("data/train/_annotations.coco.json").replace(
        images="data/train", max_iters=600, batch_size=8, out="runs/mine")
    metrics = recipe.train(settings)

Every public name of the stages is an attribute of ``recipe``, imported when first used
(``recipe.train`` imports ``recipe.training``), so ``from recipe import load_trained_detector``
(the notebook's ``a4_helper``) loads the model stage only. A checkpoint carries the model
configuration, the class names, the image size and the plan, so ``evaluate`` and ``predict``
need no repeated settings. Imports point one way: the recipe uses ``eecs598``, ``common`` and
``two_stage_detector``; ``a4_helper`` and the CLI sit above it.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

# The stages, bottom up: each imports only stages before it (tests/test_eecs598_package.py).
STAGES = ("data", "model", "plan", "evaluation", "prediction", "exporting", "training", "auditing")

# Each public name and the stage that defines it (``eecs598.settings`` for the constants
# that used to live here).
_WHERE = {
    **dict.fromkeys(
        ("SHAPES_CLASSES", "discover_classes", "make_datasets", "hold_out",
         "room_for_every_box", "warn_classes_without_boxes", "train_loader", "eval_loader",
         "val_loader"), "data"),
    **dict.fromkeys(
        ("build_detector", "read_checkpoint", "load_detector", "load_trained_detector",
         "state_dict_config", "with_network_of", "start_from_weights",
         "describe_initialisation"), "model"),
    **dict.fromkeys(
        ("Plan", "plan_training", "level_strides", "choose_image_size", "grid_recall",
         "training_datasets", "epoch_iters", "train_crop_size", "fit_training_anchors",
         "eval_period", "describe_setup"), "plan"),
    **dict.fromkeys(("evaluate", "evaluate_and_report"), "evaluation"),
    **dict.fromkeys(("predict", "image_files", "predictions_as_coco"), "prediction"),
    "export": "exporting",
    **dict.fromkeys(("train", "init_distributed"), "training"),
    **dict.fromkeys(("audit", "out_of_sample_detections", "fold_of_images"), "auditing"),
}  # fmt: skip
_SETTINGS = (
    "AUTO_IMAGE_SIZES", "AUTO_MIN_BOX_SIDE", "AUTO_GRID_RECALL", "AUTO_TRAIN_CROP",
    "AUTO_EVALUATIONS", "AUTO_EVAL_BUDGET", "HELD_OUT_FRACTION", "HELD_OUT_SEED",
    "PRESIZE_BUDGET", "VAL_BATCH_SIZE", "EVALUATE_OUT", "PREDICT_OUT", "EXPORT_NAME",
)  # fmt: skip
# Names from before the stages, kept working: each with its replacement.
_RENAMED = {
    "read_detector_checkpoint": "read_checkpoint",
    "read_weights_checkpoint": "read_checkpoint(path, flag='--weights')",
}

__all__ = [*_WHERE, "read_detector_checkpoint", "read_weights_checkpoint"]


def __getattr__(name: str) -> Any:
    """A stage's public name, imported on first use (PEP 562), and cached here."""
    if name in _WHERE:
        value = getattr(importlib.import_module(f"recipe.{_WHERE[name]}"), name)
    elif name in _SETTINGS:
        value = getattr(importlib.import_module("eecs598.settings"), name)
    elif name in _RENAMED:
        warnings.warn(
            f"recipe.{name} is now recipe.{_RENAMED[name]}", DeprecationWarning, stacklevel=2
        )
        return _renamed(name)
    else:
        raise AttributeError(f"module 'recipe' has no attribute {name!r}")
    globals()[name] = value
    return value


def _renamed(name: str) -> Any:
    """The function an old name stands for."""
    from recipe.model import read_checkpoint

    if name == "read_weights_checkpoint":
        return lambda path: read_checkpoint(path, flag="--weights")
    return read_checkpoint


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE, *_SETTINGS])
