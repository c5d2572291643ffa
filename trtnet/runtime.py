"""Run trtnet engines: load an engine and its metadata, check it can run here, execute it by tensor name.

    engine = Engine("weights/yolov5n.fp16.engine")      # or just "yolov5n"
    outputs = engine.infer(x)                          # host arrays in, host arrays out

- Before deserializing, the sidecar metadata is checked against this TensorRT (flavour and version) and
  this GPU (compute capability, memory): a mismatch is a TrtnetError that says how to rebuild.
- Name-based I/O (`set_input_shape`, `set_tensor_address`, `execute_async_v3`: TensorRT >= 8.5).
- A batch larger than the engine's profile is split; one smaller than its minimum is padded.
- One execution context, stream and set of buffers per thread: one Engine serves many threads.
- Optional CUDA graphs: the engine (and the work queued right after it, e.g. decode + NMS) is captured
  once per batch size and replayed; where capture fails it runs eagerly, with one warning.

`DetectPipeline` and `ClassifyPipeline` put the GPU pre- and post-processing around the engine;
`DetectPipeline.stream` keeps the next batch's upload and work queued while the GPU runs the previous one.
"""

from __future__ import annotations

import functools
import json
import os
import re
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trtnet import compat, cuda_rt
from trtnet.errors import TrtnetError
from trtnet.plugins.postprocess import NmsSettings
from trtnet.sidecar import PARTNER_KEY, check_partner, find_engine_sidecar

REQUIRED_KEYS = ("family", "imgsz", "batch", "input", "outputs", "tensorrt")


class FallbackWarning(UserWarning):
    """Something runs differently than asked (e.g. CUDA graphs fell back to eager execution)."""


# ----------------------------------------------------------------------------------------- finding engines


def resolve_engine(engine: str | Path, weights_dir: str | Path = "weights") -> Path:
    """An engine path, or a model name: `yolov5n` → weights/yolov5n.fp16.engine, else .fp32.engine."""
    path = Path(engine)
    if path.suffix == ".engine" or path.parent != Path("."):
        if not path.is_file():
            raise TrtnetError(f"{path}: no such engine file (build one with python -m trtnet.build)")
        return path
    for precision in ("fp16", "fp32"):
        candidate = Path(weights_dir) / f"{engine}.{precision}.engine"
        if candidate.is_file():
            return candidate
    raise TrtnetError(
        f"no engine named {engine!r} in {weights_dir}/ ({engine}.fp16.engine or {engine}.fp32.engine): "
        f"build one with python -m trtnet.build {engine} --fp16, or pass the engine's path"
    )


def load_metadata(engine_path: Path) -> dict:
    """The metadata trtnet.build wrote beside the engine (`<name>.engine.json`; older builds: `<name>.json`),
    refused when it describes another engine file than this one."""
    path = find_engine_sidecar(engine_path)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrtnetError(
            f"{path} is missing: trtnet needs the metadata that python -m trtnet.build writes beside the "
            "engine (family, input size, class names, TensorRT version); rebuild the engine with trtnet"
        ) from None
    except (OSError, ValueError) as exc:
        raise TrtnetError(f"cannot read {path}: {exc}; rebuild the engine with python -m trtnet.build") from exc
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise TrtnetError(f"{path} lacks {', '.join(missing)}: written by another trtnet version? Rebuild the engine")
    check_partner(path, meta, Path(engine_path), remedy=f"rebuild the engine: {rebuild_hint(meta)}")
    meta.pop(PARTNER_KEY, None)  # a fact about this pair of files, not about the engine
    return meta


def rebuild_hint(meta: Mapping) -> str:
    stem = Path(str(meta.get("weights", "MODEL"))).stem
    return f"python -m trtnet.build {stem} --{meta.get('precision', 'fp32')}"


def _release(version: str) -> tuple[int, ...]:
    """major.minor.patch: TensorRT engines run only on the release they were built with."""
    return tuple(int(p) for p in re.findall(r"\d+", str(version))[:3])


def check_tensorrt(meta: Mapping, flavour: compat.Flavour) -> None:
    """Raise a TrtnetError saying how to rebuild when the engine was built by another TensorRT."""
    built = meta["tensorrt"]
    if built.get("flavour") != flavour.name or _release(built.get("version", "")) != _release(flavour.version):
        raise TrtnetError(
            f"the engine was built with {built.get('flavour')} {built.get('version')}; this is {flavour}: "
            f"engines run only on the TensorRT they were built with. Rebuild it here: {rebuild_hint(meta)}"
        )


