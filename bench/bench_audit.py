"""The label audit against cleanlab's ObjectLab on the same out-of-sample detections.

A copy of a VOC-layout training set gets known errors (seeded, recorded in ``noise.json``):
10% of the boxes dropped, 5% given another class, 5% shifted or scaled by 30-50% of their
size. ``recipe.auditing.out_of_sample_detections`` trains the folds on the noisy copy; then
``eecs598.audit`` and ``cleanlab.object_detection.rank``'s per-type box scores rank the same
detections and labels. Printed per issue type: the AUROC (injected errors against the rest)
and the precision among the top N (N = the number injected) of each.

    python bench/bench_audit.py --data shapes --max-iters 360
    python bench/bench_audit.py --data ../shared/datasets/bccd --max-iters 300 --fpn-channels 64

cleanlab is a reference here, as tidecv is for the error analysis: not a dependency.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eecs598.audit import pairwise_iou, score_image  # noqa: E402
from eecs598.settings import DEMO, preset_for  # noqa: E402
from eecs598.shapes import SHAPES_CLASSES, make_shapes_dataset  # noqa: E402
from eecs598.voc import voc_folders  # noqa: E402
from recipe.auditing import out_of_sample_detections  # noqa: E402
from recipe.plan import plan_training  # noqa: E402

DROP, SWAP, MOVE = 0.10, 0.05, 0.05


def noisy_copy(source: Path, dest: Path, split: str, classes: list[str], seed: int) -> dict:
    """Copy ``source``'s annotations to ``dest`` (images linked) with errors injected into the
    objects of the ``split`` list; returns what was changed, per image id."""
    rng = np.random.default_rng(seed)
    annotations, images = voc_folders(source)
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "Annotations").mkdir(parents=True)
    shutil.copytree(source / "ImageSets", dest / "ImageSets")
    (dest / "JPEGImages").symlink_to(images.resolve())
    ids = (source / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
    trees = {p.stem: ET.parse(p) for p in sorted(annotations.glob("*.xml"))}
    objects = [(i, obj) for i in ids for obj in trees[i].getroot().findall("object")
               if obj.findtext("difficult", "0") == "0"]  # fmt: skip
    order = rng.permutation(len(objects))
    n_drop, n_swap, n_move = (int(round(f * len(objects))) for f in (DROP, SWAP, MOVE))
    truth: dict[str, dict[str, list]] = {
        i: {"dropped": [], "swapped": [], "moved": []} for i in ids
    }
    for rank, index in enumerate(order[: n_drop + n_swap + n_move]):
        image_id, obj = objects[index]
        root = trees[image_id].getroot()
        box = [float(obj.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
        if rank < n_drop:
            root.remove(obj)
            truth[image_id]["dropped"].append(box)
        elif rank < n_drop + n_swap:
            name = obj.findtext("name")
            other = [c for c in classes if c != name]
            obj.find("name").text = str(rng.choice(other))
            truth[image_id]["swapped"].append(box)
        else:
            moved = _move(box, rng, _size(root))
            for key, value in zip(("xmin", "ymin", "xmax", "ymax"), moved, strict=True):
                obj.find("bndbox").find(key).text = str(int(round(value)))
            truth[image_id]["moved"].append([float(int(round(v))) for v in moved])
    for image_id, tree in trees.items():
        tree.write(dest / "Annotations" / f"{image_id}.xml")
    return truth


def noisy_coco_copy(source: Path, dest: Path, seed: int) -> tuple[dict, list[str]]:
    """A copy of the COCO JSON ``source`` at ``dest`` with the same errors injected (images
    stay where they are); returns what was changed per file stem, and the class names."""
    rng = np.random.default_rng(seed)
    data = json.loads(source.read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    used = sorted({a["category_id"] for a in data["annotations"]})
    stem = {im["id"]: Path(im["file_name"]).stem for im in data["images"]}
    size = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
    truth: dict[str, dict[str, list]] = {
        s: {"dropped": [], "swapped": [], "moved": []} for s in stem.values()
    }
    annotations = [a for a in data["annotations"] if not a.get("iscrowd", 0)]
    order = rng.permutation(len(annotations))
    n_drop, n_swap, n_move = (int(round(f * len(annotations))) for f in (DROP, SWAP, MOVE))
    dropped = set()
    for rank, index in enumerate(order[: n_drop + n_swap + n_move]):
        ann = annotations[index]
        x, y, w, h = ann["bbox"]
        box, t = [x, y, x + w, y + h], truth[stem[ann["image_id"]]]
        if rank < n_drop:
            dropped.add(ann["id"])
            t["dropped"].append(box)
        elif rank < n_drop + n_swap:
            ann["category_id"] = int(rng.choice([c for c in used if c != ann["category_id"]]))
            t["swapped"].append(box)
        else:
            x1, y1, x2, y2 = _move(box, rng, size[ann["image_id"]])
            ann["bbox"] = [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]
            t["moved"].append([float(x1), float(y1), float(x2), float(y2)])
    data["annotations"] = [a for a in data["annotations"] if a["id"] not in dropped]
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(data))
    return truth, [names[c] for c in sorted(names)]


def _size(root: ET.Element) -> tuple[int, int]:
    size = root.find("size")
    return int(size.findtext("width")), int(size.findtext("height"))


def _move(box: list[float], rng: np.random.Generator, size: tuple[int, int]) -> list[float]:
    """The box shifted (half the time) or scaled by 30-50% of its size, kept in the image."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    f = rng.uniform(0.3, 0.5)
    if rng.random() < 0.5:
        dx, dy = rng.choice([-1, 1], 2) * f * np.array([w, h]) * rng.uniform(0.5, 1.0, 2)
        x1, x2, y1, y2 = x1 + dx, x2 + dx, y1 + dy, y2 + dy
    else:
        s = 1 + rng.choice([-1, 1]) * f
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        x1, x2, y1, y2 = cx - s * w / 2, cx + s * w / 2, cy - s * h / 2, cy + s * h / 2
    width, height = size
    x1, x2 = np.clip([x1, x2], 1, width)
    y1, y2 = np.clip([y1, y2], 1, height)
    return [x1, y1, max(x2, x1 + 2), max(y2, y1 + 2)]


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half)."""
    pos, neg = scores[positive], scores[~positive]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def precision_at(scores: np.ndarray, positive: np.ndarray, n: int) -> float:
    """Share of injected errors among the ``n`` highest scores (stable order)."""
    top = np.argsort(-scores, kind="stable")[:n]
    return float(positive[top].mean()) if n else float("nan")


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return pairwise_iou(np.asarray(a).reshape(-1, 4), np.asarray(b).reshape(-1, 4))


def evaluate(records, detections, truth, num_classes: int, source: dict | None = None) -> dict:
    """Both methods' scores with the injected truth, per issue type.

    With ``source`` (image id: the clean copy's ``(L, 4)`` boxes) a fourth row,
    ``missing_labelled``, scores only the detections on objects the source labels (IoU >= 0.5
    with one of its boxes): the source's own unlabelled objects (BCCD leaves many red cells
    unboxed) are real overlooked boxes, but not injected ones."""
    from cleanlab.object_detection import rank

    ours = {k: [] for k in ("missing", "class", "location")}
    positive = {k: [] for k in ours}
    labelled = []
    labels, predictions, order = [], [], []
    for record, (db, dc, ds) in zip(records, detections, strict=True):
        t = truth.get(record.image_id, {"dropped": [], "swapped": [], "moved": []})
        scores = score_image(record.boxes, record.classes, db, dc, ds)
        # cleanlab lists each image's predictions class by class: keep that order for ours too.
        per_class = [np.flatnonzero(dc == k) for k in range(num_classes)]
        flat = np.concatenate(per_class) if len(dc) else np.zeros(0, np.int64)
        order.append(flat)
        ours["missing"].append(scores.missing[flat])
        dropped = _iou(db[flat], t["dropped"]).max(axis=1, initial=0.0) >= 0.5
        positive["missing"].append(dropped)
        if source is not None:
            labelled.append(_iou(db[flat], source[record.image_id]).max(axis=1, initial=0.0) >= 0.5)
        ours["class"].append(scores.label_class)
        ours["location"].append(scores.location)
        positive["class"].append(_matches(record.boxes, t["swapped"]))
        positive["location"].append(_matches(record.boxes, t["moved"]))
        labels.append({"bboxes": record.boxes.astype(np.float32), "labels": record.classes})
        prediction = np.empty(num_classes, dtype=object)  # one (M_k, 5) array per class
        for k, rows in enumerate(per_class):
            prediction[k] = np.concatenate([db[rows], ds[rows, None]], axis=1).astype(np.float32)
        predictions.append(prediction)
    data = {"labels": labels, "predictions": predictions}
    theirs = {"cleanlab": _cleanlab(rank, data, {}), "cleanlab_0.5": _cleanlab(rank, data, LOWER)}
    rows = {issue: (issue, None) for issue in ours}
    if source is not None:
        rows["missing_labelled"] = ("missing", np.concatenate(labelled).astype(bool))
    table = {}
    for row_name, (issue, keep) in rows.items():
        truth_flags = np.concatenate(positive[issue]).astype(bool)
        n = int(truth_flags.sum())
        row = {"injected_found": n, "candidates": int(len(truth_flags))}
        # cleanlab: lower is worse, NaN where it has no opinion.
        methods = {"ours": np.concatenate(ours[issue])} | {
            name: 1.0 - np.nan_to_num(np.concatenate([np.asarray(v, float) for v in s[issue]]),
                                      nan=1.0)
            for name, s in theirs.items()
        }  # fmt: skip
        if keep is not None:
            truth_flags = truth_flags[keep]
            methods = {name: scores[keep] for name, scores in methods.items()}
            row = {"injected_found": int(truth_flags.sum()), "candidates": int(keep.sum())}
        n = int(truth_flags.sum())
        for name, scores in methods.items():
            row[f"{name}_auroc"] = auroc(scores, truth_flags)
            row[f"{name}_p_at_n"] = precision_at(scores, truth_flags, n)
        table[row_name] = row
    return table


# cleanlab's thresholds lowered from its defaults (0.95 for the overlooked and swap scores, 0.5
# for badly located): its defaults abstain where a model trained for minutes is rarely 95% sure.
LOWER = {"missing": {"high_probability_threshold": 0.5},
         "class": {"high_probability_threshold": 0.5},
         "location": {"low_probability_threshold": 0.1}}  # fmt: skip


def _cleanlab(rank, data: dict, options: dict) -> dict:
    """cleanlab's per-type box scores (``options``: its thresholds per issue)."""
    return {
        "missing": rank.compute_overlooked_box_scores(**data, **options.get("missing", {})),
        "class": rank.compute_swap_box_scores(**data, **options.get("class", {})),
        "location": rank.compute_badloc_box_scores(**data, **options.get("location", {})),
    }


