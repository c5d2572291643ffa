"""YOLOv8 / YOLO11 through the commands, on the CPU: gen_wts → build (TensorRT-RTX) → inspect --compare, and
the family's registry entries (sidecar fields, summary, the official-model hook for bench)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from tests.conftest import requires_tensorrt, requires_torch, shared
from trtnet import build as build_cmd  # imported before capsys: BuildProgress binds sys.stderr at import
from trtnet import gen_wts, networks
from trtnet.weights import load_weights

MODELS = ["yolov8s_syn", "yolo11s_syn", "yolo11n_nc3_syn"]
GOLDEN_NAMES = {"yolov8s_syn": 80, "yolo11s_syn": 80, "yolo11n_nc3_syn": 3}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Each synthetic checkpoint converted by the CLI to .wts + .json and to .safetensors."""
    out = tmp_path_factory.mktemp("v8weights")
    for model in MODELS:
        checkpoint = str(shared("weights", "synthetic", f"{model}.pt"))
        assert gen_wts.cli([checkpoint, "-o", str(out)]) == 0
        assert gen_wts.cli([checkpoint, "-o", str(out), "--format", "safetensors"]) == 0
    return out


@pytest.mark.parametrize("model", MODELS)
def test_gen_wts_writes_both_formats_with_the_checkpoint_metadata(converted, model):
    tensors = json.loads(shared("golden", f"golden_{model}_tensors.json").read_text(encoding="utf-8"))
    wts, st = load_weights(converted / f"{model}.wts"), load_weights(converted / f"{model}.safetensors")
    assert wts.meta["family"] == st.meta["family"] == "yolov8"
    assert wts.meta["nc"] == GOLDEN_NAMES[model] == len(wts.meta["names"])
    assert wts.meta["strides"] == [8, 16, 32]
    assert list(wts.tensors) == list(st.tensors)
    for name in wts.tensors:
        np.testing.assert_array_equal(wts.tensors[name], st.tensors[name], err_msg=name)
    stored = [k for k, _, _ in tensors["state_dict"] if not k.endswith("num_batches_tracked")]
    assert [k for k in wts.tensors if not k.endswith("num_batches_tracked")] == stored


def test_gen_wts_summary_names_the_generation(converted, capsys):
    assert gen_wts.cli([str(shared("weights", "synthetic", "yolo11n_nc3_syn.pt")), "-o", str(converted)]) == 0
    assert "yolov8 (YOLO11n): nc=3, strides [8, 16, 32], reg_max 16" in capsys.readouterr().out
    assert gen_wts.cli([str(shared("weights", "synthetic", "yolov8s_syn.pt")), "-o", str(converted)]) == 0
    assert "yolov8 (YOLOv8s): nc=80" in capsys.readouterr().out


def build(capsys, *args):
    code = build_cmd.cli(list(args))
    return code, capsys.readouterr().err


@requires_tensorrt
@pytest.mark.parametrize(("model", "fmt", "precision", "mode"), [
    ("yolo11n_nc3_syn", "wts", "--fp32", "kernels"),
    ("yolo11n_nc3_syn", "safetensors", "--fp16", "none"),
    ("yolov8s_syn", "safetensors", "--fp16", "kernels"),
    ("yolo11s_syn", "wts", "--fp32", "none"),
])
def test_build_writes_an_anchor_free_engine_and_its_sidecar(converted, tmp_path, capsys, model, fmt, precision,
                                                             mode):
    code, err = build(capsys, str(converted / f"{model}.{fmt}"), "--imgsz", "320", precision, "--postprocess", mode,
                      "-o", str(tmp_path))
    assert code == 0, err
    (sidecar,) = tmp_path.glob("*.json")
    meta = json.loads(sidecar.read_text(encoding="utf-8"))
    assert sidecar.with_suffix("").stat().st_size == meta["engine_bytes"] > 1_000_000  # X.engine.json → X.engine
    assert meta["family"] == "yolov8" and meta["outputs"] == ["output0"] and meta["imgsz"] == [320, 320]
    assert meta["head"] == "anchor_free" and meta["strides"] == [8, 16, 32]
    assert meta["nc"] == GOLDEN_NAMES[model] == len(meta["names"])
    assert meta["postprocess"]["mode"] == mode and meta["precision"] == precision[2:]
    if model == "yolo11n_nc3_syn":
        assert meta["names"] == ["a", "b", "c"]
    kwargs = networks.for_meta(meta).postprocess_kwargs(meta)
    assert kwargs == {"head": "anchor_free", "nc": meta["nc"]}


@requires_tensorrt
def test_build_dynamic_batch_and_size(converted, tmp_path, capsys):
    code, err = build(capsys, str(converted / "yolo11n_nc3_syn.safetensors"), "--fp16", "--imgsz", "320",
                      "--min-batch", "1", "--opt-batch", "2", "--max-batch", "4", "--min-imgsz", "256",
                      "--max-imgsz", "416", "-o", str(tmp_path))
    assert code == 0, err
    (sidecar,) = tmp_path.glob("*.json")
    meta = json.loads(sidecar.read_text(encoding="utf-8"))
    assert meta["batch"] == {"min": 1, "opt": 2, "max": 4} and (meta["min_imgsz"], meta["max_imgsz"]) == (256, 416)
    assert meta["strides"] == [8, 16, 32]


