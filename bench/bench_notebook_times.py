"""How long the notebook's training cells take: seconds per iteration of each cell's model,
and that times the cell's iterations, on this machine.

Cells (the notebook's settings outside ``FAST_MODE``; batch 16 of 224-pixel images):

- ``3.9 RPN overfit``: backbone + RPN, FPN 64, 1000 iterations;
- ``4.1 overfit``: Faster R-CNN, FPN 64, top-k 400/80, 1000 iterations;
- ``4.3 full training``: the section 4.3 model (``NOTEBOOK.model``, FPN 128), 9000 iterations;
- ``4.5 box regression``: the same with ``box_regression=True``, 9000 iterations.

One iteration is what ``train_detector`` does per batch (zero_grad, forward, backward, SGD
step; under ``--amp`` with float16 autocast and a ``GradScaler``) on a fixed batch of the
generated shapes data already on the device: data loading is left out (section 4.3 reads the
decoded-image cache, so the loader keeps up on a GPU). Cells are timed alternately and the
median is reported. Random weights: the ImageNet ones change nothing in the time.

Usage::

    python bench/bench_notebook_times.py [--device cpu|cuda] [--repeats 5] [--amp]
                                         [--out bench/results/notebook_times.json]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from harness import alternate, environment, shapes_batch, write_json
from torch import nn

import recipe
from common import DetectorBackboneWithFPN
from eecs598.settings import NOTEBOOK
from two_stage_detector import RPN, FasterRCNN


class FirstStage(nn.Module):
    """Backbone + RPN, as section 3.9 trains them."""

    def __init__(self, channels: int):
        super().__init__()
        self.backbone = DetectorBackboneWithFPN(out_channels=channels, pretrained=False)
        self.rpn = RPN(channels, [channels, channels], batch_size_per_image=16,
                       anchor_stride_scale=8, anchor_aspect_ratios=[0.5, 1.0, 2.0],
                       anchor_iou_thresholds=(0.3, 0.6))  # fmt: skip

    def forward(self, images, gt_boxes=None):
        return self.rpn(self.backbone(images), self.backbone.fpn_strides, gt_boxes)


def overfit_detector() -> FasterRCNN:
    """Section 4.1's model."""
    backbone = DetectorBackboneWithFPN(out_channels=64, pretrained=False)
    rpn = RPN(64, [64, 64], batch_size_per_image=16, anchor_stride_scale=8,
              anchor_aspect_ratios=[0.5, 1.0, 2.0], anchor_iou_thresholds=(0.3, 0.6),
              pre_nms_topk=400, post_nms_topk=80)  # fmt: skip
    return FasterRCNN(backbone, rpn, num_classes=20, roi_size=(7, 7), stem_channels=[64, 64],
                      batch_size_per_image=32)  # fmt: skip


# name -> (model builder, the cell's iterations, its learning rate)
CELLS = {
    "3.9 RPN overfit": (lambda: FirstStage(64), 1000, 8e-3),
    "4.1 overfit": (overfit_detector, 1000, 0.01),
    "4.3 full training": (lambda: recipe.build_detector(20, NOTEBOOK.model, pretrained=False),
                          9000, 0.01),
    "4.5 box regression": (lambda: recipe.build_detector(20, NOTEBOOK.model, pretrained=False,
                                                         box_regression=True), 9000, 0.01),
}  # fmt: skip


def step_fn(model: nn.Module, lr: float, batch: tuple, device: str, amp: bool):
    """One training iteration of ``model`` on ``batch``, as ``train_detector`` runs it."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    images, gt = batch

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            loss = sum(v for k, v in model(images, gt).items() if "loss" in k)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--amp", action="store_true", help="float16 autocast (CUDA only)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    amp = args.amp and args.device.startswith("cuda")
    torch.manual_seed(0)
    torch.set_flush_denormal(True)  # random-init RegNets make subnormals (slow on CPUs)
    batch = shapes_batch(16, 224, args.device)
    steps = {}
    for name, (build, _, lr) in CELLS.items():
        steps[name] = step_fn(build().to(args.device).train(), lr, batch, args.device, amp)
    times = alternate(steps, args.repeats, warmup=1, device=args.device)
    env = environment(args.device)
    print(f"{env}  amp={amp}")
    print(f"{'cell':22s} {'s/iteration':>12s} {'iterations':>11s} {'cell time':>12s}")
    rows = {}
    for name, (_, iterations, _) in CELLS.items():
        per = statistics.median(times[name])
        rows[name] = {"s_per_iteration": per, "iterations": iterations,
                      "hours": per * iterations / 3600, "runs": times[name]}  # fmt: skip
        total = per * iterations
        shown = f"{total / 3600:.1f} h" if total >= 3600 else f"{total / 60:.0f} min"
        print(f"{name:22s} {per:12.3f} {iterations:11d} {shown:>12s}")
    if args.out:
        write_json(args.out, {"environment": env, "amp": amp, "cells": rows})


if __name__ == "__main__":
    main()
