"""VOC-layout reader, generated shapes data and BCCD loading."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from support import SHARED, noise_image, write_dataset, write_xml

import a4_helper
from a4_helper import (
    BCCD_CLASSES,
    SHAPES_CLASSES,
    VOC_CLASSES,
    ShapesDetection,
    VOCLayoutDetection,
    make_shapes_dataset,
)
from eecs598.inference import annotation_lookup
from eecs598.voc import ImageAnnotation, held_out_split, voc_folders, voc_image_ids

CLASSES = ("cat", "dog", "car")

# Landscape 200x100 image, short side -> 50: resized to 100x50; train crop left = 25.
LANDSCAPE_OBJECTS = [
    ("cat", (10, 20, 60, 80), 0),  # train: (-20,10,5,40) -> clipped (0,10,5,40)
    ("dog", (150, 10, 190, 90), 0),  # train: x in [50,70] -> width 0 after clip: dropped
    ("car", (100, 0, 120, 100), 0),  # train: (25,0,35,50)
    ("cat", (40, 0, 51, 100), 0),  # train: x in [-5,0.5] -> 0.5 px left: dropped
    ("dog", (60, 20, 140, 80), 1),  # difficult: never in gt_boxes
]


@pytest.fixture()
def voc_root(tmp_path):
    images = {
        "land": (noise_image(200, 100), ".jpg", LANDSCAPE_OBJECTS),
        # Portrait 60x120 -> 50x100, train crop top = 25. Grayscale PNG.
        "port": (noise_image(60, 120, "L"), ".png", [("dog", (0, 0, 60, 120), 0)]),
        "pal": (noise_image(80, 80, "P", seed=1), ".png", [("car", (8, 8, 40, 40), 0)]),
        "cmyk": (noise_image(80, 80, "CMYK", seed=2), ".jpg", [("cat", (0, 0, 80, 80), 0)]),
        "onlydiff": (noise_image(80, 80), ".jpg", [("cat", (0, 0, 40, 40), 1)]),
        "many": (
            noise_image(100, 100),
            ".jpg",
            [("cat", (0, 0, 10 + 10 * k, 10 + 10 * k), 0) for k in (2, 0, 4, 1, 3)],
        ),
    }
    splits = {"train": list(images), "val": list(images)}
    return write_dataset(tmp_path / "voc", images, splits)


def valid_rows(gt_boxes: torch.Tensor) -> torch.Tensor:
    return gt_boxes[gt_boxes[:, 4] >= 0]


def test_hello(capsys):
    a4_helper.hello_helper()
    assert capsys.readouterr().out.strip() == "Hello from a4_helper.py!"


def test_train_item_scaling_cropping_and_padding(voc_root):
    ds = VOCLayoutDetection(voc_root, "train", CLASSES, image_size=50, max_boxes=6)
    assert ds.train_transform and len(ds) == 6
    assert ds.class_to_idx == {"cat": 0, "dog": 1, "car": 2}
    assert ds.idx_to_class == {0: "cat", 1: "dog", 2: "car"}
    path, image, gt = ds[ds.image_ids.index("land")]
    assert path.endswith("land.jpg")
    assert image.shape == (3, 50, 50) and image.dtype == torch.float32
    assert gt.shape == (6, 5)
    expected = torch.tensor([[0, 10, 5, 40, 0], [25, 0, 35, 50, 2]], dtype=torch.float32)
    torch.testing.assert_close(gt[:2], expected)
    assert (gt[2:] == -1).all()

    _, image, gt = ds[ds.image_ids.index("port")]
    assert image.shape == (3, 50, 50)
    torch.testing.assert_close(valid_rows(gt), torch.tensor([[0.0, 0, 50, 50, 1]]))


def test_val_items_are_resized_not_cropped(voc_root):
    ds = VOCLayoutDetection(voc_root, "val", CLASSES, image_size=50, max_boxes=6)
    assert not ds.train_transform
    _, image, gt = ds[ds.image_ids.index("land")]
    assert image.shape == (3, 50, 100)
    expected = torch.tensor(
        [[5, 10, 30, 40, 0], [75, 5, 95, 45, 1], [50, 0, 60, 50, 2], [20, 0, 25.5, 50, 0]]
    )
    torch.testing.assert_close(valid_rows(gt), expected)
    _, image, gt = ds[ds.image_ids.index("port")]
    assert image.shape == (3, 100, 50)
    torch.testing.assert_close(valid_rows(gt), torch.tensor([[0.0, 0, 50, 100, 1]]))


def test_difficult_objects_kept_for_evaluation_only(voc_root):
    ds = VOCLayoutDetection(voc_root, "val", CLASSES, image_size=50, max_boxes=6)
    index = ds.image_ids.index("land")
    ann = ds.annotation(index)
    assert ann["difficult"].tolist() == [False] * 4 + [True]
    torch.testing.assert_close(ann["boxes"][4], torch.tensor([30.0, 10, 70, 40]))
    assert ann["classes"].tolist() == [0, 1, 2, 0, 1]
    assert ds.annotation_for_path(ds[index][0])["image_id"] == "land"
    # Same lookup through a Subset, as inference_with_detector does it.
    subset = torch.utils.data.Subset(ds, [index])
    assert annotation_lookup(subset) == ds.annotation_for_path

    # Train geometry: the difficult box (5,10,45,40) survives the crop, the two others do not.
    train = VOCLayoutDetection(voc_root, "train", CLASSES, image_size=50, max_boxes=6)
    ann = train.annotation(train.image_ids.index("land"))
    assert ann["difficult"].tolist() == [False, False, True]

    # An image whose only object is difficult: all-padding targets, or skipped on request.
    _, _, gt = ds[ds.image_ids.index("onlydiff")]
    assert (gt == -1).all()
    skipping = VOCLayoutDetection(voc_root, "val", CLASSES, image_size=50, skip_empty=True)
    assert "onlydiff" not in skipping.image_ids and len(skipping) == 5


def test_more_objects_than_max_boxes_keeps_largest_and_warns_once(voc_root):
    ds = VOCLayoutDetection(voc_root, "val", CLASSES, image_size=100, max_boxes=3)
    index = ds.image_ids.index("many")
    with pytest.warns(UserWarning, match="many.jpg.*keeping the 3 largest"):
        _, _, gt = ds[index]
    # Sides 30, 10, 50, 20, 40: keep 30, 50, 40 in file order.
    assert gt[:, 2].tolist() == [30.0, 50.0, 40.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds[index]  # no second warning for the same file


def test_image_modes_decode_to_rgb(voc_root):
    ds = VOCLayoutDetection(voc_root, "val", CLASSES, image_size=40)
    for image_id in ("port", "pal", "cmyk"):
        _, image, _ = ds[ds.image_ids.index(image_id)]
        assert image.shape[0] == 3 and torch.isfinite(image).all()


def test_normalisation_round_trip(voc_root):
    ds = VOCLayoutDetection(voc_root, "val", CLASSES, image_size=80)
    _, image, _ = ds[ds.image_ids.index("pal")]
    restored = a4_helper.unnormalize_image(image)
    assert restored.min() >= 0 and restored.max() <= 1
    assert image.mean().abs() < 2.0  # normalised, not raw [0, 1] or [0, 255]


def test_odd_boxes_clipped_or_dropped_with_warning(tmp_path):
    objects = [
        ("cat", (-5, 10, 250, 60), 0),  # beyond the image: clipped
        ("dog", (30, 30, 30, 30), 0),  # zero size: dropped
        ("car", (50, 40, 20, 10), 0),  # inverted: dropped
    ]
    root = write_dataset(tmp_path / "odd", {"a": (noise_image(200, 100), ".jpg", objects)},
                         {"val": ["a"]})  # fmt: skip
    with pytest.warns(UserWarning, match=r"a\.xml: dropped 2 box"):
        ds = VOCLayoutDetection(root, "val", CLASSES, image_size=100)
    torch.testing.assert_close(valid_rows(ds[0][2]), torch.tensor([[0.0, 10, 200, 60, 0]]))


def test_clear_errors(voc_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*download"):
        VOCLayoutDetection(tmp_path / "nope", "train", CLASSES, how_to_get="Run download.")
    with pytest.raises(FileNotFoundError, match=r"test\.txt not found.*'train', 'val'"):
        VOCLayoutDetection(voc_root, "test", CLASSES)
    with pytest.raises(ValueError, match="Class .dog. in .*land.xml is not in the class list"):
        VOCLayoutDetection(voc_root, "train", ("cat", "car"))
    (voc_root / "JPEGImages" / "pal.png").unlink()
    with pytest.raises(FileNotFoundError, match="pal.png"):
        VOCLayoutDetection(voc_root, "train", CLASSES)
    (voc_root / "Annotations" / "port.xml").unlink()
    with pytest.raises(FileNotFoundError, match="port.xml"):
        VOCLayoutDetection(voc_root, "train", CLASSES)


def test_missing_size_reads_image_header(tmp_path):
    root = write_dataset(tmp_path / "ns", {}, {"val": ["x"]})
    noise_image(64, 32).save(root / "JPEGImages" / "x.jpg")
    write_xml(root / "Annotations" / "x.xml", "x.jpg", None, [("cat", (0, 0, 100, 16), 0)])
    ds = VOCLayoutDetection(root, "val", CLASSES, image_size=16)
    torch.testing.assert_close(valid_rows(ds[0][2]), torch.tensor([[0.0, 0, 32, 8, 0]]))


def test_dataset_pickles_and_works_with_worker_loader(voc_root):
    ds = VOCLayoutDetection(voc_root, "train", CLASSES, image_size=32, max_boxes=8)
    clone = pickle.loads(pickle.dumps(ds))
    torch.testing.assert_close(clone[1][1], ds[1][1])
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=1)
    paths, images, gt = next(iter(loader))
    assert len(paths) == 3 and images.shape == (3, 3, 32, 32) and gt.shape == (3, 8, 5)


def test_shapes_dataset_deterministic_and_cached(tmp_path):
    root = make_shapes_dataset(tmp_path / "s1", num_train=12, num_val=4, image_size=64, seed=3)
    again = make_shapes_dataset(tmp_path / "s2", num_train=12, num_val=4, image_size=64, seed=3)
    for sub in ("JPEGImages/000005.jpg", "Annotations/000013.xml"):
        assert (root / sub).read_bytes() == (again / sub).read_bytes()
    stamp_time = (root / "shapes_settings.json").stat().st_mtime_ns
    make_shapes_dataset(root, num_train=12, num_val=4, image_size=64, seed=3)
    assert (root / "shapes_settings.json").stat().st_mtime_ns == stamp_time  # not regenerated
    make_shapes_dataset(root, num_train=12, num_val=4, image_size=64, seed=4)  # new settings
    assert (root / "JPEGImages/000005.jpg").read_bytes() != (again / "JPEGImages/000005.jpg")\
        .read_bytes()  # fmt: skip
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError):
        make_shapes_dataset(tmp_path / "other")


def test_shapes_dataset_content(tmp_path):
    root = make_shapes_dataset(tmp_path / "s", num_train=150, num_val=50, image_size=128)
    train = VOCLayoutDetection(root, "train", SHAPES_CLASSES, image_size=96)
    val = ShapesDetection(root, "val", image_size=96, generate={"num_train": 150, "num_val": 50})
    trainval = VOCLayoutDetection(root, "trainval", SHAPES_CLASSES)
    assert (len(train), len(val), len(trainval)) == (150, 50, 200)
    boxes = np.concatenate([r.boxes for r in train.records])
    difficult = np.concatenate([r.difficult for r in train.records])
    classes = np.concatenate([r.classes for r in train.records])
    sides = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    assert sides.min() < 16 and sides.max() > 80  # small to most of the image
    assert 0 < difficult.mean() < 0.2  # a few difficult objects
    assert set(classes.tolist()) == set(range(len(SHAPES_CLASSES)))
    assert ((boxes[:, 0] == 0) | (boxes[:, 1] == 0)).any()  # some touch the border
    assert all((~r.difficult).any() for r in train.records)  # every image has a usable object
    assert {tuple(val[i][1].shape[1:]) for i in range(len(val))} > {(96, 96)}  # uncropped sizes


@pytest.mark.skipif(not (SHARED / "datasets" / "bccd").is_dir(), reason="shared BCCD data absent")
def test_bccd_loads_with_the_same_reader():
    root = SHARED / "datasets" / "bccd"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # two zero-size boxes in the upstream XMLs
        train = VOCLayoutDetection(root, "train", BCCD_CLASSES, image_size=224)
        val = VOCLayoutDetection(root, "val", BCCD_CLASSES, image_size=224)
    assert (len(train), len(val)) == (205, 87)
    path, image, gt = train[0]
    assert image.shape == (3, 224, 224) and path.endswith(".jpg")
    rows = valid_rows(gt)
    assert len(rows) > 0 and rows[:, :4].min() >= 0 and rows[:, :4].max() <= 224
    _, image, gt = val[0]
    assert image.shape == (3, 224, 299)  # 640x480 -> 298.7 rounded: nothing cropped
    assert set(train.idx_to_class.values()) == {"RBC", "WBC", "Platelets"}


def test_voc_classes_are_the_twenty_alphabetical():
    assert len(VOC_CLASSES) == 20 and list(VOC_CLASSES) == sorted(VOC_CLASSES)


# ---- exports without ImageSets, and the held-out split ----------------------------------------


def _records(classes_per_image: dict[str, list[int]]) -> list[ImageAnnotation]:
    return [
        ImageAnnotation(
            image_id,
            f"{image_id}.jpg",
            10,
            10,
            np.zeros((len(cs), 4), np.float32),
            np.array(cs, np.int64),
            np.zeros(len(cs), bool),
        )  # fmt: skip
        for image_id, cs in classes_per_image.items()
    ]


def test_held_out_split_is_seeded_covers_classes_and_keeps_singletons():
    # 40 images of class 0, class 1 in 3 of them, class 2 in 2, class 3 in one only.
    shown = {f"{i:02d}": [0] for i in range(40)}
    shown |= {"05": [0, 1], "17": [1], "33": [1], "08": [2], "21": [2, 0], "30": [3]}
    records = _records(shown)
    train, val = held_out_split(records, 0.1, seed=0)
    assert (train, val) == held_out_split(records, 0.1, seed=0)  # deterministic
    assert held_out_split(records, 0.1, seed=1) != (train, val)
    assert len(val) == 4 and sorted(train + val) == sorted(shown)  # round(0.1 * 40), disjoint
    assert train == sorted(train) and val == sorted(val)  # the records' order
    val_classes = {c for i in val for c in shown[i]}
    assert {0, 1, 2} <= val_classes and "30" in train  # a class of one image stays in training
    # Tiny data: one image each way; a single image cannot be split.
    assert sorted(map(len, held_out_split(_records({"a": [0], "b": [0]})))) == [1, 1]
    with pytest.raises(ValueError, match="cannot hold out a val part from 1 image"):
        held_out_split(_records({"a": [0]}))


def _side_by_side(root: Path, count: int) -> Path:
    """Roboflow's "Pascal VOC" export: <id>.jpg beside <id>.xml, no ImageSets."""
    root.mkdir(parents=True)
    for i in range(count):
        image = noise_image(40, 30, seed=i)
        image.save(root / f"img{i}.jpg")
        name = ("cat", "dog")[i % 2]
        write_xml(root / f"img{i}.xml", f"img{i}.jpg", image.size, [(name, (2, 3, 20, 25), 0)])
    return root


def test_side_by_side_folder_and_subset(tmp_path):
    root = _side_by_side(tmp_path / "train", 5)
    assert voc_folders(root) == (root, root)
    assert voc_image_ids(root) == [f"img{i}" for i in range(5)]
    data = VOCLayoutDetection(root, "train", ("cat", "dog"), image_size=32,
                              image_ids=voc_image_ids(root))  # fmt: skip
    assert len(data) == 5 and data.records[1].classes.tolist() == [1]
    assert data.annotation(0)["file_name"] == "img0.jpg"
    part = data.subset(["img3", "img1"], "val (held out)")
    assert part.image_ids == ["img1", "img3"] and part.split == "val (held out)"
    assert part[0][0] == data[1][0] and torch.equal(part[1][2], data[3][2])
    assert part.annotation_for_path(data.records[3].image_path)["image_id"] == "img3"
    assert len(data) == 5  # the original is unchanged
    with pytest.raises(KeyError, match="not images of 'train': img9"):
        data.subset(["img9"], "x")
    with pytest.raises(FileNotFoundError, match="is not a VOC-layout folder"):
        voc_folders(tmp_path)
