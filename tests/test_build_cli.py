"""`python -m trtnet.build` end to end with TensorRT-RTX, and its bad inputs: clear error, exit != 0, no engine."""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timedelta, timezone

import pytest

from tests.conftest import requires_tensorrt, shared
from trtnet import build as build_cmd
from trtnet import gen_wts
from trtnet.errors import TrtnetError

pytestmark = requires_tensorrt


def engines(directory):
    return sorted(p.name for p in directory.rglob("*.engine"))


def run_build(capsys, *args):
    code = build_cmd.cli(list(args))
    return code, capsys.readouterr().err


def test_build_writes_engine_and_metadata(weights_dir, capsys):
    code, err = run_build(capsys, "yolov5n", "--weights-dir", str(weights_dir), "--imgsz", "320",
                          "--fp16", "--min-batch", "1", "--opt-batch", "2", "--max-batch", "4")
    assert code == 0, err
    engine = weights_dir / "yolov5n.fp16.320.b1-4.engine"
    meta = json.loads((weights_dir / "yolov5n.fp16.320.b1-4.engine.json").read_text(encoding="utf-8"))
    assert engine.stat().st_size == meta["engine_bytes"] > 1_000_000
    assert meta["family"] == "yolov5" and meta["precision"] == "fp16" and meta["imgsz"] == [320, 320]
    assert meta["batch"] == {"min": 1, "opt": 2, "max": 4}
    assert meta["strides"] == [8, 16, 32] and meta["nc"] == 80 and meta["names"][0] == "person"
    assert meta["outputs"] == ["raw_0", "raw_1", "raw_2"]
    assert meta["postprocess"]["mode"] == "none"
    assert meta["tensorrt"]["flavour"] in ("tensorrt", "tensorrt-rtx")
    assert meta["weights_sha256"] == hashlib.sha256((weights_dir / "yolov5n.wts").read_bytes()).hexdigest()
    assert meta["checkpoint"] == "yolov5n.pt"
    assert meta["checkpoint_sha256"] == hashlib.sha256(shared("weights", "yolov5n.pt").read_bytes()).hexdigest()
    built_at = datetime.fromisoformat(meta["built_at"])
    assert built_at.utcoffset() == timedelta(0)
    assert abs((datetime.now(timezone.utc) - built_at).total_seconds()) < 600


def test_builds_of_other_sizes_sit_side_by_side_and_a_name_then_needs_qualifying(weights_dir, capsys):
    from trtnet.engine_files import resolve_engine
    from trtnet.errors import TrtnetError

    for size in ("64", "96"):
        code, err = run_build(capsys, "yolov5n", "--weights-dir", str(weights_dir), "--imgsz", size)
        assert code == 0, err
    assert engines(weights_dir) == ["yolov5n.fp32.64.engine", "yolov5n.fp32.96.engine"]
    with pytest.raises(TrtnetError, match="names 2 engines"):
        resolve_engine("yolov5n", weights_dir)
    assert resolve_engine("yolov5n.fp32.96", weights_dir).name == "yolov5n.fp32.96.engine"


def test_verbose_shows_tensorrts_own_log(weights_dir, capsys):
    quiet_code, quiet = run_build(capsys, "yolov5n", "--weights-dir", str(weights_dir), "--imgsz", "64")
    code, verbose = run_build(capsys, "yolov5n", "--weights-dir", str(weights_dir), "--imgsz", "64", "--batch", "2",
                              "--verbose")
    assert quiet_code == code == 0, verbose
    assert verbose.count("[TensorRT]") > quiet.count("[TensorRT]") + 10, verbose[-2000:]
    assert (weights_dir / "yolov5n.fp32.64.b2.engine").is_file()


@pytest.mark.parametrize(("size", "lo", "hi", "batch", "expected"), [
    (640, None, None, (1, 1, 1), "m.fp16.640.engine"),
    (640, None, None, (32, 32, 32), "m.fp16.640.b32.engine"),
    (640, 128, 672, (1, 1, 1), "m.fp16.128-672.engine"),
    (640, None, 672, (1, 8, 32), "m.fp16.640-672.b1-32.engine"),
    ((640, 480), None, None, (1, 1, 1), "m.fp16.640x480.engine"),
    ((640, 480), 128, 672, (1, 1, 1), "m.fp16.128-672.engine"),
])
def test_default_engine_name(size, lo, hi, batch, expected):
    from trtnet.network import BatchProfile

    assert build_cmd.default_engine_name("m", "fp16", size, lo, hi, BatchProfile(*batch)) == expected


@pytest.mark.parametrize(("text", "expected"), [("640", 640), ("640,480", (640, 480)), ("640x480", (640, 480)),
                                              ("320,320", 320), ("-32", -32)])
def test_input_size_reads_a_side_or_height_and_width(text, expected):
    assert build_cmd.input_size(text) == expected


@pytest.mark.parametrize("text", ["big", "640,480,3", "", "640,"])
def test_input_size_refuses_what_is_not_a_size(text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="is not a size"):
        build_cmd.input_size(text)


