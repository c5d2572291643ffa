"""YOLOv8 and YOLO11 detection, rebuilt from the checkpoint's yaml — reads beside Ultralytics
nn/modules/{conv,block,head}.py and nn/tasks.py `parse_model`.

`define` walks the yaml's `[from, repeats, module, args]` rows with `parse_model`'s arithmetic (depth,
width and max channels from `scales[scale]`) and calls one block function per module name. Tensors keep
their PyTorch names (`model.22.cv2.0.0.conv.weight`); each row's output is named `model.<i>`. The one
output `output0` [B, 4 + nc, N] is Detect's inference output: rows 0-3 cx, cy, w, h in input pixels
(DFL expectation, none at reg_max 1; `dist2bbox(xywh=True)`, x stride), then sigmoid class scores (no objectness).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from trtnet.checkpoint import Checkpoint, bn_eps, model_record, module_state_dict, to_float32
from trtnet.errors import TrtnetError
from trtnet.graph import Graph
from trtnet.meta_checks import MAX_CLASSES, check_count, check_strides
from trtnet.networks.blocks import (
    Block,
    Row,
    Scale,
    activation_of,
    bottleneck,
    c3,
    check_classes,
    check_input_size,
    checkpoint_beside,
    class_names,
    concat,
    conv,
    detect_head,
    dwconv,
    parse_model,
    sppf,
    upsample,
)

FAMILY = "yolov8"
TASK = "detect"
INPUT = "images"
OUTPUT = "output0"
DEFAULT_IMGSZ = 640
MODEL_CLASS = "ultralytics.nn.tasks.DetectionModel"
CHECKPOINTS = f"Ultralytics YOLOv8/YOLO11 detection checkpoints ({MODEL_CLASS} under 'model' or 'ema')"
PICKLED_MODULES = ("ultralytics.",)
HEAD = "anchor_free"  # YoloPostprocess's head kind for this family's output
VAL_IOU = 0.7  # Ultralytics DetectionValidator's NMS IoU (multi-label, conf 0.001, max_det 300 as YOLOv5's)


# -- blocks (ultralytics/nn/modules) -----------------------------------------------------------------


def c2f(g: Graph, x, p: str, c2: int, n: int = 1, shortcut: bool = False, groups: int = 1, e: float = 0.5,
        inner: Callable | None = None):
    """block.C2f: cv1, chunk(2), each of m on the last piece, cat all, cv2. `inner` builds one of m."""
    c = int(c2 * e)
    a = conv(g, x, f"{p}.cv1", 2 * c, 1)
    y = [g.take(a, 1, 0, c, f"{p}.chunk0"), g.take(a, 1, c, c, f"{p}.chunk1")]
    for j in range(n):
        q = f"{p}.m.{j}"
        y.append(inner(y[-1], q) if inner else bottleneck(g, y[-1], q, c, shortcut, groups, e=1.0))
    return conv(g, g.concat(y, f"{p}.cat"), f"{p}.cv2", c2, 1)


def c3k2(g: Graph, x, p: str, c2: int, n: int = 1, c3k: bool = False, e: float = 0.5, groups: int = 1,
         shortcut: bool = True):
    """block.C3k2: C2f whose inner blocks are C3k(c, c, 2) or Bottleneck(c, c) (e=0.5 inside)."""
    c = int(c2 * e)

    def inner(y, q):
        if c3k:
            return c3(g, y, q, c, 2, shortcut, groups, k=3)
        return bottleneck(g, y, q, c, shortcut, groups)

    return c2f(g, x, p, c2, n, shortcut, groups, e, inner=inner)


def attention(g: Graph, x, p: str, num_heads: int, attn_ratio: float = 0.5):
    """block.Attention: per head softmax(qᵀk · scale), v·attnᵀ, plus a depthwise 3x3 positional conv on v."""
    c = int(x.shape[1])
    head_dim = c // num_heads
    key_dim = int(head_dim * attn_ratio)
    qkv = conv(g, x, f"{p}.qkv", c + 2 * key_dim * num_heads, 1, act=False)
    qkv = g.shuffle(qkv, (0, num_heads, 2 * key_dim + head_dim, -1), f"{p}.view")  # [B, heads, ·, H*W]
    q = g.take(qkv, 2, 0, key_dim, f"{p}.q")
    k = g.take(qkv, 2, key_dim, key_dim, f"{p}.k")
    v = g.take(qkv, 2, 2 * key_dim, head_dim, f"{p}.v")
    scores = g.matmul(q, k, f"{p}.qk", transpose_a=True)
    scale = g.constant(np.full((1, 1, 1, 1), key_dim**-0.5, np.float32), f"{p}.scale")
    attn = g.softmax(g.mul(scores, scale, f"{p}.scaled"), 3, f"{p}.softmax")
    y = g.reshape_like(g.matmul(v, attn, f"{p}.av", transpose_b=True), x, f"{p}.heads")
    pe = conv(g, g.reshape_like(v, x, f"{p}.v_map"), f"{p}.pe", c, 3, groups=c, act=False)
    return conv(g, g.add(y, pe, f"{p}.sum"), f"{p}.proj", c, 1, act=False)


def psa_block(g: Graph, x, p: str, num_heads: int, shortcut: bool = True):
    c = int(x.shape[1])
    a = attention(g, x, f"{p}.attn", num_heads)
    x = g.add(x, a, f"{p}.attn_add") if shortcut else a
    f = conv(g, conv(g, x, f"{p}.ffn.0", 2 * c, 1), f"{p}.ffn.1", c, 1, act=False)
    return g.add(x, f, p) if shortcut else f


def c2psa(g: Graph, x, p: str, c2: int, n: int = 1, e: float = 0.5):
    """block.C2PSA: cv1, split, PSABlocks on the second half, cat, cv2."""
    if int(x.shape[1]) != c2:
        raise TrtnetError(f"{p}: C2PSA needs equal input and output channels (got {x.shape[1]} and {c2})")
    c = int(c2 * e)
    a = conv(g, x, f"{p}.cv1", 2 * c, 1)
    left, right = g.take(a, 1, 0, c, f"{p}.split0"), g.take(a, 1, c, c, f"{p}.split1")
    for j in range(n):
        right = psa_block(g, right, f"{p}.m.{j}", num_heads=c // 64)
    return conv(g, g.concat([left, right], f"{p}.cat"), f"{p}.cv2", c2, 1)


def detect(g: Graph, xs, p: str, nc: int, *, strides, reg_max: int = 16, legacy: bool = False):
    """head.Detect (inference): per level cat(cv2 box, cv3 class) maps, then DFL, dist2bbox, x stride, sigmoid."""
    c2 = max(16, int(xs[0].shape[1]) // 4, reg_max * 4)
    c3_ = max(int(xs[0].shape[1]), min(nc, 100))
    levels = []
    for i, x in enumerate(xs):
        box = conv(g, conv(g, x, f"{p}.cv2.{i}.0", c2, 3), f"{p}.cv2.{i}.1", c2, 3)
        box = g.conv(box, f"{p}.cv2.{i}.2", 4 * reg_max, 1)
        levels.append(g.concat([box, _class_branch(g, x, f"{p}.cv3.{i}", c3_, nc, legacy)], f"{p}.level{i}"))
    return detect_decode(g, levels, p, nc, reg_max, strides)


def _class_branch(g: Graph, x, p: str, c3_: int, nc: int, legacy: bool):
    if legacy:  # YOLOv8: Conv 3x3, Conv 3x3
        y = conv(g, conv(g, x, f"{p}.0", c3_, 3), f"{p}.1", c3_, 3)
    else:  # YOLO11: (DWConv 3x3, Conv 1x1) twice
        y = conv(g, dwconv(g, x, f"{p}.0.0", int(x.shape[1]), 3), f"{p}.0.1", c3_, 1)
        y = conv(g, dwconv(g, y, f"{p}.1.0", c3_, 3), f"{p}.1.1", c3_, 1)
    return g.conv(y, f"{p}.2", nc, 1)


def detect_decode(g: Graph, levels: list, p: str, nc: int, reg_max: int, strides):
    """Detect._inference on the per-level maps [B, 4*reg_max + nc, h, w] → [B, 4 + nc, N]."""
    if len(strides) != len(levels):
        raise TrtnetError(f"{p}: {len(levels)} Detect levels but the checkpoint records strides {list(strides)}")
    no = 4 * reg_max + nc
    x_cat = g.concat([g.shuffle(t, (0, no, -1), f"{p}.flat{i}") for i, t in enumerate(levels)], f"{p}.x_cat", axis=2)
    box = g.take(x_cat, 1, 0, 4 * reg_max, f"{p}.box")
    cls = g.take(x_cat, 1, 4 * reg_max, nc, f"{p}.cls")
    anchors, stride_rows = make_anchors(g, levels, strides, f"{p}.anchors")
    dist = dfl(g, box, f"{p}.dfl", reg_max) if reg_max > 1 else box  # Detect: DFL, or nn.Identity at reg_max 1
    dbox = dist2bbox(g, dist, anchors, f"{p}.dist2bbox")
    return g.concat([g.mul(dbox, stride_rows, f"{p}.dbox"), g.sigmoid(cls, f"{p}.sigmoid")], f"{p}.out")


def dfl(g: Graph, box, p: str, reg_max: int):
    """block.DFL: view(B, 4, reg_max, N), softmax over reg_max, expectation with the fixed arange conv."""
    bins = g.softmax(g.shuffle(box, (0, 4, reg_max, -1), f"{p}.view"), 2, f"{p}.softmax")
    weight = g.weights.take(f"{p}.conv.weight", (1, reg_max, 1, 1)).reshape(1, 1, 1, reg_max)
    expect = g.matmul(g.constant(weight, f"{p}.conv.weight"), bins, f"{p}.conv")
    return g.shuffle(expect, (0, 4, -1), p)


def make_anchors(g: Graph, levels: list, strides, p: str, offset: float = 0.5):
    """utils.tal.make_anchors, transposed as Detect keeps them: points [1, 2, N] (x, y cell centres) and
    strides [1, 1, N], built from each level's run-time shape so the input size may be dynamic."""
    points, stride_rows = [], []
    for i, (t, stride) in enumerate(zip(levels, strides)):
        q = f"{p}.{i}"
        gx, gy = _cell_centres(g, t, offset, q)
        points.append(g.concat([gx, gy], f"{q}.points"))
        zero = g.constant(np.zeros((1, 1, 1), np.float32), f"{q}.zero")
        stride_const = g.constant(np.full((1, 1, 1), stride, np.float32), f"{q}.stride")
        stride_rows.append(g.add(g.mul(gx, zero, f"{q}.zeros"), stride_const, f"{q}.strides"))
    return g.concat(points, p, axis=2), g.concat(stride_rows, f"{p}.strides", axis=2)


