"""What `build --int8 …` asks for, checked once, and the QuantPlan it leads to (from a calibration file
when one is given and fits these weights, else by calibrating and writing that file)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trtnet.errors import TrtnetError
from trtnet.quant.calibrate import calibrate, quant_plan
from trtnet.quant.calibration_file import CalibrationFile, network_hash, read_calibration
from trtnet.quant.histogram import DEFAULT_PERCENTILE, canonical_method
from trtnet.quant.keep import honoured_plan, network_definer
from trtnet.quant.plan import QuantPlan

MODES = ("explicit", "implicit")
# yolov5n on coco128 (val --device cpu, everything INT8): percentile 99.99 loses 1.7 points of mAP@0.5:0.95,
# max 1.8, entropy (KL) 9.1: it clips the long tails of SiLU activations that boxes depend on. The implicit
# path is TensorRT's calibrator: entropy (EntropyCalibrator2, tensorrtx's) by default, or minmax.
DEFAULT_METHODS = {"explicit": "percentile", "implicit": "entropy"}
IMPLICIT_METHODS = ("entropy", "max")  # TensorRT's calibrators (trtnet.quant.implicit.CALIBRATORS)


@dataclass(frozen=True)
class Int8Options:
    calib: str | None = None  # folder (recursive) or glob of calibration images
    calib_images: int = 256
    calib_method: str | None = None  # entropy | percentile | max (minmax); None: the mode's default
    percentile: float = DEFAULT_PERCENTILE
    calib_cache: str | None = None  # explicit: our JSON calibration file; implicit: TensorRT's cache
    keep: Sequence[str] = field(default_factory=tuple)  # convolutions / modules left in float, or ("auto",)
    mode: str = "explicit"
    calib_device: str | None = None  # cpu (reference executor) | gpu (fp32 engine); None: gpu when usable

    @property
    def auto_keep(self) -> bool:
        return tuple(self.keep) == ("auto",)

    def checked(self) -> Int8Options:
        """The options with the method's canonical name; an error for any pair that contradicts."""
        if self.mode not in MODES:
            raise TrtnetError(f"--int8-mode {self.mode}: use explicit or implicit")
        method = canonical_method(self.calib_method or DEFAULT_METHODS[self.mode])
        if self.calib_images < 1:
            raise TrtnetError(f"--calib-images {self.calib_images}: must be at least 1")
        if self.mode == "implicit" and method not in IMPLICIT_METHODS:
            raise TrtnetError(f"--int8-mode implicit calibrates with TensorRT's entropy (default) or minmax "
                              f"calibrator; --calib-method {self.calib_method} applies to --int8-mode explicit")
        if self.mode == "implicit" and self.keep:
            raise TrtnetError("--int8-keep applies to --int8-mode explicit (implicit INT8 lets TensorRT choose)")
        if len(self.keep) > 1 and ("auto" in self.keep or "none" in self.keep):
            raise TrtnetError(f"--int8-keep {','.join(self.keep)}: auto and none stand alone (or name layers)")
        if self.calib_device not in (None, "cpu", "gpu"):
            raise TrtnetError(f"--calib-device {self.calib_device}: use cpu or gpu")
        return Int8Options(self.calib, self.calib_images, method, self.percentile, self.calib_cache,
                           tuple(k for k in self.keep if k != "none"), self.mode, self.calib_device or default_device())


def default_device() -> str:
    """gpu when trtnet's CUDA runtime finds a usable GPU, else cpu."""
    try:
        from trtnet import cuda_rt

        return "cpu" if cuda_rt.gpu_unavailable_reason() else "gpu"
    except Exception:  # no cuda-python at all
        return "cpu"


def report_beside_weights(weights_path: str | os.PathLike) -> Path:
    """Where `python -m trtnet.quant sensitivity` writes its report by default."""
    weights_path = Path(weights_path)
    return weights_path.with_name(weights_path.stem + ".sensitivity.json")


