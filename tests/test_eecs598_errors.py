"""Tests for eecs598.errors: the TIDE breakdown against hand-worked values and against tidecv
1.0.1 (the paper's own toolbox, an independent reference), the confusion matrix, the F1
thresholds, the per-image counts, the report files, the CLI and the recipe's evaluation.

tidecv is a test-only reference (requirements-dev.txt); its tests skip without it. It scores
with COCO's 101-point interpolation, so the comparison runs ours with ``interpolation=
"101-point"``; it treats ignore regions as COCO crowd regions, so it only sees cases without
difficult boxes (those are checked against hand-computed values), and it matches each
detection to the best box still free, where the VOC evaluator takes the best box: its cases
keep the GT boxes of an image apart, where both rules agree.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eecs598.errors import (
    ERROR_TYPES,
    SPECIAL_TYPES,
    analyse_errors,
    best_f1,
    confusion_matrix,
    f1_curve,
    per_image_counts,
    write_error_report,
)
from eecs598.mean_ap import (
    MeanAPAccumulator,
    image_detections,
    interpolated_ap,
    main,
    write_tool_files,
)

CLASSES = ["a", "b", "c"]
ALL_TYPES = (*ERROR_TYPES, *SPECIAL_TYPES)
A = [0.0, 0.0, 99.0, 99.0]
B = [200.0, 200.0, 299.0, 299.0]
C = [400.0, 0.0, 499.0, 99.0]
D = [600.0, 0.0, 699.0, 99.0]
SHIFT_A = [50.0, 0.0, 149.0, 99.0]  # IoU 1/3 with A (+1-pixel convention)
SHIFT_B = [250.0, 200.0, 349.0, 299.0]  # IoU 1/3 with B
NEAR_A = [0.0, 0.0, 99.0, 89.0]  # IoU 0.9 with A
FAR = [1000.0, 1000.0, 1049.0, 1049.0]  # overlaps nothing


def scene(images):
    """``[(gts, dets)]`` -> records; a GT is ``(class, box)`` or ``(class, box, difficult)``,
    a detection ``(class, score, box)``; image ids are the positions."""
    records = []
    for i, (gts, dets) in enumerate(images):
        gts = [(*g, False) if len(g) == 2 else g for g in gts]
        records.append(image_detections(
            i, np.array([g[1] for g in gts]).reshape(-1, 4), [g[0] for g in gts],
            [g[2] for g in gts], np.array([d[2] for d in dets]).reshape(-1, 4),
            [d[0] for d in dets], [d[1] for d in dets],
        ))  # fmt: skip
    return records


# ----------------------------------------------------------------------------------------------
# The reference: tidecv 1.0.1
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def numpy_aliases():
    """numpy's removed ``np.float`` / ``np.int`` / ``np.bool`` aliases, which tidecv (2020)
    may reach for, for the duration of the block only."""
    added = [n for n in ("float", "int", "bool") if n not in np.__dict__]
    for name in added:
        setattr(np, name, {"float": float, "int": int, "bool": bool}[name])
    try:
        yield
    finally:
        for name in added:
            delattr(np, name)


def _import_tidecv():
    """tidecv, or None where it is not installed or does not import (its tests then skip)."""
    with numpy_aliases():
        try:
            import tidecv
        except ImportError:
            return None
    return tidecv


tidecv = _import_tidecv()
needs_tidecv = pytest.mark.skipif(tidecv is None, reason="tidecv (requirements-dev.txt) absent")


def tidecv_breakdown(images) -> tuple[float, dict[str, float]]:
    """tidecv's mAP@0.5 and dAP of every type for a case without difficult boxes; boxes go in
    as ``[x1, y1, x2 - x1 + 1, y2 - y1 + 1]`` so that its IoU equals the evaluator's."""
    with numpy_aliases():
        gt, pred = tidecv.Data("gt", max_dets=10**6), tidecv.Data("pred", max_dets=10**6)
        for i, (gts, dets) in enumerate(images):
            gt.add_image(i, str(i))
            for c, (x1, y1, x2, y2) in gts:
                gt.add_ground_truth(i, c, [x1, y1, x2 - x1 + 1, y2 - y1 + 1])
            for c, s, (x1, y1, x2, y2) in dets:
                pred.add_detection(i, c, s, [x1, y1, x2 - x1 + 1, y2 - y1 + 1])
        tide = tidecv.TIDE(pos_threshold=0.5, background_threshold=0.1)
        with contextlib.redirect_stdout(io.StringIO()):
            tide.evaluate(gt, pred, mode=tidecv.TIDE.BOX, name="run")
            errors = tide.get_all_errors()
    dap = {**errors["main"]["run"], **errors["special"]["run"]}
    return tide.runs["run"].ap, dap


