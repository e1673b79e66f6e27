"""VOC2007 download: local file:// and loopback HTTP sources, checksum and truncation."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import socket
import tarfile
import threading
from pathlib import Path

import pytest
from support import noise_image, write_dataset

from a4_helper import VOC2007DetectionTiny, download_voc2007

ARCHIVE = "voc-test.tar"


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
