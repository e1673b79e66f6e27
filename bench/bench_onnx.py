"""The exported ONNX detector against its checkpoint: export time and size, parity, latency.

    python bench/bench_onnx.py CHECKPOINT [--images FILES_OR_FOLDERS ...] [--repeats 7]

1. Export: ``recipe.export`` of CHECKPOINT (seconds, MiB).
2. Parity: every image, preprocessed at the model's short side as ``predict`` does, through
   the checkpoint's model (torch, eager) and through onnxruntime: detection counts, classes,
   the largest box difference (px) and score difference; then the same images in padded
   batches of two (``image_sizes`` set), against the torch model given the same batch.
3. Latency: milliseconds per image, torch eager against onnxruntime on the CPU, batch 1 (each
   image alone) and batch 8 (the images padded into one batch), alternating runs, medians.

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
from harness import AQUARIUM, alternate, environment, write_json  # noqa: E402

import recipe  # noqa: E402
from eecs598.augment import PadCollate  # noqa: E402
from eecs598.deploy import OnnxDetector  # noqa: E402
from eecs598.images import preprocess_image, read_rgb_image  # noqa: E402
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
    """``(same count and classes, largest box difference, largest score difference)``."""
    (tb, tc, ts), (ob, oc, os_) = torch_out, onnx_out
    if len(tb) != len(ob) or not torch.equal(tc.cpu(), oc):
        return False, float("inf"), float("inf")
    if len(tb) == 0:
        return True, 0.0, 0.0
    return True, (tb.cpu() - ob).abs().max().item(), (ts.cpu() - os_).abs().max().item()


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


def latency(model, onnx_model, images: list[torch.Tensor], repeats: int) -> dict:
    """Median ms per image, batch 1 and batch 8, torch eager against onnxruntime."""
    _, batch, _, sizes = PadCollate(size_divisible=32)(
        [("", im, torch.zeros(0, 5)) for im in images[:8]]
    )

    def torch_single():
        with torch.no_grad():
            for image in images[:8]:
                model(image[None])

    def onnx_single():
        for image in images[:8]:
            onnx_model.detect(image)

    def torch_batch():
        with torch.no_grad():
            model(batch, image_sizes=sizes)

    def onnx_batch():
        onnx_model(batch, sizes)

    runs = {"torch batch 1": torch_single, "onnxruntime batch 1": onnx_single,
            "torch batch 8": torch_batch, "onnxruntime batch 8": onnx_batch}  # fmt: skip
    times = alternate(runs, repeats, warmup=1)
    per_image = {name: 1e3 * statistics.median(ts) / len(images[:8]) for name, ts in times.items()}
    return {"ms_per_image": per_image, "batch_shape": list(batch.shape)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--images", nargs="+", help="image files or folders (default: aquarium)")
    parser.add_argument("--repeats", type=int, default=7)
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
        onnx_model = OnnxDetector(path)
        model, _ = recipe.load_detector(args.checkpoint)
        size = onnx_model.image_size
        images = [preprocess_image(read_rgb_image(f), size)[0] for f in files]
        match = parity(model, onnx_model, images)
        timed_images = [preprocess_image(read_rgb_image(f), size)[0] for f in timed[:8]]
        speed = latency(model, onnx_model, timed_images, args.repeats)

    print(f"\nexport: {export_s:.1f} s, {size_mib:.1f} MiB")
    print(f"parity on {match['images']} images and {match['batched_pairs']} padded pairs "
          f"(sizes {sorted({tuple(im.shape[1:]) for im in images})}, detections "
          f"{match['detections_per_image']}): same counts and classes: {match['all_match']}, "
          f"largest box difference {match['max_box_px']:.2e} px, largest score difference "
          f"{match['max_score']:.2e}")  # fmt: skip
    print(f"\nlatency, ms per image (batch of 8: {speed['batch_shape']}):")
    for name, ms in speed["ms_per_image"].items():
        print(f"  {name:22s} {ms:8.1f}")
    write_json(args.out, {"environment": environment("cpu"), "checkpoint": args.checkpoint,
                          "export_s": export_s, "size_mib": size_mib, "parity": match,
                          "latency": speed})  # fmt: skip


if __name__ == "__main__":
    main()
