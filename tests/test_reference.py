"""The CPU reference executor against independent torch/numpy computations of each TensorRT layer.

Every network here is also built with TensorRT-RTX, so the semantics are checked on graphs TensorRT
accepts; RTX networks are always strongly typed (`create_network(0)`).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

trt = pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX not installed (extra: rtx)")
torch = pytest.importorskip("torch", reason="torch not installed (extra: export)")
F = torch.nn.functional

from trtnet import executor  # noqa: E402
from trtnet.errors import TrtnetError  # noqa: E402
from trtnet.executor import describe_network, run_network  # noqa: E402

RNG = np.random.default_rng(7)


class QuietLogger(trt.ILogger):
    """Keeps TensorRT's messages (a CPU-only build logs a CUDA driver error) for failure reports."""

    def __init__(self):
        trt.ILogger.__init__(self)
        self.messages: list[str] = []

    def log(self, severity, msg):
        self.messages.append(msg)


class Net:
    """A tiny strongly typed network; keeps weight arrays alive until the build ends."""

    def __init__(self):
        self.logger = QuietLogger()
        self.builder = trt.Builder(self.logger)
        self.network = self.builder.create_network(0)
        self.arrays: list[np.ndarray] = []
        self.profile: list[tuple] = []

    def input(self, name, shape, dtype=trt.float32):
        return self.network.add_input(name, dtype, tuple(shape))

    def weights(self, array) -> trt.Weights:
        array = np.ascontiguousarray(array)
        self.arrays.append(array)
        return trt.Weights(array)

    def constant(self, array, name=None):
        layer = self.network.add_constant(array.shape, self.weights(array))
        if name:
            layer.get_output(0).name = name
        return layer.get_output(0)

    def output(self, tensor, name="y"):
        tensor.name = name
        self.network.mark_output(tensor)
        return tensor

    def dynamic(self, name, lo, opt, hi):
        self.profile.append((name, lo, opt, hi))

    def run(self, inputs, **kwargs):
        return run_network(self.network, inputs, **kwargs)

    def assert_builds(self):
        config = self.builder.create_builder_config()
        if self.profile:
            profile = self.builder.create_optimization_profile()
            for name, lo, opt, hi in self.profile:
                profile.set_shape(name, lo, opt, hi)
            config.add_optimization_profile(profile)
        plan = self.builder.build_serialized_network(self.network, config)
        errors = [m for m in self.logger.messages if "CUDA driver version" not in m]
        assert plan is not None, f"TensorRT-RTX refused the network: {errors[-5:]}"


