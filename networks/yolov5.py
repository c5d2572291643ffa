"""YOLOv5, rebuilt from the checkpoint's own yaml — reads beside Ultralytics models/yolo.py + common.py.

`define` walks the yaml's `[from, number, module, args]` rows like `parse_model`, with the same depth
and width arithmetic, and calls one block function per module name. Every tensor keeps its PyTorch
name (`model.4.m.1.cv2.conv.weight`), and each row's output tensor is named `model.<i>`. Outputs are
the raw Detect maps `raw_<level>`, `[B, na*(nc+5), h, w]`, as the Detect convs produce them.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from trtnet.checkpoint import (
    Checkpoint,
    ModuleRecord,
    bn_eps,
    model_record,
    module_state_dict,
    tensor_dict,
    to_float32,
)
from trtnet.errors import TrtnetError
from trtnet.graph import Graph
from trtnet.meta_checks import MAX_CLASSES, check_count, check_strides
from trtnet.networks import blocks
from trtnet.networks.blocks import (
    Block,
    Scale,
    activation_of,
    c3,
    check_classes,
    check_input_size,
    checkpoint_beside,
    class_names,
    concat,
    conv,
    detect_head,
    parse_model,
    spp,
    sppf,
    upsample,
)
from trtnet.plugins.postprocess import P5_ANCHORS

FAMILY = "yolov5"
TASK = "detect"
INPUT = "images"
DEFAULT_IMGSZ = 640
CHECKPOINTS = "YOLOv5 checkpoints (models.yolo Model/DetectionModel under 'model' or 'ema')"
PICKLED_MODULES = ("models.", "utils.")  # the yolov5 repository's model code


def bottleneck(g: Graph, x, p: str, c2: int, shortcut: bool = True, groups: int = 1, e: float = 0.5):
    """common.Bottleneck: block.Bottleneck with kernels (1, 3)."""
    return blocks.bottleneck(g, x, p, c2, shortcut, groups, k=(1, 3), e=e)


def focus(g: Graph, x, p: str, c2: int, k: int = 1, s: int = 1, pad: int | None = None, groups: int = 1):
    """Focus: x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2] stacked on C.

    As one space-to-depth shuffle, so the batch dimension may stay dynamic."""
    c, h, w = x.shape[1], x.shape[2], x.shape[3]
    if h < 0 or w < 0:
        raise TrtnetError(f"{p}: the Focus stem (YOLOv5 v5.0) needs a static input size; build without --min-imgsz")
    cells = g.shuffle(x, (0, c, h // 2, 2, w // 2, 2), f"{p}.space_to_depth", transpose=(0, 5, 3, 1, 2, 4))
    stacked = g.shuffle(cells, (0, 4 * c, h // 2, w // 2), f"{p}.stack")
    return conv(g, stacked, f"{p}.conv", c2, k, s, pad, groups)


def detect(g: Graph, xs, p: str, nc: int, anchors, *_):
    return [g.conv(x, f"{p}.m.{i}", anchors_per_cell(anchors) * (nc + 5), 1, name=f"raw_{i}")
            for i, x in enumerate(xs)]


def anchors_per_cell(anchors) -> int:
    """The yaml's `anchors`: (w, h) pairs per level, or just how many per level."""
    return len(anchors[0]) // 2 if isinstance(anchors, list) else int(anchors)


# name in the yaml → its block (common.py)
BLOCKS: dict[str, Block] = {
    "Conv": Block(conv, takes_c2=True),
    "Bottleneck": Block(bottleneck, takes_c2=True),
    "C3": Block(c3, takes_c2=True, repeats_inside=True),
    "SPPF": Block(sppf, takes_c2=True),
    "SPP": Block(spp, takes_c2=True),
    "Focus": Block(focus, takes_c2=True),
    "Upsample": Block(upsample),
    "Concat": Block(concat),
    "Detect": Block(detect),
}


