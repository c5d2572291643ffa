"""`python -m trtnet.build`: weights → TensorRT engine + metadata sidecar.

    python -m trtnet.build yolov5s --fp16
    python -m trtnet.build weights/resnet50.wts --min-batch 1 --opt-batch 8 --max-batch 32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from trtnet import __version__, compat, networks
from trtnet.build_progress import BuildProgress
from trtnet.cli import add_weights_dir, command_parser, run
from trtnet.engine_meta import EngineMeta, Int8Record, PostprocessSettings, nms_kwargs
from trtnet.errors import TrtnetError
from trtnet.fileio import atomic_write
from trtnet.interrupts import BuildInterrupts
from trtnet.network import MIN_IMGSZ, BatchProfile, DefinedNetwork, default_imgsz, define_network, hw_of
from trtnet.quant.int8_build import check_int8_request, configure_int8, define_int8_network
from trtnet.quant.options import Int8Options, add_int8_arguments, int8_options
from trtnet.sidecar import engine_sidecar_path, file_sha256, with_partner

POSTPROCESS_MODES = ("none", "kernels", "plugin")

LONG_BUILD_S = 60  # a build this long says which layers its tactic timing spent longest on


@dataclass
class BuildRequest:
    weights: str
    precision: str = "fp32"
    imgsz: int | tuple[int, int] | None = None  # a side, or (h, w) for a static non-square input
    min_imgsz: int | None = None
    max_imgsz: int | None = None
    batch: BatchProfile = field(default_factory=BatchProfile)
    workspace_gib: float | None = None
    tf32: bool = False
    target_cc: Sequence[str] = ()
    postprocess: PostprocessSettings = field(default_factory=PostprocessSettings)
    softmax: bool = False
    output: str | None = None
    timing_cache: str | None = None
    opt_level: int | None = None  # builder optimization level (None: TensorRT's default)
    arch: str | None = None
    nc: int | None = None
    weights_dir: str = "weights"
    verbose: bool = False  # TensorRT's own log at verbose level
    int8: Int8Options | None = None  # with precision "int8" (None: Int8Options() defaults)


@dataclass
class BuildResult:
    engine: Path
    metadata: Path
    layers: int
    engine_bytes: int
    seconds: float


def default_engine_name(stem: str, precision: str, imgsz: int | tuple[int, int], min_imgsz: int | None,
                        max_imgsz: int | None, batch: BatchProfile) -> str:
    """`NAME.PRECISION.SIZE[.bBATCH].engine`: what tells engines of one model apart, so a build for one input
    size or batch never replaces another's. SIZE is `HxW` for a static non-square size, `lo-hi` for a dynamic
    one; BATCH is the static batch when above 1, `lo-hi` for a dynamic one (yolov5s.fp16.640.engine,
    yolov5s.fp16.640x480.engine, yolov5s.fp16.640.b32.engine, yolov5n.fp16.128-672.engine)."""
    h, w = hw_of(imgsz)
    size = str(h) if h == w else f"{h}x{w}"
    if min_imgsz is not None or max_imgsz is not None:
        size = f"{min_imgsz or min(h, w)}-{max_imgsz or max(h, w)}"
    batches = f".b{batch.min}-{batch.max}" if batch.dynamic else (f".b{batch.max}" if batch.max > 1 else "")
    return f"{stem}.{precision}.{size}{batches}.engine"


def engine_paths(req: BuildRequest, weights_path: Path, meta: dict) -> tuple[Path, Path]:
    """The engine (`-o`, a file ending in .engine or an existing folder) and its metadata `NAME.engine.json`."""
    name = default_engine_name(weights_path.stem, req.precision, req.imgsz or default_imgsz(meta), req.min_imgsz,
                               req.max_imgsz, req.batch)
    engine = Path(req.output) if req.output else Path(req.weights_dir) / name
    if engine.suffix != ".engine" and engine.is_dir():
        engine = engine / name
    if engine.is_dir():
        raise TrtnetError(f"-o {engine}: a directory of that name exists; give the engine another name")
    if engine.suffix != ".engine":
        raise TrtnetError(f"-o {engine}: an engine's file name must end in .engine (or give an existing folder)")
    return engine, engine_sidecar_path(engine)


def build_failure(errors: Sequence[str], dynamic: bool, verbose: bool) -> str:
    """The one-line error of a failed build: TensorRT's last errors, and what to do where we know it."""
    message = "TensorRT could not build the engine: " + ("; ".join(errors[-3:]) or "no reason given")
    if dynamic and any("Could not find any implementation for node {ForeignNode" in e for e in errors):
        message += (". TensorRT's Myelin compiler had no implementation for that part of the network with a dynamic "
                    "batch or size (TensorRT 8.x calls cuBLASLt for it, whatever the tactic sources): build a static "
                    "engine (--batch N, --imgsz SIZE or H,W), or check that libcublasLt loads")
    return message if verbose else message + " (run with --verbose for TensorRT's full log)"


