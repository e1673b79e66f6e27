"""Property tests (hypothesis) over random boxes, degenerate and inverted ones included: IoU,
delta encode/decode, NMS and anchor matching.

The first ones (IoU of boxes with non-negative sizes against torchvision, the unit-weight delta
round trip, NMS with distinct scores at three thresholds) are extended to inverted boxes,
batches, scale invariance, random coder weights, the decode clamp, tied scores, any threshold,
per-class NMS, and the matching rules. They live here, not beside each module's other tests,
so that the modules' own test files (and ``pytest -m sanity``) run where hypothesis is not
installed.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torchvision
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torchvision.models.detection._utils import BoxCoder

from common import box_iou, class_spec_nms, nms
from two_stage_detector import (
    DELTA_SCALE_CLAMP,
    iou,
    rcnn_apply_deltas_to_anchors,
    rcnn_get_deltas_from_anchors,
    rcnn_match_anchors_to_gt,
)

SETTINGS = settings(max_examples=60, deadline=None)

coordinate = st.floats(-50, 150, width=32)
# Any four corners: about half of these boxes are inverted (x2 < x1 or y2 < y1).
any_box = st.tuples(coordinate, coordinate, coordinate, coordinate)
# Well-formed boxes: corner plus a size that may be 0 (a line or a point).
size = st.one_of(st.just(0.0), st.floats(0, 80, width=32))
formed_box = st.tuples(coordinate, coordinate, size, size).map(
    lambda t: (t[0], t[1], t[0] + t[2], t[1] + t[3])
)
mixed_box = st.one_of(formed_box, any_box)


def tensor(rows, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(rows, dtype=dtype).reshape(-1, 4)


def positive(boxes: torch.Tensor) -> torch.Tensor:
    """(N,) True where a box has positive width and height."""
    return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


# ---- IoU ---------------------------------------------------------------------------------------


@SETTINGS
@given(
    a=st.lists(mixed_box, min_size=1, max_size=10),
    b=st.lists(mixed_box, min_size=1, max_size=10),
    scale=st.sampled_from([0.25, 3.0, 40.0]),
)
def test_iou_any_boxes(a, b, scale):
    boxes1, boxes2 = tensor(a), tensor(b)
    result = iou(boxes1, boxes2)
    assert result.shape == (len(a), len(b)) and torch.isfinite(result).all()
    assert ((result >= 0) & (result <= 1)).all()
    assert torch.equal(result, iou(boxes2, boxes1).T)
    # Boxes without area (degenerate or inverted) overlap nothing.
    assert (result[~positive(boxes1)] == 0).all() and (result[:, ~positive(boxes2)] == 0).all()
    # Proper boxes: torchvision's values.
    ok1, ok2 = positive(boxes1), positive(boxes2)
    reference = torchvision.ops.box_iou(boxes1[ok1], boxes2[ok2])
    torch.testing.assert_close(result[ok1][:, ok2], reference, rtol=1e-5, atol=1e-6)
    # Scale invariance (in float64 so that scaling itself is exact enough).
    exact = iou(boxes1.double(), boxes2.double())
    torch.testing.assert_close(iou(boxes1.double() * scale, boxes2.double() * scale), exact)


@SETTINGS
@given(
    a=st.lists(mixed_box, min_size=1, max_size=8),
    b=st.lists(mixed_box, min_size=1, max_size=8),
    seed=st.integers(0, 2**16),
)
def test_iou_batched_equals_per_image(a, b, seed):
    boxes1, boxes2 = tensor(a), tensor(b)
    g = torch.Generator().manual_seed(seed)
    perm1, perm2 = torch.randperm(len(a), generator=g), torch.randperm(len(b), generator=g)
    batched = box_iou(torch.stack([boxes1, boxes1[perm1]]), torch.stack([boxes2, boxes2[perm2]]))
    single = box_iou(boxes1, boxes2)
    assert torch.equal(batched[0], single)
    assert torch.equal(batched[1], single[perm1][:, perm2])


# ---- deltas ------------------------------------------------------------------------------------

proper_box = st.tuples(
    st.floats(-50, 150), st.floats(-50, 150), st.floats(1, 300), st.floats(1, 300)
).map(lambda t: (t[0], t[1], t[0] + t[2], t[1] + t[3]))
weight = st.floats(0.5, 20)


@SETTINGS
@given(
    pairs=st.lists(st.tuples(proper_box, proper_box), min_size=1, max_size=8),
    weights=st.tuples(weight, weight, weight, weight),
    deltas=st.lists(st.tuples(*[st.floats(-3, 3)] * 4), min_size=8, max_size=8),
)
def test_deltas_match_box_coder_for_any_weights(pairs, weights, deltas):
    anchors = tensor([p[0] for p in pairs], torch.float64)
    boxes = tensor([p[1] for p in pairs], torch.float64)
    coder = BoxCoder(weights=weights)
    ours = rcnn_get_deltas_from_anchors(anchors, boxes, weights)
    torch.testing.assert_close(ours, coder.encode_single(boxes, anchors))
    free = torch.tensor(deltas, dtype=torch.float64)[: len(pairs)]
    torch.testing.assert_close(
        rcnn_apply_deltas_to_anchors(free, anchors, weights), coder.decode_single(free, anchors)
    )
    inside = (ours[:, 2:] / torch.tensor(weights[2:], dtype=torch.float64)).abs().max(dim=1)
    keep = inside.values < DELTA_SCALE_CLAMP  # the decode clamp does not bite
    decoded = rcnn_apply_deltas_to_anchors(ours, anchors, weights)
    torch.testing.assert_close(decoded[keep], boxes[keep], rtol=1e-9, atol=1e-7)


@SETTINGS
@given(
    anchors=st.lists(proper_box, min_size=1, max_size=6),
    gt=st.lists(
        st.tuples(proper_box, st.sampled_from([0.0, 3.0, -1.0, -1e8])), min_size=12, max_size=12
    ),  # fmt: skip
)
def test_deltas_batched_and_ignored_rows(anchors, gt):
    anchor_boxes = tensor(anchors, torch.float64)
    n = len(anchors)
    rows = torch.tensor([[*box, cls] for box, cls in gt[: 2 * n]], dtype=torch.float64)
    rows = rows.reshape(2, n, 5)
    batched = rcnn_get_deltas_from_anchors(anchor_boxes, rows)  # (B, N, 4) from (N, 4) anchors
    for i in range(len(rows)):
        assert torch.equal(batched[i], rcnn_get_deltas_from_anchors(anchor_boxes, rows[i]))
    ignored = rows[..., 4] < 0
    assert (batched[ignored] == -1e8).all()
    assert torch.isfinite(batched[~ignored]).all()


@SETTINGS
@given(
    anchors=st.lists(proper_box, min_size=1, max_size=6),
    deltas=st.lists(st.tuples(*[st.floats(-1e6, 1e6)] * 4), min_size=6, max_size=6),
)
def test_decode_any_finite_deltas_is_bounded(anchors, deltas):
    anchor_boxes = tensor(anchors, torch.float64)
    d = torch.tensor(deltas, dtype=torch.float64)[: len(anchors)]
    before = d.clone()
    boxes = rcnn_apply_deltas_to_anchors(d, anchor_boxes)
    assert torch.equal(d, before)  # inputs untouched
    assert torch.isfinite(boxes).all()
    wh, anchor_wh = boxes[:, 2:] - boxes[:, :2], anchor_boxes[:, 2:] - anchor_boxes[:, :2]
    assert (wh >= 0).all()
    assert (wh <= anchor_wh * math.exp(DELTA_SCALE_CLAMP) * (1 + 1e-9)).all()


# ---- NMS ---------------------------------------------------------------------------------------
# Thresholds are float32 values: ``nms`` compares float32 IoUs with the threshold rounded to
# float32, torchvision with the double threshold, so e.g. IoU 1.0 against 0.9999999999999999
# would be "not above" here and "above" there.


def greedy_nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> list[int]:
    """Textbook greedy NMS; equal scores are visited in index order."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    overlaps = box_iou(boxes, boxes)
    kept: list[int] = []
    for i in order:
        if all(overlaps[k, i] <= threshold for k in kept):
            kept.append(i)
    return kept


