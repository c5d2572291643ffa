"""INT8 calibration on a real GPU (`--calib-device gpu`): the fp32 calibration engine's tensors against the
CPU reference executor's, and an INT8 build that calibrates on the GPU. Run on the GPU machine:

    tests/gpu/py39.sh -m pytest -q -m gpu tests/gpu/test_int8_gpu.py -ra
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

if __package__ in (None, ""):  # run as a script: make `tests` and `trtnet` importable from the repo
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.conftest import requires_gpu, shared  # noqa: E402

pytestmark = requires_gpu()
IMGSZ = 320
COUNT = 4


@pytest.fixture(scope="module")
def yolov5n():
    from trtnet.checkpoint import read_checkpoint

    ckpt = read_checkpoint(shared("weights", "yolov5n.pt"))
    return ckpt.state_dict, ckpt.meta


def gpu_calibration(yolov5n):
    from trtnet.quant.calibrate import calibrate

    return calibrate(*yolov5n, shared("coco128", "images"), method="max", count=COUNT, imgsz=IMGSZ, device="gpu",
                     batch=2).calibration


def test_gpu_calibration_covers_every_quantizable_tensor(yolov5n):
    calibration = gpu_calibration(yolov5n)
    assert len(calibration.amax) == 50 and calibration.images.count == COUNT
    assert all(np.isfinite(v) and v > 0 for v in calibration.amax.values())
    assert 0.9 < calibration.amax["images"] <= 1.0  # letterboxed pixels in [0, 1]


def test_gpu_calibration_matches_the_cpu_executor(yolov5n):
    pytest.importorskip("torch", reason="the CPU reference executor needs torch")
    from trtnet.quant.calibrate import calibrate

    gpu = gpu_calibration(yolov5n)
    cpu = calibrate(*yolov5n, shared("coco128", "images"), method="max", count=COUNT, imgsz=IMGSZ,
                    device="cpu").calibration
    assert gpu.images == cpu.images and set(gpu.amax) == set(cpu.amax)
    worst = max(abs(gpu.amax[k] - cpu.amax[k]) / cpu.amax[k] for k in cpu.amax)
    assert worst < 2e-3, f"largest relative amax difference {worst:.2e}"  # fp32 engine (TF32 off) vs executor


def test_int8_build_calibrating_on_the_gpu_runs(tmp_path):
    from trtnet import build, gen_wts
    from trtnet.engine import Engine

    assert gen_wts.cli([str(shared("weights", "yolov5n.pt")), "-o", str(tmp_path / "yolov5n.wts")]) == 0
    assert build.cli([str(tmp_path / "yolov5n.wts"), "--int8", "--calib", str(shared("coco128", "images")),
                      "--calib-images", "8", "--imgsz", str(IMGSZ), "--calib-device", "gpu",
                      "--weights-dir", str(tmp_path)]) == 0
    meta = json.loads((tmp_path / "yolov5n.int8.engine.json").read_text())
    assert meta["int8"]["mode"] == "explicit" and meta["int8"]["images"] == 8
    calibration = json.loads((tmp_path / "yolov5n.int8.calib.json").read_text())
    assert calibration["extra"]["device"] == "gpu"
    with Engine(tmp_path / "yolov5n.int8.engine") as engine:
        out = engine.infer(np.full((1, 3, IMGSZ, IMGSZ), 0.5, np.float32))
    assert all(np.isfinite(v).all() for v in out.values())


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-ra", "-m", "gpu"]))
