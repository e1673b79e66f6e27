"""Backbone with a feature pyramid, FPN location coordinates, and non-maximum suppression.

This module is shared by the detectors of the assignment. It reads top-down in the order the
notebook teaches:

1. ``DetectorBackboneWithFPN``: RegNet-X-400MF trunk plus a small FPN giving p3, p4, p5
   (optionally p2 as well).
2. ``get_fpn_location_coords``: the image coordinates of every FPN feature location.
3. ``nms`` and ``class_spec_nms``: greedy non-maximum suppression, written here and vectorised.

Shapes use ``B`` for the batch, ``H, W`` for a feature map's height and width, ``N`` for boxes.
Boxes are ``(x1, y1, x2, y2)`` in absolute image pixels.
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Sequence

import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from torchvision.models import feature_extraction

__all__ = [
    "hello_common",
    "check_images",
    "FPN_LEVELS",
    "DetectorBackboneWithFPN",
    "get_fpn_location_coords",
    "box_iou",
    "greedy_nms_keep",
    "nms",
    "class_spec_nms",
]

# Every FPN level the backbone can give, finest first; level ``p<l>`` is built from ``c<l>``.
FPN_LEVELS = ("p2", "p3", "p4", "p5")
# The ``fpn_levels`` the backbone accepts: p3-p5 (the default, the notebook's model) or p2-p5.
_DEFAULT_FPN_LEVELS = ("p3", "p4", "p5")
_VALID_FPN_LEVELS = (_DEFAULT_FPN_LEVELS, FPN_LEVELS)
# RegNet-X-400MF stages whose outputs become c2, c3, c4, c5 (strides 4, 8, 16, 32).
_TRUNK_NODES = {
    "trunk_output.block1": "c2",
    "trunk_output.block2": "c3",
    "trunk_output.block3": "c4",
    "trunk_output.block4": "c5",
}
_TRUNK_CHANNELS = {"c2": 32, "c3": 64, "c4": 160, "c5": 400}
_FPN_STRIDES = {"p2": 4, "p3": 8, "p4": 16, "p5": 32}
_PRETRAINED_WARNED = False


def hello_common() -> None:
    print("Hello from common.py!")


def _regnet_trunk(pretrained: bool) -> nn.Module:
    """RegNet-X-400MF, with ImageNet weights when ``pretrained`` and they can be loaded.

    The weights come through torchvision's weights API (``RegNet_X_400MF_Weights.DEFAULT``).
    When they cannot be loaded (no internet and no local cache), a single warning says so and the
    model continues from random initialisation, so offline machines can still run everything.
    """
    global _PRETRAINED_WARNED
    if pretrained:
        weights = torchvision.models.RegNet_X_400MF_Weights.DEFAULT
        try:
            return torchvision.models.regnet_x_400mf(weights=weights)
        except Exception as err:  # network errors, missing cache, corrupt download
            if not _PRETRAINED_WARNED:
                warnings.warn(
                    "\n" + "=" * 78 + "\n"
                    f"Could not load ImageNet weights {weights} for RegNet-X-400MF ({err!r}).\n"
                    "The backbone starts from RANDOM initialisation: detection accuracy will be\n"
                    "far lower. To fix, run once with internet access (the weights are cached in\n"
                    f"{torch.hub.get_dir()}/checkpoints), or copy the file "
                    f"{weights.url.split('/')[-1]}\n"
                    "there by hand. Pass pretrained=False to skip this attempt.\n" + "=" * 78,
                    RuntimeWarning,
                    stacklevel=3,
                )
                _PRETRAINED_WARNED = True
    return torchvision.models.regnet_x_400mf(weights=None)


def _trunk_name(level: str) -> str:
    """The trunk output an FPN level is built from: ``"p3"`` -> ``"c3"``."""
    return "c" + level[1:]


def _validate_fpn_levels(fpn_levels: Sequence[str]) -> tuple[str, ...]:
    """``fpn_levels`` sorted finest first; a ValueError unless it is p3-p5 or p2-p5.

    Names must be lower case and unique; their order does not matter.
    """
    valid = ", ".join(FPN_LEVELS)
    combos = " or ".join(repr(list(combo)) for combo in _VALID_FPN_LEVELS)
    message = f"fpn_levels must be one of {combos} (valid levels: {valid}), got {fpn_levels!r}"
    if isinstance(fpn_levels, str) or not isinstance(fpn_levels, Sequence):
        raise ValueError(message)
    names = list(fpn_levels)
    if not all(isinstance(name, str) and name in FPN_LEVELS for name in names):
        raise ValueError(message)
    levels = tuple(sorted(names, key=FPN_LEVELS.index))
    if levels not in _VALID_FPN_LEVELS:  # duplicates, gaps, missing p5, empty
        raise ValueError(message)
    return levels


def check_images(images: torch.Tensor) -> None:
    """Raise a ValueError unless ``images`` is a (B, 3, H, W) floating point tensor."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a floating point tensor, got {images.dtype}")


