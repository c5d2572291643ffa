"""`python -m trtnet.demo`: the quick start — yolov5n.pt → .wts → fp16 engine → boxes on a sample image.

1. The checkpoint: `--weights PATH` (yours, used as is), else the official yolov5n.pt found locally
   (weights/, then ../shared/data/weights/), else fetched from `--url` (a URL or a plain path; written
   atomically). The official file is always checked against its sha256; offline, the message says which
   file to place where.
2. `python -m trtnet.gen_wts` → weights/yolov5n.wts + .json (skipped when up to date).
3. `python -m trtnet.build yolov5n --fp16 --postprocess kernels` → weights/yolov5n.fp16.640.engine (skipped
   when an engine for this TensorRT is up to date).
4. Detection on `--source` (default: bus.jpg from ../shared/data/images when present): the annotated
   image and detections.json go to --out. On an NVIDIA GPU the engine runs; without one, the same network
   runs on the CPU (`trtnet.cpu`, NumPy, fp32) from the weights of step 2, and the demo says so.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from trtnet.cli import add_weights_dir, command_parser, run
from trtnet.errors import TrtnetError
from trtnet.fileio import atomic_write, sha256_of
from trtnet.progress import bar

MODEL = "yolov5n"
DEFAULT_URL = "https://github.com/ultralytics/yolov5/releases/download/v7.0/yolov5n.pt"
# sha256 of that release asset (4,062,133 bytes). The v7.0 release ships the v6.1-generation yolov5n
# (trained 2022-02-08): the same bytes as ../shared/data/weights/yolov5n.pt (md5 8834111959b40f79…) and
# the digest several independent projects pin for this URL.
DEFAULT_SHA256 = "4f180cf23ba0717ada0badd6c685026d73d48f184d00fc159c2641284b2ac0a3"
URL_ENV = "TRTNET_DEMO_URL"
SHA256_ENV = "TRTNET_DEMO_SHA256"
REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO.parent / "shared" / "data", Path("../shared/data"))
SAMPLE_IMAGES = tuple(folder / "images" / "bus.jpg" for folder in SHARED)
LOCAL_CHECKPOINTS = tuple(folder / "weights" / f"{MODEL}.pt" for folder in SHARED)


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


# ------------------------------------------------------------------------------------------ download


def download(url: str, path: Path, sha256: str | None, timeout: float = 30.0) -> Path:
    """Fetch `url` to `path` atomically with a progress bar; nothing is left behind unless the
    sha256 matches (when given). A plain path is read like a file:// URL."""
    url = as_url(url)
    try:
        response = urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 - the URL is the user's choice
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise TrtnetError(offline_message(url, path, sha256, getattr(exc, "reason", exc))) from exc
    digest = hashlib.sha256()
    with response, atomic_write(path) as f:
        total = int(response.headers.get("Content-Length") or 0)
        with bar(total, path.name, "B") as progress:
            try:
                for block in iter(lambda: response.read(1 << 16), b""):
                    f.write(block)
                    digest.update(block)
                    progress.update(len(block))
            except OSError as exc:
                raise TrtnetError(offline_message(url, path, sha256, exc)) from exc
        if sha256 and digest.hexdigest() != sha256.lower():
            raise TrtnetError(
                f"{url} gave a file with sha256 {digest.hexdigest()}, expected {sha256}: not the official "
                f"{path.name} (or a broken download); nothing was written. Try again, or place the official "
                f"file at {path}"
            )
    return path


def as_url(location: str) -> str:
    """`location` as a URL: one with a scheme stays; a plain path (relative, absolute, ~) becomes file://."""
    scheme = urllib.parse.urlsplit(location).scheme
    if len(scheme) > 1:  # a one-letter scheme is a Windows drive (C:\\…)
        return location
    return Path(location).expanduser().resolve().as_uri()


