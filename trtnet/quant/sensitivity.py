"""Quantization sensitivity: per layer group, how much of the INT8 network's output error goes away when that
group ALONE stays in float (everything else quantized), on calibration images — and what `--int8-keep auto`
keeps in fp16.

Groups: a convolution layer belongs to the module its name starts with, up to the first numeric part
(`model.2.m.0.cv1.conv` → `model.2`, `layer3.1.conv2` → `layer3.1`); a layer named without a numbered
module (YOLO's heads `raw_0`…, ResNet's stem `conv1`) is its own group.

Output error: mean over images and outputs of mean |out − out_fp32| / (max − min of out_fp32). A group's entry
is the error of the all-INT8 network minus the error with that group kept (what keeping it removes, in context:
quantization noise early in the network travels through the rest of it). The earlier measure, each group's error
with only that group quantized, ranked yolov5n's middle layers first: keeping its top group gained 0.2 point of
mAP on coco128, keeping the first five groups (model.0-4) 0.9 (CPU, `val --device cpu --int8 --square`).

The `auto` rule: the groups that remove the most error, most first, until they remove AUTO_SHARE of the all-INT8
network's error (at most AUTO_MAX_GROUPS), and the head convolutions (those no other convolution reads from,
directly or not: YOLO's box/score convolutions, a classifier's last one), whose error lands in the scores and
boxes unfiltered: on yolov5n the error measure ranks them last, yet keeping them gained 0.4 point.
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

AUTO_SHARE = 0.5
AUTO_MAX_GROUPS = 4
FORMAT = "trtnet-int8-sensitivity"
MEASURE = "error-removed-when-kept"  # reports before it held each group's error alone quantized


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
    full_error: float = 0.0  # the output error of the all-INT8 network
    heads: tuple = ()  # the head convolutions (layer names)

    def to_json(self) -> dict:
        return {"format": FORMAT, "measure": MEASURE, "network_hash": self.network_hash, "images": self.images,
                "full_error": self.full_error, "heads": list(self.heads),
                "rule": {"share": AUTO_SHARE, "max_groups": AUTO_MAX_GROUPS},
                "groups": [asdict(g) for g in self.groups], "auto_keep": list(auto_keep(self))}

    def write(self, path: str | os.PathLike) -> None:
        with atomic_write(path, "w") as f:
            json.dump(self.to_json(), f, indent=1)
            f.write("\n")

    def table(self) -> str:
        keep = set(auto_keep(self))
        share = self.full_error or 1.0
        rows = [f"{'group':<24} {'layers':>6} {'removes':>10} {'share':>6}  auto"]
        rows += [f"{g.group:<24} {g.layers:>6} {g.error:>10.3e} {g.error / share:>6.0%}  "
                 f"{'keep fp16' if g.group in keep else ''}" for g in self.groups]
        rows.append(f"all INT8: output error {self.full_error:.3e}; 'removes': what keeping that group alone in "
                    "float takes off it")
        rows.append(f"heads (auto keeps them): {', '.join(self.heads) or 'none'}")
        return "\n".join(rows)


def rank(errors: Mapping[str, float], sizes: Mapping[str, int], images: int, net_hash: str = "",
         full_error: float = 0.0, heads: Sequence[str] = ()) -> SensitivityReport:
    ordered = sorted(errors, key=lambda g: (-errors[g], g))
    return SensitivityReport(tuple(GroupSensitivity(g, float(errors[g]), int(sizes.get(g, 0))) for g in ordered),
                             images, net_hash, float(full_error), tuple(heads))


def auto_keep(report: SensitivityReport, share: float = AUTO_SHARE, most: int = AUTO_MAX_GROUPS) -> tuple:
    """The groups and head layers `--int8-keep auto` leaves in fp16 (the module docstring's rule)."""
    ranked, removed = [], 0.0
    for g in report.groups:
        if removed >= share * report.full_error or len(ranked) == most or g.error <= 0:
            break
        ranked.append(g.group)
        removed += g.error
    return (*ranked, *(h for h in report.heads if layer_group(h) not in ranked))


def read_report(path: str | os.PathLike, expected_hash: str | None = None) -> SensitivityReport:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != FORMAT:
            raise ValueError(f"no \"format\": \"{FORMAT}\"")
        if data.get("measure") != MEASURE:
            raise ValueError("written by an older trtnet, which measured each group's error alone quantized: run "
                             "python -m trtnet.quant sensitivity again")
        groups = tuple(GroupSensitivity(str(g["group"]), float(g["error"]), int(g["layers"])) for g in data["groups"])
        report = SensitivityReport(groups, int(data["images"]), str(data.get("network_hash", "")),
                                   float(data["full_error"]), tuple(str(h) for h in data["heads"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise TrtnetError(f"{path}: not a readable sensitivity report ({exc})") from None
    if expected_hash is not None and report.network_hash != expected_hash:
        raise TrtnetError(f"{path}: sensitivity report of another network: run python -m trtnet.quant sensitivity "
                          "again for these weights")
    return report


def measure(groups: Mapping[str, Sequence[str]], error_of: Callable[[Sequence[str]], float], images: int,
            net_hash: str = "", progress: Callable[[str], None] | None = None,
            heads: Sequence[str] = ()) -> SensitivityReport:
    """Rank `groups` by the error keeping each alone removes (`error_of(kept)`: the output error with the groups
    `kept` in float and the rest quantized)."""
    full = error_of(())
    removed = {}
    for i, group in enumerate(groups):
        removed[group] = max(0.0, full - error_of((group,)))
        if progress:
            progress(f"[{i + 1}/{len(groups)}] {group}: removes {removed[group]:.3e} of {full:.3e}")
    return rank(removed, {g: len(layers) for g, layers in groups.items()}, images, net_hash, full, heads)


# -- the CPU measurement (reference executor) ------------------------------------------------------
def executor_sensitivity(tensors: Mapping[str, np.ndarray], meta: Mapping, calibration, batches: Sequence[np.ndarray],
                         imgsz: int, device: str = "cpu", progress=None) -> SensitivityReport:
    """Sensitivity of every group on `batches` (preprocessed images) with the reference executor."""
    from trtnet import compat
    from trtnet.executor import run_network
    from trtnet.network import define_network
    from trtnet.quant.calibrate import quant_plan, quantizable_tensors
    from trtnet.quant.calibration_file import network_hash
    from trtnet.quant.keep import head_convolutions, honoured_plan

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

    def error_of(kept: Sequence[str]) -> float:
        last = []  # (plan, its DefinedNetwork): kept alive with its builder, and run if it is the plan honoured

        def network_of(plan):
            last[:] = [plan, define(plan)]
            return last[1].network

        plan = honoured_plan(quant_plan(calibration, kept), network_of, log=lambda line: None)
        quantized = outputs(last[1] if last and last[0] is plan else define(plan))
        return float(np.mean([output_error(q, r) for q, r in zip(quantized, reference)]))

    return measure(groups, error_of, sum(len(x) for x in batches), network_hash(tensors, meta), progress,
                   head_convolutions(fp32.network))
