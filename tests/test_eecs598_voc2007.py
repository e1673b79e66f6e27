"""VOC2007 download: local file:// and loopback HTTP sources, checksum and truncation, and the
archive kept apart from the data (Colab: archive on Drive, data on the local disk)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.server
import re
import shutil
import socket
import tarfile
import threading
from pathlib import Path

import pytest
import torch
from support import noise_image, write_dataset

import eecs598.voc2007 as voc2007
from a4_helper import ShapesDetection, VOC2007DetectionTiny, download_voc2007

ARCHIVE = "voc-test.tar"
#: A mirror that must not be contacted (nothing listens on the discard port).
NOWHERE = "http://127.0.0.1:9/VOC.tar"


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> tuple[Path, str]:
    """A small tar laid out like the official one; returns (path, md5)."""
    base = tmp_path_factory.mktemp("src")
    images = {
        "000001": (noise_image(64, 48), ".jpg", [("cat", (4, 4, 40, 40), 0)]),
        "000002": (noise_image(48, 64), ".jpg", [("dog", (0, 0, 30, 50), 0),
                                                 ("cat", (1, 1, 9, 9), 1)]),
        "000003": (noise_image(64, 64), ".jpg", [("car", (5, 5, 20, 20), 1)]),  # only difficult
    }  # fmt: skip
    write_dataset(base / "VOCdevkit" / "VOC2007", images,
                  {"train": ["000001", "000003"], "val": ["000002"]})  # fmt: skip
    path = base / ARCHIVE
    with tarfile.open(path, "w") as tar:
        tar.add(base / "VOCdevkit", arcname="VOCdevkit")
    return path, hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def bounded_sockets():
    """No test here may hang on the network."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(10)
    yield
    socket.setdefaulttimeout(old)


@contextlib.contextmanager
def serve(files: dict[str, bytes], lie_about_length: bool = False):
    """Serve ``files`` on 127.0.0.1 from a thread; yields the base URL.

    With ``lie_about_length`` every response announces twice its real length and the connection
    closes early, as a dropped download would.
    """

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server naming
            body = files.get(self.path.lstrip("/"))
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            length = 2 * len(body) if lie_about_length else len(body)
            self.send_header("Content-Length", str(length))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def assert_nothing_complete(dataset_dir: Path) -> None:
    """No archive, partial file or extracted folder that could pass for a finished download."""
    leftovers = sorted(p.name for p in dataset_dir.iterdir()) if dataset_dir.exists() else []
    assert leftovers == [], leftovers


def test_download_from_file_url_then_reuse(tmp_path, archive):
    path, md5 = archive
    target = tmp_path / "data"
    train = VOC2007DetectionTiny(target, "train", download=True, image_size=32,
                                 urls=[path.as_uri()], archive_name=ARCHIVE, md5=md5)  # fmt: skip
    assert (target / ARCHIVE).is_file()
    assert (target / "VOCdevkit" / "VOC2007" / "Annotations" / "000001.xml").is_file()
    assert train.image_ids == ["000001"]  # 000003 has only a difficult object
    assert train.class_to_idx["cat"] == 7 and train.idx_to_class[11] == "dog"
    assert not any(p.name.startswith(".voc-extract") for p in target.iterdir())
    # Already present: no source needed, and a plain (download=False) load works.
    VOC2007DetectionTiny(target, "val", download=True, urls=[], archive_name=ARCHIVE, md5=md5)
    val = VOC2007DetectionTiny(target, "val", image_size=32)
    assert len(val) == 1 and not val.train_transform


def test_verified_archive_is_extracted_without_downloading(tmp_path, archive):
    path, md5 = archive
    target = tmp_path / "data"
    target.mkdir()
    (target / ARCHIVE).write_bytes(path.read_bytes())
    root = download_voc2007(target, urls=[], archive_name=ARCHIVE, md5=md5)
    assert (root / "ImageSets" / "Main" / "train.txt").is_file()


def test_http_mirror_fallback_after_checksum_mismatch(tmp_path, archive):
    path, md5 = archive
    data = path.read_bytes()
    corrupt = bytearray(data)
    corrupt[100] ^= 0xFF
    with serve({"bad.tar": bytes(corrupt), "good.tar": data}) as base:
        urls = [f"{base}/missing.tar", f"{base}/bad.tar", f"{base}/good.tar"]
        root = download_voc2007(tmp_path / "d", urls=urls, archive_name=ARCHIVE, md5=md5)
    assert root == tmp_path / "d" / "VOCdevkit" / "VOC2007"
    assert hashlib.md5((tmp_path / "d" / ARCHIVE).read_bytes()).hexdigest() == md5
    assert not (tmp_path / "d" / f"{ARCHIVE}.part").exists()


