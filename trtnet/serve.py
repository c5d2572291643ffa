"""`python -m trtnet.serve`: serve engines behind NVIDIA Triton Inference Server through PyTriton.

    python -m trtnet.serve weights/yolov5n.fp16.engine --instances 2 --devices 0,1
    python -m trtnet.serve yolov5n --devices cpu --imgsz 320        # no GPU: weights run with NumPy
    python -m trtnet.serve --bench http://127.0.0.1:8000 --concurrency 1,8,32 --requests 1000
    python -m trtnet.serve weights/yolov5n.fp16.engine --export-repo model_repository

One Triton model per engine (named after its file: yolov5n.fp16), `--instances` model instances per device,
Triton's dynamic batcher in front; HTTP (KServe v2), gRPC, health and Prometheus metrics are Triton's.
PyTriton needs numpy < 2, so the server runs in its own environment (`make serve-env`, README "Serving").

Detection models take `image` (encoded JPEG/PNG/... bytes, [N, 1]) or `pixels` (uint8 BGR, [N, H, W, 3]),
optionally `conf`, `iou` ([N, 1] float32) and `classes` ([N, K] int32), and answer `boxes` [N, max_det, 4]
(x1, y1, x2, y2 in image pixels), `scores`, `classes`, `count` (valid rows), `shape` (image h, w) and `error`
(empty, or why that image got no result: one bad image does not fail the others batched with it).
Classifiers answer `topk_ids` and `topk_scores`. Class names are the model config's `class_names` parameter.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Union

import numpy as np

from trtnet.allocator import keep_freed_memory, with_allocator_env
from trtnet.cli import add_weights_dir, command_parser, run
from trtnet.errors import TrtnetError
from trtnet.interrupts import SIGNALS

Device = Union[int, str]  # a GPU index, or "cpu"
NAMES_PARAMETER = "class_names"
BACKENDS = ("pytriton", "python")  # how Triton reaches the model: PyTriton's proxy, or its own Python backend


@dataclass(frozen=True)
class ServeSettings:
    target: str  # an engine (path or name); with devices ("cpu",) a weights file or name
    devices: tuple[Device, ...] = (0,)
    instances: int = 1
    max_batch: int = 32
    max_queue_delay_us: int = 500
    conf: float = 0.25
    iou: float = 0.45
    max_det: int = 300
    topk: int = 5
    imgsz: int = 640  # the CPU path's network input size (engines have theirs built in)
    host: str = "0.0.0.0"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    weights_dir: str = "weights"
    exit_timeout_s: int = 10  # on SIGINT/SIGTERM, how long Triton lets in-flight requests finish (its own: 30)
    decode: str = "auto"  # encoded images: on the GPU (nvImageCodec) where it can, "gpu" or "cpu" (OpenCV)
    backend: str = "python"  # Triton's Python backend hosts the model (trtnet.serve_triton); or "pytriton"
    cuda_graphs: bool = True  # engine + NMS as CUDA graphs (run P: eager enqueue was a fifth of an instance's time)


def parse_devices(text: str) -> tuple[Device, ...]:
    """`cpu`, or comma-separated GPU indices (`0,1`)."""
    if text.strip().lower() == "cpu":
        return ("cpu",)
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        raise TrtnetError(f"--devices {text!r}: give `cpu` or GPU indices such as 0 or 0,1")
    if len(set(parts)) != len(parts):
        raise TrtnetError(f"--devices {text!r}: a GPU is named twice (use --instances for more per GPU)")
    return tuple(int(p) for p in parts)


def model_name(target: str) -> str:
    """The Triton model name of an engine or weights file: its file name without .engine/.pt/... ."""
    name = Path(target).name
    for suffix in (".engine", ".pt", ".pth", ".wts", ".safetensors"):
        name = name[: -len(suffix)] if name.endswith(suffix) else name
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "model"


# ------------------------------------------------------------------------------------------ runners


def open_runner(settings: ServeSettings, device: Device):
    """A Detector / Classifier on GPU `device`, or a CpuDetector for "cpu"; refuses what cannot run there."""
    s = settings
    if device == "cpu":
        from trtnet.cpu import CpuDetector

        return CpuDetector(s.target, s.conf, s.iou, s.max_det, imgsz=s.imgsz, weights_dir=s.weights_dir)
    from trtnet.api import Classifier, Detector
    from trtnet.engine_files import engine_task

    if engine_task(s.target, s.weights_dir) == "classify":
        return Classifier(s.target, weights_dir=s.weights_dir, device=int(device), cuda_graphs=s.cuda_graphs)
    return Detector(s.target, s.conf, s.iou, s.max_det, weights_dir=s.weights_dir, device=int(device),
                    cuda_graphs=s.cuda_graphs)


def open_runners(settings: ServeSettings, opener: Callable = open_runner) -> list:
    """`instances` runners per device, device by device (each one a Triton model instance)."""
    return [opener(settings, device) for device in settings.devices for _ in range(settings.instances)]


def batch_bound(settings: ServeSettings, runner) -> int:
    """The dynamic batcher's max_batch_size: --max-batch, no more than the engine's batch profile."""
    engine = getattr(runner, "engine", None)
    return min(settings.max_batch, engine.max_batch) if engine is not None else settings.max_batch


def warm_up(runner, max_batch: int) -> None:
    """Capture the calling thread's CUDA graphs for every batch size up to `max_batch`, largest first (buffers are
    sized once), so that no request pays a capture; a no-op without graphs or on the CPU path. Graphs belong to the
    thread that runs the engine (trtnet.engine.Worker): call it from the thread that will serve."""
    engine = getattr(runner, "engine", None)
    if engine is None or not engine.cuda_graphs:
        return
    blank = np.zeros((*engine.imgsz, 3), np.uint8)
    # the batches requests run as: below the profile's smallest they run padded to it (one graph for all of them)
    sizes = sorted({engine.run_as(n) for n in range(1, min(max_batch, engine.max_batch) + 1)}, reverse=True)
    for batch in sizes:
        runner.pipeline.run([blank] * batch)


# ------------------------------------------------------------------------------------------ requests


@dataclass(frozen=True)
class Encoded:
    """An encoded image (JPEG, PNG, ...) of a request: decoded with the rest of its dynamic batch."""

    data: bytes


def request_inputs(request: Any) -> list[np.ndarray | Encoded | TrtnetError]:
    """The images of one request (a mapping of input name → array with the batch first), still encoded where
    they came encoded, or the error of each one that cannot be used."""
    if "image" in request:
        rows = np.asarray(request["image"]).reshape(len(request["image"]), -1)
        return [Encoded(row[0] if isinstance(row[0], bytes) else bytes(row[0])) for row in rows]
    if "pixels" in request:
        pixels = np.asarray(request["pixels"])
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[3] != 3 or 0 in pixels.shape:
            error = TrtnetError(f"pixels {pixels.dtype} {list(pixels.shape)}: send uint8 [N, H, W, 3] BGR")
            return [error] * max(len(pixels), 1)
        return list(pixels)
    return [TrtnetError("the request has neither `image` (encoded bytes) nor `pixels` (uint8 HxWx3)")]


def instance_decoder(runner, settings: ServeSettings):
    """The `FileDecoder` of one model instance: JPEGs on its GPU (nvImageCodec) where --decode allows and the
    runner takes device images, OpenCV on the decode threads otherwise."""
    from trtnet.image_decoding import FileDecoder

    if not hasattr(runner, "detect_decoded"):
        return FileDecoder("cpu")
    return FileDecoder(settings.decode, device=runner.engine.device_index)


def decode_inputs(decoder, inputs: Sequence) -> tuple[list, Any]:
    """`inputs` with every Encoded one decoded (one decoder batch: JPEGs on the GPU, the rest with OpenCV on
    threads) or replaced by its error; and the event after which the GPU-decoded ones are complete."""
    encoded = [i for i, x in enumerate(inputs) if isinstance(x, Encoded)]
    if not encoded:
        return list(inputs), None
    batch = decoder.decode_bytes([inputs[i].data for i in encoded], [f"image {i}" for i in encoded])
    images = list(inputs)
    for i, file in zip(encoded, batch.files):
        images[i] = file.image if file.image is not None else TrtnetError(
            f"image of {len(inputs[i].data)} bytes: {file.error}")
    return images, batch.ready


@dataclass(frozen=True)
class Overrides:
    """One image's request options: they narrow the server's settings (conf above --conf, iou below --iou)."""

    conf: float | None = None
    iou: float | None = None
    classes: tuple[int, ...] | None = None


def request_overrides(request: Any, count: int) -> list[Overrides]:
    def column(name: str) -> list:
        if name not in request:
            return [None] * count
        values = np.asarray(request[name]).reshape(count, -1)
        return [tuple(int(v) for v in row) if name == "classes" else float(row[0]) for row in values]

    return [Overrides(c, i, k) for c, i, k in zip(column("conf"), column("iou"), column("classes"))]


def narrowed(detections, options: Overrides):
    """The detections that the request's own conf, iou and classes keep."""
    from trtnet.plugins.official import MAX_WH, greedy_nms

    if options.conf is not None:
        detections = detections[detections.scores >= options.conf]
    if options.classes is not None:
        detections = detections.of_classes(options.classes)
    if options.iou is not None and len(detections):
        order = np.argsort(-detections.scores, kind="stable")
        detections = detections[order]
        offset = detections.classes[:, None].astype(np.float32) * np.float32(MAX_WH)
        detections = detections[greedy_nms(detections.boxes + offset, options.iou)]
    return detections


