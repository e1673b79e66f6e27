"""Deploying a trained detector where torch is not: the whole detector as one ONNX file, run
by onnxruntime.

What is exported. ``DetectionGraph``: a detector's ``detect`` (``FasterRCNN.detect``), the
whole inference pipeline: backbone, FPN, the RPN with its per-level top-k and NMS, RoI Align,
the second stage, box decoding and class-specific NMS, with the score and NMS thresholds
fixed at export time.

- Inputs: ``images`` (B, 3, H, W) float32, normalised as ``metadata["mean"]`` /
  ``["std"]`` say, any batch size and any ``H, W >= MIN_SIDE``; ``image_sizes`` (B, 2) int64,
  each image's true ``(H_i, W_i)`` when the batch is padded (image ``i`` at the top-left of
  the canvas), else ``(H, W)`` for every image.
- Outputs, padded to ``D = detections_per_image``: ``boxes`` (B, D, 4) float32 ``(x1, y1,
  x2, y2)`` in input pixels, ``scores`` (B, D) float32, ``classes`` (B, D) int64 (indices
  into ``class_names``), ``num_detections`` (B,) int64. Image ``i``'s detections are the
  first ``num_detections[i]`` slots, best first; the other slots are zeros.

The exporter. ``export_program``: ``torch.export`` traces the model to one graph with symbolic
batch, height and width; ``torch.onnx.export(dynamo=True)`` converts it to ONNX opset
``OPSET``. It can express the whole pipeline because the model's NMS has a fixed-shape form
(IoU matrices resolved by a ``while_loop`` that becomes an ONNX ``Loop``) and its RoI Align is
written with plain tensor operations (no RoI Align operator, so no opset-16 question of
aligned sampling). One operator has no ONNX translation in torch: the stable sort, which
becomes ``TopK`` here (ONNX's ``TopK`` returns equal values in increasing index order, exactly
a stable sort). The legacy TorchScript exporter is not used.

Metadata. The ONNX file's ``metadata_props`` carry everything needed to use it:
``format`` (``FORMAT``), ``class_names`` (JSON list), ``image_size`` (the short side the model
expects), ``mean`` and ``std`` (JSON lists, applied to RGB values divided by 255),
``score_thresh``, ``nms_thresh``, ``detections_per_image``, ``min_side``, ``config`` (the
model's configuration, JSON) and ``precision`` (``float32``, or ``int8`` for a graph
``quantize_onnx`` wrote, which also records ``calibration_images`` and ``weight_bits``).

int8. ``quantize_onnx`` turns an exported float32 graph into an int8 one for CPUs
(onnxruntime's static quantization, QDQ format, calibrated on images): convolutions and matrix
products with weights, and the additions, ReLUs and upsampling that see image features only
(``_quantized_nodes``); the anchors, top-k, NMS, RoI sampling and box decoding stay float32.

``onnx``, ``onnxscript`` (exporting) and ``onnxruntime`` (running, quantizing) are optional:
without them these functions stop with one line saying what to install.
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .files import atomic_write
from .images import IMAGENET_MEAN, IMAGENET_STD
from .utils import first_line
from .versions import require_export_torch

__all__ = [
    "FORMAT",
    "MIN_SIDE",
    "OPSET",
    "DetectionGraph",
    "OnnxDetector",
    "FEATURE_OPS",
    "QUANTIZED_OPS",
    "export_onnx",
    "export_program",
    "quantize_onnx",
    "require",
    "require_exporter",
    "require_quantizer",
]

FORMAT = "two_stage_detector.onnx/1"
OPSET = 18
#: The smallest image side the exported graph takes (its coarsest FPN level needs 2 cells).
MIN_SIDE = 64
INPUT_NAMES = ("images", "image_sizes")
OUTPUT_NAMES = ("boxes", "scores", "classes", "num_detections")
_INSTALL = "pip install onnx onnxscript onnxruntime"


def require_exporter() -> None:
    """Raise one RuntimeError line unless this torch can export the detector to ONNX and the
    exporter's packages are installed."""
    require_export_torch(torch.__version__)
    require("onnx", "onnxscript")