@settings(max_examples=80, deadline=None)
@given(
    rows=st.lists(
        st.tuples(mixed_box, st.sampled_from([0.1, 0.5, 0.5, 0.9])), min_size=1, max_size=30
    ),  # fmt: skip
    threshold=st.floats(0, 1, width=32),
)
def test_nms_any_boxes_tied_scores_any_threshold(rows, threshold):
    boxes = tensor([r[0] for r in rows])
    scores = torch.tensor([r[1] for r in rows])
    kept = nms(boxes, scores, threshold)
    assert kept.tolist() == greedy_nms(boxes, scores, threshold)
    assert (scores[kept][:-1] >= scores[kept][1:]).all()
    overlaps = box_iou(boxes, boxes)
    among_kept = overlaps[kept][:, kept].fill_diagonal_(0)
    assert (among_kept <= threshold).all()
    dropped = torch.ones(len(rows), dtype=torch.bool)
    dropped[kept] = False
    for i in dropped.nonzero().flatten().tolist():  # each one suppressed by a kept box
        assert (overlaps[kept, i] > threshold).any()


# Integer corners: class_spec_nms shifts boxes by large per-class offsets, which is exact for
# integers in float32 but rounds other values (a 1e-4 IoU change that may cross a threshold).
integer_box = st.tuples(*[st.integers(-50, 150)] * 2, *[st.integers(0, 80)] * 2).map(
    lambda t: (t[0], t[1], t[0] + t[2], t[1] + t[3])
)


