"""Validation while training: a val mAP every few iterations, kept where a user looks.

:class:`PeriodicValidation` is the ``validation`` hook of ``eecs598.training.train_detector``.
Every ``period`` iterations (and after the last) it scores the detector on a val loader
(``eecs598.inference.score_detector``: VOC mAP@0.5 and COCO AP, batched, quiet) and, in
``out_dir``:

- ``results.csv``: one row per evaluation (:data:`RESULT_FIELDS`: the iteration, each loss and
  training diagnostic averaged over the iterations since the previous row, the learning rate,
  val mAP@0.5, COCO AP, the wall seconds since training started and those of the
  evaluation). The whole file is rewritten atomically at each row, so a killed run loses no
  finished row and never leaves half a line;
- ``best.pt``: the checkpoint with the highest val mAP@0.5 so far (written atomically; ties
  keep the earlier one), beside the trainer's ``checkpoint.pt`` (the last, for resuming);
- ``results.png``: the losses and val mAP@0.5 against the iteration.

With ``patience`` K > 0 it stops training after K evaluations in a row without a higher val
mAP@0.5 and says so. With a ``budget`` (a share of the training time, e.g. 0.1) the period is
a starting point: after each evaluation, when the evaluations still due at that period would
take the run's evaluation time over the budget (measured: seconds per training iteration and
per evaluation so far), the period grows so that they fit, and a line says so.

A resumed run (``begin(start_iter)``) keeps the rows up to ``start_iter`` (later ones belong
to the iterations about to be trained again) and takes its best score and patience count from
them.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoint import save_checkpoint
from .files import atomic_write
from .inference import score_detector
from .training import Progress

__all__ = ["BEST_CHECKPOINT", "RESULTS_CSV", "RESULTS_PLOT", "RESULT_FIELDS", "PeriodicValidation"]

RESULTS_CSV = "results.csv"
RESULTS_PLOT = "results.png"
BEST_CHECKPOINT = "best.pt"
# results.csv's first columns; the losses and training diagnostics follow ``lr`` in the order
# the detector reports them, then the scores and times.
LEADING_FIELDS = ("iteration", "lr")
RESULT_FIELDS = ("val_map50", "val_coco_ap", "seconds", "val_seconds")


@dataclass
class PeriodicValidation:
    """Scores the detector on ``loader`` every ``period`` iterations; see the module doc.

    Args:
        loader: val batches ``(paths, images (B, 3, H, W), gt_boxes (B, M, 5)[, image_sizes
            (B, 2)])``, e.g. ``recipe.val_loader``.
        class_names: the detector's classes, index order.
        out_dir: where results.csv, best.pt and results.png go.
        period: iterations between evaluations (0: never).
        patience: stop after this many evaluations without a higher val mAP@0.5 (0: never).
        score_thresh, nms_thresh: the detector's test thresholds while scoring.
        device: where the batches go.
        budget: the most the evaluations may cost, as a share of the training time (0: keep
            ``period`` whatever they cost).
    """

    loader: Iterable
    class_names: Sequence[str]
    out_dir: Path
    period: int
    patience: int = 0
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    device: str | torch.device = "cpu"
    budget: float = 0.0
    rows: list[dict[str, float]] = field(default_factory=list)
    _start_iter: int = 0
    _eval_seconds: float = 0.0  # spent evaluating since begin()
    _evaluations: int = 0

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)

    # ------------------------------------------------------------------ state from the rows

    @property
    def best(self) -> dict[str, float] | None:
        """The first row with the highest val mAP@0.5, None before any evaluation."""
        return max(self.rows, key=lambda r: r["val_map50"], default=None)

    @property
    def evaluations_without_improvement(self) -> int:
        """Rows after the best one."""
        best = self.best
        return 0 if best is None else len(self.rows) - 1 - self.rows.index(best)

    def begin(self, start_iter: int) -> None:
        """Before training: a fresh run starts a new results.csv; a resumed one keeps the rows
        of the iterations already trained."""
        path = self.out_dir / RESULTS_CSV
        self.rows = []
        self._start_iter, self._eval_seconds, self._evaluations = start_iter, 0.0, 0
        if start_iter > 0 and path.is_file():
            with open(path, newline="") as f:
                rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
            self.rows = [row for row in rows if row["iteration"] <= start_iter]
        self._write_rows()

    # ------------------------------------------------------------------ one evaluation

    def __call__(self, progress: Progress) -> bool:
        """Score, append a row, keep best.pt, redraw results.png; whether to stop."""
        start = time.time()
        result = score_detector(
            progress.detector, self.loader, dict(enumerate(self.class_names)),
            self.score_thresh, self.nms_thresh, self.device,
        )  # fmt: skip
        coco = result.coco.stats["AP"] if result.coco is not None else float("nan")
        previous = self.best
        row = {
            "iteration": float(progress.iteration),
            "lr": progress.lr,
            **self._recent_means(progress),
            "val_map50": float(result.map),
            "val_coco_ap": coco,
            "seconds": progress.seconds + time.time() - start,
            "val_seconds": time.time() - start,
        }
        self.rows.append(row)
        improved = previous is None or row["val_map50"] > previous["val_map50"]
        if improved:
            save_checkpoint(self.out_dir / BEST_CHECKPOINT, progress.checkpoint())
        self._write_rows()
        self._plot()
        print(self._line(row, improved), flush=True)
        self._keep_to_budget(progress, row["val_seconds"])
        return self._out_of_patience()

    def _keep_to_budget(self, progress: Progress, seconds: float) -> None:
        """With a ``budget``: lengthen the period when the evaluations still due would cost
        more than the budget allows (the last, at ``max_iters``, always runs)."""
        train_seconds = progress.seconds - self._eval_seconds  # before this evaluation
        self._eval_seconds += seconds
        self._evaluations += 1
        trained = progress.iteration - self._start_iter
        remaining = progress.max_iters - progress.iteration
        if not self.budget or trained <= 0 or train_seconds <= 0 or remaining <= 0:
            return
        per_evaluation = self._eval_seconds / self._evaluations
        total_training = train_seconds / trained * (progress.max_iters - self._start_iter)
        allowed = int((self.budget * total_training - self._eval_seconds) // per_evaluation)
        due = (progress.max_iters - 1) // self.period - progress.iteration // self.period + 1
        if due <= max(allowed, 1):
            return
        period = progress.max_iters if allowed <= 1 else math.ceil(remaining / (allowed - 1))
        self.period = max(self.period, period)
        print(f"[Val] an evaluation takes {per_evaluation:.1f} s, a training iteration "
              f"{train_seconds / trained:.2f} s: evaluating every {self.period} iterations "
              f"from here keeps them within {self.budget:.0%} of the training time.",
              flush=True)  # fmt: skip

    def _recent_means(self, progress: Progress) -> dict[str, float]:
        """Each loss term and diagnostic averaged over the iterations since the last row."""
        since = int(self.rows[-1]["iteration"]) if self.rows else 0
        history = progress.history
        series = {"loss": list(history), **history.terms, **history.stats}
        return {
            name: float(np.mean(values[since:])) if len(values) > since else float("nan")
            for name, values in series.items()
        }

    def _line(self, row: Mapping[str, float], improved: bool) -> str:
        best = self.best
        kept = f", saved {BEST_CHECKPOINT}" if improved else ""
        coco = "" if np.isnan(row["val_coco_ap"]) else f", COCO AP {100 * row['val_coco_ap']:.1f}%"
        return (
            f"[Val {int(row['iteration'])}] mAP@0.5 {100 * row['val_map50']:.2f}%{coco} "
            f"(best {100 * best['val_map50']:.2f}% at iteration {int(best['iteration'])}"
            f"{kept}) in {row['val_seconds']:.1f} s"
        )

    def _out_of_patience(self) -> bool:
        waited = self.evaluations_without_improvement
        if not self.patience or waited < self.patience:
            return False
        best = self.best
        print(
            f"Stopping early: val mAP@0.5 has not improved for {waited} evaluations "
            f"(patience {self.patience}); the best, {100 * best['val_map50']:.2f}% at "
            f"iteration {int(best['iteration'])}, is in {self.out_dir / BEST_CHECKPOINT}."
        )
        return True

    # ------------------------------------------------------------------ files

    def _write_rows(self) -> None:
        """results.csv with every row, replaced atomically."""
        names = list(LEADING_FIELDS)
        for row in self.rows:
            names += [k for k in row if k not in names and k not in RESULT_FIELDS]
        names += list(RESULT_FIELDS)
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=names, restval="", lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: f"{v:.6g}" for k, v in row.items()})
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(self.out_dir / RESULTS_CSV, "w") as f:
            f.write(text.getvalue())

    def _plot(self) -> None:
        """results.png: each loss (left) and val mAP@0.5 and COCO AP (right) per evaluation."""
        from matplotlib.figure import Figure  # no pyplot: nothing shown, no backend changed

        iterations = [row["iteration"] for row in self.rows]
        fig = Figure(figsize=(11, 4))
        losses, scores = fig.subplots(1, 2)
        for name in self.rows[-1]:
            if name.startswith("loss"):
                losses.plot(iterations, [r.get(name, np.nan) for r in self.rows], "o-", label=name)
        losses.set(xlabel="Iteration", ylabel="Mean loss since the last evaluation")
        losses.legend(fontsize=8)
        for name, label in (("val_map50", "val mAP@0.5"), ("val_coco_ap", "val COCO AP")):
            scores.plot(iterations, [100 * r[name] for r in self.rows], "o-", label=label)
        scores.set(xlabel="Iteration", ylabel="%", ylim=(0, 100))
        scores.legend(fontsize=8)
        for ax in (losses, scores):
            ax.grid(alpha=0.3)
        fig.tight_layout()
        with atomic_write(self.out_dir / RESULTS_PLOT, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
