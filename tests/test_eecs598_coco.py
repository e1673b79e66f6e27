"""The COCO-format reader (eecs598.coco) on COCO JSON that these tests write from the
generated shapes data: same items and batches as the VOC-layout reader, crowd objects as
ignore regions, faulty files, and the CLI and export on it."""

from __future__ import annotations

import contextlib
import io
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

import detector_cli
import recipe
from eecs598.coco import COCODetection
from eecs598.images import CorruptImageError
from eecs598.inference import inference_with_detector
from eecs598.settings import OWN_DATA
from eecs598.shapes import SHAPES_CLASSES, make_shapes_dataset
from eecs598.voc import VOCLayoutDetection

# Category ids that are neither 1..K nor in name order, listed in neither order.
CATEGORY_IDS = {name: 10 * (k + 3) for k, name in enumerate(reversed(SHAPES_CLASSES))}


def write_coco_json(root: Path, split: str, path: Path) -> dict:
    """The VOC-layout split ``root/ImageSets/Main/<split>.txt`` as a COCO instances file,
    straight from the XML (difficult -> iscrowd), with image ids 100, 101, ..."""
    ids = (root / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
    data = {"images": [], "annotations": [], "categories": []}
    for name in sorted(SHAPES_CLASSES, key=lambda n: -CATEGORY_IDS[n]):
        data["categories"].append({"id": CATEGORY_IDS[name], "name": name, "supercategory": ""})
    for k, stem in enumerate(ids):
        xml = ET.parse(root / "Annotations" / f"{stem}.xml").getroot()
        size = xml.find("size")
        data["images"].append({
            "id": 100 + k, "file_name": xml.findtext("filename"),
            "width": int(size.findtext("width")), "height": int(size.findtext("height")),
        })  # fmt: skip
        for obj in xml.iter("object"):
            x1, y1, x2, y2 = (float(obj.find("bndbox").findtext(t))
                              for t in ("xmin", "ymin", "xmax", "ymax"))  # fmt: skip
            data["annotations"].append({
                "id": 5000 + len(data["annotations"]), "image_id": 100 + k,
                "category_id": CATEGORY_IDS[obj.findtext("name")],
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                "iscrowd": int(obj.findtext("difficult")),
            })  # fmt: skip
    path.write_text(json.dumps(data))
    return data


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """``(root, train.json, val.json)``: 24 + 8 generated images and their COCO files."""
    base = tmp_path_factory.mktemp("coco")
    root = make_shapes_dataset(base / "shapes", num_train=24, num_val=8, image_size=64, seed=3)
    train_json, val_json = base / "train.json", base / "val.json"
    write_coco_json(root, "train", train_json)
    write_coco_json(root, "val", val_json)
    return root, train_json, val_json


def test_same_items_as_the_voc_reader(shapes):
    root, train_json, val_json = shapes
    for split, path, train in (("train", train_json, True), ("val", val_json, False)):
        voc = VOCLayoutDetection(root, split, SHAPES_CLASSES, image_size=48)
        coco = COCODetection(path, root / "JPEGImages", SHAPES_CLASSES, 48, train_transform=train)
        assert len(coco) == len(voc) and coco.image_ids == voc.image_ids
        assert coco.category_ids == {CATEGORY_IDS[n]: i for i, n in enumerate(SHAPES_CLASSES)}
        crowd = 0
        for i in range(len(voc)):
            (vp, vi, vb), (cp, ci, cb) = voc[i], coco[i]
            assert vp == cp and torch.equal(vi, ci) and torch.equal(vb, cb)
            va, ca = voc.annotation(i), coco.annotation(i)
            assert va.keys() == ca.keys()
            for key, value in va.items():
                same = torch.equal(value, ca[key]) if torch.is_tensor(value) else value == ca[key]
                assert same, (i, key)
            crowd += int(ca["difficult"].sum())
        if split == "train":
            assert crowd > 0  # the data has difficult objects: iscrowd is exercised


def test_training_batches_are_the_voc_readers(shapes):
    root, train_json, _ = shapes
    voc = VOCLayoutDetection(root, "train", SHAPES_CLASSES, image_size=48)
    coco = COCODetection(train_json, root / "JPEGImages", None, 48, train_transform=True)
    assert coco.class_names == tuple(sorted(SHAPES_CLASSES))  # class_names=None: sorted names
    coco = COCODetection(train_json, root / "JPEGImages", SHAPES_CLASSES, 48, train_transform=True)
    settings = OWN_DATA.replace(batch_size=4, workers=0, seed=5, photometric=True, train_crop=0)
    batches = [recipe.train_loader(settings, ds, (40, 48)) for ds in (voc, coco)]
    for sampler_epoch in range(2):
        for loader in batches:
            loader.batch_sampler.set_epoch(sampler_epoch)
        n = 0
        for (vp, vi, vb, vs), (cp, ci, cb, cs) in zip(*batches, strict=True):
            assert list(vp) == list(cp) and torch.equal(vi, ci) and torch.equal(vb, cb)
            assert torch.equal(vs, cs)
            n += 1
        assert n == len(voc) // 4


def test_a_category_without_annotations_is_left_out_and_named(shapes, tmp_path):
    """A Roboflow export lists its supercategory (id 0, no boxes) as a category: it is not a
    class to learn, and an AP of 0 for it would pull the mean down."""
    root, train_json, _ = shapes
    data = json.loads(train_json.read_text())
    data["categories"].insert(0, {"id": 0, "name": "creatures", "supercategory": "none"})
    path = tmp_path / "roboflow.json"
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="left out the category without any annotation, "
                      "'creatures' \\(pass class_names to keep them\\)"):  # fmt: skip
        coco = COCODetection(path, root / "JPEGImages")
    assert coco.class_names == tuple(sorted(SHAPES_CLASSES))
    kept = COCODetection(path, root / "JPEGImages", ["creatures", *SHAPES_CLASSES])
    assert kept.class_names[0] == "creatures"


