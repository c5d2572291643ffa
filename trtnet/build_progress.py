"""What a TensorRT build is doing while it runs: TensorRT's own progress monitor where it has one (>= 10), the layer
its tactic timing has reached (from its log, every version) on an interactive terminal, and afterwards the layers
that timing spent longest on (a timed 640 YOLOv8s build on TensorRT 8.5 takes ~19 minutes: RESULTS.md, run I)."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

from trtnet import compat


class AutotuneLog:
    """Reads TensorRT's verbose log for "Computing costs for NAME", which starts the tactic timing of one layer
    (some versions leave NAME empty there and give it on the next "Timing Runner: NAME (kind)" line)."""

    COSTS = "=============== Computing costs for"
    RUNNER = "--------------- Timing Runner:"

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.layers = 0
        self.current: str | None = None
        self.seconds: dict[str, float] = {}  # layer → seconds its timing took
        self._since: float | None = None

    def __call__(self, msg: str) -> None:
        text = msg.strip()
        if text.startswith(self.COSTS):
            self.finish()
            self.layers += 1
            self.current = text[len(self.COSTS):].strip() or None
            self._since = self.clock()
        elif self._since is not None and self.current is None and text.startswith(self.RUNNER):
            self.current = text[len(self.RUNNER):].strip().rsplit(" (", 1)[0]

    def finish(self) -> None:
        """Closes the layer being timed (the build is over, or the next layer starts)."""
        if self._since is not None:
            name = self.current or f"layer {self.layers}"
            self.seconds[name] = self.seconds.get(name, 0.0) + self.clock() - self._since
            self._since = None

    @property
    def phase(self) -> str:
        return f"timing layer {self.layers}: {self.current or '…'}"

    def summary(self, top: int = 3) -> str | None:
        if not self.seconds:
            return None
        longest = sorted(self.seconds.items(), key=lambda item: -item[1])[:top]
        named = ", ".join(f"{_short(name)} {seconds:.0f} s" for name, seconds in longest)
        return f"tactic timing: {self.layers} layers in {sum(self.seconds.values()):.0f} s; longest: {named}"


def _short(name: str, width: int = 60) -> str:
    return name if len(name) <= width else name[:width - 1] + "…"


class BuildProgress:
    """TensorRT's progress monitor where it has one (>= 10), the autotuning log everywhere; a spinner with the phase
    and the elapsed time on an interactive terminal."""

    def __init__(self, stream=sys.stderr, cancelled=lambda: False, logger=None):
        self.stream = stream
        self.cancelled = cancelled  # asked at every step: True cancels the build (TensorRT >= 10)
        self.logger = logger  # compat.Logger(): its messages feed the autotuning log during the build
        self.autotune = AutotuneLog()
        self.start = time.perf_counter()
        self.seconds = 0.0
        self.phase = "building"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def monitor(self):
        base = compat.progress_monitor_class()
        if base is None:
            return None
        progress = self

        class _Monitor(base):
            def __init__(self):
                base.__init__(self)

            def phase_start(self, parent_phase, phase_name, num_steps):
                progress.phase = phase_name

            def step_complete(self, phase_name, step):
                return not progress.cancelled()

            def phase_finish(self, phase_name):
                pass

        return _Monitor()

    def _listen(self, msg: str) -> None:
        self.autotune(msg)
        if self.autotune.layers:
            self.phase = self.autotune.phase

    def __enter__(self):
        if self.logger is not None:
            self.logger.listeners.append(self._listen)
        if self.stream.isatty():
            self._thread = threading.Thread(target=self._spin, daemon=True)
            self._thread.start()
        return self

    def _spin(self):
        frames = "|/-\\"
        i = 0
        while not self._stop.wait(0.2):
            elapsed = time.perf_counter() - self.start
            self.stream.write(f"\r{frames[i % 4]} {self.phase[:50]:<50} {elapsed:6.1f}s")
            self.stream.flush()
            i += 1

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join()
            self.stream.write("\r" + " " * 62 + "\r")
        if self.logger is not None:
            self.logger.listeners.remove(self._listen)
        self.autotune.finish()
        self.seconds = time.perf_counter() - self.start
        return False
