"""trtnet.allocator: glibc keeps image-sized blocks for the next request instead of mapping them afresh."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from trtnet import allocator

GLIBC = platform.libc_ver()[0] == "glibc"

# a request's blocks: an encoded image (150 KiB) copied twice, all freed before the next request. glibc's adaptive
# threshold serves one such block from the heap after the first, but trims a free heap top of two at once
FAULTS = """
import resource, sys
from trtnet.allocator import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory()
image = bytes(150 * 1024)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(1000):
    received = bytearray(image)
    unpacked = bytes(received)
    del received, unpacked
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True)
    return int(done.stdout)


@pytest.mark.skipif(not GLIBC, reason="mallopt's thresholds are glibc's")
def test_kept_blocks_spare_the_page_faults_of_each_request():
    default, kept = page_faults("default"), page_faults("kept")
    assert default > 10_000  # ~37 pages faulted in per block, by default
    assert kept < default / 20


def test_the_environment_gets_the_thresholds_unless_the_user_tuned_or_opted_out():
    assert allocator.with_allocator_env({"PATH": "/bin"}) == {"PATH": "/bin", **allocator.ENV}
    for own in ({"MALLOC_TRIM_THRESHOLD_": "1"}, {"TRTNET_KEEP_FREED_MEMORY": "0"}):
        assert allocator.with_allocator_env({"PATH": "/bin", **own}) == {"PATH": "/bin", **own}


def test_an_opted_out_process_keeps_glibcs_behaviour(monkeypatch):
    monkeypatch.setenv("TRTNET_KEEP_FREED_MEMORY", "0")
    assert not allocator.keep_freed_memory()
