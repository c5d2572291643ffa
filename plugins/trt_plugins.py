"""YOLO decode + NMS as one TensorRT IPluginV3 layer ("TrtnetYoloNMS", namespace "trtnet", version 1).

The plugin takes the raw YOLOv5 Detect head maps `[B, na*(nc+5), h, w]` (`head="anchors"`) or the one
YOLOv8/YOLO11 output `[B, 4 + nc, N]` (`head="anchor_free"`), all float32 or all float16, and writes
`dets [B, max_det, 6]` float32 (x1, y1, x2, y2, conf, cls in input pixels) and `counts [B]` int32. Its
enqueue runs the same kernels as `--postprocess kernels` (`trtnet.plugins.postprocess.YoloPostprocess`)
on TensorRT's stream, in the workspace TensorRT hands it.

Python plugins need TensorRT >= 10 (IPluginV3 classes) and a network with `add_plugin_v3`; TensorRT 8.x
has neither, TensorRT-RTX has the classes but no `add_plugin_v3`. Importing this module registers the
creator wherever the classes exist, so engines holding the plugin deserialize in this process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from trtnet import compat
from trtnet.compat import python_plugins_supported
from trtnet.errors import TrtnetError
from trtnet.plugins.postprocess import HEADS, NmsSettings

PLUGIN_NAME = "TrtnetYoloNMS"
PLUGIN_NAMESPACE = "trtnet"
PLUGIN_VERSION = "1"
DET_FIELDS = 6  # x1, y1, x2, y2, conf, cls
USE_KERNELS = "use --postprocess kernels: the same decode + NMS kernels run right after the engine"


def _tensorrt_or_none() -> Any:
    try:
        return compat.trt()
    except TrtnetError:
        return None


_trt = _tensorrt_or_none()
_PLUGIN_CLASSES = ("IPluginV3", "IPluginV3OneCore", "IPluginV3OneBuild", "IPluginV3OneRuntime")


def _require_python_plugins() -> None:
    if not python_plugins_supported():
        raise TrtnetError(
            f"--postprocess plugin needs TensorRT >= 10 (Python IPluginV3 plugins); {compat.flavour()} has "
            f"none: {USE_KERNELS}"
        )


_PLUGIN_BASES = tuple(getattr(_trt, n) for n in _PLUGIN_CLASSES) if python_plugins_supported() else (object,)
_CREATOR_BASES = (_trt.IPluginCreatorV3One,) if python_plugins_supported() else (object,)


@dataclass(frozen=True)
class YoloNMSSettings:
    """Everything the plugin needs; the keyword arguments of `YoloPostprocess`."""

    nc: int
    strides: tuple[int, ...] = ()  # anchors head only
    anchors: tuple[tuple[float, ...], ...] = ()  # anchors head, per level: na (w, h) pairs, in input pixels
    head: str = "anchors"  # one of HEADS: "anchors" (YOLOv5 maps) | "anchor_free" (YOLOv8/YOLO11 [B, 4 + nc, N])
    conf: float = 0.25
    iou: float = 0.45
    max_det: int = 1000
    multi_label: bool = False
    agnostic: bool = False
    capacity: int = 30000  # candidates kept before NMS, as the official max_nms

    def __post_init__(self):
        object.__setattr__(self, "strides", tuple(int(s) for s in self.strides))
        object.__setattr__(self, "anchors", tuple(tuple(float(a) for a in level) for level in self.anchors))
        self._check()

    def _check(self) -> None:
        if self.head not in HEADS:
            raise TrtnetError(f"YOLO postprocess: head must be one of {', '.join(HEADS)} (got {self.head!r})")
        if self.head == "anchor_free":
            if self.strides or self.anchors:
                raise TrtnetError("YOLO postprocess: the anchor-free head takes no strides or anchors")
        else:
            self._check_anchors()
        if self.nc < 1 or self.capacity < 1:
            raise TrtnetError(f"YOLO postprocess: nc ({self.nc}) and capacity ({self.capacity}) must be positive")
        NmsSettings(self.conf, self.iou, self.max_det, self.multi_label, self.agnostic)  # checks them

    def _check_anchors(self) -> None:
        sizes = {len(level) for level in self.anchors}
        same_pairs_per_level = len(sizes) == 1 and min(sizes) > 0 and min(sizes) % 2 == 0
        if not self.strides or len(self.anchors) != len(self.strides) or not same_pairs_per_level:
            raise TrtnetError(
                f"YOLO postprocess: anchors {list(self.anchors)} do not fit strides {list(self.strides)}: "
                "give one row of (w, h) pairs per stride, the same number of pairs on every row"
            )

    @property
    def channels(self) -> int:
        """Channels of each input: na * (nc + 5) per raw YOLOv5 map, 4 + nc of the anchor-free output."""
        if self.head == "anchor_free":
            return 4 + self.nc
        return len(self.anchors[0]) // 2 * (self.nc + 5)

    def postprocess_kwargs(self) -> dict[str, Any]:
        return {
            "head": self.head, "strides": list(self.strides), "anchors": [list(a) for a in self.anchors],
            "nc": self.nc,
            "conf": self.conf, "iou": self.iou, "max_det": self.max_det, "multi_label": self.multi_label,
            "agnostic": self.agnostic, "capacity": self.capacity,
        }


# Serialized field name → numpy dtype of its PluginField. float64 keeps thresholds exactly as given.
_FIELDS: dict[str, type] = {
    "conf": np.float64, "iou": np.float64, "max_det": np.int32, "agnostic": np.int32,
    "multi_label": np.int32, "capacity": np.int32, "nc": np.int32, "strides": np.int32, "anchors": np.float64,
    "head": np.int32,  # index into HEADS
}
OPTIONAL_FIELDS = {"head": np.asarray([HEADS.index("anchors")], np.int32)}  # engines built before it existed


def _field_type(dtype: type) -> Any:
    return {np.float64: _trt.PluginFieldType.FLOAT64, np.int32: _trt.PluginFieldType.INT32}[dtype]


def settings_to_arrays(settings: YoloNMSSettings) -> dict[str, np.ndarray]:
    """The plugin's parameters as the arrays behind its PluginFields (anchors flattened level by level)."""
    values = {
        "conf": [settings.conf], "iou": [settings.iou], "max_det": [settings.max_det],
        "agnostic": [int(settings.agnostic)], "multi_label": [int(settings.multi_label)],
        "capacity": [settings.capacity], "nc": [settings.nc], "strides": settings.strides,
        "anchors": [a for level in settings.anchors for a in level], "head": [HEADS.index(settings.head)],
    }
    return {name: np.asarray(values[name], dtype=dtype) for name, dtype in _FIELDS.items()}