# ------------------------------------------------------------------------------------------ responses


def detection_outputs(results: Sequence, max_det: int) -> dict[str, np.ndarray]:
    """Padded output arrays for a list of `Detections` or errors (one per image)."""
    n = len(results)
    out = {
        "boxes": np.zeros((n, max_det, 4), np.float32), "scores": np.zeros((n, max_det), np.float32),
        "classes": np.full((n, max_det), -1, np.int32), "count": np.zeros((n, 1), np.int32),
        "shape": np.zeros((n, 2), np.int32), "error": np.full((n, 1), b"", dtype=object),
    }
    for i, result in enumerate(results):
        if isinstance(result, Exception):
            out["error"][i, 0] = str(result).encode()
            continue
        k = min(len(result), max_det)
        out["boxes"][i, :k], out["scores"][i, :k] = result.boxes[:k], result.scores[:k]
        out["classes"][i, :k], out["count"][i, 0] = result.classes[:k], k
        out["shape"][i] = result.shape
    return out


def classification_outputs(results: Sequence, topk: int) -> dict[str, np.ndarray]:
    n = len(results)
    out = {"topk_ids": np.full((n, topk), -1, np.int32), "topk_scores": np.zeros((n, topk), np.float32),
           "error": np.full((n, 1), b"", dtype=object)}
    for i, result in enumerate(results):
        if isinstance(result, Exception):
            out["error"][i, 0] = str(result).encode()
            continue
        k = min(len(result.classes), topk)
        out["topk_ids"][i, :k], out["topk_scores"][i, :k] = result.classes[:k], result.scores[:k]
    return out


