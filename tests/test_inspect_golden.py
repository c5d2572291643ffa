"""`trtnet inspect` (weights or engines, --compare with tolerances) and `trtnet golden` (official code → .npz)."""

from __future__ import annotations

import hashlib
import sys

import numpy as np
import pytest

from tests.conftest import requires_tensorrt, requires_torch, shared
from trtnet import golden, inspection, networks
from trtnet.errors import TrtnetError


def inspect(capsys, *argv):
    code = inspection.cli(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------------------------------ tolerances


def test_tolerance_rtol_atol_are_elementwise_like_allclose():
    ref = np.array([0.0, 100.0], dtype=np.float32)
    ours = np.array([0.05, 100.5], dtype=np.float32)
    assert inspection.Tolerance(rtol=0.01, atol=0.1).passes(ours, ref, rel=0.005)
    assert not inspection.Tolerance(rtol=0.01).passes(ours, ref, rel=0.005)  # 0.05 off a 0 fails any rtol
    assert not inspection.Tolerance(atol=0.1).passes(ours, ref, rel=0.005)


def test_tolerance_max_rel_bounds_the_error_over_the_golden_range():
    ref = np.array([0.0, 100.0], dtype=np.float32)
    row = inspection.compare_one("raw_0", "raw_0", np.array([0.05, 100.5], dtype=np.float32), ref,
                                 inspection.Tolerance(max_rel=1e-2))
    assert row.passed and row.rel == pytest.approx(0.005) and row.max_abs == pytest.approx(0.5)
    assert not inspection.compare_one("raw_0", "raw_0", ref + 2, ref, inspection.Tolerance(max_rel=1e-2)).passed


def test_shapes_that_differ_are_reported_not_raised():
    row = inspection.compare_one("layer_00", "model.0", np.zeros((1, 16, 8, 8)), np.zeros((1, 32, 8, 8)),
                                 inspection.Tolerance(max_rel=1e-3))
    assert row.shapes == ([1, 32, 8, 8], [1, 16, 8, 8]) and not row.passed
    assert "FAIL shape: golden [1, 32, 8, 8], network [1, 16, 8, 8]" in inspection.comparison_table([row])


# ------------------------------------------------------------------------------------------ --compare end to end


@requires_tensorrt
def test_compare_passes_every_output_and_layer_of_the_official_golden(yolov5n_weights, capsys):
    golden_path = shared("golden", "golden_yolov5n_bus320.npz")
    code, out, err = inspect(capsys, "yolov5n", "--weights-dir", str(yolov5n_weights), "--quiet", "--compare",
                             str(golden_path), "--max-rel", "1e-3")
    assert code == 0, err
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith(("raw_", "layer_"))}
    assert sorted(lines) == [f"layer_{i:02d}" for i in range(24)] + ["raw_0", "raw_1", "raw_2"]
    assert all(line.rstrip().endswith("pass") for line in lines.values())
    assert "27 of 27 passed" in out


@requires_tensorrt
def test_compare_beyond_tolerance_fails_with_exit_1(yolov5n_weights, capsys):
    golden_path = shared("golden", "golden_yolov5n_bus320.npz")
    code, out, _ = inspect(capsys, "yolov5n", "--weights-dir", str(yolov5n_weights), "--quiet", "--compare",
                           str(golden_path), "--rtol", "1e-6", "--atol", "1e-6")
    assert code == 1
    assert "FAILED: raw_0, raw_1, raw_2" in out  # the fp32 CPU run is ~2e-5 off the golden's raw maps


@requires_tensorrt
def test_golden_of_another_model_is_a_shape_error_naming_both_shapes(yolov5n_weights, capsys):
    code, _, err = inspect(capsys, "yolov5n", "--weights-dir", str(yolov5n_weights), "--quiet", "--compare",
                           str(shared("golden", "golden_yolov5s_syn_bus320.npz")))
    assert code == 2
    assert "does not fit this network: layer_00 is [1, 32, 160, 160] in the golden but model.0 is " \
           "[1, 16, 160, 160] here" in err
    assert "Traceback" not in err


@requires_tensorrt
def test_bad_tolerance_and_bad_golden_are_clear_errors(yolov5n_weights, tmp_path, capsys):
    code, _, err = inspect(capsys, "yolov5n", "--weights-dir", str(yolov5n_weights), "--compare", "g.npz",
                           "--atol", "-1")
    assert code == 2 and "--atol -1.0: must be a non-negative number" in err
    (tmp_path / "g.npz").write_bytes(b"not a zip")
    code, _, err = inspect(capsys, "yolov5n", "--weights-dir", str(yolov5n_weights), "--compare",
                           str(tmp_path / "g.npz"))
    assert code == 2 and "not a readable .npz golden" in err


# ------------------------------------------------------------------------------------------ engines


@pytest.fixture(scope="module")
def engine(yolov5n_weights):
    from trtnet import build

    assert build.cli(["yolov5n", "--weights-dir", str(yolov5n_weights), "--imgsz", "64"]) == 0
    return yolov5n_weights / "yolov5n.fp32.64.engine"


