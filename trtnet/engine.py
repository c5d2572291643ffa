"""Run a trtnet engine by tensor name: contexts, streams, buffers and CUDA graphs.

    engine = Engine("weights/yolov5n.fp16.640.engine")      # or just "yolov5n"
    outputs = engine.infer(x)                          # host arrays in, host arrays out

- Name-based I/O (`set_input_shape`, `set_tensor_address`, `execute_async_v3`: TensorRT >= 8.5).
- A batch larger than the engine's profile is split; one smaller than its minimum is padded.
- One execution context, stream and set of buffers per thread: one Engine serves many threads.
- Optional CUDA graphs: the engine (and the work queued right after it, e.g. decode + NMS) is captured
  once per batch size and replayed; where capture fails it runs eagerly, with one warning.

The GPU pre- and post-processing around the engine lives in trtnet.pipelines.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from trtnet import compat, cuda_rt
from trtnet.engine_files import check_device, check_tensorrt, load_metadata, read_plan, require_gpu, resolve_engine
from trtnet.errors import TrtnetError

State = TypeVar("State")
MAX_GRAPHS = 64  # captured CUDA graphs kept per worker (least recently replayed dropped first)


class FallbackWarning(UserWarning):
    """Something runs differently than asked (e.g. CUDA graphs fell back to eager execution)."""


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

    def __init__(self, engine: str | Path, *, weights_dir: str | Path = "weights", cuda_graphs: bool = False,
                 device: int | None = None):
        self.path = resolve_engine(engine, weights_dir)
        self.meta = load_metadata(self.path)
        check_tensorrt(self.meta, compat.flavour())
        require_gpu(self.path.name)
        self.device_index = device  # None: the thread's current device
        if device is not None:
            cuda_rt.use_device(device)  # checked once here; `use_device()` only sets it
        self.device = cuda_rt.device_properties()
        check_device(self.meta, compat.flavour(), self.device)
        if self.meta.postprocess_in_engine:
            _register_yolo_plugin()
        self._runtime, self.trt_engine = compat.deserialize(read_plan(self.path, self.meta))
        self.inputs, self.outputs = io_specs(self.trt_engine)
        batch = self.meta.batch
        self.min_batch, self.opt_batch, self.max_batch = batch.min, batch.opt, batch.max
        self.cuda_graphs = cuda_graphs
        self._local = threading.local()
        self._workers: list[Worker] = []
        self._lock = threading.Lock()
        self._turn = threading.RLock()  # one thread at a time on a dynamic-shape engine's context
        self._worker: Worker | None = None
        self.closed = False

    @property
    def family(self) -> str:
        return self.meta.family

    def use_device(self) -> None:
        """Make this engine's GPU current on the calling thread (every thread that touches the engine)."""
        if self.device_index is not None:
            cuda_rt.set_device(self.device_index)

    @property
    def input_name(self) -> str:
        return self.meta.input.name

    @property
    def imgsz(self) -> tuple[int, int]:
        h, w = self.meta.imgsz
        return h, w

    @property
    def size_range(self) -> tuple[int, int] | None:
        """(smallest, largest) input side of an engine built with a dynamic size, else None."""
        lo = self.meta.min_imgsz
        return None if lo is None else (lo, self.meta.max_imgsz or max(self.imgsz))

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
        self.use_device()
        if not self.one_context:
            yield self.worker()
            return
        with self._turn:
            yield self.worker()

    def batches(self, count: int) -> list[tuple[int, int, int]]:
        return split_batch(count, self.min_batch, self.max_batch)

    def run_as(self, count: int) -> int:
        """The batch `count` images (at most max_batch) run as: padded up to the profile's smallest."""
        return split_batch(count, self.min_batch, self.max_batch)[0][2]

    def infer(self, feeds: np.ndarray | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Host arrays in (any batch size), host arrays out, in the engine's output dtypes."""
        if not isinstance(feeds, Mapping):
            feeds = {self.input_name: feeds}
        feeds = {name: self.checked_input(name, value) for name, value in feeds.items()}
        count = len(next(iter(feeds.values())))
        parts: dict[str, list[np.ndarray]] = {name: [] for name in self.outputs}
        for start, n, run_as in self.batches(count):
            chunk = {name: pad_batch(v[start:start + n], run_as) for name, v in feeds.items()}
            with self.checkout() as worker:
                for name, value in worker.infer(chunk, run_as).items():
                    parts[name].append(value[:n])
        return {name: np.concatenate(values) for name, values in parts.items()}

    def checked_input(self, name: str, value: np.ndarray) -> np.ndarray:
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
        self.use_device()  # the buffers are freed on the engine's GPU, whichever thread closes it
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


def pad_batch(value: np.ndarray, size: int) -> np.ndarray:
    if len(value) >= size:
        return value
    pad = np.repeat(value[-1:], size - len(value), axis=0)
    return np.concatenate([value, pad])


def _register_yolo_plugin() -> None:
    """Engines with the decode + NMS plugin deserialize only once its creator is registered."""
    from trtnet.plugins import trt_plugins

    if not compat.python_plugins_supported():
        raise TrtnetError(
            f"the engine holds the trtnet decode + NMS plugin, which {compat.flavour()} cannot load "
            "(Python plugins need TensorRT >= 10): rebuild it with --postprocess kernels"
        )
    trt_plugins.register()


class Worker:
    """One thread's execution context, stream, device buffers and CUDA graphs for an Engine."""

    def __init__(self, engine: Engine):
        self.engine = engine
        engine.use_device()
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
        self._states: dict[Any, Any] = {}  # per pipeline: its buffers on this thread (see `state_of`)
        self._graphs: OrderedDict[Any, cuda_rt.CudaGraph | None] = OrderedDict()  # least recently used first
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

    def state_of(self, owner: Any, make: Callable[[], State]) -> State:
        """`owner`'s (a pipeline's) state on this worker, made by `make` on first use; its `close()` runs
        when the worker closes."""
        state = self._states.get(owner)
        if state is None:
            state = self._states[owner] = make()
        return state

    # -- execution

    def enqueue(self, batch: int, then: Callable[[], None] | None = None, key: Any = None) -> None:
        """Queue the engine (and `then`, work that follows it on this stream) for `batch` (prepared).

        With CUDA graphs the first call per (prepared shapes, key) runs eagerly — TensorRT needs one run
        after a shape change before capture — and captures; later calls replay. `key` tells apart different
        `then` work; its pointers and sizes must not change between calls with the same key.
        """
        if not self.engine.cuda_graphs:
            self._run(then)
            return
        if self._prepared_for is None or self._prepared_for[0] != batch:
            raise TrtnetError(f"enqueue({batch}) before prepare({batch}): the context has no shapes for it")
        graph_key = (self._prepared_for, key)  # a graph replays the input size it was captured at
        if graph_key in self._graphs:
            self._graphs.move_to_end(graph_key)
            graph = self._graphs[graph_key]
            if graph is not None:
                graph.launch(self.stream)
            else:
                self._run(then)
            return
        self._run(then)
        graph = cuda_rt.CudaGraph.capture(self.stream, lambda: self._run(then))
        self._graphs[graph_key] = graph
        self._forget_oldest_graphs()
        if graph is None and not self._warned:
            self._warned = True
            warnings.warn(f"{self.engine.path.name}: CUDA graph capture failed; running without graphs",
                          FallbackWarning, stacklevel=3)

    def _run(self, then: Callable[[], None] | None) -> None:
        if not self.context.execute_async_v3(self.stream.handle):
            raise TrtnetError(f"TensorRT failed to run {self.engine.path.name} (see the [TensorRT] messages above)")
        if then is not None:
            then()

    def _forget_oldest_graphs(self) -> None:
        """At most MAX_GRAPHS graphs per worker: a server's dynamic engine sees a batch size and an input shape per
        request mix (32 x hundreds of rect shapes), each a graph holding device memory. The least recently
        replayed goes (a replay still in flight finishes: CUDA frees its graph after)."""
        while len(self._graphs) > MAX_GRAPHS:
            _, oldest = self._graphs.popitem(last=False)
            if oldest is not None:
                oldest.close()

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
        self.engine.use_device()
        self.stream.synchronize()
        self.upload_stream.synchronize()
        self.drop_graphs()
        for closer in (*self._states.values(), *self.buffers.values(), *self.host.values(), self.uploaded):
            if hasattr(closer, "close"):
                closer.close()
        self.stream.close()
        self.upload_stream.close()
        self.context = None


def iter_chunks(items: Sequence, engine: Engine) -> Iterator[tuple[Sequence, int]]:
    """`items` in chunks the engine's profile accepts, each with the batch size it runs as."""
    for start, n, run_as in engine.batches(len(items)):
        yield items[start:start + n], run_as


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
