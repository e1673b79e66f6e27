"""PASCAL VOC 2007: its 20 classes, the checksummed download, and the notebook's dataset."""

from __future__ import annotations

import os
import shutil
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torchvision.datasets.utils import check_integrity, download_url, extract_archive

from .files import atomic_directory
from .voc import VOCLayoutDetection

__all__ = [
    "VOC2007_ARCHIVE",
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


#: File name of the official VOC2007 trainval archive and its MD5 checksum.
VOC2007_ARCHIVE = "VOCtrainval_06-Nov-2007.tar"
VOC2007_MD5 = "c52e279531787c972589f7e41ab4ae64"
#: Mirrors tried in order by :func:`download_voc2007`.
VOC2007_URLS: tuple[str, ...] = (
    "http://host.robots.ox.ac.uk/pascal/VOC/voc2007/VOCtrainval_06-Nov-2007.tar",
    "https://pjreddie.com/media/files/VOCtrainval_06-Nov-2007.tar",
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


def download_voc2007(
    dataset_dir: str | os.PathLike,
    urls: Sequence[str] | None = None,
    archive_name: str | None = None,
    md5: str | None = None,
) -> Path:
    """Download, verify and extract the VOC2007 trainval archive into ``dataset_dir``.

    Mirrors are tried in order. Each download goes to ``<archive_name>.part``; it is renamed to
    ``<archive_name>`` only once its MD5 matches, so a partial or corrupt file is never taken as
    done. Extraction happens in a temporary folder that is moved to ``VOCdevkit/VOC2007`` when
    complete. Nothing is downloaded when the data or a verified archive is already present.

    Args:
        dataset_dir: Folder that receives the archive and ``VOCdevkit/VOC2007``.
        urls: Mirrors to try; default :data:`VOC2007_URLS` (read at call time).
        archive_name: Archive file name; default :data:`VOC2007_ARCHIVE`.
        md5: Expected checksum; default :data:`VOC2007_MD5`.

    Returns:
        Path of ``<dataset_dir>/VOCdevkit/VOC2007``.

    Raises:
        RuntimeError: When no mirror delivers a file with the right checksum; the message lists
            every URL tried with its error and explains how to place the files by hand.
    """
    dataset_dir = Path(dataset_dir).expanduser()
    urls = list(VOC2007_URLS if urls is None else urls)
    archive_name = archive_name or VOC2007_ARCHIVE
    md5 = md5 or VOC2007_MD5
    target = dataset_dir / "VOCdevkit" / "VOC2007"
    if (target / "ImageSets" / "Main").is_dir():
        return target
    dataset_dir.mkdir(parents=True, exist_ok=True)
    archive = dataset_dir / archive_name
    if not check_integrity(archive, md5):
        _download_verified(urls, archive, md5)
    _extract(archive, target)
    return target


def _download_verified(urls: list[str], archive: Path, md5: str) -> None:
    """Fetch ``archive`` from the first mirror whose file has checksum ``md5``."""
    part = archive.with_name(f"{archive.name}.part")
    errors: list[str] = []
    for url in urls:
        part.unlink(missing_ok=True)
        print(f"Downloading {url} ...")
        try:
            _fetch(url, part)
        except Exception as exc:  # noqa: BLE001 - any failure means: try the next mirror
            errors.append(f"  {url}: {type(exc).__name__}: {exc}")
            part.unlink(missing_ok=True)
            continue
        if check_integrity(part, md5):
            os.replace(part, archive)
            return
        errors.append(f"  {url}: MD5 mismatch (expected {md5}); file discarded")
        part.unlink(missing_ok=True)
    raise RuntimeError(
        f"Could not download {archive.name} from any mirror:\n"
        + "\n".join(errors)
        + "\n"
        + _manual_instructions(archive.parent, archive.name)
    )


def _extract(archive: Path, target: Path) -> None:
    """Extract ``archive`` next to ``target`` and move its ``VOCdevkit/VOC2007`` there."""
    member = Path("VOCdevkit") / "VOC2007"
    with atomic_directory(target, member=str(member)) as staging:
        print(f"Extracting {archive} ...")
        extract_archive(str(archive), str(staging))
        if not (staging / member / "ImageSets" / "Main").is_dir():
            raise RuntimeError(
                f"{archive} does not contain VOCdevkit/VOC2007/ImageSets/Main. "
                + _manual_instructions(archive.parent, archive.name)
            )


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
    ) -> None:
        dataset_dir = Path(dataset_dir).expanduser()
        if download:
            download_voc2007(dataset_dir, urls=urls, archive_name=archive_name, md5=md5)
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