def distinct_scores(count: int, seed: int) -> torch.Tensor:
    """``count`` distinct scores in random order: with ties torchvision's order is unspecified."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return torch.linspace(0.05, 0.95, count)[order]


@SETTINGS
@given(
    rows=st.lists(formed_box, min_size=1, max_size=30),
    threshold=st.floats(0, 1, width=32),
    seed=st.integers(0, 2**16),
)
def test_nms_matches_torchvision_any_threshold(rows, threshold, seed):
    boxes = tensor(rows)
    scores = distinct_scores(len(rows), seed)
    assert torch.equal(nms(boxes, scores, threshold), torchvision.ops.nms(boxes, scores, threshold))


@SETTINGS
@given(
    rows=st.lists(st.tuples(integer_box, st.integers(0, 3)), min_size=1, max_size=30),
    threshold=st.floats(0, 1, width=32),
    seed=st.integers(0, 2**16),
)
def test_class_nms_equals_nms_per_class(rows, threshold, seed):
    """Reference: torchvision's NMS run on each class alone. (``torchvision.ops.batched_nms``
    is no reference here: its offset trick assumes coordinates >= 0, and e.g. class 2's box
    (-2, -2, -1, -1) then lands on class 1's (0, 0, 1, 1) and suppresses it.)"""
    boxes = tensor([r[0] for r in rows])
    classes = torch.tensor([r[1] for r in rows])
    scores = distinct_scores(len(rows), seed)
    kept = []
    for c in classes.unique():
        members = (classes == c).nonzero().flatten()
        kept.append(members[torchvision.ops.nms(boxes[members], scores[members], threshold)])
    reference = torch.cat(kept)
    reference = reference[scores[reference].argsort(descending=True)]
    assert torch.equal(class_spec_nms(boxes, scores, classes, threshold), reference)


# ---- anchor matching ---------------------------------------------------------------------------

gt_row = st.one_of(
    st.tuples(formed_box, st.integers(0, 4)).map(lambda t: (*t[0], float(t[1]))),
    st.just((-1.0, -1.0, -1.0, -1.0, -1.0)),  # padding
)


@settings(max_examples=80, deadline=None)
@given(
    anchors=st.lists(mixed_box, min_size=1, max_size=12),
    gt=st.lists(gt_row, min_size=1, max_size=5),
    low=st.floats(0, 0.9),
    gap=st.floats(0, 0.6),
    low_quality=st.booleans(),
)
def test_matching_rules(anchors, gt, low, gap, low_quality):
    anchor_boxes = tensor(anchors)
    gt_rows = torch.tensor(gt, dtype=torch.float32)
    high = min(1.0, low + gap)
    matched = rcnn_match_anchors_to_gt(anchor_boxes, gt_rows, (low, high), low_quality)
    assert matched.shape == (len(anchors), 5)

    valid = gt_rows[:, 4] >= 0
    overlaps = iou(anchor_boxes, gt_rows[:, :4]).masked_fill(~valid, -1.0)  # (N, M)
    if not valid.any():
        assert (matched == -1).all()
        return
    quality, best = overlaps.max(dim=1)  # first best GT on ties
    foreground = quality >= high
    if low_quality:  # each GT's best anchors (when it overlaps any anchor at all)
        best_per_gt = overlaps.max(dim=0).values
        is_best = (overlaps == best_per_gt) & (best_per_gt > 0) & valid
        foreground |= is_best.any(dim=1)
    for i in range(len(anchors)):
        if foreground[i]:
            assert torch.equal(matched[i], gt_rows[best[i]])
            assert overlaps[i].max() == overlaps[i, best[i]]
        elif quality[i] <= low:
            assert (matched[i] == -1).all()
        else:
            assert (matched[i] == -1e8).all()
    # Batched with a GT-free image gives the same rows and all background there.
    batch = torch.stack([gt_rows, torch.full_like(gt_rows, -1.0)])
    batched = rcnn_match_anchors_to_gt(anchor_boxes, batch, (low, high), low_quality)
    assert torch.equal(batched[0], matched) and (batched[1] == -1).all()