@requires_tensorrt
def test_engine_that_cannot_load_here_shows_its_sidecar_facts(engine, monkeypatch, capsys):
    import trtnet.cuda_rt

    monkeypatch.setattr(trtnet.cuda_rt, "gpu_unavailable_reason", lambda: "no NVIDIA driver (test)")
    code, out, err = inspect(capsys, str(engine))
    assert code == 0, err
    assert f"cannot deserialize {engine} here (no NVIDIA driver (test))" in out
    checkpoint_sha = hashlib.sha256(shared("weights", "yolov5n.pt").read_bytes()).hexdigest()
    assert f"checkpoint    yolov5n.pt (sha256 {checkpoint_sha})" in out
    assert "family        yolov5" in out and "input         images 64x64, batch 1..1..1" in out
    assert "built at      20" in out


@requires_tensorrt
def test_engine_that_loads_prints_the_engine_inspectors_layers(engine, monkeypatch, capsys):
    """No GPU here: TensorRT's deserializer is stood in for; what is checked is that each layer's line comes from
    the engine inspector, asked in the one-line format."""
    import trtnet.cuda_rt
    from trtnet import compat

    asked = []

    class Inspector:
        def get_layer_information(self, index, fmt):
            asked.append(fmt)
            return f"conv layer {index}"

    class Engine:
        num_layers = 2

        def create_engine_inspector(self):
            return Inspector()

    monkeypatch.setattr(trtnet.cuda_rt, "gpu_unavailable_reason", lambda: None)
    monkeypatch.setattr(compat, "deserialize", lambda plan, logger=None: (None, Engine()))
    code, out, err = inspect(capsys, str(engine))
    assert code == 0, err
    assert "2 engine layers (TensorRT's engine inspector):" in out
    assert "   0  conv layer 0\n   1  conv layer 1" in out
    assert asked == [compat.trt().LayerInformationFormat.ONELINE] * 2


@requires_tensorrt
def test_engine_with_compare_asks_for_the_weights(engine, capsys):
    code, _, err = inspect(capsys, str(engine), "--compare", "g.npz")
    assert code == 2 and "pass the weights" in err


# ------------------------------------------------------------------------------------------ trtnet golden


def test_write_golden_refuses_what_is_not_an_image(tmp_path):
    with pytest.raises(TrtnetError, match="uint8 \\[3,H,W\\]"):
        golden.write_golden(tmp_path / "g.npz", np.zeros((3, 8, 8), np.float32), {})


@requires_torch
def test_golden_writes_the_documented_npz_with_any_model(tmp_path, monkeypatch, capsys):
    """The family's official code faked: the file format, the letterboxed image and the default name."""
    seen = {}

    def fake_official(meta, torch, checkpoint_path, image_chw, official_src):
        seen.update(family=meta["family"], shape=image_chw.shape, src=official_src)
        return {"raw_0": np.ones((1, 255, 40, 40), np.float64), "layer_00": np.zeros((1, 16, 160, 160), np.float16)}

    monkeypatch.setattr(networks, "official_golden", fake_official)
    monkeypatch.chdir(tmp_path)
    argv = [str(shared("weights", "yolov5n.pt")), "--image", str(shared("images", "bus.jpg")), "--yolov5-src", "src"]
    assert golden.cli(argv) == 0, capsys.readouterr().err
    assert seen == {"family": "yolov5", "shape": (3, 320, 320), "src": "src"}
    written = np.load(tmp_path / "golden_yolov5n_bus320.npz")
    assert sorted(written.files) == ["image", "layer_00", "raw_0"]
    assert written["raw_0"].dtype == np.float32 and written["raw_0"].shape == (1, 255, 40, 40)
    official = np.load(shared("golden", "golden_yolov5n_bus320.npz"))["image"]  # the official letterbox's
    assert written["image"].dtype == np.uint8 and np.array_equal(written["image"], official)
    monkeypatch.setenv("YOLOV5_SRC", "from-env")
    assert golden.cli([*argv[:3], "-o", str(tmp_path / "two.npz")]) == 0
    assert seen["src"] == "from-env" and (tmp_path / "two.npz").is_file()


@requires_torch
def test_golden_without_the_official_yolov5_code_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "models", None)  # nothing named `models` importable
    monkeypatch.delenv("YOLOV5_SRC", raising=False)
    code = golden.cli([str(shared("weights", "yolov5n.pt")), "--image", str(shared("images", "bus.jpg")),
                       "-o", str(tmp_path / "g.npz")])
    err = capsys.readouterr().err
    assert code == 2 and "official YOLOv5 code is not importable" in err and "--yolov5-src DIR" in err
    assert not (tmp_path / "g.npz").exists()