def largest_difference(images) -> float:
    """Largest gap, in AP points, between ours (101-point) and tidecv: mAP and every dAP."""
    theirs_map, theirs = tidecv_breakdown(images)
    ours = analyse_errors(scene(images), CLASSES, interpolation="101-point").breakdown
    return max([abs(ours.map - theirs_map)] + [abs(ours.dap[t] - theirs[t]) for t in ALL_TYPES])


# ----------------------------------------------------------------------------------------------
# Hand-worked cases, one per error type (all-point values worked out in the comments)
# ----------------------------------------------------------------------------------------------

HAND_CASES = {
    # FP(0.9, IoU 1/3 with A), TP(0.8): AP 0.5 * 0.5. Fixed: both TP. FalsePos: TP first, AP
    # 0.5; FalseNeg: one GT, AP 0.5.
    "Loc": ([([(0, A), (0, B)], [(0, 0.9, SHIFT_A), (0, 0.8, B)])], 25.0,
            {"Loc": 75.0, "FalsePos": 25.0, "FalseNeg": 25.0},
            {"Loc": 1, "FalsePos": 1, "FalseNeg": 1}),
    # a: no detection, AP 0; b: FP(0.9, on A), TP(0.8) of one box: 0.5. Fixed: the FP is a's
    # TP. FalseNeg: a has neither GT left nor detections and leaves the mean.
    "Cls": ([([(0, A), (1, B)], [(1, 0.9, A), (1, 0.8, B)])], 25.0,
            {"Cls": 75.0, "FalsePos": 25.0, "FalseNeg": 25.0},
            {"Cls": 1, "FalsePos": 1, "FalseNeg": 1}),
    # TP, FP(IoU 0.9 with the taken A), TP: 0.5 * 1 + 0.5 * 2/3.
    "Dupe": ([([(0, A), (0, B)], [(0, 0.9, A), (0, 0.8, NEAR_A), (0, 0.7, B)])], 250 / 3,
             {"Dupe": 50 / 3, "FalsePos": 50 / 3}, {"Dupe": 1, "FalsePos": 1}),
    # FP(0.95, an image without GT), FP(0.9, far away), TP(0.8): AP 1/3.
    "Bkg": ([([(0, A)], [(0, 0.9, FAR), (0, 0.8, A)]), ([], [(0, 0.95, FAR)])], 100 / 3,
            {"Bkg": 200 / 3, "FalsePos": 200 / 3}, {"Bkg": 2, "FalsePos": 2}),
    # b: FP(0.9, IoU 1/3 with a's A), TP(0.5): 0.5; a: A missed, AP 0. Fixing Miss leaves a
    # with nothing: it leaves the mean.
    "Both": ([([(0, A), (1, B)], [(1, 0.9, SHIFT_A), (1, 0.5, B)])], 25.0,
             {"Both": 25.0, "Miss": 25.0, "FalsePos": 25.0, "FalseNeg": 25.0},
             {"Both": 1, "Miss": 1, "FalsePos": 1, "FalseNeg": 1}),
    "Miss": ([([(0, A), (0, B)], [(0, 0.9, A)])], 50.0, {"Miss": 50.0, "FalseNeg": 50.0},
             {"Miss": 1, "FalseNeg": 1}),
    # A Cls error (0.9) and a Loc error (0.8) point at A: the Cls one, higher, wins A; the Loc
    # one is then a duplicate, removed when Loc is fixed (no gain). FalseNeg: a keeps its FP
    # and scores 0 without GT.
    "Cls and Loc compete": (
        [([(0, A), (1, B)], [(1, 0.9, A), (0, 0.8, SHIFT_A), (1, 0.7, B)])], 25.0,
        {"Cls": 75.0, "FalsePos": 25.0}, {"Cls": 1, "Loc": 1, "FalsePos": 2, "FalseNeg": 1}),
}  # fmt: skip


