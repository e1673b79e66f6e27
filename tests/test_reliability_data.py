"""Reliability of the VOC-layout reader on faulty or unusual data (issue 6, "Data").

Cases already covered elsewhere: boxes clipped to the image and zero-size / inverted boxes
dropped (``test_eecs598_voc.test_odd_boxes_clipped_or_dropped_with_warning``), an unknown
class name (``test_clear_errors``), more objects than ``max_boxes``
(``test_more_objects_than_max_boxes_keeps_largest_and_warns_once``), an image whose only object
is difficult (``test_difficult_objects_kept_for_evaluation_only``).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from support import noise_image, write_dataset, write_xml

from a4_helper import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CorruptImageError,
    VOCLayoutDetection,
    read_rgb_image,
    to_rgb,
)

CLASSES = ("cat", "dog", "car")


def valid_rows(gt_boxes: torch.Tensor) -> torch.Tensor:
    return gt_boxes[gt_boxes[:, 4] >= 0]


def jpeg_bytes(width: int, height: int, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    noise_image(width, height, seed=seed).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture()
def faulty_root(tmp_path):
    """Three good images, a truncated JPEG and a file that is no image at all."""
    images = {f"ok{i}": (noise_image(40, 30, seed=i), ".jpg", [("cat", (2, 2, 20, 20), 0)])
              for i in range(3)}  # fmt: skip
    root = write_dataset(tmp_path / "faulty", images, {"train": []})
    data = jpeg_bytes(64, 48, seed=7)
    (root / "JPEGImages" / "trunc.jpg").write_bytes(data[: len(data) // 2])
    (root / "JPEGImages" / "junk.jpg").write_bytes(b"this is not an image")
    for image_id in ("trunc", "junk"):
        write_xml(root / "Annotations" / f"{image_id}.xml", f"{image_id}.jpg", (64, 48),
                  [("dog", (1, 1, 30, 30), 0)])  # fmt: skip
    ids = ["ok0", "trunc", "ok1", "junk", "ok2"]
    (root / "ImageSets" / "Main" / "train.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


# ---- corrupt and truncated files ------------------------------------------------------------


def test_corrupt_images_raise_naming_file_index_and_id(faulty_root):
    ds = VOCLayoutDetection(faulty_root, "train", CLASSES, image_size=32)  # reads no pixels
    assert len(ds) == 5 and ds.skipped_ids == []
    assert ds[0][1].shape == (3, 32, 32)
    with pytest.raises(CorruptImageError) as info:
        ds[1]
    message = str(info.value)
    assert str(faulty_root / "JPEGImages" / "trunc.jpg") in message
    assert "truncated" in message and "item 1, image id 'trunc'" in message
    assert "skip_corrupt=True" in message
    with pytest.raises(CorruptImageError, match=r"junk\.jpg.*item 3, image id 'junk'"):
        ds[3]
    with pytest.raises(CorruptImageError, match=r"junk\.jpg"):
        ds.annotation(3)  # the header read fails too, with the same kind of error
    assert isinstance(info.value, ValueError)  # the CLI reports ValueErrors without traceback


def test_skip_corrupt_leaves_unreadable_images_out_with_a_warning(faulty_root):
    with pytest.warns(UserWarning) as record:
        ds = VOCLayoutDetection(faulty_root, "train", CLASSES, image_size=32, skip_corrupt=True)
    messages = [str(w.message) for w in record]
    assert len(messages) == 2
    assert "trunc.jpg" in messages[0] and "image id 'trunc' left out" in messages[0]
    assert "junk.jpg" in messages[1] and "image id 'junk' left out" in messages[1]
    assert ds.image_ids == ["ok0", "ok1", "ok2"] and len(ds) == 3
    assert ds.skipped_ids == ["trunc", "junk"]
    plain = VOCLayoutDetection(faulty_root, "train", CLASSES, image_size=32)
    for index, image_id in enumerate(ds.image_ids):  # an index never returns another image
        path, image, gt = ds[index]
        reference = plain[plain.image_ids.index(image_id)]
        assert path == reference[0] and torch.equal(image, reference[1])
        assert torch.equal(gt, reference[2])


def test_unreadable_image_without_size_fails_at_construction(tmp_path):
    """With no <size> in the XML the header is read while parsing: same error, same skip."""
    root = write_dataset(tmp_path / "ns", {}, {"val": ["x", "y"]})
    (root / "JPEGImages" / "x.jpg").write_bytes(b"\xff\xd8 garbage")
    write_xml(root / "Annotations" / "x.xml", "x.jpg", None, [("cat", (0, 0, 5, 5), 0)])
    noise_image(20, 20).save(root / "JPEGImages" / "y.jpg")
    write_xml(root / "Annotations" / "y.xml", "y.jpg", None, [("cat", (0, 0, 5, 5), 0)])
    with pytest.raises(CorruptImageError, match=r"Cannot decode image .*x\.jpg"):
        VOCLayoutDetection(root, "val", CLASSES)
    with pytest.warns(UserWarning, match=r"x\.jpg.*image id 'x' left out"):
        ds = VOCLayoutDetection(root, "val", CLASSES, skip_corrupt=True)
    assert ds.image_ids == ["y"]


def test_read_rgb_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_rgb_image(tmp_path / "absent.jpg")
    data = jpeg_bytes(80, 80)
    (tmp_path / "cut.jpg").write_bytes(data[:300])
    for reduced in (False, True):  # the 1/8-scale check still reads every byte
        with pytest.raises(CorruptImageError, match=r"(?i)cut\.jpg: .*truncated"):
            read_rgb_image(tmp_path / "cut.jpg", reduced=reduced)
    (tmp_path / "whole.jpg").write_bytes(data)
    assert read_rgb_image(tmp_path / "whole.jpg", reduced=True).size == (10, 10)
    assert read_rgb_image(tmp_path / "whole.jpg").size == (80, 80)


# ---- image modes -------------------------------------------------------------------------------


def test_every_image_mode_decodes_to_the_expected_rgb(tmp_path):
    rgb = np.asarray(noise_image(24, 16, seed=3))
    gray = np.asarray(noise_image(24, 16, "L", seed=3))
    wide = np.random.default_rng(0).integers(0, 65536, size=(16, 24)).astype(np.uint16)
    expected_wide = np.rint(wide / 257.0).astype(np.uint8)
    cases = {
        "gray.png": (Image.fromarray(gray), np.repeat(gray[..., None], 3, axis=2)),
        "gray.jpg": (Image.fromarray(gray), None),
        "pal.png": (Image.fromarray(rgb).convert("P"), None),
        "rgba.png": (Image.fromarray(rgb).convert("RGBA"), rgb),  # alpha dropped
        "la.png": (Image.fromarray(gray).convert("LA"), np.repeat(gray[..., None], 3, axis=2)),
        "bits.png": (Image.fromarray(gray).convert("1"), None),
        "cmyk.jpg": (Image.fromarray(rgb).convert("CMYK"), None),
        "wide.png": (Image.fromarray(wide), np.repeat(expected_wide[..., None], 3, axis=2)),
    }
    pal_t = Image.fromarray(rgb).convert("P")
    pal_t.info["transparency"] = 0
    cases["pal_t.png"] = (pal_t, None)
    for name, (image, expected) in cases.items():
        image.save(tmp_path / name)
        with Image.open(tmp_path / name) as reopened:
            mode = reopened.mode
            pil_rgb = np.asarray(reopened.convert("RGB"))
        decoded = read_rgb_image(tmp_path / name)
        array = np.asarray(decoded)
        assert decoded.mode == "RGB" and array.shape == (16, 24, 3), name
        if expected is None:  # PIL's own conversion is right for these modes
            expected = pil_rgb
        np.testing.assert_array_equal(array, expected, err_msg=f"{name} ({mode})")
    # The case to_rgb exists for: PIL alone turns 16-bit grayscale almost white.
    with Image.open(tmp_path / "wide.png") as reopened:
        assert reopened.mode.startswith("I")
        assert np.asarray(reopened.convert("RGB")).mean() > 240
        assert abs(np.asarray(to_rgb(reopened)).mean() - expected_wide.mean()) < 1e-9


def test_sixteen_bit_png_item_is_normalised_correctly(tmp_path):
    wide = np.full((40, 40), 257 * 128, dtype=np.uint16)  # 16-bit mid grey
    root = write_dataset(tmp_path / "w", {}, {"val": ["w"]})
    Image.fromarray(wide).save(root / "JPEGImages" / "w.png")
    write_xml(root / "Annotations" / "w.xml", "w.png", (40, 40), [("cat", (0, 0, 20, 20), 0)])
    _, image, gt = VOCLayoutDetection(root, "val", CLASSES, image_size=40)[0]
    expected = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(image[:, 0, 0], expected)
    assert torch.equal(valid_rows(gt), torch.tensor([[0.0, 0, 20, 20, 0]]))


# ---- missing files -----------------------------------------------------------------------------


def test_split_listing_unknown_ids_names_them_all_at_once(tmp_path):
    images = {"a": (noise_image(30, 30), ".jpg", [("cat", (0, 0, 9, 9), 0)]),
              "b": (noise_image(30, 30), ".jpg", [("cat", (0, 0, 9, 9), 0)])}  # fmt: skip
    ids = ["a", *[f"ghost{i}" for i in range(7)], "b"]
    root = write_dataset(tmp_path / "u", images, {"train": ids})
    (root / "JPEGImages" / "b.jpg").unlink()
    with pytest.raises(FileNotFoundError) as info:
        VOCLayoutDetection(root, "train", CLASSES)
    message = str(info.value)
    assert message.startswith(f"8 of 9 image ids listed in {root / 'ImageSets/Main/train.txt'}")
    for i in range(5):
        assert str(root / "Annotations" / f"ghost{i}.xml") in message
    assert "ghost5" not in message and "... and 3 more" in message
    only_image = write_dataset(tmp_path / "v", images, {"train": ["a", "b"]})
    (only_image / "JPEGImages" / "b.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 2 image ids[\s\S]*b\.xml[\s\S]*b\.jpg"):
        VOCLayoutDetection(only_image, "train", CLASSES)


def test_malformed_xml_and_bndbox_name_the_file(tmp_path):
    root = write_dataset(tmp_path / "m", {"a": (noise_image(30, 30), ".jpg", [])},
                         {"train": ["a"]})  # fmt: skip
    xml = root / "Annotations" / "a.xml"
    xml.write_text("<annotation><filename>a.jpg</filename>")
    with pytest.raises(ValueError, match=r"Cannot parse annotation file .*a\.xml"):
        VOCLayoutDetection(root, "train", CLASSES)
    bad_box = "<bndbox><xmin>1</xmin><ymin>x</ymin></bndbox>"
    xml.write_text(f"<annotation><object><name>cat</name>{bad_box}</object></annotation>")
    with pytest.raises(ValueError, match=r"Malformed <bndbox> for object 0 in .*a\.xml"):
        VOCLayoutDetection(root, "train", CLASSES)


# ---- boxes -------------------------------------------------------------------------------------


def test_dropped_boxes_are_named_with_their_coordinates(tmp_path):
    objects = [
        ("cat", (-20, -10, 250, 300), 0),  # covers more than the image: clipped to all of it
        ("dog", (30, 30, 30, 30), 0),  # zero size
        ("car", (50, 40, 20, 10), 0),  # inverted
        ("cat", (300, 10, 400, 20), 0),  # right of the 200 px wide image: zero after clipping
        ("dog", ("nan", 1, 5, 5), 0),  # not a number
    ]
    root = write_dataset(tmp_path / "d", {"a": (noise_image(200, 100), ".jpg", objects)},
                         {"val": ["a"]})  # fmt: skip
    with pytest.warns(UserWarning) as record:
        ds = VOCLayoutDetection(root, "val", CLASSES, image_size=100)
    (message,) = [str(w.message) for w in record]
    assert message.startswith(f"{root / 'Annotations' / 'a.xml'}: dropped 4 box(es)")
    assert "200x100 image" in message
    for detail in (
        "object 1 'dog' (30, 30, 30, 30)",
        "object 2 'car' (50, 40, 20, 10)",
        "object 3 'cat' (300, 10, 400, 20)",
        "object 4 'dog' (nan, 1, 5, 5)",
    ):
        assert detail in message  # fmt: skip
    torch.testing.assert_close(valid_rows(ds[0][2]), torch.tensor([[0.0, 0, 200, 100, 0]]))


def test_images_without_objects_give_all_padding_targets(tmp_path):
    images = {
        "none": (noise_image(50, 40), ".jpg", []),  # no <object> at all
        "cropped": (noise_image(200, 50), ".jpg", [("cat", (0, 0, 40, 50), 0)]),  # crop loses it
    }
    root = write_dataset(tmp_path / "e", images, {"train": list(images)})
    ds = VOCLayoutDetection(root, "train", CLASSES, image_size=50, max_boxes=4)
    for index in range(2):
        _, image, gt = ds[index]
        assert image.shape == (3, 50, 50) and gt.shape == (4, 5) and (gt == -1).all()
    assert ds.annotation(0)["boxes"].shape == (0, 4)
    skipping = VOCLayoutDetection(root, "train", CLASSES, skip_empty=True)
    assert skipping.image_ids == ["cropped"]  # only images empty in the file are left out


# ---- tiny and elongated images -----------------------------------------------------------------


def test_tiny_and_elongated_images_keep_their_boxes(tmp_path):
    images = {
        "wide": (noise_image(256, 64), ".jpg", [("cat", (100, 8, 140, 40), 0)]),  # 4:1
        "tall": (noise_image(64, 256), ".png", [("dog", (8, 100, 40, 140), 0)]),  # 1:4
        "tiny": (noise_image(8, 8), ".png", [("car", (2, 2, 6, 6), 0)]),  # upscaled 4x
    }
    root = write_dataset(tmp_path / "t", images, {"train": list(images)})
    train = VOCLayoutDetection(root, "train", CLASSES, image_size=32)
    val = VOCLayoutDetection(root, "train", CLASSES, image_size=32, train_transform=False)
    # Scale 0.5 (4x for tiny); the train crop of the 128 px long side starts at 48.
    expected_train = {"wide": [2, 4, 22, 20, 0], "tall": [4, 2, 20, 22, 1],
                      "tiny": [8, 8, 24, 24, 2]}  # fmt: skip
    expected_val = {"wide": ((32, 128), [50, 4, 70, 20, 0]),
                    "tall": ((128, 32), [4, 50, 20, 70, 1]),
                    "tiny": ((32, 32), [8, 8, 24, 24, 2])}  # fmt: skip
    for index, image_id in enumerate(train.image_ids):
        _, image, gt = train[index]
        assert image.shape == (3, 32, 32)
        assert valid_rows(gt).tolist() == [expected_train[image_id]], image_id
        _, image, gt = val[index]
        size, row = expected_val[image_id]
        assert tuple(image.shape[1:]) == size and valid_rows(gt).tolist() == [row], image_id
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing about these images deserves a warning
        train[0]


def test_cli_skip_corrupt_flag(faulty_root):
    import detector_cli
    import recipe

    args = detector_cli.build_parser().parse_args(
        ["train", "--dataset", str(faulty_root), "--classes", "cat,dog,car", "--image-size",
         "32", "--train-split", "train", "--val-split", "train", "--skip-corrupt"]
    )  # fmt: skip
    settings = detector_cli.settings_from_args(args)
    with pytest.warns(UserWarning, match="left out"):
        train, val, classes = recipe.make_datasets(settings)
    assert train.image_ids == val.image_ids == ["ok0", "ok1", "ok2"]
    assert classes == ["cat", "dog", "car"]
    train, _, _ = recipe.make_datasets(settings.replace(skip_corrupt=False))
    assert len(train) == 5
