"""Shared bench helpers: alternating timed runs, a fixed batch of generated data, JSON out."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import a4_helper  # noqa: E402

#: The real images in VOC layout (``../shared/datasets/bccd``); absent on some machines.
BCCD = ROOT.parent / "shared" / "datasets" / "bccd"
#: Natural photos, a Roboflow COCO export (``train/`` and ``valid/``); absent on some machines.
AQUARIUM = ROOT.parent / "shared" / "datasets" / "aquarium"


def available(datasets: list[str]) -> list[str]:
    """``datasets`` without ``"bccd"`` / ``"aquarium"`` where the folder is missing (saying so)."""
    missing = {name for name, root in (("bccd", BCCD), ("aquarium", AQUARIUM))
               if name in datasets and not root.is_dir()}  # fmt: skip
    for name in sorted(missing):
        print(f"{BCCD if name == 'bccd' else AQUARIUM} not found: {name} skipped")
    return [name for name in datasets if name not in missing]


def sync(device: torch.device | str) -> None:
    """Wait for queued kernels so a timer measures the work, not the launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def alternate(
    runs: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 2,
    device: torch.device | str = "cpu",
) -> dict[str, list[float]]:
    """Time each callable ``repeats`` times, interleaved (a, b, c, a, b, c, ...).

    Interleaving spreads this machine's noise evenly over the candidates. Returns the seconds
    of every timed run per name, after ``warmup`` untimed rounds.
    """
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_index in range(warmup + repeats):
        for name, fn in runs.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def summarise(times: dict[str, list[float]], baseline: str) -> dict[str, dict[str, float]]:
    """Median seconds per name and its ratio to ``baseline``'s median."""
    base = statistics.median(times[baseline])
    return {
        name: {
            "median_s": statistics.median(ts),
            "min_s": min(ts),
            "ratio": statistics.median(ts) / base,
            "runs": len(ts),
        }
        for name, ts in times.items()
    }


def print_table(title: str, rows: dict[str, dict[str, float]], baseline: str) -> None:
    print(f"\n{title}")
    print(f"{'':28s} {'median ms':>10s} {'min ms':>10s} {'vs ' + baseline:>16s}")
    for name, row in rows.items():
        print(
            f"{name:28s} {1e3 * row['median_s']:10.1f} {1e3 * row['min_s']:10.1f} "
            f"{row['ratio']:15.2f}x"
        )


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (MiB)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


def cpu_vector_flags() -> str:
    """The CPU's AVX flags (from ``/proc/cpuinfo``; empty elsewhere): int8 kernels gain most
    with a VNNI flag (``avx512_vnni``, ``avx_vnni``), least with ``avx2`` alone."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])  # fmt: skip
    return " ".join(sorted(flag for flag in flags if flag.startswith("avx") or "vnni" in flag))


def environment(device: torch.device | str) -> dict[str, object]:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "cpu_vector_flags": cpu_vector_flags(),
        "device": str(device),
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def add_step_args(parser: argparse.ArgumentParser) -> None:
    """The options every training-step benchmark shares: device, batch, image size, FPN width."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--fpn-channels", type=int, default=64)


def shapes_batch(
    batch_size: int, image_size: int, device: torch.device | str = "cpu", seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch of the generated dataset (train transform: resized, centre-cropped square).

    Returns:
        ``images (B, 3, S, S)`` normalised and ``gt_boxes (B, 40, 5)`` padded with -1.
    """
    with tempfile.TemporaryDirectory() as tmp:
        root = a4_helper.make_shapes_dataset(
            Path(tmp) / "shapes", num_train=batch_size, num_val=0, image_size=image_size, seed=seed
        )
        data = a4_helper.ShapesDetection(root, "train", image_size=image_size)
        items = [data[i] for i in range(batch_size)]
    images = torch.stack([img for _, img, _ in items])  # train items are square crops
    boxes = torch.stack([b for _, _, b in items])
    return images.to(device), boxes.to(device)


def write_json(path: str | os.PathLike, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".part")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)
    print(f"\nwrote {path}")
