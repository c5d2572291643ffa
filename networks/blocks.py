"""Blocks, the yaml walk and the checkpoint look-ups shared by the YOLOv5 and YOLOv8/YOLO11 families — reads
beside Ultralytics nn/modules/{conv,block}.py (YOLOv5: models/common.py) and nn/tasks.py `parse_model`.

Not a family (it defines no FAMILY, so the registry skips it): yolov5.py and yolov8.py each give `parse_model`
their name → Block table and a per-row hook for what only their parse_model does.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from trtnet.checkpoint import ModuleRecord
from trtnet.errors import TrtnetError
from trtnet.graph import Graph

# -- blocks (conv.Conv, conv.DWConv, block.Bottleneck, block.C3, block.SPPF, block.SPP, nn.Upsample, Concat) ---


def conv(g: Graph, x, p: str, c2: int, k: int = 1, s: int = 1, pad: int | None = None, groups: int = 1,
         d: int = 1, act: bool = True):
    """conv.Conv(c1, c2, k, s, p, g, d, act): Conv2d(bias=False) + BatchNorm2d (folded) + the model's activation."""
    if d != 1:
        raise TrtnetError(f"{p}: Conv with dilation d={d} is not supported (only d=1)")
    y = g.conv(x, f"{p}.conv", c2, k, s, pad, groups, bn=f"{p}.bn", name=p if not act else f"{p}.conv")
    return g.act(y, g.activation, p) if act else y


def dwconv(g: Graph, x, p: str, c2: int, k: int = 1, s: int = 1, d: int = 1, act: bool = True):
    """conv.DWConv(c1, c2, k, s, d, act): Conv with groups = gcd(c1, c2)."""
    return conv(g, x, p, c2, k, s, groups=math.gcd(int(x.shape[1]), c2), d=d, act=act)


def bottleneck(g: Graph, x, p: str, c2: int, shortcut: bool = True, groups: int = 1, k=(3, 3), e: float = 0.5):
    """block.Bottleneck (YOLOv5's common.Bottleneck is k=(1, 3))."""
    y = conv(g, conv(g, x, f"{p}.cv1", int(c2 * e), k[0]), f"{p}.cv2", c2, k[1], groups=groups)
    return g.add(x, y, p) if shortcut and int(x.shape[1]) == c2 else y


def c3(g: Graph, x, p: str, c2: int, n: int = 1, shortcut: bool = True, groups: int = 1, e: float = 0.5,
       k: int = 1):
    """block.C3 / common.C3 (k=1: Bottleneck kernels (1, 3)) and block.C3k (k=3: kernels (3, 3))."""
    c_ = int(c2 * e)
    a = conv(g, x, f"{p}.cv1", c_, 1)
    for j in range(n):
        a = bottleneck(g, a, f"{p}.m.{j}", c_, shortcut, groups, k=(k, 3), e=1.0)
    b = conv(g, x, f"{p}.cv2", c_, 1)
    return conv(g, g.concat([a, b], f"{p}.cat"), f"{p}.cv3", c2, 1)