def require(*modules: str) -> None:
    """Import the optional ``modules`` or raise one RuntimeError saying what to install."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise RuntimeError(
            f"ONNX export and inference need the optional package(s) {', '.join(missing)}: "
            f"{_INSTALL}"
        )


# ---------------------------------------------------------------------------------- export


class DetectionGraph(nn.Module):
    """The exported function: ``detector.detect`` at fixed thresholds, with the outputs named
    in the module docstring (``num_detections`` instead of the mask).

    Args:
        detector: a model with ``detect(images, image_sizes, score_thresh, nms_thresh)``
            returning ``(boxes (B, D, 4), classes (B, D), scores (B, D), mask (B, D))``.
        score_thresh, nms_thresh: the detections kept, as ``FasterRCNN.forward``'s
            ``test_score_thresh`` and ``test_nms_thresh``.
    """

    def __init__(self, detector: nn.Module, score_thresh: float, nms_thresh: float):
        super().__init__()
        self.detector = detector
        self.score_thresh = float(score_thresh)
        self.nms_thresh = float(nms_thresh)

    def forward(
        self, images: torch.Tensor, image_sizes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) images and (B, 2) sizes -> ``(boxes, scores, classes,
        num_detections)``."""
        boxes, classes, scores, mask = self.detector.detect(
            images, image_sizes, self.score_thresh, self.nms_thresh
        )
        return boxes, scores, classes, mask.sum(dim=1)


def _stable_sort_as_topk(self: Any, dim: int = -1, descending: bool = False, stable: Any = None):
    """ONNX translation of ``aten.sort.stable``: ``TopK`` over the whole axis, whose order of
    equal values (increasing index) is a stable sort's. Keys of types ``TopK`` lacks in
    onnxruntime (bool, uint8) are compared as int64."""
    import onnx_ir as ir
    from onnxscript import opset18 as op

    whole = op.Shape(self, start=dim) if dim == -1 else op.Shape(self, start=dim, end=dim + 1)
    keys = self
    if self.dtype not in (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.INT64):
        keys = op.Cast(self, to=ir.DataType.INT64)
    values, indices = op.TopK(keys, whole, axis=dim, largest=int(descending), sorted=1)
    if keys is not self:
        values = op.Cast(values, to=self.dtype)
    return values, indices


