"""How nvImageCodec spends a batch (GPU machine, TensorRT 8.5's Python 3.9, nvImageCodec installed): the decoder's
start, then per batch of JPEGs the host time until `decode` returns and until its images are complete, for each
count of host threads. Run K: GPU decode was half of a files → boxes batch (7.4 ms for 32 coco128 JPEGs) and a
batch took 11.6 ms where decode and engine overlapping would take ~8; if `decode` holds the host until the
images are done, the next batch's decode cannot overlap this one's Python work.

    python tests/gpu/decode_probe.py DIR [--batch 32] [--batches 6] [--threads 1,4,0] [--json OUT]
    python tests/gpu/decode_probe.py DIR --backends [--sizes 1,8,16,32]   # per batch size, nvImageCodec decoders of
                                                                         # one backend each against FileDecoder's
    python tests/gpu/decode_probe.py DIR --variants [--batch 32]         # from the hardware decoder alone to
                                                                         # FileDecoder, one difference at a time

Run L (bus.jpg and zidane.jpg, 1 megapixel each), by a hand-run probe that `--backends` now repeats: the hardware
backend alone decoded 32 in 3.7 ms; one decoder listing the hardware, CUDA and hybrid backends took 15-17 ms with a
host thread per core and 145 ms with one.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from trtnet.image_decoding import DeviceImage, FileDecoder, read_now  # noqa: E402


def probe(paths: list[str], batch: int, batches: int, threads: int) -> dict:
    start = time.perf_counter()
    decoder = FileDecoder("gpu", cpu_threads=threads)
    started = time.perf_counter() - start
    chunks = [[paths[(k * batch + i) % len(paths)] for i in range(batch)] for k in range(batches)]  # the folder cycled
    datas = [read_now(chunk).datas for chunk in chunks]  # the reads are not what is probed
    rows = []
    for chunk, data in zip(chunks, datas):
        t0 = time.perf_counter()
        decoded = decoder.decode_bytes(data, chunk)
        t1 = time.perf_counter()
        decoder.stream.synchronize()
        t2 = time.perf_counter()
        rows.append({"images": len(chunk), "on_gpu": sum(f.on_gpu for f in decoded.files),
                     "call_ms": (t1 - t0) * 1e3, "complete_ms": (t2 - t0) * 1e3})
    decoder.close()
    return {"threads": threads, "start_s": started, "batches": rows}


def median_ms(call, reps: int = 8) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times[2:])[len(times[2:]) // 2]  # the first two warm the decoder up


def decode_batch(decoder: FileDecoder, datas: list[bytes]) -> None:
    decoder.decode_bytes(datas, [str(i) for i in range(len(datas))])
    if decoder.stream is not None:  # OpenCV's images are complete when decode_bytes returns
        decoder.stream.synchronize()


def backends(paths: list[str], sizes: list[int]) -> list[dict]:
    """Per batch size: FileDecoder (OpenCV on trtnet's I/O threads; its GPU decoders in turn with 1 host thread
    and one per core), then nvImageCodec decoders of one backend each (a host thread per core). `decode` returns
    once its images are done."""
    from trtnet.image_decoding import nvimgcodec_module

    datas = [Path(p).read_bytes() for p in paths]
    rows = []
    with FileDecoder("cpu") as decoder:
        for size in sizes:
            ms = median_ms(functools.partial(decode_batch, decoder, [datas[i % len(datas)] for i in range(size)]))
            rows.append({"decoder": "FileDecoder, OpenCV", "batch": size, "ms": ms})
    for threads in (1, 0):
        with FileDecoder("gpu", cpu_threads=threads) as decoder:
            for size in sizes:
                ms = median_ms(functools.partial(decode_batch, decoder, [datas[i % len(datas)] for i in range(size)]))
                rows.append({"decoder": f"FileDecoder, {threads or 'all'} host threads", "batch": size, "ms": ms})
    codec = nvimgcodec_module()
    for kind in ("HW_GPU_ONLY", "GPU_ONLY", "HYBRID_CPU_GPU"):
        try:
            decoder = codec.Decoder(backends=[codec.Backend(getattr(codec.BackendKind, kind))], max_num_cpu_threads=0)
        except RuntimeError as exc:
            rows.append({"decoder": kind, "batch": 0, "ms": None, "error": str(exc)})
            continue
        for size in sizes:
            streams = [codec.CodeStream(datas[i % len(datas)]) for i in range(size)]
            ms = median_ms(functools.partial(decoder.decode, streams))
            rows.append({"decoder": kind, "batch": size, "ms": ms})
    for r in rows:
        print(f"{r['decoder']:<34} batch {r['batch']:>3}: " + (f"{r['ms']:.2f} ms" if r["ms"] is not None
                                                                   else f"cannot be made ({r['error']})"))
    return rows


def variants(paths: list[str], size: int) -> list[dict]:
    """One batch of `size` files, from nvImageCodec's hardware decoder alone (code streams made beforehand, its
    default parameters) to FileDecoder.decode_bytes, adding one thing FileDecoder does at a time (run N: 2.65 ms
    against 5.3 ms for 32 coco128 JPEGs): which of them costs the difference."""
    from trtnet.image_decoding import nvimgcodec_module

    codec = nvimgcodec_module()
    datas = [Path(paths[i % len(paths)]).read_bytes() for i in range(size)]
    rows = []

    def row(name: str, call, **extra) -> None:
        rows.append({"variant": name, "batch": size, "ms": median_ms(call), **extra})

    with FileDecoder("gpu") as file_decoder:
        _, decoders, params = file_decoder._gpu()
        row("FileDecoder.choose (header parse + checks)", lambda: [file_decoder.choose(d) for d in datas])
        row("FileDecoder.decode_bytes", functools.partial(decode_batch, file_decoder, datas))
        hardware = codec.Decoder(backends=[codec.Backend(codec.BackendKind.HW_GPU_ONLY)], max_num_cpu_threads=0)
        fancy = decoders[0]  # FileDecoder's: the hardware engines with fancy upsampling
        streams = [codec.CodeStream(d) for d in datas]
        row("hardware, streams made before", lambda: hardware.decode(streams))
        row("hardware, streams made in the call", lambda: hardware.decode([codec.CodeStream(d) for d in datas]))
        row("hardware + FileDecoder's params (BGR, EXIF)", lambda: hardware.decode(streams, params=params))
        rejected = sum(image is None for image in fancy.decode(streams, params=params))
        row("hardware + params + fancy upsampling (FileDecoder's first)", lambda: fancy.decode(streams, params=params),
            rejected=rejected)
        handle = file_decoder.stream.handle
        row("... + on FileDecoder's CUDA stream", lambda: fancy.decode(streams, params=params, cuda_stream=handle))
        reuse = fancy.decode(streams, params=params, cuda_stream=handle)
        row("... + into the images of the batch before (FileDecoder's reuse)",
            lambda: fancy.decode(streams, params=params, cuda_stream=handle, images=reuse))
        row("... + each image's __cuda_array_interface__ (DeviceImage.of)",
            lambda: [DeviceImage.of(i) for i in fancy.decode(streams, params=params, cuda_stream=handle)])
        row("... + the stream synchronized", lambda: (fancy.decode(streams, params=params, cuda_stream=handle),
                                                      file_decoder.stream.synchronize()))
        row("FileDecoder.decode_bytes again (warm)", functools.partial(decode_batch, file_decoder, datas))
        left = [s for s, image in zip(streams, fancy.decode(streams, params=params)) if image is None]
        if left:
            row(f"FileDecoder's second decoder on the {len(left)} the first rejected",
                lambda: decoders[-1].decode(left, params=params))
    for r in rows:
        print(f"{r['variant']:<62} batch {r['batch']:>3}: {r['ms']:.2f} ms"
              + (f" ({r['rejected']} rejected)" if "rejected" in r else ""))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=6)
    p.add_argument("--threads", default="1,4,0", help="nvImageCodec host threads to try (0: one per core)")
    p.add_argument("--json")
    p.add_argument("--backends", action="store_true", help="compare nvImageCodec's backends, one decoder each")
    p.add_argument("--sizes", default="1,8,16,32", help="--backends: batch sizes")
    p.add_argument("--variants", action="store_true", help="what FileDecoder adds to the hardware decoder's time")
    args = p.parse_args()
    paths = sorted(str(f) for f in Path(args.folder).glob("*.jpg"))
    if args.backends or args.variants:
        sizes = [int(n) for n in args.sizes.split(",")]
        rows = backends(paths, sizes) if args.backends else variants(paths, args.batch)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return 0
    report = [probe(paths, args.batch, args.batches, int(t)) for t in args.threads.split(",")]
    for r in report:
        later = r["batches"][1:] or r["batches"]
        call = sorted(b["call_ms"] for b in later)[len(later) // 2]
        done = sorted(b["complete_ms"] for b in later)[len(later) // 2]
        first, last = r["batches"][0], r["batches"][-1]
        print(f"threads {r['threads']}: decoder start {r['start_s']:.3f} s; first batch {first['complete_ms']:.1f} ms;"
              f" later batches: decode returns after {call:.2f} ms, images complete after {done:.2f} ms"
              f" ({last['on_gpu']}/{last['images']} on the GPU)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
