"""GPU pipelines around an engine: images in, results per image out.

`ClassifyPipeline`: ImageNet preprocessing → engine → logits. `DetectPipeline`: letterbox → engine →
decode + NMS → boxes in image pixels (it undoes its own letterbox); `DetectPipeline.stream` keeps the next
batch's upload and work queued while the GPU runs the previous one. Each pipeline keeps its buffers per
worker (thread) in its own small state object.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import os
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trtnet import cuda_rt, networks
from trtnet.engine import Engine, FallbackWarning, Worker, batched, iter_chunks, pad_batch
from trtnet.engine_meta import DETECTION_ROW, nms_kwargs
from trtnet.errors import TrtnetError
from trtnet.frame_prefetch import FramePrefetch, Prefetched
from trtnet.image_decoding import DecodedBatch, DecodedFile
from trtnet.plugins.postprocess import NmsSettings
from trtnet.plugins.preprocess import rows_to_images


@dataclass
class Uploads:
    """A pipeline's image uploads on one worker: a device buffer per run in flight (`slot`) and one pinned
    staging buffer."""

    images: dict[Any, cuda_rt.DeviceBuffer] = field(default_factory=dict)
    staging: cuda_rt.PinnedBuffer | None = None

    def device(self, slot: Any) -> cuda_rt.DeviceBuffer:
        if slot not in self.images:
            self.images[slot] = cuda_rt.DeviceBuffer()
        return self.images[slot]

    def pinned(self) -> cuda_rt.PinnedBuffer:
        if self.staging is None:
            self.staging = cuda_rt.PinnedBuffer()
        return self.staging

    def close(self) -> None:
        for buffer in (*self.images.values(), self.staging):
            if buffer is not None:
                buffer.close()


def stage_images(worker: Worker, uploads: Uploads, images: Sequence[np.ndarray], slot: Any = 0) -> list[int]:
    """Queue the upload of HxWx3 uint8 images on the worker's upload stream and make its compute stream
    wait for it; the images' device addresses (in this `slot`'s buffer: a pipeline keeps one per run in
    flight).

    Images in page-locked memory (`cuda_rt.pinned_array`) are copied straight from it, and so is a lone
    pageable image (the driver stages it faster than a copy into our buffer); several pageable images are
    copied into the pipeline's pinned staging buffer by a thread pool first (one thread copies ~5 GB/s).
    The caller's memory and the staging buffer are free again once `worker.uploaded` has completed (a
    stream synchronize after the run implies it).
    """
    offsets, total = cuda_rt.aligned_offsets(images)
    device = uploads.device(slot)
    device.ensure(total)

    def upload(i: int, source: int) -> None:
        cuda_rt.copy_to_device(device.ptr + offsets[i], source, images[i].nbytes, worker.upload_stream)

    pageable = [i for i, image in enumerate(images) if not cuda_rt.is_page_locked(image)]
    staged = pageable if len(pageable) > 1 else []
    if staged:
        staging = uploads.pinned()
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


def image_pointers(worker: Worker, uploads: Uploads, images: Sequence, slot: Any = 0) -> tuple[list[int], list[int]]:
    """Device addresses and row pitches of `images`: host arrays are staged (`stage_images`), images
    already in device memory (`image_decoding.DeviceImage`, decoded there) are read where they are."""
    host = [i for i, image in enumerate(images) if isinstance(image, np.ndarray)]
    staged = dict(zip(host, stage_images(worker, uploads, [images[i] for i in host], slot))) if host else {}
    on_device = {i: (image.ptr, image.pitch) for i, image in enumerate(images) if i not in staged}
    pointers = [staged[i] if i in staged else on_device[i][0] for i in range(len(images))]
    pitches = [3 * images[i].shape[1] if i in staged else on_device[i][1] for i in range(len(images))]
    return pointers, pitches


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
            return np.zeros((0, self.engine.meta.num_classes or 1000), np.float32)
        return np.concatenate(parts)

    def _run_chunk(self, images: Sequence[np.ndarray], batch: int) -> np.ndarray:
        with self.engine.checkout() as worker:
            return self._run_chunk_on(worker, images, batch)

    def _run_chunk_on(self, worker: Worker, images: Sequence[np.ndarray], batch: int) -> np.ndarray:
        shapes = worker.prepare(batch)
        pointers = stage_images(worker, worker.state_of(self, Uploads), images)
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
    """GPU letterbox → detection engine → decode + NMS → per image rows (x1, y1, x2, y2, score, class) with
    the boxes in the image's pixels (the letterbox undone, as the official `scale_boxes`). Decode + NMS
    run as the kernels after the engine on the same stream, unless the engine holds them as a plugin
    (`--postprocess plugin`) and outputs `dets`/`counts` itself.

    `rect` (engines built with a dynamic size): each batch is letterboxed to its smallest shape, as
    Ultralytics' predictor does (`LetterBox(auto=True)`: scaled to fit the engine size, padded only to a
    multiple of the largest stride; a batch of several shapes takes the largest of theirs)."""

    def __init__(self, engine: Engine, settings: NmsSettings | None = None, rect: bool = False):
        from trtnet.plugins.preprocess import Letterbox

        settings = settings or NmsSettings()
        meta = engine.meta
        self.engine = engine
        self.settings = settings
        h, w = engine.imgsz
        self.letterbox = Letterbox(h, w, engine.inputs[engine.input_name].dtype.name)
        self.rect_stride = _rect_stride(engine) if rect else None
        self.in_engine = meta.postprocess_in_engine
        if self.in_engine:
            self._check_plugin_settings(meta.postprocess)
            self.post = None
            self.heads: list[str] = []
        else:
            from trtnet.plugins.postprocess import YoloPostprocess

            decode = networks.family(meta.family).postprocess_kwargs(meta.to_dict())
            self.post = YoloPostprocess(**decode, **nms_kwargs(settings))
            self.heads = list(meta.outputs)

    def _check_plugin_settings(self, built: NmsSettings) -> None:
        missing = {"dets", "counts"} - set(self.engine.outputs)
        if missing:
            raise TrtnetError(f"{self.engine.path.name} says --postprocess plugin but has no {sorted(missing)} "
                              "output: rebuild it")
        s = self.settings
        if s.conf < built.conf or s.iou != built.iou or s.max_det > built.max_det or \
                s.multi_label != built.multi_label or s.agnostic != built.agnostic:
            warnings.warn(
                f"{self.engine.path.name} runs NMS inside the engine with conf {built.conf}, iou {built.iou}, "
                f"max_det {built.max_det}, multi_label {built.multi_label}, agnostic {built.agnostic}; "
                f"only a higher conf or lower max_det can be applied afterwards. Rebuild with other --conf/--iou "
                "settings, or with --postprocess kernels to choose them at run time",
                FallbackWarning, stacklevel=3)

    def run(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Per image float32 [k, 6] rows in image pixels, for HxWx3 uint8 BGR images (any sizes, any count)."""
        rows: list[np.ndarray] = []
        for chunk, run_as in iter_chunks(images, self.engine):
            with self.engine.checkout() as worker:
                rows += self._collect(self._submit(worker, chunk, run_as, slot="call", hw=self.rect_hw(chunk)))
        return rows

    def stream(self, images: Iterable[np.ndarray], batch: int = 1, depth: int = 2) -> Iterator[np.ndarray]:
        """Rows per image, in order, for a stream of images run `batch` at a time, with up to `depth` runs
        on the GPU at once: the next run's images are uploaded and its work queued while the GPU still
        works on the previous one, so the GPU does not wait for the host between runs (video).

        The engine's worker is held while the iterator is consumed (on a dynamic-shape engine other
        threads wait for it); consume it in the thread that started it. Unless its first batch is in
        page-locked memory, `images` is iterated on a thread of its own, which copies pageable images into
        page-locked memory while the GPU runs the batches before them (`trtnet.frame_prefetch`). An image's
        memory may be reused once `batch` further images have been taken from `images` (a video reader's
        ring of `batch` frames).
        """
        if depth < 1:
            raise TrtnetError(f"depth must be at least 1, got {depth}")
        batch = max(1, min(int(batch), self.engine.max_batch))
        chunks = batched(images, batch)
        first = next(chunks, None)
        if first is None:
            return
        chunks = itertools.chain([first], chunks)
        if all(cuda_rt.is_page_locked(image) for image in first):  # read into pinned frames: nothing to copy ahead
            frames = contextlib.nullcontext(Prefetched(chunk) for chunk in chunks)
        else:
            frames = FramePrefetch(chunks, _copy_pool(), self.engine.device_index)  # copied meanwhile
        with frames as batches:
            queued = (_Queued(b.images, slot=runs % depth, uploaded=b.uploaded) for runs, b in enumerate(batches))
            for _, rows in self._pipelined(queued, depth):
                yield from rows

    def stream_decoded(self, batches: Iterable[DecodedBatch], depth: int = 2,
                       mark: StageMark | None = None) -> Iterator[tuple[DecodedFile, np.ndarray | None]]:
        """(file, rows) per file of batches from `image_decoding.FileDecoder` (rows None for a file that could
        not be decoded), in order, with up to `depth` batches on the GPU at once: the decode of the next
        batch (its `ready` event orders it) overlaps this one's engine run. The slots of any `depth` + 1
        consecutive batches must differ (`image_decoding.iter_decoded` gives them). `mark(stage, stream)` is
        called after each stage is queued (for the bench's per-stage CUDA events). Holds the engine's worker as
        `stream` does."""
        if depth < 1:
            raise TrtnetError(f"depth must be at least 1, got {depth}")
        queued = (_Queued([f.image for f in decoded.decoded], decoded.slot, decoded.ready, mark, decoded)
                  for decoded in batches)  # the next batch is decoded while the GPU runs this one
        for item, rows in self._pipelined(queued, depth):
            rows = iter(rows)
            for file in item.source.files:
                yield file, (next(rows) if file.image is not None else None)

    def _pipelined(self, queued: Iterable[_Queued], depth: int) -> Iterator[tuple[_Queued, list[np.ndarray]]]:
        """(batch, rows per image) in order, with up to `depth` batches queued on the engine's worker at once.

        A batch at another input size first drains the runs in flight (`prepare` may move the buffers they
        use). After each batch is queued its upload is waited for, so the images' memory (a caller's frame
        ring) and the pinned staging buffers are free again before the next batch is taken."""
        in_flight: deque[tuple[_Queued, _InFlight | None]] = deque()
        last_hw = None
        with self.engine.checkout() as worker:
            try:
                for item in queued:
                    hw = self.rect_hw(item.images) if item.images else None
                    if in_flight and hw != last_hw and item.images:
                        while in_flight:
                            yield self._collected(*in_flight.popleft())
                    in_flight.append((item, self._submit_queued(worker, item, hw)))
                    last_hw = hw if item.images else last_hw
                    worker.uploaded.synchronize()
                    if item.uploaded is not None:
                        item.uploaded()
                    if len(in_flight) == depth:
                        yield self._collected(*in_flight.popleft())
                while in_flight:
                    yield self._collected(*in_flight.popleft())
            finally:
                worker.stream.synchronize()  # an abandoned stream leaves no work on the buffers

    def _submit_queued(self, worker: Worker, item: _Queued, hw: tuple[int, int] | None) -> _InFlight | None:
        images = item.images
        if not images:
            return None
        if len(images) > self.engine.max_batch:
            raise TrtnetError(f"a batch of {len(images)} images; {self.engine.path.name} takes at most "
                              f"{self.engine.max_batch}")
        if item.ready is not None:
            worker.stream.wait(item.ready)
        return self._submit(worker, images, self.engine.run_as(len(images)), item.slot, item.mark, hw=hw)

    def _collected(self, item: _Queued, run: _InFlight | None) -> tuple[_Queued, list[np.ndarray]]:
        return item, (self._collect(run) if run is not None else [])

    def _submit(self, worker: Worker, images: Sequence, batch: int, slot: Any,
                mark: StageMark | None = None, *, hw: tuple[int, int] | None = None) -> _InFlight:
        """Queue upload, letterbox, engine, decode + NMS and the download of the results (in `slot`).
        `images`: host arrays, or `image_decoding.DeviceImage`s already on the device; `hw`: their
        `rect_hw`."""
        mark = mark or _no_mark
        engine = self.engine
        shapes = worker.prepare(batch, hw)
        input_ptr = worker.ptr(engine.input_name)
        state = worker.state_of(self, DetectState)
        pointers, pitches = image_pointers(worker, state.uploads, images, slot)
        mark("upload", worker.upload_stream)
        self.letterbox.enqueue(worker.stream.handle, pointers, [im.shape[0] for im in images],
                               [im.shape[1] for im in images], input_ptr, pitches, out_hw=hw)
        if batch > len(images):  # padding rows: zeros, their results are dropped
            done = self.letterbox.output_bytes(len(images), hw)
            cuda_rt.fill(input_ptr + done, 0, self.letterbox.output_bytes(batch, hw) - done, worker.stream)
        mark("letterbox", worker.stream)
        run = self._queue_engine(worker, batch, len(images), shapes, slot, mark)
        return dataclasses.replace(run, image_shapes=tuple(im.shape[:2] for im in images))

    def rect_hw(self, images: Sequence[np.ndarray]) -> tuple[int, int] | None:
        """The batch's own input (h, w) with `rect`, else None (the engine's size)."""
        return self.input_hw(images) if self.rect_stride else None

    def input_hw(self, images: Sequence[np.ndarray]) -> tuple[int, int]:
        """The letterboxed input's (h, w) for a batch of `images` (rect: their smallest common shape)."""
        if not self.rect_stride:
            return self.engine.imgsz
        from trtnet.plugins.preprocess import rect_input_hw

        engine = self.engine
        return rect_input_hw([im.shape[:2] for im in images], engine.imgsz, self.rect_stride, engine.size_range)

    def run_letterboxed(self, x: np.ndarray) -> list[np.ndarray]:
        """Rows per image, boxes in network-input pixels, for inputs letterboxed elsewhere (float32
        [n, 3, h, w], /255 RGB), e.g. by trtnet.val's official rectangular-batch preprocessing, which maps
        them back itself; (h, w) may vary per call on engines built with --min-imgsz."""
        rows: list[np.ndarray] = []
        engine = self.engine
        x = engine.checked_input(engine.input_name, x)
        for start, n, run_as in engine.batches(len(x)):
            chunk = pad_batch(x[start:start + n], run_as)
            with engine.checkout() as worker:
                shapes = worker.prepare(run_as, tuple(chunk.shape[2:]))
                cuda_rt.upload(chunk, worker.ptr(engine.input_name), worker.stream, worker.host[engine.input_name])
                rows += self._collect(self._queue_engine(worker, run_as, n, shapes, slot="call"))
        return rows

    def _queue_engine(self, worker: Worker, batch: int, count: int, shapes: Mapping[str, tuple],
                      slot: Any, mark: StageMark | None = None) -> _InFlight:
        """The engine on its filled input (and decode + NMS after it in `kernels` mode), then the download
        of the first `count` images' rows. Graphs are keyed by input size, which engines built with
        --min-imgsz vary."""
        hw = tuple(shapes[self.engine.input_name][2:])
        mark = mark or _no_mark
        if self.in_engine:
            worker.enqueue(batch, key=("engine", hw))
            mark("engine+nms", worker.stream)
            return _download_marked(mark, worker, _queue_download(worker, self, slot, count, shapes["dets"][1],
                                                                  worker.ptr("dets"), worker.ptr("counts"), hw))
        dets_ptr, counts_ptr, then = self._postprocess(worker, batch, shapes)
        if mark is not _no_mark and not self.engine.cuda_graphs:  # an event cannot be recorded inside a capture
            nms = then

            def then() -> None:
                mark("engine", worker.stream)
                nms()

        worker.enqueue(batch, then=then, key=("nms", hw))
        mark("engine+nms" if self.engine.cuda_graphs else "nms", worker.stream)
        return _download_marked(mark, worker, _queue_download(worker, self, slot, count, self.settings.max_det,
                                                              dets_ptr, counts_ptr, hw))

    def _postprocess(self, worker: Worker, batch: int, shapes: Mapping[str, tuple]):
        """Buffers for decode + NMS at `batch` and the work to queue after the engine."""
        level_shapes = tuple(tuple(shapes[name][2:]) for name in self.heads)
        state = worker.state_of(self, DetectState)
        workspace, dets, counts = state.nms_workspace, state.dets, state.counts
        moved = workspace.ensure(self.post.workspace_bytes(batch, level_shapes))
        moved |= dets.ensure(batch * self.settings.max_det * DETECTION_ROW * 4)
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
        dets = run.host.view((run.count, run.max_det, DETECTION_ROW), np.float32)
        counts = [min(int(c), run.max_det) for c in run.host.view((run.count,), np.int32, run.dets_bytes)]
        if run.image_shapes:  # the mapping is per row: mapping before the conf filter below keeps the same rows
            rows = rows_to_images(dets, counts, run.input_hw, run.image_shapes)
        else:
            rows = [dets[i, :k].copy() for i, k in enumerate(counts)]
        if self.in_engine:
            rows = [r[r[:, 4] >= self.settings.conf][: self.settings.max_det] for r in rows]
        return rows


