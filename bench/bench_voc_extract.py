"""How long ``download_voc2007`` takes to make VOC 2007 ready from a tar it need not download:
a generated archive of the official one's size and file count (5,011 JPEG-sized and 5,011
XML-sized files of random bytes, plus the split lists), served from a ``file://`` URL.

Rows: the first call (copy the tar from the "mirror" to ``archive_dir``, checksum it, extract
it into ``dataset_dir``), then a new "runtime" (the extracted folder deleted; the kept tar is
checksummed and extracted, nothing copied), then a rerun with the data in place (nothing to
do). The download itself depends on the mirror and the network and is not part of this.

Usage::

    python bench/bench_voc_extract.py [--dir /tmp] [--images 5011]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import harness  # noqa: F401 - puts the repository on sys.path
import numpy as np

from eecs598.voc2007 import VOC2007_ARCHIVE_BYTES, download_voc2007

# Mean sizes in the official archive: JPEGs and annotations (its JPEGs make up most of it).
JPEG_BYTES = 85_000
XML_BYTES = 1_200


def make_archive(path: Path, images: int) -> str:
    """Write a VOC-layout tar of ``images`` random JPEG- and XML-sized files; its MD5."""
    rng = np.random.default_rng(0)
    root = "VOCdevkit/VOC2007"
    with tarfile.open(path, "w") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(f"{root}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        ids = [f"{i:06d}" for i in range(1, images + 1)]
        for image_id in ids:
            add(f"JPEGImages/{image_id}.jpg", rng.bytes(JPEG_BYTES))
            add(f"Annotations/{image_id}.xml", rng.bytes(XML_BYTES))
        half = len(ids) // 2
        add("ImageSets/Main/train.txt", "".join(f"{i}\n" for i in ids[:half]).encode())
        add("ImageSets/Main/val.txt", "".join(f"{i}\n" for i in ids[half:]).encode())
    digest = hashlib.md5()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def timed(label: str, **kwargs) -> float:
    start = time.perf_counter()
    download_voc2007(**kwargs)
    seconds = time.perf_counter() - start
    print(f"{label:48s} {seconds:7.1f} s")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=None, help="where to work (default: a temp folder)")
    parser.add_argument("--images", type=int, default=5011)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        mirror, archive_dir, dataset_dir = tmp / "mirror", tmp / "drive", tmp / "content"
        for folder in (mirror, archive_dir, dataset_dir):
            folder.mkdir()
        source = mirror / "voc.tar"
        md5 = make_archive(source, args.images)
        size = source.stat().st_size
        print(f"archive: {size / 1e6:.0f} MB ({VOC2007_ARCHIVE_BYTES / 1e6:.0f} MB official), "
              f"{2 * args.images + 2} files")  # fmt: skip
        call = dict(dataset_dir=dataset_dir, urls=[source.as_uri()], archive_name="voc.tar",
                    md5=md5, archive_dir=archive_dir)  # fmt: skip
        timed("first call: copy, checksum, extract", **call)
        shutil.rmtree(dataset_dir / "VOCdevkit")
        timed("new runtime: checksum and extract the kept tar", **call)
        timed("rerun with the data in place", **call)


if __name__ == "__main__":
    main()
