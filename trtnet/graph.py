"""`Graph`: a thin builder over an INetworkDefinition that speaks PyTorch.

Weights are looked up by their PyTorch state-dict names and checked against the shapes the
architecture implies, before TensorRT sees them; tensors are named after the PyTorch modules that
produce them (`model.4`, `layer2`), so errors, goldens and `trtnet.inspect` all use one vocabulary.
Precision and TensorRT-version details come from `trtnet.compat`; network modules never ask.

INT8 (explicit quantization): given a `trtnet.quant.plan.QuantPlan`, `conv` quantizes its input
(per tensor) and its weights (per output channel, axis 0) with Q/DQ pairs, and `add` reads the
dequantized copy of an input that is already quantized — the placement of TensorRT's developer guide
("Q/DQ Layer-Placement Recommendations"): quantize all inputs of weighted operations, not their outputs,
and quantize the residual input of an addition so TensorRT fuses the addition into the convolution
before it. A concatenation gets no Q/DQ of its own; when it feeds convolutions, its one output is
quantized with one scale, which is the shared scale TensorRT needs to run the concatenation in INT8.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from trtnet import compat
from trtnet.errors import TrtnetError

if TYPE_CHECKING:
    from trtnet.quant.plan import QuantPlan

class WeightStore:
    """Tensors by PyTorch name; every tensor must be used exactly once, with the shape expected."""

    def __init__(self, tensors: Mapping[str, np.ndarray], source: str = "weights"):
        self.tensors = tensors
        self.source = source
        self.used: set[str] = set()

    def take(self, name: str, shape: Sequence[int]) -> np.ndarray:
        shape = tuple(int(d) for d in shape)
        if name not in self.tensors:
            raise TrtnetError(f"{self.source}: missing tensor {name} (expected shape {list(shape)})")
        array = np.asarray(self.tensors[name], dtype=np.float32)
        if array.shape != shape:
            if array.ndim == 1 and array.size == int(np.prod(shape)):
                array = array.reshape(shape)  # .wts files carry no shapes
            else:
                raise TrtnetError(
                    f"{self.source}: tensor {name} has shape {list(array.shape)}, the network expects "
                    f"{list(shape)} — are these weights for this architecture and class count?"
                )
        self.used.add(name)
        return array

    def has(self, name: str) -> bool:
        return name in self.tensors

    def ensure_all_used(self, ignore: Sequence[str] = ()) -> None:
        extra = [n for n in self.tensors if n not in self.used and not any(n.endswith(s) for s in ignore)]
        if extra:
            shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
            raise TrtnetError(f"{self.source}: {len(extra)} tensor(s) not used by the network: {shown}")


class ShapeRecorder(WeightStore):
    """A store that hands out random weights of whatever shape the network asks for, and records
    the shapes: the expected state-dict layout of an architecture, without a checkpoint."""

    def __init__(self, seed: int = 0):
        super().__init__({}, "shape recorder")
        self.shapes: dict[str, tuple] = {}
        self.rng = np.random.default_rng(seed)

    def take(self, name: str, shape: Sequence[int]) -> np.ndarray:
        shape = tuple(int(d) for d in shape)
        self.shapes[name] = shape
        self.used.add(name)
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        values = self.rng.standard_normal(shape).astype(np.float32) / np.sqrt(fan_in)
        return np.abs(values) + 0.5 if name.endswith("running_var") else values

    def has(self, name: str) -> bool:
        return True


def fold_batchnorm(w: np.ndarray, bn: Mapping[str, np.ndarray], eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Conv weight and bias with the BatchNorm that follows it folded in (in float64, then float32)."""
    scale = bn["weight"].astype(np.float64) / np.sqrt(bn["running_var"].astype(np.float64) + eps)
    weight = w.astype(np.float64) * scale.reshape(-1, 1, 1, 1)
    bias = bn["bias"].astype(np.float64) - bn["running_mean"].astype(np.float64) * scale
    return weight.astype(np.float32), bias.astype(np.float32)


