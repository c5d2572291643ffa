"""What `build --int8 …` asks for, checked once, and the QuantPlan it leads to (from a calibration file
when one is given and fits these weights, else by calibrating and writing that file)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trtnet.errors import TrtnetError
from trtnet.quant.calibrate import calibrate, quant_plan
from trtnet.quant.calibration_file import CalibrationFile, network_hash, read_calibration
from trtnet.quant.histogram import DEFAULT_PERCENTILE, canonical_method
from trtnet.quant.plan import QuantPlan

MODES = ("explicit", "implicit")


@dataclass(frozen=True)
class Int8Options:
    calib: str | None = None  # folder (recursive) or glob of calibration images
    calib_images: int = 256
    calib_method: str = "entropy"  # entropy | percentile | max (minmax)
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
        method = canonical_method(self.calib_method)
        if self.calib_images < 1:
            raise TrtnetError(f"--calib-images {self.calib_images}: must be at least 1")
        if self.mode == "implicit" and method != "entropy":
            raise TrtnetError(f"--int8-mode implicit calibrates with TensorRT's entropy calibrator; "
                              f"--calib-method {self.calib_method} applies to --int8-mode explicit")
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
    return quant_plan(calibration, keep), calibration, path


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
            raise TrtnetError(f"--int8-keep auto: no sensitivity report {path} and no --calib images to measure it")
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
