"""The student's quick checks, ``python -m pytest -m sanity -q``: they reproduce every value
the notebook prints as expected, and they run with only the runtime packages (Colab's own).

``EXPECTED`` maps each ``print`` of the notebook that shows an expected value (found by its
source text) to the sanity tests that check the same value; a new expected value without a
test, a mapping to a test that is gone or not marked ``sanity``, or a test module that needs a
development package at its top all fail here.
"""

from __future__ import annotations

import ast
import importlib
import json
import re
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.sanity

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
NOTEBOOK = ROOT / "two_stage_detector.ipynb"

_DETECTOR = "test_two_stage_detector.py"
_BATCHES = "test_eecs598_voc2007.py::test_notebook_batches_have_the_notebook_shapes"
_ANCHORS = f"{_DETECTOR}::test_notebook_anchors_p5"
_DELTAS = f"{_DETECTOR}::test_notebook_deltas_round_trip_and_background"
_LOSSES = f"{_DETECTOR}::test_notebook_loss_recap_cell"

# A fragment of each expected-value print's source (section in the comment) -> its tests.
EXPECTED = {
    # 3.2 Load PASCAL VOC 2007 data
    "image batch has shape": [_BATCHES],
    "gt_boxes has shape": [_BATCHES],
    # 3.4 Backbone with a feature pyramid
    "(expected: {expected_fpn[level]})": ["test_common.py::test_backbone_shapes_any_size"],
    # 3.5 The Region Proposal Network
    '"p4 objectness (B, H*W, A) :"': [f"{_DETECTOR}::test_notebook_rpn_prediction_shapes"],
    '"p5 box deltas (B, H*W, 4A):"': [f"{_DETECTOR}::test_notebook_rpn_prediction_shapes"],
    # 3.6.1 Anchors
    "expected (any order)": [_ANCHORS],
    "max abs difference": [_ANCHORS],
    # 3.6.2 Matching anchors with GT boxes
    "Relative error: {iou_error": [f"{_DETECTOR}::test_notebook_iou"],
    # 3.6.3 A matched anchor, drawn
    "Their IoU": [f"{_DETECTOR}::test_notebook_matched_anchor_overlaps_its_box"],
    # 3.6.4 Box deltas
    "Rel error in reconstructed boxes": [_DELTAS],
    '"Background deltas :"': [_DELTAS],
    '"Decoded box       :"': [_DELTAS],
    # 3.7 Losses
    'print("expected:\\n", expected_box)': [_LOSSES],
    "rel_error(loss_box, expected_box)": [_LOSSES],
    'print("expected             :", expected_obj)': [_LOSSES],
    "rel_error(loss_obj, expected_obj)": [_LOSSES],
    # 3.9 Overfitting the RPN
    "{first_loss:.3f}": [f"{_DETECTOR}::test_notebook_rpn_overfits_a_tiny_subset"],
    # 4.1 Overfitting a small subset
    "sum(overfit_history[:window])": [
        f"{_DETECTOR}::test_notebook_faster_rcnn_overfits_a_tiny_subset"
    ],
    # 4.2 Inference
    "One image: boxes": [f"{_DETECTOR}::test_inference_score_threshold_and_class_nms"],
}


def expected_prints(notebook: Path = NOTEBOOK) -> list[str]:
    """The source of every ``print(...)`` call in the notebook's code cells that mentions an
    expected value (the word "expected", any case), in order."""
    found = []
    for cell in json.loads(notebook.read_text())["cells"]:
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        code = "\n".join(_without_magic(line) for line in source.splitlines())
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                text = ast.get_source_segment(code, node)
                if "expected" in text.lower():
                    found.append(text)
    return found


def _without_magic(line: str) -> str:
    """An IPython magic or shell line (``%...``, ``!...``) as ``pass`` at its indentation, so
    that the cell parses as Python."""
    code = line.lstrip()
    return line[: len(line) - len(code)] + "pass" if code.startswith(("%", "!")) else line


def _marks(test_id: str) -> list[str]:
    """The names of the marks on the test ``file.py::name`` (its own and its module's)."""
    file, name = test_id.split("::")
    module = importlib.import_module(Path(file).stem)
    test = getattr(module, name, None)
    assert callable(test), f"{test_id} does not exist"
    module_marks = getattr(module, "pytestmark", [])
    module_marks = module_marks if isinstance(module_marks, list) else [module_marks]
    return [mark.name for mark in [*getattr(test, "pytestmark", []), *module_marks]]


def test_every_expected_value_of_the_notebook_has_a_sanity_test():
    prints = expected_prints()
    unmapped = [text for text in prints if not any(key in text for key in EXPECTED)]
    assert not unmapped, f"expected values without a sanity test in EXPECTED: {unmapped}"
    stale = [key for key in EXPECTED if not any(key in text for text in prints)]
    assert not stale, f"EXPECTED names prints the notebook no longer has: {stale}"
    for test_id in {t for tests in EXPECTED.values() for t in tests}:
        assert "sanity" in _marks(test_id), f"{test_id} is not marked sanity"


def _runtime_packages() -> set[str]:
    """Import names of requirements.txt's packages (the runtime ones), and pytest."""
    names = {"pytest"}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        match = re.match(r"\s*([A-Za-z0-9_.-]+)", line.split("#")[0])
        if match:
            names.add({"pillow": "PIL"}.get(match.group(1).lower(), match.group(1).lower()))
    return names


def _top_level_imports(path: Path) -> set[str]:
    """The top-level package of every import at the top of a module (not in functions)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_test_modules_need_only_runtime_packages_unless_conftest_says():
    """Colab has the runtime packages but not necessarily hypothesis or nbformat: a test
    module importing one at its top must be listed in conftest's ``DEV_ONLY_IMPORTS`` (it is
    then left out where the package is missing), or collecting it would fail
    ``pytest -m sanity`` there."""
    from conftest import DEV_ONLY_IMPORTS

    local = {p.stem for p in ROOT.glob("*.py")} | {p.stem for p in TESTS.glob("*.py")}
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}  # eecs598, recipe
    allowed = set(sys.stdlib_module_names) | _runtime_packages() | local | packages
    assert {"torch", "torchvision", "numpy", "PIL", "pycocotools", "eecs598"} <= allowed
    for path in sorted(TESTS.glob("*.py")):
        extra = _top_level_imports(path) - allowed
        listed = set(DEV_ONLY_IMPORTS.get(path.name, ()))
        assert extra <= listed, f"{path.name}: imports {sorted(extra - listed)} at its top"
    assert DEV_ONLY_IMPORTS["test_properties.py"] == ("hypothesis",)  # the listing is read


def test_the_expected_prints_are_found_by_their_source(tmp_path):
    """``expected_prints`` finds prints spread over lines and skips magics and other calls."""
    cells = [
        {"cell_type": "code", "source": ["%matplotlib inline\n", "x = 1\n",
                                         'print(f"a {x}",\n', '      "(Expected: 1)")\n']},
        {"cell_type": "markdown", "source": ['print("expected in markdown")']},
        {"cell_type": "code", "source": ['print("nothing")\n', 'f("expected")\n', "if x:\n",
                                         '    !echo "expected"\n']},
    ]  # fmt: skip
    notebook = tmp_path / "n.ipynb"
    notebook.write_text(json.dumps({"cells": cells}))
    assert expected_prints(notebook) == ['print(f"a {x}",\n      "(Expected: 1)")']