def _cell_centres(g: Graph, level, offset: float, q: str):
    """meshgrid(arange(h) + offset, arange(w) + offset, indexing="ij") of the level map, flattened to
    x and y rows [1, 1, h*w]; h and w are read from the map's run-time shape."""
    shape = g.shape_of(level, f"{q}.shape")
    sy = g.linspace(g.take(shape, 0, 2, 1, f"{q}.h"), offset, 1.0, f"{q}.sy")
    sx = g.linspace(g.take(shape, 0, 3, 1, f"{q}.w"), offset, 1.0, f"{q}.sx")
    column, row = g.shuffle(sy, (-1, 1), f"{q}.sy_column"), g.shuffle(sx, (1, -1), f"{q}.sx_row")
    zero = g.constant(np.zeros((1, 1), np.float32), f"{q}.grid_zero")
    grid_zeros = g.mul(g.add(column, row, f"{q}.grid"), zero, f"{q}.grid_zeros")  # [h, w]: broadcasts both
    gx = g.shuffle(g.add(row, grid_zeros, f"{q}.gx"), (1, 1, -1), f"{q}.x")
    gy = g.shuffle(g.add(column, grid_zeros, f"{q}.gy"), (1, 1, -1), f"{q}.y")
    return gx, gy


def dist2bbox(g: Graph, dist, anchors, p: str):
    """utils.tal.dist2bbox(xywh=True) along the channel axis: (lt, rb) distances → cx, cy, w, h."""
    lt, rb = g.take(dist, 1, 0, 2, f"{p}.lt"), g.take(dist, 1, 2, 2, f"{p}.rb")
    x1y1, x2y2 = g.sub(anchors, lt, f"{p}.x1y1"), g.add(anchors, rb, f"{p}.x2y2")
    two = g.constant(np.full((1, 1, 1), 2.0, np.float32), f"{p}.two")
    c_xy = g.div(g.add(x1y1, x2y2, f"{p}.xy_sum"), two, f"{p}.c_xy")
    return g.concat([c_xy, g.sub(x2y2, x1y1, f"{p}.wh")], p)


