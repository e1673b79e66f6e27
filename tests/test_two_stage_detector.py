"""Tests of two_stage_detector.py: every value the notebook prints as expected, agreement with
torchvision's references, and the RPN / Faster R-CNN modules end to end.

All of them are among the student's quick checks (``pytest -m sanity``); the longer ones are in
``test_two_stage_detector_training.py``."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torchvision
from support import make_gt, painted_images, small_faster_rcnn
from torch import nn
from torch.nn import functional as F
from torchvision.models.detection._utils import BoxCoder

import common
from common import DetectorBackboneWithFPN, get_fpn_location_coords, training_diagnostics
from eecs598.grad import rel_error
from eecs598.training import LossHistory, train_detector
from two_stage_detector import (
    RPN,
    FasterRCNN,
    RPNPredictionNetwork,
    assign_fpn_levels,
    compile_detector,
    fpn_roi_align,
    generate_fpn_anchors,
    hello_two_stage_detector,
    iou,
    rcnn_apply_deltas_to_anchors,
    rcnn_get_deltas_from_anchors,
    rcnn_match_anchors_to_gt,
    reassign_proposals_to_fpn_levels,
    sample_rpn_training,
    sample_rpn_training_masks,
)

pytestmark = pytest.mark.sanity


def test_hello(capsys):
    hello_two_stage_detector()
    assert capsys.readouterr().out == "Hello from two_stage_detector.py!\n"


# ---------------------------------------------------------------- notebook sanity cells


def test_notebook_rpn_prediction_shapes():
    """Section 3.5: p4 objectness (2, 196, 3) and p5 deltas (2, 49, 12), flattened per anchor."""
    torch.manual_seed(0)
    backbone = DetectorBackboneWithFPN(out_channels=64, pretrained=False)
    feats = backbone(torch.randn(2, 3, 224, 224))
    rpn_pred_net = RPNPredictionNetwork(in_channels=64, stem_channels=[64], num_anchors=3)
    obj, box = rpn_pred_net(feats)
    assert obj["p4"].shape == (2, 196 * 3)
    assert box["p5"].shape == (2, 49 * 3, 4)
    assert obj["p3"].shape == (2, 784 * 3) and box["p3"].shape == (2, 784 * 3, 4)
    # The notebook's (B, H*W, A) and (B, H*W, 4A) forms are views of the same numbers.
    assert obj["p4"].view(2, 196, 3).shape == (2, 196, 3)
    assert box["p5"].view(2, 49, 12).shape == (2, 49, 12)


def test_head_order_matches_anchor_order():
    """Channel a of pred_obj at location (h, w) lands on anchor index (h*W + w)*A + a."""
    net = RPNPredictionNetwork(in_channels=4, stem_channels=[4], num_anchors=3)
    feats = {"p5": torch.randn(1, 4, 2, 3)}
    obj, box = net(feats)
    raw_obj = net.pred_obj(net.stem_rpn(feats["p5"]))[0]  # (A, H, W)
    raw_box = net.pred_box(net.stem_rpn(feats["p5"]))[0]  # (4A, H, W)
    for h in range(2):
        for w in range(3):
            for a in range(3):
                index = (h * 3 + w) * 3 + a
                assert obj["p5"][0, index] == raw_obj[a, h, w]
                assert torch.equal(box["p5"][0, index], raw_box[4 * a : 4 * a + 4, h, w])


def test_notebook_anchors_p5():
    """Section 3.6.1: P5 anchors of a 2x2 map, stride scale 2 (any ordering is fine)."""
    locations = get_fpn_location_coords(
        shape_per_fpn_level={"p5": (2, 64, 2, 2)}, strides_per_fpn_level={"p5": 32}
    )
    anchors = generate_fpn_anchors(
        locations_per_fpn_level=locations,
        strides_per_fpn_level={"p5": 32},
        stride_scale=2,
        aspect_ratios=[0.5, 1.0, 2.0],
    )["p5"]
    assert anchors.shape == (12, 4)
    expected_1_2 = torch.tensor(
        [
            [-29.2548, -6.6274, 61.2548, 38.6274],
            [-29.2548, 25.3726, 61.2548, 70.6274],
            [2.7452, -6.6274, 93.2548, 38.6274],
            [2.7452, 25.3726, 93.2548, 70.6274],
        ]
    )
    expected_1_1 = torch.tensor(
        [[-16.0, -16.0, 48.0, 48.0], [-16.0, 16.0, 48.0, 80.0], [16.0, -16.0, 80.0, 48.0]]
        + [[16.0, 16.0, 80.0, 80.0]]
    )
    expected_2_1 = expected_1_2[:, [1, 0, 3, 2]]  # flipped coordinates

    def same_rows(actual, expected):
        key = lambda t: sorted(map(tuple, t.round(decimals=4).tolist()))  # noqa: E731
        return key(actual) == key(expected)

    assert same_rows(anchors[0::3], expected_1_2)
    assert same_rows(anchors[1::3], expected_1_1)
    assert same_rows(anchors[2::3], expected_2_1)


def test_multi_scale_anchors_match_torchvision_anchor_generator():
    """Several sizes per level: the same boxes as torchvision's ``AnchorGenerator`` (which
    puts anchors on cell corners, so ours shift by half a stride), in our documented order:
    location, then size, then aspect ratio."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList

    strides = {"p3": 8, "p4": 16}
    shapes = {"p3": (1, 4, 6, 4), "p4": (1, 4, 3, 2)}
    ratios = (0.5, 1.0, 2.0)
    scales = (2.0, 4.0)
    locations = get_fpn_location_coords(shapes, strides, dtype=torch.float64)
    ours = generate_fpn_anchors(locations, strides, scales, ratios)
    generator = AnchorGenerator(
        sizes=tuple(tuple(k * s for k in scales) for s in strides.values()),
        aspect_ratios=(ratios,) * len(strides),
    )
    images = ImageList(torch.zeros(1, 3, 48, 32, dtype=torch.float64), [(48, 32)])
    theirs = generator(images, [torch.zeros(shapes[k], dtype=torch.float64) for k in strides])[0]
    start = 0
    for level, stride in strides.items():
        count = len(ours[level])
        assert count == shapes[level][2] * shapes[level][3] * len(scales) * len(ratios)
        # torchvision: (H*W, ratio, size) with rounded half sizes; ours: (H*W, size, ratio).
        expected = theirs[start : start + count].view(-1, len(ratios), len(scales), 4)
        expected = expected.transpose(1, 2).reshape(-1, 4) + stride / 2
        torch.testing.assert_close(ours[level], expected, atol=0.5, rtol=0)
        start += count
        sides = (ours[level][:, 2:] - ours[level][:, :2]).prod(dim=1).sqrt().view(-1, 2, 3)
        torch.testing.assert_close(
            sides[0, :, 0], torch.tensor(scales, dtype=torch.float64) * stride
        )
    # A single number gives exactly the notebook's anchors.
    single = generate_fpn_anchors(locations, strides, 4.0, ratios)
    listed = generate_fpn_anchors(locations, strides, [4.0], ratios)
    for level in strides:
        assert torch.equal(single[level], listed[level])


