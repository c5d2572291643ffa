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
    keep: Sequence[str] = field(default_factory=tuple)  # convolutions / modules left in float; ("auto",) later
    mode: str = "explicit"
    calib_device: str = "cpu"  # where `calibrate` runs the reference executor (a torch device)

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
        if "auto" in self.keep:
            raise TrtnetError("--int8-keep auto needs the sensitivity report (python -m trtnet.quant sensitivity), "
                              "which this trtnet does not have yet: name the layers, or none")
        return Int8Options(self.calib, self.calib_images, method, self.percentile, self.calib_cache,
                           tuple(k for k in self.keep if k != "none"), self.mode, self.calib_device)


def default_calibration_path(engine_path: str | os.PathLike) -> Path:
    """Where build keeps the calibration when --calib-cache is not given: beside the engine."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.stem + ".calib.json")


def explicit_plan(options: Int8Options, tensors: Mapping[str, np.ndarray], meta: Mapping, imgsz: int,
                  engine_path: str | os.PathLike, log=print) -> tuple[QuantPlan, CalibrationFile, Path]:
    """The Q/DQ plan for these weights and the calibration file it comes from: an existing --calib-cache is
    read (its network hash must match: a rebuild needs no calibration pass); otherwise the network is
    calibrated on --calib and the result written (atomically) to --calib-cache, or beside the engine."""
    options = options.checked()
    given = Path(options.calib_cache) if options.calib_cache else None
    if given is not None and given.exists():
        calibration = read_calibration(given, network_hash(tensors, meta))
        log(f"INT8: ranges from {given} ({calibration.method}, {calibration.images.count} images)")
        return quant_plan(calibration, options.keep), calibration, given
    if not options.calib:
        missing = f"--calib-cache {given} does not exist and " if given else ""
        raise TrtnetError(f"--int8: {missing}no calibration images given (--calib DIR_OR_GLOB)")
    path = given or default_calibration_path(engine_path)
    run = calibrate(tensors, meta, options.calib, method=options.calib_method, count=options.calib_images,
                    imgsz=imgsz, percentile=options.percentile, device=options.calib_device)
    run.calibration.write(path)
    log(f"INT8: calibrated on {run.calibration.images.count} images ({run.calibration.method}, "
        f"{run.seconds_per_image:.2f} s per image) → {path}")
    return quant_plan(run.calibration, options.keep), run.calibration, path
