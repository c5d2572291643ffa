"""`trtnet serve --backend hub`: Triton's Python-backend stubs only carry requests; the runners live in the serving
process (one CUDA context per GPU), and every stub hands its executions to them through a Unix socket, where
executions from all stubs are batched together.

Why (runs Q and R): with `--backend python` each Triton instance is a stub process that pays Triton's per-request
costs (~0.3 ms a request: request and response objects, shared memory) and runs a runner with a CUDA context of its
own; more instances spread the first but split the batches and make the contexts take turns on the GPU. Here the
stubs (KIND_CPU, no CUDA) absorb the per-request costs side by side, and the runners see batches merged from all
of them, as one process calling the runner directly does.
"""

from __future__ import annotations

import threading
import traceback
from collections import deque
from collections.abc import Sequence
from multiprocessing.connection import Client, Connection, Listener
from typing import Any, Callable

STUBS_PER_RUNNER = 2  # Triton instances (stub processes) per runner, at least MIN_STUBS
MIN_STUBS = 4


def image_count(inputs: dict) -> int:
    """How many images a request carries (its batch dimension): what it takes of a runner's batch."""
    for name in ("image", "pixels"):
        if name in inputs:
            return max(len(inputs[name]), 1)
    return 1


def stub_count(runners: int) -> int:
    return max(MIN_STUBS, STUBS_PER_RUNNER * runners)


class Executions:
    """Executions waiting for a runner, oldest first: (reply, requests, images). A runner takes as many as fit
    `max_images` (at least one)."""

    def __init__(self, max_images: int):
        self.max_images = max_images
        self._waiting: deque = deque()
        self._closed = False
        self._changed = threading.Condition()

    def put(self, reply: Callable[[list], None], requests: list) -> None:
        with self._changed:
            self._waiting.append((reply, requests, sum(image_count(r) for r in requests)))
            self._changed.notify()

    def take(self) -> list | None:
        """The oldest waiting executions that fit one batch; None once closed."""
        with self._changed:
            self._changed.wait_for(lambda: self._waiting or self._closed)
            if self._closed:
                return None
            taken, images = [], 0
            while self._waiting and (not taken or images + self._waiting[0][2] <= self.max_images):
                reply, requests, count = self._waiting.popleft()
                taken.append((reply, requests))
                images += count
            return taken

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()


class Hub:
    """Listens on `address` (a Unix socket path) for stubs; one thread per `infer` (trtnet.serve.infer_function of a
    runner of its own) runs its `warm_up` first — the constructor returns once all have, or raises the first one's
    error — then runs the executions waiting, merged, and answers each stub with the outputs of its requests (or
    the exception that failed the batch: the stub answers its requests with it)."""

    def __init__(self, address: str, infers: Sequence[Callable[[list], list]], max_images: int,
                 warm_ups: Sequence[Callable[[], None]] | None = None):
        self.executions = Executions(max_images)
        self.infers = list(infers)
        self.listener = Listener(address, family="AF_UNIX")
        self.address = address
        self._connections: list[Connection] = []
        warm_ups = list(warm_ups) if warm_ups is not None else [lambda: None] * len(infers)
        self._warmed: list = []  # per runner thread: None, or what its warm-up raised
        self._warm_done = threading.Condition()
        self.threads = [threading.Thread(target=self._run, args=(infer, warm), name=f"trtnet-hub-runner-{i}",
                                         daemon=True) for i, (infer, warm) in enumerate(zip(infers, warm_ups))]
        for thread in self.threads:
            thread.start()
        with self._warm_done:
            self._warm_done.wait_for(lambda: len(self._warmed) == len(self.threads))
        failed = [e for e in self._warmed if e is not None]
        if failed:
            self.close()
            raise failed[0]
        threading.Thread(target=self._accept, name="trtnet-hub-accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection = self.listener.accept()
            except OSError:  # closed
                return
            self._connections.append(connection)
            threading.Thread(target=self._read, args=(connection,), daemon=True).start()

    def _read(self, connection: Connection) -> None:
        """One stub: an execution's requests in, the runners' outputs back (one execution at a time per stub)."""
        sending = threading.Lock()

        def reply(outputs: list) -> None:
            with sending:
                connection.send(outputs)

        while True:
            try:
                requests = connection.recv()
            except (EOFError, OSError):  # the stub finished
                return
            self.executions.put(reply, requests)

    def _run(self, infer: Callable[[list], list], warm: Callable[[], None]) -> None:
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
        while (taken := self.executions.take()) is not None:
            merged = [request for _, requests in taken for request in requests]
            try:
                outputs = infer(merged)
            except Exception as exc:  # noqa: BLE001 - every stub gets an answer; the hub keeps serving
                outputs = [exc] * len(merged)
            start = 0
            for reply, requests in taken:
                try:
                    reply(outputs[start:start + len(requests)])
                except Exception:  # noqa: BLE001 - a stub gone away must not stop the runner
                    traceback.print_exc()
                start += len(requests)

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the threads; then each infer's `close()` where it has one (trtnet.serve.infer_function's frees its
        decoder and prints the runner's own time)."""
        self.executions.close()
        self.listener.close()
        for connection in self._connections:
            connection.close()
        for thread in self.threads:
            thread.join(timeout_s)
        for infer in self.infers:
            getattr(infer, "close", lambda: None)()


class HubClient:
    """A stub's end: `run(requests)` sends an execution's requests (dicts of input arrays) to the hub and returns one
    output dict per request, or the exception that failed them."""

    def __init__(self, address: str):
        self.connection = Client(address, family="AF_UNIX")

    def run(self, requests: list[dict[str, Any]]) -> list:
        self.connection.send(requests)
        return self.connection.recv()

    def close(self) -> None:
        self.connection.close()
