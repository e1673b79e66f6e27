"""Reliability of the model and the training loop (issue 6, "Model and training", and the
data cases that need the model: empty, tiny and elongated images).

Cases already covered elsewhere: wrong ranks, non-float images, bad gt shapes and class ids
(``test_two_stage_detector.test_faster_rcnn_bad_input``); a NaN loss stops naming the iteration
and terms and keeps the last good checkpoint
(``test_eecs598_training.test_non_finite_loss_stops_with_named_terms``); an in-process crash then
resume equals an uninterrupted run (``test_resume_matches_uninterrupted_run``); a mismatched
checkpoint in ``eecs598.checkpoint.load_model_weights``
(``test_mismatched_checkpoint_names_the_settings``).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reliability_child import SmallNet, seed_all, train_small
from support import noise_image, write_dataset

import detector_cli
from a4_helper import (
    ShapesDetection,
    VOCLayoutDetection,
    inference_with_detector,
    load_checkpoint,
    make_shapes_dataset,
    train_detector,
)
from common import DetectorBackboneWithFPN
from eecs598.training import flush_denormal_enabled
from two_stage_detector import RPN, FasterRCNN

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
CHILD = Path(__file__).with_name("reliability_child.py")
QUIET = {"show_plot": False, "progress": False, "log_period": 0}


def small_model(num_classes: int = 3, channels: int = 16) -> FasterRCNN:
    backbone = DetectorBackboneWithFPN(out_channels=channels, pretrained=False)
    rpn = RPN(channels, [channels], batch_size_per_image=16, pre_nms_topk=50, post_nms_topk=20)
    return FasterRCNN(backbone, rpn, [channels], num_classes=num_classes,
                      batch_size_per_image=16, box_regression=True)  # fmt: skip


# ---- input checks ------------------------------------------------------------------------------


def gt_one(batch: int = 1) -> torch.Tensor:
    gt = torch.full((batch, 2, 5), -1.0)
    gt[:, 0] = torch.tensor([4.0, 4, 40, 40, 1])
    return gt


def test_wrong_device_and_dtype_are_named():
    model = small_model()
    with pytest.raises(ValueError, match="images are on device meta but the model is on cpu"):
        model(torch.empty(1, 3, 64, 64, device="meta"), gt_one())
    with pytest.raises(ValueError, match="gt_boxes are on device meta but images are on cpu"):
        model(torch.randn(1, 3, 64, 64), gt_one().to("meta"))
    with pytest.raises(ValueError, match=r"images are torch.float64 but the model's weights are "
                       r"torch.float32.*images.to\(torch.float32\)"):  # fmt: skip
        model(torch.randn(1, 3, 64, 64, dtype=torch.float64), gt_one())
    model.eval()
    with pytest.raises(ValueError, match="on device meta"):
        model(torch.empty(1, 3, 64, 64, device="meta"))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: allowed
        boxes, _, _ = model(torch.randn(1, 3, 64, 64).bfloat16(), test_score_thresh=0.0)
    assert boxes.dtype == torch.float32 and len(boxes) > 0


def test_diverged_weights_give_nan_losses_not_a_crash():
    """NaN weights make NaN proposals; pooling and level assignment must not turn them into
    wild indices, so train_detector can report the NaN loss by name."""
    model = small_model()
    with torch.no_grad():
        model.backbone.fpn_params["output_p3"].weight.fill_(float("nan"))
    losses = model(torch.randn(2, 3, 64, 64), gt_one(2))
    assert set(losses) == {"loss_rpn_obj", "loss_rpn_box", "loss_cls", "loss_box"}
    assert not torch.isfinite(losses["loss_rpn_obj"])
    model.eval()
    with torch.no_grad():
        boxes, classes, scores = model(torch.randn(1, 3, 64, 64), test_score_thresh=0.0)
    assert torch.isfinite(boxes).all() and torch.isfinite(scores).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_images_into_a_cuda_model_are_named():
    model = small_model().cuda()
    with pytest.raises(ValueError, match="images are on device cpu but the model is on cuda:0"):
        model(torch.randn(1, 3, 64, 64), gt_one())
    with pytest.raises(ValueError, match="gt_boxes are on device cpu but images are on cuda:0"):
        model(torch.randn(1, 3, 64, 64, device="cuda"), gt_one())


@pytest.mark.parametrize(
    "row, shown",
    [
        ([float("nan"), 4, 40, 40, 1], "[nan, 4.0, 40.0, 40.0, 1.0]"),
        ([4, 4, float("inf"), 40, 1], "[4.0, 4.0, inf, 40.0, 1.0]"),
        ([40, 4, 4, 40, 2], "[40.0, 4.0, 4.0, 40.0, 2.0]"),  # x2 < x1
        ([4, 9, 40, 8, 0], "[4.0, 9.0, 40.0, 8.0, 0.0]"),  # y2 < y1
    ],
)
def test_unusable_gt_boxes_are_named_by_index(row, shown):
    gt = gt_one(2)
    gt[1, 1] = torch.tensor(row)
    with pytest.raises(ValueError) as info:
        small_model()(torch.randn(2, 3, 64, 64), gt)
    assert f"gt_boxes[1, 1] = {shown} is not a usable box" in str(info.value)
    padded = gt_one(2)
    padded[1, 1, :4] = float("nan")  # NaN coordinates in a padding row (class -1) are fine
    assert all(torch.isfinite(v) for v in small_model()(torch.randn(2, 3, 64, 64), padded).values())
    flat = gt_one(2)
    flat[1, 1] = torch.tensor([4.0, 9, 40, 9, 0])  # zero height: overlaps nothing, accepted
    assert all(torch.isfinite(v) for v in small_model()(torch.randn(2, 3, 64, 64), flat).values())


# ---- empty, tiny and elongated images through the whole model ---------------------------------


@pytest.fixture(scope="module")
def odd_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd") / "voc"
    images = {
        "empty1": (noise_image(60, 50, seed=1), ".jpg", []),
        "empty2": (noise_image(50, 50, seed=2), ".png", []),
        "wide": (noise_image(256, 64, seed=3), ".jpg", [("dog", (100, 8, 140, 40), 0)]),
        "tall": (noise_image(64, 256, seed=4), ".jpg", [("cat", (8, 100, 40, 140), 0)]),
        "tiny": (noise_image(20, 20, seed=5, mode="L"), ".png", [("car", (2, 2, 15, 18), 0)]),
    }
    return write_dataset(root, images, {"empty": ["empty1", "empty2"], "odd": list(images)})


def test_images_without_objects_train_as_background(odd_root):
    torch.manual_seed(0)
    model = small_model()
    empty = VOCLayoutDetection(odd_root, "empty", ("cat", "dog", "car"), image_size=64,
                               train_transform=True)  # fmt: skip
    _, images, gt = next(iter(torch.utils.data.DataLoader(empty, batch_size=2)))
    assert (gt == -1).all()
    losses = model(images, gt)
    assert losses["loss_rpn_box"] == 0 and losses["loss_box"] == 0  # nothing to regress
    assert losses["loss_rpn_obj"] > 0 and losses["loss_cls"] > 0  # background is learnt
    sum(losses.values()).backward()
    assert model.rpn.pred_net.pred_obj.weight.grad.abs().sum() > 0
    assert model.cls_pred[-1].weight.grad.abs().sum() > 0
    assert model.box_pred.weight.grad.abs().sum() == 0

    loader = torch.utils.data.DataLoader(empty, batch_size=2)
    history = train_detector(model, loader, learning_rate=0.01, max_iters=3, warmup_iters=1,
                             **QUIET)  # fmt: skip
    assert len(history) == 3 and all(math.isfinite(v) for v in history)
    assert history.terms["loss_rpn_box"] == [0.0, 0.0, 0.0]


def test_tiny_and_elongated_images_run_end_to_end(odd_root, tmp_path):
    torch.manual_seed(0)
    classes = ("cat", "dog", "car")
    model = small_model()
    # Training crops: everything is 32x32, batches of 2 (the first one of empty images). Two
    # values per channel in the last BatchNorm layers: a warning, and gradients that explode
    # (norm ~1e17) unless clipped.
    train = VOCLayoutDetection(odd_root, "odd", classes, image_size=32, train_transform=True)
    loader = torch.utils.data.DataLoader(train, batch_size=2, drop_last=True)
    with pytest.warns(UserWarning, match=r"2 image\(s\) of 32x32 px leaves 2 value\(s\) per"):
        history = train_detector(model, loader, learning_rate=0.01, max_iters=3, warmup_iters=1,
                                 grad_clip=1.0, **QUIET)  # fmt: skip
    assert len(history) == 3 and all(math.isfinite(v) for v in history)
    unclipped = small_model()
    with (
        pytest.warns(UserWarning, match="set grad_clip"),
        # Which step overflows first (1 or 2) depends on the CPU's float kernels.
        pytest.raises(
            FloatingPointError,
            match=r"iteration [12]: total=nan, loss_rpn_obj=nan.*probably diverged",
        ),
    ):
        train_detector(unclipped, loader, learning_rate=0.01, max_iters=3, warmup_iters=1,
                       **QUIET)  # fmt: skip

    # Uncropped 1:4 and 4:1 images (32x128, 128x32) train one at a time.
    val = VOCLayoutDetection(odd_root, "odd", classes, image_size=32, train_transform=False)
    for image_id, shape in (("wide", (32, 128)), ("tall", (128, 32))):
        _, image, gt = val[val.image_ids.index(image_id)]
        assert tuple(image.shape[1:]) == shape
        losses = model(image[None], gt[None])
        assert all(torch.isfinite(v) for v in losses.values())
        sum(losses.values()).backward()
    # A single 32x32 image cannot train (BatchNorm sees one value per channel): a clear error.
    _, image, gt = val[val.image_ids.index("tiny")]
    assert tuple(image.shape[1:]) == (32, 32)
    with pytest.raises(ValueError, match=r"batch of 1 image of 32x32 px .*2 or more images"):
        model(image[None], gt[None])
    assert all(torch.isfinite(v) for v in model(image[None].repeat(2, 1, 1, 1),
                                                gt[None].repeat(2, 1, 1)).values())  # fmt: skip

    # Inference and mAP on every size, batch 1.
    result = inference_with_detector(
        model, torch.utils.data.DataLoader(val, batch_size=1), val.idx_to_class,
        score_thresh=0.0, nms_thresh=0.5, output_dir=tmp_path / "mAP", progress=False,
    )  # fmt: skip
    written = sorted(p.stem for p in (tmp_path / "mAP" / "detection-results").iterdir())
    assert written == sorted(val.image_ids)
    assert set(result.ap) == {"cat", "dog", "car"} and 0.0 <= result.map <= 1.0


# ---- determinism and checkpoints ---------------------------------------------------------------


def test_same_seed_gives_identical_histories_real_model(tmp_path):
    root = make_shapes_dataset(tmp_path / "s", num_train=8, num_val=2, image_size=64)
    dataset = ShapesDetection(root, "train", image_size=64, max_boxes=8)

    def run(seed: int) -> list[float]:
        seed_all(seed)
        model = small_model(num_classes=5)
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, shuffle=True)
        return train_detector(model, loader, learning_rate=0.01, max_iters=3, warmup_iters=1,
                              **QUIET)  # fmt: skip

    first, second = run(0), run(0)
    assert first == second  # bit-identical, not merely close
    assert first.terms == second.terms
    assert run(1) != first


def test_resume_into_another_configuration_names_the_settings(tmp_path):
    path = tmp_path / "c.pt"
    train_small(path, max_iters=2)
    with pytest.raises(ValueError) as info:
        train_small(path, resume=True, model_kwargs={"num_classes": 3}, max_iters=4)
    message = str(info.value)
    assert message.startswith(f"Checkpoint {path} does not match this model.")
    assert "num_classes: checkpoint 5, model 3" in message and "size mismatch" not in message
    assert not flush_denormal_enabled()  # the failed start left no global state behind

    # Weights fit but a setting differs, or a training argument differs: warnings, named.
    with pytest.warns(UserWarning) as record:
        train_small(path, resume=True, model_kwargs={"dropout": 0.2}, learning_rate=0.1,
                    max_iters=3)  # fmt: skip
    text = "\n".join(str(w.message) for w in record)
    assert "dropout: checkpoint 0.1, model 0.2" in text
    assert "learning_rate: checkpoint 0.05, now 0.1" in text
    assert "max_iters=3" in text  # the existing planned-length warning


def test_unusable_checkpoint_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoint at"):
        load_checkpoint(tmp_path / "none.pt")
    good = tmp_path / "good.pt"
    train_small(good, max_iters=2)
    data = good.read_bytes()
    for name, content in (("cut.pt", data[: len(data) // 2]), ("text.pt", b"hello")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=f"Cannot read checkpoint .*{name} .truncated"):
            train_small(tmp_path / name, resume=True, max_iters=3)
    weights_only = tmp_path / "weights.pt"
    torch.save({"model": SmallNet().state_dict()}, weights_only)
    with pytest.raises(ValueError, match=r"cannot be resumed: it has no optimizer, scheduler"):
        train_small(weights_only, resume=True, max_iters=3)
    plain = torch.load(good, weights_only=True)
    plain["config"] = None  # e.g. a model class without .config
    torch.save(plain, tmp_path / "noconfig.pt")
    with pytest.raises(ValueError) as info:
        load_checkpoint(tmp_path / "noconfig.pt", SmallNet(num_classes=3))
    assert "(no configuration; 0 weights missing, 0 unexpected, 2 of another shape, e.g. " \
        "head.weight (9, 6) vs (7, 6); head.bias (9,) vs (7,))" in str(info.value)  # fmt: skip
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="not a train_detector checkpoint"):
        load_checkpoint(tmp_path / "list.pt")


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    """A finite loss with a NaN gradient at iteration 3 (the 4th call) poisons the weights; the
    checkpoint due after it is refused, so the one after iteration 1 (``iteration == 2``
    completed) stays the last good state."""
    path = tmp_path / "n.pt"
    with pytest.raises(FloatingPointError) as info:
        train_small(path, model_kwargs={"bad_grad_at": 4}, max_iters=8)
    message = str(info.value)
    assert message.startswith("head.weight is NaN or infinite after iteration 3")
    assert "checkpoint not written" in message
    fresh = SmallNet()
    ckpt = load_checkpoint(path, fresh)
    assert ckpt["iteration"] == 2 and all(math.isfinite(v) for v in ckpt["loss_history"])
    assert all(torch.isfinite(p).all() for p in fresh.parameters())


# ---- a run killed with SIGKILL in the middle of a checkpoint write ----------------------------


def run_child_until_marker(args: list[str], marker: Path, timeout: float = 240.0) -> int:
    """Start ``reliability_child.py ARGS``; SIGKILL it as soon as ``marker`` exists.

    Returns the child's exit status (``-SIGKILL`` when the kill landed)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(CHILD.parent)]),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}  # fmt: skip
    log = marker.with_name(marker.name + ".log")
    with open(log, "wb") as output:
        child = subprocess.Popen([sys.executable, str(CHILD), *args], cwd=REPO, env=env,
                                 stdout=output, stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + timeout
    try:
        while not marker.exists():
            if child.poll() is not None:
                text = log.read_text(errors="replace")
                pytest.fail(f"child exited with {child.returncode} before the write:\n{text}")
            if time.monotonic() > deadline:
                pytest.fail("child did not reach the second checkpoint write in time")
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        return child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_sigkill_during_checkpoint_write_then_resume(tmp_path, capsys):
    path, marker = tmp_path / "run" / "ckpt.pt", tmp_path / "writing"
    assert run_child_until_marker(["tiny", str(path), str(marker)], marker) == -signal.SIGKILL
    # The kill hit the write of iteration 4's checkpoint, half of it on disk in the temp file.
    (partial,) = path.parent.glob(".ckpt.pt.*.tmp")
    assert partial.stat().st_size == int(marker.read_text()) // 2
    with pytest.raises(ValueError, match="Cannot read checkpoint"):
        load_checkpoint(partial)
    killed = load_checkpoint(path, SmallNet())  # the previous checkpoint is intact
    assert killed["iteration"] == 2 and len(killed["loss_history"]) == 2

    _, reference = train_small(tmp_path / "reference.pt")  # uninterrupted, in this process
    assert killed["loss_history"] == reference[:2]  # same seed, other process: identical
    capsys.readouterr()
    _, resumed = train_small(path, seed=99, resume=True)  # everything comes from the file
    out = capsys.readouterr().out
    assert f"Removed {partial}" in out and f"Resumed from {path} at iteration 2" in out
    assert list(path.parent.glob(".*.tmp")) == []
    assert resumed == reference  # bit-identical to the run that was never interrupted
    assert load_checkpoint(path)["iteration"] == 8


CLI_TINY = [
    "--dataset", "shapes", "--num-train", "16", "--num-val", "4", "--image-size", "64",
    "--fpn-channels", "16", "--batch-size", "4", "--warmup-iters", "2", "--workers", "0",
    "--pre-nms-topk", "50", "--post-nms-topk", "20", "--no-progress", "--no-pretrained",
    "--checkpoint-period", "2", "--log-period", "0", "--eval-period", "1",
]  # fmt: skip


def test_cli_resume_after_sigkill_and_config_mismatch(tmp_path, capsys):
    out, marker = tmp_path / "out", tmp_path / "writing"
    args = ["train", *CLI_TINY, "--data-dir", str(tmp_path / "data"), "--out", str(out),
            "--max-iters", "4"]  # fmt: skip
    assert run_child_until_marker(["cli", str(marker), *args], marker) == -signal.SIGKILL
    checkpoint = out / "checkpoint.pt"
    killed = load_checkpoint(checkpoint)
    assert killed["iteration"] == 2 and len(list(out.glob(".checkpoint.pt.*.tmp"))) == 1

    capsys.readouterr()
    assert detector_cli.main([*args, "--resume"]) == 0
    printed = capsys.readouterr().out
    assert f"Resumed from {checkpoint} at iteration 2" in printed
    resumed = load_checkpoint(checkpoint)
    assert resumed["iteration"] == 4 and resumed["loss_history"][:2] == killed["loss_history"]
    assert json.loads((out / "metrics.json").read_text())["iterations"] == 4
    assert list(out.glob(".*.tmp")) == []
    # results.csv: the killed run's rows up to its checkpoint, then the resumed run's.
    rows = (out / "results.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows] == ["iteration", "1", "2", "3", "4"]

    # Resuming with another model configuration: one line per differing setting, no traceback.
    assert detector_cli.main([*args, "--fpn-channels", "32", "--resume"]) == 1
    err = capsys.readouterr().err
    assert f"Checkpoint {checkpoint} does not match this model" in err
    assert "backbone.out_channels: checkpoint 16, model 32" in err
    assert "rpn.fpn_channels: checkpoint 16, model 32" in err and "state_dict" not in err

    # A new run in the same folder without --resume keeps the old checkpoint.
    assert detector_cli.main([*args[:-1], "1"]) == 0
    assert load_checkpoint(out / "checkpoint.prev.pt")["iteration"] == 4
    assert (out / "results.prev.csv").read_text().splitlines() == rows
    assert (out / "best.prev.pt").is_file()
    assert load_checkpoint(checkpoint)["iteration"] == 1
    assert np.isfinite(load_checkpoint(checkpoint)["loss_history"]).all()

    # predict: a 16-bit PNG works, a truncated JPEG is named on stderr.
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((40, 60), 40000, dtype=np.uint16)).save(images / "deep.png")
    assert detector_cli.main(["predict", str(checkpoint), str(images), "--out",
                              str(tmp_path / "pred"), "--device", "cpu"]) == 0  # fmt: skip
    assert len(json.loads((tmp_path / "pred" / "detections.json").read_text())) == 1
    jpeg = (out.parent / "data" / "shapes" / "JPEGImages" / "000000.jpg").read_bytes()
    (images / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    capsys.readouterr()
    assert detector_cli.main(["predict", str(checkpoint), str(images / "cut.jpg"), "--out",
                              str(tmp_path / "pred"), "--device", "cpu"]) == 1  # fmt: skip
    assert f"error: Cannot read image {images / 'cut.jpg'}: " in capsys.readouterr().err
