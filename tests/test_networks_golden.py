"""The CPU reference executor runs our INetworkDefinitions and reproduces the official outputs.

Tolerance: fp32 outputs must be within 1e-4 of each output's value range. Our graph folds BatchNorm
into the convolutions (the official goldens were made unfused), which the MANIFEST measures at up to
6e-4 absolute on raw head maps spanning about ±18 (≈2e-5 of the range); float32 summation order adds
less. 1e-4 of the range leaves that headroom and still catches any wrong layer, which moves outputs by
whole units. Per-layer goldens are stored as float16, so they also carry half-precision rounding of up
to 2^-11 of each value, which is added to the tolerance there.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import requires_tensorrt, requires_torch, shared
from trtnet.network import BatchProfile, define_network

pytestmark = [requires_tensorrt, requires_torch]

RANGE_TOL = 1e-4
YOLO_GOLDENS = {
    "yolov5n": (("yolov5n.pt",), "golden_yolov5n_bus320.npz"),
    "yolov5s_syn": (("synthetic", "yolov5s_syn.pt"), "golden_yolov5s_syn_bus320.npz"),
    "yolov5n6_syn": (("synthetic", "yolov5n6_syn.pt"), "golden_yolov5n6_syn_bus320.npz"),
    "yolov5s_v50_syn": (("synthetic", "yolov5s_v50_syn.pt"), "golden_yolov5s_v50_syn_bus320.npz"),
}
RESNET_GOLDENS = {
    "resnet18_syn": (("synthetic", "resnet18_syn.pth"), "golden_resnet18_syn.npz"),
    "resnet50_syn": (("synthetic", "resnet50_syn.pth"), "golden_resnet50_syn.npz"),
}


def run_reference(checkpoint_parts, inputs_fn, keep, precision="fp32"):
    from trtnet import compat
    from trtnet.checkpoint import read_checkpoint
    from trtnet.executor import run_network

    ckpt = read_checkpoint(shared("weights", *checkpoint_parts))
    x = inputs_fn()
    builder = compat.trt().Builder(compat.Logger())
    defined = define_network(builder, ckpt.state_dict, ckpt.meta, precision=precision,
                             batch=BatchProfile(x.shape[0], x.shape[0], x.shape[0]), imgsz=x.shape[2])
    return run_network(defined.network, {defined.input_name: x}, keep=keep)


def assert_close(name, actual, golden, extra_rel=0.0):
    golden = golden.astype(np.float32)
    assert actual.shape == golden.shape, f"{name}: shape {actual.shape} vs golden {golden.shape}"
    span = float(golden.max() - golden.min()) or 1.0
    err = np.abs(actual.astype(np.float32) - golden)
    allowed = RANGE_TOL * span + extra_rel * np.abs(golden)
    worst = np.unravel_index(np.argmax(err - allowed), err.shape)
    assert np.all(err <= allowed), (
        f"{name}: max error {err.max():.3g} (range {span:.3g}); worst at {worst}: "
        f"{actual[worst]:.6g} vs golden {golden[worst]:.6g}"
    )


def golden(name):
    return np.load(shared("golden", name))


@pytest.mark.parametrize("model", list(YOLO_GOLDENS))
def test_yolov5_raw_heads_and_layers_match_golden(model):
    parts, golden_name = YOLO_GOLDENS[model]
    g = golden(golden_name)
    layers = sorted(k for k in g.files if k.startswith("layer_"))
    keep = [f"model.{int(k[6:])}" for k in layers]
    out = run_reference(parts, lambda: g["image"].astype(np.float32) / 255.0, keep)
    heads = sorted(k for k in g.files if k.startswith("raw_"))
    assert heads, "golden has no raw head maps"
    for k in heads:
        assert_close(f"{model} {k}", out[k], g[k])
    for k, tensor in zip(layers, keep):
        assert_close(f"{model} {k} ({tensor})", out[tensor], g[k], extra_rel=2.0**-11)


def test_yolov5n_has_every_layer_golden():
    """The per-layer check above covers all 24 layers of yolov5n (layer_00 … layer_23)."""
    g = golden(YOLO_GOLDENS["yolov5n"][1])
    assert sorted(k for k in g.files if k.startswith("layer_")) == [f"layer_{i:02d}" for i in range(24)]


@pytest.mark.parametrize("model", list(RESNET_GOLDENS))
def test_resnet_logits_and_stages_match_golden(model):
    parts, golden_name = RESNET_GOLDENS[model]
    g = golden(golden_name)
    stages = ["layer1", "layer2", "layer3", "layer4"]
    out = run_reference(parts, lambda: g["x"], stages)
    assert_close(f"{model} logits", out["logits"], g["logits"])
    for k in stages:
        assert_close(f"{model} {k}", out[k], g[k], extra_rel=2.0**-11)


def test_yolov5n_fp16_graph_stays_close():
    """The strongly typed half graph (cast in, half weights, cast out) computes the same function:
    half precision moves raw maps by about 1e-3 of their range; a miswired cast moves them by far more."""
    parts, golden_name = YOLO_GOLDENS["yolov5n"]
    g = golden(golden_name)
    out = run_reference(parts, lambda: g["image"].astype(np.float32) / 255.0, [], precision="fp16")
    for k in ("raw_0", "raw_1", "raw_2"):
        span = float(g[k].max() - g[k].min())
        err = float(np.abs(out[k] - g[k]).max())
        assert out[k].dtype == np.float32
        assert err <= 1e-2 * span, f"{k}: fp16 error {err:.3g} of range {span:.3g}"