def checked_sha256(sha256: str) -> str:
    """The expected digest in lower case; an empty or malformed one is an error, never "skip the check"."""
    digest = sha256.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise TrtnetError(f"--sha256 {sha256!r}: expected 64 hex digits (the official file's is {DEFAULT_SHA256}); "
                          "to run the demo on a checkpoint of your own, pass it with --weights PATH")
    return digest


def offline_message(url: str, path: Path, sha256: str | None, reason: object) -> str:
    check = f" (sha256 {sha256})" if sha256 else ""
    return (f"could not download {url}: {reason}. Offline? Place the official {path.name}{check} at {path} "
            f"and run the demo again, or point {URL_ENV} / --url at a copy you can reach")


def ensure_checkpoint(path: Path, url: str, sha256: str | None, found: Sequence[Path] = ()) -> Path:
    """`path` if present and genuine, else the first genuine file of `found` (used in place), else
    downloaded (or copied) from `url` to `path`."""
    if path.is_file():
        if sha256 and sha256_of(path) != sha256.lower():
            raise TrtnetError(f"{path} exists but is not the official file (sha256 differs from {sha256}): "
                              "delete it to download it again, or pass it as --weights PATH to use it unchecked")
        say(f"using {path}")
        return path
    for candidate in found:
        if candidate.is_file() and (not sha256 or sha256_of(candidate) == sha256.lower()):
            say(f"using {candidate} (found locally)")
            return candidate
    say(f"fetching {url} → {path}")
    return download(url, path, sha256)


# ------------------------------------------------------------------------------------------ steps


def newer(target: Path, *sources: Path) -> bool:
    return target.is_file() and all(target.stat().st_mtime >= s.stat().st_mtime for s in sources if s.exists())


def ensure_wts(checkpoint: Path, weights_dir: Path) -> Path:
    from trtnet import gen_wts

    wts = weights_dir / f"{checkpoint.stem}.wts"
    if newer(wts, checkpoint) and newer(wts.with_suffix(".json"), checkpoint):
        say(f"using {wts}")
        return wts
    say(f"converting {checkpoint} → {wts}")
    if gen_wts.main([str(checkpoint), "-o", str(weights_dir)]) not in (0, None):
        raise TrtnetError("gen_wts failed (see above)")
    return wts


def engine_is_current(engine: Path, wts: Path) -> bool:
    """An engine built from the current weights by this TensorRT (another TensorRT's engine is rebuilt)."""
    from trtnet import compat
    from trtnet.engine_files import check_tensorrt, load_metadata

    if not newer(engine, wts):
        return False
    try:
        check_tensorrt(load_metadata(engine), compat.flavour())
    except TrtnetError:
        return False
    return True


def ensure_engine(wts: Path, weights_dir: Path) -> Path:
    from trtnet import compat
    from trtnet.build import BuildRequest, PostprocessSettings, build, engine_paths
    from trtnet.weights import sidecar_path

    request = BuildRequest(weights=str(wts), precision="fp16", weights_dir=str(weights_dir),
                           postprocess=PostprocessSettings(mode="kernels"))
    meta = json.loads(sidecar_path(wts).read_text(encoding="utf-8"))  # gen_wts wrote it in the step before
    engine, _ = engine_paths(request, wts, meta)  # the name build gives it: yolov5n.fp16.640.engine
    if engine_is_current(engine, wts):
        say(f"using {engine}")
        return engine
    # No time promised: TensorRT-RTX builds in about a second on a CPU, TensorRT on a GPU can take minutes.
    say(f"building {engine} (fp16) with {compat.flavour()}; progress below")
    result = build(request, log=say)
    say(f"wrote {result.engine} ({result.engine_bytes / 1e6:.1f} MB) in {result.seconds:.1f} s")
    return result.engine


def sample_image(source: str | None) -> Path | None:
    if source:
        if not Path(source).is_file():
            raise TrtnetError(f"--source {source}: no such image")
        return Path(source)
    return next((p for p in SAMPLE_IMAGES if p.is_file()), None)


def detect_on(engine: Path, image: Path):
    """The engine on the GPU."""
    from trtnet.api import Detector

    with Detector(engine) as detector:
        return detector.detect(image)[0]


