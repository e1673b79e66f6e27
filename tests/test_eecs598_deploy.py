"""eecs598.deploy: the whole detector exported to ONNX, run by onnxruntime.

One small model is traced once (``export_program``), converted (``export_onnx``) and checked
against its own checkpoint: single images of several sizes, an image without detections, a
padded batch of two, ``predict`` on both, and the bad inputs. The model is untrained; its
classifier is set so that scores spread over (0.05, 0.7) on noise images and stay under 0.05
on an all-zero one. ``detector_cli.py export`` of a whole checkpoint, old format included, is
tested in ``test_e2e_legacy_checkpoint.py``. The same graph quantized to int8
(``quantize_onnx``, ``export --int8``) is checked against the float32 one.
"""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from support import SHARED, needs_export_torch, noise_image
from torchvision.ops import box_iou

import detector_cli
import recipe
from eecs598 import deploy
from eecs598.augment import PadCollate
from eecs598.checkpoint import save_checkpoint
from eecs598.images import preprocess_image

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytestmark = needs_export_torch

CLASSES = ["cat", "dog", "fish"]
IMAGE_SIZE = 128


def _tiny_model() -> torch.nn.Module:
    """A 3-class model, 16 FPN channels, random weights (seeded), scores spread as above."""
    torch.manual_seed(0)
    model = recipe.build_detector(
        len(CLASSES), fpn_channels=16, pretrained=False, norm="gn", box_regression=True,
        anchor_scale=4.0, pre_nms_topk=200, post_nms_topk=50,
    ).eval()  # fmt: skip
    torch.manual_seed(1)
    with torch.no_grad():
        torch.nn.init.normal_(model.cls_pred[-1].weight, std=0.1)
        model.cls_pred[-1].bias.zero_()
        model.cls_pred[-1].bias[0] = 4.0  # background, unless the features say otherwise
    return model


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """``(checkpoint path, onnx path, torch model, its torch.export program)``: the program
    traced once, then converted by ``export_onnx`` (``detector_cli.py export`` runs the same
    two steps: the legacy-checkpoint test and the error cases below call it)."""
    root = tmp_path_factory.mktemp("deploy")
    model = _tiny_model()
    checkpoint = root / "checkpoint.pt"
    meta = {"class_names": CLASSES, "image_size": IMAGE_SIZE, "test_image_size": IMAGE_SIZE}
    save_checkpoint(checkpoint, {"model": model.state_dict(), "config": model.config, "meta": meta})
    program = deploy.export_program(model, 0.05, 0.5)
    path = deploy.export_onnx(model, root / "tiny.onnx", meta, 0.05, 0.5, program=program)
    return checkpoint, path, model, program


@pytest.fixture(scope="module")
def exported(traced):
    """``(checkpoint path, onnx path, torch model)``."""
    return traced[:3]


def _same_detections(expected, got, box_px=0.5, score=1e-3):
    """Same count and classes, boxes within ``box_px`` pixels, scores within ``score``."""
    (eb, ec, es), (gb, gc, gs) = expected, got
    assert len(gb) == len(eb)
    assert torch.equal(gc, ec)
    if len(eb):
        assert (gb - eb).abs().max() <= box_px
        assert (gs - es).abs().max() <= score


def test_metadata_says_everything_needed(exported):
    _, path, model = exported
    detector = deploy.OnnxDetector(path)
    assert detector.class_names == CLASSES and detector.image_size == IMAGE_SIZE
    assert detector.score_thresh == 0.05 and detector.nms_thresh == 0.5
    assert detector.detections_per_image == model.detections_per_image
    meta = detector.metadata
    assert json.loads(meta["mean"]) == [0.485, 0.456, 0.406]
    assert json.loads(meta["std"]) == [0.229, 0.224, 0.225]
    assert json.loads(meta["config"]) == json.loads(json.dumps(model.config))
    proto = onnx.load(str(path))
    assert proto.opset_import[0].version == deploy.OPSET
    assert [i.name for i in proto.graph.input] == ["images", "image_sizes"]
    assert [o.name for o in proto.graph.output] == ["boxes", "scores", "classes", "num_detections"]


