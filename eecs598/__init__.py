"""Bottom-layer helpers for the two-stage detector notebook: everything that is not the model.

Submodules, each one concern, listed bottom-up (a module imports only those above it):

- :mod:`eecs598.versions`: the oldest torch and torchvision supported, checked by the entry
  points before either is imported.
- :mod:`eecs598.files`: atomic writes of files and folders.
- :mod:`eecs598.settings`: every setting of the detector and its training recipe, defined
  once, with the presets ``NOTEBOOK``, ``OWN_DATA`` and ``DEMO``.
- :mod:`eecs598.utils`: seeding (``reset_seed``), ``to_numpy`` and ``detection_visualizer``.
- :mod:`eecs598.grad`: numeric helpers for checking gradients (``rel_error``).
- :mod:`eecs598.checks`: the detector's input validators (shapes, dtypes, devices, GT values)
  and the GT-row markers ``BACKGROUND`` / ``NEUTRAL``.
- :mod:`eecs598.images`: decoding images to RGB, ImageNet normalisation.
- :mod:`eecs598.augment`: box-aware training augmentation (``torchvision.transforms.v2``),
  multi-scale sizes, padded batches and aspect-ratio batching.
- :mod:`eecs598.voc`: the PASCAL VOC layout: annotation parser, resize/crop geometry, reader.
- :mod:`eecs598.anchor_fit`: anchor sizes and aspect ratios fitted to the training boxes
  (best-possible recall), with a fit report.
- :mod:`eecs598.coco`: the COCO-format reader (instances JSON + image folder), built on
  :mod:`eecs598.voc`'s records and items.
- :mod:`eecs598.voc2007`, :mod:`eecs598.shapes`, :mod:`eecs598.cache`: the datasets built on
  the reader (VOC 2007 with its download, the generated shapes, the decoded-image cache).
- :mod:`eecs598.matching`: the evaluators' core: AP from a precision/recall curve, one image's
  checked record, the devkit's matching of detections to GT boxes.
- :mod:`eecs598.coco_metrics`: COCO-style AP through ``pycocotools`` and the COCO JSON export.
- :mod:`eecs598.errors`: error analysis of an evaluation (TIDE's dAP breakdown, confusion
  matrix, precision-recall and F1 curves, per-image counts and the worst images).
- :mod:`eecs598.mean_ap`: the built-in PASCAL VOC mean Average Precision evaluator
  (accumulator, the mAP tool's folder format, the plot, ``python -m eecs598.mean_ap``, whose
  ``--errors`` loads :mod:`eecs598.errors`).
- :mod:`eecs598.audit`: the label audit's scores: which labels are likely missing, of the wrong
  class or badly placed, from a model's out-of-sample detections.
- :mod:`eecs598.checkpoint`: the checkpoint format and its loading.
- :mod:`eecs598.training`: ``train_detector`` and its parts.
- :mod:`eecs598.inference`: ``inference_with_detector``; ``score_detector`` (quiet, batched).
- :mod:`eecs598.validation`: validation while training (``PeriodicValidation``: results.csv,
  best.pt, results.png, patience).
- :mod:`eecs598.deploy`: the whole detector exported to ONNX (``export_onnx``) and run by
  onnxruntime (``OnnxDetector``).
- :mod:`eecs598.submit`: ``make_a4_submission`` zips the deliverables.

Why this cut: each module answers one question a reader brings (how is an image read? how are
boxes resized? what is in a checkpoint? what does one training step do?), and none of them
needs the model's code, so all of them sit below ``common`` and ``two_stage_detector``; the
notebook reaches them through the ``a4_helper`` facade.

This package is the bottom layer of the project: it never imports ``common``,
``two_stage_detector``, ``recipe``, ``a4_helper`` or ``detector_cli``. Submodules other than
``utils`` are loaded lazily on first attribute access, so ``import eecs598`` stays cheap (no
torch, no matplotlib) and ``python -m eecs598.mean_ap`` runs without the package having
imported the module beforehand.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .utils import reset_seed

__all__ = ["grad", "mean_ap", "reset_seed", "submit", "utils"]

_SUBMODULES = frozenset(
    {
        "anchor_fit",
        "audit",
        "augment",
        "cache",
        "checkpoint",
        "checks",
        "coco",
        "coco_metrics",
        "deploy",
        "errors",
        "files",
        "grad",
        "images",
        "inference",
        "matching",
        "mean_ap",
        "settings",
        "shapes",
        "submit",
        "training",
        "utils",
        "validation",
        "versions",
        "voc",
        "voc2007",
    }
)


def __getattr__(name: str) -> ModuleType:
    """Import a submodule on first access (``eecs598.mean_ap`` and so on)."""
    if name in _SUBMODULES:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _SUBMODULES)