def test_crowd_objects_are_ignore_regions_never_targets(tmp_path):
    Image.new("RGB", (40, 30), (90, 90, 90)).save(tmp_path / "a.png")
    data = {
        "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
        "categories": [{"id": 7, "name": "cat"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 3, 10, 8], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [20, 5, 15, 20], "iscrowd": 1},
        ],
    }
    (tmp_path / "i.json").write_text(json.dumps(data))
    ds = COCODetection(tmp_path / "i.json", image_size=30)
    _, image, gt = ds[0]
    assert image.shape == (3, 30, 40)
    assert gt[0].tolist() == [2.0, 3.0, 12.0, 11.0, 0.0] and (gt[1:] == -1).all()
    ann = ds.annotation(0)
    assert ann["boxes"].tolist() == [[2.0, 3.0, 12.0, 11.0], [20.0, 5.0, 35.0, 25.0]]
    assert ann["difficult"].tolist() == [False, True]
    assert ann["file_name"] == "a.png" and (ann["width"], ann["height"]) == (40, 30)
    only_crowd = COCODetection(tmp_path / "i.json", skip_empty=True)
    assert len(only_crowd) == 1
    data["annotations"] = data["annotations"][1:]
    (tmp_path / "i.json").write_text(json.dumps(data))
    assert len(COCODetection(tmp_path / "i.json", skip_empty=True)) == 0


