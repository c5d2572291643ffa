"""INT8 yolov5n on the CPU: the Q/DQ network definition run by the reference executor against a NumPy
fake-quant model built from the same scales, its distance from the fp32 golden, a TensorRT-RTX build,
and calibration on coco128 images."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tests.conftest import requires_tensorrt, requires_torch, shared

pytestmark = [requires_tensorrt, requires_torch]

IMGSZ = 320
CLIP = 0.9  # the test plan's amax: 90% of each tensor's largest magnitude on the golden image, so Q clamps


@pytest.fixture(scope="module")
def yolov5n():
    from trtnet.checkpoint import read_checkpoint

    return read_checkpoint(shared("weights", "yolov5n.pt"))


@pytest.fixture(scope="module")
def image():
    return np.load(shared("golden", "golden_yolov5n_bus320.npz"))["image"].astype(np.float32) / 255.0


def define(ckpt, plan=None, precision="fp32"):
    from trtnet import compat
    from trtnet.network import define_network

    builder = compat.trt().Builder(compat.Logger())
    defined = define_network(builder, ckpt.state_dict, ckpt.meta, precision=precision, imgsz=IMGSZ, quant=plan)
    defined.builder = builder  # TensorRT needs the builder alive while the network is
    return defined


@pytest.fixture(scope="module")
def plan(yolov5n, image):
    from trtnet.executor import run_network
    from trtnet.quant.calibrate import quantizable_tensors
    from trtnet.quant.plan import QuantPlan

    fp32 = define(yolov5n)
    names = sorted(set(quantizable_tensors(fp32.network).values()))
    seen = run_network(fp32.network, {fp32.input_name: image}, keep=names)
    return QuantPlan({n: CLIP * float(np.abs(seen[n]).max()) for n in names})


# -- the NumPy fake-quant model --------------------------------------------------------------------
# In float64 (scales are the float32 numbers TensorRT is given), compared with the executor's float64 policy:
# in float32, a last-bit difference in a convolution's sum moves a value across a rounding boundary of the
# next quantizer now and then, and that one-level step (1/127 of the range) spreads through the network.
def fake_quant(x, amax):
    """TensorRT Q then DQ: x / scale, round half to even, clamp to [-128, 127], times scale."""
    scale = np.float64(np.float32(amax / 127.0))
    return np.clip(np.round(np.asarray(x, np.float64) / scale), -128, 127) * scale


def fake_quant_per_channel(w):
    amax = np.abs(w).reshape(len(w), -1).max(axis=1)
    scale = (amax / 127.0).astype(np.float32).astype(np.float64).reshape(-1, 1, 1, 1)
    return np.clip(np.round(w.astype(np.float64) / scale), -128, 127) * scale


def conv_in_float64(trt, layer, amax):
    import torch

    layer.__class__ = trt.IConvolutionLayer
    kernel, bias = (np.array(w.numpy() if hasattr(w, "numpy") else w) for w in (layer.kernel, layer.bias))
    groups, k = layer.num_groups, tuple(layer.kernel_size_nd)
    c2, c1 = layer.num_output_maps, layer.get_input(0).shape[1]
    w = torch.from_numpy(fake_quant_per_channel(kernel.reshape(c2, c1 // groups, *k)))
    b = torch.from_numpy(bias.astype(np.float64))
    stride, padding = tuple(layer.stride_nd), tuple(layer.padding_nd)

    def run(inputs):
        x = torch.from_numpy(fake_quant(inputs[0], amax))
        return [torch.nn.functional.conv2d(x, w, b, stride, padding, 1, groups).numpy()]

    return run


def residual_sum(quantized):
    def run(inputs):
        return [sum(fake_quant(x, quantized[i]) if i in quantized else x.astype(np.float64)
                    for i, x in enumerate(inputs))]

    return run


def fake_quant_overrides(network, plan):
    """Layer name → NumPy stand-in: every convolution fake-quantizes its input and weights; every sum
    fake-quantizes the inputs that are quantized for a convolution (the residual of TensorRT's fusion)."""
    from trtnet import compat

    trt = compat.trt()
    overrides = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        kind = layer.type.name
        inputs = [layer.get_input(j).name for j in range(layer.num_inputs)]
        if kind == "CONVOLUTION":
            overrides[layer.name] = conv_in_float64(trt, layer, plan.amax[inputs[0]])
        elif kind == "ELEMENTWISE":
            layer.__class__ = trt.IElementWiseLayer
            quantized = {j: plan.amax[n] for j, n in enumerate(inputs) if n in plan.amax}
            if layer.op.name == "SUM" and quantized:
                overrides[layer.name] = residual_sum(quantized)
    return overrides


def heads(outputs):
    return {k: v for k, v in outputs.items() if k.startswith("raw_")}


def test_int8_yolov5n_equals_a_numpy_fake_quant_model(yolov5n, image, plan):
    from trtnet.executor import run_network

    int8 = define(yolov5n, plan)
    fp32 = define(yolov5n)
    got = heads(run_network(int8.network, {int8.input_name: image}, dtype_policy="float64"))
    overrides = fake_quant_overrides(fp32.network, plan)
    assert sum(1 for n in overrides if n.endswith(".conv")) > 50
    expected = heads(run_network(fp32.network, {fp32.input_name: image}, overrides=overrides, dtype_policy="float64"))
    assert sorted(got) == ["raw_0", "raw_1", "raw_2"] == sorted(expected)
    for name in got:
        span = float(np.ptp(expected[name]))
        err = np.abs(got[name] - expected[name])
        print(f"{name}: int8 executor vs fake-quant: max {err.max():.3g}, mean {err.mean():.3g} (range {span:.3g})")
        assert err.max() <= 1e-9 * span, f"{name}: max error {err.max():.3g} of range {span:.3g}"


def test_int8_yolov5n_heads_stay_close_to_the_fp32_golden(yolov5n, image, plan):
    from trtnet.executor import run_network

    golden = np.load(shared("golden", "golden_yolov5n_bus320.npz"))
    int8 = define(yolov5n, plan)
    got = heads(run_network(int8.network, {int8.input_name: image}))
    for name, value in got.items():
        ref = golden[name].astype(np.float32)
        err = np.abs(value - ref)
        print(f"{name}: int8 vs fp32 golden: max {err.max():.3g}, mean {err.mean():.3g} (range {np.ptp(ref):.3g})")
        assert err.mean() < 0.02 * np.ptp(ref) and err.max() < 0.25 * np.ptp(ref)


def test_q_dq_placement(yolov5n, plan):
    """Every convolution reads its input and its weights through Q/DQ; one Q per distinct input tensor (shared
    by the convolutions that read it) plus one per kernel; a kept convolution gets none."""
    from trtnet.executor import describe_network
    from trtnet.quant.calibrate import quantizable_tensors
    from trtnet.quant.plan import QuantPlan

    convs = quantizable_tensors(define(yolov5n).network)
    layers = describe_network(define(yolov5n, plan).network)
    by_output = {out: info for info in layers for out in info.outputs}
    quantizers = [info for info in layers if info.type == "QUANTIZE"]
    assert len(quantizers) == len(convs) + len(set(convs.values()))
    for info in layers:
        if info.type == "CONVOLUTION":
            assert [by_output[t].type for t in info.inputs[:2]] == ["DEQUANTIZE", "DEQUANTIZE"], info.name
    # Detect's first convolution ("raw_0", weights model.24.m.0.*) reads model.17, which model.18 reads too: only
    # its kernel's Q goes. model.2 (C3, one bottleneck) holds 5 convolutions reading 4 tensors no one else reads:
    # model.1 (cv1 and cv2), model.2.cv1, model.2.m.0.cv1, model.2.cat.
    for kept, fewer in [("model.24.m.0", 1), ("raw_0", 1), ("model.2", 5 + 4)]:
        partial = describe_network(define(yolov5n, QuantPlan(plan.amax, frozenset({kept}))).network)
        assert sum(i.type == "QUANTIZE" for i in partial) == len(quantizers) - fewer, kept
    partial = describe_network(define(yolov5n, QuantPlan(plan.amax, frozenset({"raw_0"}))).network)
    produced_by = {out: info.type for info in partial for out in info.outputs}
    conv = next(i for i in partial if i.name == "raw_0")
    assert produced_by[conv.inputs[0]] != "DEQUANTIZE" and conv.inputs[1:2] in ((), ("",))


def test_a_plan_without_a_range_for_a_convolution_input_is_refused(yolov5n, plan):
    from trtnet.errors import TrtnetError
    from trtnet.quant.plan import QuantPlan

    amax = {k: v for k, v in plan.amax.items() if k != "model.1"}
    with pytest.raises(TrtnetError, match="'model.1'.*model.2.cv1"):
        define(yolov5n, QuantPlan(amax))


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_int8_yolov5n_builds_with_tensorrt_rtx(yolov5n, plan, precision):
    from trtnet import compat

    defined = define(yolov5n, plan, precision)
    config = compat.builder_config(defined.builder, compat.BuildOptions(precision=precision, int8=True))
    start = time.perf_counter()
    engine = compat.build_serialized(defined.builder, defined.network, config)
    print(f"{compat.flavour()} INT8 ({precision} beside it) yolov5n {IMGSZ}: built in "
          f"{time.perf_counter() - start:.1f} s, {len(engine or b'')} bytes")
    assert engine, f"TensorRT-RTX did not build the INT8 yolov5n: {compat.Logger().errors[-3:]}"


def test_cpu_calibration_on_coco128_images(yolov5n, tmp_path):
    from trtnet.quant.calibrate import calibrate, quantizable_tensors
    from trtnet.quant.calibration_file import network_hash, read_calibration

    folder = shared("coco128", "images")
    run = calibrate(yolov5n.state_dict, yolov5n.meta, folder, method="entropy", count=4, imgsz=IMGSZ)
    calib = run.calibration
    print(f"CPU calibration, yolov5n {IMGSZ}: {run.seconds_per_image:.2f} s per image (executor + histograms), "
          f"{run.amax_seconds:.1f} s for {len(calib.amax)} entropy amax")
    assert set(calib.amax) == set(quantizable_tensors(define(yolov5n).network).values())
    assert 0.5 < calib.amax["images"] <= 1.0 + 1.0 / 2048  # the input is an image in [0, 1]
    assert all(0 < v < 1e4 for v in calib.amax.values())
    first_four = sorted(p for p in folder.rglob("*.jpg"))[:4]
    assert calib.images.count == 4
    assert list(calib.images.names) == [p.relative_to(folder).as_posix() for p in first_four]
    path = tmp_path / "yolov5n.calib.json"
    calib.write(path)
    assert read_calibration(path, network_hash(yolov5n.state_dict, yolov5n.meta)) == calib


@pytest.mark.slow
def test_int8_resnet18_runs_and_builds_with_tensorrt_rtx():
    """ResNet's convolutions and residual additions take the same Q/DQ (ranges here: the golden input's own
    maxima); its top-1 stays and the fp16 + INT8 definition builds."""
    from trtnet import compat
    from trtnet.checkpoint import read_checkpoint
    from trtnet.executor import run_network
    from trtnet.network import define_network
    from trtnet.quant.calibrate import quantizable_tensors
    from trtnet.quant.plan import QuantPlan

    ckpt = read_checkpoint(shared("weights", "synthetic", "resnet18_syn.pth"))
    x = np.ascontiguousarray(np.load(shared("golden", "golden_resnet18_syn.npz"))["x"][:1])
    builder = compat.trt().Builder(compat.Logger())
    fp32 = define_network(builder, ckpt.state_dict, ckpt.meta, imgsz=224)
    names = sorted(set(quantizable_tensors(fp32.network).values()))
    seen = run_network(fp32.network, {fp32.input_name: x}, keep=names)
    plan = QuantPlan({n: float(np.abs(seen[n]).max()) for n in names})
    int8 = define_network(builder, ckpt.state_dict, ckpt.meta, imgsz=224, precision="fp16", quant=plan)
    (name,) = int8.output_names
    got = run_network(int8.network, {int8.input_name: x})[name]
    assert got.argmax() == seen[name].argmax()
    config = compat.builder_config(builder, compat.BuildOptions(precision="fp16", int8=True))
    assert compat.build_serialized(builder, int8.network, config), compat.Logger().errors[-3:]


def resnet18_definitions(plan_of):
    """ResNet-18's fp32 definition and the INT8 one of `plan_of(calibrated tensor names)`, at 64."""
    from trtnet import compat
    from trtnet.checkpoint import read_checkpoint
    from trtnet.network import define_network
    from trtnet.quant.calibrate import calibrated_tensors

    ckpt = read_checkpoint(shared("weights", "synthetic", "resnet18_syn.pth"))
    builder = compat.trt().Builder(compat.Logger())
    fp32 = define_network(builder, ckpt.state_dict, ckpt.meta, imgsz=64)
    names = calibrated_tensors(fp32)
    int8 = define_network(builder, ckpt.state_dict, ckpt.meta, imgsz=64, precision="fp16", quant=plan_of(names))
    int8.builder = builder
    return names, int8


def residual_inputs(defined) -> dict[str, str]:
    """Residual add layer → the type of the layer its shortcut comes from."""
    from trtnet.executor import describe_network

    layers = describe_network(defined.network)
    produced_by = {out: info.type for info in layers for out in info.outputs}
    return {info.name: produced_by[info.inputs[1]] for info in layers if info.name.endswith(".add")}


def test_resnet_shortcuts_are_calibrated_and_read_through_q_dq():
    """NVIDIA's placement for residual blocks: the shortcut of every add is quantized, the downsample
    convolution's output included (calibrated as a tensor of its own), so TensorRT can fuse the add into the
    convolution before it with an INT8 output (run L: a float shortcut left a quantize layer after each
    stage's first block, 0.04-0.20 ms at batch 128)."""
    from trtnet.quant.plan import QuantPlan

    names, int8 = resnet18_definitions(lambda names: QuantPlan(dict.fromkeys(names, 1.0)))
    downsamples = [f"layer{i}.0.downsample.0" for i in (2, 3, 4)]  # ResNet-18's layer1 keeps its size
    assert set(downsamples) <= set(names) and "layer1.0.downsample.0" not in names
    shortcuts = residual_inputs(int8)
    assert len(shortcuts) == 8 and set(shortcuts.values()) == {"DEQUANTIZE"}, shortcuts


def test_resnet_shortcut_stays_float_without_its_range_or_when_kept():
    """A calibration made before shortcuts were calibrated (no range for the downsample outputs) still builds:
    those shortcuts stay float; so does the shortcut of a block kept in float."""
    from trtnet.quant.plan import QuantPlan

    def older(names):
        return QuantPlan({n: 1.0 for n in names if "downsample" not in n})

    shortcuts = residual_inputs(resnet18_definitions(older)[1])
    assert {k for k, v in shortcuts.items() if v != "DEQUANTIZE"} == {f"layer{i}.0.add" for i in (2, 3, 4)}

    def keeping_layer2_0(names):
        return QuantPlan(dict.fromkeys(names, 1.0), frozenset({"layer2.0"}))

    shortcuts = residual_inputs(resnet18_definitions(keeping_layer2_0)[1])
    assert shortcuts["layer2.0.add"] == "CONVOLUTION" and shortcuts["layer3.0.add"] == "DEQUANTIZE"


def test_kept_layers_are_the_float_groups_and_strongly_typed_tensorrt_needs_no_pin(yolov5n, plan):
    """`--int8-keep model.0` keeps model.0's convolution, SiLU and product (and the Q layer named after the
    tensor model.1 reads, which `compute_in_half` leaves alone); nothing of model.1. RTX's half graph already
    computes them in fp16."""
    from trtnet import compat
    from trtnet.quant.int8_build import kept_layers
    from trtnet.quant.plan import QuantPlan

    keep0 = QuantPlan(plan.amax, frozenset({"model.0"}))
    kept = kept_layers(define(yolov5n, keep0, "fp16").network, keep0)
    names = {layer.name for layer in kept}
    assert {"model.0.conv", "model.0.sigmoid", "model.0"} <= names
    assert all(n == "model.0" or n.startswith("model.0.") for n in names)
    assert not kept_layers(define(yolov5n, plan, "fp16").network, plan)
    assert compat.compute_in_half(kept) is False  # strongly typed (RTX, TensorRT 10+)


def test_a_kept_layer_keeps_the_quantized_readers_of_its_input(yolov5n, plan):
    """TensorRT quantizes a tensor for all its readers (run N: yolov5n with model.0-4 and the Detect convolutions
    kept scored as with model.0-4 alone): a kept Detect convolution keeps the neck convolution that reads the same
    tensor, and the network then has no tensor read both in float by a kept layer and through Q/DQ."""
    from trtnet.quant.keep import honoured_plan, quantized_siblings
    from trtnet.quant.plan import QuantPlan

    def network(p):
        return define(yolov5n, p).network

    wanted = QuantPlan(plan.amax, frozenset({"raw_0", "raw_1", "raw_2", "model.2"}))
    assert quantized_siblings(network(wanted), wanted) == {"model.18.conv", "model.21.conv"}
    honoured = honoured_plan(wanted, network, log=lambda line: None)
    assert honoured.keep_float == wanted.keep_float | {"model.18.conv", "model.21.conv"}
    assert not quantized_siblings(network(honoured), honoured)
    assert honoured_plan(QuantPlan(plan.amax, frozenset({"model.2"})), network).keep_float == {"model.2"}


def test_weakly_typed_tensorrt_is_asked_to_compute_kept_layers_in_fp16(monkeypatch):
    """TensorRT 8.5 ran a kept convolution that a quantize layer reads in fp32 (run N): on weakly typed TensorRT
    the kept compute layers get fp16 as their precision and the builder prefers those constraints."""
    import types

    from trtnet import compat
    from trtnet.quant.int8_build import Int8Network, configure_int8

    kinds = ("CONVOLUTION", "ACTIVATION", "ELEMENTWISE", "POOLING", "RESIZE", "SCALE", "QUANTIZE", "CONSTANT")
    fake = types.SimpleNamespace(LayerType=types.SimpleNamespace(**{k: k for k in kinds}), float16="half",
                                 BuilderFlag=types.SimpleNamespace(PREFER_PRECISION_CONSTRAINTS="prefer"))
    monkeypatch.setattr(compat, "trt", lambda: fake)
    monkeypatch.setattr(compat, "flavour", lambda: compat.Flavour("tensorrt", "8.5.3.1", 8))
    layers = [types.SimpleNamespace(type=kind, precision=None) for kind in kinds]
    assert compat.compute_in_half(layers) is True
    assert [layer.precision for layer in layers] == ["half"] * 6 + [None, None]
    assert compat.compute_in_half(layers[6:]) is False  # nothing to pin: the builder keeps its freedom

    class Config:
        flags: list = []

        def set_flag(self, flag):
            self.flags.append(flag)

    configure_int8(Config(), Int8Network(None, None, half_pinned=True))
    configure_int8(Config(), Int8Network(None, None))
    assert Config.flags == ["prefer"]