def define(g: Graph, meta: dict, batch: int, imgsz: tuple[int, int]) -> list:
    """Add the whole model to `g`; returns the Detect outputs (already marked as network outputs)."""
    cfg = meta["yaml"]
    nc, anchors = cfg["nc"], cfg["anchors"]
    g.activation = activation_of(cfg.get("activation"))
    check_input_size(imgsz, max(meta.get("strides") or [32]))
    check_classes(meta, nc)
    scale = Scale(cfg["depth_multiple"], cfg["width_multiple"])
    x = g.input(INPUT, (batch, 3, *imgsz))
    heads = parse_model(g, x, cfg["backbone"] + cfg["head"], BLOCKS, scale, {"nc": nc, "anchors": anchors},
                        unscaled_c2=anchors_per_cell(anchors) * (nc + 5))
    for head in heads:
        g.output(head, head.name)
    return heads


# ultralytics/yolov5 v7.0 models/yolov5{n,s,m,l,x}.yaml: the layout shared by the P5 models, for .wts
# files that come without trtnet's .json (e.g. written by tensorrtx) and for tests at every size.
MULTIPLES = {"n": (0.33, 0.25), "s": (0.33, 0.50), "m": (0.67, 0.75), "l": (1.0, 1.0), "x": (1.33, 1.25)}
P5_BACKBONE = [
    [-1, 1, "Conv", [64, 6, 2, 2]], [-1, 1, "Conv", [128, 3, 2]], [-1, 3, "C3", [128]],
    [-1, 1, "Conv", [256, 3, 2]], [-1, 6, "C3", [256]], [-1, 1, "Conv", [512, 3, 2]],
    [-1, 9, "C3", [512]], [-1, 1, "Conv", [1024, 3, 2]], [-1, 3, "C3", [1024]], [-1, 1, "SPPF", [1024, 5]],
]
P5_HEAD = [
    [-1, 1, "Conv", [512, 1, 1]], [-1, 1, "nn.Upsample", [None, 2, "nearest"]], [[-1, 6], 1, "Concat", [1]],
    [-1, 3, "C3", [512, False]], [-1, 1, "Conv", [256, 1, 1]], [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
    [[-1, 4], 1, "Concat", [1]], [-1, 3, "C3", [256, False]], [-1, 1, "Conv", [256, 3, 2]],
    [[-1, 14], 1, "Concat", [1]], [-1, 3, "C3", [512, False]], [-1, 1, "Conv", [512, 3, 2]],
    [[-1, 10], 1, "Concat", [1]], [-1, 3, "C3", [1024, False]], [[17, 20, 23], 1, "Detect", ["nc", "anchors"]],
]


def v7_yaml(size: str, nc: int = 80) -> dict:
    """The official v7.0 yaml of yolov5<size> (n/s/m/l/x) with `nc` classes."""
    if size not in MULTIPLES:
        raise TrtnetError(f"unknown YOLOv5 size {size!r}: one of {', '.join(MULTIPLES)}")
    gd, gw = MULTIPLES[size]
    return {"nc": nc, "depth_multiple": gd, "width_multiple": gw, "anchors": [list(a) for a in P5_ANCHORS],
            "backbone": P5_BACKBONE, "head": P5_HEAD}


ARCHS = {f"yolov5{size}": size for size in MULTIPLES}


def meta_for_arch(arch: str, nc: int | None = None) -> dict:
    cfg = v7_yaml(ARCHS[arch], nc or 80)
    return {"family": FAMILY, "yaml": cfg, "nc": cfg["nc"], "bn_eps": 1e-3, "imgsz": DEFAULT_IMGSZ,
            "strides": [8, 16, 32], "anchors": cfg["anchors"], "names": [str(i) for i in range(cfg["nc"])]}


def anchors_of(meta: Mapping) -> list:
    """Anchor pixels per level: the checkpoint's (times its strides) or, for bare weights, the yaml's."""
    return meta.get("anchors") or meta["yaml"]["anchors"]


def output_strides(heads: list, hw: tuple, meta: Mapping) -> list[int]:
    if hw[0] > 0:
        return [hw[0] // int(t.shape[2]) for t in heads]
    return [int(s) for s in meta["strides"]]  # dynamic size: as the checkpoint recorded them


def postprocess_kwargs(meta: Mapping) -> dict:
    """YoloPostprocess's keywords for an engine's (or weights') metadata."""
    return {"strides": list(meta["strides"]), "anchors": anchors_of(meta), "nc": int(meta["nc"])}


def engine_fields(meta: Mapping, strides: list, options: Mapping) -> dict:
    nc = int(meta["yaml"]["nc"])
    return {"nc": nc, "names": list(meta.get("names") or range(nc)), "strides": list(strides),
            "anchors": anchors_of(meta)}


def summary(meta: Mapping) -> str:
    return (f"yolov5 ({meta.get('generation')}): nc={meta['nc']}, strides {meta['strides']}, "
            f"imgsz {meta['imgsz']}, bn_eps {meta.get('bn_eps')}")


# -- checkpoints -----------------------------------------------------------------------------------


MAX_ANCHORS_PER_LEVEL = 32


def check_anchors(anchors: np.ndarray, levels: int, path: Path | str) -> np.ndarray:
    """Detect's anchors (in stride units): [levels, anchors per level, 2], finite and positive."""
    if anchors.ndim != 3 or anchors.shape[0] != levels or anchors.shape[2] != 2 \
            or not 1 <= anchors.shape[1] <= MAX_ANCHORS_PER_LEVEL:
        raise TrtnetError(f"{path}: Detect's anchors {anchors.shape} are not [{levels} levels, 1 to "
                          f"{MAX_ANCHORS_PER_LEVEL} anchors, 2]")
    if not (np.isfinite(anchors).all() and (anchors > 0).all()):
        raise TrtnetError(f"{path}: Detect's anchors hold values that are not finite and positive")
    return anchors


def check_head_channels(path: Path | str, detect: Any, nc: int, anchors_per_level: int) -> None:
    """Each output conv of `detect` (a Detect ModuleRecord) gives anchors x (5 + nc) channels: the metadata
    agrees with the weights."""
    convs = (detect.children().get("m") or detect).children().values()
    out_channels = [_out_channels(conv) for conv in convs]
    expected = anchors_per_level * (5 + nc)
    if not out_channels or any(c != expected for c in out_channels):
        raise TrtnetError(f"{path}: Detect's output convs have {out_channels} channels but nc = {nc} with "
                          f"{anchors_per_level} anchors needs {expected}: a corrupt or tampered checkpoint")


def _out_channels(conv: Any) -> int | None:
    weight = (conv.get("_parameters") or {}).get("weight")
    return int(weight.shape[0]) if isinstance(weight, np.ndarray) and weight.ndim == 4 else None


def read_checkpoint(path: Path, obj: Any) -> Checkpoint | None:
    model = model_record(obj)
    if model is not None:
        if model.qualname.startswith("models.yolo.") and isinstance(model.get("yaml"), dict):
            return _checkpoint(path, model, obj)
        return None
    state_dict = tensor_dict(obj)
    if state_dict is not None and any(k.startswith(("model.0.", "module.model.0.")) for k in state_dict):
        raise TrtnetError(
            f"{path} is a bare YOLOv5 state dict: it lacks the model yaml (depth, width, anchors, classes) "
            "needed to rebuild the network. Convert the checkpoint train.py wrote (best.pt / last.pt) instead."
        )
    return None


def _checkpoint(path: Path, model: ModuleRecord, ckpt: Any) -> Checkpoint:
    detect = detect_head(path, model, "YOLOv5")
    strides = check_strides(model.get("stride"), path)
    anchors = np.asarray((detect.get("_buffers") or {}).get("anchors"), dtype=np.float32)
    if anchors.ndim != 3 or anchors.shape[0] != len(strides):
        raise TrtnetError(f"{path}: Detect's anchors {anchors.shape} do not match the model's strides {strides}")
    nc = check_count(detect.get("nc"), "Detect.nc", path, MAX_CLASSES)
    check_anchors(anchors, len(strides), path)
    check_head_channels(path, detect, nc, anchors.shape[1])
    state_dict = module_state_dict(model)
    meta = {
        "family": FAMILY,
        "generation": "v5.0-focus" if any(m.class_name == "Focus" for m in model.walk()) else "v6+",
        "model_class": model.qualname,
        "yaml": model.get("yaml"),
        "nc": nc,
        "names": class_names(path, model.get("names"), nc),
        "strides": strides,
        # Detect keeps anchors divided by the stride; times the stride they are the pixels it decodes with.
        "anchors": (anchors * np.asarray(strides, np.float32)[:, None, None]).reshape(len(strides), -1).tolist(),
        "bn_eps": bn_eps(path, model),
        "imgsz": 1280 if len(strides) > 3 else 640,
        "source_dtype": str(next(iter(state_dict.values())).dtype),
    }
    if isinstance(ckpt, dict):
        meta.update({k: ckpt[k] for k in ("epoch", "date") if isinstance(ckpt.get(k), (int, str))})
    return Checkpoint(FAMILY, to_float32(state_dict), meta)


# -- bench --compare-torch -------------------------------------------------------------------------


def torch_model(torch, meta: dict, engine_path: Path, weights_dir: str, official_src: str | None):
    """The official YOLOv5 code's model for the engine's checkpoint (.pt beside it or in weights_dir), fp16."""
    if not official_src:
        return None, "YOLOv5 needs the official source: pass --yolov5-src DIR (a clone of ultralytics/yolov5)"
    checkpoint = checkpoint_beside(meta, engine_path, weights_dir)
    if checkpoint is None:
        return None, f"no {Path(meta['weights']).stem}.pt in {weights_dir}/ for the official YOLOv5 code to load"
    sys.path.insert(0, str(Path(official_src).resolve()))
    try:
        from models.experimental import attempt_load
    except ImportError as exc:
        return None, f"cannot import the official YOLOv5 code from {official_src}: {exc}"
    model = attempt_load(str(checkpoint), device=torch.device("cuda"), fuse=True)
    return model.half().eval(), ""


# -- trtnet golden ----------------------------------------------------------------------------------------


def official_golden(torch, checkpoint_path: Path, image_chw: np.ndarray, official_src: str | None) -> dict:
    """The official YOLOv5 code (`official_src` or sys.path) on the image, model unfused in float32: `raw_i`
    (each Detect conv before reshape/sigmoid), `decoded`, `det` (official NMS 0.25/0.45) and `layer_XX`."""
    from trtnet.golden import official_model, recorded_outputs, top_level_layers

    # models.yolo: the classes the checkpoint pickles
    model = official_model(torch, checkpoint_path, official_src, ("models.yolo", "utils.general"),
                           "the official YOLOv5 code", "git clone https://github.com/ultralytics/yolov5 and pass "
                           "--yolov5-src DIR (or set YOLOV5_SRC)")
    from utils.general import non_max_suppression

    head = model.model[-1]
    layers = top_level_layers(model)
    with recorded_outputs({**{f"raw_{i}": conv for i, conv in enumerate(head.m)}, **layers}) as kept, \
            torch.no_grad():
        decoded = model(torch.from_numpy(image_chw[None].astype(np.float32) / 255))[0]
        det = official_nms(non_max_suppression, decoded)
    return {**{k: kept[k] for k in sorted(kept) if k.startswith("raw_")}, "decoded": decoded.numpy(),
            "det": det.numpy(), **{k: kept[k] for k in sorted(layers) if k in kept}}


def official_nms(non_max_suppression, decoded):
    """The official NMS at detect.py's settings; v5.0's has no max_det (it keeps at most 300)."""
    import inspect

    takes_max_det = "max_det" in inspect.signature(non_max_suppression).parameters
    return non_max_suppression(decoded, 0.25, 0.45, **({"max_det": 1000} if takes_max_det else {}))[0]
