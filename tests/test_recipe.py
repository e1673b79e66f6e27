"""What `train` chooses for data nobody tuned for, and that the augmented pipeline resumes
exactly."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from support import Interrupted, write_notebook_files

import detector_cli
import recipe
from eecs598.checkpoint import load_checkpoint
from eecs598.coco import COCODetection
from eecs598.settings import OWN_DATA
from eecs598.shapes import SHAPES_CLASSES, make_shapes_dataset
from eecs598.training import train_detector
from two_stage_detector import RPN, FasterRCNN

TINY = [
    "--image-size", "64", "--fpn-channels", "16", "--batch-size", "4", "--max-iters", "3",
    "--warmup-iters", "1", "--workers", "0", "--pre-nms-topk", "50", "--post-nms-topk", "20",
    "--no-progress", "--no-pretrained", "--rpn-batch-size", "32", "--roi-batch-size", "16",
]  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A VOC-layout folder (the generated shapes, 12 train / 4 val images)."""
    root = tmp_path_factory.mktemp("folder") / "shapes"
    return make_shapes_dataset(root, num_train=12, num_val=4, image_size=64, seed=3)


def test_train_on_a_folder_fits_anchors_prints_its_choices_and_stores_them(
    folder, tmp_path, capsys
):
    classes = ",".join([*SHAPES_CLASSES, "unicorn"])
    with pytest.warns(UserWarning, match="No training boxes for class\\(es\\) unicorn"):
        code = detector_cli.main(
            ["train", "--dataset", str(folder), "--classes", classes, "--out", str(tmp_path), *TINY]
        )
    assert code == 0
    printed = capsys.readouterr().out
    assert "Anchor fit (shape IoU >= 0.6" in printed and "best possible recall" in printed
    assert "Training setup (* = default for this data" in printed
    assert "batches*: whole images, padded to a multiple of 32" in printed
    assert "multi-scale* 48/64/80 per batch" in printed and "horizontal flip" in printed
    checkpoint = load_checkpoint(tmp_path / "checkpoint.pt")
    sizes = checkpoint["config"]["rpn"]["anchor_sizes"]
    assert set(sizes) == {"p3", "p4", "p5"} and all(
        len(v) == len(sizes["p3"]) for v in sizes.values()
    )
    assert sizes["p3"][0] < 8 * 8  # fitted to 5-51 px boxes, not the notebook's 64 px
    assert checkpoint["meta"]["training"]["batch_mode"] == "pad"
    assert checkpoint["meta"]["training"]["multiscale"] is True
    model, _ = recipe.load_detector(tmp_path / "checkpoint.pt")
    assert model.rpn.anchor_sizes == sizes and model.box_regression


def _settings(*flags: str):
    """What ``train`` runs with for these flags."""
    return detector_cli.settings_from_args(
        detector_cli.build_parser().parse_args(["train", *flags])
    )


def test_voc2007_keeps_the_notebooks_settings():
    settings = _settings("--dataset", "voc2007")
    data, model, run = settings.data, settings.model, settings.train
    assert run.batch_mode == "crop" and run.multiscale is False
    assert model.rpn.anchor_stride_scale == 8 and model.heads.box_regression is False
    assert run.grad_clip is None
    assert (model.rpn.batch_size_per_image, model.heads.batch_size_per_image, run.lr) == (
        16, 32, 0.01,
    )  # fmt: skip
    assert model.smooth_l1_beta == 0.0  # the notebook's L1 box losses
    assert model.heads.roi_align_offset == 0.5  # and its half-pixel aligned RoI Align
    assert data.image_size == 224
    given = _settings("--dataset", "some/folder", "--lr", "0.005", "--no-multiscale")
    assert given.train.lr == 0.005 and given.train.multiscale is False
    assert given.model.rpn.anchor_stride_scale == "auto" and given.train.batch_mode == "pad"
    assert given.model.smooth_l1_beta == pytest.approx(1 / 9)
    assert given.model.heads.roi_align_offset == 0.5
    setup = recipe.describe_setup(given.replace(image_size=224), None)
    assert "lr 0.005" in setup and "lr* " not in setup and "batches*: whole images" in setup


