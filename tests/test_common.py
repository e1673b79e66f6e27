"""Tests of common.py: backbone + FPN, location coordinates, NMS. All of them are among the
student's quick checks (``pytest -m sanity``)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision

import common
from common import (
    DetectorBackboneWithFPN,
    box_iou,
    class_spec_nms,
    get_fpn_location_coords,
    hello_common,
    nms,
)

pytestmark = pytest.mark.sanity


def random_boxes(n: int, generator: torch.Generator, max_xy=500.0, max_wh=100.0) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=generator) * max_xy
    wh = torch.rand(n, 2, generator=generator) * max_wh + 1
    return torch.cat([xy, xy + wh], dim=1)


def test_hello(capsys):
    hello_common()
    assert capsys.readouterr().out == "Hello from common.py!\n"


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return DetectorBackboneWithFPN(out_channels=64, pretrained=False).eval()


@pytest.mark.parametrize(
    "size, expected",
    [
        ((224, 224), {"p3": (28, 28), "p4": (14, 14), "p5": (7, 7)}),
        ((224, 298), {"p3": (28, 38), "p4": (14, 19), "p5": (7, 10)}),
        ((250, 333), {"p3": (32, 42), "p4": (16, 21), "p5": (8, 11)}),
    ],
)
def test_backbone_shapes_any_size(backbone, size, expected):
    with torch.no_grad():
        feats = backbone(torch.randn(2, 3, *size))
    assert list(feats) == ["p3", "p4", "p5"]
    for level, hw in expected.items():
        assert feats[level].shape == (2, 64, *hw)
    assert backbone.out_channels == 64
    assert backbone.fpn_strides == {"p3": 8, "p4": 16, "p5": 32}


def test_backbone_rejects_bad_rank(backbone):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        backbone(torch.randn(3, 224, 224))


def test_pretrained_failure_warns_once_and_continues(monkeypatch):
    def offline(*args, **kwargs):
        if kwargs.get("weights") is not None:
            raise OSError("no network")
        return original(*args, **kwargs)

    original = torchvision.models.regnet_x_400mf
    monkeypatch.setattr(torchvision.models, "regnet_x_400mf", offline)
    monkeypatch.setattr(common, "_PRETRAINED_WARNED", False)
    with pytest.warns(RuntimeWarning, match="RANDOM initialisation"):
        model = DetectorBackboneWithFPN(out_channels=16, pretrained=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DetectorBackboneWithFPN(out_channels=16, pretrained=True)  # no second warning
    assert model(torch.randn(1, 3, 64, 64))["p5"].shape == (1, 16, 2, 2)
    assert model.imagenet_weights is False


def test_imagenet_weights_say_whether_they_were_loaded(monkeypatch):
    """With the weights available (here: a stand-in that accepts them), the backbone says so;
    not asked for, it says it has none."""

    def cached(*args, weights=None, **kwargs):
        return original(*args, weights=None, **kwargs)  # as if the file were in the cache

    original = torchvision.models.regnet_x_400mf
    monkeypatch.setattr(torchvision.models, "regnet_x_400mf", cached)
    assert DetectorBackboneWithFPN(out_channels=16, pretrained=True).imagenet_weights is True
    assert DetectorBackboneWithFPN(out_channels=16, pretrained=False).imagenet_weights is False


def test_location_coords_notebook_p5():
    locations = get_fpn_location_coords({"p5": (2, 64, 2, 2)}, {"p5": 32})
    expected = torch.tensor([[16.0, 16.0], [48.0, 16.0], [16.0, 48.0], [48.0, 48.0]])
    assert torch.equal(locations["p5"], expected)


def test_location_order_matches_head_flattening():
    """A map whose channels hold each location's own centre flattens onto the coordinates."""
    height, width, stride = 3, 5, 16
    coords = get_fpn_location_coords({"p4": (1, 2, height, width)}, {"p4": stride})["p4"]
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    centre_map = torch.stack([(xs + 0.5) * stride, (ys + 0.5) * stride])[None].float()
    flattened = centre_map.permute(0, 2, 3, 1).reshape(1, height * width, 2)[0]
    assert torch.equal(flattened, coords)


def test_location_coords_dtype_device():
    out = get_fpn_location_coords({"p3": (1, 1, 2, 2)}, {"p3": 8}, dtype=torch.float64)
    assert out["p3"].dtype == torch.float64


