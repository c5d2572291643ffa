"""glibc's allocator kept from returning image-sized blocks to the kernel, for processes that handle one request
after another (a serving instance, Triton itself, the benchmark's clients).

By default glibc maps every block over 128 KiB afresh and unmaps it when freed, or, once its adaptive threshold
has risen, trims the heap's free top as soon as it exceeds twice that: an encoded image (~150 KiB) or a batch's
outputs then cost page faults (the kernel zeroing new pages) on every request, for memory just given back.
Measured on the CPU machine (tests/serve_overhead.py: Triton's Python backend, a model that only unpacks requests
and packs responses, 8 clients, two rounds): the stub's CPU time per request 447-533 → 253-270 µs, Triton's
`compute_infer` per request 1.8-2.3 → 1.1-1.3 ms, 21 % more requests a second. Either setting alone did not
help. The cost: up to TRIM_THRESHOLD of freed memory stays with each process; TRTNET_KEEP_FREED_MEMORY=0 keeps
glibc's own behaviour, as do MALLOC_* variables the user set.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping

MMAP_THRESHOLD = 16 << 20  # blocks below this come from the heap (a batch of 32 encoded images is ~5 MiB)
TRIM_THRESHOLD = 64 << 20  # free heap top kept before glibc gives it back
# the same for processes started with this environment (glibc reads them at startup)
ENV = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # malloc.h
OPT_OUT = "TRTNET_KEEP_FREED_MEMORY"  # "0": glibc's defaults


def wanted(env: Mapping[str, str] = os.environ) -> bool:
    """Unless the user opted out, or tuned glibc's allocator themselves."""
    return env.get(OPT_OUT, "1") != "0" and not any(key in env for key in ENV)


def keep_freed_memory() -> bool:
    """This process: glibc's mallopt with the thresholds above. False where the user opted out (`wanted`), the C
    library has no mallopt (not glibc) or refuses them; nothing changes then."""
    if not wanted():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1


def with_allocator_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` plus ENV's settings where `wanted`, for the processes started with it."""
    return {**ENV, **env} if wanted(env) else dict(env)
