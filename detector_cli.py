"""Command line for the two-stage detector: ``demo``, ``train``, ``evaluate`` and ``predict``.

    python detector_cli.py demo                      # offline: generate, train, evaluate
    python detector_cli.py train --dataset ../shared/datasets/bccd --out runs/bccd
    python detector_cli.py evaluate runs/bccd/checkpoint.pt --dataset ../shared/datasets/bccd
    python detector_cli.py predict runs/bccd/checkpoint.pt images/ --out predictions/

A checkpoint carries the model configuration, the class names and the image size, so
``evaluate`` and ``predict`` need no repeated flags. This module sits on top of the package: it
imports ``a4_helper``, ``two_stage_detector``, ``common`` and ``eecs598``, never the reverse.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from a4_helper import (
    SHAPES_CLASSES,
    CachedDetection,
    CorruptImageError,
    VOC2007DetectionTiny,
    VOCLayoutDetection,
    compile_detector,
    inference_with_detector,
    load_checkpoint,
    load_model_weights,
    make_shapes_dataset,
    read_rgb_image,
    train_detector,
    unnormalize_image,
)
from common import DetectorBackboneWithFPN
from two_stage_detector import RPN, FasterRCNN

# The notebook's full-training model (section 4.3), and the demo's smaller, faster one.
NOTEBOOK_MODEL = {"fpn_channels": 128, "pre_nms_topk": 500, "post_nms_topk": 200}
DEMO = {
    "num_train": 480,
    "num_val": 96,
    "image_size": 128,
    "fpn_channels": 64,
    "max_iters": 360,
    "batch_size": 16,
    "learning_rate": 0.02,
    "warmup_iters": 30,
    "grad_clip": 10.0,
    "box_regression": True,
    "rpn_batch_size": 64,
    "roi_batch_size": 64,
    "anchor_scale": 4,
    "no_pretrained": True,
    "test_image_size": 160,
}


# ---------------------------------------------------------------------------------- model


def build_detector(
    num_classes: int,
    fpn_channels: int = 128,
    pre_nms_topk: int = 500,
    post_nms_topk: int = 200,
    box_regression: bool = False,
    pretrained: bool = True,
    rpn_batch_size: int = 16,
    roi_batch_size: int = 32,
    anchor_scale: float | Sequence[float] = 8,
    anchor_offset: float = 0.0,
) -> FasterRCNN:
    """The notebook's Faster R-CNN (section 4.3) for ``num_classes`` classes.

    ``rpn_batch_size`` / ``roi_batch_size`` are the anchors and RoIs sampled per image for the
    losses (the notebook's 16 and 32; torchvision uses 256 and 512). ``anchor_scale`` is the
    anchor side in strides: the notebook's 8 gives 64-256 px anchors on p3-p5; 4 (RetinaNet's
    base size) gives 32-128 px, for small images and objects. ``anchor_offset`` is
    ``RPN``'s (0: anchors centred on each feature cell's top-left pixel).
    """
    backbone = DetectorBackboneWithFPN(out_channels=fpn_channels, pretrained=pretrained)
    rpn = RPN(
        fpn_channels=fpn_channels,
        stem_channels=[fpn_channels, fpn_channels],
        batch_size_per_image=rpn_batch_size,
        anchor_stride_scale=anchor_scale[0] if _single(anchor_scale) else anchor_scale,
        pre_nms_topk=pre_nms_topk,
        post_nms_topk=post_nms_topk,
        anchor_offset=anchor_offset,
    )
    return FasterRCNN(
        backbone, rpn, num_classes=num_classes, roi_size=(7, 7),
        stem_channels=[fpn_channels, fpn_channels], batch_size_per_image=roi_batch_size,
        box_regression=box_regression,
    )  # fmt: skip


def _single(values: float | Sequence[float]) -> bool:
    """One number, or a one-element sequence (argparse ``nargs="+"``)."""
    return not isinstance(values, (int, float)) and len(values) == 1


def load_weights(model: FasterRCNN, checkpoint: dict, path: str | os.PathLike) -> None:
    """Load a checkpoint's weights; a mismatch raises a ValueError naming the settings that
    differ (``a4_helper.config_differences``), not the state_dict keys."""
    load_model_weights(model, checkpoint, path)


def load_detector(path: str | os.PathLike, device: str = "cpu") -> tuple[FasterRCNN, dict]:
    """A model rebuilt from a checkpoint's own configuration, with its weights and metadata."""
    path = Path(path)
    checkpoint = load_checkpoint(path, map_location="cpu")  # clear errors for bad files
    if not checkpoint.get("config") or not checkpoint.get("meta"):
        raise ValueError(
            f"{path} has no model configuration or class names: it was not written by "
            "`detector_cli.py train` (or train_detector with a model that has .config/.meta)"
        )
    model = FasterRCNN.from_config(checkpoint["config"], pretrained=False)
    load_weights(model, checkpoint, path)
    model.meta = checkpoint["meta"]
    return model.to(device).eval(), checkpoint


