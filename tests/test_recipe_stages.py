"""The recipe as stages: every name it had still an attribute of ``recipe``, each stage loaded
only when used, and every "auto" settled once into the plan that the checkpoint records."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

import recipe
from eecs598.settings import DEMO, HELD_OUT_FRACTION, OWN_DATA, preset_for
from recipe.exporting import calibration_files

REPO_ROOT = Path(__file__).resolve().parents[1]

# ``recipe.__all__`` when the recipe was one module: each keeps working.
NAMES_BEFORE_THE_STAGES = (
    "SHAPES_CLASSES", "build_detector", "read_detector_checkpoint", "state_dict_config",
    "load_detector", "load_trained_detector", "read_weights_checkpoint", "with_network_of",
    "start_from_weights", "describe_initialisation", "discover_classes", "make_datasets",
    "room_for_every_box", "hold_out", "train_crop_size", "epoch_iters", "choose_image_size",
    "training_datasets", "fit_training_anchors", "warn_classes_without_boxes", "train_loader",
    "eval_loader", "val_loader", "eval_period", "describe_setup", "init_distributed",
    "evaluate_and_report", "train", "evaluate", "predict", "image_files",
    "predictions_as_coco", "export",
)  # fmt: skip


def test_every_name_of_the_one_module_recipe_still_works():
    assert set(NAMES_BEFORE_THE_STAGES) <= set(recipe.__all__)
    with pytest.warns(DeprecationWarning, match="read_checkpoint"):
        old_reader = recipe.read_detector_checkpoint
    assert old_reader is recipe.read_checkpoint
    for name in NAMES_BEFORE_THE_STAGES:
        if not name.startswith("read_"):  # the two renamed readers warn (above, below)
            value = getattr(recipe, name)
            stage = sys.modules[value.__module__] if callable(value) else None
            assert stage is None or getattr(stage, name) is value, name
    # The constants that moved to the settings are the settings' own objects.
    assert recipe.HELD_OUT_FRACTION == HELD_OUT_FRACTION
    assert "train" in dir(recipe) and "AUTO_IMAGE_SIZES" in dir(recipe)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        recipe.nothing  # noqa: B018


def test_the_old_weights_reader_still_names_its_flag(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.warns(DeprecationWarning):
        reader = recipe.read_weights_checkpoint
    with pytest.raises(ValueError, match=r"^--weights .*bad\.pt: "):
        reader(bad)
    with pytest.raises(ValueError, match=r"^(?!--weights)"):
        recipe.read_checkpoint(bad)


def test_the_notebook_helper_loads_only_the_model_stage():
    """``import a4_helper`` loads the recipe's model stage, not its data, plan, training,
    deploy, COCO reader, validation or anchor-fitting code (a subprocess: this one has
    imported them). pycocotools and onnx are not loaded either."""
    code = (
        "import sys, a4_helper; print(' '.join(sorted(m for m in sys.modules "
        "if m.startswith(('recipe', 'eecs598.', 'pycocotools', 'onnx')))))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    loaded = set(done.stdout.split())
    assert {"recipe", "recipe.model"} <= loaded
    unwanted = {"recipe.data", "recipe.plan", "recipe.training", "recipe.exporting",
                "eecs598.deploy", "eecs598.coco", "eecs598.anchor_fit", "eecs598.validation",
                "pycocotools",
                "onnx", "onnxruntime"}  # fmt: skip
    assert not loaded & unwanted, loaded & unwanted


@pytest.mark.parametrize("command", ["evaluate", "predict", "export"])
def test_entry_point_defaults_come_from_the_presets(command):
    settings = preset_for(command=command)
    assert settings.data.dataset == OWN_DATA.data.dataset
    assert settings.flat() == OWN_DATA.replace(out=settings.out).flat()
    assert settings.out == {"evaluate": "runs/evaluate", "predict": "runs/predict",
                            "export": ""}[command]  # fmt: skip
    assert preset_for("voc2007", command).model.rpn.pre_nms_topk == 500  # the notebook's
    with pytest.raises(ValueError, match="no preset for the command 'fit'"):
        preset_for(command="fit")


def test_the_plan_settles_every_auto_once(tmp_path):
    """On the demo's data with every "auto" left: numbers in the settled settings, the
    requested ones kept, the checkpoint's record plain and complete."""
    settings = DEMO.replace(
        data_dir=str(tmp_path), num_train=8, num_val=4, image_size="auto", train_crop="auto",
        anchor_scale="auto", eval_period="auto", epochs=3, batch_size=2,
        workers=0, multiscale=True,
    )  # fmt: skip
    plan, train, val, classes = recipe.plan_training(settings)
    run = plan.settings.train
    assert plan.requested is settings and classes == list(recipe.SHAPES_CLASSES)
    assert plan.settings.data.image_size == 224 and run.train_crop == 0
    assert plan.iterations_per_epoch == len(train) // 2 and run.max_iters == 3 * (len(train) // 2)
    assert run.eval_period == recipe.eval_period(plan.settings) >= 1
    assert plan.eval_budget == pytest.approx(0.1)
    assert plan.scales == (192, 224, 256)
    assert plan.anchors is not None and set(plan.anchors.sizes) == {"p3", "p4", "p5"}
    record = plan.record()
    assert record["image_size"] == 224 and record["max_iters"] == run.max_iters
    assert record["anchor_sizes"] == {k: [float(v) for v in s]
                                      for k, s in plan.anchors.sizes.items()}  # fmt: skip
    assert record["scales"] == list(plan.scales)
    # What it trained on, with absolute paths: export --int8 calibrates on those images.
    expected = {"dataset": "shapes", "images": None, "data_dir": str(tmp_path.resolve())}
    assert record["data"] == {**expected, "train_split": "train"}
    data = record["data"]
    files = calibration_files(data["dataset"], data["images"], data["data_dir"])
    assert sorted(files) == sorted(train.image_paths) and len(files) == len(train)
    text = plan.describe("random")
    assert "image size*: short side 224, multi-scale* 192/224/256 per batch" in text
    epochs = f"{run.max_iters} iterations (3 epochs of {plan.iterations_per_epoch} iterations)"
    assert epochs in text and "initialisation: random" in text
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.scales = None  # type: ignore[misc]


