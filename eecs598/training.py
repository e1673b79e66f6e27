"""The training loop and its parts: schedule, resumable batch stream, loss log, one step.

:func:`train_detector` is the orchestration; each piece it uses is named here:
:class:`LRFactor` (warmup + step schedule), :class:`BatchStream` (an endless loader whose
position is saved in checkpoints), :class:`_TrainState` (optimizer, schedule, scaler, stream
and loss history, with their checkpoint state), :class:`LossLog` (loss values read from the
device in batches, checked and printed), :func:`train_step` and :func:`flush_denormal`. The
checkpoint format is documented in :mod:`eecs598.checkpoint`. A ``validation`` hook (such as
:class:`eecs598.validation.PeriodicValidation`) is called every ``validation.period``
iterations with the run's :class:`Progress` and may stop training early.

Distributed training: when ``torch.distributed`` is initialised with more than one process
(e.g. under ``torchrun``), the detector is wrapped in ``DistributedDataParallel`` (gradients
averaged over processes), each process trains on its own batches (give its loader a
``DistributedSampler``; its epoch is set at every pass), the logged losses are averaged over
processes, and only rank 0 prints, plots and writes checkpoints. All processes should be
seeded alike: their RNG states then stay equal, and rank 0's checkpoint resumes all of them.

Host-device syncs: loss values stay on the device and are read (one transfer) every
``sync_period`` iterations, at log lines and before checkpoints, not every iteration. Off the
CPU, each batch's class ids are checked on the host (``detector.check_inputs``) before it is
moved, so ``forward`` need not sync to check them.

CPU subnormals: on CPU, subnormal floats are flushed to zero (``torch.set_flush_denormal``)
while training and the previous setting is restored afterwards, because a freshly initialised
backbone otherwise makes convolutions much slower.

Resuming: data order is reproduced by replaying the loader's shuffling from the recorded RNG
state and skipping the batches already used (they are loaded again, not trained on). Model
settings that differ from the checkpoint's without changing the weights, and training
arguments that differ, only warn: the checkpoint's optimizer and schedule are kept.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from .checkpoint import (
    CHECKPOINT_FORMAT,
    check_finite_weights,
    load_for_resume,
    plain_config,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .files import remove_stale_temp_files
from .images import normalize_uint8

__all__ = [
    "BatchStream",
    "LRFactor",
    "LossHistory",
    "LossLog",
    "Progress",
    "ValidationHook",
    "distributed_world",
    "flush_denormal",
    "flush_denormal_enabled",
    "plot_losses",
    "train_detector",
    "train_step",
]


class LossHistory(list):
    """List of total losses per iteration; ``terms`` maps each loss name to its own history,
    ``stats`` each of the detector's training diagnostics (``rpn_recall``, ...) to its own.

    Its ``repr`` is one short line (count, last and lowest loss, term names), so a notebook cell
    ending in ``train_detector(...)`` does not print thousands of floats; it is still a list
    (``list(history)``, indexing and ``len`` give every value).
    """

    def __init__(
        self, values: Iterable[float] = (), terms: Mapping[str, list] | None = None,
        stats: Mapping[str, list] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(values)
        self.terms: dict[str, list[float]] = {k: list(v) for k, v in (terms or {}).items()}
        self.stats: dict[str, list[float]] = {k: list(v) for k, v in (stats or {}).items()}

    def __repr__(self) -> str:
        count = f"{len(self)} iteration{'' if len(self) == 1 else 's'}"
        if not self:
            return f"LossHistory({count})"
        lowest = min(range(len(self)), key=self.__getitem__)
        terms = f", terms: {', '.join(self.terms)}" if self.terms else ""
        return (
            f"LossHistory({count}, last {self[-1]:.4f}, "
            f"min {self[lowest]:.4f} at iteration {lowest}{terms})"
        )


class LRFactor:
    """Learning-rate multiplier: linear warmup, then x``gamma`` at each milestone.

    A callable object (not a lambda) so that ``LambdaLR.state_dict`` stores it.
    """

    def __init__(
        self, milestones: Sequence[int], gamma: float, warmup_iters: int, warmup_factor: float
    ) -> None:
        self.milestones = list(milestones)
        self.gamma = gamma
        self.warmup_iters = warmup_iters
        self.warmup_factor = warmup_factor

    def __call__(self, iteration: int) -> float:
        factor = self.gamma ** sum(iteration >= m for m in self.milestones)
        if iteration < self.warmup_iters:
            alpha = iteration / self.warmup_iters
            factor *= self.warmup_factor * (1 - alpha) + alpha
        return factor


class BatchStream:
    """Endless iterator over a loader whose position can be saved and restored.

    At the start of each pass over the loader the global torch RNG state (and the state of any
    ``torch.Generator`` owned by the loader or its sampler) is recorded, because the shuffling
    order and worker seeds of that pass are drawn from it. Restoring means: put those states
    back, start a new pass and skip the batches already consumed. Skipped batches are loaded
    and discarded, which costs some data-loading time on resume.
    """

    def __init__(self, loader: Iterable) -> None:
        self.loader = loader
        self.epoch = 0
        self.consumed = 0
        self._iterator: Iterator | None = None
        self._epoch_state: dict[str, Any] | None = None

    def _generators(self) -> list[torch.Generator]:
        found: list[torch.Generator] = []
        candidates = [
            getattr(self.loader, "generator", None),
            getattr(getattr(self.loader, "sampler", None), "generator", None),
            getattr(
                getattr(getattr(self.loader, "batch_sampler", None), "sampler", None),
                "generator",
                None,
            ),
        ]
        for gen in candidates:
            if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
                found.append(gen)
        return found

    def _set_sampler_epoch(self) -> None:
        """A ``DistributedSampler`` reshuffles per epoch only when told the epoch (also when
        a batch sampler such as ``AspectRatioBatchSampler`` wraps it)."""
        for name in ("sampler", "batch_sampler"):
            sampler = getattr(self.loader, name, None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(self.epoch)

    def _start_pass(self) -> None:
        self._set_sampler_epoch()
        self._epoch_state = {
            "torch": torch.get_rng_state(),
            "generators": [g.get_state() for g in self._generators()],
        }
        self._iterator = iter(self.loader)
        self.consumed = 0

    def next(self) -> Any:
        if self._iterator is None:
            self._start_pass()
        try:
            batch = next(self._iterator)
        except StopIteration:
            self.epoch += 1
            self._start_pass()
            try:
                batch = next(self._iterator)
            except StopIteration:
                raise ValueError("train_loader yields no batches") from None
        self.consumed += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": self.consumed, "epoch_state": self._epoch_state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Fast-forward to the saved position. Changes the global torch RNG state."""
        if state.get("epoch_state") is None:
            return
        torch.set_rng_state(state["epoch_state"]["torch"])
        generators = self._generators()
        saved = state["epoch_state"]["generators"]
        if len(saved) != len(generators):
            warnings.warn(
                "Loader generators differ from the checkpoint; data order may differ.", stacklevel=2
            )
        for gen, gen_state in zip(generators, saved, strict=False):
            gen.set_state(gen_state)
        self._epoch_state = state["epoch_state"]
        self.epoch = int(state["epoch"])
        self._set_sampler_epoch()
        self._iterator = iter(self.loader)
        for _ in range(int(state["consumed"])):
            next(self._iterator)
        self.consumed = int(state["consumed"])