def test_rpn_with_two_anchor_sizes_trains():
    """``anchor_stride_scale=(2, 4)``: 6 anchors per location end to end (outputs, losses)."""
    torch.manual_seed(0)
    rpn = RPN(fpn_channels=8, stem_channels=[8], anchor_stride_scale=(2, 4), post_nms_topk=10)
    feats = {"p3": torch.randn(2, 8, 8, 8), "p4": torch.randn(2, 8, 4, 4)}
    gt = torch.tensor([[[4.0, 4.0, 20.0, 20.0, 0.0]], [[10.0, 30.0, 60.0, 62.0, 1.0]]])
    out = rpn(feats, {"p3": 8, "p4": 16}, gt)
    assert rpn.pred_net.num_anchors == 6
    assert rpn.config["anchor_stride_scale"] == [2.0, 4.0]
    assert out["proposal_boxes"].shape == (2, 10, 4)
    assert torch.isfinite(out["loss_rpn_obj"]) and out["loss_rpn_box"] > 0
    (out["loss_rpn_obj"] + out["loss_rpn_box"]).backward()


def test_notebook_iou():
    """Section 3.6.2: relative error 1e-7 or less."""
    boxes1 = torch.Tensor([[10, 10, 90, 90], [20, 20, 40, 40], [60, 60, 80, 80]])
    boxes2 = torch.Tensor([[10, 10, 90, 90], [60, 60, 80, 80], [30, 30, 70, 70]])
    expected_iou = torch.Tensor(
        [[1.0, 0.0625, 0.25], [0.0625, 0.0, 0.052631579], [0.0625, 1.0, 0.052631579]]
    )
    assert rel_error(expected_iou, iou(boxes1, boxes2)) <= 1e-7


def test_notebook_deltas_round_trip_and_background():
    """Section 3.6.4: exact round trip; background deltas -1e8, decoded -1e8 or lower."""
    input_anchors = torch.Tensor([[20, 40, 80, 90], [10, 10, 50, 50], [120, 100, 200, 200]])
    input_boxes = torch.Tensor(
        [[10, 15, 100, 115, 1], [30, 20, 40, 30, 1], [120, 100, 200, 200, 1]]
    )
    deltas = rcnn_get_deltas_from_anchors(input_anchors, input_boxes)
    output = rcnn_apply_deltas_to_anchors(deltas, input_anchors)
    assert rel_error(input_boxes[:, :4], output) <= 1e-6

    background_box = torch.Tensor([[-1, -1, -1, -1, -1]])
    input_anchor = torch.Tensor([[100, 100, 200, 200]])
    deltas = rcnn_get_deltas_from_anchors(input_anchor, background_box)
    assert torch.equal(deltas, torch.full((1, 4), -1e8))
    assert torch.all(rcnn_apply_deltas_to_anchors(deltas, input_anchor) <= -1e8)


def test_notebook_loss_recap_cell():
    """Section 3.7: the L1 loss of background anchors is zeroed; BCE uses 0/1 targets."""
    torch.manual_seed(0)
    pred_deltas = torch.randn(1, 2, 4)
    pred_logits = torch.randn(1, 2, 1)
    gt_deltas = torch.randn_like(pred_deltas)
    gt_deltas[:, 1, :] = -1e8
    loss_box = F.l1_loss(pred_deltas, gt_deltas, reduction="none")
    loss_box[gt_deltas == -1e8] *= 0.0
    assert torch.all(loss_box[:, 1] == 0) and torch.all(loss_box[:, 0] > 0)
    loss_obj = F.binary_cross_entropy_with_logits(
        pred_logits.view(-1), torch.Tensor([1, 0]), reduction="none"
    )
    expected = torch.stack([F.softplus(-pred_logits[0, 0, 0]), F.softplus(pred_logits[0, 1, 0])])
    assert torch.allclose(loss_obj, expected)


def test_notebook_matched_anchor_overlaps_its_box():
    """Section 3.6.3: p4 anchors of a 224-pixel image (stride scale 8, three aspect ratios)
    matched at IoU thresholds (0.3, 0.6); every foreground anchor overlaps the GT box it was
    matched with by 0.6 or more, and every GT box gets one (the low-quality rule)."""
    stride = 16
    locations = get_fpn_location_coords({"p4": (1, 64, 14, 14)}, {"p4": stride})
    anchors = generate_fpn_anchors(locations, {"p4": stride}, 8, [0.5, 1.0, 2.0])["p4"]
    gt = torch.tensor([[30.0, 40, 150, 140, 4], [120, 20, 200, 210, 11], [-1, -1, -1, -1, -1]])
    matched = rcnn_match_anchors_to_gt(anchors, gt, iou_thresholds=(0.3, 0.6))
    assert matched.shape == (14 * 14 * 3, 5)
    foreground = matched[:, 4] >= 0
    assert foreground.sum() >= 2 and set(matched[foreground, 4].tolist()) == {4.0, 11.0}
    overlaps = iou(anchors[foreground], matched[foreground, :4]).diagonal()
    best = iou(anchors, gt[:2, :4]).max(dim=0).values  # each GT box's best anchor
    assert torch.all((overlaps >= 0.6) | torch.isin(overlaps, best))
    assert torch.all(matched[~foreground, 4] <= -1)  # background -1, neutral -1e8


# ---------------------------------------------------------------- notebook overfitting cells


class FirstStage(nn.Module):
    """Backbone + RPN, as section 3.9 trains the first stage alone."""

    def __init__(self, channels: int):
        super().__init__()
        self.backbone = DetectorBackboneWithFPN(out_channels=channels, pretrained=False)
        self.rpn = RPN(channels, [channels, channels], batch_size_per_image=16,
                       anchor_iou_thresholds=(0.3, 0.6))  # fmt: skip

    def forward(self, images, gt_boxes=None):
        return self.rpn(self.backbone(images), self.backbone.fpn_strides, gt_boxes)


def _overfit(model: nn.Module, iterations: int = 40) -> tuple[LossHistory, float, float]:
    """``train_detector`` on the same four painted 64-pixel images, as the notebook's
    overfitting cells train on a small subset; the mean loss of the first and last 5."""
    images, gt = painted_images(64)
    history = train_detector(
        model, [([str(i) for i in range(4)], images, gt)], learning_rate=0.01,
        max_iters=iterations, log_period=iterations, device="cpu", warmup_iters=5,
        show_plot=False, progress=False,
    )  # fmt: skip
    return history, sum(history[:5]) / 5, sum(history[-5:]) / 5


