"""Input validators of the detector: each raises a ValueError naming the shape, dtype, device or
value at fault, so a malformed batch fails with a readable message instead of deep inside the
model.

They sit in the bottom layer because they need nothing of the model's code: ``common`` and
``two_stage_detector`` import them (``common.check_images``, ``FasterRCNN.check_inputs`` and
``FasterRCNN.forward``). The GT-row markers ``BACKGROUND`` and ``NEUTRAL`` live here for the
same reason; ``two_stage_detector`` re-exports them.

Conventions: images are (B, 3, H, W); GT boxes are (B, M, 5) rows ``(x1, y1, x2, y2, class)``
padded with rows of ``-1``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

__all__ = [
    "BACKGROUND",
    "NEUTRAL",
    "check_images",
    "check_gt_boxes",
    "check_inputs_match_model",
    "check_gt_values",
    "check_batch",
    "check_forward_inputs",
    "check_image_sizes",
    "warn_few_batchnorm_values",
    "check_detector_forward",
    "run_backbone",
    "check_anchor_sizes",
    "check_smooth_l1_beta",
]

#: Class of a background (or padding) GT row: matched rows of background anchors are all ``-1``.
BACKGROUND = -1.0
#: Class of a neutral (ignored in training) matched row: such rows are all ``-1e8``.
NEUTRAL = -1e8


def check_images(images: torch.Tensor) -> None:
    """Raise a ValueError unless ``images`` is a (B, 3, H, W) floating point tensor."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a floating point tensor, got {images.dtype}")


def check_gt_boxes(gt_boxes: torch.Tensor, batch_size: int | None = None) -> None:
    """Raise a ValueError naming the expected shape when ``gt_boxes`` does not have it."""
    if batch_size is None:
        ok, expected = gt_boxes.dim() in (2, 3) and gt_boxes.shape[-1] == 5, "(M, 5) or (B, M, 5)"
    else:
        ok = gt_boxes.dim() == 3 and gt_boxes.shape[0] == batch_size and gt_boxes.shape[-1] == 5
        expected = f"(B={batch_size}, M, 5)"
    if not ok:
        raise ValueError(
            f"gt_boxes must have shape {expected} with rows (x1, y1, x2, y2, class), "
            f"got {tuple(gt_boxes.shape)}"
        )


def check_inputs_match_model(
    images: torch.Tensor, gt_boxes: torch.Tensor | None, weight: torch.Tensor
) -> None:
    """Raise a ValueError when ``images`` (B, 3, H, W) or ``gt_boxes`` (B, M, 5) are on another
    device than the model's ``weight``, or ``images`` has another dtype outside autocast."""
    if images.device != weight.device:
        raise ValueError(
            f"images are on device {images.device} but the model is on {weight.device}; "
            f"move them with images.to({str(weight.device)!r}) (or the model with .to())"
        )
    if gt_boxes is not None and gt_boxes.device != images.device:
        raise ValueError(
            f"gt_boxes are on device {gt_boxes.device} but images are on {images.device}"
        )
    try:
        autocast = torch.is_autocast_enabled(weight.device.type)
    except RuntimeError:  # a device type without autocast support
        autocast = False
    if images.dtype != weight.dtype and not autocast:
        raise ValueError(
            f"images are {images.dtype} but the model's weights are {weight.dtype}; convert "
            f"one of them (images.to({weight.dtype}) or model.to({images.dtype})), or use "
            "torch.autocast"
        )