# (64, 64): every level has fewer anchors than pre_nms_topk.
@pytest.mark.parametrize("height, width", [(128, 160), (200, 128), (64, 300), (131, 97), (64, 64)])
def test_onnxruntime_gives_the_checkpoints_detections(exported, height, width):
    _, path, model = exported
    image = torch.randn(3, height, width, generator=torch.Generator().manual_seed(height))
    with torch.no_grad():
        expected = model(image[None])
    assert len(expected[0]) > 5  # a real comparison
    _same_detections(expected, deploy.OnnxDetector(path).detect(image))


def test_real_photos_of_every_size_give_the_checkpoints_detections(exported):
    """The aquarium's photos (four sizes, both orientations), where ``../shared`` exists."""
    folder = SHARED / "datasets" / "aquarium" / "valid"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    _, path, model = exported
    detector = deploy.OnnxDetector(path)
    by_size = {}
    for photo in sorted(folder.glob("*.jpg")):
        with Image.open(photo) as image:
            by_size.setdefault(image.size, image.convert("RGB"))
    assert len(by_size) >= 3
    for image in by_size.values():
        tensor, _ = preprocess_image(image, IMAGE_SIZE)
        with torch.no_grad():
            expected = model(tensor[None])
        assert len(expected[0]) > 0
        _same_detections(expected, detector.detect(tensor))


def test_an_image_without_detections_gives_empty_padded_outputs(exported):
    _, path, model = exported
    image = torch.zeros(3, IMAGE_SIZE, 160)
    with torch.no_grad():
        assert len(model(image[None])[0]) == 0
    boxes, scores, classes, counts = deploy.OnnxDetector(path)(image[None])
    assert counts.tolist() == [0]
    assert boxes.shape == (1, model.detections_per_image, 4) and not boxes.any()
    assert not scores.any() and not classes.any()


def test_a_padded_batch_of_two_gives_each_images_detections(exported):
    _, path, model = exported
    generator = torch.Generator().manual_seed(5)
    items = [("", torch.randn(3, *hw, generator=generator), torch.zeros(0, 5))
             for hw in ((128, 192), (160, 128))]  # fmt: skip
    _, batch, _, sizes = PadCollate(size_divisible=32)(items)
    with torch.no_grad():
        expected = model(batch, image_sizes=sizes)
    boxes, scores, classes, counts = deploy.OnnxDetector(path)(batch, sizes)
    for i, want in enumerate(expected):
        n = int(counts[i])
        got = tuple(torch.from_numpy(a[i, :n]) for a in (boxes, classes, scores))
        _same_detections(want, got)
        # The padding is not detected: every box lies inside its own image.
        assert (got[0][:, 2] <= sizes[i, 1]).all() and (got[0][:, 3] <= sizes[i, 0]).all()


def test_torch_export_traces_the_whole_inference(traced):
    """Evidence that the model is export-clean: the ``torch.export`` program (symbolic batch,
    height and width) that the ONNX file was converted from, run at shapes other than the
    traced ones, equals the eager model (to float rounding: eager CPU inference folds the
    BatchNorms into the convolutions, ``DetectorBackboneWithFPN.inference_features``)."""
    _, _, model, program = traced
    graph = deploy.DetectionGraph(model, 0.05, 0.5)
    images = torch.randn(3, 3, 96, 160, generator=torch.Generator().manual_seed(3))
    sizes = torch.tensor([[96, 160], [96, 100], [70, 160]])
    with torch.no_grad():
        want = graph(images, sizes)
    assert want[3].tolist() != [0, 0, 0]
    got = program.module()(images, sizes)
    assert torch.equal(got[3], want[3]) and torch.equal(got[2], want[2])
    torch.testing.assert_close(got[0], want[0], atol=1e-3, rtol=1e-5)  # pixels
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-4)


def _predict(model_file, folder, out, *flags):
    assert detector_cli.main(["predict", str(model_file), str(folder), "--out", str(out),
                              "--device", "cpu", *flags]) == 0  # fmt: skip
    return json.loads((out / "detections.json").read_text())


