"""Tests for the course notebook ``two_stage_detector.ipynb``.

* A fast structural test: the committed notebook is valid nbformat v4, carries no outputs or
  execution counts, numbers its sections as the course notebook does (3.x, 4.x, 5), and keeps
  out the course's shell commands (``!pip install wget``, ``!git clone`` of the mAP tool).
* Slow end-to-end tests in real Jupyter kernels (nbclient) with ``A4_FAST_MODE=1`` and a
  temporary ``A4_WORK_DIR``, on a CPU:

  - the whole notebook top to bottom (run once per module, shared by the tests below);
  - a simulated disconnect: a fresh kernel runs only the setup section (3.1) and then section
    4.4 (evaluation), or 4.3.1 (detections), from the checkpoint the first run saved, and
    without a checkpoint both say what to run first;
  - a simulated interruption of the full training: the kernel is killed (SIGKILL, like a lost
    runtime) right after the first checkpoint; rerunning 3.1, 3.2 and 4.3 in a new kernel
    resumes at the saved iteration and ends with the losses and weights of the uninterrupted
    run. That kernel then runs 4.4 and the optional 4.5 switched on, as the notebook tells a
    student to after a disconnect.

Cells are selected by section number: a cell belongs to the section of the last numbered
heading at or above it (:func:`_section_cells`), so "run section 3.1" here is what the notebook
tells a student to run.

Kernel resolution: the kernel is the ``python3`` kernelspec. jupyter_client starts a spec whose
command is ``python`` with the interpreter running the tests (``sys.executable``), and both the
venv's own kernelspec (``share/jupyter/kernels/python3``, argv ``python``) and ipykernel's
built-in one do that; ``JUPYTER_PREFER_ENV_PATH=1`` makes the venv's spec win over a user-level
one. The test does not rely on this silently: the full run prepends a cell printing the
kernel's ``sys.prefix`` and fails unless it is the test interpreter's prefix.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "two_stage_detector.ipynb"

# The numbered headings, in order: the course notebook's numbers (3.x the RPN, 4.x Faster
# R-CNN, 5 the submission; 3.1.2-3.1.4 and 4.5 are this notebook's own) with their titles.
REQUIRED_SECTIONS = [
    ("1", r"two-stage object detection"),
    ("2", r"faster r-cnn: a two-stage"),
    ("3", r"getting started"),
    ("3.1", r"setup"),
    ("3.1.1", r"google colab"),
    ("3.1.2", r"libraries"),
    ("3.1.3", r"device"),
    ("3.1.4", r"data and checkpoint settings"),
    ("3.2", r"load pascal voc 2007"),
    ("3.3", r"a look at the data"),
    ("3.4", r"backbone .*fpn"),
    ("3.5", r"region proposal network"),
    ("3.6", r"training the rpn"),
    ("3.6.1", r"anchors"),
    ("3.6.2", r"matching anchors"),
    ("3.6.3", r"matched anchor"),
    ("3.6.4", r"box deltas"),
    ("3.7", r"losses"),
    ("3.8", r"the rpn module"),
    ("3.9", r"overfitting .*rpn"),
    ("4", r"faster r-cnn"),
    ("4.1", r"overfitting a small subset$"),
    ("4.2", r"inference"),
    ("4.3", r"training the full model"),
    ("4.3.1", r"detections of the trained model"),
    ("4.4", r"evaluation"),
    ("4.5", r"box regression"),
    ("5", r"submission"),
]

# Directories that running the notebook may legitimately touch inside the repository.
_IGNORED_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis"}
_HEADING = re.compile(r"^#{1,6}\s+(?:([\d.]*\d)\.?\s+)?(.*\S)\s*$")


def _headings(nb) -> list[tuple[str | None, str]]:
    """``(number or None, lower-case title)`` of every markdown heading, in order."""
    found = []
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        for line in cell.source.splitlines():
            m = _HEADING.match(line)
            if m:
                found.append((m.group(1), m.group(2).lower()))
    return found


def _section_cells(nb, number: str) -> list[int]:
    """Indices of the cells of section ``number``, its subsections included."""
    current, indices = None, []
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                m = _HEADING.match(line)
                if m and m.group(1):
                    current = m.group(1)
        if current is not None and (current == number or current.startswith(number + ".")):
            indices.append(index)
    assert indices, f"no section {number}"
    return indices


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
            elif out.get("output_type") == "error":
                parts.append(f"{out['ename']}: {out['evalue']}")
    return "\n".join(parts)


def _inline_images(nb) -> int:
    return sum(
        1
        for cell in nb.cells
        for out in cell.get("outputs", [])
        if "image/png" in out.get("data", {})
    )


def _code_cell(nb, number: str, marker: str) -> int:
    """Index of the code cell of section ``number`` whose source contains ``marker``."""
    found = [
        i
        for i in _section_cells(nb, number)
        if nb.cells[i].cell_type == "code" and marker in nb.cells[i].source
    ]
    assert len(found) == 1, (number, marker, found)
    return found[0]


def test_committed_notebook_is_clean_and_ordered():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4

    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"code cell {index} has outputs"
            assert cell.execution_count is None, f"code cell {index} has an execution count"

    numbered = [(n, title) for n, title in _headings(nb) if n is not None]
    assert [n for n, _ in numbered] == [n for n, _ in REQUIRED_SECTIONS], numbered
    for (number, title), (_, pattern) in zip(numbered, REQUIRED_SECTIONS, strict=True):
        assert re.search(pattern, title), f"section {number} is {title!r}, expected {pattern!r}"

    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert 'FAST_MODE = os.environ.get("A4_FAST_MODE", "0") == "1"' in code
    assert "%matplotlib inline" in code
    assert "!pip" not in code and "!git" not in code
    assert ".next()" not in code.replace("# not train_loader_iter.next()", "")  # old iterator API
    assert "import google.colab" in code and "IN_COLAB" in code
    assert "box_regression=True" in code

    # The switches sit at the top, in the setup section; the optional comparison is off.
    top = nb.cells[_code_cell(nb, "3.1", "FAST_MODE = ")].source
    assert "USE_AMP = True" in top
    assert 'AMP = USE_AMP and DEVICE.type == "cuda"' in code
    assert "RUN_BOX_REGRESSION_COMPARISON = False" in code
    full = nb.cells[_code_cell(nb, "4.3", "full_history = train_detector(")].source
    assert "checkpoint_path=FULL_CHECKPOINT" in full and "resume=True" in full
    assert full.rstrip().endswith("full_history")  # shown by its short repr
    boxreg = nb.cells[_code_cell(nb, "4.5", "RUN_BOX_REGRESSION_COMPARISON")].source
    assert "checkpoint_path=BOXREG_CHECKPOINT" in boxreg
    # On Colab the evaluation's scratch files go to the runtime's local disk, the chart to Drive.
    setup = "\n".join(nb.cells[i].source for i in _section_cells(nb, "3.1"))
    assert 'SCRATCH_DIR = "/content" if IN_COLAB else WORK_DIR' in setup
    assert 'EVAL_DIR = os.path.join(SCRATCH_DIR, "mAP", "input")' in setup
    assert 'MAP_PLOT_PATH = os.path.join(WORK_DIR, f"mAP{_SUFFIX}.png")' in setup

    # Colab: a GPU runtime asked for; the sanity checks' command; VOC on the local disk with
    # its tar kept on Drive; section 4.3 trains from the decoded-image cache and saves weights
    # that name their classes; 4.3.1 and 4.4 fall back to those weights.
    assert nb.metadata["accelerator"] == "GPU" and nb.metadata["colab"]["gpuType"] == "T4"
    assert '!cd "{NOTEBOOK_DIR}" && python -m pytest -m sanity -q' in setup
    assert "RUN_SANITY_CHECKS = False" in setup
    assert "VOC_DIR = SCRATCH_DIR" in setup and "archive_dir=VOC_ARCHIVE_DIR" in setup
    assert "CachedDetection(" in full
    assert "full_train_loader, checkpoint_path=FULL_CHECKPOINT" in full
    assert "save_weights(faster_rcnn, WEIGHTS_PATH)" in full and "detector_meta(" in full
    assert "full_train_loader, checkpoint_path=BOXREG_CHECKPOINT" in boxreg
    for section in ("4.3.1", "4.4"):
        cell = "\n".join(nb.cells[i].source for i in _section_cells(nb, section))
        assert "load_trained_detector(\n    FULL_CHECKPOINT, WEIGHTS_PATH, device=DEVICE" in cell
    assert "def load_trained_detector" not in code  # the package's, from a4_helper


# ----------------------------------------------------------------------------------------------
# Running the notebook in real kernels
# ----------------------------------------------------------------------------------------------


@dataclass
class Run:
    nb: nbformat.NotebookNode
    text: str
    work_dir: Path
    elapsed: float


def _kernel_env(work_dir: Path) -> dict[str, str]:
    return {
        "A4_FAST_MODE": "1",
        "A4_WORK_DIR": str(work_dir),
        "JUPYTER_PREFER_ENV_PATH": "1",
        "PYTHONDONTWRITEBYTECODE": "1",  # leave no __pycache__ in the repo
        # One thread: on a small shared CPU, OpenMP threads competing with another busy
        # process made training iterations ~50x slower.
        "OMP_NUM_THREADS": "1",
        # conftest sets MPLBACKEND=Agg; the notebook's %matplotlib inline must still show figures.
        "MPLBACKEND": "Agg",
    }


def _client(nb, work_dir: Path):
    from nbclient import NotebookClient

    return NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        allow_errors=False,
        resources={"metadata": {"path": str(ROOT)}},
    )


def _env(work_dir: Path) -> dict[str, str]:
    """The environment a kernel starts with (passed to ``start_kernel``; os.environ is kept)."""
    return {**os.environ, **_kernel_env(work_dir)}


def _subset(full_nb, indices: list[int]):
    nb = copy.deepcopy(full_nb)
    nb.cells = [nb.cells[i] for i in indices]
    return nb


def _run(nb, work_dir: Path) -> Run:
    """Execute every cell of ``nb`` in one new kernel; raises on the first failing cell."""
    start = time.perf_counter()
    _client(nb, work_dir).execute(env=_env(work_dir))
    return Run(nb, _text_outputs(nb), work_dir, time.perf_counter() - start)


def _setup(nb) -> list[int]:
    return _section_cells(nb, "3.1")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Run:
    """The whole notebook, top to bottom, in fast mode (shared by the tests of this module)."""
    work_dir = tmp_path_factory.mktemp("notebook") / "work"
    nb = nbformat.read(NOTEBOOK, as_version=4)
    probe = nbformat.v4.new_code_cell("import sys\nprint('KERNEL_PREFIX=' + sys.prefix)")
    nb.cells.insert(0, probe)
    before = _repo_files()
    run = _run(nb, work_dir)
    print(f"\nNotebook fast-mode run: {run.elapsed:.1f} s")
    assert _repo_files() == before, sorted(_repo_files() ^ before)  # the repository is untouched
    return run


def _checkpoint(path: Path) -> dict:
    from eecs598.checkpoint import load_checkpoint

    return load_checkpoint(path)


def _map_line(text: str) -> str:
    lines = re.findall(r"^mAP over \d+ images: [\d.]+%$", text, flags=re.M)
    assert len(lines) == 1, lines
    return lines[0]


_LOSS_REPR = re.compile(r"LossHistory\(60 iterations, last [\d.]+, min [\d.]+ at iteration \d+, "
                        r"terms: loss_rpn_obj, loss_rpn_box, loss_cls\)")  # fmt: skip


@pytest.mark.slow
@pytest.mark.compat
def test_notebook_runs_in_fast_mode(full_run):
    text, work_dir = full_run.text, full_run.work_dir
    prefix = re.search(r"KERNEL_PREFIX=(.*)", text).group(1).strip()
    assert os.path.realpath(prefix) == os.path.realpath(sys.prefix), (
        f"kernel runs in {prefix}, tests in {sys.prefix}"
    )

    # Sanity checks printed their results next to the expected values.
    assert "FAST_MODE: True | USE_AMP: True" in text
    assert "Mixed precision (AMP) in training: False" in text  # no GPU here
    assert "p4 objectness (B, H*W, A) : (2, 196, 3)" in text
    assert "p5 box deltas (B, H*W, 4A): (2, 49, 12)" in text
    assert text.count("-> OK") == 7, text  # 3 anchor sets, IoU, 3 delta checks
    for bad in ("MISMATCH", "TOO LARGE", "WRONG"):
        assert bad not in text
    assert "Submission skipped" in text

    # "Run all" trains each model once: RPN overfit, Faster R-CNN overfit, full training; the
    # box-regression comparison is off, and 4.3.1 / 4.4 load the checkpoint, not retrain.
    trained = re.findall(r"^Trained (\d+) iterations in", text, flags=re.M)
    assert trained == ["40", "40", "60"], trained
    checkpoint = work_dir / "rcnn_training_fast.pt"
    assert f"No checkpoint at {checkpoint}; starting from scratch." in text
    assert "Box regression comparison skipped (RUN_BOX_REGRESSION_COMPARISON = False)" in text
    assert not (work_dir / "rcnn_box_regression_training_fast.pt").exists()
    assert text.count(f"Loaded the model trained for 60 iterations from {checkpoint}") == 2

    # The checkpoint holds the whole run; the 4.3 cell ends with the history's one-line repr.
    saved = _checkpoint(checkpoint)
    assert saved["iteration"] == saved["max_iters"] == 60 and len(saved["loss_history"]) == 60
    assert saved["config"]["backbone"]["out_channels"] == 32
    assert saved["config"]["box_regression"] is False
    # ... and names its classes and image size, as the final weights do; the weights are a
    # state_dict (the course loads them so) from which the package rebuilds the same model.
    import torch

    import recipe
    from eecs598.shapes import SHAPES_CLASSES

    assert saved["meta"]["class_names"] == list(SHAPES_CLASSES)
    assert saved["meta"]["image_size"] == 128
    weights = work_dir / "rcnn_detector_fast.pt"
    state = torch.load(weights, weights_only=True)
    assert state.keys() == saved["model"].keys() and state.detector["config"] == saved["config"]
    assert state.detector["meta"] == saved["meta"]
    assert recipe.state_dict_config(state) == saved["config"]  # an old bare file rebuilds alike
    # The command line's predict takes both files as they are.
    import json

    import detector_cli

    images = sorted((work_dir / "data" / "shapes" / "JPEGImages").glob("*.jpg"))[:2]
    for name in ("rcnn_training_fast.pt", "rcnn_detector_fast.pt"):
        out = work_dir / f"predict_{name}"
        args = ["predict", str(work_dir / name), *map(str, images), "--conf", "0",
                "--out", str(out)]  # fmt: skip
        assert detector_cli.main(args) == 0, name
        records = json.loads((out / "detections.json").read_text())
        assert len(records) == 2
        assert {d["class"] for r in records for d in r["detections"]} <= set(SHAPES_CLASSES)
    results = [
        out["data"]["text/plain"]
        for cell in full_run.nb.cells
        for out in cell.get("outputs", [])
        if out.get("output_type") == "execute_result"
    ]
    history_reprs = [r for r in results if r.startswith("LossHistory(")]
    assert len(history_reprs) == 1 and _LOSS_REPR.fullmatch(history_reprs[0]), history_reprs
    last = saved["loss_history"][-1]
    assert f"last {last:.4f}," in history_reprs[0]
    assert all(len(r) < 300 for r in results), [r[:80] for r in results]

    # Evaluation: files on the scratch disk (the work folder here), chart shown and saved.
    assert re.search(r"^mAP over 16 images: [\d.]+%$", text, flags=re.M)
    assert (work_dir / "mAP" / "input" / "detection-results").is_dir()
    assert len(list((work_dir / "mAP" / "input" / "detection-results").iterdir())) == 16
    assert (work_dir / "mAP_fast.png").stat().st_size > 1000
    for error_type in ("Cls", "Loc", "Both", "Dupe", "Bkg", "Miss", "FalsePos", "FalseNeg"):
        assert re.search(rf"^{error_type} +\d+\.\d\d +\d+$", text, flags=re.M), error_type
    assert (work_dir / "rcnn_detector_fast.pt").is_file()

    # Figures were rendered inline despite MPLBACKEND=Agg.
    assert _inline_images(full_run.nb) >= 5, f"only {_inline_images(full_run.nb)} inline figures"


@pytest.mark.slow
def test_evaluation_runs_alone_after_a_disconnect(full_run):
    """A fresh kernel: setup (3.1), then 4.4, from the checkpoint of the first run."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    chart = full_run.work_dir / "mAP_fast.png"
    written = chart.stat().st_mtime_ns
    run = _run(_subset(nb, _setup(nb) + _section_cells(nb, "4.4")), full_run.work_dir)
    print(f"\nSetup + 4.4 in a fresh kernel: {run.elapsed:.1f} s")
    assert "Loaded the model trained for 60 iterations" in run.text
    assert "Trained " not in run.text
    # The same weights on the same images: the same mAP as in the full run.
    assert _map_line(run.text) == _map_line(full_run.text)
    assert chart.stat().st_mtime_ns > written and chart.stat().st_size > 1000  # saved again
    assert _inline_images(run.nb) == 3  # the per-class AP chart, the error breakdown, confusion


