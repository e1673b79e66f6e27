"""The settings module: one home for every default, the presets, old checkpoints' settings."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from common import DetectorBackboneWithFPN
from eecs598.settings import (
    DATA_DEPENDENT,
    DEMO,
    LEGACY_CONFIG,
    NOTEBOOK,
    OWN_DATA,
    BackboneSettings,
    HeadSettings,
    ModelSettings,
    RPNSettings,
    Settings,
    complete_config,
    preset_for,
    setting_fields,
)
from two_stage_detector import RPN, FasterRCNN


def _signature_defaults(function) -> dict:
    return {
        name: p.default
        for name, p in inspect.signature(function).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


@pytest.mark.parametrize(
    ("settings", "constructor", "renamed"),
    [
        (RPNSettings(), RPN.__init__, {}),
        (HeadSettings(), FasterRCNN.__init__, {}),
        (BackboneSettings(), DetectorBackboneWithFPN.__init__, {}),
    ],
)
def test_constructor_defaults_are_the_settings_defaults(settings, constructor, renamed):
    """The notebook's constructors take their defaults from the settings classes, so the two
    cannot drift apart."""
    defaults = _signature_defaults(constructor)
    for f in dataclasses.fields(settings):
        if f.name in defaults:
            assert defaults[f.name] == getattr(settings, f.name), f.name
    model = ModelSettings()
    assert _signature_defaults(RPN.__init__)["smooth_l1_beta"] == model.smooth_l1_beta == 0.0
    assert _signature_defaults(FasterRCNN.__init__)["smooth_l1_beta"] == model.smooth_l1_beta


def test_presets_differ_from_the_defaults_only_where_they_say():
    assert set(Settings().differences(NOTEBOOK)) == {"pre_nms_topk", "post_nms_topk", "dataset"}
    assert (NOTEBOOK.model.rpn.pre_nms_topk, NOTEBOOK.model.rpn.post_nms_topk) == (500, 200)
    assert set(NOTEBOOK.differences(OWN_DATA)) == {*DATA_DEPENDENT, "dataset"}
    assert set(DATA_DEPENDENT) == {
        "image_size", "batch_mode", "multiscale", "anchor_scale", "box_regression",
        "smooth_l1_beta", "rpn_batch_size", "roi_batch_size", "lr", "warmup_iters", "grad_clip",
        "train_crop", "norm", "eval_period",
    }  # fmt: skip
    assert set(OWN_DATA.differences(DEMO)) == {
        "out", "image_size", "fpn_channels", "max_iters", "warmup_iters", "rpn_batch_size",
        "roi_batch_size", "anchor_scale", "multiscale", "pretrained", "test_image_size",
    }  # fmt: skip
    assert preset_for("voc2007") == NOTEBOOK
    assert preset_for("some/folder") == OWN_DATA.replace(dataset="some/folder")


def test_replace_is_by_flat_name_and_leaves_the_original():
    changed = OWN_DATA.replace(rpn_batch_size=64, fpn_channels=32, lr=0.1, out="x")
    assert changed.model.rpn.batch_size_per_image == 64
    assert changed.model.backbone.out_channels == 32 and changed.train.lr == 0.1
    assert changed.out == "x" and OWN_DATA.model.rpn.batch_size_per_image == 256
    assert changed.model.heads is OWN_DATA.model.heads  # unchanged groups are shared
    with pytest.raises(ValueError, match="No setting named 'rpn_batchsize'.*rpn_batch_size"):
        OWN_DATA.replace(rpn_batchsize=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        OWN_DATA.train.lr = 1.0


def test_flat_names_are_unique_and_every_setting_has_help():
    names = [name for name, _ in setting_fields(Settings)]
    assert len(names) == len(set(names)) == len(OWN_DATA.flat())
    assert all(f.metadata["help"] for _, f in setting_fields(Settings))


def test_old_checkpoint_configs_are_completed_with_what_they_trained_with():
    old = {"num_classes": 3, "rpn": {"pre_nms_topk": 10}, "backbone": {"out_channels": 8}}
    completed = complete_config(old)
    assert completed["smooth_l1_beta"] == 0.0 and completed["roi_align_offset"] == 0.5
    assert completed["norm"] == "none"
    assert completed["rpn"] == {
        "anchor_offset": 0.5, "smooth_l1_beta": 0.0, "norm": "none", "pre_nms_topk": 10
    }  # fmt: skip
    assert old == {"num_classes": 3, "rpn": {"pre_nms_topk": 10}, "backbone": {"out_channels": 8}}
    new = {"smooth_l1_beta": 0.1, "roi_align_offset": 0.0, "norm": "gn",
           "rpn": {"anchor_offset": 0.0, "smooth_l1_beta": 0.1, "norm": "gn"}}  # fmt: skip
    assert complete_config(new) == new  # a value that is there wins
    assert FasterRCNN.complete_config(old) == completed
    assert set(LEGACY_CONFIG) == {"smooth_l1_beta", "roi_align_offset", "norm", "rpn"}
