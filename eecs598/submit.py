"""Packs the assignment deliverables into the zip file that is handed in."""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

from .files import atomic_write

__all__ = ["OPTIONAL_FILES", "PACKAGE", "PACKAGES", "REQUIRED_FILES", "make_a4_submission"]

#: The deliverables, and the recipe's model stage, which ``a4_helper.py`` imports (the
#: notebook's ``load_trained_detector``), so that the extracted zip runs the notebook on its own.
REQUIRED_FILES: tuple[str, ...] = (
    "common.py",
    "two_stage_detector.py",
    "a4_helper.py",
    "recipe/__init__.py",
    "recipe/model.py",
    "two_stage_detector.ipynb",
)
#: Added when present, never required: this notebook's trained weights, and the deliverables of
#: the course's other A4 notebook (the one-stage FCOS detector), which is handed in in the same
#: zip.
OPTIONAL_FILES: tuple[str, ...] = (
    "rcnn_detector.pt",
    "one_stage_detector.py",
    "one_stage_detector.ipynb",
    "fcos_detector.pt",
)
# The packages that ``a4_helper.py`` (and the notebook) import; their ``.py`` files go in the
# zip. ``PACKAGE`` is the helper package.
PACKAGE = "eecs598"
PACKAGES = (PACKAGE, "recipe")

_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")


def _check_name(value: str | None, what: str, prompt: str) -> str:
    """Prompt for ``value`` when it is ``None``, then reject empty or path-like values."""
    if value is None:
        value = input(prompt)
    value = str(value).strip()
    if not value:
        raise ValueError(f"{what} must not be empty")
    if not _NAME_RE.fullmatch(value) or value in {".", ".."}:
        raise ValueError(f"{what} may only contain letters, digits, '.', '_' and '-': {value!r}")
    return value


def _package_files(folder: str) -> list[str]:
    """Paths (relative to ``folder``, ``/``-separated, sorted) of every ``.py`` file of the
    :data:`PACKAGES` folders in ``folder``, found by listing them; none for a folder that is
    not there. Hidden folders and ``__pycache__`` (editor and interpreter leftovers) are
    skipped."""
    root = Path(folder)
    paths = [path.relative_to(root) for name in PACKAGES for path in (root / name).rglob("*.py")]
    skipped = (".", "__pycache__")
    return sorted(p.as_posix() for p in paths if not any(s.startswith(skipped) for s in p.parts))


def make_a4_submission(
    assignment_path: str | os.PathLike[str],
    uniquename: str | None = None,
    umid: str | int | None = None,
) -> str:
    """Zip the deliverables found in ``assignment_path`` into ``{uniquename}_{umid}_A4.zip``.

    The zip holds ``common.py``, ``two_stage_detector.py``, ``a4_helper.py``, the recipe's
    ``__init__.py`` and ``model.py`` (which ``a4_helper.py`` imports) and
    ``two_stage_detector.ipynb`` (all required); each of
    ``rcnn_detector.pt``, ``one_stage_detector.py``, ``one_stage_detector.ipynb`` and
    ``fcos_detector.pt`` (the other A4 notebook's deliverables, :data:`OPTIONAL_FILES`) when
    present; and every ``.py`` file of the ``eecs598/`` and ``recipe/`` package folders in
    ``assignment_path`` (``a4_helper`` is a facade over them), so that the extracted zip
    runs on its own. Files keep their paths relative to ``assignment_path``. The archive is
    written with :func:`eecs598.files.atomic_write`, so a failure never leaves a partial zip.

    Args:
        assignment_path: Folder holding the deliverables; the zip is written there too.
        uniquename: Your uniquename; asked for with ``input()`` when ``None``.
        umid: Your UMID; asked for with ``input()`` when ``None``.

    Returns:
        Path of the written zip file.

    Raises:
        FileNotFoundError: A required file is missing (the message names it).
        ValueError: ``uniquename`` or ``umid`` is empty or contains unsafe characters.
    """
    folder = os.fspath(assignment_path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"assignment folder not found: {folder}")
    missing = [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise FileNotFoundError(f"required file(s) missing from {folder}: {', '.join(missing)}")
    name = _check_name(uniquename, "uniquename", "Enter your uniquename (e.g. jdoe): ")
    uid = _check_name(
        None if umid is None else str(umid), "umid", "Enter your UMID (e.g. 12345678): "
    )

    files = list(REQUIRED_FILES)
    files += [f for f in OPTIONAL_FILES if os.path.isfile(os.path.join(folder, f))]
    files += [f for f in _package_files(folder) if f not in files]
    zip_path = os.path.join(folder, f"{name}_{uid}_A4.zip")
    with (
        atomic_write(zip_path, mode="wb") as handle,
        zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_DEFLATED) as zf,
    ):
        for f in files:
            zf.write(os.path.join(folder, f), arcname=f)
    print(f"Wrote {zip_path} with {len(files)} files: {', '.join(files)}")
    return zip_path