def settings_from_arrays(arrays: dict[str, np.ndarray]) -> YoloNMSSettings:
    arrays = {**OPTIONAL_FIELDS, **arrays}
    missing, unknown = sorted(set(_FIELDS) - set(arrays)), sorted(set(arrays) - set(_FIELDS))
    if missing or unknown:
        raise TrtnetError(
            f"{PLUGIN_NAME} fields: missing {missing}, unknown {unknown} — was the engine built by another "
            "trtnet version? Rebuild it with this one"
        )
    a = {name: np.asarray(value).ravel() for name, value in arrays.items()}
    strides = [int(s) for s in a["strides"]]
    head = int(a["head"][0])
    if not 0 <= head < len(HEADS):
        raise TrtnetError(f"{PLUGIN_NAME} field head={head} is not one of 0..{len(HEADS) - 1}: rebuild the engine")
    anchors = np.asarray(a["anchors"], dtype=np.float64)
    return YoloNMSSettings(
        head=HEADS[head], strides=strides,
        anchors=anchors.reshape(len(strides), -1).tolist() if strides else [],
        nc=int(a["nc"][0]), conf=float(a["conf"][0]), iou=float(a["iou"][0]), max_det=int(a["max_det"][0]),
        multi_label=bool(a["multi_label"][0]), agnostic=bool(a["agnostic"][0]), capacity=int(a["capacity"][0]),
    )


def _head_dtype(data_type: Any) -> str:
    return {_trt.DataType.FLOAT: "float32", _trt.DataType.HALF: "float16"}[data_type]


def _level_shapes(dims_list: Sequence[Any]) -> list[tuple[int, ...]]:
    """Each input's shape after [B, C]: (h, w) of a YOLOv5 map, (N,) of the anchor-free output."""
    return [tuple(int(v) for v in tuple(d)[2:]) for d in dims_list]


class YoloNMSPlugin(*_PLUGIN_BASES):
    """Decode + NMS of YOLO heads; TensorRT drives it through the IPluginV3One* capabilities."""

    def __init__(self, settings: YoloNMSSettings, phase: Any = None):
        _require_python_plugins()
        for base in _PLUGIN_BASES:
            base.__init__(self)
        self.plugin_name = PLUGIN_NAME
        self.plugin_namespace = PLUGIN_NAMESPACE
        self.plugin_version = PLUGIN_VERSION
        self.num_outputs = 2
        self.timing_cache_id = ""  # no custom tactics: instances with equal I/O may share timings
        self.settings = settings
        self.phase = phase
        self._host = None  # YoloPostprocess, made on first use (it compiles kernels)
        self._serialized: dict[str, np.ndarray] = {}
        self._fields = None

    def postprocess(self):
        if self._host is None:
            from trtnet.plugins.postprocess import YoloPostprocess

            self._host = YoloPostprocess(**self.settings.postprocess_kwargs())
        return self._host

    # --- core / lifetime ---

    def get_capability_interface(self, capability_type):
        return self

    def clone(self):
        return YoloNMSPlugin(self.settings, self.phase)

    def attach_to_context(self, resource_context):
        return self.clone()

    # --- build ---

    def get_output_data_types(self, input_types):
        return [_trt.DataType.FLOAT, _trt.DataType.INT32]

    def get_output_shapes(self, inputs, shape_inputs, expr_builder):
        batch = inputs[0][0]
        dets = [batch, expr_builder.constant(self.settings.max_det), expr_builder.constant(DET_FIELDS)]
        return [_trt.DimsExprs(dets), _trt.DimsExprs([batch])]

    def supports_format_combination(self, pos, in_out, num_inputs):
        desc = in_out[pos].desc
        if desc.format != _trt.TensorFormat.LINEAR:
            return False
        if pos < num_inputs:
            return desc.type in (_trt.DataType.FLOAT, _trt.DataType.HALF) and desc.type == in_out[0].desc.type
        return desc.type == (_trt.DataType.FLOAT if pos == num_inputs else _trt.DataType.INT32)

    def configure_plugin(self, inputs, outputs):
        pass  # nothing to choose: one format, and enqueue reads shapes from its descriptors

    def get_workspace_size(self, inputs, outputs):
        batch = int(inputs[0].max[0])
        return int(self.postprocess().workspace_bytes(batch, _level_shapes([d.max for d in inputs])))

    # --- runtime ---

    def on_shape_change(self, inputs, outputs):
        pass  # enqueue reads shapes from its descriptors

    def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
        self.postprocess().enqueue(
            int(stream), [int(p) for p in inputs], _head_dtype(input_desc[0].type), int(input_desc[0].dims[0]),
            _level_shapes([d.dims for d in input_desc]), int(workspace), int(outputs[0]), int(outputs[1]),
        )

    def get_fields_to_serialize(self):
        # PluginFields point into these arrays: keep them, and the collection, as long as the plugin.
        self._serialized = settings_to_arrays(self.settings)
        self._fields = _trt.PluginFieldCollection(
            [_trt.PluginField(n, a, _field_type(a.dtype.type)) for n, a in self._serialized.items()]
        )
        return self._fields


