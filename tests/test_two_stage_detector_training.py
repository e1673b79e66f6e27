"""The longer checks of two_stage_detector.py: a 150-iteration overfit and whole-graph
compilation of the training forward. They take half a minute, so they are not among the
student's quick checks (``pytest -m sanity``); the notebook's own tiny overfitting checks are, in
``test_two_stage_detector.py``."""

from __future__ import annotations

import copy

import pytest
import torch
from support import make_gt, painted_images, small_faster_rcnn

from common import DetectorBackboneWithFPN
from eecs598.versions import release
from two_stage_detector import RPN, FasterRCNN


def test_overfit_four_images(flush_denormal):
    """150 iterations on 4 fixed images with fixed boxes lower the total loss at least 5x.

    The objects are painted into noise images in a colour per class, so there is something to
    memorise. Recipe: SGD lr 0.01, momentum 0.9, 20 warmup iterations, gradient norm clipped at
    10 (a random-init trunk diverges without them).
    """
    torch.manual_seed(0)
    images, gt = painted_images(96)
    backbone = DetectorBackboneWithFPN(out_channels=32, pretrained=False)
    rpn = RPN(32, [32, 32], batch_size_per_image=16, pre_nms_topk=200, post_nms_topk=40)
    model = FasterRCNN(backbone, rpn, [32, 32], num_classes=4, batch_size_per_image=32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / 20))
    history = []
    for _ in range(150):
        total = sum(model(images, gt).values())
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        warmup.step()
        history.append(total.item())
    first, last = sum(history[:5]) / 5, sum(history[-5:]) / 5
    print(f"overfit: loss {first:.3f} -> {last:.3f} ({first / last:.1f}x)")
    assert last * 5 <= first


@pytest.mark.skipif(
    release(torch.__version__) < (2, 9),
    reason="tested from torch 2.9: 2.4's dynamo breaks the graph at max() over dict values",
)
def test_whole_training_forward_compiles_with_fullgraph():
    """Losses included, the training forward is one graph (no graph break; under compilation
    the NMS sweeps run as a ``while_loop`` and the host-side gt value check is skipped), and it
    gives eager's losses and gradients."""
    torch.manual_seed(0)
    model = small_faster_rcnn(box_regression=True).train()
    eager = copy.deepcopy(model)
    images, gt = torch.randn(2, 3, 128, 160), make_gt(2)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    results = []
    for net in (eager, compiled):
        torch.manual_seed(1)
        losses = net(images, gt)
        sum(losses.values()).backward()
        results.append(losses)
    torch._dynamo.reset()
    assert results[0].keys() == results[1].keys() == {
        "loss_rpn_obj", "loss_rpn_box", "loss_cls", "loss_box"
    }  # fmt: skip
    for key, value in results[0].items():
        torch.testing.assert_close(results[1][key], value, rtol=1e-5, atol=1e-6)
    for p, q in zip(eager.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6)
