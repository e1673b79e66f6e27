"""Tests for the course notebook ``two_stage_detector.ipynb``.

* A fast structural test: the committed notebook is valid nbformat v4, carries no outputs or
  execution counts, has its sections in the required order, and keeps out the course's shell
  commands (``!pip install wget``, ``!git clone`` of the external mAP tool).
* A slow end-to-end test: the notebook runs top to bottom in a real Jupyter kernel (nbclient)
  with ``A4_FAST_MODE=1``, writing its data and outputs to a temporary ``A4_WORK_DIR``.

Kernel resolution: the kernel is the ``python3`` kernelspec. jupyter_client starts a spec whose
command is ``python`` with the interpreter running the tests (``sys.executable``), and both the
venv's own kernelspec (``share/jupyter/kernels/python3``, argv ``python``) and ipykernel's
built-in one do that; ``JUPYTER_PREFER_ENV_PATH=1`` makes the venv's spec win over a user-level
one. The test does not rely on this silently: it prepends a cell printing the kernel's
``sys.prefix`` and fails unless it is the test interpreter's prefix.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "two_stage_detector.ipynb"

# Section headings, in the order the notebook must present them.
REQUIRED_SECTIONS = [
    r"setup",
    r"colab",
    r"data: pascal voc 2007",
    r"a look at the data",
    r"backbone .*fpn",
    r"region proposal network",
    r"rpn head",
    r"anchors",
    r"matching anchors",
    r"matched anchor",
    r"box deltas",
    r"losses",
    r"overfitting .*rpn",
    r"faster r-cnn",
    r"overfitting a small subset$",
    r"inference",
    r"training the full model",
    r"evaluation",
    r"box regression",
    r"submission",
]

# Directories that running the notebook may legitimately touch inside the repository.
_IGNORED_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis"}


def _headings(nb) -> list[str]:
    found = []
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        for line in cell.source.splitlines():
            m = re.match(r"^#{1,6}\s+(?:[\d.]+\s+)?(.*\S)\s*$", line)
            if m:
                found.append(m.group(1).lower())
    return found


def _repo_files() -> set[str]:
    files = set()
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in _IGNORED_DIRS]
        for name in filenames:
            files.add(os.path.relpath(os.path.join(dirpath, name), ROOT))
    return files


def _text_outputs(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append(out.get("text", ""))
            elif "data" in out and "text/plain" in out["data"]:
                parts.append(out["data"]["text/plain"])
    return "\n".join(parts)


def test_committed_notebook_is_clean_and_ordered():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4

    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"code cell {index} has outputs"
            assert cell.execution_count is None, f"code cell {index} has an execution count"

    headings = _headings(nb)
    position = 0
    for pattern in REQUIRED_SECTIONS:
        for i in range(position, len(headings)):
            if re.search(pattern, headings[i]):
                position = i + 1
                break
        else:
            pytest.fail(
                f"section matching {pattern!r} missing or out of order; headings: {headings}"
            )

    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert 'FAST_MODE = os.environ.get("A4_FAST_MODE", "0") == "1"' in code
    assert "%matplotlib inline" in code
    assert "!pip" not in code and "!git" not in code
    assert ".next()" not in code  # old iterator API
    assert "import google.colab" in code and "IN_COLAB" in code
    assert "box_regression=True" in code


@pytest.mark.slow
def test_notebook_runs_in_fast_mode(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    work_dir = tmp_path / "work"
    monkeypatch.setenv("A4_FAST_MODE", "1")
    monkeypatch.setenv("A4_WORK_DIR", str(work_dir))
    monkeypatch.setenv("JUPYTER_PREFER_ENV_PATH", "1")
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")  # leave no __pycache__ in the repo
    # One thread: on a small shared CPU, OpenMP threads competing with another busy process
    # made training iterations ~50x slower.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # conftest sets MPLBACKEND=Agg; the notebook's %matplotlib inline must still show figures.
    monkeypatch.setenv("MPLBACKEND", "Agg")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    probe = nbformat.v4.new_code_cell("import sys\nprint('KERNEL_PREFIX=' + sys.prefix)")
    nb.cells.insert(0, probe)

    before = _repo_files()
    client = NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        allow_errors=False,
        resources={"metadata": {"path": str(ROOT)}},
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError on the first failing cell
    elapsed = time.perf_counter() - start
    print(f"\nNotebook fast-mode run: {elapsed:.1f} s")

    text = _text_outputs(nb)
    prefix = re.search(r"KERNEL_PREFIX=(.*)", text).group(1).strip()
    assert os.path.realpath(prefix) == os.path.realpath(sys.prefix), (
        f"kernel runs in {prefix}, tests in {sys.prefix}"
    )

    # Sanity checks printed their results next to the expected values.
    assert "FAST_MODE: True" in text
    assert "p4 objectness (B, H*W, A) : (2, 196, 3)" in text
    assert "p5 box deltas (B, H*W, 4A): (2, 49, 12)" in text
    assert text.count("-> OK") == 7, text  # 3 anchor sets, IoU, 3 delta checks
    for bad in ("MISMATCH", "TOO LARGE", "WRONG"):
        assert bad not in text
    assert "mAP" in text and "box regression" in text
    assert "Submission skipped" in text

    # Figures were rendered inline despite MPLBACKEND=Agg.
    images = sum(
        1
        for cell in nb.cells
        for out in cell.get("outputs", [])
        if "image/png" in out.get("data", {})
    )
    assert images >= 5, f"only {images} inline figures"

    # Everything went to the work folder; the repository is untouched.
    assert (work_dir / "rcnn_detector_fast.pt").is_file()
    assert (work_dir / "mAP" / "input" / "detection-results").is_dir()
    assert _repo_files() == before, sorted(_repo_files() ^ before)
