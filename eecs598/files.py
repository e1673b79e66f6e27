"""Writing files so that a crash never leaves a half-written one.

Every file the package writes for later use (checkpoints, the dataset cache, metrics JSON, the
submission zip) goes through :func:`atomic_write`; every folder it fills in one go (the
generated shapes dataset, the extracted VOC archive) goes through :func:`atomic_directory`.
Both build the result next to its destination and rename it into place only when complete, so
a process killed at any moment leaves either the previous version or the new one.

Only the standard library is used: importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_directory", "atomic_write", "remove_stale_temp_files", "write_json"]


def _fsync_directory(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_args: Any) -> Iterator[IO]:
    """Open a temp file next to ``path`` for writing; on success it replaces ``path``.

    The temp file is ``.<name>.<random>.tmp`` in the same folder (so the rename is atomic). When
    the ``with`` block ends normally the file is flushed to disk (``fsync``), renamed onto
    ``path`` with ``os.replace`` and the rename is made durable; when the block raises, the
    temp file is deleted and ``path`` is untouched. A process killed mid-write leaves at worst
    a stale temp file, which :func:`remove_stale_temp_files` clears.

    Args:
        path: destination; its folder is created if needed.
        mode: ``"wb"`` (binary, the default) or ``"w"`` (text).
        **open_args: passed to ``open`` (e.g. ``encoding="utf-8"``).

    Yields:
        The open file object.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **open_args) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically (:func:`atomic_write`)."""
    with atomic_write(path, mode="w", encoding="utf-8") as handle:
        handle.write(json.dumps(data, indent=2) + "\n")


def remove_stale_temp_files(path: str | os.PathLike, report: bool = False) -> list[Path]:
    """Delete the temp files that :func:`atomic_write` left next to ``path`` when a process was
    killed mid-write (printing each one if ``report``); returns the deleted paths."""
    path = Path(path)
    stale = sorted(path.parent.glob(f".{path.name}.*.tmp"))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
        if report:
            print(f"Removed {tmp}: left by a run killed while writing it.")
    return stale


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, member: str | None = None) -> Iterator[Path]:
    """Fill a staging folder next to ``path``; on success it (or a folder in it) becomes ``path``.

    Yields an empty folder ``.<name>-<random>`` beside ``path``. When the ``with`` block ends
    normally, that folder (or, with ``member``, the folder ``member`` inside it, e.g. one that
    an archive extracted there) is renamed to ``path``, which must not exist or be an empty
    folder. Whatever happens, what is left of the staging folder is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        yield staging
        os.replace(staging / member if member else staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