def _example_inputs(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A padded batch of two (the second image smaller) to trace with: sizes of the symbolic
    batch, height and width that are neither 0 nor 1 nor equal to each other."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 192, 256, generator=generator).to(device)
    return images, torch.tensor([[192, 256], [160, 224]], device=device)


def export_program(
    detector: nn.Module, score_thresh: float, nms_thresh: float
) -> torch.export.ExportedProgram:
    """``torch.export`` of ``DetectionGraph(detector, ...)`` with symbolic batch, height and
    width (sides from ``MIN_SIDE``): the graph ``export_onnx`` converts, also usable by other
    ``torch.export`` back ends. Traced on the detector's device, in eval mode."""
    graph = DetectionGraph(detector, score_thresh, nms_thresh).eval()
    device = next(detector.parameters()).device
    batch, height, width = (torch.export.Dim(n, min=m) for n, m in
                            (("batch", 1), ("height", MIN_SIDE), ("width", MIN_SIDE)))  # fmt: skip
    return torch.export.export(
        graph, _example_inputs(device),
        dynamic_shapes=({0: batch, 2: height, 3: width}, {0: batch}),
    )  # fmt: skip


def export_onnx(
    detector: nn.Module,
    path: str | os.PathLike,
    metadata: Mapping[str, Any],
    score_thresh: float,
    nms_thresh: float,
    program: torch.export.ExportedProgram | None = None,
) -> Path:
    """Export ``detector`` (in eval mode, on any device) to ``path`` as one ONNX graph.

    Args:
        detector: a ``FasterRCNN`` (anything with ``detect``, ``config`` and
            ``detections_per_image``).
        path: the .onnx file; written atomically (a failed export leaves no file and the
            previous file intact).
        metadata: ``class_names`` and ``image_size`` (required); stored with the rest of the
            module docstring's metadata.
        score_thresh, nms_thresh: fixed in the graph, and stored.
        program: ``export_program(detector, score_thresh, nms_thresh)`` when already traced
            (default: traced here).

    Returns:
        ``path``.

    Raises:
        RuntimeError: a torch too old for the export, ``onnx``/``onnxscript`` missing, or the
            exporter failed.
    """
    require_exporter()
    import onnx

    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporters' notes on their own internals
            if program is None:
                program = export_program(detector, score_thresh, nms_thresh)
            onnx_program = torch.onnx.export(
                program,
                dynamo=True,
                opset_version=OPSET,
                input_names=list(INPUT_NAMES),
                output_names=list(OUTPUT_NAMES),
                custom_translation_table={torch.ops.aten.sort.stable: _stable_sort_as_topk},
                verbose=False,
            )
    except Exception as err:  # the exporters raise many types; the whole report is the cause
        detail = first_line(err, 200)
        raise RuntimeError(f"ONNX export failed (torch {torch.__version__}): {detail}") from err
    model = onnx_program.model_proto
    properties = {
        "format": FORMAT,
        "precision": "float32",
        "class_names": json.dumps(list(metadata["class_names"])),
        "image_size": str(int(metadata["image_size"])),
        "mean": json.dumps(list(IMAGENET_MEAN)),
        "std": json.dumps(list(IMAGENET_STD)),
        "score_thresh": repr(float(score_thresh)),
        "nms_thresh": repr(float(nms_thresh)),
        "detections_per_image": str(int(detector.detections_per_image)),
        "min_side": str(MIN_SIDE),
        "config": json.dumps(getattr(detector, "config", None)),
    }
    del model.metadata_props[:]
    for key, value in properties.items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    with atomic_write(path) as handle:
        handle.write(model.SerializeToString())
    return path


# ------------------------------------------------------------------------------- int8 graphs

#: The operators whose arithmetic the int8 graph does in 8 bits: convolutions and matrix
#: products with weights, nearly all of the time. NMS, RoI sampling and box decoding stay
#: float32.
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")
#: Also in 8 bits where they only see image features (the backbone, FPN and RPN head: not
#: fed by the proposals' top-k or the image sizes), so that consecutive integer operators
#: need no dequantize/quantize pair between them: residual and top-down additions, ReLUs,
#: the FPN's upsampling, pooling.
FEATURE_OPS = ("Add", "Relu", "Resize", "MaxPool")
_QUANTIZE_INSTALL = "pip install onnx onnxruntime"


def require_quantizer() -> None:
    """Raise one RuntimeError line unless onnxruntime's quantization tools (and ``onnx``,
    which they use) can be imported."""
    try:
        import onnx  # noqa: F401
        import onnxruntime.quantization  # noqa: F401
    except ImportError as err:
        raise RuntimeError(
            f"int8 export needs onnxruntime's quantization tools ({err.name or err} is "
            f"missing): {_QUANTIZE_INSTALL}"
        ) from err


def quantize_onnx(
    source: str | os.PathLike,
    path: str | os.PathLike,
    calibration: Sequence[tuple[np.ndarray, np.ndarray]],
    weight_bits: int = 7,
) -> Path:
    """Write an int8 copy of the float32 graph ``source`` (``export_onnx``'s) to ``path``.

    Static quantization by onnxruntime's tools, QDQ format: the graph is first optimised
    (``quant_pre_process``: batch norms folded into their convolutions), then every input
    of ``QUANTIZED_OPS`` gets a quantize/dequantize pair, activations as uint8 with ranges
    taken from running ``calibration`` (min and max seen), weights as int8 per output
    channel. onnxruntime's CPU session fuses each pair with its operator into an integer
    kernel (VNNI where the CPU has it). The rest of the graph stays float32.

    Args:
        source: a float32 .onnx written by ``export_onnx``.
        path: the int8 .onnx file; written atomically: a failed quantization leaves no file
            and the previous one intact.
        calibration: ``(images (1, 3, H, W) float32 normalised, image_sizes (1, 2) int64)``
            batches, e.g. a few hundred training images preprocessed as ``predict`` does;
            taken one at a time, so a sequence that reads each when asked keeps memory low.
            One image gives poor ranges (a warning says so).
        weight_bits: 7 (weights in [-64, 64]) or 8. On x86 CPUs without VNNI onnxruntime's
            int8 kernels add pairs of uint8 x int8 products in 16 bits, which 8-bit weights
            can overflow (saturate); 7 bits cannot, on any CPU, at a slightly coarser step.

    Returns:
        ``path``. Its metadata is ``source``'s plus ``precision`` ``int8``,
        ``calibration_images`` and ``weight_bits``.

    Raises:
        RuntimeError: the quantization tools missing, or the quantization failed.
        ValueError: no calibration batches, or ``weight_bits`` not 7 or 8.
    """
    require_quantizer()
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    if weight_bits not in (7, 8):
        raise ValueError(f"int8 weights have 7 or 8 bits, got weight_bits={weight_bits!r}")
    if not len(calibration):
        raise ValueError("int8 quantization needs at least one calibration image, got none")
    if len(calibration) == 1:
        warnings.warn(
            "int8 calibration on one image: the activation ranges will be poor (use a few "
            "hundred training images)", stacklevel=2,
        )  # fmt: skip

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else dict(zip(INPUT_NAMES, batch, strict=True))

    source, path = Path(source), Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as work:
        optimised, quantized = Path(work) / "optimised.onnx", Path(work) / "int8.onnx"
        try:
            metadata = {p.key: p.value for p in onnx.load(str(source)).metadata_props}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quant_pre_process(str(source), str(optimised), skip_symbolic_shape=True)
                quantize_static(
                    str(optimised), str(quantized), Batches(),
                    quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=[*QUANTIZED_OPS, *FEATURE_OPS],
                    nodes_to_quantize=_quantized_nodes(onnx.load(str(optimised))),
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, reduce_range=weight_bits == 7,
                )  # fmt: skip
        except Exception as err:  # onnxruntime's tools raise many types
            raise RuntimeError(
                f"int8 quantization of {source} failed: {first_line(err, 200)}"
            ) from err
        model = onnx.load(str(quantized))
        metadata |= {"precision": "int8", "calibration_images": str(len(calibration)),
                     "weight_bits": str(weight_bits)}  # fmt: skip
        del model.metadata_props[:]
        for key, value in metadata.items():
            model.metadata_props.add(key=key, value=value)
        with atomic_write(path) as handle:
            handle.write(model.SerializeToString())
    return path


# Operators whose inputs after the first are target shapes (GroupNorm's reshapes, the FPN's
# upsampling): their output is a feature when their first input is.
_SHAPED_OPS = ("Resize", "Reshape", "Expand", "Pad", "Slice", "Unsqueeze", "Squeeze")


def _quantized_nodes(model: Any) -> list[str]:
    """The names of the nodes ``quantize_onnx`` quantizes: every ``QUANTIZED_OPS`` node with
    a weight (a constant second input: not the RoI Align's weighted sum), and
    the ``FEATURE_OPS`` nodes whose inputs are image features or constants. A feature is
    computed from ``images`` and constants alone (the target shapes of ``_SHAPED_OPS``
    aside), not through a ``Shape``: the anchors (from the feature maps' shapes), the
    proposals (from a ``TopK``) and anything clipped to ``image_sizes`` are not features,
    and keep their float arithmetic."""
    graph = model.graph
    constants = {tensor.name for tensor in graph.initializer}
    constants.update(
        out for node in graph.node if node.op_type == "Constant" for out in node.output
    )
    features, names = {"images"}, []
    for node in graph.node:  # ONNX lists nodes in topological order
        inputs = [name for name in node.input if name]
        if node.op_type in _SHAPED_OPS:  # their other inputs are sizes, taken from shapes
            inputs = inputs[:1]
        on_features = (
            node.op_type != "Shape" and any(name in features for name in inputs)
            and all(name in features or name in constants for name in inputs)
        )  # fmt: skip
        if on_features:
            features.update(node.output)
        weighted = node.op_type in QUANTIZED_OPS and node.input[1] in constants
        if weighted or (node.op_type in FEATURE_OPS and on_features):
            names.append(node.name)
    return names


# ---------------------------------------------------------------------------------- inference


class OnnxDetector:
    """An exported detector run by onnxruntime, used like the torch model it came from.

    ``class_names``, ``image_size``, ``score_thresh``, ``nms_thresh`` and the rest of the
    metadata are attributes (``metadata`` has them all as stored). ``detect`` takes a
    preprocessed (3, H, W) image and returns what ``FasterRCNN`` returns for ``image[None]``;
    calling the detector runs a batch and returns the graph's padded outputs.

    Args:
        path: a .onnx file written by ``export_onnx``.
        providers: onnxruntime execution providers (default: onnxruntime's, the CPU for the
            CPU package).

    Raises:
        RuntimeError: onnxruntime missing.
        FileNotFoundError: no file at ``path``.
        ValueError: a file onnxruntime cannot load, or an ONNX model without this package's
            metadata.
    """

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None):
        require("onnxruntime")
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"No ONNX model at {self.path}")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as err:  # onnxruntime raises its own exception types
            raise ValueError(f"{self.path} is no ONNX model onnxruntime can load: {err}") from err
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        names = [i.name for i in self.session.get_inputs()]
        if self.metadata.get("format") != FORMAT or names != list(INPUT_NAMES):
            raise ValueError(
                f"{self.path} is an ONNX model without this package's metadata (format "
                f"{FORMAT!r}, class names, image size) or inputs {list(INPUT_NAMES)}: export "
                "one with `detector_cli.py export CHECKPOINT`"
            )
        meta = self.metadata
        self.class_names: list[str] = json.loads(meta["class_names"])
        self.image_size = int(meta["image_size"])
        self.score_thresh = float(meta["score_thresh"])
        self.nms_thresh = float(meta["nms_thresh"])
        self.detections_per_image = int(meta["detections_per_image"])
        self.min_side = int(meta["min_side"])
        self.precision = meta.get("precision", "float32")

    def __call__(
        self,
        images: torch.Tensor | np.ndarray,
        image_sizes: torch.Tensor | np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Run the graph on a batch.

        Args:
            images: (B, 3, H, W) normalised float images; image_sizes: (B, 2) integer
                ``(H_i, W_i)`` (default: every image fills the canvas).

        Returns:
            ``(boxes (B, D, 4), scores (B, D), classes (B, D), num_detections (B,))`` as
            numpy arrays.

        Raises:
            ValueError: naming the shape at fault (not (B, 3, H, W), a side under
                ``min_side``, sizes that are not (B, 2) or exceed the canvas).
        """
        images = np.ascontiguousarray(_numpy(images), dtype=np.float32)
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W), got {images.shape}")
        batch, _, height, width = images.shape
        if min(height, width) < self.min_side:
            raise ValueError(
                f"images of {height}x{width} px: the exported model takes sides of at least "
                f"{self.min_side} px (resize to a short side of {self.image_size} first)"
            )
        if image_sizes is None:
            image_sizes = np.tile(np.array([height, width], dtype=np.int64), (batch, 1))
        image_sizes = np.ascontiguousarray(_numpy(image_sizes), dtype=np.int64)
        if image_sizes.shape != (batch, 2):
            raise ValueError(f"image_sizes must have shape ({batch}, 2), got {image_sizes.shape}")
        if (image_sizes < 1).any() or (image_sizes > (height, width)).any():
            raise ValueError(
                f"image_sizes must lie within the {height}x{width} canvas, got "
                f"{image_sizes.tolist()}"
            )
        feeds = dict(zip(INPUT_NAMES, (images, image_sizes), strict=True))
        return tuple(self.session.run(list(OUTPUT_NAMES), feeds))

    def detect(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One preprocessed (3, H, W) image -> ``(boxes (N, 4), classes (N,) int64, scores
        (N,))`` best first, as ``FasterRCNN`` gives for ``image[None]``."""
        boxes, scores, classes, counts = self(image[None])
        n = int(counts[0])
        return (torch.from_numpy(boxes[0, :n]), torch.from_numpy(classes[0, :n]),
                torch.from_numpy(scores[0, :n]))  # fmt: skip


def _numpy(values: torch.Tensor | np.ndarray) -> np.ndarray:
    """A tensor (any device) or array as a numpy array."""
    return values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else values