# ----------------------------------------------------------------------------------------------
# Run-time settings
# ----------------------------------------------------------------------------------------------


def flush_denormal_enabled() -> bool:
    """Whether CPU float math currently flushes subnormals to zero (torch has no getter)."""
    return (torch.tensor([1e-30], dtype=torch.float32) * 1e-10).item() == 0.0


@contextlib.contextmanager
def flush_denormal(enabled: bool = True) -> Iterator[None]:
    """Flush subnormal floats to zero inside the block (when ``enabled``), then restore the
    previous setting, whatever happens. A random-init trunk makes subnormal floats early in
    training, which slow CPU convolutions down greatly."""
    was_on = flush_denormal_enabled()
    if enabled:
        torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(was_on)


def distributed_world() -> tuple[int, int]:
    """``(world_size, rank)`` of the initialised process group, ``(1, 0)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def _interactive_backend() -> bool:
    import matplotlib

    backend = matplotlib.get_backend().lower()
    return backend not in {"agg", "pdf", "ps", "svg", "cairo", "template", "pgf"}


def plot_losses(history: Sequence[float], plot_path: str | Path | None, show: bool) -> None:
    """Plot the total loss per iteration; save it to ``plot_path`` and/or show it."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(np.arange(len(history)), np.asarray(history, dtype=np.float64), linewidth=1)
    ax.set_xlabel("Iteration")
    ax.set_ylabel("Total loss")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    if plot_path is not None:
        fig.savefig(plot_path, bbox_inches="tight")
    if show and _interactive_backend():
        plt.show()
    else:
        plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Loss log
