"""Accuracy at equal budget: our Faster R-CNN against torchvision's, same everything.

Both models come from ``bench/matched.py`` (same modules and initial weights, same anchors,
sampling and NMS settings) and are trained by the same ``a4_helper.train_detector`` call on the
same batches: ``train``'s pipeline (``recipe.train_loader``: flips, one random short
side per batch, whole images padded to a multiple of 32 and grouped by aspect ratio, BCCD at
``--image-size auto``), the same seed, schedule and iteration count. Both get the anchors
``--anchor-scale auto`` fits to the training boxes (``eecs598.anchor_fit``). Then the same
``inference_with_detector`` scores them (mAP@0.5, VOC rules). Torchvision's model is adapted
to our calling convention by ``TorchvisionAdapter`` (each image cut to its true size, which its
own transform pads again; targets from our padded GT rows; detections back as ``(boxes,
classes, scores)``); its transform neither resizes nor normalises.

Datasets: the generated shapes data (train / val, the demo's 480 / 96 images at 128 px) and,
when present, BCCD (``../shared/datasets/bccd``, train / val) and the aquarium photos
(``../shared/datasets/aquarium``, a Roboflow COCO export: train / valid; ``--datasets
aquarium --iters 600``).

Usage::

    python bench/bench_accuracy.py [--datasets shapes bccd] [--iters 300] [--seeds 0 1 2 3 4]
                                   [--bccd-seeds 0] [--sizes-per-level 1] [--smooth-l1-beta 0]
                                   [--roi-align-offset 0]
                                   [--out bench/results/accuracy.json]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from harness import AQUARIUM, BCCD, available, environment, write_json
from matched import build_pair, torchvision_targets
from torch import nn

import a4_helper
import recipe
from eecs598 import reset_seed
from eecs598.anchor_fit import fit_anchors, training_box_sizes
from eecs598.settings import preset_for

SETTINGS = {
    "shapes": {"dataset": "shapes", "image_size": 128, "batch_size": 16, "fpn_channels": 64},
    "bccd": {"dataset": str(BCCD), "image_size": "auto", "batch_size": 8, "fpn_channels": 64},
    "aquarium": {
        "dataset": str(AQUARIUM / "train" / "_annotations.coco.json"),
        "image_size": "auto",
        "batch_size": 8,
        "fpn_channels": 64,
        "val_dataset": str(AQUARIUM / "valid" / "_annotations.coco.json"),
    },
}


class TorchvisionAdapter(nn.Module):
    """Torchvision's ``FasterRCNN`` behind our interface.

    Training: ``(images (B, 3, H, W), gt_boxes (B, M, 5), image_sizes=(B, 2))`` -> loss dict.
    Eval, B == 1: ``(boxes (N, 4), classes (N,) in 0..C-1, scores (N,))``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(
        self, images, gt_boxes=None, test_score_thresh=None, test_nms_thresh=None,
        image_sizes=None,
    ):  # fmt: skip
        if image_sizes is not None:  # the true images; torchvision pads them itself
            images = [
                im[:, :h, :w] for im, (h, w) in zip(images, image_sizes.tolist(), strict=True)
            ]
        if self.training:
            return self.model(list(images), torchvision_targets(gt_boxes))
        heads = self.model.roi_heads
        heads.score_thresh = 0.05 if test_score_thresh is None else test_score_thresh
        heads.nms_thresh = 0.5 if test_nms_thresh is None else test_nms_thresh
        out = [(d["boxes"], d["labels"] - 1, d["scores"]) for d in self.model(list(images))]
        return out[0] if len(out) == 1 else out


def pipeline(name: str, root: Path, seed: int, sizes_per_level: int | None = None):
    """``train``'s settings, datasets, anchors and batches for ``name`` (the demo's shapes, or
    BCCD)."""
    cfg = SETTINGS[name]
    extra = {key: cfg[key] for key in ("val_dataset",) if key in cfg}
    settings = preset_for(cfg["dataset"]).replace(
        image_size=cfg["image_size"], batch_size=cfg["batch_size"], workers=0, seed=seed,
        data_dir=str(root), num_train=480, num_val=96, **extra,
    )  # fmt: skip
    settings, train, val, classes, scales = recipe.training_datasets(settings)
    fit = recipe.fit_training_anchors(settings, train, classes, report=False)
    if sizes_per_level is not None:  # the fit restricted to this many sizes per level
        strides = recipe.level_strides(settings.model.backbone.fpn_levels)
        box_wh, _ = training_box_sizes(train.records, settings.data.image_size)
        fit = fit_anchors(box_wh, strides, sizes_per_level=sizes_per_level)
    train = a4_helper.CachedDetection(train, normalize=False)
    return settings, recipe.train_loader(settings, train, scales), val, classes, fit


