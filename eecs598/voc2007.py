"""PASCAL VOC 2007: its 20 classes, the checksummed download, and the notebook's dataset."""

from __future__ import annotations

import errno
import os
import shutil
import tarfile
import time
import urllib.parse
import urllib.request
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torchvision.datasets.utils import check_integrity, download_url, extract_archive

from .files import atomic_directory
from .voc import VOCLayoutDetection

__all__ = [
    "VOC2007_ARCHIVE",
    "VOC2007_ARCHIVE_BYTES",
    "VOC2007_MD5",
    "VOC2007_URLS",
    "VOC_CLASSES",
    "VOC2007DetectionTiny",
    "download_voc2007",
]

#: The 20 PASCAL VOC classes in alphabetical order (class index = position).
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


#: File name of the official VOC2007 trainval archive, its MD5 checksum and its size in bytes.
VOC2007_ARCHIVE = "VOCtrainval_06-Nov-2007.tar"
VOC2007_MD5 = "c52e279531787c972589f7e41ab4ae64"
VOC2007_ARCHIVE_BYTES = 460_032_000
#: Mirrors tried in order by :func:`download_voc2007`.
VOC2007_URLS: tuple[str, ...] = (
    "http://host.robots.ox.ac.uk/pascal/VOC/voc2007/VOCtrainval_06-Nov-2007.tar",
    "https://pjreddie.com/media/files/VOCtrainval_06-Nov-2007.tar",
)

#: Where the data lies inside ``dataset_dir`` (and inside the archive).
_MEMBER = Path("VOCdevkit") / "VOC2007"
#: Head room kept on top of what a download or an extraction needs (file-system overhead).
_SPACE_MARGIN_BYTES = 20_000_000
#: The extracted files take about this many times the archive's size.
_EXTRACTED_PER_ARCHIVE_BYTE = 1.05
#: ``errno`` values of a full disk or an exhausted quota (Google Drive's, say).
_OUT_OF_SPACE = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})
#: Errors by which ``tarfile`` (through torchvision) reports a truncated or damaged archive.
_DAMAGED_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error)


def download_voc2007(
    dataset_dir: str | os.PathLike,
    urls: Sequence[str] | None = None,
    archive_name: str | None = None,
    md5: str | None = None,
    *,
    archive_dir: str | os.PathLike | None = None,
) -> Path:
    """Make sure ``<dataset_dir>/VOCdevkit/VOC2007`` holds the VOC2007 trainval data.

    When ``VOCdevkit/VOC2007/ImageSets/Main`` is already there, returns at once and silently
    (the archive is neither read nor checksummed), so calling this every time is cheap.
    Otherwise the archive in ``archive_dir`` is used if its MD5 matches; if it is missing or
    does not match, mirrors are tried in order. Each download goes to ``<archive_name>.part``,
    renamed to ``<archive_name>`` only once its MD5 matches, so a partial file is never taken as
    done. The archive is then extracted into a staging folder inside ``dataset_dir``, moved to
    ``VOCdevkit/VOC2007`` only when complete.

    Keeping the archive apart from the data serves Google Colab: with ``dataset_dir="/content"``
    (the runtime's fast local disk) and ``archive_dir`` a Google Drive folder, the 450 MB
    archive is downloaded once, each new runtime only extracts it, and no extracted file is
    ever written to Drive. Nothing in ``archive_dir`` is deleted when something fails.

    Args:
        dataset_dir: Folder that receives ``VOCdevkit/VOC2007`` (created if needed).
        urls: Mirrors to try; default :data:`VOC2007_URLS` (read at call time).
        archive_name: Archive file name; default :data:`VOC2007_ARCHIVE`.
        md5: Expected checksum; default :data:`VOC2007_MD5`.
        archive_dir: Folder that holds (or receives) the archive; default ``dataset_dir``. It
            must exist already: it is never created, because on Colab a folder created under
            ``/content/drive`` before Drive is mounted is a local one that breaks the mount.

    Returns:
        Path of ``<dataset_dir>/VOCdevkit/VOC2007``.

    Raises:
        FileNotFoundError: ``archive_dir`` does not exist (e.g. Drive is not mounted).
        OSError: (``errno.ENOSPC``) not enough free space in ``archive_dir`` for the download
            or in ``dataset_dir`` for the extraction; the message says how much is free and
            how much is needed.
        RuntimeError: No mirror delivers a file with the right checksum (the message lists
            every URL tried with its error and explains how to place the files by hand), or
            the archive turns out truncated or damaged while it is extracted.
    """
    dataset_dir = Path(dataset_dir).expanduser()
    target = dataset_dir / _MEMBER
    if (target / "ImageSets" / "Main").is_dir():
        return target
    urls = list(VOC2007_URLS if urls is None else urls)
    archive_name = archive_name or VOC2007_ARCHIVE
    md5 = md5 or VOC2007_MD5
    archive_dir = dataset_dir if archive_dir is None else _existing_archive_dir(archive_dir)
    dataset_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    archive = archive_dir / archive_name
    downloaded = _ensure_archive(urls, archive, md5, dataset_dir)
    _extract(archive, dataset_dir)
    seconds = time.monotonic() - started
    what = "downloaded and extracted" if downloaded else "extracted"
    print(f"VOC2007 ready in {target} ({what} in {seconds:.0f} s, {_size(_folder_bytes(target))})")
    return target