def _matches(boxes: np.ndarray, injected: list) -> np.ndarray:
    """Which label rows are (to a pixel) one of the ``injected`` boxes."""
    if not injected:
        return np.zeros(len(boxes), bool)
    diff = np.abs(boxes[:, None, :] - np.asarray(injected, np.float32)[None]).max(axis=2)
    return (diff <= 1.0).any(axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="shapes", help="shapes, or a VOC-layout folder")
    parser.add_argument("--out", default="runs/bench_audit")
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--max-iters", type=int, default=360)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--fpn-channels", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    if args.data == "shapes":
        source = make_shapes_dataset(out / "clean", num_train=480, num_val=96, seed=0)
        classes = list(SHAPES_CLASSES)
        base = DEMO.replace(classes=",".join(classes))
    else:
        source = Path(args.data)
        base = preset_for(str(source))
        classes = None
    noisy = out / "noisy"
    if str(source).lower().endswith(".json"):  # COCO: the images stay beside the source
        noisy = out / "noisy.json"
        truth, _ = noisy_coco_copy(source, noisy, args.seed)
        valid = source.parent.parent / "valid" / source.name  # Roboflow's layout
        valid = valid if valid.is_file() else source  # (only read: no validation while training)
        base = base.replace(images=str(source.parent), val_dataset=str(valid),
                            val_images=str(valid.parent))  # fmt: skip
        classes = None
    else:
        if classes is None:
            from recipe.data import discover_classes

            classes = discover_classes(source)
        truth = noisy_copy(source, noisy, "train", classes, args.seed)
    (out / "noise.json").write_text(json.dumps(truth))
    settings = base.replace(
        dataset=str(noisy), classes=",".join(classes) if classes else None,
        out=str(out / "folds"), pretrained=False,
        max_iters=args.max_iters, batch_size=args.batch_size, fpn_channels=args.fpn_channels,
        eval_period=0, seed=args.seed, progress=False,
    )  # fmt: skip
    start = time.perf_counter()
    plan, train, names, detections = out_of_sample_detections(settings, args.folds, args.resume)
    seconds = time.perf_counter() - start
    _, source_data, _, _ = plan_training(settings.replace(dataset=str(source)))
    source_boxes = {r.image_id: r.boxes for r in source_data.records}
    table = evaluate(train.records, detections, truth, len(names), source_boxes)
    print(f"{args.data}: {len(train)} training images, {args.folds} folds of {args.max_iters} "
          f"iterations, {seconds:.0f} s")  # fmt: skip
    methods = ("ours", "cleanlab", "cleanlab_0.5")
    print("| issue | injected | candidates | " + " | ".join(f"AUROC {m}" for m in methods)
          + " | " + " | ".join(f"P@N {m}" for m in methods) + " |")  # fmt: skip
    print("|---" * (3 + 2 * len(methods)) + "|")
    for issue, row in table.items():
        values = [row[f"{m}_auroc"] for m in methods] + [row[f"{m}_p_at_n"] for m in methods]
        print(f"| {issue} | {row['injected_found']} | {row['candidates']} | "
              + " | ".join(f"{v:.3f}" for v in values) + " |")  # fmt: skip
    (out / "table.json").write_text(json.dumps({"seconds": seconds, "table": table}, indent=2))


if __name__ == "__main__":
    main()