# ---------------------------------------------------------------------------------- data


def discover_classes(root: Path) -> list[str]:
    """Sorted object class names found in a VOC-layout folder's annotations."""
    names = set()
    for xml_path in sorted((root / "Annotations").glob("*.xml")):
        try:
            tree = ET.parse(xml_path)
        except ET.ParseError as err:
            raise ValueError(f"Cannot parse annotation file {xml_path}: {err}") from err
        for name in tree.getroot().iter("name"):
            if name.text:
                names.add(name.text.strip())
    if not names:
        raise FileNotFoundError(f"No annotated objects under {root / 'Annotations'}")
    return sorted(names)


def make_datasets(args: argparse.Namespace) -> tuple[Any, Any, list[str]]:
    """Train and val datasets plus class names for ``--dataset``."""
    size = args.image_size
    test_size = getattr(args, "test_image_size", None) or size
    skip = getattr(args, "skip_corrupt", False)
    if args.dataset == "voc2007":
        train = VOC2007DetectionTiny(
            args.data_dir, "train", args.download, image_size=size, skip_corrupt=skip
        )
        val = VOC2007DetectionTiny(args.data_dir, "val", image_size=test_size, skip_corrupt=skip)
        return train, val, [train.idx_to_class[i] for i in range(len(train.idx_to_class))]
    if args.dataset == "shapes":
        root = Path(args.data_dir) / "shapes"
        make_shapes_dataset(
            root, num_train=args.num_train, num_val=args.num_val, image_size=size, seed=args.seed
        )
        classes = list(SHAPES_CLASSES)
    else:
        root = Path(args.dataset)
        classes = args.classes.split(",") if args.classes else discover_classes(root)
    train = VOCLayoutDetection(root, args.train_split, classes, image_size=size, skip_corrupt=skip)
    val = VOCLayoutDetection(root, args.val_split, classes, image_size=test_size, skip_corrupt=skip)
    return train, val, classes


def _loader(
    dataset: Any, batch_size: int, workers: int, shuffle: bool, seed: int, world: int = 1,
    rank: int = 0,
):  # fmt: skip
    """Batches of ``dataset``. Training (``shuffle``) always draws the order from a
    ``DistributedSampler`` (seeded, reshuffled per epoch), so one process and N processes of
    ``batch_size / N`` see the same global batches."""
    sampler = None
    if shuffle:
        sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
        pin_memory=torch.cuda.is_available(), drop_last=shuffle,
        persistent_workers=workers > 0,
    )  # fmt: skip


