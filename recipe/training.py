"""The recipe's top: ``train``, a run from settings to a checkpoint and a report.

``train`` reads the settings, settles every "auto" (``recipe.plan.plan_training``), builds the
model (``recipe.model``), trains (``eecs598.training.train_detector``) with validation on the
val split while training (``eecs598.validation``) and evaluates at the end
(``recipe.evaluation.evaluate_and_report``). It runs under ``torchrun`` too.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from eecs598.cache import CachedDetection
from eecs598.checkpoint import detector_meta
from eecs598.files import write_json
from eecs598.settings import HELD_OUT_FRACTION, HELD_OUT_SEED, VAL_BATCH_SIZE, Settings
from eecs598.training import LossHistory, train_detector
from eecs598.utils import reset_seed
from eecs598.validation import BEST_CHECKPOINT, RESULTS_CSV, PeriodicValidation
from recipe.data import train_loader, val_loader, warn_classes_without_boxes
from recipe.evaluation import evaluate_and_report, output_dir
from recipe.model import (
    build_detector,
    describe_initialisation,
    read_checkpoint,
    start_from_weights,
    with_network_of,
)
from recipe.plan import Plan, eval_period, plan_training
from two_stage_detector import FasterRCNN, compile_detector

__all__ = ["train", "init_distributed", "SETUP_KEYS"]


# What `train` records in the checkpoint's meta about how it fed the model.
SETUP_KEYS = (
    "batch_mode",
    "multiscale",
    "flip",
    "photometric",
    "iou_crop",
    "train_crop",
    "fpn_levels",
)


# What a new run in a folder moves aside (to NAME.prev.EXT) rather than overwrite.
PREVIOUS_RUN_FILES = ("checkpoint.pt", BEST_CHECKPOINT, RESULTS_CSV)


def init_distributed(device: str, batch_size: int) -> tuple[int, int, str]:
    """Join the ``torchrun`` process group when there is one; returns ``(world, rank, device)``.

    NCCL on CUDA (one GPU per process: the device becomes ``cuda:LOCAL_RANK``), gloo on CPU.
    ``batch_size`` (the global batch) must split evenly over the processes.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 1, 0, device
    import torch.distributed as dist

    cuda = str(device).startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        device = f"cuda:{local_rank}"
    if batch_size % world:
        raise ValueError(f"--batch-size {batch_size} is not divisible by {world} processes")
    return world, dist.get_rank(), device


def train(settings: Settings) -> dict | None:
    """Train as ``settings`` say, then (on rank 0) evaluate on the val split and write the
    report into ``settings.out``: checkpoint.pt, loss.png, ap_per_class.png, detections.png,
    metrics.json (and, validating while training, best.pt, results.csv, results.png). Every
    "auto" is settled once, by ``plan_training``; the checkpoint records the plan
    (``meta["plan"]``). With ``weights``, the model starts from that checkpoint
    (``start_from_weights``). Runs under ``torchrun`` too (``batch_size`` is the global batch).

    Returns:
        The metrics (``evaluate``'s, plus ``train_seconds``, ``iterations`` and
        ``final_loss``); None on the other ranks of a distributed run.
    """
    eval_period(settings)  # a bad period, patience or weights file stops before any writing
    weights = settings.train.weights
    init_checkpoint = read_checkpoint(weights, flag="--weights") if weights else None
    if init_checkpoint is not None:  # its network; no ImageNet download to overwrite
        settings = with_network_of(settings, init_checkpoint).replace(pretrained=False)
    world, rank, device = init_distributed(settings.eval.device, settings.train.batch_size)
    out = output_dir(settings.out)
    if rank == 0 and not settings.train.resume:
        _keep_previous_run(out)
    reset_seed(settings.train.seed)
    plan, train_data, val, classes = plan_training(settings, world, rank)
    if rank == 0:
        _describe_data(train_data, val, classes, out)
        if plan.anchors is not None:
            print(plan.anchors.report())
    model = training_model(plan, classes)
    initialisation = (
        describe_initialisation(model, plan.settings) if init_checkpoint is None
        else start_from_weights(model, init_checkpoint, classes, str(weights))
    )  # fmt: skip
    if rank == 0:
        print(plan.describe(initialisation))
    validation = _validation(plan, val, classes, device)
    start = time.time()
    history = run_training(plan, model, train_data, world, rank, device, validation)
    train_seconds = time.time() - start
    if world > 1:
        torch.distributed.destroy_process_group()
        if rank != 0:
            return None
    metrics = evaluate_and_report(model, val, classes, out, plan.settings, device)
    metrics.update(train_seconds=round(train_seconds, 1), iterations=len(history),
                   final_loss=history[-1] if history else None)  # fmt: skip
    return _finish_report(metrics, validation, out)


def training_model(plan: Plan, classes: list[str]) -> FasterRCNN:
    """``build_detector`` for a training run, its ``meta`` naming the classes, the sizes, how
    the images were fed (``SETUP_KEYS``) and the plan (``Plan.record``)."""
    settings = plan.settings
    model = build_detector(len(classes), settings.model, plan.anchors)
    flat = settings.flat()
    model.meta = detector_meta(
        classes, settings.data.image_size, settings.eval.test_image_size,
        training={key: _plain(flat[key]) for key in SETUP_KEYS}, plan=plan.record(),
    )  # fmt: skip
    return model


