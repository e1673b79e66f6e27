"""The notebook's helper names, in one place.

``from a4_helper import *`` gives the notebook everything it calls besides the model itself.
This module only re-exports: each name lives in the module of its concern, and imports point
one way, from the bottom of the package to the top:

* ``eecs598`` (bottom, knows no model):
  :mod:`eecs598.files` (atomic writes) -> :mod:`eecs598.settings` (every default, the
  presets) -> :mod:`eecs598.checks` (input validators) ->
  :mod:`eecs598.images` (decoding, normalisation) ->
  :mod:`eecs598.augment` (box-aware augmentation, padded batches) ->
  :mod:`eecs598.voc` (VOC-layout parser, geometry, reader) -> :mod:`eecs598.voc2007`,
  :mod:`eecs598.shapes`, :mod:`eecs598.cache` (datasets built on the reader) ->
  :mod:`eecs598.checkpoint` -> :mod:`eecs598.training` (``train_detector``) and
  :mod:`eecs598.inference` (``inference_with_detector``, over :mod:`eecs598.mean_ap`).
* ``common`` (backbone, FPN, IoU, NMS, RoI Align), then ``two_stage_detector`` (RPN, Faster
  R-CNN and ``compile_detector``, which reaches into the model's parts).
* ``recipe`` (the training recipe, one module per stage: ``train``, ``evaluate``,
  ``predict``, ``export`` and their parts; the notebook takes ``load_trained_detector`` from
  its model stage, and only that stage is loaded).
* ``a4_helper`` (this facade) and ``detector_cli.py`` (a parser over ``recipe``) on top.

The cut follows what a reader looks for: data questions (how is an image read? how are boxes
resized?) are answered in the data modules, training questions in ``training`` and its
``checkpoint`` format, evaluation questions in ``inference`` and ``mean_ap``. None of them
needs the model's code, so all of them sit below it and are tested without it.
"""

from __future__ import annotations

from eecs598.versions import require_supported_torch

# Below the supported torch / torchvision, one line naming both versions and the pip command,
# instead of an ImportError from inside torchvision.
require_supported_torch()

from eecs598.augment import AugmentedDetection, PadCollate, build_train_transform
from eecs598.cache import CachedDetection as CachedDetection  # not in __all__
from eecs598.checkpoint import (
    config_differences,
    detector_meta,
    load_checkpoint,
    load_model_weights,
    save_weights,
)
from eecs598.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CorruptImageError,
    preprocess_image,
    read_rgb_image,
    to_rgb,
    unnormalize_image,
)
from eecs598.images import normalize_uint8 as normalize_uint8  # not in __all__
from eecs598.inference import inference_with_detector
from eecs598.shapes import SHAPES_CLASSES, ShapesDetection, make_shapes_dataset
from eecs598.training import LossHistory, train_detector
from eecs598.voc import BCCD_CLASSES, VOCLayoutDetection
from eecs598.voc2007 import (
    VOC2007_ARCHIVE,
    VOC2007_MD5,
    VOC2007_URLS,
    VOC_CLASSES,
    VOC2007DetectionTiny,
    download_voc2007,
)
from recipe import load_trained_detector
from two_stage_detector import compile_detector

__all__ = [
    "BCCD_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SHAPES_CLASSES",
    "VOC2007_ARCHIVE",
    "VOC2007_MD5",
    "VOC2007_URLS",
    "VOC_CLASSES",
    "AugmentedDetection",
    "LossHistory",
    "PadCollate",
    "ShapesDetection",
    "VOC2007DetectionTiny",
    "VOCLayoutDetection",
    "CorruptImageError",
    "build_train_transform",
    "compile_detector",
    "config_differences",
    "detector_meta",
    "download_voc2007",
    "hello_helper",
    "inference_with_detector",
    "load_checkpoint",
    "load_model_weights",
    "load_trained_detector",
    "make_shapes_dataset",
    "train_detector",
    "preprocess_image",
    "read_rgb_image",
    "save_weights",
    "to_rgb",
    "unnormalize_image",
]


def hello_helper() -> None:
    """Print a greeting, used by the notebook to check that the module imports."""
    print("Hello from a4_helper.py!")
