"""Frames for `DetectPipeline.stream`, taken from the caller's iterable on a thread of their own and, where they are
in pageable memory, copied into page-locked buffers while the GPU runs the batches before them.

Why: at batch 1 from pageable 810x1080 frames the stream was bound by the host, ~0.45 ms a frame whatever the
engine, 0.19 ms of it the driver staging the 2.6 MB frame (RESULTS.md, run K); at batch 32 the 84 MB copy set the
pace. A copy into page-locked memory (numpy releases the GIL for it) runs beside the main thread's launches, and the
upload from there is a plain DMA.

The caller's frames may live in a ring that its reader refills: a batch is taken from the iterable only once every
frame taken before it has been copied (pageable) or uploaded (already page-locked, sent from where it is).
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from trtnet import cuda_rt

RING = 2  # page-locked buffers: one batch filled while the one before it is uploaded
_END = object()


@dataclass(frozen=True)
class Prefetched:
    """A batch of frames ready to upload (page-locked copies or the caller's page-locked frames), and the call that
    says its upload has completed (its buffer may then take a later batch)."""

    images: list[np.ndarray]
    uploaded: Callable[[], None] | None = None  # None: nothing waits for it (frames read into pinned memory)


class FramePrefetch:
    """Iterate it for `Prefetched` batches of `batches`, in order; an exception of the caller's iterable (or of a
    copy) comes out where it happened. `close()` (or leaving the `with`) stops the thread."""

    def __init__(self, batches: Iterable[Sequence[np.ndarray]], copy_pool: ThreadPoolExecutor,
                 device: int | None = None):
        self._batches = iter(batches)
        # the engine's GPU (None: this thread's current one): the frames thread's CUDA calls make no context elsewhere
        self._device = cuda_rt.current_device() if device is None else device
        self._pool = copy_pool
        self._ring = [cuda_rt.PinnedBuffer() for _ in range(RING)]
        self._free = [threading.Event() for _ in range(RING)]
        for event in self._free:
            event.set()
        self._ready: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="trtnet-frames", daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[Prefetched]:
        while True:
            item = self._ready.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1)
        if not self._thread.is_alive():
            for buffer in self._ring:
                buffer.close()
        # else it waits in the caller's iterable (a camera read): it stops when that returns, copying nothing, and
        # the buffers go with this object (a Ctrl-C on a live stream does not wait for the next frame)

    def __enter__(self) -> FramePrefetch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the frames thread

    def _produce(self) -> None:
        try:
            cuda_rt.set_device(self._device)
            for k in itertools.count():
                slot = k % RING
                if not self._wait(self._free[slot]):  # before taking the batch: a live source's newest frames
                    return
                batch = next(self._batches, None)
                if batch is None:
                    break
                if self._stop.is_set():
                    return
                self._free[slot].clear()
                images, sent_from_caller = self._staged(list(batch), self._ring[slot])
                uploaded = threading.Event()
                self._ready.put(Prefetched(images, self._release(slot, uploaded)))
                if sent_from_caller and not self._wait(uploaded):  # its memory is the caller's until uploaded
                    return
        except BaseException as exc:  # handed to the consumer, raised there in order
            self._ready.put(exc)
            return
        self._ready.put(_END)

    def _release(self, slot: int, uploaded: threading.Event) -> Callable[[], None]:
        def release() -> None:
            self._free[slot].set()
            uploaded.set()

        return release

    def _wait(self, event: threading.Event) -> bool:
        while not event.wait(0.05):
            if self._stop.is_set():
                return False
        return not self._stop.is_set()

    def _staged(self, batch: list[np.ndarray], buffer: cuda_rt.PinnedBuffer) -> tuple[list[np.ndarray], bool]:
        """The batch with its pageable frames copied into `buffer`; whether any frame is sent from the caller's
        own (page-locked) memory."""
        pageable = [i for i, image in enumerate(batch) if not cuda_rt.is_page_locked(image)]
        if not pageable:
            return batch, True
        offsets, total = cuda_rt.aligned_offsets([batch[i] for i in pageable])
        buffer.ensure(total)
        images = list(batch)

        def copy(j: int) -> None:
            i = pageable[j]
            view = buffer.view(batch[i].shape, batch[i].dtype, offsets[j])
            view[...] = batch[i]
            images[i] = view

        if len(pageable) > 1:
            list(self._pool.map(copy, range(len(pageable))))
        else:
            copy(0)
        return images, len(pageable) < len(batch)
