"""Tests for eecs598.augment: box-aware augmentation, padded multi-scale batches, and
aspect-ratio batching, on tiny synthetic images."""

from __future__ import annotations

import pickle
from dataclasses import dataclass

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler
from torchvision.transforms import v2

from eecs598.augment import (
    AspectRatioBatchSampler,
    AugmentedDetection,
    ItemKey,
    PadCollate,
    RandomCropAtMost,
    aspect_ratios_of,
    build_train_transform,
    multiscale_sizes,
    presized_bytes,
)
from eecs598.images import normalize_uint8

MAX_BOXES = 6


@dataclass
class Record:
    width: int
    height: int


def coordinate_image(height: int, width: int) -> torch.Tensor:
    """``(3, H, W)`` uint8: channel 0 is the column, channel 1 the row, channel 2 noise, so a
    crop's offset can be read from its top-left pixel."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    noise = torch.randint(0, 256, (height, width), generator=torch.Generator().manual_seed(7))
    return torch.stack([xs, ys, noise]).to(torch.uint8)


def padded(rows: list[list[float]]) -> torch.Tensor:
    out = torch.full((MAX_BOXES, 5), -1.0)
    if rows:
        out[: len(rows)] = torch.tensor(rows, dtype=torch.float32)
    return out


class ToyDetection(torch.utils.data.Dataset):
    """A reader-like dataset: ``load_uint8``, ``records``, ``class_names``."""

    class_names = ("a", "b", "c", "d", "e")

    def __init__(self, sizes: list[tuple[int, int]], rows: list[list[list[float]]] | None = None):
        self.images = [coordinate_image(h, w) for h, w in sizes]
        default = [[1, 1, 5, 4, 0], [3, 2, 8, 6, 2]]
        self.rows = rows if rows is not None else [default] * len(sizes)
        self.records = [Record(width=w, height=h) for h, w in sizes]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.load_uint8(index)

    def load_uint8(self, index: int):
        return f"img{index}.jpg", self.images[index], padded(self.rows[index])


def valid_rows(gt: torch.Tensor) -> torch.Tensor:
    return gt[gt[:, 4] >= 0]


def assert_padding_rows(gt: torch.Tensor) -> None:
    """Valid rows first, then rows that are exactly -1."""
    count = int((gt[:, 4] >= 0).sum())
    assert (gt[:count, 4] >= 0).all()
    assert torch.equal(gt[count:], torch.full_like(gt[count:], -1.0))


# ----------------------------------------------------------------------------------------------
# build_train_transform / AugmentedDetection
# ----------------------------------------------------------------------------------------------


def test_build_train_transform_steps_in_order():
    assert build_train_transform(flip=False) is None
    steps = build_train_transform(flip=True, photometric=True, iou_crop=True).transforms
    kinds = [type(step) for step in steps]
    assert kinds == [
        v2.RandomIoUCrop,
        v2.SanitizeBoundingBoxes,
        v2.RandomPhotometricDistort,
        v2.RandomHorizontalFlip,
    ]
    assert steps[1].min_size == 1 and steps[3].p == 0.5
    only_flip = build_train_transform().transforms  # a flip cuts no box: nothing to sanitise
    assert [type(step) for step in only_flip] == [v2.RandomHorizontalFlip]


def test_forced_flip_mirrors_image_and_boxes():
    data = ToyDetection([(10, 16)], [[[1, 2, 5, 7, 3], [0, 0, 16, 10, 1], [9.5, 1, 12, 3, 0]]])
    path, image, gt = AugmentedDetection(data, v2.RandomHorizontalFlip(p=1.0))[0]
    _, original, original_gt = data.load_uint8(0)
    assert path == "img0.jpg"
    assert image.dtype == torch.uint8 and type(image) is torch.Tensor
    assert torch.equal(image, original.flip(-1))
    width = 16
    expected = original_gt.clone()
    expected[:3, 0] = width - original_gt[:3, 2]
    expected[:3, 2] = width - original_gt[:3, 0]
    assert torch.equal(gt, expected)
    assert gt.shape == (MAX_BOXES, 5) and gt.dtype == torch.float32
    assert_padding_rows(gt)


def test_seeded_flip_is_identity_or_mirror():
    data = ToyDetection([(10, 16)])
    dataset = AugmentedDetection(data, build_train_transform(flip=True))
    _, original, original_gt = data.load_uint8(0)
    flipped = 0
    for seed in range(12):
        torch.manual_seed(seed)
        _, image, gt = dataset[0]
        if torch.equal(image, original):
            assert torch.equal(gt, original_gt)
        else:
            flipped += 1
            assert torch.equal(image, original.flip(-1))
            assert torch.equal(gt[:2, [0, 2]], 16 - original_gt[:2, [2, 0]])
            assert torch.equal(gt[:, [1, 3, 4]], original_gt[:, [1, 3, 4]])
    assert 0 < flipped < 12


def test_iou_crop_drops_cut_boxes_and_keeps_classes_aligned():
    rows = [[1, 1, 6, 5, 0], [20, 2, 30, 12, 1], [40, 25, 47, 31, 2], [10, 14, 24, 28, 3]]
    data = ToyDetection([(32, 48)], [rows])
    dataset = AugmentedDetection(data, build_train_transform(flip=False, iou_crop=True))
    originals = {int(r[4]): torch.tensor(r[:4]) for r in rows}
    dropped_any = cropped_any = False
    for seed in range(30):
        torch.manual_seed(seed)
        _, image, gt = dataset[0]
        height, width = image.shape[-2:]
        left, top = int(image[0, 0, 0]), int(image[1, 0, 0])  # the crop's offset
        cropped_any |= (height, width) != (32, 48)
        assert_padding_rows(gt)
        kept = valid_rows(gt)
        classes = kept[:, 4].long().tolist()
        assert len(set(classes)) == len(classes) and set(classes) <= set(originals)
        dropped_any |= len(classes) < len(rows)
        for box, cls in zip(kept[:, :4], classes, strict=True):
            shift = torch.tensor([left, top, left, top], dtype=torch.float32)
            limit = torch.tensor([width, height, width, height], dtype=torch.float32)
            expected = torch.minimum((originals[cls] - shift).clamp(min=0), limit)
            assert torch.allclose(box, expected), (seed, cls)
            assert (box[2:] - box[:2] >= 1).all()  # no (near) zero-area box survives
    assert dropped_any and cropped_any


@pytest.mark.compat  # torchvision 0.19-0.20 call a transform's methods by their private names
def test_random_crop_at_most_windows_boxes_and_short_sides():
    """Windows of at most 20 x 20 px: a side already shorter (16 px) is kept whole; boxes are
    the originals shifted and clipped to the window (torchvision's crop as reference), boxes
    outside it are dropped with their class; every offset is reachable."""
    rows = [[1, 1, 6, 5, 0], [20, 2, 30, 12, 1], [40, 3, 47, 15, 2], [10, 4, 24, 14, 3]]
    data = ToyDetection([(16, 48)], [rows])
    steps = build_train_transform(flip=False, crop_size=20).transforms
    assert [type(step) for step in steps] == [RandomCropAtMost, v2.SanitizeBoundingBoxes]
    dataset = AugmentedDetection(data, build_train_transform(flip=False, crop_size=20))
    _, original, _ = data.load_uint8(0)
    originals = {int(r[4]): torch.tensor(r[:4]) for r in rows}
    lefts = set()
    for seed in range(300):
        torch.manual_seed(seed)
        _, image, gt = dataset[0]
        assert image.shape == (3, 16, 20)
        left, top = int(image[0, 0, 0]), int(image[1, 0, 0])
        assert top == 0 and torch.equal(image, original[:, :, left : left + 20])
        lefts.add(left)
        assert_padding_rows(gt)
        kept = {int(r[4]): r[:4] for r in valid_rows(gt)}
        for cls, box in originals.items():
            shifted = box - torch.tensor([left, 0, left, 0], dtype=torch.float32)
            clipped = shifted.clone()
            clipped[0::2] = clipped[0::2].clamp(0, 20)
            if clipped[2] - clipped[0] >= 1:
                assert torch.allclose(kept.pop(cls), clipped), (seed, cls)
        assert not kept  # nothing kept that lies outside the window
    assert lefts == set(range(48 - 20 + 1))
    with pytest.raises(ValueError, match="crop size must be positive"):
        RandomCropAtMost(0)


def test_tiny_and_empty_images_survive_every_step():
    data = ToyDetection([(6, 8), (5, 5)], [[[0, 0, 3, 2, 1], [5, 3, 8, 6, 4]], []])
    dataset = AugmentedDetection(data, build_train_transform(True, True, True))
    for seed in range(15):
        torch.manual_seed(seed)
        for index in range(2):
            _, image, gt = dataset[index]
            assert image.dtype == torch.uint8 and image.shape[0] == 3
            assert 1 <= image.shape[1] <= data.images[index].shape[1]
            assert 1 <= image.shape[2] <= data.images[index].shape[2]
            assert gt.shape == (MAX_BOXES, 5)
            assert_padding_rows(gt)
            kept = valid_rows(gt)
            assert (kept[:, 2] <= image.shape[2]).all() and (kept[:, 3] <= image.shape[1]).all()
    _, _, gt = dataset[1]
    assert torch.equal(gt, torch.full((MAX_BOXES, 5), -1.0))


def test_photometric_keeps_dtype_and_shape():
    data = ToyDetection([(12, 20)])
    dataset = AugmentedDetection(data, build_train_transform(flip=False, photometric=True))
    changed = False
    for seed in range(6):
        torch.manual_seed(seed)
        _, image, gt = dataset[0]
        assert image.dtype == torch.uint8 and image.shape == (3, 12, 20)
        assert torch.equal(gt, data.load_uint8(0)[2])
        changed |= not torch.equal(image, data.images[0])
    assert changed


def test_same_seed_same_items_different_seed_differs():
    data = ToyDetection([(24, 32), (30, 20), (16, 16)])
    dataset = AugmentedDetection(data, build_train_transform(True, True, True))

    def items(seed):
        torch.manual_seed(seed)
        return [dataset[i] for i in range(len(dataset))]

    def same(first, second):
        return all(
            a[0] == b[0] and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
            for a, b in zip(first, second, strict=True)
        )

    assert same(items(0), items(0))
    assert not same(items(0), items(1))


def test_no_transform_forwarding_and_pickling():
    data = ToyDetection([(10, 12), (12, 10)])
    plain = AugmentedDetection(data, None)
    assert len(plain) == 2
    for index in range(2):
        for got, want in zip(plain[index], data.load_uint8(index), strict=True):
            assert got == want if isinstance(got, str) else torch.equal(got, want)
    dataset = AugmentedDetection(data, build_train_transform(True, True, True))
    assert dataset.class_names == data.class_names
    assert dataset.records is data.records
    assert torch.equal(dataset.load_uint8(1)[1], data.images[1])
    with pytest.raises(AttributeError):
        _ = dataset.no_such_attribute
    copy = pickle.loads(pickle.dumps(dataset))
    torch.manual_seed(3)
    first = dataset[0]
    torch.manual_seed(3)
    second = copy[0]
    assert torch.equal(first[1], second[1]) and torch.equal(first[2], second[2])


# ----------------------------------------------------------------------------------------------
# PadCollate / multiscale_sizes
# ----------------------------------------------------------------------------------------------


def test_pad_collate_pads_top_left_with_mean_colour():
    data = ToyDetection([(20, 40), (33, 10)], [[[1, 1, 5, 4, 0]], []])
    batch = [data.load_uint8(0), data.load_uint8(1)]
    paths, images, gt, sizes = PadCollate()(batch)
    assert paths == ["img0.jpg", "img1.jpg"]
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.uint8
    assert sizes.dtype == torch.int64 and sizes.tolist() == [[20, 40], [33, 10]]
    assert gt.shape == (2, MAX_BOXES, 5) and gt.dtype == torch.float32
    for i, (h, w) in enumerate(sizes.tolist()):
        assert torch.equal(images[i, :, :h, :w], data.images[i])
        assert torch.equal(gt[i], batch[i][2])
        assert_padding_rows(gt[i])
        mask = torch.ones(64, 64, dtype=torch.bool)
        mask[:h, :w] = False
        pad = images[i][:, mask]
        assert torch.equal(
            pad, torch.tensor([124, 116, 104], dtype=torch.uint8)[:, None].expand_as(pad)
        )
    assert normalize_uint8(images[1, :, -1:, -1:]).abs().max() < 0.01


def test_pad_collate_float_images_plain_batches_and_options():
    images = [torch.randn(3, 16, 16) for _ in range(2)]
    batch = [("a", images[0], padded([[1, 1, 3, 3, 0]])), ("b", images[1], padded([]))]
    _, out, gt, sizes = PadCollate(size_divisible=8)(batch)
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32
    assert torch.equal(out, torch.stack(images))
    assert sizes.tolist() == [[16, 16], [16, 16]]
    _, out, _, _ = PadCollate(size_divisible=32)(batch)
    assert out.shape == (2, 3, 32, 32) and (out[:, :, 16:] == 0).all()
    uneven = [("a", images[0], torch.tensor([[1.0, 1, 3, 3, 0]])), ("b", images[1], padded([]))]
    _, _, gt, _ = PadCollate(size_divisible=8)(uneven)
    assert gt.shape == (2, MAX_BOXES, 5) and torch.equal(gt[0, 1:], torch.full((5, 5), -1.0))
    byte = [("a", torch.zeros(3, 4, 4, dtype=torch.uint8), padded([]))]
    assert PadCollate(pad_value=(1, 2, 3))(byte)[1][0, :, -1, -1].tolist() == [1, 2, 3]
    assert repr(PadCollate(8)).startswith("PadCollate(size_divisible=8")
    with pytest.raises(ValueError):
        PadCollate(0)


def test_seeded_sampler_resizes_each_batch_to_one_short_side():
    data = ToyDetection([(20, 30), (30, 18), (24, 24)])
    batch = [data.load_uint8(i) for i in range(3)]
    scales = (16, 24, 40)
    items, collate = AugmentedDetection(data, None), PadCollate(size_divisible=32)
    seen = set()
    for seed in range(8):
        sampler = AspectRatioBatchSampler(range(3), [1.0] * 3, 3, scales=scales, seed=seed)
        (keys,) = list(sampler)
        assert [key.index for key in keys] == [0, 1, 2]
        _, images, gt, sizes = collate([items[key] for key in keys])
        short = sizes.min(dim=1).values
        assert (short == short[0]).all() and int(short[0]) in scales
        seen.add(int(short[0]))
        assert images.shape[-2] % 32 == 0 and images.shape[-1] % 32 == 0
        for i, (h, w) in enumerate(sizes.tolist()):
            orig_h, orig_w = data.images[i].shape[-2:]
            assert abs(w / h - orig_w / orig_h) < 0.05  # aspect kept
            scale = torch.tensor([w / orig_w, h / orig_h] * 2)
            rows = batch[i][2]
            valid = rows[:, 4] >= 0
            assert torch.allclose(gt[i, valid, :4], rows[valid, :4] * scale, atol=1e-4)
            assert torch.equal(gt[i, valid, 4], rows[valid, 4])
            assert_padding_rows(gt[i])
    assert len(seen) > 1


def test_presized_items_equal_resizing_each_time():
    """``presized``: every item resized to each scale once, in advance, gives the tensors the
    per-item resize gives (flipped or not, by the same seeds); a scale an item already has is
    not stored; ``presized_bytes`` predicts the memory."""
    data = ToyDetection([(20, 30), (30, 18), (24, 24)])
    scales = (16, 24, 40)
    transform = build_train_transform(flip=True)
    each_time = AugmentedDetection(data, transform)
    presized = AugmentedDetection(data, transform, presized=scales)
    assert sorted(presized._presized) == [
        (i, s) for i in range(3) for s in scales if not (i == 2 and s == 24)
    ]
    resized = [AugmentedDetection(data, None)[ItemKey(i, 0, s)][1] for i, s in presized._presized]
    assert {tuple(im.shape[-2:]) for im in resized} >= {(16, 24), (40, 60), (40, 24), (40, 40)}
    images = sum(im.nbytes for im in resized)
    assert presized_bytes(data, scales) == images
    assert presized.presized_bytes == images + 8 * MAX_BOXES * 5 * 4  # + the boxes (float32)
    for index, short_side, seed in [(i, s, seed) for i in range(3) for s in scales
                                    for seed in range(3)]:  # fmt: skip
        key = ItemKey(index, seed, short_side)
        ours, reference = presized[key], each_time[key]
        assert ours[0] == reference[0]
        assert torch.equal(ours[1], reference[1]) and torch.equal(ours[2], reference[2])
        assert min(ours[1].shape[-2:]) == short_side
    stored = presized._presized[0, 16][1].clone()
    presized[ItemKey(0, 0, 16)][2].fill_(7.0)  # callers get a copy of the stored boxes
    assert torch.equal(presized._presized[0, 16][1], stored)
    assert AugmentedDetection(data, None, presized=()).presized_bytes == 0


@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_same_seed_same_batches_whatever_the_workers(workers):
    sizes = [(20, 30), (30, 18), (24, 24), (16, 28), (28, 16), (18, 26)]
    data = AugmentedDetection(ToyDetection(sizes), build_train_transform(True, True, True))

    def one_pass(seed, num_workers=workers, torch_seed=0):
        torch.manual_seed(torch_seed)  # the keys do not depend on the global RNG
        sampler = AspectRatioBatchSampler(
            RandomSampler(range(6), generator=torch.Generator().manual_seed(seed)),
            [1.0] * 6, 2, scales=(16, 24, 32), seed=seed,
        )  # fmt: skip
        loader = DataLoader(
            data, batch_sampler=sampler, num_workers=num_workers, collate_fn=PadCollate()
        )
        return list(loader)

    def same(first, second):
        return all(
            a[0] == b[0] and all(torch.equal(x, y) for x, y in zip(a[1:], b[1:], strict=True))
            for a, b in zip(first, second, strict=True)
        )

    first, second = one_pass(0), one_pass(0, num_workers=2 - workers, torch_seed=5)
    assert len(first) == 3 and same(first, second)
    assert not same(first, one_pass(1))
    for _, images, gt, image_sizes in first:
        assert images.dtype == torch.uint8 and image_sizes.shape == (2, 2)
        assert gt.shape == (2, MAX_BOXES, 5)


def test_multiscale_sizes():
    assert multiscale_sizes(224) == (192, 224, 256)
    assert multiscale_sizes(128) == (96, 112, 128, 144, 160)
    assert multiscale_sizes(200) == (160, 192, 200, 224)
    assert multiscale_sizes(224, spread=0.0) == (224,)
    assert multiscale_sizes(64, spread=0.5, step=32) == (32, 64, 96)
    with pytest.raises(ValueError):
        multiscale_sizes(0)


# ----------------------------------------------------------------------------------------------
# AspectRatioBatchSampler / aspect_ratios_of
# ----------------------------------------------------------------------------------------------

RATIOS = [1.5, 0.5, 1.0, 0.8, 2.0, 0.6, 1.3, 0.7, 1.2, 0.9, 1.1, 0.75, 3.0]  # 7 wide, 6 tall


def check_batches(sampler, batches, batch_size, pure):
    assert len(batches) == len(sampler)
    assert all(len(batch) == batch_size for batch in batches)
    flat = [i for batch in batches for i in batch]
    assert len(flat) == len(set(flat))
    groups = [{RATIOS[i] >= 1 for i in batch} for batch in batches]
    assert sum(len(g) > 1 for g in groups) <= (0 if pure else 1)


def test_aspect_ratio_batches_stay_in_one_group():
    torch.manual_seed(0)
    sampler = AspectRatioBatchSampler(RandomSampler(range(13)), RATIOS, batch_size=3)
    batches = list(sampler)
    check_batches(sampler, batches, 3, pure=True)
    assert len(batches) == 4  # 7 // 3 + 6 // 3; the leftover wide index is dropped


def test_aspect_ratio_leftovers_join_into_full_batches():
    sampler = AspectRatioBatchSampler(SequentialSampler(range(13)), RATIOS, batch_size=4)
    batches = list(sampler)
    check_batches(sampler, batches, 4, pure=False)
    # a batch as soon as its group fills, in sampler order; then the joined leftovers
    assert batches == [[0, 2, 4, 6], [1, 3, 5, 7], [9, 11, 8, 10]]


def test_aspect_ratio_log_spaced_bins():
    edges = (0.7, 1.0, 1.4)
    sampler = AspectRatioBatchSampler(range(13), RATIOS, 2, boundaries=edges)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 6  # bins of 2, 4, 4, 3 indices; one dropped
    for batch in batches:
        assert len({sum(RATIOS[i] >= edge for edge in edges) for i in batch}) == 1


def test_len_leaves_random_draws_alone():
    generator = torch.Generator().manual_seed(5)
    sampler = AspectRatioBatchSampler(RandomSampler(range(13), generator=generator), RATIOS, 2)
    torch.manual_seed(1)
    expected_draw = torch.rand(1)
    expected_order = list(
        AspectRatioBatchSampler(
            RandomSampler(range(13), generator=torch.Generator().manual_seed(5)), RATIOS, 2
        )
    )
    torch.manual_seed(1)
    assert len(sampler) == 6
    assert torch.equal(torch.rand(1), expected_draw)
    assert list(sampler) == expected_order


def test_set_epoch_reaches_distributed_sampler():
    dist = DistributedSampler(range(13), num_replicas=2, rank=0, shuffle=True, seed=0)
    sampler = AspectRatioBatchSampler(dist, RATIOS, batch_size=2)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    assert dist.epoch == 1
    epoch1 = list(sampler)
    assert epoch0 != epoch1
    check_batches(sampler, epoch1, 2, pure=False)
    AspectRatioBatchSampler(range(4), RATIOS, 2).set_epoch(3)  # no set_epoch: nothing to do


def test_aspect_ratios_of_records_and_images():
    data = ToyDetection([(10, 20), (30, 15)])
    assert aspect_ratios_of(AugmentedDetection(data, None)) == [2.0, 0.5]
    data.records = None
    assert aspect_ratios_of(data) == [2.0, 0.5]


def test_seeded_sampler_keys_change_with_the_epoch_and_replay_exactly():
    dist = DistributedSampler(range(13), num_replicas=1, rank=0, shuffle=True, seed=0)
    sampler = AspectRatioBatchSampler(dist, RATIOS, 2, scales=(16, 32), seed=3)
    epoch0 = list(sampler)
    assert all(isinstance(key.seed, int) and key.short_side in (16, 32)
               for batch in epoch0 for key in batch)  # fmt: skip
    assert all(len({key.short_side for key in batch}) == 1 for batch in epoch0)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch0 != epoch1
    sampler.set_epoch(0)
    assert list(sampler) == epoch0
    with pytest.raises(ValueError, match="with a seed"):
        AspectRatioBatchSampler(dist, RATIOS, 2, scales=(16,))


def test_keyed_item_leaves_the_global_rng_alone():
    data = AugmentedDetection(ToyDetection([(20, 30)]), build_train_transform(True, True, True))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    first = data[ItemKey(0, 123, None)]
    assert torch.equal(torch.rand(3), expected)
    again = data[ItemKey(0, 123, None)]
    assert torch.equal(first[1], again[1]) and torch.equal(first[2], again[2])


def test_reader_transform_argument_augments_items_but_not_the_cache(tmp_path):
    from eecs598.shapes import SHAPES_CLASSES, make_shapes_dataset
    from eecs598.voc import VOCLayoutDetection

    make_shapes_dataset(tmp_path, num_train=2, num_val=1, image_size=48, seed=0)
    plain = VOCLayoutDetection(tmp_path, "train", SHAPES_CLASSES, image_size=48)
    flip = v2.Compose([v2.RandomHorizontalFlip(p=1.0), v2.SanitizeBoundingBoxes(
        min_size=1, labels_getter=lambda inputs: inputs[1]["labels"])])  # fmt: skip
    flipped = VOCLayoutDetection(tmp_path, "train", SHAPES_CLASSES, image_size=48, transform=flip)
    _, image, gt = plain[0]
    _, f_image, f_gt = flipped[0]
    assert torch.equal(f_image, image.flip(-1))
    rows = valid_rows(gt)
    expected = torch.stack(
        [48 - rows[:, 2], rows[:, 1], 48 - rows[:, 0], rows[:, 3], rows[:, 4]], 1
    )
    torch.testing.assert_close(valid_rows(f_gt), expected)
    assert torch.equal(flipped.load_uint8(0)[1], plain.load_uint8(0)[1])  # the cache's input
