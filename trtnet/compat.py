"""The one place that knows TensorRT versions.

trtnet runs on TensorRT 8.5, 10.x, 11.x and TensorRT-RTX from one codebase. Everything that differs
between them — how a network is created, what fp16 means, how to cast, enum names, tactic sources,
progress monitors, compute-capability targets — is answered here, so network code never asks.

fp16 has two meanings:
- TensorRT 8.x/10.x with weak typing: an fp32 graph plus `BuilderFlag.FP16` (TensorRT picks kernels).
- TensorRT 10.x/11.x/RTX strongly typed: the graph itself is half — input cast to half, half weights
  and constants, outputs cast back to float32. (TRT 11 and RTX dropped the FP16 flag.)
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from trtnet.errors import TrtnetError

_MODULES = ("tensorrt", "tensorrt_rtx", "tensorrt_rtx_bindings")


@cache
def trt() -> Any:
    """The TensorRT module in use: NVIDIA's `tensorrt`, else TensorRT-RTX."""
    for name in _MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "Builder"):  # PyPI's `tensorrt` stub without libraries has none
            return module
    raise TrtnetError(
        "no TensorRT found: install NVIDIA TensorRT (pip install 'trtnet[trt]', or the system package on "
        "Jetson) or TensorRT-RTX (pip install 'trtnet[rtx]', builds engines on any machine)"
    )


@dataclass(frozen=True)
class Flavour:
    name: str  # "tensorrt" | "tensorrt-rtx"
    version: str
    major: int

    @property
    def is_rtx(self) -> bool:
        return self.name == "tensorrt-rtx"

    @property
    def strongly_typed(self) -> bool:
        """Whether trtnet builds strongly typed graphs (fp16 = a half graph, not a builder flag)."""
        return self.is_rtx or self.major >= 10

    @property
    def engines_name_their_gpus(self) -> bool:
        """RTX builds ahead of time for the compute capabilities it is given (--target-cc); other TensorRTs'
        engines run on the GPU model they were built on."""
        return self.is_rtx

    @property
    def python_plugins(self) -> bool:
        """Python IPluginV3 plugins can be added to networks (TensorRT >= 10, not RTX)."""
        return not self.is_rtx and self.major >= 10

    def __str__(self) -> str:
        return f"{self.name} {self.version}"


PLUGIN_V3_NAMES = ("IPluginV3", "IPluginV3OneCore", "IPluginV3OneBuild", "IPluginV3OneRuntime",
                   "IPluginCreatorV3One", "get_plugin_registry")


def python_plugins_supported() -> bool:
    """Whether this TensorRT's Python binding can define and run IPluginV3 plugins (TensorRT >= 10, RTX).

    Whether a build may also put one into an engine's network is `flavour().python_plugins`."""
    try:
        module = trt()
    except TrtnetError:
        return False
    return all(hasattr(module, n) for n in PLUGIN_V3_NAMES)


@cache
def flavour() -> Flavour:
    module = trt()
    name = "tensorrt-rtx" if "rtx" in module.__name__ else "tensorrt"
    version = str(getattr(module, "__version__", "0"))
    major = int(re.match(r"\d+", version).group()) if re.match(r"\d+", version) else 0
    return Flavour(name, version, major)


@cache
def Logger(verbose: bool = False):  # noqa: N802 - reads like the TensorRT class it stands for
    """The process's TensorRT logger (TensorRT keeps the first one it is given); keeps errors."""
    t = trt()

    class _Logger(t.ILogger):
        def __init__(self):
            t.ILogger.__init__(self)
            self.errors: list[str] = []
            self.verbose = verbose
            self.listeners: list = []  # callables given every message, whatever its severity (build progress)

        def log(self, severity, msg):
            for listen in self.listeners:
                listen(msg)
            if not _worth_showing(msg):
                return
            level = int(severity)
            if level <= int(t.ILogger.Severity.ERROR):
                self.errors.append(msg)
                print(f"[TensorRT] {msg}", file=sys.stderr)
            elif self.verbose or level <= int(t.ILogger.Severity.WARNING):
                print(f"[TensorRT] {msg}", file=sys.stderr)

    return _Logger()


