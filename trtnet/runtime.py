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

`DetectPipeline` and `ClassifyPipeline` put the GPU pre- and post-processing around the engine.
"""

from __future__ import annotations

import json
import re
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trtnet import compat, cuda_rt
from trtnet.errors import TrtnetError

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
    """The metadata trtnet.build wrote beside the engine (`<name>.engine` → `<name>.json`)."""
    path = Path(engine_path).with_suffix(".json")
    try:
        meta = json.loads(path.read_text())
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
    if flavour.is_rtx:
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
        self._runtime, self.trt_engine = compat.deserialize(self.path.read_bytes())
        self.inputs, self.outputs = io_specs(self.trt_engine)
        batch = self.meta["batch"]
        self.min_batch, self.opt_batch, self.max_batch = int(batch["min"]), int(batch["opt"]), int(batch["max"])
        self.cuda_graphs = cuda_graphs
        self._local = threading.local()
        self._workers: list[Worker] = []
        self._lock = threading.Lock()
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

    def worker(self) -> Worker:
        """This thread's execution context, stream and buffers (made on first use)."""
        if self.closed:
            raise TrtnetError(f"{self.path.name}: the engine was closed")
        worker = getattr(self._local, "worker", None)
        if worker is None:
            worker = Worker(self)
            self._local.worker = worker
            with self._lock:
                self._workers.append(worker)
        return worker

    def batches(self, count: int) -> list[tuple[int, int, int]]:
        return split_batch(count, self.min_batch, self.max_batch)

    def infer(self, feeds: np.ndarray | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Host arrays in (any batch size), host arrays out, in the engine's output dtypes."""
        if not isinstance(feeds, Mapping):
            feeds = {self.input_name: feeds}
        feeds = {name: self._checked_input(name, value) for name, value in feeds.items()}
        count = len(next(iter(feeds.values())))
        worker = self.worker()
        parts: dict[str, list[np.ndarray]] = {name: [] for name in self.outputs}
        for start, n, run_as in self.batches(count):
            chunk = {name: _pad_batch(v[start:start + n], run_as) for name, v in feeds.items()}
            for name, value in worker.infer(chunk, run_as).items():
                parts[name].append(value[:n])
        return {name: np.concatenate(values) for name, values in parts.items()}

    def _checked_input(self, name: str, value: np.ndarray) -> np.ndarray:
        if name not in self.inputs:
            raise TrtnetError(f"{self.path.name} has no input {name!r}; its inputs: {', '.join(self.inputs)}")
        spec = self.inputs[name]
        value = np.asarray(value)
        if value.shape[1:] != spec.shape[1:]:
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
        self.buffers = {name: cuda_rt.DeviceBuffer() for name in (*engine.inputs, *engine.outputs)}
        self.host = {name: cuda_rt.PinnedBuffer() for name in (*engine.inputs, *engine.outputs)}
        self.scratch: dict[str, Any] = {}  # pipeline state of this thread (pre/post-processing buffers)
        self._graphs: dict[Any, cuda_rt.CudaGraph | None] = {}
        self._warned = False

    # -- shapes and addresses

    def prepare(self, batch: int) -> dict[str, tuple]:
        """Set the input shapes for `batch`, size and bind every buffer; returns the I/O shapes."""
        engine = self.engine
        if not engine.min_batch <= batch <= engine.max_batch:
            raise TrtnetError(
                f"batch {batch} is outside the engine's profile {engine.min_batch}..{engine.max_batch} "
                "(Engine.infer and the pipelines split larger batches)"
            )
        shapes = {}
        for name, spec in engine.inputs.items():
            shape = (batch, *spec.shape[1:])
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
        return shapes

    def ptr(self, name: str) -> int:
        return self.buffers[name].ptr

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
        shapes = self.prepare(batch)
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
        self.drop_graphs()
        for closer in (*self.scratch.values(), *self.buffers.values(), *self.host.values()):
            if hasattr(closer, "close"):
                closer.close()
        self.stream.close()
        self.context = None


def iter_chunks(items: Sequence, engine: Engine) -> Iterator[tuple[Sequence, int]]:
    """`items` in chunks the engine's profile accepts, each with the batch size it runs as."""
    for start, n, run_as in engine.batches(len(items)):
        yield items[start:start + n], run_as


