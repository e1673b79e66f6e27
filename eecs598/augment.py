"""Box-aware training augmentation, padded batches of any size, and aspect-ratio batching.

The pieces, each usable on its own:

* :func:`build_train_transform` composes ``torchvision.transforms.v2`` steps (SSD-style IoU
  crop, photometric distortion, horizontal flip, box sanitising). The image travels as a
  ``tv_tensors.Image`` and the boxes as ``tv_tensors.BoundingBoxes``, so the library moves
  the boxes with the pixels: this module has no box geometry of its own.
* :class:`AugmentedDetection` applies such a transform to a dataset's uint8 items
  (``load_uint8``), after resizing an item to the short side its key asks for (multi-scale
  training), and re-pads ``gt_boxes`` to the dataset's ``max_boxes`` rows. Items stay uint8
  (a quarter of the bytes to send from DataLoader workers); the training loop normalises
  them on its device.
* :class:`PadCollate` batches images of different sizes (aspect-preserving items, or after a
  crop): each is placed at the top-left of a canvas whose sides are multiples of
  ``size_divisible``, and the batch carries ``image_sizes`` (the true ``(h, w)`` of each
  image), which ``FasterRCNN`` clips proposals and detections to.
* :class:`AspectRatioBatchSampler` batches landscape images with landscape ones and portrait
  with portrait, so little of a padded batch is padding; :func:`aspect_ratios_of` reads the
  ratios from a dataset's records without decoding images. With a ``seed`` it also draws
  each batch's short side (from ``scales``, :func:`multiscale_sizes`) and a seed for each
  item's transform, and yields :class:`ItemKey` s instead of bare indices.

Randomness. With a seeded :class:`AspectRatioBatchSampler` every random choice of a batch
(its short side, each item's flip or crop) is drawn in the main process from a generator
seeded by ``(seed, epoch)``, and each item's transform runs under its own seed. Batches are
then the same whatever the number of workers, whether workers persist between epochs, and
after resuming from a checkpoint mid-epoch (the sampler is replayed to the same position).
Read by a bare index, an item's transform uses torch's global RNG (in a DataLoader worker, the
worker's seeded RNG).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

try:
    from torchvision.transforms.v2 import query_size
except ImportError:  # torchvision 0.19-0.20 keep it private
    from torchvision.transforms.v2._utils import query_size

from .images import IMAGENET_MEAN, short_side_size

__all__ = [
    "AspectRatioBatchSampler",
    "AugmentedDetection",
    "ItemKey",
    "PadCollate",
    "RandomCropAtMost",
    "apply_transform",
    "aspect_ratios_of",
    "build_train_transform",
    "multiscale_sizes",
    "presized_bytes",
]

#: The ImageNet mean colour as uint8: padding with it gives ~0 after ``normalize_uint8``.
MEAN_UINT8: tuple[int, ...] = tuple(int(round(255 * m)) for m in IMAGENET_MEAN)


# ----------------------------------------------------------------------------------------------
# Transform and augmented items
# ----------------------------------------------------------------------------------------------


class ItemKey(NamedTuple):
    """What a seeded :class:`AspectRatioBatchSampler` yields for one item of a batch.

    Attributes:
        index: the dataset index.
        seed: the seed of the item's random transform.
        short_side: the batch's short side (multi-scale training), or ``None`` for the
            item's own size.
    """

    index: int
    seed: int
    short_side: int | None


class RandomCropAtMost(v2.Transform):
    """A random window of at most ``size x size`` pixels, placed uniformly; a side already
    shorter than ``size`` is kept whole (never padded, so nothing is computed on padding).

    Boxes move with the pixels and are clipped to the window by ``v2.functional.crop``; a
    :class:`~torchvision.transforms.v2.SanitizeBoundingBoxes` step must follow to drop those
    left outside it.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"crop size must be positive, got {size}")
        self.size = int(size)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = query_size(flat_inputs)
        crop_h, crop_w = min(self.size, height), min(self.size, width)
        top = int(torch.randint(0, height - crop_h + 1, size=()))
        left = int(torch.randint(0, width - crop_w + 1, size=()))
        return dict(top=top, left=left, height=crop_h, width=crop_w)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)

    # torchvision 0.19-0.20 call the two methods by their private names (public from 0.21).
    _get_params = make_params
    _transform = transform

    def extra_repr(self) -> str:
        return f"size={self.size}"


