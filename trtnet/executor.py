"""A CPU reference executor: runs the real INetworkDefinition layer by layer with torch.

CI has no GPU, so networks are proven right by executing the very network object the builder gets,
with each layer implemented after TensorRT's documented semantics, and comparing the tensors (named
after PyTorch modules: `model.4`, `layer2`) with goldens from the official PyTorch code.

Precision (`dtype_policy`):
- "network" (default): every tensor is stored in the dtype the network gives it. A layer upcasts its
  float16/bfloat16 inputs and weights to float32, computes in float32 and rounds its outputs once to
  the output dtype — TensorRT's fp16 kernels with fp32 accumulation. Kernels that accumulate in fp16
  differ more, so compare half graphs with fp16-sized tolerances.
- "float32": every floating tensor in float32, casts to half included (precision loss vs logic bugs).
- "float64": every floating tensor in float64 (debugging; weights keep the values the network holds).

Only `run_network` needs torch (imported on first use); build and runtime paths must not import this
module. Layer types without an implementation here raise NotImplementedError naming the layer.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import numpy as np

from trtnet.errors import TrtnetError

Keep = Union[str, Sequence[str], None]
Override = Callable[[Sequence[np.ndarray]], Sequence[np.ndarray]]

POLICIES = ("network", "float32", "float64")

# LayerType name → the ILayer subclass that exposes its parameters (`layer.__class__ = cls`).
_LAYER_CLASSES = {
    "ACTIVATION": "IActivationLayer",
    "CAST": "ICastLayer",
    "CONCATENATION": "IConcatenationLayer",
    "CONSTANT": "IConstantLayer",
    "CONVOLUTION": "IConvolutionLayer",
    "DECONVOLUTION": "IDeconvolutionLayer",
    "DEQUANTIZE": "IDequantizeLayer",
    "ELEMENTWISE": "IElementWiseLayer",
    "FILL": "IFillLayer",
    "GATHER": "IGatherLayer",
    "IDENTITY": "IIdentityLayer",
    "MATRIX_MULTIPLY": "IMatrixMultiplyLayer",
    "PADDING": "IPaddingLayer",
    "PARAMETRIC_RELU": "IParametricReLULayer",
    "POOLING": "IPoolingLayer",
    "QUANTIZE": "IQuantizeLayer",
    "REDUCE": "IReduceLayer",
    "RESIZE": "IResizeLayer",
    "SCALE": "IScaleLayer",
    "SELECT": "ISelectLayer",
    "SHAPE": "IShapeLayer",
    "SHUFFLE": "IShuffleLayer",
    "SLICE": "ISliceLayer",
    "SOFTMAX": "ISoftMaxLayer",
    "SQUEEZE": "ISqueezeLayer",
    "TOPK": "ITopKLayer",
    "UNARY": "IUnaryLayer",
    "UNSQUEEZE": "IUnsqueezeLayer",
}

# What describe_network reports per layer type (weights are left out; their shapes follow from these).
_PARAMS = {
    "ACTIVATION": ("type", "alpha", "beta"),
    "CAST": ("to_type",),
    "CONCATENATION": ("axis",),
    "CONSTANT": ("shape",),
    "CONVOLUTION": ("num_output_maps", "kernel_size_nd", "stride_nd", "pre_padding", "post_padding",
                    "dilation_nd", "num_groups", "padding_mode"),
    "DEQUANTIZE": ("axis",),
    "ELEMENTWISE": ("op",),
    "FILL": ("operation", "alpha", "beta"),
    "GATHER": ("axis", "mode", "num_elementwise_dims"),
    "MATRIX_MULTIPLY": ("op0", "op1"),
    "PADDING": ("pre_padding_nd", "post_padding_nd"),
    "POOLING": ("type", "window_size_nd", "stride_nd", "pre_padding", "post_padding", "padding_mode",
                "average_count_excludes_padding"),
    "QUANTIZE": ("axis",),
    "REDUCE": ("op", "axes", "keep_dims"),
    "RESIZE": ("scales", "resize_mode", "coordinate_transformation", "nearest_rounding"),
    "SCALE": ("mode", "channel_axis"),
    "SHUFFLE": ("first_transpose", "reshape_dims", "second_transpose", "zero_is_placeholder"),
    "SLICE": ("start", "shape", "stride", "mode"),
    "SOFTMAX": ("axes",),
    "TOPK": ("op", "k", "axes"),
    "UNARY": ("op",),
}

# TensorRT DataType name → (numpy dtype name, torch dtype attribute).
_DTYPES = {
    "FLOAT": ("float32", "float32"),
    "HALF": ("float16", "float16"),
    "BF16": ("bfloat16", "bfloat16"),
    "INT8": ("int8", "int8"),
    "UINT8": ("uint8", "uint8"),
    "INT32": ("int32", "int32"),
    "INT64": ("int64", "int64"),
    "BOOL": ("bool", "bool"),
}


@dataclass(frozen=True)
class LayerInfo:
    """One layer as `trtnet.inspect` prints it."""

    index: int
    name: str
    type: str  # LayerType name: "CONVOLUTION", "ELEMENTWISE", …
    inputs: tuple[str, ...]  # tensor names ("" for an unset optional input)
    outputs: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]  # as the network declares them (-1 = dynamic)
    dtypes: tuple[str, ...]  # numpy-style names: "float32", "float16", "int64", "bool", …
    params: dict[str, Any] = field(default_factory=dict, compare=False)


def describe_network(network) -> list[LayerInfo]:
    """Every layer of `network` in order, with its tensors and main parameters."""
    trt = trt_module(network)
    return [_describe(trt, i, network.get_layer(i)) for i in range(network.num_layers)]


def _describe(trt, index: int, layer) -> LayerInfo:
    kind = downcast(trt, layer)
    outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
    return LayerInfo(
        index=index,
        name=layer.name,
        type=kind,
        inputs=tuple(t.name if t is not None else "" for t in _layer_inputs(layer)),
        outputs=tuple(t.name for t in outputs),
        shapes=tuple(tuple(int(d) for d in t.shape) for t in outputs),
        dtypes=tuple(_dtype_name(_declared_dtype(layer, j)) for j in range(len(outputs))),
        params=_layer_params(layer, kind),
    )


def _layer_params(layer, kind: str) -> dict[str, Any]:
    params = {}
    for attr in _PARAMS.get(kind, ()):
        try:
            value = getattr(layer, attr)
        except Exception:  # some bindings raise where a parameter comes from an input tensor
            continue
        params[attr] = _plain(value)
    if kind == "SHUFFLE":  # permutations always hold 8 entries; keep the meaningful ones
        params["first_transpose"] = params["first_transpose"][: len(layer.get_input(0).shape)]
        params["second_transpose"] = params["second_transpose"][: len(layer.get_output(0).shape)]
    return params


def _plain(value: Any) -> Any:
    if hasattr(value, "name") and hasattr(value, "__int__"):  # a pybind11 enum
        return value.name
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    try:
        return tuple(_plain(v) for v in value)
    except TypeError:
        return str(value)


def run_network(
    network,
    inputs: Mapping[str, np.ndarray],
    *,
    keep: Keep = None,
    device: str = "cpu",
    dtype_policy: str = "network",
    overrides: Mapping[str, Override] | None = None,
) -> dict[str, np.ndarray]:
    """Execute `network` on `inputs` (by input name; -1 dims are taken from the arrays).

    Returns numpy arrays by tensor name: the network outputs, plus the tensors named in `keep` ("all":
    every tensor, inputs included), in the dtypes `dtype_policy` gives them (bfloat16 comes back as
    float32). `device` is a torch device ("cuda" runs fp32 without TF32). `overrides` maps a layer name
    to a numpy function (list of input arrays → list of output arrays) that stands in for that layer,
    e.g. a plugin this executor cannot run.
    """
    if dtype_policy not in POLICIES:
        raise TrtnetError(f"dtype_policy {dtype_policy!r}: use one of {', '.join(POLICIES)}")
    runner = _Runner(network, device, dtype_policy, overrides or {})
    return runner.run(inputs, keep)


class _Runner:
    def __init__(self, network, device: str, policy: str, overrides: Mapping[str, Override]):
        self.torch = _import_torch()
        self.trt = trt_module(network)
        self.network = network
        self.device = self.torch.device(device)
        self.policy = policy
        self.overrides = overrides
        self.compute = self.torch.float64 if policy == "float64" else self.torch.float32
        self.values: dict[str, Any] = {}

    # -- driver ------------------------------------------------------------------------------------
    def run(self, inputs: Mapping[str, np.ndarray], keep: Keep) -> dict[str, np.ndarray]:
        layers = [self.network.get_layer(i) for i in range(self.network.num_layers)]
        names = _tensor_names(self.network, layers)
        outputs = [self.network.get_output(i).name for i in range(self.network.num_outputs)]
        wanted = _wanted(keep, names, outputs)
        uses, kept = _use_counts(layers), set(wanted)
        self._load_inputs(inputs)
        with self._strict_fp32():
            for layer in layers:
                self._run_layer(layer)
                self._release(layer, uses, kept)
        return {name: self._to_numpy(self.values[name]) for name in wanted}

    def _run_layer(self, layer) -> None:
        kind = downcast(self.trt, layer)
        sources = _layer_inputs(layer)
        missing = [t.name for t in sources if t is not None and t.name not in self.values]
        if missing:
            raise RuntimeError(f"layer {layer.name}: input {missing[0]} is used before it is computed")
        xs = [self._for_compute(self.values[t.name]) if t is not None else None for t in sources]
        results = self._evaluate(layer, kind, xs)
        for j, y in enumerate(results):
            tensor = layer.get_output(j)
            y = self._store(y, _declared_dtype(layer, j))
            _check_shape(layer, tensor, tuple(y.shape))
            self.values[tensor.name] = y

    def _evaluate(self, layer, kind: str, xs: list) -> Sequence[Any]:
        if layer.name in self.overrides:
            arrays = [self._to_numpy(x) if x is not None else None for x in xs]
            return [self.torch.as_tensor(np.asarray(y), device=self.device)
                    for y in self.overrides[layer.name](arrays)]
        op = _OPS.get(kind)
        if op is None:
            raise NotImplementedError(
                f"layer {layer.name!r} of type {kind}: the CPU reference executor does not implement it "
                "(pass overrides={layer name: numpy function} to stand in for it)"
            )
        result = op(self, layer, xs)
        return result if isinstance(result, (list, tuple)) else [result]

    def _release(self, layer, uses: dict[str, int], kept: set[str]) -> None:
        """Drop tensors no later layer reads: memory holds a few activations, not the whole network."""
        for t in _layer_inputs(layer):
            if t is not None:
                uses[t.name] -= 1
        done = [t.name for t in _layer_inputs(layer) if t is not None and uses[t.name] == 0]
        unread = [layer.get_output(j).name for j in range(layer.num_outputs)]
        for name in done + [n for n in unread if n not in uses]:
            if name not in kept:
                self.values.pop(name, None)

    # -- inputs, dtypes ----------------------------------------------------------------------------
    def _load_inputs(self, inputs: Mapping[str, np.ndarray]) -> None:
        declared = [self.network.get_input(i) for i in range(self.network.num_inputs)]
        expected = {t.name: t for t in declared}
        unknown = sorted(set(inputs) - set(expected))
        missing = [n for n in expected if n not in inputs]
        if unknown or missing:
            listing = ", ".join(f"{n} {list(t.shape)}" for n, t in expected.items())
            raise TrtnetError(f"inputs: missing {missing}, unknown {unknown}; the network takes {listing}")
        for name, tensor in expected.items():
            array = np.asarray(inputs[name])
            _check_input_shape(name, tuple(tensor.shape), array.shape)
            numpy_name = _dtype_name(tensor.dtype)
            if numpy_name != "bfloat16":
                array = array.astype(numpy_name, copy=False)
            value = self.torch.as_tensor(np.ascontiguousarray(array), device=self.device)
            self.values[name] = self._store(value, tensor.dtype)

    def _store(self, y, trt_dtype):
        """`y` in the dtype its tensor is kept in under this policy."""
        target = _torch_dtype(self.torch, trt_dtype)
        if target.is_floating_point and self.policy != "network":
            target = self.compute
        return y.to(target)

    def _for_compute(self, x):
        return x.to(self.compute) if x.is_floating_point() else x

    def weights(self, w) -> Any:
        """A layer's weights (numpy from the bindings, or trt.Weights) as a compute tensor."""
        array = np.array(w.numpy() if hasattr(w, "numpy") else w)
        return self._for_compute(self.torch.as_tensor(array, device=self.device))

    def _to_numpy(self, x) -> np.ndarray:
        if x.dtype == self.torch.bfloat16:
            x = x.float()
        return x.detach().cpu().numpy()

    def _strict_fp32(self):
        """On CUDA, torch would run fp32 convolutions and matmuls in TF32; a reference must not."""
        return _Tf32Off(self.torch) if self.device.type == "cuda" else contextlib.nullcontext()

    def shape_values(self, x) -> list[int]:
        return [int(v) for v in x.reshape(-1).tolist()]


