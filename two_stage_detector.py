"""Faster R-CNN: a Region Proposal Network plus a Fast R-CNN second stage.

The module reads top-down in the order the notebook teaches (sections 3.5 to 4.2):

1. ``RPNPredictionNetwork``: objectness logits and box deltas for every anchor (3.5).
2. ``generate_fpn_anchors``: ``A`` anchors at every FPN location (3.6.1).
3. ``iou`` and ``rcnn_match_anchors_to_gt``: anchor to GT matching (3.6.2).
4. ``rcnn_get_deltas_from_anchors`` / ``rcnn_apply_deltas_to_anchors``: box deltas (3.6.4).
5. ``sample_rpn_training``: foreground / background sampling (3.7).
6. ``RPN``: the first stage, losses and proposals (3.8).
7. The second stage's training (4): ``sample_training_rois`` mixes GT boxes into the
   proposals and samples the RoIs to classify; ``fast_rcnn_losses``.
8. ``FasterRCNN``: backbone, RPN, RoI pooling and the second-stage classifier (and optional
   box regression), trained end to end (4, 4.1).
9. ``padded_detections``: inference, per-class scores and boxes through class-specific NMS
   (4.2) in a fixed-shape layout (``FasterRCNN.detect``, what an export traces), and
   ``fast_rcnn_detections``, the same per image; ``compile_detector`` compiles the model's
   fixed-shape parts.

Below this module, and re-exported here where the notebook or tests import them:

- ``common``: the box operations the model runs on: ``assign_fpn_levels`` and
  ``fpn_roi_align`` (each box's FPN level, and RoI Align of every box from its level in one
  call; ``reassign_proposals_to_fpn_levels`` is the assignment's per-level form, unused by the
  model), ``class_spec_nms``, the padded layout's engine (``batched_nms_topk``, ``clip_boxes``,
  ``gather_rows``, ``unpad``) and ``constructor_config``.
- ``eecs598.checks``: the input validators, and the GT-row markers ``BACKGROUND`` and
  ``NEUTRAL``.

Conventions. ``B`` is the batch size, ``A`` the anchors per location, ``C`` the number of object
classes. Boxes are ``(x1, y1, x2, y2)`` in absolute pixels of the (resized) input image. GT boxes
come as ``(B, M, 5)`` rows ``(x1, y1, x2, y2, class)`` padded with rows of ``-1``. Matched GT
rows use ``-1`` for background and ``-1e8`` for neutral (ignored) anchors.

Everything is vectorised over the batch: the only Python loops run over the FPN levels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from common import (
    DetectorBackboneWithFPN,
    assign_fpn_levels,
    batched_nms_topk,
    box_iou,
    class_spec_nms,
    clip_boxes,
    constructor_config,
    drop_gt_padding,
    exporting,
    fpn_roi_align,
    full_precision,
    gather_rows,
    get_fpn_location_coords,
    group_norm,
    reassign_proposals_to_fpn_levels,
    training_diagnostics,
    unpad,
)
from eecs598 import checks
from eecs598.checks import BACKGROUND, NEUTRAL
from eecs598.settings import EvalSettings, HeadSettings, ModelSettings, RPNSettings, complete_config

__all__ = [
    "hello_two_stage_detector",
    "RPNPredictionNetwork",
    "generate_fpn_anchors",
    "iou",
    "rcnn_match_anchors_to_gt",
    "rcnn_get_deltas_from_anchors",
    "rcnn_apply_deltas_to_anchors",
    "sample_rpn_training",
    "sample_rpn_training_masks",
    "anchors_for_shapes",
    "rpn_losses",
    "assign_fpn_levels",
    "fpn_roi_align",
    "reassign_proposals_to_fpn_levels",
    "RPN",
    "sample_training_rois",
    "fast_rcnn_losses",
    "FasterRCNN",
    "fast_rcnn_detections",
    "padded_detections",
    "unpad_detections",
    "compile_detector",
    "class_spec_nms",
    "BACKGROUND",
    "NEUTRAL",
]

# Largest log-scale change a decoded delta may apply (torchvision and detectron2 use the same).
DELTA_SCALE_CLAMP = math.log(1000.0 / 16)
# The constructors' defaults, defined once in ``eecs598.settings`` (the notebook's values).
_RPN, _HEADS, _MODEL, _EVAL = RPNSettings(), HeadSettings(), ModelSettings(), EvalSettings()


def hello_two_stage_detector() -> None:
    print("Hello from two_stage_detector.py!")


def _conv_stem(in_channels: int, stem_channels: Sequence[int], norm: str = "none") -> nn.Sequential:
    """A 3x3 conv + ReLU per entry of ``stem_channels``; weights N(0, 0.01), biases 0.

    ``norm="gn"`` puts a ``GroupNorm`` (``group_norm``) between each conv and its ReLU. With
    N(0, 0.01) weights each plain conv scales its input, and the gradient it passes back,
    by about ``0.01 * sqrt(9 * C)``: a few such layers barely move a backbone that starts
    from random weights. After a normalisation both scales are set by the data instead.
    """
    layers: list[nn.Module] = []
    for out_channels in stem_channels:
        conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        nn.init.normal_(conv.weight, std=0.01)
        nn.init.zeros_(conv.bias)
        layers += [conv, *group_norm(out_channels, norm), nn.ReLU(inplace=True)]
        in_channels = out_channels
    return nn.Sequential(*layers)


def _second_stage_predictors(
    in_channels: int,
    stem_channels: Sequence[int],
    roi_size: tuple[int, int],
    num_classes: int,
    box_regression: bool,
    norm: str,
) -> tuple[nn.Sequential, nn.Linear | None]:
    """``FasterRCNN``'s classifier ``cls_pred``: a conv stem (``_conv_stem``), flattened, then a
    linear layer to ``C + 1`` logits (weights N(0, 0.01)); and, with ``box_regression``, its
    box regressor ``box_pred``: a linear layer from the same flattened features
    (``cls_pred[:-1]``) to ``4 C`` class-specific deltas (weights N(0, 0.001)); else None."""
    cls_pred = nn.Sequential(
        _conv_stem(in_channels, stem_channels, norm),
        nn.Flatten(),
        nn.Linear(stem_channels[-1] * roi_size[0] * roi_size[1], num_classes + 1),
    )
    nn.init.normal_(cls_pred[-1].weight, std=0.01)
    nn.init.zeros_(cls_pred[-1].bias)
    if not box_regression:
        return cls_pred, None
    box_pred = nn.Linear(cls_pred[-1].in_features, 4 * num_classes)
    nn.init.normal_(box_pred.weight, std=0.001)
    nn.init.zeros_(box_pred.bias)
    return cls_pred, box_pred


def _flatten_per_anchor(x: torch.Tensor, values_per_anchor: int) -> torch.Tensor:
    """(B, A * V, H, W) head output -> (B, H * W * A, V), locations x-fastest, then anchors."""
    batch, _, height, width = x.shape
    x = x.view(batch, -1, values_per_anchor, height, width).permute(0, 3, 4, 1, 2)
    return x.reshape(batch, -1, values_per_anchor)


class RPNPredictionNetwork(nn.Module):
    """RPN head: a shared conv stem, then objectness logits and box deltas for every anchor.

    The same stem and predictors run on every FPN level.

    Output layout: the notebook's comment shows (B, H*W, A) and (B, H*W, 4A). This package
    returns the flattened per-anchor form, (B, H*W*A) and (B, H*W*A, 4), with ``A`` varying
    fastest, exactly the order of ``generate_fpn_anchors``; ``.view(B, H*W, A)`` recovers the
    notebook's form.

    Args:
        in_channels: FPN channels.
        stem_channels: output channels of each conv3x3 + ReLU of the stem.
        num_anchors: anchors per location ``A``.
        norm: ``"none"`` or ``"gn"``: a GroupNorm after each conv of the stem.
    """

    def __init__(
        self,
        in_channels: int,
        stem_channels: Sequence[int],
        num_anchors: int = 3,
        norm: str = _MODEL.norm,
    ):
        super().__init__()
        self.num_anchors = num_anchors
        self.stem_rpn = _conv_stem(in_channels, stem_channels, norm)
        self.pred_obj = nn.Conv2d(stem_channels[-1], num_anchors, kernel_size=3, padding=1)
        self.pred_box = nn.Conv2d(stem_channels[-1], 4 * num_anchors, kernel_size=3, padding=1)
        for conv in (self.pred_obj, self.pred_box):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(
        self, feats_per_fpn_level: dict[str, torch.Tensor]
    ) -> list[dict[str, torch.Tensor]]:
        """
        Args:
            feats_per_fpn_level: ``{level: (B, in_channels, H, W)}``.

        Returns:
            ``[object_logits, boxreg_deltas]``: two dicts keyed like the input, with
            (B, H*W*A) logits and (B, H*W*A, 4) deltas.
        """
        object_logits, boxreg_deltas = {}, {}
        for level, feats in feats_per_fpn_level.items():
            stem = self.stem_rpn(feats)
            object_logits[level] = _flatten_per_anchor(self.pred_obj(stem), 1).squeeze(-1)
            boxreg_deltas[level] = _flatten_per_anchor(self.pred_box(stem), 4)
        return [object_logits, boxreg_deltas]


@torch.no_grad()
def generate_fpn_anchors(
    locations_per_fpn_level: dict[str, torch.Tensor],
    strides_per_fpn_level: dict[str, int],
    stride_scale: float | Sequence[float],
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
) -> dict[str, torch.Tensor]:
    """``A = len(stride_scale) * len(aspect_ratios)`` anchors centred on every FPN location.

    An anchor of a level with stride ``s`` has area ``(scale * s) ** 2`` for each ``scale`` in
    ``stride_scale`` (the notebook passes one number: one size per level, as torchvision's and
    detectron2's FPN defaults) and aspect ratio ``h / w``, so ``w = sqrt(area / ratio)`` and
    ``h = ratio * w``.

    Args:
        locations_per_fpn_level: ``{level: (H*W, 2)}`` centres from ``get_fpn_location_coords``.
        strides_per_fpn_level: ``{level: stride}``.
        stride_scale: anchor side(s) in units of the level's stride: a number or a sequence.
        aspect_ratios: ``h / w`` of the anchors of each size.

    Returns:
        ``{level: (H*W*A, 4)}`` anchors, location-major, then scale, with the aspect ratio
        varying fastest: the order of ``RPNPredictionNetwork``'s outputs.
    """
    scales = anchor_scales(stride_scale)
    anchors_per_fpn_level = {}
    for level, locations in locations_per_fpn_level.items():
        options = dict(dtype=locations.dtype, device=locations.device)
        ratios = torch.as_tensor(aspect_ratios, **options)
        areas = (torch.as_tensor(scales, **options) * strides_per_fpn_level[level]) ** 2
        widths = torch.sqrt(areas[:, None] / ratios).reshape(-1)  # (A,)
        heights = (ratios * widths.view(len(scales), -1)).reshape(-1)
        half_wh = torch.stack([widths, heights], dim=1) / 2  # (A, 2)
        centres = locations[:, None, :]  # (H*W, 1, 2)
        anchors = torch.cat([centres - half_wh, centres + half_wh], dim=2)  # (H*W, A, 4)
        anchors_per_fpn_level[level] = anchors.reshape(-1, 4)
    return anchors_per_fpn_level


def anchor_scales(stride_scale: float | Sequence[float]) -> list[float]:
    """``stride_scale`` as a list: a number gives one anchor size per level."""
    if isinstance(stride_scale, (int, float)):
        return [float(stride_scale)]
    return [float(v) for v in stride_scale]


def anchors_for_shapes(
    shapes: dict[str, tuple],
    strides_per_fpn_level: dict[str, int],
    stride_scale: float | Sequence[float],
    aspect_ratios: Sequence[float],
    offset: float,
    sizes: dict[str, Sequence[float]] | None = None,
    **options: Any,
) -> dict[str, torch.Tensor]:
    """``{level: (H*W*A, 4)}`` anchors for ``{level: (B, C, H, W)}`` feature shapes
    (``RPN.get_anchors``): ``generate_fpn_anchors`` at the locations of
    ``get_fpn_location_coords`` with ``offset``, ``stride_scale`` strides a side, or the
    pixel ``sizes`` per level when given. ``options``: the anchors' ``dtype`` and ``device``."""
    locations = get_fpn_location_coords(
        shapes, strides_per_fpn_level, offset=offset, **options
    )  # fmt: skip
    anchors = {}
    for level, level_locations in locations.items():
        stride = strides_per_fpn_level[level]
        if sizes and level not in sizes:
            raise ValueError(
                f"RPN anchor_sizes has levels {sorted(sizes)} but the features have level '{level}'"
            )
        scale = [size / stride for size in sizes[level]] if sizes else stride_scale
        level_anchors = generate_fpn_anchors(
            {level: level_locations}, strides_per_fpn_level, scale, aspect_ratios
        )  # fmt: skip
        anchors[level] = level_anchors[level]
    return anchors


def iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU, broadcasting over leading batch dimensions (see ``common.box_iou``).

    Args:
        boxes1: (..., M, 4) boxes ``(x1, y1, x2, y2)``.
        boxes2: (..., N, 4) boxes.

    Returns:
        (..., M, N) IoU; boxes of zero area give 0.
    """
    return box_iou(boxes1, boxes2)


@torch.no_grad()
def rcnn_match_anchors_to_gt(
    anchor_boxes: torch.Tensor,
    gt_boxes: torch.Tensor,
    iou_thresholds: tuple[float, float],
    allow_low_quality_matches: bool = False,
) -> torch.Tensor:
    """Match every anchor (or proposal) with the GT box it overlaps most.

    With ``(low, high) = iou_thresholds`` and ``q`` the anchor's best IoU over valid GT boxes:

    - ``q <= low``: background, the row is all ``-1``;
    - ``low < q < high``: neutral (ignored in training), the row is all ``-1e8``;
    - ``q >= high``: the best GT row ``(x1, y1, x2, y2, class)``.

    Padded GT rows (class ``-1``) are ignored; an image without GT gives all background.

    ``allow_low_quality_matches`` adds the Faster R-CNN paper's second positive rule, as
    torchvision and detectron2 do for the RPN: the anchors with the highest IoU for a GT box are
    foreground (matched with their own best GT) even below ``high``. Off by default, giving
    exactly the notebook's rule.

    Args:
        anchor_boxes: (N, 4) anchors, or (B, N, 4).
        gt_boxes: (M, 5) GT rows of one image, or (B, M, 5) for a batch.
        iou_thresholds: ``(low, high)``.

    Returns:
        (N, 5) matched GT rows, or (B, N, 5) for batched ``gt_boxes``.
    """
    checks.check_gt_boxes(gt_boxes)
    gt_boxes = drop_gt_padding(gt_boxes)
    valid_gt = gt_boxes[..., 4] != BACKGROUND  # (..., M)
    match_matrix = iou(anchor_boxes, gt_boxes[..., :4])  # (..., N, M)
    match_matrix = match_matrix.masked_fill(~valid_gt[..., None, :], -1.0)
    if match_matrix.shape[-1] == 0:
        shape = (*match_matrix.shape[:-1], 5)
        return gt_boxes.new_full(shape, BACKGROUND)
    quality, matched_idx = match_matrix.max(dim=-1)  # (..., N)
    matched = torch.gather(
        gt_boxes, -2, matched_idx[..., None].expand(*matched_idx.shape, 5)
    )  # (..., N, 5)
    low, high = iou_thresholds
    foreground = quality >= high
    if allow_low_quality_matches:
        best_per_gt = match_matrix.max(dim=-2, keepdim=True).values  # (..., 1, M)
        is_best = (match_matrix == best_per_gt) & (best_per_gt > 0) & valid_gt[..., None, :]
        foreground |= is_best.any(dim=-1)
    background = (quality <= low) & ~foreground
    matched = torch.where(background[..., None], matched.new_tensor(BACKGROUND), matched)
    neutral = ~foreground & ~background
    return torch.where(neutral[..., None], matched.new_tensor(NEUTRAL), matched)


def rcnn_get_deltas_from_anchors(
    anchors: torch.Tensor,
    gt_boxes: torch.Tensor,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
) -> torch.Tensor:
    """Encode GT boxes as R-CNN deltas relative to anchors.

    ``dx = wx * (gx - ax) / aw``, ``dy = wy * (gy - ay) / ah``, ``dw = ww * log(gw / aw)``,
    ``dh = wh * log(gh / ah)``, with box centres ``(x, y)`` and sizes ``(w, h)``. The notebook
    uses unit weights; the second stage uses ``(10, 10, 5, 5)`` like torchvision and
    detectron2, which scales its regression targets to a useful range.

    Args:
        anchors: (..., 4) anchor boxes.
        gt_boxes: (..., 5) matched GT rows (``(..., 4)`` boxes are accepted too). Rows whose class
            is negative (background ``-1`` or neutral ``-1e8``) get deltas of ``-1e8``.
        weights: ``(wx, wy, ww, wh)``.

    Returns:
        (..., 4) deltas.
    """
    wx, wy, ww, wh = weights
    anchor_wh = anchors[..., 2:4] - anchors[..., 0:2]
    anchor_xy = anchors[..., 0:2] + 0.5 * anchor_wh
    gt_wh = gt_boxes[..., 2:4] - gt_boxes[..., 0:2]
    gt_xy = gt_boxes[..., 0:2] + 0.5 * gt_wh
    dxy = (gt_xy - anchor_xy) / anchor_wh * anchors.new_tensor([wx, wy])
    dwh = torch.log(gt_wh / anchor_wh) * anchors.new_tensor([ww, wh])
    deltas = torch.cat([dxy, dwh], dim=-1)
    if gt_boxes.shape[-1] == 5:
        ignored = gt_boxes[..., 4:5] < 0
        deltas = torch.where(ignored, deltas.new_tensor(NEUTRAL), deltas)
    return deltas


def rcnn_apply_deltas_to_anchors(
    deltas: torch.Tensor,
    anchors: torch.Tensor,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
) -> torch.Tensor:
    """Decode deltas into boxes, the inverse of ``rcnn_get_deltas_from_anchors``.

    ``dw`` and ``dh`` are clamped at ``log(1000 / 16)`` so that an untrained head cannot produce
    infinite boxes. The inputs are never modified in place.

    Args:
        deltas: (..., 4) deltas ``(dx, dy, dw, dh)``.
        anchors: (..., 4) anchor boxes (broadcastable with ``deltas``).
        weights: ``(wx, wy, ww, wh)`` used when encoding.

    Returns:
        (..., 4) boxes ``(x1, y1, x2, y2)``.
    """
    wx, wy, ww, wh = weights
    anchor_wh = anchors[..., 2:4] - anchors[..., 0:2]
    anchor_xy = anchors[..., 0:2] + 0.5 * anchor_wh
    dxy = deltas[..., 0:2] / deltas.new_tensor([wx, wy])
    dwh = (deltas[..., 2:4] / deltas.new_tensor([ww, wh])).clamp(max=DELTA_SCALE_CLAMP)
    box_xy = anchor_xy + dxy * anchor_wh
    half_wh = 0.5 * torch.exp(dwh) * anchor_wh
    return torch.cat([box_xy - half_wh, box_xy + half_wh], dim=-1)


@torch.no_grad()
def sample_rpn_training_masks(
    gt_boxes: torch.Tensor, num_samples: int, fg_fraction: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomly sample foreground and background rows, per image, as boolean masks.

    At most ``int(num_samples * fg_fraction)`` foreground rows (class ``>= 0``) are taken, and
    background rows (class ``-1``) fill the rest up to ``num_samples``. Neutral rows (``-1e8``)
    are never sampled. Sampling is uniform without replacement, done for every image at once by
    ranking random keys (no Python loop, no host-device sync).

    Args:
        gt_boxes: (N, 5) matched GT rows of one image, or (B, N, 5).
        num_samples: rows to sample per image.
        fg_fraction: the largest share of foreground rows.

    Returns:
        ``(fg_mask, bg_mask)``, each (N,) or (B, N) bool.
    """
    classes = gt_boxes[..., 4]
    is_fg = classes >= 0
    is_bg = classes == BACKGROUND
    num_fg = is_fg.sum(dim=-1, keepdim=True).clamp(max=int(num_samples * fg_fraction))
    num_bg = num_samples - num_fg
    return _take_random(is_fg, num_fg), _take_random(is_bg, num_bg)


def _take_random(candidates: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Keep ``count`` (..., 1) randomly chosen True entries of ``candidates`` (..., N)."""
    keys = torch.rand(candidates.shape, device=candidates.device)
    keys = keys.masked_fill(~candidates, 2.0)  # candidates first, in random order
    ranks = torch.empty_like(keys, dtype=torch.long)
    order = keys.argsort(dim=-1)
    ranks.scatter_(-1, order, torch.arange(keys.shape[-1], device=keys.device).expand_as(order))
    return candidates & (ranks < count)


def sample_rpn_training(
    gt_boxes: torch.Tensor, num_samples: int, fg_fraction: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of sampled foreground and background rows (see ``sample_rpn_training_masks``).

    Args:
        gt_boxes: (N, 5) matched GT rows of one image.
        num_samples: rows to sample.
        fg_fraction: the largest share of foreground rows.

    Returns:
        ``(fg_idx, bg_idx)``: 1-D int64 tensors of row indices.
    """
    fg_mask, bg_mask = sample_rpn_training_masks(gt_boxes, num_samples, fg_fraction)
    return fg_mask.nonzero().squeeze(1), bg_mask.nonzero().squeeze(1)


def _decode_top_anchors(
    anchors: torch.Tensor, logits: torch.Tensor, deltas: torch.Tensor, topk: int, slots: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One level's ``min(topk, N)`` anchors of highest objectness in every image, decoded into
    boxes and padded to ``slots`` (``RPN.predict_proposals``).

    Args:
        anchors: (N, 4); logits: (B, N); deltas: (B, N, 4), in the anchors' dtype.
        topk: anchors kept per image; slots: ``>= min(topk, N)``, the padded length.

    Returns:
        ``(boxes (B, slots, 4), logits (B, slots), filled (B, slots))``, best first; empty
        slots have zero boxes, ``-inf`` logits and ``filled`` False.
    """
    k = min(topk, logits.shape[1])
    top_logits, top_idx = logits.topk(k, dim=1)  # (B, k)
    top_deltas = torch.gather(deltas, 1, top_idx[..., None].expand(-1, -1, 4))
    boxes = rcnn_apply_deltas_to_anchors(top_deltas, anchors[top_idx])
    padding = slots - k
    return (
        F.pad(boxes, (0, 0, 0, padding)),
        F.pad(top_logits, (0, padding), value=float("-inf")),
        F.pad(torch.ones_like(top_idx, dtype=torch.bool), (0, padding)),
    )


def rpn_losses(
    anchors: dict[str, torch.Tensor],
    obj_logits: dict[str, torch.Tensor],
    boxreg_deltas: dict[str, torch.Tensor],
    gt_boxes: torch.Tensor,
    iou_thresholds: tuple[float, float],
    allow_low_quality_matches: bool,
    batch_size_per_image: int,
    smooth_l1_beta: float,
) -> dict[str, torch.Tensor]:
    """The RPN's losses over the sampled anchors of every image at once (``RPN``'s docstring):
    objectness BCE and box (smooth-)L1, each summed and divided by ``batch_size_per_image * B``.

    Args:
        anchors: ``{level: (H*W*A, 4)}``; obj_logits: ``{level: (B, H*W*A)}``;
        boxreg_deltas: ``{level: (B, H*W*A, 4)}``; gt_boxes: (B, M, 5);
        iou_thresholds, allow_low_quality_matches: the matching (``rcnn_match_anchors_to_gt``).
    """
    all_anchors = torch.cat(list(anchors.values()), dim=0)  # (N, 4)
    logits = torch.cat(list(obj_logits.values()), dim=1).to(all_anchors)  # (B, N)
    deltas = torch.cat(list(boxreg_deltas.values()), dim=1).to(all_anchors)  # (B, N, 4)
    matched = rcnn_match_anchors_to_gt(
        all_anchors, gt_boxes, iou_thresholds, allow_low_quality_matches=allow_low_quality_matches
    )  # (B, N, 5)
    gt_deltas = rcnn_get_deltas_from_anchors(all_anchors, matched)
    fg, bg = sample_rpn_training_masks(matched, batch_size_per_image, fg_fraction=0.5)
    normaliser = batch_size_per_image * len(logits)
    loss_obj = F.binary_cross_entropy_with_logits(logits, fg.to(logits), reduction="none")
    gt_deltas = torch.where(fg[..., None], gt_deltas, 0.0)
    loss_box = F.smooth_l1_loss(deltas, gt_deltas, reduction="none", beta=smooth_l1_beta)
    return {
        "loss_rpn_obj": (loss_obj * (fg | bg)).sum() / normaliser,
        "loss_rpn_box": (loss_box * fg[..., None]).sum() / normaliser,
    }


class RPN(nn.Module):
    """Region Proposal Network: the first, class-agnostic stage of Faster R-CNN.

    For every anchor it predicts an objectness logit and box deltas. Training matches anchors
    with GT (``anchor_iou_thresholds``, plus each GT's best anchors as in the paper), samples
    ``batch_size_per_image`` anchors per image with up to half foreground, and returns

    - ``loss_rpn_obj``: binary cross-entropy over the sampled anchors;
    - ``loss_rpn_box``: L1 loss of the deltas over the sampled foreground anchors (smooth-L1
      with ``smooth_l1_beta > 0``);

    both summed and divided by ``batch_size_per_image * B``. Proposals are made in both modes
    (they are detached: no gradient flows from the second stage into the RPN's boxes).

    Args:
        fpn_channels: channels of the FPN features.
        stem_channels: the prediction network's stem.
        batch_size_per_image: anchors sampled per image for the losses (16 in the notebook).
        anchor_stride_scale: anchor side in units of the level's stride; a sequence gives
            several sizes per level.
        anchor_aspect_ratios: anchor ``h / w`` ratios (``A = sizes * ratios`` anchors per
            location).
        anchor_iou_thresholds: ``(low, high)`` for background / foreground.
        nms_thresh: IoU threshold of the per-level NMS on proposals.
        pre_nms_topk: proposals kept per level and image before NMS.
        post_nms_topk: proposals kept per image after NMS, over all levels.
        allow_low_quality_matches: each GT's best anchors are foreground (the Faster R-CNN
            paper, torchvision and detectron2 do this); False gives the bare threshold rule.
        min_proposal_size: proposals narrower or shorter than this (pixels) are dropped.
        anchor_sizes: anchor sides in pixels per level, ``{level: [S_1, ...]}`` with the same
            count on every level; replaces ``anchor_stride_scale`` when given (what
            ``--anchor-scale auto`` fits to the training boxes, ``eecs598.anchor_fit``).
        anchor_offset: where a location's anchors are centred in its ``stride x stride`` cell,
            in strides (``get_fpn_location_coords``' ``offset``). 0 (the default, as
            torchvision's and detectron2's): the top-left pixel, where this backbone's receptive
            fields are centred; the notebook's 0.5 (the cell centre) trains to a lower mAP
            (``bench/README.md``).
        smooth_l1_beta: the box loss. 0 (the default, the notebook's): L1. Above 0: smooth-L1,
            quadratic for errors below ``beta`` (``F.smooth_l1_loss``); torchvision's RPN
            uses 1/9, which ``train`` on new data defaults to: it places boxes tighter
            (figures in ``bench/README.md``). Bit-equal to L1 at 0.

    ``config`` gives these settings as stored in checkpoints.
    """

    def __init__(
        self,
        fpn_channels: int,
        stem_channels: Sequence[int],
        batch_size_per_image: int = _RPN.batch_size_per_image,
        anchor_stride_scale: float | Sequence[float] = _RPN.anchor_stride_scale,
        anchor_aspect_ratios: Sequence[float] = _RPN.anchor_aspect_ratios,
        anchor_iou_thresholds: tuple[float, float] = _RPN.anchor_iou_thresholds,
        nms_thresh: float = _RPN.nms_thresh,
        pre_nms_topk: int = _RPN.pre_nms_topk,
        post_nms_topk: int = _RPN.post_nms_topk,
        allow_low_quality_matches: bool = _RPN.allow_low_quality_matches,
        min_proposal_size: float = _RPN.min_proposal_size,
        anchor_offset: float = _RPN.anchor_offset,
        anchor_sizes: dict[str, Sequence[float]] | None = None,
        smooth_l1_beta: float = _MODEL.smooth_l1_beta,
        norm: str = _MODEL.norm,
    ):
        super().__init__()
        self.anchor_sizes = checks.check_anchor_sizes(anchor_sizes)
        sizes_per_level = (
            len(next(iter(self.anchor_sizes.values())))
            if self.anchor_sizes
            else len(anchor_scales(anchor_stride_scale))
        )
        self.pred_net = RPNPredictionNetwork(
            fpn_channels, stem_channels, sizes_per_level * len(anchor_aspect_ratios), norm
        )
        self.norm = norm
        self.fpn_channels = fpn_channels
        self.stem_channels = list(stem_channels)
        self.batch_size_per_image = batch_size_per_image
        self.anchor_stride_scale = anchor_stride_scale
        self.anchor_aspect_ratios = list(anchor_aspect_ratios)
        self.anchor_iou_thresholds = tuple(anchor_iou_thresholds)
        self.nms_thresh = nms_thresh
        self.pre_nms_topk = pre_nms_topk
        self.post_nms_topk = post_nms_topk
        self.allow_low_quality_matches = allow_low_quality_matches
        self.min_proposal_size = min_proposal_size
        self.anchor_offset = anchor_offset
        self.smooth_l1_beta = checks.check_smooth_l1_beta(smooth_l1_beta)
        self._anchor_cache: dict[tuple, dict[str, torch.Tensor]] = {}

    @property
    def config(self) -> dict:
        """The constructor's arguments, as stored in checkpoints (``RPN(**config)`` rebuilds it):
        a fresh dict of plain values (``constructor_config``), a sequence
        ``anchor_stride_scale`` as a list of floats (a number stays as given)."""
        config = constructor_config(self)
        if not isinstance(self.anchor_stride_scale, (int, float)):
            config["anchor_stride_scale"] = anchor_scales(self.anchor_stride_scale)
        return config

    def get_anchors(
        self,
        feats_per_fpn_level: dict[str, torch.Tensor],
        strides_per_fpn_level: dict[str, int],
        dtype: torch.dtype,
    ) -> dict[str, torch.Tensor]:
        """``{level: (H*W*A, 4)}`` anchors for these feature shapes (``anchors_for_shapes``),
        cached per shape."""
        shapes = {level: tuple(f.shape) for level, f in feats_per_fpn_level.items()}
        device = next(iter(feats_per_fpn_level.values())).device
        key = (tuple((k, s[-2:]) for k, s in shapes.items()), str(device), dtype)
        compiling = torch.compiler.is_compiling()  # symbolic shapes (export) are not hashable
        if compiling or key not in self._anchor_cache:
            anchors = anchors_for_shapes(
                shapes, strides_per_fpn_level, self.anchor_stride_scale,
                self.anchor_aspect_ratios, self.anchor_offset, self.anchor_sizes,
                dtype=dtype, device=device,
            )  # fmt: skip
            if compiling:
                return anchors
            if len(self._anchor_cache) > 32:
                self._anchor_cache.clear()
            self._anchor_cache[key] = anchors
        return self._anchor_cache[key]

    def forward(
        self,
        feats_per_fpn_level: dict[str, torch.Tensor],
        strides_per_fpn_level: dict[str, int],
        gt_boxes: torch.Tensor | None = None,
        image_size: tuple[int, int] | torch.Tensor | None = None,
        *,
        proposal_list: bool = True,
    ) -> dict:
        """
        Args:
            feats_per_fpn_level: ``{level: (B, C, H, W)}`` FPN features.
            strides_per_fpn_level: ``{level: stride}``.
            gt_boxes: (B, M, 5) GT rows; required in training mode.
            image_size: ``(H, W)`` of the input images, for clipping proposals, or a (B, 2)
                tensor of each image's true ``(H, W)`` in a padded batch. Defaults to the
                first level's size times its stride.
            proposal_list: also return ``"proposals"`` as a list. Splitting per image needs a
                host-device sync; ``FasterRCNN`` uses the padded layout and skips it.

        Returns:
            ``{"proposals": B tensors (N_i, 4)}`` (unless ``proposal_list`` is False);
            ``"proposal_boxes"`` (B, K, 4), ``"proposal_scores"`` (B, K) and
            ``"proposal_mask"`` (B, K), the same proposals in a padded layout; and, in
            training, ``"loss_rpn_obj"`` and ``"loss_rpn_box"``.
        """
        level, feats = next(iter(feats_per_fpn_level.items()))
        if image_size is None:
            stride = strides_per_fpn_level[level]
            image_size = (feats.shape[-2] * stride, feats.shape[-1] * stride)
        obj_logits, boxreg_deltas = self.pred_net(feats_per_fpn_level)
        # Anchors and box arithmetic stay in full precision under autocast.
        dtype = torch.promote_types(feats.dtype, torch.float32)
        anchors = self.get_anchors(feats_per_fpn_level, strides_per_fpn_level, dtype)

        boxes, scores, mask = self.predict_proposals(
            anchors, obj_logits, boxreg_deltas, image_size, padded=True
        )
        output = {"proposal_boxes": boxes, "proposal_scores": scores, "proposal_mask": mask}
        if proposal_list:
            output["proposals"] = unpad(boxes, mask)
        if not self.training:
            return output
        if gt_boxes is None:
            raise ValueError("RPN needs gt_boxes (B, M, 5) in training mode")
        checks.check_gt_boxes(gt_boxes, batch_size=len(boxes))
        output.update(self._losses(anchors, obj_logits, boxreg_deltas, gt_boxes.to(dtype)))
        return output

    def _losses(self, *outputs: dict[str, torch.Tensor] | torch.Tensor) -> dict[str, torch.Tensor]:
        """``rpn_losses`` of ``outputs`` (``anchors, obj_logits, boxreg_deltas, gt_boxes``) with
        this RPN's matching, sampling and ``smooth_l1_beta``."""
        return rpn_losses(*outputs, self.anchor_iou_thresholds, self.allow_low_quality_matches,
                          self.batch_size_per_image, self.smooth_l1_beta)  # fmt: skip

    @torch.no_grad()
    def predict_proposals(
        self,
        anchors_per_fpn_level: dict[str, torch.Tensor],
        pred_obj_logits: dict[str, torch.Tensor],
        pred_boxreg_deltas: dict[str, torch.Tensor],
        image_size: tuple[int, int] | torch.Tensor,
        *,
        padded: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Proposals of every image, best first.

        Per level and image the ``pre_nms_topk`` anchors with the highest objectness are
        decoded, clipped to the image, and NMS'd at ``nms_thresh`` (boxes narrower or shorter
        than ``min_proposal_size`` are dropped); the best ``post_nms_topk`` over all levels are
        kept. All images and levels go through one batched NMS.

        Args:
            anchors_per_fpn_level: ``{level: (H*W*A, 4)}``.
            pred_obj_logits: ``{level: (B, H*W*A)}``.
            pred_boxreg_deltas: ``{level: (B, H*W*A, 4)}``.
            image_size: ``(H, W)`` of the input images, or (B, 2) per image.
            padded: return the padded layout below instead of a list; it skips the host-device
                sync of splitting per image (``RPN.forward`` uses it).

        Returns:
            B tensors of shape (N_i, 4), N_i <= post_nms_topk. With ``padded``:
            ``(boxes (B, K, 4), logits (B, K), mask (B, K))`` with ``K = post_nms_topk``;
            empty slots have zero boxes, ``-inf`` logits and ``mask`` False.
        """
        levels = list(anchors_per_fpn_level.items())
        # Each level's top-k, padded to the same n with invalid slots (a level can have fewer
        # than ``pre_nms_topk`` anchors): one NMS group per image and level, contiguous. Under
        # torch.export the anchor counts are symbolic: every level pads to ``pre_nms_topk``.
        group_size = self.pre_nms_topk
        if not exporting():
            group_size = max(min(self.pre_nms_topk, len(anchors)) for _, anchors in levels)
        per_level = [
            _decode_top_anchors(
                anchors,
                pred_obj_logits[level].detach().to(anchors),
                pred_boxreg_deltas[level].detach().to(anchors),
                self.pre_nms_topk,
                group_size,
            )
            for level, anchors in levels
        ]
        boxes, logits, filled = (torch.cat(parts, dim=1) for parts in zip(*per_level, strict=True))
        boxes = clip_boxes(boxes, image_size)  # (B, L*n, 4); logits, filled: (B, L*n)
        wh = boxes[..., 2:] - boxes[..., :2]
        candidates = filled & (wh >= self.min_proposal_size).all(dim=-1)
        groups = torch.arange(logits.shape[1], device=boxes.device).view(len(levels), -1)
        index, mask = batched_nms_topk(
            boxes, logits, groups, candidates, self.nms_thresh, self.post_nms_topk
        )
        boxes = gather_rows(boxes, index) * mask[..., None]
        if not padded:
            return unpad(boxes, mask)
        logits = gather_rows(logits, index).masked_fill(~mask, float("-inf"))
        return boxes, logits, mask


@torch.no_grad()
def sample_training_rois(
    proposals: torch.Tensor,
    valid: torch.Tensor,
    gt_boxes: torch.Tensor,
    batch_size_per_image: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The second stage's training RoIs: add the GT boxes to the proposals, match them with GT
    at IoU 0.5, and sample ``batch_size_per_image`` RoIs per image with up to 25% foreground:
    only these are pooled and classified (the head is the costly part).

    Args:
        proposals: (B, K, 4); valid: (B, K).
        gt_boxes: (B, M, 5) GT rows.
        batch_size_per_image: RoIs sampled per image.

    Returns:
        ``(rois (B, S, 4), sampled (B, S), matched (B, S, 5), foreground (B, S))`` with
        ``S = min(batch_size_per_image, K + M)``: the sampled RoIs first in each row,
        padded slots marked False in ``sampled``.
    """
    gt_boxes = gt_boxes.to(proposals)
    proposals = torch.cat([proposals, gt_boxes[..., :4]], dim=1)  # (B, R = K + M, 4)
    valid = torch.cat([valid, gt_boxes[..., 4] != BACKGROUND], dim=1)
    matched = rcnn_match_anchors_to_gt(proposals, gt_boxes, (0.5, 0.5))  # (B, R, 5)
    matched = torch.where(valid[..., None], matched, matched.new_tensor(NEUTRAL))
    fg, bg = sample_rpn_training_masks(matched, batch_size_per_image, fg_fraction=0.25)
    sampled = fg | bg
    num_slots = min(batch_size_per_image, sampled.shape[1])
    order = torch.argsort(sampled.to(torch.uint8), dim=1, descending=True, stable=True)
    order = order[:, :num_slots]
    return (
        gather_rows(proposals, order),
        torch.gather(sampled, 1, order),
        gather_rows(matched, order),
        torch.gather(fg, 1, order),
    )


def fast_rcnn_losses(
    rois: torch.Tensor,
    sampled: torch.Tensor,
    matched: torch.Tensor,
    foreground: torch.Tensor,
    cls_logits: torch.Tensor,
    box_deltas: torch.Tensor | None,
    box_weights: Sequence[float],
    smooth_l1_beta: float,
) -> dict[str, torch.Tensor]:
    """Second-stage losses over the RoIs of ``sample_training_rois``, each summed over the
    sampled RoIs and divided by their number: ``loss_cls``, the cross-entropy of the ``C + 1``
    logits (class 0 is background), and with ``box_deltas`` ``loss_box``, the (smooth-)L1 loss
    of the GT class's deltas (encoded with ``box_weights``) over the foreground RoIs.

    Args:
        rois: (B, S, 4); sampled, foreground: (B, S); matched: (B, S, 5) GT rows;
        cls_logits: (B, S, C+1); box_deltas: (B, S, C, 4) or None;
        box_weights: ``(wx, wy, ww, wh)``; smooth_l1_beta: 0 for L1.

    Returns:
        ``{"loss_cls": ()}`` and, with ``box_deltas``, ``"loss_box": ()``: scalars.
    """
    target = torch.where(foreground, matched[..., 4].long() + 1, 0)  # background is 0
    loss_cls = F.cross_entropy(
        full_precision(cls_logits).flatten(0, 1), target.flatten(), reduction="none"
    )
    num_sampled = sampled.sum().clamp(min=1)
    losses = {"loss_cls": (loss_cls * sampled.flatten()).sum() / num_sampled}
    if box_deltas is not None:
        fg_class = target.clamp(min=1) - 1  # (B, S)
        index = fg_class[..., None, None].expand(-1, -1, 1, 4)
        pred = full_precision(torch.gather(box_deltas, 2, index).squeeze(2))  # (B, S, 4)
        gt_deltas = rcnn_get_deltas_from_anchors(rois, matched, box_weights)
        gt_deltas = torch.where(foreground[..., None], gt_deltas, 0.0)
        loss_box = F.smooth_l1_loss(pred, gt_deltas, reduction="none", beta=smooth_l1_beta)
        loss_box = loss_box * foreground[..., None]
        losses["loss_box"] = loss_box.sum() / num_sampled
    return losses


class FasterRCNN(nn.Module):
    """Faster R-CNN: backbone with FPN, RPN, and a Fast R-CNN second stage.

    Second stage. Each proposal is pooled by ``fpn_roi_align`` into a ``roi_size`` map from the
    FPN level ``assign_fpn_levels`` picks: the values of ``torchvision.ops.roi_align(...,
    aligned=True, spatial_scale=1 / stride, sampling_ratio=2)`` run on each FPN level, in one
    call for all levels (``roi_align_offset=0``: where ``aligned=False`` samples, as
    torchvision's ``MultiScaleRoIAlign`` does). A conv stem (3x3 conv + ReLU per
    ``stem_channels``) and a linear layer give ``C + 1`` logits (index 0 is background).

    Training. Valid GT boxes are mixed into each image's proposals; proposals are matched
    with GT at IoU 0.5 (``>= 0.5`` foreground, below background); ``batch_size_per_image`` RoIs
    per image are sampled with up to 25% foreground; ``loss_cls`` is their mean cross-entropy.
    The RPN's ``loss_rpn_obj`` and ``loss_rpn_box`` are returned too.

    Optional box regression (``box_regression=True``; off, the notebook's numbers): class-specific
    deltas (weights ``(10, 10, 5, 5)``, as torchvision's and detectron2's), trained by an L1
    ``loss_box`` (smooth-L1 with ``smooth_l1_beta > 0``) over the foreground RoIs divided by
    the sampled RoIs, refine each detection.

    Inference (``padded_detections``): one candidate per proposal and class scored above
    ``test_score_thresh``, class-specific NMS, at most ``detections_per_image`` per image.

    Args:
        backbone: ``DetectorBackboneWithFPN`` (anything with ``out_channels``, ``fpn_strides``
            and a forward giving ``{level: (B, C, H, W)}``).
        rpn: ``RPN``.
        stem_channels: the second-stage conv stem.
        num_classes: object classes ``C`` (background excluded).
        batch_size_per_image: RoIs sampled per image for ``loss_cls``.
        roi_size: RoI Align output size.
        box_regression: add class-specific second-stage box regression.
        detections_per_image: the most detections returned per image.
        smooth_l1_beta: the second-stage box loss, as ``RPN``'s (0: L1, the default).
        roi_align_offset: ``fpn_roi_align``'s ``offset``: feature ``(i, j)`` of stride ``s``
            sits at ``((j + offset) s, (i + offset) s)``. 0.5 (the notebook's) is the cell
            centre; 0 its top-left pixel, where the receptive fields and the RPN's anchors
            sit: then inference and losses equal torchvision's ``FasterRCNN`` with the same
            weights (``tests/test_e2e_torchvision_equivalence.py``; mAP in ``bench/``).

    ``config`` gives these settings as stored in checkpoints; ``from_config`` rebuilds the model.
    """

    def __init__(
        self,
        backbone: nn.Module,
        rpn: RPN,
        stem_channels: Sequence[int],
        num_classes: int,
        batch_size_per_image: int,
        roi_size: tuple[int, int] = _HEADS.roi_size,
        box_regression: bool = _HEADS.box_regression,
        detections_per_image: int = _HEADS.detections_per_image,
        smooth_l1_beta: float = _MODEL.smooth_l1_beta,
        roi_align_offset: float = _HEADS.roi_align_offset,
        norm: str = _MODEL.norm,
    ):
        super().__init__()
        self.backbone = backbone
        self.rpn = rpn
        self.norm = norm
        self.stem_channels = list(stem_channels)
        self.num_classes = num_classes
        self.roi_size = tuple(roi_size)
        self.batch_size_per_image = batch_size_per_image
        self.box_regression = box_regression
        self.detections_per_image = detections_per_image
        self.smooth_l1_beta = checks.check_smooth_l1_beta(smooth_l1_beta)
        self.roi_align_offset = float(roi_align_offset)
        self.box_weights = (10.0, 10.0, 5.0, 5.0)

        self.cls_pred, box_pred = _second_stage_predictors(
            backbone.out_channels, stem_channels, self.roi_size, num_classes, box_regression, norm
        )
        if box_pred is not None:
            self.box_pred = box_pred

    @property
    def config(self) -> dict:
        """The constructor's settings, as stored in checkpoints (a fresh dict of plain values).

        ``"backbone"`` and ``"rpn"`` are the submodules' own ``config`` (a backbone without one
        gives ``{"out_channels": ...}``, an RPN without one ``{}``); the other keys are this
        model's arguments (``constructor_config``), sequences as lists.
        """
        backbone = self.backbone
        return {
            "backbone": dict(getattr(backbone, "config", {"out_channels": backbone.out_channels})),
            "rpn": dict(getattr(self.rpn, "config", {})),
            **constructor_config(self, skip=("backbone", "rpn")),
        }

    @classmethod
    def from_config(cls, config: dict, pretrained: bool = False) -> FasterRCNN:
        """Build an (untrained) model from ``FasterRCNN.config``, e.g. a checkpoint's, with the
        settings added since filled in (``complete_config``). ``pretrained`` only matters
        before loading weights; checkpoints carry all of them."""
        config = cls.complete_config(config)
        backbone = DetectorBackboneWithFPN(pretrained=pretrained, **config["backbone"])
        rpn = RPN(**config["rpn"])
        settings = {k: v for k, v in config.items() if k not in ("backbone", "rpn")}
        settings["roi_size"] = tuple(settings["roi_size"])
        return cls(backbone, rpn, **settings)

    @staticmethod
    def complete_config(config: dict) -> dict:
        """``config`` with the settings added since filled in (``settings.complete_config``)."""
        return complete_config(config)

    def forward(
        self,
        images: torch.Tensor,
        gt_boxes: torch.Tensor | None = None,
        test_score_thresh: float | None = None,
        test_nms_thresh: float | None = None,
        image_sizes: torch.Tensor | None = None,
    ):
        """
        Args:
            images: (B, 3, H, W) normalised images.
            gt_boxes: (B, M, 5) GT rows, padded with ``-1``; required in training mode,
                ignored in eval mode.
            test_score_thresh, test_nms_thresh: the inference score threshold and
                class-specific NMS IoU (default ``EvalSettings``': 0.05, 0.5).
            image_sizes: (B, 2) integer ``(H_i, W_i)``, each image's true size in a padded
                batch (``PadCollate`` puts image ``i`` top-left on the canvas): boxes are
                clipped to it. None: every image fills the canvas.

        Returns:
            Training: ``{"loss_rpn_obj", "loss_rpn_box", "loss_cls"}`` (and ``"loss_box"`` with
            box regression); the step's ``training_diagnostics`` are kept in
            ``self.training_stats`` (``train_detector`` logs them). Eval, B == 1: ``(boxes
            (N, 4), classes (N,) in 0..C-1, scores (N,))``. Eval, B > 1: a list of B such
            tuples.

        Raises:
            ValueError: naming what is at fault in ``images``, ``gt_boxes`` or ``image_sizes``
                (``eecs598.checks.check_detector_forward``, which also warns once about
                training batches too small for BatchNorm), or a training batch of one image
                of at most 32x32 px.
        """
        gt_boxes = gt_boxes if self.training else None
        checks.check_detector_forward(self, images, gt_boxes)
        if image_sizes is not None:
            checks.check_image_sizes(image_sizes, images)
        if not self.training:
            detections = unpad_detections(
                *self.detect(images, image_sizes, test_score_thresh, test_nms_thresh)
            )
            return detections[0] if len(detections) == 1 else detections
        image_size = tuple(images.shape[-2:]) if image_sizes is None else image_sizes
        feats = checks.run_backbone(self.backbone, images)
        proposals, proposed, rpn_losses = self._proposals(feats, gt_boxes, image_size)
        rois, valid, matched, foreground = sample_training_rois(
            proposals, proposed, gt_boxes, self.batch_size_per_image
        )
        cls_logits, box_deltas = self._box_head(feats, rois, valid)
        losses = self._losses(rois, valid, matched, foreground, cls_logits, box_deltas)
        self.training_stats = training_diagnostics(
            proposals, proposed, gt_boxes, valid, foreground, cls_logits
        )
        return {**rpn_losses, **losses}

    @torch.no_grad()
    def detect(
        self,
        images: torch.Tensor,
        image_sizes: torch.Tensor | None = None,
        score_thresh: float | None = None,
        nms_thresh: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``forward``'s inference (arguments as there) without its checks or a host-device
        sync, so that ``torch.export`` traces it whole (``eecs598.deploy``): ``(boxes (B, D, 4),
        classes (B, D), scores (B, D), mask (B, D))``, ``D = detections_per_image``; features
        from ``backbone.inference_features`` (fast on a CPU)."""
        image_size = tuple(images.shape[-2:]) if image_sizes is None else image_sizes
        feats = self.backbone.inference_features(images)
        proposals, valid, _ = self._proposals(feats, None, image_size)
        cls_logits, box_deltas = self._box_head(feats, proposals, valid)
        return self.inference(
            proposals, valid, cls_logits, box_deltas, image_size, score_thresh, nms_thresh
        )

    def check_inputs(
        self, images: torch.Tensor | None = None, gt_boxes: torch.Tensor | None = None
    ) -> None:
        """Raise ``ValueError`` naming the problem for malformed (B, 3, H, W) ``images`` or
        (B, M, 5) ``gt_boxes`` (either may be None): ``eecs598.checks.check_batch``, which
        ``a4_helper.train_detector`` runs on each batch while it is still on the CPU."""
        checks.check_batch(images, gt_boxes, self.num_classes)

    def _proposals(
        self,
        feats: dict[str, torch.Tensor],
        gt_boxes: torch.Tensor | None,
        image_size: tuple[int, int] | torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The RPN's proposals for ``{level: (B, C, H_l, W_l)}`` features (``image_size``:
        ``(H, W)`` or (B, 2)), padded: ``(proposals (B, K, 4), valid (B, K), losses)``, with
        ``loss_rpn_obj`` and ``loss_rpn_box`` in training (``gt_boxes`` (B, M, 5))."""
        output = self.rpn(
            feats, self.backbone.fpn_strides, gt_boxes, image_size=image_size, proposal_list=False
        )
        losses = {k: v for k, v in output.items() if k.startswith("loss")}
        return output["proposal_boxes"], output["proposal_mask"], losses

    def _box_head(
        self, feats: dict[str, torch.Tensor], rois: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pool every RoI (B, R, 4) from ``{level: (B, C, H_l, W_l)}`` (``fpn_roi_align``;
        invalid slots of (B, R) ``valid`` pool zeros) and predict ``(cls_logits (B, R, C+1),
        box_deltas (B, R, C, 4))``; ``box_deltas`` is None without box regression."""
        strides = self.backbone.fpn_strides
        roi_feats = fpn_roi_align(
            feats, strides, rois, valid, self.roi_size, offset=self.roi_align_offset
        )  # (B*R, C, h, w)
        hidden = self.cls_pred[:-1](roi_feats)
        cls_logits = self.cls_pred[-1](hidden).view(*valid.shape, -1)
        box_deltas = None
        if self.box_regression:
            box_deltas = self.box_pred(hidden).view(*valid.shape, self.num_classes, 4)
        return cls_logits, box_deltas

    def _losses(self, *outputs: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """``fast_rcnn_losses`` of the sampled RoIs' ``outputs`` (``rois, sampled, matched,
        foreground, cls_logits, box_deltas``) with this model's box weights and
        ``smooth_l1_beta``."""
        return fast_rcnn_losses(*outputs, self.box_weights, self.smooth_l1_beta)

    @torch.no_grad()
    def inference(
        self,
        proposals: torch.Tensor,
        valid: torch.Tensor,
        cls_logits: torch.Tensor,
        box_deltas: torch.Tensor | None,
        image_size: tuple[int, int] | torch.Tensor,
        test_score_thresh: float | None = None,
        test_nms_thresh: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Detections of every image from the second stage's outputs, padded:
        ``padded_detections`` with this model's box weights and ``detections_per_image``,
        thresholds defaulting to ``EvalSettings``' (score 0.05, class-specific NMS 0.5)."""
        return padded_detections(
            proposals, valid, cls_logits, box_deltas, image_size,
            box_weights=self.box_weights,
            score_thresh=_EVAL.score_thresh if test_score_thresh is None else test_score_thresh,
            nms_thresh=_EVAL.nms_thresh if test_nms_thresh is None else test_nms_thresh,
            detections_per_image=self.detections_per_image,
        )  # fmt: skip


def fast_rcnn_detections(*args: Any, **kwargs: Any) -> list[tuple[torch.Tensor, ...]]:
    """``padded_detections`` (the same arguments) as B tuples ``(boxes (N, 4), classes (N,)
    int64 in 0..C-1, scores (N,))``, best first (``unpad_detections``)."""
    return unpad_detections(*padded_detections(*args, **kwargs))


def unpad_detections(
    boxes: torch.Tensor, classes: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``padded_detections``' (B, D, ...) outputs as B tuples ``(boxes (N_i, 4), classes
    (N_i,), scores (N_i,))`` of the filled slots, with one host-device sync."""
    counts = mask.sum(dim=1).tolist()
    outputs = (unpad(t, mask, counts) for t in (boxes, classes, scores))
    return list(zip(*outputs, strict=True))


@torch.no_grad()
def padded_detections(
    proposals: torch.Tensor,
    valid: torch.Tensor,
    cls_logits: torch.Tensor,
    box_deltas: torch.Tensor | None,
    image_size: tuple[int, int] | torch.Tensor,
    box_weights: Sequence[float],
    score_thresh: float,
    nms_thresh: float,
    detections_per_image: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Detections of every image from the second stage's outputs (``FasterRCNN.inference``),
    in a padded layout of fixed shape, without a host-device sync (what an export returns).

    Every valid proposal gives one candidate per class: its softmax score, and its box refined
    by that class's deltas (clipped to the image) or, without box regression, the proposal
    itself. Candidates scoring above ``score_thresh`` and wider and taller than 0.01 px go
    through class-specific NMS at ``nms_thresh``; the best ``detections_per_image`` survive,
    as in torchvision and detectron2.

    Args:
        proposals: (B, R, 4); valid: (B, R); cls_logits: (B, R, C+1), index 0 background;
        box_deltas: (B, R, C, 4) or None; image_size: ``(H, W)`` or (B, 2) per image;
        box_weights: the deltas' ``(wx, wy, ww, wh)``.

    Returns:
        ``(boxes (B, D, 4), classes (B, D) int64, scores (B, D), mask (B, D) bool)`` with
        ``D = detections_per_image``: each image's detections best first, then empty slots
        (``mask`` False, zero boxes, scores and classes).
    """
    batch = valid.shape[0]
    num_classes = cls_logits.shape[-1] - 1
    scores = full_precision(cls_logits).softmax(dim=-1)[..., 1:]  # (B, R, C)
    if box_deltas is None:
        boxes = proposals[:, :, None, :].expand(-1, -1, num_classes, -1)
    else:
        boxes = rcnn_apply_deltas_to_anchors(
            box_deltas.to(proposals), proposals[:, :, None, :], box_weights
        )
        boxes = clip_boxes(boxes, image_size)
    wh = boxes[..., 2:] - boxes[..., :2]
    candidate = valid[..., None] & (scores > score_thresh) & (wh > 1e-2).all(dim=-1)
    boxes, scores = boxes.reshape(batch, -1, 4), scores.reshape(batch, -1)
    # Position r * C + c holds class c of proposal r: group c is column c.
    groups = torch.arange(scores.shape[1], device=scores.device).view(-1, num_classes).T
    index, mask = batched_nms_topk(
        boxes, scores, groups, candidate.reshape(batch, -1), nms_thresh, detections_per_image
    )
    boxes = gather_rows(boxes, index) * mask[..., None]
    scores = gather_rows(scores, index) * mask
    return boxes, index % num_classes, scores, mask


def compile_detector(detector: nn.Module, **options: Any) -> nn.Module:
    """Compile the fixed-shape parts of a Faster R-CNN with ``torch.compile``, in place.

    Compiled: the backbone with its FPN, the RPN's prediction network and the second stage's
    conv stem (``cls_pred[0]``), which do nearly all the arithmetic. Anchor matching, sampling
    and NMS have data-dependent shapes and stay eager, as torchvision's detection models do.
    ``nn.Module.compile`` is used, so ``state_dict`` keys, checkpoints and ``train_detector``
    are unchanged. The first steps are slow while the graphs compile, and new input shapes
    (e.g. evaluation images of another size) compile again.

    Args:
        detector: ``FasterRCNN`` (anything with ``backbone``, ``rpn.pred_net`` and
            ``cls_pred``).
        **options: passed to ``torch.compile`` (``mode``, ``backend``, ``dynamic``, ...).

    Returns:
        ``detector`` itself.
    """
    for part in (detector.backbone, detector.rpn.pred_net, detector.cls_pred[0]):
        part.compile(**options)
    return detector
