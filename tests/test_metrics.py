"""Detection and classification metrics on hand-made cases whose values follow from COCO's definitions.

COCO AP (pycocotools) of one class at one IoU threshold: detections sorted by score, precision made
monotone from the right, then sampled at the 101 recall thresholds 0.00, 0.01, …, 1.00 — each sample is
the (monotone) precision at the first detection whose cumulative recall reaches the threshold, 0 where
recall never reaches it. AP is the mean of the 101 samples; mAP@0.5:0.95 averages 10 IoU thresholds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import requires_tensorrt, shared
from trtnet.datasets import DatasetWarning, DetectionSample, load_detection_dataset
from trtnet.engine_meta import EngineMeta
from trtnet.errors import TrtnetError
from trtnet.metrics import classification_metrics, detection_metrics, topk_accuracy
from trtnet.val import check_engine_takes, evaluate_detection, val_batches

pytest.importorskip("pycocotools")


def image(*labels, width=100, height=100, name="a.jpg") -> DetectionSample:
    """An image with labels given as (class, x1, y1, x2, y2) in pixels."""
    rows = [[c, (x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height]
            for c, x1, y1, x2, y2 in labels]
    return DetectionSample(Path(name), width, height, np.array(rows, np.float32).reshape(-1, 5))


def found(*detections):
    """Detections given as (class, score, x1, y1, x2, y2) in pixels."""
    rows = np.array(detections, np.float64).reshape(-1, 6)
    return rows[:, 2:], rows[:, 1], rows[:, 0].astype(int)


def as_found(sample: DetectionSample, score: float = 0.9):
    """Perfect detections of a sample's labels."""
    return sample.boxes_xyxy(), np.full(len(sample.labels), score), sample.classes


def test_perfect_predictions_score_one():
    images = [image((0, 10, 10, 50, 40), (2, 60, 5, 95, 95), width=100, height=100),
              image((1, 0, 0, 320, 200), (0, 100, 100, 140, 180), width=640, height=480)]
    m = detection_metrics(images, [as_found(images[0], 0.8), as_found(images[1], 0.6)])
    assert (m.map50_95, m.map50, m.precision, m.recall) == pytest.approx((1, 1, 1, 1))
    assert (m.images, m.instances) == (2, 4)
    assert [(c.cls, c.instances) for c in m.per_class] == [(0, 2), (1, 1), (2, 1)]


def test_no_predictions_score_zero():
    m = detection_metrics([image((0, 10, 10, 50, 50))], [found()])
    assert (m.map50_95, m.map50, m.precision, m.recall) == (0, 0, 0, 0)


def test_one_of_two_boxes_found():
    # One detection matches one of two equal boxes exactly, at every IoU threshold: cumulative recall
    # 0.5 at precision 1. Thresholds 0.00..0.50 (51 of 101) sample precision 1, 0.51..1.00 sample 0,
    # so AP = 51/101 at every IoU, and mAP@0.5 = mAP@0.5:0.95 = 51/101 (not 0.5: 101-point sampling).
    # At any confidence up to the detection's score P = 1 and R = 1/2.
    m = detection_metrics([image((0, 10, 10, 30, 30), (0, 60, 60, 80, 80))], [found((0, 0.9, 10, 10, 30, 30))])
    assert m.map50 == pytest.approx(51 / 101)
    assert m.map50_95 == pytest.approx(51 / 101)
    assert (m.precision, m.recall) == pytest.approx((1, 0.5))


def test_wrong_class_scores_zero():
    # Class 1 has no labels, so it does not count; class 0 has a label and no detection of its class.
    m = detection_metrics([image((0, 10, 10, 50, 50))], [found((1, 0.9, 10, 10, 50, 50))])
    assert (m.map50_95, m.map50, m.precision, m.recall) == (0, 0, 0, 0)


def test_false_positive_on_background_image_ranked_first_halves_precision():
    # Sorted by score: FP (0.95, on the background image), then TP (0.9). Cumulative recall 0, 1 and
    # precision 0, 1/2; made monotone from the right the precision is 1/2 at both, so all 101 samples
    # are 1/2: AP = 0.5 at every IoU. Below 0.9 confidence one TP and one FP: P = 1/2, R = 1.
    images = [image((0, 10, 10, 50, 50), name="a.jpg"), image(name="background.jpg")]
    m = detection_metrics(images, [found((0, 0.9, 10, 10, 50, 50)), found((0, 0.95, 20, 20, 60, 60))])
    assert (m.map50, m.map50_95) == pytest.approx((0.5, 0.5))
    assert (m.precision, m.recall) == pytest.approx((0.5, 1))


