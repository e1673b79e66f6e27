"""The recipe's data stage: datasets, splits and loaders for ``settings.data``.

``make_datasets`` reads any data the package knows (voc2007, the generated shapes, a VOC-layout
folder, a COCO JSON with its images) into train and val readers; data without a val split is
split by ``hold_out``; ``train_loader``, ``val_loader`` and ``eval_loader`` turn readers into
batches. The bottom of the recipe: it imports only ``eecs598``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from eecs598.augment import (
    AspectRatioBatchSampler,
    AugmentedDetection,
    PadCollate,
    aspect_ratios_of,
    build_train_transform,
    presized_bytes,
)
from eecs598.coco import COCODetection
from eecs598.settings import HELD_OUT_FRACTION, HELD_OUT_SEED, PRESIZE_BUDGET, Settings
from eecs598.shapes import SHAPES_CLASSES, make_shapes_dataset
from eecs598.voc import (
    VOCLayoutDetection,
    held_out_split,
    read_voc_xml,
    voc_folders,
    voc_image_ids,
    voc_objects,
)
from eecs598.voc2007 import VOC2007DetectionTiny

__all__ = [
    "SHAPES_CLASSES",
    "discover_classes",
    "make_datasets",
    "hold_out",
    "room_for_every_box",
    "scored_as_named",
    "datasets_rank_zero_first",
    "warn_classes_without_boxes",
    "train_loader",
    "eval_loader",
    "val_loader",
]


def discover_classes(root: Path) -> list[str]:
    """Sorted object class names found in a VOC-layout folder's annotations."""
    names = set()
    annotations, _ = voc_folders(root)
    for xml_path in sorted(annotations.glob("*.xml")):
        for obj in voc_objects(read_voc_xml(xml_path)):  # ValueError naming a malformed file
            name = str(obj.get("name", "")).strip()  # as the reader reads it
            if name:
                names.add(name)
    if not names:
        raise FileNotFoundError(f"No annotated objects under {annotations}")
    return sorted(names)


def make_datasets(
    settings: Settings, *, image_size: int | None = None, test_image_size: int | None = None,
    classes: Sequence[str] | None = None, train_image_size: int | None = None,
    train_transform: bool | None = None,
) -> tuple[Any, Any, list[str]]:  # fmt: skip
    """Train and val datasets plus class names for ``settings.data``.

    A keyword that is given replaces its setting: a checkpoint's sizes and classes (a
    VOC-layout folder's; voc2007 and shapes have their own). ``data_dir`` defaults to
    ``data``. ``train_image_size`` is the training reader's short side when it differs from
    ``image_size`` (the largest multi-scale size: batches are only ever scaled down),
    ``train_transform`` its centre crop (default: the reader's).
    """
    data = settings.data
    data_dir = data.data_dir or "data"
    size = image_size or (data.image_size if data.image_size != "auto" else None) or 224
    test_size = test_image_size or settings.eval.test_image_size or size
    train_size = train_image_size or size
    crop = {} if train_transform is None else {"train_transform": train_transform}
    if data.dataset == "voc2007":
        train = VOC2007DetectionTiny(data_dir, "train", data.download, image_size=train_size,
                                     skip_corrupt=data.skip_corrupt, **crop)  # fmt: skip
        val = VOC2007DetectionTiny(data_dir, "val", image_size=test_size,
                                   skip_corrupt=data.skip_corrupt)  # fmt: skip
        return train, val, [train.idx_to_class[i] for i in range(len(train.idx_to_class))]
    if data.dataset.lower().endswith(".json"):
        return _coco_datasets(settings, train_size, test_size, classes, train_transform)
    if data.dataset == "shapes":
        root = Path(data_dir) / "shapes"
        make_shapes_dataset(root, num_train=data.num_train, num_val=data.num_val,
                            image_size=size, seed=settings.train.seed)  # fmt: skip
        classes = list(SHAPES_CLASSES)
    else:
        root = Path(data.dataset)
        if not classes:
            classes = data.classes.split(",") if data.classes else discover_classes(root)
    train, val = _voc_folder_datasets(settings, root, classes, train_size, test_size, crop)
    return room_for_every_box(train), room_for_every_box(val), list(classes)