def split_rows(outputs: dict[str, np.ndarray], counts: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """Per-request slices of the arrays of all images of a batch."""
    starts = np.cumsum([0, *counts])
    return [{k: v[a:b] for k, v in outputs.items()} for a, b in zip(starts[:-1], starts[1:])]


def run_inputs(runner, decoder, inputs: Sequence, settings: ServeSettings) -> list:
    """Results (or errors), one per input of a dynamic batch: the encoded ones decoded together, then every
    good image in one call to the runner (pixels decoded on the GPU stay there)."""
    images, ready = decode_inputs(decoder, inputs)
    good = [i for i, x in enumerate(images) if not isinstance(x, Exception)]
    results = list(images)
    if not good:
        return results
    from trtnet.api import to_bgr
    from trtnet.image_decoding import DecodedBatch, DecodedFile, DecoderChoice, DeviceImage

    try:
        loaded = [images[i] if isinstance(images[i], DeviceImage) else to_bgr(images[i]) for i in good]
        if hasattr(runner, "detect_decoded"):
            files = [DecodedFile(f"image {i}", DecoderChoice("cpu", ""), image) for i, image in zip(good, loaded)]
            done = runner.detect_decoded(DecodedBatch(files, ready))
        elif hasattr(runner, "detect_loaded"):
            done = runner.detect_loaded(loaded)
        else:
            done = runner.classify(loaded, settings.topk)
    except TrtnetError as exc:  # one error for the images of this call; the server keeps serving
        done = [exc] * len(good)
    for i, result in zip(good, done):
        results[i] = result
    return results


@dataclass
class InstanceTime:
    """What one model instance's own work took (decode, detect, outputs): against Triton's `compute_infer`,
    which for PyTriton also holds moving requests into this process and responses back (run N: 7.75 ms per
    batch-1 execution where this was 2.03), per images in an execution as Triton's `batch_stats` count them."""

    by_batch: dict = field(default_factory=dict)  # images per execution → [executions, seconds]

    def add(self, images: int, seconds: float) -> None:
        entry = self.by_batch.setdefault(images, [0, 0.0])
        entry[0] += 1
        entry[1] += seconds

    @property
    def executions(self) -> int:
        return sum(count for count, _ in self.by_batch.values())

    @property
    def images(self) -> int:
        return sum(n * count for n, (count, _) in self.by_batch.items())

    @property
    def seconds(self) -> float:
        return sum(seconds for _, seconds in self.by_batch.values())

    def summary(self, instance: int | str, most: int = 6) -> str:
        per = 1000.0 * self.seconds / max(self.executions, 1)
        common = sorted(self.by_batch.items(), key=lambda kv: -kv[1][0])[:most]
        by_batch = ", ".join(f"{n}: {1000.0 * s / c:.2f} ms ({c})" for n, (c, s) in sorted(common))
        return (f"instance {instance}: {self.executions} executions, {self.images} images, own time {per:.2f} ms "
                f"per execution (Triton's compute_infer adds what carries requests to it and back); by images per "
                f"execution: {by_batch}")


def infer_function(runner, settings: ServeSettings, instance: int | str = 0) -> Callable[[list], list[dict]]:
    """The PyTriton callable of one model instance: a dynamic batch of requests in, one dict per request out.
    Its `close()` frees the decoder and prints the instance's own time."""
    detect = hasattr(runner, "detect_loaded") or hasattr(runner, "detect_decoded")
    decoder = instance_decoder(runner, settings)
    own = InstanceTime()

    def outputs(requests: list, images: list) -> list[dict]:
        per_request = [request_inputs(r) for r in requests]
        images.extend(x for xs in per_request for x in xs)
        results = run_inputs(runner, decoder, images, settings)
        if not detect:
            return split_rows(classification_outputs(results, settings.topk), [len(x) for x in per_request])
        options = [o for r, xs in zip(requests, per_request) for o in request_overrides(r, len(xs))]
        results = [r if isinstance(r, Exception) else narrowed(r, o) for r, o in zip(results, options)]
        return split_rows(detection_outputs(results, settings.max_det), [len(x) for x in per_request])

    def infer(requests: list) -> list[dict]:
        start, images = time.perf_counter(), []
        try:
            return outputs(requests, images)
        finally:
            own.add(len(images), time.perf_counter() - start)

    def close() -> None:
        decoder.close()  # before the runner's: images decoded on its GPU are freed while it is there
        if own.executions:
            print(own.summary(instance), flush=True)

    infer.close = close
    return infer


# ------------------------------------------------------------------------------------------ Triton


def tensors(detect: bool, settings: ServeSettings) -> tuple[list, list]:
    from pytriton.model_config import Tensor

    inputs = [Tensor(name="image", dtype=bytes, shape=(1,), optional=True),
              Tensor(name="pixels", dtype=np.uint8, shape=(-1, -1, 3), optional=True)]
    if not detect:
        return inputs, [Tensor(name="topk_ids", dtype=np.int32, shape=(settings.topk,)),
                        Tensor(name="topk_scores", dtype=np.float32, shape=(settings.topk,)),
                        Tensor(name="error", dtype=bytes, shape=(1,))]
    inputs += [Tensor(name="conf", dtype=np.float32, shape=(1,), optional=True),
               Tensor(name="iou", dtype=np.float32, shape=(1,), optional=True),
               Tensor(name="classes", dtype=np.int32, shape=(-1,), optional=True)]
    m = settings.max_det
    return inputs, [Tensor(name="boxes", dtype=np.float32, shape=(m, 4)),
                    Tensor(name="scores", dtype=np.float32, shape=(m,)),
                    Tensor(name="classes", dtype=np.int32, shape=(m,)),
                    Tensor(name="count", dtype=np.int32, shape=(1,)),
                    Tensor(name="shape", dtype=np.int32, shape=(2,)),
                    Tensor(name="error", dtype=bytes, shape=(1,))]


def triton_config(settings: ServeSettings):
    from pytriton.triton import TritonConfig

    gpu = settings.devices != ("cpu",)
    return TritonConfig(http_address=settings.host, http_port=settings.http_port, grpc_address=settings.host,
                        grpc_port=settings.grpc_port, metrics_address=settings.host,
                        metrics_port=settings.metrics_port, allow_gpu_metrics=gpu,
                        exit_timeout_secs=settings.exit_timeout_s)


def security_config():
    """PyTriton restricts some endpoints to a random token by default; statistics (read-only: what the
    batcher did, per model) stay open for monitoring and `--bench`; loading/unloading models stays closed."""
    from pytriton.triton import TritonSecurityConfig

    return TritonSecurityConfig(restricted_endpoints=["shared-memory", "model-repository", "trace", "logging"])


def publish_names(triton, name: str, names: Sequence[str]) -> None:
    """Class names as the model config parameter `class_names` (JSON list). PyTriton has no public hook for
    config parameters: this adds one to the backend parameters of the config it generates (pytriton 0.7)."""
    for model in triton._model_manager.models:
        if model.model_name == name:
            config = model._get_triton_model_config()
            config.backend_parameters[NAMES_PARAMETER] = json.dumps([str(n) for n in names])


def use_this_libpython() -> None:
    """Triton's Python-backend stub links `libpython3.X.so` from the loader path: on pyenv/conda interpreters
    that is the system's, another patch release than our stdlib (the stub then fails on import). Put our
    interpreter's own library first for the processes PyTriton starts."""
    import sysconfig

    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and sysconfig.get_config_var("Py_ENABLE_SHARED") and Path(libdir).is_dir():
        paths = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *(p for p in paths if p != libdir)])


