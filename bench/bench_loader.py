"""Data loading throughput: decode-every-time reader against the preprocessed cache.

For each dataset (the generated shapes data, and ``../shared/datasets/bccd`` when present) it
measures images per second of

- ``items``: ``dataset[i]`` over the split in one process (pure per-item cost);
- ``loader``: a ``DataLoader`` with batch 16, 2 workers, shuffling, for ``--batches`` batches
  after the workers have started (the training setting);

for the plain ``VOCLayoutDetection`` and for ``CachedDetection`` around it (the cache is built
before timing; its build time is reported separately). Rounds alternate reader, cache, reader,
cache, ... and medians are reported. The ``loader`` rows also show batches per second against
the 20 it/s a GPU step needs at the notebook's full-training setting.

Two more loaders run ``train``'s augmented pipeline on the uint8 cache of uncropped images
(read at the largest multi-scale size): ``eecs598.augment.AugmentedDetection`` in the workers,
batches of similar aspect ratio with one short side each from
``multiscale_sizes(image_size)`` (a seeded ``AspectRatioBatchSampler``), padded by
``PadCollate``: ``train_flip`` with ``train``'s default transforms (flip) and the images
resized to every multi-scale size in advance (``train``'s default with the image cache on),
``train_flip_per_batch`` the same resizing each item as its batch asks (``--cache
off``; the items still come from the cache here), ``train_all`` with photometric distortion
and IoU crops as well. Their ``headroom`` is batches/s over 20.

Usage::

    python bench/bench_loader.py [--image-size 224] [--repeats 3] [--out bench/results/loader.json]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import torch
from harness import BCCD, environment, write_json

import a4_helper


def items_per_second(dataset, count: int) -> float:
    start = time.perf_counter()
    for i in range(count):
        dataset[i % len(dataset)]
    return count / (time.perf_counter() - start)


def loader_per_second(loader_iter, batches: int, batch_size: int) -> float:
    next(loader_iter)  # workers running, first batches queued
    start = time.perf_counter()
    for _ in range(batches):
        next(loader_iter)
    return batches * batch_size / (time.perf_counter() - start)


def endless(loader):
    while True:
        yield from loader


def augmented_loader(whole, image_size: int, workers: int, **options):
    """``train``'s loader (``recipe.train_loader``) over the uint8 cache of ``whole`` (an
    uncropped reader at the largest multi-scale size), batch 16, with ``options`` (settings
    by flat name, e.g. ``photometric=True``)."""
    import recipe
    from eecs598.augment import multiscale_sizes
    from eecs598.settings import OWN_DATA

    settings = OWN_DATA.replace(image_size=image_size, batch_size=16, workers=workers, **options)
    settings = settings.replace(train_crop=recipe.train_crop_size(settings))
    items = a4_helper.CachedDetection(whole, normalize=False)
    return recipe.train_loader(settings, items, multiscale_sizes(image_size))


def bench(name: str, plain, args, whole=None) -> dict:
    start = time.perf_counter()
    cached = a4_helper.CachedDetection(plain)
    build_s = time.perf_counter() - start
    cached_uint8 = a4_helper.CachedDetection(plain, normalize=False)
    datasets = {"reader": plain, "cache": cached, "cache_uint8": cached_uint8}
    loaders = {
        k: endless(
            torch.utils.data.DataLoader(
                d,
                batch_size=16,
                shuffle=True,
                num_workers=args.workers,
                drop_last=True,
                persistent_workers=args.workers > 0,
            )  # fmt: skip
        )
        for k, d in datasets.items()
    }
    if whole is not None:
        variants = (
            ("train_flip", {}),
            ("train_flip_per_batch", {"cache": "off"}),
            ("train_all", {"photometric": True, "iou_crop": True}),
        )
        for key, options in variants:
            loaders[key] = endless(
                augmented_loader(whole, args.image_size, args.workers, **options)
            )
    item_rates = {k: [] for k in datasets}
    loader_rates = {k: [] for k in loaders}
    for _, key in itertools.product(range(args.repeats), loaders):
        if key in datasets:
            item_rates[key].append(items_per_second(datasets[key], args.items))
        loader_rates[key].append(loader_per_second(loaders[key], args.batches, 16))
    row = {"images": len(plain), "cache_build_s": build_s}
    for kind, rates in (("items", item_rates), ("loader", loader_rates)):
        for key in rates:
            row[f"{kind}_{key}_img_per_s"] = statistics.median(rates[key])
    print(f"\n{name}: {len(plain)} images at {args.image_size} px, cache built in {build_s:.1f} s")
    print(f"{'images/s':28s} {'reader':>9s} {'cache':>9s} {'speedup':>8s} {'batches/s':>10s}")
    for kind, key in itertools.product(("items", "loader"), ("cache", "cache_uint8")):
        reader, cache = row[f"{kind}_reader_img_per_s"], row[f"{kind}_{key}_img_per_s"]
        row[f"{kind}_{key}_speedup"] = cache / reader
        label = f"{kind}, {key}"
        print(f"{label:28s} {reader:9.0f} {cache:9.0f} {cache / reader:7.1f}x {cache / 16:10.1f}")
    for key in ("train_flip", "train_flip_per_batch", "train_all"):
        if f"loader_{key}_img_per_s" in row:
            rate = row[f"loader_{key}_img_per_s"] / 16
            row[f"loader_{key}_headroom"] = rate / 20
            print(f"{'loader, ' + key:28s} {'':9s} {16 * rate:9.0f} {'':8s} {rate:10.1f}"
                  f"  ({rate / 20:.1f}x the 20 it/s of a GPU step)")  # fmt: skip
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--items", type=int, default=160)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="bench/results/loader.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {"environment": environment("cpu"), "config": vars(args)}
    from eecs598.augment import multiscale_sizes

    largest = max(multiscale_sizes(args.image_size))
    with tempfile.TemporaryDirectory() as tmp:
        root = a4_helper.make_shapes_dataset(
            Path(tmp) / "shapes", num_train=320, num_val=0, image_size=args.image_size
        )
        shapes = a4_helper.ShapesDetection(root, "train", image_size=args.image_size)
        whole = a4_helper.VOCLayoutDetection(root, "train", a4_helper.SHAPES_CLASSES,
                                             largest, train_transform=False)  # fmt: skip
        result["shapes"] = bench("shapes (generated)", shapes, args, whole)
    if BCCD.is_dir():
        classes = list(a4_helper.BCCD_CLASSES)
        bccd = a4_helper.VOCLayoutDetection(BCCD, "train", classes, args.image_size)
        whole = a4_helper.VOCLayoutDetection(BCCD, "train", classes, largest, train_transform=False)
        result["bccd"] = bench("BCCD train", bccd, args, whole)
    else:
        print(f"\n{BCCD} not found: BCCD rows skipped")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
