"""Worker threads inside one Triton model instance: its `execute` hands requests over and returns at once, each
worker (a runner of its own, on the instance's GPU) takes as many waiting requests as fit one batch, runs them and
answers each through Triton's response sender.

Why: with Triton's Python backend every instance is a process of its own, which runs one execution at a time and
has its own CUDA context; two instances take turns on the GPU (run Q: an execution of one image took 3.1 ms with
one instance, 4.0-4.4 with two). Workers share their instance's context, so one worker's decode and host work
overlap the other's engine; and while they run, the instance's main thread already takes the next requests from
Triton. Sending responses from `execute`'s caller needs Triton's response sender in the default (non-decoupled)
mode: Triton 2.48 (24.07) or later.
"""

from __future__ import annotations

import threading
import traceback
from collections import deque
from collections.abc import Sequence
from typing import Any, Callable

Respond = Callable[[Any, Any], None]  # (request handle, its output dict or the exception it met)


def image_count(inputs: dict) -> int:
    """How many images a request carries (its batch dimension): what it takes of a worker's batch."""
    for name in ("image", "pixels"):
        if name in inputs:
            return max(len(inputs[name]), 1)
    return 1


class RequestQueue:
    """Requests waiting for a worker, oldest first; a worker takes as many as fit `max_images`. `put` waits while
    `limit_images` are waiting, so that an overloaded instance leaves the rest in Triton's queue."""

    def __init__(self, max_images: int, limit_images: int):
        self.max_images, self.limit_images = max_images, limit_images
        self._waiting: deque = deque()  # (handle, inputs, images)
        self._images = 0
        self._closed = False
        self._changed = threading.Condition()

    def put(self, handles: Sequence, inputs: Sequence[dict]) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._images < self.limit_images or self._closed)
            for handle, request in zip(handles, inputs):
                count = image_count(request)
                self._waiting.append((handle, request, count))
                self._images += count
            self._changed.notify_all()

    def take(self) -> list[tuple[Any, dict]] | None:
        """The oldest waiting requests, at most `max_images` images (at least one request); None once closed and
        empty."""
        with self._changed:
            self._changed.wait_for(lambda: self._waiting or self._closed)
            if not self._waiting:
                return None
            taken, images = [], 0
            while self._waiting and (not taken or images + self._waiting[0][2] <= self.max_images):
                handle, request, count = self._waiting.popleft()
                taken.append((handle, request))
                images += count
            self._images -= images
            self._changed.notify_all()
            return taken

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()


class Workers:
    """One thread per `infer` (trtnet.serve.infer_function of its own runner): each runs its `warm_up` first (the
    constructor returns when all have, or raises the first one's error), then takes requests from the queue and
    answers them with `respond`; an error answers every request of its batch, and the worker goes on."""

    def __init__(self, infers: Sequence[Callable[[list], list]], max_images: int, respond: Respond,
                 warm_ups: Sequence[Callable[[], None]] | None = None, backlog_batches: int = 2):
        self.queue = RequestQueue(max_images, backlog_batches * max_images * len(infers))
        self.respond = respond
        warm_ups = list(warm_ups) if warm_ups is not None else [lambda: None] * len(infers)
        self._warmed: list = []  # one entry per thread: None, or the exception its warm-up raised
        self._warm_done = threading.Condition()
        self.threads = [threading.Thread(target=self._work, args=(infer, warm), name=f"trtnet-worker-{i}",
                                         daemon=True) for i, (infer, warm) in enumerate(zip(infers, warm_ups))]
        for thread in self.threads:
            thread.start()
        with self._warm_done:
            self._warm_done.wait_for(lambda: len(self._warmed) == len(self.threads))
        failed = [e for e in self._warmed if e is not None]
        if failed:
            self.close()
            raise failed[0]

    def submit(self, handles: Sequence, inputs: Sequence[dict]) -> None:
        self.queue.put(handles, inputs)

    def _work(self, infer: Callable[[list], list], warm: Callable[[], None]) -> None:
        try:
            warm()
            error = None
        except Exception as exc:  # noqa: BLE001 - raised by the constructor, in the caller's thread
            error = exc
        with self._warm_done:
            self._warmed.append(error)
            self._warm_done.notify_all()
        if error is not None:
            return
        while (taken := self.queue.take()) is not None:
            handles = [handle for handle, _ in taken]
            try:
                outputs = infer([request for _, request in taken])
            except Exception as exc:  # noqa: BLE001 - every request gets an answer; the server keeps serving
                outputs = [exc] * len(handles)
            for handle, output in zip(handles, outputs):
                try:
                    self.respond(handle, output)
                except Exception:  # noqa: BLE001 - a client gone away must not stop the worker
                    traceback.print_exc()

    def close(self, timeout_s: float = 30.0) -> None:
        """Answer what is waiting, then stop the threads."""
        self.queue.close()
        for thread in self.threads:
            thread.join(timeout_s)
