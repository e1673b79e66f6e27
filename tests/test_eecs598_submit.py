"""Tests for eecs598.submit.make_a4_submission."""

from __future__ import annotations

import os
import zipfile

import pytest

from eecs598 import submit
from eecs598.submit import OPTIONAL_FILES, REQUIRED_FILES, make_a4_submission


def _populate(folder, names=REQUIRED_FILES):
    for name in names:
        (folder / name).write_text(f"contents of {name}\n")


def test_zip_contents_and_name(tmp_path):
    _populate(tmp_path)
    (tmp_path / "unrelated.txt").write_text("not a deliverable")
    path = make_a4_submission(tmp_path, "jdoe", "12345678")
    assert os.path.basename(path) == "jdoe_12345678_A4.zip"
    with zipfile.ZipFile(path) as zf:
        assert sorted(zf.namelist()) == sorted(REQUIRED_FILES)
        assert zf.read("common.py") == b"contents of common.py\n"
    assert sorted(os.listdir(tmp_path)) == sorted(
        [*REQUIRED_FILES, "unrelated.txt", path.split(os.sep)[-1]]
    )


def test_optional_checkpoint_included(tmp_path):
    _populate(tmp_path, REQUIRED_FILES + OPTIONAL_FILES)
    path = make_a4_submission(tmp_path, "jdoe", 42)
    with zipfile.ZipFile(path) as zf:
        assert "rcnn_detector.pt" in zf.namelist()
        assert len(zf.namelist()) == 5


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