@requires_tensorrt
def test_build_refuses_a_size_off_the_stride_and_plugin_where_unsupported(converted, tmp_path, capsys):
    from trtnet import compat

    code, err = build(capsys, str(converted / "yolo11n_nc3_syn.wts"), "--imgsz", "300", "-o", str(tmp_path))
    assert code == 2 and "multiple of the model's stride 32" in err
    if not compat.flavour().python_plugins:
        code, err = build(capsys, str(converted / "yolo11n_nc3_syn.wts"), "--imgsz", "320", "--postprocess",
                          "plugin", "-o", str(tmp_path))
        assert code == 2 and "--postprocess kernels" in err
    assert not list(tmp_path.glob("*.engine"))


@requires_tensorrt
def test_inspect_compare_matches_the_official_golden(converted, capsys):
    from trtnet.inspection import cli

    golden = shared("golden", "golden_yolo11n_nc3_syn_bus320.npz")
    assert cli(["yolo11n_nc3_syn", "--weights-dir", str(converted), "--compare", str(golden), "--quiet"]) == 0
    out = capsys.readouterr().out
    rows = {m[0]: (m[1], float(m[2]), float(m[4])) for m in
            re.findall(r"^(\w+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+pass$", out, re.M)}
    keys = set(np.load(golden).files) - {"image", "det", "anchors", "strides"}
    assert set(rows) == keys  # every output, head and layer of the golden was compared
    assert rows["raw"][0] == "output0" and rows["head_1"][0] == "model.23.level1"
    assert all(rel < 1e-3 for _, _, rel in rows.values()), rows
    assert f"{len(keys)} of {len(keys)} passed" in out


def test_the_family_is_registered_by_its_module_alone():
    module = networks.family("yolov8")
    assert "yolov8" in networks.of_task("detect") and module.__name__ == "trtnet.networks.yolov8"
    assert "Ultralytics YOLOv8/YOLO11" in networks.checkpoints_read()
    assert networks.define_options(module, {"softmax": True}) == {}


@requires_torch
def test_torch_model_says_why_without_the_checkpoint_or_the_ultralytics_package(tmp_path):
    import importlib.util

    import torch

    module = networks.family("yolov8")
    model, why = module.torch_model(torch, {"weights": "yolo11n_nc3_syn.wts"}, tmp_path / "e.engine",
                                    str(tmp_path), None)
    assert model is None and "no yolo11n_nc3_syn.pt" in why
    if importlib.util.find_spec("ultralytics") is not None:
        pytest.skip("ultralytics is installed here: the GPU harness times it")
    (tmp_path / "yolo11n_nc3_syn.pt").write_bytes(b"")
    model, why = module.torch_model(torch, {"weights": "yolo11n_nc3_syn.wts"}, tmp_path / "e.engine",
                                    str(tmp_path), None)
    assert model is None and "cannot import the ultralytics package" in why


def test_golden_keys_map_to_tensors_through_the_family():
    from trtnet import networks
    from trtnet.inspection import tensor_for_golden_key

    weights_meta = {"family": "yolov8", "strides": [8, 16, 32],
                    "yaml": {"backbone": [[-1, 1, "Conv", [16]]] * 10, "head": [[-1, 1, "Conv", [16]]] * 14}}
    aliases = networks.golden_aliases(weights_meta)
    assert tensor_for_golden_key("raw", aliases) == "output0"
    assert tensor_for_golden_key("head_2", aliases) == "model.23.level2"
    assert tensor_for_golden_key("layer_07", aliases) == "model.7"
    assert tensor_for_golden_key("raw_0", networks.golden_aliases({"family": "yolov5"})) == "raw_0"
    engine_meta = {"family": "yolov8", "head": "anchor_free", "outputs": ["output0"]}  # a sidecar: no yaml
    assert networks.golden_aliases(engine_meta) == {"raw": "output0"}


class FakeUltralyticsModel:
    """Stands for ultralytics' DetectionModel in a pickled checkpoint: records the calls torch_model makes."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        if name in ("float", "fuse", "eval", "half", "cuda"):
            return lambda: self.calls.append(name) or self
        raise AttributeError(name)


@requires_torch
def test_torch_model_loads_the_checkpoint_with_the_ultralytics_package(tmp_path, monkeypatch):
    import sys
    import types

    import torch

    for name in ("ultralytics", "ultralytics.nn", "ultralytics.nn.tasks"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    torch.save({"model": FakeUltralyticsModel(), "ema": None}, tmp_path / "yolov8s_syn.pt")
    engine = tmp_path / "engines" / "yolov8s_syn.fp16.engine"
    model, why = networks.family("yolov8").torch_model(torch, {"weights": "yolov8s_syn.wts"}, engine,
                                                       str(tmp_path), None)
    assert why == "" and model.calls == ["float", "fuse", "eval", "half", "cuda"]