@pytest.mark.parametrize(("text", "beta"), [("0", 0.0), ("1/9", 1 / 9), ("0.25", 0.25)])
def test_smooth_l1_beta_flag_reaches_both_stages(text, beta):
    settings = _settings("--dataset", "some/folder", "--smooth-l1-beta", text)
    model = recipe.build_detector(3, settings.model, fpn_channels=8, pretrained=False,
                                  anchor_scale=8.0)  # fmt: skip
    assert model.rpn.smooth_l1_beta == model.smooth_l1_beta == pytest.approx(beta)
    assert model.config["smooth_l1_beta"] == model.config["rpn"]["smooth_l1_beta"]
    loss = "L1" if not beta else f"smooth-L1 (beta {beta:.4g})"
    setup = recipe.describe_setup(settings, None)
    assert f"box loss {loss}" in setup or f"box loss* {loss}" in setup


@pytest.mark.parametrize("text", ["0", "0.5"])
def test_roi_align_offset_flag_reaches_the_second_stage(text):
    settings = _settings("--roi-align-offset", text)
    model = recipe.build_detector(3, settings.model, fpn_channels=8, pretrained=False,
                                  anchor_scale=8.0)  # fmt: skip
    assert model.roi_align_offset == model.config["roi_align_offset"] == float(text)
    assert f"RoI Align offset {float(text):g}" in recipe.describe_setup(settings, None)
    assert recipe.build_detector(3, fpn_channels=8, pretrained=False).roi_align_offset == 0.5


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--fpn-levels", "p6"], "invalid FPN level 'p6': valid levels are p2, p3, p4, p5"),
        (["--anchor-scale", "-1"], "anchor scales must be positive"),
        (["--image-size", "big"], "--image-size must be a number of pixels or 'auto', got 'big'"),
        (["--smooth-l1-beta", "-1"], "--smooth-l1-beta must be a number >= 0"),
        (["--smooth-l1-beta", "1/0"], "--smooth-l1-beta must be a number >= 0"),
        (["--roi-align-offset", "1"], "--roi-align-offset must be a number in [0, 1)"),
        (["--roi-align-offset", "half"], "--roi-align-offset must be a number in [0, 1)"),
    ],
)
def test_bad_flags_are_named(flags, message, capsys):
    with pytest.raises(SystemExit):
        detector_cli.build_parser().parse_args(["train", *flags])
    assert message in capsys.readouterr().err


def test_auto_mixed_with_numbers_and_bad_level_sets_are_errors(folder, tmp_path, capsys):
    code = detector_cli.main(["train", "--dataset", str(folder), "--anchor-scale", "auto", "4",
                              "--out", str(tmp_path), *TINY])  # fmt: skip
    assert (
        code == 1 and "--anchor-scale is 'auto' or numbers, got auto 4" in capsys.readouterr().err
    )
    code = detector_cli.main(["train", "--dataset", str(folder), "--fpn-levels", "p2", "p5",
                              "--out", str(tmp_path), *TINY])  # fmt: skip
    assert code == 1 and "p2, p3, p4, p5" in capsys.readouterr().err


def _record(width: int, height: int, boxes: list[list[float]], classes: list[int]):
    return SimpleNamespace(
        width=width, height=height, boxes=np.array(boxes, np.float32).reshape(-1, 4),
        classes=np.array(classes, np.int64), difficult=np.zeros(len(classes), bool),
    )  # fmt: skip


