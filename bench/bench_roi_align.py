"""RoI pooling of the second stage: our ``fpn_roi_align`` against ``torchvision.ops.roi_align``.

``fpn_roi_align`` pools every RoI from the level ``assign_fpn_levels`` picks in one call (the
levels' features stacked as rows, bilinear taps gathered as an embedding bag), chosen for its
CPU speed. The alternative is torchvision's kernel run once per level on that level's boxes
(``aligned=True``: the same values, ``tests/test_two_stage_detector.py``), with the boxes split
by level first (boolean indexing: a host-device sync per level). Both rows time forward and
backward of the pooled features (a sum as loss), in the training configuration: batch 16 at
224 px, FPN 64 channels (p3-p5), 128 RoIs per image drawn like proposals (sizes from 8 to
200 px), 7x7 output, sampling ratio 2. Runs alternate; medians are reported with the ratio to
torchvision's.

Usage::

    python bench/bench_roi_align.py [--device cpu|cuda] [--repeats 20]
                                    [--out bench/results/roi_align.json]
"""

from __future__ import annotations

import argparse

import torch
import torchvision
from harness import add_step_args, alternate, environment, print_table, summarise, write_json

from common import assign_fpn_levels, fpn_roi_align

LEVELS = {"p3": 8, "p4": 16, "p5": 32}


def random_rois(batch: int, count: int, image_size: int, device) -> torch.Tensor:
    """(B, count, 4) boxes with log-uniform sides in [8, 200] px inside the image."""
    generator = torch.Generator().manual_seed(0)
    sides = torch.exp(torch.empty(batch, count, 2).uniform_(2.08, 5.3, generator=generator))
    sides = sides.clamp(max=image_size - 1)
    corner = torch.rand(batch, count, 2, generator=generator) * (image_size - sides)
    return torch.cat([corner, corner + sides], dim=-1).to(device)


def per_level_roi_align(feats, boxes: torch.Tensor, output_size: int) -> torch.Tensor:
    """torchvision's kernel once per level; rows returned in level order."""
    batch, count = boxes.shape[:2]
    image_ids = torch.arange(batch, device=boxes.device).repeat_interleave(count)
    flat = boxes.reshape(-1, 4)
    levels = assign_fpn_levels(flat)
    pooled = []
    for level, stride in LEVELS.items():
        chosen = levels == int(level[1:])
        rois = torch.cat([image_ids[chosen, None].to(flat), flat[chosen]], dim=1)
        pooled.append(
            torchvision.ops.roi_align(
                feats[level], rois, output_size, 1 / stride, sampling_ratio=2, aligned=True
            )
        )
    return torch.cat(pooled)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_args(parser)
    parser.add_argument("--rois", type=int, default=128, help="RoIs per image")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="bench/results/roi_align.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    feats = {
        level: torch.randn(
            args.batch_size,
            args.fpn_channels,
            args.image_size // stride,
            args.image_size // stride,
            device=device,
            requires_grad=True,
        )
        for level, stride in LEVELS.items()
    }
    boxes = random_rois(args.batch_size, args.rois, args.image_size, device)
    valid = torch.ones(boxes.shape[:2], dtype=torch.bool, device=device)

    def ours() -> None:
        fpn_roi_align(feats, LEVELS, boxes, valid, (7, 7)).sum().backward()

    def theirs() -> None:
        per_level_roi_align(feats, boxes, 7).sum().backward()

    times = alternate({"fpn_roi_align": ours, "torchvision": theirs}, args.repeats, device=device)
    rows = summarise(times, "torchvision")
    title = (
        f"RoI Align forward + backward, {args.batch_size} x {args.rois} RoIs, "
        f"FPN {args.fpn_channels}, {device}"
    )
    print_table(title, rows, "torchvision")
    write_json(args.out, {"environment": environment(device), "config": vars(args), **rows})


if __name__ == "__main__":
    main()
