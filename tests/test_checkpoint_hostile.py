"""Hostile or broken checkpoints: `python -m trtnet.gen_wts` refuses each one with exit status 2 and one
line naming the file and the rule broken, in under a second and 200 MB, writing nothing.

The files are made by tests/hostile.py at test time. gen_wts runs in a child process under an address
space limit, so that a reader that loses the fight fails the test instead of the machine.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import hostile
from tests.conftest import REPO, shared
from trtnet.safe_pickle import load_pickle

MAX_SECONDS = 1.0
MAX_RSS_MB = 200
_CHILD = """
import resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # a blow-up fails here, not on the machine
from trtnet.gen_wts import cli
start = time.perf_counter()
status = cli(sys.argv[1:])
seconds = time.perf_counter() - start
try:  # this process image's peak: ru_maxrss would also count the pytest process it was forked from
    peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
except OSError:
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"@@ {seconds:.3f} {peak_kb}", file=sys.stderr)
sys.exit(status)
"""


def gen_wts(checkpoint: Path, out: Path) -> tuple[int, str, float, float]:
    """Exit status, stderr without the measurement line, seconds in the reader, peak RSS in MB."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _CHILD, str(checkpoint), "-o", str(out)], capture_output=True,
                          text=True, timeout=30, env=env, cwd=REPO)
    measured = re.search(r"^@@ (\S+) (\d+)$", done.stderr, re.M)
    assert measured, done.stderr[-2000:]
    stderr = done.stderr.replace(measured.group(0), "").strip()
    return done.returncode, stderr, float(measured.group(1)), int(measured.group(2)) / 1024


def _laughs(tmp: Path) -> tuple[Path, str]:
    return hostile.write_zip(tmp / "laughs.pt", pickled=hostile.laughing_persistent_id(60)), "storage key"


def _laughing_key(tmp: Path) -> tuple[Path, str]:
    return hostile.write_zip(tmp / "key.pt", pickled=hostile.laughing_dict_key(60)), "more than 10000 nested tuples"


def _shared_tree(tmp: Path) -> tuple[Path, str]:
    return hostile.write_zip(tmp / "tree.pt", pickled=hostile.shared_module_tree(60)), "nested more than 100 deep"


def _shallow_shared_tree(tmp: Path) -> tuple[Path, str]:  # 2**30 visits within the depth limit
    path = hostile.write_zip(tmp / "tree30.pt", pickled=hostile.shared_module_tree(30))
    return path, "number more than 100000 when walked"


def _cycle(tmp: Path) -> tuple[Path, str]:
    return hostile.write_zip(tmp / "cycle.pt", pickled=hostile.module_cycle()), "contains itself"


def _long_chain(tmp: Path) -> tuple[Path, str]:
    return hostile.write_zip(tmp / "chain.pt", pickled=hostile.module_chain(100_000)), "more than 200000 opcodes"


def _deep_chain(tmp: Path) -> tuple[Path, str]:
    return hostile.write_zip(tmp / "chain1k.pt", pickled=hostile.module_chain(1000)), "nested more than 100 deep"


def _zero_stride(tmp: Path) -> tuple[Path, str]:
    view = hostile.Tensor(hostile.Storage(np.ones(1, np.float32)), 0, (1 << 30,), (0,))
    return hostile.write_zip(tmp / "stride0.pt", {"w": view}), "zero stride"


def _overlapping_views(tmp: Path) -> tuple[Path, str]:
    storage = hostile.Storage(np.ones(1 << 18, np.float32))  # 1 MiB, viewed whole 1000 times
    views = {f"w{i}": hostile.Tensor(storage, 0, (1 << 18,), (1,)) for i in range(1000)}
    return hostile.write_zip(tmp / "views.pt", views), "more tensor bytes than"


def _legacy_zero_stride(tmp: Path) -> tuple[Path, str]:
    view = hostile.Tensor(hostile.Storage(np.ones(1, np.float32), "0"), 0, (1 << 15, 1 << 15), (0, 0))
    return hostile.write_legacy(tmp / "stride0_legacy.pth", {"w": view}), "zero stride"


