"""Ctrl-C and SIGTERM during a build: stop it, write nothing, exit 130 (SIGINT) or 143 (SIGTERM).

Python raises KeyboardInterrupt wherever the main thread runs Python next. During a TensorRT build that is inside
one of TensorRT's callbacks (the logger, the progress monitor), which catch every exception ("Exception caught in
log()"): the interrupt was lost and the build went on to replace the engine. So while TensorRT builds, the
signal is only recorded (`deferred()`); the progress monitor asks TensorRT to cancel (`requested`), and the
interrupt is raised as soon as TensorRT returns. Outside that window it is raised at once, and atomic_write
removes its unfinished `.part` file on the way out (the default SIGTERM action would kill the process mid-write).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class BuildInterrupts:
    """Install the handlers for the duration of a `with` block (main thread only; elsewhere a no-op)."""

    def __init__(self):
        self.signum: int | None = None
        self._deferring = False
        self._previous: dict = {}

    def __enter__(self) -> BuildInterrupts:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> bool:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False

    def requested(self) -> bool:
        return self.signum is not None

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Record signals instead of raising them (TensorRT would swallow the exception)."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        self.raise_if_requested()

    def raise_if_requested(self) -> None:
        if self.signum == signal.SIGTERM:
            print("terminated", file=sys.stderr)
            raise SystemExit(128 + signal.SIGTERM)
        if self.signum is not None:
            raise KeyboardInterrupt

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        if not self._deferring:
            self.raise_if_requested()