def check_gt_values(gt_boxes: torch.Tensor, num_classes: int) -> None:
    """Raise a ValueError naming the first bad value of (B, M, 5) ``gt_boxes``.

    Class ids must be -1 (padding) or integers in ``0..num_classes-1``; the boxes of
    non-padding rows must be finite with ``x2 >= x1`` and ``y2 >= y1`` (a zero-size box overlaps
    nothing, so it is simply never matched). A host-device sync unless ``gt_boxes`` is on the
    CPU (see ``FasterRCNN.check_inputs``).
    """
    classes = gt_boxes[..., 4]
    bad = (classes != BACKGROUND) & (
        (classes < 0) | (classes >= num_classes) | (classes != classes.round())
    )
    boxes = gt_boxes[..., :4]
    bad_box = (
        ~torch.isfinite(boxes).all(dim=-1)
        | (boxes[..., 2] < boxes[..., 0])
        | (boxes[..., 3] < boxes[..., 1])
    ) & (classes != BACKGROUND)
    if not (bad | bad_box).any():
        return
    if bad.any():
        raise ValueError(
            f"gt_boxes class ids must be integers in [0, {num_classes - 1}] or -1 for "
            f"padding, got {classes[bad].unique().tolist()}"
        )
    b, j = bad_box.nonzero()[0].tolist()
    raise ValueError(
        f"gt_boxes[{b}, {j}] = {gt_boxes[b, j].tolist()} is not a usable box: coordinates "
        "must be finite with x2 >= x1 and y2 >= y1 (padding rows have class -1)"
    )


def check_batch(
    images: torch.Tensor | None, gt_boxes: torch.Tensor | None, num_classes: int
) -> None:
    """Raise a ValueError naming the problem for malformed inputs (either may be None):
    ``FasterRCNN.check_inputs``.

    ``FasterRCNN.forward`` checks shapes always and class ids of CPU ``gt_boxes``; on an
    accelerator the class-id check would stall every step on a host-device sync, so
    ``a4_helper.train_detector`` calls this on each batch while it is still on the CPU.

    Args:
        images: (B, 3, H, W) floating point images.
        gt_boxes: (B, M, 5) GT rows (``(M, 5)`` or ``(B, M, 5)`` without ``images``).
        num_classes: object classes ``C``.
    """
    if images is not None:
        check_images(images)
    if gt_boxes is not None:
        check_gt_boxes(gt_boxes, batch_size=None if images is None else len(images))
        check_gt_values(gt_boxes, num_classes)


def check_forward_inputs(
    images: torch.Tensor,
    gt_boxes: torch.Tensor | None,
    weight: torch.Tensor,
    num_classes: int,
    training: bool,
) -> None:
    """The input checks of ``FasterRCNN.forward``, in this order.

    Raises a ValueError naming the shape, dtype, device or value at fault: images not
    (B, 3, H, W) floating point, on another device than the model's ``weight``, or of another
    dtype outside autocast; in ``training``, gt_boxes missing or not (B, M, 5), on another
    device, with a class id outside ``0..num_classes-1`` (``-1`` pads), or a non-padding box
    that is not finite or is inverted, ``x2 < x1`` or ``y2 < y1``. These two value checks run
    here only for CPU gt_boxes outside ``torch.compile``: elsewhere they would be a host-device
    sync per step (and a graph break), so ``train_detector`` runs them on the host instead
    (``FasterRCNN.check_inputs``).

    Args:
        images: (B, 3, H, W); gt_boxes: (B, M, 5), or None in eval mode;
        weight: one of the model's parameters; num_classes: object classes ``C``.
    """
    check_images(images)
    check_inputs_match_model(images, gt_boxes, weight)
    if not training:
        return
    if gt_boxes is None:
        raise ValueError("FasterRCNN needs gt_boxes (B, M, 5) in training mode")
    check_gt_boxes(gt_boxes, batch_size=len(images))
    if gt_boxes.device.type == "cpu" and not torch.compiler.is_compiling():
        check_gt_values(gt_boxes, num_classes)


def check_image_sizes(image_sizes: torch.Tensor, images: torch.Tensor) -> None:
    """Raise a ValueError unless ``image_sizes`` is (B, 2) for the (B, 3, H, W) ``images``.

    The values are not compared with the canvas here: that would be a host-device sync per
    step; ``eecs598.augment.PadCollate`` makes them on the host, within the canvas.
    """
    if image_sizes.shape != (len(images), 2) or image_sizes.is_floating_point():
        raise ValueError(
            f"image_sizes must be a (B={len(images)}, 2) integer tensor of (height, width), got "
            f"{tuple(image_sizes.shape)} {image_sizes.dtype}"
        )
    if image_sizes.device != images.device:
        raise ValueError(
            f"image_sizes are on device {image_sizes.device} but images are on {images.device}"
        )


