"""`python -m trtnet.val WEIGHTS --device cpu [--int8 …]`: the mAP an engine built from these weights will have,
measured on the CPU (the reference executor runs the very network definition trtnet.build builds; with --int8
its Q/DQ network, so an INT8 engine's accuracy is known before a GPU builds it). The fp32 run against the
official golden is tests/test_metrics.py's."""

from __future__ import annotations

import json

import pytest

from tests.conftest import requires_tensorrt, requires_torch, shared
from trtnet import val
from trtnet.errors import TrtnetError

pytest.importorskip("pycocotools")


def run_val(*args: str, out=None) -> dict:
    argv = [*args, *(("--json", str(out)) if out else ())]
    assert val.main(argv) == 0
    return json.loads(out.read_text())["metrics"] if out else {}


@pytest.mark.slow
@requires_torch
@requires_tensorrt
def test_int8_on_the_cpu_quantizes_and_stays_near_fp32(tmp_path, capsys):
    """yolov5n at 320 on coco128: INT8 (ranges calibrated on 8 images, written to --calib-cache) against fp32.
    A wrong scale or a missing Q/DQ pair would leave the numbers equal or far apart."""
    weights, data = str(shared("weights", "yolov5n.pt")), str(shared("coco128"))
    common = ("--device", "cpu", "--data", data, "--imgsz", "320")
    calibration = tmp_path / "yolov5n.calib.json"
    with pytest.warns(UserWarning):
        fp32 = run_val(weights, *common, out=tmp_path / "fp32.json")
        int8 = run_val(weights, *common, "--int8", "--calib", str(shared("coco128", "images")), "--calib-images", "8",
                       "--calib-method", "percentile", "--calib-cache", str(calibration), out=tmp_path / "int8.json")
    assert calibration.exists() and "calibrated on 8 images" in capsys.readouterr().out
    assert int8["mAP@0.5:0.95"] != fp32["mAP@0.5:0.95"]
    assert abs(int8["mAP@0.5:0.95"] - fp32["mAP@0.5:0.95"]) < 0.05, (fp32, int8)


@pytest.mark.parametrize("args, message", [
    (("--int8",), "--int8 applies to --device cpu"),
    (("--calib", "x"), "--calib applies to INT8: add --int8"),
    (("--device", "cpu", "--task", "classify"), "--device cpu validates detectors"),
])
def test_contradicting_val_options_are_refused(args, message, tmp_path):
    with pytest.raises(TrtnetError, match=message):
        val.main([str(tmp_path / "yolov5n.wts"), "--data", str(tmp_path), *args])


@requires_tensorrt
def test_the_implicit_calibrator_is_refused_on_the_cpu(tmp_path):
    with pytest.raises(TrtnetError, match="implicit is TensorRT's calibrator"):
        val.main([str(shared("weights", "yolov5n.pt")), "--device", "cpu", "--data", str(tmp_path), "--int8",
                  "--int8-mode", "implicit", "--calib-cache", str(tmp_path / "x.cache")])