def test_false_positive_ranked_below_every_true_positive_costs_no_ap():
    # Sorted: TP (recall 1, precision 1), then FP (recall 1, precision 1/2): every recall threshold is
    # reached at the TP, where the monotone precision is 1, so AP = 1.
    images = [image((0, 10, 10, 50, 50), name="a.jpg"), image(name="background.jpg")]
    m = detection_metrics(images, [found((0, 0.9, 10, 10, 50, 50)), found((0, 0.3, 20, 20, 60, 60))])
    assert (m.map50, m.map50_95) == pytest.approx((1, 1))


def test_loose_box_counts_only_at_the_iou_thresholds_it_passes():
    # Label 100x100, detection 100x72 inside it: IoU 0.72, a TP at thresholds 0.50..0.70 (5 of 10, AP 1
    # each) and unmatched at 0.75..0.95 (AP 0): mAP@0.5 = 1, mAP@0.5:0.95 = 5/10.
    m = detection_metrics([image((0, 0, 0, 100, 100), width=200, height=200)], [found((0, 0.9, 0, 0, 100, 72))])
    assert (m.map50, m.map50_95) == pytest.approx((1, 0.5))


def test_max_det_keeps_the_highest_scores_per_image():
    # 300 false positives (10x10 boxes far from the label) outscore the one true positive.
    grid = [(0, 0.5 + i / 1000, 200 + 20 * (i % 20), 200 + 20 * (i // 20), 210 + 20 * (i % 20),
             210 + 20 * (i // 20)) for i in range(300)]
    images = [image((0, 10, 10, 50, 50), width=640, height=640)]
    detections = [found((0, 0.1, 10, 10, 50, 50), *grid)]
    assert detection_metrics(images, detections, max_det=300).map50 == 0
    assert detection_metrics(images, detections, max_det=301).map50 > 0


def test_dataset_without_labels_warns_and_reports_zeros():
    with pytest.warns(DatasetWarning, match="no labels"):
        m = detection_metrics([image()], [found((0, 0.9, 10, 10, 50, 50))])
    assert (m.instances, m.map50_95, m.precision) == (0, 0, 0)


def test_detections_must_match_images():
    with pytest.raises(ValueError, match="2 detection sets for 1 images"):
        detection_metrics([image((0, 10, 10, 50, 50))], [found(), found()])


def test_table_and_json():
    images = [image((0, 10, 10, 30, 30), (1, 60, 60, 80, 80))]
    m = detection_metrics(images, [found((0, 0.9, 10, 10, 30, 30))])
    table = m.to_table(names=["person", "bicycle"], per_class=True).splitlines()
    assert table[0].split() == ["Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95"]
    assert table[1].split()[:3] == ["all", "1", "2"]
    assert [row.split()[0] for row in table[2:]] == ["person", "bicycle"]
    out = json.loads(m.to_json())
    assert out["metrics"] == pytest.approx({"P": 0.5, "R": 0.5, "mAP@0.5": 0.5, "mAP@0.5:0.95": 0.5})
    assert [c["cls"] for c in out["per_class"]] == [0, 1]


def test_oracle_on_coco128_scores_one_in_val_batches():
    # A predictor that recognises each image by its pixels and returns its labels: every box found.
    with pytest.warns(DatasetWarning):
        dataset = load_detection_dataset(shared("coco128"))
    index_of = {digest(dataset.read(i)): i for i in range(len(dataset))}
    calls = []

    def oracle(images, shape):
        calls.append((len(images), shape))
        return [as_found(dataset[index_of[digest(im)]]) for im in images]

    m = evaluate_detection(dataset, oracle, imgsz=640, batch=16)
    assert (m.map50_95, m.map50, m.precision, m.recall) == pytest.approx((1, 1, 1, 1))
    assert (m.images, m.instances) == (128, 929)
    assert [n for n, _ in calls] == [16] * 8
    assert all(h % 32 == 0 and w % 32 == 0 and max(h, w) == 672 for _, (h, w) in calls)


def test_engines_that_cannot_take_the_val_batches_are_refused_before_the_first_batch():
    from trtnet.engine import Engine

    with pytest.warns(DatasetWarning):
        dataset = load_detection_dataset(shared("coco128"))
    shapes = val_batches(dataset, 640, 16)[1]
    engine = Engine.__new__(Engine)  # only the metadata matters here: no TensorRT, no GPU
    engine.path = Path("yolov5n.engine")
    engine.meta = EngineMeta.from_dict({"family": "yolov5", "imgsz": [640, 640], "min_imgsz": 128, "outputs": [],
                                        "batch": {"min": 1, "opt": 1, "max": 1}, "input": {"name": "images"},
                                        "tensorrt": {"flavour": "tensorrt", "version": "8.5.3.1"}})
    with pytest.raises(TrtnetError, match=r"outside yolov5n.engine's range 128..640: rebuild"):
        check_engine_takes(engine, shapes)
    calls = []
    with pytest.raises(TrtnetError, match="rebuild"):  # evaluate_detection checks before the first batch
        evaluate_detection(dataset, lambda images, shape: calls.append(shape), 640, 16,
                           check_shapes=lambda s: check_engine_takes(engine, s))
    assert calls == []
    engine.meta = dataclasses.replace(engine.meta, max_imgsz=672)
    check_engine_takes(engine, shapes)
    check_engine_takes(engine, val_batches(dataset, 640, 16, rect=False)[1])


def digest(im: np.ndarray) -> str:
    return hashlib.sha1(im.tobytes()).hexdigest()


def test_top_k_accuracy():
    scores = np.array([[0.1, 0.7, 0.2, 0.0, 0.0, 0.0],    # label 1: top-1
                       [0.5, 0.1, 0.4, 0.0, 0.0, 0.0],    # label 2: 2nd
                       [0.3, 0.2, 0.1, 0.15, 0.12, 0.13]])  # label 2: 6th, outside the top 5
    labels = np.array([1, 2, 2])
    m = classification_metrics(scores, labels)
    assert (m.images, m.top1, m.top5) == (3, pytest.approx(1 / 3), pytest.approx(2 / 3))
    assert topk_accuracy(scores, labels, 6) == 1


@pytest.mark.slow
@requires_tensorrt
def test_cpu_val_of_yolov5n_reproduces_the_official_run(tmp_path, capsys):
    """The official val run (golden) by `python -m trtnet.val WEIGHTS --device cpu`: our network on the CPU
    executor, val.py's batches and letterbox, the official decode and NMS.

    Expected values are the official ones. Tolerances: pycocotools vs YOLOv5's own statistics differ by
    +0.0014 mAP@0.5:0.95, +0.0038 mAP@0.5, +0.0018 P, +0.0097 R on these very detections (see
    trtnet.metrics); preprocessing mistakes (square batches, a single resize) move mAP@0.5:0.95 by 0.011
    and mAP@0.5 by 0.02, so they fail here. About half a minute on 2 cores.
    """
    from trtnet import val

    golden = json.loads(shared("golden", "golden_yolov5n_coco128_val.json").read_text(encoding="utf-8"))
    settings = golden["settings"]
    out = tmp_path / "val.json"
    with pytest.warns(DatasetWarning):
        assert val.main([str(shared("weights", "yolov5n.pt")), "--device", "cpu", "--data", str(shared("coco128")),
                         "--imgsz", str(settings["imgsz"]), "--batch", str(settings["batch_size"]),
                         "--conf", str(settings["conf_thres"]), "--max-det", str(settings["max_det"]),
                         "--json", str(out)]) == 0
    report, expected = json.loads(out.read_text()), golden["metrics"]
    assert (report["images"], report["instances"]) == (golden["images_seen"], golden["labels_seen"])
    m = report["metrics"]
    assert m["mAP@0.5:0.95"] == pytest.approx(expected["mAP@0.5:0.95"], abs=0.004)
    assert m["mAP@0.5"] == pytest.approx(expected["mAP@0.5"], abs=0.008)
    assert m["P"] == pytest.approx(expected["P"], abs=0.006)
    assert m["R"] == pytest.approx(expected["R"], abs=0.015)
