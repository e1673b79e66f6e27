"""Checkpoints of ``train_detector``: their format, writing, loading and checking.

Checkpoint format
-----------------
A checkpoint is a dict saved with ``torch.save`` that holds only plain data and tensors, so it
loads with ``torch.load(weights_only=True)`` (:func:`load_checkpoint` does that):

* ``format``: ``"a4_helper.train_detector/1"``.
* ``iteration``: completed iterations; ``max_iters``: the run's planned length.
* ``model``, ``optimizer``, ``scheduler``, ``scaler``: state dicts (``scaler`` is ``None``
  without mixed precision).
* ``loss_history``: the total loss per iteration (list); ``loss_terms``: each term's history;
  ``training_stats``: each training diagnostic's history (``rpn_recall``, ...; may be absent).
* ``rng``: the python, numpy, torch and CUDA RNG states (:func:`rng_state`).
* ``data``: the loader position (``BatchStream.state_dict``).
* ``config``: ``detector.config`` if the model has one, else ``None``; it rebuilds the model
  (``FasterRCNN.from_config``) and names differing settings when weights do not fit.
* ``meta``: ``detector.meta`` if present (e.g. class names and image size), for tools that
  load the checkpoint later.
* ``train_args``: the optimizer and schedule settings the run was started with.

Weights files
-------------
:func:`save_weights` writes what the course's notebook saves as ``rcnn_detector.pt``: the
model's ``state_dict`` itself, so the course's ``model.load_state_dict(torch.load(path))``
loads it, carrying the model's description as an attribute of that dict, ``detector``
(``{"format": WEIGHTS_FORMAT, "config", "meta"}``). An ``OrderedDict``'s attributes survive
``torch.save`` and ``torch.load(weights_only=True)``: it is how ``state_dict`` keeps its own
``_metadata``. :func:`load_checkpoint` reads such a file, or a bare ``state_dict`` of an older
notebook, as a checkpoint with ``model``, ``config`` and ``meta`` (``None`` where unknown).

``meta`` (:func:`detector_meta`) is what tools need besides the network: ``class_names`` (the
classifier's order, background excluded), ``image_size`` (the training short side) and
``test_image_size``, plus what a tool records of its own (``train`` adds ``training``).

Writes are atomic (:func:`eecs598.files.atomic_write`): a process killed at any moment leaves
the previous complete checkpoint or the new one, plus at worst a stale temp file that a
resumed run deletes.
"""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .files import atomic_write
from .utils import first_line

__all__ = [
    "CHECKPOINT_FORMAT",
    "WEIGHTS_FORMAT",
    "check_finite_weights",
    "config_differences",
    "detector_meta",
    "load_checkpoint",
    "load_for_resume",
    "load_model_weights",
    "plain_config",
    "rng_state",
    "save_checkpoint",
    "save_weights",
    "set_rng_state",
]

CHECKPOINT_FORMAT = "a4_helper.train_detector/1"
WEIGHTS_FORMAT = "a4_helper.weights/1"
#: Keys without which a checkpoint cannot be resumed.
_RESUME_KEYS = ("optimizer", "scheduler", "iteration", "max_iters", "rng", "data", "loss_history")


# ----------------------------------------------------------------------------------------------
# Plain data
# ----------------------------------------------------------------------------------------------


def plain_config(config: Any) -> Any:
    """Keep only plain data (numbers, strings, lists, tuples, dicts) so checkpoints load with
    ``torch.load(weights_only=True)``; other values are replaced by their ``repr``."""
    if config is None or isinstance(config, bool | int | float | str):
        return config
    if isinstance(config, list | tuple):
        return type(config)(plain_config(v) for v in config)
    if isinstance(config, Mapping):
        return {str(k): plain_config(v) for k, v in config.items()}
    if isinstance(config, torch.Tensor):
        return config.detach().cpu()
    return repr(config)


def rng_state() -> dict[str, Any]:
    """The python, numpy, torch and (when available) CUDA RNG states, as plain data."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "kind": np_state[0],
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the RNG states that :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["kind"],
            npst["key"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# Writing and loading
# ----------------------------------------------------------------------------------------------


def detector_meta(
    class_names: Sequence[str], image_size: int, test_image_size: int | None = None, **extra: Any
) -> dict[str, Any]:
    """What a checkpoint records besides the network (``detector.meta``; see the module
    docstring): the class names in the classifier's order, the training short side and the
    evaluation one (default: the same), and ``extra`` entries as given."""
    return {
        "class_names": [str(name) for name in class_names],
        "image_size": int(image_size),
        "test_image_size": int(test_image_size or image_size),
        **extra,
    }


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temp file, ``fsync``, ``os.replace``)."""
    with atomic_write(path) as handle:
        torch.save(dict(state), handle)


