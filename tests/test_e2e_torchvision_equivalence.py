"""The whole detector against torchvision's ``FasterRCNN`` built to the same configuration.

``bench/matched.py`` builds both models from the same modules and weights (it is what
``bench/bench_accuracy.py`` trains). Two settings make the pipelines the same computation:
``roi_align_offset=0`` (torchvision's RoI Align is unaligned) and square anchors of even
sizes (torchvision's ``AnchorGenerator`` rounds the half sizes of other anchors to whole
pixels). Then inference gives the same proposals and detections, and a training step in which
every anchor and RoI is sampled (no random draw) the same losses and gradients. What is left
to differ in training is which anchors and RoIs the random samplers draw.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torchvision.models.detection.image_list import ImageList

from two_stage_detector import NEUTRAL, rcnn_match_anchors_to_gt

_SPEC = importlib.util.spec_from_file_location(
    "matched", Path(__file__).resolve().parents[1] / "bench" / "matched.py"
)
matched = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(matched)

H, W = 128, 160


def _pair(seed: int, roi_align_offset: float = 0.0, **kwargs):
    """Both models, their random-init heads scaled so that scores and deltas spread (with the
    initial weights every class score is about ``1 / (C + 1)`` and every delta about 0)."""
    ours, theirs = matched.build_pair(
        num_classes=3, fpn_channels=16, image_size=W, anchor_stride_scale=4,
        aspect_ratios=(1.0,), seed=seed, roi_align_offset=roi_align_offset, **kwargs,
    )  # fmt: skip
    theirs_predictor = theirs.roi_heads.box_predictor
    with torch.no_grad():
        for head in (ours.rpn.pred_net, theirs.rpn.head.pred_net):
            head.pred_obj.weight.mul_(300.0)
            head.pred_box.weight.mul_(30.0)
        for layer in (ours.cls_pred[-1], theirs_predictor.cls_score):
            layer.weight.mul_(300.0)
        ours.box_pred.weight.mul_(300.0)
        theirs_predictor.bbox_pred.weight.mul_(300.0)
    return ours, theirs


@pytest.mark.parametrize("seed", [0, 1])
def test_inference_equals_torchvision_given_the_same_weights(seed):
    ours, theirs = _pair(seed)
    ours.eval()
    theirs.eval()
    torch.manual_seed(100 + seed)
    images = torch.randn(1, 3, H, W)
    with torch.no_grad():
        rpn = ours.rpn(ours.backbone(images), ours.backbone.fpn_strides, None,
                       image_size=(H, W), proposal_list=False)  # fmt: skip
        proposals = rpn["proposal_boxes"][0][rpn["proposal_mask"][0]]
        their_proposals = theirs.rpn(ImageList(images, [(H, W)]), theirs.backbone(images))[0][0]
        boxes, classes, scores = ours(images)
        theirs_out = theirs(list(images))[0]
    assert len(proposals) == len(their_proposals) == 80
    torch.testing.assert_close(proposals, their_proposals)
    assert len(boxes) == len(theirs_out["boxes"]) > 50
    torch.testing.assert_close(boxes, theirs_out["boxes"], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(classes, theirs_out["labels"] - 1)
    torch.testing.assert_close(scores, theirs_out["scores"], atol=1e-5, rtol=1e-5)

    ours.roi_align_offset = 0.5  # the default: half a stride from where torchvision samples
    with torch.no_grad():
        aligned_scores = ours(images)[2]
    n = min(len(aligned_scores), len(scores))
    assert (aligned_scores[:n] - scores[:n]).abs().max() > 1e-3


def _non_neutral_anchors(model, images: torch.Tensor, gt_boxes: torch.Tensor) -> int:
    """How many anchors the RPN matches as foreground or background (not neutral)."""
    with torch.no_grad():
        feats = model.backbone(images)
    anchors = model.rpn.get_anchors(feats, model.backbone.fpn_strides, images.dtype)
    rows = rcnn_match_anchors_to_gt(
        torch.cat(list(anchors.values())), gt_boxes, model.rpn.anchor_iou_thresholds,
        allow_low_quality_matches=True,
    )  # fmt: skip
    return int((rows[..., 4] != NEUTRAL).sum())


@pytest.mark.parametrize("seed", [0, 1])
def test_training_step_equals_torchvision_when_every_sample_is_taken(seed):
    """One image, the RPN's batch as large as its non-neutral anchors and the second stage's
    larger than its RoIs: both samplers take everything, so nothing random is left. In float64:
    in float32 the backbone's gradients agree only to about 1e-3 (rounding, the scaled heads'
    large gradients cancelling). Torchvision's objectness targets stay float32, which makes
    its objectness loss float32, about 1e-8 (relative) from ours."""
    ours, theirs = _pair(seed, roi_batch=10_000)
    ours.double()
    theirs.double()
    torch.manual_seed(100 + seed)
    images = torch.randn(1, 3, H, W, dtype=torch.float64)
    gt_boxes = torch.tensor([[[10.0, 20.0, 60.0, 70.0, 0], [80.0, 30.0, 150.0, 100.0, 2],
                              [30.0, 40.0, 100.0, 90.0, 1], [-1, -1, -1, -1, -1]]],
                            dtype=torch.float64)  # fmt: skip
    num_anchors = _non_neutral_anchors(ours, images, gt_boxes)
    ours.rpn.batch_size_per_image = num_anchors
    theirs.rpn.fg_bg_sampler.batch_size_per_image = num_anchors
    ours.train()
    theirs.train()

    losses = ours(images, gt_boxes)
    their_losses = theirs(list(images), matched.torchvision_targets(gt_boxes))
    names = {"loss_rpn_obj": "loss_objectness", "loss_rpn_box": "loss_rpn_box_reg",
             "loss_cls": "loss_classifier", "loss_box": "loss_box_reg"}  # fmt: skip
    for name, their_name in names.items():
        torch.testing.assert_close(
            losses[name], their_losses[their_name], rtol=1e-6, atol=0, check_dtype=False, msg=name
        )
    assert losses["loss_rpn_box"] > 0 and losses["loss_box"] > 0

    sum(losses.values()).backward()
    sum(their_losses.values()).backward()
    pairs = [
        (ours.backbone, theirs.backbone.body),
        (ours.rpn.pred_net, theirs.rpn.head.pred_net),
        (ours.cls_pred[:-1], theirs.roi_heads.box_head),
    ]
    for mine, other in pairs:
        for (name, p), q in zip(mine.named_parameters(), other.parameters(), strict=True):
            assert p.grad is not None and p.grad.abs().max() > 0, name
            torch.testing.assert_close(p.grad, q.grad, atol=1e-9, rtol=1e-6, msg=name)
