"""Tests for eecs598.submit.make_a4_submission."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from eecs598 import submit
from eecs598.submit import (
    OPTIONAL_FILES,
    PACKAGE,
    PACKAGES,
    REQUIRED_FILES,
    make_a4_submission,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


def _populate(folder, names=REQUIRED_FILES):
    for name in names:
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_text(f"contents of {name}\n")


def test_zip_contents_and_name(tmp_path):
    _populate(tmp_path)
    (tmp_path / "unrelated.txt").write_text("not a deliverable")
    path = make_a4_submission(tmp_path, "jdoe", "12345678")
    assert os.path.basename(path) == "jdoe_12345678_A4.zip"
    with zipfile.ZipFile(path) as zf:
        assert sorted(zf.namelist()) == sorted(REQUIRED_FILES)
        assert zf.read("common.py") == b"contents of common.py\n"
    written = {name.split("/")[0] for name in REQUIRED_FILES}  # recipe/... is in recipe
    assert sorted(os.listdir(tmp_path)) == sorted(
        [*written, "unrelated.txt", path.split(os.sep)[-1]]
    )


def test_optional_checkpoint_included(tmp_path):
    _populate(tmp_path, (*REQUIRED_FILES, "rcnn_detector.pt"))
    path = make_a4_submission(tmp_path, "jdoe", 42)
    with zipfile.ZipFile(path) as zf:
        assert "rcnn_detector.pt" in zf.namelist()
        assert len(zf.namelist()) == len(REQUIRED_FILES) + 1


def test_one_stage_deliverables_included_when_present(tmp_path):
    one_stage = ("one_stage_detector.py", "one_stage_detector.ipynb", "fcos_detector.pt")
    assert set(one_stage) <= set(OPTIONAL_FILES)
    _populate(tmp_path, (*REQUIRED_FILES, *one_stage))
    path = make_a4_submission(tmp_path, "jdoe", 42)
    with zipfile.ZipFile(path) as zf:
        assert sorted(zf.namelist()) == sorted((*REQUIRED_FILES, *one_stage))
        assert zf.read("fcos_detector.pt") == b"contents of fcos_detector.pt\n"
    # Only some of them (no FCOS weights, no R-CNN weights): the rest is still zipped.
    os.remove(tmp_path / "fcos_detector.pt")
    os.remove(path)
    path = make_a4_submission(tmp_path, "jdoe", 42)
    with zipfile.ZipFile(path) as zf:
        assert sorted(zf.namelist()) == sorted((*REQUIRED_FILES, *one_stage[:2]))


@pytest.mark.parametrize("missing", REQUIRED_FILES)
def test_missing_file_named_and_no_zip(tmp_path, missing):
    _populate(tmp_path, [f for f in REQUIRED_FILES if f != missing])
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(FileNotFoundError, match=missing.replace(".", r"\.")):
        make_a4_submission(tmp_path, "jdoe", "1")
    assert sorted(os.listdir(tmp_path)) == before


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    _populate(tmp_path)
    before = sorted(os.listdir(tmp_path))

    def broken_write(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(submit.zipfile.ZipFile, "write", broken_write)
    with pytest.raises(OSError, match="disk full"):
        make_a4_submission(tmp_path, "jdoe", "1")
    assert sorted(os.listdir(tmp_path)) == before


def test_prompts_when_not_given(tmp_path, monkeypatch):
    _populate(tmp_path)
    answers = iter(["  jdoe ", "777"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    path = make_a4_submission(tmp_path)
    assert os.path.basename(path) == "jdoe_777_A4.zip"


@pytest.mark.parametrize(("uniquename", "umid"), [("", "1"), ("jdoe", "  "), ("a/b", "1")])
def test_rejects_bad_names(tmp_path, uniquename, umid):
    _populate(tmp_path)
    with pytest.raises(ValueError):
        make_a4_submission(tmp_path, uniquename, umid)
    assert not any(f.endswith(".zip") for f in os.listdir(tmp_path))


def test_empty_prompt_answer_rejected(tmp_path, monkeypatch):
    _populate(tmp_path)
    monkeypatch.setattr("builtins.input", lambda prompt="": "")
    with pytest.raises(ValueError, match="uniquename"):
        make_a4_submission(tmp_path)


def test_package_files_are_discovered_and_included(tmp_path):
    _populate(tmp_path)
    (tmp_path / PACKAGE / "sub").mkdir(parents=True)
    (tmp_path / PACKAGE / "__pycache__").mkdir()
    (tmp_path / PACKAGE / ".ipynb_checkpoints").mkdir()
    for name in ("__init__.py", "later_module.py", "sub/deep.py", "notes.txt"):
        (tmp_path / PACKAGE / name).write_text("# module\n")
    (tmp_path / PACKAGE / "__pycache__" / "x.py").write_text("")
    (tmp_path / PACKAGE / ".ipynb_checkpoints" / "later_module-checkpoint.py").write_text("")
    path = make_a4_submission(tmp_path, "jdoe", "1")
    with zipfile.ZipFile(path) as zf:
        assert sorted(zf.namelist()) == sorted(
            [
                *REQUIRED_FILES,
                "eecs598/__init__.py",
                "eecs598/later_module.py",
                "eecs598/sub/deep.py",
            ]
        )


def test_zip_of_the_repo_runs_on_its_own(tmp_path):
    """The repo's zip, extracted alone, imports everything the notebook does.

    The zip is built from a copy of the repo's sources (every top-level ``.py`` and ``.ipynb``
    file and the package), so the test never writes into the working tree; a module missing
    from the zip fails the import in the child, which sees only the extracted files.
    """
    source = tmp_path / "assignment"
    source.mkdir()
    for path in [*REPO_ROOT.glob("*.py"), *REPO_ROOT.glob("*.ipynb")]:
        shutil.copy2(path, source / path.name)
    for package in PACKAGES:
        shutil.copytree(REPO_ROOT / package, source / package)
    zip_path = make_a4_submission(source, "jdoe", "1")
    extracted = tmp_path / "extracted"
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(extracted)

    code = (
        "import a4_helper, common, two_stage_detector, eecs598.mean_ap; a4_helper.hello_helper()"
        "; import sys; print(*(sys.modules[m].__file__ for m in "
        "('a4_helper', 'common', 'two_stage_detector', 'eecs598', 'eecs598.mean_ap')), sep='\\n')"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MPLBACKEND"] = "Agg"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=extracted, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "Hello from a4_helper.py!"
    for module_file in lines[1:]:
        assert Path(module_file).resolve().is_relative_to(extracted.resolve()), module_file