def check_device(meta: Mapping, flavour: compat.Flavour, device: Mapping) -> None:
    """Raise a TrtnetError saying what to do when the engine does not fit this GPU."""
    cc = device.get("compute_capability")
    if flavour.engines_name_their_gpus:
        targets = list(meta.get("target_cc") or [])
        if targets and cc not in targets:
            raise TrtnetError(
                f"the engine was built for compute capabilities {', '.join(targets)}; this GPU "
                f"({device.get('name')}) is {cc}. Rebuild with --target-cc {cc} (or without --target-cc)"
            )
    else:
        built_on = meta.get("device") or {}
        if built_on.get("compute_capability") and built_on["compute_capability"] != cc:
            raise TrtnetError(
                f"the engine was built on {built_on.get('name')} (compute capability "
                f"{built_on['compute_capability']}); this GPU is {device.get('name')} ({cc}). "
                f"Rebuild it on this GPU: {rebuild_hint(meta)}"
            )
    needed = int(meta.get("engine_bytes") or 0)
    free = device.get("free_bytes")
    if free is not None and needed > free:
        raise TrtnetError(
            f"the engine needs {needed / 1e6:.0f} MB of GPU memory for its weights alone; {device.get('name')} "
            f"has {free / 1e6:.0f} MB free. Free GPU memory or build a smaller model"
        )


def read_plan(path: Path, meta: Mapping) -> bytes:
    """The serialized engine, refused before TensorRT reads it when its size is not the one built."""
    plan = path.read_bytes()
    built = int(meta.get("engine_bytes") or 0)
    if built and len(plan) != built:
        raise TrtnetError(f"{path} has {len(plan)} bytes, its metadata says {built}: the file is truncated or "
                          f"was replaced; rebuild it: {rebuild_hint(meta)}")
    return plan


def require_gpu(what: str) -> None:
    reason = cuda_rt.gpu_unavailable_reason()
    if reason:
        raise TrtnetError(f"cannot run {what}: {reason}. Engines run on an NVIDIA GPU (building does not need one)")


# ----------------------------------------------------------------------------------------- batches


def split_batch(count: int, smallest: int, largest: int) -> list[tuple[int, int, int]]:
    """Chunks (start, count, run_as) covering `count` items with engine batches in [smallest, largest].

    A chunk below `smallest` runs padded to `smallest` (the padding rows are ignored).
    """
    chunks = []
    for start in range(0, count, largest):
        n = min(largest, count - start)
        chunks.append((start, n, max(n, smallest)))
    return chunks


# ----------------------------------------------------------------------------------------- the engine


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: np.dtype
    shape: tuple  # as built: -1 for the dynamic batch

    def nbytes(self, shape: Sequence[int]) -> int:
        return int(np.prod(shape, dtype=np.int64)) * self.dtype.itemsize


def numpy_dtype(trt_dtype: Any) -> np.dtype:
    t = compat.trt()
    table = {t.float32: np.float32, t.float16: np.float16, t.int32: np.int32, t.int8: np.int8, t.bool: np.bool_}
    if trt_dtype not in table:
        raise TrtnetError(f"unsupported engine I/O type {trt_dtype}: trtnet engines use float32/float16/int32")
    return np.dtype(table[trt_dtype])


def io_specs(trt_engine: Any) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
    t = compat.trt()
    inputs, outputs = {}, {}
    for i in range(trt_engine.num_io_tensors):
        name = trt_engine.get_tensor_name(i)
        dtype = numpy_dtype(trt_engine.get_tensor_dtype(name))
        spec = TensorSpec(name, dtype, tuple(trt_engine.get_tensor_shape(name)))
        (inputs if trt_engine.get_tensor_mode(name) == t.TensorIOMode.INPUT else outputs)[name] = spec
    return inputs, outputs


