"""A small stand-in detector, its training run, and a child-process entry point whose second
checkpoint write hangs halfway, so that a test can kill it there with SIGKILL.

    python tests/reliability_child.py tiny CHECKPOINT MARKER
    python tests/reliability_child.py cli MARKER ARGS...      (ARGS for detector_cli.main)

In both modes the second ``torch.save`` writes the first half of the checkpoint's bytes into
the temp file, flushes them to disk, writes the total size into MARKER and sleeps.
"""

from __future__ import annotations

import io
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

NUM_CLASSES = 5
TRAIN_KWARGS: dict[str, Any] = {
    "learning_rate": 0.05,
    "max_iters": 8,
    "warmup_iters": 3,
    "checkpoint_period": 2,
    "show_plot": False,
    "progress": False,
    "log_period": 0,
}


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class SmallNet(nn.Module):
    """Stand-in with FasterRCNN's calling convention and a ``config``.

    Training returns ``loss_box`` and ``loss_cls`` (from the first GT row of each image) and a
    non-loss entry. Dropout and a random channel permutation consume the torch RNG the way the
    real model's sampling does. ``bad_grad_at``: on that forward call (1-based) the loss stays
    finite but its gradient is NaN (``0 * sqrt(x)`` at ``x = 0``).
    """

    def __init__(
        self, num_classes: int = NUM_CLASSES, dropout: float = 0.1, bad_grad_at: int | None = None
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2), nn.ReLU(), nn.Dropout(dropout))
        self.head = nn.Linear(6, 4 + num_classes)
        self.bad_grad_at = bad_grad_at
        self.calls = 0
        self.config = {"num_classes": num_classes, "dropout": dropout}

    def forward(self, images: torch.Tensor, gt_boxes: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls += 1
        feats = self.features(images)
        feats = feats[:, torch.randperm(feats.shape[1])].mean(dim=(2, 3))
        out = self.head(feats)
        h, w = images.shape[-2:]
        first = gt_boxes[:, 0]
        scale = torch.tensor([w, h, w, h], dtype=out.dtype)
        loss_box = nn.functional.smooth_l1_loss(out[:, :4].sigmoid(), first[:, :4] / scale)
        loss_cls = nn.functional.cross_entropy(out[:, 4:], first[:, 4].long())
        if self.calls == self.bad_grad_at:
            zero = (self.head.weight - self.head.weight.detach()).sum()
            loss_cls = loss_cls + 0.0 * torch.sqrt(zero)
        return {"loss_box": loss_box, "loss_cls": loss_cls, "aux": out.detach()}


class SyntheticBoxes(torch.utils.data.Dataset):
    """12 fixed noise images (3, 16, 16) with one box each, items like the VOC reader's."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1234)
        self.images = torch.randn(12, 3, 16, 16, generator=g)
        xy = torch.randint(0, 8, (12, 2), generator=g).float()
        classes = torch.arange(12) % NUM_CLASSES
        self.gt = torch.full((12, 2, 5), -1.0)
        self.gt[:, 0] = torch.cat([xy, xy + 6, classes[:, None].float()], dim=1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor, torch.Tensor]:
        return f"img{index}", self.images[index], self.gt[index]


def make_loader() -> torch.utils.data.DataLoader:
    """Shuffled with the global RNG, so resuming must replay the data order."""
    return torch.utils.data.DataLoader(SyntheticBoxes(), batch_size=3, shuffle=True)


def train_small(
    checkpoint_path: str | os.PathLike | None,
    seed: int = 0,
    resume: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    **train_kwargs: Any,
) -> tuple[SmallNet, list[float]]:
    """Seed everything, build :class:`SmallNet` and train it with ``a4_helper.train_detector``."""
    from a4_helper import train_detector

    seed_all(seed)
    model = SmallNet(**(model_kwargs or {}))
    history = train_detector(
        model, make_loader(), checkpoint_path=checkpoint_path, resume=resume,
        **{**TRAIN_KWARGS, **train_kwargs},
    )  # fmt: skip
    return model, history


def hang_in_second_save(marker: Path) -> None:
    """Make the second ``torch.save`` of a training checkpoint write half its bytes, flush,
    signal ``marker``, sleep. (best.pt is saved normally; which file a save goes to is read
    from the name of the temp file ``atomic_write`` opened last.)"""
    real_save, real_mkstemp = torch.save, tempfile.mkstemp
    calls, target = [0], [""]

    def mkstemp(*args: Any, **kwargs: Any) -> tuple[int, str]:
        target[0] = kwargs.get("prefix", "")
        return real_mkstemp(*args, **kwargs)

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        best = target[0].startswith(".best.pt.")
        calls[0] += not best
        if calls[0] < 2 or best:
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        marker.write_text(str(len(data)))
        time.sleep(300)
        raise SystemExit("expected to be killed while writing")

    torch.save = save
    tempfile.mkstemp = mkstemp


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    mode = argv[0]
    if mode == "tiny":
        hang_in_second_save(Path(argv[2]))
        train_small(argv[1])
        return 0
    if mode == "cli":
        import detector_cli

        hang_in_second_save(Path(argv[1]))
        return detector_cli.main(argv[2:])
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