def serve(settings: ServeSettings, opener: Callable = open_runner,
          started: Callable[[], None] | None = None) -> None:
    """Load every instance (refusing what cannot run), start Triton, serve until SIGINT/SIGTERM."""
    if settings.backend == "python":
        from trtnet.serve_triton import serve_on_triton

        return serve_on_triton(settings, started)
    try:
        from pytriton.model_config import DynamicBatcher, ModelConfig
        from pytriton.triton import Triton
    except ImportError as exc:
        raise TrtnetError(f"trtnet.serve needs PyTriton ({exc}): make serve-env, then run it with "
                          ".venv-serve/bin/python -m trtnet.serve") from None
    runners = open_runners(settings, opener)
    use_this_libpython()
    keep_freed_memory()  # this process handles every request's tensors (PyTriton's proxy)
    os.environ.update(with_allocator_env(os.environ))  # and Triton, which PyTriton starts from it
    name, first = model_name(settings.target), runners[0]
    inputs, outputs = tensors(hasattr(first, "detect_loaded"), settings)
    batcher = DynamicBatcher(max_queue_delay_microseconds=settings.max_queue_delay_us)
    config = ModelConfig(max_batch_size=batch_bound(settings, first), batcher=batcher)
    triton = Triton(config=triton_config(settings), security_config=security_config())
    infers: list = []
    try:
        infers = [infer_function(r, settings, i) for i, r in enumerate(runners)]
        triton.bind(model_name=name, infer_func=infers, inputs=inputs, outputs=outputs, config=config, strict=True)
        publish_names(triton, name, first.names)  # before run(): the config is written when the model loads
        triton.run()
        print(f"serving {name} ({len(runners)} instance(s) on {','.join(map(str, settings.devices))}): "
              f"http {settings.host}:{settings.http_port}, grpc {settings.host}:{settings.grpc_port}, "
              f"metrics {settings.host}:{settings.metrics_port}", flush=True)
        if started is not None:
            started()
        until_stopped(triton)
    finally:
        triton.stop()
        for infer in infers:
            infer.close()
        for runner in runners:
            runner.close()


