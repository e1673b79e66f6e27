"""train_detector and inference_with_detector on generated data."""

from __future__ import annotations

import math
import random

import matplotlib
import numpy as np
import pytest
import torch
from support import Interrupted, TinyDetector
from torch import nn

from a4_helper import (
    SHAPES_CLASSES,
    ShapesDetection,
    inference_with_detector,
    load_checkpoint,
    train_detector,
)

matplotlib.use("Agg")  # plots and visualisations in these tests must never open a window
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    from a4_helper import make_shapes_dataset

    return make_shapes_dataset(tmp_path_factory.mktemp("shapes") / "s", 24, 6, image_size=64)


def make_loader(root, batch_size=4, n=10, shuffle=True):
    dataset = ShapesDetection(root, "train", image_size=48, max_boxes=8)
    subset = torch.utils.data.Subset(dataset, list(range(n)))
    return torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=shuffle)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


QUIET = {"show_plot": False, "progress": False, "log_period": 0}


def test_loss_falls_and_history_has_terms(shapes_root, capsys):
    seed_all(0)
    loader = make_loader(shapes_root, n=8, shuffle=False)
    model = TinyDetector(len(SHAPES_CLASSES))
    history = train_detector(model, loader, learning_rate=0.3, max_iters=60, warmup_iters=5,
                             **QUIET)  # fmt: skip
    assert len(history) == 60 and set(history.terms) == {"loss_box", "loss_cls"}
    assert np.mean(history[-5:]) < 0.7 * np.mean(history[:5])
    torch.testing.assert_close(
        torch.tensor(history), torch.tensor(history.terms["loss_box"]) +
        torch.tensor(history.terms["loss_cls"]))  # fmt: skip


class DiagnosedDetector(TinyDetector):
    """``TinyDetector`` that keeps ``training_stats`` as ``FasterRCNN`` does: proposals that
    find a fifth of the objects, and no foreground for the second stage."""

    def forward(self, images, gt_boxes=None, **options):
        out = super().forward(images, gt_boxes, **options)
        if self.training:
            self.training_stats = {
                "stat_rpn_recall": torch.tensor(0.2), "stat_fg_share": torch.tensor(0.0),
                "stat_top_score": torch.tensor(0.1),
            }  # fmt: skip
        return out


def test_training_stats_are_logged_apart_and_warn_when_not_learning(shapes_root, capsys):
    loader = make_loader(shapes_root, n=8, shuffle=False)
    with pytest.warns(UserWarning) as caught:
        history = train_detector(
            DiagnosedDetector(len(SHAPES_CLASSES)), loader, learning_rate=0.1, max_iters=40,
            warmup_iters=2, show_plot=False, progress=False, log_period=10,
        )  # fmt: skip
    messages = [str(w.message) for w in caught]
    assert sum("proposals overlap only 20% of the training boxes" in m for m in messages) == 1
    assert sum("only 0.0% of the RoIs the second stage samples" in m for m in messages) == 1
    assert history.stats["rpn_recall"] == [pytest.approx(0.2)] * 40
    assert set(history.terms) == {"loss_box", "loss_cls"}  # and the repr names only these
    torch.testing.assert_close(  # the total is the losses' alone
        torch.tensor(history), torch.tensor(history.terms["loss_box"]) +
        torch.tensor(history.terms["loss_cls"]))  # fmt: skip
    line = capsys.readouterr().out.splitlines()[-1]
    assert "[rpn_recall: 0.200][fg_share: 0.000][top_score: 0.100]" in line