def test_checksum_mismatch_is_rejected(tmp_path, archive):
    path, md5 = archive
    corrupt = bytearray(path.read_bytes())
    corrupt[-1] ^= 0xFF
    source = tmp_path / "corrupt.tar"
    source.write_bytes(bytes(corrupt))
    target = tmp_path / "d"
    with pytest.raises(RuntimeError, match="MD5 mismatch"):
        download_voc2007(target, urls=[source.as_uri()], archive_name=ARCHIVE, md5=md5)
    assert_nothing_complete(target)


@pytest.mark.parametrize("lie_about_length", [False, True])
def test_truncated_download_is_rejected(tmp_path, archive, lie_about_length):
    path, md5 = archive
    data = path.read_bytes()
    with serve({"v.tar": data[: len(data) // 2]}, lie_about_length=lie_about_length) as base:
        with pytest.raises(RuntimeError, match="Could not download"):
            VOC2007DetectionTiny(tmp_path / "d", "train", download=True, urls=[f"{base}/v.tar"],
                                 archive_name=ARCHIVE, md5=md5)  # fmt: skip
    assert_nothing_complete(tmp_path / "d")


def test_offline_error_lists_urls_and_manual_steps(tmp_path):
    with socket.socket() as sock:  # a port with nothing listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    urls = [f"http://127.0.0.1:{port}/a/VOC.tar", f"http://127.0.0.1:{port}/b/VOC.tar"]
    with pytest.raises(RuntimeError) as info:
        download_voc2007(tmp_path / "d", urls=urls, archive_name=ARCHIVE, md5="0" * 32)
    message = str(info.value)
    assert all(url in message for url in urls)
    assert "VOCdevkit/VOC2007" in message and "by hand" in message
    assert_nothing_complete(tmp_path / "d")


def test_missing_data_without_download_explains_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="download=True.*VOCdevkit") as info:
        VOC2007DetectionTiny(tmp_path, "train")
    message = str(info.value)
    # Both switches are named: the function argument and the notebook's DOWNLOAD_VOC.
    assert "pass download=True (in the notebook: set DOWNLOAD_VOC = True" in message
    assert "run again). To install by hand, download VOCtrainval_06-Nov-2007.tar" in message
    assert "or To" not in message


# --- The archive kept apart from the data (on Colab: archive on Drive, data in /content) ---


@pytest.fixture
def calls(monkeypatch) -> dict[str, int]:
    """Counts the module's downloads and extractions (both still happen)."""
    counts = {"fetch": 0, "extract": 0}
    real_fetch, real_extract = voc2007._fetch, voc2007.extract_archive

    def fetch(*args, **kwargs):
        counts["fetch"] += 1
        return real_fetch(*args, **kwargs)

    def extract(*args, **kwargs):
        counts["extract"] += 1
        return real_extract(*args, **kwargs)

    monkeypatch.setattr(voc2007, "_fetch", fetch)
    monkeypatch.setattr(voc2007, "extract_archive", extract)
    return counts


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def extracted_size(root: Path) -> str:
    """How the "ready" line writes the size of ``root`` (MB for the small test data)."""
    return f"{sum(p.stat().st_size for p in root.rglob('*') if p.is_file()) / 1e6:.1f} MB"


def low_free_space(monkeypatch, folder: Path, free: int) -> None:
    """``shutil.disk_usage`` as the module sees it reports ``free`` bytes for ``folder``."""
    real = shutil.disk_usage

    def disk_usage(path):
        usage = real(path)
        return usage._replace(free=free) if Path(path) == folder else usage

    monkeypatch.setattr(voc2007.shutil, "disk_usage", disk_usage)


def test_archive_kept_in_archive_dir_data_extracted_once_in_dataset_dir(
    tmp_path, archive, calls, capsys
):
    path, md5 = archive
    drive, local = tmp_path / "drive", tmp_path / "content"
    drive.mkdir()
    root = download_voc2007(local, [path.as_uri()], ARCHIVE, md5, archive_dir=drive)
    assert root == local / "VOCdevkit" / "VOC2007"
    assert listing(drive) == [ARCHIVE]  # no VOCdevkit, staging folder or .part on "Drive"
    assert (drive / ARCHIVE).read_bytes() == path.read_bytes()
    assert listing(local) == ["VOCdevkit"] and listing(local / "VOCdevkit") == ["VOC2007"]
    assert (root / "ImageSets" / "Main" / "val.txt").read_text() == "000002\n"
    assert calls == {"fetch": 1, "extract": 1}
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [f"Downloading {path.as_uri()} ...",
                         f"Extracting {drive / ARCHIVE} into {local} ..."]  # fmt: skip
    ready = rf"VOC2007 ready in {re.escape(str(root))} \(downloaded and extracted in \d+ s, "
    assert len(lines) == 3 and re.fullmatch(ready + re.escape(f"{extracted_size(root)})"), lines[2])
    # Rerun in the same runtime: silent, and the archive is not even looked at (here: Drive
    # unmounted, archive folder gone).
    shutil.rmtree(drive)
    assert download_voc2007(local, [NOWHERE], ARCHIVE, md5, archive_dir=drive) == root
    val = VOC2007DetectionTiny(local, "val", download=True, urls=[NOWHERE], archive_name=ARCHIVE,
                               md5=md5, archive_dir=drive)  # fmt: skip
    assert val.image_ids == ["000002"]
    assert calls == {"fetch": 1, "extract": 1}
    assert capsys.readouterr().out == ""
    assert not drive.exists()


def test_new_runtime_extracts_the_kept_archive_without_downloading(
    tmp_path, archive, calls, capsys
):
    path, md5 = archive
    drive, local = tmp_path / "drive", tmp_path / "content"
    drive.mkdir()
    download_voc2007(local, [path.as_uri()], ARCHIVE, md5, archive_dir=drive)
    shutil.rmtree(local / "VOCdevkit")  # a new Colab runtime: /content is empty again
    capsys.readouterr()
    train = VOC2007DetectionTiny(local, "train", download=True, urls=[NOWHERE],
                                 archive_name=ARCHIVE, md5=md5, archive_dir=drive)  # fmt: skip
    assert train.image_ids == ["000001"]
    assert calls == {"fetch": 1, "extract": 2}  # the first run's download only
    root = local / "VOCdevkit" / "VOC2007"
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"Extracting {drive / ARCHIVE} into {local} ..."
    assert re.fullmatch(rf"VOC2007 ready in {re.escape(str(root))} \(extracted in \d+ s, "
                        + re.escape(f"{extracted_size(root)})"), lines[1])  # fmt: skip
    assert len(lines) == 2
    assert listing(drive) == [ARCHIVE] and listing(local) == ["VOCdevkit"]


def test_missing_archive_dir_is_not_created_and_mentions_drive(tmp_path, archive, calls):
    path, md5 = archive
    drive = tmp_path / "drive" / "MyDrive" / "a4"
    with pytest.raises(FileNotFoundError) as info:
        download_voc2007(tmp_path / "content", [path.as_uri()], ARCHIVE, md5, archive_dir=drive)
    message = str(info.value)
    assert message.startswith(f"archive_dir {drive} does not exist (it is not created here). ")
    assert message.endswith(
        "If it is on Google Drive, mount Drive first (the notebook's section 3.1.1 cell "
        'drive.mount("/content/drive")), or pass another existing folder as archive_dir.'
    )
    assert not (tmp_path / "drive").exists() and not (tmp_path / "content").exists()
    assert calls == {"fetch": 0, "extract": 0}


def test_low_space_for_extraction_names_dataset_dir_and_sizes(
    tmp_path, archive, monkeypatch, calls
):
    path, md5 = archive
    needed = round(path.stat().st_size * 1.05) + 20_000_000  # extracted size + 20 MB margin
    drive, local = tmp_path / "drive", tmp_path / "content"
    drive.mkdir()
    shutil.copyfile(path, drive / ARCHIVE)
    low_free_space(monkeypatch, local, 5_000_000)
    with pytest.raises(OSError) as info:
        download_voc2007(local, [NOWHERE], ARCHIVE, md5, archive_dir=drive)
    assert info.value.errno == errno.ENOSPC
    assert info.value.strerror == (
        f"Not enough free space in {local} to extract the archive: 5.0 MB free, about "
        f"{needed / 1e6:.1f} MB needed. Free some space there (on Google Drive, also empty its "
        "trash) or pass another folder as dataset_dir."
    )
    assert listing(drive) == [ARCHIVE] and (drive / ARCHIVE).read_bytes() == path.read_bytes()
    assert listing(local) == [] and calls == {"fetch": 0, "extract": 0}


def test_low_space_for_the_official_archive_keeps_the_old_copy(
    tmp_path, archive, monkeypatch, calls, capsys
):
    path, _ = archive
    drive = tmp_path / "drive"
    drive.mkdir()
    official = drive / voc2007.VOC2007_ARCHIVE
    old = b"first half of a download"
    official.write_bytes(old)
    low_free_space(monkeypatch, drive, 300_000_000)
    with pytest.raises(OSError) as info:  # the official name and checksum: 460 MB expected
        download_voc2007(tmp_path / "content", [path.as_uri()], archive_dir=drive)
    assert info.value.errno == errno.ENOSPC
    message = str(info.value)
    assert f"Not enough free space in {drive} to download VOCtrainval_06-Nov-2007.tar: " in message
    assert "0.30 GB free, about 0.48 GB needed" in message and "folder as archive_dir." in message
    assert capsys.readouterr().out == (
        f"{official} has the wrong checksum (a truncated copy?): downloading it again\n"
    )
    assert listing(drive) == [official.name] and official.read_bytes() == old
    assert calls == {"fetch": 0, "extract": 0}


def test_disk_full_while_extracting_removes_the_staging_folder(tmp_path, archive, monkeypatch):
    path, md5 = archive
    drive, local = tmp_path / "drive", tmp_path / "content"
    drive.mkdir()
    shutil.copyfile(path, drive / ARCHIVE)
    staged = []

    def extract_until_full(archive_path, to_path):
        (Path(to_path) / "VOCdevkit").mkdir()
        (Path(to_path) / "VOCdevkit" / "some.jpg").write_bytes(b"x" * 100)
        staged.append(Path(to_path))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(voc2007, "extract_archive", extract_until_full)
    expected = rf"Not enough free space in {re.escape(str(local))} to extract the archive: "
    with pytest.raises(OSError, match=expected + r".* free, about 20\.\d MB needed") as info:
        download_voc2007(local, [NOWHERE], ARCHIVE, md5, archive_dir=drive)
    assert info.value.errno == errno.ENOSPC
    assert staged and staged[0].parent == local / "VOCdevkit"  # staged locally, not on "Drive"
    assert listing(local / "VOCdevkit") == []  # the half-extracted staging folder is gone
    assert listing(drive) == [ARCHIVE] and (drive / ARCHIVE).read_bytes() == path.read_bytes()


def test_disk_full_while_downloading_stops_at_once(tmp_path, archive, monkeypatch):
    path, md5 = archive
    drive = tmp_path / "drive"
    drive.mkdir()
    tried = []

    def fetch_until_full(url, destination):
        tried.append(url)
        destination.write_bytes(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(voc2007, "_fetch", fetch_until_full)
    with pytest.raises(OSError, match=rf"Not enough free space in {re.escape(str(drive))} to "
                       rf"download {ARCHIVE}: .* free, more needed\."):  # fmt: skip
        download_voc2007(tmp_path / "content", [path.as_uri(), NOWHERE], ARCHIVE, md5,
                         archive_dir=drive)  # fmt: skip
    assert tried == [path.as_uri()]  # no other mirror can help
    assert listing(drive) == []  # the .part is gone


def cut(path: Path, where: str) -> bytes:
    """The archive's bytes cut in the middle of a JPEG's data, or right before the first
    ``ImageSets`` entry (a tar reader sees a shorter, valid-looking archive)."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    if where == "inside a file":
        jpeg = next(m for m in members if m.name.endswith(".jpg"))
        end = jpeg.offset_data + jpeg.size // 2
    else:
        end = next(m for m in members if "ImageSets" in m.name).offset
    return path.read_bytes()[:end]


@pytest.mark.parametrize("where", ["inside a file", "at an entry"])
def test_truncated_archive_that_passes_the_checksum_is_reported_not_deleted(
    tmp_path, archive, calls, where
):
    path, _ = archive
    drive, local = tmp_path / "drive", tmp_path / "content"
    drive.mkdir()
    short = cut(path, where)
    (drive / ARCHIVE).write_bytes(short)
    md5 = hashlib.md5(short).hexdigest()  # the check passes, as if there were none
    with pytest.raises(RuntimeError) as info:
        download_voc2007(local, [NOWHERE], ARCHIVE, md5, archive_dir=drive)
    message = str(info.value)
    assert message.startswith(str(drive / ARCHIVE))
    assert "truncated or damaged" in message and "Delete it and run again" in message
    if where == "inside a file":
        assert "(ReadError: unexpected end of data)" in message
    else:
        assert "does not contain VOCdevkit/VOC2007/ImageSets/Main" in message
    assert listing(drive) == [ARCHIVE] and (drive / ARCHIVE).read_bytes() == short
    assert listing(local) == ["VOCdevkit"] and listing(local / "VOCdevkit") == []
    assert calls == {"fetch": 0, "extract": 1}


def test_truncated_archive_is_downloaded_again(tmp_path, archive, calls, capsys):
    path, md5 = archive
    drive, local = tmp_path / "drive", tmp_path / "content"
    drive.mkdir()
    (drive / ARCHIVE).write_bytes(cut(path, "inside a file"))
    root = download_voc2007(local, [path.as_uri()], ARCHIVE, md5, archive_dir=drive)
    assert capsys.readouterr().out.splitlines()[:3] == [
        f"{drive / ARCHIVE} has the wrong checksum (a truncated copy?): downloading it again",
        f"Downloading {path.as_uri()} ...",
        f"Extracting {drive / ARCHIVE} into {local} ...",
    ]
    assert hashlib.md5((drive / ARCHIVE).read_bytes()).hexdigest() == md5
    assert listing(drive) == [ARCHIVE] and (root / "JPEGImages" / "000002.jpg").is_file()
    assert calls == {"fetch": 1, "extract": 1}


def test_truncated_archive_is_kept_when_no_mirror_delivers(tmp_path, archive):
    path, md5 = archive
    drive = tmp_path / "drive"
    drive.mkdir()
    short = cut(path, "inside a file")
    (drive / ARCHIVE).write_bytes(short)
    with pytest.raises(RuntimeError, match="Could not download") as info:
        download_voc2007(tmp_path / "content", [NOWHERE], ARCHIVE, md5, archive_dir=drive)
    assert f"Put a copy of {ARCHIVE} in {drive} and run again, or: To install by hand" in str(
        info.value
    )
    assert f"extract it into {tmp_path / 'content'} so that" in str(info.value)
    assert listing(drive) == [ARCHIVE] and (drive / ARCHIVE).read_bytes() == short


# ---- the notebook's batches (section 3.2) -----------------------------------------------------


def _voc_tiny(root: Path, image_size: int) -> VOC2007DetectionTiny:
    """VOC2007DetectionTiny over four generated images of several sizes and VOC classes."""
    images = {
        f"00000{i}": (noise_image(w, h, seed=i), ".jpg", [("cat", (4, 4, 40, 30), 0),
                                                           ("person", (10, 5, w - 1, h - 1), 0)])
        for i, (w, h) in enumerate([(500, 375), (375, 500), (333, 500), (64, 48)], start=1)
    }  # fmt: skip
    write_dataset(root / "VOCdevkit" / "VOC2007", images, {"train": list(images)})
    return VOC2007DetectionTiny(root, "train", image_size=image_size)


@pytest.mark.sanity
@pytest.mark.parametrize("kind, image_size", [("voc", 224), ("shapes", 128)])
def test_notebook_batches_have_the_notebook_shapes(tmp_path, kind, image_size):
    """Section 3.2: a training batch of the notebook's loader is images (B, 3, S, S) and
    gt_boxes (B, 40, 5), boxes padded with rows of -1 (VOC; FAST_MODE's generated shapes)."""
    if kind == "voc":
        dataset = _voc_tiny(tmp_path, image_size)
    else:
        generate = {"num_train": 4, "num_val": 0, "image_size": image_size, "seed": 0}
        dataset = ShapesDetection(tmp_path / "shapes", "train", image_size, generate=generate)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)
    paths, images, gt_boxes = next(iter(loader))
    assert len(paths) == 4 and all(Path(p).is_file() for p in paths)
    assert images.shape == (4, 3, image_size, image_size) and images.dtype == torch.float32
    assert gt_boxes.shape == (4, 40, 5) and gt_boxes.dtype == torch.float32
    valid = gt_boxes[..., 4] >= 0
    assert valid.any(dim=1).all() and torch.all(gt_boxes[~valid] == -1)
    boxes = gt_boxes[valid]
    assert torch.all(boxes[:, :2] >= 0) and torch.all(boxes[:, 2:4] <= image_size)
    assert torch.all(boxes[:, 2:4] > boxes[:, :2])
    if kind == "voc":
        assert set(boxes[:, 4].long().tolist()) <= {dataset.class_names.index(c)
                                                    for c in ("cat", "person")}  # fmt: skip