@pytest.mark.parametrize("name", list(HAND_CASES))
def test_hand_built_case_for_each_error_type(name):
    images, base, dap, counts = HAND_CASES[name]
    result = analyse_errors(scene(images), CLASSES).breakdown
    assert result.map == pytest.approx(base)
    assert result.dap == pytest.approx({t: dap.get(t, 0.0) for t in ALL_TYPES})
    assert result.counts == {t: counts.get(t, 0) for t in ALL_TYPES}
    assert result.interpolation == "all-point"
    # The all-point mAP is the VOC table's.
    assert result.map == pytest.approx(100 * MeanAPAccumulator_of(images).compute().map)


@needs_tidecv
@pytest.mark.parametrize("name", list(HAND_CASES))
def test_hand_built_cases_agree_with_tidecv(name):
    assert largest_difference(HAND_CASES[name][0]) <= 0.05


def MeanAPAccumulator_of(images) -> MeanAPAccumulator:  # noqa: N802 (reads as the class)
    accumulator = MeanAPAccumulator(CLASSES)
    for record in scene(images):
        accumulator.add(record)
    return accumulator


# ----------------------------------------------------------------------------------------------
# Random cases against tidecv (hypothesis)
# ----------------------------------------------------------------------------------------------


@st.composite
def random_scenes(draw):
    """1-6 images; GT boxes in disjoint cells of a 4 x 4 grid (so both matching rules agree);
    detections jittered off a GT box (sometimes relabelled) or anywhere; distinct scores; only
    classes that have a GT box somewhere."""
    n_classes = draw(st.integers(1, 3))
    coord = st.floats(0, 30, allow_nan=False)
    size = st.floats(30, 65, allow_nan=False)
    images = []
    for _ in range(draw(st.integers(1, 6))):
        cells = draw(st.lists(st.integers(0, 15), unique=True, max_size=4))
        gts = []
        for cell in cells:
            x, y = 100 * (cell % 4) + draw(coord), 100 * (cell // 4) + draw(coord)
            gts.append(
                (draw(st.integers(0, n_classes - 1)), [x, y, x + draw(size), y + draw(size)])
            )
        dets = []
        for _ in range(draw(st.integers(0, 10))):
            cls = draw(st.integers(0, n_classes - 1))
            if gts and draw(st.booleans()):
                source_cls, source = gts[draw(st.integers(0, len(gts) - 1))]
                jitter = draw(st.lists(st.floats(-12, 12, allow_nan=False), min_size=4, max_size=4))
                box = list(np.add(source, jitter))
                cls = source_cls if draw(st.booleans()) else cls
            else:
                x, y = (
                    draw(st.floats(0, 350, allow_nan=False)),
                    draw(st.floats(0, 350, allow_nan=False)),
                )
                box = [x, y, x + draw(st.floats(10, 80)), y + draw(st.floats(10, 80))]
            dets.append((cls, box))
        images.append((gts, dets))
    total = sum(len(d) for _, d in images)
    scores = iter(draw(st.permutations(range(1, total + 1))))
    with_gt = {c for gts, _ in images for c, _ in gts}
    return [(gts, [(c, next(scores) / (total + 1), b) for c, b in dets if c in with_gt])
            for gts, dets in images]  # fmt: skip


@needs_tidecv
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_scenes())
def test_random_cases_agree_with_tidecv(images):
    if not any(dets for _, dets in images):
        return  # tidecv divides by zero when a fix leaves no class (ours: 0, tested below)
    assert largest_difference(images) <= 0.05


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_scenes(), st.lists(st.booleans(), min_size=40, max_size=40))
def test_random_cases_hold_the_invariants(images, difficult):
    flags = iter(difficult)
    images = [([(c, b, next(flags)) for c, b in gts], dets) for gts, dets in images]
    records = scene(images)
    analysis = analyse_errors(records, CLASSES)
    result = analysis.breakdown
    accumulator = MeanAPAccumulator(CLASSES)
    for record in records:
        accumulator.add(record)
    voc = accumulator.compute()
    assert result.map == pytest.approx(100 * voc.map, abs=1e-9)
    assert all(result.dap[t] >= 0 for t in ALL_TYPES)
    assert all(np.isfinite(v) and v <= 100 for v in result.dap.values())
    assert result.counts["FalsePos"] == sum(voc.num_fp.values())
    assert result.counts["FalsePos"] == sum(result.counts[t] for t in ERROR_TYPES[:-1])
    assert result.counts["Miss"] <= result.counts["FalseNeg"]
    assert sum(voc.num_gt.values()) - sum(voc.num_tp.values()) == result.counts["FalseNeg"]
    assert result.skipped_classes == voc.skipped_classes


