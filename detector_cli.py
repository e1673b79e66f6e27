"""Command line for the two-stage detector: ``demo``, ``train``, ``evaluate``, ``predict`` and
``export``.

    python detector_cli.py demo                      # offline: generate, train, evaluate
    python detector_cli.py train --dataset ../shared/datasets/bccd --out runs/bccd
    python detector_cli.py train --dataset export/train/_annotations.coco.json \\
        --val-dataset export/valid/_annotations.coco.json --out runs/mine
    python detector_cli.py evaluate runs/bccd/checkpoint.pt --dataset ../shared/datasets/bccd
    python detector_cli.py predict runs/bccd/checkpoint.pt images/ --out predictions/
    python detector_cli.py export runs/bccd/checkpoint.pt --format onnx --out bccd.onnx
    python detector_cli.py export runs/bccd/checkpoint.pt --int8
    python detector_cli.py predict bccd.onnx images/    # onnxruntime, no torch model

Each command resolves its settings and calls the recipe (``recipe.train``, ``recipe.evaluate``,
``recipe.predict``, ``recipe.export``). The flags, their help and their defaults come from the
settings dataclasses in ``eecs598.settings``: a flag left out takes the value of the preset for the
data (``NOTEBOOK`` for voc2007, ``OWN_DATA`` for anything else, ``DEMO`` for ``demo``). A
checkpoint carries the model configuration, the class names and the image size, so
``evaluate`` and ``predict`` need no repeated flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from eecs598.versions import unsupported_torch

# Below the supported torch / torchvision: one line naming both versions and the pip command,
# instead of an ImportError from inside torchvision.
if (_UNSUPPORTED := unsupported_torch()) is not None:
    raise SystemExit(f"error: {_UNSUPPORTED}")

import recipe
from eecs598.settings import (
    AUDIT_OUT,
    DATA_DEPENDENT,
    DEMO,
    EVALUATE_OUT,
    EXPORT_NAME,
    NOTEBOOK,
    OWN_DATA,
    PREDICT_OUT,
    AuditSettings,
    DataSettings,
    EvalSettings,
    ExportSettings,
    ModelSettings,
    PredictSettings,
    Settings,
    TrainSettings,
    preset_for,
    setting_fields,
)

# The settings groups, in --help order, with their titles.
GROUPS = {
    "data": (DataSettings, "data: which data, where, and at what size"),
    "train": (TrainSettings, "training: batches, augmentation, schedule and the run"),
    "model": (ModelSettings, "model: backbone, RPN and second stage"),
    "eval": (EvalSettings, "evaluation: how detections are made and kept"),
    "predict": (PredictSettings, "prediction: what is kept and written"),
    "export": (ExportSettings, "export: the file written"),
    "audit": (AuditSettings, "audit: how label errors are found and listed"),
}
# Settings of another group that a command also takes, by flat name: the class names of a
# checkpoint that does not record them (the notebook's, from before it saved them).
BORROWED = {"predict": ("classes",), "export": ("classes",)}
# What each command takes: its settings groups and its own output folder.
COMMANDS = {
    "demo": (("data", "train", "model", "eval"), DEMO.out),
    "train": (("data", "train", "model", "eval"), OWN_DATA.out),
    "evaluate": (("data", "eval"), EVALUATE_OUT),
    "predict": (("eval", "predict"), PREDICT_OUT),
    "export": (("eval", "export"), f"{EXPORT_NAME} beside the checkpoint"),
    "audit": (("data", "train", "model", "eval", "audit"), AUDIT_OUT),
}
DATA_KINDS = "a VOC-layout folder, a COCO .json or shapes"


# ---------------------------------------------------------------------------------- flags


def _show(value: Any) -> str:
    """A default as a user would type it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return " ".join(_show(v) for v in value)
    if isinstance(value, float):
        return "1/9" if abs(value - 1 / 9) < 1e-12 else f"{value:g}"
    return "none" if value is None else str(value)


