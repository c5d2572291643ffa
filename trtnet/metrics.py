"""Accuracy metrics: COCO mAP through pycocotools, P and R as YOLOv5 reports them, top-1/top-5.

Detection numbers and how they relate to the official YOLOv5 `val.py`:

- mAP@0.5:0.95 and mAP@0.5 come from pycocotools' `COCOeval` (bbox) on ground truth converted from the
  YOLO labels (boxes in pixels, `area` = w*h, no crowd boxes, categories 0..nc-1). Like `COCOeval.
  summarize`, they are the mean of `eval['precision']` over IoU thresholds, the 101 recall points and the
  classes that have ground truth — read for `maxDets` = `max_det` (300, val.py's default) instead of
  pycocotools' 100. (`summarize()` itself cannot be used: its first line is hard-wired to maxDets=100.)
- YOLOv5's own AP differs slightly (val.py says so itself): it matches detections to labels by best IoU
  rather than COCO's greedy highest-score-first, integrates the precision envelope with the trapezoid
  rule over 101 points (pycocotools samples it at 101 recall thresholds), and closes each curve with a
  (recall 1, precision 0) point. trtnet reports the pycocotools numbers.
- P and R follow YOLOv5's `ap_per_class`: per class, precision and recall as functions of the confidence
  (1000 points, linear interpolation), then the confidence that maximises the box-smoothed mean F1 over
  classes; P and R are the class means at that confidence. The true/false-positive flags at IoU 0.5 are
  COCOeval's own matches (its `evalImgs`), so only this last step is computed here.
- Measured on yolov5n's coco128 detections (the official val run reproduced on the CPU): trtnet gives
  mAP@0.5:0.95 0.3671, mAP@0.5 0.5722, P 0.5844, R 0.5177 where YOLOv5 reports 0.3657, 0.5684, 0.5826,
  0.5080. The P/R difference is entirely the matching rule; on small or weak sets (recall far from 1)
  the AP gap grows — several points on synthetic sets — because of YOLOv5's closing point.
- pycocotools caps detections per image *and class*; the per-image cap of val.py (`max_det`, keep the
  highest scores) is applied here before evaluation.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from trtnet.datasets import DatasetWarning, DetectionSample
from trtnet.errors import TrtnetError

# Per image: boxes [n, 4] x1, y1, x2, y2 in original-image pixels, scores [n], classes [n].
Detections = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass
class ClassResult:
    cls: int
    instances: int
    precision: float
    recall: float
    map50: float
    map50_95: float


@dataclass
class DetectionMetrics:
    images: int
    instances: int
    precision: float
    recall: float
    map50: float
    map50_95: float
    per_class: list[ClassResult] = field(default_factory=list)

    def to_table(self, names: Sequence[str] | Mapping[int, str] | None = None, per_class: bool = False) -> str:
        """YOLOv5's val table: an `all` row, then one row per class with ground truth if `per_class`."""
        rows = [_row("all", self.images, self.instances, self.precision, self.recall, self.map50, self.map50_95)]
        for c in self.per_class if per_class else []:
            name = names[c.cls] if names is not None and c.cls in _keys(names) else str(c.cls)
            rows.append(_row(name, self.images, c.instances, c.precision, c.recall, c.map50, c.map50_95))
        header = ("%22s" + "%11s" * 6) % ("Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95")
        return "\n".join([header, *rows])

    def to_json(self) -> str:
        """The four headline numbers under the keys of the official golden file, plus counts and classes."""
        headline = {"P": self.precision, "R": self.recall, "mAP@0.5": self.map50, "mAP@0.5:0.95": self.map50_95}
        return json.dumps({"metrics": headline, "images": self.images, "instances": self.instances,
                           "per_class": [asdict(c) for c in self.per_class]}, indent=1)


@dataclass
class ClassificationMetrics:
    images: int
    top1: float
    top5: float

    def to_table(self) -> str:
        return f"{'Images':>10}{'top-1':>10}{'top-5':>10}\n{self.images:>10}{self.top1:>10.4f}{self.top5:>10.4f}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def _row(name: str, images: int, instances: int, *values: float) -> str:
    return ("%22s" + "%11i" * 2 + "%11.3g" * 4) % (name, images, instances, *values)


