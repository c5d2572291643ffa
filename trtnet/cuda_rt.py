"""Small cuda-python helpers shared by the runtime and the benchmark.

Device and pinned host buffers, streams, events and CUDA graphs over the CUDA runtime API
(`cuda.bindings.runtime`), written against what cuda-bindings 12.9 and 13.x have in common. Every call
goes through `check`, so a failure is a `CudaError` naming the CUDA error instead of a tuple to unpack.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from trtnet.errors import TrtnetError


class CudaError(TrtnetError):
    """A CUDA runtime call failed; the message names the call's error."""


@functools.lru_cache(maxsize=1)  # every CUDA call goes through it: import once
def cudart() -> Any:
    try:
        from cuda.bindings import runtime
    except ImportError as exc:
        raise TrtnetError("cuda-python is not installed: pip install cuda-python") from exc
    return runtime


# The `trt-cuXX` extra for each CUDA major, with the NVIDIA driver it needs.
CUDA_EXTRAS = {12: ("trt-cu12", 525), 13: ("trt-cu13", 580)}
INSUFFICIENT_DRIVER = ("cudaErrorInsufficientDriver", "CUDA_ERROR_INSUFFICIENT_DRIVER")


def driver_too_old_hint() -> str:
    """What to do when the driver is older than the installed cuda-python's CUDA: the extra of an older CUDA
    major, or a newer driver."""
    try:
        from cuda import bindings

        major = int(str(bindings.__version__).split(".")[0])
    except (ImportError, ValueError, AttributeError):
        major = 0
    older = [(m, extra, driver) for m, (extra, driver) in sorted(CUDA_EXTRAS.items()) if m < major]
    need = CUDA_EXTRAS.get(major, ("", 0))[1]
    update = f"update the NVIDIA driver to >= {need}" if need else "update the NVIDIA driver"
    if not older:
        return f"the NVIDIA driver is too old for cuda-python {major or '?'}: {update}"
    m, extra, driver = older[-1]
    return (f"the NVIDIA driver is too old for CUDA {major} (cuda-python {major}): {update}, or install the CUDA {m} "
            f"stack instead: pip install \"trtnet[{extra}]\" (driver >= {driver})")


