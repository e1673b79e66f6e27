"""eecs598.validation and eecs598.inference.score_detector: validation while training.

The detector here is a fake that finds coloured rectangles by thresholding: its detections
depend only on each image's true pixels, so scoring in padded batches must give exactly what
the notebook's one-image-at-a-time ``inference_with_detector`` gives.
"""

from __future__ import annotations

import csv
import dataclasses
import json

import pytest
import torch
from PIL import Image
from support import TinyDetector
from torch import nn

import recipe
from common import DetectorBackboneWithFPN
from eecs598.checkpoint import load_checkpoint
from eecs598.coco import COCODetection
from eecs598.inference import inference_with_detector, score_detector
from eecs598.training import LossHistory, Progress, train_detector
from eecs598.validation import PeriodicValidation
from two_stage_detector import RPN, FasterRCNN

# Class names in the readers' order (sorted), each with its colour and the channel it is bright in.
COLOURS = {"green": ((20, 230, 20), 1), "red": ((230, 20, 20), 0)}


def write_rectangles(root, count: int = 7):
    """A COCO dataset of ``count`` grey images of several sizes, each with a red and a green
    rectangle (the ground truth)."""
    images, annotations = [], []
    for i in range(count):
        width, height = 96 + 16 * (i % 3), 80 + 24 * (i % 2)
        image = Image.new("RGB", (width, height), (128, 128, 128))
        for c, (colour, _) in enumerate(COLOURS.values()):
            x, y, w, h = 8 + 40 * c, 10 + 3 * i, 24 + 2 * i, 20 + c * 6
            image.paste(colour, (x, y, x + w, y + h))
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": c + 1,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})  # fmt: skip
        image.save(root / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": width, "height": height})
    categories = [{"id": c + 1, "name": n} for c, n in enumerate(COLOURS)]
    path = root / "data.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": categories}))  # fmt: skip
    return path


