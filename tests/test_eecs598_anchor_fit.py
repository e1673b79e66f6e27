"""Tests for eecs598.anchor_fit: the shape IoU, the best-possible recall, the fit on generated
box sets (tiny boxes, a blood-cell-like mixture, elongated boxes, no boxes) and the box sizes
read from annotation records."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from eecs598.anchor_fit import (
    AnchorFit,
    anchor_shapes,
    best_possible_recall,
    fit_anchors,
    grid_best_iou,
    shape_iou,
    training_box_sizes,
)
from eecs598.voc import ImageAnnotation

STRIDES = {"p3": 8, "p4": 16, "p5": 32}
STRIDES_P2 = {"p2": 4, **STRIDES}
DEFAULT_SIZES = {"p3": [64.0], "p4": [128.0], "p5": [256.0]}


def _centred(wh: np.ndarray) -> torch.Tensor:
    """``(N, 4)`` float64 boxes centred on the origin."""
    half = torch.from_numpy(np.asarray(wh, dtype=np.float64)) / 2
    return torch.cat([-half, half], dim=1)


def _tiny_boxes(n: int = 2000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(8, 12, (n, 2))


def _blood_cells(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Squares of about 18, 50 and 90 px (8% spread, +-10% aspect jitter) and their class."""
    rng = np.random.default_rng(seed)
    side = np.concatenate([rng.normal(m, 0.08 * m, 600) for m in (18, 50, 90)])
    wh = side[:, None] * rng.uniform(0.9, 1.1, (len(side), 2))
    return wh, np.repeat([2, 0, 1], 600)


def _voc_like(n: int, seed: int = 0) -> np.ndarray:
    """Log-uniform sizes 10..220 px, log-normal aspect ratios."""
    rng = np.random.default_rng(seed)
    side = np.exp(rng.uniform(np.log(10), np.log(220), n))
    ratio = np.exp(rng.normal(0.0, 0.6, n))
    return np.stack([side / np.sqrt(ratio), side * np.sqrt(ratio)], axis=1)


def _check_sizes(fit: AnchorFit, strides: dict[str, int]) -> None:
    assert list(fit.sizes) == sorted(strides, key=strides.get)
    counts = {len(sizes) for sizes in fit.sizes.values()}
    assert len(counts) == 1 and counts.pop() in (1, 2, 3)
    flat = []
    for level, sizes in fit.sizes.items():
        assert all(strides[level] <= s <= 16 * strides[level] for s in sizes), (level, sizes)
        assert all(a < b for a, b in zip(sizes, sizes[1:], strict=False)), sizes
        flat += sizes
    assert flat == sorted(flat)


# ----------------------------------------------------------------------------------------------
# The measure
# ----------------------------------------------------------------------------------------------


def test_shape_iou_matches_torchvision_on_centred_boxes():
    rng = np.random.default_rng(1)
    boxes, anchors = rng.uniform(0.5, 300, (50, 2)), rng.uniform(0.5, 300, (40, 2))
    expected = box_iou(_centred(boxes), _centred(anchors)).numpy()
    iou = shape_iou(boxes, anchors)
    assert iou.shape == (50, 40) and iou.dtype == np.float64
    np.testing.assert_allclose(iou, expected, rtol=1e-12, atol=1e-12)


def test_best_possible_recall_hand_worked():
    anchors = np.array([[10.0, 10.0]])
    # 10x10: IoU 1; 12x12: 100/144 = 0.69; 20x20: 0.25.
    boxes = np.array([[10.0, 10.0], [12.0, 12.0], [20.0, 20.0]])
    assert best_possible_recall(boxes, anchors, 0.6) == pytest.approx(2 / 3)
    assert best_possible_recall(boxes, anchors, 0.7) == pytest.approx(1 / 3)
    assert best_possible_recall(np.zeros((0, 2)), anchors, 0.6) == 0.0


def test_anchor_shapes_area_ratio_and_order():
    wh = anchor_shapes({"p3": [64.0], "p4": [100.0, 128.0]}, (0.5, 1.0, 2.0))
    assert wh.shape == (9, 2)
    np.testing.assert_allclose(wh.prod(1), np.repeat([64.0, 100.0, 128.0], 3) ** 2)
    np.testing.assert_allclose(wh[:, 1] / wh[:, 0], np.tile([0.5, 1.0, 2.0], 3))


# ----------------------------------------------------------------------------------------------
# The fit
# ----------------------------------------------------------------------------------------------


def test_default_anchors_miss_tiny_boxes_and_the_fit_finds_them():
    boxes = _tiny_boxes()
    default = best_possible_recall(boxes, anchor_shapes(DEFAULT_SIZES, (0.5, 1.0, 2.0)), 0.6)
    assert default < 0.05
    fit = fit_anchors(boxes, STRIDES)
    assert fit.recall_before == pytest.approx(default)
    assert fit.recall_after >= 0.95
    assert fit.num_boxes == 2000 and fit.unmatched == round(2000 * (1 - fit.recall_after))
    assert min(fit.sizes["p3"]) < 16  # the 10 px boxes live on p3
    measured = best_possible_recall(boxes, anchor_shapes(fit.sizes, fit.aspect_ratios), 0.6)
    assert measured == pytest.approx(fit.recall_after)
    _check_sizes(fit, STRIDES)