def _default_text(name: str, command: str) -> str:
    """The help's "Default: ..." for a setting: the demo's, or the value for each kind of
    data where it depends on the data."""
    if command == "demo":
        value = DEMO.flat()[name]
        return "" if value is None else f" Default: {_show(value)}."
    value = OWN_DATA.flat()[name]
    if name in DATA_DEPENDENT and command == "train":
        return (f" Default: {_show(value)} for {DATA_KINDS}; "
                f"{_show(NOTEBOOK.flat()[name])} for voc2007 (the notebook's).")  # fmt: skip
    return "" if value is None else f" Default: {_show(value)}."


def _add_setting(group: argparse._ArgumentGroup, name: str, f: dataclasses.Field, command: str):
    """One flag for one setting, its default left out of the namespace (``SUPPRESS``) so that
    only the flags given override the preset."""
    meta = f.metadata
    suffix = _default_text(name, command)
    text = (meta["help"] + ("." if suffix else "") + suffix).replace("%", "%%")
    options: dict[str, Any] = {"default": argparse.SUPPRESS, "dest": name, "help": text}
    example = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if isinstance(example, bool):
        options["action"] = argparse.BooleanOptionalAction
    else:
        parse = meta["parse"] or (type(example) if example is not None else str)
        options.update(type=parse, nargs=meta["nargs"], choices=meta["choices"])
    group.add_argument("--" + name.replace("_", "-"), **options)


def _borrowed_fields(command: str) -> dict[str, dataclasses.Field]:
    """The settings ``BORROWED`` gives ``command``, by flat name."""
    every = {name: f for cls, _ in GROUPS.values() for name, f in setting_fields(cls)}
    return {name: every[name] for name in BORROWED.get(command, ())}


