"""The label audit's scores (eecs598.audit) by hand, on empty input, and against cleanlab's
ObjectLab scores on simulated out-of-sample detections; the folds (recipe.auditing)."""

from __future__ import annotations

import numpy as np
import pytest

from eecs598.audit import ISSUES, rank_suspects, score_image
from recipe.auditing import fold_of_images


def _boxes(*rows):
    return np.array(rows, dtype=np.float64).reshape(-1, 4)


def test_each_kind_of_error_by_hand():
    """Label 0 is right, label 1 is swapped (the model says class 1), label 2 sits 10 px off
    its object; detection 3 has no label (missing)."""
    labels = _boxes([0, 0, 10, 10], [20, 0, 30, 10], [50, 0, 60, 10])
    label_classes = np.array([0, 0, 0])
    dets = _boxes([0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [80, 80, 90, 90],
                  [45, 0, 55, 10])  # fmt: skip
    det_classes = np.array([0, 1, 0, 1, 0])
    det_scores = np.array([0.9, 0.8, 0.2, 0.7, 0.6])
    scores = score_image(labels, label_classes, dets, det_classes, det_scores)
    # missing: score * (1 - best IoU with any label); the last detection overlaps label 2 by
    # 1/3, the third touches it (IoU 0).
    np.testing.assert_allclose(scores.missing, [0.0, 0.0, 0.2, 0.7, 0.6 * (1 - 1 / 3)])
    # class: another class's best support (score * IoU: 0.8 * 1) minus the own class's (0).
    np.testing.assert_allclose(scores.label_class, [0.0, 0.8, 0.0])
    assert scores.class_suggestion.tolist() == [0, 1, 0]
    # location: label 2's own-class detections: IoU 0 (det 2) and 1/3 (det 4, score 0.6).
    np.testing.assert_allclose(scores.location, [0.9 * 0.0, 0.0, 0.6 * (1 - 1 / 3)])
    assert scores.location_suggestion.tolist() == [0, -1, 4]
    assert scores.image_score == pytest.approx(0.8)

    image_labels, image_detections = [(labels, label_classes)], [(dets, det_classes, det_scores)]
    suspects, per_image = rank_suspects(image_labels, image_detections, min_score=0.1)
    assert [(s.issue, round(s.score, 4)) for s in suspects] == [
        ("class", 0.8), ("missing", 0.7), ("missing", 0.4), ("location", 0.4), ("missing", 0.2),
    ]  # fmt: skip
    assert suspects[0].label == 1 and suspects[0].suggested_class == 1
    assert suspects[3].suggested_box == (45.0, 0.0, 55.0, 10.0)
    # A label backed by its own class as much as by another is no class suspect.
    both = _boxes([0, 0, 10, 10], [0, 0, 10, 10])
    tie = score_image(labels[:1], [0], both, [0, 1], [0.5, 0.5])
    assert tie.label_class.tolist() == [0.0] and tie.class_suggestion.tolist() == [0]
    assert suspects[1].box == (80.0, 80.0, 90.0, 90.0) and suspects[1].label == -1
    assert len(per_image) == 1 and set(ISSUES) == {s.issue for s in suspects}


@pytest.mark.parametrize("case", ["no labels", "no detections", "neither"])
def test_images_without_labels_or_detections_have_defined_scores(case):
    labels = _boxes() if case != "no detections" else _boxes([0, 0, 5, 5])
    dets = _boxes() if case != "no labels" else _boxes([0, 0, 5, 5])
    scores = score_image(labels, np.zeros(len(labels), int), dets, np.zeros(len(dets), int),
                         np.full(len(dets), 0.9))  # fmt: skip
    assert scores.missing.shape == (len(dets),) and scores.location.shape == (len(labels),)
    assert not any(np.isnan(a).any() for a in (scores.missing, scores.label_class, scores.location))
    assert scores.image_score == (0.9 if case == "no labels" else 0.0)


def test_mismatched_inputs_are_named():
    with pytest.raises(ValueError, match="2 images of labels but 1 of detections"):
        rank_suspects([(_boxes(), np.zeros(0))] * 2, [(_boxes(), np.zeros(0), np.zeros(0))])


def test_folds_are_seeded_and_even():
    fold = fold_of_images(11, 3, seed=4)
    assert sorted(np.bincount(fold).tolist()) == [3, 4, 4]
    assert fold.tolist() == fold_of_images(11, 3, seed=4).tolist()
    assert fold.tolist() != fold_of_images(11, 3, seed=5).tolist()
    with pytest.raises(ValueError, match="--folds must be at least 2"):
        fold_of_images(5, 1, 0)
    with pytest.raises(ValueError, match="1 image"):
        fold_of_images(1, 2, 0)


def _simulated(seed: int, num_images: int = 200, num_classes: int = 3):
    """Clean objects, a detector that finds them with jitter (and some confident false
    positives), and labels with injected errors: dropped, swapped, moved by 30-50%."""
    rng = np.random.default_rng(seed)
    labels, detections, truth = [], [], []
    for _ in range(num_images):
        n = rng.integers(1, 6)
        xy = rng.uniform(0, 400, (n, 2))
        wh = rng.uniform(20, 80, (n, 2))
        boxes = np.concatenate([xy, xy + wh], axis=1)
        classes = rng.integers(0, num_classes, n)
        jitter = rng.normal(0, 0.04, (n, 4)) * np.concatenate([wh, wh], axis=1)
        det_boxes, det_classes = boxes + jitter, classes.copy()
        det_scores = rng.uniform(0.6, 0.99, n)
        fp = rng.integers(0, 3)  # low-scoring false positives, and confusions
        fxy = rng.uniform(0, 400, (fp, 2))
        det_boxes = np.concatenate([det_boxes, np.concatenate([fxy, fxy + 40], axis=1)])
        det_classes = np.concatenate([det_classes, rng.integers(0, num_classes, fp)])
        det_scores = np.concatenate([det_scores, rng.uniform(0.05, 0.5, fp)])
        kind = rng.choice(["keep", "drop", "swap", "move"], n, p=[0.8, 0.1, 0.05, 0.05])
        kept = kind != "drop"
        noisy_boxes, noisy_classes = boxes.copy(), classes.copy()
        swap = kind == "swap"
        noisy_classes[swap] = (classes[swap] + rng.integers(1, num_classes, swap.sum())) % (
            num_classes
        )
        move = kind == "move"
        shift = rng.uniform(0.3, 0.5, (move.sum(), 1)) * rng.choice([-1, 1], (move.sum(), 2))
        noisy_boxes[move] += np.concatenate([shift, shift], axis=1) * np.concatenate(
            [wh[move], wh[move]], axis=1
        )
        labels.append((noisy_boxes[kept], noisy_classes[kept]))
        detections.append((det_boxes, det_classes, det_scores))
        missing = np.zeros(len(det_scores), bool)
        missing[:n] = kind == "drop"
        truth.append({"missing": missing, "class": swap[kept], "location": move[kept]})
    return labels, detections, truth


def _per_class(boxes, classes, scores, num_classes):
    """cleanlab's prediction of one image: for each class, its ``(M_k, 5)`` boxes and scores."""
    per_class = np.empty(num_classes, dtype=object)
    for k in range(num_classes):
        rows = classes == k
        per_class[k] = np.concatenate([boxes[rows], scores[rows, None]], axis=1).astype(np.float32)
    return per_class


def _auroc(scores, positive):
    pos, neg = scores[positive], scores[~positive]
    return ((pos[:, None] > neg).sum() + 0.5 * (pos[:, None] == neg).sum()) / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", [0, 1])
def test_at_least_as_good_as_cleanlab_on_simulated_detections(seed):
    """The same labels and detections through both: our AUROC per kind of error is at least
    cleanlab's (its per-box scores, lower = worse) and at least 0.9."""
    rank = pytest.importorskip("cleanlab.object_detection.rank")
    labels, detections, truth = _simulated(seed)
    ours = {k: [] for k in ISSUES}
    for (lb, lc), (db, dc, ds) in zip(labels, detections, strict=True):
        scores = score_image(lb, lc, db, dc, ds)
        order = np.argsort(dc, kind="stable")  # cleanlab lists predictions class by class
        ours["missing"].append(scores.missing[order])
        ours["class"].append(scores.label_class)
        ours["location"].append(scores.location)
    flags = {k: np.concatenate([t[k][np.argsort(d[1], kind="stable")] if k == "missing"
                                else t[k] for t, d in zip(truth, detections, strict=True)])
             for k in ISSUES}  # fmt: skip
    cl_labels = [{"bboxes": lb.astype(np.float32), "labels": lc} for lb, lc in labels]
    cl_preds = [_per_class(db, dc, ds, 3) for db, dc, ds in detections]
    theirs = {
        "missing": rank.compute_overlooked_box_scores(labels=cl_labels, predictions=cl_preds),
        "class": rank.compute_swap_box_scores(labels=cl_labels, predictions=cl_preds),
        "location": rank.compute_badloc_box_scores(labels=cl_labels, predictions=cl_preds),
    }
    for issue in ISSUES:
        mine = _auroc(np.concatenate(ours[issue]), flags[issue])
        cl = 1 - np.nan_to_num(np.concatenate([np.asarray(s, float) for s in theirs[issue]]), nan=1)
        reference = _auroc(cl, flags[issue])
        assert mine >= 0.9 and mine >= reference - 1e-9, (issue, mine, reference)


# ---------------------------------------------------------------------------------- end to end

TINY = [
    "--image-size", "64", "--fpn-channels", "16", "--batch-size", "4", "--max-iters", "3",
    "--warmup-iters", "1", "--workers", "0", "--pre-nms-topk", "50", "--post-nms-topk", "20",
    "--no-progress", "--no-pretrained", "--rpn-batch-size", "32", "--roi-batch-size", "16",
    "--device", "cpu",
]  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A VOC-layout folder (the generated shapes, 12 train / 4 val images)."""
    from eecs598.shapes import make_shapes_dataset

    root = tmp_path_factory.mktemp("audit") / "shapes"
    return make_shapes_dataset(root, num_train=12, num_val=4, image_size=64, seed=3)


def _tree_digest(root):
    import hashlib

    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() for p in files}


def test_audit_command_writes_its_outputs_and_never_the_data(folder, tmp_path, capsys):
    import csv

    import detector_cli
    from eecs598.audit import CSV_COLUMNS

    before = _tree_digest(folder)
    out = tmp_path / "audit"
    argv = ["audit", "--dataset", str(folder), "--out", str(out), "--min-score", "0",
            "--fix-score", "0", *TINY]  # fmt: skip
    assert detector_cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "Fold 1 of 2: training on" in printed and "Audit of 12 images:" in printed
    with open(out / "audit.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == CSV_COLUMNS
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    assert {r["issue"] for r in rows} <= set(ISSUES)
    assert all(r["image"].endswith(".jpg") for r in rows)
    assert all(r["label_class"] == "" for r in rows if r["issue"] == "missing")
    assert (out / "audit.png").stat().st_size > 0
    corrected = sorted((out / "corrections" / "Annotations").glob("*.xml"))
    assert corrected and {p.stem for p in corrected} <= {p.stem for p in folder.rglob("*.xml")}
    assert _tree_digest(folder) == before  # the user's labels are untouched
    # --resume reuses the finished folds: no training again.
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("fold*/checkpoint.pt")}
    assert len(stamps) == 2
    assert detector_cli.main([*argv, "--resume"]) == 0
    assert "Fold 2 of 2" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_audit_with_a_checkpoint_of_other_classes_names_both(folder, tmp_path, capsys):
    import detector_cli
    import recipe
    from eecs598.checkpoint import save_checkpoint
    from eecs598.shapes import SHAPES_CLASSES

    model = recipe.build_detector(2, fpn_channels=8, pretrained=False)
    checkpoint = tmp_path / "other.pt"
    meta = {"class_names": ["cat", "dog"], "image_size": 64}
    save_checkpoint(checkpoint, {"model": model.state_dict(), "config": model.config, "meta": meta})
    argv = ["audit", "--dataset", str(folder), "--checkpoint", str(checkpoint), "--out",
            str(tmp_path / "a"), *TINY]  # fmt: skip
    assert detector_cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "detects the classes cat, dog" in err and SHAPES_CLASSES[0] in err
    assert not (tmp_path / "a" / "audit.csv").exists()


def test_corrections_in_the_datas_own_format(tmp_path):
    """A missing box added, a class renamed, a box moved: in a VOC XML copy and a COCO JSON
    copy, found by their boxes; the sources unchanged."""
    import json
    import xml.etree.ElementTree as ET

    from eecs598.audit import Suspect, coco_corrections, voc_corrections

    fixes = [
        Suspect(0, "missing", -1, -1, 1, (50.0, 50.0, 60.0, 62.0), None, 0.9),
        Suspect(0, "class", 0, 0, 1, (1.0, 1.0, 10.0, 10.0), None, 0.8),
        Suspect(0, "location", 1, 0, 0, (20.0, 20.0, 30.0, 30.0), (24.0, 20.0, 34.0, 30.0), 0.7),
    ]
    voc = tmp_path / "Annotations"
    voc.mkdir()
    objects = "".join(
        f"<object><name>cat</name><difficult>0</difficult><bndbox><xmin>{a}</xmin><ymin>{a}</ymin>"
        f"<xmax>{b}</xmax><ymax>{b}</ymax></bndbox></object>"
        for a, b in ((1, 10), (20, 30))
    )
    (voc / "img1.xml").write_text(
        f"<annotation><filename>img1.jpg</filename>{objects}</annotation>"
    )
    source = (voc / "img1.xml").read_text()
    (written,) = voc_corrections(voc, tmp_path / "fixed", {"img1": fixes}, ["cat", "dog"])
    assert (voc / "img1.xml").read_text() == source
    got = [
        (
            o.findtext("name"),
            [int(o.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")],
        )
        for o in ET.parse(written).getroot().iter("object")
    ]
    assert got == [("dog", [1, 1, 10, 10]), ("cat", [24, 20, 34, 30]), ("dog", [50, 50, 60, 62])]

    data = {
        "images": [{"id": 7, "file_name": "img1.jpg", "width": 100, "height": 100}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        "annotations": [
            {"id": 3, "image_id": 7, "category_id": 1, "bbox": [1, 1, 9, 9], "iscrowd": 0},
            {"id": 4, "image_id": 7, "category_id": 1, "bbox": [20, 20, 10, 10], "iscrowd": 0},
        ],
    }
    (tmp_path / "in.json").write_text(json.dumps(data))
    path = coco_corrections(tmp_path / "in.json", tmp_path / "out.json", {"img1": fixes},
                            ["cat", "dog"])  # fmt: skip
    assert json.loads((tmp_path / "in.json").read_text()) == data
    fixed = json.loads(path.read_text())["annotations"]
    assert [(a["id"], a["category_id"], a["bbox"]) for a in fixed] == [
        (3, 2, [1, 1, 9, 9]), (4, 1, [24.0, 20.0, 10.0, 10.0]), (5, 2, [50.0, 50.0, 10.0, 12.0]),
    ]  # fmt: skip


def test_audit_of_a_single_image_says_it_cannot_be_split(tmp_path, capsys):
    import detector_cli
    from eecs598.shapes import make_shapes_dataset

    root = make_shapes_dataset(tmp_path / "one", num_train=1, num_val=1, image_size=64, seed=1)
    argv = ["audit", "--dataset", str(root), "--out", str(tmp_path / "a"), *TINY]
    assert detector_cli.main(argv) == 1
    assert "1 image(s) cannot be split into 2 folds" in capsys.readouterr().err
    assert not list((tmp_path / "a").glob("fold*/checkpoint.pt"))  # nothing trained


def test_data_without_a_val_split_is_audited_whole(folder, tmp_path, capsys):
    """A VOC folder without ImageSets: ``train`` would hold 10% out for validation; the audit
    scores every image."""
    import shutil

    import detector_cli

    plain = tmp_path / "plain"
    for part in ("Annotations", "JPEGImages"):
        shutil.copytree(folder / part, plain / part)
    argv = ["audit", "--dataset", str(plain), "--out", str(tmp_path / "a"), *TINY]
    assert detector_cli.main(argv) == 0
    count = len(list((plain / "Annotations").glob("*.xml")))
    assert count == 16 and f"Audit of {count} images" in capsys.readouterr().out
