"""Where `Detector.stream` spends its time, per stage, on the host and on the GPU (issue 15: the static-engine
streamed path is 1.5-1.9x its engine time while the dynamic engine's is 1.1x). GPU machine:

    python tests/gpu/profile_stream.py ENGINE [ENGINE…] --json OUT.json [--frames 300] [--cuda-graphs] \
        [--depth 2] [--batch 1] [--pinned]

For each engine, `Detector.stream` over --frames synthetic 1080x810 frames with:
- host timers around every call the streamed path makes (Worker.prepare, stage_images and its copies,
  the letterbox launch, Worker.enqueue with execute_async_v3 / graph capture / graph launch, the result
  download, Stream.wait, and each Event.synchronize by what it waits for: `uploaded` (the caller's frame
  may be reused) or `done` (results landed)), split by the thread that made it and by whether the worker
  is the engine's shared one (dynamic) or this thread's own (static: per-thread contexts);
- a CUDA timing event on the compute stream before each run's letterbox and after its download, one on
  the upload stream after each upload: the GPU's busy time per run, the idle gap before the next run
  starts on the GPU, and where the host was (which call) while the GPU was idle;
- the engine alone at the same batch (bench's engine row): the ceiling.
Variants (--variants): the given settings, then with graphs toggled, depth 1 and 3, pinned frames; each
one a row, so the serialising piece shows up as the setting that moves the gap.

The JSON per (engine, variant): streamed ms per batch (p50, mean), engine ms p50, their ratio, host calls
{name: count, mean_us, total_ms}, GPU busy/gap per run (p50, p90), the host call in flight at each gap's
start (counts), and the worker kind (shared | per-thread) with its context/stream handles.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from trtnet import cuda_rt, engine, pipelines  # noqa: E402
from trtnet.api import Detector  # noqa: E402
from trtnet.bench import engine_step, measure, pinned_copies, synthetic_images  # noqa: E402


class HostCalls:
    """Host time per instrumented call, and which call is running at any moment (for the GPU gaps)."""

    def __init__(self):
        self.samples: dict[str, list[float]] = defaultdict(list)
        self.spans: list[tuple[float, float, str]] = []  # (start, end, name) of outermost calls
        self._depth = threading.local()

    def wrap(self, owner, attribute: str, name: str | None = None, by=None):
        """Replace owner.attribute with a timed version (`by(*args)` may refine the name)."""
        original = getattr(owner, attribute)
        label = name or f"{getattr(owner, '__name__', owner)}.{attribute}"

        @functools.wraps(original)
        def timed(*args, **kwargs):
            key = by(*args) if by else label
            depth = getattr(self._depth, "n", 0)
            self._depth.n = depth + 1
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                end = time.perf_counter()
                self._depth.n = depth
                self.samples[key].append(end - start)
                if depth == 0:
                    self.spans.append((start, end, key))

        setattr(owner, attribute, timed)
        return original

    def summary(self) -> dict:
        return {name: {"count": len(v), "mean_us": float(np.mean(v) * 1e6), "total_ms": float(np.sum(v) * 1e3)}
                for name, v in sorted(self.samples.items(), key=lambda kv: -sum(kv[1]))}

    def at(self, moment: float) -> str:
        for start, end, name in self.spans:
            if start <= moment <= end:
                return name
        return "python (between instrumented calls)"


@contextlib.contextmanager
def instrumented(detector):
    """Timers on every call of the streamed path; restored afterwards."""
    calls = HostCalls()
    patched = []

    def wrap(owner, attribute, name=None, by=None):
        patched.append((owner, attribute, calls.wrap(owner, attribute, name, by)))

    worker_kind = "shared (dynamic: one context, threads take turns)" if detector.engine.one_context \
        else "per-thread (static: this thread's own context)"

    def which_event(event, *_):
        for w in detector.engine._workers:
            if event is w.uploaded:
                return "Event.synchronize(uploaded: frame reusable)"
        return "Event.synchronize(done: results landed)"

    wrap(engine.Worker, "prepare")
    wrap(engine.Worker, "enqueue")
    wrap(engine.Worker, "_run", "Worker._run (execute_async_v3 + NMS launch)")
    wrap(cuda_rt.CudaGraph, "capture", "CudaGraph.capture")
    wrap(cuda_rt.CudaGraph, "launch")
    wrap(pipelines, "stage_images")
    wrap(pipelines, "_queue_download")
    wrap(pipelines, "_copy_pool")
    wrap(cuda_rt, "copy_to_device")
    wrap(cuda_rt, "copy_to_host")
    wrap(cuda_rt, "is_page_locked")
    wrap(cuda_rt.Stream, "wait")
    wrap(cuda_rt.Stream, "synchronize")
    wrap(cuda_rt.Event, "synchronize", by=which_event)
    wrap(cuda_rt.Event, "record")
    wrap(type(detector.pipeline.letterbox), "enqueue", "Letterbox.enqueue")
    if detector.pipeline.post is not None:
        wrap(type(detector.pipeline.post), "enqueue", "YoloPostprocess.enqueue")
    try:
        yield calls, worker_kind
    finally:
        for owner, attribute, original in reversed(patched):
            setattr(owner, attribute, original)


class GpuTimeline:
    """Events on the worker's streams around each run: `pipelines.DetectPipeline._submit` is wrapped to
    record one before the run's work and one after its download (compute stream), plus host stamps."""

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.runs: list[dict] = []
        worker = pipeline.engine.worker()  # this thread's (static) or the shared one (dynamic)
        self.base = cuda_rt.Event()
        _record(self.base, worker.stream)
        cuda_rt.check(cuda_rt.cudart().cudaEventSynchronize(self.base.raw))
        self.base_host = time.perf_counter()
        self._original = pipeline._submit

        def submit(worker, images, batch, slot, *args, **kwargs):
            begin, uploaded, end = cuda_rt.Event(), cuda_rt.Event(), cuda_rt.Event()
            host_begin = time.perf_counter()
            _record(begin, worker.stream)
            run = self._original(worker, images, batch, slot, *args, **kwargs)
            _record(uploaded, worker.upload_stream)
            _record(end, worker.stream)
            self.runs.append({"begin": begin, "uploaded": uploaded, "end": end, "host_begin": host_begin,
                              "host_queued": time.perf_counter()})
            return run

        pipeline._submit = submit

    def close(self) -> None:
        del self.pipeline._submit  # the class's method again

    def analyse(self, calls: HostCalls) -> dict:
        """Busy time per run, idle gap before each run on the GPU, and what the host did at each gap."""
        times = []
        for r in self.runs:
            cuda_rt.check(cuda_rt.cudart().cudaEventSynchronize(r["end"].raw))
            times.append((r["begin"].elapsed_ms(self.base), r["end"].elapsed_ms(self.base),
                          r["uploaded"].elapsed_ms(self.base)))
        busy = [end - begin for begin, end, _ in times]
        gaps = [max(times[k][0] - times[k - 1][1], 0.0) for k in range(1, len(times))]
        host_at_gap = Counter(calls.at(self.base_host + times[k - 1][1] / 1e3) for k in range(1, len(times)))
        return {
            "runs": len(times),
            "gpu_busy_ms": pct(busy), "gpu_gap_ms": pct(gaps),
            "gap_share": float(np.sum(gaps) / max(times[-1][1] - times[0][0], 1e-9)) if times else 0.0,
            "host_queue_ms": pct([(r["host_queued"] - r["host_begin"]) * 1e3 for r in self.runs]),
            "host_call_at_gap_start": dict(host_at_gap.most_common(8)),
        }