def _keys(names: Sequence[str] | Mapping[int, str]):
    return names.keys() if isinstance(names, Mapping) else range(len(names))


# --------------------------------------------------------------------------------------------- detection


def detection_metrics(
    samples: Sequence[DetectionSample], detections: Sequence[Detections], max_det: int = 300,
    verbose: bool = False,
) -> DetectionMetrics:
    """COCO mAP, YOLOv5 P/R of `detections[i]` against the labels of `samples[i]`.

    `verbose` lets pycocotools print its progress.
    """
    if len(samples) != len(detections):
        raise ValueError(f"{len(detections)} detection sets for {len(samples)} images")
    detections = [_top_scores(*_as_arrays(d), max_det) for d in detections]
    instances = sum(len(s.labels) for s in samples)
    if instances == 0:
        warnings.warn("no labels in the dataset: metrics need labels, reporting zeros", DatasetWarning,
                      stacklevel=2)
        return DetectionMetrics(len(samples), 0, 0.0, 0.0, 0.0, 0.0)
    evaluator = _coco_evaluate(samples, detections, max_det, verbose)
    precision = evaluator.eval["precision"][:, :, :, 0, -1]  # [IoU, recall point, class] at area "all"
    has_gt = (precision > -1).all(axis=(0, 1))  # pycocotools marks classes without ground truth with -1
    p, r, n_gt = _yolo_precision_recall(evaluator)
    per_class = [
        ClassResult(int(k), int(n_gt[k]), float(p[k]), float(r[k]),
                    float(precision[0, :, k].mean()), float(precision[:, :, k].mean()))
        for k in np.flatnonzero(has_gt)
    ]
    return DetectionMetrics(
        images=len(samples),
        instances=instances,
        precision=float(p[has_gt].mean()),
        recall=float(r[has_gt].mean()),
        map50=float(precision[0][:, has_gt].mean()),
        map50_95=float(precision[:, :, has_gt].mean()),
        per_class=per_class,
    )


def _as_arrays(detections: Detections) -> Detections:
    boxes, scores, classes = detections
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    classes = np.asarray(classes).reshape(-1).astype(np.int64)
    if not len(boxes) == len(scores) == len(classes):
        raise ValueError(f"detections disagree: {len(boxes)} boxes, {len(scores)} scores, {len(classes)} classes")
    return boxes, scores, classes


def _top_scores(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, k: int) -> Detections:
    keep = np.argsort(-scores, kind="stable")[:k]
    return boxes[keep], scores[keep], classes[keep]


def coco_ground_truth(samples: Sequence[DetectionSample], nc: int) -> dict:
    """The YOLO labels as a COCO dataset dict: image id = sample index, annotation ids from 1."""
    images, annotations = [], []
    for image_id, sample in enumerate(samples):
        images.append({"id": image_id, "file_name": sample.path.name, "width": sample.width,
                       "height": sample.height})
        for cls, box in zip(sample.classes, sample.boxes_xyxy()):
            annotations.append(_annotation(len(annotations) + 1, image_id, cls, box) | {"iscrowd": 0})
    return {"images": images, "annotations": annotations, "categories": [{"id": c} for c in range(nc)]}


def coco_results(detections: Sequence[Detections]) -> list[dict]:
    """Detections as COCO results, with the `id` and `area` that `COCO.loadRes` would add."""
    results = []
    for image_id, (boxes, scores, classes) in enumerate(detections):
        for box, score, cls in zip(boxes, scores, classes):
            results.append(_annotation(len(results) + 1, image_id, cls, box) | {"score": float(score)})
    return results


def _annotation(ann_id: int, image_id: int, cls: int, xyxy: np.ndarray) -> dict:
    x1, y1, x2, y2 = (float(v) for v in xyxy)
    w, h = x2 - x1, y2 - y1
    return {"id": ann_id, "image_id": image_id, "category_id": int(cls), "bbox": [x1, y1, w, h], "area": w * h}