# name in the yaml → its block (nn/modules)
BLOCKS: dict[str, Block] = {
    "Conv": Block(conv, takes_c2=True),
    "DWConv": Block(dwconv, takes_c2=True),
    "Bottleneck": Block(bottleneck, takes_c2=True),
    "C2f": Block(c2f, takes_c2=True, repeats_inside=True),
    "C3": Block(c3, takes_c2=True, repeats_inside=True),
    "C3k2": Block(c3k2, takes_c2=True, repeats_inside=True),
    "SPPF": Block(sppf, takes_c2=True),
    "C2PSA": Block(c2psa, takes_c2=True, repeats_inside=True),
    "Upsample": Block(upsample),
    "Concat": Block(concat),
    "Detect": Block(detect),
}
# parse_model: a Detect built in a model holding any of these is not `legacy` (YOLO11's DWConv class branch)
NOT_LEGACY = ("C3k2", "A2C2f", "C2fCIB")


def scale_of(cfg: dict) -> Scale:
    """(depth, width, max_channels) as parse_model takes them: `scales[scale]`, or the *_multiple keys."""
    scales = cfg.get("scales")
    if scales:
        scale = cfg.get("scale") or next(iter(scales))
        if scale not in scales:
            raise TrtnetError(f"model yaml: scale {scale!r} is not one of its scales {list(scales)}")
        depth, width, max_channels = scales[scale]
        return Scale(float(depth), float(width), float(max_channels))
    return Scale(float(cfg.get("depth_multiple", 1.0)), float(cfg.get("width_multiple", 1.0)))


