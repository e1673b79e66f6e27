"""COCO-style metrics of eecs598.mean_ap: our conversion + pycocotools against an independent
writing of the documented mapping, hand-worked COCO values, bad input, the CLI and the export."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from eecs598.inference import inference_with_detector
from eecs598.mean_ap import (
    COCO_STATS,
    PYCOCOTOOLS_MISSING,
    MeanAPAccumulator,
    coco_evaluate,
    image_detections,
    main,
    read_folder,
    to_coco,
    write_coco_files,
    write_tool_files,
)

CLASSES = ["dog", "cat", "bird"]  # index order differs from the sorted-name order on purpose


def reference_stats(images: list[dict], class_names: list[str]) -> list[float]:
    """The issue's mapping written out independently, then pycocotools' stats.

    ``images``: dicts with ``id`` (str), ``gt`` rows ``(cls, x1, y1, x2, y2, difficult)`` and
    ``det`` rows ``(cls, score, x1, y1, x2, y2)``.
    """
    cat_id = {name: 1 + sorted(class_names).index(name) for name in class_names}
    img_id = {stem: 1 + k for k, stem in enumerate(sorted(im["id"] for im in images))}
    with_gt = {class_names[g[0]] for im in images for g in im["gt"]}
    gt = {
        "images": [{"id": img_id[im["id"]]} for im in images],
        "categories": [{"id": cat_id[n], "name": n} for n in class_names],
        "annotations": [],
    }
    dets = []
    for im in sorted(images, key=lambda im: im["id"]):
        for c, x1, y1, x2, y2, difficult in im["gt"]:
            gt["annotations"].append({
                "id": len(gt["annotations"]) + 1, "image_id": img_id[im["id"]],
                "category_id": cat_id[class_names[c]], "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": (x2 - x1) * (y2 - y1), "iscrowd": 1 if difficult else 0,
            })  # fmt: skip
        for c, score, x1, y1, x2, y2 in im["det"]:
            if class_names[c] in with_gt:
                dets.append({"image_id": img_id[im["id"]], "category_id": cat_id[class_names[c]],
                             "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(dets), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v) for v in evaluator.stats]


def records(images: list[dict]) -> list:
    """The same images as ``ImageDetections`` (in the given order)."""
    out = []
    for im in images:
        gt = np.array([g[1:5] for g in im["gt"]], np.float64).reshape(-1, 4)
        det = np.array([d[2:6] for d in im["det"]], np.float64).reshape(-1, 4)
        out.append(image_detections(
            im["id"], gt, [g[0] for g in im["gt"]], [bool(g[5]) for g in im["gt"]],
            det, [d[0] for d in im["det"]], [d[1] for d in im["det"]],
        ))  # fmt: skip
    return out


@st.composite
def random_images(draw) -> list[dict]:
    """1-5 images of up to 200 x 200 px: GT boxes, and detections that are jittered GT boxes
    (true, or of another class) or random boxes; some GT difficult, some images without GT."""
    n_images = draw(st.integers(1, 5))
    stems = draw(st.lists(st.from_regex(r"[a-z0-9]{1,6}", fullmatch=True), min_size=n_images,
                          max_size=n_images, unique=True))  # fmt: skip
    coord = st.floats(0, 150, allow_nan=False).map(lambda v: round(v, 1))
    size = st.floats(1, 120, allow_nan=False).map(lambda v: round(v, 1))
    images = []
    for stem in stems:
        gt = []
        for _ in range(draw(st.integers(0, 5))):
            x, y, w, h = draw(coord), draw(coord), draw(size), draw(size)
            gt.append((draw(st.integers(0, 2)), x, y, x + w, y + h, draw(st.booleans())))
        det = []
        for _ in range(draw(st.integers(0, 8))):
            score = draw(st.floats(0.01, 1.0, allow_nan=False))
            if gt and draw(st.booleans()):
                c, x1, y1, x2, y2, _ = gt[draw(st.integers(0, len(gt) - 1))]
                dx, dy = draw(st.floats(-8, 8)), draw(st.floats(-8, 8))
                c = c if draw(st.booleans()) else draw(st.integers(0, 2))
                det.append((c, score, x1 + dx, y1 + dy, x2 + dx, y2 + dy))
            else:
                x, y, w, h = draw(coord), draw(coord), draw(size), draw(size)
                det.append((draw(st.integers(0, 2)), score, x, y, x + w, y + h))
        images.append({"id": stem, "gt": gt, "det": det})
    return images


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_images())
def test_conversion_then_pycocotools_equals_an_independent_mapping(images):
    ours = to_coco(records(images), CLASSES)
    gt_classes = {g[0] for im in images for g in im["gt"]}
    expected_dets = [d for im in images for d in im["det"] if d[0] in gt_classes]
    if not expected_dets:  # loadRes cannot take an empty list; covered separately
        assert ours[1] == []
        return
    result = coco_evaluate(*ours)
    assert list(result.stats) == list(COCO_STATS)
    np.testing.assert_array_equal(list(result.stats.values()), reference_stats(images, CLASSES))
    assert len(result.summary.splitlines()) == 12


@settings(max_examples=30, deadline=None)
@given(random_images())
def test_perfect_detections_score_one(images):
    for im in images:  # every non-difficult GT box detected exactly, nothing else
        im["det"] = [(g[0], 0.5, *g[1:5]) for g in im["gt"] if not g[5]]
    if not any(im["det"] for im in images):
        return
    stats = coco_evaluate(*to_coco(records(images), CLASSES)).stats
    for name in ("AP", "AP50", "AP75", "AR100"):  # a mean of ones, to the last bit or two
        assert stats[name] == pytest.approx(1.0, abs=1e-12), name


def _one_box_images(dets_a, dets_b, gt_b=True):
    """Images ``a`` and ``b``, each with one dog at (10, 10, 50, 50) (``b`` only if ``gt_b``)."""
    box = (10.0, 10.0, 50.0, 50.0)
    return [
        {"id": "a", "gt": [(0, *box, False)], "det": [(0, s, *box) for s in dets_a]},
        {
            "id": "b",
            "gt": [(0, *box, False)] if gt_b else [],
            "det": [(0, s, *box) for s in dets_b],
        },
    ]


def test_a_duplicate_lowers_precision_as_coco_defines():
    # Without the duplicate: two TPs, AP 1.
    assert coco_evaluate(*to_coco(records(_one_box_images([0.9], [0.7])), CLASSES)).stats[
        "AP"
    ] == pytest.approx(1.0)
    # Score order TP (a), duplicate FP (a), TP (b): precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1.
    # COCO: interpolated precision at the 101 recall points 0, 0.01, ..., 1 is 1 for the 51
    # points r <= 0.5 and 2/3 for the 50 above, at every IoU threshold (identical boxes).
    images = _one_box_images([0.9, 0.8], [0.7])
    stats = coco_evaluate(*to_coco(records(images), CLASSES)).stats
    expected = (51 * 1.0 + 50 * (2 / 3)) / 101
    assert stats["AP"] == pytest.approx(expected) and stats["AP50"] == pytest.approx(expected)
    assert stats["AR100"] == 1.0  # the duplicate costs precision, not recall
    # The VOC all-point value of the same detections, for contrast: 0.5 * 1 + 0.5 * 2/3.
    acc = MeanAPAccumulator(CLASSES)
    for image in records(images):
        acc.add(image)
    assert acc.compute().ap["dog"] == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_no_detections_at_all_scores_zero():
    gt, dets = to_coco(records(_one_box_images([], [])), CLASSES)
    assert dets == []
    stats = coco_evaluate(gt, dets).stats
    assert stats["AP"] == 0.0 and stats["AR100"] == 0.0
    assert stats["AP_large"] == -1.0  # no GT box of 96^2 px or more: pycocotools' -1


def test_detections_in_an_image_without_gt_are_false_positives():
    # FP (b, 0.9) then TP (a, 0.5): precision 0 then 1/2 at recall 0, 1 -> 1/2 everywhere.
    images = _one_box_images([0.5], [0.9], gt_b=False)
    gt, _ = to_coco(records(images), CLASSES)
    assert [im["id"] for im in gt["images"]] == [1, 2]  # listed although it has no GT
    assert coco_evaluate(*to_coco(records(images), CLASSES)).stats["AP"] == pytest.approx(0.5)


def test_category_absent_from_gt_is_ignored():
    images = _one_box_images([0.9], [0.7])
    base = coco_evaluate(*to_coco(records(images), CLASSES)).stats
    images[1]["det"].append((2, 0.95, 0.0, 0.0, 30.0, 30.0))  # a "bird": no bird GT anywhere
    gt, dets = to_coco(records(images), CLASSES)
    assert len(dets) == 2 and {d["category_id"] for d in dets} == {3}  # dog: sorted id 3
    assert [c["name"] for c in gt["categories"]] == ["bird", "cat", "dog"]
    assert coco_evaluate(gt, dets).stats == base


def test_mapping_fields():
    image = image_detections(
        "x", [[1.0, 2.0, 11.0, 7.0], [0.0, 0.0, 4.0, 4.0]], [1, 0], [False, True],
        [[1.5, 2.0, 11.0, 8.0]], [1], [0.25],
    )  # fmt: skip
    gt, dets = to_coco([image], CLASSES)
    assert gt["annotations"] == [
        {"id": 1, "image_id": 1, "category_id": 2, "bbox": [1.0, 2.0, 10.0, 5.0], "area": 50.0,
         "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [0.0, 0.0, 4.0, 4.0], "area": 16.0,
         "iscrowd": 1},
    ]  # fmt: skip
    assert dets == [{"image_id": 1, "category_id": 2, "bbox": [1.5, 2.0, 9.5, 6.0], "score": 0.25}]
    assert gt["images"] == [{"id": 1, "file_name": "x"}]


def test_nan_box_is_named():
    bad = image_detections("img7", [[0, 0, 5, 5]], [0], None, [[0, 0, float("nan"), 5]], [0], [1])
    with pytest.raises(ValueError, match=r"image 'img7': detection box 0 is not finite"):
        to_coco([bad], CLASSES)
    bad = image_detections("img8", [[0, 0, 5, 5], [0, float("inf"), 5, 5]], [0, 0], None,
                           np.zeros((0, 4)), [], [])  # fmt: skip
    with pytest.raises(ValueError, match=r"image 'img8': GT box 1 is not finite"):
        to_coco([bad], CLASSES)


def test_folder_cli_prints_the_voc_table_then_the_coco_summary(tmp_path, capsys):
    images = _one_box_images([0.9, 0.8], [0.7])
    for image in records(images):
        write_tool_files(tmp_path, image, CLASSES)
    assert main([str(tmp_path), "--coco"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["83.33% = dog AP", "mAP = 83.33%"]
    expected = read_folder(tmp_path).compute_coco()
    assert "\n".join(lines[2:]) == expected.summary
    assert lines[2].startswith(" Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all |")
    assert len(lines) == 14 and lines[2].endswith(f"= {expected.stats['AP']:.3f}")


def test_without_pycocotools_only_coco_fails(tmp_path, capsys, monkeypatch):
    for image in records(_one_box_images([0.9], [0.7])):
        write_tool_files(tmp_path, image, CLASSES)
    for name in ("pycocotools", "pycocotools.coco", "pycocotools.cocoeval"):
        monkeypatch.setitem(sys.modules, name, None)  # import now raises ImportError
    assert main([str(tmp_path), "--coco"]) == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"error: {PYCOCOTOOLS_MISSING}"]
    assert "pip install pycocotools" in captured.err
    assert main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "mAP = 100.00%"
    # The export needs nothing but the standard library.
    gt_path, det_path = write_coco_files(
        tmp_path, *to_coco(records(_one_box_images([1], [])), CLASSES)
    )
    assert json.loads(Path(det_path).read_text())[0]["bbox"] == [10.0, 10.0, 40.0, 40.0]


class _FixedDetector(torch.nn.Module):
    """Returns the next of a list of ``(boxes, classes, scores)`` at each call."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = list(outputs)
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, images, **options):
        return self.outputs.pop(0)