def check(result: Any, what: str = "CUDA call") -> Any:
    """Unpack a cuda-python `(error, *values)` result: the value(s), or CudaError naming the error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        name = getattr(err, "name", err)
        hint = f" ({driver_too_old_hint()})" if name in INSUFFICIENT_DRIVER else ""
        raise CudaError(f"{what} failed: {name}{hint}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def gpu_unavailable_reason() -> str | None:
    """Why no CUDA GPU can be used here (no cuda-python, no driver, no device), or None if one can."""
    try:
        err, count = cudart().cudaGetDeviceCount()
    except TrtnetError as exc:
        return str(exc)
    except Exception as exc:  # cuda-python raises when the driver library itself is missing
        return f"no NVIDIA driver ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    name = getattr(err, "name", str(err))
    if name == "cudaErrorInsufficientDriver":  # CUDA says this both without a driver and with an old one
        return f"{driver_too_old_hint()} ({name})" if _driver_installed() else "no NVIDIA driver is installed"
    if int(err) != 0:
        return f"no usable NVIDIA GPU ({name})"
    if count == 0:
        return "no NVIDIA GPU found"
    return None


def _driver_installed() -> bool:
    """Whether the NVIDIA driver's CUDA library loads at all (libcuda / nvcuda)."""
    import ctypes
    import ctypes.util

    for name in ("libcuda.so.1", ctypes.util.find_library("cuda"), "nvcuda.dll"):
        if not name:
            continue
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def device_identity(device: int = 0) -> dict:
    """Name and compute capability of `device` (what engine metadata records)."""
    props = check(cudart().cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return {"name": name.rstrip("\x00"), "compute_capability": f"{props.major}.{props.minor}"}


def use_device(device: int) -> None:
    """Check that this machine has `device`, then make it this thread's current CUDA device."""
    err, count = cudart().cudaGetDeviceCount()
    if int(err) == 0 and not 0 <= device < count:
        raise TrtnetError(f"device {device}: this machine has {count} GPU(s) (0..{count - 1})")
    set_device(device)


def current_device() -> int:
    """The calling thread's current CUDA device."""
    return int(check(cudart().cudaGetDevice(), "cudaGetDevice"))


def set_device(device: int) -> None:
    """Make `device` (already checked by `use_device`) this thread's current CUDA device (the runtime's
    current device is per thread)."""
    check(cudart().cudaSetDevice(device), f"cudaSetDevice({device})")


def device_properties(device: int | None = None) -> dict:
    """Name, compute capability and memory of `device` (default: the current one)."""
    rt = cudart()
    if device is None:
        device = check(rt.cudaGetDevice(), "cudaGetDevice")
    free, total = check(rt.cudaMemGetInfo(), "cudaMemGetInfo")
    return {**device_identity(device), "free_bytes": int(free), "total_bytes": int(total)}


def _finalizer(owner: Any, release: Callable, handle: Any) -> weakref.finalize:
    """Release `handle` when `owner` is collected or closed; quietly, as the process may be exiting."""

    def _release(h):
        with contextlib.suppress(Exception):
            release(h)

    return weakref.finalize(owner, _release, handle)


class _GrowingBuffer:
    """Memory that grows on demand: `ensure(n)` reallocates when n is larger than what it holds."""

    _alloc = _free_fn = ""  # cudart function names

    def __init__(self, nbytes: int = 0):
        self.ptr = 0
        self.nbytes = 0
        self._free: weakref.finalize | None = None
        self.ensure(nbytes)

    def ensure(self, nbytes: int) -> bool:
        """Make room for `nbytes`; True when the buffer moved (addresses taken before are stale)."""
        if nbytes <= self.nbytes:
            return False
        self.close()
        rt = cudart()
        self.ptr = int(check(getattr(rt, self._alloc)(nbytes), f"{self._alloc}({nbytes} bytes)"))
        self.nbytes = nbytes
        self._free = _finalizer(self, getattr(rt, self._free_fn), self.ptr)
        return True

    def close(self) -> None:
        if self._free is not None:
            self._free()
        self._free, self.ptr, self.nbytes = None, 0, 0


class DeviceBuffer(_GrowingBuffer):
    """Device memory; `ptr` is the address TensorRT and kernels take."""

    _alloc, _free_fn = "cudaMalloc", "cudaFree"


class PinnedBuffer(_GrowingBuffer):
    """Page-locked host memory (fast async copies), viewed as numpy arrays."""

    _alloc, _free_fn = "cudaMallocHost", "cudaFreeHost"

    def view(self, shape: tuple[int, ...], dtype: Any, offset: int = 0) -> np.ndarray:
        """A numpy array over the buffer (valid until the buffer grows or closes)."""
        dtype = np.dtype(dtype)
        count = math.prod(shape)  # not np.prod: it was most of a view's time (3.6 µs → 1.0 µs, two a detect call)
        if offset + count * dtype.itemsize > self.nbytes:
            raise ValueError(f"view of {count * dtype.itemsize} bytes at {offset} exceeds {self.nbytes}")
        raw = (ctypes.c_ubyte * (count * dtype.itemsize)).from_address(self.ptr + offset)
        raw._owner = self  # the array keeps its memory alive (pinned_array's arrays are all that hold it)
        return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)


