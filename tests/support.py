"""What several test files share that is not a fixture: writers of small hand-made VOC-layout
datasets, painted images to overfit, a small Faster R-CNN, and a stand-in detector for the
training loop (fixtures live in ``conftest.py``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import recipe
from common import DetectorBackboneWithFPN
from eecs598.checkpoint import detector_meta, save_weights
from eecs598.training import train_detector
from eecs598.versions import EXPORT_TORCH_FLOOR, release
from two_stage_detector import RPN, FasterRCNN

#: Tests of the ONNX export: skipped, with the reason, under a torch older than it needs (the
#: full suite then still runs on the students' torch; ``make test`` runs it on the pinned one).
needs_export_torch = pytest.mark.skipif(
    release(torch.__version__) < release(EXPORT_TORCH_FLOOR),
    reason=f"ONNX export needs torch {EXPORT_TORCH_FLOOR}+, this is {torch.__version__}",
)

# Repository's sibling folder with shared data; absent on some machines (tests then skip).
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def write_xml(path: Path, filename: str, size: tuple[int, int] | None, objects: list) -> None:
    """Write one annotation; ``objects`` rows are ``(name, (x1, y1, x2, y2), difficult)``."""
    parts = ["<annotation>", f"<filename>{filename}</filename>"]
    if size is not None:
        parts.append(f"<size><width>{size[0]}</width><height>{size[1]}</height></size>")
    for name, box, difficult in objects:
        coords = "".join(
            f"<{tag}>{value}</{tag}>"
            for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True)
        )
        parts.append(
            f"<object><name>{name}</name><difficult>{int(difficult)}</difficult>"
            f"<bndbox>{coords}</bndbox></object>"
        )
    parts.append("</annotation>")
    path.write_text("\n".join(parts))


def write_dataset(root: Path, images: dict, splits: dict[str, list[str]]) -> Path:
    """Write a VOC-layout dataset.

    Args:
        images: ``{image_id: (pil_image, file_ext, objects)}``; ``objects`` as in
            :func:`write_xml`.
        splits: ``{split: [image_id, ...]}``.
    """
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for image_id, (image, ext, objects) in images.items():
        filename = f"{image_id}{ext}"
        image.save(root / "JPEGImages" / filename)
        write_xml(root / "Annotations" / f"{image_id}.xml", filename, image.size, objects)
    for split, ids in splits.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def write_folder(root: Path, files: dict[str, tuple[str, str | None]]) -> Path:
    """An mAP-tool folder (``ground-truth/``, ``detection-results/``) of text files;
    ``files``: ``{image_id: (gt text, detection text or None for no file)}``."""
    (root / "ground-truth").mkdir(parents=True)
    (root / "detection-results").mkdir()
    for image_id, (gt_text, det_text) in files.items():
        (root / "ground-truth" / f"{image_id}.txt").write_text(gt_text)
        if det_text is not None:
            (root / "detection-results" / f"{image_id}.txt").write_text(det_text)
    return root


def noise_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Random RGB image converted to ``mode``."""
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(array).convert(mode)


