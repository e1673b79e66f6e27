"""Tests for eecs598.mean_ap: hand-worked cases, the folder format, the CLI, and a randomised
comparison against a slow reference that follows the VOC devkit / folder tool line by line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import write_folder

from eecs598.mean_ap import (
    MeanAPAccumulator,
    average_precision,
    evaluate_detections,
    evaluate_folder,
    image_detections,
    main,
    plot_ap,
    write_tool_files,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------
# Slow reference: one detection at a time, exactly as the devkit / folder tool loop does it.
# ----------------------------------------------------------------------------------------------


def ref_voc_ap(rec: list[float], prec: list[float]) -> float:
    mrec = [0.0, *rec, 1.0]
    mpre = [0.0, *prec, 0.0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    ap = 0.0
    for i in range(1, len(mrec)):
        if mrec[i] != mrec[i - 1]:
            ap += (mrec[i] - mrec[i - 1]) * mpre[i]
    return ap


def ref_11_point(rec: list[float], prec: list[float]) -> float:
    rec_a, prec_a = np.array(rec), np.array(prec)
    ap = 0.0
    for t in np.arange(0.0, 1.1, 0.1):
        p = 0.0 if np.sum(rec_a >= t) == 0 else float(np.max(prec_a[rec_a >= t]))
        ap += p / 11.0
    return ap


def reference_eval(images, iou_threshold=0.5, use_11_point=False) -> dict[str, float]:
    """images: list of (gts, dets); gts = [(cls, [x1,y1,x2,y2], difficult)],
    dets = [(cls, score, [x1,y1,x2,y2])]. Returns {class: AP} for the classes with at least one
    non-difficult GT box (the folder tool's gt_classes), plus "mAP"."""
    gt_counter: dict[str, int] = {}
    for gts, _ in images:
        for cls, _, difficult in gts:
            if not difficult:
                gt_counter[cls] = gt_counter.get(cls, 0) + 1
    out: dict[str, float] = {}
    for cls in sorted(gt_counter):
        objects = [
            [{"bbox": box, "difficult": diff, "used": False} for c, box, diff in gts if c == cls]
            for gts, _ in images
        ]
        dets = [
            {"confidence": score, "image": i, "bbox": box}
            for i, (_, ds) in enumerate(images)
            for c, score, box in ds
            if c == cls
        ]
        dets.sort(key=lambda d: d["confidence"], reverse=True)  # stable, like the tool
        tp = [0] * len(dets)
        fp = [0] * len(dets)
        for idx, det in enumerate(dets):
            bb = det["bbox"]
            ovmax = -1.0
            gt_match = None
            for obj in objects[det["image"]]:
                bbgt = obj["bbox"]
                bi = [max(bb[0], bbgt[0]), max(bb[1], bbgt[1]), min(bb[2], bbgt[2])]
                bi.append(min(bb[3], bbgt[3]))
                iw = bi[2] - bi[0] + 1
                ih = bi[3] - bi[1] + 1
                if iw > 0 and ih > 0:
                    ua = (
                        (bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1)
                        + (bbgt[2] - bbgt[0] + 1) * (bbgt[3] - bbgt[1] + 1)
                        - iw * ih
                    )
                    ov = iw * ih / ua
                    if ov > ovmax:
                        ovmax = ov
                        gt_match = obj
            if ovmax >= iou_threshold:
                if not gt_match["difficult"]:
                    if not gt_match["used"]:
                        tp[idx] = 1
                        gt_match["used"] = True
                    else:
                        fp[idx] = 1
            else:
                fp[idx] = 1
        cum_tp, cum_fp, rec, prec = 0, 0, [], []
        for t, f in zip(tp, fp, strict=True):
            cum_tp += t
            cum_fp += f
            rec.append(cum_tp / gt_counter[cls])
            prec.append(cum_tp / max(cum_tp + cum_fp, np.finfo(np.float64).eps))
        out[cls] = ref_11_point(rec, prec) if use_11_point else ref_voc_ap(rec, prec)
    out["mAP"] = sum(out.values()) / len(out) if out else 0.0
    return out


def to_api(images, class_names):
    """The reference's image list -> evaluate_detections inputs."""
    index = {n: i for i, n in enumerate(class_names)}
    gt, det = [], []
    for gts, ds in images:
        gt.append(
            {
                "boxes": np.array([g[1] for g in gts], dtype=np.float64).reshape(-1, 4),
                "classes": np.array([index[g[0]] for g in gts], dtype=np.int64),
                "difficult": np.array([g[2] for g in gts], dtype=bool),
            }
        )
        det.append(
            {
                "boxes": np.array([d[2] for d in ds], dtype=np.float64).reshape(-1, 4),
                "classes": np.array([index[d[0]] for d in ds], dtype=np.int64),
                "scores": np.array([d[1] for d in ds], dtype=np.float64),
            }
        )
    return gt, det


def random_images(rng: np.random.Generator, n_images: int, classes: list[str]):
    """Small random scenes with many exact ties (integer coordinates, coarse scores)."""
    images = []
    for _ in range(n_images):
        gts = []
        for _ in range(rng.integers(0, 6)):
            x, y = rng.integers(0, 40, 2)
            w, h = rng.integers(2, 20, 2)
            box = [float(x), float(y), float(x + w), float(y + h)]
            gts.append((classes[rng.integers(len(classes))], box, bool(rng.random() < 0.2)))
        dets = []
        for _ in range(rng.integers(0, 10)):
            if gts and rng.random() < 0.6:
                base = gts[rng.integers(len(gts))][1]
                box = [v + float(rng.integers(-3, 4)) for v in base]
            else:
                x, y = rng.integers(0, 40, 2)
                w, h = rng.integers(2, 20, 2)
                box = [float(x), float(y), float(x + w), float(y + h)]
            score = round(float(rng.integers(1, 10)) / 10.0, 1)
            dets.append((classes[rng.integers(len(classes))], score, box))
        images.append((gts, dets))
    return images


def assert_matches_reference(result, ref):
    assert set(result.ap) == set(ref) - {"mAP"}
    for cls, ap in result.ap.items():
        assert ap == pytest.approx(ref[cls], rel=1e-4, abs=1e-12), cls
    assert result.map == pytest.approx(ref["mAP"], rel=1e-4, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# Hand-worked cases
# ----------------------------------------------------------------------------------------------


def box(k: int) -> list[float]:
    """The k-th 50x50 box of a row of non-overlapping boxes: (100k, 0, 100k + 49, 49)."""
    return [100.0 * k, 0.0, 100.0 * k + 49.0, 49.0]


FAR = [1000.0, 1000.0, 1049.0, 1049.0]  # overlaps nothing


def single_image(gt_boxes, gt_classes, det_boxes, det_classes, scores, difficult=None, names=None):
    acc = MeanAPAccumulator(names or ["cat", "dog"])
    acc.add(image_detections(0, gt_boxes, gt_classes, difficult, det_boxes, det_classes, scores))
    return acc


def test_perfect_detections_score_one():
    gt = [box(0), box(1), box(2)]
    acc = single_image(gt, [0, 1, 0], gt, [0, 1, 0], [0.9, 0.8, 0.7])
    for use_11 in (False, True):
        r = acc.compute(use_11_point=use_11)
        assert r.ap == {"cat": 1.0, "dog": 1.0}
        assert r.map == 1.0
    assert r.num_gt == {"cat": 2, "dog": 1}
    assert r.num_tp == {"cat": 2, "dog": 1} and r.num_fp == {"cat": 0, "dog": 0}


def test_duplicate_is_false_positive():
    # GT A = box(0), B = box(1). Detections in score order: A (0.9), A again (0.8), B (0.7).
    # tp = 1,0,1  fp = 0,1,0  ->  recall .5,.5,1  precision 1, 1/2, 2/3.
    # All-point: recall steps 0->.5 at precision 1 and .5->1 at max(2/3) -> .5 + .5*2/3 = 5/6.
    # 11-point: t = 0 ... 0.5 (6 values) -> 1; t = 0.6 ... 1 (5 values) -> 2/3; (6 + 10/3)/11.
    acc = single_image(
        [box(0), box(1)], [0, 0], [box(0), box(0), box(1)], [0, 0, 0], [0.9, 0.8, 0.7]
    )
    r = acc.compute()
    assert r.ap["cat"] == pytest.approx(5.0 / 6.0, rel=1e-12)
    assert r.num_tp["cat"] == 2 and r.num_fp["cat"] == 1
    np.testing.assert_allclose(r.recall["cat"], [0.5, 0.5, 1.0])
    np.testing.assert_allclose(r.precision["cat"], [1.0, 0.5, 2.0 / 3.0])
    assert acc.compute(use_11_point=True).ap["cat"] == pytest.approx(28.0 / 33.0, rel=1e-12)


def test_known_pr_curve_all_point_and_11_point():
    # 4 GT boxes; 6 detections in score order: TP FP TP FP FP TP.
    # cum tp 1 1 2 2 2 3, cum fp 0 1 1 2 3 3
    # recall    .25 .25 .5  .5 .5 .75
    # precision 1   1/2 2/3 1/2 2/5 1/2
    # All-point: precision made non-increasing from the right -> 1, 1, 2/3, 2/3, 1/2, 1/2.
    #   recall steps: 0->.25 @1, .25->.5 @2/3, .5->.75 @1/2, .75->1 @0
    #   AP = .25 + 1/6 + 1/8 = 13/24.
    # 11-point: t=0,.1,.2 -> 1; t=.3,.4,.5 -> 2/3; t=.6,.7 -> 1/2; t=.8,.9,1 -> 0
    #   AP = (3 + 2 + 1) / 11 = 6/11.
    gt = [box(0), box(1), box(2), box(3)]
    dets = [box(0), FAR, box(1), FAR, FAR, box(2)]
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    acc = single_image(gt, [0] * 4, dets, [0] * 6, scores)
    assert acc.compute().ap["cat"] == pytest.approx(13.0 / 24.0, rel=1e-12)
    assert acc.compute(use_11_point=True).ap["cat"] == pytest.approx(6.0 / 11.0, rel=1e-12)
    # Same numbers straight from the curve.
    rec = np.array([0.25, 0.25, 0.5, 0.5, 0.5, 0.75])
    prec = np.array([1.0, 0.5, 2 / 3, 0.5, 0.4, 0.5])
    assert average_precision(rec, prec) == pytest.approx(13.0 / 24.0, rel=1e-12)
    assert average_precision(rec, prec, use_11_point=True) == pytest.approx(6 / 11, rel=1e-12)


def test_average_precision_empty_curve():
    assert average_precision(np.zeros(0), np.zeros(0)) == 0.0
    assert average_precision(np.zeros(0), np.zeros(0), use_11_point=True) == 0.0


def test_detection_on_difficult_box_is_ignored():
    # GT: A (normal), B (difficult). Detections: B (0.9) is ignored, A (0.8) is a TP.
    # tp = 0,1  fp = 0,0 -> recall 0,1; precision 0 (no TP/FP yet), 1 -> AP 1.
    acc = single_image(
        [box(0), box(1)], [0, 0], [box(1), box(0)], [0, 0], [0.9, 0.8], difficult=[False, True]
    )
    r = acc.compute()
    assert r.ap["cat"] == 1.0
    assert r.num_gt["cat"] == 1 and r.num_ignored["cat"] == 1
    assert r.num_tp["cat"] == 1 and r.num_fp["cat"] == 0
    np.testing.assert_array_equal(r.precision["cat"], [0.0, 1.0])


def test_low_overlap_with_difficult_box_is_false_positive():
    # Best match is the difficult box but IoU < 0.5: an ordinary FP.
    # GT area 50*50 = 2500; det (0,0,49,9) area 50*10 = 500 -> IoU 0.2.
    acc = single_image(
        [box(0), box(1)],
        [0, 0],
        [[100.0, 0.0, 149.0, 9.0], box(0)],
        [0, 0],
        [0.9, 0.8],
        difficult=[False, True],
    )
    r = acc.compute()
    assert r.num_fp["cat"] == 1 and r.num_tp["cat"] == 1
    # tp 0,1 fp 1,0 -> recall 0,1 precision 0, 1/2 -> AP = 1 * 1/2.
    assert r.ap["cat"] == pytest.approx(0.5)


def test_class_without_detections_scores_zero():
    acc = single_image([box(0), box(1)], [0, 1], [box(0)], [0], [0.9])
    r = acc.compute()
    assert r.ap == {"cat": 1.0, "dog": 0.0}
    assert r.map == 0.5
    assert r.precision["dog"].shape == (0,)


def test_class_with_only_difficult_boxes_is_skipped():
    acc = single_image(
        [box(0), box(1)], [0, 1], [box(0), box(1)], [0, 1], [0.9, 0.8], difficult=[False, True]
    )
    r = acc.compute()
    assert r.ap == {"cat": 1.0}
    assert r.skipped_classes == ["dog"]
    assert r.map == 1.0


def test_detections_of_class_absent_from_gt_are_ignored():
    acc = single_image([box(0)], [0], [box(0), box(1)], [0, 1], [0.5, 0.9])
    r = acc.compute()
    assert r.ap == {"cat": 1.0}
    assert r.map == 1.0


def test_plus_one_iou_convention_at_half():
    # GT (0,0,9,9): 10x10 = 100 "pixels". Det (0,0,9,4): 10x5 = 50, all inside -> IoU 50/100
    # = 0.5 exactly, a TP at ">= 0.5". Without the +1 it would be 9*4 / (9*9) = 0.444.
    gt = [[0.0, 0.0, 9.0, 9.0]]
    hit = single_image(gt, [0], [[0.0, 0.0, 9.0, 4.0]], [0], [0.9]).compute()
    assert hit.num_tp["cat"] == 1 and hit.ap["cat"] == 1.0
    # Det (0,0,9,3): 40/100 = 0.4 -> FP.
    miss = single_image(gt, [0], [[0.0, 0.0, 9.0, 3.0]], [0], [0.9]).compute()
    assert miss.num_fp["cat"] == 1 and miss.ap["cat"] == 0.0
    # Threshold just above 0.5 turns the first one into a FP.
    above = single_image(gt, [0], [[0.0, 0.0, 9.0, 4.0]], [0], [0.9]).compute(0.5000001)
    assert above.num_fp["cat"] == 1


def test_touching_boxes_overlap_by_one_pixel():
    # x2 of the GT equals x1 of the detection: with the +1 convention they share a column.
    gt = [[0.0, 0.0, 9.0, 9.0]]
    r = single_image(gt, [0], [[9.0, 0.0, 18.0, 9.0]], [0], [0.9]).compute(iou_threshold=0.0)
    # IoU = 10 / 190 > 0 -> TP at threshold 0; a box that does not touch stays a FP.
    assert r.num_tp["cat"] == 1
    r = single_image(gt, [0], [[10.0, 0.0, 18.0, 9.0]], [0], [0.9]).compute(iou_threshold=0.0)
    assert r.num_fp["cat"] == 1


def test_score_ties_keep_input_order():
    # Same score: the first detection in input order takes the GT box even though the second
    # one overlaps it better; the second becomes a duplicate.
    gt = [[0.0, 0.0, 9.0, 9.0]]
    dets = [[0.0, 0.0, 9.0, 5.0], [0.0, 0.0, 9.0, 9.0]]
    r = single_image(gt, [0], dets, [0, 0], [0.5, 0.5]).compute()
    assert r.num_tp["cat"] == 1 and r.num_fp["cat"] == 1
    np.testing.assert_array_equal(r.precision["cat"], [1.0, 0.5])
    assert r.ap["cat"] == 1.0
    # Ties across images follow the order of add() calls.
    acc = MeanAPAccumulator(["cat"])
    acc.add(image_detections("b", [box(1)], [0], None, [FAR], [0], [0.5]))
    acc.add(image_detections("a", [box(0)], [0], None, [box(0)], [0], [0.5]))
    r = acc.compute()
    np.testing.assert_array_equal(r.precision["cat"], [0.0, 0.5])  # FP first, then TP
    assert r.ap["cat"] == pytest.approx(0.25)


def test_best_gt_ties_pick_first_box():
    # Two identical GT boxes; one detection matches the first, a second one (lower score) is
    # then a duplicate of that same first box (the devkit only looks at the argmax box).
    r = single_image([box(0), box(0)], [0, 0], [box(0), box(0)], [0, 0], [0.9, 0.8]).compute()
    assert r.num_tp["cat"] == 1 and r.num_fp["cat"] == 1


def test_empty_inputs_give_defined_results():
    r = MeanAPAccumulator(["cat"]).compute()
    assert r.ap == {} and r.map == 0.0
    acc = MeanAPAccumulator(["cat", "dog"])
    acc.add(image_detections(0, [box(0)], [0], None, np.zeros((0, 4)), np.zeros(0), np.zeros(0)))
    acc.add(image_detections(1, np.zeros((0, 4)), np.zeros(0), None, [box(0)], [1], [0.3]))
    r = acc.compute()
    assert r.ap == {"cat": 0.0} and r.map == 0.0
    assert acc.compute().ap == r.ap  # compute() can be called again


def test_tensor_inputs_and_detector_layout():
    # (N, 5) GT with -1 padding rows and (M, 6) detector output, as tensors.
    gt = [torch.tensor([[0.0, 0.0, 49.0, 49.0, 0.0], [-1.0, -1.0, -1.0, -1.0, -1.0]])]
    det = [torch.tensor([[0.0, 0.0, 49.0, 49.0, 0.0, 0.9], [0.0, 0.0, 49.0, 49.0, 1.0, 0.8]])]
    r = evaluate_detections(gt, det, {0: "cat", 1: "dog"})
    assert r.ap == {"cat": 1.0}


def test_input_validation():
    acc = MeanAPAccumulator(["cat"])
    acc.add(image_detections("x", [box(0)], [0], None, [], [], []))
    with pytest.raises(ValueError, match="already added"):
        acc.add(image_detections("x", [box(0)], [0], None, [], [], []))
    with pytest.raises(ValueError, match="unknown"):
        acc.add(image_detections("y", [box(0)], [3], None, [], [], []))
    with pytest.raises(ValueError, match="finite"):
        acc.add(image_detections("z", [box(0)], [0], None, [box(0)], [0], [float("nan")]))
    with pytest.raises(ValueError, match="iou_threshold"):
        acc.compute(iou_threshold=1.5)
    with pytest.raises(ValueError, match="unique"):
        MeanAPAccumulator(["cat", "cat"])
    with pytest.raises(ValueError):
        evaluate_detections([np.zeros((0, 5))], [], ["cat"])


# ----------------------------------------------------------------------------------------------
# Folder format and command line
# ----------------------------------------------------------------------------------------------


def test_folder_hand_case_and_cli_output(tmp_path, capsys):
    root = write_folder(
        tmp_path,
        {
            "img1": (
                "dog 0 0 49 49\ncat 100 0 149 49\ncat 200 0 249 49 difficult\n",
                "cat 0.9 100 0 149 49\ncat 0.8 100 0 149 49\ndog 0.7 0 0 49 49\n"
                "horse 0.99 0 0 10 10\n",
            ),
            "img2": ("cat 0 0 49 49\n", None),  # no detection file: no detections
        },
    )
    r = evaluate_folder(root)
    # cat: 2 positives; TP then duplicate FP -> recall .5,.5 precision 1,.5 -> AP .5.
    assert r.ap == {"cat": 0.5, "dog": 1.0}
    assert main([str(root)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "50.00% = cat AP",
        "100.00% = dog AP",
        "mAP = 75.00%",
    ]
    assert main([str(root), "--11-point", "--iou", "0.7"]) == 0
    # 11-point for cat: t = 0 ... 0.5 -> 1 (6 values) -> 6/11 = 54.55%.
    assert capsys.readouterr().out.splitlines()[0] == "54.55% = cat AP"


def test_cli_module_subprocess_with_plot(tmp_path):
    root = write_folder(tmp_path / "in", {"a": ("cat 0 0 9 9\n", "cat 0.5 0 0 9 9\n")})
    png = tmp_path / "ap.png"
    out = subprocess.run(
        [sys.executable, "-m", "eecs598.mean_ap", str(root), "--plot", str(png)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "MPLBACKEND": "Agg"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["100.00% = cat AP", "mAP = 100.00%"]
    assert out.stderr == ""
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_ap_returns_figure(tmp_path):
    from matplotlib.figure import Figure

    r = single_image([box(0), box(1)], [0, 1], [box(0)], [0], [0.9]).compute()
    fig = plot_ap(r)
    assert isinstance(fig, Figure)
    assert len(fig.axes[0].patches) == 2
    plot_ap(r, tmp_path / "x.png")
    assert (tmp_path / "x.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("sub", "text", "line"),
    [
        ("ground-truth", "cat 0 0 9 9\ncat 0 0 9\n", 2),
        ("ground-truth", "cat 0 0 9 9 hard\n", 1),
        ("ground-truth", "cat 0 zero 9 9\n", 1),
        ("detection-results", "cat 0.5 0 0 9 9\n\ncat high 0 0 9 9\n", 3),
        ("detection-results", "cat 0 0 9 9\n", 1),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, sub, text, line):
    files = {"a": ("cat 0 0 9 9\n", "cat 0.5 0 0 9 9\n")}
    root = write_folder(tmp_path, files)
    bad = root / sub / "a.txt"
    bad.write_text(text)
    with pytest.raises(ValueError) as info:
        evaluate_folder(root)
    assert str(bad) in str(info.value) and f"line {line}" in str(info.value)


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 1
    assert "ground-truth folder not found" in capsys.readouterr().err


def test_detection_file_without_gt_is_an_error(tmp_path):
    root = write_folder(tmp_path, {"a": ("cat 0 0 9 9\n", "")})
    (root / "detection-results" / "b.txt").write_text("cat 0.5 0 0 9 9\n")
    with pytest.raises(FileNotFoundError, match="b.txt"):
        evaluate_folder(root)


def test_write_tool_files_format(tmp_path):
    gt_path, det_path = write_tool_files(
        tmp_path,
        image_detections(
            "000005",
            torch.tensor([[1.0, 2.0, 30.0, 40.0], [5.0, 5.0, 9.5, 9.0], [-1.0] * 4]),
            torch.tensor([0, 1, -1]),
            torch.tensor([False, True, False]),
            torch.zeros(0, 4),
            torch.zeros(0, dtype=torch.long),
            torch.zeros(0),
        ),
        ["cat", "dog"],
    )
    assert Path(gt_path).read_text() == "cat 1.0 2.0 30.0 40.0\ndog 5.0 5.0 9.5 9.0 difficult\n"
    assert Path(det_path).read_text() == ""
    assert Path(det_path).parent.name == "detection-results"
    with pytest.raises(ValueError):
        write_tool_files(tmp_path, image_detections("a/b", [], [], None, [], [], []), ["cat"])
    with pytest.raises(ValueError):
        write_tool_files(tmp_path, image_detections("c", [], [], None, [], [], []), ["big cat"])


def test_folder_and_tensor_paths_agree_exactly(tmp_path):
    rng = np.random.default_rng(7)
    names = ["bird", "cat", "dog"]
    gt, det = [], []
    for i in range(40):
        n, m = int(rng.integers(0, 5)), int(rng.integers(0, 12))
        xy = torch.from_numpy(rng.uniform(0, 200, (n, 2))).float()
        gt_boxes = torch.cat([xy, xy + torch.from_numpy(rng.uniform(5, 80, (n, 2))).float()], 1)
        gt_cls = torch.from_numpy(rng.integers(0, 3, n))
        diff = torch.from_numpy(rng.random(n) < 0.15)
        src = rng.integers(0, max(n, 1), m)
        det_boxes = (
            gt_boxes[src] + torch.randn(m, 4) * 4
            if n
            else torch.from_numpy(rng.uniform(0, 200, (m, 4))).float()
        )
        det_cls = torch.from_numpy(rng.integers(0, 3, m))
        scores = torch.rand(m)
        image = image_detections(f"{i:06d}", gt_boxes, gt_cls, diff, det_boxes, det_cls, scores)
        write_tool_files(tmp_path, image, names)
        gt.append({"boxes": gt_boxes, "classes": gt_cls, "difficult": diff})
        det.append({"boxes": det_boxes, "classes": det_cls, "scores": scores})
    for use_11 in (False, True):
        a = evaluate_detections(gt, det, names, use_11_point=use_11)
        b = evaluate_folder(tmp_path, use_11_point=use_11)
        assert a.ap == b.ap and a.map == b.map
        assert a.num_tp == b.num_tp and a.num_fp == b.num_fp and a.num_gt == b.num_gt
        for cls in a.ap:
            np.testing.assert_array_equal(a.precision[cls], b.precision[cls])
            np.testing.assert_array_equal(a.recall[cls], b.recall[cls])


# ----------------------------------------------------------------------------------------------
# Randomised equivalence with the slow reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(25))
def test_matches_reference_randomised(seed):
    rng = np.random.default_rng(seed)
    classes = ["a", "b", "c"]
    images = random_images(rng, int(rng.integers(1, 30)), classes)
    gt, det = to_api(images, classes)
    for thr in (0.5, 0.3, 0.75):
        for use_11 in (False, True):
            got = evaluate_detections(gt, det, classes, iou_threshold=thr, use_11_point=use_11)
            assert_matches_reference(got, reference_eval(images, thr, use_11))


def test_chunked_iou_gives_same_result(monkeypatch):
    # Force tiny IoU batches so the chunking loop runs many times.
    from eecs598 import matching

    rng = np.random.default_rng(99)
    classes = ["a", "b", "c"]
    images = random_images(rng, 40, classes)
    gt, det = to_api(images, classes)
    full = evaluate_detections(gt, det, classes)
    monkeypatch.setattr(matching, "_IOU_CHUNK", 7)
    chunked = evaluate_detections(gt, det, classes)
    assert chunked.ap == full.ap
    assert_matches_reference(chunked, reference_eval(images))


@st.composite
def scenes(draw):
    classes = ["a", "b"]
    coord = st.integers(0, 30)
    n_images = draw(st.integers(1, 4))
    images = []
    for _ in range(n_images):
        gts = []
        for _ in range(draw(st.integers(0, 4))):
            x, y, w, h = (
                draw(coord),
                draw(coord),
                draw(st.integers(0, 15)),
                draw(st.integers(0, 15)),
            )
            gts.append((draw(st.sampled_from(classes)), [x, y, x + w, y + h], draw(st.booleans())))
        dets = []
        for _ in range(draw(st.integers(0, 6))):
            x, y, w, h = (
                draw(coord),
                draw(coord),
                draw(st.integers(0, 15)),
                draw(st.integers(0, 15)),
            )
            score = draw(st.sampled_from([0.1, 0.5, 0.5, 0.9]))
            dets.append((draw(st.sampled_from(classes)), score, [x, y, x + w, y + h]))
        images.append((gts, dets))
    return images


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenes(), st.sampled_from([0.0, 0.1, 0.5, 0.9]), st.booleans())
def test_property_ap_in_unit_interval_and_matches_reference(images, thr, use_11):
    gt, det = to_api(images, ["a", "b"])
    r = evaluate_detections(gt, det, ["a", "b"], iou_threshold=thr, use_11_point=use_11)
    for ap in r.ap.values():
        assert 0.0 <= ap <= 1.0
    assert 0.0 <= r.map <= 1.0
    for cls in r.ap:
        assert np.all((r.precision[cls] >= 0) & (r.precision[cls] <= 1))
        assert np.all(np.diff(r.recall[cls]) >= 0)
    assert_matches_reference(r, reference_eval(images, thr, use_11))