class DetectorBackboneWithFPN(nn.Module):
    """RegNet-X-400MF trunk with a Feature Pyramid Network on its last three or four stages.

    The trunk gives ``c2, c3, c4, c5`` (32, 64, 160, 400 channels at strides 4, 8, 16, 32). The
    FPN turns the configured ones into ``p3, p4, p5`` (the default) or ``p2, p3, p4, p5``, with
    ``out_channels`` channels each:

    - a 1x1 lateral conv per level brings ``c_l`` to ``out_channels``;
    - top-down: each level adds the nearest-upsampled level above it, resized to the lateral's
      exact size, so inputs of any height and width work (224x298, 250x333, ...), not only
      multiples of 32;
    - a 3x3 output conv per level smooths the merged map.

    With the default levels the model (its ``state_dict`` keys included) is exactly the one
    before ``fpn_levels`` existed: p2's convs are only created when p2 is asked for.

    Args:
        out_channels: channels of every FPN level.
        pretrained: load ImageNet weights for the trunk (warns and continues without them when
            they cannot be loaded). ``False`` skips the attempt.
        fpn_levels: the levels to build, ``("p3", "p4", "p5")`` (default) or
            ``("p2", "p3", "p4", "p5")``; lower-case names in any order. Anything else raises a
            ValueError listing the valid levels (``FPN_LEVELS``) and combinations.

    Attributes:
        out_channels: as given.
        fpn_levels: the configured levels, finest first, e.g. ``("p3", "p4", "p5")``.
        fpn_strides: ``{level: stride}`` of the configured levels, e.g.
            ``{"p3": 8, "p4": 16, "p5": 32}``.
    """

    def __init__(
        self,
        out_channels: int,
        pretrained: bool = True,
        fpn_levels: Sequence[str] = _DEFAULT_FPN_LEVELS,
    ):
        super().__init__()
        self.out_channels = out_channels
        self.fpn_levels = _validate_fpn_levels(fpn_levels)
        trunk_names = {_trunk_name(level) for level in self.fpn_levels}
        return_nodes = {node: name for node, name in _TRUNK_NODES.items() if name in trunk_names}
        self.backbone = feature_extraction.create_feature_extractor(
            _regnet_trunk(pretrained), return_nodes=return_nodes
        )
        self.fpn_params = self._build_fpn(out_channels, self.fpn_levels)

    @staticmethod
    def _build_fpn(out_channels: int, fpn_levels: tuple[str, ...]) -> nn.ModuleDict:
        """``lateral_c<l>`` (1x1) and ``output_p<l>`` (3x3) convs per level, Kaiming-initialised."""
        fpn_params = nn.ModuleDict()
        for level in fpn_levels:
            fpn_params[f"lateral_{_trunk_name(level)}"] = nn.Conv2d(
                _TRUNK_CHANNELS[_trunk_name(level)], out_channels, kernel_size=1
            )
            fpn_params[f"output_{level}"] = nn.Conv2d(
                out_channels, out_channels, kernel_size=3, padding=1
            )
        for conv in fpn_params.values():
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)
        return fpn_params

    @property
    def fpn_strides(self) -> dict[str, int]:
        """``{level: stride}`` of the configured levels, finest first."""
        return {level: _FPN_STRIDES[level] for level in self.fpn_levels}

    @property
    def config(self) -> dict:
        """Constructor settings (without ``pretrained``), as stored in checkpoints.

        ``DetectorBackboneWithFPN(**config)`` rebuilds the same architecture. With the default
        levels this is ``{"out_channels": C}`` only, exactly what checkpoints saved before
        ``fpn_levels`` existed store, so old and new default checkpoints stay interchangeable;
        otherwise ``fpn_levels`` is added as a list, e.g.
        ``{"out_channels": C, "fpn_levels": ["p2", "p3", "p4", "p5"]}``.
        """
        if self.fpn_levels == _DEFAULT_FPN_LEVELS:
            return {"out_channels": self.out_channels}
        return {"out_channels": self.out_channels, "fpn_levels": list(self.fpn_levels)}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """
        Args:
            images: (B, 3, H, W) normalised images.

        Returns:
            ``{level: (B, C, ceil(H/s), ceil(W/s))}`` for the configured levels, finest first,
            with ``C = out_channels`` and ``s = fpn_strides[level]``: ``"p2"``
            (B, C, ceil(H/4), ceil(W/4)) when configured, ``"p3"`` (..., /8), ``"p4"``
            (..., /16), ``"p5"`` (..., /32).
        """
        check_images(images)
        trunk = self.backbone(images)
        fpn = self.fpn_params
        merged: dict[str, torch.Tensor] = {}
        above = None
        for level in reversed(self.fpn_levels):  # coarsest (p5) first
            name = _trunk_name(level)
            lateral = fpn[f"lateral_{name}"](trunk[name])
            if above is not None:
                lateral = lateral + F.interpolate(above, size=lateral.shape[-2:], mode="nearest")
            merged[level] = above = lateral
        return {level: fpn[f"output_{level}"](merged[level]) for level in self.fpn_levels}


