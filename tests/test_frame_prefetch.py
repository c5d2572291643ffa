"""trtnet.frame_prefetch on the CPU simulator of test_runtime_cpu: frames taken on a thread of their own, pageable
ones copied into page-locked memory there, no further ahead than the caller's frame ring allows."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest

from tests.conftest import shared
from tests.test_runtime_cpu import SIM, sim_detector  # noqa: F401
from trtnet import cuda_rt
from trtnet.frame_prefetch import RING, FramePrefetch


@pytest.fixture
def pool(monkeypatch):
    monkeypatch.setattr(cuda_rt, "cudart", lambda: SIM.rt)
    with ThreadPoolExecutor(2) as copies:
        yield copies


class Source:
    """Batches of frames; records how many were taken and on which threads."""

    def __init__(self, count: int, batch: int = 1, pinned: bool = False, fail_at: int | None = None):
        self.count, self.batch, self.pinned, self.fail_at = count, batch, pinned, fail_at
        self.taken = 0
        self.threads: set[int] = set()

    def frame(self, value: int) -> np.ndarray:
        frame = cuda_rt.pinned_array((6, 5, 3)) if self.pinned else np.empty((6, 5, 3), np.uint8)
        frame[...] = value
        return frame

    def __iter__(self):
        for k in range(self.count):
            if k == self.fail_at:
                raise OSError("the camera went away")
            self.threads.add(threading.get_ident())
            self.taken += 1
            yield [self.frame(10 * k + i) for i in range(self.batch)]


def wait_until(condition, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("batch", [1, 3])
def test_pageable_frames_come_page_locked_from_another_thread_in_order(pool, batch):
    source = Source(5, batch)
    with FramePrefetch(source, pool) as frames:
        seen = []
        for item in frames:
            assert all(cuda_rt.is_page_locked(image) for image in item.images)
            seen.append([int(image[0, 0, 0]) for image in item.images])
            item.uploaded()
    assert seen == [[10 * k + i for i in range(batch)] for k in range(5)]
    assert threading.get_ident() not in source.threads


def test_pageable_frames_are_taken_no_more_than_the_ring_ahead(pool):
    source = Source(10)
    with FramePrefetch(source, pool) as frames:
        batches = iter(frames)
        first = next(batches)
        wait_until(lambda: source.taken == RING)  # copied ahead while the first is still being uploaded
        time.sleep(0.2)
        assert source.taken == RING
        first.uploaded()
        wait_until(lambda: source.taken == RING + 1)


def test_page_locked_frames_are_sent_from_the_caller_s_memory_and_not_taken_ahead(pool):
    source = Source(4, pinned=True)
    with FramePrefetch(source, pool) as frames:
        batches = iter(frames)
        first = next(batches)
        assert first.images[0].ctypes.data in SIM.pinned  # the caller's frame itself: no copy
        time.sleep(0.2)
        assert source.taken == 1  # the caller may rewrite it once the next is taken: not before its upload
        first.uploaded()
        wait_until(lambda: source.taken == 2)


def test_an_error_of_the_source_comes_after_the_batches_before_it(pool):
    seen = []
    with FramePrefetch(Source(5, fail_at=3), pool) as frames, pytest.raises(OSError, match="the camera went away"):
        for item in frames:
            seen.append(int(item.images[0][0, 0, 0]))
            item.uploaded()
    assert seen == [0, 10, 20]


def test_closing_stops_the_thread_waiting_for_a_free_buffer(pool):
    frames = FramePrefetch(Source(100), pool)
    next(iter(frames))  # never uploaded: the thread waits for its buffer
    frames.close()
    assert not frames._thread.is_alive()


def test_closing_does_not_wait_for_a_source_blocked_in_its_read(pool):
    release = threading.Event()

    def camera():
        yield [np.zeros((6, 5, 3), np.uint8)]
        release.wait(10)  # the next frame is slow to come
        yield [np.zeros((6, 5, 3), np.uint8)]

    frames = FramePrefetch(camera(), pool)
    next(iter(frames)).uploaded()
    start = time.monotonic()
    frames.close()
    assert time.monotonic() - start < 3
    release.set()  # the read returns: the thread stops without copying into the buffers
    frames._thread.join(timeout=5)
    assert not frames._thread.is_alive() and frames._ready.empty()


def test_the_frames_thread_works_on_the_engine_s_gpu(pool):
    seen = []

    class OnGpu(Source):
        def frame(self, value):
            seen.append(getattr(SIM.current, "device", 0))
            return super().frame(value)

    SIM.current.device = 0
    with FramePrefetch(OnGpu(2), pool, device=1) as frames:
        for item in frames:
            item.uploaded()
    assert seen == [1, 1]


@pytest.mark.parametrize("pinned", [False, True])
def test_detector_stream_prefetches_pageable_frames_only(sim_detector, monkeypatch, pinned):  # noqa: F811
    """Frames read into page-locked memory stream as they did (nothing to copy, no thread); pageable ones go
    through the frames thread, with the same results."""
    import trtnet.pipelines

    made = []
    real = trtnet.pipelines.FramePrefetch

    def counting(*args, **kwargs):
        made.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(trtnet.pipelines, "FramePrefetch", counting)
    frame = cv2.imread(str(shared("images", "bus.jpg")))
    with sim_detector() as detector:
        frames = [cuda_rt.pinned_array(frame.shape) if pinned else frame.copy() for _ in range(3)]
        for f in frames:
            f[...] = frame
        results = list(detector.stream(frames))
        expected = detector.detect(frame)[0]
    assert made == ([] if pinned else [1])
    assert len(results) == 3 and len(expected) == 4
    for r in results:
        np.testing.assert_array_equal(r.boxes, expected.boxes)
