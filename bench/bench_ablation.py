"""Ablation of the training pipeline: what flips, multi-scale, padded batches, fitted anchors,
the smooth-L1 box loss, RoI Align's offset and the p2 level each add, at equal iterations.

Every row runs ``detector_cli.py`` in a fresh process (as a user would) with the flags of the
row it builds on (the row above, unless named) plus one change, and reads mAP@0.5 and the
training time from its ``metrics.json``:

1. ``baseline``: square centre crops, no augmentation, one image size, anchors 4 x stride,
   L1 box losses, half-pixel aligned RoI Align (the notebook's);
2. ``+ flip``: random horizontal flips;
3. ``+ multi-scale``: one random short side per batch (``eecs598.augment.multiscale_sizes``);
4. ``+ padded``: whole images padded to a multiple of 32 instead of square crops (the
   generated shapes images are square, so this row is skipped there);
5. ``+ auto anchors``: ``--anchor-scale auto`` (``eecs598.anchor_fit``);
6. ``+ smooth-L1``: the box losses of both stages smooth-L1 with beta 1/9 instead of L1;
   row 6 is ``train``'s default pipeline;
7. ``+ RoI offset 0``: RoI features sampled at each cell's top-left pixel
   (``--roi-align-offset 0``, torchvision's; not ``train``'s default);
8. ``+ p2``: the stride-4 FPN level, added to row 5 (L1, aligned RoI Align).

``--rows`` runs some rows only (each still with the flags of the rows it builds on).

Datasets: the generated shapes data (``demo`` at its own settings) and BCCD
(``../shared/datasets/bccd``, ``train`` with the issue's flags). Runs go one at a time: two
trainings at once on this 2-core machine slow each other many times over.

Usage::

    python bench/bench_ablation.py [--datasets shapes bccd] [--seeds 0 1 2]
                                   [--shapes-iters 360] [--bccd-iters 600]
                                   [--out bench/results/ablation.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import BCCD, ROOT, available, environment, write_json

# (row, flags added to its base row's, which datasets it runs on, base row: None = the row above)
STEPS = [
    ("baseline", ["--batch-mode", "crop", "--no-flip", "--no-multiscale", "--anchor-scale", "4",
                  "--smooth-l1-beta", "0", "--roi-align-offset", "0.5"], ("shapes", "bccd"), None),
    ("+ flip", ["--flip"], ("shapes", "bccd"), None),
    ("+ multi-scale", ["--multiscale"], ("shapes", "bccd"), None),
    ("+ padded", ["--batch-mode", "pad"], ("bccd",), None),
    ("+ auto anchors", ["--anchor-scale", "auto"], ("shapes", "bccd"), None),
    ("+ smooth-L1", ["--smooth-l1-beta", "1/9"], ("shapes", "bccd"), None),
    ("+ RoI offset 0", ["--roi-align-offset", "0"], ("shapes", "bccd"), None),
    ("+ p2", ["--fpn-levels", "p2", "p3", "p4", "p5"], ("shapes", "bccd"), "+ auto anchors"),
]  # fmt: skip


def row_flags() -> dict[str, list[str]]:
    """Each row's full flags: its base row's, then its own."""
    flags: dict[str, list[str]] = {}
    previous: list[str] = []
    for row, added, _, base in STEPS:
        previous = flags[row] = (flags[base] if base else previous) + added
    return flags


COMMANDS = {
    "shapes": ["demo"],
    "bccd": ["train", "--dataset", str(BCCD), "--batch-size", "8", "--fpn-channels", "64"],
}


def run_one(dataset: str, flags: list[str], seed: int, iters: int, out: Path) -> dict:
    """One training in a fresh process; its ``metrics.json``."""
    command = [sys.executable, str(ROOT / "detector_cli.py"), *COMMANDS[dataset], *flags,
               "--seed", str(seed), "--max-iters", str(iters), "--out", str(out),
               "--no-progress", "--log-period", "0"]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads((out / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["shapes", "bccd"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--bccd-seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--shapes-iters", type=int, default=360)
    parser.add_argument("--bccd-iters", type=int, default=600)
    parser.add_argument(
        "--rows",
        nargs="+",
        choices=[step[0] for step in STEPS],
        default=[step[0] for step in STEPS],
        help="rows to run (default: all)",
    )
    parser.add_argument("--out", default="bench/results/ablation.json")
    args = parser.parse_args()
    all_flags = row_flags()
    result = {"environment": environment("cpu"), "rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for dataset in available(args.datasets):
            seeds = args.seeds if dataset == "shapes" else args.bccd_seeds
            iters = args.shapes_iters if dataset == "shapes" else args.bccd_iters
            for row, _, where, _ in STEPS:
                flags = all_flags[row]
                if dataset not in where or row not in args.rows:
                    continue
                runs = [run_one(dataset, flags, seed, iters, Path(tmp) / f"{dataset}-{seed}")
                        for seed in seeds]  # fmt: skip
                maps = [100 * r["mAP"] for r in runs]
                entry = {
                    "flags": flags, "iters": iters, "seeds": seeds, "mAP": maps,
                    "ap": [r["ap"] for r in runs], "train_s": [r["train_seconds"] for r in runs],
                }  # fmt: skip
                result["rows"].setdefault(dataset, {})[row] = entry
                print(f"{dataset:6s} {row:15s} mAP@0.5 {statistics.mean(maps):5.1f}% "
                      f"({', '.join(f'{m:.1f}' for m in maps)})  train "
                      f"{statistics.mean(entry['train_s']):5.0f} s", flush=True)  # fmt: skip
                write_json(args.out, result)


if __name__ == "__main__":
    main()