def get_fpn_location_coords(
    shape_per_fpn_level: dict[str, tuple],
    strides_per_fpn_level: dict[str, int],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    offset: float = 0.5,
) -> dict[str, torch.Tensor]:
    """Absolute image coordinates of the centre of every FPN feature location.

    Location ``(h, w)`` of a level with stride ``s`` sits at
    ``((w + offset) * s, (h + offset) * s)``: the notebook's ``offset = 0.5`` puts it in the
    middle of its ``s x s`` cell. ``offset = 0`` puts it on the cell's top-left pixel, which is
    where the receptive field of a feature of this backbone is centred (every stride-2 conv has
    a 3x3 or 1x1 kernel with padding ``k // 2``, so output ``j`` is centred on input ``2 j``);
    torchvision's ``AnchorGenerator`` and detectron2's default anchor offset use that too.
    Locations are listed row-major with x varying fastest, the order in which
    ``tensor.permute(0, 2, 3, 1).reshape(B, H * W, -1)`` flattens an NCHW map; every head in this
    package flattens its outputs that way.

    Args:
        shape_per_fpn_level: ``{level: (B, C, H, W)}``, e.g. the shapes of the FPN features.
        strides_per_fpn_level: ``{level: stride}``.
        offset: position of a location within its cell, in strides (0.5: the centre).

    Returns:
        ``{level: (H * W, 2)}`` tensors of ``(xc, yc)``.
    """
    location_coords = {}
    for level, shape in shape_per_fpn_level.items():
        stride = strides_per_fpn_level[level]
        height, width = int(shape[-2]), int(shape[-1])
        ys = (torch.arange(height, dtype=dtype, device=device) + offset) * stride
        xs = (torch.arange(width, dtype=dtype, device=device) + offset) * stride
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        location_coords[level] = torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1)
    return location_coords


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise intersection-over-union, broadcasting over leading batch dimensions.

    Degenerate boxes (zero area) have IoU 0 with everything, never NaN.

    Args:
        boxes1: (..., M, 4) boxes ``(x1, y1, x2, y2)``.
        boxes2: (..., N, 4) boxes.

    Returns:
        (..., M, N) IoU values in [0, 1].
    """
    area1 = (boxes1[..., 2] - boxes1[..., 0]).clamp(min=0) * (
        boxes1[..., 3] - boxes1[..., 1]
    ).clamp(min=0)
    area2 = (boxes2[..., 2] - boxes2[..., 0]).clamp(min=0) * (
        boxes2[..., 3] - boxes2[..., 1]
    ).clamp(min=0)
    top_left = torch.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    bottom_right = torch.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[..., :, None] + area2[..., None, :] - inter
    return inter / torch.where(union > 0, union, 1.0)  # empty union: inter is 0 too


def _float32_threshold(threshold: float) -> float:
    """The largest float32 ``t32 <= threshold``: for a float32 ``v``, ``v > t32`` exactly when
    ``v > threshold`` in double precision, the comparison torchvision's CPU kernel makes."""
    (t32,) = struct.unpack("f", struct.pack("f", threshold))  # round to nearest
    if t32 > threshold:  # one float32 step down (thresholds here are positive and finite)
        (bits,) = struct.unpack("I", struct.pack("f", t32))
        (t32,) = struct.unpack("f", struct.pack("I", bits - 1 if t32 > 0 else bits + 1))
    return t32


