"""The exported ONNX detector against its checkpoint: export time and size, parity, latency,
and with ``--int8`` the int8 graph beside the float32 one.

    python bench/bench_onnx.py CHECKPOINT [--images FILES_OR_FOLDERS ...] [--repeats 7]
        [--int8 [--calibration DATA]] [--val DATA]

1. Export: ``recipe.export`` of CHECKPOINT (seconds, MiB); with ``--int8`` also
   ``export --int8`` (calibrated on ``--calibration``, default: the data the checkpoint
   records).
2. Parity: every image, preprocessed at the model's short side as ``predict`` does, through
   the checkpoint's model (torch, eager) and through onnxruntime: detection counts, classes,
   the largest box difference (px) and score difference; then the same images in padded
   batches of two (``image_sizes`` set), against the torch model given the same batch.
3. Latency: milliseconds per image, torch eager, onnxruntime float32 (and int8) on the CPU,
   batch 1 (each image alone) and batch 8 (the images padded into one batch), alternating
   runs, medians.
4. With ``--val DATA``: the mAP@0.5 of each on DATA's val split (what ``evaluate`` scores),
   at the checkpoint's size and the export's thresholds.

Default images: two photos of each size in the aquarium's valid split (``../shared``) for
parity, eight of its most common size for latency; ``--images``: the same files for both (the
first eight for latency, padded into one batch).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import AQUARIUM, alternate, cpu_vector_flags, environment, write_json  # noqa: E402

import recipe  # noqa: E402
from eecs598.augment import PadCollate  # noqa: E402
from eecs598.deploy import OnnxDetector  # noqa: E402
from eecs598.images import preprocess_image, read_rgb_image  # noqa: E402
from eecs598.inference import score_detector  # noqa: E402
from eecs598.settings import preset_for  # noqa: E402


def default_images(per_size: int = 2) -> tuple[list[Path], list[Path]]:
    """Aquarium valid photos: ``per_size`` of each distinct size (parity), and 8 of the most
    common size (latency: one batch without padding)."""
    from PIL import Image

    by_size: dict[tuple[int, int], list[Path]] = {}
    for path in sorted((AQUARIUM / "valid").glob("*.jpg")):
        with Image.open(path) as image:
            by_size.setdefault(image.size, []).append(path)
    parity = [p for group in by_size.values() for p in group[:per_size]]
    return parity, max(by_size.values(), key=len)[:8]


def differences(torch_out, onnx_out) -> tuple[bool, float, float]:
    """``(same count and classes, largest box difference, largest score difference)``, each
    torch detection against its nearest onnxruntime detection of the same class (detections
    whose scores tie to float rounding may come in either order)."""
    (tb, tc, ts), (ob, oc, os_) = torch_out, onnx_out
    tb, tc, ts = tb.cpu(), tc.cpu(), ts.cpu()
    if len(tb) != len(ob) or not torch.equal(tc.sort().values, oc.sort().values):
        return False, float("inf"), float("inf")
    if len(tb) == 0:
        return True, 0.0, 0.0
    distance = (tb[:, None, :] - ob[None, :, :]).abs().amax(dim=2)  # (N, N) in pixels
    distance = distance.masked_fill(tc[:, None] != oc[None, :], float("inf"))
    nearest, index = distance.min(dim=1)
    return True, nearest.max().item(), (ts - os_[index]).abs().max().item()


def parity(model, onnx_model, images: list[torch.Tensor]) -> dict:
    """Single images, then padded batches of two."""
    rows = []
    for image in images:
        with torch.no_grad():
            rows.append(differences(model(image[None]), onnx_model.detect(image)))
    pad = PadCollate(size_divisible=32)
    for first in range(0, len(images) - 1, 2):
        _, batch, _, sizes = pad([("", im, torch.zeros(0, 5)) for im in images[first : first + 2]])
        with torch.no_grad():
            expected = model(batch, image_sizes=sizes)
        boxes, scores, classes, counts = onnx_model(batch, sizes)
        for i, (tb, tc, ts) in enumerate(expected):
            n = int(counts[i])
            got = (torch.from_numpy(boxes[i, :n]), torch.from_numpy(classes[i, :n]),
                   torch.from_numpy(scores[i, :n]))  # fmt: skip
            rows.append(differences((tb, tc, ts), got))
    detections = [len(model(im[None])[0]) for im in images]
    return {
        "images": len(images),
        "batched_pairs": len(images) // 2,
        "detections_per_image": detections,
        "all_match": all(same for same, _, _ in rows),
        "max_box_px": max(b for _, b, _ in rows),
        "max_score": max(s for _, _, s in rows),
    }


def latency(model, onnx_models: dict, images: list[torch.Tensor], repeats: int) -> dict:
    """Median ms per image, batch 1 and batch 8: torch eager and each of ``onnx_models``
    (``{name: OnnxDetector}``) run by onnxruntime."""
    _, batch, _, sizes = PadCollate(size_divisible=32)(
        [("", im, torch.zeros(0, 5)) for im in images[:8]]
    )

    def torch_single():
        with torch.no_grad():
            for image in images[:8]:
                model(image[None])

    def torch_batch():
        with torch.no_grad():
            model(batch, image_sizes=sizes)

    runs = {"torch batch 1": torch_single}
    for name, onnx_model in onnx_models.items():
        runs[f"{name} batch 1"] = lambda m=onnx_model: [m.detect(im) for im in images[:8]]
    runs["torch batch 8"] = torch_batch
    for name, onnx_model in onnx_models.items():
        runs[f"{name} batch 8"] = lambda m=onnx_model: m(batch, sizes)
    times = alternate(runs, repeats, warmup=1)
    per_image = {name: 1e3 * statistics.median(ts) / len(images[:8]) for name, ts in times.items()}
    return {"ms_per_image": per_image, "batch_shape": list(batch.shape)}


class _OnnxAsModel:
    """An ``OnnxDetector`` called as ``score_detector`` calls a ``FasterRCNN`` (its
    thresholds are the graph's, fixed at export)."""

    training = False

    def __init__(self, onnx_model: OnnxDetector):
        self.onnx_model = onnx_model

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def __call__(self, images, image_sizes=None, **thresholds):
        boxes, scores, classes, counts = self.onnx_model(images, image_sizes)
        out = [(torch.from_numpy(b[:n]), torch.from_numpy(c[:n]), torch.from_numpy(s[:n]))
               for b, s, c, n in zip(boxes, scores, classes, counts, strict=True)]  # fmt: skip
        return out[0] if len(out) == 1 else out


def mean_ap(models: dict, data: str, classes: list[str], size: int, thresholds) -> dict:
    """mAP@0.5 of each of ``models`` (``{name: torch model or OnnxDetector}``) on ``data``'s
    val split (as ``evaluate`` scores it), one image at a time at short side ``size``."""
    from recipe.data import eval_loader, make_datasets, scored_as_named

    settings = scored_as_named(preset_for(data).replace(progress=False))
    _, val, _ = make_datasets(settings, image_size=size, test_image_size=size, classes=classes)
    loader = eval_loader(val, 0)
    result = {}
    for name, model in models.items():
        model = _OnnxAsModel(model) if isinstance(model, OnnxDetector) else model
        scored = score_detector(model, loader, dict(enumerate(classes)), *thresholds)
        result[name] = scored.map
    return {"images": len(val), "map50": result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--images", nargs="+", help="image files or folders (default: aquarium)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--int8", action="store_true", help="also export and time int8")
    parser.add_argument("--calibration", help="export --int8's calibration data")
    parser.add_argument("--val", help="score each model's mAP@0.5 on this data's val split")
    parser.add_argument("--out", default="bench/results/onnx.json")
    args = parser.parse_args()
    if args.images:
        files = timed = [p for p, _ in recipe.image_files(args.images)]
    elif AQUARIUM.is_dir():
        files, timed = default_images()
    else:
        sys.exit(f"no images: pass --images ({AQUARIUM} not found)")

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        into = preset_for(command="export").replace(out=str(Path(tmp) / "model.onnx"))
        path = recipe.export(args.checkpoint, into)
        export_s, size_mib = time.perf_counter() - start, path.stat().st_size / 2**20
        onnx_models = {"onnxruntime": OnnxDetector(path)}
        exports = {"onnxruntime": (export_s, size_mib)}
        if args.int8:
            start = time.perf_counter()
            int8 = recipe.export(args.checkpoint, into.replace(
                out=str(Path(tmp) / "model-int8.onnx"), int8=True, calibration=args.calibration
            ))  # fmt: skip
            onnx_models["onnxruntime int8"] = OnnxDetector(int8)
            exports["onnxruntime int8"] = (time.perf_counter() - start, int8.stat().st_size / 2**20)
        onnx_model = onnx_models["onnxruntime"]
        model, _ = recipe.load_detector(args.checkpoint)
        size = onnx_model.image_size
        images = [preprocess_image(read_rgb_image(f), size)[0] for f in files]
        match = {name: parity(model, m, images) for name, m in onnx_models.items()}
        timed_images = [preprocess_image(read_rgb_image(f), size)[0] for f in timed[:8]]
        speed = latency(model, onnx_models, timed_images, args.repeats)
        scores = None
        if args.val:
            thresholds = onnx_model.score_thresh, onnx_model.nms_thresh
            scores = mean_ap({"torch": model, **onnx_models}, args.val,
                             onnx_model.class_names, size, thresholds)  # fmt: skip

    for name, (seconds, mib) in exports.items():
        print(f"\nexport ({name}): {seconds:.1f} s, {mib:.1f} MiB")
    for name, row in match.items():
        print(f"parity of {name} on {row['images']} images and {row['batched_pairs']} padded "
              f"pairs (sizes {sorted({tuple(im.shape[1:]) for im in images})}, detections "
              f"{row['detections_per_image']}): same counts and classes: {row['all_match']}, "
              f"largest box difference {row['max_box_px']:.2e} px, largest score difference "
              f"{row['max_score']:.2e}")  # fmt: skip
    print(f"\nlatency, ms per image (batch of 8: {speed['batch_shape']}; CPU flags: "
          f"{cpu_vector_flags() or 'unknown'}):")  # fmt: skip
    for name, ms in speed["ms_per_image"].items():
        print(f"  {name:28s} {ms:8.1f}")
    if scores:
        print(f"\nmAP@0.5 on {args.val} ({scores['images']} val images):")
        for name, value in scores["map50"].items():
            print(f"  {name:28s} {100 * value:6.2f}%")
    write_json(args.out, {"environment": environment("cpu"), "checkpoint": args.checkpoint,
                          "exports": exports, "parity": match, "latency": speed,
                          "map50": scores})  # fmt: skip


if __name__ == "__main__":
    main()