class YoloNMSCreator(*_CREATOR_BASES):
    """Makes `YoloNMSPlugin`s from PluginFields: at build time, and when an engine is deserialized."""

    def __init__(self):
        _require_python_plugins()
        _CREATOR_BASES[0].__init__(self)
        self.name = PLUGIN_NAME
        self.plugin_namespace = PLUGIN_NAMESPACE
        self.plugin_version = PLUGIN_VERSION
        self._empty = {name: np.zeros(0, dtype) for name, dtype in _FIELDS.items()}
        self.field_names = _trt.PluginFieldCollection(
            [_trt.PluginField(n, a, _field_type(a.dtype.type)) for n, a in self._empty.items()]
        )

    def create_plugin(self, name, field_collection, phase):
        arrays = {f.name: np.array(f.data) for f in field_collection}
        return YoloNMSPlugin(settings_from_arrays(arrays), phase)


_REGISTERED: list[Any] = []  # TensorRT's registry holds a raw pointer: keep our creator alive
_NETWORK_PLUGINS: list[Any] = []  # likewise for plugins handed to add_plugin_v3


def register() -> Any:
    """Register the creator with TensorRT's plugin registry once per process; returns the creator."""
    _require_python_plugins()
    registry = _trt.get_plugin_registry()
    creator = registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE)
    if creator is None:
        creator = YoloNMSCreator()
        if not registry.register_creator(creator, PLUGIN_NAMESPACE):
            raise TrtnetError(f"TensorRT refused to register the {PLUGIN_NAME} plugin creator")
        _REGISTERED.append(creator)
    return creator


def add_yolo_nms(network, heads: Sequence[Any], settings: YoloNMSSettings) -> tuple[Any, Any]:
    """Add decode + NMS after the raw heads; returns the (dets, counts) tensors, not yet marked outputs."""
    _require_python_plugins()
    if not hasattr(network, "add_plugin_v3"):
        raise TrtnetError(
            f"{compat.flavour()} cannot add Python plugins to a network (no add_plugin_v3): {USE_KERNELS}"
        )
    _check_heads(heads, settings)
    register()
    plugin = YoloNMSPlugin(settings, _trt.TensorRTPhase.BUILD)
    _NETWORK_PLUGINS.append(plugin)
    layer = network.add_plugin_v3(list(heads), [], plugin)
    layer.name = "yolo_nms"
    dets, counts = layer.get_output(0), layer.get_output(1)
    dets.name, counts.name = "dets", "counts"
    return dets, counts


def _check_heads(heads: Sequence[Any], settings: YoloNMSSettings) -> None:
    if settings.head == "anchor_free":
        shape = tuple(heads[0].shape) if len(heads) == 1 else ()
        if len(shape) != 3 or shape[1] != settings.channels:
            raise TrtnetError(f"YOLO postprocess: the anchor-free head takes one output [B, {settings.channels}, N] "
                              f"(4 + nc with nc={settings.nc}), got {[list(h.shape) for h in heads]}")
        return
    if len(heads) != len(settings.strides):
        raise TrtnetError(f"YOLO postprocess: {len(heads)} head maps for {len(settings.strides)} strides")
    for i, head in enumerate(heads):
        shape = tuple(head.shape)
        if len(shape) != 4 or shape[1] != settings.channels:
            raise TrtnetError(
                f"YOLO postprocess: head {i} has shape {list(shape)}, expected [B, {settings.channels}, h, w] "
                f"(na * (nc + 5) with nc={settings.nc})"
            )


if python_plugins_supported():
    register()
