"""Bottom-layer helpers for the two-stage detector notebook.

Submodules:

- :mod:`eecs598.grad`: numeric helpers for checking gradients (``rel_error``).
- :mod:`eecs598.utils`: seeding (``reset_seed``) and ``detection_visualizer``.
- :mod:`eecs598.submit`: ``make_a4_submission`` zips the deliverables.
- :mod:`eecs598.mean_ap`: the built-in PASCAL VOC mean Average Precision evaluator.

This package is the bottom layer of the project: it never imports ``common``,
``two_stage_detector`` or ``a4_helper``. Submodules other than ``utils`` are loaded lazily on
first attribute access, so ``import eecs598`` stays cheap and ``python -m eecs598.mean_ap``
runs without the package having imported the module beforehand.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .utils import reset_seed

__all__ = ["grad", "mean_ap", "reset_seed", "submit", "utils"]

_SUBMODULES = frozenset({"grad", "mean_ap", "submit", "utils"})


def __getattr__(name: str) -> ModuleType:
    """Import a submodule on first access (``eecs598.mean_ap`` and so on)."""
    if name in _SUBMODULES:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _SUBMODULES)