def test_notebook_rpn_overfits_a_tiny_subset(flush_denormal):
    """Section 3.9: the RPN's loss on a few images is clearly lower at the end."""
    torch.manual_seed(0)
    history, first, last = _overfit(FirstStage(16))
    assert len(history) == 40 and list(history.terms) == ["loss_rpn_obj", "loss_rpn_box"]
    assert last < 0.75 * first, (first, last)


def test_notebook_faster_rcnn_overfits_a_tiny_subset(flush_denormal):
    """Section 4.1: the whole detector's loss (RPN and classifier) is clearly lower at the end."""
    torch.manual_seed(0)
    backbone = DetectorBackboneWithFPN(out_channels=16, pretrained=False)
    rpn = RPN(16, [16, 16], batch_size_per_image=16, anchor_iou_thresholds=(0.3, 0.6),
              pre_nms_topk=200, post_nms_topk=40)  # fmt: skip
    model = FasterRCNN(backbone, rpn, [16, 16], num_classes=4, batch_size_per_image=32)
    history, first, last = _overfit(model)
    assert list(history.terms) == ["loss_rpn_obj", "loss_rpn_box", "loss_cls"]
    assert last < 0.75 * first, (first, last)


# ---------------------------------------------------------------- IoU and matching


def test_match_rules():
    anchors = torch.tensor(
        [
            [0.0, 0, 10, 10],  # IoU 1 with GT 0 -> foreground
            [0.0, 0, 10, 20],  # IoU 0.5 with GT 0 -> neutral
            [0.0, 0, 10, 40],  # IoU 0.25 with GT 0 -> background
            [100.0, 100, 110, 110],  # no overlap -> background
            [50.0, 50, 60, 60],  # IoU 1 with GT 1 -> foreground
        ]
    )
    gt = torch.tensor([[0.0, 0, 10, 10, 3], [50, 50, 60, 60, 7], [-1, -1, -1, -1, -1]])
    matched = rcnn_match_anchors_to_gt(anchors, gt, (0.3, 0.6))
    assert torch.equal(matched[0], gt[0])
    assert torch.all(matched[1] == -1e8)
    assert torch.all(matched[2] == -1) and torch.all(matched[3] == -1)
    assert torch.equal(matched[4], gt[1])
    # Boundaries: q <= low is background, q >= high is foreground.
    assert torch.all(rcnn_match_anchors_to_gt(anchors[1:2], gt, (0.5, 0.6)) == -1)
    assert torch.equal(rcnn_match_anchors_to_gt(anchors[1:2], gt, (0.3, 0.5))[0], gt[0])


def test_match_no_gt_and_batched():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(200, 2, generator=g) * 200
    anchors = torch.cat([xy, xy + torch.rand(200, 2, generator=g) * 60 + 5], dim=1)
    padded = torch.full((3, 4, 5), -1.0)
    assert torch.all(rcnn_match_anchors_to_gt(anchors, padded[0], (0.3, 0.6)) == -1)
    assert torch.all(rcnn_match_anchors_to_gt(anchors, torch.zeros(0, 5), (0.3, 0.6)) == -1)
    padded[0, :2] = torch.tensor([[10.0, 10, 60, 60, 1], [100, 100, 160, 150, 2]])
    padded[2, :1] = torch.tensor([[0.0, 0, 200, 200, 0]])
    batched = rcnn_match_anchors_to_gt(anchors, padded, (0.3, 0.6))
    assert batched.shape == (3, 200, 5)
    for i in range(3):
        assert torch.equal(batched[i], rcnn_match_anchors_to_gt(anchors, padded[i], (0.3, 0.6)))


def test_match_low_quality():
    anchors = torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 10, 20], [30.0, 30, 40, 40]])
    gt = torch.tensor([[0.0, 0, 10, 35, 2]])  # best IoU 20/35 ~ 0.571 < 0.6
    plain = rcnn_match_anchors_to_gt(anchors, gt, (0.3, 0.6))
    assert torch.all(plain[1] == -1e8)
    low_quality = rcnn_match_anchors_to_gt(anchors, gt, (0.3, 0.6), allow_low_quality_matches=True)
    assert torch.equal(low_quality[1], gt[0])
    assert torch.all(low_quality[0] == -1) and torch.all(low_quality[2] == -1)


def test_match_rejects_bad_gt_shape():
    with pytest.raises(ValueError, match=r"\(M, 5\)"):
        rcnn_match_anchors_to_gt(torch.zeros(3, 4), torch.zeros(2, 4), (0.3, 0.6))


# ---------------------------------------------------------------- deltas


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_deltas_match_torchvision_box_coder(weights):
    g = torch.Generator().manual_seed(4)
    xy = torch.rand(100, 2, generator=g) * 100
    anchors = torch.cat([xy, xy + torch.rand(100, 2, generator=g) * 50 + 1], dim=1)
    gt = torch.cat([xy + 3, xy + torch.rand(100, 2, generator=g) * 50 + 5], dim=1)
    coder = BoxCoder(weights=weights)
    ours = rcnn_get_deltas_from_anchors(anchors, torch.cat([gt, torch.ones(100, 1)], 1), weights)
    theirs = coder.encode_single(gt, anchors)
    assert torch.allclose(ours, theirs, atol=1e-5)
    decoded = rcnn_apply_deltas_to_anchors(theirs, anchors, weights)
    assert torch.allclose(decoded, coder.decode_single(theirs, anchors), atol=1e-4)


def test_decode_clamps_and_never_modifies_input():
    anchors = torch.tensor([[0.0, 0, 16, 16]])
    deltas = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    before = deltas.clone()
    boxes = rcnn_apply_deltas_to_anchors(deltas, anchors)
    assert torch.equal(deltas, before)
    assert torch.allclose(boxes[0, 2] - boxes[0, 0], torch.tensor(1000.0))
    assert torch.isfinite(boxes).all()


def test_neutral_rows_give_ignored_deltas():
    anchors = torch.tensor([[0.0, 0, 10, 10], [5.0, 5, 20, 20]])
    matched = torch.tensor([[-1e8] * 5, [4.0, 4, 22, 21, 0]])
    deltas = rcnn_get_deltas_from_anchors(anchors, matched)
    assert torch.all(deltas[0] == -1e8) and torch.isfinite(deltas[1]).all()


# ---------------------------------------------------------------- sampling and levels


def test_sampling_counts_and_neutral_never_sampled():
    torch.manual_seed(0)
    classes = torch.tensor([2.0] * 30 + [-1.0] * 50 + [-1e8] * 20)
    rows = torch.cat([torch.zeros(100, 4), classes[:, None]], dim=1)
    fg_idx, bg_idx = sample_rpn_training(rows, num_samples=16, fg_fraction=0.5)
    assert len(fg_idx) == 8 and len(bg_idx) == 8
    assert torch.all(classes[fg_idx] >= 0) and torch.all(classes[bg_idx] == -1)
    assert len(set(fg_idx.tolist())) == 8
    # Few foreground rows: background fills the rest.
    rows[:27, 4] = -1e8
    fg_idx, bg_idx = sample_rpn_training(rows, num_samples=16, fg_fraction=0.5)
    assert len(fg_idx) == 3 and len(bg_idx) == 13