def build_train_transform(
    flip: bool = True, photometric: bool = False, iou_crop: bool = False, crop_size: int = 0
) -> v2.Transform | None:
    """The training augmentation as a ``v2.Compose``; ``None`` when every step is off.

    Steps, in this order:

    0. ``crop_size > 0``: :class:`RandomCropAtMost`, a random window of at most
       ``crop_size x crop_size`` px of the (resized) image, then the sanitising step below.
       Training then costs what ``crop_size`` images cost while the objects keep the size
       the image size gives them.
    1. ``iou_crop``: ``v2.RandomIoUCrop()``, the SSD crop: a random crop (0.3-1x of each side,
       aspect 0.5-2) that overlaps some box by at least a random IoU from
       ``{0, 0.1, 0.3, 0.5, 0.7, 0.9}``, or the whole image. Boxes whose centre falls outside
       the crop are zeroed, then ``v2.SanitizeBoundingBoxes(min_size=1)`` drops every box
       narrower or lower than 1 px together with its label (the ``"labels"`` entry of the
       target); the crop requires such a step after it. Items change size: batch them with
       :class:`PadCollate`.
    2. ``photometric``: ``v2.RandomPhotometricDistort()``: random brightness, contrast,
       saturation, hue and channel order, on uint8 images; boxes untouched.
    3. ``flip``: ``v2.RandomHorizontalFlip(0.5)``; boxes become ``W - x2, y1, W - x1, y2``.

    Without the crop there is no sanitising step: a flip keeps every box's size, and the step
    costs more than the flip itself (about 0.5 ms an item).
    """
    steps: list[v2.Transform] = []
    if crop_size:
        steps.append(RandomCropAtMost(crop_size))
        steps.append(v2.SanitizeBoundingBoxes(min_size=1, labels_getter=_target_labels))
    if iou_crop:
        steps.append(v2.RandomIoUCrop())
        steps.append(v2.SanitizeBoundingBoxes(min_size=1, labels_getter=_target_labels))
    if photometric:
        steps.append(v2.RandomPhotometricDistort())
    if flip:
        steps.append(v2.RandomHorizontalFlip(0.5))
    return v2.Compose(steps) if steps else None


def _target_labels(inputs: Any) -> torch.Tensor:
    """``labels_getter`` of the sanitising step: the labels of an ``(image, target)`` input.

    A module-level function (not a lambda) so that the transform pickles for DataLoader workers.
    """
    return inputs[1]["labels"]