def run(name: str, args, root: Path, seed: int) -> dict:
    cfg = SETTINGS[name]
    options, loader, val, classes, fit = pipeline(name, root, seed, args.sizes_per_level)
    chosen = options.model
    beta = chosen.smooth_l1_beta if args.smooth_l1_beta is None else args.smooth_l1_beta
    offset = (
        chosen.heads.roi_align_offset if args.roi_align_offset is None else args.roi_align_offset
    )
    settings = {"image_size": options.data.image_size, "iters": args.iters, "anchors": fit.sizes,
                "smooth_l1_beta": beta, "roi_align_offset": offset, "norm": chosen.norm,
                "train_crop": recipe.train_crop_size(options)}  # fmt: skip
    results = {"settings": {**cfg, **settings, "train_images": len(loader.dataset)}}
    ours, theirs = build_pair(
        num_classes=len(classes), fpn_channels=cfg["fpn_channels"],
        image_size=options.data.image_size, rpn_batch=chosen.rpn.batch_size_per_image,
        roi_batch=chosen.heads.batch_size_per_image, pre_nms_topk=chosen.rpn.pre_nms_topk,
        post_nms_topk=chosen.rpn.post_nms_topk, seed=seed, anchor_sizes=fit.sizes,
        aspect_ratios=tuple(fit.aspect_ratios), smooth_l1_beta=beta, roi_align_offset=offset,
        norm=chosen.norm,
    )  # fmt: skip
    models = {"ours": ours, "torchvision": TorchvisionAdapter(theirs)}
    for label, model in ((k, v) for k, v in models.items() if k in args.models):
        reset_seed(seed)
        start = time.perf_counter()
        history = a4_helper.train_detector(
            model, loader, learning_rate=options.train.lr, max_iters=args.iters,
            warmup_iters=options.train.warmup_iters, grad_clip=options.train.grad_clip,
            log_period=0, show_plot=False, progress=False,
        )  # fmt: skip
        train_s = time.perf_counter() - start
        val_loader = torch.utils.data.DataLoader(val, batch_size=1)
        result = a4_helper.inference_with_detector(
            model, val_loader, dict(enumerate(classes)), score_thresh=0.05, nms_thresh=0.5,
            output_dir=str(root / f"{name}-{label}"), progress=False,
        )  # fmt: skip
        results[label] = {
            "mAP": result.map, "ap": result.ap, "train_s": train_s, "final_loss": history[-1],
        }  # fmt: skip
        print(f"{name:7s} seed {seed} {label:12s} mAP@0.5 {100 * result.map:5.1f}%  "
              f"train {train_s:6.0f} s", flush=True)  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["shapes", "bccd"])
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4],
                        help="shapes: initial weights, data order and augmentation")  # fmt: skip
    parser.add_argument("--bccd-seeds", nargs="+", type=int, default=[0],
                        help="BCCD and aquarium seeds")  # fmt: skip
    parser.add_argument("--sizes-per-level", type=int, default=None,
                        help="anchor sizes per level of the fit (default: its choice)")  # fmt: skip
    parser.add_argument("--models", nargs="+", default=["ours", "torchvision"])
    parser.add_argument("--smooth-l1-beta", type=float, default=None,
                        help="our box losses (default: train's, 1/9; 0: L1). Torchvision's "
                        "model always uses 1/9")  # fmt: skip
    parser.add_argument("--roi-align-offset", type=float, default=None,
                        help="our RoI Align's sampling offset (default: train's, 0.5; 0: "
                        "where torchvision's unaligned RoI Align samples)")  # fmt: skip
    parser.add_argument("--out", default="bench/results/accuracy.json")
    args = parser.parse_args()
    result = {"environment": environment("cpu"), "iters": args.iters}
    with tempfile.TemporaryDirectory() as tmp:
        for name in available(args.datasets):
            seeds = args.seeds if name == "shapes" else args.bccd_seeds
            result[name] = {seed: run(name, args, Path(tmp), seed) for seed in seeds}
            write_json(args.out, result)
    print(f"\n{'dataset':8s} {'seeds':>6s} {'ours':>8s} {'torchvision':>12s}")
    for name in args.datasets:
        if name in result and len(args.models) == 2:
            runs = result[name].values()
            ours = statistics.mean(100 * r["ours"]["mAP"] for r in runs)
            theirs = statistics.mean(100 * r["torchvision"]["mAP"] for r in runs)
            print(f"{name:8s} {len(runs):6d} {ours:7.1f}% {theirs:11.1f}%")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