def until_stopped(triton, period_s: float = 1.0) -> None:
    """Serve until SIGINT or SIGTERM (how Kubernetes stops a pod) arrives, or Triton dies; then the caller stops
    Triton and closes the runners. Our own handlers rather than PyTriton's `serve()`: there SIGTERM ended the
    process without either, and one SIGINT went unanswered for a minute (a CI run here)."""
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in SIGNALS}
    try:
        while not stop.wait(period_s) and triton.is_alive():
            pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# ------------------------------------------------------------------------------------------ bench


@dataclass(frozen=True)
class BenchResult:
    concurrency: int
    requests: int
    errors: int
    seconds: float
    latencies_ms: tuple[float, ...]

    @property
    def throughput(self) -> float:
        return (self.requests - self.errors) / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def row(self) -> str:
        return (f"{self.concurrency:>11} {self.requests:>8} {self.throughput:>10.1f} {self.percentile(50):>8.1f} "
                f"{self.percentile(99):>8.1f} {self.errors:>6}")


BENCH_HEADER = f"{'concurrency':>11} {'requests':>8} {'images/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}"
COMPUTE = ("compute_input", "compute_infer", "compute_output")


@dataclass(frozen=True)
class ServerStats:
    """What Triton's statistics (/v2/models/NAME/stats) counted between two readings: executions, the dynamic
    batcher's mean batch, the mean queue time per request, and the mean times per execution of copying requests
    into the model (input), running it (infer) and copying responses out (output): what to weigh when choosing
    --instances and --max-queue-delay-us."""

    executions: int
    mean_batch: float
    queue_ms: float
    per_execution_ms: tuple[float, float, float]  # input, infer, output

    def row(self) -> str:
        i, n, o = self.per_execution_ms
        return (f"{'':>11} server: {self.executions} executions, mean batch {self.mean_batch:.2f}, queue "
                f"{self.queue_ms:.2f} ms a request; per execution input {i:.2f}, infer {n:.2f}, output {o:.2f} ms")