@requires_torch
def test_golden_without_ultralytics_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ultralytics", None)
    code = golden.cli([str(shared("weights", "synthetic", "yolo11n_nc3_syn.pt")), "--image",
                       str(shared("images", "bus.jpg")), "-o", str(tmp_path / "g.npz")])
    err = capsys.readouterr().err
    assert code == 2 and "pip install ultralytics" in err
    assert golden.cli([str(shared("weights", "yolov5n.pt")), "--image", "x.jpg", "--imgsz", "100"]) == 2
    assert "--imgsz 100: must be a multiple of 32" in capsys.readouterr().err


@requires_torch
def test_golden_from_the_ultralytics_package_matches_the_shared_golden(tmp_path, capsys):
    """Skipped unless `ultralytics` is importable (not a trtnet dependency; e.g. pip install --target DIR, then
    PYTHONPATH=DIR)."""
    pytest.importorskip("ultralytics.nn.tasks")
    out = tmp_path / "g.npz"
    argv = [str(shared("weights", "synthetic", "yolo11n_nc3_syn.pt")), "--image", str(shared("images", "bus.jpg")),
            "--imgsz", "320", "-o", str(out)]
    assert golden.cli(argv) == 0, capsys.readouterr().err
    ours, official = np.load(out), np.load(shared("golden", "golden_yolo11n_nc3_syn_bus320.npz"))
    assert np.array_equal(ours["image"], official["image"])
    span = float(official["raw"].max() - official["raw"].min())  # torch versions and threads differ: ~5e-5
    np.testing.assert_allclose(ours["raw"], official["raw"], rtol=0, atol=1e-4 * span)
    for key in [k for k in official.files if k.startswith(("head_", "layer_"))]:
        span = float(official[key].max() - official[key].min())
        np.testing.assert_allclose(ours[key], official[key], rtol=0, atol=1e-4 * span, err_msg=key)


def test_engine_meta_types_the_new_provenance_fields():
    from trtnet.engine_meta import EngineMeta

    base = {"family": "yolov5", "imgsz": [64, 64], "batch": {"min": 1, "opt": 1, "max": 1},
            "input": {"name": "images"}, "outputs": ["raw_0"], "tensorrt": {"flavour": "tensorrt", "version": "10"}}
    old = EngineMeta.from_dict(base)  # an engine built before these fields loads as it did
    assert old.built_at is None and "built_at" not in old.to_dict()
    new = EngineMeta.from_dict({**base, "built_at": "2026-12-02T05:00:00+00:00", "checkpoint_sha256": "ab" * 32})
    assert new.to_dict()["built_at"] == "2026-12-02T05:00:00+00:00" and new.checkpoint_sha256 == "ab" * 32
    with pytest.raises(TrtnetError, match="field 'weights_sha256' must be a string"):
        EngineMeta.from_dict({**base, "weights_sha256": 5})


def _tiny_yolov5_like(torch):
    """A stand-in for a YOLOv5 DetectionModel: `.model` layers, the last a Detect with 1x1 convs `m`."""
    nn = torch.nn

    class Detect(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = nn.ModuleList([nn.Conv2d(4, 6, 1)])

        def forward(self, x):
            raw = self.m[0](x)
            return raw.flatten(2).transpose(1, 2).sigmoid(), [raw]

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU(), Detect())

        def forward(self, x):
            return self.model(x)

    torch.manual_seed(0)
    return Model()


@requires_torch
def test_yolov5_official_golden_collects_raw_maps_layers_and_nms(tmp_path, monkeypatch):
    """The family's hook logic with the official code stood in for (no yolov5 repo here): raw_i is each Detect
    conv's output, layer_XX each top-level layer's, decoded the model's first output, det the official NMS's."""
    import types

    import torch

    from trtnet.networks import yolov5

    model = _tiny_yolov5_like(torch)
    monkeypatch.setitem(sys.modules, "models", types.ModuleType("models"))
    monkeypatch.setitem(sys.modules, "models.yolo", types.ModuleType("models.yolo"))
    utils_general = types.ModuleType("utils.general")
    utils_general.non_max_suppression = lambda pred, conf, iou, max_det=300: [torch.full((1, 6), float(max_det))]
    monkeypatch.setitem(sys.modules, "utils", types.ModuleType("utils"))
    monkeypatch.setitem(sys.modules, "utils.general", utils_general)
    monkeypatch.setattr(torch, "load", lambda *a, **k: {"model": model, "ema": None})
    image = np.random.default_rng(0).integers(0, 255, (3, 16, 16), dtype=np.uint8)
    out = yolov5.official_golden(torch, tmp_path / "x.pt", image, None)
    assert list(out) == ["raw_0", "decoded", "det", "layer_00", "layer_01"]
    x = torch.from_numpy(image[None].astype(np.float32) / 255)
    with torch.no_grad():
        first = model.model[0](x)
        raw = model.model[2].m[0](model.model[1](first))
    np.testing.assert_array_equal(out["layer_00"], first.numpy())
    np.testing.assert_array_equal(out["raw_0"], raw.numpy())
    assert out["decoded"].shape == (1, 64, 6) and out["det"].tolist() == [[1000.0] * 6]