def test_blood_cell_mixture_gets_sizes_near_each_mode():
    boxes, classes = _blood_cells()
    fit = fit_anchors(boxes, STRIDES, classes=classes, class_names=["RBC", "WBC", "Platelets"])
    assert fit.recall_after >= 0.95
    flat = np.array([s for sizes in fit.sizes.values() for s in sizes])
    for mode in (18, 50, 90):
        assert np.abs(np.log2(flat / mode)).min() < 0.3, (mode, fit.sizes)
    assert set(fit.recall_per_class_after) == {"RBC", "WBC", "Platelets"}
    assert min(fit.recall_per_class_after.values()) >= 0.9
    assert fit.recall_per_class_before["Platelets"] < 0.05  # 18 px against 64 px anchors
    assert "Platelets" in fit.report()


@pytest.mark.parametrize(
    "boxes, strides",
    [
        (_tiny_boxes(500), STRIDES),
        (_blood_cells()[0], STRIDES_P2),
        (_voc_like(3000), STRIDES),
        (_voc_like(1000, seed=3) * 3, STRIDES_P2),  # many boxes larger than any anchor
    ],
)
def test_sizes_stay_in_range_and_ordered_and_the_fit_is_deterministic(boxes, strides):
    fit = fit_anchors(boxes, strides)
    _check_sizes(fit, strides)
    assert fit.recall_after >= fit.recall_before
    assert fit_anchors(boxes, strides) == fit
    config = fit.config()
    assert json.loads(json.dumps(config)) == config
    assert config == {"anchor_sizes": fit.sizes, "anchor_aspect_ratios": fit.aspect_ratios}


@pytest.mark.parametrize("seed", range(4))
def test_recall_after_never_below_before(seed):
    rng = np.random.default_rng(seed)
    # A random mixture around the default sizes, where the defaults already do well.
    side = rng.choice([64.0, 128.0, 256.0], 800) * rng.uniform(0.8, 1.25, 800)
    ratio = rng.choice([0.5, 1.0, 2.0], 800)
    boxes = np.stack([side / np.sqrt(ratio), side * np.sqrt(ratio)], axis=1)
    for k in (None, 1, 2):
        fit = fit_anchors(boxes, STRIDES, sizes_per_level=k)
        assert fit.recall_after >= fit.recall_before, k
        if k is not None:
            assert {len(s) for s in fit.sizes.values()} == {k}


def test_fewest_sizes_within_tolerance_are_chosen():
    # One size per level already matches every tiny box: more sizes would gain nothing.
    fit = fit_anchors(_tiny_boxes(), STRIDES)
    assert {len(s) for s in fit.sizes.values()} == {1}
    # Levels no box needs keep their default size.
    assert fit.sizes["p4"] == [128.0] and fit.sizes["p5"] == [256.0]


def test_elongated_boxes_get_a_tall_ratio_or_are_reported():
    rng = np.random.default_rng(2)
    width = rng.uniform(10, 40, 1000)
    boxes = np.stack([width, 4 * width], axis=1)
    fit = fit_anchors(boxes, STRIDES)
    assert max(fit.aspect_ratios) > 2 or fit.unmatched > 0
    assert fit.recall_after >= 0.95
    report = fit.report()
    for level in STRIDES:
        assert level in report
    assert f"{100 * fit.recall_before:.1f}%" in report
    assert f"{100 * fit.recall_after:.1f}%" in report
    assert f"{fit.unmatched} boxes" in report


def test_report_describes_unmatched_boxes():
    boxes = np.concatenate([_tiny_boxes(990), np.full((10, 2), [2.0, 40.0])])  # h/w 20
    fit = fit_anchors(boxes, STRIDES)
    assert fit.unmatched == 10
    assert fit.unmatched_ratio_range == pytest.approx((20.0, 20.0))
    assert "10 boxes (1.0%)" in fit.report()


def test_no_boxes_warns_and_keeps_the_defaults():
    with pytest.warns(UserWarning, match="no boxes"):
        fit = fit_anchors(np.zeros((0, 2)), STRIDES)
    assert fit.sizes == DEFAULT_SIZES and fit.aspect_ratios == [0.5, 1.0, 2.0]
    assert (fit.recall_before, fit.recall_after, fit.unmatched, fit.num_boxes) == (0, 0, 0, 0)
    assert "no boxes" in fit.report()
    assert fit.config()["anchor_sizes"] == DEFAULT_SIZES