def _model_stats(stats: dict) -> dict:
    return stats["model_stats"][0] if stats.get("model_stats") else {}


def _ns(entry: dict, key: str) -> tuple[int, int]:
    """(count, ns) of one duration statistic; gRPC's JSON form gives int64s as strings, and omits zeros."""
    value = entry.get(key, {})
    return int(value.get("count", 0)), int(value.get("ns", 0))


def server_stats(before: dict, after: dict) -> ServerStats | None:
    """The difference of two readings of one model's statistics (`Client.statistics(model)`); None when no
    execution happened between them."""
    old, new = _model_stats(before), _model_stats(after)
    executions = int(new.get("execution_count", 0)) - int(old.get("execution_count", 0))
    requests = int(new.get("inference_count", 0)) - int(old.get("inference_count", 0))
    if executions <= 0:
        return None

    def batch_totals(model: dict) -> list[tuple[int, int]]:
        totals = [(0, 0)] * len(COMPUTE)
        for batch in model.get("batch_stats", []):
            totals = [(c + bc, n + bn) for (c, n), (bc, bn) in zip(totals, (_ns(batch, k) for k in COMPUTE))]
        return totals

    per_execution = tuple((n1 - n0) / max(c1 - c0, 1) / 1e6
                          for (c0, n0), (c1, n1) in zip(batch_totals(old), batch_totals(new)))
    queued = [_ns(m.get("inference_stats", {}), "queue") for m in (old, new)]
    queue_ms = (queued[1][1] - queued[0][1]) / max(queued[1][0] - queued[0][0], 1) / 1e6
    return ServerStats(executions, requests / executions, queue_ms, per_execution)


@dataclass(frozen=True)
class BenchPart:
    """What one process's clients measured: latencies of the answered requests, errors, and when they ran
    (time.perf_counter, one clock for every process of the machine)."""

    latencies_ms: tuple[float, ...]
    errors: int
    start: float
    end: float


def bench(url: str, images: Sequence[str | np.ndarray], concurrency: int, requests: int,
          model: str | None = None, processes: int = 1) -> BenchResult:
    """`requests` single-image detections spread over `concurrency` clients, a thread each, the threads spread
    over `processes` processes: one Python process's GIL caps how fast it can send and read requests, and a
    benchmark capped by its own client measures the client."""
    processes = max(1, min(processes, concurrency, requests))
    if processes == 1:
        parts = [run_clients(url, images, concurrency, requests, model)]
    else:
        parts = clients_in_processes(url, images, concurrency, requests, model, processes)
    seconds = max(p.end for p in parts) - min(p.start for p in parts)
    return BenchResult(concurrency, requests, sum(p.errors for p in parts), seconds,
                       tuple(ms for p in parts for ms in p.latencies_ms))


def preloaded(images: Sequence) -> list:
    """The image files among `images` read once, as encoded bytes (each request sends the same; reading the file
    per request timed the clients' reads too); anything else, a missing file included, as given."""
    return [Path(x).read_bytes() if isinstance(x, (str, os.PathLike)) and os.path.isfile(x) else x for x in images]