def warn_few_batchnorm_values(images: torch.Tensor, stride: int) -> bool:
    """Warn when a (B, 3, H, W) training batch leaves fewer than 8 values per channel at the
    backbone's coarsest level (``stride``); return whether it warned.

    Normalising so few values makes BatchNorm's gradients explode and the next step turns the
    weights to NaN (the measured gradient norms are in ``bench/README.md``).
    ``stacklevel=4`` names the frame that called ``FasterRCNN.forward`` (this function and
    ``check_detector_forward`` lie between).
    """
    height, width = images.shape[-2:]
    values = len(images) * math.ceil(height / stride) * math.ceil(width / stride)
    if values >= 8:
        return False
    warnings.warn(
        f"A training batch of {len(images)} image(s) of {height}x{width} px leaves "
        f"{values} value(s) per channel in the backbone's last BatchNorm layers; their "
        "gradients explode. Use a larger batch or larger images, or set grad_clip.",
        stacklevel=4,
    )
    return True


def check_detector_forward(
    detector: torch.nn.Module, images: torch.Tensor, gt_boxes: torch.Tensor | None
) -> None:
    """``FasterRCNN.forward``'s checks (``check_forward_inputs``) of (B, 3, H, W) ``images``
    and (B, M, 5) ``gt_boxes`` (None in eval mode), and, in training, the
    few-BatchNorm-values warning once per model (``warn_few_batchnorm_values``)."""
    weight = next(detector.parameters())
    training = detector.training
    check_forward_inputs(images, gt_boxes, weight, detector.num_classes, training)
    if not training:
        return
    if not getattr(detector, "_warned_few_values", False) and detector.backbone.training:
        stride = max(getattr(detector.backbone, "fpn_strides", {"p5": 32}).values())
        if warn_few_batchnorm_values(images, stride):
            detector._warned_few_values = True  # once per model


def run_backbone(backbone: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The backbone's ``{level: (B, C, H_l, W_l)}`` features of (B, 3, H, W) ``images``.

    BatchNorm's bare error for one value per channel (a training batch of one image of at
    most 32x32 px) is re-raised as a ValueError saying what to change.
    """
    try:
        return backbone(images)
    except ValueError as err:
        if "more than 1 value per channel" not in str(err):
            raise
        raise ValueError(
            f"A training batch of {len(images)} image of {images.shape[-2]}x"
            f"{images.shape[-1]} px leaves one value per channel in the backbone's last "
            "BatchNorm layers, which cannot normalise it. Use a batch of 2 or more images "
            "(e.g. DataLoader(drop_last=True)) or images larger than 32 px on a side."
        ) from err


def check_anchor_sizes(
    anchor_sizes: dict[str, Sequence[float]] | None,
) -> dict[str, list[float]] | None:
    """``anchor_sizes`` as plain lists; ValueError unless every level has the same count of
    positive sizes (the prediction network has one set of outputs for every level)."""
    if not anchor_sizes:
        return None
    sizes = {str(level): [float(v) for v in values] for level, values in anchor_sizes.items()}
    counts = {len(values) for values in sizes.values()}
    if len(counts) != 1 or 0 in counts or min(min(v) for v in sizes.values()) <= 0:
        raise ValueError(
            f"anchor_sizes must give the same number of positive sizes for every level, got {sizes}"
        )
    return sizes


def check_smooth_l1_beta(beta: float) -> float:
    """``beta`` as a float; ValueError unless it is a finite number >= 0."""
    beta = float(beta)
    if not math.isfinite(beta) or beta < 0:
        raise ValueError(f"smooth_l1_beta must be a finite number >= 0 (0: L1), got {beta}")
    return beta
