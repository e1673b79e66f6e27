"""Training speed under each tested torch: the training step and the demo's training, side by side.

Each environment is a virtual environment of the project (``make test`` builds ``.venv``, the
pinned development torch, and ``.venv-floor`` / ``.venv-colab``). Rounds alternate the
environments, one process at a time; each round runs, in each environment:

- ``bench/bench_train_step.py --skip-inference``: the median seconds of one SGD step of our
  Faster R-CNN (the notebook's overfit model, batch 16 at 224 px; BatchNorm) over its own
  repeats;
- the demo's training alone (``detector_cli.py demo --max-iters N --eval-period 0``, the
  ``DEMO`` preset: GroupNorm, 128 px), timed by its own "Trained N iterations in X s" line,
  which leaves out the data generation and the final evaluation.

The medians over rounds are printed with their ratio to the first environment (the baseline).

Usage::

    python bench/bench_torch_versions.py [--env pinned=.venv --env floor=.venv-floor ...]
        [--rounds 3] [--step-repeats 3] [--demo-iters 30] [--out bench/results/versions.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ENVS = ("pinned=.venv", "floor=.venv-floor", "colab=.venv-colab")


def _python(env: str) -> str:
    return str(ROOT / env / "bin" / "python")


def torch_version(env: str) -> str:
    code = "import torch, torchvision; print(torch.__version__, torchvision.__version__)"
    out = subprocess.run([_python(env), "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def train_step_seconds(env: str, repeats: int) -> float:
    """The median seconds of one training step of ours (``bench_train_step.py``)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "step.json"
        cmd = [_python(env), "bench/bench_train_step.py", "--skip-inference",
               "--repeats", str(repeats), "--out", str(out)]  # fmt: skip
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
        return json.loads(out.read_text())["train_step"]["ours"]["median_s"]


def demo_training_seconds(env: str, iters: int) -> float:
    """Seconds of the demo's training loop for ``iters`` iterations, no validation."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [_python(env), "detector_cli.py", "demo", "--max-iters", str(iters),
               "--eval-period", "0", "--out", tmp]  # fmt: skip
        run = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
        found = re.search(rf"Trained {iters} iterations in ([\d.]+) s", run.stdout)
        if found is None:
            raise RuntimeError(f"no training time in the demo's output:\n{run.stdout[-2000:]}")
        return float(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", action="append", metavar="NAME=VENV",
                        help=f"an environment (repeatable; the first is the baseline); "
                        f"default: {' '.join(DEFAULT_ENVS)}")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--step-repeats", type=int, default=3)
    parser.add_argument("--demo-iters", type=int, default=30)
    parser.add_argument("--out", default="bench/results/versions.json")
    args = parser.parse_args()
    envs = dict(item.split("=", 1) for item in (args.env or DEFAULT_ENVS))
    missing = [venv for venv in envs.values() if not os.access(_python(venv), os.X_OK)]
    if missing:
        sys.exit(f"error: no virtual environment at {', '.join(missing)} (make test builds them)")
    versions = {name: torch_version(venv) for name, venv in envs.items()}
    step: dict[str, list[float]] = {name: [] for name in envs}
    demo: dict[str, list[float]] = {name: [] for name in envs}
    for round_ in range(args.rounds):
        for name, venv in envs.items():
            step[name].append(train_step_seconds(venv, args.step_repeats))
            demo[name].append(demo_training_seconds(venv, args.demo_iters))
            print(f"round {round_ + 1} {name}: step {step[name][-1]:.3f} s, "
                  f"demo {demo[name][-1]:.1f} s", flush=True)  # fmt: skip
    base = next(iter(envs))
    rows = {}
    print(f"\n| env | torch, torchvision | train step (s) | ratio | demo {args.demo_iters} "
          "iterations (s) | ratio |\n| --- | --- | --- | --- | --- | --- |")  # fmt: skip
    for name in envs:
        s, d = statistics.median(step[name]), statistics.median(demo[name])
        rows[name] = {"versions": versions[name], "step_s": step[name], "demo_s": demo[name],
                      "step_ratio": s / statistics.median(step[base]),
                      "demo_ratio": d / statistics.median(demo[base])}  # fmt: skip
        print(f"| {name} | {versions[name]} | {s:.3f} | {rows[name]['step_ratio']:.2f} | "
              f"{d:.1f} | {rows[name]['demo_ratio']:.2f} |")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(args), "rows": rows}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
