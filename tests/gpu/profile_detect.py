"""Where the host time of one `Detector.detect` call goes (GPU machine): cProfile over many batch-1 calls.

    python tests/gpu/profile_detect.py ENGINE [--calls 300] [--cuda-graphs]

Prints the mean wall time per call, then the functions with the most own time. Time spent waiting for
the GPU shows up in the stream synchronize.
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
    args = p.parse_args()
    frame = np.random.default_rng(0).integers(0, 256, (1080, 810, 3), dtype=np.uint8)
    with Detector(args.engine, cuda_graphs=args.cuda_graphs) as detector:
        for _ in range(20):
            detector.detect(frame)
        start = time.perf_counter()
        for _ in range(args.calls):
            detector.detect(frame)
        print(f"detect, batch 1: {(time.perf_counter() - start) / args.calls * 1e3:.3f} ms per call")
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(args.calls):
            detector.detect(frame)
        profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