def test_loss_history_repr_is_one_short_line():
    from a4_helper import LossHistory

    assert repr(LossHistory()) == "LossHistory(0 iterations)"
    assert repr(LossHistory([2.5])) == (
        "LossHistory(1 iteration, last 2.5000, min 2.5000 at iteration 0)"
    )
    values = [3.0 - 0.0001 * i for i in range(9000)]
    values[8999] = 1.5  # the last one is not the lowest
    values[4321] = 0.25
    history = LossHistory(values, {"loss_cls": values, "loss_box": values})
    expected = (
        "LossHistory(9000 iterations, last 1.5000, min 0.2500 at iteration 4321, "
        "terms: loss_cls, loss_box)"
    )
    assert repr(history) == expected and str(history) == expected
    # What a notebook cell ending in train_detector(...) shows (IPython's pretty printer).
    from IPython.lib.pretty import pretty

    assert pretty(history) == expected
    # Still the full list.
    assert len(history) == 9000 and history[4321] == 0.25 and list(history) == values


def test_schedule_logging_and_plot(shapes_root, capsys, tmp_path):
    loader = make_loader(shapes_root, n=4)
    model = TinyDetector(len(SHAPES_CLASSES))
    train_detector(model, loader, learning_rate=0.1, max_iters=10, log_period=5, warmup_iters=2,
                   warmup_factor=0.5, progress=False, show_plot=True, plot_path=tmp_path / "l.png",
                   amp=True)  # fmt: skip
    out = capsys.readouterr().out
    assert "amp=True is ignored" in out
    assert "[Iter 0][loss:" in out and "[Iter 5]" in out and "[Iter 9]" in out
    assert "[lr: 5.00e-02]" in out  # warmup start: 0.5 * 0.1
    assert "[Iter 9]" in out and "[lr: 1.00e-03]" in out  # after x0.1 at 6 and 9
    assert (tmp_path / "l.png").stat().st_size > 0


def test_resume_matches_uninterrupted_run(shapes_root, tmp_path):
    kwargs = dict(learning_rate=0.05, max_iters=12, warmup_iters=3, checkpoint_period=4, **QUIET)
    n_cls = len(SHAPES_CLASSES)

    seed_all(0)
    full_model = TinyDetector(n_cls)
    full = train_detector(full_model, make_loader(shapes_root), checkpoint_path=tmp_path / "a.pt",
                          **kwargs)  # fmt: skip

    seed_all(0)
    with pytest.raises(Interrupted):  # dies during iteration 6, after the checkpoint at 4
        train_detector(TinyDetector(n_cls, fail_at=7), make_loader(shapes_root),
                       checkpoint_path=tmp_path / "b.pt", **kwargs)  # fmt: skip
    assert load_checkpoint(tmp_path / "b.pt")["iteration"] == 4

    seed_all(123)  # a different process state: everything must come from the checkpoint
    resumed_model = TinyDetector(n_cls)
    resumed = train_detector(resumed_model, make_loader(shapes_root), resume=True,
                             checkpoint_path=tmp_path / "b.pt", **kwargs)  # fmt: skip
    assert len(resumed) == 12
    np.testing.assert_allclose(resumed, full, rtol=0, atol=1e-6)
    for a, b in zip(full_model.parameters(), resumed_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)

    ckpt = load_checkpoint(tmp_path / "a.pt")
    assert ckpt["iteration"] == 12 and len(ckpt["loss_history"]) == 12
    assert ckpt["config"]["num_classes"] == n_cls and isinstance(ckpt["config"]["act"], str)
    assert {"model", "optimizer", "scheduler", "rng", "data", "train_args"} <= set(ckpt)
    assert list((tmp_path).glob(".*tmp")) == []  # no temp files left behind


def test_non_finite_loss_stops_with_named_terms(shapes_root, tmp_path):
    seed_all(0)
    model = TinyDetector(len(SHAPES_CLASSES), nan_at=6)
    path = tmp_path / "c.pt"
    with pytest.raises(FloatingPointError, match=r"iteration 5.*loss_box=[0-9.]+, loss_cls=nan"):
        train_detector(model, make_loader(shapes_root), max_iters=20, checkpoint_path=path,
                       checkpoint_period=2, **QUIET)  # fmt: skip
    fresh = TinyDetector(len(SHAPES_CLASSES))
    ckpt = load_checkpoint(path, fresh)
    assert ckpt["iteration"] == 4 and all(math.isfinite(v) for v in ckpt["loss_history"])
    assert all(torch.isfinite(p).all() for p in fresh.parameters())


