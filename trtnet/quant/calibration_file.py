"""The calibration file: readable JSON that any TensorRT version can rebuild an INT8 engine from.

    {"format": "trtnet-int8-calibration", "version": 1, "network_hash": "…", "method": "entropy",
     "percentile": null, "images": {"count": 8, "names": ["000000000009.jpg", …], "sha256": "…"},
     "amax": {"images": 1.0, "model.0": 3.21, …}}

`network_hash` identifies the network from what trtnet itself defines — the architecture metadata and
every weight (name, shape, bytes) — so it does not change with the TensorRT version, and a file made
for other weights or another architecture is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trtnet.errors import TrtnetError
from trtnet.fileio import atomic_write
from trtnet.quant.histogram import METHODS

FORMAT = "trtnet-int8-calibration"
VERSION = 1
# The metadata keys that define the network (every family's read_checkpoint, see networks/*.py). Everything
# else is labels or provenance (names, dates, trtnet_version, the weights file's name, format and bytes) or
# the default input size, which calibration ranges do not depend on enough to refuse a rebuild at another size.
ARCHITECTURE_KEYS = ("family", "arch", "yaml", "nc", "num_classes", "strides", "anchors", "reg_max", "bn_eps")


def network_hash(tensors: Mapping[str, np.ndarray], meta: Mapping) -> str:
    h = hashlib.sha256()
    arch = {k: meta[k] for k in ARCHITECTURE_KEYS if k in meta}
    h.update(json.dumps(arch, sort_keys=True, default=str).encode())
    for name in sorted(tensors):
        array = np.ascontiguousarray(np.asarray(tensors[name], dtype=np.float32))
        h.update(f"\0{name}\0{array.shape}\0".encode())
        h.update(array.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class ImagesUsed:
    count: int
    names: tuple = ()  # file names relative to the calibration folder
    sha256: str = ""  # of the image files' bytes, in order

    @classmethod
    def of(cls, paths: Sequence[os.PathLike], root: os.PathLike | None = None) -> ImagesUsed:
        h = hashlib.sha256()
        names = []
        for p in map(Path, paths):
            names.append(str(p.relative_to(root)) if root and p.is_relative_to(root) else p.name)
            h.update(p.read_bytes())
        return cls(len(names), tuple(names), h.hexdigest())


@dataclass(frozen=True)
class CalibrationFile:
    network_hash: str
    method: str
    amax: Mapping[str, float]
    images: ImagesUsed
    percentile: float | None = None
    extra: Mapping = field(default_factory=dict)  # free-form notes (e.g. imgsz), kept as written

    def to_json(self) -> dict:
        return {
            "format": FORMAT, "version": VERSION, "network_hash": self.network_hash, "method": self.method,
            "percentile": self.percentile,
            "images": {"count": self.images.count, "names": list(self.images.names), "sha256": self.images.sha256},
            "amax": {k: float(v) for k, v in self.amax.items()},
            "extra": dict(self.extra),
        }

    def write(self, path: str | os.PathLike) -> None:
        with atomic_write(path, "w") as f:
            json.dump(self.to_json(), f, indent=1)
            f.write("\n")

    def check_network(self, expected_hash: str, path: str | os.PathLike = "calibration file") -> None:
        if self.network_hash != expected_hash:
            raise TrtnetError(
                f"{path}: made for another network (hash {self.network_hash[:12]}…, these weights are "
                f"{expected_hash[:12]}…): calibrate again for these weights"
            )


def read_calibration(path: str | os.PathLike, expected_hash: str | None = None) -> CalibrationFile:
    """Read and validate `path`; with `expected_hash`, refuse a file made for another network."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrtnetError(f"{path}: calibration file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TrtnetError(f"{path}: not a readable calibration file ({exc})") from None
    calib = _from_json(data, path)
    if expected_hash is not None:
        calib.check_network(expected_hash, path)
    return calib


def _from_json(data, path: Path) -> CalibrationFile:
    def fail(problem: str):
        raise TrtnetError(f"{path}: {problem}")

    if not isinstance(data, dict) or data.get("format") != FORMAT:
        fail(f"not a trtnet calibration file (no \"format\": \"{FORMAT}\")")
    if data.get("version") != VERSION:
        fail(f"calibration format version {data.get('version')!r}; this trtnet reads version {VERSION}")
    if not isinstance(data.get("network_hash"), str) or not data["network_hash"]:
        fail("\"network_hash\" must be a non-empty string")
    if data.get("method") not in METHODS:
        fail(f"\"method\" must be one of {', '.join(METHODS)}, got {data.get('method')!r}")
    percentile = data.get("percentile")
    if percentile is not None and not _is_number(percentile):
        fail(f"\"percentile\" must be a number or null, got {percentile!r}")
    return CalibrationFile(data["network_hash"], data["method"], _amax(data.get("amax"), fail),
                           _images(data.get("images"), fail), percentile, data.get("extra") or {})


def _amax(amax, fail) -> dict:
    if not isinstance(amax, dict) or not amax:
        fail("\"amax\" must be a non-empty object of tensor name → number")
    for name, value in amax.items():
        if not _is_number(value) or not math.isfinite(value) or value < 0:
            fail(f"amax of tensor {name!r} must be a finite number >= 0, got {value!r}")
    return {name: float(value) for name, value in amax.items()}


def _images(images, fail) -> ImagesUsed:
    if not isinstance(images, dict):
        fail("\"images\" must be an object {count, names, sha256}")
    count, names, digest = images.get("count"), images.get("names", []), images.get("sha256", "")
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        fail(f"\"images.count\" must be a non-negative integer, got {count!r}")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        fail("\"images.names\" must be a list of strings")
    if not isinstance(digest, str):
        fail("\"images.sha256\" must be a string")
    return ImagesUsed(count, tuple(names), digest)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