def test_image_size_auto_looks_at_each_class_median_box():
    big = [_record(640, 480, [[0, 0, 200, 200]], [0])]
    assert recipe.choose_image_size(big, ["a"]) == 224
    # a class of 38 px boxes at 480 px: 20 px needs 253 px, so 256
    cells = big + [_record(640, 480, [[0, 0, 38, 38], [10, 10, 48, 48]], [1, 1])]
    assert recipe.choose_image_size(cells, ["a", "b"]) == 256
    tiny = [_record(640, 480, [[0, 0, 5, 5]], [0])]
    assert recipe.choose_image_size(tiny, ["a"]) == 448  # the largest below the images' 480
    small_images = [_record(200, 150, [[0, 0, 5, 5]], [0])]
    assert recipe.choose_image_size(small_images, ["a"]) == 224  # never above 224
    assert recipe.choose_image_size([], ["a"]) == 224
    no_boxes = [_record(640, 480, [], [])]
    assert recipe.choose_image_size(no_boxes, ["a", "b"]) == 224


def test_image_size_auto_grows_until_the_stride_grid_reaches_the_boxes():
    """One class of 200 px and 40 px squares in 896 px images: its median box passes the box
    rule at 224, but there the 40 px ones (10 px) fall between the anchors of the stride grid;
    the size grows to the first candidate whose grid recall reaches AUTO_GRID_RECALL."""
    rng = np.random.default_rng(0)
    records = []
    for _ in range(6):
        sides = [200] * 6 + [40] * 4
        corners = rng.uniform(0, 896 - 200, (10, 2))
        boxes = [[x, y, x + side, y + side] for (x, y), side in zip(corners, sides, strict=True)]
        records.append(_record(896, 896, boxes, [0] * 10))
    strides = {"p3": 8, "p4": 16, "p5": 32}

    size = recipe.choose_image_size(records, ["a"])

    recall = {s: recipe.grid_recall(records, s, strides, 0.0) for s in recipe.AUTO_IMAGE_SIZES}
    assert recall[224] < recipe.AUTO_GRID_RECALL <= recall[size]
    assert size > 224 and all(recall[s] < recipe.AUTO_GRID_RECALL
                              for s in recipe.AUTO_IMAGE_SIZES if s < size)  # fmt: skip
    # On the stride-4 grid (p2) the small boxes are reached at a smaller size.
    assert recipe.choose_image_size(records, ["a"], {"p2": 4, **strides}) < size


def _pipeline(folder, workers: int):
    settings = _settings(
        "--dataset", str(folder), "--image-size", "64", "--batch-size", "4", "--workers",
        str(workers), "--photometric", "--iou-crop", "--seed", "4",
    )  # fmt: skip
    settings, train, _, _, scales = recipe.training_datasets(settings)
    return recipe.train_loader(settings, train, scales)


def test_epochs_settle_the_iteration_count(folder):
    """--epochs N trains N passes over the training images: N * (images // batch)
    iterations; the setup printout gives both counts."""
    settings = _settings("--dataset", str(folder), "--image-size", "64", "--batch-size", "4",
                         "--epochs", "3")  # fmt: skip
    settled, train, _, _, scales = recipe.training_datasets(settings)
    per_epoch = len(train) // 4
    assert per_epoch >= 1 and settled.train.max_iters == 3 * per_epoch
    assert len(recipe.train_loader(settled, train, scales)) == per_epoch
    setup = recipe.describe_setup(settled, scales, settings, per_epoch)
    assert f"{3 * per_epoch} iterations (3 epochs of {per_epoch} iterations)" in setup
    with pytest.raises(ValueError, match="epochs must be at least 1, got 0"):
        recipe.training_datasets(settings.replace(epochs=0))


def test_train_loader_presizes_every_scale_within_the_memory_budget(folder, monkeypatch, capsys):
    """With the cache on, ``train`` resizes the images to every multi-scale size once when it
    fits the budget, else per batch; the batches are the same either way."""
    presized = _pipeline(folder, 0)
    assert "resized to each short side once, in advance" in capsys.readouterr().out
    assert presized.dataset.presized_bytes > 0
    monkeypatch.setattr(recipe.data, "PRESIZE_BUDGET", 0)
    per_batch = _pipeline(folder, 0)
    assert "per batch (over the memory budget)" in capsys.readouterr().out
    assert per_batch.dataset.presized_bytes == 0
    for ours, reference in zip(presized, per_batch, strict=True):
        assert ours[0] == reference[0]
        assert all(torch.equal(x, y) for x, y in zip(ours[1:], reference[1:], strict=True))


