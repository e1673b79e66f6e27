"""Training step and inference: our Faster R-CNN against torchvision's, same configuration.

Setup (issue 5, the notebook's overfit model): RegNet-X-400MF + FPN p3-p5 at 64 channels,
224 x 224 images, batch 16, anchors ``8 * stride`` x ratios (0.5, 1, 2), RPN IoU (0.3, 0.6),
16 anchors per image, pre/post-NMS top-k 400/80, RoI 7x7, 32 RoIs per image, second-stage box
regression on (torchvision always regresses). Both models have the same modules and weights
(``bench/matched.py``). Data: a fixed batch of the generated shapes dataset.

Rows:
- ``ours`` / ``torchvision``: one SGD step (zero_grad, forward, backward, step);
- ``floor``: all the model's own convolutions and linear layers run alone, forward and
  backward, with an SGD step over their weights (``ConvolutionFloor``): backbone + FPN, the
  RPN head on every level, and the box head (conv stem, classifier, box deltas) on a fixed
  random tensor of the pooled size, ``roi_batch`` RoIs per image. These are identical in
  both implementations and bound both; what a step spends above them is the detection
  pipeline (matching, sampling, NMS, RoI pooling, losses). A sum of the outputs is the loss.
- inference: ``eval()`` forward at batch 1 (per image) and at batch 16 (per batch), with two
  floors: the same convolutions and linear layers forward only (box head on
  ``post_nms_topk`` RoIs per image), as they are (NCHW), and in the layout our inference
  runs them in (``ConvolutionFloor(inference_layout=True)``).

Runs alternate within one process and medians are reported with ratios to torchvision.

Usage::

    python bench/bench_train_step.py [--device cpu|cuda] [--repeats 7] [--amp]
                                     [--compile [parts|whole]]
                                     [--out bench/results/train_step.json]

On CUDA, ``--amp`` runs every training row under float16 autocast with a ``GradScaler`` (as
``train_detector(amp=True)`` does), and the peak GPU memory is reported. The notebook's full
training configuration is ``--device cuda --fpn-channels 128`` (with and without ``--amp``).
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import torch
from harness import (
    add_step_args,
    alternate,
    environment,
    peak_rss_mib,
    print_table,
    shapes_batch,
    summarise,
    write_json,
)
from matched import build_pair, torchvision_targets
from torch import nn


class ConvolutionFloor(nn.Module):
    """The detector's own convolutions and linear layers alone (copies, same weights).

    ``forward(images)`` runs backbone + FPN, the RPN head on each level, and the box head on
    ``(B * rois_per_image, C, 7, 7)`` random features (drawn once per shape; RoI pooling is
    not part of the floor); it returns the sum of every output as a scalar loss.

    ``inference_layout``: the backbone runs as the detector's inference runs it
    (``inference_features``: BatchNorm folded, channels-last on a CPU) and the box head gets
    channels-last features, as ``fpn_roi_align`` gives them; otherwise the modules run as
    they are (NCHW), as in training.
    """

    def __init__(self, detector: nn.Module, rois_per_image: int, inference_layout: bool = False):
        super().__init__()
        self.backbone = copy.deepcopy(detector.backbone)
        self.rpn_head = copy.deepcopy(detector.rpn.pred_net)
        self.cls_pred = copy.deepcopy(detector.cls_pred)
        self.box_pred = copy.deepcopy(detector.box_pred)
        self.rois_per_image = rois_per_image
        self.inference_layout = inference_layout
        self._pooled: dict[tuple, torch.Tensor] = {}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.inference_layout:
            feats = self.backbone.inference_features(images)
        else:
            feats = self.backbone(images)
        logits, deltas = self.rpn_head(feats)
        hidden = self.cls_pred[:-1](self._pooled_features(images, feats))
        outputs = [*feats.values(), *logits.values(), *deltas.values()]
        outputs += [self.cls_pred[-1](hidden), self.box_pred(hidden)]
        return sum(out.float().sum() for out in outputs)

    def _pooled_features(self, images: torch.Tensor, feats: dict) -> torch.Tensor:
        """Fixed random (B * rois_per_image, C, 7, 7) features standing in for RoI pooling."""
        channels = next(iter(feats.values())).shape[1]
        shape = (len(images) * self.rois_per_image, channels, 7, 7)
        key = (shape, images.device, images.dtype)
        if key not in self._pooled:
            pooled = torch.randn(
                shape, generator=torch.Generator(images.device).manual_seed(0),
                device=images.device, dtype=images.dtype,
            )  # fmt: skip
            if self.inference_layout:
                pooled = pooled.contiguous(memory_format=torch.channels_last)
            self._pooled[key] = pooled
        return self._pooled[key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_args(parser)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--skip-inference", action="store_true")
    parser.add_argument(
        "--compile",
        nargs="?",
        const="parts",
        choices=["parts", "whole"],
        help="add 'ours, compiled' rows (inductor; the warm-up steps absorb the compilation): "
        "'parts' (the default) compiles the fixed-shape parts (a4_helper.compile_detector), "
        "'whole' the whole model (torch.compile; its training forward is one graph)",
    )
    parser.add_argument(
        "--amp", action="store_true", help="float16 autocast + GradScaler (CUDA only)"
    )
    parser.add_argument("--out", default="bench/results/train_step.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.amp and device.type != "cuda":
        parser.error("--amp needs --device cuda (mixed precision is CUDA-only here)")
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # as train_detector does on CPU (random-init trunk)

    ours, theirs = build_pair(fpn_channels=args.fpn_channels, image_size=args.image_size)
    ours, theirs = ours.to(device), theirs.to(device)
    floor_model = ConvolutionFloor(ours, rois_per_image=ours.batch_size_per_image)
    images, gt_boxes = shapes_batch(args.batch_size, args.image_size, device)
    image_list = list(images)
    targets = torchvision_targets(gt_boxes)

    def make_step(model: torch.nn.Module, loss_fn) -> Callable[[], None]:
        """One timed SGD step of ``model`` (its own optimizer and GradScaler): zero_grad,
        forward (under autocast with --amp), backward, step."""
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        scaler = torch.amp.GradScaler("cuda", enabled=args.amp)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=args.amp):
                loss = loss_fn(model)
            scaler.scale(loss.float()).backward()
            scaler.step(optimizer)
            scaler.update()

        return step

    def detector_loss(model: torch.nn.Module) -> torch.Tensor:
        return sum(model(images, gt_boxes).values())

    def torchvision_loss(model: torch.nn.Module) -> torch.Tensor:
        return sum(model(image_list, targets).values())

    def floor_loss(model: torch.nn.Module) -> torch.Tensor:
        return model(images)

    steps = {
        "ours": make_step(ours, detector_loss),
        "torchvision": make_step(theirs, torchvision_loss),
        "floor (convolutions)": make_step(floor_model, floor_loss),
    }
    compiled = None
    if args.compile:
        from a4_helper import compile_detector

        compiled = copy.deepcopy(ours)
        if args.compile == "whole":
            compiled = torch.compile(compiled)
        else:
            compiled = compile_detector(compiled)
        steps["ours, compiled"] = make_step(compiled, detector_loss)

    for model in (ours, theirs, floor_model):
        model.train()
    times = alternate(steps, args.repeats, device=device)
    train = summarise(times, "torchvision")
    print_table(
        f"training step, batch {args.batch_size}, {args.image_size} px, {device}",
        train,
        "torchvision",
    )
    floor = train["floor (convolutions)"]["median_s"]
    print(f"ours / floor: {train['ours']['median_s'] / floor:.2f}x")
    print(f"ours: {1 / train['ours']['median_s']:.1f} it/s" + (" (amp)" if args.amp else ""))
    result = {
        "environment": environment(device),
        "config": vars(args),
        "train_step": train,
        "ours_over_floor": train["ours"]["median_s"] / floor,
        "peak_rss_mib_after_training": peak_rss_mib(),
    }
    if device.type == "cuda":
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        print(f"peak GPU memory (all training rows): {result['peak_gpu_mib']:.0f} MiB")

    if not args.skip_inference:
        ours.eval()
        theirs.eval()
        floors = {
            "floor (convolutions)": ConvolutionFloor(ours, ours.rpn.post_nms_topk).eval(),
            "floor, inference layout": ConvolutionFloor(
                ours, ours.rpn.post_nms_topk, inference_layout=True
            ).eval(),
        }
        for batch in (1, args.batch_size):
            sub_images, sub_list = images[:batch], image_list[:batch]

            @torch.no_grad()
            def infer_ours(x=sub_images) -> None:
                ours(x)

            @torch.no_grad()
            def infer_theirs(x=sub_list) -> None:
                theirs(x)

            repeats = args.repeats * (3 if batch == 1 else 1)
            runs = {"ours": infer_ours, "torchvision": infer_theirs}
            for name, floor_model in floors.items():
                runs[name] = torch.no_grad()(lambda x=sub_images, m=floor_model: m(x))
            if compiled is not None:
                compiled.eval()

                @torch.no_grad()
                def infer_compiled(x=sub_images) -> None:
                    compiled(x)

                runs["ours, compiled"] = infer_compiled
            rows = summarise(alternate(runs, repeats, device=device), "torchvision")
            print_table(f"inference, batch {batch}", rows, "torchvision")
            for name in floors:
                ratio = rows["ours"]["median_s"] / rows[name]["median_s"]
                rows["ours"][f"over_{name}"] = ratio
                print(f"ours / {name}: {ratio:.2f}x")
            result[f"inference_batch_{batch}"] = rows
    print(f"peak RSS: {peak_rss_mib():.0f} MiB")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