class Engine:
    """A deserialized engine with its metadata; `worker()` is this thread's execution context."""

    def __init__(self, engine: str | Path, *, weights_dir: str | Path = "weights", cuda_graphs: bool = False):
        self.path = resolve_engine(engine, weights_dir)
        self.meta = load_metadata(self.path)
        check_tensorrt(self.meta, compat.flavour())
        require_gpu(self.path.name)
        self.device = cuda_rt.device_properties()
        check_device(self.meta, compat.flavour(), self.device)
        if (self.meta.get("postprocess") or {}).get("mode") == "plugin":
            _register_yolo_plugin()
        self._runtime, self.trt_engine = compat.deserialize(read_plan(self.path, self.meta))
        self.inputs, self.outputs = io_specs(self.trt_engine)
        batch = self.meta["batch"]
        self.min_batch, self.opt_batch, self.max_batch = int(batch["min"]), int(batch["opt"]), int(batch["max"])
        self.cuda_graphs = cuda_graphs
        self._local = threading.local()
        self._workers: list[Worker] = []
        self._lock = threading.Lock()
        self._turn = threading.RLock()  # one thread at a time on a dynamic-shape engine's context
        self._worker: Worker | None = None
        self.closed = False

    @property
    def family(self) -> str:
        return self.meta["family"]

    @property
    def input_name(self) -> str:
        return self.meta["input"]["name"]

    @property
    def imgsz(self) -> tuple[int, int]:
        h, w = self.meta["imgsz"]
        return int(h), int(w)

    @property
    def size_range(self) -> tuple[int, int] | None:
        """(smallest, largest) input side of an engine built with a dynamic size, else None."""
        lo = self.meta.get("min_imgsz")
        return None if lo is None else (int(lo), int(self.meta.get("max_imgsz") or max(self.imgsz)))

    def check_size(self, hw: tuple[int, int]) -> None:
        span = self.size_range
        if span is None and tuple(hw) != self.imgsz:
            raise TrtnetError(f"{self.path.name} takes {self.imgsz[0]}x{self.imgsz[1]} inputs only, not "
                              f"{hw[0]}x{hw[1]}: rebuild with --min-imgsz/--max-imgsz for other sizes")
        if span is not None and not all(span[0] <= side <= span[1] for side in hw):
            raise TrtnetError(f"input size {hw[0]}x{hw[1]} lies outside {self.path.name}'s range {span[0]}.."
                              f"{span[1]}: rebuild with --min-imgsz/--max-imgsz covering it (trtnet.val's "
                              "rectangular batches reach --imgsz + 32)")

    @property
    def one_context(self) -> bool:
        """Dynamic shapes: TensorRT lets only one execution context at a time use an optimization profile
        (NVIDIA/TensorRT#1590; a second context fails in enqueueV3 on 8.5), so threads take turns on one
        context. Static-shape engines give every thread its own context and run them concurrently."""
        return any(-1 in spec.shape for spec in self.inputs.values())

    def worker(self) -> Worker:
        """This thread's execution context, stream and buffers (made on first use): the engine's one
        context for dynamic shapes (see `one_context`; use `checkout()` from several threads)."""
        if self.closed:
            raise TrtnetError(f"{self.path.name}: the engine was closed")
        holder = self if self.one_context else self._local
        worker = getattr(holder, "_worker", None)
        if worker is None:
            with self._lock:  # contexts are made one at a time
                worker = getattr(holder, "_worker", None) or Worker(self)
                if worker not in self._workers:
                    self._workers.append(worker)
            holder._worker = worker
        return worker

    @contextmanager
    def checkout(self) -> Iterator[Worker]:
        """The worker for one call, held by this thread until the block ends (thread-safe)."""
        if not self.one_context:
            yield self.worker()
            return
        with self._turn:
            yield self.worker()

    def batches(self, count: int) -> list[tuple[int, int, int]]:
        return split_batch(count, self.min_batch, self.max_batch)

    def infer(self, feeds: np.ndarray | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Host arrays in (any batch size), host arrays out, in the engine's output dtypes."""
        if not isinstance(feeds, Mapping):
            feeds = {self.input_name: feeds}
        feeds = {name: self._checked_input(name, value) for name, value in feeds.items()}
        count = len(next(iter(feeds.values())))
        parts: dict[str, list[np.ndarray]] = {name: [] for name in self.outputs}
        for start, n, run_as in self.batches(count):
            chunk = {name: _pad_batch(v[start:start + n], run_as) for name, v in feeds.items()}
            with self.checkout() as worker:
                for name, value in worker.infer(chunk, run_as).items():
                    parts[name].append(value[:n])
        return {name: np.concatenate(values) for name, values in parts.items()}

    def _checked_input(self, name: str, value: np.ndarray) -> np.ndarray:
        if name not in self.inputs:
            raise TrtnetError(f"{self.path.name} has no input {name!r}; its inputs: {', '.join(self.inputs)}")
        spec = self.inputs[name]
        value = np.asarray(value)
        dims = zip(spec.shape[1:], value.shape[1:])
        fits = len(value.shape) == len(spec.shape) and all(d in (-1, v) for d, v in dims)
        if not fits:
            takes = ", ".join(map(str, spec.shape[1:]))
            raise TrtnetError(f"input {name!r}: shape {list(value.shape)}, the engine takes [N, {takes}]")
        return np.ascontiguousarray(value, dtype=spec.dtype)

    def close(self) -> None:
        """Release every thread's context and buffers (call when no thread uses the engine any more)."""
        with self._lock:
            workers, self._workers = self._workers, []
            self.closed = True
        for worker in workers:
            worker.close()
        self._local = threading.local()
        self._worker = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _pad_batch(value: np.ndarray, size: int) -> np.ndarray:
    if len(value) >= size:
        return value
    pad = np.repeat(value[-1:], size - len(value), axis=0)
    return np.concatenate([value, pad])


def _register_yolo_plugin() -> None:
    """Engines with the decode + NMS plugin deserialize only once its creator is registered."""
    from trtnet.plugins import trt_plugins

    if not trt_plugins.python_plugins_supported():
        raise TrtnetError(
            f"the engine holds the trtnet decode + NMS plugin, which {compat.flavour()} cannot load "
            "(Python plugins need TensorRT >= 10): rebuild it with --postprocess kernels"
        )
    trt_plugins.register()


class Worker:
    """One thread's execution context, stream, device buffers and CUDA graphs for an Engine."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.context = engine.trt_engine.create_execution_context()
        if self.context is None:
            raise TrtnetError(
                f"TensorRT could not create an execution context for {engine.path.name} "
                "(out of GPU memory?): close other GPU programs or use fewer threads"
            )
        self.stream = cuda_rt.Stream()
        self.upload_stream = cuda_rt.Stream()  # image uploads overlap the previous run on `stream`
        self.uploaded = cuda_rt.Event(timing=False)
        self.buffers = {name: cuda_rt.DeviceBuffer() for name in (*engine.inputs, *engine.outputs)}
        self.host = {name: cuda_rt.PinnedBuffer() for name in (*engine.inputs, *engine.outputs)}
        self.scratch: dict[str, Any] = {}  # pipeline state of this thread (pre/post-processing buffers)
        self._graphs: dict[Any, cuda_rt.CudaGraph | None] = {}
        self._warned = False
        self._prepared_for: tuple | None = None
        self._prepared_shapes: dict[str, tuple] = {}

    # -- shapes and addresses

    def prepare(self, batch: int, hw: tuple[int, int] | None = None) -> dict[str, tuple]:
        """Set the input shapes for `batch`, size and bind every buffer; returns the I/O shapes.

        `hw` is the input height and width for engines built with a dynamic size (default: `imgsz`)."""
        if (batch, hw) == self._prepared_for:  # the context already has these shapes and addresses
            return self._prepared_shapes
        engine = self.engine
        if not engine.min_batch <= batch <= engine.max_batch:
            raise TrtnetError(
                f"batch {batch} is outside the engine's profile {engine.min_batch}..{engine.max_batch} "
                "(Engine.infer and the pipelines split larger batches)"
            )
        if hw is not None:
            engine.check_size(hw)
        shapes = {}
        for name, spec in engine.inputs.items():
            shape = (batch, *spec.shape[1:])
            if -1 in shape[2:]:
                shape = (batch, shape[1], *(hw or engine.imgsz))
            if not self.context.set_input_shape(name, shape):
                raise TrtnetError(f"TensorRT refused input shape {list(shape)} for {name!r}")
            shapes[name] = shape
        for name in engine.outputs:
            shapes[name] = tuple(self.context.get_tensor_shape(name))
        specs = {**engine.inputs, **engine.outputs}
        moved = False
        for name, shape in shapes.items():
            moved |= self.buffers[name].ensure(specs[name].nbytes(shape))
            self.context.set_tensor_address(name, self.buffers[name].ptr)
        if moved:
            self.drop_graphs()
        self._prepared_for, self._prepared_shapes = (batch, hw), shapes
        return shapes

    def ptr(self, name: str) -> int:
        return self.buffers[name].ptr

    def scratch_item(self, name: Any, kind: type) -> Any:
        """This worker's pipeline buffer or event `name` (a cuda_rt.DeviceBuffer, PinnedBuffer or Event),
        made on first use."""
        item = self.scratch.get(name)
        if item is None:
            item = self.scratch[name] = kind()
        return item

    # -- execution

    def enqueue(self, batch: int, then: Callable[[], None] | None = None, key: Any = None) -> None:
        """Queue the engine (and `then`, work that follows it on this stream) for `batch` (prepared).

        With CUDA graphs the first call per (batch, key) runs eagerly — TensorRT needs one run after a
        shape change before capture — and captures; later calls replay. `key` tells apart different
        `then` work; its pointers and sizes must not change between calls with the same key.
        """
        if not self.engine.cuda_graphs:
            self._run(then)
            return
        graph_key = (batch, key)
        if graph_key in self._graphs:
            graph = self._graphs[graph_key]
            if graph is not None:
                graph.launch(self.stream)
            else:
                self._run(then)
            return
        self._run(then)
        graph = cuda_rt.CudaGraph.capture(self.stream, lambda: self._run(then))
        self._graphs[graph_key] = graph
        if graph is None and not self._warned:
            self._warned = True
            warnings.warn(f"{self.engine.path.name}: CUDA graph capture failed; running without graphs",
                          FallbackWarning, stacklevel=3)

    def _run(self, then: Callable[[], None] | None) -> None:
        if not self.context.execute_async_v3(self.stream.handle):
            raise TrtnetError(f"TensorRT failed to run {self.engine.path.name} (see the [TensorRT] messages above)")
        if then is not None:
            then()

    def drop_graphs(self) -> None:
        for graph in self._graphs.values():
            if graph is not None:
                graph.close()
        self._graphs.clear()

    def infer(self, feeds: Mapping[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
        """Upload `feeds` (batch rows each), run, download every output (copies, safe to keep)."""
        first = next(iter(feeds.values()))
        shapes = self.prepare(batch, tuple(first.shape[2:4]) if first.ndim == 4 else None)
        for name, value in feeds.items():
            cuda_rt.upload(value, self.ptr(name), self.stream, self.host[name])
        self.enqueue(batch)
        views = {}
        for name, spec in self.engine.outputs.items():
            nbytes = spec.nbytes(shapes[name])
            self.host[name].ensure(nbytes)
            cuda_rt.copy_to_host(self.host[name].ptr, self.ptr(name), nbytes, self.stream)
            views[name] = (shapes[name], spec.dtype)
        self.stream.synchronize()
        return {name: self.host[name].view(shape, dtype).copy() for name, (shape, dtype) in views.items()}

    def close(self) -> None:
        self.stream.synchronize()
        self.upload_stream.synchronize()
        self.drop_graphs()
        for closer in (*self.scratch.values(), *self.buffers.values(), *self.host.values(), self.uploaded):
            if hasattr(closer, "close"):
                closer.close()
        self.stream.close()
        self.upload_stream.close()
        self.context = None


def iter_chunks(items: Sequence, engine: Engine) -> Iterator[tuple[Sequence, int]]:
    """`items` in chunks the engine's profile accepts, each with the batch size it runs as."""
    for start, n, run_as in engine.batches(len(items)):
        yield items[start:start + n], run_as


# ----------------------------------------------------------------------------------------- pipelines


def stage_images(worker: Worker, images: Sequence[np.ndarray], slot: Any = 0) -> list[int]:
    """Queue the upload of HxWx3 uint8 images on the worker's upload stream and make its compute stream
    wait for it; the images' device addresses (in this `slot`'s buffer: a pipeline keeps one per run in
    flight).

    Images in page-locked memory (`cuda_rt.pinned_array`) are copied straight from it, and so is a lone
    pageable image (the driver stages it faster than a copy into our buffer); several pageable images are
    copied into the worker's pinned staging buffer by a thread pool first (one thread copies ~5 GB/s).
    The caller's memory and the staging buffer are free again once `worker.uploaded` has completed (a
    stream synchronize after the run implies it).
    """
    offsets, total = [], 0
    for image in images:
        offsets.append(total)
        total += -(-image.nbytes // 256) * 256  # 256-byte aligned starts
    device = worker.scratch_item(("images", slot), cuda_rt.DeviceBuffer)
    device.ensure(total)

    def upload(i: int, source: int) -> None:
        cuda_rt.copy_to_device(device.ptr + offsets[i], source, images[i].nbytes, worker.upload_stream)

    pageable = [i for i, image in enumerate(images) if not cuda_rt.is_page_locked(image)]
    staged = pageable if len(pageable) > 1 else []
    if staged:
        staging = worker.scratch_item("staging", cuda_rt.PinnedBuffer)
        staging.ensure(total)

        def through_staging(i: int) -> None:
            staging.view(images[i].shape, np.uint8, offsets[i])[...] = images[i]
            upload(i, staging.ptr + offsets[i])

        list(_copy_pool().map(through_staging, staged))
    for i in sorted(set(range(len(images))) - set(staged)):
        upload(i, images[i].ctypes.data)
    worker.uploaded.record(worker.upload_stream)
    worker.stream.wait(worker.uploaded)
    return [device.ptr + offset for offset in offsets]


@functools.lru_cache(maxsize=1)
def _copy_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="trtnet-copy")


class ClassifyPipeline:
    """GPU ImageNet preprocessing → ResNet engine → logits on the host."""

    def __init__(self, engine: Engine):
        from trtnet.plugins.preprocess import ImagenetPreprocess

        self.engine = engine
        h, w = engine.imgsz
        self.preprocess = ImagenetPreprocess(h, w, engine.inputs[engine.input_name].dtype.name)
        self.output = "logits" if "logits" in engine.outputs else next(iter(engine.outputs))

    def run(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Logits [N, classes] for BGR uint8 images (any sizes, any count)."""
        parts = [self._run_chunk(chunk, run_as) for chunk, run_as in iter_chunks(images, self.engine)]
        if not parts:
            return np.zeros((0, int(self.engine.meta.get("num_classes", 1000))), np.float32)
        return np.concatenate(parts)

    def _run_chunk(self, images: Sequence[np.ndarray], batch: int) -> np.ndarray:
        with self.engine.checkout() as worker:
            return self._run_chunk_on(worker, images, batch)

    def _run_chunk_on(self, worker: Worker, images: Sequence[np.ndarray], batch: int) -> np.ndarray:
        shapes = worker.prepare(batch)
        pointers = stage_images(worker, images)
        self.preprocess.enqueue(worker.stream.handle, images, pointers, worker.ptr(self.engine.input_name))
        worker.enqueue(batch)
        spec = self.engine.outputs[self.output]
        host = worker.host[self.output]
        nbytes = spec.nbytes(shapes[self.output])
        host.ensure(nbytes)
        cuda_rt.copy_to_host(host.ptr, worker.ptr(self.output), nbytes, worker.stream)
        worker.stream.synchronize()
        return host.view(shapes[self.output], spec.dtype)[: len(images)].astype(np.float32)


class DetectPipeline:
    """GPU letterbox → YOLOv5 engine → decode + NMS → per image rows (x1, y1, x2, y2, score, class) in
    network-input pixels. Decode + NMS run as the kernels after the engine on the same stream, unless the
    engine holds them as a plugin (`--postprocess plugin`) and outputs `dets`/`counts` itself."""

    def __init__(self, engine: Engine, settings: NmsSettings | None = None):
        from trtnet.plugins.preprocess import Letterbox

        settings = settings or NmsSettings()
        meta = engine.meta
        self.engine = engine
        self.settings = settings
        h, w = engine.imgsz
        self.letterbox = Letterbox(h, w, engine.inputs[engine.input_name].dtype.name)
        self.in_engine = (meta.get("postprocess") or {}).get("mode") == "plugin"
        if self.in_engine:
            self._check_plugin_settings(meta["postprocess"])
            self.post = None
            self.heads: list[str] = []
        else:
            from trtnet.plugins.postprocess import YoloPostprocess

            self.post = YoloPostprocess(strides=meta["strides"], anchors=meta["anchors"], nc=meta["nc"],
                                        conf=settings.conf, iou=settings.iou, max_det=settings.max_det,
                                        multi_label=settings.multi_label, agnostic=settings.agnostic)
            self.heads = list(meta["outputs"])

    def _check_plugin_settings(self, built: Mapping) -> None:
        missing = {"dets", "counts"} - set(self.engine.outputs)
        if missing:
            raise TrtnetError(f"{self.engine.path.name} says --postprocess plugin but has no {sorted(missing)} "
                              "output: rebuild it")
        s = self.settings
        if s.conf < built["conf"] or s.iou != built["iou"] or s.max_det > built["max_det"] or \
                s.multi_label != built["multi_label"] or s.agnostic != built["agnostic"]:
            warnings.warn(
                f"{self.engine.path.name} runs NMS inside the engine with conf {built['conf']}, iou {built['iou']}, "
                f"max_det {built['max_det']}, multi_label {built['multi_label']}, agnostic {built['agnostic']}; "
                f"only a higher conf or lower max_det can be applied afterwards. Rebuild with other --conf/--iou "
                "settings, or with --postprocess kernels to choose them at run time",
                FallbackWarning, stacklevel=3)

    def run(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Per image float32 [k, 6] rows, for HxWx3 uint8 BGR images (any sizes, any count)."""
        rows: list[np.ndarray] = []
        for chunk, run_as in iter_chunks(images, self.engine):
            with self.engine.checkout() as worker:
                rows += self._collect(self._submit(worker, chunk, run_as, slot="call"))
        return rows

    def stream(self, images: Iterable[np.ndarray], batch: int = 1, depth: int = 2) -> Iterator[np.ndarray]:
        """Rows per image, in order, for a stream of images run `batch` at a time, with up to `depth` runs
        on the GPU at once: the next run's images are uploaded and its work queued while the GPU still
        works on the previous one, so the GPU does not wait for the host between runs (video).

        The engine's worker is held while the iterator is consumed (on a dynamic-shape engine other
        threads wait for it); consume it in the thread that started it. An image's memory may be reused
        once `batch` further images have been taken from `images` (a video reader's ring of `batch` frames).
        """
        if depth < 1:
            raise TrtnetError(f"depth must be at least 1, got {depth}")
        batch = max(1, min(int(batch), self.engine.max_batch))
        in_flight: deque[_InFlight] = deque()
        with self.engine.checkout() as worker:
            try:
                for runs, chunk in enumerate(batched(images, batch)):
                    run_as = max(len(chunk), self.engine.min_batch)
                    in_flight.append(self._submit(worker, chunk, run_as, slot=runs % depth))
                    worker.uploaded.synchronize()  # the caller may now reuse the images' memory
                    if len(in_flight) == depth:
                        yield from self._collect(in_flight.popleft())
                while in_flight:
                    yield from self._collect(in_flight.popleft())
            finally:
                worker.stream.synchronize()  # an abandoned stream leaves no work on the buffers

    def _submit(self, worker: Worker, images: Sequence[np.ndarray], batch: int, slot: Any) -> _InFlight:
        """Queue upload, letterbox, engine, decode + NMS and the download of the results (in `slot`)."""
        engine = self.engine
        shapes = worker.prepare(batch)
        input_ptr = worker.ptr(engine.input_name)
        pointers = stage_images(worker, images, slot)
        self.letterbox.enqueue(worker.stream.handle, pointers, [im.shape[0] for im in images],
                               [im.shape[1] for im in images], input_ptr)
        if batch > len(images):  # padding rows: zeros, their results are dropped
            done = self.letterbox.output_bytes(len(images))
            cuda_rt.fill(input_ptr + done, 0, self.letterbox.output_bytes(batch) - done, worker.stream)
        return self._queue_engine(worker, batch, len(images), shapes, slot)

    def run_letterboxed(self, x: np.ndarray) -> list[np.ndarray]:
        """Rows per image for network inputs letterboxed elsewhere (float32 [n, 3, h, w], /255 RGB), e.g.
        by trtnet.val's official rectangular-batch preprocessing; (h, w) may vary per call on engines
        built with --min-imgsz."""
        rows: list[np.ndarray] = []
        engine = self.engine
        x = engine._checked_input(engine.input_name, x)
        for start, n, run_as in engine.batches(len(x)):
            chunk = _pad_batch(x[start:start + n], run_as)
            with engine.checkout() as worker:
                shapes = worker.prepare(run_as, tuple(chunk.shape[2:]))
                cuda_rt.upload(chunk, worker.ptr(engine.input_name), worker.stream, worker.host[engine.input_name])
                rows += self._collect(self._queue_engine(worker, run_as, n, shapes, slot="call"))
        return rows

    def _queue_engine(self, worker: Worker, batch: int, count: int, shapes: Mapping[str, tuple],
                      slot: Any) -> _InFlight:
        """The engine on its filled input (and decode + NMS after it in `kernels` mode), then the download
        of the first `count` images' rows. Graphs are keyed by input size, which engines built with
        --min-imgsz vary."""
        hw = tuple(shapes[self.engine.input_name][2:])
        if self.in_engine:
            worker.enqueue(batch, key=("engine", hw))
            return _queue_download(worker, slot, count, shapes["dets"][1], worker.ptr("dets"), worker.ptr("counts"))
        dets_ptr, counts_ptr, then = self._postprocess(worker, batch, shapes)
        worker.enqueue(batch, then=then, key=("nms", hw))
        return _queue_download(worker, slot, count, self.settings.max_det, dets_ptr, counts_ptr)

    def _postprocess(self, worker: Worker, batch: int, shapes: Mapping[str, tuple]):
        """Buffers for decode + NMS at `batch` and the work to queue after the engine."""
        level_shapes = tuple(tuple(shapes[name][2:]) for name in self.heads)
        workspace = worker.scratch_item("nms_workspace", cuda_rt.DeviceBuffer)
        dets = worker.scratch_item("nms_dets", cuda_rt.DeviceBuffer)
        counts = worker.scratch_item("nms_counts", cuda_rt.DeviceBuffer)
        moved = workspace.ensure(self.post.workspace_bytes(batch, level_shapes))
        moved |= dets.ensure(batch * self.settings.max_det * 6 * 4)
        moved |= counts.ensure(batch * 4)
        if moved:
            worker.drop_graphs()  # captured graphs point at the old buffers
        head_ptrs = [worker.ptr(name) for name in self.heads]
        head_dtype = self.engine.outputs[self.heads[0]].dtype.name
        stream = worker.stream.handle

        def then() -> None:
            self.post.enqueue(stream, head_ptrs, head_dtype, batch, level_shapes, workspace.ptr, dets.ptr, counts.ptr)

        return dets.ptr, counts.ptr, then

    def _collect(self, run: _InFlight) -> list[np.ndarray]:
        """Wait for a queued run; its rows per image (copies: the slot's buffer is reused)."""
        run.done.synchronize()
        dets = run.host.view((run.count, run.max_det, 6), np.float32)
        counts = run.host.view((run.count,), np.int32, run.dets_bytes)
        rows = [dets[i, : min(int(counts[i]), run.max_det)].copy() for i in range(run.count)]
        if self.in_engine:
            rows = [r[r[:, 4] >= self.settings.conf][: self.settings.max_det] for r in rows]
        return rows


@dataclass(frozen=True)
class _InFlight:
    """A run queued on a worker's stream: its results land in `host` once `done` has completed."""

    host: cuda_rt.PinnedBuffer
    done: cuda_rt.Event
    count: int
    max_det: int

    @property
    def dets_bytes(self) -> int:
        return self.count * self.max_det * 6 * 4


def _queue_download(worker: Worker, slot: Any, count: int, max_det: int, dets_ptr: int,
                    counts_ptr: int) -> _InFlight:
    """Queue the copy of `count` images' dets and counts into `slot`'s pinned buffer, then its event."""
    host = worker.scratch_item(("results", slot), cuda_rt.PinnedBuffer)
    done = worker.scratch_item(("done", slot), _sync_event)
    run = _InFlight(host, done, count, max_det)
    host.ensure(run.dets_bytes + count * 4)
    cuda_rt.copy_to_host(host.ptr, dets_ptr, run.dets_bytes, worker.stream)
    cuda_rt.copy_to_host(host.ptr + run.dets_bytes, counts_ptr, count * 4, worker.stream)
    done.record(worker.stream)
    return run


def _sync_event() -> cuda_rt.Event:
    return cuda_rt.Event(timing=False)


def batched(items: Iterable, size: int) -> Iterator[list]:
    """Lists of `size` consecutive items (the last may be shorter)."""
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
