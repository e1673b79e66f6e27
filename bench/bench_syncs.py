"""Aten ops and host-device syncs per training step and per inference: ours against torchvision's.

On a fast GPU this model computes a 224 px batch of 16 in milliseconds, so the step time is set by
how many kernels the host launches and how often it waits for the device. Both are counted here
exactly, on any device, with a ``TorchDispatchMode`` that sees every aten op (forward, backward
and optimizer), in the configuration of ``bench_train_step.py`` (``bench/matched.py``: 224 px,
batch 16, FPN 64, same modules and weights in both models).

Sync-type ops (``SYNC_OPS`` and ``_is_sync``): the ops whose result the host needs before it can
go on, so on CUDA each one waits for the queued kernels:

- ``aten.nonzero`` (also what ``torch.where(mask)`` runs), ``aten.masked_select``;
- ``aten.index.Tensor`` / ``aten.index_put_`` / ``aten._index_put_impl_`` with a bool or uint8
  index: boolean-mask indexing ``x[mask]``, ``x[mask] = v`` (a ``nonzero`` inside the kernel);
- ``aten._local_scalar_dense``: ``.item()``, ``int(t)``, ``float(t)``; ``aten.is_nonzero``:
  ``bool(t)``, ``if t:``; ``aten.equal``: ``torch.equal`` returns a Python bool;
- ``aten.unique*`` / ``aten._unique*``: output size depends on the data;
- ``aten.repeat_interleave.Tensor`` without ``output_size`` and ``aten.bincount``: their output
  size is a sum / maximum of the data;
- ``torchvision.nms``: data-dependent output size (its CUDA kernel copies the mask to the host);
- ``Tensor.tolist()`` and ``Tensor.numpy()``: on the CPU they read memory without dispatching an
  op, so they are wrapped while counting and recorded as ``Tensor.tolist`` / ``Tensor.numpy``.

Each sync is attributed to the first Python frame (innermost first) in this repository's model
files (``common.py``, ``two_stage_detector.py``, ``eecs598/``) or in torchvision, as
``file:function``; syncs in the backward pass or the optimizer are attributed to the frame that
called ``backward()`` / ``step()``.

Rows: the training step (zero_grad, forward, sum of losses, backward, SGD step with
``foreach=True``, the default on CUDA; the CPU default's per-parameter loop would add about 720
ops to each model's row; the table splits forward / backward / optimizer ops) and ``eval()``
inference at batch 1 and batch ``--batch-size``, for ours and torchvision's matched model. On
CUDA the training step also runs under ``torch.cuda.set_sync_debug_mode("warn")``, and the real
synchronizing CUDA calls are counted with the frame that made each.

Usage::

    python bench/bench_syncs.py [--device cpu|cuda] [--out bench/results/syncs.json]

Counting is exact and deterministic (no timing): it needs no idle machine.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys
import traceback
import warnings
from pathlib import Path

import torch
from harness import ROOT, add_step_args, environment, shapes_batch, write_json
from matched import build_pair, torchvision_targets
from torch.utils._python_dispatch import TorchDispatchMode

import common

ops = torch.ops.aten

SYNC_OPS = {
    ops.nonzero.default,
    ops.masked_select.default,
    ops._local_scalar_dense.default,
    ops.is_nonzero.default,
    ops.equal.default,
    ops.unique_dim.default,
    ops.unique_consecutive.default,
    ops._unique.default,
    ops._unique2.default,
    ops.unique_dim_consecutive.default,
    ops.bincount.default,
}
_BOOL_INDEX_OPS = {ops.index.Tensor, ops.index_put.default, ops.index_put_.default}
_BOOL_INDEX_OPS.add(ops._index_put_impl_.default)


def _is_sync(func, args, kwargs) -> bool:
    """Whether one dispatched op is sync-type (the module docstring's list)."""
    if func in SYNC_OPS:
        return True
    if func in _BOOL_INDEX_OPS:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices
        )
    if func is ops.repeat_interleave.Tensor or func is ops.repeat_interleave.self_Tensor:
        return kwargs.get("output_size") is None
    return func.namespace == "torchvision" and func.__name__.split(".")[0] == "nms"


_OUR_FILES = ("common.py", "two_stage_detector.py")