def aligned_offsets(arrays: Sequence[np.ndarray], alignment: int = 256) -> tuple[list[int], int]:
    """Where each of `arrays` starts when they lie one after another in one buffer, every start aligned to
    `alignment` bytes; and the bytes they take."""
    offsets, total = [], 0
    for array in arrays:
        offsets.append(total)
        total += -(-array.nbytes // alignment) * alignment
    return offsets, total


def pinned_array(shape: tuple[int, ...], dtype: Any = np.uint8) -> np.ndarray:
    """A numpy array in page-locked host memory, freed with the array. Images decoded into one (e.g.
    `capture.read(frame)`) reach the GPU without the host copy that pageable images need."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return PinnedBuffer(max(nbytes, 1)).view(shape, dtype)


def is_page_locked(array: np.ndarray) -> bool:
    """Whether `array`'s memory is page-locked host memory the GPU can copy straight from."""
    rt = cudart()
    err, attributes = rt.cudaPointerGetAttributes(array.ctypes.data)
    if int(err) != 0:
        rt.cudaGetLastError()  # clear the error the query leaves behind
        return False
    return attributes.type == rt.cudaMemoryType.cudaMemoryTypeHost


class Stream:
    """A non-blocking CUDA stream; `handle` is the integer TensorRT and kernel launches take."""

    def __init__(self, destroy_at_exit: bool = True):
        rt = cudart()
        self.raw = check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")
        self.handle = int(self.raw)
        self._destroy = _finalizer(self, rt.cudaStreamDestroy, self.raw)
        self._destroy.atexit = destroy_at_exit

    def synchronize(self) -> None:
        check(cudart().cudaStreamSynchronize(self.raw), "cudaStreamSynchronize")

    def wait(self, event: Event) -> None:
        """Work queued on this stream from now on starts after `event` (recorded elsewhere) completes."""
        check(cudart().cudaStreamWaitEvent(self.raw, event.raw, 0), "cudaStreamWaitEvent")

    def close(self) -> None:
        self._destroy()


class Event:
    """A CUDA event, for timing (`elapsed_ms`) and ordering work between streams (`timing=False`: lighter)."""

    def __init__(self, timing: bool = True):
        rt = cudart()
        if timing:
            self.raw = check(rt.cudaEventCreate(), "cudaEventCreate")
        else:
            self.raw = check(rt.cudaEventCreateWithFlags(rt.cudaEventDisableTiming), "cudaEventCreateWithFlags")
        self._destroy = _finalizer(self, rt.cudaEventDestroy, self.raw)

    def record(self, stream: Stream) -> None:
        check(cudart().cudaEventRecord(self.raw, stream.raw), "cudaEventRecord")

    def synchronize(self) -> None:
        check(cudart().cudaEventSynchronize(self.raw), "cudaEventSynchronize")

    def elapsed_ms(self, start: Event) -> float:
        """Milliseconds from `start` to this event (both recorded, this one completed)."""
        return float(check(cudart().cudaEventElapsedTime(start.raw, self.raw), "cudaEventElapsedTime"))

    def close(self) -> None:
        self._destroy()


def _copy(dst_ptr: int, src_ptr: int, nbytes: int, stream: Stream, kind: str, what: str) -> None:
    rt = cudart()
    check(rt.cudaMemcpyAsync(dst_ptr, src_ptr, nbytes, getattr(rt.cudaMemcpyKind, kind), stream.raw),
          f"cudaMemcpyAsync {what}")


def copy_to_device(dst_ptr: int, src_ptr: int, nbytes: int, stream: Stream) -> None:
    _copy(dst_ptr, src_ptr, nbytes, stream, "cudaMemcpyHostToDevice", "host→device")


def copy_to_host(dst_ptr: int, src_ptr: int, nbytes: int, stream: Stream) -> None:
    _copy(dst_ptr, src_ptr, nbytes, stream, "cudaMemcpyDeviceToHost", "device→host")


def copy_on_device(dst_ptr: int, src_ptr: int, nbytes: int, stream: Stream) -> None:
    _copy(dst_ptr, src_ptr, nbytes, stream, "cudaMemcpyDeviceToDevice", "device→device")


def fill(dst_ptr: int, value: int, nbytes: int, stream: Stream) -> None:
    """Set `nbytes` bytes at `dst_ptr` to the byte `value`, asynchronously."""
    if nbytes:
        check(cudart().cudaMemsetAsync(dst_ptr, value, nbytes, stream.raw), "cudaMemsetAsync")


def upload(array: np.ndarray, dst_ptr: int, stream: Stream, staging: PinnedBuffer) -> None:
    """Copy `array` into device memory through pinned `staging` (which must outlive the copy)."""
    array = np.ascontiguousarray(array)
    staging.ensure(array.nbytes)
    staging.view(array.shape, array.dtype)[...] = array
    copy_to_device(dst_ptr, staging.ptr, array.nbytes, stream)


class CudaGraph:
    """Work on a stream captured once and replayed with one launch (fixed shapes and addresses only)."""

    _capture_lock = threading.Lock()

    def __init__(self, graph_exec: Any):
        rt = cudart()
        self.raw = graph_exec
        self._destroy = _finalizer(self, rt.cudaGraphExecDestroy, graph_exec)

    @classmethod
    def capture(cls, stream: Stream, work: Callable[[], Any]) -> CudaGraph | None:
        """Capture `work()` on `stream`; None when it cannot be captured (the caller runs it eagerly)."""
        rt = cudart()
        # One capture at a time: TensorRT may touch shared state while enqueueing, and a global-mode
        # capture elsewhere would otherwise invalidate ours.
        with cls._capture_lock:
            try:
                check(rt.cudaStreamBeginCapture(stream.raw, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal),
                      "cudaStreamBeginCapture")
            except CudaError:
                return None
            ok = True
            try:
                work()
            except Exception:
                ok = False
            err, graph = rt.cudaStreamEndCapture(stream.raw)
            rt.cudaGetLastError()  # a failed capture leaves its error as the last error; clear it
            if not ok or int(err) != 0 or graph is None:
                return None
            try:
                exe = check(rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
            except CudaError:
                return None
            finally:
                rt.cudaGraphDestroy(graph)
        return cls(exe)

    def launch(self, stream: Stream) -> None:
        check(cudart().cudaGraphLaunch(self.raw, stream.raw), "cudaGraphLaunch")

    def close(self) -> None:
        self._destroy()