def test_inference_writes_loadable_coco_files_and_reports_coco(tmp_path, capsys):
    image = torch.zeros(1, 3, 60, 80)
    gt_rows = torch.tensor([[[10.0, 10.0, 50.0, 40.0, 0.0], [-1, -1, -1, -1, -1]]])
    loader = [(["data/img1.jpg"], image, gt_rows), (["data/img0.png"], image, gt_rows)]
    hit = (torch.tensor([[10.0, 10.0, 50.0, 40.0]]), torch.tensor([0]), torch.tensor([0.9]))
    miss = (torch.tensor([[60.0, 45.0, 70.0, 55.0]]), torch.tensor([0]), torch.tensor([0.8]))
    detector = _FixedDetector([hit, miss])
    result = inference_with_detector(
        detector, loader, {0: "dog", 1: "cat"}, 0.05, 0.5, output_dir=tmp_path, progress=False
    )
    out = capsys.readouterr().out
    assert out.index("mAP = 50.00%") < out.index("Average Precision  (AP) @[ IoU=0.50:0.95")
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(tmp_path / "ground_truth.json"))  # loads unchanged
        coco_dt = coco_gt.loadRes(str(tmp_path / "detections.json"))
    # Sorted stems -> ids; without a dataset lookup the evaluated image is the original.
    assert coco_gt.dataset["images"] == [
        {"id": 1, "file_name": "img0.png", "width": 80, "height": 60},
        {"id": 2, "file_name": "img1.jpg", "width": 80, "height": 60},
    ]
    assert len(coco_dt.dataset["annotations"]) == 2
    # TP then FP, recall 1/2 at most: precision 1 at the 51 recall points r <= 0.5, 0 above.
    assert result.coco is not None and result.coco.stats["AP50"] == pytest.approx(51 / 101)
    assert result.coco == coco_evaluate(
        json.loads((tmp_path / "ground_truth.json").read_text()),
        json.loads((tmp_path / "detections.json").read_text()),
    )
