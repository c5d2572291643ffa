"""The INT8 steps of `trtnet.build`: check the request before anything is read, define the network
(explicit: Q/DQ from our calibration, fp16 elsewhere; implicit: an fp32 weakly typed network and TensorRT's
entropy calibrator), set the builder config, and what the engine sidecar records (`int8`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trtnet import compat
from trtnet.engine_meta import Int8Record
from trtnet.errors import TrtnetError
from trtnet.quant.options import Int8Options

INT8 = "int8"  # BuildRequest.precision of an INT8 engine


@dataclass
class Int8Network:
    defined: Any  # trtnet.network.DefinedNetwork
    record: Int8Record  # the engine sidecar's "int8" object
    calibrator: Any = None  # implicit mode: TensorRT's calibrator (implicit.CALIBRATORS)
    keep_alive: list = field(default_factory=list)  # device buffers the calibrator's pointers point into
    half_pinned: bool = False  # kept layers asked for fp16 (weakly typed TensorRT: needs the builder's consent)


def check_int8_request(precision: str, options: Int8Options | None) -> Int8Options | None:
    """The checked INT8 options of a build (None for other precisions); one error for any contradiction,
    raised before the build reads or writes anything."""
    if precision != INT8:
        if options is not None:
            raise TrtnetError(f"INT8 options given for a {precision} build: build with --int8 (precision 'int8')")
        return None
    options = (options or Int8Options()).checked()
    if options.mode == "implicit":
        reason = compat.implicit_int8_support()
        if reason:
            raise TrtnetError(f"--int8-mode implicit: {reason}")
    if options.calib_device == "gpu" and not _has_calibration(options):
        from trtnet import cuda_rt

        reason = cuda_rt.gpu_unavailable_reason()
        if reason:
            raise TrtnetError(f"--calib-device gpu: {reason}; use --calib-device cpu")
    return options


def _has_calibration(options: Int8Options) -> bool:
    return bool(options.calib_cache) and Path(options.calib_cache).exists()


def define_int8_network(builder, options: Int8Options, tensors, meta, engine_path: Path, log=print,
                        **define_kwargs) -> Int8Network:
    if options.mode == "implicit":
        return _implicit_network(builder, options, tensors, meta, engine_path, log, **define_kwargs)
    return _explicit_network(builder, options, tensors, meta, engine_path, log, **define_kwargs)


def _explicit_network(builder, options, tensors, meta, engine_path, log, **define_kwargs) -> Int8Network:
    from trtnet.network import define_network
    from trtnet.quant.options import explicit_plan

    plan, calibration, path = explicit_plan(options, tensors, meta, _imgsz(meta, define_kwargs), engine_path, log,
                                            define_kwargs.get("source"))
    defined = define_network(builder, tensors, meta, precision="fp16", quant=plan, **define_kwargs)
    record = Int8Record("explicit", _relative(path, engine_path), calibration.method, calibration.images.count,
                        tuple(sorted(plan.keep_float)))
    return Int8Network(defined, record, half_pinned=compat.compute_in_half(kept_layers(defined.network, plan)))


def kept_layers(network, plan) -> list:
    """The layers of the groups `--int8-keep` keeps in float, by name (`model.0.conv`, `model.0.sigmoid`,
    `model.0`); `compat.compute_in_half` leaves out the Q/DQ and constant layers among them."""
    layers = (network.get_layer(i) for i in range(network.num_layers))
    return [layer for layer in layers if not plan.quantizes(layer.name)]


def _implicit_network(builder, options, tensors, meta, engine_path, log, **define_kwargs) -> Int8Network:
    from trtnet import networks
    from trtnet.network import define_network
    from trtnet.quant.calibrate import CalibrationImages, find_images
    from trtnet.quant.implicit import tensorrt_calibrator

    cache = Path(options.calib_cache) if options.calib_cache else engine_path.with_name(engine_path.stem
                                                                                        + ".calib.cache")
    defined = define_network(builder, tensors, meta, precision="fp32", weakly_typed=True, **define_kwargs)
    batch = define_kwargs["batch"].opt
    if cache.exists():
        batches, count = iter(()), 0
        log(f"INT8 (implicit): TensorRT calibration cache {cache}")
    elif options.calib:
        paths, _ = find_images(options.calib)
        loader = CalibrationImages(paths, options.calib_images,
                                   networks.calibration_preprocess(meta, _imgsz(meta, define_kwargs)),
                                   f"--calib {options.calib}")
        batches, count = loader.batches(1), options.calib_images
    else:
        raise TrtnetError(f"--int8-mode implicit: no calibration cache {cache} and no --calib images")
    upload, buffer = device_uploader()
    method = options.checked().calib_method
    calibrator = tensorrt_calibrator(method, batches, batch, cache, upload)
    record = Int8Record("implicit", _relative(cache, engine_path), method, count)
    return Int8Network(defined, record, calibrator, [buffer])


def device_uploader():
    """(upload, buffer): `upload(batch)` copies a host batch to one device buffer and returns its address."""
    from trtnet import cuda_rt

    buffer, stream = cuda_rt.DeviceBuffer(), cuda_rt.Stream()

    def upload(x: np.ndarray) -> int:
        x = np.ascontiguousarray(x, dtype=np.float32)
        buffer.ensure(x.nbytes)
        cuda_rt.copy_to_device(buffer.ptr, x.ctypes.data, x.nbytes, stream)
        stream.synchronize()
        return buffer.ptr

    return upload, (buffer, stream)


def configure_int8(config, network: Int8Network) -> None:
    if network.calibrator is not None:
        compat.set_implicit_int8(config, network.calibrator)
    if network.half_pinned:
        compat.prefer_precision_constraints(config)


def _imgsz(meta, define_kwargs) -> int:
    from trtnet.network import default_imgsz

    return define_kwargs.get("imgsz") or default_imgsz(meta)


def _relative(path: Path, engine_path: Path) -> str:
    """The calibration file as the sidecar names it: relative to the engine's folder when inside it."""
    try:
        return os.path.relpath(path, engine_path.parent) if Path(path).resolve().is_relative_to(
            engine_path.parent.resolve()) else str(path)
    except ValueError:
        return str(path)
