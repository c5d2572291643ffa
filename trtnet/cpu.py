"""Detection without a GPU: the very network TensorRT builds from, run on the CPU with NumPy.

    from trtnet.cpu import CpuDetector
    with CpuDetector("weights/yolov5n.pt") as det:        # a checkpoint, .wts/.safetensors or a name
        r = det.detect("bus.jpg")[0]                       # the same `Detections` as `trtnet.Detector`

The network is defined with the TensorRT network API exactly as `trtnet.build` defines it (fp32), then
executed layer by layer: convolutions as im2col + one BLAS matrix product, the rest as NumPy array
operations. Pre- and post-processing are the official YOLOv5 NumPy math of `trtnet.plugins.official`
(letterbox, decode, NMS, `scale_boxes`). No torch: `trtnet.executor` (the torch executor, which runs
every layer type) stays the reference the tests compare networks with; this module implements only the
layer types detection networks use and names any other.

Measured on yolov5n at 640 (the network alone, 2 shared cores, 2026-12-02): NumPy 1.0–1.2 CPU-seconds per
image (0.3–0.4 s wall for a whole detection when the cores are free); the torch executor 0.9–1.7 CPU-s
(0.14 s wall) plus 1.7–2 CPU-s to import torch, and a large install. About even: NumPy keeps the demo's
install small.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from trtnet import networks
from trtnet.api import Detections, ImageLike, as_list, detections_from_rows, load_image
from trtnet.engine_meta import nms_kwargs
from trtnet.errors import TrtnetError
from trtnet.executor import downcast, trt_module  # torch-free: the executor imports torch on first run

if TYPE_CHECKING:
    from trtnet.quant.options import Int8Options

CHECKPOINT_SUFFIXES = (".pt", ".pth")


# ------------------------------------------------------------------------------------------ executor


class UnsupportedLayer(TrtnetError):
    """A layer type the NumPy path does not run."""


def run_numpy(network, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Execute an fp32 INetworkDefinition on `inputs` (by name); returns its outputs by name."""
    values: dict[str, np.ndarray] = {name: np.ascontiguousarray(a, dtype=np.float32) for name, a in inputs.items()}
    trt = trt_module(network)
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        kind = downcast(trt, layer)
        op = _OPS.get(kind)
        if op is None:
            raise UnsupportedLayer(f"layer {layer.name!r} ({kind}): the NumPy CPU path does not run this layer type; "
                              "trtnet.executor.run_network (torch) runs every layer type")
        xs = [values[t.name] if t is not None else None for t in
              (layer.get_input(j) for j in range(layer.num_inputs))]
        values[layer.get_output(0).name] = op(layer, xs)
    return {network.get_output(i).name: values[network.get_output(i).name] for i in range(network.num_outputs)}


def _explicit_padding(layer) -> tuple[tuple[int, int], tuple[int, int]]:
    if not layer.padding_mode.name.startswith("EXPLICIT_ROUND_DOWN"):
        raise TrtnetError(f"layer {layer.name!r}: padding mode {layer.padding_mode.name} is not run by the CPU path")
    return tuple(layer.pre_padding), tuple(layer.post_padding)


def _windows(x: np.ndarray, window: Sequence[int], stride: Sequence[int], pre, post, value: float) -> np.ndarray:
    """[n, c, oh, ow, kh, kw] strided view of the padded input."""
    if any(pre) or any(post):
        x = np.pad(x, ((0, 0), (0, 0), (pre[0], post[0]), (pre[1], post[1])), constant_values=value)
    view = np.lib.stride_tricks.sliding_window_view(x, tuple(window), axis=(2, 3))
    return view[:, :, ::stride[0], ::stride[1]]


def _array(weights) -> np.ndarray:
    """A layer's weights as float32 (the bindings give numpy arrays or trt.Weights)."""
    return np.asarray(weights.numpy() if hasattr(weights, "numpy") else weights, dtype=np.float32)