def randn(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


def close(actual, expected, rtol=1e-5, atol=1e-5):
    expected = expected.detach().numpy() if isinstance(expected, torch.Tensor) else np.asarray(expected)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


def t(array):
    return torch.from_numpy(np.ascontiguousarray(array))


# -- convolution -----------------------------------------------------------------------------------
CONV_CASES = {
    "3x3 s1 p1": dict(k=(3, 3), stride=(1, 1), pre=(1, 1), post=(1, 1)),
    "3x3 s2 p1 (yolo downsample)": dict(k=(3, 3), stride=(2, 2), pre=(1, 1), post=(1, 1)),
    "6x6 s2 p2 (yolov5 stem)": dict(k=(6, 6), stride=(2, 2), pre=(2, 2), post=(2, 2)),
    "asymmetric pre/post": dict(k=(3, 2), stride=(2, 1), pre=(0, 1), post=(2, 0)),
    "dilated": dict(k=(3, 3), dilation=(2, 2), pre=(2, 2), post=(2, 2)),
    "grouped, no bias": dict(k=(3, 3), pre=(1, 1), post=(1, 1), groups=2, bias=False),
}


@pytest.mark.parametrize("case", CONV_CASES.values(), ids=CONV_CASES.keys())
def test_convolution_with_explicit_padding(case):
    groups, stride, dilation = case.get("groups", 1), case.get("stride", (1, 1)), case.get("dilation", (1, 1))
    x, w = randn(2, 4, 11, 10), randn(6, 4 // groups, *case["k"])
    b = randn(6) if case.get("bias", True) else None
    net = Net()
    layer = net.network.add_convolution_nd(
        net.input("x", x.shape), 6, case["k"], net.weights(w), net.weights(b) if b is not None else None
    )
    layer.stride_nd, layer.dilation_nd, layer.num_groups = stride, dilation, groups
    layer.pre_padding, layer.post_padding = case["pre"], case["post"]
    net.output(layer.get_output(0))

    padded = F.pad(t(x), (case["pre"][1], case["post"][1], case["pre"][0], case["post"][0]))
    expected = F.conv2d(padded, t(w), None if b is None else t(b), stride, 0, dilation, groups)
    close(net.run({"x": x})["y"], expected, rtol=1e-4, atol=1e-4)
    net.assert_builds()


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_convolution_same_upper_matches_torch_same_padding():
    x, w, b = randn(1, 3, 9, 9), randn(5, 3, 4, 4), randn(5)  # an even kernel pads asymmetrically
    net = Net()
    layer = net.network.add_convolution_nd(net.input("x", x.shape), 5, (4, 4), net.weights(w), net.weights(b))
    layer.padding_mode = trt.PaddingMode.SAME_UPPER
    net.output(layer.get_output(0))
    close(net.run({"x": x})["y"], F.conv2d(t(x), t(w), t(b), padding="same"), rtol=1e-4, atol=1e-4)
    net.assert_builds()


def test_convolution_same_lower_puts_the_extra_padding_first():
    x, w = randn(1, 2, 8, 8), randn(3, 2, 4, 4)
    net = Net()
    layer = net.network.add_convolution_nd(net.input("x", x.shape), 3, (4, 4), net.weights(w), None)
    layer.padding_mode = trt.PaddingMode.SAME_LOWER
    net.output(layer.get_output(0))
    expected = F.conv2d(F.pad(t(x), (2, 1, 2, 1)), t(w))  # 3 pixels of padding: 2 before, 1 after
    close(net.run({"x": x})["y"], expected, rtol=1e-4, atol=1e-4)
    net.assert_builds()


def test_convolution_round_up_adds_a_last_window():
    x, w = randn(1, 2, 8, 8), randn(3, 2, 3, 3)
    net = Net()
    layer = net.network.add_convolution_nd(net.input("x", x.shape), 3, (3, 3), net.weights(w), None)
    layer.stride_nd, layer.padding_mode = (2, 2), trt.PaddingMode.EXPLICIT_ROUND_UP
    y = net.output(layer.get_output(0))
    out = net.run({"x": x})["y"]
    size = tuple(y.shape)[-1]  # TensorRT's own shape inference: 4, where rounding down gives 3
    assert size == 4
    expected = F.conv2d(F.pad(t(x), (0, 2, 0, 2)), t(w), stride=2)[..., :size, :size]
    close(out, expected, rtol=1e-4, atol=1e-4)
    net.assert_builds()


def test_half_convolution_accumulates_in_float32_and_rounds_once():
    x, w, b = randn(1, 8, 6, 6), randn(4, 8, 3, 3, dtype=np.float16), randn(4, dtype=np.float16)
    net = Net()
    half = net.network.add_cast(net.input("x", x.shape), trt.float16).get_output(0)
    conv = net.network.add_convolution_nd(half, 4, (3, 3), net.weights(w), net.weights(b))
    conv.padding_nd = (1, 1)
    conv.get_output(0).name = "conv"
    net.output(net.network.add_cast(conv.get_output(0), trt.float32).get_output(0))

    x16 = x.astype(np.float16).astype(np.float32)
    exact = F.conv2d(t(x16), t(w.astype(np.float32)), t(b.astype(np.float32)), padding=1)
    result = net.run({"x": x}, keep=["conv"])
    assert result["conv"].dtype == np.float16
    np.testing.assert_array_equal(result["y"], exact.numpy().astype(np.float16).astype(np.float32))
    # dtype_policy="float32" skips the half rounding of activations (weights keep their half values)
    unrounded = F.conv2d(t(x), t(w.astype(np.float32)), t(b.astype(np.float32)), padding=1)
    close(net.run({"x": x}, dtype_policy="float32")["y"], unrounded, rtol=1e-5, atol=1e-5)
    net.assert_builds()


# -- pooling ---------------------------------------------------------------------------------------
def _pool(net, x, kind, window, stride=(1, 1), pre=(0, 0), post=(0, 0), mode=None):
    layer = net.network.add_pooling_nd(net.input("x", x.shape), kind, window)
    layer.stride_nd, layer.pre_padding, layer.post_padding = stride, pre, post
    if mode is not None:
        layer.padding_mode = mode
    return layer


@pytest.mark.parametrize(
    "window, stride, pad", [((5, 5), (1, 1), 2), ((3, 3), (2, 2), 1)], ids=["sppf k5 s1 p2", "stem k3 s2 p1"]
)
def test_max_pooling_with_padding(window, stride, pad):
    x = randn(2, 3, 10, 10)
    net = Net()
    net.output(_pool(net, x, trt.PoolingType.MAX, window, stride, (pad, pad), (pad, pad)).get_output(0))
    close(net.run({"x": x})["y"], F.max_pool2d(t(x), window, stride, pad))
    net.assert_builds()


def test_max_pooling_asymmetric_padding_pads_with_minus_infinity():
    x = -np.abs(randn(1, 2, 7, 7)) - 1  # all negative: a zero pad would win the max
    net = Net()
    net.output(_pool(net, x, trt.PoolingType.MAX, (3, 3), (2, 2), (0, 1), (1, 0)).get_output(0))
    expected = F.max_pool2d(F.pad(t(x), (1, 0, 0, 1), value=-math.inf), 3, 2)
    close(net.run({"x": x})["y"], expected)
    net.assert_builds()


@pytest.mark.parametrize("excludes", [True, False])
def test_average_pooling_counts_padding_as_configured(excludes):
    x = randn(1, 3, 9, 9)
    net = Net()
    layer = _pool(net, x, trt.PoolingType.AVERAGE, (3, 3), (2, 2), (1, 1), (1, 1))
    layer.average_count_excludes_padding = excludes
    net.output(layer.get_output(0))
    close(net.run({"x": x})["y"], F.avg_pool2d(t(x), 3, 2, 1, count_include_pad=not excludes))
    net.assert_builds()


@pytest.mark.parametrize("kind", ["MAX", "AVERAGE"])
def test_pooling_round_up_matches_torch_ceil_mode(kind):
    x = randn(1, 2, 7, 7)
    net = Net()
    layer = _pool(net, x, getattr(trt.PoolingType, kind), (2, 2), (2, 2),
                  mode=trt.PaddingMode.EXPLICIT_ROUND_UP)
    net.output(layer.get_output(0))
    torch_pool = F.max_pool2d if kind == "MAX" else F.avg_pool2d
    close(net.run({"x": x})["y"], torch_pool(t(x), 2, 2, ceil_mode=True))
    net.assert_builds()


def test_pooling_same_upper_and_blend():
    x = randn(1, 2, 8, 8)
    net = Net()
    layer = _pool(net, x, trt.PoolingType.MAX_AVERAGE_BLEND, (3, 3), (2, 2), mode=trt.PaddingMode.SAME_UPPER)
    layer.blend_factor = 0.25
    net.output(layer.get_output(0))
    # 8 with stride 2 → 4 outputs, 1 pixel of padding after (SAME_UPPER puts the odd one last)
    peak = F.max_pool2d(F.pad(t(x), (0, 1, 0, 1), value=-math.inf), 3, 2)
    mean = F.avg_pool2d(F.pad(t(x), (0, 1, 0, 1)), 3, 2, divisor_override=1) / F.avg_pool2d(
        F.pad(torch.ones(1, 1, 8, 8), (0, 1, 0, 1)), 3, 2, divisor_override=1
    )
    close(net.run({"x": x})["y"], 0.75 * peak + 0.25 * mean)
    net.assert_builds()


# -- pointwise -------------------------------------------------------------------------------------
ACTIVATIONS = {
    "RELU": (0, 0, F.relu),
    "SIGMOID": (0, 0, torch.sigmoid),
    "TANH": (0, 0, torch.tanh),
    "LEAKY_RELU": (0.1, 0, lambda x: F.leaky_relu(x, 0.1)),
    "ELU": (0.7, 0, lambda x: F.elu(x, 0.7)),
    "SELU": (1.6732632423543772, 1.0507009873554805, F.selu),
    "SOFTSIGN": (0, 0, F.softsign),
    "SOFTPLUS": (0.5, 2.0, lambda x: F.softplus(x, beta=2.0)),
    "CLIP": (0.0, 6.0, F.relu6),
    "HARD_SIGMOID": (1 / 6, 0.5, F.hardsigmoid),
    "SCALED_TANH": (1.7, 0.6, lambda x: 1.7 * torch.tanh(0.6 * x)),
    "THRESHOLDED_RELU": (0.3, 0, lambda x: F.threshold(x, 0.3, 0.0)),
    "GELU_ERF": (0, 0, F.gelu),
    "GELU_TANH": (0, 0, lambda x: F.gelu(x, approximate="tanh")),
}


@pytest.mark.parametrize("kind", ACTIVATIONS)
def test_activation(kind):
    alpha, beta, expected = ACTIVATIONS[kind]
    x = 3 * randn(2, 3, 4, 5)
    net = Net()
    layer = net.network.add_activation(net.input("x", x.shape), getattr(trt.ActivationType, kind))
    layer.alpha, layer.beta = alpha, beta
    net.output(layer.get_output(0))
    close(net.run({"x": x})["y"], expected(t(x)))
    net.assert_builds()


ELEMENTWISE = {
    "SUM": np.add, "PROD": np.multiply, "MAX": np.maximum, "MIN": np.minimum, "SUB": np.subtract,
    "DIV": np.divide, "POW": np.power, "FLOOR_DIV": np.floor_divide,
}


@pytest.mark.parametrize("op", ELEMENTWISE)
def test_elementwise_broadcasts(op):
    a, b = np.abs(randn(2, 3, 4, 5)) + 0.5, np.abs(randn(1, 3, 1, 5)) + 0.5
    net = Net()
    layer = net.network.add_elementwise(net.input("a", a.shape), net.input("b", b.shape),
                                        getattr(trt.ElementWiseOperation, op))
    net.output(layer.get_output(0))
    close(net.run({"a": a, "b": b})["y"], ELEMENTWISE[op](a, b))
    net.assert_builds()


@pytest.mark.parametrize("op, expected", [("GREATER", np.greater), ("LESS", np.less), ("EQUAL", np.equal)])
def test_comparisons_give_booleans(op, expected):
    a, b = randn(2, 6).round(), randn(2, 6).round()
    net = Net()
    layer = net.network.add_elementwise(net.input("a", a.shape), net.input("b", b.shape),
                                        getattr(trt.ElementWiseOperation, op))
    net.output(layer.get_output(0))
    out = net.run({"a": a, "b": b})["y"]
    assert out.dtype == np.bool_
    np.testing.assert_array_equal(out, expected(a, b))
    net.assert_builds()


def test_integer_division_truncates_and_floor_division_floors():
    a, b = np.array([[7, -7, 9, -9]], np.int32), np.array([[2, 2, -4, 4]], np.int32)
    net = Net()
    ia, ib = net.input("a", a.shape, trt.int32), net.input("b", b.shape, trt.int32)
    net.output(net.network.add_elementwise(ia, ib, trt.ElementWiseOperation.DIV).get_output(0), "div")
    net.output(net.network.add_elementwise(ia, ib, trt.ElementWiseOperation.FLOOR_DIV).get_output(0), "floor")
    out = net.run({"a": a, "b": b})
    np.testing.assert_array_equal(out["div"], [[3, -3, -2, -2]])
    np.testing.assert_array_equal(out["floor"], [[3, -4, -3, -3]])
    net.assert_builds()


UNARY = {
    "EXP": (np.exp, 1), "LOG": (np.log, 2), "SQRT": (np.sqrt, 2), "RECIP": (np.reciprocal, 2),
    "ABS": (np.abs, 0), "NEG": (np.negative, 0), "SIN": (np.sin, 0), "COS": (np.cos, 0),
    "TAN": (np.tan, 1), "SINH": (np.sinh, 0), "COSH": (np.cosh, 0), "ASIN": (np.arcsin, 1),
    "ACOS": (np.arccos, 1), "ATAN": (np.arctan, 0), "ASINH": (np.arcsinh, 0), "ACOSH": (np.arccosh, 3),
    "ATANH": (np.arctanh, 1), "CEIL": (np.ceil, 0), "FLOOR": (np.floor, 0), "SIGN": (np.sign, 0),
    "ROUND": (np.round, 4),  # numpy rounds half to even, as TensorRT documents
}
DOMAINS = {
    0: lambda: 3 * randn(3, 8),
    1: lambda: RNG.uniform(-0.9, 0.9, (3, 8)).astype(np.float32),
    2: lambda: RNG.uniform(0.1, 5.0, (3, 8)).astype(np.float32),
    3: lambda: RNG.uniform(1.1, 5.0, (3, 8)).astype(np.float32),
    4: lambda: np.array([[-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.4, -0.6]] * 3, np.float32),
}


@pytest.mark.parametrize("op", UNARY)
def test_unary(op):
    expected, domain = UNARY[op]
    x = DOMAINS[domain]()
    net = Net()
    net.output(net.network.add_unary(net.input("x", x.shape), getattr(trt.UnaryOperation, op)).get_output(0))
    close(net.run({"x": x})["y"], expected(x), rtol=1e-5, atol=1e-6)
    net.assert_builds()


def test_erf_and_nan_checks():
    x = np.array([[-1.0, 0.0, 0.5, np.inf, np.nan]], np.float32)
    net = Net()
    xin = net.input("x", x.shape)
    net.output(net.network.add_unary(xin, trt.UnaryOperation.ERF).get_output(0), "erf")
    net.output(net.network.add_unary(xin, trt.UnaryOperation.ISNAN).get_output(0), "isnan")
    net.output(net.network.add_unary(xin, trt.UnaryOperation.ISINF).get_output(0), "isinf")
    out = net.run({"x": x})
    close(out["erf"], torch.erf(t(x)))
    np.testing.assert_array_equal(out["isnan"], np.isnan(x))
    np.testing.assert_array_equal(out["isinf"], np.isinf(x))
    net.assert_builds()


def test_scale_modes():
    x = np.abs(randn(2, 3, 4, 4)) + 0.1
    shift, scale = np.abs(randn(3)), np.abs(randn(3)) + 0.5  # a positive base for the fractional power
    power = np.array([1.0, 2.0, 0.5], np.float32)
    uniform_shift, elementwise_scale = np.array([0.25], np.float32), randn(3, 4, 4)
    net = Net()
    xin = net.input("x", x.shape)
    channel = net.network.add_scale(xin, trt.ScaleMode.CHANNEL, net.weights(shift), net.weights(scale),
                                    net.weights(power))
    net.output(channel.get_output(0), "channel")
    uniform = net.network.add_scale(xin, trt.ScaleMode.UNIFORM, net.weights(uniform_shift), None, None)
    net.output(uniform.get_output(0), "uniform")
    elementwise = net.network.add_scale(xin, trt.ScaleMode.ELEMENTWISE, None, net.weights(elementwise_scale),
                                        None)
    net.output(elementwise.get_output(0), "elementwise")
    out = net.run({"x": x})
    per_channel = (x * scale[:, None, None] + shift[:, None, None]) ** power[:, None, None]
    close(out["channel"], per_channel, rtol=1e-5)
    close(out["uniform"], x + 0.25)
    close(out["elementwise"], x * elementwise_scale)
    net.assert_builds()


def test_scale_nd_on_another_channel_axis():
    x, scale = randn(2, 5, 3), randn(3)
    net = Net()
    layer = net.network.add_scale_nd(net.input("x", x.shape), trt.ScaleMode.CHANNEL, None,
                                     net.weights(scale), None, 2)
    net.output(layer.get_output(0))
    close(net.run({"x": x})["y"], x * scale)
    net.assert_builds()


def test_parametric_relu_select_and_padding():
    x, slope = randn(1, 3, 4, 4), np.array([0.1, 0.2, 0.3], np.float32).reshape(1, 3, 1, 1)
    net = Net()
    xin = net.input("x", x.shape)
    prelu = net.network.add_parametric_relu(xin, net.constant(slope))
    net.output(prelu.get_output(0), "prelu")
    zero = net.constant(np.zeros((1, 1, 1, 1), np.float32))
    positive = net.network.add_elementwise(xin, zero, trt.ElementWiseOperation.GREATER).get_output(0)
    absolute = net.network.add_unary(xin, trt.UnaryOperation.ABS).get_output(0)
    net.output(net.network.add_select(positive, xin, absolute).get_output(0), "select")
    net.output(net.network.add_padding_nd(xin, (1, 0), (0, 2)).get_output(0), "padded")
    out = net.run({"x": x})
    close(out["prelu"], np.where(x >= 0, x, x * slope))
    close(out["select"], np.abs(x))
    close(out["padded"], np.pad(x, ((0, 0), (0, 0), (1, 0), (0, 2))))
    net.assert_builds()


# -- layout ----------------------------------------------------------------------------------------
def test_concatenation():
    a, b, c = randn(2, 1, 3), randn(2, 4, 3), randn(2, 2, 3)
    net = Net()
    layer = net.network.add_concatenation([net.input("a", a.shape), net.input("b", b.shape),
                                           net.input("c", c.shape)])
    layer.axis = 1
    net.output(layer.get_output(0))
    close(net.run({"a": a, "b": b, "c": c})["y"], np.concatenate([a, b, c], axis=1))
    net.assert_builds()


def test_shuffle_transposes_around_a_reshape_with_placeholders():
    x = randn(2, 3, 4, 5)
    net = Net()
    layer = net.network.add_shuffle(net.input("x", x.shape))
    layer.first_transpose = (0, 2, 3, 1)
    layer.reshape_dims = (0, -1, 3)
    layer.second_transpose = (0, 2, 1)
    net.output(layer.get_output(0))
    close(net.run({"x": x})["y"], x.transpose(0, 2, 3, 1).reshape(2, -1, 3).transpose(0, 2, 1))
    net.assert_builds()


def test_shuffle_yolo_head_with_dynamic_batch():
    na, no, ny, nx = 3, 7, 4, 5
    x = randn(3, na * no, ny, nx)
    net = Net()
    layer = net.network.add_shuffle(net.input("x", (-1, na * no, ny, nx)))
    layer.reshape_dims = (0, na, no, ny, nx)
    layer.second_transpose = (0, 1, 3, 4, 2)
    net.output(layer.get_output(0))
    net.dynamic("x", (1, na * no, ny, nx), (2, na * no, ny, nx), (4, na * no, ny, nx))
    out = net.run({"x": x})["y"]
    close(out, x.reshape(3, na, no, ny, nx).transpose(0, 1, 3, 4, 2))
    net.assert_builds()


def test_slice_with_strides():
    x = randn(2, 3, 8, 8)
    net = Net()
    xin = net.input("x", x.shape)
    # YOLOv5 v5.0 Focus: x[..., ::2, ::2] and x[..., 1::2, ::2]
    net.output(net.network.add_slice(xin, (0, 0, 0, 0), (2, 3, 4, 4), (1, 1, 2, 2)).get_output(0), "even")
    net.output(net.network.add_slice(xin, (0, 0, 1, 0), (2, 3, 4, 4), (1, 1, 2, 2)).get_output(0), "odd")
    net.output(net.network.add_slice(xin, (1, 1, 2, 0), (1, 2, 3, 8), (1, 1, 1, 1)).get_output(0), "box")
    out = net.run({"x": x})
    close(out["even"], x[..., ::2, ::2])
    close(out["odd"], x[..., 1::2, ::2])
    close(out["box"], x[1:2, 1:3, 2:5, :])
    net.assert_builds()


@pytest.mark.parametrize("mode", ["WRAP", "CLAMP", "FILL", "REFLECT"])
def test_slice_out_of_bounds_modes(mode):
    x = randn(1, 2, 5)
    net = Net()
    layer = net.network.add_slice(net.input("x", x.shape), (0, 0, -3), (1, 2, 11), (1, 1, 1))
    layer.mode = getattr(trt.SampleMode, mode)
    net.output(layer.get_output(0))
    numpy_mode = {"WRAP": "wrap", "CLAMP": "edge", "FILL": "constant", "REFLECT": "reflect"}[mode]
    close(net.run({"x": x})["y"], np.pad(x, ((0, 0), (0, 0), (3, 3)), mode=numpy_mode))
    net.assert_builds()


def test_constant_and_shape_and_gather():
    x = randn(2, 5, 3)
    net = Net()
    xin = net.input("x", x.shape)
    offset = randn(1, 5, 1)
    net.output(net.network.add_elementwise(xin, net.constant(offset), trt.ElementWiseOperation.SUM)
               .get_output(0), "sum")
    gather = net.network.add_gather(xin, net.constant(np.array([4, 0, 2], np.int32)), 1)
    net.output(gather.get_output(0), "gathered")
    element = net.network.add_gather(xin, net.constant(RNG.integers(0, 5, (2, 2, 3)).astype(np.int32),
                                                       "picks"), 1)
    element.mode = trt.GatherMode.ELEMENT
    net.output(element.get_output(0), "element")
    shape = net.network.add_shape(xin).get_output(0)
    shape.name = "shape"
    out = net.run({"x": x}, keep=["shape", "picks"])
    close(out["sum"], x + offset)
    close(out["gathered"], np.take(x, [4, 0, 2], axis=1))
    close(out["element"], np.take_along_axis(x, out["picks"].astype(np.int64), axis=1))
    np.testing.assert_array_equal(out["shape"], [2, 5, 3])
    net.assert_builds()


def test_squeeze_and_unsqueeze():
    x = randn(2, 1, 3)
    net = Net()
    xin = net.input("x", x.shape)
    squeezed = net.network.add_squeeze(xin, net.constant(np.array([1], np.int64))).get_output(0)
    net.output(squeezed, "squeezed")
    net.output(net.network.add_unsqueeze(xin, net.constant(np.array([0, -1], np.int64))).get_output(0),
               "unsqueezed")
    out = net.run({"x": x})
    close(out["squeezed"], x[:, 0])
    close(out["unsqueezed"], x[None, ..., None])
    net.assert_builds()


# -- resize ----------------------------------------------------------------------------------------
def _resize(net, x, mode="NEAREST", transform="ASYMMETRIC", rounding="FLOOR", scales=None, shape=None):
    layer = net.network.add_resize(net.input("x", x.shape))
    if scales is not None:
        layer.scales = scales
    else:
        layer.shape = shape
    layer.resize_mode = getattr(trt.InterpolationMode, mode)
    layer.coordinate_transformation = getattr(trt.ResizeCoordinateTransformation, transform)
    if mode == "NEAREST":
        layer.nearest_rounding = getattr(trt.ResizeRoundMode, rounding)
    net.output(layer.get_output(0))


def test_nearest_upsample_x2_like_yolov5():
    x = randn(2, 3, 5, 4)
    net = Net()
    _resize(net, x, scales=[1.0, 1.0, 2.0, 2.0])
    close(net.run({"x": x})["y"], F.interpolate(t(x), scale_factor=2, mode="nearest"))
    net.assert_builds()


def test_nearest_resize_to_a_shape():
    x = randn(1, 2, 8, 6)
    net = Net()
    _resize(net, x, shape=(1, 2, 12, 4))
    close(net.run({"x": x})["y"], F.interpolate(t(x), size=(12, 4), mode="nearest"))
    net.assert_builds()


def test_nearest_half_pixel_round_half_up_is_torch_nearest_exact():
    x = randn(1, 2, 6, 6)
    net = Net()
    _resize(net, x, transform="HALF_PIXEL", rounding="HALF_UP", shape=(1, 2, 9, 4))
    close(net.run({"x": x})["y"], F.interpolate(t(x), size=(9, 4), mode="nearest-exact"))
    net.assert_builds()


@pytest.mark.parametrize("size", [(12, 10), (4, 3)], ids=["up", "down"])
@pytest.mark.parametrize("transform", ["ALIGN_CORNERS", "HALF_PIXEL"])
def test_bilinear_resize(transform, size):
    x = randn(1, 2, 8, 6)
    net = Net()
    _resize(net, x, mode="LINEAR", transform=transform, shape=(1, 2, *size))
    aligned = transform == "ALIGN_CORNERS"
    expected = F.interpolate(t(x), size=size, mode="bilinear", align_corners=aligned)
    close(net.run({"x": x})["y"], expected, rtol=1e-5, atol=1e-5)
    net.assert_builds()


# -- reductions, matmul, selection -----------------------------------------------------------------
@pytest.mark.parametrize(
    "op, axes, keep, expected",
    [
        ("AVG", (2, 3), True, lambda x: x.mean((2, 3), keepdims=True)),  # global average pool
        ("SUM", (1,), False, lambda x: x.sum(1)),
        ("MAX", (1, 3), False, lambda x: x.max((1, 3))),
        ("MIN", (0, 2), True, lambda x: x.min((0, 2), keepdims=True)),
        ("PROD", (1, 3), False, lambda x: x.prod((1, 3))),
    ],
)
def test_reduce(op, axes, keep, expected):
    x = randn(2, 3, 4, 5)
    net = Net()
    mask = sum(1 << a for a in axes)
    layer = net.network.add_reduce(net.input("x", x.shape), getattr(trt.ReduceOperation, op), mask, keep)
    net.output(layer.get_output(0))
    close(net.run({"x": x})["y"], expected(x))
    net.assert_builds()


def test_matrix_multiply_like_a_linear_layer():
    x, w, b = randn(2, 5), randn(4, 5), randn(1, 4)
    net = Net()
    mm = net.network.add_matrix_multiply(net.input("x", x.shape), trt.MatrixOperation.NONE, net.constant(w),
                                         trt.MatrixOperation.TRANSPOSE)
    net.output(net.network.add_elementwise(mm.get_output(0), net.constant(b), trt.ElementWiseOperation.SUM)
               .get_output(0))
    close(net.run({"x": x})["y"], x @ w.T + b)
    net.assert_builds()


@pytest.mark.parametrize(
    "op0, op1, shape_a, shape_b, expected",
    [
        ("NONE", "NONE", (2, 3, 4), (1, 4, 6), lambda a, b: a @ b),
        ("TRANSPOSE", "NONE", (2, 4, 3), (2, 4, 6), lambda a, b: a.transpose(0, 2, 1) @ b),
        ("VECTOR", "NONE", (3, 4), (3, 4, 5), lambda a, b: np.einsum("bk,bkn->bn", a, b)),
        ("NONE", "VECTOR", (3, 2, 4), (3, 4), lambda a, b: np.einsum("bmk,bk->bm", a, b)),
        ("VECTOR", "VECTOR", (3, 4), (3, 4), lambda a, b: np.einsum("bk,bk->b", a, b)),
    ],
)
def test_matrix_multiply_operations(op0, op1, shape_a, shape_b, expected):
    a, b = randn(*shape_a), randn(*shape_b)
    net = Net()
    layer = net.network.add_matrix_multiply(net.input("a", a.shape), getattr(trt.MatrixOperation, op0),
                                            net.input("b", b.shape), getattr(trt.MatrixOperation, op1))
    net.output(layer.get_output(0))
    close(net.run({"a": a, "b": b})["y"], expected(a, b), rtol=1e-5, atol=1e-5)
    net.assert_builds()


@pytest.mark.parametrize("axis", [1, 3])
def test_softmax(axis):
    x = randn(2, 3, 4, 5)
    net = Net()
    layer = net.network.add_softmax(net.input("x", x.shape))
    layer.axes = 1 << axis
    net.output(layer.get_output(0))
    close(net.run({"x": x})["y"], torch.softmax(t(x), dim=axis))
    net.assert_builds()


@pytest.mark.parametrize("op", ["MAX", "MIN"])
def test_topk_values_and_indices(op):
    x = np.stack([RNG.permutation(12) for _ in range(6)]).astype(np.float32).reshape(2, 3, 12)  # no ties
    net = Net()
    layer = net.network.add_topk(net.input("x", x.shape), getattr(trt.TopKOperation, op), 4, 1 << 2)
    net.output(layer.get_output(0), "values")
    net.output(layer.get_output(1), "indices")
    out = net.run({"x": x})
    order = np.argsort(-x if op == "MAX" else x, axis=2)[..., :4]
    assert out["indices"].dtype == np.int32
    np.testing.assert_array_equal(out["indices"], order)
    close(out["values"], np.take_along_axis(x, order, axis=2))
    net.assert_builds()


# -- casts -----------------------------------------------------------------------------------------
def test_casts_round_to_half_and_truncate_to_int():
    x = np.array([[-1.7, -0.2, 0.6, 2.5, 1000.123, 3.3333333]], np.float32)
    net = Net()
    xin = net.input("x", x.shape)
    half = net.network.add_cast(xin, trt.float16).get_output(0)
    net.output(net.network.add_cast(half, trt.float32).get_output(0), "roundtrip")
    net.output(net.network.add_cast(xin, trt.int32).get_output(0), "int")
    net.output(net.network.add_identity(xin).get_output(0), "same")
    out = net.run({"x": x})
    np.testing.assert_array_equal(out["roundtrip"], x.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(out["int"], [[-1, 0, 0, 2, 1000, 3]])
    assert out["int"].dtype == np.int32
    np.testing.assert_array_equal(out["same"], x)
    net.assert_builds()


# -- the executor's interface ----------------------------------------------------------------------
def _two_layer_net():
    net = Net()
    relu = net.network.add_activation(net.input("images", (1, 2, 3, 3)), trt.ActivationType.RELU)
    relu.name = "model.0"
    relu.get_output(0).name = "model.0"
    sig = net.network.add_activation(relu.get_output(0), trt.ActivationType.SIGMOID)
    sig.name = "model.1"
    net.output(sig.get_output(0), "model.1")
    return net


def test_keep_returns_named_intermediates():
    net, x = _two_layer_net(), randn(1, 2, 3, 3)
    out = net.run({"images": x}, keep=["model.0"])
    assert list(out) == ["model.1", "model.0"]
    close(out["model.0"], np.maximum(x, 0))
    assert set(net.run({"images": x}, keep="all")) == {"images", "model.0", "model.1"}
    with pytest.raises(TrtnetError, match=r"no tensor named 'model\.00'.*did you mean model\.0"):
        net.run({"images": x}, keep=["model.00"])
    net.assert_builds()


def test_inputs_are_checked_against_the_network():
    net = _two_layer_net()
    with pytest.raises(TrtnetError, match=r"missing \['images'\]"):
        net.run({"x": randn(1, 2, 3, 3)})
    with pytest.raises(TrtnetError, match=r"input images: got shape \[1, 2, 3, 4\]"):
        net.run({"images": randn(1, 2, 3, 4)})


def test_dtype_policies():
    net, x = _two_layer_net(), randn(1, 2, 3, 3)
    assert net.run({"images": x})["model.1"].dtype == np.float32
    as_float64 = net.run({"images": x}, dtype_policy="float64")["model.1"]
    assert as_float64.dtype == np.float64
    close(as_float64, 1 / (1 + np.exp(-np.maximum(x.astype(np.float64), 0))), rtol=1e-12, atol=1e-12)
    with pytest.raises(TrtnetError, match="dtype_policy"):
        net.run({"images": x}, dtype_policy="half")


def test_overrides_stand_in_for_a_layer():
    net, x = _two_layer_net(), randn(1, 2, 3, 3)
    out = net.run({"images": x}, overrides={"model.1": lambda xs: [xs[0] * 2]})
    close(out["model.1"], 2 * np.maximum(x, 0))


def test_a_wrong_shape_is_caught_by_tensorrts_shape_inference(monkeypatch):
    net = _two_layer_net()
    monkeypatch.setitem(executor._OPS, "ACTIVATION", lambda r, layer, xs: xs[0][..., :1])
    with pytest.raises(RuntimeError, match=r"layer 'model\.0'.*\[1, 2, 3, 1\].*declares \[1, 2, 3, 3\]"):
        net.run({"images": randn(1, 2, 3, 3)})


def test_describe_network():
    net = Net()
    conv = net.network.add_convolution_nd(net.input("x", (-1, 3, 8, 8)), 4, (3, 3),
                                          net.weights(randn(4, 3, 3, 3)), None)
    conv.stride_nd, conv.padding_nd, conv.name = (2, 2), (1, 1), "model.0.conv"
    conv.get_output(0).name = "model.0.conv"
    half = net.network.add_cast(conv.get_output(0), trt.float16)
    half.name = "model.0.cast"
    net.output(half.get_output(0), "out")
    infos = describe_network(net.network)
    assert [(i.index, i.name, i.type) for i in infos] == [(0, "model.0.conv", "CONVOLUTION"),
                                                          (1, "model.0.cast", "CAST")]
    assert infos[0].inputs == ("x",) and infos[0].outputs == ("model.0.conv",)
    assert infos[0].shapes == ((-1, 4, 4, 4),) and infos[1].dtypes == ("float16",)
    assert infos[0].params["stride_nd"] == (2, 2) and infos[0].params["pre_padding"] == (1, 1)
    assert infos[1].params == {"to_type": "HALF"}


# -- what the executor refuses ---------------------------------------------------------------------
def _unsupported_layers():
    def deconvolution(net, x):
        return net.network.add_deconvolution_nd(x, 3, (2, 2), net.weights(randn(3, 3, 2, 2)), None)

    def lrn(net, x):
        return net.network.add_lrn(x, 3, 1.0, 0.5, 1.0)

    def einsum(net, x):
        return net.network.add_einsum([x], "abcd->abdc")

    def cumulative(net, x):
        axis = net.constant(np.array(1, np.int32))
        return net.network.add_cumulative(x, axis, trt.CumulativeOperation.SUM, False, False)

    def non_zero(net, x):
        return net.network.add_non_zero(x)

    def cubic_resize(net, x):
        layer = net.network.add_resize(x)
        layer.scales, layer.resize_mode = [1.0, 1.0, 2.0, 2.0], trt.InterpolationMode.CUBIC
        return layer

    def gather_nd(net, x):
        layer = net.network.add_gather(x, net.constant(np.zeros((1, 2), np.int32)), 0)
        layer.mode = trt.GatherMode.ND
        return layer

    return {f.__name__: f for f in (deconvolution, lrn, einsum, cumulative, non_zero, cubic_resize, gather_nd)}


UNSUPPORTED = _unsupported_layers()


@pytest.mark.parametrize("make", UNSUPPORTED.values(), ids=UNSUPPORTED.keys())
def test_unsupported_layers_fail_loudly(make):
    net = Net()
    layer = make(net, net.input("x", (1, 3, 4, 4)))
    layer.name = "the.layer"
    net.output(layer.get_output(0))
    with pytest.raises(NotImplementedError, match=r"the\.layer"):
        net.run({"x": randn(1, 3, 4, 4)})
