"""Read PyTorch checkpoints (.pt/.pth) with numpy alone: the unpickler lives in trtnet.safe_pickle; this
module turns its object into a state dict and the metadata the network builders need."""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trtnet.errors import TrtnetError
from trtnet.meta_checks import MAX_CLASSES, check_anchors, check_count, check_eps, check_head_channels, check_strides
from trtnet.networks import resnet as resnet_network
from trtnet.safe_pickle import InertRecord, ModuleRecord, load_pickle  # noqa: F401  (re-exported)

# ------------------------------------------------------------------------------------------------
# Models: from the unpickled object to a state dict and the metadata the network builders need


@dataclass
class Checkpoint:
    family: str  # "yolov5" | "resnet"
    state_dict: OrderedDict[str, np.ndarray]  # float32, real shapes, torch's state_dict() names and order
    meta: dict


# (block, blocks per stage) → the torchvision name networks/resnet.py builds it under
RESNET_ARCHS = {(block, tuple(counts)): name for name, (block, counts) in resnet_network.ARCHS.items()}
TORCHVISION_BN_EPS = 1e-5


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read a YOLOv5 (.pt) or torchvision ResNet (.pth) checkpoint without torch and without running it."""
    path = Path(path)
    obj = load_pickle(path)
    model = _model_record(obj)
    if model is not None:
        if model.qualname.startswith("models.yolo.") and isinstance(model.get("yaml"), dict):
            return _yolov5(path, model, obj)
        if model.class_name == "ResNet":
            return _resnet(path, _to_float32(module_state_dict(model)), _bn_eps(path, model))
        raise TrtnetError(f"{path}: unknown model family: it holds a {model.qualname}. {_WHAT_WE_READ}")
    state_dict = _tensor_dict(obj)
    if state_dict is None:
        raise TrtnetError(f"{path}: unknown model family: it holds {_describe(obj)}. {_WHAT_WE_READ}")
    state_dict = _to_float32(_strip_prefix(state_dict, "module."))
    if "conv1.weight" in state_dict and "fc.weight" in state_dict:
        return _resnet(path, state_dict, TORCHVISION_BN_EPS)
    if any(k.startswith("model.0.") for k in state_dict):
        raise TrtnetError(
            f"{path} is a bare YOLOv5 state dict: it lacks the model yaml (depth, width, anchors, classes) "
            "needed to rebuild the network. Convert the checkpoint train.py wrote (best.pt / last.pt) instead."
        )
    keys = ", ".join(list(state_dict)[:6])
    raise TrtnetError(f"{path}: unknown model family: a state dict with keys {keys}, … {_WHAT_WE_READ}")


_WHAT_WE_READ = (
    "trtnet reads YOLOv5 checkpoints (models.yolo Model/DetectionModel under 'model' or 'ema') and torchvision "
    "ResNet-18/34/50/101/152 (a state_dict or the pickled module)."
)


def module_state_dict(module: ModuleRecord, prefix: str = "") -> OrderedDict[str, np.ndarray]:
    """What `module.state_dict()` returns: parameters, persistent buffers, then children, depth-first."""
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    non_persistent = module.get("_non_persistent_buffers_set") or set()
    for name, value in (module.get("_parameters") or {}).items():
        if value is not None:
            out[prefix + name] = value
    for name, value in (module.get("_buffers") or {}).items():
        if value is not None and name not in non_persistent:
            out[prefix + name] = value
    for name, child in module.children().items():
        out.update(module_state_dict(child, f"{prefix}{name}."))
    return out


def _model_record(obj: Any) -> ModuleRecord | None:
    """The pickled model: the object itself, or like the official loader `ckpt.get('ema') or ckpt['model']`."""
    if isinstance(obj, ModuleRecord):
        return obj
    if isinstance(obj, dict):
        for key in ("ema", "model"):
            if isinstance(obj.get(key), ModuleRecord):
                return obj[key]
    return None


def _tensor_dict(obj: Any) -> dict | None:
    if isinstance(obj, dict):
        for candidate in (obj, obj.get("state_dict"), obj.get("model")):
            if isinstance(candidate, dict) and candidate and all(isinstance(v, np.ndarray) for v in candidate.values()):
                return candidate
    return None


def _describe(obj: Any) -> str:
    if isinstance(obj, dict):
        return f"a dict with keys {', '.join(map(str, list(obj)[:8]))}"
    return f"a {getattr(obj, 'qualname', type(obj).__name__)}"


def _strip_prefix(tensors: dict, prefix: str) -> dict:
    """DataParallel's `module.` prefix, if every key carries it."""
    if all(k.startswith(prefix) for k in tensors):
        return OrderedDict((k[len(prefix):], v) for k, v in tensors.items())
    return tensors


