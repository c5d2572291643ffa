"""Ultralytics-style detect options and result objects, with a fake detector (no GPU, no network)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import requires_tensorrt, shared
from trtnet import detect
from trtnet.api import Detections

NAMES = ["person", "bicycle", "car"]
H, W = 100, 200
# Three detections on a 200x100 image, best first: a person, a car, a weak person.
BOXES = np.array([[20, 10, 60, 90], [100, 40, 180, 80], [150, 0, 200, 20]], np.float32)
SCORES = np.array([0.9, 0.6, 0.3], np.float32)
CLASSES = np.array([0, 2, 0], np.int64)
# Inside the person box, just below its top edge: where its label goes (no room above it at y 10).
LABEL_AREA = (slice(14, 20), slice(25, 40))


def picture() -> np.ndarray:
    image = np.zeros((H, W, 3), np.uint8)
    image[:, :, 1] = np.arange(W, dtype=np.uint8)[None, :]  # a gradient, so crops show where they come from
    return image


def detections(path: str | None = "street.jpg") -> Detections:
    return Detections(BOXES.copy(), SCORES.copy(), CLASSES.copy(), NAMES, (H, W), path, picture())


class FakeDetector:
    """What detect's runners use of a detector: `detect_loaded`, `stream`, `max_batch`."""

    max_batch = 4

    def detect_loaded(self, images, paths=None):
        paths = list(paths) if paths is not None else [None] * len(images)
        return [Detections(BOXES.copy(), SCORES.copy(), CLASSES.copy(), NAMES, image.shape[:2], path, image)
                for image, path in zip(images, paths)]

    def stream(self, images, batch=1, depth=2):
        for image in images:
            yield from self.detect_loaded([image])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


@pytest.fixture
def image_file(tmp_path) -> Path:
    path = tmp_path / "street.png"
    cv2.imwrite(str(path), picture())
    return path


def run_cli(monkeypatch, *argv) -> int:
    monkeypatch.setattr(detect, "open_detector", lambda args: FakeDetector())
    return detect.main(["fake.engine", *(str(a) for a in argv)])


# ------------------------------------------------------------------------------------------ result objects


def test_names_is_the_models_dict_and_labels_name_each_detection():
    r = detections()
    assert r.names == {0: "person", 1: "bicycle", 2: "car"}
    assert r.labels == ["person", "car", "person"]


def test_results_slice_and_filter_like_arrays():
    r = detections()
    strong = r[r.scores > 0.5]
    assert isinstance(strong, Detections) and len(strong) == 2 and strong.labels == ["person", "car"]
    np.testing.assert_array_equal(strong.boxes, BOXES[:2])
    assert r[:1].labels == ["person"] and len(r[1:]) == 2
    one = r[1]
    assert len(one) == 1 and one.labels == ["car"] and one.boxes.shape == (1, 4)
    assert r[-1].scores.tolist() == pytest.approx([0.3])
    assert r[np.array([2, 0])].scores.tolist() == pytest.approx([0.3, 0.9])
    assert r.of_classes([2]).labels == ["car"] and len(r.of_classes([1])) == 0
    assert strong.image is r.image and strong.shape == r.shape and strong.path == r.path
    with pytest.raises(IndexError):
        r[3]


def test_to_json_round_trips_the_boxes():
    record = json.loads(detections().to_json())
    assert record["path"] == "street.jpg" and record["shape"] == [H, W]
    assert [d["name"] for d in record["detections"]] == ["person", "car", "person"]
    assert record["detections"][1] == {"xyxy": [100.0, 40.0, 180.0, 80.0], "conf": 0.6, "cls": 2, "name": "car"}


def test_save_txt_writes_normalised_yolo_lines(tmp_path):
    path = detections().save_txt(tmp_path / "labels" / "street.txt")
    # person: centre (40, 50), 40x80 on 200x100 → 0.2 0.5 0.2 0.8
    assert path.read_text().splitlines() == ["0 0.2 0.5 0.2 0.8", "2 0.7 0.6 0.4 0.4", "0 0.875 0.1 0.25 0.2"]
    with_conf = detections().save_txt(tmp_path / "c.txt", save_conf=True).read_text().splitlines()
    assert with_conf[1] == "2 0.7 0.6 0.4 0.4 0.6"
    assert detections()[:0].save_txt(tmp_path / "empty.txt").read_text() == ""


