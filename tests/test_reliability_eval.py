"""Reliability of the mAP evaluator on faulty files and edge cases (issue 6, "Evaluation").

Cases already covered in ``test_eecs598_mean_ap.py``: malformed lines name file and line
(``test_malformed_line_names_file_and_line``), a detection file without GT file
(``test_detection_file_without_gt_is_an_error``), a GT file without detection file and
detections of a class absent from the GT (``test_folder_hand_case_and_cli_output``), a class
with only difficult boxes in one image (``test_class_with_only_difficult_boxes_is_skipped``),
score ties (``test_score_ties_keep_input_order``), empty inputs
(``test_empty_inputs_give_defined_results``). Every evaluation below runs with numpy errors
raised and warnings turned into errors, so a division by zero anywhere would fail it.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from support import write_folder

from eecs598.mean_ap import MeanAPAccumulator, evaluate_folder, image_detections, main


@pytest.fixture(autouse=True)
def strict_numerics():
    with np.errstate(all="raise"), warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# ---- faulty files ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sub", "text", "line", "reason"),
    [
        ("detection-results", "cat nan 0 0 9 9\n", 1, "finite"),
        ("detection-results", "cat 0.5 0 0 inf 9\n", 1, "finite"),
        ("detection-results", "cat 0.5 0 0 9 9 7\n", 1, "expected 'class score x1 y1 x2 y2'"),
        ("ground-truth", "\n\ncat 0 0 9 -inf\n", 3, "finite"),
        ("ground-truth", "cat 0 0 9 9 difficult extra\n", 1, "expected 'class x1 y1 x2 y2"),
    ],
)
def test_more_malformed_lines_name_file_and_line(tmp_path, sub, text, line, reason):
    root = write_folder(tmp_path, {"a": ("cat 0 0 9 9\n", "cat 0.5 0 0 9 9\n")})
    (root / sub / "a.txt").write_text(text)
    with pytest.raises(ValueError) as info:
        evaluate_folder(root)
    message = str(info.value)
    assert message.startswith(f"{root / sub / 'a.txt'}, line {line}: ") and reason in message


def test_binary_file_names_the_file(tmp_path, capsys):
    root = write_folder(tmp_path, {"a": ("cat 0 0 9 9\n", "")})
    (root / "detection-results" / "a.txt").write_bytes(b"\xff\xfe\x00cat")
    with pytest.raises(ValueError, match=r"detection-results/a\.txt: not a UTF-8 text file"):
        evaluate_folder(root)
    assert main([str(root)]) == 1  # the command line: one line on stderr, no traceback
    assert "a.txt: not a UTF-8 text file" in capsys.readouterr().err


def test_missing_detection_folder_is_an_error_missing_file_means_none(tmp_path):
    root = write_folder(tmp_path, {"a": ("cat 0 0 9 9\n", None), "b": ("cat 0 0 9 9\n", None)})
    result = evaluate_folder(root)  # GT files without detection files: no detections
    assert result.ap == {"cat": 0.0} and result.num_gt == {"cat": 2}
    (root / "detection-results").rmdir()
    with pytest.raises(FileNotFoundError, match="detection-results folder not found: .*empty"):
        evaluate_folder(root)


def test_unknown_classes_in_detections(tmp_path):
    # Folder: a class that no GT file has is ignored, exactly as the folder tool does.
    root = write_folder(tmp_path, {"a": ("cat 0 0 9 9\n", "zebra 0.99 0 0 9 9\ncat 0.5 0 0 9 9\n")})
    result = evaluate_folder(root)
    assert result.ap == {"cat": 1.0} and result.num_fp == {"cat": 0}
    # In memory a class index must be known: the error names the image and the index.
    acc = MeanAPAccumulator(["cat", "dog"])
    with pytest.raises(ValueError, match=r"image 'img7': unknown detection class index \[5\]"):
        acc.add(image_detections("img7", [[0, 0, 9, 9]], [0], None, [[0, 0, 9, 9]], [5], [0.5]))
    assert len(acc) == 0  # nothing half-added


# ---- defined results ---------------------------------------------------------------------------


def test_no_detections_anywhere():
    acc = MeanAPAccumulator(["cat", "dog"])
    acc.add(image_detections("a", [[0, 0, 9, 9], [20, 20, 29, 29]], [0, 1], None, [], [], []))
    acc.add(image_detections("b", [], [], None, [], [], []))
    result = acc.compute()
    assert result.ap == {"cat": 0.0, "dog": 0.0} and result.map == 0.0
    assert result.precision["cat"].shape == (0,) and result.num_tp == {"cat": 0, "dog": 0}
    assert acc.compute(use_11_point=True).map == 0.0


def test_only_difficult_boxes_everywhere():
    acc = MeanAPAccumulator(["cat", "dog"])
    acc.add(image_detections("a", [[0, 0, 9, 9]], [0], [True], [[0, 0, 9, 9]], [0], [0.9]))
    acc.add(image_detections("b", [[0, 0, 9, 9]], [1], [True], [[50, 50, 59, 59]], [1], [0.8]))
    result = acc.compute()
    assert result.ap == {} and result.map == 0.0
    assert result.skipped_classes == ["cat", "dog"]
    # One non-difficult box brings its class back; the ignored detection stays ignored.
    acc.add(image_detections("c", [[0, 0, 9, 9]], [0], None, [[0, 0, 9, 9]], [0], [0.7]))
    result = acc.compute()
    assert result.ap == {"cat": 1.0} and result.num_ignored == {"cat": 1}
    assert result.skipped_classes == ["dog"]
    np.testing.assert_array_equal(result.precision["cat"], [0.0, 1.0])


def test_all_scores_tied_equals_input_order():
    """Equal scores are ranked in input order: the same result as strictly decreasing scores
    given in that order."""
    gt = [[0, 0, 9, 9], [20, 0, 29, 9], [40, 0, 49, 9]]
    dets = [[60, 0, 69, 9], [0, 0, 9, 9], [0, 0, 9, 9], [20, 0, 29, 9], [80, 0, 89, 9]]

    def evaluate(scores):
        acc = MeanAPAccumulator(["cat"])
        acc.add(image_detections("a", gt, [0, 0, 0], None, dets, [0] * 5, scores))
        return acc.compute()

    tied, ordered = evaluate([0.5] * 5), evaluate([0.9, 0.8, 0.7, 0.6, 0.5])
    # FP, TP, duplicate FP, TP, FP -> precision 0, 1/2, 1/3, 2/4, 2/5; recall 0,1/3,1/3,2/3,2/3.
    np.testing.assert_allclose(tied.precision["cat"], [0, 1 / 2, 1 / 3, 2 / 4, 2 / 5])
    np.testing.assert_allclose(tied.recall["cat"], [0, 1 / 3, 1 / 3, 2 / 3, 2 / 3])
    assert tied.ap["cat"] == pytest.approx(1 / 3 * 1 / 2 + 1 / 3 * 2 / 4)
    assert tied.ap == ordered.ap
    np.testing.assert_array_equal(tied.precision["cat"], ordered.precision["cat"])


def test_degenerate_and_inverted_detection_boxes_are_false_positives(tmp_path):
    root = write_folder(tmp_path, {"a": (
        "cat 10 10 19 19\n",
        "cat 0.9 19 19 10 10\ncat 0.8 15 15 15 15\ncat 0.7 30 30 20 20\ncat 0.6 10 10 19 19\n",
    )})  # fmt: skip
    result = evaluate_folder(root)
    # (15,15,15,15) is one "pixel" under the +1 convention: IoU 1/100, a false positive too.
    assert result.num_tp == {"cat": 1} and result.num_fp == {"cat": 3}
    assert result.ap["cat"] == pytest.approx(0.25)
    assert np.isfinite(result.precision["cat"]).all()
