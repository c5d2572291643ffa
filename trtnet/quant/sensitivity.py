"""Quantization sensitivity: per layer group, how far the network's outputs move when that group ALONE is
quantized (everything else float), on calibration images — and the groups `--int8-keep auto` keeps in fp16.

Groups: a convolution layer belongs to the module its name starts with, up to the first numeric part
(`model.2.m.0.cv1.conv` → `model.2`, `layer3.1.conv2` → `layer3.1`); a layer named without a numbered
module (YOLO's heads `raw_0`…, ResNet's stem `conv1`) is its own group.

Error of a group: mean over images and outputs of mean |out − out_fp32| / (max − min of out_fp32).

The `auto` rule: keep the groups whose error exceeds AUTO_FACTOR × the median error, most sensitive first,
at most AUTO_MAX_GROUPS of them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from trtnet.errors import TrtnetError
from trtnet.fileio import atomic_write

AUTO_FACTOR = 4.0
AUTO_MAX_GROUPS = 4
FORMAT = "trtnet-int8-sensitivity"


def layer_group(layer_name: str) -> str:
    parts = layer_name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i + 1])
    return layer_name


def layer_groups(conv_layers: Iterable[str]) -> dict[str, list[str]]:
    """Group → its convolution layers, in network order."""
    groups: dict[str, list[str]] = {}
    for name in conv_layers:
        groups.setdefault(layer_group(name), []).append(name)
    return groups


def output_error(outputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    errors = []
    for name, ref in reference.items():
        ref = np.asarray(ref, np.float64)
        span = float(ref.max() - ref.min()) or 1.0
        errors.append(float(np.mean(np.abs(np.asarray(outputs[name], np.float64) - ref))) / span)
    return float(np.mean(errors))


@dataclass(frozen=True)
class GroupSensitivity:
    group: str
    error: float
    layers: int


@dataclass(frozen=True)
class SensitivityReport:
    groups: tuple  # GroupSensitivity, most sensitive first
    images: int
    network_hash: str = ""

    def to_json(self) -> dict:
        return {"format": FORMAT, "network_hash": self.network_hash, "images": self.images,
                "rule": {"factor_of_median": AUTO_FACTOR, "max_groups": AUTO_MAX_GROUPS},
                "groups": [asdict(g) for g in self.groups], "auto_keep": list(auto_keep(self))}

    def write(self, path: str | os.PathLike) -> None:
        with atomic_write(path, "w") as f:
            json.dump(self.to_json(), f, indent=1)
            f.write("\n")

    def table(self) -> str:
        keep = set(auto_keep(self))
        rows = [f"{'group':<24} {'layers':>6} {'error':>10}  auto"]
        rows += [f"{g.group:<24} {g.layers:>6} {g.error:>10.3e}  {'keep fp16' if g.group in keep else ''}"
                 for g in self.groups]
        return "\n".join(rows)


def rank(errors: Mapping[str, float], sizes: Mapping[str, int], images: int, net_hash: str = "") -> SensitivityReport:
    ordered = sorted(errors, key=lambda g: (-errors[g], g))
    return SensitivityReport(tuple(GroupSensitivity(g, float(errors[g]), int(sizes.get(g, 0))) for g in ordered),
                             images, net_hash)


def auto_keep(report: SensitivityReport, factor: float = AUTO_FACTOR, most: int = AUTO_MAX_GROUPS) -> tuple:
    """The groups `--int8-keep auto` leaves in fp16 (the module docstring's rule)."""
    if not report.groups:
        return ()
    median = float(np.median([g.error for g in report.groups]))
    return tuple(g.group for g in report.groups if g.error > factor * median)[:most]


def read_report(path: str | os.PathLike, expected_hash: str | None = None) -> SensitivityReport:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != FORMAT:
            raise ValueError(f"no \"format\": \"{FORMAT}\"")
        groups = tuple(GroupSensitivity(str(g["group"]), float(g["error"]), int(g["layers"])) for g in data["groups"])
        report = SensitivityReport(groups, int(data["images"]), str(data.get("network_hash", "")))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise TrtnetError(f"{path}: not a readable sensitivity report ({exc})") from None
    if expected_hash is not None and report.network_hash != expected_hash:
        raise TrtnetError(f"{path}: sensitivity report of another network: run python -m trtnet.quant sensitivity "
                          "again for these weights")
    return report


def measure(groups: Mapping[str, Sequence[str]], error_of: Callable[[str], float], images: int,
            net_hash: str = "", progress: Callable[[str], None] | None = None) -> SensitivityReport:
    """Rank `groups` by `error_of(group)` (the output error with that group alone quantized)."""
    errors = {}
    for i, group in enumerate(groups):
        errors[group] = error_of(group)
        if progress:
            progress(f"[{i + 1}/{len(groups)}] {group}: {errors[group]:.3e}")
    return rank(errors, {g: len(layers) for g, layers in groups.items()}, images, net_hash)


# -- the CPU measurement (reference executor) ------------------------------------------------------
def executor_sensitivity(tensors: Mapping[str, np.ndarray], meta: Mapping, calibration, batches: Sequence[np.ndarray],
                         imgsz: int, device: str = "cpu", progress=None) -> SensitivityReport:
    """Sensitivity of every group on `batches` (preprocessed images) with the reference executor."""
    from trtnet import compat
    from trtnet.executor import run_network
    from trtnet.network import define_network
    from trtnet.quant.calibrate import quant_plan, quantizable_tensors
    from trtnet.quant.calibration_file import network_hash

    def define(plan=None):
        builder = compat.trt().Builder(compat.Logger())
        defined = define_network(builder, tensors, meta, precision="fp32", imgsz=imgsz, quant=plan)
        defined.builder = builder  # TensorRT needs the builder alive while the network is
        return defined

    def outputs(defined) -> list[dict]:
        return [run_network(defined.network, {defined.input_name: x}, device=device) for x in batches]

    fp32 = define()
    groups = layer_groups(quantizable_tensors(fp32.network))
    reference = outputs(fp32)

    def error_of(group: str) -> float:
        others = [g for g in groups if g != group]
        quantized = outputs(define(quant_plan(calibration, others)))
        return float(np.mean([output_error(q, r) for q, r in zip(quantized, reference)]))

    return measure(groups, error_of, sum(len(x) for x in batches), network_hash(tensors, meta), progress)