def greedy_nms_keep(
    boxes: torch.Tensor, valid: torch.Tensor, iou_threshold: float, sweeps: int = 16
) -> torch.Tensor:
    """Greedy NMS of each row of boxes already in visiting order (best first).

    The vectorised form of greedy NMS behind ``nms`` and the detector's fixed-shape NMS
    (``two_stage_detector._batched_nms_topk``), for ``R`` independent rows at once.
    ``IoU[j, i]`` is computed as torchvision's CPU kernel does, in the boxes' dtype:
    ``inter / (area_j + area_i - inter)`` with ``area = (x2 - x1) * (y2 - y1)`` and
    ``inter = max(0, min(x2) - max(x1)) * max(0, min(y2) - max(y1))``. Box ``i`` is kept when it
    is valid and no kept box ``j < i`` has ``IoU[j, i] > iou_threshold``. That kept set is the
    unique fixed point of ``keep = valid & ~any_j(keep[j] & S[j, i])`` (``S``: valid ``j < i``
    overlapping ``i`` too much); each sweep from ``keep = valid`` makes at least one more
    position final. ``sweeps`` sweeps run unconditionally, then sweeps continue until nothing
    changes, checked once per ``sweeps`` sweeps: one host-device sync when the first round
    suffices (the usual case: suppression chains are short), exact in every case.

    Args:
        boxes: (R, n, 4) boxes per row, in visiting order; valid: (R, n) bool.

    Returns:
        (R, n) bool: kept.
    """
    x1, y1, x2, y2 = boxes.permute(2, 0, 1).contiguous()  # (R, n) each
    area = (x2 - x1) * (y2 - y1)
    # (R, n, n) pairwise terms [j, i] in three buffers, in place: each fresh n^2 buffer costs
    # page faults on the CPU, each pass memory traffic.
    inter = torch.minimum(x2[:, :, None], x2[:, None, :])
    other = torch.maximum(x1[:, :, None], x1[:, None, :])
    inter.sub_(other).clamp_(min=0)
    torch.minimum(y2[:, :, None], y2[:, None, :], out=other)
    other.sub_(torch.maximum(y1[:, :, None], y1[:, None, :])).clamp_(min=0)
    inter.mul_(other)
    union = torch.add(area[:, :, None], area[:, None, :], out=other).sub_(inter)
    # S[j, i] as 0/1 in the boxes' dtype (for bmm); only j < i may suppress i. Invalid j need
    # no masking: they are never kept.
    threshold = _float32_threshold(iou_threshold) if boxes.dtype == torch.float32 else iou_threshold
    suppresses = torch.gt(inter.div_(union), threshold, out=other)
    suppresses.triu_(diagonal=1)
    # keep and valid as (R, 1, n) 0/1 rows in the boxes' dtype: a sweep is three ops.
    valid_rows = valid.to(boxes.dtype)[:, None, :]
    if torch.compiler.is_compiling():  # the same fixed point, as one graph (no sync)
        return _sweep_until_fixed(suppresses, valid_rows)[:, 0] > 0
    keep = valid_rows
    while True:
        for _ in range(sweeps):
            previous = keep
            keep = valid_rows * (torch.bmm(keep, suppresses) == 0)
        if torch.equal(keep, previous):
            return keep[:, 0] > 0