def refuse_overwriting_inputs(outputs: Sequence[Path], inputs: Sequence[Path]) -> None:
    """A build never writes over what it reads (e.g. `-o NAME.engine` beside `NAME.engine.wts`)."""
    for out in outputs:
        for used in inputs:
            if _same_file(out, used):
                raise TrtnetError(f"{out} would overwrite {used}, an input of this build: choose another -o")


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def timing_cache_path(req: BuildRequest, engine_path: Path) -> Path:
    path = Path(req.timing_cache) if req.timing_cache else engine_path.parent / "timing.cache"
    if path.is_dir():
        raise TrtnetError(f"--timing-cache {path}: is a directory; give a file (it is created if missing)")
    return path


def ensure_writable(directory: Path) -> None:
    """Fail before a long build, not after it, when the output cannot be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise TrtnetError(f"cannot write to {directory}: {exc.strerror or exc}") from exc


def load_for_build(req: BuildRequest):
    from trtnet.weights import check_finite, load_weights, resolve_weights

    path = resolve_weights(req.weights, req.weights_dir)
    weights = load_weights(path)
    check_finite(weights.tensors, path)
    meta = dict(weights.meta)
    if req.arch:
        arch_meta = networks.meta_for_arch(req.arch, req.nc)
        if meta and meta.get("family") != arch_meta["family"]:
            raise TrtnetError(f"--arch {req.arch} does not match the weights' family {meta.get('family')!r}")
        meta = {**arch_meta, **meta} if meta else arch_meta
    if not meta:
        raise TrtnetError(
            f"{path} has no metadata (.json beside it): trtnet's gen_wts writes one; for .wts files from "
            "tensorrtx pass --arch (e.g. --arch yolov5s --nc 80, or --arch resnet50)"
        )
    networks.for_meta(meta)
    return path, weights.tensors, meta


def build(req: BuildRequest, log=print) -> BuildResult:
    """Build and write the engine, then its metadata; Ctrl-C or SIGTERM stops it with nothing written."""
    with BuildInterrupts() as interrupts:
        return _build(req, log, interrupts)


def _build(req: BuildRequest, log, interrupts: BuildInterrupts) -> BuildResult:
    if req.postprocess.mode not in POSTPROCESS_MODES:
        raise TrtnetError(f"--postprocess {req.postprocess.mode}: one of {', '.join(POSTPROCESS_MODES)}")
    _check_postprocess_mode(req.postprocess.mode)
    int8 = check_int8_request(req.precision, req.int8)
    weights_path, tensors, meta = load_for_build(req)
    if req.postprocess.mode != "none" and networks.for_meta(meta).TASK != "detect":
        raise TrtnetError(f"--postprocess applies to detectors only ({', '.join(networks.of_task('detect'))})")
    engine_path, meta_path = engine_paths(req, weights_path, meta)
    cache_path = timing_cache_path(req, engine_path)
    refuse_overwriting_inputs([engine_path, meta_path, cache_path], build_inputs(weights_path))
    refuse_overwriting_inputs([engine_path, meta_path], [cache_path])
    ensure_writable(engine_path.parent)

    t = compat.trt()
    logger = compat.Logger()
    logger.errors.clear()
    logger.verbose = req.verbose
    try:
        return _build_with(req, log, interrupts, t.Builder(logger), logger, weights_path, tensors, meta,
                           engine_path, meta_path, cache_path, int8)
    finally:
        logger.verbose = False  # one process-wide logger (TensorRT keeps the first): quiet again for what follows


def _build_with(req: BuildRequest, log, interrupts: BuildInterrupts, builder, logger, weights_path: Path, tensors,
                meta: dict, engine_path: Path, meta_path: Path, cache_path: Path, int8) -> BuildResult:
    define_kwargs = dict(batch=req.batch, imgsz=req.imgsz, softmax=req.softmax, source=str(weights_path),
                         min_imgsz=req.min_imgsz, max_imgsz=req.max_imgsz)
    if int8:
        int8_network = define_int8_network(builder, int8, tensors, meta, engine_path, log, **define_kwargs)
        defined = int8_network.defined
    else:
        defined = define_network(builder, tensors, meta, precision=req.precision, **define_kwargs)
    if req.postprocess.mode == "plugin":
        append_plugin_postprocess(defined, meta, req.postprocess)
    options = compat.BuildOptions(
        precision="fp16" if int8 else req.precision, int8=bool(int8) and int8.mode == "explicit",
        tf32=req.tf32, workspace_gib=req.workspace_gib, target_cc=tuple(req.target_cc),
        timing_cache=cache_path.read_bytes() if cache_path.exists() else b"", profiles=defined.profiles(req.batch),
        opt_level=req.opt_level,
    )
    log(f"building {weights_path.name}: {defined.family} {req.precision} input {list(defined.input_shape)} "
        f"batch {req.batch} with {compat.flavour()} ({defined.network.num_layers} layers)")
    with BuildProgress(cancelled=interrupts.requested, logger=logger) as progress, interrupts.deferred():
        config = compat.builder_config(builder, options, progress.monitor())
        if int8:
            configure_int8(config, int8_network)
        plan = compat.build_serialized(builder, defined.network, config)
    summary = progress.autotune.summary()
    if summary and (progress.seconds >= LONG_BUILD_S or req.verbose):
        log(summary)  # where a long build's time went
    if plan is None:
        raise TrtnetError(build_failure(logger.errors, dynamic=bool(options.profiles), verbose=req.verbose))
    with atomic_write(engine_path, expected_bytes=len(plan)) as f:
        f.write(plan)
    cache = compat.serialized_timing_cache(config)
    if cache:
        with atomic_write(cache_path) as f:
            f.write(cache)
    metadata = engine_metadata(req, defined, meta, weights_path, progress.seconds, len(plan),
                               int8_network.record if int8 else None)
    with atomic_write(meta_path, "w") as f:  # after the engine: it records the engine's sha256
        json.dump(with_partner(metadata, engine_path), f, indent=1)
    return BuildResult(engine_path, meta_path, defined.network.num_layers, len(plan), progress.seconds)


def build_inputs(weights_path: Path) -> list[Path]:
    from trtnet.weights import sidecar_path

    return [weights_path] if weights_path.suffix == ".safetensors" else [weights_path, sidecar_path(weights_path)]


def _check_postprocess_mode(mode: str) -> None:
    if mode == "plugin" and not compat.flavour().python_plugins:
        raise TrtnetError(
            f"--postprocess plugin needs Python plugins (TensorRT >= 10); {compat.flavour()} cannot host them. "
            "Use --postprocess kernels: the same decode + NMS kernels run right after the engine."
        )


def append_plugin_postprocess(defined: DefinedNetwork, meta: dict, settings: PostprocessSettings) -> None:
    """Decode + NMS inside the engine: the raw heads stop being outputs; `dets` and `counts` are."""
    from trtnet.plugins.trt_plugins import YoloNMSSettings, add_yolo_nms

    network = defined.network
    heads = [network.get_output(i) for i in range(network.num_outputs)]
    decode = networks.for_meta(meta).postprocess_kwargs({**meta, "strides": defined.strides})
    nms = YoloNMSSettings(**decode, **nms_kwargs(settings))
    dets, counts = add_yolo_nms(network, heads, nms)
    for head in heads:
        network.unmark_output(head)
    network.mark_output(dets)
    network.mark_output(counts)
    defined.output_names = ["dets", "counts"]


def engine_metadata(req: BuildRequest, defined: DefinedNetwork, meta: dict, weights_path: Path,
                    seconds: float, size: int, int8: Int8Record | None = None) -> dict:
    h, w = defined.imgsz
    out = {
        "trtnet_version": __version__,
        "family": defined.family,
        "weights": weights_path.name,
        "precision": req.precision,
        "tf32": req.tf32,
        "imgsz": [h, w],
        "min_imgsz": defined.min_imgsz,
        "max_imgsz": defined.max_imgsz,
        "batch": asdict(req.batch),
        "input": {"name": defined.input_name, "dtype": "float32"},
        "outputs": defined.output_names,
        "tensorrt": {"flavour": compat.flavour().name, "version": compat.flavour().version},
        "target_cc": list(req.target_cc),
        "device": current_device(),
        "layers": defined.network.num_layers,
        "engine_bytes": size,
        "build_seconds": round(seconds, 2),
        "built_at": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "weights_sha256": file_sha256(weights_path),
        "checkpoint": meta.get("source"),
        "checkpoint_sha256": meta.get("source_sha256"),
    }
    if req.opt_level is not None:
        out["opt_level"] = req.opt_level
    family = networks.family(defined.family)
    if family.TASK == "detect":
        out["postprocess"] = asdict(req.postprocess)
    out.update(networks.engine_fields(family, meta, defined.strides, {"softmax": req.softmax}))
    if int8 is not None:
        out["int8"] = asdict(int8)
    return EngineMeta.from_dict(out, "the new engine's metadata").to_dict()  # never one the runtime refuses


def current_device() -> dict | None:
    """The GPU TensorRT builds for (name, compute capability), when there is one."""
    try:
        from trtnet import cuda_rt

        return cuda_rt.device_identity(0)
    except Exception:  # no driver, no GPU, or no cuda-python: the build is ahead-of-time
        return None


def parse_batch(args) -> BatchProfile:
    if args.batch is not None and any(v is not None for v in (args.min_batch, args.opt_batch, args.max_batch)):
        raise TrtnetError("use either --batch N or --min-batch/--opt-batch/--max-batch")
    if args.batch is not None:
        return BatchProfile(args.batch, args.batch, args.batch).check()
    hi = args.max_batch or args.opt_batch or args.min_batch or 1
    lo = args.min_batch or 1
    return BatchProfile(lo, args.opt_batch or lo, hi).check()


def input_size(text: str) -> int | tuple[int, int]:
    """--imgsz: `640`, or `640,480` / `640x480` (height, width); one value when both sides agree."""
    try:
        sides = [int(side) for side in text.lower().replace("x", ",").split(",")]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: give one side (640) or height,width (640,480)")
    return sides[0] if len(set(sides)) == 1 else (sides[0], sides[1])


def check_sizes(args) -> None:
    """Numbers argparse accepts but a build cannot use (0 would even silently mean 'the default')."""
    sides = hw_of(args.imgsz) if args.imgsz is not None else ()
    for option, value in (*(("--imgsz", side) for side in sides), ("--min-imgsz", args.min_imgsz),
                          ("--max-imgsz", args.max_imgsz)):
        if value is not None and value < MIN_IMGSZ:
            raise TrtnetError(f"{option} {value}: must be at least {MIN_IMGSZ} pixels")
    if args.workspace is not None and not args.workspace > 0:
        raise TrtnetError(f"--workspace {args.workspace}: must be a positive number of GiB")


def parser() -> argparse.ArgumentParser:
    p = command_parser("build", "Build a TensorRT engine from trtnet weights (.wts + .json, or .safetensors).")
    p.add_argument("weights", help="a name in --weights-dir (yolov5s → weights/yolov5s.wts) or a path")
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--fp16", dest="precision", action="store_const", const="fp16", help="half precision")
    prec.add_argument("--fp32", dest="precision", action="store_const", const="fp32",
                      help="strict fp32 (TF32 off; the default)")
    prec.add_argument("--int8", dest="precision", action="store_const", const="int8",
                      help="INT8 (Q/DQ from a calibration; fp16 where not quantized)")
    p.set_defaults(precision="fp32")
    p.add_argument("--tf32", action="store_true", help="allow TF32 math in fp32 layers (faster, ~1e-2 error)")
    p.add_argument("--imgsz", type=input_size, metavar="SIZE|H,W",
                   help="input size: a side (default: the model's, e.g. 640 / 224), or H,W for a static non-square "
                        "input, e.g. 640,480 (what Ultralytics' rect letterbox makes of a 3:4 portrait at 640)")
    p.add_argument("--min-imgsz", type=int, help="dynamic input size: smallest side (default --imgsz)")
    p.add_argument("--max-imgsz", type=int, help="dynamic input size: largest side (default --imgsz); trtnet.val's "
                                                   "rectangular batches need --imgsz + 32, e.g. 672 at 640")
    p.add_argument("--batch", type=int, help="static batch size")
    p.add_argument("--min-batch", type=int, help="dynamic batch: smallest")
    p.add_argument("--opt-batch", type=int, help="dynamic batch: the size TensorRT tunes for")
    p.add_argument("--max-batch", type=int, help="dynamic batch: largest")
    p.add_argument("--workspace", type=float, metavar="GiB", help="builder workspace limit")
    p.add_argument("--postprocess", choices=POSTPROCESS_MODES, default="none",
                   help="YOLOv5: none = raw head maps; kernels = decode+NMS kernels after the engine; "
                        "plugin = decode+NMS inside the engine (TensorRT >= 10)")
    p.add_argument("--conf", type=float, default=0.25, help="postprocess: score threshold")
    p.add_argument("--iou", type=float, default=0.45, help="postprocess: NMS IoU threshold")
    p.add_argument("--max-det", type=int, default=1000, help="postprocess: detections kept per image")
    p.add_argument("--multi-label", action="store_true", help="postprocess: every class above --conf (val)")
    p.add_argument("--agnostic", action="store_true", help="postprocess: class-agnostic NMS")
    p.add_argument("--softmax", action="store_true", help="ResNet: also output softmax probabilities")
    p.add_argument("--target-cc", default="", help="TensorRT-RTX: compute capabilities to build for, e.g. 8.6,8.9")
    p.add_argument("--arch", help="architecture for weights without metadata, e.g. yolov5s or resnet50")
    p.add_argument("--nc", type=int, help="class count with --arch (default: the family's, e.g. 80)")
    p.add_argument("--timing-cache", help="timing cache file (default: timing.cache beside the engine)")
    p.add_argument("--opt-level", type=int, choices=compat.OPT_LEVELS, metavar="0-5",
                   help="builder optimization level (TensorRT >= 8.6, TensorRT-RTX): below 3 builds faster, maybe a "
                        "slower engine; above 3 searches longer (default: TensorRT's, 3)")
    add_weights_dir(p, "where names are looked up and engines written")
    p.add_argument("-o", "--output", help="engine path, or an existing folder for it (default: "
                   "<weights-dir>/<name>.<precision>.<size>[.b<batch>].engine, e.g. yolov5s.fp16.640.engine)")
    p.add_argument("--verbose", action="store_true", help="show TensorRT's own log (verbose level)")
    add_int8_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    check_sizes(args)
    req = BuildRequest(
        weights=args.weights, precision=args.precision, imgsz=args.imgsz, min_imgsz=args.min_imgsz,
        max_imgsz=args.max_imgsz,
        batch=parse_batch(args),
        workspace_gib=args.workspace, tf32=args.tf32,
        target_cc=tuple(c for c in args.target_cc.split(",") if c),
        postprocess=PostprocessSettings(mode=args.postprocess, conf=args.conf, iou=args.iou, max_det=args.max_det,
                                        multi_label=args.multi_label, agnostic=args.agnostic),
        softmax=args.softmax, output=args.output, timing_cache=args.timing_cache, opt_level=args.opt_level,
        arch=args.arch, nc=args.nc,
        weights_dir=args.weights_dir, verbose=args.verbose, int8=int8_options(args),
    )
    result = build(req)
    print(f"wrote {result.engine} ({result.engine_bytes / 1e6:.1f} MB, {result.layers} layers, "
          f"{result.seconds:.1f} s) and {result.metadata}")
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    return run(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