def sppf(g: Graph, x, p: str, c2: int, k: int = 5):
    y = [conv(g, x, f"{p}.cv1", x.shape[1] // 2, 1)]
    for i in range(3):
        y.append(g.maxpool(y[-1], k, 1, k // 2, f"{p}.m.{i}"))
    return conv(g, g.concat(y, f"{p}.cat"), f"{p}.cv2", c2, 1)


def spp(g: Graph, x, p: str, c2: int, k=(5, 9, 13)):
    a = conv(g, x, f"{p}.cv1", x.shape[1] // 2, 1)
    pooled = [g.maxpool(a, kk, 1, kk // 2, f"{p}.m.{i}") for i, kk in enumerate(k)]
    return conv(g, g.concat([a, *pooled], f"{p}.cat"), f"{p}.cv2", c2, 1)


def upsample(g: Graph, x, p: str, size=None, scale: int = 2, mode: str = "nearest"):
    if size is not None or mode != "nearest":
        raise TrtnetError(f"{p}: only nn.Upsample(None, scale, 'nearest') is supported, got size={size} mode={mode}")
    return g.upsample(x, int(scale), p)


def concat(g: Graph, xs, p: str, dimension: int = 1):
    return g.concat(xs, p, axis=dimension)


def make_divisible(x: float, divisor: int = 8) -> int:
    return math.ceil(x / divisor) * divisor


def activation_of(spec: str | None) -> str:
    """The yaml's `activation` (e.g. 'nn.LeakyReLU(0.1)'), which parse_model makes Conv.default_act; default SiLU."""
    if not spec:
        return "silu"
    m = re.fullmatch(r"(?:torch\.)?(?:nn\.)?(\w+)\(([^)]*)\)", spec.replace(" ", ""))
    kind = m.group(1) if m else ""
    if kind == "SiLU":
        return "silu"
    if kind == "ReLU":
        return "relu"
    if kind == "LeakyReLU":
        return f"leaky_relu:{m.group(2) or 0.01}"
    raise TrtnetError(f"unsupported activation {spec!r} in the model yaml (SiLU, ReLU, LeakyReLU)")


# -- the yaml walk (parse_model) ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """A yaml module name's block: whether its first argument is output channels (scaled by width) and whether
    it takes the row's repeat count as its own `n` (else the row is an nn.Sequential of n copies)."""

    build: Callable
    takes_c2: bool = False
    repeats_inside: bool = False


@dataclass(frozen=True)
class Scale:
    """parse_model's depth gain, width gain and channel cap."""

    depth: float
    width: float
    max_channels: float = math.inf


@dataclass(frozen=True)
class Row:
    """One yaml row as the walk resolved it, for a family's hook to adjust (`args`, `kwargs`)."""

    index: int
    name: str
    args: list
    kwargs: dict


RowHook = Callable[[Row], Row]


def parse_model(g: Graph, x, rows: list, blocks: dict[str, Block], scale: Scale, names: dict[str, Any],
                unscaled_c2: int, hook: RowHook | None = None):
    """Walk `[from, number, module, args]` rows from input `x`; each row's output is named `model.<i>`.

    `names`: what a string argument may name (parse_model's locals, e.g. nc, anchors); a first argument equal to
    `unscaled_c2` (the head's width) is not width-scaled. Returns the last row's output."""
    names = {"None": None, "True": True, "False": False, **names}
    outputs: list[Any] = []
    for i, (f, n, module, args) in enumerate(rows):
        name = str(module).split(".")[-1]
        if name not in blocks:
            raise TrtnetError(f"model.{i}: module {module!r} is not supported (supported: {', '.join(blocks)})")
        block = blocks[name]
        args = [names.get(a, a) if isinstance(a, str) else a for a in args]
        n = max(round(n * scale.depth), 1) if n > 1 else n  # depth gain, with Python's rounding as upstream
        if block.takes_c2:
            c2 = args[0]
            if c2 != unscaled_c2:
                c2 = make_divisible(min(c2, scale.max_channels) * scale.width, 8)
            args = [c2, *args[1:]]
            if block.repeats_inside:
                args.insert(1, n)
                n = 1
        row = Row(i, name, args, {})
        if hook is not None:
            row = hook(row)
        x = _apply(g, block.build, x if i == 0 else _gather(outputs, f), f"model.{i}", n, row.args, row.kwargs)
        outputs.append(x)
    return x


def _apply(g: Graph, block: Callable, x, p: str, n: int, args: list, kwargs: dict):
    if n == 1:
        y = block(g, x, p, *args, **kwargs)
    else:  # nn.Sequential of n copies: model.<i>.<j>
        y = x
        for j in range(n):
            y = block(g, y, f"{p}.{j}", *args, **kwargs)
    if not isinstance(y, list):
        y.name = p
    return y


def _gather(outputs: list, f):
    return outputs[f] if isinstance(f, int) else [outputs[j] for j in f]


# -- checks shared by both families' `define` ----------------------------------------------------------------


def check_input_size(hw: tuple[int, int], stride: int) -> None:
    if min(hw) > 0 and any(s % stride for s in hw):
        raise TrtnetError(f"input size {hw[0]}x{hw[1]} must be a multiple of the model's stride {stride}")


def check_classes(meta: dict, nc: int) -> None:
    names = meta.get("names")
    if meta.get("nc", nc) != nc or (names is not None and len(names) != nc):
        raise TrtnetError(
            f"class count mismatch: the model yaml says nc={nc}, the metadata nc={meta.get('nc')} with "
            f"{len(names or [])} names — the .json does not belong to these weights"
        )


# -- what both families read from a checkpoint or look up beside an engine ----------------------------------


def detect_head(path: Path, model: ModuleRecord, family: str) -> ModuleRecord:
    """The model's last layer (`model.model[-1]`), which must be Detect."""
    layers = list(model.children().get("model", ModuleRecord()).children().values())
    head = layers[-1] if layers else None
    if head is None or head.class_name != "Detect":
        found = head.qualname if head is not None else "no layers"
        raise TrtnetError(f"{path}: the {family} model ends in {found}, not Detect; "
                          "trtnet builds detection models only")
    return head


def class_names(path: Path, names: Any, nc: int) -> list[str]:
    """`model.names` (a list, or a dict keyed 0..nc-1) as nc strings; numbers when the model has none."""
    if names is None:
        return [str(i) for i in range(nc)]
    if isinstance(names, dict) and sorted(names) == list(range(nc)):
        return [str(names[i]) for i in range(nc)]
    if isinstance(names, (list, tuple)) and len(names) == nc:
        return [str(n) for n in names]
    raise TrtnetError(f"{path}: the model has {nc} classes but its names are {str(names)[:80]}")


def checkpoint_beside(meta: Mapping, engine_path: Path, weights_dir: str) -> Path | None:
    """The engine's source `<stem>.pt`, in weights_dir or beside the engine (bench --compare-torch)."""
    stem = Path(meta["weights"]).stem
    candidates = (Path(weights_dir) / f"{stem}.pt", Path(engine_path).parent / f"{stem}.pt")
    return next((p for p in candidates if p.is_file()), None)
