"""End-to-end tests of detector_cli.py on tiny generated data."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

import detector_cli

TINY = [
    "--num-train", "16", "--num-val", "4", "--image-size", "64", "--fpn-channels", "16",
    "--batch-size", "4", "--max-iters", "4", "--warmup-iters", "2", "--workers", "0",
    "--pre-nms-topk", "50", "--post-nms-topk", "20", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    torch.set_num_threads(1)
    assert detector_cli.main(["demo", "--out", str(out), *TINY]) == 0
    return out


def test_demo_writes_every_output(demo_run, capsys):
    for name in ("loss.png", "ap_per_class.png", "detections.png", "checkpoint.pt"):
        assert (demo_run / name).stat().st_size > 0, name
    metrics = json.loads((demo_run / "metrics.json").read_text())
    assert 0.0 <= metrics["mAP"] <= 1.0
    assert metrics["iterations"] == 4 and metrics["num_val_images"] == 4
    assert set(metrics["ap"]) <= {"red_circle", "green_square", "blue_triangle",
                                  "yellow_diamond", "purple_cross"}  # fmt: skip
    files = sorted(p.name for p in (demo_run / "mAP" / "ground-truth").iterdir())
    assert len(files) == 4
    assert sorted(p.name for p in (demo_run / "mAP" / "detection-results").iterdir()) == files


def test_checkpoint_carries_config_and_classes(demo_run):
    model, checkpoint = detector_cli.load_detector(demo_run / "checkpoint.pt")
    assert checkpoint["meta"]["class_names"][0] == "red_circle"
    assert checkpoint["meta"]["image_size"] == 64
    # The demo evaluates at a larger short side than it trains at (small objects).
    assert checkpoint["meta"]["test_image_size"] == detector_cli.DEMO["test_image_size"] == 160
    assert model.config["backbone"]["out_channels"] == 16
    assert model.config["rpn"]["anchor_stride_scale"] == detector_cli.DEMO["anchor_scale"]
    assert model.rpn.anchor_stride_scale == detector_cli.DEMO["anchor_scale"]
    assert model.config["rpn"]["anchor_offset"] == model.rpn.anchor_offset == 0.0
    assert not model.training


def test_anchor_offset_flag_reaches_the_rpn():
    args = detector_cli.build_parser().parse_args(["train", "--anchor-offset", "0.5"])
    model = detector_cli.build_detector(3, fpn_channels=8, pretrained=False,
                                        anchor_offset=args.anchor_offset)  # fmt: skip
    assert args.anchor_offset == 0.5 and model.rpn.anchor_offset == 0.5
    assert detector_cli.build_parser().parse_args(["demo"]).anchor_offset == 0.0


def test_evaluate_needs_no_repeated_flags(demo_run, tmp_path, capsys):
    code = detector_cli.main([
        "evaluate", str(demo_run / "checkpoint.pt"), "--dataset", "shapes",
        "--data-dir", str(demo_run / "data"), "--num-train", "16", "--num-val", "4",
        "--out", str(tmp_path), "--workers", "0",
    ])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "mAP = " in printed
    evaluated = json.loads((tmp_path / "metrics.json").read_text())
    trained = json.loads((demo_run / "metrics.json").read_text())
    assert evaluated["mAP"] == pytest.approx(trained["mAP"])
    lines = [line for f in (tmp_path / "mAP" / "ground-truth").iterdir()
             for line in f.read_text().splitlines()]  # fmt: skip
    assert max(float(v) for line in lines for v in line.split()[1:5]) > 64  # 160 px images


def test_predict_writes_images_and_json(demo_run, tmp_path):
    images = demo_run / "data" / "shapes" / "JPEGImages"
    code = detector_cli.main(["predict", str(demo_run / "checkpoint.pt"), str(images),
                              "--out", str(tmp_path), "--score-thresh", "0.0"])  # fmt: skip
    assert code == 0
    records = json.loads((tmp_path / "detections.json").read_text())
    assert len(records) == 20
    assert len(list(tmp_path.glob("*_pred.png"))) == 20
    for det in records[0]["detections"]:
        assert det["class"] in detector_cli.SHAPES_CLASSES and len(det["box"]) == 4


def test_mismatched_checkpoint_names_the_settings(demo_run):
    checkpoint = torch.load(demo_run / "checkpoint.pt", weights_only=True)
    model = detector_cli.build_detector(5, fpn_channels=32, pretrained=False)
    with pytest.raises(ValueError) as err:
        detector_cli.load_weights(model, checkpoint, "ckpt.pt")
    assert "backbone.out_channels: checkpoint 16, model 32" in str(err.value)


def test_clear_errors(tmp_path, capsys):
    assert detector_cli.main(["predict", str(tmp_path / "missing.pt"), "x.jpg"]) == 1
    assert "No checkpoint at" in capsys.readouterr().err
    assert detector_cli.main(["train", "--dataset", str(tmp_path / "nowhere")]) == 1
    assert "error:" in capsys.readouterr().err


def test_help_for_every_subcommand(capsys):
    for command in ("demo", "train", "evaluate", "predict"):
        with pytest.raises(SystemExit) as exit_info:
            detector_cli.main([command, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert "usage: detector_cli.py " + command in text
        assert "(default: None)" not in text and text.count("(default: shapes)") <= 1
    subparsers = next(
        a for a in detector_cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    )
    for command, parser in subparsers.choices.items():
        undocumented = [a.dest for a in parser._actions if not a.help]
        assert undocumented == [], f"{command}: options without help: {undocumented}"


def test_predict_preprocessing_is_the_val_transform(demo_run):
    """predict feeds the model exactly what evaluation feeds it for the same file."""
    from PIL import Image

    from a4_helper import ShapesDetection, preprocess_image

    val = ShapesDetection(demo_run / "data" / "shapes", "val", image_size=64)
    path, expected, _ = val[0]
    with Image.open(path) as image:
        tensor, (sx, sy) = preprocess_image(image, 64)
        width, height = image.size
    assert torch.equal(tensor, expected)
    assert (round(width * sx), round(height * sy)) == tuple(expected.shape[:0:-1])