def _model() -> FasterRCNN:
    torch.manual_seed(0)
    sizes = {"p3": [12.0], "p4": [24.0], "p5": [48.0]}
    fit = SimpleNamespace(sizes=sizes, aspect_ratios=[0.5, 1.0, 2.0])  # as an AnchorFit
    model = recipe.build_detector(
        5, fit=fit, fpn_channels=16, pretrained=False, pre_nms_topk=50, post_nms_topk=20,
        box_regression=True,
    )  # fmt: skip
    assert isinstance(model.rpn, RPN)
    return model


@pytest.mark.slow
def test_augmented_padded_pipeline_resumes_exactly_with_persistent_workers(folder, tmp_path):
    """Flips, photometric distortion, IoU crops and one short side per batch, through 2
    persistent workers: a run interrupted after its checkpoint and resumed gives the losses of
    an uninterrupted one (the random choices come from the seeded batch sampler)."""
    kwargs = dict(learning_rate=0.01, max_iters=8, warmup_iters=2, grad_clip=5.0,
                  checkpoint_period=4, log_period=0, show_plot=False, progress=False)  # fmt: skip
    full = train_detector(_model(), _pipeline(folder, 2), checkpoint_path=tmp_path / "a.pt",
                          **kwargs)  # fmt: skip
    model = _model()
    calls, forward = [0], model.forward

    def interrupted_forward(*args, **options):
        calls[0] += 1
        if calls[0] == 6:  # iteration 5, after the checkpoint at 4 (epoch 2 of 3 batches)
            raise Interrupted
        return forward(*args, **options)

    model.forward = interrupted_forward
    with pytest.raises(Interrupted):
        train_detector(model, _pipeline(folder, 2), checkpoint_path=tmp_path / "b.pt", **kwargs)
    torch.manual_seed(123)  # resuming restores every RNG state
    resumed = train_detector(_model(), _pipeline(folder, 2), resume=True,
                             checkpoint_path=tmp_path / "b.pt", **kwargs)  # fmt: skip
    np.testing.assert_allclose(resumed, full, rtol=0, atol=1e-6)


def test_crowded_images_keep_every_box_for_training(tmp_path):
    """A COCO image with 45 objects: the reader keeps its default 40 rows (the largest, with a
    warning); the recipe's training and val readers get a row for each of the 45, without
    warning."""
    import json
    import warnings

    from PIL import Image

    Image.new("RGB", (200, 100), (90, 90, 90)).save(tmp_path / "a.png")
    boxes = [[4 * i, 10, 3, 5 + i % 7] for i in range(45)]
    data = {
        "images": [{"id": 1, "file_name": "a.png", "width": 200, "height": 100}],
        "categories": [{"id": 1, "name": "fish"}],
        "annotations": [
            {"id": i + 1, "image_id": 1, "category_id": 1, "bbox": box, "iscrowd": 0}
            for i, box in enumerate(boxes)
        ],
    }
    (tmp_path / "i.json").write_text(json.dumps(data))
    json_file = str(tmp_path / "i.json")
    settings = OWN_DATA.replace(dataset=json_file, val_dataset=json_file, image_size=100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train, val, classes = recipe.make_datasets(settings, train_transform=False)
        _, _, gt = train[0]
        _, _, val_gt = val[0]
    assert classes == ["fish"] and train.max_boxes == 45 and val.max_boxes == 45
    assert (val_gt[:, 4] == 0).sum() == 45
    assert gt.shape == (45, 5) and (gt[:, 4] == 0).all()
    assert sorted(gt[:, 0].tolist()) == [4.0 * i for i in range(45)]
    plain = COCODetection(tmp_path / "i.json", image_size=100)
    with pytest.warns(UserWarning, match="45 objects but max_boxes=40"):
        assert (plain[0][2][:, 4] >= 0).sum() == 40


# ---- data as exports come: no ImageSets, XML beside the images, no val split ------------------


def _export(root, count: int, side_by_side: bool):
    """``count`` small images of 'cat' (even) and 'dog' (odd): Roboflow's VOC export (XML
    beside the images) or Annotations/ + JPEGImages/ without ImageSets."""
    from PIL import Image
    from support import write_xml

    images = root if side_by_side else root / "JPEGImages"
    annotations = root if side_by_side else root / "Annotations"
    images.mkdir(parents=True, exist_ok=True)
    annotations.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (64, 48), (40 * (i % 6), 90, 120)).save(images / f"p{i:02d}.jpg")
        write_xml(annotations / f"p{i:02d}.xml", f"p{i:02d}.jpg", (64, 48),
                  [(("cat", "dog")[i % 2], (4 + i, 6, 30 + i, 40), 0)])  # fmt: skip
    return root


