"""Our Faster R-CNN and torchvision's ``FasterRCNN`` built to the same configuration.

Both models get identical neural modules with identical weights, so a comparison measures the
detection pipeline around them (anchor matching, sampling, proposal NMS, RoI pooling, losses,
post-processing), not different networks:

- backbone + FPN: one ``common.DetectorBackboneWithFPN`` (random init), shared by deep copy;
- RPN head: our 3x3-conv stem plus 3x3 objectness and delta convs, wrapped for torchvision;
- ``norm="gn"`` (``train``'s default on new data): GroupNorm after each FPN conv and each
  head-stem conv, in the shared modules, so in both;
- anchors: ``anchor_stride_scale * stride`` per level (p3, p4, p5), ratios (0.5, 1, 2),
  centred on the top-left pixel of each feature cell in both (our RPN's default
  ``anchor_offset = 0``; ``AnchorGenerator``'s only placement);
- RPN: IoU (0.3, 0.6), ``rpn_batch`` anchors per image, half foreground, pre/post-NMS top-k,
  NMS 0.7;
- second stage: RoI Align 7x7 (sampling ratio 2; ours half-pixel aligned unless
  ``roi_align_offset=0``, torchvision's ``MultiScaleRoIAlign`` not, having no such option)
  from the level chosen by the box size, our conv stem + flatten as the box head, a linear
  classifier over ``C + 1`` classes, class-specific box deltas with weights (10, 10, 5, 5),
  IoU 0.5 matching, ``roi_batch`` RoIs per image, 25% foreground;
- box losses: smooth-L1 with beta 1/9 in both stages (torchvision's, fixed in its code; ours
  ``smooth_l1_beta``, 1/9 here as ``train`` on new data uses; 0 would be our L1);
- torchvision's transform never resizes (``_NoResize``: multi-scale batches arrive resized)
  and does not normalise (mean 0, std 1): images arrive normalised, as ours do. It pads the
  batch to a multiple of 32 itself, as our ``PadCollate`` does.
- ``anchor_sizes`` (pixels per level, e.g. an ``eecs598.anchor_fit`` fit) replaces
  ``anchor_stride_scale`` in both. With several sizes per level the two order a location's
  anchors differently (ours size-major, torchvision's ratio-major), so the shared RPN head's
  initial outputs then meet differently ordered anchors; with one size they are the same.

Torchvision's box predictor has a delta row for the background class as well, so its last
linear layer is ``4 (C + 1)`` wide against our ``4 C``; the shared rows are copied.
"""

from __future__ import annotations

import copy
import os
import sys
from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN as TorchvisionFasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from common import DetectorBackboneWithFPN  # noqa: E402
from two_stage_detector import RPN, FasterRCNN  # noqa: E402

LEVELS = ("p3", "p4", "p5")


class _NoResize(GeneralizedRCNNTransform):
    """Torchvision's batching transform without its resize: images keep their size."""

    def resize(self, image, target=None):
        return image, target


class _TVBackbone(nn.Module):
    """Our backbone with the ``OrderedDict`` output and ``out_channels`` torchvision expects."""

    def __init__(self, backbone: DetectorBackboneWithFPN):
        super().__init__()
        self.body = backbone
        self.out_channels = backbone.out_channels

    def forward(self, images: torch.Tensor) -> OrderedDict:
        return OrderedDict(self.body(images))


class _TVRPNHead(nn.Module):
    """Our RPN prediction network in torchvision's head interface (lists of NCHW maps)."""

    def __init__(self, pred_net: nn.Module):
        super().__init__()
        self.pred_net = pred_net

    def forward(self, features: list[torch.Tensor]) -> tuple[list, list]:
        logits, deltas = [], []
        for x in features:
            stem = self.pred_net.stem_rpn(x)
            logits.append(self.pred_net.pred_obj(stem))
            deltas.append(self.pred_net.pred_box(stem))
        return logits, deltas


