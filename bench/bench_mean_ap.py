"""Times the mAP evaluator on synthetic VOC-sized data.

Default workload: 5000 images x 100 detections each over 20 classes, 1-8 GT boxes per image
(about 10% difficult). About a third of the detections are jittered copies of GT boxes, the
rest are random boxes. Reports the median over several runs of:

- ``compute``: ``MeanAPAccumulator.compute()`` (concatenation, sorting, IoU, matching, AP);
- ``add``: feeding all images one by one through ``image_detections`` and
  ``MeanAPAccumulator.add`` (for reference);
- ``coco``: what COCO-style evaluation adds, ``MeanAPAccumulator.compute_coco()``: the
  conversion to COCO dicts (``to_coco``) and pycocotools' ``COCOeval`` (evaluate, accumulate,
  summarize at 10 IoU thresholds and 4 area ranges), fewer runs (``--coco-repeats``; 0 skips it);
- ``errors``: the error analysis of ``eecs598.errors`` on the same images: ``analyse_errors``
  (VOC matching, TIDE types, the eight oracle-fixed mAPs: the breakdown, target 5 s), and the
  confusion matrix, best-F1 thresholds and per-image counts together (``--errors-repeats``; 0
  skips it).

Usage::

    python bench/bench_mean_ap.py [--images 5000] [--dets 100] [--classes 20] [--repeats 7]
                                  [--coco-repeats 3] [--errors-repeats 3]
                                  [--out bench/results/mean_ap.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from eecs598.errors import analyse_errors, best_f1, confusion_matrix, per_image_counts  # noqa: E402
from eecs598.mean_ap import MeanAPAccumulator, coco_evaluate, image_detections  # noqa: E402


def make_data(
    n_images: int, n_dets: int, n_classes: int, seed: int = 0
) -> list[tuple[np.ndarray, ...]]:
    """Synthetic per-image data.

    Returns:
        A list with one tuple per image: ``gt_boxes (N, 4)``, ``gt_classes (N,)``,
        ``gt_difficult (N,)``, ``det_boxes (M, 4)``, ``det_classes (M,)``, ``det_scores (M,)``.
    """
    rng = np.random.default_rng(seed)
    size = 500.0
    images = []
    for _ in range(n_images):
        n_gt = int(rng.integers(1, 9))
        xy = rng.uniform(0, size * 0.7, (n_gt, 2))
        wh = rng.uniform(20, size * 0.3, (n_gt, 2))
        gt_boxes = np.concatenate([xy, xy + wh], axis=1)
        gt_classes = rng.integers(0, n_classes, n_gt)
        gt_difficult = rng.random(n_gt) < 0.1

        n_true = n_dets // 3
        src = rng.integers(0, n_gt, n_true)
        jitter = rng.normal(0.0, 8.0, (n_true, 4))
        true_boxes = gt_boxes[src] + jitter
        true_classes = np.where(
            rng.random(n_true) < 0.8, gt_classes[src], rng.integers(0, n_classes, n_true)
        )
        n_rand = n_dets - n_true
        rxy = rng.uniform(0, size * 0.8, (n_rand, 2))
        rwh = rng.uniform(10, size * 0.4, (n_rand, 2))
        det_boxes = np.concatenate([true_boxes, np.concatenate([rxy, rxy + rwh], axis=1)])
        det_classes = np.concatenate([true_classes, rng.integers(0, n_classes, n_rand)])
        det_scores = np.concatenate([rng.uniform(0.3, 1.0, n_true), rng.uniform(0, 0.7, n_rand)])
        images.append((gt_boxes, gt_classes, gt_difficult, det_boxes, det_classes, det_scores))
    return images


def time_errors(result, names: list[str], repeats: int) -> tuple[list, list, object]:
    """Times of ``analyse_errors`` (the breakdown) and of the confusion matrix, best-F1
    thresholds and per-image counts together, over ``repeats`` runs; and the last breakdown."""
    error_times, extra_times, breakdown = [], [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        analysis = analyse_errors(result.images, names)
        t1 = time.perf_counter()
        confusion_matrix(result.images, names)
        best_f1(analysis)
        per_image_counts(analysis)
        extra_times.append(time.perf_counter() - t1)
        error_times.append(t1 - t0)
        breakdown = analysis.breakdown
    return error_times, extra_times, breakdown


def time_voc(data: list, names: list[str], repeats: int) -> tuple[list, list, object, object]:
    """Times of adding every image and of ``compute()`` over ``repeats`` runs; the last
    accumulator and result."""
    add_times, compute_times, acc, result = [], [], None, None
    for _ in range(repeats):
        acc = MeanAPAccumulator(names)
        t0 = time.perf_counter()
        for i, item in enumerate(data):
            acc.add(image_detections(i, *item))
        t1 = time.perf_counter()
        result = acc.compute()
        add_times.append(t1 - t0)
        compute_times.append(time.perf_counter() - t1)
    return add_times, compute_times, acc, result


def time_coco(acc: MeanAPAccumulator, repeats: int) -> tuple[list, list, object]:
    """Times of COCO-style evaluation in all and of its conversion; the last result."""
    coco_times, convert_times, coco = [], [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        converted = acc.to_coco()
        t1 = time.perf_counter()
        coco = coco_evaluate(*converted)
        coco_times.append(time.perf_counter() - t0)
        convert_times.append(t1 - t0)
    return coco_times, convert_times, coco


def median_or_none(times: list[float]) -> float | None:
    return statistics.median(times) if times else None


# The command-line flags that take a count, with their defaults.
INT_FLAGS = (("--images", 5000), ("--dets", 100), ("--classes", 20), ("--repeats", 7),
             ("--coco-repeats", 3), ("--errors-repeats", 3))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default in INT_FLAGS:
        parser.add_argument(flag, type=int, default=default)
    parser.add_argument("--out", default=os.path.join("bench", "results", "mean_ap.json"))
    args = parser.parse_args(argv)

    names = [f"class{i:02d}" for i in range(args.classes)]
    data = make_data(args.images, args.dets, args.classes)
    add_times, compute_times, acc, result = time_voc(data, names, args.repeats)
    coco_times, coco_convert_times, coco = time_coco(acc, args.coco_repeats)
    error_times, extra_times, breakdown = time_errors(result, names, args.errors_repeats)
    rows = [
        ("compute (median)", statistics.median(compute_times)),
        ("compute (min)", min(compute_times)),
        ("add all images (median)", statistics.median(add_times)),
        ("coco: to_coco (median)", median_or_none(coco_convert_times)),
        ("coco: total (median)", median_or_none(coco_times)),
        ("errors: breakdown (median)", median_or_none(error_times)),
        ("errors: confusion+F1+rows", median_or_none(extra_times)),
    ]
    workload = f"{args.images} images x {args.dets} dets x {args.classes} classes"
    print(f"mean_ap benchmark: {workload}, {args.repeats} runs, mAP = {100 * result.map:.2f}%")
    if coco is not None:
        print(f"COCO ({args.coco_repeats} runs): AP = {coco.stats['AP']:.3f}, "
              f"AP50 = {coco.stats['AP50']:.3f}")  # fmt: skip
    if breakdown is not None:
        print(breakdown.table())
    print(f"{'step':<28}{'seconds':>10}")
    for label, seconds in rows:
        if seconds is not None:
            print(f"{label:<28}{seconds:>10.4f}")

    record = {
        "workload": {"images": args.images, "detections_per_image": args.dets,
                     "classes": args.classes, "total_detections": args.images * args.dets},
        "repeats": args.repeats,
        "compute_seconds_median": statistics.median(compute_times),
        "compute_seconds_all": compute_times,
        "add_seconds_median": statistics.median(add_times),
        "coco_seconds_median": median_or_none(coco_times),
        "coco_seconds_all": coco_times,
        "coco_to_coco_seconds_median": median_or_none(coco_convert_times),
        "coco_stats": coco.stats if coco is not None else None,
        "errors_seconds_median": median_or_none(error_times),
        "errors_seconds_all": error_times,
        "errors_extra_seconds_median": median_or_none(extra_times),
        "errors_dap": breakdown.dap if breakdown is not None else None,
        "map": result.map, "python": platform.python_version(), "numpy": np.__version__,
        "machine": platform.machine(), "cpu_count": os.cpu_count(),
    }  # fmt: skip
    if os.path.dirname(args.out):
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
