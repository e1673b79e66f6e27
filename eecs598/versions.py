"""The torch and torchvision releases this package supports, checked before either is used.

The floor is the one ``requirements.txt`` states (a test keeps the two, the README and the
notebook equal), and it is what CI proves: the students' sanity checks and the notebook in fast
mode run under exactly that release and under the release Colab ships, beside the full suite
under the pinned development release (the ``Makefile``'s ``COMPAT_ENVS``).

Below the floor, the first import would fail deep inside (``torchvision.transforms.v2`` lacks
names the package uses), so the entry points ask here first: ``a4_helper`` (the notebook's
setup cell) raises one ``ImportError`` line and ``detector`` prints one line and exits, each
naming the release found, the floor and the ``pip install`` line. Reading the installed
releases does not import torch.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re

__all__ = [
    "EXPORT_TORCH_FLOOR",
    "FLOORS",
    "release",
    "require_export_torch",
    "require_supported_torch",
    "unsupported_torch",
]

#: The oldest supported release of each package, as ``requirements.txt`` states it.
FLOORS: dict[str, str] = {"torch": "2.4", "torchvision": "0.19"}

#: The oldest torch whose ONNX exporter converts the whole detector (``eecs598.deploy``): older
#: ones lack ``torch.onnx.export(dynamo=True)`` (2.4) or fail to translate the NMS's
#: ``while_loop`` (2.9, 2.10). Everything else runs from ``FLOORS``.
EXPORT_TORCH_FLOOR = "2.11"


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string: ``"2.9.0+cu126"`` -> ``(2, 9, 0)``,
    ``"2.10.0.dev20250101"`` -> ``(2, 10, 0)``."""
    match = re.match(r"\d+(?:\.\d+)*", version.strip())
    if match is None:
        raise ValueError(f"not a version: {version!r}")
    return tuple(int(part) for part in match.group().split("."))


def _installed(name: str) -> str | None:
    """The installed version of ``name`` (its metadata, without importing it; else its
    ``__version__``), or ``None`` when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return str(importlib.import_module(name).__version__)
    except ImportError:
        return None


def unsupported_torch() -> str | None:
    """One line saying which of torch and torchvision is missing or below its floor, with the
    ``pip install`` line that fixes it; ``None`` when both are supported."""
    problems = []
    for name, floor in FLOORS.items():
        found = _installed(name)
        if found is None:
            problems.append(f"{name} is not installed")
        elif release(found) < release(floor):
            problems.append(f"{name} {found} is older than {floor}")
    if not problems:
        return None
    wanted = " ".join(f'"{name}>={floor}"' for name, floor in FLOORS.items())
    return f"{'; '.join(problems)}, the oldest this package supports: pip install {wanted}"


def require_supported_torch() -> None:
    """Raise one ``ImportError`` line (``unsupported_torch``'s) unless both are supported."""
    problem = unsupported_torch()
    if problem is not None:
        raise ImportError(problem)


def require_export_torch(found: str) -> None:
    """Raise one ``RuntimeError`` line when torch ``found`` is older than the ONNX export needs."""
    if release(found) < release(EXPORT_TORCH_FLOOR):
        raise RuntimeError(
            f"ONNX export needs torch {EXPORT_TORCH_FLOOR} or newer, found {found}: "
            f'pip install "torch>={EXPORT_TORCH_FLOOR}" (everything else runs from torch '
            f"{FLOORS['torch']})"
        )