@pytest.mark.parametrize("side_by_side", [True, False], ids=["side-by-side", "no-ImageSets"])
def test_a_voc_export_without_splits_is_read_and_a_part_held_out(tmp_path, side_by_side):
    root = _export(tmp_path / "export", 20, side_by_side)
    settings = OWN_DATA.replace(dataset=str(root), image_size=48)
    train, val, classes = recipe.make_datasets(settings)
    assert classes == ["cat", "dog"] and val.held_out_from == str(root)
    assert len(val) == 2 and len(train) == 18  # 10%, one image of each class
    assert {int(r.classes[0]) for r in val.records} == {0, 1}
    assert sorted(train.image_ids + val.image_ids) == [f"p{i:02d}" for i in range(20)]
    again_train, again_val, _ = recipe.make_datasets(settings.replace(seed=5))
    assert again_val.image_ids == val.image_ids  # the same split whatever the training seed
    # A val folder given: all of it, nothing held out.
    other = _export(tmp_path / "valid", 3, side_by_side)
    train, val, _ = recipe.make_datasets(settings.replace(val_dataset=str(other)))
    assert (len(train), len(val)) == (20, 3) and not hasattr(val, "held_out_from")


def test_a_coco_export_without_val_dataset_holds_out_part_and_train_saves_the_split(
    tmp_path, capsys
):
    import json

    root = _export(tmp_path / "export", 20, side_by_side=True)
    images = [{"id": i, "file_name": f"p{i:02d}.jpg", "width": 64, "height": 48}
              for i in range(20)]  # fmt: skip
    annotations = [{"id": i + 1, "image_id": i, "category_id": 1 + i % 2,
                    "bbox": [4 + i, 6, 26, 34], "iscrowd": 0} for i in range(20)]  # fmt: skip
    categories = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    coco = root / "_annotations.coco.json"
    coco.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": categories}))  # fmt: skip
    with pytest.warns(UserWarning, match="No --val-dataset: validating on 2 held-out images"):
        train, val, _ = recipe.make_datasets(OWN_DATA.replace(dataset=str(coco), image_size=48))
    assert (len(train), len(val)) == (18, 2) and not set(train.image_ids) & set(val.image_ids)

    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="No --val-dataset"):
        code = detector_cli.main(["train", "--dataset", str(coco), "--out", str(out), *TINY,
                                  "--max-iters", "1", "--image-size", "48"])  # fmt: skip
    assert code == 0
    split = json.loads((out / "split.json").read_text())
    assert split["val"] == val.image_ids and split["train"] == train.image_ids
    assert split["fraction"] == recipe.HELD_OUT_FRACTION
    printed = capsys.readouterr().out
    assert f"validating on 2 held-out images ({', '.join(val.image_ids)})" in printed
    assert "Dataset: 18 train / 2 val images" in printed
    # evaluate scores the data it is given, all of it: nothing is held out there.
    scored = recipe.evaluate(out / "checkpoint.pt", OWN_DATA.replace(
        dataset=str(coco), out=str(tmp_path / "eval"), workers=0))  # fmt: skip
    assert scored["num_val_images"] == 20


# ---- starting from a trained checkpoint (--weights) -------------------------------------------


