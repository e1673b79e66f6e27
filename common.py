"""Backbone with a feature pyramid, FPN location coordinates, box operations and NMS.

This module is shared by the detectors of the assignment. It reads top-down in the order the
notebook teaches, then the box operations ``two_stage_detector`` runs on:

1. ``DetectorBackboneWithFPN``: RegNet-X-400MF trunk plus a small FPN giving p3, p4, p5
   (optionally p2 as well).
2. ``get_fpn_location_coords``: the image coordinates of every FPN feature location.
3. ``box_iou``, then ``nms`` and ``class_spec_nms``: greedy non-maximum suppression, written
   here and vectorised (``greedy_nms_keep``).
4. The detector's engine, in the padded layout it keeps its boxes in ((B, K, ...) tensors with
   a (B, K) mask, filled slots first): ``clip_boxes``; ``batched_nms_topk``, NMS within groups
   of every image at once (``FIXED_SHAPE_NMS`` picks its implementation); ``full_precision``,
   ``gather_rows`` and ``unpad``.
5. ``assign_fpn_levels`` and ``fpn_roi_align``: which FPN level pools each box, and RoI Align
   of every box from its level in one call.
6. ``training_diagnostics``: the numbers ``FasterRCNN`` keeps of each training step (proposal
   recall, foreground share, top score) to tell a run that learns from one that does not.

The input validators (``check_images`` among them, re-exported here) are in
``eecs598.checks``, below this module.

Shapes use ``B`` for the batch, ``H, W`` for a feature map's height and width, ``N`` for boxes.
Boxes are ``(x1, y1, x2, y2)`` in absolute image pixels.
"""

from __future__ import annotations

import inspect
import math
import struct
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torchvision
from torch import nn
from torch.fx.experimental import optimization
from torch.nn import functional as F
from torchvision.models import feature_extraction

from eecs598.checks import BACKGROUND, check_images
from eecs598.settings import FPN_LEVELS, NORMS, BackboneSettings, ModelSettings

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
    "clip_boxes",
    "FIXED_SHAPE_NMS",
    "batched_nms_topk",
    "exporting",
    "full_precision",
    "gather_rows",
    "unpad",
    "assign_fpn_levels",
    "reassign_proposals_to_fpn_levels",
    "fpn_roi_align",
    "group_norm",
    "training_diagnostics",
    "constructor_config",
]

# Every FPN level the backbone can give (``eecs598.settings.FPN_LEVELS``), finest first; level
# ``p<l>`` is built from ``c<l>``. The ``fpn_levels`` the backbone accepts: p3-p5 (the default,
# the notebook's model) or p2-p5.
_BACKBONE, _MODEL = BackboneSettings(), ModelSettings()
_DEFAULT_FPN_LEVELS = _BACKBONE.fpn_levels
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


def _regnet_trunk(pretrained: bool) -> tuple[nn.Module, bool]:
    """RegNet-X-400MF, with ImageNet weights when ``pretrained`` and they can be loaded, and
    whether they were.

    The weights come through torchvision's weights API (``RegNet_X_400MF_Weights.DEFAULT``).
    When they cannot be loaded (no internet and no local cache), a single warning says so and the
    model continues from random initialisation, so offline machines can still run everything.
    """
    global _PRETRAINED_WARNED
    if pretrained:
        weights = torchvision.models.RegNet_X_400MF_Weights.DEFAULT
        try:
            return torchvision.models.regnet_x_400mf(weights=weights), True
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
    return torchvision.models.regnet_x_400mf(weights=None), False


def _feature_extractor(trunk: nn.Module, return_nodes: dict[str, str]) -> torch.fx.GraphModule:
    """The trunk traced to return ``{name: feature}`` of ``return_nodes``, as one plain
    ``GraphModule``.

    ``create_feature_extractor`` traces the model twice, in train and in eval mode, and returns a
    module that swaps the two graphs; RegNet's forward does not depend on the mode, so the two
    are the same and one is kept. A plain ``GraphModule`` deep-copies on every torchvision
    (torchvision 0.19's two-graph module loses its graphs in ``copy.deepcopy``); its
    ``state_dict`` keys are the same.
    """
    extractor = feature_extraction.create_feature_extractor(trunk, return_nodes=return_nodes)
    return torch.fx.GraphModule(extractor, extractor.train_graph, "RegNetFeatures")


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