def define(g: Graph, meta: dict, batch: int, hw: tuple[int, int], **_options) -> list:
    """Add the whole model to `g` and mark its one output `output0` [B, 4 + nc, N]."""
    cfg = meta["yaml"]
    nc = int(cfg["nc"])
    check_classes(meta, nc)
    g.activation = activation_of(cfg.get("activation"))  # parse_model: Conv.default_act
    check_input_size(hw, max(meta.get("strides") or [32]))
    rows = _rows(cfg)
    x = g.input(INPUT, (batch, 3, *hw))
    y = parse_model(g, x, rows, BLOCKS, scale_of(cfg), {"nc": nc}, unscaled_c2=nc, hook=_row_hook(cfg, meta, rows))
    g.output(y, OUTPUT)
    return [y]


def _row_hook(cfg: dict, meta: dict, rows: list):
    """What parse_model does besides the shared arithmetic: C3k2's c3k forced at scales m/l/x, and Detect's
    reg_max, strides and legacy (YOLOv8) class branch."""
    legacy = not any(str(m).split(".")[-1] in NOT_LEGACY for _, _, m, _ in rows)
    scale = cfg.get("scale") or ""

    def hook(row: Row) -> Row:
        args = row.args
        if row.name == "C3k2" and scale in ("m", "l", "x"):
            return replace(row, args=[*args[:2], True, *args[3:]] if len(args) > 2 else [*args, True])
        if row.name == "Detect":
            return replace(row, kwargs={"reg_max": int(meta.get("reg_max", 16)), "legacy": legacy,
                                        "strides": meta["strides"]})
        return row

    return hook