def _convolution(layer, xs: list) -> np.ndarray:
    x = xs[0]
    window, stride = tuple(layer.kernel_size_nd), tuple(layer.stride_nd)
    if len(window) != 2 or tuple(layer.dilation_nd) != (1, 1):
        raise TrtnetError(f"layer {layer.name!r}: only undilated 2-D convolutions run on the CPU path")
    groups, cout = layer.num_groups, layer.num_output_maps
    kernel = _array(layer.kernel).reshape(groups, cout // groups, -1)  # [g, cout/g, cin/g·kh·kw]
    pre, post = _explicit_padding(layer)
    n, c = x.shape[:2]
    if window == (1, 1) and stride == (1, 1) and not any(pre) and not any(post):
        oh, ow = x.shape[2:]
        cols = x.reshape(n, groups, c // groups, oh * ow)  # a 1x1 convolution is a plain matrix product
    else:
        view = _windows(x, window, stride, pre, post, 0.0)  # n, c, oh, ow, kh, kw
        oh, ow = view.shape[2:4]
        # im2col, the one copy: rows ordered (c, kh, kw) like the kernel, columns (oh, ow) like the output
        cols = view.transpose(0, 1, 4, 5, 2, 3).reshape(n, groups, -1, oh * ow)
    y = np.matmul(kernel, cols).reshape(n, cout, oh, ow)  # [n, g, cout/g, oh·ow]
    bias = _array(layer.bias)
    if bias.size:
        y += bias.reshape(1, -1, 1, 1)
    return y


def _pooling(layer, xs: list) -> np.ndarray:
    if layer.type.name != "MAX":
        raise TrtnetError(f"layer {layer.name!r}: {layer.type.name} pooling is not run by the CPU path")
    pre, post = _explicit_padding(layer)
    return _windows(xs[0], tuple(layer.window_size_nd), tuple(layer.stride_nd), pre, post, -np.inf).max(axis=(4, 5))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp(-x) overflows to inf for x < -88: the sigmoid is then 0, as wanted
        return np.float32(1) / (np.float32(1) + np.exp(-x))


_ACTIVATIONS: dict[str, Callable[[Any, np.ndarray], np.ndarray]] = {
    "SIGMOID": lambda layer, x: _sigmoid(x),
    "RELU": lambda layer, x: np.maximum(x, np.float32(0)),
    "LEAKY_RELU": lambda layer, x: np.where(x >= 0, x, np.float32(layer.alpha) * x),
}

_ELEMENTWISE = {"SUM": np.add, "PROD": np.multiply, "SUB": np.subtract, "DIV": np.divide,
                "MAX": np.maximum, "MIN": np.minimum}


def _activation(layer, xs: list) -> np.ndarray:
    kind = layer.type.name
    if kind not in _ACTIVATIONS:
        raise TrtnetError(f"layer {layer.name!r}: activation {kind} is not run by the CPU path")
    return _ACTIVATIONS[kind](layer, xs[0])


def _elementwise(layer, xs: list) -> np.ndarray:
    op = layer.op.name
    if op not in _ELEMENTWISE:
        raise TrtnetError(f"layer {layer.name!r}: elementwise {op} is not run by the CPU path")
    return _ELEMENTWISE[op](xs[0], xs[1])


def _resize(layer, xs: list) -> np.ndarray:
    x = xs[0]
    scales = list(layer.scales)
    whole = all(float(s).is_integer() for s in scales)
    if layer.resize_mode.name != "NEAREST" or not whole or layer.coordinate_transformation.name != "ASYMMETRIC":
        raise TrtnetError(f"layer {layer.name!r}: only nearest upsampling by whole factors runs on the CPU path")
    for axis, s in enumerate(scales):
        if s != 1:
            x = np.repeat(x, int(s), axis=axis)
    return x


def _shuffle(layer, xs: list) -> np.ndarray:
    """Transpose, reshape (0 copies the input's dimension, -1 is inferred), transpose (TensorRT's IShuffleLayer)."""
    if len(xs) > 1:
        raise TrtnetError(f"layer {layer.name!r}: a shuffle shaped by a tensor is not run by the CPU path")
    x = xs[0].transpose(tuple(layer.first_transpose)[: xs[0].ndim])  # the bindings list 8 permutation entries
    dims = [int(d) for d in layer.reshape_dims]
    if dims:  # an unset reshape keeps the shape
        placeholder = layer.zero_is_placeholder
        x = x.reshape([x.shape[i] if d == 0 and placeholder else d for i, d in enumerate(dims)])
    return x.transpose(tuple(layer.second_transpose)[: x.ndim])


_OPS: dict[str, Callable[[Any, list], np.ndarray]] = {
    "SHUFFLE": _shuffle,
    "CONVOLUTION": _convolution,
    "POOLING": _pooling,
    "ACTIVATION": _activation,
    "ELEMENTWISE": _elementwise,
    "CONCATENATION": lambda layer, xs: np.concatenate(xs, axis=layer.axis),
    "RESIZE": _resize,
    "IDENTITY": lambda layer, xs: xs[0],
}


# ------------------------------------------------------------------------------------------ model


@dataclass
class CpuNetwork:
    """A detection network defined for the CPU: the INetworkDefinition and what decoding needs."""

    network: Any
    keep_alive: Any  # the builder and graph (their weights must outlive the network)
    input_name: str
    imgsz: tuple[int, int]
    postprocess: dict  # the family's YoloPostprocess keywords (head kind, strides, anchors, nc)
    names: list[str]
    source: str
    strides: tuple[int, ...] = ()
    size_range: tuple[int, int] | None = None  # (smallest, largest) side when defined for dynamic sizes
    family: str = ""

    def run(self, image: np.ndarray) -> list[np.ndarray]:
        """The network's outputs, in the order it marks them: with NumPy where it runs every layer type,
        else with the torch executor (trtnet.executor) when torch is installed."""
        inputs = {self.input_name: image}
        try:
            outputs = run_numpy(self.network, inputs)
        except UnsupportedLayer:
            if importlib.util.find_spec("torch") is None:
                raise
            from trtnet.executor import run_network

            outputs = run_network(self.network, inputs, dtype_policy="float32")
        return [outputs[self.network.get_output(i).name] for i in range(self.network.num_outputs)]


def read_weights(weights: str | os.PathLike, weights_dir: str | os.PathLike = "weights") -> tuple[dict, dict, str]:
    """(tensors, metadata, path) from a checkpoint (.pt/.pth), .wts/.safetensors, or a name in `weights_dir`
    (yolov5n → weights/yolov5n.wts, .safetensors or .pt)."""
    from trtnet.checkpoint import read_checkpoint
    from trtnet.weights import load_weights, resolve_weights

    path = Path(weights)
    if not path.is_file() and not path.suffix and (Path(weights_dir) / f"{path.name}.pt").is_file():
        try:
            path = resolve_weights(weights, weights_dir)
        except TrtnetError:
            path = Path(weights_dir) / f"{path.name}.pt"
    if path.suffix in CHECKPOINT_SUFFIXES:
        if not path.is_file():
            raise TrtnetError(f"{path}: no such checkpoint")
        ckpt = read_checkpoint(path)
        return ckpt.state_dict, dict(ckpt.meta), str(path)
    path = resolve_weights(weights, weights_dir)
    loaded = load_weights(path)
    if not loaded.meta:
        raise TrtnetError(f"{path} has no metadata (.json beside it): convert the checkpoint with trtnet.gen_wts")
    return loaded.tensors, dict(loaded.meta), str(path)


def define_cpu_network(weights: str | os.PathLike, imgsz: int = 640,
                       weights_dir: str | os.PathLike = "weights", dynamic: bool = False,
                       int8: Int8Options | None = None, log: Callable[[str], None] = print) -> CpuNetwork:
    """The fp32 network for the CPU at `imgsz`; `dynamic`: for any input size from 32 to `imgsz` (rect).
    `int8`: the Q/DQ network `trtnet.build --int8` defines with these options (calibration file, layers kept
    float), its float layers in fp32: the accuracy an INT8 engine will have, without building it."""
    from trtnet import compat
    from trtnet.network import define_network

    tensors, meta, source = read_weights(weights, weights_dir)
    family = networks.for_meta(meta)
    if family.TASK != "detect":
        raise TrtnetError(f"{source} is a {family.FAMILY} {family.TASK} model: the CPU detector runs detectors")
    quant = int8_plan(int8, tensors, meta, imgsz, source, log) if int8 is not None else None
    builder = compat.trt().Builder(compat.Logger())
    sizes = {"min_imgsz": 32, "max_imgsz": imgsz} if dynamic else {}
    defined = define_network(builder, tensors, meta, precision="fp32", imgsz=imgsz, source=source, quant=quant,
                             **sizes)
    post = family.postprocess_kwargs({**meta, "strides": list(defined.strides) or meta.get("strides")})
    count = int(meta.get("nc") or 0)
    names = [str(n) for n in meta.get("names") or range(count)]
    span = (defined.min_imgsz, defined.max_imgsz) if dynamic else None
    return CpuNetwork(defined.network, (builder, defined), defined.input_name, tuple(defined.imgsz), post, names,
                      source, tuple(int(s) for s in defined.strides), span, family.FAMILY)


def int8_plan(options: Int8Options, tensors: Mapping[str, np.ndarray], meta: Mapping, imgsz: int, source: str,
              log: Callable[[str], None]):
    """The QuantPlan `build --int8` would use (its calibration file by default beside the weights)."""
    from trtnet.quant.options import explicit_plan

    if options.mode != "explicit":
        raise TrtnetError("--int8-mode implicit is TensorRT's calibrator, inside a GPU build: the CPU runs the "
                          "explicit Q/DQ network (the default)")
    plan, _, _ = explicit_plan(options, tensors, meta, imgsz, Path(source).with_suffix(".int8"), log,
                               weights_path=source)
    return plan


class CpuDetector:
    """`trtnet.Detector` on the CPU: a weights file or name in, the same `Detections` out (boxes in
    original-image pixels). Runs the fp32 network with NumPy; settings as `Detector`'s. `rect=True`: each
    image letterboxed to its smallest stride-multiple shape (Ultralytics' `LetterBox(auto=True)`), the
    network defined once for dynamic sizes."""

    def __init__(self, weights: str | os.PathLike, conf: float = 0.25, iou: float = 0.45, max_det: int = 1000, *,
                 multi_label: bool = False, agnostic: bool = False, imgsz: int = 640,
                 weights_dir: str | os.PathLike = "weights", rect: bool = False, int8: Int8Options | None = None):
        from trtnet.plugins.postprocess import NmsSettings

        self.settings = NmsSettings(conf, iou, max_det, multi_label, agnostic)
        self.model = define_cpu_network(weights, imgsz, weights_dir, dynamic=rect, int8=int8)
        if rect and not self.model.strides:
            raise TrtnetError(f"{self.model.source}: the network has no strides, so rect cannot pad to their multiple")
        self.rect = rect
        self.names = self.model.names

    max_batch = 1  # images run one at a time; a batch is a loop

    @property
    def imgsz(self) -> tuple[int, int]:
        return self.model.imgsz

    def input_hw(self, image: np.ndarray) -> tuple[int, int]:
        """The letterboxed input's (h, w) for `image`: the network size, or with rect its smallest shape."""
        if not self.rect:
            return self.imgsz
        from trtnet.plugins.preprocess import rect_input_hw

        return rect_input_hw([image.shape[:2]], self.imgsz, max(self.model.strides), self.model.size_range)

    def rows(self, image: np.ndarray) -> np.ndarray:
        """Decode + NMS rows [k, 6] (x1, y1, x2, y2, score, class) in network-input pixels (`input_hw`)."""
        from trtnet.plugins import official

        boxed, _, _ = official.letterbox(image, self.imgsz, canvas=self.input_hw(image))
        return self.rows_of_input(official.to_network_input(boxed))

    def rows_of_input(self, x: np.ndarray) -> np.ndarray:
        """Decode + NMS rows of one letterboxed network input [1, 3, h, w] (float RGB / 255)."""
        from trtnet.plugins import official

        return official.postprocess(self.model.run(x), **self.model.postprocess, **nms_kwargs(self.settings))[0]

    def detect_loaded(self, images: Sequence[np.ndarray],
                      paths: Sequence[str | None] | None = None) -> list[Detections]:
        from trtnet.plugins.preprocess import rows_to_image

        paths = list(paths) if paths is not None else [None] * len(images)
        results = []
        for image, path in zip(images, paths):
            rows = rows_to_image(self.rows(image), self.input_hw(image), image.shape[:2])
            results.append(detections_from_rows(rows, image, self.names, path))
        return results

    def detect(self, images: ImageLike | Sequence[ImageLike]) -> list[Detections]:
        loaded = [load_image(x) for x in as_list(images)]
        return self.detect_loaded([image for image, _ in loaded], [path for _, path in loaded])

    def stream(self, images: Iterable[ImageLike], batch: int = 1, depth: int = 2) -> Iterator[Detections]:
        for source in images:
            yield from self.detect(source)

    __call__ = detect

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CpuDetector({self.model.source!r})"