# ----------------------------------------------------------------------------------------------
# Difficult boxes (ignore regions): hand-computed, tidecv treats them otherwise
# ----------------------------------------------------------------------------------------------


def test_detection_on_a_difficult_box_is_no_error_and_the_box_is_never_missed():
    # 0.9 on the difficult A: ignored. 0.8 (IoU 1/3 with B) is a Loc error on B, which 0.7
    # takes: fixing it removes it. Counted: FP, TP -> AP 0.5.
    images = [([(0, A, True), (0, B)], [(0, 0.9, A), (0, 0.8, SHIFT_B), (0, 0.7, B)])]
    result = analyse_errors(scene(images), CLASSES).breakdown
    assert result.map == pytest.approx(50.0)
    assert result.dap == pytest.approx({**dict.fromkeys(ALL_TYPES, 0.0), "Loc": 50.0,
                                        "FalsePos": 50.0})  # fmt: skip
    assert result.counts == {**dict.fromkeys(ALL_TYPES, 0), "Loc": 1, "FalsePos": 1}


def test_difficult_boxes_are_no_targets_of_errors():
    # 0.9 overlaps only the difficult A (IoU 1/3): a false positive on background.
    images = [([(0, A, True), (0, B)], [(0, 0.9, SHIFT_A), (0, 0.8, B)])]
    result = analyse_errors(scene(images), CLASSES).breakdown
    assert result.map == pytest.approx(50.0)  # FP, TP of one box
    assert result.counts["Bkg"] == 1 and result.counts["Loc"] == 0
    assert result.dap["Bkg"] == pytest.approx(50.0)


def test_class_with_only_difficult_boxes_is_left_out_and_named():
    images = [([(0, A), (1, B, True)], [(0, 0.9, A), (1, 0.8, B), (1, 0.7, FAR)])]
    result = analyse_errors(scene(images), CLASSES).breakdown
    assert result.classes == ["a"] and result.skipped_classes == ["b"]
    assert result.absent_classes == ["c"]
    assert result.map == 100.0 and result.counts == dict.fromkeys(ALL_TYPES, 0)
    assert "left out (all difficult): b" in result.table()


# ----------------------------------------------------------------------------------------------
# Bad input: defined values, never NaN
# ----------------------------------------------------------------------------------------------


def test_no_detections_at_all():
    result = analyse_errors(scene([([(0, A), (1, B)], [])]), CLASSES).breakdown
    assert result.map == 0.0 and result.dap == dict.fromkeys(ALL_TYPES, 0.0)
    assert result.counts == {**dict.fromkeys(ALL_TYPES, 0), "Miss": 2, "FalseNeg": 2}


def test_no_images_and_images_without_gt():
    for images in ([], [([], [(0, 0.9, A)])], [([], [])]):
        result = analyse_errors(scene(images), CLASSES).breakdown
        assert result.map == 0.0 and result.dap == dict.fromkeys(ALL_TYPES, 0.0)
        assert result.classes == [] and result.absent_classes == CLASSES
    overall, per_class = best_f1(analyse_errors(scene([([], [(0, 0.9, A)])]), CLASSES))
    assert overall.threshold is None and overall.f1 == 0.0 and per_class == {}


def test_detections_of_a_class_without_gt_are_ignored_and_named():
    result = analyse_errors(scene([([(0, A)], [(0, 0.9, A), (2, 0.95, FAR)])]), CLASSES)
    assert result.breakdown.absent_classes == ["b", "c"]
    assert result.breakdown.counts == dict.fromkeys(ALL_TYPES, 0)
    assert result.breakdown.map == 100.0