def _plain(value: Any) -> Any:
    """Tuples as lists, as checkpoints have always stored them."""
    return list(value) if isinstance(value, tuple) else value


def _describe_data(train: Any, val: Any, classes: Sequence[str], out: Path) -> None:
    """The printout's data lines: sizes and classes, classes without boxes, a held-out split."""
    print(f"Dataset: {len(train)} train / {len(val)} val images, classes: {', '.join(classes)}")
    warn_classes_without_boxes(train, classes)
    _record_held_out_split(train, val, out)


def _finish_report(metrics: dict, validation: PeriodicValidation | None, out: Path) -> dict:
    """Add the best validation to ``metrics``, write metrics.json, say where everything is."""
    kept = ["checkpoint.pt (the last)"]
    if validation is not None and validation.rows:
        best = validation.best
        metrics["best"] = {"iteration": int(best["iteration"]), "mAP": best["val_map50"]}
        kept += [f"{BEST_CHECKPOINT} (iteration {int(best['iteration'])}, val mAP@0.5 "
                 f"{100 * best['val_map50']:.2f}%)", f"{RESULTS_CSV}, results.png"]  # fmt: skip
    write_json(out / "metrics.json", metrics)
    print(f"Outputs in {out}/: {', '.join(kept)}, loss.png, metrics.json, ap_per_class.png, "
          "detections.png, errors.png, ...")  # fmt: skip
    return metrics


def _record_held_out_split(train: Any, val: Any, out: Path) -> None:
    """When ``val`` was held out of the training data (``hold_out``): say so, naming a few
    of its images, and write both id lists to ``OUT/split.json``."""
    source = getattr(val, "held_out_from", None)
    if source is None:
        return
    write_json(out / "split.json", {
        "source": source, "fraction": HELD_OUT_FRACTION, "seed": HELD_OUT_SEED,
        "train": list(train.image_ids), "val": list(val.image_ids),
    })  # fmt: skip
    shown = ", ".join(val.image_ids[:5]) + (", ..." if len(val) > 5 else "")
    print(f"No val split in {source}: validating on {len(val)} held-out images ({shown}); "
          f"the split is in {out / 'split.json'}.")  # fmt: skip


def _keep_previous_run(out: Path) -> None:
    """A new run (not ``--resume``) in a folder that holds one: its checkpoints and results
    table are moved to ``*.prev.*`` (replacing older ones), so nothing trained is lost."""
    moved = []
    for name in PREVIOUS_RUN_FILES:
        path = out / name
        if path.is_file():
            os.replace(path, path.with_name(f"{path.stem}.prev{path.suffix}"))
            moved.append(name)
    if moved:
        print(f"Moved the existing {', '.join(moved)} in {out} to *.prev.* (use --resume to "
              "continue that run instead).")  # fmt: skip


def _validation(
    plan: Plan, val: Any, classes: Sequence[str], device: str
) -> PeriodicValidation | None:
    """The ``eval_period`` hook: scores ``val`` in ``VAL_BATCH_SIZE`` batches (see
    ``eecs598.validation.PeriodicValidation``); None without validation while training."""
    settings = plan.settings
    period = settings.train.eval_period
    if not period:
        return None
    return PeriodicValidation(
        val_loader(val, VAL_BATCH_SIZE, settings.data.workers), list(classes),
        Path(settings.out), period, settings.train.patience,
        settings.eval.score_thresh, settings.eval.nms_thresh, device, plan.eval_budget,
    )  # fmt: skip


def run_training(
    plan: Plan, model: FasterRCNN, train_data: Any, world: int, rank: int, device: str,
    validation: PeriodicValidation | None = None,
) -> LossHistory:  # fmt: skip
    """Cache the images, prepare the model (SyncBatchNorm, compilation) and the loader, and
    run ``train_detector`` with checkpoints in ``settings.out`` and ``validation``."""
    settings = plan.settings
    run, out = settings.train, Path(settings.out)
    if run.cache != "off":
        cache_dir = Path(run.cache_dir or out / "cache") if run.cache == "disk" else None
        train_data = CachedDetection(train_data, cache_dir, progress=run.progress, normalize=False)
    if run.sync_bn and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if run.compile:
        compile_detector(model)
    loader = train_loader(settings, train_data, plan.scales, world, rank)
    return train_detector(
        model, loader, learning_rate=run.lr, weight_decay=run.weight_decay,
        max_iters=run.max_iters, log_period=run.log_period, device=device,
        warmup_iters=run.warmup_iters, amp=run.amp, grad_clip=run.grad_clip,
        checkpoint_path=out / "checkpoint.pt", checkpoint_period=run.checkpoint_period,
        resume=run.resume, show_plot=False, plot_path=out / "loss.png", progress=run.progress,
        validation=validation,
    )  # fmt: skip