def postprocess_kwargs(meta: Mapping) -> dict:
    """YoloPostprocess's keywords: the boxes are decoded in the network, so no strides or anchors."""
    return {"head": meta.get("head") or HEAD, "nc": int(meta["nc"])}


def output_strides(heads: list, hw: tuple, meta: Mapping) -> list[int]:
    """The checkpoint's Detect strides (recorded in the sidecar; the anchor-free postprocess needs none)."""
    strides = [int(s) for s in meta["strides"]]
    if min(hw) > 0 and len(heads) == 1 and heads[0].shape[2] > 0:
        cells = sum((hw[0] // s) * (hw[1] // s) for s in strides)
        if cells != heads[0].shape[2]:
            raise TrtnetError(f"{OUTPUT} has {heads[0].shape[2]} rows, strides {strides} at {hw} give {cells}")
    return strides


def engine_fields(meta: Mapping, strides: list, options: Mapping) -> dict:
    nc = int(meta["yaml"]["nc"])
    return {"nc": nc, "names": list(meta.get("names") or range(nc)), "strides": list(strides), "head": HEAD}


def summary(meta: Mapping) -> str:
    cfg = meta.get("yaml") or {}
    scale = cfg.get("scale") or next(iter(cfg.get("scales") or {}), "")
    generation = "YOLO11" if any(str(r[2]).split(".")[-1] in NOT_LEGACY for r in _rows(cfg)) else "YOLOv8"
    return (f"yolov8 ({generation}{scale}): nc={meta['nc']}, strides {meta['strides']}, reg_max "
            f"{meta.get('reg_max', 16)}, imgsz {meta['imgsz']}, bn_eps {meta.get('bn_eps')}")


def _rows(cfg: Mapping) -> list:
    return list(cfg.get("backbone") or []) + list(cfg.get("head") or [])


# -- checkpoints --------------------------------------------------------------------------------------


def read_checkpoint(path: Path, obj) -> Any:
    """An Ultralytics DetectionModel checkpoint (`ckpt.get('ema') or ckpt['model']`) → Checkpoint, else None."""
    model = model_record(obj)
    if model is None or not model.qualname.startswith("ultralytics.nn.tasks."):
        return None
    if model.qualname != MODEL_CLASS or not isinstance(model.get("yaml"), dict):
        raise TrtnetError(f"{path} holds an Ultralytics {model.class_name}: trtnet builds detection models "
                          f"({MODEL_CLASS}) only")
    head = detect_head(path, model, "Ultralytics")
    if head.get("end2end"):
        raise TrtnetError(f"{path}: an end-to-end (NMS-free, one2one) Detect head is not supported yet")
    nc, reg_max = head.get("nc"), int(head.get("reg_max", 16))
    nc = check_count(nc, "Detect.nc", path, MAX_CLASSES)  # before anything is sized from them
    strides = check_strides(model.get("stride"), path)
    _check_head(path, reg_max, strides)
    names = class_names(path, model.get("names"), nc)
    state_dict = module_state_dict(model)
    meta = {
        "family": FAMILY, "model_class": model.qualname, "yaml": model.get("yaml"), "nc": nc, "names": names,
        "strides": [int(s) for s in strides], "reg_max": reg_max, "bn_eps": _eps(path, model),
        "imgsz": DEFAULT_IMGSZ, "source_dtype": str(next(iter(state_dict.values())).dtype),
    }
    if isinstance(obj, dict):
        meta.update({k: obj[k] for k in ("epoch", "date", "version") if isinstance(obj.get(k), (int, str))})
    return Checkpoint(FAMILY, to_float32(state_dict), meta)


def _check_head(path: Path, reg_max: int, strides: list[int]) -> None:
    if not 1 <= reg_max <= 64:
        raise TrtnetError(f"{path}: Detect's reg_max {reg_max} is outside 1..64")
    if any(s & (s - 1) for s in strides):
        raise TrtnetError(f"{path}: strides {strides} are not powers of two")


def _eps(path: Path, model) -> float:
    eps = bn_eps(path, model)
    return 1e-3 if eps is None else eps  # Ultralytics' BatchNorm2d(eps=0.001)


# -- bench --compare-torch / --torch-only ------------------------------------------------------------


def torch_model(torch, meta: dict, engine_path: Path, weights_dir: str, official_src: str | None):
    """The official Ultralytics model of the engine's checkpoint (.pt in weights_dir or beside the engine),
    fused, eval, fp16 on the GPU; needs the `ultralytics` package importable (its modules unpickle the .pt)."""
    checkpoint = checkpoint_beside(meta, engine_path, weights_dir)
    if checkpoint is None:
        return None, (f"no {Path(meta['weights']).stem}.pt in {weights_dir}/ or beside the engine for the official "
                      "Ultralytics model")
    try:
        import ultralytics.nn.tasks  # noqa: F401  (the classes the checkpoint pickles)
    except Exception as exc:  # ImportError, or a missing dependency of the package raising anything
        return None, f"cannot import the ultralytics package ({type(exc).__name__}: {exc})"
    ckpt = torch.load(str(checkpoint), map_location="cpu", weights_only=False)  # our own .pt: full unpickling
    model = (ckpt.get("ema") or ckpt["model"]) if isinstance(ckpt, dict) else ckpt
    model = model.float().fuse().eval().half().cuda()
    return model, ""


# -- trtnet golden ----------------------------------------------------------------------------------------


def official_golden(torch, checkpoint_path: Path, image_chw: np.ndarray, official_src: str | None) -> dict:
    """The `ultralytics` package on the image, model fused in float32 as its predictor runs it: `raw` (Detect's
    inference output), `head_i` (per level cat(cv2, cv3) before DFL and sigmoid) and `layer_XX`."""
    from trtnet.golden import official_model, recorded_outputs, top_level_layers

    # ultralytics.nn.tasks: the classes the checkpoint pickles
    model = official_model(torch, checkpoint_path, official_src, ("ultralytics.nn.tasks",),
                           "the official Ultralytics code", "pip install ultralytics (or put a clone of "
                           "ultralytics/ultralytics on sys.path)", fuse=True)
    layers = top_level_layers(model)
    with recorded_outputs(layers) as kept, torch.no_grad():
        raw, levels = model(torch.from_numpy(image_chw[None].astype(np.float32) / 255))
    return {"raw": raw.numpy(), **{f"head_{i}": t.numpy() for i, t in enumerate(levels)},
            **{k: kept[k] for k in sorted(layers) if k in kept}}


def golden_aliases(meta: dict) -> dict:
    """The golden's Detect outputs → our tensors: `raw` is output0, `head_i` the per-level map of Detect (named
    from the yaml: weights' metadata has it, an engine's sidecar does not, and its engine has no such tensor)."""
    aliases = {"raw": OUTPUT}
    if meta.get("yaml"):
        detect = f"model.{len(_rows(meta['yaml'])) - 1}"
        aliases.update({f"head_{i}": f"{detect}.level{i}" for i in range(len(meta.get("strides") or []))})
    return aliases