# ----------------------------------------------------------------------------------------------


# Steps the not-learning checks average over, and the checks: diagnostic, threshold, message.
DIAGNOSTIC_WINDOW = 20
NOT_LEARNING = (
    ("rpn_recall", 0.5,
     "the RPN's proposals overlap only {:.0%} of the training boxes at IoU 0.5: they miss most "
     "objects, and the second stage cannot recover them. Try a larger image size, anchors "
     "fitted to the boxes (anchor_scale 'auto'), the stride-4 level for small objects "
     "(fpn_levels p2 p3 p4 p5), or more iterations."),
    ("fg_share", 0.05,
     "only {:.1%} of the RoIs the second stage samples are objects: it learns almost nothing "
     "but background. Fix the proposals first (rpn_recall in the log), or keep more of them "
     "(post_nms_topk)."),
)  # fmt: skip


@dataclass
class LossLog:
    """Loss values kept on the device and read in batches: one host-device sync per read.

    :meth:`add` queues a step's ``(1 + T,)`` tensor ``[total, term_1, ..., term_T]``;
    :meth:`due` says when to read; :meth:`read` moves every queued step to ``history``, raises
    on a non-finite total, prints the log lines that are due and updates the progress bar.
    """

    history: LossHistory
    max_iters: int
    log_period: int
    sync_period: int
    bar: Any
    verbose: bool
    names: list[str] = field(default_factory=list)
    pending: list[tuple[int, torch.Tensor, float]] = field(default_factory=list)
    warned: set[str] = field(default_factory=set)

    def add(self, iteration: int, values: torch.Tensor, names: list[str], lr: float) -> None:
        self.names = names
        self.pending.append((iteration, values, lr))

    def due(self, iteration: int) -> bool:
        """Whether to read after ``iteration``: a log line is due, ``sync_period`` steps are
        queued, or it is the last iteration."""
        logging_due = self.log_period and iteration % self.log_period == 0
        last = iteration == self.max_iters - 1
        return bool(logging_due or len(self.pending) >= self.sync_period or last)

    def read(self) -> None:
        """Move the pending loss values to ``history`` (one sync); stop on a non-finite one."""
        if not self.pending:
            return
        values = torch.stack([v for _, v, _ in self.pending]).tolist()
        for (iteration, _, lr), row in zip(self.pending, values, strict=True):
            total_value, terms = row[0], dict(zip(self.names, row[1:], strict=True))
            if not math.isfinite(total_value):
                raise self._non_finite(iteration, total_value, terms)
            self.history.append(total_value)
            for k, v in terms.items():
                if k.startswith("stat_"):
                    self.history.stats.setdefault(k.removeprefix("stat_"), []).append(v)
                else:
                    self.history.terms.setdefault(k, []).append(v)
            self._print(iteration, total_value, terms, lr)
        self.bar.set_postfix(loss=f"{self.history[-1]:.3f}", lr=f"{self.pending[-1][2]:.2e}")
        self.pending.clear()

    def _print(self, iteration: int, total: float, terms: dict[str, float], lr: float) -> None:
        last = iteration == self.max_iters - 1
        if self.verbose and self.log_period and (iteration % self.log_period == 0 or last):
            from tqdm.auto import tqdm

            parts = "".join(f"[{k.removeprefix('stat_')}: {v:.3f}]" for k, v in terms.items())
            tqdm.write(f"[Iter {iteration}][loss: {total:.3f}]{parts}[lr: {lr:.2e}]")
            self._warn_if_not_learning(iteration)

    def _warn_if_not_learning(self, iteration: int) -> None:
        """Once training is a quarter through, warn (once each) when a diagnostic, averaged
        over the last ``DIAGNOSTIC_WINDOW`` steps, says the detector is not learning."""
        if iteration < max(self.max_iters // 4, DIAGNOSTIC_WINDOW):
            return
        for name, threshold, message in NOT_LEARNING:
            recent = self.history.stats.get(name, [])[-DIAGNOSTIC_WINDOW:]
            if name in self.warned or not recent or np.mean(recent) >= threshold:
                continue
            self.warned.add(name)
            value = float(np.mean(recent))
            warnings.warn(f"Iteration {iteration}: " + message.format(value), stacklevel=2)

    def _non_finite(self, iteration: int, total: float, terms: dict) -> FloatingPointError:
        detail = ", ".join(f"{k}={v:.6g}" for k, v in terms.items())
        hint = (
            " Earlier losses were finite, so the weights probably diverged: lower the "
            "learning rate, set grad_clip, or use larger batches or images."
            if self.history
            else ""
        )
        return FloatingPointError(
            f"Non-finite loss at iteration {iteration}: total={total}, {detail}. "
            "Training stopped; the last checkpoint (if any) is the last good state." + hint
        )


# ----------------------------------------------------------------------------------------------
# Training state and one step
# ----------------------------------------------------------------------------------------------


@dataclass
class _TrainState:
    """Everything a checkpoint restores besides the weights, and what it was started with."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    stream: BatchStream
    train_args: dict[str, Any]
    use_amp: bool
    history: LossHistory = field(default_factory=LossHistory)
    start_iter: int = 0

    @classmethod
    def create(
        cls, params: list[nn.Parameter], loader: Iterable, use_amp: bool, **train_args: Any
    ) -> _TrainState:
        """SGD over ``params`` with the warmup + step schedule of ``train_args``."""
        a = train_args
        optimizer = torch.optim.SGD(
            params, lr=a["learning_rate"], momentum=a["momentum"], weight_decay=a["weight_decay"]
        )
        factor = LRFactor(a["lr_milestones"], a["lr_gamma"], a["warmup_iters"], a["warmup_factor"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
        return cls(optimizer, scheduler, scaler, BatchStream(loader), train_args, use_amp)

    def resume(self, path: Path, detector: nn.Module) -> None:
        """Restore weights, optimizer, schedule, history, loader position and RNG states from
        ``path`` if it exists (after deleting temp files a killed write left)."""
        remove_stale_temp_files(path, report=True)
        if not path.is_file():
            print(f"No checkpoint at {path}; starting from scratch.")
            return
        ckpt = load_for_resume(path, detector, self.train_args)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        max_iters = self.train_args["max_iters"]
        if ckpt["max_iters"] != max_iters:
            warnings.warn(
                f"Resuming a run planned for {ckpt['max_iters']} iterations with "
                f"max_iters={max_iters}; the schedule of the checkpoint is kept.",
                stacklevel=3,
            )
        self.history = LossHistory(
            ckpt["loss_history"], ckpt.get("loss_terms"), ckpt.get("training_stats")
        )
        self.start_iter = int(ckpt["iteration"])
        self.stream.load_state_dict(ckpt["data"])
        set_rng_state(ckpt["rng"])
        print(f"Resumed from {path} at iteration {self.start_iter}.")

    def checkpoint(self, detector: nn.Module, iteration: int) -> dict[str, Any]:
        """The checkpoint after ``iteration`` completed iterations (format: ``checkpoint``)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "iteration": iteration,
            "max_iters": self.train_args["max_iters"],
            "model": detector.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.use_amp else None,
            "loss_history": list(self.history),
            "loss_terms": {k: list(v) for k, v in self.history.terms.items()},
            "training_stats": {k: list(v) for k, v in self.history.stats.items()},
            "rng": rng_state(),
            "data": self.stream.state_dict(),
            "config": plain_config(getattr(detector, "config", None)),
            "meta": plain_config(getattr(detector, "meta", None)),
            "train_args": self.train_args,
        }