def run_clients(url: str, images: Sequence[str | np.ndarray], clients: int, requests: int, model: str | None,
                ready: Callable[[], None] | None = None) -> BenchPart:
    """`requests` detections over `clients` threads of this process, each with a Client of its own (tritonclient's
    HTTP client belongs to the thread that made it); the clock starts once all are connected (and `ready` has
    returned: the other processes are connected too). A request that fails in any way counts as an error."""
    images = preloaded(images)
    keep_freed_memory()  # the clients' own per-request cost down, as the server's (trtnet.allocator)
    latencies: list[float] = []
    errors, failed_to_connect = [0], []
    lock = threading.Lock()
    counter = iter(range(requests))
    connected, go, cancelled = threading.Barrier(clients + 1), threading.Event(), threading.Event()

    def worker() -> None:
        from trtnet.client import Client

        try:
            client = Client(url, model=model)
        except BaseException as exc:
            failed_to_connect.append(exc)
            connected.abort()
            return
        with client, contextlib.suppress(threading.BrokenBarrierError):  # another client could not connect
            connected.wait()
            go.wait()
            if cancelled.is_set():
                return
            for i in iter(lambda: next(counter, None), None):
                start = time.perf_counter()
                try:
                    client.detect(images[i % len(images)])
                except Exception:
                    with lock:
                        errors[0] += 1
                    continue
                with lock:
                    latencies.append((time.perf_counter() - start) * 1e3)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    try:
        connected.wait()
        if ready is not None:
            ready()
    except BaseException:
        cancelled.set()
        go.set()
        if failed_to_connect:
            raise TrtnetError(f"--bench: a client could not connect: {failed_to_connect[0]}") from None
        raise
    start = time.perf_counter()
    go.set()
    for t in threads:
        t.join()
    return BenchPart(tuple(latencies), errors[0], start, time.perf_counter())


def shares(total: int, parts: int) -> list[int]:
    """`total` split into `parts` near-equal whole shares."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def clients_in_processes(url: str, images: Sequence[str | np.ndarray], concurrency: int, requests: int,
                         model: str | None, processes: int) -> list[BenchPart]:
    """`run_clients` in `processes` processes of their own, started together once every client is connected."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads and sockets
    connected, results = ctx.Barrier(processes + 1), ctx.Queue()
    workers = [ctx.Process(target=_client_process, args=(url, images, c, r, model, connected, results), daemon=True)
               for c, r in zip(shares(concurrency, processes), shares(requests, processes))]
    for w in workers:
        w.start()
    with contextlib.suppress(threading.BrokenBarrierError):  # a process failed: its error is on the queue
        connected.wait(timeout=120)
    try:
        answers = [results.get(timeout=3600) for _ in workers]
    finally:
        for w in workers:
            w.join(timeout=10)
    failed = [a for a in answers if isinstance(a, str)]
    if failed:
        raise TrtnetError(f"--bench: {failed[0]}")
    return answers


def _client_process(url, images, clients, requests, model, connected, results) -> None:
    try:
        results.put(run_clients(url, images, clients, requests, model, ready=lambda: connected.wait(timeout=120)))
    except BaseException as exc:  # the parent must hear of it rather than wait
        connected.abort()
        message = str(exc) if isinstance(exc, TrtnetError) else f"{type(exc).__name__}: {exc}"
        results.put(message.replace("--bench: ", "", 1))


