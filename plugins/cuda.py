"""The one Python side of every kernel in this folder: NVRTC compile → cubin cache → module → launch.

Kernels are plain CUDA C files here (`letterbox.cu`, `decode.cu`, `nms.cu`, …, sharing `common.cuh`),
compiled with NVRTC through cuda-python to a cubin for the device's exact compute capability (a cubin
needs no driver JIT, which a driver older than NVRTC could not do for PTX). Cubins are cached on disk,
keyed by source, arch, NVRTC version and options; modules are loaded once per process per CUDA context.

    launch("nms.nms_scan", grid=(batch,), block=(256,), args=[params], stream=stream)

`args` are ctypes values (`ctypes.c_int(…)`, `ctypes.c_uint64(ptr)`, a `ctypes.Structure`): their
types must be exactly the kernel's parameter types.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from trtnet.errors import TrtnetError
from trtnet.fileio import atomic_write

HERE = Path(__file__).resolve().parent
MODULES = tuple(sorted(p.stem for p in HERE.glob("*.cu")))  # letterbox, decode, nms, …
# --fmad=false: float expressions round exactly like the PyTorch/NumPy code the kernels reproduce.
OPTIONS = ("--std=c++17", "--fmad=false")

_lock = threading.Lock()
_initialized = False
_modules: dict[tuple[int, str], object] = {}  # (context, module name) → CUmodule
_functions: dict[tuple[int, str], object] = {}  # (context, "module.kernel") → CUfunction


@functools.lru_cache(maxsize=1)  # launches call this a dozen times per image: no import machinery each time
def _bindings():
    try:
        from cuda.bindings import driver, nvrtc
    except ImportError as exc:
        raise TrtnetError(
            f"cuda-python is needed for trtnet's CUDA kernels ({exc}): pip install cuda-python"
        ) from exc
    return driver, nvrtc


def _check_nvrtc(result, what: str):
    _, nvrtc = _bindings()
    err, *rest = result
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise TrtnetError(f"NVRTC {what} failed: {err.name}")
    return rest[0] if len(rest) == 1 else rest


def _check_cuda(result, what: str):
    err, *rest = result
    if err:  # CUDA_SUCCESS is 0
        driver, _ = _bindings()
        _, name = driver.cuGetErrorName(err)
        _, text = driver.cuGetErrorString(err)
        hint = ""
        if name.decode() == "CUDA_ERROR_INSUFFICIENT_DRIVER":
            from trtnet.cuda_rt import driver_too_old_hint

            hint = f"; {driver_too_old_hint()}"
        raise TrtnetError(f"CUDA {what} failed: {name.decode()} ({text.decode()}){hint}")
    return rest[0] if len(rest) == 1 else (rest or None)


def arch_name(arch) -> str:
    """85, "85", "sm_85", (8, 5) → "sm_85"."""
    if isinstance(arch, tuple):
        arch = f"{arch[0]}{arch[1]}"
    digits = str(arch).lower()
    digits = digits[3:] if digits.startswith("sm_") else digits
    if not digits.isdigit():
        raise TrtnetError(f"not a GPU architecture: {arch!r} (expected e.g. 86 or 'sm_86')")
    return f"sm_{digits}"


def nvrtc_version() -> tuple[int, int]:
    _, nvrtc = _bindings()
    try:
        return tuple(_check_nvrtc(nvrtc.nvrtcVersion(), "version"))
    except RuntimeError as exc:  # cuda-python raises this when libnvrtc cannot be found
        raise TrtnetError(
            f"NVRTC (the CUDA runtime compiler) is not available: {exc}. "
            "Install it with: pip install 'trtnet[nvrtc]' (or nvidia-cuda-nvrtc for your CUDA major)"
        ) from exc


def cache_dir() -> Path:
    root = os.environ.get("TRTNET_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "trtnet") / "kernels"


def headers() -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(HERE.glob("*.cuh"))}


def module_source(name: str) -> str:
    if name not in MODULES:
        raise TrtnetError(f"no kernel module {name!r} (have: {', '.join(MODULES)})")
    return (HERE / f"{name}.cu").read_text(encoding="utf-8")


def compile_cubin(source: str, arch, name: str = "kernel", include: dict[str, str] | None = None,
                  options: Sequence[str] = OPTIONS, use_cache: bool = True) -> bytes:
    """CUDA C source → cubin for `arch`, from the disk cache when this exact build was done before."""
    arch = arch_name(arch)
    include = headers() if include is None else include
    flags = (f"--gpu-architecture={arch}", *options)
    digest = hashlib.sha256()
    for part in (source, *include, *include.values(), *flags, repr(nvrtc_version())):
        digest.update(part.encode() + b"\0")
    path = cache_dir() / f"{name}-{arch}-{digest.hexdigest()[:24]}.cubin"
    if use_cache and path.is_file() and path.stat().st_size > 0:
        return path.read_bytes()
    cubin = _nvrtc_compile(source, name, arch, include, flags)
    if use_cache:
        try:
            with atomic_write(path) as f:
                f.write(cubin)
        except (TrtnetError, OSError):
            pass  # a read-only home is no reason to fail: the cubin is in hand
    return cubin


def _nvrtc_compile(source: str, name: str, arch: str, include: dict[str, str], flags) -> bytes:
    _, nvrtc = _bindings()
    nvrtc_version()  # a clear error when libnvrtc is missing
    prog = _check_nvrtc(
        nvrtc.nvrtcCreateProgram(source.encode(), f"{name}.cu".encode(), len(include),
                                 [v.encode() for v in include.values()], [k.encode() for k in include]),
        "create program",
    )
    try:
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(flags), [f.encode() for f in flags])
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise TrtnetError(
                f"NVRTC could not compile {name}.cu for {arch} ({err.name}):\n{_program_log(prog)}"
            )
        size = _check_nvrtc(nvrtc.nvrtcGetCUBINSize(prog), "cubin size")
        cubin = b" " * size
        _check_nvrtc(nvrtc.nvrtcGetCUBIN(prog, cubin), "get cubin")
        return cubin
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def _program_log(prog) -> str:
    _, nvrtc = _bindings()
    size = _check_nvrtc(nvrtc.nvrtcGetProgramLogSize(prog), "log size")
    log = b" " * size
    _check_nvrtc(nvrtc.nvrtcGetProgramLog(prog, log), "get log")
    return log.rstrip(b"\0 ").decode(errors="replace")


def compile_module(name: str, arch) -> bytes:
    """One of MODULES → cubin for `arch` (cached)."""
    return compile_cubin(module_source(name), arch, name)


def compile_all(arch) -> dict[str, bytes]:
    """Every kernel module for `arch` (no GPU needed): {module name: cubin}."""
    return {name: compile_module(name, arch) for name in MODULES}


# ---------------------------------------------------------------- device side


def current_context() -> int:
    """The calling thread's CUDA context (the primary context of device 0 when it has none)."""
    global _initialized
    driver, _ = _bindings()
    if not _initialized:
        try:
            _check_cuda(driver.cuInit(0), "init")
        except RuntimeError as exc:  # cuda-python cannot find libcuda
            raise TrtnetError(f"no NVIDIA driver found ({exc}): trtnet's CUDA kernels need an NVIDIA GPU") from exc
        _initialized = True
    ctx = _check_cuda(driver.cuCtxGetCurrent(), "get current context")
    if int(ctx) == 0:
        device = _check_cuda(driver.cuDeviceGet(0), "get device 0")
        ctx = _check_cuda(driver.cuDevicePrimaryCtxRetain(device), "retain primary context")
        _check_cuda(driver.cuCtxSetCurrent(ctx), "set current context")
    return int(ctx)