def test_static_non_square_input(weights_dir, capsys):
    """`--imgsz H,W`: a static engine of that exact shape (the official rect input of a portrait image), named so
    that it sits beside the square one; a side that is not a multiple of the stride is refused before building."""
    code = build_cmd.cli(["yolov5n", "--weights-dir", str(weights_dir), "--imgsz", "96,64"])
    log = "".join(capsys.readouterr())
    assert code == 0 and "input [1, 3, 96, 64]" in log, log
    meta = json.loads((weights_dir / "yolov5n.fp32.96x64.engine.json").read_text(encoding="utf-8"))
    assert meta["imgsz"] == [96, 64]
    assert meta.get("min_imgsz") is None and meta.get("max_imgsz") is None
    code, err = run_build(capsys, "yolov5n", "--weights-dir", str(weights_dir), "--imgsz", "96,16")
    assert code == 2 and "--imgsz 16: must be at least 32 pixels" in err, err
    code, err = run_build(capsys, "yolov5n", "--weights-dir", str(weights_dir), "--imgsz", "96,80")
    assert code != 0 and "multiple of the model's stride 32" in err, err
    assert engines(weights_dir) == ["yolov5n.fp32.96x64.engine"]


def test_a_failed_dynamic_myelin_build_says_what_builds_instead():
    """Run H: TensorRT 8.5 without a working cuBLASLt fails a dynamic YOLO11 build in Myelin; the static one builds."""
    errors = ["10: [optimizer.cpp::computeCosts::3728] Error Code 10: Internal Error (Could not find any "
              "implementation for node {ForeignNode[model.10.split0.indices...model.10.m.0.attn.heads]}.)",
              "2: [builder.cpp::buildSerializedNetwork::751] Error Code 2: Internal Error (Assertion engine != "
              "nullptr failed. )"]
    dynamic = build_cmd.build_failure(errors, dynamic=True, verbose=False)
    assert dynamic.startswith("TensorRT could not build the engine: 10: [optimizer") and "\n" not in dynamic
    assert "build a static engine (--batch N, --imgsz SIZE or H,W)" in dynamic
    assert dynamic.endswith("(run with --verbose for TensorRT's full log)")
    static = build_cmd.build_failure(errors, dynamic=False, verbose=True)
    assert "static" not in static and "--verbose" not in static
    nothing = build_cmd.build_failure([], dynamic=True, verbose=True)
    assert nothing == "TensorRT could not build the engine: no reason given"


def test_wrong_json_for_wts(weights_dir, capsys):
    """The .json of another model (here: ResNet-18's) beside yolov5n.wts."""
    meta = {"family": "resnet", "arch": "resnet18", "num_classes": 1000}
    (weights_dir / "yolov5n.json").write_text(json.dumps(meta))
    code, err = run_build(capsys, "yolov5n", "--weights-dir", str(weights_dir), "--imgsz", "320")
    assert code != 0
    assert "error:" in err and ("missing tensor conv1.weight" in err or "does not" in err), err
    assert engines(weights_dir) == []


def test_missing_tensor(weights_dir, capsys):
    meta = json.loads((weights_dir / "yolov5n.json").read_text(encoding="utf-8"))
    lines = (weights_dir / "yolov5n.wts").read_text(encoding="utf-8").splitlines()
    kept = [ln for ln in lines[1:] if not ln.startswith("model.4.cv1.conv.weight ")]
    (weights_dir / "yolov5n.wts").write_text(f"{len(kept)}\n" + "\n".join(kept) + "\n")
    meta.get("shapes", {}).pop("model.4.cv1.conv.weight", None)
    meta.pop("partner")  # edited by hand, like a sidecar of an older trtnet: no sha256 to check
    (weights_dir / "yolov5n.json").write_text(json.dumps(meta))
    code, err = run_build(capsys, "yolov5n", "--weights-dir", str(weights_dir), "--imgsz", "320")
    assert code != 0 and "model.4.cv1.conv.weight" in err and "missing" in err, err
    assert engines(weights_dir) == []


def test_class_count_mismatch(weights_dir, capsys):
    meta = json.loads((weights_dir / "yolov5n.json").read_text(encoding="utf-8"))
    meta["yaml"]["nc"] = 3
    meta["nc"] = 3
    meta["names"] = ["a", "b", "c"]
    (weights_dir / "yolov5n.json").write_text(json.dumps(meta))
    code, err = run_build(capsys, "yolov5n", "--weights-dir", str(weights_dir), "--imgsz", "320")
    # Detect's convs then expect 3 anchors * (3 + 5) = 24 output channels; the weights have 255.
    assert code != 0 and "model.24.m.0.weight" in err and "[24, 64, 1, 1]" in err and "[255, 64, 1, 1]" in err, err
    assert engines(weights_dir) == []


def test_names_disagree_with_nc(weights_dir, capsys):
    meta = json.loads((weights_dir / "yolov5n.json").read_text(encoding="utf-8"))
    meta["names"] = meta["names"][:10]
    (weights_dir / "yolov5n.json").write_text(json.dumps(meta))
    code, err = run_build(capsys, "yolov5n", "--weights-dir", str(weights_dir), "--imgsz", "320")
    assert code != 0 and "class count mismatch" in err, err