def build_parser() -> argparse.ArgumentParser:
    """The parser: one subcommand each, its flags derived from the settings groups."""
    parser = argparse.ArgumentParser(prog="detector_cli.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    for command, (groups, out) in COMMANDS.items():
        p = sub.add_parser(command, help=HELP[command][0], description=HELP[command][1])
        if command in ("evaluate", "predict", "export"):
            what = ", or a .onnx file written by export" if command == "predict" else ""
            p.add_argument("checkpoint", help="a checkpoint.pt written by train or demo, or the "
                           f"notebook's rcnn_training.pt or rcnn_detector.pt{what}")  # fmt: skip
        if command == "predict":
            p.add_argument("images", nargs="+", help="image files and/or folders")
        kind = "the .onnx file (or a folder for it)" if command == "export" else "output folder"
        p.add_argument("--out", default=argparse.SUPPRESS, help=f"{kind}. Default: {out}")
        for key in groups:
            cls, title = GROUPS[key]
            group = p.add_argument_group(title)
            for name, f in setting_fields(cls):
                _add_setting(group, name, f, command)
        for name, f in _borrowed_fields(command).items():
            _add_setting(p, name, f, command)
        p.set_defaults(func=RUNS[command])
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The settings a parsed command line asks for: the preset for its data (``DEMO`` for
    ``demo``) with the flags given replacing their settings."""
    groups, _ = COMMANDS[args.command]
    fields = {name: f for key in groups for name, f in setting_fields(GROUPS[key][0])}
    fields |= _borrowed_fields(args.command)
    given = {"out": args.out} if hasattr(args, "out") else {}
    for name, value in vars(args).items():
        if name in fields:  # given on the command line (the others are not in ``args``)
            convert = fields[name].metadata["convert"]
            given[name] = convert(value) if convert else value
    if "epochs" in given and "max_iters" in given:
        raise ValueError(
            f"--epochs {given['epochs']} and --max-iters {given['max_iters']} both say how long "
            "to train: give one of them"
        )
    if args.command == "demo":
        settings = DEMO.replace(**given)
        data_dir = settings.data.data_dir or str(Path(settings.out) / "data")
        return settings.replace(dataset="shapes", data_dir=data_dir)
    return preset_for(given.get("dataset"), args.command).replace(**given)


# ---------------------------------------------------------------------------------- commands


def cmd_train(args: argparse.Namespace) -> dict | None:
    """``recipe.train`` (``demo``: on the generated shapes, with ``DEMO``'s defaults)."""
    return recipe.train(settings_from_args(args))


def cmd_evaluate(args: argparse.Namespace) -> dict:
    """``recipe.evaluate``: mAP of a checkpoint on the val split."""
    return recipe.evaluate(args.checkpoint, settings=settings_from_args(args))


def cmd_predict(args: argparse.Namespace) -> list[dict]:
    """``recipe.predict``: detections for image files and folders."""
    return recipe.predict(args.checkpoint, args.images, settings_from_args(args))


def cmd_audit(args: argparse.Namespace) -> list[dict]:
    """``recipe.audit``: the labels most likely wrong, from out-of-sample detections."""
    return recipe.audit(settings_from_args(args))


def cmd_export(args: argparse.Namespace) -> Path:
    """``recipe.export``: the checkpoint's detector as one ONNX graph."""
    return recipe.export(args.checkpoint, settings_from_args(args))


RUNS: dict[str, Callable] = {
    "demo": cmd_train,
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "predict": cmd_predict,
    "export": cmd_export,
    "audit": cmd_audit,
}
HELP = {
    "demo": (
        "offline demo: generate the shapes dataset, train, evaluate, write a report",
        "Generates a VOC-layout shapes dataset, trains a small Faster R-CNN from scratch, "
        "evaluates mAP@0.5 on its val split, and writes loss.png, ap_per_class.png, "
        "detections.png, checkpoint.pt and metrics.json into --out.",
    ),
    "train": (
        "train on voc2007, shapes, a VOC-layout folder or a COCO .json",
        "Train Faster R-CNN and evaluate it on the val split. --dataset voc2007 takes the "
        "notebook's settings (section 4.3's full run); any other data (a VOC-layout folder, a "
        "COCO instances .json such as a Roboflow export, shapes) takes settings chosen for data "
        "nobody tuned for: whole padded images at a size chosen from the boxes, multi-scale, "
        "flips, anchors fitted to the boxes, box regression. Flags override either. "
        "OUT/checkpoint.pt is written atomically every --checkpoint-period iterations; "
        "--resume continues from it.",
    ),
    "evaluate": (
        "mAP of a checkpoint on a dataset's val split",
        "Prints the mAP table and pycocotools' COCO-style summary; writes ap_per_class.png, "
        "detections.png, metrics.json, and under --out/mAP the mAP tool's ground-truth/ and "
        "detection-results/ files and COCO's ground_truth.json and detections.json.",
    ),
    "predict": (
        "detect objects in image files or folders",
        "Writes <name>_pred.png with the detections drawn, and detections.json (boxes in the "
        "original image's pixels). Takes a checkpoint, or a .onnx file from export (run by "
        "onnxruntime, the same pre-processing and outputs).",
    ),
    "export": (
        "export a checkpoint for deployment (ONNX, run by onnxruntime)",
        "Writes the whole detector as one ONNX graph (opset 18, via torch.export): normalised "
        "images of any batch size and size in; padded boxes, scores, classes and "
        "num_detections out; the class names, image size and normalisation in its metadata. "
        "--score-thresh and --nms-thresh are fixed in the graph. --int8 writes it quantized "
        "for CPUs (model-int8.onnx: convolutions in 8 bits, calibrated on --calibration). "
        "Needs onnx, onnxscript and onnxruntime.",
    ),
    "audit": (
        "find the labels most likely wrong: missing, of the wrong class, badly placed",
        "Trains --folds models, each on all but one part of the training images, and compares "
        "each image's labels with the detections of the model that did not see it (or, with "
        "--checkpoint, that checkpoint's). Writes audit.csv (suspects, most likely wrong "
        "first), audit.png (the worst drawn) and the suggested corrections in the data's own "
        "format (corrections.json, or corrections/Annotations/*.xml); the data is not changed.",
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; errors that name a bad input print one line and return 1. Without a
    command: the help, and 0."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        args.func(args)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