def _coco_evaluate(samples, detections, max_det: int, verbose: bool):
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as exc:
        raise TrtnetError("detection metrics need pycocotools: pip install 'trtnet[val]'") from exc
    nc = 1 + max([int(s.classes.max()) for s in samples if len(s.labels)]
                 + [int(c.max()) for _, _, c in detections if len(c)])
    ground_truth = coco_ground_truth(samples, nc)
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        gt, dt = COCO(), COCO()
        gt.dataset = ground_truth
        # Built like gt rather than by gt.loadRes, which cannot take an empty result list.
        dt.dataset = {**ground_truth, "annotations": coco_results(detections)}
        gt.createIndex()
        dt.createIndex()
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.params.maxDets = sorted({1, 10, max_det})
        # Only area "all" is reported; skipping small/medium/large makes evaluate() about 4x faster.
        evaluator.params.areaRng, evaluator.params.areaRngLbl = evaluator.params.areaRng[:1], ["all"]
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator


def _yolo_precision_recall(evaluator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class P and R at the max-mean-F1 confidence (YOLOv5's `ap_per_class`), and label counts."""
    nc = len(evaluator.params.catIds)
    scores, hits, n_gt = [[] for _ in range(nc)], [[] for _ in range(nc)], np.zeros(nc, np.int64)
    for e in evaluator.evalImgs:  # one per (class, image) — area "all" only — None where neither has boxes
        if e is None:
            continue
        k, counted = e["category_id"], ~e["dtIgnore"][0].astype(bool)
        scores[k].append(np.asarray(e["dtScores"])[counted])
        hits[k].append(e["dtMatches"][0][counted] > 0)  # matched at IoU 0.5
        n_gt[k] += int((e["gtIgnore"] == 0).sum())
    confidence = np.linspace(0, 1, 1000)
    p_curve, r_curve = np.zeros((nc, 1000)), np.zeros((nc, 1000))
    for k in range(nc):
        if n_gt[k] == 0 or not scores[k]:
            continue
        s, tp = np.concatenate(scores[k]), np.concatenate(hits[k])
        if not s.size:
            continue
        order = np.argsort(-s, kind="stable")
        s, tpc, fpc = s[order], np.cumsum(tp[order]), np.cumsum(~tp[order])
        r_curve[k] = np.interp(-confidence, -s, tpc / n_gt[k], left=0)
        p_curve[k] = np.interp(-confidence, -s, tpc / (tpc + fpc), left=1)
    f1 = 2 * p_curve * r_curve / (p_curve + r_curve + 1e-16)
    best = _box_smooth(f1[n_gt > 0].mean(0), 0.1).argmax()
    return p_curve[:, best], r_curve[:, best], n_gt


def _box_smooth(y: np.ndarray, fraction: float) -> np.ndarray:
    """YOLOv5's `smooth`: a moving average over `fraction` of the points, edges padded with end values."""
    n = round(len(y) * fraction * 2) // 2 + 1  # odd
    padded = np.concatenate([np.full(n // 2, y[0]), y, np.full(n // 2, y[-1])])
    return np.convolve(padded, np.ones(n) / n, mode="valid")


# ---------------------------------------------------------------------------------------- classification


def classification_metrics(scores: np.ndarray, labels: np.ndarray) -> ClassificationMetrics:
    """Top-1 and top-5 accuracy of class scores [n, classes] (logits or probabilities) against labels [n]."""
    scores, labels = np.asarray(scores), np.asarray(labels).reshape(-1)
    if scores.ndim != 2 or len(scores) != len(labels):
        raise ValueError(f"scores {scores.shape} do not match {len(labels)} labels")
    return ClassificationMetrics(len(labels), topk_accuracy(scores, labels, 1), topk_accuracy(scores, labels, 5))


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """The fraction of rows whose label is among their k highest scores (all of them if fewer than k)."""
    if not len(labels):
        return 0.0
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())