def _worth_showing(msg: str) -> bool:
    noisy = (
        "CUDA lazy loading", "TensorRT was linked against", "Using an engine plan file across",
        "differs from one already registered",
        "cudaError 35",  # TensorRT-RTX probing for a GPU while it builds ahead-of-time on a CPU-only machine
        "Build canceled by user",  # our progress monitor stopping a build on Ctrl-C; trtnet.interrupts says so
    )
    return not any(n in msg for n in noisy)


def create_network(builder) -> Any:
    t, f = trt(), flavour()
    if f.is_rtx:
        flags = 0  # always strongly typed
    elif f.major >= 10:
        flags = 1 << int(t.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    else:
        flags = 1 << int(t.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    return builder.create_network(flags)


def compute_dtype(precision: str) -> np.dtype:
    """The dtype weights and activations have inside the graph for `precision` ('fp32'|'fp16')."""
    if precision not in ("fp32", "fp16"):
        raise TrtnetError(f"unknown precision {precision!r}: use fp32 or fp16")
    half = precision == "fp16" and flavour().strongly_typed
    return np.dtype(np.float16 if half else np.float32)


def trt_dtype(dtype: np.dtype) -> Any:
    t = trt()
    return {np.dtype(np.float32): t.float32, np.dtype(np.float16): t.float16, np.dtype(np.int32): t.int32}[
        np.dtype(dtype)
    ]


def cast(network, tensor, dtype: np.dtype):
    """Cast `tensor` to `dtype`: `add_cast` where it exists, identity + output type on TensorRT 8.5."""
    target = trt_dtype(dtype)
    if hasattr(network, "add_cast"):
        return network.add_cast(tensor, target)
    layer = network.add_identity(tensor)
    layer.set_output_type(0, target)
    return layer


def fill_linspace(network, length, start: float, delta: float):
    """A float32 1-D tensor start, start + delta, … of `length` (a 1-D shape tensor of one element).

    TensorRT 8.5's add_fill has no output type argument (float32 is its only linspace output)."""
    t = trt()
    try:
        layer = network.add_fill((0,), t.FillOperation.LINSPACE, t.float32)
    except TypeError:
        layer = network.add_fill((0,), t.FillOperation.LINSPACE)
    layer.set_input(0, length)
    layer.alpha = float(start)
    layer.beta = float(delta)
    return layer


def set_nearest_resize(layer) -> None:
    t = trt()
    mode = getattr(t, "InterpolationMode", None) or t.ResizeMode  # renamed in TensorRT 8.6
    layer.resize_mode = mode.NEAREST
    layer.coordinate_transformation = t.ResizeCoordinateTransformation.ASYMMETRIC
    layer.nearest_rounding = t.ResizeRoundMode.FLOOR


def matrix_multiply(network, a, b, transpose_b: bool = False, transpose_a: bool = False):
    t = trt()
    op_a = t.MatrixOperation.TRANSPOSE if transpose_a else t.MatrixOperation.NONE
    op_b = t.MatrixOperation.TRANSPOSE if transpose_b else t.MatrixOperation.NONE
    return network.add_matrix_multiply(a, op_a, b, op_b)


OPT_LEVELS = range(6)  # TensorRT's builder optimization levels (8.6+): less build time below 3, more above


@dataclass
class BuildOptions:
    precision: str = "fp32"
    tf32: bool = False
    workspace_gib: float | None = None
    target_cc: Sequence[str] = ()  # TensorRT-RTX ahead-of-time targets, e.g. ("8.6", "8.9")
    timing_cache: bytes | None = None
    profiles: Sequence[tuple[str, tuple, tuple, tuple]] = ()  # (input, min, opt, max) for dynamic dims
    int8: bool = False  # the network holds Q/DQ layers (explicit quantization)
    opt_level: int | None = None  # builder optimization level 0..5 (None: TensorRT's default, 3)


def builder_config(builder, options: BuildOptions, progress_monitor=None) -> Any:
    t, f = trt(), flavour()
    config = builder.create_builder_config()
    if options.precision == "fp16" and not f.strongly_typed:
        config.set_flag(t.BuilderFlag.FP16)
    if options.int8 and not f.strongly_typed:  # weakly typed TensorRT runs Q/DQ networks only with INT8 on
        config.set_flag(t.BuilderFlag.INT8)
    # TensorRT enables TF32 by default on Ampere and newer; strict fp32 needs it off.
    if hasattr(t.BuilderFlag, "TF32"):
        if options.tf32:
            config.set_flag(t.BuilderFlag.TF32)
        else:
            config.clear_flag(t.BuilderFlag.TF32)
    if options.workspace_gib:
        config.set_memory_pool_limit(t.MemoryPoolType.WORKSPACE, int(options.workspace_gib * (1 << 30)))
    if not f.is_rtx and f.major < 10:
        config.set_tactic_sources(_trt8_tactic_sources())
    if options.opt_level is not None:
        if not opt_level_supported():
            raise TrtnetError(f"--opt-level: {f} has no builder optimization level (TensorRT 8.6 and newer have)")
        config.builder_optimization_level = options.opt_level
    if f.is_rtx:
        _set_rtx_targets(config, options.target_cc)
    elif options.target_cc:
        raise TrtnetError(f"--target-cc is a TensorRT-RTX option; {f} builds for the GPU it runs on")
    if options.profiles:
        profile = builder.create_optimization_profile()
        for name, lo, opt, hi in options.profiles:
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    if options.timing_cache is not None and not f.is_rtx:  # RTX: timing caches are no-ops
        cache = config.create_timing_cache(options.timing_cache)
        config.set_timing_cache(cache, ignore_mismatch=True)
    if progress_monitor is not None and hasattr(config, "progress_monitor"):
        config.progress_monitor = progress_monitor
    return config


def _trt8_tactic_sources() -> int:
    """No cuBLAS/cuDNN tactics: engines then need neither library at build or run time. The JIT-compiled
    convolutions stay: without them a YOLOv5s engine ran ~12% slower on an H200, for no shorter build (RESULTS.md,
    run G). Myelin, which takes YOLOv8's DFL and YOLO11's attention, calls cuBLASLt whatever this says when the
    batch or size is dynamic: where that library is missing such builds fail (run H) and static ones build."""
    t = trt()
    return (1 << int(t.TacticSource.EDGE_MASK_CONVOLUTIONS)) | (1 << int(t.TacticSource.JIT_CONVOLUTIONS))


def opt_level_supported() -> bool:
    """Whether this TensorRT has a builder optimization level (8.6 and newer, TensorRT-RTX)."""
    f = flavour()
    return f.is_rtx or (f.major, _minor(f.version)) >= (8, 6)


def _minor(version: str) -> int:
    match = re.match(r"\d+\.(\d+)", version)
    return int(match.group(1)) if match else 0


def rtx_targets() -> list[str]:
    """Compute capabilities TensorRT-RTX can target ahead of time, as 'X.Y' strings."""
    names = [n for n in dir(trt().ComputeCapability) if re.fullmatch(r"SM\d+", n)]
    return [f"{n[2:-1]}.{n[-1]}" for n in sorted(names, key=lambda n: int(n[2:]))]


def _set_rtx_targets(config, target_cc: Sequence[str]) -> None:
    t = trt()
    if not target_cc:
        return  # RTX's default: the GPU present, or every supported one when building CPU-only
    targets = []
    for cc in target_cc:
        name = "SM" + cc.replace(".", "")
        if not hasattr(t.ComputeCapability, name):
            raise TrtnetError(f"--target-cc {cc}: {flavour()} targets only {', '.join(rtx_targets())}")
        targets.append(getattr(t.ComputeCapability, name))
    config.num_compute_capabilities = len(targets)
    for i, target in enumerate(targets):
        config.set_compute_capability(target, i)


def progress_monitor_class():
    """A base class for build progress callbacks, or None where TensorRT has no IProgressMonitor (8.x)."""
    return getattr(trt(), "IProgressMonitor", None)


def serialized_timing_cache(config) -> bytes | None:
    if flavour().is_rtx:
        return None
    cache = config.get_timing_cache()
    return bytes(cache.serialize()) if cache is not None else None


def build_serialized(builder, network, config) -> bytes | None:
    plan = builder.build_serialized_network(network, config)
    return None if plan is None else bytes(plan)


def deserialize(plan: bytes, logger=None):
    """A runtime engine from a plan (only where this TensorRT can run it on this GPU)."""
    t = trt()
    runtime = t.Runtime(logger or Logger())
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise TrtnetError("TensorRT could not deserialize the engine: rebuild it with this TensorRT and GPU")
    return runtime, engine


# -- INT8 ------------------------------------------------------------------------------------------
# Explicit quantization (Q/DQ layers) works everywhere. Scales are float32 constants on every version:
# TensorRT 8.5 requires it, and strongly typed TensorRT (10+, RTX) accepts float32 scales beside fp16
# data (RTX 1.7 builds them; it converts half scales to fp32 itself). Strongly typed TensorRT also needs
# the Q output type (int8) and the DQ output type (the graph's compute type) spelled out.
def quantize(network, tensor, scale, axis: int | None = None):
    """Q: `tensor` → int8 with `scale` (a float32 constant tensor: a scalar, or one per `axis` entry)."""
    t, f = trt(), flavour()
    layer = network.add_quantize(tensor, scale, t.int8) if f.strongly_typed else network.add_quantize(tensor, scale)
    if axis is not None:
        layer.axis = axis
    return layer


def dequantize(network, tensor, scale, dtype: np.dtype, axis: int | None = None):
    """DQ: int8 `tensor` → `dtype` (the compute type; float32 only on weakly typed TensorRT)."""
    f = flavour()
    if f.strongly_typed:
        layer = network.add_dequantize(tensor, scale, trt_dtype(dtype))
    else:
        layer = network.add_dequantize(tensor, scale)
    if axis is not None:
        layer.axis = axis
    return layer


# Layer kinds whose precision a kept (float) part of an INT8 network is computed in.
_KEPT_LAYER_TYPES = ("CONVOLUTION", "ACTIVATION", "ELEMENTWISE", "POOLING", "RESIZE", "SCALE")


def compute_in_half(layers: Sequence) -> bool:
    """Ask weakly typed TensorRT (8.x) to compute these float layers of an INT8 network in fp16: TensorRT 8.5
    computed a kept convolution whose output a quantize layer reads in fp32, with the FP16 flag on (run N: 2.17 ms
    against 0.56 in fp16). Returns whether the builder config must prefer precision constraints
    (`prefer_precision_constraints`). Strongly typed TensorRT (10+, RTX): the graph's fp16 types say it already."""
    t, f = trt(), flavour()
    if f.strongly_typed:
        return False
    kinds = {getattr(t.LayerType, name) for name in _KEPT_LAYER_TYPES}
    pinned = [layer for layer in layers if layer.type in kinds]
    for layer in pinned:
        layer.precision = t.float16
    return bool(pinned)


def prefer_precision_constraints(config) -> None:
    """Layer precisions set by `compute_in_half` are preferences: TensorRT falls back where a layer cannot."""
    config.set_flag(trt().BuilderFlag.PREFER_PRECISION_CONSTRAINTS)


def empty_weights(dtype: np.dtype):
    """Weights with no values (a kernel that comes from a tensor input instead), in `dtype`."""
    return trt().Weights(trt_dtype(dtype))


def implicit_int8_support() -> str | None:
    """Why legacy calibrator INT8 (--int8-mode implicit) is unavailable here, or None where it works:
    TensorRT 11 and TensorRT-RTX removed the calibrators and the INT8 builder flag."""
    t, f = trt(), flavour()
    if f.is_rtx or f.major >= 11 or not hasattr(t, "IInt8EntropyCalibrator2"):
        return (f"{f} has no INT8 calibrators (removed in TensorRT 11 and TensorRT-RTX): use "
                "--int8-mode explicit (Q/DQ, the default)")
    return None


def create_weakly_typed_network(builder) -> Any:
    """A network whose precision TensorRT picks (builder flags): what the legacy INT8 calibrator needs;
    define it with an fp32 graph (compute_dtype('fp32'))."""
    t, f = trt(), flavour()
    if f.major >= 10:
        return builder.create_network(0)  # explicit batch is the only mode from 10 on
    return builder.create_network(1 << int(t.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))


def set_implicit_int8(config, calibrator, fp16: bool = True) -> None:
    """INT8 from a calibrator (TensorRT 8.x/10.x), fp16 (or fp32) where a layer is faster so."""
    reason = implicit_int8_support()
    if reason:
        raise TrtnetError(reason)
    t = trt()
    config.set_flag(t.BuilderFlag.INT8)
    if fp16:
        config.set_flag(t.BuilderFlag.FP16)
    config.int8_calibrator = calibrator
