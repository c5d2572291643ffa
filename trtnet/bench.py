"""`python -m trtnet.bench`: latency and throughput of an engine, end to end, and against PyTorch.

    python -m trtnet.bench weights/yolov5s.fp16.engine --batch 1,8,32 --iters 200
    python -m trtnet.bench weights/resnet50.fp16.engine --compare-torch --json bench.json
    python -m trtnet.bench yolov5s --compare-torch --yolov5-src ~/yolov5
    python -m trtnet.bench kernels              # the pre/post-processing kernels alone
    python -m trtnet.bench yolov5n --files DIR --batch 32 --decode both   # JPEG files → boxes (trtnet.bench_files)

Per batch size:
- engine: the engine alone on device buffers, timed with CUDA events (p50/p99 of --iters runs after
  --warmup runs); with --cuda-graphs each run is one graph launch.
- end-to-end: host uint8 images (1080x810 BGR, bus.jpg's size) → final boxes / class scores on the host:
  upload, GPU letterbox (or ImageNet preprocessing), engine, decode + NMS, download — wall-clock time of
  one call. "e2e pinned": the same with the images in page-locked memory (no host copy before the
  upload). "streamed" (detectors): `Detector.stream` over a stream of such images, the time per batch
  when each batch is uploaded and queued while the GPU runs the previous one (video throughput).
- torch (--compare-torch): the same model in PyTorch fp16 on the same GPU, eager and as a CUDA graph.
  ResNet: torchvision's resnet with the engine's own weights. YOLOv5: the official code (--yolov5-src)
  with the checkpoint (.pt) beside the weights; its forward includes Detect's decode, the engine's not.
  YOLOv8/YOLO11: the official `ultralytics` package's model of the .pt (in --weights-dir or beside the
  engine), fused; its forward and the engine both end in the decoded [B, 4 + nc, N] output.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from trtnet import networks
from trtnet.cli import add_weights_dir, command_parser, run
from trtnet.errors import TrtnetError

E2E_IMAGE_HW = (1080, 810)


@dataclass
class Timing:
    mode: str  # engine | end-to-end | torch eager | torch graph
    batch: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    images_per_s: float
    note: str = ""
    stages: dict | None = None  # files mode: per stage mean ms and share (trtnet.bench_files)

    @classmethod
    def of(cls, mode: str, batch: int, samples_ms: Sequence[float], note: str = "") -> Timing:
        ms = np.asarray(samples_ms, dtype=np.float64)
        mean = float(ms.mean())
        return cls(mode, batch, float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), mean,
                   batch * 1000.0 / mean if mean > 0 else float("inf"), note)


def measure(step: Callable[[], float], iters: int, warmup: int) -> list[float]:
    """Run `step` (returns milliseconds) warmup + iters times; the timed samples."""
    for _ in range(warmup):
        step()
    return [step() for _ in range(iters)]


# ------------------------------------------------------------------------------------------ trtnet


def engine_step(engine, batch: int) -> Callable[[], float]:
    """One engine run on this thread's buffers (filled with random input), timed with CUDA events."""
    from trtnet import cuda_rt

    worker = engine.worker()
    shapes = worker.prepare(batch)
    rng = np.random.default_rng(0)
    for name, spec in engine.inputs.items():
        value = rng.random(shapes[name], dtype=np.float32).astype(spec.dtype)
        cuda_rt.upload(value, worker.ptr(name), worker.stream, worker.host[name])
    worker.stream.synchronize()
    start, end = cuda_rt.Event(), cuda_rt.Event()

    def step() -> float:
        start.record(worker.stream)
        worker.enqueue(batch)
        end.record(worker.stream)
        end.synchronize()
        return end.elapsed_ms(start)

    return step


def synthetic_images(count: int, hw: tuple[int, int] = E2E_IMAGE_HW) -> list[np.ndarray]:
    """Deterministic BGR images with some structure (gradients + noise), not all zeros."""
    rng = np.random.default_rng(1)
    h, w = hw
    base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * np.ones((h, 1, 3), np.float32)
    return [np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8) for _ in range(count)]


