"""The legacy (implicit) INT8 path of TensorRT 8.x/10.x: TensorRT's IInt8EntropyCalibrator2 (or, with
`--calib-method max`, its IInt8MinMaxCalibrator) fed by trtnet's calibration image loader, reading and writing
TensorRT's calibration cache — the text file tensorrtx users already have:

    TRT-8503-EntropyCalibration2
    images: 3c010a14
    model.0.conv: 3d4a8b2c

(one line per tensor: its name and the big-endian float32 scale in hex). TensorRT 11 and TensorRT-RTX
have no calibrators: `tensorrt_calibrator` refuses there with compat's message.
"""

from __future__ import annotations

import os
import struct
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trtnet.errors import TrtnetError
from trtnet.fileio import atomic_write
from trtnet.quant.calibrate import CalibrationWarning

Upload = Callable[[np.ndarray], int]  # a host batch → the device pointer TensorRT reads it from


@dataclass(frozen=True)
class CalibrationCache:
    header: str  # e.g. "TRT-8503-EntropyCalibration2"
    scales: dict  # tensor name → float32 scale


def parse_calibration_cache(data: bytes, source: str = "calibration cache") -> CalibrationCache:
    """Check and read a TensorRT calibration cache (TrtnetError naming `source` and the line if broken)."""
    try:
        lines = data.decode("ascii").splitlines()
    except UnicodeDecodeError:
        raise TrtnetError(f"{source}: not a TensorRT calibration cache (not text)") from None
    if not lines or not lines[0].startswith("TRT-") or "Calibration" not in lines[0]:
        raise TrtnetError(f"{source}: not a TensorRT calibration cache (first line should read TRT-…Calibration…)")
    scales = {}
    for number, line in enumerate(lines[1:], start=2):
        name, sep, value = line.rpartition(": ")
        try:
            if not sep or not name:
                raise ValueError
            scales[name] = struct.unpack(">f", bytes.fromhex(value.strip().zfill(8)))[0]
        except (ValueError, struct.error):
            raise TrtnetError(f"{source}: line {number} is not 'tensor: hexscale': {line[:60]!r}") from None
    return CalibrationCache(lines[0], scales)


def read_cache(path: str | os.PathLike | None) -> bytes | None:
    """The cache's bytes if `path` names an existing, valid cache; None when there is none yet."""
    if path is None or not Path(path).exists():
        return None
    data = Path(path).read_bytes()
    parse_calibration_cache(data, str(path))
    return data


def write_cache(path: str | os.PathLike, data: bytes) -> None:
    parse_calibration_cache(bytes(data), "TensorRT's calibration cache")
    with atomic_write(path) as f:
        f.write(bytes(data))


def fixed_batches(batches: Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    """Regroup preprocessed images ([n, 3, H, W] arrays) into contiguous float32 batches of exactly
    `batch_size` (TensorRT calibrates with one fixed batch size); a remainder is left out with a warning."""
    pending: list[np.ndarray] = []
    held, produced = 0, 0
    for batch in batches:
        for image in batch:
            pending.append(image)
            held += 1
            if held == batch_size:
                yield np.ascontiguousarray(np.stack(pending), dtype=np.float32)
                pending, held, produced = [], 0, produced + 1
    if produced == 0:
        raise TrtnetError(f"calibration: fewer images ({held}) than one calibration batch ({batch_size})")
    if held:
        warnings.warn(f"calibration: the last {held} image(s) do not fill a batch of {batch_size} and are left out",
                      CalibrationWarning, stacklevel=2)


# --calib-method → TensorRT's calibrator class. Entropy (KL) cost yolov5n 10.3 points of mAP@0.5:0.95 on the GPU
# (run O), as KL ranges did on the CPU (9.1; max ranges 1.8): it clips the long tails of SiLU activations.
CALIBRATORS = {"entropy": "IInt8EntropyCalibrator2", "max": "IInt8MinMaxCalibrator"}


def calibrator_class(base: type) -> type:
    """A calibrator on `base` (one of TensorRT's CALIBRATORS; a stand-in in tests)."""

    class Calibrator(base):
        def __init__(self, batches: Iterable[np.ndarray], batch_size: int, cache_path: str | os.PathLike | None,
                     upload: Upload):
            base.__init__(self)
            self.batches = fixed_batches(batches, batch_size)
            self.batch_size = batch_size
            self.cache_path = cache_path
            self.upload = upload
            self.current: np.ndarray | None = None  # TensorRT reads it while get_batch's pointer is in use

        def get_batch_size(self) -> int:
            return self.batch_size

        def get_batch(self, names, *args):
            self.current = next(self.batches, None)
            return None if self.current is None else [self.upload(self.current)]

        def read_calibration_cache(self, *args):
            return read_cache(self.cache_path)

        def write_calibration_cache(self, cache, *args) -> None:
            if self.cache_path is not None:
                write_cache(self.cache_path, bytes(cache))

    return Calibrator


def tensorrt_calibrator(method: str, batches: Iterable[np.ndarray], batch_size: int,
                        cache_path: str | os.PathLike | None, upload: Upload):
    """TensorRT's calibrator for `method` (CALIBRATORS) over `batches` (e.g. CalibrationImages.batches());
    refused where the TensorRT in use has no calibrators (11.x, RTX)."""
    from trtnet import compat

    reason = compat.implicit_int8_support()
    if reason:
        raise TrtnetError(f"--int8-mode implicit: {reason}")
    base = getattr(compat.trt(), CALIBRATORS[method])
    return calibrator_class(base)(batches, batch_size, cache_path, upload)
