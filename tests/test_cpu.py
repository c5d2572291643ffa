"""The CPU path (`trtnet.cpu`): the network run with NumPy against the official goldens, and the
`CpuDetector` on bus.jpg against the official detect.py boxes. No torch."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import requires_tensorrt, requires_torch, shared
from trtnet.errors import TrtnetError

pytestmark = requires_tensorrt

RANGE_TOL = 1e-4  # of each output's range, as tests/test_networks_golden.py argues (BN folding, sum order)
HEAD_GOLDENS = {
    "yolov5n": (("yolov5n.pt",), "golden_yolov5n_bus320.npz"),
    "yolov5s_v50_syn": (("synthetic", "yolov5s_v50_syn.pt"), "golden_yolov5s_v50_syn_bus320.npz"),  # Focus, SPP
    "yolov5n6_syn": (("synthetic", "yolov5n6_syn.pt"), "golden_yolov5n6_syn_bus320.npz"),  # P6: four heads
}


def box_iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def assert_matches_official_detect(result) -> None:
    """Each official detection of bus.jpg at 640 has its own match: same class, IoU > 0.9, conf within
    0.01 (fp32 on both sides: in fact within 1e-4 and 0.05 px)."""
    official = json.loads(shared("golden", "golden_yolov5n_detect640.json").read_text(encoding="utf-8"))
    expected = official["images"]["bus.jpg"]["detections"]
    assert len(result) == len(expected) == 4
    assert sorted(result.labels) == ["bus", "person", "person", "person"]
    for got, want in zip(range(len(result)), expected):  # both in NMS order (descending score)
        assert int(result.classes[got]) == want["cls"]
        assert box_iou(result.boxes[got], want["xyxy_unrounded"]) > 0.9
        assert abs(float(result.scores[got]) - want["conf"]) < 0.01
        np.testing.assert_allclose(result.boxes[got], want["xyxy_unrounded"], atol=0.05)
        assert abs(float(result.scores[got]) - want["conf"]) < 1e-4


@pytest.mark.parametrize("model", list(HEAD_GOLDENS))
def test_numpy_network_matches_the_official_raw_heads(model):
    from trtnet.cpu import define_cpu_network, run_numpy

    parts, golden_name = HEAD_GOLDENS[model]
    golden = np.load(shared("golden", golden_name))
    net = define_cpu_network(shared("weights", *parts), imgsz=320)
    out = run_numpy(net.network, {net.input_name: golden["image"].astype(np.float32) / 255})
    heads = sorted(k for k in golden.files if k.startswith("raw_"))
    assert list(out) == heads
    for k in heads:
        span = float(golden[k].max() - golden[k].min())
        err = float(np.abs(out[k] - golden[k]).max())
        assert err <= RANGE_TOL * span, f"{model} {k}: max error {err:.3g} of range {span:.3g}"


def test_cpu_detector_matches_official_detect_on_bus():
    from trtnet.cpu import CpuDetector

    with CpuDetector(shared("weights", "yolov5n.pt")) as detector:
        result = detector.detect(shared("images", "bus.jpg"))[0]
    assert result.shape == (1080, 810) and detector.imgsz == (640, 640)
    assert result.names[0] == "person" and result.names[5] == "bus" and len(result.names) == 80
    assert_matches_official_detect(result)


def test_cpu_detector_applies_its_settings():
    from trtnet.cpu import CpuDetector

    detector = CpuDetector(shared("weights", "yolov5n.pt"), conf=0.7, max_det=1)
    result = detector.detect(shared("images", "bus.jpg"))[0]
    assert len(result) == 1 and result.labels == ["person"] and result.scores[0] > 0.8


def test_a_layer_type_the_numpy_path_lacks_is_named(monkeypatch):
    from trtnet import cpu

    net = cpu.define_cpu_network(shared("weights", "yolov5n.pt"), imgsz=64)
    monkeypatch.delitem(cpu._OPS, "RESIZE")
    with pytest.raises(TrtnetError, match=r"layer '.*' \(RESIZE\): the NumPy CPU path does not run this layer"):
        cpu.run_numpy(net.network, {net.input_name: np.zeros((1, 3, 64, 64), np.float32)})


def test_weights_are_found_by_name_and_missing_ones_named(tmp_path):
    from trtnet.cpu import read_weights

    (tmp_path / "yolov5n.pt").write_bytes(shared("weights", "yolov5n.pt").read_bytes())
    tensors, meta, source = read_weights("yolov5n", tmp_path)
    assert source == str(tmp_path / "yolov5n.pt") and meta["family"] == "yolov5" and meta["nc"] == 80
    assert "model.0.conv.weight" in tensors
    with pytest.raises(TrtnetError, match="no weights found for yolov5x"):
        read_weights("yolov5x", tmp_path)
    with pytest.raises(TrtnetError, match="no such checkpoint"):
        read_weights(tmp_path / "other.pt", tmp_path)


def matched_golden_detect640(result, name: str) -> float:
    """The share of an Ultralytics 640 golden's boxes (golden_<name>_detect640.json: `predict(imgsz=640)`,
    rect letterbox) that `result` has too: same class, IoU >= 0.9, score within 0.02."""
    golden = json.loads(shared("golden", f"golden_{name}_detect640.json").read_text(encoding="utf-8"))
    assert golden["settings"]["rect"] and result.shape == tuple(golden["orig_shape_hw"])
    found = 0
    for box, score, cls in zip(golden["boxes_xyxy"], golden["scores"], golden["classes"]):
        same = [i for i in range(len(result)) if int(result.classes[i]) == cls
                and abs(float(result.scores[i]) - score) <= 0.02]
        found += any(box_iou(result.boxes[i], box) >= 0.9 for i in same)
    return found / len(golden["boxes_xyxy"])


@requires_torch  # YOLO11's chunk/attention layers run on the torch executor
def test_cpu_detector_rect_reproduces_the_ultralytics_640_predict():
    from trtnet.cpu import CpuDetector

    with CpuDetector(shared("weights", "synthetic", "yolo11n_nc3_syn.pt"), max_det=300, rect=True) as detector:
        assert detector.input_hw(np.zeros((1080, 810, 3), np.uint8)) == (640, 480)
        result = detector.detect(shared("images", "bus.jpg"))[0]
    assert len(result) == 70  # the golden's n_det
    assert matched_golden_detect640(result, "yolo11n_nc3_syn") == 1.0



def test_numpy_path_imports_without_torch_and_refuses_what_is_not_a_network():
    import subprocess
    import sys

    code = "import sys; sys.modules['torch'] = None; import trtnet.cpu; print('imported')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "imported", done.stderr[-2000:]
    from trtnet.cpu import run_numpy

    with pytest.raises(TypeError, match="expected a TensorRT INetworkDefinition, got dict"):
        run_numpy({"num_layers": 0}, {})
