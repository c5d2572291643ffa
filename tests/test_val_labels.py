"""trtnet.val with label files as users write them: empty ones (background images) count, class ids the
model does not have are refused before anything is sized from them. A fake predictor stands in for the
engine, so no GPU is needed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.test_datasets import write_image, write_labels
from trtnet import val
from trtnet.datasets import load_detection_dataset
from trtnet.engine_meta import EngineMeta

pytest.importorskip("pycocotools")


def labelled_and_background(root: Path, background_labels: str = "") -> Path:
    """a.jpg (100x100) with one class-0 box at pixels 10..50; b.jpg (120x80) whose label file is empty."""
    write_image(root / "images" / "a.jpg", 100, 100)
    write_labels(root / "labels" / "a.txt", "0 0.3 0.3 0.4 0.4\n")
    write_image(root / "images" / "b.jpg", 120, 80)
    write_labels(root / "labels" / "b.txt", background_labels)
    return root


def predict(images: list, shape: tuple) -> list:
    """The true box on a.jpg at 0.9, a false positive on the background b.jpg at 0.95 (told apart by size)."""
    def on(image):
        score = 0.9 if image.shape[:2] == (100, 100) else 0.95
        return np.array([[10.0, 10.0, 50.0, 50.0]]), np.array([score]), np.array([0])
    return [on(image) for image in images]


def test_false_positive_on_an_empty_label_file_image_halves_the_map(tmp_path):
    # Sorted by score: the FP on the background (0.95), then the TP (0.9): precision made monotone is 1/2
    # at every recall threshold, so AP = 0.5 at every IoU (as in test_metrics' background case). Leaving
    # the background image out would make it 1.0.
    dataset = load_detection_dataset(labelled_and_background(tmp_path))
    metrics = val.evaluate_detection(dataset, predict, imgsz=128, batch=2, stride=32)
    assert metrics.images == 2 and metrics.instances == 1
    assert (metrics.map50, metrics.map50_95) == pytest.approx((0.5, 0.5))


class FakeEngine:
    def __init__(self, nc: int):
        self.meta = EngineMeta.from_dict({  # the typed sidecar the real Engine has, not a dict
            "family": "yolov5", "nc": nc, "imgsz": [128, 128], "batch": {"min": 1, "opt": 1, "max": 2},
            "input": {"name": "images", "dtype": "float32"}, "outputs": ["raw_0"],
            "tensorrt": {"flavour": "tensorrt-rtx", "version": "1.7"}}, "fake.engine.json")
        self.path = Path("fake.engine")
        self.size_range = None  # static: val letterboxes every batch to --imgsz

    def check_size(self, shape: tuple) -> None:
        pass


@pytest.mark.parametrize("class_id", ["3", "1000000000"])
def test_val_refuses_class_ids_the_engine_does_not_have(tmp_path, monkeypatch, capsys, class_id):
    root = labelled_and_background(tmp_path, background_labels="")
    write_labels(root / "labels" / "a.txt", f"0 0.3 0.3 0.4 0.4\n{class_id} 0.5 0.5 0.2 0.2\n")
    calls = []
    monkeypatch.setattr(val, "engine_predictor", lambda *a: (lambda *b: calls.append(b), FakeEngine(nc=3)))
    status = val.cli(["fake.engine", "--data", str(root), "--imgsz", "128"])
    err = capsys.readouterr().err
    assert status == 2
    assert f"a.txt:2: class id {class_id} is not 0 to 2, the model's classes" in err
    assert not calls  # refused while reading the labels, before the first batch


def test_val_scores_an_engine_with_empty_label_files(tmp_path, monkeypatch, capsys):
    root = labelled_and_background(tmp_path)
    monkeypatch.setattr(val, "engine_predictor", lambda *a: (predict, FakeEngine(nc=3)))
    out_json = tmp_path / "metrics.json"
    assert val.cli(["fake.engine", "--data", str(root), "--imgsz", "128", "--json", str(out_json)]) == 0
    results = json.loads(out_json.read_text())
    assert results["images"] == 2 and results["metrics"]["mAP@0.5"] == pytest.approx(0.5)


@pytest.mark.parametrize("batch", ["0", "-2"])
def test_val_refuses_a_batch_below_one_before_loading_the_engine(tmp_path, monkeypatch, capsys, batch):
    loaded = []
    monkeypatch.setattr(val, "engine_predictor", lambda *a: loaded.append(a) or (predict, FakeEngine(nc=3)))
    status = val.cli(["fake.engine", "--data", str(labelled_and_background(tmp_path)), "--batch", batch])
    assert status == 2 and f"error: --batch {batch}: must be at least 1" in capsys.readouterr().err
    assert not loaded