def _to_float32(tensors: dict) -> OrderedDict[str, np.ndarray]:
    return OrderedDict((k, np.asarray(v, dtype=np.float32, order="C")) for k, v in tensors.items())


def _bn_eps(path: Path, model: ModuleRecord) -> float | None:
    eps = {check_eps(m.get("eps"), path) for m in model.walk() if m.class_name.startswith("BatchNorm")}
    if len(eps) > 1:
        raise TrtnetError(f"{path}: BatchNorm layers use different eps values {sorted(eps)}; trtnet assumes one")
    return eps.pop() if eps else None


# -- YOLOv5 ----------------------------------------------------------------------------------------


def _yolov5(path: Path, model: ModuleRecord, ckpt: Any) -> Checkpoint:
    detect = _detect_head(path, model)
    strides = check_strides(model.get("stride"), path)
    anchors = np.asarray((detect.get("_buffers") or {}).get("anchors"), dtype=np.float32)
    if anchors.ndim != 3 or anchors.shape[0] != len(strides):
        raise TrtnetError(f"{path}: Detect's anchors {anchors.shape} do not match the model's strides {strides}")
    nc = check_count(detect.get("nc"), "Detect.nc", path, MAX_CLASSES)
    check_anchors(anchors, len(strides), path)
    check_head_channels(path, detect, nc, anchors.shape[1])
    state_dict = module_state_dict(model)
    meta = {
        "family": "yolov5",
        "generation": "v5.0-focus" if any(m.class_name == "Focus" for m in model.walk()) else "v6+",
        "model_class": model.qualname,
        "yaml": model.get("yaml"),
        "nc": nc,
        "names": _class_names(model.get("names"), nc),
        "strides": strides,
        # Detect keeps anchors divided by the stride; times the stride they are the pixels it decodes with.
        "anchors": (anchors * np.asarray(strides, np.float32)[:, None, None]).reshape(len(strides), -1).tolist(),
        "bn_eps": _bn_eps(path, model),
        "imgsz": 1280 if len(strides) > 3 else 640,
        "source_dtype": str(next(iter(state_dict.values())).dtype),
    }
    if isinstance(ckpt, dict):
        meta.update({k: ckpt[k] for k in ("epoch", "date") if isinstance(ckpt.get(k), (int, str))})
    return Checkpoint("yolov5", _to_float32(state_dict), meta)


def _detect_head(path: Path, model: ModuleRecord) -> ModuleRecord:
    layers = list(model.children().get("model", ModuleRecord()).children().values())
    head = layers[-1] if layers else None
    if head is None or head.class_name != "Detect":
        found = head.qualname if head is not None else "no layers"
        raise TrtnetError(f"{path}: the YOLOv5 model ends in {found}, not Detect; trtnet builds detection models only")
    return head


def _class_names(names: Any, nc: int) -> list[str]:
    if isinstance(names, dict):
        return [str(names.get(i, i)) for i in range(nc)]
    if isinstance(names, (list, tuple)) and len(names) == nc:
        return [str(n) for n in names]
    return [str(i) for i in range(nc)]


# -- ResNet ----------------------------------------------------------------------------------------


def _resnet(path: Path, state_dict: OrderedDict[str, np.ndarray], bn_eps: float | None) -> Checkpoint:
    meta = {
        "family": "resnet",
        "arch": resnet_arch(state_dict, path),
        "num_classes": int(state_dict["fc.weight"].shape[0]),
        "bn_eps": TORCHVISION_BN_EPS if bn_eps is None else bn_eps,
        "imgsz": 224,
    }
    return Checkpoint("resnet", state_dict, meta)


def resnet_arch(state_dict: dict, source: Path | str = "weights") -> str:
    """torchvision's name for the layout: block type (`conv3` present → Bottleneck) and blocks per stage."""
    block = "bottleneck" if any(k.endswith(".conv3.weight") for k in state_dict) else "basic"
    stages: dict[int, set[int]] = {i: set() for i in range(1, 5)}
    for key in state_dict:
        match = re.match(r"layer([1-4])\.(\d+)\.", key)
        if match:
            stages[int(match.group(1))].add(int(match.group(2)))
    counts = tuple(len(stages[i]) for i in range(1, 5))
    first = state_dict.get("layer1.0.conv2.weight")
    arch = RESNET_ARCHS.get((block, counts))
    if arch is None or first is None or tuple(first.shape) != (64, 64, 3, 3):
        shape = None if first is None else tuple(first.shape)
        raise TrtnetError(
            f"{source}: a ResNet layout trtnet does not know ({block} blocks {list(counts)}, layer1.0.conv2 {shape}); "
            f"it builds {', '.join(RESNET_ARCHS.values())} (not ResNeXt / Wide ResNet)"
        )
    return arch