def test_weighted_bag_sum_gradient_matches_embedding_bag():
    """The sort-based backward (a CPU table that needs a gradient, weights that do not) gives
    embedding_bag's values and gradient, bit-for-bit the same on a second backward."""
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(50, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 20, (300, 16), generator=generator)  # rows 20-49 get no tap
    weight = torch.rand(300, 16, generator=generator, dtype=torch.float64)
    upstream = torch.randn(300, 8, generator=generator, dtype=torch.float64)
    ours = common.weighted_bag_sum(table, index, weight)
    assert ours.grad_fn is not None and "TransposedBagSum" in type(ours.grad_fn).__name__
    reference = torch.nn.functional.embedding_bag(
        index, table, per_sample_weights=weight, mode="sum"
    )
    assert torch.equal(ours, reference)
    (grad,) = torch.autograd.grad(ours, table, upstream)
    (expected,) = torch.autograd.grad(reference, table, upstream)
    assert torch.allclose(grad, expected, rtol=0, atol=1e-12)
    assert (grad[20:] == 0).all()
    (again,) = torch.autograd.grad(common.weighted_bag_sum(table, index, weight), table, upstream)
    assert torch.equal(grad, again)
    # Weights that need a gradient: embedding_bag itself, both gradients.
    weight.requires_grad_(True)
    plain = common.weighted_bag_sum(table, index, weight)
    assert "TransposedBagSum" not in type(plain.grad_fn).__name__
    assert torch.autograd.grad(plain, weight, upstream)[0].abs().sum() > 0


def test_box_iou_matches_torchvision():
    g = torch.Generator().manual_seed(1)
    a, b = random_boxes(50, g), random_boxes(70, g)
    assert torch.allclose(box_iou(a, b), torchvision.ops.box_iou(a, b), atol=1e-6)


def test_box_iou_batched_and_degenerate():
    g = torch.Generator().manual_seed(2)
    a, b = random_boxes(12, g).view(3, 4, 4), random_boxes(15, g).view(3, 5, 4)
    batched = box_iou(a, b)
    for i in range(3):
        assert torch.equal(batched[i], box_iou(a[i], b[i]))
    zero = torch.tensor([[5.0, 5.0, 5.0, 5.0]])
    assert box_iou(zero, zero).item() == 0.0


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_nms_matches_torchvision_5000_boxes(threshold):
    g = torch.Generator().manual_seed(int(threshold * 10))
    boxes = random_boxes(5000, g)
    scores = torch.rand(5000, generator=g)
    ours = nms(boxes, scores, threshold)
    theirs = torchvision.ops.nms(boxes, scores, threshold)
    assert torch.equal(ours, theirs)
    assert torch.all(scores[ours][:-1] >= scores[ours][1:])


def test_nms_empty_and_default_threshold():
    empty = nms(torch.zeros(0, 4), torch.zeros(0))
    assert empty.dtype == torch.long and empty.numel() == 0
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60]])
    assert nms(boxes, torch.tensor([0.9, 0.8, 0.7])).tolist() == [0, 2]


def test_nms_bad_shapes():
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        nms(torch.zeros(3, 5), torch.zeros(3))
    with pytest.raises(ValueError, match="scores"):
        nms(torch.zeros(3, 4), torch.zeros(4))


def test_class_spec_nms_matches_torchvision_batched():
    g = torch.Generator().manual_seed(3)
    boxes = random_boxes(800, g, max_xy=200)
    scores = torch.rand(800, generator=g)
    classes = torch.randint(0, 5, (800,), generator=g)
    ours = class_spec_nms(boxes, scores, classes, 0.5)
    theirs = torchvision.ops.batched_nms(boxes, scores, classes, 0.5)
    assert torch.equal(ours, theirs)


def test_location_coords_offset():
    """``offset`` places each location within its cell: 0 on the top-left pixel, 0.5 (the
    notebook's default) in the middle."""
    corner = get_fpn_location_coords({"p5": (1, 8, 2, 2)}, {"p5": 32}, offset=0.0)["p5"]
    assert torch.equal(corner, torch.tensor([[0.0, 0.0], [32.0, 0.0], [0.0, 32.0], [32.0, 32.0]]))
    centre = get_fpn_location_coords({"p5": (1, 8, 2, 2)}, {"p5": 32}, offset=0.5)["p5"]
    assert torch.equal(centre, corner + 16.0)


