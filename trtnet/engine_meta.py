"""The engine sidecar: what trtnet.build writes beside an engine and the runtime, API, bench and val read.

One typed record, `EngineMeta`, checked field by field when it is read, so a hand-edited or foreign sidecar
gives one TrtnetError naming the file and the field instead of a traceback somewhere later. The JSON keys
are those of every engine built so far; family-specific fields (`nc`, `names`, `strides`, `anchors`, `head`,
`num_classes`, `softmax`) are optional typed fields, and keys this version does not know are kept in `extra`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from trtnet.errors import TrtnetError
from trtnet.plugins.postprocess import NmsSettings

REQUIRED_KEYS = ("family", "imgsz", "batch", "input", "outputs", "tensorrt")
DETECTION_ROW = 6  # x1, y1, x2, y2, score, class: one row of the decode + NMS output


@dataclass(frozen=True)
class PostprocessSettings(NmsSettings):
    """What runs after the raw YOLO heads (`mode`, with its NMS settings); recorded in the engine metadata."""

    mode: str = "none"


def nms_kwargs(settings: NmsSettings) -> dict:
    """The NmsSettings fields of `settings` as keyword arguments (YoloPostprocess, the plugin's settings)."""
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(NmsSettings)}


@dataclass(frozen=True)
class BatchProfile:
    """The batch sizes an engine is built for (and its sidecar records)."""

    min: int = 1
    opt: int = 1
    max: int = 1

    @property
    def dynamic(self) -> bool:
        return self.min != self.max

    @property
    def dim(self) -> int:
        return -1 if self.dynamic else self.max

    def check(self) -> BatchProfile:
        if not 1 <= self.min <= self.opt <= self.max:
            raise TrtnetError(f"batch profile must satisfy 1 <= min <= opt <= max, got {self}")
        return self

    def __str__(self) -> str:
        return f"{self.min}..{self.opt}..{self.max}" if self.dynamic else str(self.max)


@dataclass(frozen=True)
class BuiltWith:
    flavour: str  # compat.Flavour.name: "tensorrt" | "tensorrt-rtx"
    version: str


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: str = "float32"


@dataclass(frozen=True)
class Int8Record:
    """How an INT8 engine was quantized (trtnet.quant.int8_build)."""

    mode: str  # explicit | implicit
    calibration: str  # the calibration file (explicit: trtnet JSON; implicit: TensorRT's cache)
    method: str  # entropy | percentile | max
    images: int  # images the ranges were calibrated on (implicit with an existing cache: 0)
    keep: tuple[str, ...] = ()  # layers / modules left in fp16


