"""Accuracy at equal budget: our Faster R-CNN against torchvision's, same everything.

Both models come from ``bench/matched.py`` (same modules and initial weights, same anchors,
sampling and NMS settings) and are trained by the same ``a4_helper.train_detector`` call with
the same data order, seed, batch size, schedule and iteration count, then scored by the same
``inference_with_detector`` (mAP@0.5, VOC rules). Torchvision's model is adapted to our calling
convention by ``TorchvisionAdapter`` (targets from our padded GT rows; detections back as
``(boxes, classes, scores)``); its transform neither resizes nor normalises.

Datasets: the generated shapes data (train / val) and, when present, BCCD
(``../shared/datasets/bccd``, train / val).

Usage::

    python bench/bench_accuracy.py [--datasets shapes bccd] [--iters 300]
                                   [--out bench/results/accuracy.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from harness import ROOT, environment, write_json
from matched import build_pair, torchvision_targets
from torch import nn

import a4_helper
from eecs598 import reset_seed

BCCD = ROOT.parent / "shared" / "datasets" / "bccd"

SETTINGS = {
    "shapes": {"image_size": 128, "batch_size": 16, "fpn_channels": 64, "anchor_scale": 4},
    "bccd": {"image_size": 224, "batch_size": 8, "fpn_channels": 64, "anchor_scale": 4},
}


class TorchvisionAdapter(nn.Module):
    """Torchvision's ``FasterRCNN`` behind our interface.

    Training: ``(images (B, 3, H, W), gt_boxes (B, M, 5))`` -> loss dict. Eval, B == 1:
    ``(boxes (N, 4), classes (N,) in 0..C-1, scores (N,))``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images, gt_boxes=None, test_score_thresh=None, test_nms_thresh=None):
        if self.training:
            return self.model(list(images), torchvision_targets(gt_boxes))
        heads = self.model.roi_heads
        heads.score_thresh = 0.05 if test_score_thresh is None else test_score_thresh
        heads.nms_thresh = 0.5 if test_nms_thresh is None else test_nms_thresh
        out = [(d["boxes"], d["labels"] - 1, d["scores"]) for d in self.model(list(images))]
        return out[0] if len(out) == 1 else out


def datasets(name: str, root: Path, image_size: int):
    if name == "shapes":
        data = root / "shapes"
        a4_helper.make_shapes_dataset(data, num_train=480, num_val=96, image_size=128)
        classes = list(a4_helper.SHAPES_CLASSES)
    else:
        data, classes = BCCD, list(a4_helper.BCCD_CLASSES)
    train = a4_helper.VOCLayoutDetection(data, "train", classes, image_size)
    val = a4_helper.VOCLayoutDetection(data, "val", classes, image_size)
    return a4_helper.CachedDetection(train, normalize=False), val, classes


def run(name: str, args, root: Path) -> dict:
    cfg = SETTINGS[name]
    train, val, classes = datasets(name, root, cfg["image_size"])
    results = {"settings": {**cfg, "iters": args.iters, "train_images": len(train)}}
    ours, theirs = build_pair(
        num_classes=len(classes), fpn_channels=cfg["fpn_channels"],
        image_size=cfg["image_size"], rpn_batch=64, roi_batch=32, pre_nms_topk=400,
        post_nms_topk=100, anchor_stride_scale=cfg["anchor_scale"], seed=args.seed,
    )  # fmt: skip
    theirs.transform.max_size = 4 * cfg["image_size"]  # short side fixed: never resize
    models = {"ours": ours, "torchvision": TorchvisionAdapter(theirs)}
    for label, model in ((k, v) for k, v in models.items() if k in args.models):
        reset_seed(args.seed)
        loader = torch.utils.data.DataLoader(
            train, batch_size=cfg["batch_size"], shuffle=True, drop_last=True,
            generator=torch.Generator().manual_seed(args.seed), num_workers=0,
        )  # fmt: skip
        start = time.perf_counter()
        history = a4_helper.train_detector(
            model, loader, learning_rate=0.02, max_iters=args.iters, warmup_iters=30,
            grad_clip=10.0, log_period=0, show_plot=False, progress=False,
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
        print(f"{name:7s} {label:12s} mAP@0.5 {100 * result.map:5.1f}%  train {train_s:6.0f} s")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["shapes", "bccd"])
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0, help="initial weights and data order")
    parser.add_argument("--models", nargs="+", default=["ours", "torchvision"])
    parser.add_argument("--out", default="bench/results/accuracy.json")
    args = parser.parse_args()
    result = {"environment": environment("cpu"), "iters": args.iters, "seed": args.seed}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets:
            if name == "bccd" and not BCCD.is_dir():
                print(f"{BCCD} not found: BCCD skipped")
                continue
            result[name] = run(name, args, Path(tmp))
    print(f"\n{'dataset':8s} {'ours':>8s} {'torchvision':>12s}")
    for name in args.datasets:
        if name in result and len(args.models) == 2:
            ours, theirs = result[name]["ours"]["mAP"], result[name]["torchvision"]["mAP"]
            print(f"{name:8s} {100 * ours:7.1f}% {100 * theirs:11.1f}%")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