@pytest.mark.slow
def test_detections_run_alone_after_a_disconnect(full_run):
    """A fresh kernel: setup (3.1), then 4.3.1, from the checkpoint of the first run."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    run = _run(_subset(nb, _setup(nb) + _section_cells(nb, "4.3.1")), full_run.work_dir)
    print(f"\nSetup + 4.3.1 in a fresh kernel: {run.elapsed:.1f} s")
    assert "Loaded the model trained for 60 iterations" in run.text
    assert "Trained " not in run.text
    assert _inline_images(run.nb) == 3  # MAX_SHOW validation images with their detections


@pytest.mark.slow
def test_sections_fall_back_to_the_final_weights_old_format_included(full_run, tmp_path):
    """No training checkpoint, only ``rcnn_detector.pt`` as the notebook saved it before it
    carried a description (a bare state_dict): 4.3.1 and 4.4 load it, say so, and 4.4 scores
    the mAP of the full run."""
    import torch

    nb = nbformat.read(NOTEBOOK, as_version=4)
    work_dir = tmp_path / "work"
    shutil.copytree(full_run.work_dir / "data", work_dir / "data")
    weights = work_dir / "rcnn_detector_fast.pt"
    state = torch.load(full_run.work_dir / weights.name, weights_only=True)
    torch.save(dict(state), weights)  # a plain dict: no description
    cells = _setup(nb) + _section_cells(nb, "4.3.1") + _section_cells(nb, "4.4")
    run = _run(_subset(nb, cells), work_dir)
    print(f"\nSetup + 4.3.1 + 4.4 from the old weights: {run.elapsed:.1f} s")
    message = f"Loaded the weights in {weights} (no training checkpoint at "
    assert run.text.count(message) == 2 and "Trained " not in run.text
    assert _map_line(run.text) == _map_line(full_run.text)


@pytest.mark.slow
def test_sections_without_a_checkpoint_say_what_to_run_first(tmp_path):
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(NOTEBOOK, as_version=4)
    setup, detections, evaluation = (
        _setup(nb),
        _section_cells(nb, "4.3.1"),
        _section_cells(nb, "4.4"),
    )
    sub = _subset(nb, setup + detections + evaluation)
    client = _client(sub, tmp_path)
    code_cells = [i for i, c in enumerate(sub.cells) if c.cell_type == "code"]
    section_cells = code_cells[-2:]  # the code cells of 4.3.1 and 4.4
    with client.setup_kernel(env=_env(tmp_path)):
        for index in code_cells[:-2]:
            client.execute_cell(sub.cells[index], index)
        for index in section_cells:
            with pytest.raises(CellExecutionError) as info:
                client.execute_cell(sub.cells[index], index)
            message = str(info.value)
            assert (f"No checkpoint at {tmp_path / 'rcnn_training_fast.pt'} and no weights at "
                    f"{tmp_path / 'rcnn_detector_fast.pt'}") in message  # fmt: skip
            assert "run sections 3.2 (data) and 4.3 (full training)" in message


@pytest.mark.slow
def test_killed_full_training_resumes_with_the_same_losses(full_run, tmp_path):
    """Kill the kernel after the first checkpoint of 4.3; rerun 3.1, 3.2 and 4.3 anew."""
    from nbclient.exceptions import DeadKernelError

    nb = nbformat.read(NOTEBOOK, as_version=4)
    work_dir = tmp_path / "work"
    shutil.copytree(full_run.work_dir / "data", work_dir / "data")  # the generated shapes
    checkpoint = work_dir / "rcnn_training_fast.pt"
    training = _setup(nb) + _section_cells(nb, "3.2") + _section_cells(nb, "4.3")

    # First session: killed (SIGKILL, as a lost runtime) as soon as a checkpoint exists.
    first = _subset(nb, training)
    client = _client(first, work_dir)
    stop = threading.Event()

    def kill_after_checkpoint():
        while not stop.wait(0.02):
            if checkpoint.exists():
                os.kill(client.km.provisioner.process.pid, signal.SIGKILL)
                return

    watcher = threading.Thread(target=kill_after_checkpoint, daemon=True)
    start = time.perf_counter()
    watcher.start()
    try:
        with pytest.raises(DeadKernelError):
            client.execute(env=_env(work_dir))
    finally:
        stop.set()
        watcher.join()
    killed_after = time.perf_counter() - start
    done = _checkpoint(checkpoint)["iteration"]
    assert 0 < done < 60, done
    assert "Saved weights" not in _text_outputs(first)

    # Second session: the same cells resume from the checkpoint and finish the run...
    second = _subset(nb, training + _section_cells(nb, "4.4") + _section_cells(nb, "4.5"))
    boxreg = _code_cell(second, "4.5", "RUN_BOX_REGRESSION_COMPARISON")
    second.cells[boxreg].source = second.cells[boxreg].source.replace(
        "RUN_BOX_REGRESSION_COMPARISON = False", "RUN_BOX_REGRESSION_COMPARISON = True"
    )
    run = _run(second, work_dir)
    print(f"\nKilled after {killed_after:.1f} s at iteration {done}; resumed session: "
          f"{run.elapsed:.1f} s")  # fmt: skip
    assert f"Resumed from {checkpoint} at iteration {done}." in run.text
    trained = re.findall(r"^Trained (\d+) iterations in", run.text, flags=re.M)
    assert trained == [str(60 - done), "60"], trained  # the rest of 4.3, then 4.5 in full

    # ... with exactly the losses and weights of the uninterrupted run (CPU, one thread).
    import torch

    resumed, uninterrupted = (
        _checkpoint(checkpoint),
        _checkpoint(full_run.work_dir / checkpoint.name),
    )
    assert resumed["iteration"] == 60
    assert resumed["loss_history"] == uninterrupted["loss_history"]
    assert resumed["loss_terms"] == uninterrupted["loss_terms"]
    assert resumed["model"].keys() == uninterrupted["model"].keys()
    for name, tensor in resumed["model"].items():
        assert torch.equal(tensor, uninterrupted["model"][name]), name
    assert _map_line(run.text) == _map_line(full_run.text)

    # 4.5 switched on: trained with its own checkpoint, compared in a table.
    saved = _checkpoint(work_dir / "rcnn_box_regression_training_fast.pt")
    assert saved["iteration"] == 60 and saved["config"]["box_regression"] is True
    assert re.search(r"^mAP\s+[\d.]+\s+[\d.]+$", run.text, flags=re.M), run.text[-2000:]
    assert (work_dir / "mAP" / "input_box_regression" / "detection-results").is_dir()
