"""The optional p2 level (stride 4) of ``DetectorBackboneWithFPN``."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torchvision.models import feature_extraction

import common
from common import FPN_LEVELS, DetectorBackboneWithFPN

C = 8
P2_LEVELS = ("p2", "p3", "p4", "p5")


@pytest.fixture(scope="module")
def default_backbone() -> DetectorBackboneWithFPN:
    torch.manual_seed(0)
    return DetectorBackboneWithFPN(out_channels=C, pretrained=False)


@pytest.fixture(scope="module")
def p2_backbone() -> DetectorBackboneWithFPN:
    torch.manual_seed(0)
    return DetectorBackboneWithFPN(out_channels=C, pretrained=False, fpn_levels=P2_LEVELS)


def _pre_change_keys() -> set[str]:
    """The state_dict keys of the backbone as built before ``fpn_levels`` existed."""
    trunk = feature_extraction.create_feature_extractor(
        torchvision.models.regnet_x_400mf(weights=None),
        return_nodes={f"trunk_output.block{i}": f"c{i + 1}" for i in (2, 3, 4)},
    )
    keys = {f"backbone.{key}" for key in trunk.state_dict()}
    for level in ("3", "4", "5"):
        for conv in (f"lateral_c{level}", f"output_p{level}"):
            keys |= {f"fpn_params.{conv}.weight", f"fpn_params.{conv}.bias"}
    return keys


def _p2_only_keys() -> set[str]:
    return {
        f"fpn_params.{conv}.{p}" for conv in ("lateral_c2", "output_p2") for p in ("weight", "bias")
    }


def test_fpn_levels_constant_is_exported():
    assert FPN_LEVELS == ("p2", "p3", "p4", "p5")
    assert "FPN_LEVELS" in common.__all__


def test_trunk_block1_is_c2_with_32_channels_at_stride_4():
    trunk = feature_extraction.create_feature_extractor(
        torchvision.models.regnet_x_400mf(weights=None),
        return_nodes={"trunk_output.block1": "c2"},
    )
    with torch.no_grad():
        c2 = trunk(torch.zeros(1, 3, 64, 96))["c2"]
    assert c2.shape == (1, 32, 16, 24)


def test_default_backbone_is_unchanged(default_backbone):
    assert default_backbone.fpn_levels == ("p3", "p4", "p5")
    assert default_backbone.fpn_strides == {"p3": 8, "p4": 16, "p5": 32}
    assert default_backbone.config == {"out_channels": C}
    keys = set(default_backbone.state_dict())
    assert keys == _pre_change_keys()
    assert not any("c2" in key or "p2" in key for key in keys)
    with torch.no_grad():
        feats = default_backbone(torch.randn(1, 3, 64, 96))
    assert list(feats) == ["p3", "p4", "p5"]


def test_p2_strides_and_config(p2_backbone):
    assert p2_backbone.fpn_levels == P2_LEVELS
    assert p2_backbone.fpn_strides == {"p2": 4, "p3": 8, "p4": 16, "p5": 32}
    assert p2_backbone.config == {"out_channels": C, "fpn_levels": list(P2_LEVELS)}


@pytest.mark.parametrize(
    "size, expected",
    [
        ((64, 96), {"p2": (16, 24), "p3": (8, 12), "p4": (4, 6), "p5": (2, 3)}),
        ((70, 90), {"p2": (18, 23), "p3": (9, 12), "p4": (5, 6), "p5": (3, 3)}),
    ],
)
def test_p2_output_shapes(p2_backbone, size, expected):
    with torch.no_grad():
        feats = p2_backbone(torch.randn(2, 3, *size))
    assert list(feats) == list(P2_LEVELS)
    for level, hw in expected.items():
        assert feats[level].shape == (2, C, *hw)


def test_p2_config_rebuilds_same_keys(p2_backbone, default_backbone):
    rebuilt = DetectorBackboneWithFPN(**p2_backbone.config, pretrained=False)
    assert rebuilt.fpn_levels == P2_LEVELS
    assert set(rebuilt.state_dict()) == set(p2_backbone.state_dict())
    rebuilt.load_state_dict(p2_backbone.state_dict())
    # p2 adds its two convs and nothing else.
    assert set(p2_backbone.state_dict()) == set(default_backbone.state_dict()) | _p2_only_keys()
    default_rebuilt = DetectorBackboneWithFPN(**default_backbone.config, pretrained=False)
    assert set(default_rebuilt.state_dict()) == set(default_backbone.state_dict())


def test_p2_gradients_flow_through_lateral_and_top_down(p2_backbone):
    p2_backbone.zero_grad()
    feats = p2_backbone(torch.randn(1, 3, 64, 96))
    feats["p2"].square().mean().backward()
    fpn = p2_backbone.fpn_params
    assert fpn["lateral_c2"].weight.grad is not None
    assert fpn["lateral_c2"].weight.grad.abs().sum() > 0
    # p2 joins the top-down pathway: its loss reaches p3's (and p5's) lateral convs too.
    assert fpn["lateral_c3"].weight.grad.abs().sum() > 0
    assert fpn["lateral_c5"].weight.grad.abs().sum() > 0
    assert fpn["output_p3"].weight.grad is None
    p2_backbone.zero_grad()


def test_levels_in_any_order_are_sorted():
    backbone = DetectorBackboneWithFPN(C, pretrained=False, fpn_levels=["p5", "p3", "p4", "p2"])
    assert backbone.fpn_levels == P2_LEVELS
    assert list(backbone.fpn_strides) == list(P2_LEVELS)


@pytest.mark.parametrize(
    "fpn_levels",
    [
        ("p6",),
        ("p3", "p4", "p5", "p6"),
        ("p1", "p2", "p3", "p4", "p5"),
        ("p3", "p3", "p4", "p5"),
        ("p2", "p4", "p5"),
        ("p4", "p5"),
        (),
        ("P3", "P4", "P5"),
        "p3p4p5",
        (3, 4, 5),
    ],
)
def test_invalid_fpn_levels_raise(fpn_levels):
    with pytest.raises(ValueError) as excinfo:
        DetectorBackboneWithFPN(C, pretrained=False, fpn_levels=fpn_levels)
    message = str(excinfo.value)
    assert "p2, p3, p4, p5" in message
    assert "['p3', 'p4', 'p5']" in message and "['p2', 'p3', 'p4', 'p5']" in message