def _faulty(tmp_path: Path, change) -> Path:
    """A valid two-image file with ``change(data)`` applied; returns its path."""
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (32, 24)).save(tmp_path / name)
    data = {
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        "annotations": [
            {"id": 11, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]},
            {"id": 12, "image_id": 2, "category_id": 2, "bbox": [2, 2, 6, 6]},
        ],
    }
    change(data)
    path = tmp_path / "faulty.json"
    path.write_text(json.dumps(data) if isinstance(data, dict) else data)
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("annotations"), r"faulty\.json: key 'annotations' must be a list"),
        (lambda d: d["annotations"][1].pop("bbox"),
         r"faulty\.json: annotations\[1\] \(id 12\) has no 'bbox' key"),
        (lambda d: d["images"][0].pop("file_name"),
         r"faulty\.json: images\[0\] \(id 1\) has no 'file_name' key"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]),
         r"annotations\[0\] \(id 11\): 'bbox' must be 4 numbers"),
        (lambda d: d["annotations"][0].update(category_id=99),
         r"annotations\[0\] \(id 11\): category_id 99 is not in 'categories'"),
        (lambda d: d["annotations"][0].update(image_id=5),
         r"annotations\[0\] \(id 11\): image_id 5 is not in 'images'"),
        (lambda d: d["annotations"][1].update(id=11), r"annotations\[1\] \(id 11\): id repeats"),
        (lambda d: d["images"][1].update(file_name="sub/a.jpg"), r"stem 'a' repeats image id 1"),
    ],
)  # fmt: skip
def test_malformed_files_name_the_file_the_record_and_the_key(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        COCODetection(_faulty(tmp_path, change))


def test_not_json_unknown_class_and_missing_files(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [}')
    with pytest.raises(ValueError, match=r"broken\.json: not a valid JSON file .*line 1 column"):
        COCODetection(path)
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        COCODetection(tmp_path / "nothing.json")
    with pytest.raises(ValueError, match=r"Class 'dog' of .*annotations\[1\] \(id 12\) is not"):
        COCODetection(_faulty(tmp_path, lambda d: None), class_names=["cat"])
    (tmp_path / "a.jpg").unlink()
    (tmp_path / "b.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"2 of 2 image ids listed in .*faulty\.json"):
        COCODetection(tmp_path / "faulty.json")


def test_nan_and_degenerate_boxes_are_dropped_with_a_warning_naming_them(tmp_path):
    def change(data):
        data["annotations"] += [
            {"id": 13, "image_id": 1, "category_id": 1, "bbox": [float("nan"), 1, 5, 5]},
            {"id": 14, "image_id": 1, "category_id": 2, "bbox": [4, 4, 0, 3]},
            {"id": 15, "image_id": 1, "category_id": 2, "bbox": [10, 10, -4, 3]},
        ]

    path = _faulty(tmp_path, change)
    with pytest.warns(UserWarning) as record:
        ds = COCODetection(path)
    (warning,) = [w for w in record if "dropped" in str(w.message)]
    text = str(warning.message)
    assert "faulty.json: image id 1: dropped 3 box(es)" in text
    assert "annotation id 13 bbox [nan, 1, 5, 5]" in text
    assert "annotation id 14" in text and "annotation id 15" in text
    assert ds.records[0].boxes.tolist() == [[1.0, 1.0, 6.0, 6.0]]  # the file's pixels


def test_corrupt_image_named_or_left_out_with_skip_corrupt(tmp_path):
    path = _faulty(tmp_path, lambda d: None)
    (tmp_path / "b.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(CorruptImageError, match=r"Cannot decode image .*b\.jpg"):
        COCODetection(path)  # no width/height in the file: the header is read at once
    with pytest.warns(UserWarning, match=r"b\.jpg.*image id '2' left out"):
        ds = COCODetection(path, skip_corrupt=True)
    assert ds.image_ids == ["a"] and ds.skipped_ids == ["2"]
    sized = _faulty(tmp_path, lambda d: [im.update(width=32, height=24) for im in d["images"]])
    (tmp_path / "b.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    ds = COCODetection(sized)  # reads no pixels
    with pytest.raises(CorruptImageError, match=r"b\.jpg.*item 1, image id 'b'"):
        ds[1]


class _PerfectDetector(torch.nn.Module):
    """Returns each evaluation item's own non-crowd GT boxes, in loader order."""

    def __init__(self, dataset):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.outputs = []
        for i in range(len(dataset)):
            ann = dataset.annotation(i)
            keep = ~ann["difficult"]
            self.outputs.append((ann["boxes"][keep], ann["classes"][keep], torch.ones(keep.sum())))

    def forward(self, images, **options):
        return self.outputs.pop(0)


def test_export_has_real_sizes_and_original_pixels(shapes, tmp_path, capsys):
    root, _, val_json = shapes
    val = COCODetection(val_json, root / "JPEGImages", SHAPES_CLASSES, image_size=100)
    loader = torch.utils.data.DataLoader(val, batch_size=1)
    result = inference_with_detector(
        _PerfectDetector(val), loader, val.idx_to_class, 0.05, 0.5, output_dir=tmp_path,
        progress=False,
    )  # fmt: skip
    assert result.map == 1.0
    assert result.coco.stats["AP"] == pytest.approx(1.0, abs=1e-12)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(tmp_path / "ground_truth.json"))
    written = json.loads(val_json.read_text())
    for image, source in zip(coco_gt.dataset["images"], written["images"], strict=True):
        with Image.open(root / "JPEGImages" / image["file_name"]) as pil:
            assert (image["width"], image["height"]) == pil.size
        assert image["file_name"] == source["file_name"]  # stems sort like the split here
    # GT boxes back in the file's pixels: those of the source file, up to float32 rounding.
    ours = np.array(sorted(a["bbox"] for a in coco_gt.dataset["annotations"]))
    source = np.array(sorted(a["bbox"] for a in written["annotations"]))
    np.testing.assert_allclose(ours, source, atol=1e-3)


TINY = [
    "--image-size", "48", "--fpn-channels", "16", "--batch-size", "4", "--max-iters", "3",
    "--warmup-iters", "1", "--workers", "0", "--pre-nms-topk", "50", "--post-nms-topk", "20",
    "--no-progress", "--no-pretrained", "--cache", "off",
]  # fmt: skip


def test_cli_trains_and_evaluates_on_coco_json(shapes, tmp_path, capsys):
    root, train_json, val_json = shapes
    images = str(root / "JPEGImages")
    run = tmp_path / "run"
    assert detector_cli.main([
        "train", "--dataset", str(train_json), "--images", images, "--val-dataset",
        str(val_json), "--val-images", images, "--out", str(run), *TINY,
    ]) == 0  # fmt: skip
    assert "Dataset: 24 train / 8 val images" in capsys.readouterr().out
    metrics = json.loads((run / "metrics.json").read_text())
    assert list(metrics["coco"]) == [
        "AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
        "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large",
    ]  # fmt: skip
    checkpoint = str(run / "checkpoint.pt")
    out = tmp_path / "eval"
    args = ["evaluate", checkpoint, "--dataset", str(val_json), "--images", images]
    assert detector_cli.main([*args, "--out", str(out), "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert (
        "mAP = " in printed and "Average Recall     (AR) @[ IoU=0.50:0.95 | area= large" in printed
    )
    again = json.loads((out / "metrics.json").read_text())
    assert again["num_val_images"] == 8 and again["coco"] == metrics["coco"]
    assert (out / "mAP" / "ground_truth.json").is_file()
    assert (out / "mAP" / "detections.json").is_file()