class _Tf32Off:
    def __init__(self, torch):
        self.flags = (torch.backends.cuda.matmul, torch.backends.cudnn)

    def __enter__(self):
        self.saved = [f.allow_tf32 for f in self.flags]
        for f in self.flags:
            f.allow_tf32 = False
        return self

    def __exit__(self, *exc):
        for f, value in zip(self.flags, self.saved):
            f.allow_tf32 = value
        return False


# -- graph helpers ---------------------------------------------------------------------------------
def trt_module(network):
    """The TensorRT flavour `network` comes from (tensorrt, tensorrt_rtx, …), for its layer classes."""
    module = sys.modules.get(type(network).__module__)
    if module is None or not hasattr(module, "LayerType"):
        raise TypeError(f"expected a TensorRT INetworkDefinition, got {type(network).__name__}")
    return module


def downcast(trt, layer) -> str:
    """The LayerType name; `layer` becomes its subclass so its parameters can be read."""
    kind = layer.type.name  # read before the downcast: IActivationLayer.type is the ActivationType
    cls = getattr(trt, _LAYER_CLASSES.get(kind, ""), None)
    if cls is not None:
        layer.__class__ = cls
    return kind


def _layer_inputs(layer) -> list:
    return [layer.get_input(i) for i in range(layer.num_inputs)]


