"""Padded batches of differently sized images, and anchors given in pixels per level."""

from __future__ import annotations

import pytest
import torch

from common import DetectorBackboneWithFPN
from two_stage_detector import RPN, FasterRCNN


def tiny_model(num_classes: int = 3, fpn_levels=("p3", "p4", "p5"), **rpn_options) -> FasterRCNN:
    torch.manual_seed(0)
    backbone = DetectorBackboneWithFPN(16, pretrained=False, fpn_levels=fpn_levels)
    rpn = RPN(16, [16], batch_size_per_image=32, pre_nms_topk=60, post_nms_topk=30,
              **rpn_options)  # fmt: skip
    model = FasterRCNN(backbone, rpn, [16], num_classes, 16, box_regression=True)
    with torch.no_grad():  # spread the scores: no near-ties in the detection order
        model.cls_pred[-1].weight.normal_(std=0.5)
        model.box_pred.weight.normal_(std=0.05)
    return model.eval()


def padded(images: list[torch.Tensor], height: int, width: int) -> torch.Tensor:
    """Images at the top-left of a zero (mean-colour after normalisation) canvas."""
    canvas = torch.zeros(len(images), 3, height, width)
    for i, image in enumerate(images):
        canvas[i, :, : image.shape[1], : image.shape[2]] = image
    return canvas


def test_padded_batch_gives_each_image_what_batch_one_gives():
    model = tiny_model()
    torch.manual_seed(1)
    images = [torch.randn(3, 64, 96), torch.randn(3, 96, 64), torch.randn(3, 80, 80)]
    sizes = torch.tensor([[64, 96], [96, 64], [80, 80]])
    with torch.no_grad():
        batched = model(padded(images, 96, 96), test_score_thresh=0.0, image_sizes=sizes)
        for i, image in enumerate(images):
            boxes, classes, scores = model(
                padded([image], 96, 96), test_score_thresh=0.0, image_sizes=sizes[i : i + 1]
            )
            b_boxes, b_classes, b_scores = batched[i]
            assert len(boxes) > 10 and len(boxes) == len(b_boxes)
            torch.testing.assert_close(b_boxes, boxes, atol=1e-4, rtol=1e-4)
            assert torch.equal(b_classes, classes)
            torch.testing.assert_close(b_scores, scores, atol=1e-5, rtol=1e-5)
            height, width = sizes[i].tolist()
            assert boxes[:, 2].max() <= width and boxes[:, 3].max() <= height
            assert boxes.min() >= 0


def test_without_sizes_detections_may_reach_into_the_padding():
    model = tiny_model()
    torch.manual_seed(1)
    image = padded([torch.randn(3, 48, 96)], 96, 96)
    with torch.no_grad():
        boxes, _, _ = model(image, test_score_thresh=0.0)
        clipped, _, _ = model(image, test_score_thresh=0.0, image_sizes=torch.tensor([[48, 96]]))
    assert boxes[:, 3].max() > 48 >= clipped[:, 3].max()


def test_training_proposals_are_clipped_to_each_true_size():
    model = tiny_model().train()
    torch.manual_seed(2)
    images = padded([torch.randn(3, 64, 96), torch.randn(3, 96, 64)], 96, 96)
    sizes = torch.tensor([[64, 96], [96, 64]])
    gt = torch.tensor([[[10.0, 10, 50, 40, 0], [-1, -1, -1, -1, -1]],
                       [[5.0, 20, 60, 90, 2], [30, 30, 50, 60, 1]]])  # fmt: skip
    losses = model(images, gt, image_sizes=sizes)
    assert set(losses) == {"loss_rpn_obj", "loss_rpn_box", "loss_cls", "loss_box"}
    assert all(torch.isfinite(v) for v in losses.values())
    feats = model.backbone(images)
    out = model.rpn(feats, model.backbone.fpn_strides, gt, image_size=sizes)
    for boxes, (height, width) in zip(out["proposals"], sizes.tolist(), strict=True):
        assert boxes[:, 2].max() <= width and boxes[:, 3].max() <= height


