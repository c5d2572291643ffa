"""ResNet-18/34/50/101/152 — reads beside torchvision/models/resnet.py.

One constructor serves every depth: `ARCHS` says which block and how many per stage, `_make_layer`
builds each stage. Tensor names are torchvision's state-dict keys; stage outputs are named
`layer1`..`layer4`, the network output `logits` (and `probs` when softmax is asked for).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trtnet.checkpoint import (
    Checkpoint,
    bn_eps,
    model_record,
    module_state_dict,
    strip_prefix,
    tensor_dict,
    to_float32,
)
from trtnet.errors import TrtnetError
from trtnet.graph import Graph

FAMILY = "resnet"
TASK = "classify"
INPUT = "input"
DEFAULT_IMGSZ = 224
DEFINE_OPTIONS = ("softmax",)
CHECKPOINTS = "torchvision ResNet-18/34/50/101/152 (a state_dict or the pickled module)"
PICKLED_MODULES = ("torchvision.models.",)

ARCHS = {
    "resnet18": ("basic", [2, 2, 2, 2]),
    "resnet34": ("basic", [3, 4, 6, 3]),
    "resnet50": ("bottleneck", [3, 4, 6, 3]),
    "resnet101": ("bottleneck", [3, 4, 23, 3]),
    "resnet152": ("bottleneck", [3, 8, 36, 3]),
}
EXPANSION = 4  # torchvision's Bottleneck.expansion


def conv_bn(g: Graph, x, conv: str, bn: str, c2: int, k: int, s: int = 1, relu: bool = True):
    y = g.conv(x, conv, c2, k, s, bn=bn)
    return g.act(y, "relu", f"{conv}.relu") if relu else y


def downsample(g: Graph, x, p: str, c2: int, stride: int):
    """The identity, or conv1x1 + BatchNorm when the block changes size (torchvision's rule)."""
    if stride == 1 and x.shape[1] == c2:
        return x
    return conv_bn(g, x, f"{p}.downsample.0", f"{p}.downsample.1", c2, 1, stride, relu=False)


def basic_block(g: Graph, x, p: str, planes: int, stride: int):
    y = conv_bn(g, x, f"{p}.conv1", f"{p}.bn1", planes, 3, stride)
    y = conv_bn(g, y, f"{p}.conv2", f"{p}.bn2", planes, 3, relu=False)
    return g.act(g.residual_add(y, downsample(g, x, p, planes, stride), f"{p}.add"), "relu", p)


def bottleneck(g: Graph, x, p: str, planes: int, stride: int):
    y = conv_bn(g, x, f"{p}.conv1", f"{p}.bn1", planes, 1)
    y = conv_bn(g, y, f"{p}.conv2", f"{p}.bn2", planes, 3, stride)
    y = conv_bn(g, y, f"{p}.conv3", f"{p}.bn3", planes * EXPANSION, 1, relu=False)
    return g.act(g.residual_add(y, downsample(g, x, p, planes * EXPANSION, stride), f"{p}.add"), "relu", p)


BLOCKS = {"basic": basic_block, "bottleneck": bottleneck}


def _make_layer(g: Graph, x, p: str, block: str, planes: int, blocks: int, stride: int):
    for j in range(blocks):
        x = BLOCKS[block](g, x, f"{p}.{j}", planes, stride if j == 0 else 1)
    x.name = p
    return x


def define(g: Graph, meta: dict, batch: int, imgsz: tuple[int, int], softmax: bool = False) -> list:
    arch = meta.get("arch")
    if arch not in ARCHS:
        raise TrtnetError(f"unknown ResNet architecture {arch!r}: one of {', '.join(ARCHS)}")
    block, layers = ARCHS[arch]
    x = g.input(INPUT, (batch, 3, *imgsz))
    x = conv_bn(g, x, "conv1", "bn1", 64, 7, 2)
    x = g.maxpool(x, 3, 2, 1, "maxpool")
    for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
        x = _make_layer(g, x, f"layer{i + 1}", block, planes, blocks, 1 if i == 0 else 2)
    x = g.global_avgpool(x, "avgpool")
    logits = g.linear(x, "fc", int(meta.get("num_classes", 1000)), name="logits")
    g.output(logits, "logits")
    outputs = [logits]
    if softmax:
        probs = g.softmax(logits, 1, "probs.softmax")
        g.output(probs, "probs")
        outputs.append(probs)
    return outputs


def meta_for_arch(arch: str, nc: int | None = None) -> dict:
    return {"family": FAMILY, "arch": arch, "num_classes": nc or 1000, "bn_eps": 1e-5, "imgsz": DEFAULT_IMGSZ}


def engine_fields(meta: Mapping, strides: list, options: Mapping) -> dict:
    out = {"num_classes": int(meta.get("num_classes", 1000)), "softmax": bool(options.get("softmax", False))}
    if meta.get("names"):
        out["names"] = list(meta["names"])
    return out


def summary(meta: Mapping) -> str:
    return (f"{meta.get('arch')}: {meta.get('num_classes')} classes, imgsz {meta.get('imgsz')}, "
            f"bn_eps {meta.get('bn_eps')}")


# -- checkpoints -----------------------------------------------------------------------------------

# (block, blocks per stage) → the torchvision name this module builds it under
LAYOUTS = {(block, tuple(counts)): name for name, (block, counts) in ARCHS.items()}
TORCHVISION_BN_EPS = 1e-5


def read_checkpoint(path: Path, obj: Any) -> Checkpoint | None:
    model = model_record(obj)
    if model is not None:
        if model.class_name == "ResNet":
            return _checkpoint(path, to_float32(module_state_dict(model)), bn_eps(path, model))
        return None
    state_dict = tensor_dict(obj)
    if state_dict is None:
        return None
    state_dict = to_float32(strip_prefix(state_dict, "module."))
    if "conv1.weight" in state_dict and "fc.weight" in state_dict:
        return _checkpoint(path, state_dict, TORCHVISION_BN_EPS)
    return None


def _checkpoint(path: Path, state_dict: OrderedDict[str, np.ndarray], bn_eps: float | None) -> Checkpoint:
    meta = {
        "family": FAMILY,
        "arch": resnet_arch(state_dict, path),
        "num_classes": int(state_dict["fc.weight"].shape[0]),
        "bn_eps": TORCHVISION_BN_EPS if bn_eps is None else bn_eps,
        "imgsz": DEFAULT_IMGSZ,
    }
    return Checkpoint(FAMILY, state_dict, meta)


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
    arch = LAYOUTS.get((block, counts))
    if arch is None or first is None or tuple(first.shape) != (64, 64, 3, 3):
        shape = None if first is None else tuple(first.shape)
        raise TrtnetError(
            f"{source}: a ResNet layout trtnet does not know ({block} blocks {list(counts)}, layer1.0.conv2 {shape}); "
            f"it builds {', '.join(LAYOUTS.values())} (not ResNeXt / Wide ResNet)"
        )
    return arch


# -- bench --compare-torch -------------------------------------------------------------------------


def torch_model(torch, meta: dict, engine_path: Path, weights_dir: str, official_src: str | None):
    """torchvision's resnet with the engine's own weights (.wts/.safetensors in weights_dir or beside it), fp16."""
    try:
        import torchvision
    except ImportError:
        return None, "torchvision is not installed (pip install torchvision)"
    from trtnet.weights import load_weights, resolve_weights

    stem = Path(meta["weights"]).stem
    folders: Sequence = (weights_dir, Path(engine_path).parent)
    found = [p for p in (Path(f) / f"{stem}{suffix}" for f in folders for suffix in (".wts", ".safetensors"))
             if p.is_file()]
    weights = load_weights(found[0] if found else resolve_weights(stem, folders[0]))
    arch = meta.get("arch") or weights.meta.get("arch")
    model = getattr(torchvision.models, arch)(num_classes=int(meta.get("num_classes", 1000)))
    state = {k: torch.from_numpy(np.ascontiguousarray(v)).float() for k, v in weights.tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise TrtnetError(f"torchvision {arch} does not match {stem}'s weights: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    return model.half().cuda().eval(), ""