def _checkpoint_of(model, classes) -> dict:
    return {"model": model.state_dict(), "config": model.config,
            "meta": {"class_names": list(classes)}}  # fmt: skip


def test_start_from_weights_keeps_known_classes_rows_and_names_what_starts_fresh():
    torch.manual_seed(0)
    old = recipe.build_detector(3, fpn_channels=16, pretrained=False, box_regression=True)
    checkpoint = _checkpoint_of(old, ["cat", "dog", "fox"])
    # Other classes, and two anchor ratios per location instead of three.
    new = recipe.build_detector(3, fpn_channels=16, pretrained=False, box_regression=True,
                                anchor_aspect_ratios=(0.5, 2.0))  # fmt: skip
    before = {k: v.clone() for k, v in new.state_dict().items()}
    with pytest.warns(UserWarning) as caught:
        line = recipe.start_from_weights(new, checkpoint, ["fox", "cat", "owl"], "a.pt")
    text = str(caught[0].message)
    assert (
        "layers whose shape differs start fresh: rpn.pred_net.pred_box, rpn.pred_net.pred_obj"
        in text
    )
    assert "classes it was not trained on start fresh: owl" in text
    assert "2 of 3 classes known to it" in line
    saved, now = checkpoint["model"], new.state_dict()
    cls = f"cls_pred.{len(new.cls_pred) - 1}.weight"
    assert torch.equal(now[cls][0], saved[cls][0])  # background
    assert torch.equal(now[cls][1], saved[cls][3]) and torch.equal(now[cls][2], saved[cls][1])
    assert torch.equal(now[cls][3], before[cls][3])  # owl: fresh
    assert torch.equal(now["box_pred.weight"][0:4], saved["box_pred.weight"][8:12])  # fox
    assert torch.equal(now["box_pred.weight"][8:12], before["box_pred.weight"][8:12])  # owl
    assert torch.equal(now["rpn.pred_net.pred_obj.weight"], before["rpn.pred_net.pred_obj.weight"])
    for name, value in now.items():  # everything else is the checkpoint's
        if not name.startswith(("rpn.pred_net.pred_", "cls_pred.", "box_pred")):
            assert torch.equal(value, saved[name]), name


def test_weights_bring_their_network_settings_unless_set(tmp_path):
    model = recipe.build_detector(2, fpn_channels=16, pretrained=False, norm="none")
    checkpoint = _checkpoint_of(model, ["a", "b"])
    settings = OWN_DATA.replace(dataset="some/folder")
    taken = recipe.with_network_of(settings, checkpoint)
    assert (taken.model.backbone.out_channels, taken.model.norm) == (16, "none")
    assert taken.model.heads.box_regression is False  # the checkpoint's, over the preset's
    mine = recipe.with_network_of(settings.replace(fpn_channels=32), checkpoint)
    assert mine.model.backbone.out_channels == 32  # set by the user: kept


@pytest.mark.parametrize("kind", ["missing", "truncated", "foreign"])
def test_bad_weights_file_is_named_and_nothing_is_written(tmp_path, kind, capsys):
    path = tmp_path / "w.pt"
    if kind == "truncated":
        model = recipe.build_detector(2, fpn_channels=16, pretrained=False)
        torch.save(_checkpoint_of(model, ["a", "b"]), path)
        path.write_bytes(path.read_bytes()[:1000])
    elif kind == "foreign":
        torch.save({"model": {}, "something": 1}, path)
    out = tmp_path / "run"
    code = detector_cli.main(["train", "--dataset", "shapes", "--weights", str(path),
                              "--out", str(out)])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert str(path) in err and not out.exists()
    expected = {"missing": "No checkpoint at", "truncated": "truncated, corrupt",
                "foreign": "without a model configuration"}[kind]  # fmt: skip
    assert expected in err


# ---- the notebook's trained model ------------------------------------------------------------


def _same_weights(a, b) -> bool:
    return all(torch.equal(t, b.state_dict()[k]) for k, t in a.state_dict().items())