class Graph:
    """Adds layers to `network`; `dtype` is the in-graph compute type (compat.compute_dtype)."""

    def __init__(self, network, weights: WeightStore, dtype: np.dtype, bn_eps: float = 1e-5,
                 quant: QuantPlan | None = None):
        self.network = network
        self.weights = weights
        self.dtype = np.dtype(dtype)
        self.bn_eps = bn_eps
        self.activation = "silu"  # the default activation of conv blocks; a network may change it
        self.trt = compat.trt()
        self._keep: list[np.ndarray] = []  # TensorRT may read weight buffers until the build ends
        self.quant = quant
        self._dequantized: dict[str, Any] = {}  # tensor name → its Q/DQ copy
        self._calibrated_as: dict[str, str] = {}  # input casts → the input name calibration saw
        self.residuals: dict[str, str] = {}  # residual add layer → its shortcut tensor (calibrated too)

    # -- I/O ---------------------------------------------------------------------------------------
    def input(self, name: str, shape: Sequence[int]):
        x = self.network.add_input(name, self.trt.float32, tuple(shape))
        self._calibrated_as[f"{name}.cast"] = name
        return self._to_compute(x, f"{name}.cast")

    def output(self, x, name: str) -> None:
        """Mark `x` as the float32 network output `name` (cast back from the compute type if needed)."""
        if x.dtype == self.trt.float32:
            x.name = name
        else:
            x.name = f"{name}.{self.dtype.name}"
            x = self._named(compat.cast(self.network, x, np.float32), f"{name}.cast", tensor=name)
        self.network.mark_output(x)

    def _to_compute(self, x, name: str):
        if self.dtype == np.float32:
            return x
        return self._named(compat.cast(self.network, x, self.dtype), name)

    # -- weights -----------------------------------------------------------------------------------
    def const_weights(self, array: np.ndarray):
        array = np.ascontiguousarray(array, dtype=self.dtype)
        self._keep.append(array)
        return self.trt.Weights(array)

    def conv_weights(self, prefix: str, c1: int, c2: int, k: int, g: int, bn: str | None):
        w = self.weights.take(f"{prefix}.weight", (c2, c1 // g, k, k))
        if bn:
            stats = {s: self.weights.take(f"{bn}.{s}", (c2,)) for s in _BN_STATS}
            return fold_batchnorm(w, stats, self.bn_eps)
        bias_name = f"{prefix}.bias"
        b = self.weights.take(bias_name, (c2,)) if self.weights.has(bias_name) else np.zeros(c2, np.float32)
        return w, b

    # -- layers ------------------------------------------------------------------------------------
    def conv(self, x, prefix: str, c2: int, k: int = 1, s: int = 1, p: int | None = None, g: int = 1,
             bn: str | None = None, name: str | None = None):
        """Conv2d `prefix.weight` (+ its bias, or + the BatchNorm named `bn` folded in)."""
        c1 = x.shape[1]
        w, b = self.conv_weights(prefix, c1, c2, k, g, bn)
        name = name or prefix
        int8 = self.quant is not None and self.quant.quantizes(name, prefix)
        if int8:  # Q/DQ layers come first: the executor runs layers in the order they were added
            x, kernel = self._quantized(x, name), self._quantized_weights(w, name)
        weights = compat.empty_weights(self.dtype) if int8 else self.const_weights(w)
        layer = self.network.add_convolution_nd(x, c2, (k, k), weights, self.const_weights(b))
        if int8:
            layer.set_input(1, kernel)
        layer.stride_nd = (s, s)
        layer.padding_nd = (k // 2, k // 2) if p is None else (p, p)
        layer.num_groups = g
        return self._named(layer, name)

    def act(self, x, kind: str, name: str):
        t = self.trt
        if kind == "silu":
            sig = self._named(self.network.add_activation(x, t.ActivationType.SIGMOID), f"{name}.sigmoid")
            return self._named(self.network.add_elementwise(x, sig, t.ElementWiseOperation.PROD), name)
        if kind == "relu":
            return self._named(self.network.add_activation(x, t.ActivationType.RELU), name)
        if kind.startswith("leaky_relu"):
            layer = self.network.add_activation(x, t.ActivationType.LEAKY_RELU)
            layer.alpha = float(kind.partition(":")[2] or 0.01)
            return self._named(layer, name)
        if kind == "identity":
            return x
        raise TrtnetError(f"{name}: unsupported activation {kind!r} (silu, relu, leaky_relu:<slope>)")

    def add(self, a, b, name: str):
        if self.quant is not None:  # the residual input, quantized already for a convolution
            a, b = (self._dequantized.get(t.name, t) for t in (a, b))
        return self._named(self.network.add_elementwise(a, b, self.trt.ElementWiseOperation.SUM), name)

    def residual_add(self, y, shortcut, name: str):
        """y + shortcut, the shortcut skipping the layers that made y. In INT8 the shortcut is read through Q/DQ
        (NVIDIA's placement): TensorRT then fuses the add into y's convolution with an INT8 output, into which
        the next Q folds; a float shortcut keeps that output in float and the next Q a layer of its own. A
        calibration without the shortcut's range (made before trtnet calibrated shortcuts) leaves it float."""
        self.residuals[name] = shortcut.name
        if self.quant is not None and self.quant.quantizes(name) and (
                shortcut.name in self._dequantized or self.quant.has_range(shortcut.name)):
            shortcut = self._quantized(shortcut, name)
        return self.add(y, shortcut, name)

    def concat(self, xs: Sequence[Any], name: str, axis: int = 1):
        layer = self.network.add_concatenation(list(xs))
        layer.axis = axis
        return self._named(layer, name)

    def maxpool(self, x, k: int, s: int, p: int, name: str):
        layer = self.network.add_pooling_nd(x, self.trt.PoolingType.MAX, (k, k))
        layer.stride_nd = (s, s)
        layer.padding_nd = (p, p)
        return self._named(layer, name)

    def upsample(self, x, scale: int, name: str):
        layer = self.network.add_resize(x)
        layer.scales = [1.0, 1.0, float(scale), float(scale)]
        compat.set_nearest_resize(layer)
        return self._named(layer, name)

    def global_avgpool(self, x, name: str):
        layer = self.network.add_reduce(x, self.trt.ReduceOperation.AVG, (1 << 2) | (1 << 3), True)
        return self._named(layer, name)

    def shuffle(self, x, reshape: Sequence[int], name: str, transpose: Sequence[int] | None = None):
        layer = self.network.add_shuffle(x)
        layer.reshape_dims = tuple(reshape)
        if transpose is not None:
            layer.second_transpose = tuple(transpose)
        return self._named(layer, name)

    def linear(self, x, prefix: str, c2: int, name: str | None = None):
        """nn.Linear on [B, C] (or [B, C, 1, 1], flattened first) as a matrix multiply + bias."""
        c1 = x.shape[1]
        if len(x.shape) != 2:
            x = self.shuffle(x, (0, c1), f"{prefix}.flatten")
        w = self.weights.take(f"{prefix}.weight", (c2, c1))
        b = self.weights.take(f"{prefix}.bias", (c2,))
        wt = self._named(self.network.add_constant((c2, c1), self.const_weights(w)), f"{prefix}.weight")
        bt = self._named(self.network.add_constant((1, c2), self.const_weights(b)), f"{prefix}.bias")
        y = self._named(compat.matrix_multiply(self.network, x, wt, transpose_b=True), f"{prefix}.matmul")
        return self._named(self.network.add_elementwise(y, bt, self.trt.ElementWiseOperation.SUM), name or prefix)

    def softmax(self, x, axis: int, name: str):
        layer = self.network.add_softmax(x)
        layer.axes = 1 << axis
        return self._named(layer, name)

    def mul(self, a, b, name: str):
        return self._named(self.network.add_elementwise(a, b, self.trt.ElementWiseOperation.PROD), name)

    def sub(self, a, b, name: str):
        return self._named(self.network.add_elementwise(a, b, self.trt.ElementWiseOperation.SUB), name)

    def div(self, a, b, name: str):
        return self._named(self.network.add_elementwise(a, b, self.trt.ElementWiseOperation.DIV), name)

    def sigmoid(self, x, name: str):
        return self._named(self.network.add_activation(x, self.trt.ActivationType.SIGMOID), name)

    def constant(self, array: np.ndarray, name: str):
        """A constant tensor of `array`'s shape, in the compute type (e.g. anchor points, a scale)."""
        array = np.asarray(array)
        return self._named(self.network.add_constant(array.shape, self.const_weights(array)), name)

    def take(self, x, axis: int, start: int, count: int, name: str):
        """x[start:start+count] along `axis` (torch's split/chunk): a slice when every dimension is static,
        else a gather with constant indices, which keeps the other dimensions (batch, size) dynamic."""
        dims = tuple(int(d) for d in x.shape)
        if min(dims) >= 0:
            starts = tuple(start if a == axis else 0 for a in range(len(dims)))
            sizes = tuple(count if a == axis else d for a, d in enumerate(dims))
            return self._named(self.network.add_slice(x, starts, sizes, (1,) * len(dims)), name)
        indices = np.arange(start, start + count, dtype=np.int32)
        self._keep.append(indices)
        index = self._named(self.network.add_constant((count,), self.trt.Weights(indices)), f"{name}.indices")
        layer = self.network.add_gather(x, index, axis)
        return self._named(layer, name)

    def shape_of(self, x, name: str):
        """x's shape as a 1-D shape tensor (known only at run time where x's size is dynamic)."""
        return self._named(self.network.add_shape(x), name)

    def reshape_like(self, x, like, name: str):
        """x reshaped to the run-time shape of `like` (torch's `.view(*like.shape)`)."""
        shape = self.shape_of(like, f"{name}.shape")  # first: layers are added (and run) in order
        layer = self.network.add_shuffle(x)
        layer.set_input(1, shape)
        return self._named(layer, name)

    def linspace(self, length, start: float, delta: float, name: str):
        """start, start + delta, … as a 1-D tensor of the compute type; `length`: a one-element shape tensor."""
        layer = compat.fill_linspace(self.network, length, start, delta)
        if self.dtype == np.float32:
            return self._named(layer, name)
        return self._to_compute(self._named(layer, f"{name}.fill"), name)

    def matmul(self, a, b, name: str, transpose_a: bool = False, transpose_b: bool = False):
        """a @ b over the last two axes (leading axes broadcast), each operand optionally transposed."""
        layer = compat.matrix_multiply(self.network, a, b, transpose_b=transpose_b, transpose_a=transpose_a)
        return self._named(layer, name)

    # -- INT8 (Q/DQ) --------------------------------------------------------------------------------
    def _quantized(self, x, layer: str):
        """x through Q/DQ with its calibrated per-tensor scale (one pair per tensor, shared by readers)."""
        if x.name not in self._dequantized:
            calibrated = self._calibrated_as.get(x.name, x.name)
            scale = self._scale_constant(self.quant.activation_scale(calibrated, layer), f"{x.name}.int8_scale")
            q = self._named(compat.quantize(self.network, x, scale), f"{x.name}.quantize")
            self._dequantized[x.name] = self._named(compat.dequantize(self.network, q, scale, self.dtype),
                                                    f"{x.name}.dequantize")
        return self._dequantized[x.name]

    def _quantized_weights(self, w: np.ndarray, layer: str):
        """The kernel as a constant through Q/DQ with per-output-channel scales (max |w| / 127)."""
        from trtnet.quant.histogram import int8_scale, weight_amax_per_channel

        kernel = self._named(self.network.add_constant(w.shape, self.const_weights(w)), f"{layer}.weight")
        scale = self._scale_constant(int8_scale(weight_amax_per_channel(w, axis=0)), f"{layer}.weight_scale")
        q = self._named(compat.quantize(self.network, kernel, scale, axis=0), f"{layer}.weight.quantize")
        return self._named(compat.dequantize(self.network, q, scale, self.dtype, axis=0), f"{layer}.weight.dequantize")

    def _scale_constant(self, scale: np.ndarray, name: str):
        scale = np.ascontiguousarray(scale, dtype=np.float32)  # float32 on every TensorRT (compat.quantize)
        self._keep.append(scale)
        shape = () if scale.ndim == 0 else scale.shape
        return self._named(self.network.add_constant(shape, self.trt.Weights(scale.reshape(-1))), name)

    # -- naming ------------------------------------------------------------------------------------
    @staticmethod
    def _named(layer, name: str, tensor: str | None = None):
        layer.name = name
        out = layer.get_output(0)
        out.name = tensor or name
        return out


_BN_STATS = ("weight", "bias", "running_mean", "running_var")