def group_norm(channels: int, norm: str) -> list[nn.Module]:
    """The normalisation layers to put after a conv of ``channels`` outputs: none for
    ``norm="none"``; for ``"gn"`` one ``GroupNorm`` of up to 32 groups (detectron2's), the
    largest count that divides ``channels``. A list, so that callers splice it in."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if norm == "none":
        return []
    return [nn.GroupNorm(math.gcd(32, channels), channels)]


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
        imagenet_weights: whether the trunk got its ImageNet weights (False when not asked
            for, or when they could not be loaded).
        fpn_levels: the configured levels, finest first, e.g. ``("p3", "p4", "p5")``.
        fpn_strides: ``{level: stride}`` of the configured levels, e.g.
            ``{"p3": 8, "p4": 16, "p5": 32}``.
    """

    def __init__(
        self,
        out_channels: int,
        pretrained: bool = _BACKBONE.pretrained,
        fpn_levels: Sequence[str] = _DEFAULT_FPN_LEVELS,
        norm: str = _MODEL.norm,
    ):
        super().__init__()
        self.out_channels = out_channels
        self.norm = norm
        self.fpn_levels = _validate_fpn_levels(fpn_levels)
        trunk_names = {_trunk_name(level) for level in self.fpn_levels}
        return_nodes = {node: name for node, name in _TRUNK_NODES.items() if name in trunk_names}
        trunk, self.imagenet_weights = _regnet_trunk(pretrained)
        self.backbone = _feature_extractor(trunk, return_nodes)
        self.fpn_params = self._build_fpn(out_channels, self.fpn_levels, norm)

    @staticmethod
    def _build_fpn(out_channels: int, fpn_levels: tuple[str, ...], norm: str) -> nn.ModuleDict:
        """``lateral_c<l>`` (1x1) and ``output_p<l>`` (3x3) convs per level, Kaiming-initialised;
        with ``norm="gn"`` each is a ``Sequential`` of the conv and a ``group_norm``."""
        convs: dict[str, nn.Conv2d] = {}
        for level in fpn_levels:
            name = _trunk_name(level)
            convs[f"lateral_{name}"] = nn.Conv2d(_TRUNK_CHANNELS[name], out_channels, kernel_size=1)
            convs[f"output_{level}"] = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        for conv in convs.values():  # after creating them all: the notebook's random draws
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)
        fpn_params = nn.ModuleDict()
        for name, conv in convs.items():
            norms = group_norm(out_channels, norm)
            fpn_params[name] = nn.Sequential(conv, *norms) if norms else conv
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
        ``{"out_channels": C, "fpn_levels": ["p2", "p3", "p4", "p5"]}``, and a ``norm`` other
        than ``"none"`` likewise.
        """
        config: dict = {"out_channels": self.out_channels}
        if self.fpn_levels != _DEFAULT_FPN_LEVELS:
            config["fpn_levels"] = list(self.fpn_levels)
        if self.norm != _MODEL.norm:
            config["norm"] = self.norm
        return config

    def train(self, mode: bool = True) -> DetectorBackboneWithFPN:
        """``nn.Module.train``; also drops the inference trunk (``_inference_trunk``)."""
        self.__dict__.pop("_inference_cache", None)
        return super().train(mode)

    def _inference_trunk(self) -> nn.Module:
        """The trunk as CPU inference runs it: a copy with each BatchNorm folded into the
        convolution before it (``torch.fx.experimental.optimization.fuse``) and its weights in
        channels-last layout, the layout oneDNN's CPU convolutions work in (an NCHW
        convolution reorders its input and output on every call). Same values up to float
        rounding; on a CPU it is much faster at every batch size (``bench/README.md``).

        Built on first use and again when any trunk weight or statistic changes (in place,
        replaced, or moved); kept outside the module's state (no ``state_dict`` entry) and
        dropped by ``train()``."""
        tensors = [*self.backbone.parameters(), *self.backbone.buffers()]
        key = tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)
        cached = self.__dict__.get("_inference_cache")
        if cached is None or cached[0] != key:
            trunk = optimization.fuse(self.backbone).to(memory_format=torch.channels_last)
            cached = self.__dict__["_inference_cache"] = (key, trunk.requires_grad_(False))
        return cached[1]

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
        return self._pyramid(self.backbone(images))

    def inference_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``forward``'s features as inference takes them (``FasterRCNN.detect``): the same
        values up to float rounding, and on a CPU in eval mode without gradients much faster
        (``bench/README.md``): the trunk runs as ``_inference_trunk``, and the features come
        in channels-last layout. Elsewhere (training, an accelerator, ``torch.compile`` or
        ``torch.export``, which optimise the graph themselves) it is ``forward``."""
        on_cpu = (
            not self.training and not self.backbone.training and not torch.is_grad_enabled()
            and images.device.type == "cpu" and not torch.compiler.is_compiling()
            and not exporting()
        )  # fmt: skip
        if not on_cpu:
            return self(images)
        check_images(images)
        channels_last = images.contiguous(memory_format=torch.channels_last)
        return self._pyramid(self._inference_trunk()(channels_last))

    def _pyramid(self, trunk: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The FPN levels ``{level: (B, C, H_l, W_l)}`` from the trunk's ``{"c3": ..., ...}``."""
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
        height, width = shape[-2], shape[-1]
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
    # One coordinate at a time: (..., M, N) broadcasts whose inner size is N, not 2 (on a CPU
    # an inner size of 2 makes each op several times slower).
    a = boxes1.unsqueeze(-1).unbind(-2)  # 4 x (..., M, 1)
    b = boxes2.transpose(-1, -2).unsqueeze(-2).unbind(-3)  # 4 x (..., 1, N)
    width = (torch.minimum(a[2], b[2]) - torch.maximum(a[0], b[0])).clamp(min=0)
    height = (torch.minimum(a[3], b[3]) - torch.maximum(a[1], b[1])).clamp(min=0)
    inter = width * height
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
    (``batched_nms_topk``), for ``R`` independent rows at once.
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


def clip_boxes(boxes: torch.Tensor, image_size: tuple[int, int] | torch.Tensor) -> torch.Tensor:
    """Clip (B, ..., 4) boxes to the image.

    Args:
        boxes: (B, ..., 4) boxes.
        image_size: ``(H, W)`` shared by the batch, or a (B, 2) tensor of each image's true
            ``(H, W)`` inside a padded batch (``FasterRCNN.forward``'s ``image_sizes``).
    """
    if isinstance(image_size, torch.Tensor):
        upper = image_size.to(boxes).flip(-1).repeat(1, 2)  # (B, 4): W, H, W, H
        upper = upper.view(-1, *([1] * (boxes.dim() - 2)), 4)
    else:
        height, width = image_size
        upper = boxes.new_tensor([width, height, width, height])
    return torch.minimum(boxes.clamp(min=0), upper)


#: Which NMS ``batched_nms_topk`` runs: ``None`` picks the fixed-shape one on accelerators and
#: under ``torch.compile`` and torchvision's per-group kernel for eager CPU tensors; ``True`` /
#: ``False`` force one (``bench/bench_syncs.py`` counts both; the tests run both).
FIXED_SHAPE_NMS: bool | None = None


def batched_nms_topk(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    group_index: torch.Tensor,
    valid: torch.Tensor,
    iou_threshold: float,
    topk: int,
    sweeps: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy NMS within each group of every image, then the ``topk`` best survivors per image.

    The detector's NMS in the padded layout: the RPN's proposals (one group per image and
    level) and the final detections (one group per image and class). Two implementations keep
    the same boxes (``tests/test_properties.py`` checks both against ``torchvision.ops.nms``
    per group, with tied coordinates and scores):

    - fixed shape (``_fixed_shape_nms_keep``), on accelerators and under ``torch.compile``:
      all images and groups at once as IoU matrices and fixed-point sweeps; no Python loop, no
      boolean indexing and a single host-device sync (the convergence check; none compiled),
      whatever the batch size;
    - ``torchvision.ops.nms`` per group (``_torchvision_nms_keep``), for eager CPU tensors: its
      sequential kernel beats the ``n x n`` matrices there (timings in ``bench/README.md``),
      and a sync costs nothing on a CPU.

    ``FIXED_SHAPE_NMS`` overrides the choice. Either way each group's kept set is
    ``torchvision.ops.nms``'s (CPU kernel) on its valid members: float32 IoU arithmetic, the
    rule ``IoU > iou_threshold``, members visited by decreasing score with equal scores in
    increasing position. Boxes with NaN coordinates or scores are not covered by that
    guarantee.

    Args:
        boxes: (B, N, 4) boxes; scores, valid: (B, N). Invalid entries neither survive nor
            suppress.
        group_index: (G, n) int64, a partition of the positions ``0..N-1`` into ``G`` groups of
            ``n``: row ``g`` lists group ``g``'s positions in increasing order, the same groups
            in every image (e.g. ``arange(N).view(G, n)`` for contiguous groups).
        iou_threshold: a box is suppressed by a kept, better box with IoU above this.
        topk: survivors kept per image.
        sweeps: fixed-shape NMS: sweeps run before the first convergence check.

    Returns:
        ``(index, mask)``, each (B, topk): the positions (in ``0..N-1``) of each image's
        survivors, best first, equal scores in increasing position (so an image's result does
        not depend on the other images of the batch); ``mask`` marks the filled slots, which
        come first. Unfilled slots have index 0.
    """
    fixed_shape = FIXED_SHAPE_NMS
    if fixed_shape is None:
        fixed_shape = boxes.device.type != "cpu" or torch.compiler.is_compiling()
    if fixed_shape:
        kept = _fixed_shape_nms_keep(boxes, scores, group_index, valid, iou_threshold, sweeps)
    else:
        kept = _torchvision_nms_keep(boxes, scores, group_index, valid, iou_threshold)
    return _best_survivors(kept, scores, topk)


def _best_survivors(
    kept: torch.Tensor, scores: torch.Tensor, topk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batched_nms_topk``'s ``(index, mask)`` (B, topk) from its (B, N) ``kept`` set.

    Survivors first, by decreasing score, equal scores by position: two stable sorts.
    """
    by_score = torch.sort(scores, dim=1, descending=True, stable=True).indices
    survivors_first = torch.sort(
        (~torch.gather(kept, 1, by_score)).to(torch.uint8), dim=1, stable=True
    ).indices
    index = torch.gather(by_score, 1, survivors_first[:, :topk])
    mask = torch.gather(kept, 1, index)
    if index.shape[1] < topk:  # fewer positions than slots
        index = F.pad(index, (0, topk - index.shape[1]))
        mask = F.pad(mask, (0, topk - mask.shape[1]))
    return index.masked_fill(~mask, 0), mask


def _torchvision_nms_keep(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    group_index: torch.Tensor,
    valid: torch.Tensor,
    iou_threshold: float,
) -> torch.Tensor:
    """``batched_nms_topk``'s kept set by ``torchvision.ops.nms`` on each group of each image.

    One sort by group and one NMS per non-empty group. (``torchvision.ops.batched_nms`` does
    the same for large inputs, with a ``nonzero`` per group; for small ones it shifts each
    group's boxes by an offset instead, whose float32 rounding can change IoUs near the
    threshold, so it is not called.)

    Args: as ``batched_nms_topk``'s.

    Returns:
        (B, N) bool: kept.
    """
    batch, num = scores.shape
    num_groups, group_size = group_index.shape
    group_of = torch.empty(num, dtype=torch.long, device=scores.device)
    group_of[group_index.reshape(-1)] = torch.arange(
        num_groups, device=scores.device
    ).repeat_interleave(group_size)
    image_ids = torch.arange(batch, device=scores.device)[:, None]
    groups = (image_ids * num_groups + group_of).masked_fill(~valid, -1).reshape(-1)
    flat_boxes, flat_scores = boxes.reshape(-1, 4).float(), scores.reshape(-1).float()
    kept = torch.zeros(batch * num, dtype=torch.bool, device=scores.device)
    by_group = torch.sort(groups, stable=True).indices  # invalid first, positions ascending
    counts = torch.bincount(groups + 1, minlength=batch * num_groups + 1).tolist()
    start = counts[0]
    for count in counts[1:]:
        if count:
            members = by_group[start : start + count]
            keep = torchvision.ops.nms(flat_boxes[members], flat_scores[members], iou_threshold)
            kept[members[keep]] = True
            start += count
    return kept.view(batch, num)


def _fixed_shape_nms_keep(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    group_index: torch.Tensor,
    valid: torch.Tensor,
    iou_threshold: float,
    sweeps: int = 16,
) -> torch.Tensor:
    """``batched_nms_topk``'s kept set as tensors of fixed shape: per group, the IoU matrix of
    its ``n`` members in visiting order, resolved by ``greedy_nms_keep``.

    Args: as ``batched_nms_topk``'s.

    Returns:
        (B, N) bool: kept.
    """
    batch, num = scores.shape
    num_groups, group_size = group_index.shape
    members = group_index.reshape(-1)
    group_boxes = boxes[:, members].float().view(batch, num_groups, group_size, 4)
    group_scores = scores[:, members].float().view(batch, num_groups, group_size)
    group_valid = valid[:, members].view(batch, num_groups, group_size)
    # Greedy visiting order within each group: decreasing score, equal scores by position
    # (``group_index`` rows list positions in increasing order, the sort is stable).
    ranked = group_scores.masked_fill(~group_valid, float("-inf"))
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
    keep = greedy_nms_keep(
        gather_rows(group_boxes.flatten(0, 1), order.flatten(0, 1)),
        torch.gather(group_valid, -1, order).flatten(0, 1),
        iou_threshold,
        sweeps,
    )  # (B * G, n), in visiting order
    kept = torch.zeros(batch, num, dtype=torch.bool, device=scores.device)
    positions = torch.gather(group_index.expand(batch, -1, -1), -1, order).view(batch, -1)
    return kept.scatter_(1, positions, keep.view(batch, -1))


def exporting() -> bool:
    """True while ``torch.export`` traces the model (``torch.compiler.is_exporting``; always
    False on torch releases without it): the few places whose eager form has no export
    translation, or specialises a symbolic shape, take their export form."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting is not None and is_exporting())


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """Half-precision (autocast) outputs to float32; float32 and float64 stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def gather_rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[b, index[b, k]]`` for (B, N, ...) values and (B, K) index -> (B, K, ...)."""
    expanded = index.view(*index.shape, *([1] * (values.dim() - 2)))
    return torch.gather(values, 1, expanded.expand(-1, -1, *values.shape[2:]))


def drop_gt_padding(gt_boxes: torch.Tensor) -> torch.Tensor:
    """``gt_boxes`` (..., M, 5) with each image's valid rows first, in their order, and only
    as many rows as the fullest image has: (..., M', 5). Matching against these gives the same
    rows as against all M, with M' IoU columns instead of M (the notebook pads to 40 boxes;
    its images hold a few). Eager CPU tensors only: reading M' is a host-device sync on an
    accelerator and a new shape for every batch under ``torch.compile``."""
    if gt_boxes.device.type != "cpu" or torch.compiler.is_compiling() or exporting():
        return gt_boxes
    padding = gt_boxes[..., 4] == BACKGROUND  # (..., M)
    rows = int((~padding).sum(dim=-1).max()) if padding.numel() else 0
    if rows == gt_boxes.shape[-2]:
        return gt_boxes
    order = torch.sort(padding.to(torch.uint8), dim=-1, stable=True).indices[..., :rows]
    return torch.gather(gt_boxes, -2, order[..., None].expand(*order.shape, 5))


def unpad(
    values: torch.Tensor, mask: torch.Tensor, counts: list[int] | None = None
) -> list[torch.Tensor]:
    """(B, K, ...) padded values and (B, K) mask whose filled slots come first in each row (as
    ``batched_nms_topk`` fills them) -> B tensors of the filled slots, views of ``values``.

    Reading the counts is a host-device sync; pass ``counts`` (``mask.sum(1).tolist()``) to
    split several tensors of one mask with a single sync.
    """
    if counts is None:
        counts = mask.sum(dim=1).tolist()
    return [row[:count] for row, count in zip(values, counts, strict=True)]


def assign_fpn_levels(
    boxes: torch.Tensor, fpn_level_ids: Sequence[int] = (3, 4, 5)
) -> torch.Tensor:
    """FPN level that pools each box: ``clamp(floor(4 + log2(sqrt(area) / 224)), 3, 5)``.

    This is Equation (1) of the FPN paper with ``k0 = 4``: a 224x224 box goes to p4, boxes half
    that size to p3, twice that size to p5.

    Args:
        boxes: (..., 4) boxes.

    Returns:
        (...,) int64 level ids within ``[min(fpn_level_ids), max(fpn_level_ids)]``.
    """
    wh = (boxes[..., 2:4] - boxes[..., 0:2]).clamp(min=1e-6)
    scale = torch.sqrt(wh[..., 0] * wh[..., 1])
    levels = torch.floor(4 + torch.log2(scale / 224))
    levels = levels.nan_to_num(nan=float(min(fpn_level_ids)))  # NaN boxes: no wild index
    return levels.clamp(min(fpn_level_ids), max(fpn_level_ids)).long()


def reassign_proposals_to_fpn_levels(
    proposals_per_image: list[torch.Tensor],
    gt_boxes: torch.Tensor | None = None,
    fpn_level_ids: Sequence[int] = (3, 4, 5),
) -> dict[str, list[torch.Tensor]]:
    """Group proposals by the FPN level that should pool them (``assign_fpn_levels``).

    During training the valid GT boxes of each image are mixed in, so the second stage sees
    good boxes even while the RPN is still poor. This is the assignment's per-level form;
    ``FasterRCNN`` does not call it: it keeps proposals padded (B, R, 4), mixes GT in itself
    and lets ``fpn_roi_align`` pick each box's level, without splitting per image or level.

    Args:
        proposals_per_image: B tensors of shape (N_i, 4).
        gt_boxes: (B, M, 5) GT rows, or None.

    Returns:
        ``{"p3": [...], "p4": [...], "p5": [...]}``: per level, B tensors of shape
        (N_{i, level}, 4), in their input order (proposals first, then GT boxes).
    """
    batch = len(proposals_per_image)
    boxes = torch.cat(list(proposals_per_image), dim=0)
    image_ids = torch.repeat_interleave(
        torch.arange(batch, device=boxes.device),
        torch.tensor([len(p) for p in proposals_per_image], device=boxes.device),
    )
    if gt_boxes is not None:
        valid = gt_boxes[..., 4] != BACKGROUND  # (B, M)
        gt_image_ids = torch.arange(batch, device=boxes.device)[:, None].expand_as(valid)
        boxes = torch.cat([boxes, gt_boxes[..., :4][valid].to(boxes)], dim=0)
        image_ids = torch.cat([image_ids, gt_image_ids[valid]], dim=0)
    # A stable sort by image keeps proposals before GT boxes within each image.
    order = torch.sort(image_ids, stable=True).indices
    boxes, image_ids = boxes[order], image_ids[order]
    levels = assign_fpn_levels(boxes, fpn_level_ids)
    result = {}
    for level_id in fpn_level_ids:
        in_level = levels == level_id
        counts = torch.bincount(image_ids[in_level], minlength=batch)
        result[f"p{level_id}"] = list(torch.split(boxes[in_level], counts.tolist()))
    return result


def fpn_roi_align(
    feats: dict[str, torch.Tensor],
    strides: dict[str, int],
    boxes: torch.Tensor,
    valid: torch.Tensor,
    output_size: tuple[int, int] = (7, 7),
    sampling_ratio: int = 2,
    offset: float = 0.5,
) -> torch.Tensor:
    """RoI Align of every box from the FPN level ``assign_fpn_levels`` picks, in one call.

    Same values as ``torchvision.ops.roi_align(..., aligned=True)`` on each box's level (the
    sampling grid of detectron2's ROIAlignV2): each output bin averages
    ``sampling_ratio ** 2`` bilinear samples. It is written as a single weighted bag sum
    (``weighted_bag_sum``) over all levels' features stacked as rows (each output bin sums 16
    weighted feature rows), so the backward pass is one more bag sum instead of a loop
    over RoIs (timings against torchvision's kernel: ``bench/README.md``).

    Args:
        feats: ``{level: (B, C, H_l, W_l)}`` features, e.g. ``{"p3": ..., "p5": ...}``.
        strides: ``{level: stride}``.
        boxes: (B, R, 4) boxes ``(x1, y1, x2, y2)`` in image pixels.
        valid: (B, R) bool; invalid slots pool zeros.
        output_size: ``(h, w)`` bins.
        sampling_ratio: samples per bin along each axis.
        offset: where feature ``(i, j)`` sits in the image, as ``get_fpn_location_coords``
            places it: at ``((j + offset) * s, (i + offset) * s)``. 0.5 is ``aligned=True``;
            0 samples where ``aligned=False`` does (without its 1-pixel minimum RoI size).

    Returns:
        (B * R, C, h, w) pooled features (channels-last memory layout), row ``b * R + r``
        for box ``r`` of image ``b``.
    """
    batch, num_rois = valid.shape
    level_ids = [int(name[1:]) for name in feats]
    table, heights, widths, scales, offsets = _stack_fpn_levels(feats, strides, batch)
    device = table.device

    boxes = full_precision(boxes.reshape(-1, 4))
    level = assign_fpn_levels(boxes, level_ids) - min(level_ids)  # (N,) index into the levels
    image = torch.arange(batch, device=device).repeat_interleave(num_rois)
    height, width = heights[level][:, None], widths[level][:, None]
    x1, y1, x2, y2 = (boxes * scales[level][:, None] - offset).unbind(dim=1)
    out_h, out_w = output_size
    y_taps = _axis_taps(y1, y2, height, out_h, sampling_ratio)
    x_taps = _axis_taps(x1, x2, width, out_w, sampling_ratio)
    base = offsets[level] + image * (heights * widths)[level]
    return _pool_bins(table, base, width, y_taps, x_taps, valid.reshape(-1), sampling_ratio)


def _stack_fpn_levels(
    feats: dict[str, torch.Tensor], strides: dict[str, int], batch: int
) -> tuple[torch.Tensor, ...]:
    """``fpn_roi_align``'s table: every level's (B, C, H_l, W_l) features as rows of one
    (sum_l B * H_l * W_l, C) tensor (channels last), and per level ``l`` the (L,) tensors
    ``heights``, ``widths``, ``scales`` (1 / stride) and ``offsets`` (its first row)."""
    names = list(feats)
    channels, device = feats[names[0]].shape[1], feats[names[0]].device
    heights = torch.tensor([feats[n].shape[2] for n in names], device=device)
    widths = torch.tensor([feats[n].shape[3] for n in names], device=device)
    scales = torch.tensor([1.0 / strides[n] for n in names], device=device)
    rows = torch.tensor([feats[n][0, 0].numel() * batch for n in names], device=device)
    offsets = torch.cumsum(rows, 0) - rows
    table = torch.cat([feats[n].permute(0, 2, 3, 1).reshape(-1, channels) for n in names])
    return table, heights, widths, scales, offsets


def _axis_taps(
    start: torch.Tensor, end: torch.Tensor, size: torch.Tensor, bins: int, grid: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear taps of a RoI's sampling grid along one axis.

    Args:
        start, end: (N,) the RoIs' extent in feature pixels; size: (N, 1) length of the axis.
        bins: output bins; grid: samples per bin, at the centres of ``grid`` equal parts.

    Returns:
        ``_bilinear_taps``' ``(index, weight)``, each (N, bins * grid, 2).
    """
    step = (torch.arange(bins * grid, device=start.device) + 0.5) / grid
    coords = start[:, None] + step * ((end - start) / bins)[:, None]  # (N, bins * grid)
    return _bilinear_taps(coords, size)


def _bilinear_taps(coords: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbour indices and weights of bilinear interpolation along one axis.

    Border rule of RoI Align: samples outside ``[-1, size]`` contribute nothing, samples in
    ``[-1, 0]`` read index 0, samples past the last pixel read the last pixel.

    Args:
        coords: (R, S) sample positions in pixels; size: (R, 1) length of the axis.

    Returns:
        ``index (R, S, 2)`` int64 of the lower and upper neighbour and ``weight (R, S, 2)``.
    """
    coords = coords.nan_to_num(nan=-2.0)  # NaN boxes (diverged weights) read nothing
    inside = (coords >= -1.0) & (coords <= size)
    coords = coords.clamp(min=0)
    low = torch.minimum(coords.floor(), size - 1)
    at_end = low >= size - 1
    coords = torch.where(at_end, low, coords)
    high = torch.where(at_end, low, low + 1)
    frac = coords - low
    weight = torch.stack([1 - frac, frac], dim=-1) * inside[..., None]
    return torch.stack([low, high], dim=-1).long(), weight


def _pool_bins(
    table: torch.Tensor,
    base: torch.Tensor,
    width: torch.Tensor,
    y_taps: tuple[torch.Tensor, torch.Tensor],
    x_taps: tuple[torch.Tensor, torch.Tensor],
    valid: torch.Tensor,
    grid: int,
) -> torch.Tensor:
    """Every output bin of ``fpn_roi_align`` as one weighted ``F.embedding_bag`` of table rows.

    Args:
        table: (T, C) feature rows (``_stack_fpn_levels``); base: (N,) row of pixel (0, 0) of
            each RoI's image and level; width: (N, 1) that level's width;
        y_taps, x_taps: ``_axis_taps`` of the rows, (N, h * grid, 2), and of the columns,
            (N, w * grid, 2); valid: (N,) bool, invalid RoIs pool zeros; grid: samples per bin.

    Returns:
        (N, C, h, w) bin averages (channels-last memory layout).
    """
    n, channels = base.shape[0], table.shape[1]
    out_h, out_w = y_taps[0].shape[1] // grid, x_taps[0].shape[1] // grid
    # A bin's taps along each axis: its grid samples times their 2 neighbours, (N, bins, 2g).
    # The row offsets and weights are made at that size; one broadcast each then gives every
    # bin's 4 g^2 taps, (N, h, w, 2g, 2g) (five dimensions: broadcasting over seven, with
    # inner sizes of 2, was 4x slower on a CPU).
    rows = base.view(n, 1) + y_taps[0].view(n, -1) * width.view(n, 1)
    row_weight = y_taps[1].view(n, -1) * (valid.view(n, 1) / grid**2)
    side = 2 * grid
    index = rows.view(n, out_h, 1, side, 1) + x_taps[0].view(n, 1, out_w, 1, side)
    weight = row_weight.view(n, out_h, 1, side, 1) * x_taps[1].view(n, 1, out_w, 1, side)
    taps = side * side
    index, weight = index.reshape(-1, taps), weight.reshape(-1, taps).to(table.dtype)
    if exporting():
        # ONNX has no weighted bag sum (exporters loop over the bags): one gather, and the
        # weighted sum as a batched matrix product (no (bins, taps, C) product in memory).
        gathered = table.index_select(0, index.reshape(-1)).view(*index.shape, channels)
        pooled = torch.bmm(weight[:, None, :], gathered).squeeze(1)
    else:
        pooled = weighted_bag_sum(table, index, weight)
    return pooled.view(n, out_h, out_w, channels).permute(0, 3, 1, 2)


def weighted_bag_sum(
    table: torch.Tensor, index: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """``F.embedding_bag(index, table, per_sample_weights=weight, mode="sum")``: row ``i`` of
    the result is ``sum_k weight[i, k] * table[index[i, k]]``.

    On a CPU, when ``table`` needs a gradient and ``weight`` does not (RoI Align in training:
    the RoIs are detached), the backward pass is ``_TransposedBagSum``'s, the same sum
    computed the other way round, several times faster than ``embedding_bag``'s own CPU
    backward (``bench/README.md``). Elsewhere it is ``F.embedding_bag`` itself.

    Args:
        table: (T, C) rows; index: (N, K) int64 rows of ``table``; weight: (N, K).

    Returns:
        (N, C).
    """
    transposed_backward = (
        table.device.type == "cpu" and table.requires_grad and not weight.requires_grad
        and torch.is_grad_enabled() and not torch.compiler.is_compiling()
    )  # fmt: skip
    if transposed_backward:
        return _TransposedBagSum.apply(table, index, weight)
    return F.embedding_bag(index, table, per_sample_weights=weight, mode="sum")


class _TransposedBagSum(torch.autograd.Function):
    """``weighted_bag_sum`` whose backward is itself a weighted bag sum, over the transposed
    bags: ``grad_table[t] = sum of weight[i, k] * grad[i] over the taps (i, k) with
    index[i, k] == t``. One stable sort groups the taps by table row; every row's taps are
    then one bag of ``grad`` rows, in a fixed order (a deterministic gradient)."""

    @staticmethod
    def forward(ctx: Any, table: torch.Tensor, index: torch.Tensor, weight: torch.Tensor):
        ctx.save_for_backward(index, weight)
        ctx.num_rows = table.shape[0]
        return F.embedding_bag(index, table, per_sample_weights=weight, mode="sum")

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        index, weight = ctx.saved_tensors
        taps = index.reshape(-1)
        order = torch.sort(taps, stable=True).indices  # (N * K,) the taps by table row
        counts = torch.bincount(taps, minlength=ctx.num_rows)
        starts = torch.cumsum(counts, 0) - counts  # (T,) each row's first tap in ``order``
        bag_of_tap = torch.div(order, index.shape[1], rounding_mode="floor")
        grad_table = F.embedding_bag(
            bag_of_tap, grad.contiguous(), starts,
            per_sample_weights=weight.reshape(-1)[order].to(grad.dtype), mode="sum",
        )  # fmt: skip
        return grad_table, None, None


@torch.no_grad()
def training_diagnostics(
    proposals: torch.Tensor,
    valid: torch.Tensor,
    gt_boxes: torch.Tensor,
    sampled: torch.Tensor,
    foreground: torch.Tensor,
    cls_logits: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Three numbers that say whether a training step is learning, each a detached ``()``
    tensor left on the device. ``FasterRCNN`` keeps them in ``training_stats`` (apart from the
    losses, which callers sum); ``train_detector`` reads them with the losses, no extra sync:

    - ``stat_rpn_recall``: the share of valid GT boxes that some RPN proposal overlaps at IoU
      0.5 or more (proposals before the GT boxes are added). Low: the proposals miss the
      objects (image size, anchors, the RPN itself), and the second stage cannot recover.
    - ``stat_fg_share``: the share of foreground among the second stage's sampled RoIs (the
      GT boxes included). Near 0: the classifier only ever learns background.
    - ``stat_top_score``: the mean over images of the highest object-class probability among
      their sampled RoIs. Staying low: the classifier has collapsed to background.

    Args:
        proposals: (B, K, 4); valid: (B, K).
        gt_boxes: (B, M, 5) GT rows, padded with ``-1``.
        sampled, foreground: (B, S); cls_logits: (B, S, C+1).
    """
    gt_valid = gt_boxes[..., 4] != BACKGROUND  # (B, M)
    overlap = box_iou(proposals, gt_boxes[..., :4].to(proposals)) * valid[..., None]
    # A zero row first, so an image without proposals (K = 0) has best 0. Concatenated rather
    # than F.pad: torch 2.9 refuses F.pad on a tensor with an empty dimension (M = 0).
    best = torch.cat((overlap.new_zeros(overlap.shape[0], 1, overlap.shape[2]), overlap), 1)
    best = best.amax(dim=1)  # (B, M)
    found = (best >= 0.5) & gt_valid
    probs = full_precision(cls_logits).softmax(dim=-1)[..., 1:].amax(dim=-1)  # (B, S)
    return {
        "stat_rpn_recall": found.sum() / gt_valid.sum().clamp(min=1),
        "stat_fg_share": foreground.sum() / sampled.sum().clamp(min=1),
        "stat_top_score": torch.where(sampled, probs, 0.0).amax(dim=1).mean(),
    }


def constructor_config(module: nn.Module, skip: Sequence[str] = ()) -> dict[str, Any]:
    """``{argument: module.argument}`` for each argument of ``module``'s constructor but
    ``skip``, sequences as new lists: what a checkpoint stores to rebuild it (``RPN.config``,
    ``FasterRCNN.config``). Each argument must be kept as an attribute of the same name."""
    names = list(inspect.signature(type(module).__init__).parameters)[1:]  # without self
    values = {name: getattr(module, name) for name in names if name not in skip}
    return {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in values.items()}
