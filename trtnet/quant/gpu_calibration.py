"""Calibration on the GPU (`--calib-device gpu`): an fp32 TensorRT engine of the network with every
quantizable tensor (the inputs of convolutions) marked as an extra output, run through trtnet's runtime
(`trtnet.engine.Engine`, cuda_rt) on host-preprocessed calibration images; the outputs come back as numpy
arrays and feed the same `TensorHistograms` as the CPU pass (`calibrate.collect_histograms`).

Runs wherever the runtime runs: TensorRT 8.5 (Python 3.9) and newer, TensorRT-RTX.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from trtnet.errors import TrtnetError


def mark_calibration_outputs(network, names: list[str]) -> list[str]:
    """Mark the tensors `names` as outputs (network inputs cannot be: they come from the feed);
    returns the names marked."""
    inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    outputs = {network.get_output(i).name for i in range(network.num_outputs)}
    wanted = set(names) - inputs - outputs
    marked = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_outputs):
            tensor = layer.get_output(j)
            if tensor.name in wanted:
                network.mark_output(tensor)
                marked.append(tensor.name)
                wanted.discard(tensor.name)
    if wanted:
        raise TrtnetError(f"calibration: tensors {sorted(wanted)[:3]} are not in the network")
    return marked


def calibration_engine_meta(defined, batch: int) -> dict:
    """The smallest sidecar the runtime's Engine accepts for the temporary calibration engine."""
    from trtnet import compat

    h, w = defined.imgsz
    network = defined.network
    return {
        "family": defined.family, "imgsz": [h, w], "precision": "fp32",
        "batch": {"min": batch, "opt": batch, "max": batch},
        "input": {"name": defined.input_name, "dtype": "float32"},
        "outputs": [network.get_output(i).name for i in range(network.num_outputs)],
        "tensorrt": {"flavour": compat.flavour().name, "version": compat.flavour().version},
    }


def build_calibration_engine(tensors: Mapping[str, np.ndarray], meta: Mapping, imgsz: int, batch: int,
                             folder: Path) -> tuple[Path, list[str]]:
    """Build the fp32 calibration engine into `folder`; returns its path and the quantizable tensor names."""
    from trtnet import compat
    from trtnet.fileio import atomic_write
    from trtnet.network import BatchProfile, define_network
    from trtnet.quant.calibrate import calibrated_tensors
    from trtnet.sidecar import engine_sidecar_path, with_partner

    logger = compat.Logger()
    builder = compat.trt().Builder(logger)
    defined = define_network(builder, tensors, meta, precision="fp32", imgsz=imgsz,
                             batch=BatchProfile(batch, batch, batch))
    names = calibrated_tensors(defined)
    mark_calibration_outputs(defined.network, names)
    # Only statistics come out of this engine: the quickest build where TensorRT can be asked for one.
    options = compat.BuildOptions(precision="fp32", profiles=defined.profiles(BatchProfile(batch, batch, batch)),
                                  opt_level=0 if compat.opt_level_supported() else None)
    config = compat.builder_config(builder, options)
    plan = compat.build_serialized(builder, defined.network, config)
    if plan is None:
        why = "; ".join(logger.errors[-3:]) or "no reason given"
        raise TrtnetError(f"calibration: TensorRT could not build the fp32 calibration engine: {why}")
    path = folder / "calibration.engine"
    with atomic_write(path, expected_bytes=len(plan)) as f:
        f.write(plan)
    with atomic_write(engine_sidecar_path(path), "w") as f:
        json.dump(with_partner(calibration_engine_meta(defined, batch), path), f)
    return path, names


def feeds_and_outputs(input_name: str, x: np.ndarray, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The engine's outputs plus the network input (a quantizable tensor no engine can output)."""
    return {**outputs, input_name: x}


@contextlib.contextmanager
def engine_pass(tensors: Mapping[str, np.ndarray], meta: Mapping, imgsz: int,
                batch: int = 1) -> Iterator[tuple[list[str], callable]]:
    """(quantizable tensor names, infer): `infer` runs a batch through the calibration engine on the GPU."""
    from trtnet import cuda_rt
    from trtnet.engine import Engine

    reason = cuda_rt.gpu_unavailable_reason()
    if reason:
        raise TrtnetError(f"--calib-device gpu: {reason}; use --calib-device cpu")
    with tempfile.TemporaryDirectory(prefix="trtnet-calib-") as folder:
        path, names = build_calibration_engine(tensors, meta, imgsz, batch, Path(folder))
        with Engine(path) as engine:
            yield names, lambda x: feeds_and_outputs(engine.input_name, x, engine.infer(x))