class RectangleFinder(nn.Module):
    """Per image (its true ``(h, w)`` part when ``image_sizes`` is given) and class: the
    bounding box of the pixels bright in the class's channel and dark in the others, scored by
    ``quality``, plus a false positive in the top-left corner, scored high in the images over
    100 px wide (so the score depends on the true width)."""

    def __init__(self, quality: float = 0.9, shift: float = 0.0):
        super().__init__()
        self.quality, self.shift = quality, shift
        self.weight = nn.Parameter(torch.zeros(1))

    def detect(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        boxes, classes, scores = [], [], []
        for c, (_, channel) in enumerate(COLOURS.values()):
            others = torch.cat([image[:channel], image[channel + 1 : 3]])
            bright = (image[channel] > 1.0) & (others < 0.0).all(0)
            ys, xs = torch.nonzero(bright, as_tuple=True)
            if len(xs):
                box = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
                boxes += [box + self.shift, torch.tensor([0.0, 0.0, 6.0, 6.0])]
                classes += [c, c]
                scores += [self.quality, 0.95 if image.shape[-1] > 100 else 0.1]
        return torch.stack(boxes), torch.tensor(classes), torch.tensor(scores)

    def forward(self, images, gt_boxes=None, test_score_thresh=None, test_nms_thresh=None,
                image_sizes=None):  # fmt: skip
        sizes = (
            image_sizes.tolist() if image_sizes is not None else [images.shape[-2:]] * len(images)
        )
        out = [self.detect(im[:, :h, :w]) for im, (h, w) in zip(images, sizes, strict=True)]
        return out[0] if len(out) == 1 else out


@pytest.fixture
def rectangles(tmp_path):
    path = write_rectangles(tmp_path)
    return COCODetection(path, image_size=72)


def test_score_detector_in_padded_batches_equals_one_image_at_a_time(rectangles, tmp_path, capsys):
    names = dict(enumerate(COLOURS))
    detector = RectangleFinder(shift=1.5)
    reference = inference_with_detector(
        detector, recipe.eval_loader(rectangles, 0), names, 0.05, 0.5,
        output_dir=str(tmp_path / "ref"), progress=False,
    )  # fmt: skip
    loader = recipe.val_loader(rectangles, batch_size=3, workers=0)
    assert [len(b) for b in loader.batch_sampler] == [3, 3, 1]  # padded batches, a last one
    files, _ = sorted(tmp_path.rglob("*")), capsys.readouterr()
    batched = score_detector(detector, loader, names, 0.05, 0.5)
    assert sorted(tmp_path.rglob("*")) == files and capsys.readouterr().out == ""  # quiet
    assert 0.5 < reference.map < 1.0  # the false positives and the shift cost something
    assert batched.map == pytest.approx(reference.map, abs=1e-12)
    assert batched.ap == pytest.approx(reference.ap, abs=1e-12)
    assert batched.coco.stats == pytest.approx(reference.coco.stats, abs=1e-12)
    detector.train()
    score_detector(detector, loader, names, 0.05, 0.5)
    assert detector.training  # its mode is given back


def fake_progress(detector, iteration: int, losses: list[float], checkpoint_id: int) -> Progress:
    history = LossHistory(losses, terms={"loss_a": [v / 2 for v in losses]},
                          stats={"rpn_recall": [0.5] * len(losses)})  # fmt: skip
    return Progress(iteration, 100, detector, history, 0.01, float(iteration),
                    lambda: {"model": {}, "iteration": iteration, "id": checkpoint_id})  # fmt: skip


def test_periodic_validation_rows_best_checkpoint_and_patience(rectangles, tmp_path, capsys):
    loader = recipe.val_loader(rectangles, batch_size=4, workers=0)
    hook = PeriodicValidation(loader, list(COLOURS), tmp_path / "run", period=10, patience=2)
    hook.begin(0)
    # Quality of the boxes at iterations 10, 20, 30, 40: better, worse, best, worse, worse.
    shifts = {10: 3.0, 20: 6.0, 30: 0.0, 40: 5.0, 50: 8.0}
    stops = []
    losses = [1.0] * 10 + [0.8] * 10 + [0.6] * 10 + [0.5] * 10 + [0.4] * 10
    for iteration, shift in shifts.items():
        progress = fake_progress(
            RectangleFinder(shift=shift), iteration, losses[:iteration], iteration
        )
        stops.append(hook(progress))
    assert stops == [False, False, False, False, True]
    printed = capsys.readouterr().out
    assert "[Val 30] mAP@0.5" in printed and "saved best.pt" in printed
    assert "Stopping early: val mAP@0.5 has not improved for 2 evaluations (patience 2)" in printed

    with open(tmp_path / "run" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(float(r["iteration"])) for r in rows] == [10, 20, 30, 40, 50]
    assert list(rows[0])[:2] == ["iteration", "lr"]
    assert list(rows[0])[-4:] == ["val_map50", "val_coco_ap", "seconds", "val_seconds"]
    # Losses averaged over the iterations since the previous row.
    assert [float(r["loss"]) for r in rows] == pytest.approx([1.0, 0.8, 0.6, 0.5, 0.4])
    assert [float(r["loss_a"]) for r in rows] == pytest.approx([0.5, 0.4, 0.3, 0.25, 0.2])
    maps = [float(r["val_map50"]) for r in rows]
    assert maps[2] == max(maps) and maps[1] < maps[0] and maps[3] < maps[2]
    assert load_checkpoint(tmp_path / "run" / "best.pt")["id"] == 30
    assert (tmp_path / "run" / "results.png").stat().st_size > 0
    assert list((tmp_path / "run").glob(".*.tmp")) == []

    # Resuming at iteration 40: rows after it are dropped; best and patience come back.
    resumed = PeriodicValidation(loader, list(COLOURS), tmp_path / "run", period=10, patience=2)
    resumed.begin(40)
    assert [r["iteration"] for r in resumed.rows] == [10, 20, 30, 40]
    assert resumed.best["iteration"] == 30 and resumed.evaluations_without_improvement == 1
    assert resumed(fake_progress(RectangleFinder(shift=7.0), 50, losses, 50)) is True
    # A fresh run starts a new table.
    PeriodicValidation(loader, list(COLOURS), tmp_path / "run", period=10).begin(0)
    assert (tmp_path / "run" / "results.csv").read_text().count("\n") == 1


class StopAt:
    """A validation hook that records what it saw and stops at ``stop_at``."""

    def __init__(self, period: int, stop_at: int):
        self.period, self.stop_at, self.seen, self.started = period, stop_at, [], None

    def begin(self, start_iter: int) -> None:
        self.started = start_iter

    def __call__(self, progress: Progress) -> bool:
        self.seen.append((progress.iteration, len(progress.history), progress.checkpoint()))
        return progress.iteration >= self.stop_at


def test_train_detector_calls_the_hook_and_stops_early(tmp_path):
    loader = [(["a", "b"], torch.rand(2, 3, 16, 16), torch.tensor([[[1.0, 1, 8, 8, 0]]] * 2))]
    model = TinyDetector(num_classes=2)
    hook = StopAt(period=3, stop_at=6)
    history = train_detector(
        model, loader, max_iters=20, warmup_iters=0, log_period=0, show_plot=False,
        progress=False, checkpoint_path=tmp_path / "c.pt", checkpoint_period=100,
        validation=hook,
    )  # fmt: skip
    assert hook.started == 0
    assert [(i, n) for i, n, _ in hook.seen] == [(3, 3), (6, 6)]
    assert hook.seen[-1][2]["iteration"] == 6 and len(history) == 6
    assert load_checkpoint(tmp_path / "c.pt")["iteration"] == 6  # written where it stopped


def small_detector() -> FasterRCNN:
    backbone = DetectorBackboneWithFPN(out_channels=16, pretrained=False)
    rpn = RPN(16, [16], batch_size_per_image=16, pre_nms_topk=50, post_nms_topk=20)
    return FasterRCNN(backbone, rpn, [16], num_classes=2, batch_size_per_image=16)


def test_validating_does_not_change_training(rectangles, tmp_path):
    """The same losses, bit for bit, with and without a validation every 2 iterations: the
    val loader draws its seeds from its own generator and the detector's inference uses no
    randomness, so the global RNG that shuffles and samples is left alone."""
    gt = torch.tensor([[4.0, 4, 30, 30, 0], [34, 20, 60, 50, 1]])
    items = [(f"{i}", torch.randn(3, 64, 64), gt) for i in range(6)]
    runs = []
    for period in (0, 2):
        torch.manual_seed(0)
        train = torch.utils.data.DataLoader(items, batch_size=2, shuffle=True)
        hook = PeriodicValidation(recipe.val_loader(rectangles, 4, 0), list(COLOURS),
                                  tmp_path / str(period), period)  # fmt: skip
        runs.append(train_detector(small_detector(), train, max_iters=4, warmup_iters=0,
                                   log_period=0, show_plot=False, progress=False,
                                   validation=hook))  # fmt: skip
    assert len((tmp_path / "2" / "results.csv").read_text().splitlines()) == 1 + 2
    assert list(runs[0]) == list(runs[1])


def test_a_budget_lengthens_the_period_when_evaluations_cost_too_much(rectangles, tmp_path,
                                                                     capsys):  # fmt: skip
    """Evaluations that cost more than the budget share of the (measured) training time make
    the period grow; cheap ones leave it; without a budget it never changes."""
    loader = recipe.val_loader(rectangles, batch_size=4, workers=0)

    def after_first(budget: float, seconds_per_iteration: float) -> int:
        hook = PeriodicValidation(loader, list(COLOURS), tmp_path / str(budget), period=10,
                                  budget=budget)  # fmt: skip
        hook.begin(0)
        progress = fake_progress(RectangleFinder(), 10, [1.0] * 10, 10)
        hook(dataclasses.replace(progress, max_iters=1000, seconds=10 * seconds_per_iteration))
        return hook.period

    # Training as good as free: every evaluation would blow the budget; only the last stays.
    assert after_first(0.1, 1e-6) == 1000
    assert "evaluating every 1000 iterations from here keeps them within 10%" in (
        capsys.readouterr().out
    )
    assert after_first(0.1, 100.0) == 10  # cheap evaluations: the period stays
    assert after_first(0.0, 1e-6) == 10  # no budget: the period stays