def test_predict_with_the_onnx_file_gives_the_checkpoints_detections_json(exported, tmp_path):
    """Real-image sizes, and a tiny and a large image (resized like any other)."""
    checkpoint, path, _ = exported
    folder = tmp_path / "images"
    folder.mkdir()
    for name, (w, h) in {"a": (640, 480), "b": (300, 500), "tiny": (16, 16),
                         "large": (4000, 3000)}.items():  # fmt: skip
        noise_image(w, h, seed=len(name)).save(folder / f"{name}.png")
    want = _predict(checkpoint, folder, tmp_path / "torch", "--conf", "0.1")
    got = _predict(path, folder, tmp_path / "onnx", "--conf", "0.1")
    assert [r["image"] for r in got] == [r["image"] for r in want]
    counts = {}
    for mine, theirs in zip(got, want, strict=True):
        counts[mine["image"]] = len(theirs["detections"])
        assert [d["class"] for d in mine["detections"]] == [
            d["class"] for d in theirs["detections"]
        ]
        for a, b in zip(mine["detections"], theirs["detections"], strict=True):
            assert abs(a["score"] - b["score"]) <= 1e-3
            # Boxes in original pixels (up to 31x the model's for the large image), rounded
            # to 0.01: 0.5 px of the model's input.
            scale = max(Image.open(mine["image"]).size) / IMAGE_SIZE
            assert np.abs(np.subtract(a["box"], b["box"])).max() <= 0.5 * max(scale, 1) + 0.01
    assert min(counts.values()) > 0
    assert (tmp_path / "onnx" / "tiny_pred.png").stat().st_size > 0


def test_bad_inputs_give_clear_errors(exported, tmp_path, capsys):
    checkpoint, path, _ = exported
    detector = deploy.OnnxDetector(path)
    with pytest.raises(ValueError, match=r"16x16 px.*at least 64 px"):
        detector(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"shape \(B, 3, H, W\)"):
        detector(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match=r"within the 64x64 canvas"):
        detector(torch.zeros(1, 3, 64, 64), torch.tensor([[65, 64]]))
    # A file that is no ONNX model, and an ONNX model that is not this package's.
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="garbage.onnx is no ONNX model"):
        deploy.OnnxDetector(garbage)
    foreign = tmp_path / "foreign.onnx"
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    value = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph([node], "g", [value("x", onnx.TensorProto.FLOAT, [1])],
                                   [value("y", onnx.TensorProto.FLOAT, [1])])  # fmt: skip
    onnx.save(onnx.helper.make_model(graph), foreign)
    with pytest.raises(ValueError, match="without this package's metadata"):
        deploy.OnnxDetector(foreign)
    with pytest.raises(FileNotFoundError, match="No ONNX model"):
        deploy.OnnxDetector(tmp_path / "missing.onnx")
    # The command line: one line each; nothing written where export fails.
    image = tmp_path / "x.png"
    noise_image(80, 80).save(image)
    cases = [
        (["predict", str(foreign), str(image)], "without this package's metadata"),
        (["predict", str(path), str(image), "--conf", "0.01"], "--conf 0.05 or more"),
        (["predict", str(path), str(image), "--nms-thresh", "0.6"], "--nms-thresh 0.5"),
        (["export", str(garbage), "--out", str(tmp_path / "g.onnx")], "Cannot read checkpoint"),
        (["export", str(checkpoint), "--out", str(tmp_path / "m.txt")], "must name a .onnx"),
    ]
    for argv, message in cases:
        assert detector_cli.main([*argv, "--device", "cpu"]) == 1
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "g.onnx").exists()


def test_a_failed_export_keeps_the_previous_file(traced, tmp_path, monkeypatch):
    _, _, model, program = traced
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous")

    class ConversionError(Exception):  # the exporter's own types are not RuntimeErrors
        pass

    def broken(*args, **kwargs):
        raise ConversionError("exporter failed\nits long report")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(RuntimeError, match=r"^ONNX export failed \(torch .*\): exporter failed$"):
        deploy.export_onnx(model, target, {"class_names": CLASSES, "image_size": 64}, 0.05, 0.5,
                           program=program)  # fmt: skip
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


