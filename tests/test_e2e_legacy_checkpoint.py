"""Checkpoints written before the package was split into modules still work.

The code of commit ``LEGACY_COMMIT`` (the last one before ``a4_helper.py`` became a facade) is
taken from this repository's history, run as it was to train a tiny demo model, and its
checkpoint is then evaluated and resumed by today's code. Skipped where the history is not
available (an export of the tree without ``.git``).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from support import needs_export_torch

import detector_cli

REPO = Path(__file__).resolve().parents[1]
LEGACY_COMMIT = "ae160e400198e320716c5fe8579dcb434735135c"
TINY = [
    "--num-train", "16", "--num-val", "4", "--image-size", "64", "--fpn-channels", "16",
    "--batch-size", "4", "--max-iters", "4", "--warmup-iters", "2", "--workers", "0",
    "--pre-nms-topk", "50", "--post-nms-topk", "20", "--no-progress",
]  # fmt: skip


def _legacy_tree(dest: Path) -> Path:
    """Extract ``LEGACY_COMMIT``'s files into ``dest``; skip the test where git cannot."""
    try:
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", "--format=tar", LEGACY_COMMIT],
            capture_output=True, check=True, timeout=60,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        pytest.skip(f"commit {LEGACY_COMMIT} is not in this checkout's git history")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return dest


@pytest.fixture(scope="module")
def legacy_run(tmp_path_factory):
    """``(output folder, metrics)`` of the old code's tiny demo, checkpoint included."""
    code = _legacy_tree(tmp_path_factory.mktemp("legacy"))
    out = tmp_path_factory.mktemp("legacy_out")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    subprocess.run(
        [sys.executable, "detector_cli.py", "demo", "--out", str(out), *TINY],
        cwd=code, env=env, check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    return out, json.loads((out / "metrics.json").read_text())


def test_legacy_checkpoint_evaluates_to_the_same_numbers(legacy_run, tmp_path):
    out, legacy_metrics = legacy_run
    torch.set_num_threads(1)
    data = out / "data" / "shapes"
    args = ["evaluate", str(out / "checkpoint.pt"), "--dataset", str(data), "--workers", "0"]
    assert detector_cli.main([*args, "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["mAP"] == legacy_metrics["mAP"] and metrics["ap"] == legacy_metrics["ap"]
    assert metrics["num_val_images"] == legacy_metrics["num_val_images"] == 4


def test_legacy_checkpoint_resumes(legacy_run, tmp_path, capsys):
    out, _ = legacy_run
    torch.set_num_threads(1)
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes())
    longer = [a if a != "4" or TINY[i - 1] != "--max-iters" else "6" for i, a in enumerate(TINY)]
    # Written before GroupNorm heads existed: resume it with the heads it trained with.
    argv = ["demo", "--out", str(run), "--data-dir", str(out / "data"), *longer, "--resume",
            "--norm", "none"]  # fmt: skip
    with pytest.warns(UserWarning, match="planned for 4 iterations with max_iters=6"):
        assert detector_cli.main(argv) == 0
    assert "at iteration 4" in capsys.readouterr().out
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    assert checkpoint["iteration"] == 6 and len(checkpoint["loss_history"]) == 6
    legacy = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["loss_history"][:4] == legacy["loss_history"]


@needs_export_torch
def test_legacy_checkpoint_exports_to_onnx_with_the_same_detections(legacy_run, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out, _ = legacy_run
    torch.set_num_threads(1)
    path = tmp_path / "legacy.onnx"
    argv = ["export", str(out / "checkpoint.pt"), "--out", str(path), "--device", "cpu"]
    assert detector_cli.main(argv) == 0
    images = tmp_path / "images"
    images.mkdir()
    for source in sorted((out / "data" / "shapes" / "JPEGImages").iterdir())[:4]:
        (images / source.name).write_bytes(source.read_bytes())
    found = {}
    for name, model_file in (("torch", out / "checkpoint.pt"), ("onnx", path)):
        argv = ["predict", str(model_file), str(images), "--out", str(tmp_path / name),
                "--conf", "0.05", "--device", "cpu"]  # fmt: skip
        assert detector_cli.main(argv) == 0
        records = json.loads((tmp_path / name / "detections.json").read_text())
        found[name] = {r["image"]: r["detections"] for r in records}
    assert found["onnx"].keys() == found["torch"].keys() and len(found["torch"]) == 4
    assert sum(map(len, found["torch"].values())) > 0
    # An untrained model scores many detections alike: compare each image's detections as
    # sets (same class, score within 1e-3, box within 0.5 px), not in their order.
    for image, expected in found["torch"].items():
        unmatched = list(found["onnx"][image])
        assert len(unmatched) == len(expected), image
        for want in expected:
            match = next(d for d in unmatched if d["class"] == want["class"]
                         and abs(d["score"] - want["score"]) <= 1e-3
                         and np.abs(np.subtract(d["box"], want["box"])).max() <= 0.5)  # fmt: skip
            unmatched.remove(match)