def test_crops_grow_the_box_like_ultralytics_and_stay_in_the_image():
    r = detections()
    crop = r.crop(0)  # 40x80 box → 40*1.02+10 = 50.8 wide, 80*1.02+10 = 91.6 high, centred on (40, 50)
    assert crop.shape == (int(50 + 45.8) - int(50 - 45.8), int(40 + 25.4) - int(40 - 25.4), 3)
    assert crop[0, 0, 1] == int(40 - 25.4)  # the gradient tells the left edge
    corner = r.crop(2)  # at the top-right corner: clipped to the image
    assert corner.shape[0] <= 20 + 10 and corner[0, -1, 1] == W - 1
    assert [c.shape for c in r.crops()] == [r.crop(i).shape for i in range(3)]


def test_draw_hides_labels_or_scores_and_takes_a_line_width():
    r = detections()[:1]
    plain = picture()

    def changed(canvas):
        return int((canvas != plain).any(axis=2).sum())

    full, names_only, boxes_only = r.draw(), r.draw(conf=False), r.draw(labels=False)
    assert changed(boxes_only) < changed(names_only) < changed(full)
    assert (boxes_only[LABEL_AREA] == plain[LABEL_AREA]).all() and (full[LABEL_AREA] != plain[LABEL_AREA]).any()
    thin, thick = r.draw(labels=False, line_width=1), r.draw(labels=False, line_width=5)
    assert (thin[50, 22] == plain[50, 22]).all() and (thick[50, 22] != plain[50, 22]).any()  # 2 px inside


# ------------------------------------------------------------------------------------------ CLI options


def test_run_folders_increment_unless_exist_ok(tmp_path, image_file, monkeypatch):
    for _ in range(3):
        assert run_cli(monkeypatch, image_file, "--project", tmp_path / "runs") == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["exp", "exp2", "exp3"]
    assert run_cli(monkeypatch, image_file, "--project", tmp_path / "runs", "--name", "exp2", "--exist-ok") == 0
    assert run_cli(monkeypatch, image_file, "--project", tmp_path / "runs", "--name", "mine") == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["exp", "exp2", "exp3", "mine"]
    assert (tmp_path / "runs" / "mine" / "detections.json").is_file()
    assert (tmp_path / "runs" / "mine" / "street.png").is_file()


def test_increment_path_numbers_from_two(tmp_path):
    assert detect.increment_path(tmp_path / "exp") == tmp_path / "exp"
    (tmp_path / "exp").mkdir()
    assert detect.increment_path(tmp_path / "exp") == tmp_path / "exp2"
    assert detect.increment_path(tmp_path / "exp", exist_ok=True) == tmp_path / "exp"


def test_classes_keeps_only_those_ids(tmp_path, image_file, monkeypatch, capsys):
    assert run_cli(monkeypatch, image_file, "--out", tmp_path / "out", "--classes", "2") == 0
    records = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert [d["name"] for d in records[0]["detections"]] == ["car"]
    assert "person" not in capsys.readouterr().out


def test_save_txt_crop_and_csv(tmp_path, image_file, monkeypatch):
    out = tmp_path / "out"
    assert run_cli(monkeypatch, image_file, "--out", out, "--save-txt", "--save-conf", "--save-crop",
                   "--save-csv") == 0
    lines = (out / "labels" / "street.txt").read_text().splitlines()
    assert lines == ["0 0.2 0.5 0.2 0.8 0.9", "2 0.7 0.6 0.4 0.4 0.6", "0 0.875 0.1 0.25 0.2 0.3"]
    assert sorted(str(p.relative_to(out / "crops")) for p in (out / "crops").rglob("*.jpg")) == [
        "car/street.jpg", "person/street.jpg", "person/street2.jpg"]
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["name"], r["conf"], r["x1"], r["y2"]) for r in rows] == [
        ("person", "0.90000", "20.00", "90.00"), ("car", "0.60000", "100.00", "80.00"),
        ("person", "0.30000", "150.00", "20.00")]
    assert rows[0]["path"] == str(image_file) and rows[0]["frame"] == ""