def sensitivity_path(calibration_path: str | os.PathLike) -> Path:
    """Where `--int8-keep auto` finds (or writes) the sensitivity report: beside the calibration file."""
    path = Path(calibration_path)
    name = path.name[:-len(".calib.json")] if path.name.endswith(".calib.json") else path.stem
    return path.with_name(name + ".sensitivity.json")


def default_calibration_path(engine_path: str | os.PathLike) -> Path:
    """Where build keeps the calibration when --calib-cache is not given: beside the engine."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.stem + ".calib.json")


def explicit_plan(options: Int8Options, tensors: Mapping[str, np.ndarray], meta: Mapping, imgsz: int,
                  engine_path: str | os.PathLike, log=print,
                  weights_path: str | os.PathLike | None = None) -> tuple[QuantPlan, CalibrationFile, Path]:
    """The Q/DQ plan for these weights and the calibration file it comes from: an existing --calib-cache is
    read (its network hash must match: a rebuild needs no calibration pass); otherwise the network is
    calibrated on --calib and the result written (atomically) to --calib-cache, or beside the engine.
    With --int8-keep auto, the groups to keep come from the sensitivity report beside the weights
    (`python -m trtnet.quant sensitivity` writes it there) or beside the calibration file (measured on the
    calibration images and written there when neither exists)."""
    options = options.checked()
    calibration, path = calibration_for(options, tensors, meta, imgsz, engine_path, log)
    reports = ([report_beside_weights(weights_path)] if weights_path else []) + [sensitivity_path(path)]
    keep = auto_keep_groups(options, tensors, meta, imgsz, calibration, reports, log) if options.auto_keep \
        else options.keep
    plan = quant_plan(calibration, keep)
    if plan.keep_float:
        plan = honoured_plan(plan, network_definer(tensors, meta, imgsz), log)
    return plan, calibration, path


def calibration_for(options: Int8Options, tensors: Mapping[str, np.ndarray], meta: Mapping, imgsz: int,
                    engine_path: str | os.PathLike, log=print) -> tuple[CalibrationFile, Path]:
    given = Path(options.calib_cache) if options.calib_cache else None
    if given is not None and given.exists():
        calibration = read_calibration(given, network_hash(tensors, meta))
        log(f"INT8: ranges from {given} ({calibration.method}, {calibration.images.count} images)")
        return calibration, given
    if not options.calib:
        missing = f"--calib-cache {given} does not exist and " if given else ""
        raise TrtnetError(f"--int8: {missing}no calibration images given (--calib DIR_OR_GLOB)")
    path = given or default_calibration_path(engine_path)
    run = calibrate(tensors, meta, options.calib, method=options.calib_method, count=options.calib_images,
                    imgsz=imgsz, percentile=options.percentile, device=options.calib_device or "cpu")
    run.calibration.write(path)
    log(f"INT8: calibrated on {run.calibration.images.count} images ({run.calibration.method}, "
        f"{run.seconds_per_image:.2f} s per image) → {path}")
    return run.calibration, path


AUTO_IMAGES = 8  # calibration images the build's own sensitivity measurement uses (the report command: any)


def auto_keep_groups(options: Int8Options, tensors: Mapping[str, np.ndarray], meta: Mapping, imgsz: int,
                     calibration: CalibrationFile, reports: Sequence[Path], log=print) -> tuple:
    """The groups to keep in fp16: from the first existing report of `reports`, else measured and written
    to the last of them."""
    from trtnet.quant.sensitivity import auto_keep, read_report

    path = next((r for r in reports if r.exists()), reports[-1])
    net_hash = network_hash(tensors, meta)
    if path.exists():
        report = read_report(path, net_hash)
        log(f"INT8: sensitivity from {path}")
    else:
        if not options.calib:
            looked = " or ".join(str(r) for r in reports)
            raise TrtnetError(f"--int8-keep auto: no sensitivity report ({looked}) and no --calib images to measure "
                              "it (python -m trtnet.quant sensitivity writes one beside the weights)")
        report = measure_sensitivity(tensors, meta, options.calib, min(AUTO_IMAGES, options.calib_images), imgsz,
                                     calibration, options.calib_device or "cpu", log)
        report.write(path)
        log(f"INT8: sensitivity of {len(report.groups)} layer groups → {path}")
    keep = auto_keep(report)
    log(f"INT8: keeping in fp16: {', '.join(keep) or 'nothing'}")
    return keep


def measure_sensitivity(tensors: Mapping[str, np.ndarray], meta: Mapping, images: str, count: int, imgsz: int,
                        calibration: CalibrationFile, device: str = "cpu", log=None):
    """The sensitivity report on the first `count` images of `images` (reference executor on the CPU, or
    with torch on the GPU for device gpu)."""
    from trtnet import networks
    from trtnet.quant.calibrate import CalibrationImages, find_images
    from trtnet.quant.sensitivity import executor_sensitivity

    paths, _ = find_images(images)
    loader = CalibrationImages(paths, count, networks.calibration_preprocess(meta, imgsz), f"--calib {images}")
    batches = list(loader.batches(1))
    return executor_sensitivity(tensors, meta, calibration, batches, imgsz, "cuda" if device == "gpu" else "cpu",
                                log)


# -- the command line (build, val) ---------------------------------------------------------------------
def add_int8_arguments(p) -> None:
    g = p.add_argument_group("INT8 (with --int8)")
    g.argument_default = argparse.SUPPRESS  # absent unless given: no "(default: None)" in --help
    g.add_argument("--calib", metavar="DIR_OR_GLOB", help="calibration images: a folder (searched recursively) "
                                                          "or a glob, e.g. ../shared/data/coco128/images")
    g.add_argument("--calib-images", type=int, metavar="N", help="calibration images used (default 256)")
    g.add_argument("--calib-method", choices=("entropy", "percentile", "minmax", "max"),
                   help="activation ranges: percentile (99.99, the default), entropy (KL; the implicit "
                        "mode's default) or minmax (implicit: TensorRT's MinMax calibrator)")
    g.add_argument("--calib-cache", metavar="FILE",
                   help="calibration file: read when it exists (no calibration pass), else written "
                        "(default: NAME.calib.json beside the engine; implicit: TensorRT's cache)")
    g.add_argument("--int8-keep", metavar="auto|none|LAYER,...",
                   help="layers or modules kept in fp16: auto (the most quantization-sensitive, "
                        "measured), none (the default), or names such as model.24,raw_0")
    g.add_argument("--int8-mode", choices=("explicit", "implicit"),
                   help="explicit Q/DQ (the default, every TensorRT) or implicit (TensorRT's calibrator, 8.x/10.x)")
    g.add_argument("--calib-device", choices=("cpu", "gpu"),
                   help="where calibration runs (default gpu when one is usable, else cpu)")


INT8_ARGUMENTS = ("calib", "calib_images", "calib_method", "calib_cache", "int8_keep", "int8_mode", "calib_device")


def int8_options(args) -> Int8Options | None:
    """Int8Options from the command line; INT8 options without --int8 are an error."""
    args = argparse.Namespace(**{**dict.fromkeys(INT8_ARGUMENTS), **vars(args)})
    given = [a for a in INT8_ARGUMENTS if getattr(args, a) is not None]
    if args.precision != "int8":
        if given:
            raise TrtnetError(f"--{given[0].replace('_', '-')} applies to INT8: add --int8")
        return None
    defaults = Int8Options()
    return Int8Options(
        calib=args.calib,
        calib_images=defaults.calib_images if args.calib_images is None else args.calib_images,
        calib_method=args.calib_method or defaults.calib_method, calib_cache=args.calib_cache,
        keep=tuple(k for k in (args.int8_keep or "").split(",") if k), mode=args.int8_mode or defaults.mode,
        calib_device=args.calib_device,
    )