def test_sampling_batched_is_uniform_per_image():
    torch.manual_seed(0)
    classes = torch.full((2, 40), -1.0)
    classes[0, :10] = 1
    rows = torch.cat([torch.zeros(2, 40, 4), classes[..., None]], dim=2)
    counts = torch.zeros(2, 40)
    for _ in range(400):
        fg, bg = sample_rpn_training_masks(rows, num_samples=8, fg_fraction=0.25)
        assert fg.sum(1).tolist() == [2, 0] and bg.sum(1).tolist() == [6, 8]
        counts += (fg | bg).float()
    # Each background row of image 1 is drawn with probability 8/40.
    assert abs(counts[1].mean().item() / 400 - 0.2) < 0.01
    assert counts[1].min() > 40


def test_fpn_level_assignment():
    boxes = torch.tensor(
        [[0.0, 0, 224, 224], [0, 0, 112, 112], [0, 0, 111, 111], [0, 0, 448, 448], [0, 0, 4, 4]]
    )
    assert assign_fpn_levels(boxes).tolist() == [4, 3, 3, 5, 3]


def _roi_align_case(seed: int, dtype: torch.dtype = torch.float64):
    """Features of three levels and boxes spanning all of them, some past the border."""
    g = torch.Generator().manual_seed(seed)
    batch, channels = 3, 5
    feats = {
        f"p{level}": torch.randn(batch, channels, 160 // 2**level, 224 // 2**level, generator=g)
        .to(dtype)
        .requires_grad_()
        for level in (3, 4, 5)
    }
    strides = {f"p{level}": 2**level for level in (3, 4, 5)}
    num = 60
    xy = torch.rand(batch, num, 2, generator=g) * 260 - 30
    wh = torch.rand(batch, num, 2, generator=g) ** 2 * 800 + 0.2
    boxes = torch.cat([xy, xy + wh], dim=-1).to(dtype)
    valid = torch.rand(batch, num, generator=g) < 0.8
    return feats, strides, boxes, valid


def _roi_align_reference(feats, strides, boxes, valid, aligned=True):
    """torchvision's roi_align, one call per level over that level's valid boxes."""
    batch, num = valid.shape
    channels = next(iter(feats.values())).shape[1]
    out = boxes.new_zeros(batch * num, channels, 7, 7)
    image_ids = torch.arange(batch).repeat_interleave(num)[:, None].to(boxes)
    rois = torch.cat([image_ids, boxes.reshape(-1, 4)], dim=1)
    levels = assign_fpn_levels(boxes).reshape(-1)
    for name, level_feats in feats.items():
        take = valid.reshape(-1) & (levels == int(name[1:]))
        out[take] = torchvision.ops.roi_align(
            level_feats, rois[take], (7, 7), 1.0 / strides[name], 2, aligned=aligned
        )
    return out


@pytest.mark.parametrize("low_quality", [False, True])
def test_matching_drops_gt_padding_without_changing_rows(monkeypatch, low_quality):
    """On a CPU the matching compares anchors with the fullest image's valid GT rows only
    (padding anywhere among them, as many pads as the notebook's 40); the rows it returns
    are those of matching against every padded row."""
    generator = torch.Generator().manual_seed(3)
    anchors = torch.rand(500, 2, generator=generator) * 200
    anchors = torch.cat([anchors, anchors + torch.rand(500, 2, generator=generator) * 60 + 4], 1)
    gt = torch.full((3, 40, 5), -1.0)
    for image, rows in enumerate(([0, 5, 6, 17], [2], [])):
        boxes = anchors[torch.randint(0, 500, (len(rows),), generator=generator)] + 3.0
        gt[image, rows, :4] = boxes
        gt[image, rows, 4] = torch.arange(len(rows), dtype=torch.float32)
    gt[0, 6, :4] = gt[0, 5, :4]  # two GT rows tie for every anchor
    matched = rcnn_match_anchors_to_gt(anchors, gt, (0.3, 0.6), low_quality)
    assert (matched[..., 4] >= 0).any() and (matched[2] == -1).all()
    monkeypatch.setattr("two_stage_detector.drop_gt_padding", lambda gt_boxes: gt_boxes)
    assert torch.equal(matched, rcnn_match_anchors_to_gt(anchors, gt, (0.3, 0.6), low_quality))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fpn_roi_align_matches_torchvision_values_and_gradients(seed):
    feats, strides, boxes, valid = _roi_align_case(seed)
    levels = assign_fpn_levels(boxes)[valid]
    assert set(levels.tolist()) == {3, 4, 5}  # every level is exercised
    ours = fpn_roi_align(feats, strides, boxes, valid)
    ref = _roi_align_reference(feats, strides, boxes, valid)
    assert ours.shape == (boxes.shape[0] * boxes.shape[1], 5, 7, 7)
    assert torch.allclose(ours, ref, atol=1e-12)
    assert (ours[~valid.reshape(-1)] == 0).all()
    upstream = torch.randn_like(ref)
    grads = torch.autograd.grad(ours, list(feats.values()), upstream)
    ref_grads = torch.autograd.grad(ref, list(feats.values()), upstream)
    for g, r in zip(grads, ref_grads, strict=True):
        assert torch.allclose(g, r, atol=1e-12)


def test_fpn_roi_align_offset_zero_matches_unaligned_roi_align():
    """``offset=0`` (features on their cell's corner, as the RPN's default anchors) samples
    where ``roi_align(aligned=False)`` does; that kernel also stretches RoIs under one feature
    pixel to one pixel, so only boxes of at least 32 px (the largest stride) are compared."""
    feats, strides, boxes, valid = _roi_align_case(4)
    wh = boxes[..., 2:] - boxes[..., :2]
    valid &= (wh >= 32).all(dim=-1)
    assert valid.sum() > 20
    ours = fpn_roi_align(feats, strides, boxes, valid, offset=0.0)
    ref = _roi_align_reference(feats, strides, boxes, valid, aligned=False)
    assert torch.allclose(ours, ref, atol=1e-12)
    aligned = fpn_roi_align(feats, strides, boxes, valid)
    assert not torch.allclose(ours, aligned, atol=1e-3)


def test_fpn_roi_align_float32_and_no_valid_boxes():
    feats, strides, boxes, valid = _roi_align_case(3, torch.float32)
    ours = fpn_roi_align(feats, strides, boxes, valid)
    ref = _roi_align_reference(feats, strides, boxes, valid)
    assert ours.dtype == torch.float32
    assert (ours - ref).abs().max() < 1e-5
    none = fpn_roi_align(feats, strides, boxes, torch.zeros_like(valid))
    assert none.shape == ours.shape and (none == 0).all()


def test_reassign_proposals_mixes_gt_in_training():
    proposals = [torch.tensor([[0.0, 0, 30, 30], [0, 0, 500, 500]]), torch.zeros(0, 4)]
    gt = torch.full((2, 3, 5), -1.0)
    gt[1, 0] = torch.tensor([0.0, 0, 224, 224, 5])
    grouped = reassign_proposals_to_fpn_levels(proposals, gt)
    assert [len(t) for t in grouped["p3"]] == [1, 0]
    assert [len(t) for t in grouped["p4"]] == [0, 1]
    assert [len(t) for t in grouped["p5"]] == [1, 0]
    assert torch.equal(grouped["p4"][1], gt[1, :1, :4])
    no_gt = reassign_proposals_to_fpn_levels(proposals)
    assert [len(t) for t in no_gt["p4"]] == [0, 0]


# ---------------------------------------------------------------- RPN and Faster R-CNN


def test_rpn_alone_train_and_eval():
    torch.manual_seed(0)
    backbone = DetectorBackboneWithFPN(out_channels=32, pretrained=False)
    rpn = RPN(fpn_channels=32, stem_channels=[32, 32], pre_nms_topk=100, post_nms_topk=30)
    images = torch.randn(3, 3, 128, 160)
    out = rpn(backbone(images), backbone.fpn_strides, make_gt(3), image_size=(128, 160))
    assert {"loss_rpn_obj", "loss_rpn_box", "proposals"} <= set(out)
    assert torch.isfinite(out["loss_rpn_obj"]) and torch.isfinite(out["loss_rpn_box"])
    (out["loss_rpn_obj"] + out["loss_rpn_box"]).backward()
    assert backbone.fpn_params["output_p3"].weight.grad.abs().sum() > 0
    assert rpn.pred_net.pred_box.weight.grad.abs().sum() > 0
    rpn.eval()
    with torch.no_grad():
        out = rpn(backbone(images), backbone.fpn_strides, image_size=(128, 160))
    assert set(out) >= {"proposals"} and not any(k.startswith("loss") for k in out)
    for proposals in out["proposals"]:
        assert 0 < len(proposals) <= 30
        assert torch.all(proposals[:, 0::2] >= 0) and torch.all(proposals[:, 0::2] <= 160)
        assert torch.all(proposals[:, 1::2] >= 0) and torch.all(proposals[:, 1::2] <= 128)


def test_rpn_loss_normalisation_matches_definition():
    """loss_rpn_obj = sum of BCE over sampled anchors / (batch_size_per_image * B)."""
    torch.manual_seed(0)
    rpn = RPN(fpn_channels=8, stem_channels=[8], batch_size_per_image=16)
    feats = {
        "p3": torch.randn(2, 8, 4, 4),
        "p4": torch.randn(2, 8, 2, 2),
        "p5": torch.randn(2, 8, 1, 1),
    }
    strides = {"p3": 8, "p4": 16, "p5": 32}
    with torch.no_grad():
        rpn.pred_net.pred_obj.bias.fill_(0.0)
        rpn.pred_net.pred_obj.weight.zero_()
    out = rpn(feats, strides, torch.full((2, 1, 5), -1.0))
    # No GT: 16 background anchors per image, each with logit 0 -> BCE log(2).
    assert torch.allclose(out["loss_rpn_obj"], torch.log(torch.tensor(2.0)))
    assert out["loss_rpn_box"] == 0


def test_training_diagnostics_hand_case():
    """Recall counts GT boxes some valid proposal overlaps at IoU >= 0.5; the foreground
    share is over sampled RoIs; the top score is each image's best object probability."""
    proposals = torch.tensor([[[0.0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10]],
                              [[0.0, 0, 4, 4], [50, 50, 60, 60], [0, 0, 1, 1]]])  # fmt: skip
    valid = torch.tensor([[True, True, False], [True, False, True]])
    pad = [-1.0] * 5
    gt = torch.tensor([[[0.0, 0, 10, 12, 1], [40, 40, 50, 50, 0], pad],
                       [[50.0, 50, 60, 60, 2], [0, 0, 10, 10, 0], pad]])  # fmt: skip
    sampled = torch.tensor([[True, True, True, False], [True, True, False, False]])
    foreground = torch.tensor([[True, False, False, False], [False, False, False, False]])
    logits = torch.zeros(2, 4, 4)
    logits[0, 1, 2] = math.log(6.0)  # softmax (1, 1, 6, 1) / 9: object probability 2/3
    logits[0, 3, 1] = 50.0  # not sampled: ignored
    stats = training_diagnostics(proposals, valid, gt, sampled, foreground, logits)
    # image 0: GT 0 found (IoU 100/120), GT 1 not; image 1: the proposal on GT 0 is invalid,
    # [0, 0, 4, 4] has IoU 0.16 with GT 1: 1 of 4 found.
    assert stats["stat_rpn_recall"] == pytest.approx(0.25)
    assert stats["stat_fg_share"] == pytest.approx(1 / 5)
    assert stats["stat_top_score"] == pytest.approx((2 / 3 + 0.25) / 2)
    empty = training_diagnostics(proposals[:, :0], valid[:, :0], gt[:, :0], sampled, foreground,
                                 logits)  # fmt: skip
    assert empty["stat_rpn_recall"] == 0 and torch.isfinite(empty["stat_rpn_recall"])
    # No proposals, GT present (K = 0): nothing found; GT rows, no proposals valid: the same.
    none = training_diagnostics(proposals[:, :0], valid[:, :0], gt, sampled, foreground, logits)
    assert none["stat_rpn_recall"] == 0
    invalid = training_diagnostics(proposals, valid & False, gt, sampled, foreground, logits)
    assert invalid["stat_rpn_recall"] == 0


def test_faster_rcnn_train_losses_and_gradients():
    torch.manual_seed(0)
    model = small_faster_rcnn(box_regression=True)
    losses = model(torch.randn(3, 3, 128, 128), make_gt(3))
    assert set(losses) == {"loss_rpn_obj", "loss_rpn_box", "loss_cls", "loss_box"}
    stats = model.training_stats  # kept apart from the losses: callers sum those
    assert set(stats) == {"stat_rpn_recall", "stat_fg_share", "stat_top_score"}
    assert all(0 <= v <= 1 and not v.requires_grad for v in stats.values())
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    trunk_grad = sum(p.grad.abs().sum() for p in model.backbone.backbone.parameters())
    assert trunk_grad > 0
    assert model.cls_pred[-1].weight.grad.abs().sum() > 0
    assert model.box_pred.weight.grad.abs().sum() > 0
    plain = small_faster_rcnn()
    assert set(plain(torch.randn(1, 3, 96, 96), make_gt(1))) == {
        "loss_rpn_obj", "loss_rpn_box", "loss_cls",
    }  # fmt: skip


def test_faster_rcnn_all_background_batch():
    torch.manual_seed(0)
    losses = small_faster_rcnn()(torch.randn(2, 3, 96, 128), torch.full((2, 4, 5), -1.0))
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_rpn_box"] == 0


@pytest.mark.parametrize(
    "images, gt, message",
    [
        (torch.randn(3, 64, 64), None, r"\(B, 3, H, W\)"),
        (torch.randn(2, 1, 64, 64), None, r"\(B, 3, H, W\)"),
        (torch.zeros(2, 3, 64, 64, dtype=torch.uint8), None, "floating point"),
        (torch.randn(2, 3, 64, 64), torch.zeros(2, 3, 4), r"\(B=2, M, 5\)"),
        (torch.randn(2, 3, 64, 64), torch.zeros(3, 3, 5), r"\(B=2, M, 5\)"),
        (torch.randn(1, 3, 64, 64), torch.tensor([[[0.0, 0, 9, 9, 8]]]), r"\[0, 7\]"),
        (torch.randn(1, 3, 64, 64), torch.tensor([[[0.0, 0, 9, 9, -3]]]), r"\[0, 7\]"),
    ],
)
def test_faster_rcnn_bad_input(images, gt, message):
    model = small_faster_rcnn()
    if gt is None:
        gt = torch.full((len(images) if images.dim() == 4 else 1, 1, 5), -1.0)
    with pytest.raises(ValueError, match=message):
        model(images, gt)


def test_check_inputs_names_bad_class_ids_without_running_the_model():
    model = small_faster_rcnn(num_classes=3)
    gt = torch.tensor([[[0.0, 0.0, 10.0, 10.0, 1.0], [2.0, 2.0, 9.0, 9.0, 7.0]]])
    with pytest.raises(ValueError, match=r"class ids must be integers in \[0, 2\].*7\.0"):
        model.check_inputs(gt_boxes=gt)
    with pytest.raises(ValueError, match="gt_boxes"):
        model.check_inputs(torch.zeros(2, 3, 32, 32), gt)  # batch sizes differ
    model.check_inputs(torch.zeros(1, 3, 32, 32), gt.clamp(max=2.0))  # valid: no error


def test_faster_rcnn_requires_gt_in_training():
    with pytest.raises(ValueError, match="gt_boxes"):
        small_faster_rcnn()(torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("fixed_shape_nms", [False, True])
@pytest.mark.parametrize("box_regression", [False, True])
def test_batched_inference_equals_one_at_a_time(monkeypatch, box_regression, fixed_shape_nms):
    """B=3 gives per image exactly what B=1 gives, with either NMS. oneDNN convolutions pick
    batch-size dependent algorithms (1e-6 differences), so the check runs with oneDNN off,
    which makes the backbone features bit-identical and tests the detector's own batching
    exactly."""
    monkeypatch.setattr(common, "FIXED_SHAPE_NMS", fixed_shape_nms)
    torch.manual_seed(0)
    model = small_faster_rcnn(box_regression=box_regression).eval()
    images = torch.randn(3, 3, 128, 160)
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
        batched = model(images, test_score_thresh=0.0, test_nms_thresh=0.5)
        assert isinstance(batched, list) and len(batched) == 3
        for i in range(3):
            single = model(images[i : i + 1], test_score_thresh=0.0, test_nms_thresh=0.5)
            assert isinstance(single, tuple)
            boxes, classes, scores = single
            assert 0 < len(boxes) <= 100
            assert classes.dtype == torch.long and classes.min() >= 0 and classes.max() < 8
            assert torch.all(scores[:-1] >= scores[1:])
            for ours, theirs in zip(single, batched[i], strict=True):
                assert torch.equal(ours, theirs)


def test_both_nms_implementations_give_the_same_losses_and_detections(monkeypatch):
    """The fixed-shape NMS (accelerators, ``torch.compile``) and torchvision's (eager CPU)
    give the same training losses, gradients and detections, bit for bit."""
    torch.manual_seed(0)
    initial = small_faster_rcnn(box_regression=True)
    images, gt = torch.randn(2, 3, 128, 160), make_gt(2)
    results = []
    for fixed_shape in (False, True):
        monkeypatch.setattr(common, "FIXED_SHAPE_NMS", fixed_shape)
        model = copy.deepcopy(initial).train()  # the same BatchNorm statistics for both
        torch.manual_seed(1)
        losses = model(images, gt)
        sum(losses.values()).backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        with torch.no_grad():
            detections = model.eval()(images, test_score_thresh=0.0)
        results.append((losses, grads, detections))
    (losses, grads, detections), (f_losses, f_grads, f_detections) = results
    assert losses.keys() == f_losses.keys()
    for key in losses:
        assert torch.equal(losses[key], f_losses[key]), key
    assert all(torch.equal(a, b) for a, b in zip(grads, f_grads, strict=True))
    assert sum(len(boxes) for boxes, _, _ in detections) > 0
    for image, f_image in zip(detections, f_detections, strict=True):
        for ours, theirs in zip(image, f_image, strict=True):
            assert torch.equal(ours, theirs)


def test_inference_score_threshold_and_class_nms():
    torch.manual_seed(0)
    model = small_faster_rcnn().eval()
    with torch.no_grad():
        boxes, classes, scores = model(torch.randn(1, 3, 128, 128), test_score_thresh=0.3)
    assert len(boxes) == 0 and boxes.shape == (0, 4)  # untrained: all scores ~ 1/9
    with torch.no_grad():
        boxes, classes, scores = model(torch.randn(1, 3, 128, 128), test_score_thresh=0.0)
    # Section 4.2: (N, 4), (N,), (N,) for one image.
    n = len(boxes)
    assert n > 0 and boxes.shape == (n, 4) and classes.shape == scores.shape == (n,)
    assert boxes.dtype == scores.dtype == torch.float32 and classes.dtype == torch.int64
    for c in classes.unique():
        same = boxes[classes == c]
        overlaps = iou(same, same).fill_diagonal_(0)
        assert overlaps.max() <= 0.5


def test_dtype_agnostic_float64_and_autocast():
    """The same code runs in float64 and under CPU bfloat16 autocast (CUDA autocast alike)."""
    torch.manual_seed(0)
    model = small_faster_rcnn(box_regression=True).double()
    losses = model(torch.randn(2, 3, 96, 96, dtype=torch.float64), make_gt(2).double())
    assert all(v.dtype == torch.float64 and torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        boxes, classes, scores = model(torch.randn(1, 3, 96, 96, dtype=torch.float64), None, 0.0)
    assert boxes.dtype == torch.float64 and classes.dtype == torch.long

    model = small_faster_rcnn(box_regression=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(torch.randn(2, 3, 96, 96), make_gt(2))
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        boxes, classes, scores = model(torch.randn(1, 3, 96, 96), test_score_thresh=0.0)
    assert boxes.dtype == torch.float32 and len(boxes) > 0


def test_rpn_anchor_offset_matches_torchvision_and_old_checkpoints_keep_theirs():
    """``RPN``'s default anchors sit on cell corners, exactly torchvision's ``AnchorGenerator``
    boxes (up to its rounding of half sizes); ``anchor_offset=0.5`` gives the notebook's
    cell-centre anchors; a config saved before the option existed rebuilds with 0.5."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList

    strides = {"p3": 8, "p4": 16}
    feats = {"p3": torch.zeros(1, 4, 6, 4), "p4": torch.zeros(1, 4, 3, 2)}
    rpn = RPN(fpn_channels=4, stem_channels=[4], anchor_stride_scale=4)
    assert rpn.config["anchor_offset"] == 0.0
    ours = rpn.get_anchors(feats, strides, torch.float32)
    generator = AnchorGenerator(
        sizes=tuple((4 * s,) for s in strides.values()), aspect_ratios=((0.5, 1.0, 2.0),) * 2
    )
    images = ImageList(torch.zeros(1, 3, 48, 32), [(48, 32)])
    theirs = generator(images, list(feats.values()))[0]
    torch.testing.assert_close(torch.cat(list(ours.values())), theirs, atol=0.5, rtol=0)

    centred = RPN(fpn_channels=4, stem_channels=[4], anchor_stride_scale=4, anchor_offset=0.5)
    shifted = centred.get_anchors(feats, strides, torch.float32)
    for level, stride in strides.items():
        torch.testing.assert_close(shifted[level], ours[level] + stride / 2)
        locations = get_fpn_location_coords({level: feats[level].shape}, {level: stride})
        notebook = generate_fpn_anchors(locations, {level: stride}, 4)[level]
        assert torch.equal(shifted[level], notebook)

    model = FasterRCNN(DetectorBackboneWithFPN(8, pretrained=False), RPN(8, [8]), [8], 3, 8)
    old_config = copy.deepcopy(model.config)
    del old_config["rpn"]["anchor_offset"]
    assert FasterRCNN.from_config(old_config).rpn.anchor_offset == 0.5
    assert FasterRCNN.from_config(model.config).rpn.anchor_offset == 0.0


def test_config_without_later_settings_is_completed_with_what_old_models_used():
    """Checkpoints written before ``smooth_l1_beta`` and ``roi_align_offset`` existed trained
    with L1 in both stages and half-pixel aligned RoI Align: ``complete_config`` says so (and
    leaves its argument alone), and a model rebuilt from such a config has them."""
    model = FasterRCNN(
        DetectorBackboneWithFPN(8, pretrained=False), RPN(8, [8], smooth_l1_beta=0.5), [8], 3, 8,
        smooth_l1_beta=0.25, roi_align_offset=0.0,
    )  # fmt: skip
    assert model.config["rpn"]["smooth_l1_beta"] == 0.5 and model.config["smooth_l1_beta"] == 0.25
    assert model.config["roi_align_offset"] == 0.0
    old = copy.deepcopy(model.config)
    del old["rpn"]["smooth_l1_beta"], old["smooth_l1_beta"], old["rpn"]["anchor_offset"]
    del old["roi_align_offset"], old["norm"], old["rpn"]["norm"]
    completed = FasterRCNN.complete_config(old)
    assert completed["smooth_l1_beta"] == completed["rpn"]["smooth_l1_beta"] == 0.0
    assert completed["rpn"]["anchor_offset"] == 0.5 and "smooth_l1_beta" not in old
    assert completed["roi_align_offset"] == 0.5 and "roi_align_offset" not in old
    rebuilt = FasterRCNN.from_config(old)
    assert rebuilt.smooth_l1_beta == rebuilt.rpn.smooth_l1_beta == 0.0
    assert rebuilt.roi_align_offset == 0.5
    assert rebuilt.norm == rebuilt.rpn.norm == "none"  # no GroupNorm before it existed
    assert FasterRCNN.from_config(model.config).config == model.config
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="smooth_l1_beta must be a finite number >= 0"):
            RPN(8, [8], smooth_l1_beta=bad)


def test_second_stage_losses_equal_torchvision_fastrcnn_loss():
    """With ``smooth_l1_beta = 1/9`` and every RoI sampled, ``loss_cls`` and ``loss_box`` are
    torchvision's ``fastrcnn_loss`` (cross-entropy mean; smooth-L1 sum over foreground RoIs of
    their class's deltas / number of RoIs), the targets encoded by its ``BoxCoder``."""
    from torchvision.models.detection.roi_heads import fastrcnn_loss

    torch.manual_seed(0)
    C, B, S = 4, 2, 24
    model = FasterRCNN(DetectorBackboneWithFPN(8, pretrained=False), RPN(8, [8]), [8], C, S,
                       box_regression=True, smooth_l1_beta=1 / 9)  # fmt: skip
    xy = torch.rand(B, S, 2) * 100
    rois = torch.cat([xy, xy + 10 + torch.rand(B, S, 2) * 50], -1)
    matched = torch.cat([rois + torch.randn(B, S, 4) * 3, torch.randint(0, C, (B, S, 1))], -1)
    foreground = torch.rand(B, S) < 0.4
    matched[~foreground] = -1.0
    sampled = torch.ones(B, S, dtype=torch.bool)
    cls_logits, box_deltas = torch.randn(B, S, C + 1), torch.randn(B, S, C, 4) * 0.2
    ours = model._losses(rois, sampled, matched, foreground, cls_logits, box_deltas)

    labels = torch.where(foreground, matched[..., 4].long() + 1, 0).flatten()
    coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    targets = coder.encode_single(matched[..., :4].flatten(0, 1), rois.flatten(0, 1))
    with_background = torch.cat([torch.zeros(B, S, 1, 4), box_deltas], 2).flatten(0, 1)
    loss_cls, loss_box = fastrcnn_loss(
        cls_logits.flatten(0, 1), with_background.flatten(1), [labels], [targets]
    )
    torch.testing.assert_close(ours["loss_cls"], loss_cls)
    torch.testing.assert_close(ours["loss_box"], loss_box)
    model.smooth_l1_beta = 0.0  # L1 is the notebook's: larger for errors below beta
    l1 = model._losses(rois, sampled, matched, foreground, cls_logits, box_deltas)["loss_box"]
    assert l1 > loss_box


def test_rpn_losses_equal_torchvision_rpn_compute_loss():
    """With ``smooth_l1_beta = 1/9``, the RPN's losses are torchvision's
    ``RegionProposalNetwork.compute_loss`` given our matches and samples (its box loss: smooth-L1
    sum over sampled foreground anchors / number of sampled anchors, here ``batch_size * B``;
    targets from its ``BoxCoder``)."""
    from types import SimpleNamespace

    from torchvision.models.detection.rpn import RegionProposalNetwork

    torch.manual_seed(0)
    rpn = RPN(8, [8], batch_size_per_image=32, anchor_stride_scale=4, smooth_l1_beta=1 / 9)
    feats = {"p3": torch.randn(2, 8, 32, 32), "p4": torch.randn(2, 8, 16, 16)}  # 256 px
    anchors = rpn.get_anchors(feats, {"p3": 8, "p4": 16}, torch.float32)
    logits, deltas = rpn.pred_net(feats)
    gt = make_gt(2)
    torch.manual_seed(1)
    ours = rpn._losses(anchors, logits, deltas, gt)

    all_anchors = torch.cat(list(anchors.values()))
    torch.manual_seed(1)  # the same draws: matching takes none
    matched = rcnn_match_anchors_to_gt(
        all_anchors, gt, rpn.anchor_iou_thresholds, allow_low_quality_matches=True
    )
    fg, bg = sample_rpn_training_masks(matched, 32, fg_fraction=0.5)
    assert (fg | bg).sum() == 64 and fg.sum() > 0
    sampler = SimpleNamespace(fg_bg_sampler=lambda labels: (list(fg), list(bg)))
    coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    targets = [coder.encode_single(m[:, :4], all_anchors) for m in matched]
    loss_obj, loss_box = RegionProposalNetwork.compute_loss(
        sampler,
        torch.cat(list(logits.values()), 1).flatten(),
        torch.cat(list(deltas.values()), 1).flatten(0, 1),
        [f.float() for f in fg],
        targets,
    )
    torch.testing.assert_close(ours["loss_rpn_obj"], loss_obj)
    torch.testing.assert_close(ours["loss_rpn_box"], loss_box)


def test_config_round_trips_with_its_value_formats():
    """``config`` is derived from the settings: plain lists, a sequence anchor scale as floats;
    ``from_config`` rebuilds the same config and state_dict keys, and editing the returned dict
    leaves the model alone."""
    rpn = RPN(8, (8,), anchor_stride_scale=(2, 4), anchor_iou_thresholds=(0.2, 0.7), nms_thresh=0.6)
    model = FasterRCNN(
        DetectorBackboneWithFPN(8, pretrained=False), rpn, (8,), 3, 8, roi_size=(5, 5),
        box_regression=True, detections_per_image=30,
    )  # fmt: skip
    config = model.config
    assert config["rpn"] == rpn.config and config["backbone"] == {"out_channels": 8}
    assert config["rpn"]["anchor_stride_scale"] == [2.0, 4.0]
    assert config["rpn"]["anchor_iou_thresholds"] == [0.2, 0.7]
    assert config["stem_channels"] == [8] and config["roi_size"] == [5, 5]
    rebuilt = FasterRCNN.from_config(copy.deepcopy(config))
    assert rebuilt.config == config and rebuilt.roi_size == (5, 5)
    assert list(rebuilt.state_dict()) == list(model.state_dict())
    config["rpn"]["stem_channels"].append(99)
    config["stem_channels"].append(99)
    assert model.config == rebuilt.config


def test_predict_proposals_padded_layout_holds_the_same_boxes():
    torch.manual_seed(0)
    rpn = RPN(8, [8], pre_nms_topk=50, post_nms_topk=20).eval()
    feats = {"p3": torch.randn(2, 8, 8, 8), "p4": torch.randn(2, 8, 4, 4)}
    strides = {"p3": 8, "p4": 16}
    obj, deltas = rpn.pred_net(feats)
    anchors = rpn.get_anchors(feats, strides, torch.float32)
    listed = rpn.predict_proposals(anchors, obj, deltas, (64, 64))
    boxes, logits, mask = rpn.predict_proposals(anchors, obj, deltas, (64, 64), padded=True)
    assert boxes.shape == (2, 20, 4) and logits.shape == mask.shape == (2, 20)
    assert (logits[~mask] == float("-inf")).all() and (boxes[~mask] == 0).all()
    for image, ours in enumerate(listed):
        assert torch.equal(ours, boxes[image][mask[image]])


def test_compile_detector_compiles_the_fixed_shape_parts_in_place(monkeypatch):
    compiled = []
    monkeypatch.setattr(
        torch.nn.Module, "compile", lambda self, **options: compiled.append((self, options))
    )
    model = small_faster_rcnn()
    assert compile_detector(model, backend="eager") is model
    parts = [model.backbone, model.rpn.pred_net, model.cls_pred[0]]
    assert [part for part, _ in compiled] == parts
    assert all(options == {"backend": "eager"} for _, options in compiled)


def test_group_norm_heads_pass_the_backbone_a_gradient_whatever_their_weight_scale():
    """The heads' N(0, 0.01) stems shrink what they pass back to the FPN features; with
    ``norm="gn"`` the gradient reaching the features does not depend on the stem weights'
    scale and is far larger at initialisation. Both models rebuild from their config."""
    feats = {"p3": torch.randn(2, 16, 8, 8), "p4": torch.randn(2, 16, 4, 4)}

    def feature_gradient(norm: str, scale: float = 1.0) -> float:
        torch.manual_seed(0)
        head = RPNPredictionNetwork(16, [16, 16], num_anchors=3, norm=norm)
        with torch.no_grad():
            for layer in head.stem_rpn:
                if isinstance(layer, torch.nn.Conv2d):
                    layer.weight.mul_(scale)
        inputs = {k: v.clone().requires_grad_() for k, v in feats.items()}
        obj, _ = head(inputs)
        torch.cat([o.flatten() for o in obj.values()]).pow(2).sum().backward()
        return sum(float(v.grad.norm()) for v in inputs.values())

    assert feature_gradient("gn") > 30 * feature_gradient("none")
    # (GroupNorm's eps is all that tells the scales apart)
    assert feature_gradient("gn", scale=100.0) == pytest.approx(feature_gradient("gn"), rel=1e-2)
    assert feature_gradient("none", scale=100.0) > 1e3 * feature_gradient("none")

    model = FasterRCNN(
        DetectorBackboneWithFPN(8, pretrained=False, norm="gn"), RPN(8, [8], norm="gn"), [8],
        3, 8, norm="gn",
    )  # fmt: skip
    assert isinstance(model.cls_pred[0][1], torch.nn.GroupNorm)
    assert model.config["norm"] == model.config["rpn"]["norm"] == "gn"
    rebuilt = FasterRCNN.from_config(model.config)
    assert rebuilt.config == model.config
    assert rebuilt.load_state_dict(model.state_dict()) is not None


@pytest.mark.parametrize("rows", [0, 3], ids=["no GT rows", "padding rows only"])
def test_a_training_step_on_images_without_boxes(rows):
    """A batch whose images have no objects, as ``(B, 0, 5)`` or all-padding GT, trains: finite
    losses that reach the weights, diagnostics of 0 recall and foreground (torch 2.9 once
    failed here, on a zero-size ``F.pad`` in the diagnostics)."""
    torch.manual_seed(0)
    model = small_faster_rcnn(box_regression=True).train()
    losses = model(torch.randn(2, 3, 96, 128), torch.full((2, rows, 5), -1.0))
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    assert model.rpn.pred_net.pred_obj.weight.grad.abs().sum() > 0  # objectness learns "background"
    stats = model.training_stats
    assert stats["stat_rpn_recall"] == 0 and stats["stat_fg_share"] == 0
