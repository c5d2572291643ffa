"""The engine sidecar's typed record: old sidecars load, wrong types give one clear error naming file and field."""

from __future__ import annotations

import json

import pytest

from trtnet.engine_files import load_metadata
from trtnet.engine_meta import EngineMeta, PostprocessSettings
from trtnet.errors import TrtnetError

# A sidecar as trtnet.build wrote it before EngineMeta existed (keys and values as in a real yolov5n engine).
OLD_SIDECAR = {
    "trtnet_version": "0.1.0", "family": "yolov5", "weights": "yolov5n.wts", "precision": "fp16", "tf32": False,
    "imgsz": [320, 320], "min_imgsz": None, "max_imgsz": None, "batch": {"min": 1, "opt": 2, "max": 4},
    "input": {"name": "images", "dtype": "float32"}, "outputs": ["raw_0", "raw_1", "raw_2"],
    "tensorrt": {"flavour": "tensorrt-rtx", "version": "1.7.1.116"}, "target_cc": [], "device": None,
    "layers": 200, "engine_bytes": 5_000_000, "build_seconds": 12.5,
    "postprocess": {"conf": 0.25, "iou": 0.45, "max_det": 1000, "multi_label": False, "agnostic": False,
                    "mode": "kernels"},
    "nc": 2, "names": ["person", "bicycle"], "strides": [8, 16, 32],
    "anchors": [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]],
}
OLD_CLASSIFIER = {
    "family": "resnet", "weights": "resnet18.wts", "imgsz": [224, 224], "batch": {"min": 1, "opt": 1, "max": 1},
    "input": {"name": "input", "dtype": "float32"}, "outputs": ["logits"],
    "tensorrt": {"flavour": "tensorrt", "version": "8.5.3.1"}, "num_classes": 1000, "softmax": False,
}


def write(tmp_path, meta) -> object:
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"x")
    engine.with_suffix(".json").write_text(json.dumps(meta))
    return engine


def test_an_old_detector_sidecar_loads_typed(tmp_path):
    meta = load_metadata(write(tmp_path, OLD_SIDECAR))
    assert meta.imgsz == (320, 320) and (meta.batch.min, meta.batch.opt, meta.batch.max) == (1, 2, 4)
    assert meta.input.name == "images" and meta.outputs == ("raw_0", "raw_1", "raw_2")
    assert meta.tensorrt.flavour == "tensorrt-rtx" and meta.engine_bytes == 5_000_000
    assert meta.postprocess == PostprocessSettings(mode="kernels")
    assert meta.class_names == ["person", "bicycle"] and meta.strides == (8, 16, 32)
    assert meta.anchors[2] == (116, 90, 156, 198, 373, 326)


def test_an_old_classifier_sidecar_loads_typed(tmp_path):
    meta = load_metadata(write(tmp_path, OLD_CLASSIFIER))
    assert meta.num_classes == 1000 and meta.softmax is False and meta.postprocess is None
    assert meta.class_names == [str(i) for i in range(1000)]


@pytest.mark.parametrize("sidecar", [OLD_SIDECAR, OLD_CLASSIFIER])
def test_the_json_keys_survive_a_round_trip(sidecar):
    again = json.loads(json.dumps(EngineMeta.from_dict(sidecar).to_dict()))
    assert {k: again.get(k) for k in sidecar} == sidecar


def test_unknown_keys_are_kept():
    meta = EngineMeta.from_dict({**OLD_SIDECAR, "future_field": {"a": 1}})
    assert meta.extra == {"future_field": {"a": 1}} and meta.to_dict()["future_field"] == {"a": 1}


def test_head_kind_is_typed_and_optional():
    assert EngineMeta.from_dict(OLD_SIDECAR).head is None and "head" not in EngineMeta.from_dict(OLD_SIDECAR).to_dict()
    meta = EngineMeta.from_dict({**OLD_SIDECAR, "head": "anchor_free"})
    assert meta.head == "anchor_free" and meta.extra == {} and meta.to_dict()["head"] == "anchor_free"
    with pytest.raises(TrtnetError, match="field 'head' must be a string"):
        EngineMeta.from_dict({**OLD_SIDECAR, "head": 1})


@pytest.mark.parametrize(("change", "field", "says"), [
    ({"tensorrt": 5}, "tensorrt", "must be an object with flavour, version"),
    ({"tensorrt": {"flavour": "tensorrt"}}, "tensorrt", "lacks version"),
    ({"batch": "x"}, "batch", "must be an object with min, opt, max"),
    ({"batch": {"min": 4, "opt": 2, "max": 8}}, "batch", "min <= opt <= max"),
    ({"imgsz": [-3]}, "imgsz", "must be at least 1"),
    ({"imgsz": [320]}, "imgsz", r"must be \[height, width\]"),
    ({"anchors": [[10.0, float("nan")]]}, "anchors", "must be a finite number"),
    ({"build_seconds": float("inf")}, "build_seconds", "must be a finite number"),
    ({"imgsz": "640"}, "imgsz", "must be a list"),
    ({"outputs": "raw_0"}, "outputs", "must be a list"),
    ({"outputs": [1, 2]}, "outputs", "must be a string"),
    ({"nc": "eighty"}, "nc", "must be an integer"),
    ({"engine_bytes": True}, "engine_bytes", "must be an integer"),
    ({"postprocess": {"mode": "kernels", "conf": 2.0}}, "postprocess", "NMS settings"),
    ({"anchors": [["a"]]}, "anchors", "must be a number"),
])
def test_wrong_types_give_one_error_naming_the_file_and_the_field(tmp_path, change, field, says):
    engine = write(tmp_path, {**OLD_SIDECAR, **change})
    with pytest.raises(TrtnetError, match=rf"m\.json: field '{field}'.*{says}") as error:
        load_metadata(engine)
    assert "\n" not in str(error.value)


def test_not_an_object_is_refused(tmp_path):
    with pytest.raises(TrtnetError, match="m.json: not a JSON object"):
        load_metadata(write(tmp_path, [1, 2]))