def init_distributed(args: argparse.Namespace) -> tuple[int, int]:
    """Join the ``torchrun`` process group when there is one; returns ``(world, rank)``.

    NCCL on CUDA (one GPU per process, ``cuda:LOCAL_RANK``), gloo on CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 1, 0
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = str(args.device).startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    if str(args.device).startswith("cuda"):
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by {world} processes")
    return world, dist.get_rank()


# ---------------------------------------------------------------------------------- outputs


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def evaluate_and_report(
    model: FasterRCNN, val: Any, classes: list[str], out: Path, args: argparse.Namespace
) -> dict:
    """mAP on ``val``: tool-format files, AP chart, detections grid, metrics JSON, table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from eecs598.mean_ap import plot_ap
    from eecs598.utils import detection_grid

    idx_to_class = dict(enumerate(classes))
    start = time.time()
    result = inference_with_detector(
        model, _loader(val, 1, args.workers, False, 0), idx_to_class,
        score_thresh=args.score_thresh, nms_thresh=args.nms_thresh,
        output_dir=str(out / "mAP"), device=args.device, progress=False,
    )  # fmt: skip
    seconds = time.time() - start
    plt.close(plot_ap(result, out / "ap_per_class.png"))
    samples = []
    model.eval()
    for index in torch.linspace(0, len(val) - 1, steps=min(8, len(val))).long().tolist():
        _, image, gt = val[index]
        with torch.no_grad():
            boxes, labels, scores = model(
                image[None].to(args.device), test_score_thresh=args.score_thresh,
                test_nms_thresh=args.nms_thresh,
            )  # fmt: skip
        pred = torch.cat([boxes, labels[:, None].to(boxes), scores[:, None]], dim=1).cpu()
        keep = pred[:, 5] >= 0.5  # readable: confident detections only
        samples.append((unnormalize_image(image), gt[gt[:, 4] >= 0], pred[keep]))
    plt.close(detection_grid(samples, idx_to_class, ncols=4, path=out / "detections.png"))
    metrics = {
        "mAP": result.map,
        "ap": result.ap,
        "iou_threshold": result.iou_threshold,
        "num_val_images": len(val),
        "eval_seconds": round(seconds, 2),
    }
    write_json(out / "metrics.json", metrics)  # inference_with_detector printed the table
    return metrics


# ---------------------------------------------------------------------------------- commands