@pytest.mark.parametrize(
    "bad", [torch.tensor([[64, 96]]), torch.tensor([[64.0, 96.0], [96.0, 64.0]])]
)
def test_image_sizes_of_the_wrong_shape_or_dtype_are_refused(bad):
    model = tiny_model()
    with pytest.raises(ValueError, match="image_sizes must be a"):
        model(torch.zeros(2, 3, 64, 96), image_sizes=bad)


def test_anchor_sizes_in_pixels_per_level():
    sizes = {"p3": [12.0, 20.0], "p4": [40.0, 56.0], "p5": [90.0, 128.0]}
    rpn = RPN(8, [8], anchor_sizes=sizes, anchor_aspect_ratios=[1.0, 2.0])
    assert rpn.pred_net.pred_obj.out_channels == 4  # 2 sizes x 2 ratios
    feats = {f"p{k}": torch.zeros(1, 8, 64 // 2**k, 64 // 2**k) for k in (3, 4, 5)}
    strides = {"p3": 8, "p4": 16, "p5": 32}
    anchors = rpn.get_anchors(feats, strides, torch.float32)
    for level, level_sizes in sizes.items():
        wh = anchors[level][:4, 2:] - anchors[level][:4, :2]  # the first location's anchors
        areas = (wh[:, 0] * wh[:, 1]).sqrt()
        torch.testing.assert_close(areas, torch.tensor(level_sizes).repeat_interleave(2))
        torch.testing.assert_close(wh[:, 1] / wh[:, 0], torch.tensor([1.0, 2.0] * 2))
    assert rpn.config["anchor_sizes"] == sizes
    rebuilt = RPN(**rpn.config)
    assert rebuilt.config == rpn.config


def test_anchor_sizes_from_a_checkpoint_config_rebuild_the_model():
    model = tiny_model(anchor_sizes={"p3": [10.0], "p4": [30.0], "p5": [70.0]})
    rebuilt = FasterRCNN.from_config(model.config)
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.rpn.anchor_sizes == {"p3": [10.0], "p4": [30.0], "p5": [70.0]}


@pytest.mark.parametrize(
    "sizes", [{"p3": [10.0], "p4": [20.0, 30.0], "p5": [60.0]}, {"p3": [0.0], "p4": [1.0]}]
)
def test_anchor_sizes_must_have_one_count_of_positive_sizes(sizes):
    with pytest.raises(ValueError, match="same number of positive sizes"):
        RPN(8, [8], anchor_sizes=sizes)


def test_anchor_sizes_missing_a_feature_level_is_named():
    rpn = RPN(8, [8], anchor_sizes={"p3": [10.0], "p4": [30.0], "p5": [70.0]})
    feats = {f"p{k}": torch.zeros(1, 8, 4, 4) for k in (2, 3, 4, 5)}
    with pytest.raises(ValueError, match="level 'p2'"):
        rpn.get_anchors(feats, {"p2": 4, "p3": 8, "p4": 16, "p5": 32}, torch.float32)


def test_p2_model_trains_and_pools_small_boxes_from_p2():
    model = tiny_model(fpn_levels=("p2", "p3", "p4", "p5"), anchor_stride_scale=4).train()
    assert model.backbone.fpn_strides == {"p2": 4, "p3": 8, "p4": 16, "p5": 32}
    torch.manual_seed(3)
    gt = torch.tensor([[[4.0, 4, 14, 14, 0]], [[20.0, 20, 60, 50, 1]]])
    losses = model(torch.randn(2, 3, 64, 64), gt)
    sum(losses.values()).backward()
    assert model.backbone.fpn_params["lateral_c2"].weight.grad.abs().sum() > 0
    rebuilt = FasterRCNN.from_config(model.config)
    assert rebuilt.backbone.fpn_strides == model.backbone.fpn_strides
    rebuilt.load_state_dict(model.state_dict())
