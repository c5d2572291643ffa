"""Where the host time of one `Detector.detect` call goes (GPU machine): cProfile over many batch-1 calls.

    python tests/gpu/profile_detect.py ENGINE [--calls 300] [--cuda-graphs] [--pinned] [--no-cprofile]

Prints the mean wall time per call, then the functions with the most own time. Time spent waiting for
the GPU shows up in the stream synchronize. `--pinned`: the frame in page-locked memory, called as
`trtnet.bench`'s "e2e pinned" row calls it (`detect_loaded`); `--no-cprofile`: the timed calls only, for a
sampling profiler outside (tests/gpu/spy.sh; cProfile's own cost distorts calls this short).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from trtnet.api import Detector  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("engine")
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--cuda-graphs", action="store_true")
    p.add_argument("--pinned", action="store_true", help="the frame in page-locked memory (bench's e2e pinned)")
    p.add_argument("--no-cprofile", action="store_true", help="only the timed calls")
    args = p.parse_args()
    frame = np.random.default_rng(0).integers(0, 256, (1080, 810, 3), dtype=np.uint8)
    with Detector(args.engine, cuda_graphs=args.cuda_graphs) as detector:
        if args.pinned:
            from trtnet.bench import pinned_copies

            frames = pinned_copies([frame])

            def call() -> None:
                detector.detect_loaded(frames)
        else:
            def call() -> None:
                detector.detect(frame)
        for _ in range(20):
            call()
        times = []
        for _ in range(args.calls):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        print(f"{'detect_loaded, pinned' if args.pinned else 'detect'}, batch 1: mean "
              f"{np.mean(times) * 1e3:.3f} ms, p50 {np.median(times) * 1e3:.3f} ms per call ({args.calls} calls)")
        if args.no_cprofile:
            return
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(args.calls):
            call()
        profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