def test_load_trained_detector_prefers_the_checkpoint_then_the_weights(tmp_path, capsys):
    trained = write_notebook_files(tmp_path, SHAPES_CLASSES, 128)
    model = recipe.load_trained_detector(
        tmp_path / "rcnn_training.pt", tmp_path / "rcnn_detector.pt"
    )
    assert f"Loaded the model trained for 1 iterations from {tmp_path / 'rcnn_training.pt'}" in (
        capsys.readouterr().out
    )
    assert _same_weights(model, trained) and not model.training
    assert model.meta["class_names"] == list(SHAPES_CLASSES) and model.meta["image_size"] == 128

    for weights in (
        "rcnn_detector.pt",
        "old_rcnn_detector.pt",
    ):  # no training checkpoint: the final weights
        model = recipe.load_trained_detector(
            tmp_path / "none.pt", tmp_path / weights, class_names=SHAPES_CLASSES
        )
        printed = capsys.readouterr().out
        assert f"Loaded the weights in {tmp_path / weights} (no training checkpoint at " in printed
        assert _same_weights(model, trained) and model.config == trained.config
        assert model.meta["class_names"] == list(SHAPES_CLASSES)


def test_load_trained_detector_without_files_says_to_train(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        recipe.load_trained_detector(tmp_path / "a.pt", tmp_path / "b.pt")
    message = str(err.value)
    assert f"No checkpoint at {tmp_path / 'a.pt'} and no weights at {tmp_path / 'b.pt'}" in message
    assert "run sections 3.2 (data) and 4.3 (full training)" in message


def test_load_trained_detector_warns_of_other_classes_and_unfinished_training(tmp_path, capsys):
    write_notebook_files(tmp_path, SHAPES_CLASSES, 128)
    checkpoint = torch.load(tmp_path / "rcnn_training.pt", weights_only=True)
    checkpoint["max_iters"] = 9000
    torch.save(checkpoint, tmp_path / "rcnn_training.pt")
    with pytest.warns(UserWarning, match="was trained on the classes red_circle"):
        recipe.load_trained_detector(tmp_path / "rcnn_training.pt", class_names=["a"] * 5)
    assert "training stopped at iteration 1 of 9000" in capsys.readouterr().out


def test_a_bare_state_dict_rebuilds_the_notebooks_model():
    """``state_dict_config`` reads channels, classes and box regression from the weights; the
    rest is section 4.3's model."""
    for channels, classes, box_regression in ((16, 20, False), (32, 3, True)):
        model = recipe.build_detector(classes, fpn_channels=channels, pretrained=False,
                                      box_regression=box_regression)  # fmt: skip
        assert recipe.state_dict_config(model.state_dict()) == model.config
    with pytest.raises(ValueError, match="without a model configuration"):
        recipe.state_dict_config({"conv.weight": torch.zeros(1)}, "x.pt")


def test_a_checkpoint_without_meta_takes_the_datas_class_names(tmp_path, capsys):
    """A training checkpoint written before the notebook's model carried ``meta``: the
    notebook passes its data's class names; without them a 5-class model is refused, naming
    --classes, and a 20-class one gets VOC's."""
    write_notebook_files(tmp_path, SHAPES_CLASSES, 128)
    checkpoint = torch.load(tmp_path / "rcnn_training.pt", weights_only=True)
    checkpoint["meta"] = None
    torch.save(checkpoint, tmp_path / "old_training.pt")
    model = recipe.load_trained_detector(tmp_path / "old_training.pt", class_names=SHAPES_CLASSES)
    assert model.meta["class_names"] == list(SHAPES_CLASSES) and model.meta["image_size"] == 224
    with pytest.raises(ValueError, match="does not record its class names .* --classes"):
        recipe.load_trained_detector(tmp_path / "old_training.pt")
    voc = recipe.build_detector(20, fpn_channels=16, pretrained=False)
    torch.save({"model": voc.state_dict(), "config": voc.config}, tmp_path / "voc.pt")
    assert recipe.read_checkpoint(tmp_path / "voc.pt")["meta"]["class_names"][0] == ("aeroplane")