@dataclass(frozen=True)
class EngineMeta:
    family: str  # a networks/ FAMILY
    imgsz: tuple[int, int]  # (h, w): the static size, or the size a dynamic range is tuned for
    batch: BatchProfile
    input: InputSpec
    outputs: tuple[str, ...]
    tensorrt: BuiltWith
    trtnet_version: str = ""
    weights: str = ""  # the weights file name it was built from
    precision: str = "fp32"
    tf32: bool = False
    min_imgsz: int | None = None
    max_imgsz: int | None = None
    target_cc: tuple[str, ...] = ()
    device: dict | None = None  # cuda_rt.device_identity of the build GPU, if any
    layers: int = 0
    engine_bytes: int = 0
    build_seconds: float = 0.0
    built_at: str | None = None  # UTC ISO 8601, e.g. 2026-12-02T05:40:00+00:00
    weights_sha256: str | None = None  # of the weights file built from
    checkpoint: str | None = None  # the checkpoint those weights came from (gen_wts' "source")
    checkpoint_sha256: str | None = None  # its sha256 (gen_wts' "source_sha256")
    postprocess: PostprocessSettings | None = None  # detect families
    nc: int | None = None  # detect families: class count
    names: tuple[str, ...] = ()
    strides: tuple[int, ...] = ()
    anchors: tuple[tuple[float, ...], ...] = ()
    head: str | None = None  # detect families: YoloPostprocess's head kind ("anchors" when absent)
    num_classes: int | None = None  # classify families
    softmax: bool | None = None
    int8: Int8Record | None = None  # INT8 engines
    extra: dict = field(default_factory=dict)  # keys this version does not know, kept as read

    @classmethod
    def from_dict(cls, data: Any, source: str | Path = "engine metadata") -> EngineMeta:
        """Check every known field's type; one TrtnetError naming `source` and the field otherwise."""
        if not isinstance(data, Mapping):
            raise TrtnetError(f"{source}: not a JSON object; rebuild the engine with python -m trtnet.build")
        missing = [k for k in REQUIRED_KEYS if k not in data]
        if missing:
            raise TrtnetError(f"{source} lacks {', '.join(missing)}: written by another trtnet version? "
                              "Rebuild the engine")
        values, extra = {}, {}
        for key, value in data.items():
            check = _FIELDS.get(key)
            if check is None:
                extra[key] = value
                continue
            try:
                values[key] = check(value)
            except (TypeError, ValueError) as exc:
                raise TrtnetError(f"{source}: field {key!r} {exc} (found {value!r:.80}); rebuild the engine "
                                  "with python -m trtnet.build") from None
            except TrtnetError as exc:
                raise TrtnetError(f"{source}: field {key!r}: {exc}") from None
        return cls(**values, extra=extra)

    def to_dict(self) -> dict:
        """The JSON object (the keys of every engine built so far; None and empty optional fields left out)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or (value is None and f.name in _OMIT_WHEN_NONE) or \
                    (value == () and f.name in _OMIT_WHEN_EMPTY):
                continue
            out[f.name] = _jsonable(value)
        out.update(self.extra)
        return out

    @property
    def class_count(self) -> int:
        return int(self.nc or self.num_classes or 0)

    @property
    def class_names(self) -> list[str]:
        return [str(n) for n in self.names or range(self.class_count)]

    @property
    def postprocess_in_engine(self) -> bool:
        return self.postprocess is not None and self.postprocess.mode == "plugin"


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


# -- field checks: each returns the typed value or raises TypeError/ValueError saying what it should be


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("must be a string")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError("must be true or false")
    return value


def _int(value: Any, least: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("must be an integer")
    if value < least:
        raise ValueError(f"must be at least {least}")
    return value


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError("must be a number")
    if not math.isfinite(value):  # json.loads reads NaN and Infinity; the weights' sidecar refuses them too
        raise ValueError("must be a finite number")
    return float(value)


def _optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else check(value)


def _list_of(check: Callable[[Any], Any]) -> Callable[[Any], tuple]:
    def checked(value: Any) -> tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError("must be a list")
        return tuple(check(v) for v in value)

    return checked


def _positive(value: Any) -> int:
    return _int(value, 1)


def _imgsz(value: Any) -> tuple[int, int]:
    sides = _list_of(_positive)(value)
    if len(sides) != 2:
        raise ValueError("must be [height, width]")
    return sides


def _object(value: Any, keys: tuple[str, ...]) -> Mapping:
    if not isinstance(value, Mapping):
        raise TypeError(f"must be an object with {', '.join(keys)}")
    missing = [k for k in keys if k not in value]
    if missing:
        raise ValueError(f"lacks {', '.join(missing)}")
    return value


def _batch(value: Any) -> BatchProfile:
    v = _object(value, ("min", "opt", "max"))
    batch = BatchProfile(*(_positive(v[k]) for k in ("min", "opt", "max")))
    if not batch.min <= batch.opt <= batch.max:
        raise ValueError("must satisfy min <= opt <= max")
    return batch


def _tensorrt(value: Any) -> BuiltWith:
    v = _object(value, ("flavour", "version"))
    return BuiltWith(_str(v["flavour"]), _str(v["version"]))


def _input(value: Any) -> InputSpec:
    v = _object(value, ("name",))
    return InputSpec(_str(v["name"]), _str(v.get("dtype", "float32")))


def _postprocess(value: Any) -> PostprocessSettings:
    v = _object(value, ("mode",))
    return PostprocessSettings(mode=_str(v["mode"]), conf=_number(v.get("conf", 0.25)),
                               iou=_number(v.get("iou", 0.45)), max_det=_positive(v.get("max_det", 1000)),
                               multi_label=_bool(v.get("multi_label", False)), agnostic=_bool(v.get("agnostic", False)))


def _device(value: Any) -> dict:
    if not isinstance(value, Mapping):
        raise TypeError("must be an object")
    return dict(value)


def _int8(value: Any) -> Int8Record:
    v = _object(value, ("mode", "calibration", "method", "images"))
    return Int8Record(_str(v["mode"]), _str(v["calibration"]), _str(v["method"]), _int(v["images"]),
                      _list_of(_str)(v.get("keep", [])))


def _anchors(value: Any) -> tuple:
    return _list_of(_list_of(_number))(value)


_FIELDS: dict[str, Callable[[Any], Any]] = {
    "family": _str, "imgsz": _imgsz, "batch": _batch, "input": _input, "outputs": _list_of(_str),
    "tensorrt": _tensorrt, "trtnet_version": _str, "weights": _str, "precision": _str, "tf32": _bool,
    "min_imgsz": _optional(_positive), "max_imgsz": _optional(_positive), "target_cc": _list_of(_str),
    "device": _optional(_device), "layers": _int, "engine_bytes": _int, "build_seconds": _number,
    "built_at": _optional(_str), "weights_sha256": _optional(_str), "checkpoint": _optional(_str),
    "checkpoint_sha256": _optional(_str),
    "postprocess": _optional(_postprocess), "nc": _optional(_positive), "names": _list_of(lambda n: str(n)),
    "strides": _list_of(_positive), "anchors": _anchors, "head": _optional(_str), "num_classes": _optional(_positive),
    "softmax": _optional(_bool), "int8": _optional(_int8),
}
_OMIT_WHEN_NONE = {"postprocess", "nc", "head", "num_classes", "softmax", "int8", "built_at", "weights_sha256",
                   "checkpoint", "checkpoint_sha256"}
_OMIT_WHEN_EMPTY = {"names", "strides", "anchors"}
