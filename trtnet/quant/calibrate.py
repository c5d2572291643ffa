"""Our own INT8 calibration: calibration images through the fp32 network, per-tensor histograms of the
tensors Q/DQ will quantize (the inputs of convolutions), amax by entropy / percentile / max.

`calibrate(...)` runs the fp32 network definition on the CPU with the reference executor (slow: for
small sets, CI, and ahead-of-time INT8 builds with TensorRT-RTX on machines without a GPU). A GPU
collection feeds the same `TensorHistograms` from an fp32 engine whose `quantizable_tensors` are marked
as outputs, and finishes with the same `TensorHistograms.calibration`.
"""

from __future__ import annotations

import contextlib
import glob
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trtnet.errors import TrtnetError
from trtnet.quant.calibration_file import CalibrationFile, ImagesUsed, network_hash
from trtnet.quant.histogram import DEFAULT_PERCENTILE, AbsHistogram, canonical_method
from trtnet.quant.plan import QuantPlan

IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
Preprocess = Callable[[np.ndarray], np.ndarray]  # BGR uint8 HWC → float32 [1, 3, H, W]


class CalibrationWarning(UserWarning):
    """Calibration goes on with less than asked: the message says what was left out and why."""


# -- images ----------------------------------------------------------------------------------------
def find_images(source: str | os.PathLike) -> tuple[list[Path], Path | None]:
    """Image files of a folder (searched recursively) or a glob, sorted; and the folder they are named
    relative to. An empty or missing source is an error."""
    text = str(source)
    if any(c in text for c in "*?["):
        paths = [Path(p) for p in glob.glob(text, recursive=True)]
        root = None
    else:
        root = Path(source)
        if not root.is_dir():
            raise TrtnetError(f"--calib {source}: no such folder (give a folder of images or a glob)")
        paths = list(root.rglob("*"))
    images = sorted(p for p in paths if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise TrtnetError(f"--calib {source}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    return images, root


def imagenet_preprocess(imgsz: int | tuple[int, int], resize: int = 256) -> Preprocess:
    """ImageNet inference preprocessing, as trtnet's GPU kernel does it (torchvision Resize(resize),
    CenterCrop(imgsz), RGB, [0, 1], normalised by the ImageNet mean and std)."""
    import cv2

    from trtnet.plugins.preprocess import IMAGENET_MEAN, IMAGENET_STD, imagenet_geometry

    out_h, out_w = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    mean = np.array(IMAGENET_MEAN, np.float32)[:, None, None]
    std = np.array(IMAGENET_STD, np.float32)[:, None, None]

    def preprocess(image_bgr: np.ndarray) -> np.ndarray:
        new_h, new_w, top, left = imagenet_geometry(*image_bgr.shape[:2], resize, min(out_h, out_w))
        resized = cv2.resize(image_bgr, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        crop = resized[top:top + out_h, left:left + out_w, ::-1].transpose(2, 0, 1).astype(np.float32) / 255
        return ((crop - mean) / std)[None].astype(np.float32)

    return preprocess


def letterbox_preprocess(imgsz: int | tuple[int, int]) -> Preprocess:
    """YOLO inference preprocessing: letterbox to `imgsz`, RGB, [0, 1]."""
    from trtnet.plugins.official import letterbox, to_network_input

    def preprocess(image_bgr: np.ndarray) -> np.ndarray:
        return to_network_input(letterbox(image_bgr, imgsz)[0])

    return preprocess


@dataclass
class CalibrationImages:
    """The first `count` readable images of `paths`, preprocessed, in batches. Unreadable images are
    skipped with a warning; fewer readable images than asked is a warning, none at all an error."""

    paths: Sequence[Path]
    count: int
    preprocess: Preprocess
    source: str = "--calib"
    used: list[Path] = field(default_factory=list)  # the images the last pass read

    def batches(self, batch_size: int = 1) -> Iterator[np.ndarray]:
        self.used = []
        pending: list[np.ndarray] = []
        for path in self.paths:
            if len(self.used) == self.count:
                break
            image = _read_image(path)
            if image is None:
                warnings.warn(f"{self.source}: skipping {path}: not a readable image", CalibrationWarning,
                              stacklevel=2)
                continue
            self.used.append(path)
            pending.append(self.preprocess(image))
            if len(pending) == batch_size:
                yield np.concatenate(pending)
                pending = []
        if pending:
            yield np.concatenate(pending)
        self._check_count()

    def _check_count(self) -> None:
        if not self.used:
            raise TrtnetError(f"{self.source}: none of the {len(self.paths)} image file(s) could be read")
        if len(self.used) < self.count:
            warnings.warn(f"{self.source}: {self.count} calibration images asked, {len(self.used)} readable found; "
                          "calibrating with those", CalibrationWarning, stacklevel=2)


def _read_image(path: Path) -> np.ndarray | None:
    import cv2

    data = np.fromfile(str(path), dtype=np.uint8) if path.stat().st_size else np.zeros(0, np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    return image if image is not None and image.size else None


# -- statistics ------------------------------------------------------------------------------------
def quantizable_tensors(network) -> dict[str, str]:
    """Convolution layer name → the name of its input tensor: what Q/DQ quantizes per tensor."""
    found = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type.name == "CONVOLUTION":
            found[layer.name] = layer.get_input(0).name
    return found


def calibrated_tensors(defined) -> list[str]:
    """The tensors a calibration ranges, in network order: every convolution's input, then the shortcuts of
    residual adds that no convolution reads (ResNet's downsample outputs)."""
    return list(dict.fromkeys([*quantizable_tensors(defined.network).values(), *defined.graph.residuals.values()]))


@dataclass
class TensorHistograms:
    """One AbsHistogram per tensor name; `add` takes one batch of named arrays (engine or executor)."""

    names: Sequence[str]
    histograms: dict[str, AbsHistogram] = field(default_factory=dict)

    def add(self, outputs: Mapping[str, np.ndarray]) -> None:
        for name in self.names:
            self.histograms.setdefault(name, AbsHistogram()).add(outputs[name])

    def amax(self, method: str, percentile: float = DEFAULT_PERCENTILE) -> dict[str, float]:
        return {name: self.histograms[name].amax(method, percentile) for name in self.names}

    def calibration(self, net_hash: str, method: str, images: ImagesUsed,
                    percentile: float = DEFAULT_PERCENTILE, extra: Mapping | None = None) -> CalibrationFile:
        method = canonical_method(method)
        return CalibrationFile(net_hash, method, self.amax(method, percentile), images,
                               percentile if method == "percentile" else None, dict(extra or {}))


# -- the CPU pass ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CalibrationRun:
    calibration: CalibrationFile
    seconds_per_image: float  # network pass + histograms, per image
    amax_seconds: float  # computing every amax from the histograms
    histograms: TensorHistograms | None = None  # what the amax came from: other methods need no second pass


def calibrate(tensors: Mapping[str, np.ndarray], meta: Mapping, images: str | os.PathLike, *,
              method: str = "entropy", count: int = 256, imgsz: int | None = None,
              percentile: float = DEFAULT_PERCENTILE, device: str = "cpu", batch: int = 1,
              preprocess: Preprocess | None = None) -> CalibrationRun:
    """Calibrate the network of `tensors` + `meta` on up to `count` images of `images` (a folder,
    searched recursively, or a glob). `device`: "gpu" runs an fp32 TensorRT engine of the network
    (trtnet.quant.gpu_calibration); anything else is the torch device the reference executor runs on
    ("cpu"). `preprocess` defaults to the family's inference preprocessing at `imgsz`."""
    from trtnet import networks
    from trtnet.network import default_imgsz

    method = canonical_method(method)
    if count < 1:
        raise TrtnetError(f"--calib-images {count}: must be at least 1")
    size = imgsz or default_imgsz(meta)
    paths, root = find_images(images)
    loader = CalibrationImages(paths, count, preprocess or networks.calibration_preprocess(meta, size),
                               f"--calib {images}")
    if device == "gpu":
        from trtnet.quant.gpu_calibration import engine_pass

        network_pass = engine_pass(tensors, meta, size, batch)
    else:
        network_pass = executor_pass(tensors, meta, size, device)
    with network_pass as (names, infer):
        stats, per_image = collect_histograms(infer, loader, names, batch)
    start = time.perf_counter()
    calib = stats.calibration(network_hash(tensors, meta), method, ImagesUsed.of(loader.used, root), percentile,
                              {"imgsz": size, "device": device})
    return CalibrationRun(calib, per_image, time.perf_counter() - start, stats)


Infer = Callable[[np.ndarray], Mapping[str, np.ndarray]]  # a [N, 3, H, W] batch → tensors by name


def collect_histograms(infer: Infer, loader: CalibrationImages, names: Sequence[str],
                       batch: int = 1) -> tuple[TensorHistograms, float]:
    """Every batch of `loader` through `infer`, the `names` tensors into histograms; and the seconds per image."""
    stats = TensorHistograms(names)
    start = time.perf_counter()
    for x in loader.batches(batch):
        stats.add(infer(x))
    return stats, (time.perf_counter() - start) / len(loader.used)


@contextlib.contextmanager
def executor_pass(tensors: Mapping[str, np.ndarray], meta: Mapping, imgsz: int,
                  device: str = "cpu") -> Iterator[tuple[list[str], Infer]]:
    """(quantizable tensor names, infer) through the fp32 network definition on the reference executor."""
    from trtnet import compat
    from trtnet.executor import run_network
    from trtnet.network import define_network

    builder = compat.trt().Builder(compat.Logger())
    defined = define_network(builder, tensors, meta, precision="fp32", imgsz=imgsz)
    names = calibrated_tensors(defined)
    yield names, lambda x: run_network(defined.network, {defined.input_name: x}, keep=names, device=device)


def quant_plan(calibration: CalibrationFile, keep_float: Iterable[str] = ()) -> QuantPlan:
    """The Q/DQ plan a calibration gives (convolution layers in `keep_float` stay in float)."""
    return QuantPlan(dict(calibration.amax), frozenset(keep_float))