def _sweep_until_fixed(suppresses: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``greedy_nms_keep``'s sweeps under ``torch.compile``: a ``while_loop`` on the device
    until nothing changes, so the whole forward compiles with ``fullgraph=True``.

    Args:
        suppresses: (R, n, n) 0/1 ``S[j, i]``; valid: (R, 1, n) 0/1 in its dtype.

    Returns:
        (R, 1, n) 0/1: kept.
    """
    from torch._higher_order_ops.while_loop import while_loop

    def changed(keep: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        return (keep != previous).any()

    def sweep(keep: torch.Tensor, previous: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return valid * (torch.bmm(keep, suppresses) == 0), keep.clone()

    keep, _ = while_loop(changed, sweep, (valid.clone(), 1 - valid))
    return keep


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float = 0.5) -> torch.Tensor:
    """Greedy non-maximum suppression, vectorised.

    Boxes are visited by decreasing score; a box is dropped when its IoU with an already kept
    box is strictly greater than ``iou_threshold`` (the rule of ``torchvision.ops.nms``).

    Greedy NMS is sequential in principle. Here the kept set is the unique fixed point of
    ``keep[i] = not any(keep[j] and IoU[j, i] > t for j ranked before i)``; starting from "keep
    all", each vectorised sweep makes at least one more position final, and sweeps stop as soon
    as nothing changes (in practice a handful of sweeps; ``greedy_nms_keep``, which computes
    IoU with torchvision's arithmetic). Memory is O(N^2) for the IoU matrix.

    Args:
        boxes: (N, 4) boxes ``(x1, y1, x2, y2)``.
        scores: (N,) scores.
        iou_threshold: overlap above which the lower-scored box is suppressed.

    Returns:
        (K,) int64 indices of the kept boxes, sorted by decreasing score. Empty input gives an
        empty tensor.
    """
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape (N, 4), got {tuple(boxes.shape)}")
    if scores.shape != boxes.shape[:1]:
        raise ValueError(f"scores must have shape ({boxes.shape[0]},), got {tuple(scores.shape)}")
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    ranked = boxes[order] if boxes.dtype == torch.float64 else boxes[order].float()
    valid = torch.ones(1, len(order), dtype=torch.bool, device=boxes.device)
    keep = greedy_nms_keep(ranked[None], valid, iou_threshold)[0]
    return order[keep]


def class_spec_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    class_ids: torch.Tensor,
    iou_threshold: float = 0.5,
) -> torch.Tensor:
    """Non-maximum suppression within each class: boxes of different classes never suppress.

    Each class's boxes are shifted by a class-specific offset larger than every coordinate, so
    boxes of different classes cannot overlap, and one ``nms`` call does all classes at once.

    Args:
        boxes: (N, 4) boxes.
        scores: (N,) scores.
        class_ids: (N,) integer class of each box.
        iou_threshold: as in ``nms``.

    Returns:
        (K,) int64 indices of the kept boxes, sorted by decreasing score.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    max_coordinate = boxes.abs().max()
    offsets = class_ids.to(boxes) * (2 * max_coordinate + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)