@pytest.mark.parametrize(("first", "wins"), [("Loc", "Loc"), ("Cls", "Cls")])
def test_tied_scores_keep_input_order(first, wins):
    # A Loc and a Cls error, both 0.8, point at A: the first in input order wins it.
    loc, cls = (0, 0.8, SHIFT_A), (1, 0.8, A)
    dets = [loc, cls] if first == "Loc" else [cls, loc]
    result = analyse_errors(scene([([(0, A), (1, B)], [*dets, (1, 0.7, B)])]), CLASSES)
    dap = result.breakdown.dap
    # As is: a 0, b 0.5 (FP 0.8, TP 0.7). Winner fixed: a scores 1 (with Cls, the moved TP is
    # ahead of the tied Loc FP), b 1 with Cls fixed or 0.5 with Loc fixed; the loser's fix
    # only removes it.
    assert dap == pytest.approx({**dap, "Loc": 50.0 if wins == "Loc" else 0.0,
                                 "Cls": 75.0 if wins == "Cls" else 25.0})  # fmt: skip


BAD_INPUTS = {
    "no images": [],
    "no detections": [([(0, A), (1, B)], [])],
    "images without GT": [([], [(0, 0.9, A)]), ([], [])],
    "only difficult boxes": [([(0, A, True)], [(0, 0.9, A), (0, 0.8, FAR)])],
    "class absent from the GT": [([(0, A)], [(2, 0.9, A)])],
    "tied scores": [([(0, A), (0, B)], [(0, 0.5, A), (0, 0.5, FAR), (0, 0.5, B)])],
    "single image, single box": [([(0, A)], [(0, 0.9, A)])],
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_inputs_never_divide_by_zero(name):
    """Every step under numpy's errors raised and warnings as errors: a defined value, never
    NaN or a division by zero."""
    records = scene(BAD_INPUTS[name])
    with np.errstate(all="raise"), warnings.catch_warnings():
        warnings.simplefilter("error")
        for interpolation in ("all-point", "101-point", "11-point"):
            analysis = analyse_errors(records, CLASSES, interpolation=interpolation)
            values = [analysis.breakdown.map, *analysis.breakdown.dap.values()]
            assert all(np.isfinite(v) and 0.0 <= v <= 100.0 for v in values)
        overall, per_class = best_f1(analysis)
        assert all(0.0 <= b.f1 <= 1.0 for b in [overall, *per_class.values()])
        assert np.all(np.isfinite(confusion_matrix(records, CLASSES).normalised()))
        assert len(per_image_counts(analysis)) == len(records)


def test_bad_settings_and_records_raise_naming_the_problem():
    records = scene([([(0, A)], [(0, 0.9, A)])])
    with pytest.raises(ValueError, match="background_threshold <= iou_threshold"):
        analyse_errors(records, CLASSES, background_threshold=0.6)
    with pytest.raises(ValueError, match="interpolation must be one of"):
        analyse_errors(records, CLASSES, interpolation="nearest")
    with pytest.raises(ValueError, match="unknown detection class index"):
        analyse_errors(scene([([(0, A)], [(7, 0.9, A)])]), CLASSES)
    with pytest.raises(ValueError, match="already added"):
        analyse_errors(records + records, CLASSES)
    with pytest.raises(ValueError, match="finite score_thresh"):
        confusion_matrix(records, CLASSES, score_thresh=float("nan"))


def test_101_point_interpolation():
    # Recall 0.5 at precision 1: thresholds 0, 0.01, ..., 0.5 (51 of 101) see precision 1.
    assert interpolated_ap(np.array([0.5]), np.array([1.0]), "101-point") == pytest.approx(51 / 101)
    assert interpolated_ap(np.array([0.5]), np.array([1.0]), "all-point") == 0.5
    assert interpolated_ap(np.array([0.5]), np.array([1.0]), "11-point") == pytest.approx(6 / 11)
    assert interpolated_ap(np.zeros(0), np.zeros(0), "101-point") == 0.0
    with pytest.raises(ValueError, match="interpolation must be one of"):
        interpolated_ap(np.zeros(0), np.zeros(0), "cubic")


# ----------------------------------------------------------------------------------------------
# Confusion matrix, F1, per image
# ----------------------------------------------------------------------------------------------


def test_confusion_matrix_counts_and_rows():
    images = [([(0, A), (1, B), (2, C, True), (0, D)],
               [(1, 0.9, A), (1, 0.8, B), (0, 0.7, FAR), (0, 0.6, C), (0, 0.1, B)])]  # fmt: skip
    confusion = confusion_matrix(scene(images), CLASSES)
    assert confusion.labels == ["a", "b", "c", "background"]
    expected = np.zeros((4, 4), dtype=np.int64)
    expected[0, 1] = expected[1, 1] = 1  # a seen as b; b right
    expected[3, 0] = 1  # a on background
    expected[0, 3] = 1  # D missed (0.6 on the difficult C and 0.1 below 0.25 do not count)
    np.testing.assert_array_equal(confusion.counts, expected)
    np.testing.assert_allclose(confusion.normalised(), [[0, 0.5, 0, 0.5], [0, 1, 0, 0],
                                                        [0, 0, 0, 0], [1, 0, 0, 0]])  # fmt: skip
    lower = confusion_matrix(scene(images), CLASSES, score_thresh=0.05).counts
    assert lower[1, 1] == 1 and lower[3, 0] == 2  # 0.1 on the taken B: a duplicate
    empty = confusion_matrix(scene([]), CLASSES)
    assert empty.counts.sum() == 0 and np.all(empty.normalised() == 0)


def test_f1_curve_and_best_threshold_with_ties():
    thresholds, precision, recall, f1 = f1_curve(
        np.array([0.9, 0.9, 0.5]), np.array([True, False, True]), n_pos=2
    )
    np.testing.assert_allclose(thresholds, [0.9, 0.5])
    np.testing.assert_allclose(precision, [0.5, 2 / 3])
    np.testing.assert_allclose(recall, [0.5, 1.0])
    np.testing.assert_allclose(f1, [0.5, 0.8])
    # a: TP 0.9 / FP 0.3 / TP 0.2 over 2 boxes -> best F1 at 0.2 (0.8); b: TP 0.6 of 1 box.
    images = [([(0, A), (0, B), (1, C)], [(0, 0.9, A), (0, 0.3, FAR), (0, 0.2, B), (1, 0.6, C)])]
    overall, per_class = best_f1(analyse_errors(scene(images), CLASSES))
    assert per_class["a"].threshold == 0.2 and per_class["a"].f1 == pytest.approx(0.8)
    assert per_class["b"].threshold == 0.6 and per_class["b"].f1 == 1.0
    # Pooled: 0.9 T, 0.6 T, 0.3 F, 0.2 T over 3 boxes: F1 0.8 at 0.6, 6/7 at 0.2.
    assert overall.threshold == 0.2 and overall.f1 == pytest.approx(6 / 7)
    assert overall.precision == 0.75 and overall.recall == 1.0


def test_per_image_counts_follow_the_score_threshold():
    analysis = analyse_errors(scene(HAND_CASES["Bkg"][0]), CLASSES)
    zero = dict.fromkeys(("Cls", "Loc", "Both", "Dupe"), 0)
    assert per_image_counts(analysis) == [
        {"image_id": 0, "gt": 1, "tp": 1, **zero, "Bkg": 1, "missed": 0, "errors": 1},
        {"image_id": 1, "gt": 0, "tp": 0, **zero, "Bkg": 1, "missed": 0, "errors": 1},
    ]
    high = per_image_counts(analysis, score_thresh=0.85)
    assert high[0] == {"image_id": 0, "gt": 1, "tp": 0, **zero, "Bkg": 1, "missed": 1,
                       "errors": 2}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The report, the CLI
# ----------------------------------------------------------------------------------------------

REPORT_CASE = [([(0, A), (1, B)], [(1, 0.9, A), (0, 0.8, SHIFT_A), (1, 0.7, B)]),
               ([(0, C)], [(0, 0.95, C)]), ([], [(2, 0.5, FAR)])]  # fmt: skip
FILES = ("errors.json", "errors.png", "confusion.png", "pr_curves.png", "per_image.csv")


def test_write_error_report_writes_every_file(tmp_path, capsys):
    summary = write_error_report(
        scene(REPORT_CASE), CLASSES, tmp_path, image_pixels=lambda i: np.zeros((300, 500, 3))
    )
    printed = capsys.readouterr().out
    for name in ALL_TYPES:
        assert re.search(rf"^{name} +\d+\.\d\d +\d+$", printed, flags=re.M), name
    assert "at score >= 0.7: use predict --conf 0.699" in printed
    for name in (*FILES, "worst.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    report = json.loads((tmp_path / "errors.json").read_text())
    assert report["dAP"] == pytest.approx(summary["dAP"]) and set(report["dAP"]) == set(ALL_TYPES)
    assert summary["best_score_thresh"] == 0.7 and summary["interpolation"] == "all-point"
    assert report["confusion_labels"] == [*CLASSES, "background"]
    assert report["worst_images"] == ["0"]
    rows = list(csv.DictReader((tmp_path / "per_image.csv").open()))
    assert [r["image_id"] for r in rows] == ["0", "1", "2"]
    assert rows[0] == {"image_id": "0", "gt": "2", "tp": "1", "Cls": "1", "Loc": "1", "Both": "0",
                       "Dupe": "0", "Bkg": "0", "missed": "1", "errors": "3"}  # fmt: skip
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, no leftovers


def test_report_without_pixels_skips_the_gallery_with_a_note(tmp_path, capsys):
    write_error_report(scene(REPORT_CASE), CLASSES, tmp_path)
    assert "worst.png skipped: no image pixels" in capsys.readouterr().out
    assert all((tmp_path / name).is_file() for name in FILES)
    assert not (tmp_path / "worst.png").exists()
    with pytest.raises(ValueError, match=r"image 0: expected an image of shape"):
        write_error_report(scene(REPORT_CASE), CLASSES, tmp_path, image_pixels=lambda i: [1.0])


def test_cli_prints_the_breakdown_after_the_voc_table(tmp_path, capsys):
    for record in scene(REPORT_CASE):
        record = image_detections(f"im{record.image_id}", record.gt_boxes, record.gt_classes,
                                  record.gt_difficult, record.det_boxes, record.det_classes,
                                  record.det_scores)  # fmt: skip
        write_tool_files(tmp_path, record, CLASSES)
    assert main([str(tmp_path), "--errors"]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = lines.index("type           dAP    count")
    assert lines.index("mAP = 50.00%") < table
    assert [line.split()[0] for line in lines[table + 1 : table + 9]] == list(ALL_TYPES)
    # The folder has classes a, b (c's detection has no GT: ignored, named).
    assert "left out (no GT box): c" in lines
    plots = tmp_path / "plots"
    assert main([str(tmp_path), "--plot-dir", str(plots), "--score-thresh", "0.6"]) == 0
    assert "worst.png skipped" in capsys.readouterr().out
    assert all((plots / name).is_file() for name in FILES)
    assert json.loads((plots / "errors.json").read_text())["score_thresh"] == 0.6


# ----------------------------------------------------------------------------------------------
# Through the recipe's evaluation (a stand-in detector: no training)
# ----------------------------------------------------------------------------------------------


def test_recipe_evaluation_writes_the_analysis(tmp_path, capsys):
    import torch

    import recipe
    from eecs598.settings import DEMO

    class Fixed(torch.nn.Module):
        """Always the same two detections: one on the box of a, one of b on background."""

        def forward(self, images, test_score_thresh=0.0, test_nms_thresh=0.5):
            boxes = torch.tensor([[4.0, 4.0, 20.0, 20.0], [40.0, 40.0, 60.0, 60.0]])
            return boxes, torch.tensor([0, 1]), torch.tensor([0.9, 0.8])

    gt = torch.tensor([[4.0, 4.0, 20.0, 20.0, 0.0], [30.0, 0.0, 40.0, 10.0, 1.0]])
    val = [(f"img{i}.jpg", torch.zeros(3, 64, 64), gt) for i in range(3)]
    settings = DEMO.replace(workers=0, out=str(tmp_path))
    metrics = recipe.evaluate_and_report(Fixed(), val, ["a", "b"], tmp_path, settings, "cpu")
    printed = capsys.readouterr().out
    # Scores are float32 (0.9 is 0.89999998): the suggestion stays below it.
    assert "Bkg" in printed and "use predict --conf 0.899" in printed
    for name in (*FILES, "worst.png", "metrics.json"):
        assert (tmp_path / name).is_file(), name
    errors = json.loads((tmp_path / "metrics.json").read_text())["errors"]
    # a: all found (AP 1); b: a background detection and a missed box per image (AP 0).
    assert errors == metrics["errors"] and errors["mAP_points"] == pytest.approx(50.0)
    assert errors["counts"] == {**dict.fromkeys(ALL_TYPES, 0), "Bkg": 3, "Miss": 3,
                                "FalsePos": 3, "FalseNeg": 3}  # fmt: skip
    assert errors["best_score_thresh"] == pytest.approx(0.9)
    report = json.loads((tmp_path / "errors.json").read_text())
    assert report["worst_images"] == ["img0", "img1", "img2"]
