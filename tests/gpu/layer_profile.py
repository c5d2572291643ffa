"""Where an engine's time goes, layer by layer (GPU machine): TensorRT's IProfiler over many runs of the engine
alone, per-layer mean ms, sorted; layers are grouped by kind (INT8 convolutions, fp16 ones, reformatting copies
between precisions, pointwise, ...) from the names TensorRT gives the fused layers.

    tests/gpu/py39.sh tests/gpu/layer_profile.py ENGINE [ENGINE …] --batch 32 --runs 50 --json OUT.json

Profiling serialises the layers (each is timed alone), so the total is above the engine's CUDA-event time;
the shares are what matter.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

KINDS = (  # (kind, pattern on TensorRT's layer name); the first that matches
    ("reformat", r"reformat|copynode|reformatting"),
    ("quantize", r"quantize|QuantizeLinear|DequantizeLinear"),
    ("conv", r"conv|model\.\d+\.m\.\d+\.weight|\.weight"),
    ("concat/slice", r"concat|slice"),
    ("resize", r"resize|upsample"),
    ("pool", r"pool"),
    ("pointwise", r"pwn|pointwise|activation|sigmoid|elementwise"),
)


def kind_of(name: str) -> str:
    return next((kind for kind, pattern in KINDS if re.search(pattern, name, re.IGNORECASE)), "other")


def profile(path: str, batch: int, runs: int) -> dict:
    import numpy as np

    from trtnet import compat
    from trtnet.engine import Engine

    times: dict[str, list[float]] = defaultdict(list)

    class Profiler(compat.trt().IProfiler):
        def __init__(self):
            super().__init__()  # TensorRT's Python trampoline needs its base initialised

        def report_layer_time(self, layer_name, ms):
            times[layer_name].append(ms)

    with Engine(path) as engine, engine.checkout() as worker:
        worker.prepare(batch)
        x = np.random.default_rng(0).random((batch, *engine.inputs[engine.input_name].shape[1:]), np.float32)
        worker.infer({engine.input_name: x}, batch)  # warm up, unprofiled
        worker.context.profiler = Profiler()
        for _ in range(runs):
            worker.enqueue(batch)
            worker.stream.synchronize()
    layers = sorted(((name, sum(t) / len(t)) for name, t in times.items()), key=lambda item: -item[1])
    total = sum(ms for _, ms in layers)
    by_kind: dict[str, float] = defaultdict(float)
    for name, ms in layers:
        by_kind[kind_of(name)] += ms
    return {"engine": Path(path).name, "batch": batch, "runs": runs, "total_ms": round(total, 4),
            "by_kind_ms": {k: round(v, 4) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "layers": [{"name": name, "ms": round(ms, 5), "kind": kind_of(name)} for name, ms in layers]}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("engines", nargs="+")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    reports = [profile(e, args.batch, args.runs) for e in args.engines]
    for r in reports:
        print(f"\n{r['engine']} batch {r['batch']}: {r['total_ms']:.3f} ms summed over {len(r['layers'])} layers")
        print("  by kind: " + ", ".join(f"{k} {v:.3f} ({v / r['total_ms']:.0%})" for k, v in r["by_kind_ms"].items()))
        for layer in r["layers"][:args.top]:
            print(f"  {layer['ms']:8.4f} ms  {layer['kind']:12} {layer['name'][:110]}")
    if args.json:
        args.json.write_text(json.dumps(reports, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
