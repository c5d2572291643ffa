"""The direct baseline for the serving table (issue 16): the same runner `trtnet.serve` opens, called in one
process on the same images decoded the same way, at batch 1, 8, 32.

    python tests/gpu/serve_direct.py ENGINE --images bus.jpg zidane.jpg [--batches 1,8,32] [--seconds 2]
        [--json direct.json]
    python tests/gpu/serve_direct.py yolov5n.wts --device cpu --imgsz 320 --images ...   # the CPU path

Two rows per batch size: `encoded` decodes the JPEG/PNG bytes in the timed loop as the server does
(`trtnet.serve.run_inputs` with the instance's decoder: JPEGs on the GPU where nvImageCodec is, `--decode`),
`decoded` starts from decoded BGR images (the runner alone). Each row is
warmed up, then timed by the wall clock over at least `--seconds`; throughput is images per second. Batches
above the engine's profile are clamped to its largest.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from trtnet.image_decoding import cpu_decode  # noqa: E402
from trtnet.serve import Encoded, ServeSettings, instance_decoder, open_runner, run_inputs  # noqa: E402


@dataclass(frozen=True)
class DirectRow:
    mode: str  # "encoded" (decode in the loop) or "decoded"
    batch: int
    images: int
    seconds: float
    throughput: float  # images per second
    ms_per_batch: float


def parse_batches(text: str) -> list[int]:
    batches = [int(b) for b in text.split(",") if b.strip()]
    if not batches or min(batches) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive batch sizes such as 1,8,32")
    return batches


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("target", help="engine path (or, with --device cpu, weights)")
    p.add_argument("--images", nargs="+", required=True, help="image files, cycled to fill each batch")
    p.add_argument("--batches", type=parse_batches, default=[1, 8, 32], help="comma-separated batch sizes")
    p.add_argument("--seconds", type=float, default=2.0, help="timed wall clock per row, at least")
    p.add_argument("--warmup", type=int, default=5, help="untimed batches before each row")
    p.add_argument("--device", default="0", help="GPU index, or cpu")
    p.add_argument("--imgsz", type=int, default=640, help="--device cpu: network input size")
    p.add_argument("--decode", choices=("auto", "gpu", "cpu"), default="auto", help="as trtnet.serve's --decode")
    p.add_argument("--json", help="write the rows here")
    return p


def timed(call: Callable[[], None], batch: int, warmup: int, seconds: float) -> tuple[int, float]:
    """(images, seconds): `call` repeated until at least `seconds` of wall clock, after `warmup` calls."""
    for _ in range(warmup):
        call()
    calls, start = 0, time.perf_counter()
    while True:
        call()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return calls * batch, elapsed


def measure(runner, decoder, settings: ServeSettings, encoded: list[bytes], batch: int, warmup: int,
            seconds: float) -> list[DirectRow]:
    chunk = [Encoded(encoded[i % len(encoded)]) for i in range(batch)]
    decoded = [cpu_decode(x.data) for x in chunk]
    calls = {"encoded": lambda: run_inputs(runner, decoder, chunk, settings),
             "decoded": lambda: runner.detect_loaded(decoded)}
    rows = []
    for mode, call in calls.items():
        images, elapsed = timed(call, batch, warmup, seconds)
        rows.append(DirectRow(mode, batch, images, elapsed, images / elapsed, elapsed / (images / batch) * 1e3))
    return rows


def engine_limit(runner) -> int | None:
    engine = getattr(runner, "engine", None)
    return engine.max_batch if engine is not None else None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    device = "cpu" if args.device.strip().lower() == "cpu" else int(args.device)
    settings = ServeSettings(args.target, devices=(device,), imgsz=args.imgsz, decode=args.decode)  # NMS defaults
    encoded = [Path(p).read_bytes() for p in args.images]
    runner = open_runner(settings, device)
    try:
        limit = engine_limit(runner)
        batches = sorted({min(b, limit) if limit else b for b in args.batches})
        with instance_decoder(runner, settings) as decoder:  # closed before the runner (run L crashed at exit)
            on_gpu = decoder.uses_gpu
            rows = [row for b in batches for row in measure(runner, decoder, settings, encoded, b, args.warmup,
                                                             args.seconds)]
    finally:
        runner.close()
    print(f"encoded images decoded on the {'GPU (nvImageCodec)' if on_gpu else 'CPU (OpenCV)'}")
    print(f"{'mode':>8} {'batch':>5} {'images':>7} {'images/s':>10} {'ms/batch':>9}")
    for r in rows:
        print(f"{r.mode:>8} {r.batch:>5} {r.images:>7} {r.throughput:>10.1f} {r.ms_per_batch:>9.2f}")
    if args.json:
        report = {"target": args.target, "device": str(device), "images": args.images, "engine_max_batch": limit,
                  "decoder": "gpu" if on_gpu else "cpu",
                  "rows": [asdict(r) for r in rows]}
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