def painted_images(size: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    """Four noise images of ``size`` x ``size`` with 1-3 objects each, painted in one colour
    per class (4 classes), so that a detector has something to memorise.

    Returns:
        ``images (4, 3, size, size)`` and ``gt_boxes (4, 3, 5)`` (``x1, y1, x2, y2, class``;
        rows of -1 pad). Boxes are drawn on a 96-pixel image and scaled to ``size``.
    """
    generator = torch.Generator().manual_seed(0)
    gt = torch.full((4, 3, 5), -1.0)
    gt[0, :2] = torch.tensor([[8.0, 8, 60, 70, 0], [50, 40, 90, 90, 1]])
    gt[1, :1] = torch.tensor([[20.0, 10, 80, 60, 2]])
    gt[2, :3] = torch.tensor([[0.0, 0, 40, 40, 3], [40, 40, 90, 90, 0], [60, 0, 96, 30, 1]])
    gt[3, :1] = torch.tensor([[10.0, 30, 90, 80, 2]])
    valid = gt[..., 4] >= 0
    gt[..., :4][valid] = (gt[..., :4][valid] * size / 96).round()
    images = 0.3 * torch.randn(4, 3, size, size, generator=generator)
    colours = torch.tensor([[2.0, -1, -1], [-1, 2, -1], [-1, -1, 2], [2, 2, -1]])
    for b, j in torch.nonzero(valid).tolist():
        x1, y1, x2, y2, k = gt[b, j].long().tolist()
        images[b, :, y1:y2, x1:x2] += colours[k][:, None, None]
    return images, gt


def make_gt(batch: int) -> torch.Tensor:
    """(batch, 6, 5) GT rows for 128-pixel images: two boxes in image 0, one in image 1."""
    gt = torch.full((batch, 6, 5), -1.0)
    gt[0, :2] = torch.tensor([[10.0, 20, 100, 120, 3], [50, 50, 200, 180, 7]])
    if batch > 1:
        gt[1, :1] = torch.tensor([[0.0, 0, 128, 128, 0]])  # image 2 (if any) has no objects
    return gt


def small_faster_rcnn(box_regression: bool = False, num_classes: int = 8) -> FasterRCNN:
    """A Faster R-CNN with 32 FPN channels and random weights, quick to run on a CPU."""
    backbone = DetectorBackboneWithFPN(out_channels=32, pretrained=False)
    rpn = RPN(32, [32, 32], batch_size_per_image=16, pre_nms_topk=200, post_nms_topk=50)
    return FasterRCNN(
        backbone, rpn, stem_channels=[32, 32], num_classes=num_classes,
        batch_size_per_image=32, box_regression=box_regression,
    )  # fmt: skip


def write_notebook_files(folder: Path, classes: tuple | list, image_size: int = 224) -> FasterRCNN:
    """What the notebook's section 4.3 writes, for section 4.3's model at 16 FPN channels
    trained one iteration by ``train_detector`` on ``painted_images(64)``: its checkpoint
    ``rcnn_training.pt`` and its weights ``rcnn_detector.pt`` (``save_weights``), both naming
    ``classes``, and ``old_rcnn_detector.pt``, a bare state_dict as it was saved before.
    Returns the model, in eval mode."""
    torch.manual_seed(0)
    model = recipe.build_detector(len(classes), fpn_channels=16, pretrained=False)
    model.meta = detector_meta(classes, image_size)
    images, gt = painted_images(64)
    train_detector(model, [(["a", "b", "c", "d"], images, gt)], max_iters=1, device="cpu",
                   checkpoint_path=folder / "rcnn_training.pt", show_plot=False,
                   progress=False)  # fmt: skip
    save_weights(model, folder / "rcnn_detector.pt")
    torch.save(model.state_dict(), folder / "old_rcnn_detector.pt")
    return model.eval()


class Interrupted(Exception):
    """Stands for a crash or a killed session in the middle of training."""


class TinyDetector(nn.Module):
    """Stand-in detector with the FasterRCNN calling convention.

    Training: predicts the first valid GT box and class of each image from pooled features;
    dropout and a random channel permutation make it consume the torch RNG like the real model's
    sampling does. Returns two loss terms and a non-loss entry that must be ignored.
    Eval: returns the GT-free prediction as one detection per image.
    """

    def __init__(self, num_classes: int, fail_at: int | None = None, nan_at: int | None = None):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Dropout(0.1))
        self.head = nn.Linear(8, 4 + num_classes)
        self.calls = 0
        self.fail_at, self.nan_at = fail_at, nan_at
        self.config = {"num_classes": num_classes, "channels": (8,), "act": nn.ReLU}

    def forward(self, images, gt_boxes=None, test_score_thresh=None, test_nms_thresh=None):
        feats = self.features(images)
        feats = feats[:, torch.randperm(feats.shape[1])].mean(dim=(2, 3))
        out = self.head(feats)
        h, w = images.shape[-2:]
        scale = torch.tensor([w, h, w, h], dtype=out.dtype)
        if not self.training:
            xs = out[0, [0, 2]].sigmoid().sort().values * w
            ys = out[0, [1, 3]].sigmoid().sort().values * h
            box = torch.stack([xs[0], ys[0], xs[1], ys[1]])[None]
            score = out[0, 4:].softmax(0).max(0)
            return box, score.indices[None], score.values[None]
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise Interrupted
        first = gt_boxes[:, 0]
        loss_box = nn.functional.smooth_l1_loss(out[:, :4].sigmoid(), first[:, :4] / scale)
        loss_cls = nn.functional.cross_entropy(out[:, 4:], first[:, 4].long())
        if self.nan_at is not None and self.calls == self.nan_at:
            loss_cls = loss_cls * float("nan")
        return {"loss_box": loss_box, "loss_cls": loss_cls, "proposals": out.detach()}