def pinned_copies(images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The images in page-locked memory (as frames decoded into `cuda_rt.pinned_array`s would be)."""
    from trtnet import cuda_rt

    copies = [cuda_rt.pinned_array(image.shape, image.dtype) for image in images]
    for copy, image in zip(copies, images):
        copy[...] = image
    return copies


def end_to_end_step(model, batch: int, pinned: bool = False) -> Callable[[], float]:
    images = synthetic_images(batch)
    if pinned:
        images = pinned_copies(images)
    # Detector: boxes mapped to the images; Classifier: logits (softmax and top-k are a few µs more)
    run_images = getattr(model, "detect_loaded", model.pipeline.run)

    def step() -> float:
        t0 = time.perf_counter()
        run_images(images)
        return (time.perf_counter() - t0) * 1000.0

    return step


def streamed_samples(detector, batch: int, iters: int, warmup: int) -> list[float]:
    """Milliseconds between consecutive batches of results from `Detector.stream` (images uploaded and
    queued while the GPU runs the previous batch): the time per batch of a video-like stream."""
    images = synthetic_images(batch)
    frames = (images[k % batch] for k in range((warmup + iters + 1) * batch))
    stamps = []
    for done, _ in enumerate(detector.stream(frames, batch=batch), start=1):
        if done % batch == 0:
            stamps.append(time.perf_counter())
    return list(np.diff(stamps[warmup:]) * 1000.0)


def open_model(engine_path: str, cuda_graphs: bool, weights_dir: str):
    from trtnet.api import Classifier, Detector
    from trtnet.engine_files import engine_task, resolve_engine

    path = resolve_engine(engine_path, weights_dir)
    cls = Detector if engine_task(path) == "detect" else Classifier
    return cls(path, cuda_graphs=cuda_graphs, weights_dir=weights_dir)


# ------------------------------------------------------------------------------------------ torch


def torch_model(meta: dict, engine_path: Path, weights_dir: str, official_src: str | None):
    """(model, why-not): the engine's model in PyTorch fp16 on the GPU (its family loads it), or None and why."""
    return networks.torch_model(meta, engine_path, weights_dir, official_src)


def torch_steps(torch, model, shape: tuple) -> dict[str, Callable[[], float]]:
    """Eager and CUDA-graph steps for `model` on a random fp16 input of `shape`, timed with CUDA events."""
    x = torch.rand(shape, device="cuda", dtype=torch.float16)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def timed(fn: Callable[[], object]) -> Callable[[], float]:
        def step() -> float:
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)

        return step

    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                model(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(x)

    def eager():
        with torch.inference_mode():
            model(x)

    return {"torch eager": timed(eager), "torch graph": timed(graph.replay)}


# ------------------------------------------------------------------------------------------ report


def table(timings: list[Timing]) -> str:
    engine_ms = {t.batch: t.mean_ms for t in timings if t.mode == "engine"}
    rows = [f"{'mode':<12} {'batch':>5} {'p50 ms':>9} {'p99 ms':>9} {'img/s':>10} {'vs engine':>9}  note"]
    for t in timings:
        ratio = t.mean_ms / engine_ms[t.batch] if engine_ms.get(t.batch) and t.mode != "engine" else None
        rows.append(f"{t.mode:<12} {t.batch:>5} {t.p50_ms:>9.3f} {t.p99_ms:>9.3f} {t.images_per_s:>10.1f} "
                    f"{f'{ratio:.2f}x' if ratio else '':>9}  {t.note}")
    return "\n".join(rows)


def parse_batches(text: str) -> list[int]:
    try:
        batches = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise TrtnetError(f"--batch {text}: give comma-separated sizes, e.g. 1,8,32") from None
    if not batches or min(batches) < 1:
        raise TrtnetError(f"--batch {text}: sizes must be at least 1")
    return batches


# ------------------------------------------------------------------------------------------ commands


def bench_engine(args) -> list[Timing]:
    timings: list[Timing] = []
    with open_model(args.engine, args.cuda_graphs, args.weights_dir) as model:
        engine = model.engine
        torch_model_, why_not = (None, "")
        if args.compare_torch:
            torch_model_, why_not = torch_model(engine.meta.to_dict(), engine.path, args.weights_dir, args.official_src)
            if torch_model_ is None:
                print(f"note: no PyTorch comparison: {why_not}", file=sys.stderr)
        for batch in parse_batches(args.batch):
            if not engine.min_batch <= batch <= engine.max_batch:
                print(f"note: batch {batch} skipped: the engine's profile is {engine.min_batch}.."
                      f"{engine.max_batch} (rebuild with --max-batch to time it)", file=sys.stderr)
                continue
            timings.append(Timing.of("engine", batch, measure(engine_step(engine, batch), args.iters, args.warmup),
                                     "cuda graph" if args.cuda_graphs else ""))
            if getattr(args, "files", None):
                from trtnet.bench_files import file_timings

                timings += file_timings(model, args.files, batch, args.decode, args.iters, args.warmup,
                                        args.decode_threads)
            else:
                timings += end_to_end_timings(model, batch, args)
            if torch_model_ is not None:
                timings += torch_timings(torch_model_, (batch, 3, *engine.imgsz), args)
    return timings


def end_to_end_timings(model, batch: int, args) -> list[Timing]:
    """One call per batch from pageable and from page-locked images; for detectors also a stream."""
    size = f"{E2E_IMAGE_HW[1]}x{E2E_IMAGE_HW[0]} uint8 → results"
    timings = [Timing.of(mode, batch, measure(end_to_end_step(model, batch, pinned), args.iters, args.warmup),
                         f"{size}{note}")
               for mode, pinned, note in (("end-to-end", False, ""), ("e2e pinned", True, ", images in pinned memory"))]
    if hasattr(model, "stream"):
        samples = streamed_samples(model, batch, args.iters, args.warmup)
        timings.append(Timing.of("streamed", batch, samples, f"{size}, next batch queued during this one"))
    return timings


def torch_timings(model, shape: tuple, args) -> list[Timing]:
    import torch

    return [Timing.of(mode, shape[0], measure(step, args.iters, args.warmup), "fp16")
            for mode, step in torch_steps(torch, model, shape).items()]


def bench_torch_only(args) -> list[Timing]:
    """The PyTorch side alone, from the engine's metadata and weights: for machines where TensorRT's
    Python and torch live in different interpreters (run both on the same GPU, one after the other)."""
    from trtnet.engine_files import load_metadata, resolve_engine

    path = resolve_engine(args.engine, args.weights_dir)
    meta = load_metadata(path)
    model, why_not = torch_model(meta.to_dict(), path, args.weights_dir, args.official_src)
    if model is None:
        raise TrtnetError(f"--torch-only: {why_not}")
    h, w = meta.imgsz
    return [t for batch in parse_batches(args.batch) for t in torch_timings(model, (batch, 3, h, w), args)]


def kernels_main(argv: Sequence[str]) -> int | None:
    try:
        from trtnet import bench_kernels
    except ImportError as exc:
        raise TrtnetError(f"the kernel benchmark is not available: {exc}") from exc
    return bench_kernels.main(list(argv))


def main(argv: Sequence[str] | None = None) -> int | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["kernels"]:
        return kernels_main(argv[1:])
    p = parser()
    args = p.parse_args(argv)
    if args.iters < 1 or args.warmup < 0:
        p.error("--iters must be at least 1 and --warmup at least 0")
    return run_bench(args)


def parser() -> argparse.ArgumentParser:
    p = command_parser("bench", "Latency and throughput of an engine (engine only and end to end), optionally vs "
                        "PyTorch. `trtnet bench kernels --help`: the pre/post-processing kernels.")
    p.add_argument("engine", help="engine path or name (yolov5n → weights/yolov5n.fp16.640.engine), or 'kernels'")
    p.add_argument("--batch", default="1,8,32", help="comma-separated batch sizes (within the engine's profile)")
    p.add_argument("--iters", type=int, default=200, help="timed runs per measurement")
    p.add_argument("--warmup", type=int, default=20, help="untimed runs first")
    p.add_argument("--cuda-graphs", action="store_true", help="run the engine (and NMS) as CUDA graphs")
    p.add_argument("--compare-torch", action="store_true", help="also time the model in PyTorch fp16")
    p.add_argument("--torch-only", action="store_true", help="time only the PyTorch side (where torch and "
                   "TensorRT live in different Pythons; no engine is loaded)")
    p.add_argument("--yolov5-src", dest="official_src",
                   help="folder of the official ultralytics/yolov5 code (for --compare-torch)")
    p.add_argument("--json", nargs="?", const="-", metavar="PATH", help="write the results as JSON (- = stdout)")
    p.add_argument("--files", metavar="DIR", help="image files → boxes instead of the end-to-end rows: images/s and "
                   "time per stage, per decoder (--iters batches, the folder cycled; see trtnet.bench_files)")
    p.add_argument("--decode", choices=("cpu", "gpu", "both"), default="both",
                   help="--files: OpenCV on the CPU, nvImageCodec on the GPU, or both")
    p.add_argument("--decode-threads", type=int, default=0, metavar="N",
                   help="--files: host threads nvImageCodec may use for its share of the decode (0: one per core)")
    add_weights_dir(p, "where engine names are looked up")
    return p


def run_bench(args) -> int:
    timings = bench_torch_only(args) if args.torch_only else bench_engine(args)
    if args.json == "-":
        print(json.dumps([asdict(t) for t in timings], indent=1))
        return 0
    print(table(timings))
    if args.json:
        from trtnet.fileio import atomic_write

        with atomic_write(args.json, "w") as f:
            json.dump([asdict(t) for t in timings], f, indent=1)
        print(f"wrote {args.json}")
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    return run(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