def test_inference_writes_a_file_pair_per_image(shapes_root, tmp_path, capsys):
    val = ShapesDetection(shapes_root, "val", image_size=48)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(val, range(6)), batch_size=1)
    model = TinyDetector(len(SHAPES_CLASSES))
    out = tmp_path / "mAP" / "input"
    result = inference_with_detector(model, loader, val.idx_to_class, score_thresh=0.99,
                                     nms_thresh=0.5, output_dir=out)  # fmt: skip
    ids = sorted(val.image_ids)
    for sub in ("ground-truth", "detection-results"):
        assert sorted(p.stem for p in (out / sub).glob("*.txt")) == ids
    gt_text = "".join((out / "ground-truth" / f"{i}.txt").read_text() for i in ids)
    n_difficult = sum(int(val.annotation(k)["difficult"].sum()) for k in range(len(val)))
    assert gt_text.count(" difficult") == n_difficult
    assert 0.0 <= result.map <= 1.0 and set(result.ap) <= set(SHAPES_CLASSES)
    assert "mAP = " in capsys.readouterr().out
    assert model.training  # mode restored


def test_inference_visualises_headless(shapes_root):
    val = ShapesDetection(shapes_root, "val", image_size=48)
    loader = torch.utils.data.DataLoader(val, batch_size=1)
    result = inference_with_detector(TinyDetector(len(SHAPES_CLASSES)), loader,
                                     val.idx_to_class, 0.0, 0.5, max_show=2)  # fmt: skip
    assert result is None


def test_inference_rejects_batches_larger_than_one(shapes_root, tmp_path):
    loader = make_loader(shapes_root, batch_size=2, n=2)
    with pytest.raises(ValueError, match="batch_size=1"):
        inference_with_detector(TinyDetector(5), loader, dict(enumerate(SHAPES_CLASSES)), 0.5,
                                0.5, output_dir=tmp_path)  # fmt: skip


# ---- the real model, small settings ------------------------------------------------------------


def build_faster_rcnn(num_classes: int) -> nn.Module:
    common = pytest.importorskip("common")
    tsd = pytest.importorskip("two_stage_detector")
    channels = 32
    backbone = common.DetectorBackboneWithFPN(out_channels=channels, pretrained=False)
    rpn = tsd.RPN(fpn_channels=channels, stem_channels=[channels, channels],
                  batch_size_per_image=16, pre_nms_topk=200, post_nms_topk=40)  # fmt: skip
    return tsd.FasterRCNN(backbone, rpn, stem_channels=[channels, channels],
                          num_classes=num_classes, batch_size_per_image=32)  # fmt: skip


@pytest.fixture(scope="module")
def shapes96(tmp_path_factory):
    from a4_helper import make_shapes_dataset

    return make_shapes_dataset(tmp_path_factory.mktemp("shapes96") / "s", 16, 4, image_size=96)


def real_loader(root, shuffle=True):
    dataset = ShapesDetection(root, "train", image_size=96, max_boxes=10)
    return torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(8)), batch_size=4,
                                       shuffle=shuffle)  # fmt: skip


def test_faster_rcnn_smoke_training_and_evaluation(shapes96, tmp_path):
    seed_all(0)
    model = build_faster_rcnn(len(SHAPES_CLASSES))
    history = train_detector(model, real_loader(shapes96), learning_rate=0.01, max_iters=16,
                             warmup_iters=3, grad_clip=5.0, checkpoint_path=tmp_path / "r.pt",
                             checkpoint_period=8, **QUIET)  # fmt: skip
    assert set(history.terms) >= {"loss_rpn_obj", "loss_rpn_box", "loss_cls"}
    assert np.mean(history[-4:]) < np.mean(history[:3])
    ckpt = load_checkpoint(tmp_path / "r.pt")
    assert ckpt["config"]["num_classes"] == len(SHAPES_CLASSES)
    assert ckpt["config"]["rpn"]["post_nms_topk"] == 40

    val = ShapesDetection(shapes96, "val", image_size=96)
    loader = torch.utils.data.DataLoader(val, batch_size=1)
    result = inference_with_detector(model, loader, val.idx_to_class, score_thresh=0.05,
                                     nms_thresh=0.5, output_dir=tmp_path / "out",
                                     progress=False)  # fmt: skip
    for sub in ("ground-truth", "detection-results"):
        assert sorted(p.stem for p in (tmp_path / "out" / sub).iterdir()) == sorted(val.image_ids)
    assert 0.0 <= result.map <= 1.0