def test_nothing_extra_is_written_by_default(tmp_path, image_file, monkeypatch):
    assert run_cli(monkeypatch, image_file, "--out", tmp_path / "out") == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["detections.json", "street.png"]


def test_hide_labels_and_line_width_reach_the_annotated_image(tmp_path, image_file, monkeypatch):
    assert run_cli(monkeypatch, image_file, "--out", tmp_path / "a", "--hide-labels", "--line-width", "1") == 0
    assert run_cli(monkeypatch, image_file, "--out", tmp_path / "b") == 0
    plain = picture()
    bare, labelled = (cv2.imread(str(tmp_path / d / "street.png")) for d in "ab")
    assert (bare[LABEL_AREA] == plain[LABEL_AREA]).all()  # no label on the person box
    assert (labelled[LABEL_AREA] != plain[LABEL_AREA]).any()
    assert run_cli(monkeypatch, image_file, "--out", tmp_path / "c", "--hide-conf") == 0
    names_only = cv2.imread(str(tmp_path / "c" / "street.png"))
    assert (names_only != labelled).any() and (names_only[LABEL_AREA] != plain[LABEL_AREA]).any()


@pytest.mark.parametrize(("option", "value"), [("--vid-stride", "0"), ("--line-width", "0"), ("--batch", "0")])
def test_numbers_below_one_are_refused(option, value, image_file, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(monkeypatch, image_file, option, value)
    assert exit_info.value.code == 2 and f"{option} must be at least 1" in capsys.readouterr().err


def write_video(path: Path, count: int) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (64, 48))
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write mp4v video")
    for i in range(count):
        writer.write(np.full((48, 64, 3), 40 * i, np.uint8))
    writer.release()
    return path


def test_vid_stride_uses_every_nth_frame(tmp_path):
    video = write_video(tmp_path / "clip.mp4", 5)
    levels = [int(f.mean()) for f in detect.frames(cv2.VideoCapture(str(video)), stride=2)]
    assert len(levels) == 3 and levels == sorted(levels) and abs(levels[1] - 80) < 8 and abs(levels[2] - 160) < 8
    outputs = detect.Outputs(tmp_path / "out", options=detect.SaveOptions(save_txt=True))
    detect.run_stream(FakeDetector(), detect.Source("video", str(video)), outputs, batch=1, vid_stride=2)
    assert [r["frame"] for r in outputs.records] == [0, 2, 4]
    assert sorted(p.name for p in (tmp_path / "out" / "labels").iterdir()) == [
        "clip_0.txt", "clip_2.txt", "clip_4.txt"]


@requires_tensorrt
def test_device_cpu_runs_the_weights_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--device", "cpu", str(shared("weights", "yolov5n.pt")), str(shared("images", "bus.jpg")),
            "--out", str(out), "--classes", "5", "--save-txt"]
    assert detect.cli(argv) == 0
    printed = capsys.readouterr().out
    assert "ran on the CPU" in printed and "bus  1" in printed.replace("     ", " ").replace("   ", " ")
    records = json.loads((out / "detections.json").read_text())
    assert [d["name"] for d in records[0]["detections"]] == ["bus"]
    cls, cx, cy, w, h = (float(v) for v in (out / "labels" / "bus.txt").read_text().split())
    # the official bus box (48.8, 236.8, 810, 772.0) on 810x1080
    assert cls == 5 and cx == pytest.approx(429.4 / 810, abs=1e-3) and h == pytest.approx(535.2 / 1080, abs=1e-3)


@pytest.mark.parametrize("requested, files, used", [
    ("auto", 128, "cpu"), ("auto", detect.GPU_DECODE_MIN_FILES - 1, "cpu"),
    ("auto", detect.GPU_DECODE_MIN_FILES, "auto"), ("gpu", 1, "gpu"), ("cpu", 10**6, "cpu"),
])
def test_auto_decodes_small_folders_with_opencv(requested, files, used):
    """The GPU decoder's ~2 s start pays off near 5000 files (runs L, N, O): below, `auto` is OpenCV's; asked for
    by name, either decoder is used whatever the count."""
    assert detect.decode_mode(requested, files) == used