def test_invalid_input_raises():
    with pytest.raises(ValueError, match="shape"):
        fit_anchors(np.ones((3, 3)), STRIDES)
    with pytest.raises(ValueError, match="positive"):
        fit_anchors(np.array([[1.0, 0.0]]), STRIDES)
    with pytest.raises(ValueError, match="one class per box"):
        fit_anchors(np.ones((3, 2)), STRIDES, classes=np.zeros(2))


def test_many_boxes_are_fitted_on_a_subsample_and_scored_on_all():
    boxes = _voc_like(25000)  # above the subsampling limit
    fit = fit_anchors(boxes, STRIDES)
    assert fit.num_boxes == 25000 and fit.recall_after >= fit.recall_before
    _check_sizes(fit, STRIDES)


# ----------------------------------------------------------------------------------------------
# The data
# ----------------------------------------------------------------------------------------------


def _record(image_id: str, boxes, classes, difficult) -> ImageAnnotation:
    return ImageAnnotation(
        image_id,
        f"/nowhere/{image_id}.jpg",
        640,
        480,
        np.asarray(boxes, dtype=np.float32),
        np.asarray(classes, dtype=np.int64),
        np.asarray(difficult, dtype=bool),
    )


def test_training_box_sizes_resize_and_crop():
    records = [
        _record(
            "a",
            [[100, 100, 200, 148], [0, 0, 50, 50], [10, 10, 20, 20]],
            [0, 1, 2],
            [False, False, True],
        ),
        _record("b", [[300, 0, 620, 480]], [1], [False]),
        _record("c", np.zeros((0, 4)), [], []),
    ]
    # 640x480 -> 299x224: x scale 299/640, y scale 224/480 = 0.4667; the difficult box is left out.
    sx, sy = 299 / 640, 224 / 480
    wh, classes = training_box_sizes(records, 224)
    expected = [[100 * sx, 48 * sy], [50 * sx, 50 * sy], [320 * sx, 480 * sy]]
    np.testing.assert_allclose(wh, expected, rtol=1e-5)
    np.testing.assert_array_equal(classes, [0, 1, 1])
    # Centre crop 224x224 from x = 37: the corner box falls outside; "b" is cut at x = 261.
    wh, classes = training_box_sizes(records, 224, crop=True)
    np.testing.assert_allclose(wh, [[100 * sx, 48 * sy], [261 - 300 * sx, 224]], rtol=1e-5)
    np.testing.assert_array_equal(classes, [0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit = fit_anchors(wh, STRIDES, classes=classes)
    assert set(fit.recall_per_class_after) == {"class 0", "class 1"}


def test_training_box_sizes_of_no_records():
    wh, classes = training_box_sizes([], 224)
    assert wh.shape == (0, 2) and classes.shape == (0,)


@pytest.mark.parametrize("offset", [0.0, 0.5])
def test_grid_best_iou_matches_every_anchor_of_the_grid(offset):
    """The nearest-centre shortcut equals the best torchvision ``box_iou`` over every anchor
    the RPN places (``generate_fpn_anchors`` on every location of each level)."""
    from common import get_fpn_location_coords
    from two_stage_detector import generate_fpn_anchors

    rng = np.random.default_rng(0)
    height, width = 96, 128
    wh = np.exp(rng.uniform(np.log(3), np.log(90), (300, 2)))
    x1 = rng.uniform(0, width - wh[:, 0])
    y1 = rng.uniform(0, height - wh[:, 1])
    boxes = np.stack([x1, y1, x1 + wh[:, 0], y1 + wh[:, 1]], axis=1)
    sizes = {"p3": [12.0, 24.0], "p4": [40.0, 56.0], "p5": [80.0, 112.0]}
    ratios = (0.5, 1.0, 2.0)
    shapes = {lv: (1, 8, height // s, width // s) for lv, s in STRIDES.items()}
    centres = get_fpn_location_coords(shapes, STRIDES, dtype=torch.float64, offset=offset)
    anchors = torch.cat([
        generate_fpn_anchors({lv: centres[lv]}, STRIDES, [x / STRIDES[lv] for x in sizes[lv]],
                             ratios)[lv]
        for lv in STRIDES
    ])  # fmt: skip
    expected = box_iou(torch.from_numpy(boxes), anchors.double()).max(1).values.numpy()

    sides = np.tile([width, height], (len(boxes), 1))
    got = grid_best_iou(boxes, sizes, ratios, STRIDES, offset=offset, image_wh=sides)

    np.testing.assert_allclose(got, expected, atol=1e-9)
    # The grid costs boxes about a stride or two across that an anchor shape fits well:
    # their best IoU falls well below the shape IoU the fit scores.
    shape_best = shape_iou(wh, anchor_shapes(sizes, ratios)).max(1)
    assert (got <= shape_best + 1e-9).all()
    fitted_small = (shape_best >= 0.6) & (wh.prod(1) ** 0.5 < 20)
    assert fitted_small.sum() >= 10
    assert got[fitted_small].mean() < shape_best[fitted_small].mean() - 0.1