def _record(event: cuda_rt.Event, stream: cuda_rt.Stream) -> None:
    """Event.record without the host timers (the profiler's own events are not the path's calls)."""
    cuda_rt.check(cuda_rt.cudart().cudaEventRecord(event.raw, stream.raw))


def pct(values) -> dict:
    if not len(values):
        return {}
    v = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90)), "mean": float(v.mean())}


def profile_stream(detector, frames: int, batch: int, depth: int, pinned: bool) -> dict:
    images = synthetic_images(batch)
    if pinned:
        images = pinned_copies(images)
    for _ in detector.stream((images[k % batch] for k in range(20 * batch)), batch=batch, depth=depth):
        pass  # warm-up: graphs captured, buffers sized
    timeline = GpuTimeline(detector.pipeline)
    try:
        with instrumented(detector) as (calls, worker_kind):
            stamps = []
            source = (images[k % batch] for k in range(frames * batch))
            for done, _ in enumerate(detector.stream(source, batch=batch, depth=depth), start=1):
                if done % batch == 0:
                    stamps.append(time.perf_counter())
        gpu = timeline.analyse(calls)
    finally:
        timeline.close()
    per_batch = np.diff(stamps) * 1e3
    worker = detector.engine.worker()
    return {"streamed_ms": pct(per_batch), "worker": worker_kind, "gpu": gpu, "host_calls": calls.summary(),
            "handles": {"context": id(worker.context), "stream": worker.stream.handle,
                        "upload_stream": worker.upload_stream.handle, "thread": threading.get_ident()}}


def variants(args) -> list[dict]:
    base = {"cuda_graphs": args.cuda_graphs, "depth": args.depth, "pinned": args.pinned}
    if not args.variants:
        return [base]
    return [base, {**base, "cuda_graphs": not args.cuda_graphs}, {**base, "depth": 1}, {**base, "depth": 3},
            {**base, "pinned": not args.pinned}]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("engines", nargs="+")
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--cuda-graphs", action="store_true")
    p.add_argument("--pinned", action="store_true")
    p.add_argument("--variants", action="store_true", help="also graphs toggled, depth 1 and 3, pinned toggled")
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    report = []
    for path in args.engines:
        for v in variants(args):
            with Detector(path, cuda_graphs=v["cuda_graphs"]) as detector:
                engine_ms = float(np.percentile(measure(engine_step(detector.engine, args.batch), 200, 20), 50))
                row = profile_stream(detector, args.frames, args.batch, v["depth"], v["pinned"])
            row.update(engine=Path(path).name, batch=args.batch, engine_ms_p50=engine_ms, **v)
            row["streamed_over_engine"] = row["streamed_ms"].get("p50", 0.0) / engine_ms if engine_ms else None
            report.append(row)
            print(f"{row['engine']} graphs={v['cuda_graphs']} depth={v['depth']} pinned={v['pinned']}: streamed "
                  f"{row['streamed_ms'].get('p50', 0):.3f} ms, engine {engine_ms:.3f} ms "
                  f"({row['streamed_over_engine']:.2f}x), GPU gap p50 {row['gpu']['gpu_gap_ms'].get('p50', 0):.3f} ms, "
                  f"{row['worker']}", flush=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