def test_unknown_architecture(weights_dir, capsys):
    code, err = run_build(capsys, str(weights_dir / "yolov5n.wts"), "--arch", "yolov9q")
    assert code != 0 and "unknown architecture 'yolov9q'" in err, err
    assert engines(weights_dir) == []


def test_unknown_weights_name(tmp_path, capsys):
    code, err = run_build(capsys, "yolov5q", "--weights-dir", str(tmp_path))
    assert code != 0 and "yolov5q" in err and "gen_wts" in err, err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write to read-only folders")
def test_unwritable_output_dir_as_user(weights_dir, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    code, err = run_build(capsys, "yolov5n", "--weights-dir", str(weights_dir), "-o", str(locked / "x.engine"))
    assert code != 0 and "cannot write" in err, err


def test_unwritable_output_dir(weights_dir, tmp_path, capsys):
    """An output 'folder' that is a file cannot be created, whoever runs the test."""
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    code, err = run_build(capsys, "yolov5n", "--weights-dir", str(weights_dir), "--imgsz", "320",
                          "-o", str(blocker / "yolov5n.engine"))
    assert code != 0 and "cannot write" in err, err
    assert engines(tmp_path) == []


def test_postprocess_plugin_refused_where_unsupported(weights_dir, capsys):
    from trtnet import compat

    if compat.flavour().python_plugins:
        pytest.skip(f"{compat.flavour()} hosts Python plugins")
    code, err = run_build(capsys, "yolov5n", "--weights-dir", str(weights_dir), "--imgsz", "320",
                          "--postprocess", "plugin")
    assert code != 0 and "--postprocess kernels" in err, err
    assert engines(weights_dir) == []


def test_resnet_rejects_postprocess(tmp_path, capsys):
    assert gen_wts.cli([str(shared("weights", "synthetic", "resnet18_syn.pth")), "-o", str(tmp_path)]) == 0
    code, err = run_build(capsys, "resnet18_syn", "--weights-dir", str(tmp_path), "--postprocess", "kernels")
    assert code != 0 and "--postprocess applies to detectors only (yolov5" in err, err
    assert engines(tmp_path) == []


def test_a_build_tensorrt_refuses_points_to_verbose(weights_dir, monkeypatch, capsys):
    from trtnet import compat

    monkeypatch.setattr(compat, "build_serialized", lambda builder, network, config: None)
    code, err = run_build(capsys, "yolov5n", "--weights-dir", str(weights_dir), "--imgsz", "64")
    assert code == 2 and "TensorRT could not build the engine" in err and "run with --verbose" in err
    code, err = run_build(capsys, "yolov5n", "--weights-dir", str(weights_dir), "--imgsz", "64", "--verbose")
    assert code == 2 and "TensorRT could not build the engine" in err and "run with --verbose" not in err
    assert engines(weights_dir) == []


def test_opt_level_reaches_the_builder_and_the_engine_metadata(weights_dir, monkeypatch, capsys):
    from trtnet import compat

    seen = []
    real = compat.build_serialized
    monkeypatch.setattr(compat, "build_serialized", lambda b, n, config: seen.append(config) or real(b, n, config))
    code, err = run_build(capsys, "yolov5n", "--weights-dir", str(weights_dir), "--imgsz", "64", "--opt-level", "1")
    assert code == 0, err
    if hasattr(seen[0], "builder_optimization_level"):  # TensorRT >= 8.6 and TensorRT-RTX
        assert seen[0].builder_optimization_level == 1
    (meta,) = [p for p in weights_dir.iterdir() if p.name.endswith(".engine.json")]
    assert json.loads(meta.read_text())["opt_level"] == 1
    with pytest.raises(SystemExit) as exit_:
        build_cmd.parser().parse_args(["yolov5n", "--opt-level", "6"])
    assert exit_.value.code == 2 and "--opt-level" in capsys.readouterr().err


@pytest.mark.parametrize("name, version, supported", [("tensorrt", "8.5.3.1", False), ("tensorrt", "8.6.1", True),
                                                     ("tensorrt", "10.13.0", True), ("tensorrt-rtx", "1.7.1", True)])
def test_opt_level_exists_from_tensorrt_8_6_and_on_rtx(monkeypatch, name, version, supported):
    from trtnet import compat

    monkeypatch.setattr(compat, "flavour", lambda: compat.Flavour(name, version, int(version.split(".")[0])))
    assert compat.opt_level_supported() is supported


def test_opt_level_on_tensorrt_8_5_is_refused_clearly(monkeypatch):
    from trtnet import compat

    monkeypatch.setattr(compat, "opt_level_supported", lambda: False)
    builder = compat.trt().Builder(compat.Logger())
    with pytest.raises(TrtnetError, match="--opt-level: .* has no builder optimization level"):
        compat.builder_config(builder, compat.BuildOptions(opt_level=1))