def _existing_archive_dir(archive_dir: str | os.PathLike) -> Path:
    """Return ``archive_dir`` as a path, or explain why it is missing; it is never created."""
    folder = Path(archive_dir).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"archive_dir {folder} does not exist (it is not created here). If it is on Google "
            "Drive, mount Drive first (the notebook's section 3.1.1 cell drive.mount(\"/content/"
            'drive")), or pass another existing folder as archive_dir.'
        )
    return folder


def _ensure_archive(urls: list[str], archive: Path, md5: str, dataset_dir: Path) -> bool:
    """Make ``archive`` a file with checksum ``md5``, downloading it if needed.

    Returns whether it was downloaded. A present copy with another checksum (typically one cut
    short by a dropped connection) is replaced only once a good download is complete.
    """
    if check_integrity(archive, md5):
        return False
    if archive.exists():
        print(f"{archive} has the wrong checksum (a truncated copy?): downloading it again")
    size = _known_archive_bytes(archive.name)
    if size is not None:
        _require_free_space(archive.parent, size, "archive_dir", f"download {archive.name}")
    _download_verified(urls, archive, md5, dataset_dir)
    return True


def _known_archive_bytes(archive_name: str) -> int | None:
    """Size of the archive called ``archive_name``: known for the official one only."""
    return VOC2007_ARCHIVE_BYTES if archive_name == VOC2007_ARCHIVE else None


def _download_verified(urls: list[str], archive: Path, md5: str, dataset_dir: Path) -> None:
    """Fetch ``archive`` from the first mirror whose file has checksum ``md5``; ``dataset_dir``
    is named in the how-to-install-by-hand part of the error raised when none does."""
    part = archive.with_name(f"{archive.name}.part")
    errors: list[str] = []
    for url in urls:
        part.unlink(missing_ok=True)
        print(f"Downloading {url} ...")
        try:
            _fetch(url, part)
        except Exception as exc:  # noqa: BLE001 - any failure means: try the next mirror
            part.unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno in _OUT_OF_SPACE:  # no mirror can help
                needed = _known_archive_bytes(archive.name)
                purpose = f"download {archive.name}"
                raise _no_space_error(archive.parent, needed, "archive_dir", purpose) from exc
            errors.append(f"  {url}: {type(exc).__name__}: {exc}")
            continue
        if check_integrity(part, md5):
            os.replace(part, archive)
            return
        errors.append(f"  {url}: MD5 mismatch (expected {md5}); file discarded")
        part.unlink(missing_ok=True)
    raise RuntimeError(
        f"Could not download {archive.name} from any mirror:\n"
        + "\n".join(errors)
        + f"\nPut a copy of {archive.name} in {archive.parent} and run again, or: "
        + _manual_instructions(dataset_dir, archive.name)
    )


def _manual_instructions(dataset_dir: Path, archive_name: str) -> str:
    return (
        f"To install by hand, download {archive_name} and extract it into {dataset_dir} so that "
        f"{dataset_dir / 'VOCdevkit' / 'VOC2007' / 'Annotations'}, .../JPEGImages and "
        ".../ImageSets/Main/{train,val}.txt exist."
    )