_COUNTER_FRAMES = {"origin", "record_sync", "__torch_dispatch__", "method", "show"}


def origin() -> str:
    """``file:function`` of the innermost frame in our model files or in torchvision; else the
    innermost frame of the bench scripts with its source line (e.g. ``loss.backward()``)."""
    fallback = None
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename)
        if "torchvision" in path.parts:
            return f"torchvision/{path.name}:{frame.name}"
        try:
            relative = path.resolve().relative_to(ROOT)
        except ValueError:
            continue
        if str(relative) in _OUR_FILES or relative.parts[0] == "eecs598":
            return f"{relative}:{frame.name}"
        if fallback is None and relative.parts[0] == "bench" and frame.name not in _COUNTER_FRAMES:
            fallback = f"{relative}:{frame.name}: {frame.line}"
    return fallback or "?"


class OpCounter(TorchDispatchMode):
    """Tally every aten op and, for sync-type ops, where they come from."""

    def __init__(self, ops_by_origin: bool = False):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.ops_by_origin: collections.Counter[str] | None = (
            collections.Counter() if ops_by_origin else None
        )
        self.syncs: collections.Counter[str] = collections.Counter()
        self.sync_ops: collections.Counter[str] = collections.Counter()
        self.phase = "all"  # the training step sets forward / backward / optimizer
        self.ops_by_phase: collections.Counter[str] = collections.Counter()

    def record_sync(self, name: str) -> None:
        self.syncs[origin()] += 1
        self.sync_ops[name] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops[str(func.overloadpacket.__name__)] += 1
        self.ops_by_phase[self.phase] += 1
        if self.ops_by_origin is not None:
            self.ops_by_origin[origin()] += 1
        if _is_sync(func, args, kwargs):
            self.record_sync(str(func))
        return func(*args, **kwargs)

    def summary(self) -> dict:
        return {
            "aten_ops": sum(self.ops.values()),
            "sync_ops": sum(self.syncs.values()),
            "aten_ops_by_phase": dict(self.ops_by_phase),
            "syncs_by_origin": dict(self.syncs.most_common()),
            "syncs_by_op": dict(self.sync_ops.most_common()),
            "ops_by_name": dict(self.ops.most_common()),
            **(
                {"ops_by_origin": dict(self.ops_by_origin.most_common())}
                if self.ops_by_origin is not None
                else {}
            ),
        }