def run_bench(args) -> None:
    images = args.images or [str(p) for p in sorted(Path(args.bench_images).glob("*.jpg"))]
    if not images:
        raise TrtnetError(f"--bench: no images (--images, or *.jpg in {args.bench_images})")
    if args.bench_processes < 0:
        raise TrtnetError(f"--bench-processes {args.bench_processes}: give 0 (a quarter of the cores) or more")
    print(BENCH_HEADER)
    processes = args.bench_processes or max(1, (os.cpu_count() or 1) // 4)  # the rest for the server beside it
    from trtnet.client import Client

    with Client(args.bench, model=args.model) as client:  # Triton's statistics around each concurrency
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            before = client.statistics(client.model)
            print(bench(args.bench, images, concurrency, args.requests, client.model, processes).row(), flush=True)
            counted = server_stats(before, client.statistics(client.model))
            if counted is not None:
                print(counted.row(), flush=True)


# ------------------------------------------------------------------------------------------ CLI


def parser():
    p = command_parser("serve", "serve engines (or, with --devices cpu, weights) on Triton through PyTriton")
    p.add_argument("target", nargs="?", help="engine path or name; with --devices cpu a weights file or name")
    p.add_argument("--http-port", type=int, default=8000, help="Triton HTTP/REST (KServe v2) port")
    p.add_argument("--grpc-port", type=int, default=8001, help="Triton gRPC port")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (127.0.0.1: this machine only)")
    p.add_argument("--instances", type=int, default=1, help="model instances per device")
    p.add_argument("--devices", default="0", help="GPU indices (0,1,...) or cpu")
    p.add_argument("--max-batch", type=int, default=32, help="dynamic batcher's largest batch (≤ the engine's)")
    p.add_argument("--max-queue-delay-us", type=int, default=500, help="how long the batcher waits to fill")
    p.add_argument("--conf", type=float, default=0.25, help="NMS confidence threshold (requests may raise it)")
    p.add_argument("--iou", type=float, default=0.45, help="NMS IoU threshold (requests may lower it)")
    p.add_argument("--max-det", type=int, default=300, help="detections per image (outputs are padded to it)")
    p.add_argument("--topk", type=int, default=5, help="classifiers: classes per image")
    p.add_argument("--imgsz", type=int, default=640, help="--devices cpu: network input size")
    p.add_argument("--decode", choices=("auto", "gpu", "cpu"), default="auto",
                   help="encoded images: JPEGs on the GPU with nvImageCodec where available (auto), always (gpu), "
                        "or OpenCV on the CPU")
    p.add_argument("--backend", choices=BACKENDS, default="python",
                   help="python: Triton's own Python backend hosts the model in Triton's processes (run O: 2.7-3.6x "
                        "PyTriton's throughput); pytriton: PyTriton binds it in this process, a proxy between")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="run the engine eagerly (default: engine and NMS as CUDA graphs, one per batch size and "
                        "input shape; run P: TensorRT 8.5's eager enqueue took a fifth of a serving instance's time)")
    p.add_argument("--exit-timeout", type=int, default=10, metavar="SECONDS",
                   help="on Ctrl-C/SIGTERM, how long requests in flight may take to finish")
    add_weights_dir(p, "where names are looked up")
    p.add_argument("--export-repo", metavar="DIR", help="write a Triton model repository for the engine and exit")
    p.add_argument("--bench", metavar="URL", help="drive a running server: throughput and latency")
    p.add_argument("--concurrency", default="1,8,32", help="--bench: concurrent clients, comma-separated")
    p.add_argument("--requests", type=int, default=1000, help="--bench: requests per concurrency")
    p.add_argument("--bench-processes", type=int, default=0, metavar="N",
                   help="--bench: client processes the concurrency is spread over (0: a quarter of the cores)")
    p.add_argument("--model", help="--bench: model name (default: the server's only model)")
    p.add_argument("--images", nargs="+", help="--bench: image files to send")
    p.add_argument("--bench-images", default="../shared/data/images", help="--bench: folder of *.jpg otherwise")
    return p


def settings_from(args) -> ServeSettings:
    if not args.target:
        raise TrtnetError("give an engine (or, with --devices cpu, weights) to serve, or --bench URL")
    for option in ("instances", "max_batch", "max_det", "topk"):
        if getattr(args, option) < 1:
            raise TrtnetError(f"--{option.replace('_', '-')} {getattr(args, option)}: must be at least 1")
    if args.exit_timeout < 0:
        raise TrtnetError(f"--exit-timeout {args.exit_timeout}: must be 0 or more seconds")
    devices = parse_devices(args.devices)
    if args.decode == "gpu" and "cpu" in devices:
        raise TrtnetError("--decode gpu decodes on a GPU; --devices cpu has none (use --decode auto or cpu)")
    return ServeSettings(args.target, devices, args.instances, args.max_batch,
                         args.max_queue_delay_us, args.conf, args.iou, args.max_det, args.topk, args.imgsz,
                         args.host, args.http_port, args.grpc_port, args.metrics_port, args.weights_dir,
                         args.exit_timeout, args.decode, args.backend, args.cuda_graphs)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.bench:
        run_bench(args)
        return 0
    settings = settings_from(args)
    if args.export_repo:
        if settings.devices == ("cpu",):
            raise TrtnetError("--export-repo exports an engine; --devices cpu models are served from here "
                              "(--backend pytriton or python)")
        from trtnet.serve_triton import export_repo

        print(f"wrote {export_repo(replace(settings), args.export_repo)}")
        return 0
    serve(settings)
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    return run(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