@pytest.mark.slow
def test_faster_rcnn_resume_matches_uninterrupted_run(shapes96, tmp_path):
    kwargs = dict(learning_rate=0.01, max_iters=6, warmup_iters=2, grad_clip=5.0,
                  checkpoint_period=3, **QUIET)  # fmt: skip
    seed_all(0)
    full = train_detector(build_faster_rcnn(5), real_loader(shapes96),
                          checkpoint_path=tmp_path / "a.pt", **kwargs)  # fmt: skip
    seed_all(0)
    model = build_faster_rcnn(5)
    calls, forward = [0], model.forward

    def interrupted_forward(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 5:  # iteration 4, after the checkpoint at 3
            raise Interrupted
        return forward(*args, **kwargs)

    model.forward = interrupted_forward
    with pytest.raises(Interrupted):
        train_detector(model, real_loader(shapes96), checkpoint_path=tmp_path / "b.pt", **kwargs)
    seed_all(7)
    resumed = train_detector(build_faster_rcnn(5), real_loader(shapes96), resume=True,
                             checkpoint_path=tmp_path / "b.pt", **kwargs)  # fmt: skip
    np.testing.assert_allclose(resumed, full, rtol=0, atol=1e-6)


def test_train_detector_restores_flush_denormal_setting():
    """Flush-to-zero is on during CPU training only; later code still sees subnormals."""
    from eecs598.training import flush_denormal_enabled as _flush_denormal_enabled

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, images, gt_boxes):
            self.seen = _flush_denormal_enabled()
            return {"loss": (self.w * images.mean()) ** 2}

    batches = [("a", torch.ones(1, 3, 4, 4), torch.full((1, 1, 5), -1.0))]
    model = Tiny()
    assert not _flush_denormal_enabled()
    train_detector(model, batches, max_iters=2, show_plot=False, progress=False, log_period=0)
    assert model.seen is True
    assert not _flush_denormal_enabled()


def test_compile_detector_keeps_weights_losses_and_checkpoints(shapes96, tmp_path):
    """``compile_detector`` compiles the fixed-shape parts in place: the same state_dict keys,
    the same training losses as eager, and a checkpoint an eager model loads. ``aot_eager``
    traces forward and backward like inductor but skips C++ code generation (test time)."""
    from a4_helper import compile_detector

    seed_all(0)
    eager = build_faster_rcnn(len(SHAPES_CLASSES))
    compiled = build_faster_rcnn(len(SHAPES_CLASSES))
    compiled.load_state_dict(eager.state_dict())
    assert compile_detector(compiled, backend="aot_eager") is compiled
    assert list(compiled.state_dict()) == list(eager.state_dict())
    kwargs = dict(learning_rate=0.01, max_iters=3, warmup_iters=1, grad_clip=5.0, **QUIET)
    seed_all(1)
    want = train_detector(eager, real_loader(shapes96), **kwargs)
    seed_all(1)
    got = train_detector(compiled, real_loader(shapes96), checkpoint_path=tmp_path / "c.pt",
                         **kwargs)  # fmt: skip
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert compiled.backbone._compiled_call_impl is not None
    fresh = build_faster_rcnn(len(SHAPES_CLASSES))
    fresh.load_state_dict(load_checkpoint(tmp_path / "c.pt")["model"])