def save_weights(detector: nn.Module, path: str | os.PathLike) -> None:
    """Write ``detector.state_dict()`` to ``path`` atomically, described by the model's
    ``config`` and ``meta`` (attribute ``detector`` of the dict; see the module docstring).

    ``detector.load_state_dict(torch.load(path))`` loads it as any state_dict;
    :func:`load_checkpoint` (and so ``predict``, ``evaluate``, ``--weights``) also finds the
    configuration and the class names in it.
    """
    state = detector.state_dict()
    state.detector = {
        "format": WEIGHTS_FORMAT,
        "config": plain_config(getattr(detector, "config", None)),
        "meta": plain_config(getattr(detector, "meta", None)),
    }
    with atomic_write(path) as handle:
        torch.save(state, handle)


def load_checkpoint(
    path: str | os.PathLike, detector: nn.Module | None = None, map_location: Any = "cpu"
) -> dict[str, Any]:
    """Load a checkpoint written by ``train_detector``, or a weights file (:func:`save_weights`,
    or any ``state_dict``), with ``weights_only=True``.

    If ``detector`` is given its weights are restored. Returns the whole checkpoint dict (see
    the module docstring for its keys); a weights file gives ``format``, ``model``, ``config``
    and ``meta``, the last two ``None`` for a bare ``state_dict``.

    Raises:
        FileNotFoundError: No file at ``path``.
        ValueError: The file is truncated or not a checkpoint, or (with ``detector``) its
            weights do not fit the model; the latter names the configuration settings that
            differ (e.g. ``backbone.out_channels: checkpoint 16, model 32``).
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"No checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - a damaged pickle fails in many ways (KeyError...)
        raise ValueError(  # one line; the whole message is the exception's cause
            f"Cannot read checkpoint {path} (truncated, corrupt or not a torch checkpoint): "
            f"{first_line(err, 160)}"
        ) from err
    if _is_state_dict(checkpoint):
        described = getattr(checkpoint, "detector", None) or {}
        checkpoint = {
            "format": described.get("format", "state_dict"),
            "model": checkpoint,
            "config": described.get("config"),
            "meta": described.get("meta"),
        }
    if not isinstance(checkpoint, Mapping) or "model" not in checkpoint:
        raise ValueError(f"{path} is not a train_detector checkpoint (no 'model' entry)")
    if detector is not None:
        load_model_weights(detector, checkpoint, path)
    return checkpoint


def _is_state_dict(loaded: Any) -> bool:
    """A non-empty mapping of names to tensors (a weights file), not a checkpoint dict."""
    return (
        isinstance(loaded, Mapping)
        and bool(loaded)
        and all(isinstance(v, torch.Tensor) for v in loaded.values())
    )


def config_differences(
    saved: Any, current: Any, prefix: str = "", names: tuple[str, str] = ("checkpoint", "model")
) -> list[str]:
    """Settings that differ between two nested config dicts, one readable line each.

    Example: ``["  backbone.out_channels: checkpoint 16, model 32"]``; ``names`` labels the two
    sides. Lists and tuples with equal items count as equal.
    """
    if isinstance(saved, Mapping) and isinstance(current, Mapping):
        lines = []
        for key in sorted(set(saved) | set(current), key=str):
            lines += config_differences(saved.get(key), current.get(key), f"{prefix}{key}.", names)
        return lines
    if isinstance(saved, list | tuple) and isinstance(current, list | tuple):
        saved, current = list(saved), list(current)
    if saved != current:
        return [f"  {prefix.rstrip('.')}: {names[0]} {saved!r}, {names[1]} {current!r}"]
    return []


def load_model_weights(
    detector: nn.Module, checkpoint: Mapping[str, Any], path: str | os.PathLike
) -> None:
    """``detector.load_state_dict(checkpoint["model"])``; a mismatch raises a ValueError that
    names the differing configuration settings instead of listing state_dict keys. When neither
    side records a differing setting, it summarises the weights that do not fit instead."""
    try:
        detector.load_state_dict(checkpoint["model"])
    except RuntimeError as err:
        saved = _saved_config(checkpoint, detector)
        current = plain_config(getattr(detector, "config", None))
        lines = config_differences(saved, current) if saved and current else []
        if not lines:
            note = "no recorded setting differs" if saved and current else "no configuration"
            lines = [f"  ({note}; {_weights_mismatch(checkpoint['model'], detector)})"]
        detail = "\n".join(lines)
        raise ValueError(
            f"Checkpoint {path} does not match this model. Settings that differ:\n{detail}"
        ) from err


def _saved_config(checkpoint: Mapping[str, Any], detector: nn.Module) -> Any:
    """The checkpoint's ``config``, completed by the model's ``complete_config`` where it has
    one (settings added after the checkpoint was written, at the values it trained with)."""
    saved = checkpoint.get("config")
    complete = getattr(detector, "complete_config", None)
    return plain_config(complete(saved)) if saved and complete else saved


def _weights_mismatch(saved: Mapping[str, torch.Tensor], detector: nn.Module) -> str:
    """One line: how many weights are missing or unexpected, and the first shape mismatches."""
    current = detector.state_dict()
    missing = [k for k in current if k not in saved]
    unexpected = [k for k in saved if k not in current]
    shapes = [
        f"{k} {tuple(saved[k].shape)} vs {tuple(v.shape)}"
        for k, v in current.items()
        if k in saved and tuple(saved[k].shape) != tuple(v.shape)
    ]
    parts = [f"{len(missing)} weights missing", f"{len(unexpected)} unexpected"]
    if shapes:
        parts.append(f"{len(shapes)} of another shape, e.g. " + "; ".join(shapes[:3]))
    return ", ".join(parts)


def load_for_resume(
    path: Path, detector: nn.Module, train_args: Mapping[str, Any]
) -> dict[str, Any]:
    """Load a checkpoint for ``train_detector(resume=True)`` and restore the model weights.

    Raises a ValueError when the file is not a resumable train_detector checkpoint or its
    weights do not fit (naming the differing settings); warns when model settings outside the
    weights, or training arguments, differ.
    """
    checkpoint = load_checkpoint(path, map_location="cpu")  # RNG states must be CPU tensors
    absent = [key for key in _RESUME_KEYS if key not in checkpoint]
    if absent:
        raise ValueError(
            f"{path} cannot be resumed: it has no {', '.join(absent)} (not written by "
            "train_detector). Load its weights with load_checkpoint(path, detector) and train "
            "without resume, or use another checkpoint_path."
        )
    load_model_weights(detector, checkpoint, path)
    current = plain_config(getattr(detector, "config", None))
    if checkpoint.get("config") is not None and current is not None:
        lines = config_differences(_saved_config(checkpoint, detector), current)
        if lines:
            warnings.warn(
                f"Resuming {path} with a model whose settings differ from the checkpoint's "
                "(the weights fit; the run will not equal an uninterrupted one):\n"
                + "\n".join(lines),
                stacklevel=4,
            )
    saved_args = {k: v for k, v in checkpoint.get("train_args", {}).items() if k != "max_iters"}
    args = {k: v for k, v in train_args.items() if k != "max_iters"}
    lines = config_differences(saved_args, args, names=("checkpoint", "now"))
    if lines:
        warnings.warn(
            f"Resuming {path} with other training arguments; the checkpoint's optimizer and "
            "schedule settings are kept:\n" + "\n".join(lines),
            stacklevel=4,
        )
    return checkpoint


def check_finite_weights(detector: nn.Module, iteration: int) -> None:
    """Raise a FloatingPointError naming the first non-finite weight or buffer before the
    checkpoint of ``iteration`` completed iterations is written. One host-device sync when
    everything is finite."""
    named = [
        (name, t)
        for name, t in (*detector.named_parameters(), *detector.named_buffers())
        if t.is_floating_point()
    ]
    if not named:
        return
    finite = torch.stack([torch.isfinite(t).all() for _, t in named])
    if bool(finite.all()):
        return
    broken = named[int((~finite).nonzero()[0, 0])][0]
    raise FloatingPointError(
        f"{broken} is NaN or infinite after iteration {iteration - 1} (a non-finite "
        "gradient from a finite loss); checkpoint not written, so the one on disk is the "
        "last good state."
    )
