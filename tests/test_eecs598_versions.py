"""The supported torch range: one floor, stated alike everywhere, and one line below it.

Marked ``compat``: these run in the normal suite and again under the oldest supported torch and
the one Colab ships (``make test-compat``), where the optional packages are really absent.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from eecs598 import versions
from eecs598.versions import FLOORS, release, unsupported_torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.compat


def test_release_reads_local_and_dev_versions():
    assert release("2.9.0+cu126") == (2, 9, 0)
    assert release("2.10.0.dev20250101") == (2, 10, 0)
    assert release("0.19") == (0, 19)
    assert release("2.4") <= release("2.4.0") < release("2.4.1") < release("2.10")
    with pytest.raises(ValueError, match="not a version: 'abc'"):
        release("abc")


@pytest.mark.parametrize(
    "installed, expected",
    [
        ({"torch": "2.4.0", "torchvision": "0.19.0"}, None),
        ({"torch": "2.9.0+cu126", "torchvision": "0.24.0+cu126"}, None),
        (
            {"torch": "2.3.1", "torchvision": "0.19.0"},
            "torch 2.3.1 is older than 2.4, the oldest this package supports: "
            'pip install "torch>=2.4" "torchvision>=0.19"',
        ),
        (
            {"torch": "2.3.1+cu121", "torchvision": None},
            "torch 2.3.1+cu121 is older than 2.4; torchvision is not installed, the oldest this "
            'package supports: pip install "torch>=2.4" "torchvision>=0.19"',
        ),
    ],
)
def test_unsupported_torch_names_the_versions_and_the_fix(monkeypatch, installed, expected):
    monkeypatch.setattr(versions, "_installed", installed.get)
    assert unsupported_torch() == expected
    if expected is None:
        versions.require_supported_torch()
    else:
        with pytest.raises(ImportError) as caught:
            versions.require_supported_torch()
        assert str(caught.value) == expected


def test_the_running_torch_is_supported():
    import torch
    import torchvision

    assert unsupported_torch() is None
    assert release(torch.__version__) >= release(FLOORS["torch"])
    assert release(torchvision.__version__) >= release(FLOORS["torchvision"])


def _with_old_torch(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Run ``python *args`` where the metadata of torch 2.3.1 comes first on ``sys.path``."""
    info = tmp_path / "torch-2.3.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.3.1\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_below_the_floor_the_notebook_and_the_command_line_say_one_line(tmp_path):
    expected = "torch 2.3.1 is older than 2.4, the oldest this package supports: pip install"
    notebook = _with_old_torch(tmp_path, "-c", "from a4_helper import hello_helper")
    assert notebook.returncode == 1
    assert notebook.stderr.strip().splitlines()[-1].startswith(f"ImportError: {expected}")
    assert "torchvision" not in notebook.stderr.split("ImportError:")[0]  # raised before it
    cli = _with_old_torch(tmp_path, "detector_cli.py", "--help")
    assert cli.returncode == 1 and cli.stdout == ""
    assert cli.stderr.splitlines() == [f'error: {expected} "torch>=2.4" "torchvision>=0.19"']


def _requirement_floor(name: str) -> str:
    text = (ROOT / "requirements.txt").read_text()
    (floor,) = re.findall(rf"^{name}>=([\d.]+)\s*$", text, flags=re.M)
    return floor


def test_one_floor_in_requirements_readme_notebook_and_ci():
    """requirements.txt (which pyproject.toml reads), the code's check, the README, the
    notebook's setup cell and the Makefile's floor environment state the same floor."""
    torch_floor, vision_floor = FLOORS["torch"], FLOORS["torchvision"]
    assert _requirement_floor("torch") == torch_floor
    assert _requirement_floor("torchvision") == vision_floor
    assert 'file = ["requirements.txt"]' in (ROOT / "pyproject.toml").read_text()
    statement = f"torch {torch_floor}+ and torchvision {vision_floor}+"
    assert statement in (ROOT / "README.md").read_text()
    notebook = json.loads((ROOT / "two_stage_detector.ipynb").read_text())
    setup = [
        "".join(cell["source"])
        for cell in notebook["cells"]
        if cell["cell_type"] == "code"
        and "from a4_helper import hello_helper" in "".join(cell["source"])
    ]
    assert len(setup) == 1 and statement in setup[0]
    makefile = (ROOT / "Makefile").read_text()
    pins = re.search(r"^floor_TORCH := torch==([\d.]+) torchvision==([\d.]+)$", makefile, re.M)
    assert pins is not None
    assert release(pins.group(1))[:2] == release(torch_floor)
    assert release(pins.group(2))[:2] == release(vision_floor)
    for pinned in re.findall(r"^\w+_TORCH := torch==([\d.]+)", makefile, flags=re.M):
        assert release(pinned) >= release(torch_floor), pinned


def _cli_error(argv: list[str], capsys) -> str:
    import detector_cli

    assert detector_cli.main([*argv, "--device", "cpu"]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    return line


def test_without_onnxruntime_predict_says_what_to_install(tmp_path, monkeypatch, capsys):
    """Checked before the file is read, so it need not exist."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now raises ImportError
    line = _cli_error(["predict", str(tmp_path / "model.onnx"), str(tmp_path / "x.png")], capsys)
    assert line == (
        "error: ONNX export and inference need the optional package(s) onnxruntime: "
        "pip install onnx onnxscript onnxruntime"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("torch_version", ["2.9.1+cu128", versions.EXPORT_TORCH_FLOOR + ".0"])
def test_export_names_the_torch_or_the_packages_it_needs(
    tmp_path, monkeypatch, capsys, torch_version
):
    """The torch first, then the packages, both before the checkpoint is read."""
    import torch

    monkeypatch.setattr(torch, "__version__", torch_version)
    for name in ("onnx", "onnxscript"):
        monkeypatch.setitem(sys.modules, name, None)
    line = _cli_error(["export", str(tmp_path / "no.pt"), "--out", str(tmp_path / "m.onnx")],
                      capsys)  # fmt: skip
    if torch_version.startswith("2.9"):
        floor = versions.EXPORT_TORCH_FLOOR
        assert line == (
            f"error: ONNX export needs torch {floor} or newer, found 2.9.1+cu128: "
            f'pip install "torch>={floor}" (everything else runs from torch {FLOORS["torch"]})'
        )
    else:
        assert line == (
            "error: ONNX export and inference need the optional package(s) onnx, onnxscript: "
            "pip install onnx onnxscript onnxruntime"
        )
    assert list(tmp_path.iterdir()) == []


def test_without_pycocotools_the_map_tool_says_what_to_install(tmp_path, monkeypatch, capsys):
    import numpy as np

    from eecs598.mean_ap import PYCOCOTOOLS_MISSING, image_detections, main, write_tool_files

    box = np.array([[10.0, 10.0, 50.0, 50.0]])
    image = image_detections("a", box, [0], [False], box, [0], [0.9])
    write_tool_files(tmp_path, image, ["dog"])
    for name in ("pycocotools", "pycocotools.coco", "pycocotools.cocoeval"):
        monkeypatch.setitem(sys.modules, name, None)
    assert main([str(tmp_path), "--coco"]) == 1
    assert capsys.readouterr().err.splitlines() == [f"error: {PYCOCOTOOLS_MISSING}"]
    assert "pip install pycocotools" in PYCOCOTOOLS_MISSING
    assert main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "mAP = 100.00%"