def detect_on_cpu(weights: Path, image: Path):
    """The same network on the CPU (NumPy, fp32), from the weights the engine was built from."""
    from trtnet.cpu import CpuDetector

    with CpuDetector(weights) as detector:
        return detector.detect(image)[0]


def write_results(result, image: Path, out: Path) -> tuple[Path, Path]:
    """The annotated image and detections.json in `out`; prints each detection."""
    import cv2

    for name, score, box in zip(result.labels, result.scores, result.boxes):
        say(f"  {name:<12} {score:.2f}  [{', '.join(f'{v:.0f}' for v in box)}]")
    out.mkdir(parents=True, exist_ok=True)
    target = out / image.name
    if not cv2.imwrite(str(target), result.draw()):
        raise TrtnetError(f"could not write {target}")
    records = out / "detections.json"
    with atomic_write(records, "w") as f:
        json.dump([result.to_dict()], f, indent=1)
    return target, records


# ------------------------------------------------------------------------------------------ command


def parser() -> argparse.ArgumentParser:
    p = command_parser("demo", "Convert yolov5n, build an fp16 engine and detect on a sample image (on the GPU, "
                               "or on the CPU when there is none).")
    p.add_argument("--weights", help="a YOLOv5 checkpoint of your own to use instead of the official yolov5n.pt")
    p.add_argument("--url", default=os.environ.get(URL_ENV, DEFAULT_URL),
                   help=f"where to fetch yolov5n.pt when no local copy is found: a URL or a path (${URL_ENV})")
    p.add_argument("--sha256", default=os.environ.get(SHA256_ENV, DEFAULT_SHA256),
                   help=f"expected sha256 of the official yolov5n.pt (${SHA256_ENV}); always checked")
    p.add_argument("--source", help="image to detect on (default: ../shared/data/images/bus.jpg if present)")
    p.add_argument("--out", default="runs/demo", help="folder for the annotated image and detections.json")
    add_weights_dir(p, "where the checkpoint, .wts and engine go")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    weights_dir = Path(args.weights_dir)
    image = sample_image(args.source)

    checkpoint = find_checkpoint(args, weights_dir)
    wts = ensure_wts(checkpoint, weights_dir)
    engine = ensure_engine(wts, weights_dir)
    if image is None:
        say(f"engine ready: {engine}. No sample image found: pass --source IMAGE, or run "
            f"python -m trtnet.detect {engine} IMAGE")
        return 0

    from trtnet.cuda_rt import gpu_unavailable_reason

    reason = gpu_unavailable_reason()
    result = None
    if not reason:
        say(f"detecting on {image} with {engine}")
        try:
            result = detect_on(engine, image)
        except TrtnetError as exc:  # e.g. an engine built for another GPU, a driver too old for this CUDA
            reason = f"the GPU could not run it: {exc}"
    if result is None:
        say(f"no GPU to run the engine ({reason}): running the same network on the CPU (NumPy, fp32)")
        result = detect_on_cpu(wts, image)
    target, records = write_results(result, image, Path(args.out))
    say(f"annotated image: {target}; detections: {records}")
    if reason:
        say(f"this ran on the CPU. On a machine with an NVIDIA GPU: pip install -e \".[trt-cu12]\" (driver ≥ 525) or "
            f"\".[trt-cu13]\" (driver ≥ 580), then python -m trtnet.demo, or python -m trtnet.detect {engine} IMAGE")
    return 0


def find_checkpoint(args, weights_dir: Path) -> Path:
    if args.weights:
        path = Path(args.weights)
        if not path.is_file():
            raise TrtnetError(f"--weights {path}: no such file")
        say(f"using {path} (your checkpoint; not checked against the official sha256)")
        return path
    return ensure_checkpoint(weights_dir / f"{MODEL}.pt", args.url, checked_sha256(args.sha256), LOCAL_CHECKPOINTS)


def cli(argv: Sequence[str] | None = None) -> int:
    return run(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