def device_arch() -> str:
    """Compute capability of the current context's device, as "sm_XY"."""
    driver, _ = _bindings()
    current_context()
    device = _check_cuda(driver.cuCtxGetDevice(), "get device")
    attr = driver.CUdevice_attribute
    major = _check_cuda(driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device), "cc")
    minor = _check_cuda(driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device), "cc")
    return f"sm_{major}{minor}"


def function(qualified: str):
    """"module.kernel" → CUfunction for the current context (compiling/loading the module once)."""
    ctx = current_context()
    key = (ctx, qualified)
    found = _functions.get(key)
    if found is not None:
        return found
    module_name, _, kernel = qualified.partition(".")
    driver, _ = _bindings()
    with _lock:
        module = _modules.get((ctx, module_name))
        if module is None:
            cubin = compile_module(module_name, device_arch())
            module = _check_cuda(driver.cuModuleLoadData(cubin), f"load module {module_name}")
            _modules[(ctx, module_name)] = module
        func = _check_cuda(driver.cuModuleGetFunction(module, kernel.encode()), f"find kernel {qualified}")
        _functions[key] = func
    return func


def _dims(dims: Sequence[int]) -> tuple[int, int, int]:
    dims = tuple(int(d) for d in dims) + (1, 1, 1)
    if min(dims[:3]) < 1:
        raise TrtnetError(f"bad launch dimensions {dims[:3]}")
    return dims[:3]


def launch(qualified: str, grid: Sequence[int], block: Sequence[int], args: Sequence, stream: int = 0,
           shared: int = 0) -> None:
    """Launch "module.kernel" asynchronously on `stream` (a CUstream/cudaStream_t as int; 0 = default)."""
    for i, arg in enumerate(args):
        if not isinstance(arg, (ctypes._SimpleCData, ctypes.Structure, ctypes.Array)):
            raise TypeError(f"{qualified} argument {i}: {arg!r} is not a ctypes value")
    pointers = (ctypes.c_void_p * max(1, len(args)))(*[ctypes.addressof(a) for a in args])
    driver, _ = _bindings()
    _check_cuda(
        driver.cuLaunchKernel(function(qualified), *_dims(grid), *_dims(block), int(shared),
                              driver.CUstream(int(stream)), ctypes.addressof(pointers), 0),
        f"launch {qualified}",
    )


def memset32(ptr: int, value: int, count: int, stream: int = 0) -> None:
    """Fill `count` 32-bit words at device address `ptr`, asynchronously on `stream`."""
    driver, _ = _bindings()
    if count:
        _check_cuda(driver.cuMemsetD32Async(driver.CUdeviceptr(int(ptr)), int(value), int(count),
                                            driver.CUstream(int(stream))), "memset")