def _fetch(url: str, destination: Path) -> None:
    """Copy ``url`` to ``destination``: ``file://`` URLs directly, others with torchvision's
    ``download_url`` (redirects followed, tqdm progress bar)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        source = Path(urllib.request.url2pathname(parsed.path))
        shutil.copyfile(source, destination)
        return
    download_url(url, str(destination.parent), filename=destination.name, md5=None)


def _extract(archive: Path, dataset_dir: Path) -> None:
    """Extract ``archive`` into a staging folder in ``dataset_dir``, then move its
    ``VOCdevkit/VOC2007`` into place (:func:`~eecs598.files.atomic_directory`, which also
    removes the staging folder when extraction fails)."""
    needed = round(archive.stat().st_size * _EXTRACTED_PER_ARCHIVE_BYTE)
    _require_free_space(dataset_dir, needed, "dataset_dir", "extract the archive")
    print(f"Extracting {archive} into {dataset_dir} ...")
    try:
        with atomic_directory(dataset_dir / _MEMBER, member=str(_MEMBER)) as staging:
            extract_archive(str(archive), str(staging))
            if not (staging / _MEMBER / "ImageSets" / "Main").is_dir():
                raise RuntimeError(
                    f"{archive} does not contain VOCdevkit/VOC2007/ImageSets/Main: it is "
                    "truncated or damaged, or not the VOC2007 trainval archive. Delete it and "
                    "run again to download it anew. "
                    + _manual_instructions(dataset_dir, archive.name)
                )
    except OSError as exc:
        if exc.errno not in _OUT_OF_SPACE:
            raise
        raise _no_space_error(dataset_dir, needed, "dataset_dir", "extract the archive") from exc
    except _DAMAGED_ARCHIVE_ERRORS as exc:
        raise RuntimeError(
            f"{archive} is truncated or damaged ({type(exc).__name__}: {exc}). Delete it and run "
            "again to download it anew."
        ) from exc


def _require_free_space(folder: Path, needed: int, argument: str, purpose: str) -> None:
    """Raise :func:`_no_space_error` unless ``folder`` has ``needed`` bytes plus a margin free."""
    if shutil.disk_usage(folder).free < needed + _SPACE_MARGIN_BYTES:
        raise _no_space_error(folder, needed, argument, purpose)


def _no_space_error(folder: Path, needed: int | None, argument: str, purpose: str) -> OSError:
    """An ``ENOSPC`` error saying where space is short, by how much, and what to do
    (``needed``: bytes, not counting the margin; ``None`` when unknown)."""
    free = _size(shutil.disk_usage(folder).free)
    wanted = "more" if needed is None else f"about {_size(needed + _SPACE_MARGIN_BYTES)}"
    return OSError(
        errno.ENOSPC,
        f"Not enough free space in {folder} to {purpose}: {free} free, {wanted} needed. Free "
        f"some space there (on Google Drive, also empty its trash) or pass another folder as "
        f"{argument}.",
    )


def _folder_bytes(folder: Path) -> int:
    """Total size of the files under ``folder``."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _size(num_bytes: int) -> str:
    """``num_bytes`` for people: GB from 0.1 GB on, MB below."""
    if num_bytes >= 100_000_000:
        return f"{num_bytes / 1e9:.2f} GB"
    return f"{num_bytes / 1e6:.1f} MB"


class VOC2007DetectionTiny(VOCLayoutDetection):
    """PASCAL VOC 2007 detection data as used by the notebook.

    Reads ``<dataset_dir>/VOCdevkit/VOC2007`` with the 20 VOC classes in alphabetical order
    (:data:`VOC_CLASSES`). Splits are the VOC2007 ``ImageSets/Main`` files, e.g. ``"train"`` and
    ``"val"``; only images with at least one non-difficult object are kept. ``"train"`` items are
    resized and centre-cropped, other splits are resized only (see the module docstring).

    Args:
        dataset_dir: Folder holding (or receiving) ``VOCdevkit/VOC2007``.
        split: ``"train"`` or ``"val"`` (any split file present works).
        download: Fetch and extract the official trainval archive if the data is missing.
        image_size: Short side after resizing (and crop size for training).
        max_boxes: Rows of ``gt_boxes``.
        skip_corrupt: Leave out unreadable images (see :class:`VOCLayoutDetection`).
        train_transform: Centre-crop to a square (``True``) or resize only (``False``);
            ``None`` (the default) crops the ``"train"`` split only, as the notebook expects.
        transform: box-aware augmentation of the items, e.g.
            ``eecs598.augment.build_train_transform()`` for random horizontal flips; ``None``
            (the default, the notebook's) for none.
        urls / archive_name / md5: Overrides for the download (defaults: module constants).
        archive_dir: Existing folder that keeps the downloaded archive (default: ``dataset_dir``),
            e.g. a Google Drive folder while ``dataset_dir`` is Colab's local ``/content``: a new
            runtime then extracts the kept archive instead of downloading it again (see
            :func:`download_voc2007`).
    """

    def __init__(
        self,
        dataset_dir: str | os.PathLike,
        split: str = "train",
        download: bool = False,
        image_size: int = 224,
        *,
        max_boxes: int = 40,
        skip_corrupt: bool = False,
        train_transform: bool | None = None,
        transform: Any = None,
        urls: Sequence[str] | None = None,
        archive_name: str | None = None,
        md5: str | None = None,
        archive_dir: str | os.PathLike | None = None,
    ) -> None:
        dataset_dir = Path(dataset_dir).expanduser()
        if download:
            download_voc2007(dataset_dir, urls, archive_name, md5, archive_dir=archive_dir)
        super().__init__(
            dataset_dir / "VOCdevkit" / "VOC2007",
            split,
            VOC_CLASSES,
            image_size=image_size,
            max_boxes=max_boxes,
            train_transform=split == "train" if train_transform is None else train_transform,
            skip_empty=True,
            skip_corrupt=skip_corrupt,
            transform=transform,
            how_to_get="To fetch it (about 450 MB), pass download=True (in the notebook: set "
            "DOWNLOAD_VOC = True in section 3.1 and run again). "
            + _manual_instructions(dataset_dir, archive_name or VOC2007_ARCHIVE),
        )