StageMark = Callable[[str, cuda_rt.Stream], None]  # (stage just queued, the stream it was queued on)


def _no_mark(stage: str, stream: cuda_rt.Stream) -> None:
    pass


def _download_marked(mark: StageMark, worker: Worker, run: _InFlight) -> _InFlight:
    mark("download", worker.stream)
    return run


@dataclass(frozen=True)
class _Queued:
    """A batch for `DetectPipeline._pipelined`: its images (none: nothing to run), slot, the event its pixels
    are ready at (GPU decode), the stage marker and where it came from (a `DecodedBatch`)."""

    images: Sequence
    slot: Any
    ready: cuda_rt.Event | None = None
    mark: StageMark | None = None
    source: Any = None
    uploaded: Callable[[], None] | None = None  # told once its upload has completed (FramePrefetch)


@dataclass(frozen=True)
class _InFlight:
    """A run queued on a worker's stream: its results land in `host` once `done` has completed."""

    host: cuda_rt.PinnedBuffer
    done: cuda_rt.Event
    count: int
    max_det: int
    input_hw: tuple  # the letterboxed input's (h, w)
    image_shapes: tuple = ()  # (h, w) per image, to map the boxes back to; () keeps input pixels

    @property
    def dets_bytes(self) -> int:
        return self.count * self.max_det * DETECTION_ROW * 4