def cmd_train(args: argparse.Namespace) -> dict | None:
    """Train, then (on rank 0) evaluate and write the report. Runs under ``torchrun`` too:
    ``--batch-size`` is the global batch, split evenly over the processes."""
    from eecs598 import reset_seed

    world, rank = init_distributed(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "checkpoint.pt"
    if rank == 0 and checkpoint.is_file() and not args.resume:  # never destroy the old one
        os.replace(checkpoint, out / "checkpoint.prev.pt")
        print(f"Moved the existing {checkpoint} to checkpoint.prev.pt (use --resume to continue).")
    reset_seed(args.seed)
    if rank == 0:  # generates or downloads data once; the other processes wait, then read it
        train, val, classes = make_datasets(args)
    if world > 1:
        torch.distributed.barrier()
    if rank != 0:
        train, val, classes = make_datasets(args)
    if rank == 0:
        print(f"Dataset: {len(train)} train / {len(val)} val images, classes: {', '.join(classes)}")
    model = build_detector(
        len(classes), args.fpn_channels, args.pre_nms_topk, args.post_nms_topk,
        box_regression=args.box_regression, pretrained=not args.no_pretrained,
        rpn_batch_size=args.rpn_batch_size, roi_batch_size=args.roi_batch_size,
        anchor_scale=args.anchor_scale, anchor_offset=args.anchor_offset,
    )  # fmt: skip
    model.meta = {
        "class_names": classes,
        "image_size": args.image_size,
        "test_image_size": args.test_image_size or args.image_size,
    }
    if args.cache != "off":
        cache_dir = Path(args.cache_dir or out / "cache") if args.cache == "disk" else None
        train = CachedDetection(train, cache_dir, progress=args.progress, normalize=False)
    if args.sync_bn and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.compile:
        compile_detector(model)
    loader = _loader(
        train, args.batch_size // world, args.workers, True, args.seed, world=world, rank=rank
    )
    start = time.time()
    history = train_detector(
        model, loader, learning_rate=args.lr, weight_decay=args.weight_decay,
        max_iters=args.max_iters, log_period=args.log_period, device=args.device,
        warmup_iters=args.warmup_iters, amp=args.amp, grad_clip=args.grad_clip,
        checkpoint_path=checkpoint, checkpoint_period=args.checkpoint_period,
        resume=args.resume, show_plot=False, plot_path=out / "loss.png", progress=args.progress,
    )  # fmt: skip
    train_seconds = time.time() - start
    if world > 1:
        torch.distributed.destroy_process_group()
        if rank != 0:
            return None
    metrics = evaluate_and_report(model, val, classes, out, args)
    metrics.update(
        train_seconds=round(train_seconds, 1),
        iterations=args.max_iters,
        final_loss=history[-1] if history else None,
    )
    write_json(out / "metrics.json", metrics)
    print(f"Outputs in {out}/: checkpoint.pt, loss.png, ap_per_class.png, detections.png, ...")
    return metrics


def cmd_demo(args: argparse.Namespace) -> dict:
    args.dataset = "shapes"
    args.data_dir = args.data_dir or str(Path(args.out) / "data")
    return cmd_train(args)


def cmd_evaluate(args: argparse.Namespace) -> dict:
    model, checkpoint = load_detector(args.checkpoint, args.device)
    classes = list(checkpoint["meta"]["class_names"])
    args.image_size = checkpoint["meta"]["image_size"]
    args.test_image_size = args.test_image_size or _test_image_size(checkpoint["meta"])
    args.classes = ",".join(classes)
    _, val, _ = make_datasets(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return evaluate_and_report(model, val, classes, out, args)


def _test_image_size(meta: dict) -> int:
    """Short side for evaluation and prediction: the checkpoint's test size (older checkpoints:
    its training size)."""
    return int(meta.get("test_image_size") or meta["image_size"])


def _image_files(inputs: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            files += sorted(
                p for p in path.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"}
            )
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"No image or folder at {path}")
    if not files:
        raise FileNotFoundError(f"No .jpg/.jpeg/.png images in {', '.join(inputs)}")
    return files


def cmd_predict(args: argparse.Namespace) -> list[dict]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.transforms.functional import to_tensor

    from a4_helper import preprocess_image
    from eecs598.utils import detection_visualizer

    model, checkpoint = load_detector(args.checkpoint, args.device)
    classes = list(checkpoint["meta"]["class_names"])
    size = args.test_image_size or _test_image_size(checkpoint["meta"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for path in _image_files(args.images):
        try:
            image = read_rgb_image(path)
        except CorruptImageError as err:
            raise ValueError(f"Cannot read image {path}: {err.__cause__}") from err
        tensor, (sx, sy) = preprocess_image(image, size)
        with torch.no_grad():
            boxes, labels, scores = model(
                tensor[None].to(args.device), test_score_thresh=args.score_thresh,
                test_nms_thresh=args.nms_thresh,
            )  # fmt: skip
        boxes = boxes.cpu() / torch.tensor([sx, sy, sx, sy])  # back to original pixels
        pred = torch.cat([boxes, labels.cpu()[:, None].float(), scores.cpu()[:, None]], dim=1)
        fig = detection_visualizer(to_tensor(image), classes, pred=pred, show=False)
        fig.savefig(out / f"{path.stem}_pred.png", dpi=100)
        plt.close(fig)
        records.append(
            {
                "image": str(path),
                "detections": [
                    {"class": classes[int(c)], "score": round(float(s), 4),
                     "box": [round(float(v), 2) for v in b]}
                    for b, c, s in zip(boxes, labels, scores, strict=True)
                ],
            }
        )  # fmt: skip
    write_json(out / "detections.json", records)
    print(f"{len(records)} images: annotated copies and detections.json in {out}/")
    return records


# ---------------------------------------------------------------------------------- parser


def _add_data_args(p: argparse.ArgumentParser, default_size: int) -> None:
    p.add_argument(
        "--dataset",
        default="shapes",
        help="voc2007, shapes, or a folder in PASCAL VOC layout",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="where VOC2007 lives / is downloaded, or the shapes data is written",
    )
    p.add_argument("--download", action="store_true", help="download VOC2007 if missing")
    p.add_argument(
        "--skip-corrupt",
        action="store_true",
        help="decode every image first and leave out unreadable ones (with a warning) instead "
        "of stopping at the first one",
    )
    p.add_argument(
        "--classes",
        default=None,
        help="comma-separated class list for a VOC-layout folder (when not given: the "
        "sorted names found in its annotations)",
    )
    p.add_argument("--train-split", default="train", help="ImageSets/Main list to train on")
    p.add_argument("--val-split", default="val", help="ImageSets/Main list to evaluate on")
    p.add_argument("--image-size", type=int, default=default_size, help="short image side")
    p.add_argument("--num-train", type=int, default=DEMO["num_train"], help="shapes: images")
    p.add_argument("--num-val", type=int, default=DEMO["num_val"], help="shapes: images")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="DataLoader worker processes")  # fmt: skip


def _add_eval_args(p: argparse.ArgumentParser, test_image_size: int | None = None) -> None:
    p.add_argument(
        "--test-image-size",
        type=int,
        default=test_image_size,
        help="short side of evaluation and prediction images (when not given: the "
        "checkpoint's, else --image-size); larger than the training size finds more small "
        "objects",
    )
    p.add_argument("--score-thresh", type=float, default=0.05,
                   help="drop detections scored below this")  # fmt: skip
    p.add_argument("--nms-thresh", type=float, default=0.5,
                   help="IoU above which a detection hides a lower one of its class")  # fmt: skip
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N")  # fmt: skip


def _add_train_args(p: argparse.ArgumentParser, defaults: dict) -> None:
    p.add_argument("--out", default=defaults["out"], help="output folder")
    p.add_argument("--max-iters", type=int, default=defaults["max_iters"],
                   help="SGD iterations")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=defaults["batch_size"],
                   help="images per iteration (over all processes under torchrun)")  # fmt: skip
    p.add_argument("--lr", type=float, default=defaults["learning_rate"],
                   help="learning rate; x0.1 at 60%% and 90%% of --max-iters")  # fmt: skip
    p.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay")
    p.add_argument("--warmup-iters", type=int, default=defaults["warmup_iters"],
                   help="linear learning-rate warm-up from 0.1%% of --lr")  # fmt: skip
    p.add_argument("--grad-clip", type=float, default=defaults["grad_clip"],
                   help="clip the gradient norm at this value (none when not given)")  # fmt: skip
    p.add_argument("--fpn-channels", type=int, default=defaults["fpn_channels"],
                   help="channels of the FPN levels and the heads' stems")  # fmt: skip
    p.add_argument("--pre-nms-topk", type=int, default=NOTEBOOK_MODEL["pre_nms_topk"],
                   help="RPN: best anchors per level and image that go into NMS")  # fmt: skip
    p.add_argument("--post-nms-topk", type=int, default=NOTEBOOK_MODEL["post_nms_topk"],
                   help="RPN: proposals kept per image after NMS")  # fmt: skip
    p.add_argument(
        "--box-regression",
        action=argparse.BooleanOptionalAction,
        default=defaults.get("box_regression", False),
        help="second-stage class-specific box regression",
    )
    p.add_argument(
        "--rpn-batch-size",
        type=int,
        default=defaults.get("rpn_batch_size", 16),
        help="anchors sampled per image for the RPN losses",
    )
    p.add_argument(
        "--roi-batch-size",
        type=int,
        default=defaults.get("roi_batch_size", 32),
        help="RoIs sampled per image for the second-stage losses",
    )
    p.add_argument(
        "--anchor-scale",
        type=float,
        nargs="+",
        default=defaults.get("anchor_scale", 8),
        help="anchor side(s) in units of the FPN level's stride (8: 64-256 px on p3-p5); "
        "several values give several anchor sizes per level",
    )
    p.add_argument(
        "--anchor-offset",
        type=float,
        default=0.0,
        help="anchor centres within each feature cell, in strides: 0 on the cell's top-left "
        "pixel (where this backbone's receptive fields are centred), 0.5 in its middle (the "
        "notebook's section 4.2.1)",
    )
    p.add_argument(
        "--no-pretrained",
        action="store_true",
        default=defaults["no_pretrained"],
        help="skip loading ImageNet weights for the backbone",
    )
    p.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the backbone and heads (compile_detector); pays off on long GPU runs",
    )
    p.add_argument("--log-period", type=int, default=50, help="print the losses every N iterations")
    p.add_argument("--checkpoint-period", type=int, default=500,
                   help="write OUT/checkpoint.pt every N iterations (and at the end)")  # fmt: skip
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/checkpoint.pt (without it, an existing one is first moved to "
        "OUT/checkpoint.prev.pt)",
    )
    p.add_argument(
        "--cache",
        choices=("memory", "disk", "off"),
        default="memory",
        help="decode and resize the training images once (CachedDetection); 'disk' also "
        "keeps them in a file under --cache-dir for later runs",
    )
    p.add_argument("--cache-dir", default=None, help="cache folder (when not given: OUT/cache)")
    p.add_argument(
        "--sync-bn",
        action="store_true",
        help="under torchrun on GPUs: batch-norm statistics over all processes' batches",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="initial weights, data order and sampling (and the shapes data)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (log lines only)")  # fmt: skip


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except for switches and options without one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        switch = (argparse._StoreTrueAction, argparse._StoreFalseAction)
        if action.default is None or isinstance(action, switch):
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detector_cli.py", description=__doc__.split("\n\n")[0],
        formatter_class=_HelpFormatter,
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command")
    fmt = _HelpFormatter

    demo = sub.add_parser(
        "demo", formatter_class=fmt,
        help="offline demo: generate the shapes dataset, train, evaluate, write a report",
        description="Generates a VOC-layout shapes dataset, trains a small Faster R-CNN from "
        "scratch, evaluates mAP@0.5 on its val split, and writes loss.png, ap_per_class.png, "
        "detections.png, checkpoint.pt and metrics.json into --out.",
    )  # fmt: skip
    _add_data_args(demo, DEMO["image_size"])
    _add_train_args(demo, {**DEMO, "out": "outputs/demo"})
    _add_eval_args(demo, DEMO["test_image_size"])
    demo.set_defaults(func=cmd_demo)

    train = sub.add_parser(
        "train", formatter_class=fmt, help="train on voc2007, shapes or a VOC-layout folder",
        description="Train the notebook's Faster R-CNN (defaults: section 4.3's full run) and "
        "evaluate it on the val split. OUT/checkpoint.pt is written atomically every "
        "--checkpoint-period iterations; --resume continues from it.",
    )  # fmt: skip
    _add_data_args(train, 224)
    _add_train_args(train, {"out": "runs/train", "max_iters": 9000, "batch_size": 16,
                            "learning_rate": 0.01, "fpn_channels": 128, "warmup_iters": 100,
                            "grad_clip": None, "no_pretrained": False})  # fmt: skip
    _add_eval_args(train)
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser(
        "evaluate", formatter_class=fmt, help="mAP of a checkpoint on a dataset's val split",
        description="Writes the mAP table, ap_per_class.png, detections.png, metrics.json and "
        "the mAP tool's ground-truth/ and detection-results/ files into --out.",
    )  # fmt: skip
    evaluate.add_argument("checkpoint", help="a checkpoint.pt written by train or demo")
    evaluate.add_argument("--out", default="runs/evaluate", help="output folder")
    _add_data_args(evaluate, 224)
    _add_eval_args(evaluate)
    evaluate.set_defaults(func=cmd_evaluate, seed=0)

    predict = sub.add_parser(
        "predict", formatter_class=fmt, help="detect objects in image files or folders",
        description="Writes <name>_pred.png with the detections drawn, and detections.json "
        "(boxes in the original image's pixels).",
    )  # fmt: skip
    predict.add_argument("checkpoint", help="a checkpoint.pt written by train or demo")
    predict.add_argument("images", nargs="+", help="image files and/or folders")
    predict.add_argument("--out", default="runs/predict", help="output folder")
    _add_eval_args(predict)
    predict.set_defaults(func=cmd_predict)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # `demo` is the default job
        args = parser.parse_args(["demo", *(argv or [])])
    if getattr(args, "data_dir", "") is None and args.command != "demo":
        args.data_dir = "data"
    try:
        args.func(args)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