# ---- the detector's NMS, both implementations -----------------------------------------------


def _reference_nms_topk(boxes, scores, group_index, valid, threshold, topk):
    """``torchvision.ops.nms`` on each group's valid members (listed by increasing position),
    then each image's survivors by decreasing score, equal scores by position, top ``topk``."""
    index = torch.zeros(len(boxes), topk, dtype=torch.long)
    mask = torch.zeros(len(boxes), topk, dtype=torch.bool)
    for b in range(len(boxes)):
        kept = []
        for members in group_index:
            members = members[valid[b, members]]
            kept.append(
                members[torchvision.ops.nms(boxes[b, members], scores[b, members], threshold)]
            )
        kept = torch.sort(torch.cat(kept)).values
        kept = kept[torch.sort(scores[b, kept], descending=True, stable=True).indices][:topk]
        index[b, : len(kept)] = kept
        mask[b, : len(kept)] = True
    return index, mask


nms_box = st.one_of(
    integer_box,  # ties of coordinates and of IoU values
    formed_box,
).map(lambda t: tuple(float(v) for v in t))


@settings(max_examples=int(os.environ.get("NMS_EXAMPLES", 100)), deadline=None)
@given(
    data=st.data(),
    batch=st.integers(1, 3),
    num_groups=st.integers(1, 3),
    group_size=st.integers(1, 12),
    threshold=st.sampled_from([0.0, 0.3, 0.5, 0.7, 0.9, 1.0]) | st.floats(0, 1),
    tied_scores=st.booleans(),
    sweeps=st.integers(1, 16),
    interleaved=st.booleans(),
)
def test_batched_nms_topk_equals_torchvision_nms(
    data, batch, num_groups, group_size, threshold, tied_scores, sweeps, interleaved
):
    """Both ``batched_nms_topk`` implementations (fixed shape: IoU matrices + fixed-point
    sweeps, no boolean indexing; and one ``batched_nms`` call) keep exactly torchvision's boxes
    per group, in the documented order, for any sweep count (``sweeps=1`` exercises the
    convergence loop), contiguous or interleaved groups, and tied scores."""
    import common
    from common import batched_nms_topk

    count = batch * num_groups * group_size
    boxes = tensor(data.draw(st.lists(nms_box, min_size=count, max_size=count)))
    boxes = boxes.view(batch, num_groups * group_size, 4)
    if tied_scores:
        levels = data.draw(st.lists(st.integers(0, 3), min_size=count, max_size=count))
        scores = torch.tensor(levels, dtype=torch.float32) / 4
    else:
        scores = torch.rand(
            count, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 2**32)))
        )
    scores = scores.view(batch, -1)
    valid = torch.tensor(data.draw(st.lists(st.booleans(), min_size=count, max_size=count)))
    valid = valid.view(batch, -1)
    positions = torch.arange(num_groups * group_size)
    groups = positions.view(-1, num_groups).T if interleaved else positions.view(num_groups, -1)
    topk = data.draw(st.integers(1, count + 2))
    ref_index, ref_mask = _reference_nms_topk(boxes, scores, groups, valid, threshold, topk)
    saved = common.FIXED_SHAPE_NMS
    try:
        for fixed_shape in (True, False):
            common.FIXED_SHAPE_NMS = fixed_shape
            index, mask = batched_nms_topk(
                boxes, scores, groups, valid, threshold, topk, sweeps=sweeps
            )
            assert torch.equal(mask, ref_mask), fixed_shape
            assert torch.equal(index, ref_index), fixed_shape
    finally:
        common.FIXED_SHAPE_NMS = saved


