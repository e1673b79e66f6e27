"""Checkpoint and weights files (eecs598/checkpoint.py): the notebook's ``rcnn_detector.pt``
stays a state_dict that the course's ``load_state_dict(torch.load(path))`` reads, and carries
the model's description; a bare state_dict of an older notebook still loads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from eecs598.checkpoint import (
    WEIGHTS_FORMAT,
    detector_meta,
    load_checkpoint,
    save_weights,
)


class Described(nn.Module):
    """A small model with a configuration and metadata, as the notebook's detector has."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.config = {"channels": 4, "sizes": [1, 2], "nested": {"beta": 0.5}}
        self.meta = detector_meta(["cat", "dog"], 224, training={"flip": True})


def test_detector_meta_names_classes_and_sizes():
    assert detector_meta(("a", "b"), 320) == {
        "class_names": ["a", "b"], "image_size": 320, "test_image_size": 320,
    }  # fmt: skip
    assert detector_meta(["a"], 224, 448, training={"flip": False})["test_image_size"] == 448


def test_weights_file_is_the_course_state_dict_and_describes_the_model(tmp_path):
    torch.manual_seed(0)
    model = Described()
    path = tmp_path / "rcnn_detector.pt"
    save_weights(model, path)

    # The course's way: a plain state_dict, strictly loadable, weights_only.
    state = torch.load(path, map_location="cpu", weights_only=True)
    fresh = Described()
    fresh.load_state_dict(state)
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name
    assert state.detector == {"format": WEIGHTS_FORMAT, "config": model.config,
                              "meta": model.meta}  # fmt: skip

    # The package's way: a checkpoint with model, config and meta.
    checkpoint = load_checkpoint(path)
    assert checkpoint["format"] == WEIGHTS_FORMAT
    assert checkpoint["config"] == model.config and checkpoint["meta"] == model.meta
    assert checkpoint["model"].keys() == model.state_dict().keys()
    assert "iteration" not in checkpoint
    assert list(tmp_path.iterdir()) == [path]  # written atomically: no temp file left


def test_bare_state_dict_loads_as_a_checkpoint_without_description(tmp_path):
    model = Described()
    path = tmp_path / "old_rcnn_detector.pt"
    torch.save(model.state_dict(), path)  # what the notebook saved before
    checkpoint = load_checkpoint(path)
    assert (checkpoint["format"], checkpoint["config"], checkpoint["meta"]) == (
        "state_dict",
        None,
        None,
    )
    fresh = Described()
    load_checkpoint(path, fresh)  # restores the weights too
    assert torch.equal(fresh.conv.weight, model.conv.weight)


@pytest.mark.parametrize("content", [{}, {"weights": [1, 2]}, {"model": 1, "x": torch.zeros(1)}])
def test_other_dicts_are_not_taken_for_weights(tmp_path, content):
    path = tmp_path / "other.pt"
    torch.save(content, path)
    if "model" in content:
        assert load_checkpoint(path)["model"] == 1  # a checkpoint dict, left as it is
    else:
        with pytest.raises(ValueError, match="not a train_detector checkpoint"):
            load_checkpoint(path)
