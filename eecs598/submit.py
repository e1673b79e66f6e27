"""Packs the assignment deliverables into the zip file that is handed in."""

from __future__ import annotations

import os
import re
import tempfile
import zipfile

__all__ = ["OPTIONAL_FILES", "REQUIRED_FILES", "make_a4_submission"]

REQUIRED_FILES: tuple[str, ...] = (
    "common.py",
    "two_stage_detector.py",
    "a4_helper.py",
    "two_stage_detector.ipynb",
)
OPTIONAL_FILES: tuple[str, ...] = ("rcnn_detector.pt",)

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


def make_a4_submission(
    assignment_path: str | os.PathLike[str],
    uniquename: str | None = None,
    umid: str | int | None = None,
) -> str:
    """Zip the deliverables found in ``assignment_path`` into ``{uniquename}_{umid}_A4.zip``.

    The zip holds ``common.py``, ``two_stage_detector.py``, ``a4_helper.py`` and
    ``two_stage_detector.ipynb`` (all required) plus ``rcnn_detector.pt`` when present, stored
    flat under their base names. The archive is first written to a temporary file in the same
    folder and renamed into place when complete, so a failure never leaves a partial zip.

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
    zip_path = os.path.join(folder, f"{name}_{uid}_A4.zip")

    fd, tmp_path = tempfile.mkstemp(prefix=".submission-", suffix=".zip.part", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                for f in files:
                    zf.write(os.path.join(folder, f), arcname=f)
        os.replace(tmp_path, zip_path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    print(f"Wrote {zip_path} with {len(files)} files: {', '.join(files)}")
    return zip_path
