"""Read PyTorch checkpoints (.pt/.pth) with numpy alone: the unpickler lives in trtnet.safe_pickle; this
module turns its object into a state dict and the metadata the network builders need."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trtnet.errors import TrtnetError
from trtnet.meta_checks import check_eps
from trtnet.safe_pickle import InertRecord, ModuleRecord, load_pickle  # noqa: F401  (re-exported)

# ------------------------------------------------------------------------------------------------
# Models: from the unpickled object to a state dict and the metadata the network builders need


@dataclass
class Checkpoint:
    family: str  # a networks/ family name
    state_dict: OrderedDict[str, np.ndarray]  # float32, real shapes, torch's state_dict() names and order
    meta: dict


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint of any family in networks/ without torch and without running it: each family is asked."""
    from trtnet import networks

    path = Path(path)
    obj = load_pickle(path)
    for module in networks.families().values():
        checkpoint = module.read_checkpoint(path, obj)
        if checkpoint is not None:
            return checkpoint
    raise TrtnetError(f"{path}: unknown model family: {_held(obj)}. trtnet reads {networks.checkpoints_read()}.")


def _held(obj: Any) -> str:
    model = model_record(obj)
    if model is not None:
        return f"it holds a {model.qualname}"
    state_dict = tensor_dict(obj)
    if state_dict is None:
        return f"it holds {describe(obj)}"
    return f"a state dict with keys {', '.join(list(strip_prefix(state_dict, 'module.'))[:6])}, …"


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


def model_record(obj: Any) -> ModuleRecord | None:
    """The pickled model: the object itself, or like the official loader `ckpt.get('ema') or ckpt['model']`."""
    if isinstance(obj, ModuleRecord):
        return obj
    if isinstance(obj, dict):
        for key in ("ema", "model"):
            if isinstance(obj.get(key), ModuleRecord):
                return obj[key]
    return None


def tensor_dict(obj: Any) -> dict | None:
    if isinstance(obj, dict):
        for candidate in (obj, obj.get("state_dict"), obj.get("model")):
            if isinstance(candidate, dict) and candidate and all(isinstance(v, np.ndarray) for v in candidate.values()):
                return candidate
    return None


def describe(obj: Any) -> str:
    if isinstance(obj, dict):
        return f"a dict with keys {', '.join(map(str, list(obj)[:8]))}"
    return f"a {getattr(obj, 'qualname', type(obj).__name__)}"


def strip_prefix(tensors: dict, prefix: str) -> dict:
    """DataParallel's `module.` prefix, if every key carries it."""
    if all(k.startswith(prefix) for k in tensors):
        return OrderedDict((k[len(prefix):], v) for k, v in tensors.items())
    return tensors


def to_float32(tensors: dict) -> OrderedDict[str, np.ndarray]:
    return OrderedDict((k, np.asarray(v, dtype=np.float32, order="C")) for k, v in tensors.items())


def bn_eps(path: Path, model: ModuleRecord) -> float | None:
    eps = {check_eps(m.get("eps"), path) for m in model.walk() if m.class_name.startswith("BatchNorm")}
    if len(eps) > 1:
        raise TrtnetError(f"{path}: BatchNorm layers use different eps values {sorted(eps)}; trtnet assumes one")
    return eps.pop() if eps else None