def apply_transform(
    transform: v2.Transform, image: torch.Tensor, gt_boxes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a box-aware v2 ``transform`` on one item, on the global RNG.

    Args:
        transform: called as ``transform(tv_tensors.Image, {"boxes": BoundingBoxes (XYXY),
            "labels": (N,)})``, e.g. :func:`build_train_transform`.
        image: ``(3, H, W)`` uint8.
        gt_boxes: ``(max_boxes, 5)`` rows ``x1, y1, x2, y2, class``, padding rows ``-1``.

    Returns:
        ``(image (3, H', W') uint8, gt_boxes (max_boxes, 5))``: the surviving boxes with their
        classes first, re-padded with ``-1``.
    """
    valid = gt_boxes[:, 4] >= 0
    height, width = image.shape[-2:]
    target = {
        "boxes": tv_tensors.BoundingBoxes(
            gt_boxes[valid, :4], format="XYXY", canvas_size=(height, width)
        ),
        "labels": gt_boxes[valid, 4],
    }
    out_image, out_target = transform(tv_tensors.Image(image), target)
    boxes = out_target["boxes"].as_subclass(torch.Tensor)
    rows = _repad(boxes, out_target["labels"], gt_boxes.shape[0])
    return out_image.as_subclass(torch.Tensor), rows


def _repad(boxes: torch.Tensor, labels: torch.Tensor, max_boxes: int) -> torch.Tensor:
    """``(N, 4)`` boxes and ``(N,)`` labels as ``(max_boxes, 5)`` rows, padding rows ``-1``."""
    out = torch.full((max_boxes, 5), -1.0, dtype=torch.float32)
    count = boxes.shape[0]
    out[:count, :4] = boxes
    out[:count, 4] = labels
    return out


class AugmentedDetection(torch.utils.data.Dataset):
    """A dataset's uint8 items with a box-aware ``transform`` applied each time they are read.

    Items are ``(image_path, image (3, H', W') uint8, gt_boxes (max_boxes, 5))``: the image
    and the valid rows of ``gt_boxes`` went through ``transform`` (their classes with them, as
    the ``"labels"`` of a target dict, so a sanitising step drops a class with its box), and
    the surviving rows are re-padded with ``-1`` to the input's ``max_boxes`` rows. An image
    without any valid box stays valid (all rows padding). With ``transform=None`` items are
    the wrapped dataset's ``load_uint8`` items unchanged (but resized, for a key that asks).

    Keys: a bare index runs the transform on torch's global RNG; an :class:`ItemKey` first
    resizes the item to its ``short_side`` (bilinear, antialiased, aspect kept; the boxes
    with it), then runs the transform with the CPU generator seeded by ``key.seed`` (only the
    CPU one: ``torch.manual_seed`` would also queue a lazy CUDA seeding, which records a stack
    trace, about 2 ms an item); in the main process the global RNG is left as it was
    (``fork_rng``), in a DataLoader worker, whose RNG serves nothing else, it is simply
    reseeded.

    Resizing costs about half a millisecond an item, more than the rest of the pipeline.
    With ``presized`` short sides, every item is resized to each of them once, when the
    dataset is made, and a key asking for one of them reads the stored result: the same
    tensors the on-the-fly resize gives, for ``presized_bytes`` more memory (DataLoader
    workers forked from the main process share it).

    :meth:`load_uint8` gives the un-augmented item, and attribute lookups this class does not
    answer (``class_names``, ``annotation``, ``records``, ``image_size``, ...) go to the
    wrapped dataset. Picklable, for DataLoader workers.

    Args:
        dataset: a reader or a :class:`~eecs598.cache.CachedDetection`: anything with
            ``load_uint8(index) -> (path, image (3, H, W) uint8, gt_boxes (max_boxes, 5))``
            and ``__len__``.
        transform: a v2 transform called as ``transform(image, {"boxes": ..., "labels": ...})``
            with a ``tv_tensors.Image`` and ``tv_tensors.BoundingBoxes`` (XYXY), e.g. from
            :func:`build_train_transform`; ``None`` for no augmentation.
        presized: short sides to resize every item to once, in advance (e.g. the
            multi-scale sizes); sizes an item already has are not stored again.
    """

    def __init__(
        self, dataset: Any, transform: v2.Transform | None, presized: Sequence[int] = ()
    ) -> None:
        super().__init__()
        self.dataset = dataset
        self.transform = transform
        self._presized: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        for index in range(len(dataset) if presized else 0):
            _, image, gt_boxes = dataset.load_uint8(index)
            for short_side in sorted(set(presized)):
                resized = _resize_item(image, gt_boxes, short_side)
                if resized[0] is not image:
                    self._presized[index, short_side] = resized
        self.presized_bytes = sum(im.nbytes + gt.nbytes for im, gt in self._presized.values())

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | ItemKey) -> tuple[str, torch.Tensor, torch.Tensor]:
        """``(image_path, image (3, H', W') uint8, gt_boxes (max_boxes, 5))``, augmented."""
        index, seed, short_side = key if isinstance(key, ItemKey) else (key, None, None)
        path, image, gt_boxes = self.dataset.load_uint8(index)
        if (index, short_side) in self._presized:
            image, gt_boxes = self._presized[index, short_side]
            gt_boxes = gt_boxes.clone()
        elif short_side is not None:
            image, gt_boxes = _resize_item(image, gt_boxes, short_side)
        if self.transform is None:
            return path, image, gt_boxes
        if seed is None:
            return self._transform(path, image, gt_boxes)
        if torch.utils.data.get_worker_info() is not None:
            torch.default_generator.manual_seed(seed)  # a worker's own RNG: nothing else uses it
            return self._transform(path, image, gt_boxes)
        with torch.random.fork_rng(devices=[]):  # the main process: keep the training RNG
            torch.default_generator.manual_seed(seed)
            return self._transform(path, image, gt_boxes)

    def _transform(
        self, path: str, image: torch.Tensor, gt_boxes: torch.Tensor
    ) -> tuple[str, torch.Tensor, torch.Tensor]:
        return (path, *apply_transform(self.transform, image, gt_boxes))

    def load_uint8(self, index: int) -> tuple[str, torch.Tensor, torch.Tensor]:
        """The wrapped dataset's un-augmented ``(image_path, image uint8, gt_boxes)``."""
        return self.dataset.load_uint8(index)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("dataset", "transform", "_presized"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __repr__(self) -> str:
        return f"AugmentedDetection({self.dataset!r}, transform={self.transform!r})"


# ----------------------------------------------------------------------------------------------
# Multi-scale sizes and padded batches
# ----------------------------------------------------------------------------------------------


def multiscale_sizes(
    image_size: int, spread: float = 0.25, step: int | None = None
) -> tuple[int, ...]:
    """Short sides for multi-scale training around ``image_size``, sorted and unique.

    The multiples of ``step`` within ``[image_size * (1 - spread), image_size * (1 + spread)]``,
    and ``image_size`` itself: ``224 -> (192, 224, 256)``, ``128 -> (96, 112, 128, 144, 160)``.

    Args:
        image_size: the training short side.
        spread: the relative half-width of the range, in ``[0, 1)``.
        step: the spacing of the sizes; default 32 for ``image_size >= 192``, else 16.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if not 0 <= spread < 1:
        raise ValueError(f"spread must be in [0, 1), got {spread}")
    step = step if step is not None else (32 if image_size >= 192 else 16)
    if step < 1:
        raise ValueError(f"step must be positive, got {step}")
    low = math.ceil(image_size * (1 - spread) / step - 1e-9)
    high = math.floor(image_size * (1 + spread) / step + 1e-9)
    sizes = {k * step for k in range(max(low, 1), high + 1)} | {image_size}
    return tuple(sorted(sizes))


def _resize_item(
    image: torch.Tensor, gt_boxes: torch.Tensor, short_side: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize ``image (C, H, W)`` so its short side is ``short_side`` (aspect kept, long side
    rounded) and scale the valid rows of ``gt_boxes (M, 5)`` with it; padding rows stay -1."""
    height, width = image.shape[-2:]
    new_w, new_h = short_side_size(width, height, short_side)
    if (new_h, new_w) == (height, width):
        return image, gt_boxes
    size = [new_h, new_w]
    resized = F.resize(
        tv_tensors.Image(image),
        size,
        interpolation=v2.InterpolationMode.BILINEAR,
        antialias=True,
    )
    valid = gt_boxes[:, 4] >= 0
    boxes = tv_tensors.BoundingBoxes(
        gt_boxes[valid, :4], format="XYXY", canvas_size=(height, width)
    )
    rows = gt_boxes.clone()
    rows[valid, :4] = F.resize(boxes, size).as_subclass(torch.Tensor)
    return resized.as_subclass(torch.Tensor), rows


def presized_bytes(dataset: Any, short_sides: Sequence[int]) -> int:
    """The memory :class:`AugmentedDetection` needs to store ``dataset``'s uint8 images
    resized to each of ``short_sides`` (``presized``), from the images' sizes alone."""
    total = 0
    for index in range(len(dataset)):
        _, image, _ = dataset.load_uint8(index)
        height, width = image.shape[-2:]
        for short_side in sorted(set(short_sides)):
            new_w, new_h = short_side_size(width, height, short_side)
            if (new_h, new_w) != (height, width):
                total += image.shape[0] * new_h * new_w * image.element_size()
    return total


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class PadCollate:
    """``collate_fn`` for images of different sizes: pad them into one batch.

    Each image is placed at the top-left of a ``(Hp, Wp)`` canvas, the largest height and
    width of the batch rounded up to multiples of ``size_divisible``; the rest is
    ``pad_value``. The batch also carries each image's true size, so that the model can
    ignore the padding. (Multi-scale resizing happens before, per item:
    :class:`AugmentedDetection` with the keys of a seeded :class:`AspectRatioBatchSampler`.)

    Args:
        size_divisible: the padded sides are multiples of this (the trunk's stride).
        pad_value: per-channel fill of uint8 images; default the ImageNet mean colour
            (~0 after ``normalize_uint8``). Float (already normalised) images are padded
            with 0.0.

    Call it on a list of ``(path, image (3, H_i, W_i), gt_boxes (M_i, 5))`` items; it returns
    ``(paths list[str], images (B, 3, Hp, Wp), gt_boxes (B, M, 5) float32, image_sizes (B, 2)
    int64)`` with ``image_sizes`` rows ``(h, w)`` and ``M = max M_i`` (shorter ``gt_boxes``
    are padded with ``-1`` rows).
    """

    def __init__(self, size_divisible: int = 32, pad_value: Sequence[int] | None = None) -> None:
        if size_divisible < 1:
            raise ValueError(f"size_divisible must be positive, got {size_divisible}")
        self.size_divisible = int(size_divisible)
        self.pad_value = tuple(int(v) for v in (pad_value if pad_value is not None else MEAN_UINT8))

    def _canvas(self, images: list[torch.Tensor]) -> torch.Tensor:
        """``(B, C, Hp, Wp)`` filled with the padding value of the images' dtype."""
        height = _round_up(max(im.shape[-2] for im in images), self.size_divisible)
        width = _round_up(max(im.shape[-1] for im in images), self.size_divisible)
        channels, dtype = images[0].shape[0], images[0].dtype
        canvas = torch.empty((len(images), channels, height, width), dtype=dtype)
        if dtype.is_floating_point:
            return canvas.fill_(0.0)
        fill = torch.tensor(self.pad_value, dtype=dtype)
        canvas[:] = fill.view(1, -1, 1, 1) if fill.numel() > 1 else fill
        return canvas

    def __call__(
        self, batch: Sequence[tuple[str, torch.Tensor, torch.Tensor]]
    ) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
        if len(batch) == 0:
            raise ValueError("PadCollate got an empty batch")
        paths, images, boxes = (list(column) for column in zip(*batch, strict=True))
        canvas = self._canvas(images)
        for out, image in zip(canvas, images, strict=True):
            out[:, : image.shape[-2], : image.shape[-1]] = image
        max_boxes = max(b.shape[0] for b in boxes)
        gt = torch.full((len(boxes), max_boxes, 5), -1.0, dtype=torch.float32)
        for out, rows in zip(gt, boxes, strict=True):
            out[: rows.shape[0]] = rows
        sizes = torch.tensor([list(im.shape[-2:]) for im in images], dtype=torch.int64)
        return paths, canvas, gt, sizes.view(-1, 2)

    def __repr__(self) -> str:
        return f"PadCollate(size_divisible={self.size_divisible}, pad_value={self.pad_value})"


# ----------------------------------------------------------------------------------------------
# Aspect-ratio batching
# ----------------------------------------------------------------------------------------------


def aspect_ratios_of(dataset: Any) -> list[float]:
    """``width / height`` of each item of ``dataset``, read cheaply where possible.

    From ``dataset.records`` (each with ``.width`` and ``.height``, the original image size:
    the readers' resize keeps the aspect ratio; found through wrappers such as
    :class:`AugmentedDetection` and ``CachedDetection`` by their attribute forwarding), else
    from the shapes of the ``load_uint8(i)`` images (decodes every image once).
    """
    records = getattr(dataset, "records", None)
    if records is not None and len(records) == len(dataset):
        return [record.width / record.height for record in records]
    ratios = []
    for index in range(len(dataset)):
        image = dataset.load_uint8(index)[1]
        ratios.append(image.shape[-1] / image.shape[-2])
    return ratios


class AspectRatioBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of indices whose images have similar aspect ratios, so padding stays small.

    Groups: by default two, landscape (``w / h >= 1``) and portrait (``w / h < 1``): the
    split that matters for padding (a landscape and a portrait image in one batch pad each
    other to a square) and that keeps every group large, so batches fill quickly. Finer
    groups can be given as ``boundaries``, e.g. log-spaced ``(0.5, 0.75, 1.0, 1.33, 2.0)``;
    group ``g`` holds ratios in ``[boundaries[g-1], boundaries[g])``.

    Indices are taken in the order ``sampler`` yields them; a batch is yielded as soon as its
    group holds ``batch_size`` indices. At the end of a pass the groups' leftovers (fewer than
    ``batch_size`` each) are joined, in group order, into as many full batches as they make
    (these may mix groups), and what cannot fill a whole batch is dropped (``drop_last``), so
    every batch has exactly ``batch_size`` indices and each index appears at most once per
    pass.

    Seeded (``seed`` given), each batch is a list of :class:`ItemKey` instead: per batch, a
    short side drawn uniformly from ``scales`` (``None`` without scales) and per item a
    transform seed, all from a generator seeded by ``(seed, epoch)`` (:meth:`set_epoch`), in
    the main process. The same seed and epoch give the same keys, so resuming mid-epoch
    (replaying the pass) gives the same batches. Behind a ``DistributedSampler`` (N
    processes, batches of ``B / N``) every process draws the seeds of the whole global batch
    and takes its own (``rank::N``, where the sampler puts its items): while aspect grouping
    does not reorder the indices, one process with batch ``B`` and N processes with ``B / N``
    see the same global batches.

    Args:
        sampler: yields dataset indices, e.g. ``RandomSampler`` or ``DistributedSampler``.
        aspect_ratios: ``w / h`` per dataset index (:func:`aspect_ratios_of`).
        batch_size: indices per batch.
        boundaries: increasing ratios separating the groups.
        scales: short sides for multi-scale training (:func:`multiscale_sizes`); needs ``seed``.
        seed: yield :class:`ItemKey` s drawn from this seed; ``None`` yields bare indices.
    """

    def __init__(
        self,
        sampler: Any,
        aspect_ratios: Sequence[float],
        batch_size: int,
        boundaries: Sequence[float] = (1.0,),
        *,
        scales: Sequence[int] | None = None,
        seed: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if scales is not None and (len(scales) == 0 or min(scales) < 1 or seed is None):
            raise ValueError(f"scales must be positive short sides, with a seed; got {scales}")
        self.scales = tuple(int(s) for s in scales) if scales is not None else None
        self.seed = seed
        self.epoch = 0
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self.boundaries = tuple(float(b) for b in boundaries)
        self.num_groups = len(self.boundaries) + 1
        ratios = torch.as_tensor(list(aspect_ratios), dtype=torch.float64)
        edges = torch.tensor(self.boundaries, dtype=torch.float64)
        self.group_ids: list[int] = torch.bucketize(ratios, edges, right=True).tolist()

    def __iter__(self) -> Iterator[list[int] | list[ItemKey]]:
        if self.seed is None:
            yield from self._index_batches()
            return
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        world = int(getattr(self.sampler, "num_replicas", 1))
        rank = int(getattr(self.sampler, "rank", 0))
        for batch in self._index_batches():
            short_side = None
            if self.scales is not None:
                short_side = self.scales[
                    int(torch.randint(len(self.scales), (), generator=generator))
                ]
            # The seeds of the whole global batch; this process's items sit at rank::world.
            seeds = torch.randint(2**62, (world * len(batch),), generator=generator)
            seeds = seeds[rank::world].tolist()
            yield [ItemKey(i, s, short_side) for i, s in zip(batch, seeds, strict=True)]

    def _index_batches(self) -> Iterator[list[int]]:
        """The batches of dataset indices (see the class docstring)."""
        pending: list[list[int]] = [[] for _ in range(self.num_groups)]
        for index in self.sampler:
            group = pending[self.group_ids[index]]
            group.append(int(index))
            if len(group) == self.batch_size:
                yield group[:]
                group.clear()
        leftovers = [index for group in pending for index in group]
        for start in range(0, len(leftovers) - self.batch_size + 1, self.batch_size):
            yield leftovers[start : start + self.batch_size]

    def _group_counts(self) -> list[int]:
        """How many indices of each group the next pass yields (the sampler's RNG untouched).

        The sampler is iterated once with the global RNG state and its own ``generator``'s
        state saved and restored, so taking ``len`` changes no later random draw.
        """
        generator = getattr(self.sampler, "generator", None)
        saved = generator.get_state() if isinstance(generator, torch.Generator) else None
        with torch.random.fork_rng(devices=[]):
            indices = torch.as_tensor(list(self.sampler), dtype=torch.int64)
        if saved is not None:
            generator.set_state(saved)
        groups = torch.as_tensor(self.group_ids, dtype=torch.int64)[indices]
        return torch.bincount(groups, minlength=self.num_groups).tolist()

    def __len__(self) -> int:
        counts = self._group_counts()
        full = sum(count // self.batch_size for count in counts)
        return full + sum(count % self.batch_size for count in counts) // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch of the keys' generator and forward it to the sampler (a
        ``DistributedSampler`` reshuffles with it)."""
        self.epoch = int(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
