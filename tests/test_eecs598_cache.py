"""CachedDetection: items equal the reader's, the disk cache is reused and invalidated."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from support import TinyDetector

from a4_helper import CachedDetection, ShapesDetection, normalize_uint8, train_detector


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache") / "shapes"
    ShapesDetection(root, "train", generate={"num_train": 12, "num_val": 4, "image_size": 64})
    return root


@pytest.mark.parametrize("split", ["train", "val"])
def test_cached_items_equal_reader_items(shapes_root, split):
    plain = ShapesDetection(shapes_root, split, image_size=48)
    cached = CachedDetection(plain)
    raw = CachedDetection(plain, normalize=False)
    assert len(cached) == len(plain) == len(raw)
    for i in range(len(plain)):
        path, image, boxes = plain[i]
        c_path, c_image, c_boxes = cached[i]
        assert c_path == path
        assert torch.equal(c_image, image) and torch.equal(c_boxes, boxes)
        r_path, r_image, r_boxes = raw[i]
        assert r_image.dtype == torch.uint8 and torch.equal(normalize_uint8(r_image), image)
        assert torch.equal(r_boxes, boxes)
    # Lookups the cache does not answer go to the reader.
    assert cached.class_names == plain.class_names
    assert cached.annotation_for_path(path)["image_id"] == plain.image_ids[-1]


def test_items_are_copies(shapes_root):
    cached = CachedDetection(ShapesDetection(shapes_root, "train", image_size=48))
    cached[0][2].fill_(7.0)  # a caller editing its boxes must not edit the cache
    assert not (cached[0][2] == 7.0).all()


def test_disk_cache_reused_then_rebuilt_when_a_file_changes(shapes_root, tmp_path, monkeypatch):
    plain = ShapesDetection(shapes_root, "train", image_size=48)
    first = CachedDetection(plain, tmp_path / "cache")
    assert first.cache_file.is_file()
    assert not list((tmp_path / "cache").glob("*.part"))

    def no_decoding(index):
        raise AssertionError("the cache file should have been used")

    monkeypatch.setattr(plain, "load_uint8", no_decoding)
    second = CachedDetection(plain, tmp_path / "cache")
    assert torch.equal(second[3][1], first[3][1])

    # A changed image invalidates the file: the reader is asked again.
    image_path = plain.image_paths[0]
    stat = os.stat(image_path)
    os.utime(image_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="cache file should have been used"):
        CachedDetection(plain, tmp_path / "cache")


def test_other_settings_get_their_own_file(shapes_root, tmp_path):
    a = CachedDetection(ShapesDetection(shapes_root, "train", image_size=48), tmp_path)
    b = CachedDetection(ShapesDetection(shapes_root, "train", image_size=40), tmp_path)
    assert a.cache_file != b.cache_file
    assert a[0][1].shape[-1] == 48 and b[0][1].shape[-1] == 40


def test_corrupt_cache_file_is_rebuilt_with_a_warning(shapes_root, tmp_path):
    plain = ShapesDetection(shapes_root, "train", image_size=48)
    cache = CachedDetection(plain, tmp_path)
    cache.cache_file.write_bytes(cache.cache_file.read_bytes()[:100])  # truncated
    with pytest.warns(UserWarning, match="Unreadable dataset cache"):
        rebuilt = CachedDetection(plain, tmp_path)
    assert torch.equal(rebuilt[0][1], plain[0][1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CachedDetection(plain, tmp_path)  # the rewritten file loads cleanly


def test_train_detector_normalises_uint8_batches(shapes_root):
    """Training on the uint8 cache gives exactly the losses of training on float images."""
    plain = ShapesDetection(shapes_root, "train", image_size=48)
    histories = []
    for dataset in (plain, CachedDetection(plain, normalize=False)):
        torch.manual_seed(0)
        model = TinyDetector(num_classes=len(plain.class_names))
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0)
        )
        histories.append(
            train_detector(
                model,
                loader,
                max_iters=5,
                warmup_iters=2,
                show_plot=False,
                progress=False,
                log_period=0,
            )  # fmt: skip
        )
    assert histories[0] == histories[1]
    assert len(histories[0]) == 5