def _loss_terms(outputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    terms = {k: v for k, v in outputs.items() if "loss" in k}
    if not terms:
        raise ValueError(f"detector returned no loss terms (keys: {list(outputs)})")
    return terms


def _diagnostics(model: nn.Module) -> dict[str, torch.Tensor]:
    """The detector's ``training_stats`` of the step just run (``FasterRCNN`` keeps
    ``two_stage_detector.training_diagnostics`` there; other detectors have none), looked up
    through a ``DistributedDataParallel`` or ``torch.compile`` wrapper. Logged beside the
    losses, never added to them."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return dict(getattr(model, "training_stats", None) or {})


def train_step(
    model: nn.Module,
    batch: Sequence[Any],
    state: _TrainState,
    device: torch.device,
    grad_clip: float | None = None,
    world: int = 1,
) -> tuple[torch.Tensor, list[str]]:
    """One SGD step on ``batch = (paths, images (B, 3, H, W), gt_boxes (B, M, 5))``, or on
    ``(paths, images, gt_boxes, image_sizes (B, 2))`` from a padded batch
    (``eecs598.augment.PadCollate``): ``image_sizes`` is then passed to the model.

    uint8 images (``CachedDetection(normalize=False)``) are normalised on ``device``. Returns
    the ``(1 + T,)`` values ``[total, term_1, ...]``: the loss terms, then the detector's
    ``training_stats`` (detached, still on the device; averaged over processes when
    ``world > 1``) and their names.
    """
    _, images, gt_boxes, *sizes = batch
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        images = normalize_uint8(images)
    gt_boxes = gt_boxes.to(device, non_blocking=True)
    extra = {"image_sizes": sizes[0].to(device, non_blocking=True)} if sizes else {}
    with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=state.use_amp):
        terms = _loss_terms(model(images, gt_boxes, **extra))
    stats = _diagnostics(model)
    total = sum(v.float() for v in terms.values())
    logged = [*terms.values(), *stats.values()]
    values = torch.stack(
        [total.detach().reshape(())] + [v.detach().float().reshape(()) for v in logged]
    )
    if world > 1:
        torch.distributed.all_reduce(values)
        values /= world
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(total).backward()
    if grad_clip is not None:
        state.scaler.unscale_(state.optimizer)
        params = [p for group in state.optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    return values, [*terms, *stats]


@dataclass(frozen=True)
class Progress:
    """What a validation hook sees after ``iteration`` completed iterations.

    ``history`` holds every loss read so far (all of them: the log is read before a hook is
    called); ``lr`` is the learning rate the next step will use; ``seconds`` the wall time since the
    loop started (hooks included); ``checkpoint()`` builds the checkpoint of this moment (the
    one ``checkpoint_path`` would get), e.g. to keep the best model.
    """

    iteration: int
    max_iters: int
    detector: nn.Module
    history: LossHistory
    lr: float
    seconds: float
    checkpoint: Callable[[], dict[str, Any]]


class ValidationHook(Protocol):
    """Called on rank 0 every ``period`` iterations and after the last; ``begin(start_iter)``
    once before the loop (``start_iter > 0`` when resuming). Returns True to stop training.
    It may change its ``period``; in a distributed run the other ranks' hooks get rank 0's."""

    period: int

    def begin(self, start_iter: int) -> None: ...

    def __call__(self, progress: Progress) -> bool: ...


def _due(done: int, period: int, max_iters: int) -> bool:
    """Whether a periodic event is due after ``done`` completed iterations (always at the end)."""
    return done % max(1, period) == 0 or done == max_iters


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def train_detector(
    detector: nn.Module, train_loader: Iterable, learning_rate: float = 5e-3,
    weight_decay: float = 1e-4, max_iters: int = 5000, log_period: int = 20,
    device: str | torch.device = "cpu", *, momentum: float = 0.9,
    lr_milestones: Sequence[float] = (0.6, 0.9), lr_gamma: float = 0.1, warmup_iters: int = 100,
    warmup_factor: float = 0.001, amp: bool = False, grad_clip: float | None = None,
    checkpoint_path: str | Path | None = None, checkpoint_period: int = 500,
    resume: bool = False, show_plot: bool = True, plot_path: str | Path | None = None,
    progress: bool = True, sync_period: int = 20, validation: ValidationHook | None = None,
) -> LossHistory:  # fmt: skip
    """Train ``detector`` on ``device`` with SGD for ``max_iters`` iterations.

    Each batch of ``train_loader`` (cycled until ``max_iters``) is ``(image_paths,
    images (B, 3, H, W), gt_boxes (B, N, 5))``, plus ``image_sizes (B, 2)`` when padded
    (``eecs598.augment.PadCollate``). In training mode ``detector(images, gt_boxes)`` (with
    ``image_sizes=`` when padded) returns a dict; its entries whose key contains ``"loss"`` are
    scalar losses, summed. SGD (``momentum``, ``weight_decay``) updates the parameters with
    ``requires_grad``; the learning rate warms up linearly from ``warmup_factor *
    learning_rate`` over ``warmup_iters`` and is multiplied by ``lr_gamma`` at each fraction of
    ``max_iters`` in ``lr_milestones``. ``amp``: float16 autocast + ``GradScaler``, CUDA only
    (ignored with a note elsewhere); ``grad_clip``: clip the global gradient norm. Distributed
    runs, host-device syncs and CPU subnormals: see the module docstring.

    A log line every ``log_period`` iterations, a tqdm bar (``progress``); losses are read from
    the device at least every ``sync_period`` iterations; the history is plotted at the end
    (``show_plot``, on interactive backends) and/or saved to ``plot_path``. Checkpoints
    (:mod:`eecs598.checkpoint`) go atomically to ``checkpoint_path`` every ``checkpoint_period``
    iterations and after the last. ``resume=True`` continues from it if it exists (weights,
    optimizer, schedule, history, RNG states, loader position; temp files of a killed write are
    deleted first), so on CPU the losses equal an uninterrupted run's. ``validation``: a
    :class:`ValidationHook` called every ``validation.period`` iterations and after the last
    (on rank 0; its stop decision is shared with every rank); when it returns True, the
    checkpoint is written and training ends there.

    Returns:
        :class:`LossHistory`: total loss per iteration (restored ones included when resuming),
        ``.terms`` holding each loss term's history.

    Raises:
        FloatingPointError: a non-finite loss (naming the iteration and terms), or weight (at a
            checkpoint); both are checked before it is written, so the last one stays good.
        ValueError: ``resume`` without ``checkpoint_path``, or its file is not a resumable
            checkpoint or its weights do not fit ``detector`` (other differences only warn).
    """
    device = torch.device(device)
    state = _start(detector, train_loader, device, amp, dict(
        learning_rate=learning_rate, weight_decay=weight_decay, momentum=momentum,
        max_iters=max_iters, lr_milestones=[int(f * max_iters) for f in lr_milestones],
        lr_gamma=lr_gamma, warmup_iters=warmup_iters, warmup_factor=warmup_factor,
    ))  # fmt: skip
    checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
    if resume:
        if checkpoint_path is None:
            raise ValueError("resume=True needs checkpoint_path")
        state.resume(checkpoint_path, detector)  # called here: its warnings name our caller
    run = _Run.create(detector, device, grad_clip, checkpoint_path, checkpoint_period, validation)
    log = _loss_log(state, log_period, sync_period, progress and run.main, run.main)
    if validation is not None and run.main:
        validation.begin(state.start_iter)
    start_time = time.time()
    _train_loop(run, state, log, start_time)
    if run.main:
        _report_end(state, start_time, progress, show_plot, plot_path)
    return state.history


def _start(
    detector: nn.Module,
    loader: Iterable,
    device: torch.device,
    amp: bool,
    train_args: dict[str, Any],
) -> _TrainState:
    """Put ``detector`` on ``device`` in training mode and set up SGD over its parameters with
    ``requires_grad``, with the schedule, scaler and batch stream of ``train_args``
    (:meth:`_TrainState.create`; checkpoints record ``train_args`` too)."""
    use_amp = _use_amp(amp, device)
    detector.to(device)
    detector.train()
    params = [p for p in detector.parameters() if p.requires_grad]
    return _TrainState.create(params, loader, use_amp, **train_args)


@dataclass
class _Run:
    """What every iteration of one :func:`train_detector` call uses besides the train state.

    ``model`` is ``detector``, or its ``DistributedDataParallel`` wrapper in a process group of
    ``world > 1`` processes; only the ``main`` process (rank 0) prints and writes checkpoints.
    ``host_check`` is ``detector.check_inputs`` off the CPU (``None`` on it): batches' class
    ids are checked on the host, so ``forward`` skips that check and its device sync.
    """

    detector: nn.Module
    model: nn.Module
    device: torch.device
    grad_clip: float | None
    world: int
    main: bool
    host_check: Callable[..., Any] | None
    checkpoint_path: Path | None
    checkpoint_period: int
    validation: ValidationHook | None = None

    @classmethod
    def create(
        cls, detector: nn.Module, device: torch.device, grad_clip: float | None,
        checkpoint_path: Path | None, checkpoint_period: int,
        validation: ValidationHook | None = None,
    ) -> _Run:  # fmt: skip
        world, rank = distributed_world()
        model = _parallel(detector, device) if world > 1 else detector
        host_check = getattr(detector, "check_inputs", None) if device.type != "cpu" else None
        return cls(
            detector, model, device, grad_clip, world, rank == 0, host_check,
            checkpoint_path, checkpoint_period, validation,
        )  # fmt: skip


def _loss_log(
    state: _TrainState, log_period: int, sync_period: int, show_bar: bool, verbose: bool
) -> LossLog:
    """The :class:`LossLog` of a run, filling ``state.history``, with its tqdm bar (from
    ``state.start_iter`` to ``max_iters``; hidden unless ``show_bar``)."""
    from tqdm.auto import tqdm

    max_iters = state.train_args["max_iters"]
    bar = tqdm(
        total=max_iters, initial=state.start_iter, disable=not show_bar,
        desc="train", dynamic_ncols=True,
    )  # fmt: skip
    return LossLog(state.history, max_iters, log_period, sync_period, bar, verbose=verbose)


def _train_loop(run: _Run, state: _TrainState, log: LossLog, start_time: float) -> None:
    """Iterations ``state.start_iter`` to ``max_iters - 1``: the next batch, :func:`train_step`,
    its ``(1 + T,)`` loss values queued on the device, the schedule stepped; then
    :func:`_after_step`, which may end training early. CPU subnormals are flushed meanwhile;
    the bar is closed at the end."""
    with flush_denormal(run.device.type == "cpu"), contextlib.closing(log.bar):
        for iteration in range(state.start_iter, state.train_args["max_iters"]):
            batch = state.stream.next()
            if run.host_check is not None:
                run.host_check(gt_boxes=batch[2])  # still on the host: no device sync
            values, names = train_step(
                run.model, batch, state, run.device, run.grad_clip, run.world
            )
            log.add(iteration, values, names, state.optimizer.param_groups[0]["lr"])
            state.scheduler.step()
            log.bar.update(1)
            if _after_step(run, state, log, iteration + 1, start_time):
                break


def _after_step(run: _Run, state: _TrainState, log: LossLog, done: int, start_time: float) -> bool:
    """After ``done`` iterations: read the queued losses when a log line, ``sync_period``, a
    validation or a checkpoint is due (a non-finite loss raises before anything is written);
    run the validation hook when due; at a checkpoint (also when the hook stops training),
    check the weights are finite on every rank (DDP keeps them equal, so all stop together),
    then rank 0 writes it. Returns whether to stop."""
    max_iters = state.train_args["max_iters"]
    hook = run.validation
    validation_due = hook is not None and hook.period > 0 and _due(done, hook.period, max_iters)
    checkpoint_due = bool(run.checkpoint_path) and _due(done, run.checkpoint_period, max_iters)
    if checkpoint_due or validation_due or log.due(done - 1):
        log.read()
    stop = validation_due and _validate(run, state, done, start_time)
    checkpoint_due = bool(run.checkpoint_path) and (checkpoint_due or stop)
    if checkpoint_due:
        check_finite_weights(run.detector, done)
    if checkpoint_due and run.main:
        save_checkpoint(run.checkpoint_path, state.checkpoint(run.detector, done))
    return stop


def _validate(run: _Run, state: _TrainState, done: int, start_time: float) -> bool:
    """Call the validation hook on rank 0; the others wait for its answer (whether to stop)
    and take its period, which the hook may have changed. Returns whether to stop."""
    stop, hook = False, run.validation
    if run.main and hook is not None:
        stop = bool(hook(Progress(
            iteration=done, max_iters=state.train_args["max_iters"], detector=run.detector,
            history=state.history, lr=state.optimizer.param_groups[0]["lr"],
            seconds=time.time() - start_time,
            checkpoint=lambda: state.checkpoint(run.detector, done),
        )))  # fmt: skip
    if run.world > 1 and hook is not None:  # every rank must agree on when the next one is
        answer = torch.tensor([float(stop), float(hook.period)], device=run.device)
        torch.distributed.broadcast(answer, src=0)
        stop, hook.period = bool(answer[0].item()), int(answer[1].item())
    return stop


def _report_end(
    state: _TrainState, start_time: float, progress: bool, show_plot: bool,
    plot_path: str | Path | None,
) -> None:  # fmt: skip
    """On rank 0 after the loop: the iterations trained and their time (with ``progress``, if
    any were), then the loss plot (shown with ``show_plot``, saved to ``plot_path``)."""
    trained = len(state.history) - state.start_iter  # fewer than asked when stopped early
    if progress and trained > 0:
        elapsed = time.time() - start_time
        print(f"Trained {trained} iterations in {elapsed:.1f} s.")
    if show_plot or plot_path is not None:
        plot_losses(state.history, plot_path, show_plot)


def _use_amp(amp: bool, device: torch.device) -> bool:
    """Mixed precision is CUDA-only: elsewhere ``amp=True`` is ignored with a note."""
    if amp and device.type != "cuda":
        print(f"Note: amp=True is ignored on device '{device}' (mixed precision is CUDA-only).")
    return bool(amp) and device.type == "cuda"


def _parallel(detector: nn.Module, device: torch.device) -> nn.Module:
    """``detector`` wrapped in ``DistributedDataParallel`` for the current process group."""
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(detector, device_ids=device_ids)