def _ndarray(tmp: Path) -> tuple[Path, str]:
    return hostile.write_zip(tmp / "ndarray.pt", {"w": hostile.ndarray_call((1 << 40,))}), "numpy.ndarray"


def _memo(tmp: Path) -> tuple[Path, str]:
    return hostile.write_zip(tmp / "memo.pt", pickled=hostile.memo_put(1 << 31)), "memo index"


def _legacy_count(tmp: Path) -> tuple[Path, str]:
    storage = hostile.Storage(np.ones(4, np.float32), "0")
    path = hostile.write_legacy(tmp / "count.pth", {"w": hostile.Tensor(storage, 0, (4,), (1,))},
                                counts={"0": 1 << 40})
    return path, "storage 0 declares"


def _zip_bomb(tmp: Path) -> tuple[Path, str]:
    return hostile.zip_bomb(tmp / "bomb.pt"), "inflates"


def _many_small_bombs(tmp: Path) -> tuple[Path, str]:  # 2 GiB from 2000 entries of 1 MiB, 1 kB each
    return hostile.many_small_bombs(tmp / "bombs.pt"), r"zip entries inflate to \d+ bytes from a \d+-byte file"


def _nc(tmp: Path) -> tuple[Path, str]:
    obj = hostile.as_writable(load_pickle(shared("weights", "yolov5n.pt")))
    detect = hostile.module_path(obj["model"], "model", "24")
    detect.state["nc"] = 200_000_000
    return hostile.write_zip(tmp / "nc.pt", obj), "Detect.nc = 200000000"


def _truncated(tmp: Path) -> tuple[Path, str]:
    data = shared("weights", "yolov5n.pt").read_bytes()
    path = tmp / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    return path, "truncated or corrupt checkpoint"


def _truncated_legacy(tmp: Path) -> tuple[Path, str]:
    path = hostile.write_legacy(tmp / "cut.pth", {"w": hostile.tensor(np.arange(1000, dtype=np.float32))})
    path.write_bytes(path.read_bytes()[:-100])
    return path, "truncated or corrupt checkpoint"


def _directory(tmp: Path) -> tuple[Path, str]:
    (tmp / "folder.pt").mkdir()
    return tmp / "folder.pt", "is a directory"


CASES = {"billion_laughs_pid": _laughs, "billion_laughs_dict_key": _laughing_key, "shared_module_tree_60": _shared_tree,
         "shared_module_tree_30": _shallow_shared_tree, "module_cycle": _cycle, "module_chain_100k": _long_chain,
         "module_chain_1k": _deep_chain, "zero_stride": _zero_stride, "overlapping_views": _overlapping_views,
         "legacy_zero_stride": _legacy_zero_stride, "ndarray_1tib": _ndarray, "memo_2_31": _memo,
         "legacy_count_2_40": _legacy_count, "zip_bomb_2gib": _zip_bomb,
         "zip_bomb_2000_entries": _many_small_bombs, "yolov5n_nc_2e8": _nc,
         "truncated": _truncated, "truncated_legacy": _truncated_legacy, "directory": _directory}


@pytest.mark.parametrize("case", list(CASES))
def test_refused_in_bounded_time_and_memory(tmp_path, case):
    checkpoint, rule = CASES[case](tmp_path)
    out = tmp_path / "out"
    status, stderr, seconds, rss_mb = gen_wts(checkpoint, out)
    assert status == 2, stderr
    assert len(stderr.splitlines()) == 1, stderr
    assert stderr.startswith("error: ") and str(checkpoint) in stderr, stderr
    assert re.search(rule, stderr), stderr
    assert seconds < MAX_SECONDS, (seconds, stderr)
    assert rss_mb < MAX_RSS_MB, (rss_mb, stderr)
    assert not out.exists() or not any(out.iterdir())