def _voc_folder_datasets(
    settings: Settings, root: Path, classes: Sequence[str], size: int, test_size: int,
    crop: dict[str, bool],
) -> tuple[Any, Any]:  # fmt: skip
    """Train and val ``VOCLayoutDetection`` of a VOC-layout folder (``Annotations`` and
    ``JPEGImages``, or XML files beside the images). Train: the ``train_split`` list, else
    every annotated image. Val: ``val_dataset`` (its ``val_split`` list, else all of it), else
    the ``val_split`` list, else a held-out part of the training images (``hold_out``)."""
    data = settings.data

    def reader(folder: Path, split: str, image_size: int, **options: Any) -> VOCLayoutDetection:
        listed = (folder / "ImageSets").is_dir()  # then a missing list is an error
        return VOCLayoutDetection(
            folder, split, classes, image_size=image_size, skip_corrupt=data.skip_corrupt,
            image_ids=None if listed else voc_image_ids(folder), **options,
        )  # fmt: skip

    train = reader(root, data.train_split, size, **crop)
    if data.val_dataset:
        return train, reader(Path(data.val_dataset), data.val_split, test_size)
    if (root / "ImageSets").is_dir():
        return train, reader(root, data.val_split, test_size)
    return hold_out(train, reader(root, data.val_split, test_size), str(root))


def hold_out(train: Any, val: Any, source: str, warn: str = "") -> tuple[Any, Any]:
    """Data without a val split: the same images read for training (``train``) and for
    evaluation (``val``) are split into a deterministic held-out part, ``HELD_OUT_FRACTION``
    of them (``eecs598.voc.held_out_split``: seeded, one image for each class where
    possible), and the rest. The val part is marked ``held_out_from = source``; ``train``
    prints the split and writes it to ``OUT/split.json``. With ``warn`` (why there is no
    split) it also warns. A single image cannot be split: it is validated on itself, with a
    warning saying so."""
    if len(train.records) < 2:
        warnings.warn(
            f"{source} has {len(train.records)} image(s) and no val split: validating on the "
            "training images themselves, which says how well the model fits them, not how "
            "well it detects on new images.",
            stacklevel=3,
        )
        return train, val
    train_ids, val_ids = held_out_split(train.records, HELD_OUT_FRACTION, HELD_OUT_SEED)
    if warn:
        warnings.warn(
            f"{warn}: validating on {len(val_ids)} held-out images of {source} (a seeded "
            f"{HELD_OUT_FRACTION:.0%}), training on the other {len(train_ids)}; give the "
            "export's valid split as --val-dataset to validate on it instead.",
            stacklevel=3,
        )
    val = val.subset(val_ids, f"{val.split} (held out)")
    val.held_out_from = source
    return train.subset(train_ids, train.split), val


def _coco_datasets(
    settings: Settings, size: int, test_size: int, classes: Sequence[str] | None,
    train_transform: bool | None = None,
) -> tuple[Any, Any, list[str]]:  # fmt: skip
    """Train and val ``COCODetection`` for a COCO instances JSON: train on ``dataset`` with
    ``images``; validate on ``val_dataset`` with ``val_images`` (default: its folder), or,
    without it, on a held-out part of ``dataset`` (``hold_out``, with a warning: never on the
    training images). Classes: ``classes``, the ``classes`` setting, else the JSON's."""
    data = settings.data
    names = classes or (data.classes.split(",") if data.classes else None)
    crop = True if train_transform is None else train_transform
    train = COCODetection(data.dataset, data.images, names, size, train_transform=crop,
                          skip_corrupt=data.skip_corrupt)  # fmt: skip
    val_images = data.val_images if data.val_dataset else data.images
    val = COCODetection(data.val_dataset or data.dataset, val_images, train.class_names,
                        test_size, skip_corrupt=data.skip_corrupt)  # fmt: skip
    if not data.val_dataset:
        train, val = hold_out(train, val, str(data.dataset), warn="No --val-dataset")
    return room_for_every_box(train), room_for_every_box(val), list(train.class_names)


def scored_as_named(settings: Settings) -> Settings:
    """``settings`` whose val split is the data named, for scoring it rather than training on
    it (``evaluate``, ``audit``): a whole COCO JSON, a folder's ``val_split`` list, or every
    image of a folder without lists, nothing held out. A ``val_dataset`` given, voc2007 and
    shapes (which have their own splits) are kept."""
    data = settings.data
    if data.val_dataset or data.dataset in ("voc2007", "shapes"):
        return settings
    return settings.replace(val_dataset=data.dataset, val_images=data.images)


def room_for_every_box(dataset: Any) -> Any:
    """Give a reader a ``gt_boxes`` row for every usable box of its most crowded image.

    Readers keep the ``max_boxes`` (40) largest objects of an image; crowded photos (a
    shoal of fish) have more, and the left-out ones, the smallest, would train as
    background (and, for a val reader, go missing from the drawn ground truth; the mAP
    reads every box from the annotations either way). Returns ``dataset`` with
    ``max_boxes`` raised where needed."""
    counts = [int((~record.difficult).sum()) for record in getattr(dataset, "records", [])]
    dataset.max_boxes = max([dataset.max_boxes, *counts])
    return dataset