@pytest.mark.parametrize("fixed_shape", [True, False])
def test_batched_nms_topk_threshold_compared_as_torchvision_does(monkeypatch, fixed_shape):
    """IoU 1/10 is the float32 nearest 0.1, just above 0.1: torchvision's CPU kernel compares
    in double precision and suppresses, so must the fixed-shape NMS (a float32 ``iou > 0.1``
    would not)."""
    import common
    from common import batched_nms_topk

    monkeypatch.setattr(common, "FIXED_SHAPE_NMS", fixed_shape)
    boxes = torch.tensor([[[0.0, 0.0, 1.0, 10.0], [0.0, 0.0, 1.0, 1.0]]])
    scores = torch.tensor([[0.9, 0.8]])
    assert torch.equal(torchvision.ops.nms(boxes[0], scores[0], 0.1), torch.tensor([0]))
    groups = torch.arange(2).view(1, 2)
    index, mask = batched_nms_topk(
        boxes, scores, groups, torch.ones(1, 2, dtype=torch.bool), 0.1, 2
    )
    assert mask.tolist() == [[True, False]] and index[0, 0] == 0


# ---- IoU, deltas and NMS on well-formed boxes -------------------------------------------------


def _boxes(rows) -> torch.Tensor:
    t = torch.tensor(rows, dtype=torch.float32)
    return torch.cat([t[:, :2], t[:, :2] + t[:, 2:4]], dim=1)


box_rows = st.lists(
    st.tuples(*[st.floats(0, 100, width=32)] * 2, *[st.floats(0, 50, width=32)] * 2),
    min_size=1,
    max_size=12,
)


@settings(max_examples=80, deadline=None)
@given(a=box_rows, b=box_rows)
def test_iou_property_bounds_symmetry_reference(a, b):
    boxes1, boxes2 = _boxes(a), _boxes(b)
    result = iou(boxes1, boxes2)
    assert result.shape == (len(a), len(b))
    assert torch.all((result >= 0) & (result <= 1))
    assert torch.equal(result, iou(boxes2, boxes1).T)
    reference = torchvision.ops.box_iou(boxes1, boxes2).nan_to_num(0.0)  # 0/0 for empty boxes
    assert torch.allclose(result, reference, atol=1e-6)
    positive = (boxes1[:, 2:] > boxes1[:, :2]).all(1)
    assert torch.allclose(iou(boxes1, boxes1).diagonal()[positive], torch.ones(int(positive.sum())))


@settings(max_examples=80, deadline=None)
@given(
    anchor=st.tuples(*[st.floats(-50, 50)] * 2, *[st.floats(1, 300)] * 2),
    box=st.tuples(*[st.floats(-50, 50)] * 2, *[st.floats(1, 300)] * 2),
)
def test_delta_round_trip_property(anchor, box):
    ratios = [box[2] / anchor[2], box[3] / anchor[3]]
    assume(all(1000 / 16 > r > 16 / 1000 for r in ratios))  # inside the decode clamp
    anchors = _boxes([anchor]).double()
    boxes = _boxes([box]).double()
    deltas = rcnn_get_deltas_from_anchors(anchors, boxes)
    assert torch.allclose(rcnn_apply_deltas_to_anchors(deltas, anchors), boxes, atol=1e-6)


box_lists = st.lists(
    st.tuples(
        st.floats(0, 100, width=32),
        st.floats(0, 100, width=32),
        st.floats(0, 60, width=32),
        st.floats(0, 60, width=32),
        st.floats(0, 1, width=32),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(rows=box_lists, threshold=st.sampled_from([0.3, 0.5, 0.7]))
def test_nms_property_matches_torchvision(rows, threshold):
    t = torch.tensor(rows)
    boxes = torch.cat([t[:, :2], t[:, :2] + t[:, 2:4]], dim=1)  # zero-size boxes included
    # Distinct scores: with ties torchvision's order is unspecified.
    scores = t[:, 4] + torch.arange(len(t)) * 1e-3
    assert torch.equal(nms(boxes, scores, threshold), torchvision.ops.nms(boxes, scores, threshold))