def _rect_stride(engine: Engine) -> int:
    """The largest stride of an engine that can run rectangular inputs; TrtnetError for any other."""
    if engine.size_range is None:
        h, w = engine.imgsz
        raise TrtnetError(f"{engine.path.name} takes {h}x{w} inputs only: rect needs an engine built with a dynamic "
                          "size (rebuild with --min-imgsz/--max-imgsz)")
    if not engine.meta.strides:
        raise TrtnetError(f"{engine.path.name}'s metadata lists no strides: rect cannot pad to their multiple")
    return max(engine.meta.strides)


def _queue_download(worker: Worker, pipeline: DetectPipeline, slot: Any, count: int, max_det: int, dets_ptr: int,
                    counts_ptr: int, input_hw: tuple) -> _InFlight:
    """Queue the copy of `count` images' dets and counts into `slot`'s pinned buffer, then its event."""
    host, done = worker.state_of(pipeline, DetectState).results_of(slot)
    run = _InFlight(host, done, count, max_det, input_hw)
    host.ensure(run.dets_bytes + count * 4)
    cuda_rt.copy_to_host(host.ptr, dets_ptr, run.dets_bytes, worker.stream)
    cuda_rt.copy_to_host(host.ptr + run.dets_bytes, counts_ptr, count * 4, worker.stream)
    done.record(worker.stream)
    return run


@dataclass
class DetectState:
    """A DetectPipeline's buffers on one worker: uploads, decode + NMS outputs, and per run in flight
    (`slot`) the pinned results and the event that says they have landed."""

    uploads: Uploads = field(default_factory=Uploads)
    nms_workspace: cuda_rt.DeviceBuffer = field(default_factory=cuda_rt.DeviceBuffer)
    dets: cuda_rt.DeviceBuffer = field(default_factory=cuda_rt.DeviceBuffer)
    counts: cuda_rt.DeviceBuffer = field(default_factory=cuda_rt.DeviceBuffer)
    results: dict[Any, tuple[cuda_rt.PinnedBuffer, cuda_rt.Event]] = field(default_factory=dict)

    def results_of(self, slot: Any) -> tuple[cuda_rt.PinnedBuffer, cuda_rt.Event]:
        if slot not in self.results:
            self.results[slot] = (cuda_rt.PinnedBuffer(), cuda_rt.Event(timing=False))
        return self.results[slot]

    def close(self) -> None:
        self.uploads.close()
        for item in (self.nms_workspace, self.dets, self.counts, *(x for pair in self.results.values() for x in pair)):
            if hasattr(item, "close"):
                item.close()
