"""`python -m trtnet.bench ENGINE --files DIR`: image files → boxes, OpenCV decode vs nvImageCodec decode.

    python -m trtnet.bench weights/yolov5n.fp16.engine --files coco128/images/train2017 --batch 32 --decode both

Per decoder and batch size, two passes over the folder's images (cycled to `--iters` batches; the files
come from the page cache after the first pass):
- throughput: `FileDecoder` + `DetectPipeline.stream_decoded` with two batches in flight, as `detect` runs
  a folder: images/s, and the time between consecutive batches of results (p50/p99).
- stages: the same one batch at a time, with a CUDA event after each stage on the stream it runs on
  (upload on the upload stream, GPU decode on the decoder's) and host timers around reading and decoding:
  the mean milliseconds per batch of each stage and its share of their sum. Engine and NMS are told apart
  only without --cuda-graphs (a graph is one launch); with graphs they are one stage, "engine+nms".
The engine row beside them (the engine alone at the same batch) is the ceiling for this pipeline.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from trtnet.errors import TrtnetError


def image_files(folder: str | Path) -> list[str]:
    """The image files of `folder` (sorted, not recursive), by the suffixes `detect` accepts."""
    from trtnet.datasets import IMAGE_SUFFIXES

    root = Path(folder)
    if not root.is_dir():
        raise TrtnetError(f"--files {folder}: not a folder")
    files = sorted(str(p) for p in root.iterdir() if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_SUFFIXES)
    if not files:
        raise TrtnetError(f"--files {folder}: no image files in it")
    return files


def decode_modes(choice: str) -> list[str]:
    if choice not in ("cpu", "gpu", "both"):
        raise TrtnetError(f"--decode {choice}: choose cpu, gpu or both")
    return ["cpu", "gpu"] if choice == "both" else [choice]


def cycled(files: Sequence[str], batches: int, batch: int) -> list[str]:
    """`batches` batches' worth of `files`, the list repeated as often as needed."""
    return list(itertools.islice(itertools.cycle(files), batches * batch))


# ------------------------------------------------------------------------------------------ passes


@dataclass
class Throughput:
    images: int
    seconds: float
    batch_ms: list[float]  # between consecutive batches of results
    skipped: int = 0
    on_gpu: int = 0  # images decoded by nvImageCodec


def throughput(pipeline, decoder, files: Sequence[str], batch: int, depth: int = 2) -> Throughput:
    """Decode + detect `files` in batches with `depth` batches in flight; host wall-clock time."""
    from trtnet.image_decoding import iter_decoded

    stamps, images, skipped, on_gpu = [], 0, 0, 0
    start = time.perf_counter()
    for done, (file, rows) in enumerate(pipeline.stream_decoded(iter_decoded(decoder, files, batch, depth), depth),
                                        start=1):
        images += rows is not None
        skipped += rows is None
        on_gpu += file.on_gpu
        if done % batch == 0:
            stamps.append(time.perf_counter())
    seconds = time.perf_counter() - start
    return Throughput(images, seconds, list(np.diff([start, *stamps]) * 1000.0), skipped, on_gpu)


@dataclass
class StageTimes:
    """Milliseconds per batch of each stage, summed over the batches (`mean` divides)."""

    total_ms: dict[str, float] = field(default_factory=dict)
    batches: int = 0

    def add(self, stage: str, ms: float) -> None:
        self.total_ms[stage] = self.total_ms.get(stage, 0.0) + ms

    def mean(self) -> dict[str, float]:
        return {stage: ms / max(self.batches, 1) for stage, ms in self.total_ms.items()}

    def shares(self) -> dict[str, float]:
        total = sum(self.total_ms.values())
        return {stage: ms / total if total > 0 else 0.0 for stage, ms in self.total_ms.items()}


class EventMarks:
    """A CUDA timing event per stage mark. A stage lasts from the latest earlier mark to its own (the pass
    runs one batch at a time, so the stages follow each other, on whichever stream each ran)."""

    def __init__(self, start_stream):
        from trtnet import cuda_rt

        self.cuda_rt = cuda_rt
        self.marks: list[tuple[str, object]] = []
        self.mark("start", start_stream)

    def mark(self, stage: str, stream) -> None:
        event = self.cuda_rt.Event()
        event.record(stream)
        self.marks.append((stage, event))

    def elapsed(self) -> Iterator[tuple[str, float]]:
        (_, start), later = self.marks[0], self.marks[1:]
        reached = 0.0
        for stage, event in later:
            event.synchronize()
            at = event.elapsed_ms(start)
            yield stage, max(at - reached, 0.0)
            reached = max(reached, at)


def stage_times(pipeline, decoder, files: Sequence[str], batch: int) -> StageTimes:
    """One batch at a time (nothing overlaps): host read and decode times, device time of every stage. On
    the GPU "decode" runs from the decode call to the decoded images (the call's host work included, the
    reads not: run O's "decode" counted them again)."""
    from trtnet.image_decoding import read_all

    times = StageTimes()
    worker = pipeline.engine.worker()
    for start in range(0, len(files), batch):
        chunk = files[start:start + batch]
        read_start = time.perf_counter()
        contents = read_all(chunk)
        contents.result()
        read_ms = (time.perf_counter() - read_start) * 1000.0
        marks = EventMarks(decoder.stream) if decoder.stream is not None else None
        decoded = decoder.decode(chunk, slot=0, contents=contents)
        if marks is not None:
            marks.mark("decode", decoder.stream)
        else:
            marks = EventMarks(worker.stream)
        list(pipeline.stream_decoded([decoded], depth=1, mark=marks.mark))
        times.add("read (host)", read_ms)
        if decoder.stream is None:
            times.add("decode (host)", decoded.decode_ms)
        for stage, ms in marks.elapsed():
            times.add(stage, ms)
        times.batches += 1
    return times


# ------------------------------------------------------------------------------------------ report


def stages_note(times: StageTimes) -> str:
    shares = times.shares()
    return ", ".join(f"{stage} {shares[stage] * 100:.0f}%" for stage in times.total_ms)


def file_timings(model, folder: str, batch: int, decode: str, iters: int, warmup: int,
                 decode_threads: int = 0) -> list:
    """The `files` rows of `trtnet.bench` for one batch size: per decoder, throughput with stage shares."""
    from trtnet.bench import Timing
    from trtnet.image_decoding import FileDecoder

    pipeline = getattr(model, "pipeline", None)
    if not hasattr(pipeline, "stream_decoded"):
        raise TrtnetError("--files: only detection engines have the files pipeline")
    files = image_files(folder)
    timed = cycled(files, max(iters, 1), batch)
    rows = []
    engine = pipeline.engine
    for mode in decode_modes(decode):
        engine.use_device()
        with FileDecoder(mode, device=engine.device_index, cpu_threads=decode_threads) as decoder:
            throughput(pipeline, decoder, cycled(files, max(min(warmup, 2), 1), batch), batch)  # warm caches
            result = throughput(pipeline, decoder, timed, batch)
            stages = stage_times(pipeline, decoder, files, batch)
        note = (f"{len(files)} files of {Path(folder).name}, {result.on_gpu}/{result.images} decoded on the GPU"
                + (f", {result.skipped} unreadable" if result.skipped else "") + f"; {stages_note(stages)}")
        timing = Timing.of(f"files {mode}", batch, result.batch_ms or [result.seconds * 1000.0], note)
        rows.append(replace(timing, images_per_s=result.images / result.seconds if result.seconds else 0.0,
                            stages={"mean_ms": stages.mean(), "share": stages.shares(),
                                    "batches": stages.batches}))
    return rows