@pytest.mark.parametrize("missing", ["onnxruntime", "onnx"])
def test_without_the_optional_packages_one_line_says_what_to_install(
    exported, tmp_path, monkeypatch, capsys, missing
):
    checkpoint, path, _ = exported
    monkeypatch.setitem(sys.modules, missing, None)  # import fails
    image = tmp_path / "x.png"
    noise_image(80, 80).save(image)
    # export checks the packages before it reads the checkpoint (none exists here).
    argv = ["predict", str(path), str(image)]
    if missing == "onnx":
        argv = ["export", str(tmp_path / "no.pt"), "--out", str(tmp_path / "m.onnx")]
    assert detector_cli.main([*argv, "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert (
        f"optional package(s) {missing}" in err and "pip install onnx onnxscript onnxruntime" in err
    )


def test_preprocessing_matches_predict(exported):
    """``OnnxDetector`` takes what ``preprocess_image`` gives, as the torch model does."""
    _, path, model = exported
    image, _ = preprocess_image(noise_image(300, 200, seed=9), IMAGE_SIZE)
    assert image.shape == (3, IMAGE_SIZE, 192)
    with torch.no_grad():
        _same_detections(model(image[None]), deploy.OnnxDetector(path).detect(image))


# ---------------------------------------------------------------------------------- int8


def _calibration(count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` noise images of two shapes, preprocessed as ``predict`` does."""
    batches = []
    for seed in range(count):
        tensor, _ = preprocess_image(noise_image(160 + 40 * (seed % 2), 128, seed=seed), IMAGE_SIZE)
        batches.append((tensor[None].numpy(), np.array([tensor.shape[-2:]], dtype=np.int64)))
    return batches


@pytest.fixture(scope="module")
def quantized(traced, tmp_path_factory):
    """The tiny model's graph quantized to int8 on 8 calibration images."""
    path = traced[1]
    return deploy.quantize_onnx(
        path, tmp_path_factory.mktemp("int8") / "int8.onnx", _calibration(8)
    )


def test_int8_graph_is_labelled_and_quantizes_only_the_feature_arithmetic(traced, quantized):
    detector = deploy.OnnxDetector(quantized)
    assert detector.precision == "int8" and deploy.OnnxDetector(traced[1]).precision == "float32"
    assert detector.metadata["calibration_images"] == "8"
    assert detector.metadata["weight_bits"] == "7"
    assert detector.class_names == CLASSES and detector.image_size == IMAGE_SIZE
    float_graph, int8_graph = onnx.load(str(traced[1])).graph, onnx.load(str(quantized)).graph
    ops = [node.op_type for node in int8_graph.node]
    # The RPN head's convolutions run on every level with the same weights.
    convs = len({node.input[1] for node in float_graph.node if node.op_type == "Conv"})
    # Every convolution reads int8 weights: one DequantizeLinear of an int8 initializer each.
    int8_weights = {t.name for t in int8_graph.initializer if t.data_type == onnx.TensorProto.INT8}
    dequantized = [n for n in int8_graph.node
                   if n.op_type == "DequantizeLinear" and n.input[0] in int8_weights]  # fmt: skip
    assert len(dequantized) >= convs > 10
    # 7-bit weights: a pair of uint8 x int8 products, 2 x 255 x 64 at most, fits the 16-bit
    # sums of onnxruntime's AVX2 kernels.
    largest = max(np.abs(onnx.numpy_helper.to_array(t).astype(int)).max()
                  for t in int8_graph.initializer if t.name in int8_weights)  # fmt: skip
    assert 60 <= largest <= 64 and 2 * 255 * largest <= 2**15 - 1
    # The NMS loop, the top-k and the RoI sampling's gather stay, in float.
    assert {"Loop", "TopK", "GatherND"} <= set(ops)
    # No quantized feature operator reads a tensor computed from the proposals (top-k, NMS
    # loop), the image sizes or the anchors (built with Range): those stay float.
    derived = {"image_sizes"}
    for node in float_graph.node:
        if node.op_type in ("TopK", "Loop", "Range") or derived.intersection(node.input):
            derived.update(node.output)
    picked = set(deploy._quantized_nodes(onnx.load(str(traced[1]))))
    by_name = {node.name: node for node in float_graph.node}
    feature_nodes = [by_name[n] for n in picked if by_name[n].op_type in deploy.FEATURE_OPS]
    assert sum(node.op_type == "Add" for node in feature_nodes) >= 20  # the residual additions
    for node in feature_nodes:
        assert not derived.intersection(node.input), node.name


def test_int8_detections_stay_close_to_float32(traced, quantized):
    """The int8 graph finds what the float32 graph finds on images it was not calibrated on:
    most of the float32 detections matched (same class, IoU >= 0.7), scores close. (An
    untrained model on noise images: the accuracy on real data is ``bench/bench_onnx.py``'s.)"""
    float32, int8 = deploy.OnnxDetector(traced[1]), deploy.OnnxDetector(quantized)
    matched, total, differences = 0, 0, []
    for seed in (100, 101, 102):
        image, _ = preprocess_image(noise_image(200, 128, seed=seed), IMAGE_SIZE)
        (fb, fc, fs), (qb, qc, qs) = float32.detect(image), int8.detect(image)
        assert len(fb) > 5 and len(qb) > 0
        overlap = box_iou(fb, qb) * (fc[:, None] == qc[None, :])
        best, index = overlap.max(dim=1)
        hit = best >= 0.7
        matched, total = matched + int(hit.sum()), total + len(fb)
        differences += (fs[hit] - qs[index[hit]]).abs().tolist()
    assert matched / total >= 0.6, (matched, total)
    assert np.median(differences) < 0.05


def test_int8_bad_calibration_and_a_failed_quantization_keep_the_previous_file(traced, tmp_path):
    target = tmp_path / "model-int8.onnx"
    target.write_bytes(b"previous")
    with pytest.raises(ValueError, match="at least one calibration image"):
        deploy.quantize_onnx(traced[1], target, [])
    with pytest.raises(ValueError, match="7 or 8 bits, got weight_bits=4"):
        deploy.quantize_onnx(traced[1], target, _calibration(2), weight_bits=4)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(RuntimeError, match=r"^int8 quantization of .*broken.onnx failed"):
        deploy.quantize_onnx(broken, target, _calibration(2))
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.onnx", "model-int8.onnx"]


def test_int8_on_one_calibration_image_warns(traced, tmp_path):
    with pytest.warns(UserWarning, match="one image: the activation ranges will be poor"):
        path = deploy.quantize_onnx(traced[1], tmp_path / "one.onnx", _calibration(1))
    assert deploy.OnnxDetector(path).metadata["calibration_images"] == "1"


def test_export_int8_from_the_command_line_and_predict_with_it(exported, tmp_path, capsys):
    checkpoint, _, _ = exported
    folder = tmp_path / "calibration"
    folder.mkdir()
    for seed in range(4):
        noise_image(160, 128, seed=seed).save(folder / f"{seed}.png")
    out = tmp_path / "deploy"
    out.mkdir()
    argv = ["export", str(checkpoint), "--int8", "--calibration", str(folder), "--out", str(out)]
    assert detector_cli.main([*argv, "--weight-bits", "8", "--device", "cpu"]) == 0
    assert "int8 (8-bit weights, calibrated on 4 images)" in capsys.readouterr().out
    path = out / "model-int8.onnx"
    assert deploy.OnnxDetector(path).precision == "int8"
    assert deploy.OnnxDetector(path).metadata["weight_bits"] == "8"
    graph = onnx.load(str(path)).graph
    largest = max(np.abs(onnx.numpy_helper.to_array(t).astype(int)).max()
                  for t in graph.initializer if t.data_type == onnx.TensorProto.INT8)  # fmt: skip
    assert largest > 120  # the full 8-bit range
    records = _predict(path, folder, tmp_path / "pred", "--conf", "0.05")
    assert len(records) == 4 and sum(len(r["detections"]) for r in records) > 0


def test_export_int8_bad_calibration_data_writes_nothing(exported, tmp_path, capsys, monkeypatch):
    checkpoint, _, _ = exported
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "m.onnx"
    cases = [
        (["--calibration", str(tmp_path / "missing")], "missing does not exist"),
        (["--calibration", str(empty)], "No .* images in .*empty"),
        # The fixture's checkpoint records no training data.
        ([], "does not record the data it trained on.*--calibration DATA"),
    ]
    for flags, message in cases:
        argv = ["export", str(checkpoint), "--int8", *flags, "--out", str(out), "--device", "cpu"]
        assert detector_cli.main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert re.search(message, err) and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
    # Without onnxruntime's quantization tools: one line saying what to install.
    monkeypatch.setitem(sys.modules, "onnxruntime.quantization", None)
    assert detector_cli.main(["export", str(checkpoint), "--int8", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert "int8 export needs onnxruntime's quantization tools" in err
    assert "pip install onnx onnxruntime" in err and len(err.splitlines()) == 1