def build_pair(
    num_classes: int = 20,
    fpn_channels: int = 64,
    image_size: int = 224,
    rpn_batch: int = 16,
    roi_batch: int = 32,
    pre_nms_topk: int = 400,
    post_nms_topk: int = 80,
    anchor_stride_scale: int = 8,
    seed: int = 0,
    anchor_sizes: dict[str, list[float]] | None = None,
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
    smooth_l1_beta: float = 1 / 9,
    roi_align_offset: float = 0.5,
    norm: str = "none",
) -> tuple[FasterRCNN, TorchvisionFasterRCNN]:
    """Return ``(ours, theirs)`` with the same configuration and the same weights."""
    torch.manual_seed(seed)
    backbone = DetectorBackboneWithFPN(fpn_channels, pretrained=False, norm=norm)
    stem = [fpn_channels, fpn_channels]
    rpn = RPN(
        fpn_channels,
        stem,
        batch_size_per_image=rpn_batch,
        anchor_stride_scale=anchor_stride_scale,
        pre_nms_topk=pre_nms_topk,
        post_nms_topk=post_nms_topk,
        anchor_sizes=anchor_sizes,
        anchor_aspect_ratios=aspect_ratios,
        smooth_l1_beta=smooth_l1_beta,
        norm=norm,
    )
    ours = FasterRCNN(
        backbone, rpn, stem, num_classes, batch_size_per_image=roi_batch, box_regression=True,
        smooth_l1_beta=smooth_l1_beta, roi_align_offset=roi_align_offset, norm=norm,
    )  # fmt: skip

    strides = backbone.fpn_strides
    if anchor_sizes is None:
        anchor_sizes = {level: [anchor_stride_scale * strides[level]] for level in LEVELS}
    anchor_generator = AnchorGenerator(
        sizes=tuple(tuple(anchor_sizes[level]) for level in LEVELS),
        aspect_ratios=(tuple(aspect_ratios),) * len(LEVELS),
    )
    box_head = copy.deepcopy(ours.cls_pred[:-1])  # conv stem + flatten
    predictor = FastRCNNPredictor(ours.cls_pred[-1].in_features, num_classes + 1)
    with torch.no_grad():
        predictor.cls_score.load_state_dict(ours.cls_pred[-1].state_dict())
        predictor.bbox_pred.weight[4:].copy_(ours.box_pred.weight)
        predictor.bbox_pred.bias[4:].copy_(ours.box_pred.bias)
    theirs = TorchvisionFasterRCNN(
        _TVBackbone(copy.deepcopy(backbone)),
        min_size=image_size,
        max_size=image_size,
        image_mean=[0.0, 0.0, 0.0],
        image_std=[1.0, 1.0, 1.0],
        rpn_anchor_generator=anchor_generator,
        rpn_head=_TVRPNHead(copy.deepcopy(rpn.pred_net)),
        rpn_pre_nms_top_n_train=pre_nms_topk,
        rpn_pre_nms_top_n_test=pre_nms_topk,
        rpn_post_nms_top_n_train=post_nms_topk,
        rpn_post_nms_top_n_test=post_nms_topk,
        rpn_nms_thresh=0.7,
        rpn_fg_iou_thresh=0.6,
        rpn_bg_iou_thresh=0.3,
        rpn_batch_size_per_image=rpn_batch,
        rpn_positive_fraction=0.5,
        box_roi_pool=MultiScaleRoIAlign(list(LEVELS), output_size=7, sampling_ratio=2),
        box_head=box_head,
        box_predictor=predictor,
        box_score_thresh=0.05,
        box_nms_thresh=0.5,
        box_detections_per_img=100,
        box_fg_iou_thresh=0.5,
        box_bg_iou_thresh=0.5,
        box_batch_size_per_image=roi_batch,
        box_positive_fraction=0.25,
    )
    theirs.transform = _NoResize(image_size, image_size, [0.0] * 3, [1.0] * 3)
    return ours, theirs


def torchvision_targets(gt_boxes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Our padded ``(B, M, 5)`` GT rows as torchvision targets (labels shifted by one)."""
    targets = []
    for rows in gt_boxes:
        rows = rows[rows[:, 4] >= 0]
        targets.append({"boxes": rows[:, :4].clone(), "labels": rows[:, 4].long() + 1})
    return targets