@contextlib.contextmanager
def counting(ops_by_origin: bool = False):
    """An ``OpCounter`` active in the block, with ``Tensor.tolist`` / ``.numpy`` recorded
    (``ops_by_origin``: also attribute every op to its frame, slower)."""
    counter = OpCounter(ops_by_origin)
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

    def wrap(name):
        original = originals[name]

        def method(self, *args, **kwargs):
            counter.record_sync(f"Tensor.{name}")
            return original(self, *args, **kwargs)

        return method

    for name in originals:
        setattr(torch.Tensor, name, wrap(name))
    try:
        with counter:
            yield counter
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def cuda_sync_warnings(fn) -> dict:
    """Run ``fn`` under ``set_sync_debug_mode("warn")``; count the synchronizing CUDA calls."""
    origins: collections.Counter[str] = collections.Counter()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        saved = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" in str(message):
                origins[origin()] += 1
            else:
                saved(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
            warnings.showwarning = saved
    torch.cuda.synchronize()
    return {"real_syncs": sum(origins.values()), "by_origin": dict(origins.most_common())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_args(parser)
    parser.add_argument(
        "--ops-by-origin", action="store_true", help="attribute every op to its frame, print ours"
    )
    parser.add_argument("--out", default="bench/results/syncs.json")
    args = parser.parse_args()
    device = torch.device(args.device)

    ours, theirs = build_pair(fpn_channels=args.fpn_channels, image_size=args.image_size)
    ours, theirs = ours.to(device), theirs.to(device)
    images, gt_boxes = shapes_batch(args.batch_size, args.image_size, device)
    image_list = list(images)
    targets = torchvision_targets(gt_boxes)
    models = {"ours": ours, "torchvision": theirs}

    def make_step(name):
        model = models[name]
        # foreach: a few multi-tensor ops per step, CUDA's default; the CPU default loops over
        # the parameters (about 720 ops a step, the same for both models).
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, foreach=True)

        def step(counter: OpCounter | None = None) -> None:
            def phase(name: str) -> None:
                if counter is not None:
                    counter.phase = name

            phase("forward")
            optimizer.zero_grad(set_to_none=True)
            if name == "ours":
                loss = sum(model(images, gt_boxes).values())
            else:
                loss = sum(model(image_list, targets).values())
            phase("backward")
            loss.backward()
            phase("optimizer")
            optimizer.step()

        return step

    def make_inference(name, batch):
        model = models[name]
        inputs = images[:batch] if name == "ours" else image_list[:batch]

        @torch.no_grad()
        def infer() -> None:
            model(inputs)

        return infer

    # Our model once with the NMS its device picks, once with the other one
    # (``common.FIXED_SHAPE_NMS``): eager CPU runs torchvision's per-group NMS,
    # accelerators and torch.compile the fixed-shape one.
    other = (False, "per-group NMS") if device.type != "cpu" else (True, "fixed-shape NMS")
    variants = {"ours": None, f"ours, {other[1]}": other[0], "torchvision": None}

    rows: dict[str, dict] = {}
    for label, fixed_shape_nms in variants.items():
        common.FIXED_SHAPE_NMS = fixed_shape_nms
        name = "torchvision" if label == "torchvision" else "ours"
        models[name].train()
        step = make_step(name)
        step()  # momentum buffers exist from here on: count a steady-state step
        with counting(args.ops_by_origin) as counter:
            step(counter)
        rows[f"{label}: training step"] = counter.summary()
        if device.type == "cuda":
            rows[f"{label}: training step"]["cuda"] = cuda_sync_warnings(step)
    for batch in (1, args.batch_size):
        for label, fixed_shape_nms in variants.items():
            common.FIXED_SHAPE_NMS = fixed_shape_nms
            name = "torchvision" if label == "torchvision" else "ours"
            models[name].eval()
            infer = make_inference(name, batch)
            infer()
            with counting(args.ops_by_origin) as counter:
                infer()
            rows[f"{label}: inference, batch {batch}"] = counter.summary()
    common.FIXED_SHAPE_NMS = None

    print(f"\naten ops and sync-type ops, {args.image_size} px, FPN {args.fpn_channels}, {device}")
    real = " real syncs" if device.type == "cuda" else ""
    print(f"{'':50s} {'aten ops':>9s} {'sync-type':>10s}{real}   ops fwd / bwd / optim")
    for row_name, row in rows.items():
        cuda = f" {row['cuda']['real_syncs']:10d}" if "cuda" in row else ""
        phases = row["aten_ops_by_phase"]
        split = "/".join(str(phases.get(k, 0)) for k in ("forward", "backward", "optimizer"))
        split = split if "training" in row_name else ""
        print(f"{row_name:50s} {row['aten_ops']:9d} {row['sync_ops']:10d}{cuda}   {split}")
    theirs = rows["torchvision: training step"]["aten_ops"]
    ratios = {
        label: rows[f"{label}: training step"]["aten_ops"] / theirs
        for label in variants
        if label != "torchvision"
    }
    for label, ratio in ratios.items():
        print(f"{label} / torchvision, training-step ops: {ratio:.2f}x")
    step_ratio = ratios["ours"]
    for row_name, row in rows.items():
        if row["sync_ops"] and row_name.startswith("ours"):
            print(f"\n{row_name}: syncs by origin")
            for where, count in row["syncs_by_origin"].items():
                print(f"  {count:4d}  {where}")
            print("  by op: " + ", ".join(f"{k} {v}" for k, v in row["syncs_by_op"].items()))
        if "ops_by_origin" in row and row_name.startswith("ours"):
            print(f"\n{row_name}: aten ops by origin")
            for where, count in row["ops_by_origin"].items():
                print(f"  {count:4d}  {where}")
    result = {
        "environment": environment(device),
        "config": vars(args),
        "rows": rows,
        "ours_over_torchvision_step_ops": step_ratio,
        "step_ops_ratios": ratios,
    }
    write_json(args.out, result)


if __name__ == "__main__":
    sys.exit(main())
