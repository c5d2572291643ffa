"""Quantization sensitivity: layer groups, the error measure, the ranking and the `auto` rule (with a fake
sensitivity function), the report file, and `python -m trtnet.quant sensitivity` on 2 images."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import requires_tensorrt, requires_torch, shared
from trtnet.errors import TrtnetError
from trtnet.quant import sensitivity as s


@pytest.mark.parametrize("layer, group", [
    ("model.2.m.0.cv1.conv", "model.2"), ("model.17.cv3.conv", "model.17"), ("raw_0", "raw_0"),
    ("layer3.1.conv2", "layer3.1"), ("conv1", "conv1"), ("layer1.0.downsample.0", "layer1.0"),
])
def test_layer_groups_are_numbered_modules_and_lone_layers(layer, group):
    assert s.layer_group(layer) == group


def test_groups_keep_network_order():
    groups = s.layer_groups(["model.0.conv", "model.2.cv1.conv", "model.2.m.0.cv1.conv", "raw_0"])
    assert groups == {"model.0": ["model.0.conv"], "model.2": ["model.2.cv1.conv", "model.2.m.0.cv1.conv"],
                      "raw_0": ["raw_0"]}


def test_output_error_is_mean_absolute_error_over_the_reference_range():
    ref = {"a": np.array([0.0, 10.0]), "b": np.array([1.0, 3.0])}
    out = {"a": np.array([1.0, 10.0]), "b": np.array([1.0, 3.0])}
    # a: mean |diff| 0.5 over range 10 → 0.05; b: 0 → mean 0.025
    assert s.output_error(out, ref) == pytest.approx(0.025)


def fake_errors():
    return {"model.0": 0.9, "model.1": 0.01, "model.2": 0.012, "model.3": 0.011, "raw_0": 0.2, "raw_1": 0.05,
            "model.4": 0.013, "model.5": 0.05}


def test_measure_ranks_groups_by_the_error_keeping_them_removes():
    """The all-INT8 error first, then each group kept alone: its entry is what keeping it takes off (never
    below zero)."""
    groups = {g: ["x"] * (i + 1) for i, g in enumerate(fake_errors())}
    asked = []

    def error_of(kept):
        asked.append(tuple(kept))
        return 1.0 - fake_errors()[kept[0]] if kept else 1.0

    report = s.measure(groups, error_of, images=2, heads=("raw_0",))
    assert asked == [(), *((g,) for g in groups)]
    assert [g.group for g in report.groups][:4] == ["model.0", "raw_0", "model.5", "raw_1"]
    assert report.groups[0].error == pytest.approx(0.9) and report.full_error == 1.0
    assert report.groups[0].layers == 1 and report.images == 2 and report.heads == ("raw_0",)
    worse = s.measure({"a": ["x"]}, lambda kept: 2.0 if kept else 1.0, images=1)
    assert worse.groups[0].error == 0.0


def test_auto_keeps_the_groups_removing_half_the_error_at_most_four_and_the_heads():
    report = s.rank(fake_errors(), {}, 2, full_error=1.0, heads=("raw_0", "raw_1"))
    # model.0 removes 0.9 of 1.0: past half at once; then the heads (raw_0 not listed twice in the group order)
    assert s.auto_keep(report) == ("model.0", "raw_0", "raw_1")
    spread = s.rank({f"g{i}": 0.1 for i in range(10)}, {}, 1, full_error=1.0)
    assert s.auto_keep(spread) == ("g0", "g1", "g2", "g3")  # 0.4 < 0.5 yet capped at AUTO_MAX_GROUPS
    halves = s.rank({"a": 0.3, "b": 0.25, "c": 0.2}, {}, 1, full_error=1.0)
    assert s.auto_keep(halves) == ("a", "b")  # 0.3 < 0.5, 0.55 ≥ 0.5
    nothing = s.rank({"a": 0.0}, {}, 1, full_error=1.0)
    assert s.auto_keep(nothing) == ()  # keeping it removes nothing: everything quantized


def test_report_round_trip_and_table(tmp_path):
    report = s.rank(fake_errors(), {"model.0": 1}, 2, "abc", full_error=1.0, heads=("raw_0",))
    report.write(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["auto_keep"] == ["model.0", "raw_0"] and data["groups"][0]["group"] == "model.0"
    assert data["measure"] == s.MEASURE and data["heads"] == ["raw_0"] and data["full_error"] == 1.0
    assert s.read_report(tmp_path / "r.json", "abc") == report
    lines = report.table().splitlines()
    assert lines[1].split()[0] == "model.0" and "keep fp16" in lines[1] and "keep fp16" not in lines[3]


@pytest.mark.parametrize("content, message", [
    ("{", "not a readable sensitivity report"),
    ('{"format": "other"}', "not a readable sensitivity report"),
    ('{"format": "trtnet-int8-sensitivity", "measure": "error-removed-when-kept", "images": 1, "groups": '
     '[{"group": "a"}]}', "not a readable"),
    ('{"format": "trtnet-int8-sensitivity", "images": 1, "groups": []}', "older trtnet.*sensitivity again"),
])
def test_broken_reports_are_refused(tmp_path, content, message):
    (tmp_path / "r.json").write_text(content)
    with pytest.raises(TrtnetError, match=message):
        s.read_report(tmp_path / "r.json")


def test_report_of_another_network_is_refused(tmp_path):
    s.rank(fake_errors(), {}, 2, "abc", full_error=1.0).write(tmp_path / "r.json")
    with pytest.raises(TrtnetError, match="another network"):
        s.read_report(tmp_path / "r.json", "def")


@pytest.mark.slow
@requires_tensorrt
@requires_torch
def test_sensitivity_command_on_two_images(tmp_path, capsys):
    from trtnet import gen_wts
    from trtnet.quant.__main__ import cli

    assert gen_wts.cli([str(shared("weights", "yolov5n.pt")), "-o", str(tmp_path / "yolov5n.wts")]) == 0
    capsys.readouterr()
    code = cli(["sensitivity", str(tmp_path / "yolov5n.wts"), "--calib", str(shared("coco128", "images")),
                "--images", "2", "--calib-images", "2", "--imgsz", "128"])
    out = capsys.readouterr().out
    assert code == 0, out
    data = json.loads((tmp_path / "yolov5n.sensitivity.json").read_text())
    groups = {g["group"]: g for g in data["groups"]}
    # yolov5n.yaml: model.0 .. model.23 but the Upsample (11, 15) and Concat (12, 16, 19, 22) modules hold
    # convolutions; Detect's three are the heads raw_0 .. raw_2
    no_conv = (11, 12, 15, 16, 19, 22)
    assert set(groups) == {f"model.{i}" for i in range(24) if i not in no_conv} | {"raw_0", "raw_1", "raw_2"}
    errors = [g["error"] for g in data["groups"]]
    assert errors == sorted(errors, reverse=True) and all(e >= 0 for e in errors) and errors[0] > 0
    assert errors[0] <= data["full_error"] < 0.2  # INT8 moves the outputs by a fraction of their range
    assert data["heads"] == ["raw_0", "raw_1", "raw_2"]  # Detect's convolutions: no convolution reads them
    assert data["images"] == 2
    assert out.splitlines()[1].split()[0] == data["groups"][0]["group"]
