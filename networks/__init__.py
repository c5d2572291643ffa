"""The model families trtnet builds: one module each, found here, asked by core code through this registry.

A family is a module of this package (installed as `trtnet.networks.<module>`) that defines `FAMILY`; adding a
family is adding a module, and nothing in trtnet/ names one. What a family module provides:

required   FAMILY: str, TASK: "detect" | "classify", INPUT: str (input tensor name), DEFAULT_IMGSZ: int,
           read_checkpoint(path, obj) -> Checkpoint | None   (obj: what trtnet.checkpoint.load_pickle returned),
           define(g, meta, batch, hw, **options) -> None      (builds on trtnet.graph.Graph, marks the outputs)
detect     postprocess_kwargs(meta) -> dict                   (YoloPostprocess's keywords besides conf/iou/max_det)
optional   DEFINE_OPTIONS: tuple[str, ...] = ()               (build options `define` takes, e.g. ("softmax",))
           CHECKPOINTS: str = FAMILY                          (what checkpoints it reads, for "unknown family" errors)
           PICKLED_MODULES: tuple[str, ...] = ()              (module prefixes whose classes its checkpoints pickle,
                                                              e.g. ("ultralytics.",): read as inert records, never
                                                              imported; any other class refuses the file)
           ARCHS: Mapping[str, ...] = {}                      (names --arch accepts for weights without metadata)
           meta_for_arch(arch, nc) -> dict                    (their metadata; needed when ARCHS is not empty)
           output_strides(heads, hw, meta) -> list[int] = []  (input size / head size per output level)
           engine_fields(meta, strides, options) -> dict = {} (family-specific engine sidecar fields)
           summary(meta) -> str                               (gen_wts' one-line description)
           VAL_IOU: float = 0.6                               (trtnet.val's default NMS IoU, the official one)
           torch_model(torch, meta, engine_path, weights_dir, official_src) -> (model | None, why_not)
                                                              (bench --compare-torch; default: not available)
           golden_aliases(meta) -> {golden key: tensor name}     (golden keys that are not `layer_XX` → model.XX
                                                              nor the tensor's own name, e.g. raw → output0)
           official_golden(torch, checkpoint_path, image_chw, official_src) -> {key: ndarray}
                                                              (trtnet golden: the official code's outputs on the
                                                              uint8 RGB [3,H,W] image, keys as in README's Golden
                                                              files; a TrtnetError saying what to install when
                                                              that code is not importable)
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Mapping
from types import ModuleType

from trtnet.errors import TrtnetError

TASKS = ("detect", "classify")


@functools.cache
def families() -> dict[str, ModuleType]:
    """Every family module of this package, by its FAMILY name, in module-name order."""
    found: dict[str, ModuleType] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        name = getattr(module, "FAMILY", None)
        if name is None:
            continue
        if name in found:
            raise TrtnetError(f"two modules declare family {name!r}: {found[name].__name__} and {module.__name__}")
        if getattr(module, "TASK", None) not in TASKS:
            raise TrtnetError(f"{module.__name__}: TASK must be one of {', '.join(TASKS)}")
        found[name] = module
    return found


def family(name: object) -> ModuleType:
    """The module of family `name`; a TrtnetError listing the known ones otherwise."""
    known = families()
    if name not in known:
        raise TrtnetError(f"unknown model family {name!r} in the weights' metadata: trtnet builds {', '.join(known)}")
    return known[name]


def for_meta(meta: Mapping) -> ModuleType:
    """The family that metadata (weights' or an engine's) names under "family"."""
    return family(meta.get("family"))


def of_task(task: str) -> list[str]:
    return [name for name, module in families().items() if task == module.TASK]


def define_options(module: ModuleType, options: Mapping) -> dict:
    """The subset of build `options` this family's `define` takes."""
    return {k: v for k, v in options.items() if k in getattr(module, "DEFINE_OPTIONS", ())}


def output_strides(module: ModuleType, heads: list, hw: tuple, meta: Mapping) -> list[int]:
    strides = getattr(module, "output_strides", None)
    return strides(heads, hw, meta) if strides else []


def engine_fields(module: ModuleType, meta: Mapping, strides: list, options: Mapping) -> dict:
    fields = getattr(module, "engine_fields", None)
    return fields(meta, strides, options) if fields else {}


def calibration_preprocess(meta: Mapping, imgsz):
    """The host preprocessing INT8 calibration feeds this family's network: its task's inference preprocessing."""
    from trtnet.quant.calibrate import imagenet_preprocess, letterbox_preprocess

    by_task = {"detect": letterbox_preprocess, "classify": imagenet_preprocess}
    return by_task[for_meta(meta).TASK](imgsz)


def summary(meta: Mapping) -> str:
    module = families().get(meta.get("family"))
    describe = getattr(module, "summary", None)
    if describe is None:
        return f"{meta.get('family')}: imgsz {meta.get('imgsz')}, bn_eps {meta.get('bn_eps')}"
    return describe(meta)


def arch_names() -> list[str]:
    return [arch for module in families().values() for arch in getattr(module, "ARCHS", {})]


def meta_for_arch(arch: str, nc: int | None = None) -> dict:
    """Metadata for weights that came without trtnet's .json (e.g. written by tensorrtx's gen_wts.py)."""
    for module in families().values():
        if arch in getattr(module, "ARCHS", {}):
            return module.meta_for_arch(arch, nc)
    raise TrtnetError(f"unknown architecture {arch!r}: one of {', '.join(arch_names())}")


def pickled_modules() -> tuple[str, ...]:
    """The module prefixes whose classes the families' checkpoints pickle (trtnet.safe_pickle records them)."""
    return tuple(prefix for module in families().values() for prefix in getattr(module, "PICKLED_MODULES", ()))


def checkpoints_read() -> str:
    return "; ".join(getattr(m, "CHECKPOINTS", name) for name, m in families().items())


def torch_model(meta: Mapping, engine_path, weights_dir: str, official_src: str | None):
    """(model, why-not): the engine's model in PyTorch fp16 on the GPU through its family, or None and the reason."""
    module = for_meta(meta)
    load = getattr(module, "torch_model", None)
    if load is None:
        return None, f"no PyTorch comparison for the {module.FAMILY} family"
    try:
        import torch
    except ImportError:
        return None, "torch is not installed"
    if not torch.cuda.is_available():
        return None, "torch has no CUDA here (a CPU-only build?)"
    return load(torch, dict(meta), engine_path, weights_dir, official_src)


def official_golden(meta: Mapping, torch, checkpoint_path, image_chw, official_src: str | None) -> dict:
    """The official code's outputs for `trtnet golden`, through the checkpoint's family."""
    module = for_meta(meta)
    run = getattr(module, "official_golden", None)
    if run is None:
        raise TrtnetError(f"trtnet golden cannot run the {module.FAMILY} family's official code (not provided)")
    return run(torch, checkpoint_path, image_chw, official_src)


def golden_aliases(meta: Mapping) -> dict:
    aliases = getattr(for_meta(meta), "golden_aliases", None)
    return dict(aliases(meta)) if aliases else {}