def datasets_rank_zero_first(
    settings: Settings, world: int, rank: int, **options: Any
) -> tuple[Any, Any, list[str]]:
    """``make_datasets(settings, **options)`` on every process, rank 0 first: it generates or
    downloads the data once, while the other processes wait and then read it."""
    if rank == 0:
        datasets = make_datasets(settings, **options)
    if world > 1:
        torch.distributed.barrier()
    if rank != 0:
        datasets = make_datasets(settings, **options)
    return datasets


def warn_classes_without_boxes(train: Any, classes: Sequence[str]) -> None:
    """Warn, naming them, about classes that no training box has: they cannot be learned."""
    records = getattr(train, "records", None)
    if records is None:  # a dataset without records: nothing to count
        return
    seen = {int(c) for record in records for c in record.classes[~record.difficult]}
    missing = [name for i, name in enumerate(classes) if i not in seen]
    if missing:
        warnings.warn(
            f"No training boxes for class(es) {', '.join(missing)}: the detector cannot learn "
            "them (their AP will be 0).",
            stacklevel=2,
        )


def train_loader(
    settings: Settings, train: Any, scales: Sequence[int] | None, world: int = 1, rank: int = 0
) -> torch.utils.data.DataLoader:
    """The training batches: ``AugmentedDetection`` items (flip, photometric, IoU crop),
    drawn by a ``DistributedSampler`` (seeded, reshuffled per epoch; one process and N
    processes of ``batch_size / N`` see the same global batches), in batches of similar aspect
    ratio with one short side per batch from ``scales``, padded by ``PadCollate``. With the
    image cache on, the images are resized to every scale once, in advance, when that takes
    at most ``PRESIZE_BUDGET`` bytes (``AugmentedDetection``'s ``presized``); otherwise per
    batch. ``train_crop`` must be settled (``recipe.plan``: a number of pixels, 0 for whole
    images).

    Raises:
        ValueError: ``train_crop`` is still ``"auto"``."""
    run, seed = settings.train, settings.train.seed
    if run.train_crop == "auto":
        raise ValueError(
            "train_crop is 'auto': settle it first (recipe.plan_training, or "
            "settings.replace(train_crop=recipe.train_crop_size(settings)))"
        )
    crop = int(run.train_crop)
    transform = build_train_transform(run.flip, run.photometric, run.iou_crop, crop)
    presized: Sequence[int] = ()
    if scales and run.cache != "off":
        needed = presized_bytes(train, scales)
        presized = scales if needed <= PRESIZE_BUDGET else ()
        if rank == 0:
            how = "once, in advance" if presized else "per batch (over the memory budget)"
            print(f"Multi-scale: images resized to each short side {how}: {needed / 2**20:.0f} "
                  f"MiB for all scales, budget {PRESIZE_BUDGET / 2**20:.0f} MiB")  # fmt: skip
    items = AugmentedDetection(train, transform, presized)
    sampler = torch.utils.data.DistributedSampler(
        items, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
    )
    ratios = aspect_ratios_of(train) if run.batch_mode == "pad" else [1.0] * len(items)
    batches = AspectRatioBatchSampler(
        sampler, ratios, settings.train.batch_size // world, scales=scales, seed=seed
    )
    return torch.utils.data.DataLoader(
        items, batch_sampler=batches, collate_fn=PadCollate(size_divisible=32),
        num_workers=settings.data.workers, pin_memory=torch.cuda.is_available(),
        persistent_workers=settings.data.workers > 0,
    )  # fmt: skip


def eval_loader(dataset: Any, workers: int) -> torch.utils.data.DataLoader:
    """Evaluation batches: one image each, in order (training: ``train_loader``)."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=1, num_workers=workers, pin_memory=torch.cuda.is_available()
    )


def val_loader(dataset: Any, batch_size: int, workers: int) -> torch.utils.data.DataLoader:
    """Validation batches while training: ``batch_size`` images of similar aspect ratio
    (sorted by it, so little is padded), padded by ``PadCollate``, in a fixed order. The loader
    draws its worker seeds from its own generator, not the global one, so validating does not
    change the training batches that follow."""
    ratios = aspect_ratios_of(dataset)
    order = sorted(range(len(dataset)), key=ratios.__getitem__)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, collate_fn=PadCollate(size_divisible=32),
        num_workers=workers, pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