def test_train_loader_needs_a_settled_train_crop(tmp_path):
    settings = OWN_DATA.replace(batch_size=2, workers=0)
    assert settings.train.train_crop == "auto"
    with pytest.raises(ValueError, match="train_crop is 'auto': settle it first"):
        recipe.train_loader(settings, [], None)


def test_export_writes_beside_the_checkpoint_unless_out_names_a_file(tmp_path, monkeypatch):
    """``export(checkpoint, settings)``: ``settings.out`` names the file or its folder; the
    preset's empty ``out`` puts ``model.onnx`` beside the checkpoint (the ONNX conversion itself
    is tested in test_eecs598_deploy; here it writes a marker)."""
    import recipe.exporting
    from eecs598.checkpoint import save_checkpoint

    model = recipe.build_detector(2, fpn_channels=8, pretrained=False)
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    checkpoint.parent.mkdir()
    meta = {"class_names": ["a", "b"], "image_size": 64, "test_image_size": 80}
    save_checkpoint(checkpoint, {"model": model.state_dict(), "config": model.config, "meta": meta})
    written = []

    def fake_export(model, path, metadata, score_thresh, nms_thresh):
        written.append((path, metadata, score_thresh, nms_thresh))
        path.write_bytes(b"onnx")

    monkeypatch.setattr(recipe.exporting, "export_onnx", fake_export)
    monkeypatch.setattr(recipe.exporting, "require_exporter", lambda: None)
    assert recipe.export(checkpoint) == checkpoint.with_name("model.onnx")
    assert written[-1][1] == {"class_names": ["a", "b"], "image_size": 80}
    assert written[-1][2:] == (0.05, 0.5)  # EvalSettings'
    into = preset_for(command="export").replace(out=str(tmp_path / "other"), score_thresh=0.3)
    (tmp_path / "other").mkdir()
    assert recipe.export(checkpoint, into) == tmp_path / "other" / "model.onnx"
    assert written[-1][2] == 0.3
    named = into.replace(out=str(tmp_path / "mine.onnx"))
    assert recipe.export(checkpoint, named) == tmp_path / "mine.onnx"
    with pytest.raises(ValueError, match="must name a .onnx file"):
        recipe.export(checkpoint, into.replace(out=str(tmp_path / "mine.txt")))