def _tensor_names(network, layers) -> list[str]:
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    producers: dict[str, str] = {}
    for layer in layers:
        for j in range(layer.num_outputs):
            name = layer.get_output(j).name
            if name in producers or name in names:
                raise TrtnetError(
                    f"tensor name {name!r} is produced twice (layers {producers.get(name, 'input')!r} and "
                    f"{layer.name!r}): tensors must have unique names to be compared by name"
                )
            producers[name] = layer.name
            names.append(name)
    return names


def _wanted(keep: Keep, names: list[str], outputs: list[str]) -> list[str]:
    if keep == "all":
        return names
    if isinstance(keep, str):
        keep = [keep]
    known = set(names)
    for name in keep or ():
        if name not in known:
            close = difflib.get_close_matches(name, names, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise TrtnetError(f"keep: the network has no tensor named {name!r}{hint}")
    return list(dict.fromkeys([*outputs, *(keep or ())]))


def _use_counts(layers) -> dict[str, int]:
    uses: dict[str, int] = {}
    for layer in layers:
        for t in _layer_inputs(layer):
            if t is not None:
                uses[t.name] = uses.get(t.name, 0) + 1
    return uses


def _declared_dtype(layer, index: int):
    """The output's dtype; TensorRT 8.5 casts with an identity layer whose output type is set."""
    is_set = getattr(layer, "output_type_is_set", None)
    if is_set is not None and is_set(index):
        return layer.get_output_type(index)
    return layer.get_output(index).dtype


def _dtype_name(trt_dtype) -> str:
    name = trt_dtype.name
    return _DTYPES[name][0] if name in _DTYPES else name.lower()


def _torch_dtype(torch, trt_dtype):
    name = trt_dtype.name
    if name not in _DTYPES:
        raise NotImplementedError(f"the CPU reference executor has no {name} tensors")
    return getattr(torch, _DTYPES[name][1])


def _check_input_shape(name: str, declared: tuple[int, ...], actual: tuple[int, ...]) -> None:
    fits = len(declared) == len(actual) and all(d in (-1, a) for d, a in zip(declared, actual))
    if not fits:
        raise TrtnetError(f"input {name}: got shape {list(actual)}, the network takes {list(declared)}")


def _check_shape(layer, tensor, actual: tuple[int, ...]) -> None:
    # TensorRT's own shape inference is an oracle for every static dimension we compute.
    declared = tuple(int(d) for d in tensor.shape)
    if len(declared) != len(actual) or any(d not in (-1, a) for d, a in zip(declared, actual)):
        raise RuntimeError(
            f"reference executor: layer {layer.name!r} made {tensor.name} with shape {list(actual)}, "
            f"TensorRT declares {list(declared)}"
        )


def _axes(bitmask: int, rank: int) -> list[int]:
    return [i for i in range(rank) if bitmask >> i & 1]


def _single_axis(layer, bitmask: int, rank: int) -> int:
    axes = _axes(bitmask, rank)
    if len(axes) != 1:
        raise NotImplementedError(f"layer {layer.name!r}: axes bitmask {bitmask:#b} must name one axis")
    return axes[0]


def _import_torch():
    try:
        import torch
    except ImportError as exc:
        raise TrtnetError(
            "the CPU reference executor needs PyTorch: pip install torch (or pip install 'trtnet[export]')"
        ) from exc
    return torch


# -- convolution and pooling -----------------------------------------------------------------------
def _window_padding(layer, spatial: Sequence[int], window: Sequence[int], stride: Sequence[int],
                    dilation: Sequence[int]) -> tuple[list[int], list[int], list[int]]:
    """(pre, post, extra) padding per spatial axis; `extra` is the uncounted tail EXPLICIT_ROUND_UP
    needs for its last window. Formulas from TensorRT's PaddingMode documentation."""
    mode = layer.padding_mode.name
    extents = [1 + d * (f - 1) for f, d in zip(window, dilation)]
    if mode.startswith("SAME"):
        total = [max(0, (i - 1) // s * s + k - i) for i, s, k in zip(spatial, stride, extents)]
        small, large = [p // 2 for p in total], [p - p // 2 for p in total]
        pre, post = (small, large) if mode == "SAME_UPPER" else (large, small)
        return pre, post, [0] * len(spatial)
    pre, post = list(layer.pre_padding), list(layer.post_padding)
    extra = [0] * len(spatial)
    if mode.endswith("ROUND_UP"):  # EXPLICIT_ROUND_UP; CAFFE_ROUND_UP on TensorRT 8.x
        for i, (size, s, k) in enumerate(zip(spatial, stride, extents)):
            m = size + pre[i] + post[i]
            out = -(-(m - k) // s) + 1
            extra[i] = max(0, (out - 1) * s + k - m)
    return pre, post, extra


def _pad(torch, x, pre: Sequence[int], post: Sequence[int], value: float = 0.0):
    # F.pad lists pads from the last axis backwards; negative pads crop.
    pads = [p for before, after in zip(reversed(pre), reversed(post)) for p in (before, after)]
    return torch.nn.functional.pad(x, pads, value=value) if any(pads) else x


def _convolution(r: _Runner, layer, xs: list):
    torch, F = r.torch, r.torch.nn.functional
    x = xs[0]
    kernel = xs[1] if len(xs) > 1 and xs[1] is not None else r.weights(layer.kernel)
    bias = xs[2] if len(xs) > 2 and xs[2] is not None else r.weights(layer.bias)
    window = tuple(layer.kernel_size_nd)
    nd, groups = len(window), layer.num_groups
    kernel = kernel.reshape(layer.num_output_maps, x.shape[-nd - 1] // groups, *window)
    stride, dilation = tuple(layer.stride_nd), tuple(layer.dilation_nd)
    pre, post, extra = _window_padding(layer, x.shape[-nd:], window, stride, dilation)
    x = _pad(torch, x, pre, [p + e for p, e in zip(post, extra)])
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    return conv(x, kernel, bias.reshape(-1) if bias.numel() else None, stride, 0, dilation, groups)


def _pooling(r: _Runner, layer, xs: list):
    torch, F = r.torch, r.torch.nn.functional
    x = xs[0]
    window = tuple(layer.window_size_nd)
    nd, stride, kind = len(window), tuple(layer.stride_nd), layer.type.name
    pre, post, extra = _window_padding(layer, x.shape[-nd:], window, stride, (1,) * nd)
    tail = [p + e for p, e in zip(post, extra)]
    if kind in ("MAX", "MAX_AVERAGE_BLEND"):
        max_pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nd]
        peak = max_pool(_pad(torch, x, pre, tail, -math.inf), window, stride)
        if kind == "MAX":
            return peak
    avg_pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
    total = avg_pool(_pad(torch, x, pre, tail), window, stride)
    # The divisor: the window's overlap with the input, or with the explicitly padded input.
    ones = torch.ones((1,) * (x.dim() - nd) + tuple(x.shape[-nd:]), dtype=x.dtype, device=x.device)
    counted = _pad(torch, ones, pre, post, 0.0 if layer.average_count_excludes_padding else 1.0)
    mean = total / avg_pool(_pad(torch, counted, [0] * nd, extra), window, stride)
    if kind == "AVERAGE":
        return mean
    blend = layer.blend_factor
    return (1 - blend) * peak + blend * mean


# -- pointwise -------------------------------------------------------------------------------------
def _activation(r: _Runner, layer, xs: list):
    torch, x = r.torch, xs[0]
    a, b, kind = layer.alpha, layer.beta, layer.type.name
    formulas = {
        "RELU": lambda: torch.relu(x),
        "SIGMOID": lambda: torch.sigmoid(x),
        "TANH": lambda: torch.tanh(x),
        "LEAKY_RELU": lambda: torch.where(x >= 0, x, a * x),
        "ELU": lambda: torch.where(x >= 0, x, a * torch.expm1(x)),
        "SELU": lambda: torch.where(x >= 0, b * x, b * (a * torch.exp(x) - a)),
        "SOFTSIGN": lambda: x / (1 + x.abs()),
        "SOFTPLUS": lambda: a * torch.nn.functional.softplus(b * x),
        "CLIP": lambda: torch.clamp(x, a, b),
        "HARD_SIGMOID": lambda: torch.clamp(a * x + b, 0, 1),
        "SCALED_TANH": lambda: a * torch.tanh(b * x),
        # The C++ header says x > alpha ? x : 0 (the operator page's max(0, x - alpha) disagrees).
        "THRESHOLDED_RELU": lambda: torch.where(x > a, x, torch.zeros_like(x)),
        "GELU_ERF": lambda: 0.5 * x * (1 + torch.erf(x * math.sqrt(0.5))),
        "GELU_TANH": lambda: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (0.044715 * x**3 + x))),
    }
    if kind not in formulas:
        raise NotImplementedError(f"layer {layer.name!r}: activation {kind}")
    return formulas[kind]()


def _elementwise(r: _Runner, layer, xs: list):
    torch, (a, b), op = r.torch, xs, layer.op.name
    integer = not a.is_floating_point()
    formulas = {
        "SUM": lambda: a + b,
        "PROD": lambda: a * b,
        "MAX": lambda: torch.maximum(a, b),
        "MIN": lambda: torch.minimum(a, b),
        "SUB": lambda: a - b,
        "DIV": lambda: torch.div(a, b, rounding_mode="trunc") if integer else a / b,
        "POW": lambda: torch.pow(a, b),
        "FLOOR_DIV": lambda: torch.div(a, b, rounding_mode="floor"),
        "AND": lambda: torch.logical_and(a, b),
        "OR": lambda: torch.logical_or(a, b),
        "XOR": lambda: torch.logical_xor(a, b),
        "EQUAL": lambda: a == b,
        "GREATER": lambda: a > b,
        "LESS": lambda: a < b,
    }
    if op not in formulas:
        raise NotImplementedError(f"layer {layer.name!r}: elementwise {op}")
    return formulas[op]()


_UNARY = {
    "EXP": "exp", "LOG": "log", "SQRT": "sqrt", "RECIP": "reciprocal", "ABS": "abs", "NEG": "neg",
    "SIN": "sin", "COS": "cos", "TAN": "tan", "SINH": "sinh", "COSH": "cosh", "ASIN": "asin",
    "ACOS": "acos", "ATAN": "atan", "ASINH": "asinh", "ACOSH": "acosh", "ATANH": "atanh",
    "CEIL": "ceil", "FLOOR": "floor", "ERF": "erf", "NOT": "logical_not", "SIGN": "sign",
    "ROUND": "round",  # half to even, like TensorRT
    "ISINF": "isinf", "ISNAN": "isnan",
}


def _unary(r: _Runner, layer, xs: list):
    op = layer.op.name
    if op not in _UNARY:
        raise NotImplementedError(f"layer {layer.name!r}: unary {op}")
    return getattr(r.torch, _UNARY[op])(xs[0])


def _scale(r: _Runner, layer, xs: list):
    """(x * scale + shift) ** power with uniform, per-channel or per-element coefficients."""
    x, mode = xs[0], layer.mode.name
    axis = layer.channel_axis % x.dim()
    if mode == "UNIFORM":
        shape: tuple[int, ...] = ()
    elif mode == "CHANNEL":
        shape = (x.shape[axis],) + (1,) * (x.dim() - axis - 1)
    else:  # ELEMENTWISE: one coefficient per element from the channel axis on
        shape = tuple(x.shape[axis:])
    scale, shift, power = (r.weights(getattr(layer, name)) for name in ("scale", "shift", "power"))
    if scale.numel():  # unset coefficients come back empty: scale 1, shift 0, power 1
        x = x * scale.reshape(shape)
    if shift.numel():
        x = x + shift.reshape(shape)
    if power.numel():
        x = x ** power.reshape(shape)
    return x


def _parametric_relu(r: _Runner, layer, xs: list):
    x, slope = xs
    return r.torch.where(x >= 0, x, x * slope)


def _select(r: _Runner, layer, xs: list):
    return r.torch.where(*xs)


def _pass_through(r: _Runner, layer, xs: list):
    # Cast and identity: the conversion to the output tensor's dtype happens for every layer
    # (float → int truncates toward zero, like TensorRT's cast).
    return xs[0]


# -- tensor layout ---------------------------------------------------------------------------------
def _concatenation(r: _Runner, layer, xs: list):
    return r.torch.cat(xs, dim=layer.axis % xs[0].dim())


def _constant(r: _Runner, layer, xs: list):
    return r.weights(layer.weights).reshape(tuple(layer.shape))


def _shape(r: _Runner, layer, xs: list):
    return r.torch.tensor(tuple(xs[0].shape), dtype=r.torch.int64, device=r.device)


def _shuffle(r: _Runner, layer, xs: list):
    x = xs[0].permute(tuple(layer.first_transpose)[: xs[0].dim()])
    dims = r.shape_values(xs[1]) if len(xs) > 1 and xs[1] is not None else _reshape_dims(layer)
    if dims is not None:
        if layer.zero_is_placeholder:
            dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
        x = x.reshape(tuple(dims))
    return x.permute(tuple(layer.second_transpose)[: x.dim()])


def _reshape_dims(layer):
    try:
        return layer.reshape_dims  # None when unset
    except ValueError:  # older bindings refuse to convert unset Dims (nbDims = -1)
        return None


def _padding(r: _Runner, layer, xs: list):
    pre, post = tuple(layer.pre_padding_nd), tuple(layer.post_padding_nd)
    return _pad(r.torch, xs[0], pre, post)


def _squeeze(r: _Runner, layer, xs: list):
    x = xs[0]
    return x.squeeze(tuple(a % x.dim() for a in r.shape_values(xs[1])))


def _unsqueeze(r: _Runner, layer, xs: list):
    x = xs[0]
    rank = x.dim() + xs[1].numel()
    for a in sorted(a % rank for a in r.shape_values(xs[1])):
        x = x.unsqueeze(a)
    return x


def _slice(r: _Runner, layer, xs: list):
    torch, x = r.torch, xs[0]

    def given(i: int, attr: str):
        if len(xs) > i and xs[i] is not None:
            return r.shape_values(xs[i])
        value = getattr(layer, attr, None)
        return None if value is None else [int(v) for v in value]

    start, size, stride = given(1, "start"), given(2, "shape"), given(3, "stride")
    axes = given(5, "axes")
    if axes is not None:  # start/size/stride name only these axes; the others are taken whole
        full_start, full_size, full_stride = [0] * x.dim(), list(x.shape), [1] * x.dim()
        for k, axis in enumerate(a % x.dim() for a in axes):
            full_start[axis], full_size[axis], full_stride[axis] = start[k], size[k], stride[k]
        start, size, stride = full_start, full_size, full_stride
    mode = layer.mode.name
    fill = xs[4].reshape(()) if len(xs) > 4 and xs[4] is not None else 0
    for axis in range(x.dim()):
        d = x.shape[axis]
        index = start[axis] + torch.arange(size[axis], device=x.device) * stride[axis]
        inside = (index >= 0) & (index < d)
        if mode in ("STRICT_BOUNDS", "DEFAULT") and not bool(inside.all()):
            raise RuntimeError(f"layer {layer.name!r}: slice reads outside axis {axis} (size {d})")
        if mode == "WRAP":
            index = torch.remainder(index, d)
        elif mode == "REFLECT":
            c = torch.remainder(index.abs(), max(2 * d - 2, 1))
            index = torch.where(c >= d, 2 * d - 2 - c, c)
        x = x.index_select(axis, index.clamp(0, d - 1))  # CLAMP, and FILL before filling
        if mode == "FILL":
            mask = inside.reshape((-1,) + (1,) * (x.dim() - axis - 1))
            x = torch.where(mask, x, torch.as_tensor(fill, dtype=x.dtype, device=x.device))
    return x


# -- resize ----------------------------------------------------------------------------------------
def _resize(r: _Runner, layer, xs: list):
    x = xs[0]
    out_shape = _resize_output_shape(r, layer, xs)
    mode = layer.resize_mode.name
    if mode not in ("NEAREST", "LINEAR"):
        raise NotImplementedError(f"layer {layer.name!r}: resize mode {mode}")
    for axis, (size_in, size_out) in enumerate(zip(x.shape, out_shape)):
        if size_in == size_out:
            continue  # every coordinate transformation maps an unresized axis onto itself
        coords = _source_coordinates(r, layer, size_in, size_out)
        x = _nearest(r, layer, x, axis, coords) if mode == "NEAREST" else _linear(r, x, axis, coords)
    return x


def _resize_output_shape(r: _Runner, layer, xs: list) -> list[int]:
    x = xs[0]
    if len(xs) > 1 and xs[1] is not None:  # a shape tensor, or (floating) scales
        if not xs[1].is_floating_point():
            return r.shape_values(xs[1])
        scales = [float(s) for s in xs[1].reshape(-1).tolist()]
    else:
        scales = list(layer.scales)  # read scales first: reading `shape` when scales are set logs errors
        if not scales:
            return [int(d) for d in layer.shape]
    return [int(math.floor(d * s)) for d, s in zip(x.shape, scales)]


def _source_coordinates(r: _Runner, layer, size_in: int, size_out: int):
    """Input coordinates of each output index (TensorRT's ResizeCoordinateTransformation)."""
    torch = r.torch
    out = torch.arange(size_out, dtype=torch.float64, device=r.device)
    if size_out == 1 and layer.selector_for_single_pixel.name == "UPPER":
        return torch.zeros_like(out)
    transform = layer.coordinate_transformation.name
    if transform == "ALIGN_CORNERS":
        return out * ((size_in - 1) / (size_out - 1)) if size_out > 1 else torch.zeros_like(out)
    if transform == "HALF_PIXEL":
        return (out + 0.5) * (size_in / size_out) - 0.5
    return out * (size_in / size_out)  # ASYMMETRIC


def _nearest(r: _Runner, layer, x, axis: int, coords):
    torch, rounding = r.torch, layer.nearest_rounding.name
    index = {
        "FLOOR": torch.floor,
        "CEIL": torch.ceil,
        "HALF_UP": lambda c: torch.floor(c + 0.5),
        "HALF_DOWN": lambda c: torch.ceil(c - 0.5),
    }[rounding](coords)
    return x.index_select(axis, index.long().clamp(0, x.shape[axis] - 1))


def _linear(r: _Runner, x, axis: int, coords):
    size = x.shape[axis]
    coords = coords.clamp(0, size - 1)
    low = coords.floor().long()
    high = (low + 1).clamp(max=size - 1)
    weight = (coords - low).to(x.dtype).reshape((-1,) + (1,) * (x.dim() - axis - 1))
    a, b = x.index_select(axis, low), x.index_select(axis, high)
    return a + (b - a) * weight


# -- reductions, matmul, selection -----------------------------------------------------------------
def _reduce(r: _Runner, layer, xs: list):
    torch, x, op = r.torch, xs[0], layer.op.name
    axes, keep = _axes(layer.axes, x.dim()), layer.keep_dims
    if op == "PROD":
        for axis in sorted(axes, reverse=True):
            x = torch.prod(x, dim=axis, keepdim=keep)
        return x
    functions = {"SUM": torch.sum, "AVG": torch.mean, "MAX": torch.amax, "MIN": torch.amin}
    if op not in functions:
        raise NotImplementedError(f"layer {layer.name!r}: reduce {op}")
    return functions[op](x, dim=axes, keepdim=keep)


def _softmax(r: _Runner, layer, xs: list):
    x = xs[0]
    return r.torch.softmax(x, dim=_single_axis(layer, layer.axes, x.dim()))


def _topk(r: _Runner, layer, xs: list):
    x = xs[0]
    k = r.shape_values(xs[1])[0] if len(xs) > 1 and xs[1] is not None else layer.k
    axis = _single_axis(layer, layer.axes, x.dim())
    values, indices = r.torch.topk(x, k, dim=axis, largest=layer.op.name == "MAX", sorted=True)
    return values, indices


def _matrix_multiply(r: _Runner, layer, xs: list):
    a, b = xs
    op0, op1 = layer.op0.name, layer.op1.name
    a = a.transpose(-1, -2) if op0 == "TRANSPOSE" else a.unsqueeze(-2) if op0 == "VECTOR" else a
    b = b.transpose(-1, -2) if op1 == "TRANSPOSE" else b.unsqueeze(-1) if op1 == "VECTOR" else b
    y = r.torch.matmul(a, b)
    if op1 == "VECTOR":
        y = y.squeeze(-1)
    if op0 == "VECTOR":
        y = y.squeeze(-1 if op1 == "VECTOR" else -2)
    return y


def _fill(r: _Runner, layer, xs: list):
    """LINSPACE only: alpha + beta * index along a 1-D output (the shape from input 0 or the layer)."""
    if layer.operation.name != "LINSPACE":
        raise NotImplementedError(f"layer {layer.name!r}: fill operation {layer.operation.name}")
    shape = r.shape_values(xs[0]) if xs and xs[0] is not None else [int(d) for d in layer.shape]
    if len(shape) != 1 or len(xs) > 1:
        raise NotImplementedError(f"layer {layer.name!r}: linspace of shape {shape} or with alpha/beta tensors")
    index = r.torch.arange(shape[0], dtype=r.torch.float64, device=r.device)
    return (float(layer.alpha) + float(layer.beta) * index).to(r.torch.float32)


def _gather(r: _Runner, layer, xs: list):
    torch, (data, indices) = r.torch, xs
    axis, mode = layer.axis % data.dim(), layer.mode.name
    indices = torch.where(indices < 0, indices + data.shape[axis], indices).long()
    if mode == "ELEMENT":
        return torch.gather(data, axis, indices)
    if mode != "DEFAULT" or layer.num_elementwise_dims not in (0, 1):
        raise NotImplementedError(
            f"layer {layer.name!r}: gather mode {mode} with {layer.num_elementwise_dims} elementwise dims"
        )
    if layer.num_elementwise_dims == 1:  # the leading axis pairs data and indices one to one
        return torch.stack([_take(t, i, axis - 1) for t, i in zip(data, indices)])
    return _take(data, indices, axis)


def _take(data, indices, axis: int):
    picked = data.index_select(axis, indices.reshape(-1))
    return picked.reshape(tuple(data.shape[:axis]) + tuple(indices.shape) + tuple(data.shape[axis + 1:]))


# -- INT8 ------------------------------------------------------------------------------------------
def _quantize(r: _Runner, layer, xs: list):
    """TensorRT's IQuantizeLayer: clamp(round_half_to_even(x / scale), -128, 127), per tensor (scalar
    scale) or per channel along `axis`; the int8 output dtype is applied on store, exactly."""
    x = xs[0]
    return r.torch.clamp(r.torch.round(x / _qdq_scale(layer, xs[1], x.dim())), -128, 127)


def _dequantize(r: _Runner, layer, xs: list):
    """TensorRT's IDequantizeLayer: q * scale."""
    scale = _qdq_scale(layer, xs[1], xs[0].dim())
    return xs[0].to(scale.dtype) * scale


def _qdq_scale(layer, scale, rank: int):
    if scale.numel() == 1:
        return scale.reshape(())
    axis = layer.axis % rank
    return scale.reshape((1,) * axis + (-1,) + (1,) * (rank - axis - 1))


_OPS: dict[str, Callable[[_Runner, Any, list], Any]] = {
    "ACTIVATION": _activation,
    "CAST": _pass_through,
    "CONCATENATION": _concatenation,
    "CONSTANT": _constant,
    "CONVOLUTION": _convolution,
    "DEQUANTIZE": _dequantize,
    "ELEMENTWISE": _elementwise,
    "FILL": _fill,
    "GATHER": _gather,
    "IDENTITY": _pass_through,
    "MATRIX_MULTIPLY": _matrix_multiply,
    "PADDING": _padding,
    "PARAMETRIC_RELU": _parametric_relu,
    "POOLING": _pooling,
    "QUANTIZE": _quantize,
    "REDUCE": _reduce,
    "RESIZE": _resize,
    "SCALE": _scale,
    "SELECT": _select,
    "SHAPE": _shape,
    "SHUFFLE": _shuffle,
    "SLICE": _slice,
    "SOFTMAX": _softmax,
    "SQUEEZE": _squeeze,
    "TOPK": _topk,
    "UNARY": _unary,
    "UNSQUEEZE": _unsqueeze,
}