def test_backbone_receptive_fields_are_centred_on_cell_corners():
    """The fact behind the RPN's default ``anchor_offset = 0``: every conv of the trunk has an
    odd kernel and ``k // 2`` padding, so output ``j`` of a stride-2 conv is centred on input
    ``2 j`` and feature ``(i, j)`` of stride ``s`` on pixel ``(s i, s j)``, the cell's corner.
    """
    model = DetectorBackboneWithFPN(out_channels=8, pretrained=False)
    convs = [m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) > 20
    for conv in convs:
        assert all(k % 2 == 1 for k in conv.kernel_size), conv
        assert conv.padding == tuple(k // 2 for k in conv.kernel_size), conv
        assert conv.dilation == (1, 1), conv


@pytest.mark.parametrize("channels, groups", [(64, 32), (128, 32), (8, 8), (48, 16)])
def test_group_norm_uses_up_to_32_groups_that_divide_the_channels(channels, groups):
    assert common.group_norm(channels, "none") == []
    (layer,) = common.group_norm(channels, "gn")
    assert isinstance(layer, torch.nn.GroupNorm)
    assert (layer.num_groups, layer.num_channels) == (groups, channels)
    with pytest.raises(ValueError, match="norm must be one of none, gn, got 'bn'"):
        common.group_norm(channels, "bn")


def test_fpn_with_group_norm_normalises_every_conv_and_says_so_in_its_config():
    torch.manual_seed(0)
    plain = common.DetectorBackboneWithFPN(16, pretrained=False)
    normed = common.DetectorBackboneWithFPN(16, pretrained=False, norm="gn")
    assert plain.config == {"out_channels": 16} and normed.config == {
        "out_channels": 16, "norm": "gn"
    }  # fmt: skip
    for name, module in normed.fpn_params.items():
        conv, norm = module
        assert isinstance(conv, torch.nn.Conv2d) and isinstance(norm, torch.nn.GroupNorm), name
    normed.train()
    feats = normed(torch.randn(2, 3, 64, 96))
    for level, feat in feats.items():  # each output is normalised per group: mean 0, var 1
        groups = feat.reshape(2, 16, -1)
        assert groups.mean(-1).abs().max() < 1e-4, level
        assert torch.allclose(groups.var(-1, unbiased=False), torch.ones(2, 16), atol=1e-2)


def test_the_trunk_is_one_graph_that_deep_copies():
    """RegNet traces to the same graph in train and eval mode (so the backbone keeps one), and a
    deep copy of the backbone switches modes and computes what the original does."""
    import copy

    from torchvision.models import feature_extraction

    trunk = torchvision.models.regnet_x_400mf(weights=None)
    nodes = {f"trunk_output.block{i}": f"c{i + 1}" for i in range(1, 5)}  # c2..c5
    dual = feature_extraction.create_feature_extractor(trunk, return_nodes=nodes)
    assert dual.train_graph.python_code("self").src == dual.eval_graph.python_code("self").src
    torch.manual_seed(0)
    backbone = DetectorBackboneWithFPN(out_channels=16, pretrained=False)
    twin = copy.deepcopy(backbone).eval()
    image = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        ours, theirs = backbone.eval()(image), twin(image)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def _trained_statistics(backbone: DetectorBackboneWithFPN) -> DetectorBackboneWithFPN:
    """``backbone`` with BatchNorm statistics and affine weights away from their initial 0/1,
    so that folding them into the convolutions changes the weights."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in backbone.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                for tensor in (module.running_mean, module.weight, module.bias):
                    tensor.add_(0.1 * torch.randn(tensor.shape, generator=generator))
                module.running_var.mul_(torch.rand(module.num_features, generator=generator) + 0.5)
    return backbone


def test_inference_features_equal_forward_and_follow_weight_changes():
    """``inference_features`` (BatchNorm folded, channels-last trunk) gives ``forward``'s
    features to float rounding; it follows in-place weight changes and a new ``state_dict``,
    adds nothing to the ``state_dict``, and is ``forward`` itself in training or with
    gradients."""
    torch.manual_seed(0)
    backbone = _trained_statistics(DetectorBackboneWithFPN(16, pretrained=False)).eval()
    keys = list(backbone.state_dict())
    image = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(1))

    def both() -> tuple[dict, dict]:
        with torch.no_grad():
            return backbone(image), backbone.inference_features(image)

    plain, fast = both()
    assert fast["p3"].is_contiguous(memory_format=torch.channels_last)
    for level in plain:
        torch.testing.assert_close(fast[level], plain[level], atol=1e-4, rtol=1e-4)
    assert list(backbone.state_dict()) == keys
    # An in-place change of a statistic and a whole new state_dict are both seen.
    bn = next(m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with torch.no_grad():
        bn.running_mean.add_(1.0)
    changed, changed_fast = both()
    assert not torch.allclose(changed["p5"], plain["p5"])
    torch.testing.assert_close(changed_fast["p5"], changed["p5"], atol=1e-4, rtol=1e-4)
    torch.manual_seed(3)
    other = _trained_statistics(DetectorBackboneWithFPN(16, pretrained=False))
    backbone.load_state_dict(other.state_dict())
    loaded, loaded_fast = both()
    torch.testing.assert_close(loaded_fast["p4"], loaded["p4"], atol=1e-4, rtol=1e-4)
    # With gradients, or in training mode: forward itself, bit for bit, gradients flowing.
    out = backbone.inference_features(image)
    assert all(torch.equal(out[k], loaded[k]) for k in out) and out["p3"].requires_grad
    backbone.train()
    assert "_inference_cache" not in backbone.__dict__
