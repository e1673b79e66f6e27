"""End-to-end tests of detector_cli.py on tiny generated data."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from support import write_notebook_files

import detector_cli
import recipe
from a4_helper import VOC_CLASSES
from eecs598.checkpoint import load_checkpoint, load_model_weights
from eecs598.settings import DEMO, NOTEBOOK, OWN_DATA

TINY = [
    "--num-train", "16", "--num-val", "4", "--image-size", "64", "--fpn-channels", "16",
    "--batch-size", "4", "--max-iters", "4", "--warmup-iters", "2", "--workers", "0",
    "--pre-nms-topk", "50", "--post-nms-topk", "20", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    torch.set_num_threads(1)
    # Every iteration validated (auto would drop evaluations that cost more than 10% of
    # these tiny iterations, depending on the machine).
    assert detector_cli.main(["demo", "--out", str(out), *TINY, "--eval-period", "1"]) == 0
    return out


def test_demo_writes_every_output(demo_run, capsys):
    for name in ("loss.png", "ap_per_class.png", "detections.png", "checkpoint.pt", "best.pt",
                 "results.csv", "results.png"):  # fmt: skip
        assert (demo_run / name).stat().st_size > 0, name
    metrics = json.loads((demo_run / "metrics.json").read_text())
    assert 0.0 <= metrics["mAP"] <= 1.0
    assert metrics["iterations"] == 4 and metrics["num_val_images"] == 4
    # Validated while training, here every iteration.
    rows = (demo_run / "results.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows] == ["iteration", "1", "2", "3", "4"]
    best = max(rows[1:], key=lambda row: float(row.split(",")[-4]))
    assert metrics["best"]["iteration"] == int(best.split(",")[0])
    assert load_checkpoint(demo_run / "best.pt")["iteration"] == metrics["best"]["iteration"]
    assert set(metrics["ap"]) <= {"red_circle", "green_square", "blue_triangle",
                                  "yellow_diamond", "purple_cross"}  # fmt: skip
    files = sorted(p.name for p in (demo_run / "mAP" / "ground-truth").iterdir())
    assert len(files) == 4
    assert sorted(p.name for p in (demo_run / "mAP" / "detection-results").iterdir()) == files


def test_checkpoint_carries_config_and_classes(demo_run):
    model, checkpoint = recipe.load_detector(demo_run / "checkpoint.pt")
    assert checkpoint["meta"]["class_names"][0] == "red_circle"
    assert checkpoint["meta"]["image_size"] == 64
    # The demo evaluates at a larger short side than it trains at (small objects).
    assert checkpoint["meta"]["test_image_size"] == DEMO.eval.test_image_size == 160
    assert model.config["backbone"]["out_channels"] == 16
    assert model.config["rpn"]["anchor_stride_scale"] == DEMO.model.rpn.anchor_stride_scale == 4
    assert model.rpn.anchor_stride_scale == DEMO.model.rpn.anchor_stride_scale
    assert model.config["rpn"]["anchor_offset"] == model.rpn.anchor_offset == 0.0
    assert not model.training


def _settings(*argv: str):
    return detector_cli.settings_from_args(detector_cli.build_parser().parse_args(argv))


def test_anchor_offset_flag_reaches_the_rpn():
    settings = _settings("train", "--anchor-offset", "0.5", "--anchor-scale", "8")
    model = recipe.build_detector(3, settings.model, fpn_channels=8, pretrained=False)
    assert settings.model.rpn.anchor_offset == 0.5 and model.rpn.anchor_offset == 0.5
    assert _settings("demo").model.rpn.anchor_offset == 0.0


@pytest.mark.parametrize(
    ("argv", "preset"),
    [
        (["train", "--dataset", "voc2007"], NOTEBOOK),
        (["train", "--dataset", "my/folder"], OWN_DATA.replace(dataset="my/folder")),
        (["train", "--dataset", "x.json"], OWN_DATA.replace(dataset="x.json")),
        (["train"], OWN_DATA),
        (["demo"], DEMO.replace(data_dir="outputs/demo/data")),
        (["evaluate", "c.pt"], OWN_DATA.replace(out="runs/evaluate")),
        (["predict", "c.pt", "images"], OWN_DATA.replace(out="runs/predict")),
    ],
)
def test_every_cli_default_is_the_settings_value(argv, preset):
    """A flag left out takes the value of the preset for the data: no default of its own."""
    assert _settings(*argv) == preset


def test_flags_replace_their_settings_and_help_names_each_datas_default(capsys):
    settings = _settings("train", "--dataset", "d", "--anchor-scale", "4", "8", "--grad-clip",
                         "none", "--fpn-levels", "p2", "p3", "p4", "p5", "--no-flip",
                         "--smooth-l1-beta", "1/9", "--roi-size", "5", "5")  # fmt: skip
    assert settings.differences(OWN_DATA.replace(dataset="d")) == {
        "fpn_levels": (("p2", "p3", "p4", "p5"), ("p3", "p4", "p5")),
        "anchor_scale": ((4.0, 8.0), "auto"),
        "roi_size": ((5, 5), (7, 7)),
        "flip": (False, True),
        "grad_clip": (None, 10.0),
    }
    with pytest.raises(SystemExit):
        detector_cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "COCO instances .json" in text
    assert "Default: 0.02 for a VOC-layout folder, a COCO .json or shapes; 0.01 for voc2007" in text
    assert "Default: auto for a VOC-layout folder, a COCO .json or shapes; 224 for voc2007" in text


def test_python_train_is_the_cli_run(demo_run, tmp_path):
    """``recipe.train`` with settings gives the run ``detector_cli.py demo`` gives with the
    same flags: the same losses, weights and mAP."""
    settings = DEMO.replace(
        out=str(tmp_path), data_dir=str(tmp_path / "data"), num_train=16, num_val=4,
        image_size=64, fpn_channels=16, batch_size=4, max_iters=4, warmup_iters=2, workers=0,
        pre_nms_topk=50, post_nms_topk=20, progress=False,
    )  # fmt: skip
    metrics = recipe.train(settings)
    cli = json.loads((demo_run / "metrics.json").read_text())
    assert metrics["final_loss"] == cli["final_loss"] and metrics["mAP"] == cli["mAP"]
    ours, _ = recipe.load_detector(tmp_path / "checkpoint.pt")
    theirs, _ = recipe.load_detector(demo_run / "checkpoint.pt")
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


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


def test_predict_writes_images_and_json(demo_run, tmp_path, capsys):
    images = demo_run / "data" / "shapes" / "JPEGImages"
    out = tmp_path / "all"
    code = detector_cli.main(["predict", str(demo_run / "checkpoint.pt"), str(images),
                              "--out", str(out), "--conf", "0.0"])  # fmt: skip
    assert code == 0
    records = json.loads((out / "detections.json").read_text())
    assert len(records) == 20
    assert len(list(out.glob("*_pred.png"))) == 20
    for det in records[0]["detections"]:
        assert det["class"] in recipe.SHAPES_CLASSES and len(det["box"]) == 4
    assert f"20 images, {sum(len(r['detections']) for r in records)} detections" in (
        capsys.readouterr().out
    )


def test_predict_searches_folders_keeps_confident_detections_and_writes_coco(demo_run, tmp_path):
    """Subfolders are searched (the annotated copies keep their subfolder, so equal names do
    not collide); --conf keeps exactly the detections scored at least that; --coco writes
    COCO's instances format that pycocotools reads."""
    from pycocotools.coco import COCO

    source = sorted((demo_run / "data" / "shapes" / "JPEGImages").glob("*.jpg"))[:3]
    tree = tmp_path / "photos"
    for sub, files in (("a", source[:2]), ("b/c", source[1:3]), (".hidden", source[:1])):
        (tree / sub).mkdir(parents=True)
        for f in files:
            (tree / sub / f.name).write_bytes(f.read_bytes())
    checkpoint = str(demo_run / "checkpoint.pt")
    assert detector_cli.main(["predict", checkpoint, str(tree), "--out", str(tmp_path / "all"),
                              "--conf", "0"]) == 0  # fmt: skip
    everything = json.loads((tmp_path / "all" / "detections.json").read_text())
    assert [Path(r["image"]).relative_to(tree).as_posix() for r in everything] == [
        f"a/{source[0].name}", f"a/{source[1].name}", f"b/c/{source[1].name}",
        f"b/c/{source[2].name}",
    ]  # fmt: skip
    assert len(list((tmp_path / "all").rglob("*_pred.png"))) == 4
    # A threshold between two written scores and at least 7.5e-5 from each: they are written
    # rounded to 4 decimals, so each true score lies on the same side of it as its written one.
    scores = sorted({d["score"] for r in everything for d in r["detections"]})
    half = scores[len(scores) // 2 :]
    conf = next((a + b) / 2 for a, b in zip(half, half[1:], strict=False) if b - a >= 1.5e-4)
    assert detector_cli.main(["predict", checkpoint, str(tree), "--out", str(tmp_path / "conf"),
                              "--conf", str(conf), "--coco"]) == 0  # fmt: skip
    kept = json.loads((tmp_path / "conf" / "detections.json").read_text())
    assert [r["detections"] for r in kept] == [
        [d for d in r["detections"] if d["score"] >= conf] for r in everything
    ]
    coco = COCO(str(tmp_path / "conf" / "detections.coco.json"))
    assert [coco.imgs[i]["file_name"] for i in sorted(coco.imgs)] == [
        Path(r["image"]).relative_to(tree).as_posix() for r in kept
    ]
    assert len(coco.anns) == sum(len(r["detections"]) for r in kept) > 0
    first = next(d for r in kept for d in r["detections"])
    ann = coco.anns[1]
    assert coco.cats[ann["category_id"]]["name"] == first["class"]
    assert ann["score"] == first["score"] and ann["bbox"][:2] == first["box"][:2]
    assert coco.loadRes(list(coco.dataset["annotations"])).getImgIds() == sorted(coco.imgs)


def test_mismatched_checkpoint_names_the_settings(demo_run):
    checkpoint = torch.load(demo_run / "checkpoint.pt", weights_only=True)
    model = recipe.build_detector(5, fpn_channels=32, pretrained=False)
    with pytest.raises(ValueError) as err:
        load_model_weights(model, checkpoint, "ckpt.pt")
    assert "backbone.out_channels: checkpoint 16, model 32" in str(err.value)


def test_clear_errors(tmp_path, capsys):
    assert detector_cli.main(["predict", str(tmp_path / "missing.pt"), "x.jpg"]) == 1
    assert "No checkpoint at" in capsys.readouterr().err
    assert detector_cli.main(["train", "--dataset", str(tmp_path / "nowhere")]) == 1
    assert "error:" in capsys.readouterr().err


def test_train_from_weights_takes_the_checkpoints_network_and_says_so(demo_run, tmp_path, capsys):
    """The demo's checkpoint (16 FPN channels, 5 shape classes) fine-tuned on the shapes: the
    network settings come from it, the setup names the file. The anchors are fitted to the
    data again (three per location in the demo, another count here): the RPN's predictors
    start fresh, named in the warning."""
    at = TINY.index("--fpn-channels")
    tiny = TINY[:at] + TINY[at + 2 :]  # the checkpoint's channels, not a flag
    args = ["train", "--dataset", "shapes", "--data-dir", str(demo_run / "data"), "--out",
            str(tmp_path), "--weights", str(demo_run / "checkpoint.pt"), *tiny,
            "--max-iters", "1", "--eval-period", "0"]  # fmt: skip
    with pytest.warns(
        UserWarning, match="start fresh: rpn.pred_net.pred_box, rpn.pred_net.pred_obj"
    ):
        assert detector_cli.main(args) == 0
    printed = capsys.readouterr().out
    assert f"initialisation: the weights of {demo_run / 'checkpoint.pt'}" in printed
    assert "5 of 5 classes known to it" in printed and "model: FPN 16 channels" in printed
    assert load_checkpoint(tmp_path / "checkpoint.pt")["config"]["backbone"]["out_channels"] == 16


def test_the_setup_says_how_the_weights_start(tmp_path, capsys):
    args = ["train", "--dataset", "shapes", "--data-dir", str(tmp_path / "data"), "--out",
            str(tmp_path / "run"), *TINY, "--max-iters", "1", "--eval-period", "0"]  # fmt: skip
    assert detector_cli.main([*args, "--no-pretrained"]) == 0
    printed = capsys.readouterr().out
    assert "initialisation: random (--no-pretrained)" in printed
    assert "validation*: after training only" not in printed  # set by the flag, not the preset
    assert "validation: after training only" in printed
    assert not (tmp_path / "run" / "results.csv").exists()  # no validation, no table


def test_epochs_or_max_iters_not_both(tmp_path, capsys):
    args = ["train", "--dataset", "shapes", "--out", str(tmp_path), "--epochs", "2"]
    assert detector_cli.main([*args, "--max-iters", "10"]) == 1
    err = capsys.readouterr().err
    assert "--epochs 2 and --max-iters 10 both say how long to train: give one" in err
    assert list(tmp_path.iterdir()) == []  # stopped before writing anything


PREDICT = ["predict", "c.pt", "x.jpg"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([*PREDICT, "--conf", "1.5"], "--conf must be a number in [0, 1], got '1.5'"),
        ([*PREDICT, "--conf", "nan"], "--conf must be a number in [0, 1], got 'nan'"),
        (["train", "--eval-period", "-1"], "--eval-period must be a number of iterations"),
        (["train", "--patience", "-2"], "--patience must be a whole number >= 0, got '-2'"),
    ],
)
def test_flag_values_out_of_range_name_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        detector_cli.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_patience_needs_validation(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--dataset", "shapes", "--out", str(out), "--eval-period", "0"]
    assert detector_cli.main([*argv, "--patience", "3"]) == 1
    assert "--patience 3 stops on the val mAP, but --eval-period is 0" in capsys.readouterr().err
    assert not out.exists()  # stopped before writing anything


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


# ---- the notebook's files ------------------------------------------------------------------


def _notebook_model(num_classes: int) -> torch.nn.Module:
    """Section 4.3's model (``NOTEBOOK.model``) at 16 FPN channels, random weights."""
    torch.manual_seed(0)
    return recipe.build_detector(num_classes, NOTEBOOK.model, fpn_channels=16, pretrained=False)


@pytest.fixture(scope="module")
def notebook_files(tmp_path_factory):
    """The notebook's three files (``support.write_notebook_files``) for a 20-class model."""
    folder = tmp_path_factory.mktemp("notebook")
    write_notebook_files(folder, VOC_CLASSES)
    return folder


def _two_images(demo_run) -> list[str]:
    return [str(p) for p in sorted((demo_run / "data" / "shapes" / "JPEGImages").iterdir())[:2]]


def test_predict_reads_the_notebooks_files_old_and_new(notebook_files, demo_run, tmp_path):
    """The three files hold the same weights: the same detections, with VOC's class names
    (the old file's are taken from VOC's list, as it has 20 classes)."""
    found = {}
    for name in ("rcnn_training.pt", "rcnn_detector.pt", "old_rcnn_detector.pt"):
        args = [
            "predict",
            str(notebook_files / name),
            *_two_images(demo_run),
            "--conf",
            "0",
            "--score-thresh",
            "0",
            "--test-image-size",
            "64",
            "--out",
            str(tmp_path / name),
        ]
        assert detector_cli.main(args) == 0, name
        found[name] = json.loads((tmp_path / name / "detections.json").read_text())
    records = found["rcnn_detector.pt"]
    assert len(records) == 2 and sum(len(r["detections"]) for r in records) > 0
    assert {d["class"] for r in records for d in r["detections"]} <= set(VOC_CLASSES)
    assert found["rcnn_training.pt"] == records == found["old_rcnn_detector.pt"]


def test_an_old_notebook_file_of_other_classes_needs_classes(demo_run, tmp_path, capsys):
    """A bare state_dict of a 5-class model: without names it is refused, saying to pass
    --classes; with them, predict and evaluate use them; a wrong count is named."""
    path = tmp_path / "old.pt"
    torch.save(_notebook_model(5).state_dict(), path)
    base = ["predict", str(path), *_two_images(demo_run), "--conf", "0", "--score-thresh", "0",
            "--out", str(tmp_path / "p")]  # fmt: skip
    assert detector_cli.main(base) == 1
    err = capsys.readouterr().err
    assert f"{path} does not record its class names" in err and "--classes" in err
    assert detector_cli.main([*base, "--classes", "a,b"]) == 1
    assert "--classes names 2 classes but" in capsys.readouterr().err
    shapes = ",".join(recipe.SHAPES_CLASSES)
    assert detector_cli.main([*base, "--classes", shapes]) == 0
    records = json.loads((tmp_path / "p" / "detections.json").read_text())
    assert {d["class"] for r in records for d in r["detections"]} <= set(recipe.SHAPES_CLASSES)
    evaluate = ["evaluate", str(path), "--dataset", str(demo_run / "data" / "shapes"),
                "--classes", shapes, "--workers", "0", "--out", str(tmp_path / "e")]  # fmt: skip
    assert detector_cli.main(evaluate) == 0
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["num_val_images"] == 4


def test_train_weights_take_the_notebooks_file(notebook_files, demo_run, tmp_path, capsys):
    """--weights rcnn_detector.pt: the notebook's network settings and its VOC class names
    (none of which the shapes data has, so every class row starts fresh)."""
    at = TINY.index("--fpn-channels")
    tiny = TINY[:at] + TINY[at + 2 :]
    args = ["train", "--dataset", "shapes", "--data-dir", str(demo_run / "data"), "--out",
            str(tmp_path), "--weights", str(notebook_files / "rcnn_detector.pt"), *tiny,
            "--max-iters", "1", "--eval-period", "0"]  # fmt: skip
    with pytest.warns(UserWarning, match="classes it was not trained on start fresh"):
        assert detector_cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "0 of 5 classes known to it" in printed and "model: FPN 16 channels" in printed
